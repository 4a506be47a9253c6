"""Bearer-key authentication: every /v1 request resolves to one tenant."""

from __future__ import annotations

from flask import g, request

from api.db import db
from api.errors import ApiError
from clapq.keys import hash_key, tenant_for_key


def require_tenant() -> None:
    """before_request hook for /v1: unknown and revoked keys get the same 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    tenant = tenant_for_key(db(), key.strip()) if scheme.lower() == "bearer" and key.strip() else None
    if tenant is None:
        raise ApiError(401, "unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": 'Bearer realm="clapq"'})
    g.tenant_id = tenant.id
    g.key_id = hash_key(key.strip())[:32]  # what api.ratelimit counts by: the key, not its tenant
