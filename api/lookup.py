"""Fetch a row the calling tenant owns, or raise the same 404 as for an unknown id."""

from __future__ import annotations

import uuid

from flask import g

from api.db import db
from api.errors import not_found


def parse_id(raw: str | None, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(raw))
    except (ValueError, TypeError, AttributeError):
        raise not_found(what) from None


def owned(model, raw_id: str | None, what: str, lock: bool = False):
    """`lock`: the row is locked (FOR UPDATE) until the request's transaction ends."""
    row = db().get(model, parse_id(raw_id, what), with_for_update=lock)
    if row is None or row.tenant_id != g.tenant_id:
        raise not_found(what)
    return row
