"""One database session per request, closed when the request ends; sending committed files' tasks."""

from __future__ import annotations

from flask import current_app, g
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from clapq.db import get_engine
from clapq.queue import first_lane_room, send_or_mark


def db() -> Session:
    if "db" not in g:
        g.db = sessionmaker(bind=get_engine(current_app.config["CLAPQ"].database_url), expire_on_commit=False)()
    return g.db


def time_limit(seconds: int) -> None:
    """Stop each statement of this request's session that runs longer than `seconds` (0: none), in every
    transaction it begins (the session hands its connection back to the pool at each rollback, so a
    session-wide SET would stay on a pooled connection or miss the next one). Postgres then raises
    QueryCanceled (SQLSTATE 57014)."""
    if seconds <= 0 or g.get("time_limit"):
        return
    g.time_limit = seconds
    limit = select(func.set_config("statement_timeout", f"{seconds}s", True))
    session = db()

    @event.listens_for(session, "after_begin")
    def _limit(session, transaction, connection) -> None:
        connection.execute(limit)

    if session.in_transaction():  # begun already (the API key's lookup)
        session.execute(limit)


def close_db(exc: BaseException | None = None) -> None:
    session = g.pop("db", None)
    if session is not None:
        if exc is not None:
            session.rollback()
        session.close()


def lane_room(item_ids: list, premarked: bool = False) -> int:
    """How many of `item_ids`, which this request's transaction queues, go in the queue's first lane; the rest are
    marked as in the bulk lane (clapq.queue.first_lane_room, `premarked` too). Call it last before the commit: it
    holds a lock of the tenant until then."""
    if not item_ids:
        return 0
    return first_lane_room(db(), g.tenant_id, item_ids, current_app.config["CLAPQ"].items_per_task, premarked)


def send_committed(item_ids: list, fast: int, **log_extra) -> None:
    """Send the tasks of files this request committed (clapq.queue.send_or_mark), the first `fast` of them in
    the queue's first lane (lane_room, counted before the commit)."""
    if not item_ids:
        return
    settings = current_app.config["CLAPQ"]
    send_or_mark(current_app.extensions["clapq_celery"], settings.database_url, item_ids, settings.items_per_task,
                 fast=fast, **log_extra)
