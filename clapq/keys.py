"""API keys: generated once, shown once, stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from clapq.models import ApiKey, Tenant

KEY_PREFIX = "cq_"
PREFIX_CHARS = 10  # of a key, kept in clear beside its hash, so that a person can tell keys apart
KEY_CHARS = len(KEY_PREFIX) + 43  # secrets.token_urlsafe(32): 32 bytes in unpadded base64


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def create_key(session: Session, tenant_name: str) -> str:
    """Create the tenant if needed and return a new key for it."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:PREFIX_CHARS]))
    session.flush()
    return key


def create_key_said(session: Session, tenant_name: str) -> tuple[str, str]:
    """create_key, and a sentence for whoever runs `clapq keys create`: whether the tenant is new, naming the
    tenants of a name close to it, or has keys already, and how `clapq keys list` shows this one. A misspelt
    `--tenant` made a tenant of its own, unsaid, whose key saw none of the team's libraries and jobs; and two
    people's keys of one tenant were told apart in `keys list` only by starts that `keys create` never showed
    (helper-127). Spaces around the name are dropped, and said (`--tenant " studio"` made a tenant other than
    "studio", helper-131), unless a tenant has that very name (made before): its keys are made as before."""
    from clapq.client import close_names

    active = func.count(ApiKey.id).filter(ApiKey.revoked_at.is_(None))
    before = {name: n for name, n in session.execute(
        select(Tenant.name, active).outerjoin(ApiKey, ApiKey.tenant_id == Tenant.id).group_by(Tenant.name))}
    given, trimmed = tenant_name, ""
    if tenant_name not in before and tenant_name.strip() != tenant_name:
        tenant_name = tenant_name.strip()
        trimmed = f"--tenant {given!r} taken as {tenant_name!r}, without the spaces around it; "
    key = create_key(session, tenant_name)
    shown = f"`clapq keys list` shows this key as {key[:PREFIX_CHARS]}…"
    if tenant_name in before:
        n = before[tenant_name]
        others = f"{n} other active key{'s' if n != 1 else ''}" if n else "no other active key"
        return key, (f"{trimmed}a key of tenant {tenant_name!r}, which has {others}: each of its keys reaches the same "
                     f"libraries and jobs; {shown}")
    near = close_names(tenant_name, sorted(before))
    one = len(near) == 1
    beside = (f" (beside {', '.join(map(repr, near))}, {'a name' if one else 'names'} close to it: if you meant "
              f"{'that tenant' if one else 'one of those'}, revoke this key, `clapq keys revoke {key[:PREFIX_CHARS]}`, "
              "and give its name)" if near else "")
    return key, (f"{trimmed}new tenant {tenant_name!r}{beside}: its keys reach its own libraries and jobs only, none "
                 f"of another tenant's; {shown}")


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The key's tenant, or None for unknown and revoked keys alike."""
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


class NoSuchKey(LookupError):
    """No key, or more than one, answers to what was given."""


def list_keys(session: Session) -> list[tuple[ApiKey, str]]:
    """Every key with its tenant's name, oldest first."""
    return [tuple(r) for r in session.execute(
        select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at))]


def revoke_key(session: Session, given: str) -> tuple[ApiKey, str, bool]:
    """Revoke the key given whole, or by the first characters `clapq keys list` shows (all 10 kept: a
    shorter start named whichever key began so, and revoked it); the key, its tenant's name and whether it
    was revoked before (it then keeps its time)."""
    given = given.rstrip("…")  # as `keys list` shows it
    if not given.startswith(KEY_PREFIX) or len(given) < PREFIX_CHARS:
        raise NoSuchKey(f"{given!r} is not a key, nor the start of one as `clapq keys list` shows it: give the "
                        f"whole key, or its first {PREFIX_CHARS} characters ({KEY_PREFIX!r} and "
                        f"{PREFIX_CHARS - len(KEY_PREFIX)} more)")
    keys = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if len(given) > PREFIX_CHARS:  # the whole key: by its hash
        rows = session.execute(keys.where(ApiKey.key_hash == hash_key(given))).all()
    else:
        rows = session.execute(keys.where(ApiKey.prefix.startswith(given, autoescape=True))).all()
    if not rows and len(given) > PREFIX_CHARS:  # a key cut short or run on is neither whole nor a start
        size = f" ({len(given)} characters; a whole key has {KEY_CHARS})" if len(given) != KEY_CHARS else ""
        raise NoSuchKey(f"no key is {given!r}{size}: give the whole key, or its first {PREFIX_CHARS} characters "
                        "as `clapq keys list` shows them")
    if not rows:
        raise NoSuchKey(f"no key starts with {given!r} (`clapq keys list` shows them)")
    if len(rows) > 1:
        raise NoSuchKey(f"{len(rows)} keys start with {given!r}; give the whole key")
    key, tenant = rows[0]
    before = key.revoked_at is not None
    if not before:
        key.revoked_at = func.now()
        session.flush()
        session.refresh(key)
    return key, tenant, before
