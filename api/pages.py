"""Keyset pagination: an opaque cursor naming the last row seen, and a bounded limit."""

from __future__ import annotations

import base64
import datetime as dt
import uuid

from flask import request
from sqlalchemy import and_, or_

from api.errors import bad_request, integer

MAX_LIMIT = 500


def limit_arg(default: int = 50) -> int:
    return integer(request.args.get("limit"), "limit", 1, MAX_LIMIT, default)


def encode_cursor(created_at: dt.datetime, row_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode().rstrip("=")


def cursor_arg() -> tuple[dt.datetime, uuid.UUID] | None:
    raw = request.args.get("cursor")
    if not raw:
        return None
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        when, _, row_id = text.partition("|")
        when = dt.datetime.fromisoformat(when)
        if when.tzinfo is None:
            raise ValueError("no time zone")
        # in UTC, as this API writes them: Postgres refuses offsets past +-15:59, which Python takes
        return when.astimezone(dt.timezone.utc), uuid.UUID(row_id)
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise bad_request("'cursor' is not a cursor this API returned") from None


def after_cursor(model, cursor: tuple[dt.datetime, uuid.UUID] | None, newest_first: bool = False):
    """Rows after the cursor in (created_at, id) order (descending when newest_first)."""
    if cursor is None:
        return True
    when, row_id = cursor
    if newest_first:
        return or_(model.created_at < when, and_(model.created_at == when, model.id < row_id))
    return or_(model.created_at > when, and_(model.created_at == when, model.id > row_id))


def page_of(rows: list, limit: int) -> tuple[list, str | None]:
    """Split `limit + 1` fetched rows into the page and the cursor for the next one."""
    page = rows[:limit]
    return page, encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
