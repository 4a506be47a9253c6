"""Bearer-key authentication: every /v1 request resolves to one tenant. One route also takes a link instead: an
item's audio (`?link=`, made by POST /v1/items/<id>/audio-link), for a player that cannot send a header."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
import uuid

from flask import current_app, g, request
from sqlalchemy import select

from api.db import db
from api.errors import ApiError
from clapq.keys import hash_key, tenant_for_key
from clapq.models import ApiKey

LINKED = "v1.items.get_audio"  # the one endpoint a link opens
_LINK = struct.Struct(">16sQ")  # the key's row id, then when the link expires (Unix seconds)
_MAC_BYTES = 20


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="clapq"'})


def require_tenant() -> None:
    """before_request hook for /v1: unknown and revoked keys get the same 401."""
    header = request.headers.get("Authorization", "")
    if not header and request.endpoint == LINKED and "link" in request.args:
        return _linked(request.args["link"], (request.view_args or {}).get("item_id", ""))
    scheme, _, key = header.partition(" ")
    tenant = tenant_for_key(db(), key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if tenant is None:
        raise _unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
    g.tenant_id = tenant.id
    g.key_hash = hash_key(key.strip())
    g.key_id = g.key_hash[:32]  # what api.ratelimit counts by: the key, not its tenant


def _mac(key_hash: str, item_id: str, key_id: bytes, expires: int) -> bytes:
    """Signed with the key's stored hash, so a link is as good as its key and no better (it stops working when the
    key is revoked), and with a secret kept beside the stored files (clapq.blobs.BlobStore.secret), not in the
    database: what reads the database alone (a leaked backup of it, a read-only login) makes no link, as it finds
    no key. It opens one item."""
    secret = current_app.extensions["clapq_blobs"].secret()
    message = (b"clapq audio link\0" + bytes.fromhex(key_hash) + item_id.strip().lower().encode() + b"\0"
               + _LINK.pack(key_id, expires))
    return hmac.new(secret, message, hashlib.sha256).digest()[:_MAC_BYTES]


def audio_link(item_id: str, lasts_s: int) -> tuple[str, int]:
    """A link to the item's audio for the caller's key (this request's), and when it expires (Unix seconds)."""
    key = db().scalar(select(ApiKey).where(ApiKey.key_hash == g.key_hash, ApiKey.revoked_at.is_(None)))
    if key is None:  # revoked since this request's authentication
        raise _unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
    expires = int(time.time()) + lasts_s
    token = _LINK.pack(key.id.bytes, expires) + _mac(key.key_hash, item_id, key.id.bytes, expires)
    return base64.urlsafe_b64encode(token).decode().rstrip("="), expires


def _linked(token: str, item_id: str) -> None:
    """The tenant and key of a link to this item's audio, as require_tenant's of a key."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        key_id, expires = _LINK.unpack(raw[:_LINK.size])
        mac = raw[_LINK.size:]
    except (ValueError, struct.error):
        raw = mac = None
    if raw is not None and base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
        raw = None  # one spelling of a link: the decoder also takes padding, other spare bits, characters it skips
    key = db().get(ApiKey, uuid.UUID(bytes=key_id)) if raw is not None and len(mac) == _MAC_BYTES else None
    if key is None or key.revoked_at is not None or not hmac.compare_digest(
            mac, _mac(key.key_hash, item_id, key_id, expires)):
        raise _unauthorized("this audio link is not valid: not one this service made for this item, or the API key "
                            "that asked for it was revoked; ask for a new one (POST /v1/items/<id>/audio-link)")
    if expires <= time.time():
        raise _unauthorized(f"this audio link expired {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}; "
                            "ask for a new one (POST /v1/items/<id>/audio-link)")
    g.tenant_id = key.tenant_id
    g.key_hash = key.key_hash
    g.key_id = key.key_hash[:32]
