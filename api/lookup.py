"""Fetch a row the calling tenant owns, or raise the same 404 as for an unknown id."""

from __future__ import annotations

import uuid

from flask import g
from sqlalchemy import select
from sqlalchemy.exc import InvalidRequestError

from api.db import db
from api.errors import ApiError, not_found
from clapq.models import Item, Library


def parse_id(raw: str | None, what: str) -> uuid.UUID:
    """A 404 for what is no id, as for an unknown one, that says it is none: `clapq` takes a library's name or id,
    the API ids only, and a search with library_id=field, beside a library listed as 'field', was "library 'field'
    not found" (helper-118)."""
    try:
        return uuid.UUID(str(raw))
    except (ValueError, TypeError, AttributeError):
        where = (": GET /v1/libraries gives each library's beside its name" if what == "library"
                 else ", as the API gives them")
        shown = str(raw)[:64]
        raise ApiError(404, "not_found", f"{what} not found: {shown!r} is not an id (ids are UUIDs{where})") from None


def owned(model, raw_id: str | None, what: str, lock: bool = False):
    """`lock`: the row is locked (FOR UPDATE) until the request's transaction ends; only a row of the caller's
    own, so that a request never locks, nor waits for, another tenant's row (helper-55: a PATCH of another
    tenant's item id locked it, and waited while its owner's edit held it, before its 404)."""
    if lock:
        row = db().scalar(select(model).where(model.id == parse_id(raw_id, what), model.tenant_id == g.tenant_id)
                          .with_for_update().execution_options(populate_existing=True))
    else:
        row = db().get(model, parse_id(raw_id, what))
    if row is None or row.tenant_id != g.tenant_id:
        raise not_found(what)
    return row


def owned_item(raw_id: str | None) -> tuple[Item, Library]:
    """The caller's item and its library; a library deleted, with the item, since the item was read is the
    item's 404, as a moment later, not a 500 (helper-60)."""
    item = owned(Item, raw_id, "item")
    lib = db().get(Library, item.library_id)
    if lib is None:
        raise not_found("item")
    return item, lib


def refreshed(row, what: str):
    """`row` read again as stored after the request's commit (what Postgres wrote out, server defaults); one
    that another request deleted since is the 404 a GET then gives, not a 500 ("Could not refresh instance",
    helper-60)."""
    try:
        db().refresh(row)
    except InvalidRequestError:
        raise not_found(what) from None
    return row
