"""One database session per request, closed when the request ends; sending committed files' tasks."""

from __future__ import annotations

from flask import current_app, g
from sqlalchemy import Text, cast, event, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from clapq.db import get_engine
from clapq.models import WAITING_FOR_MODEL, Item
from clapq.queue import FAST_LANE_TASKS, send_or_mark


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


# Two uploads of one tenant at once each counted the other's files, committed first, as waiting before its own,
# and both went in the bulk lane (helper-50): each upload counts, under this lock of its tenant, just before its
# commit, which releases it. Postgres keeps advisory locks of two int4 keys apart from those of one bigint.
LANE_LOCK = 0x636C616E  # "clan"


def in_the_queue():
    """Of files waiting (queued or running), those that hold a place in the queue: not those parked for a worker
    of another model than any serves (clapq.models.WAITING_FOR_MODEL), which wait for no worker here."""
    return or_(Item.claimed_by.is_(None), Item.claimed_by != WAITING_FOR_MODEL)


def lane_room(item_ids: list) -> int:
    """How many of `item_ids`, which this request's transaction queues, go in the queue's first lane: as many as
    keep the tenant's files waiting under FAST_LANE_TASKS tasks' worth, the rest going in the bulk lane
    (clapq.queue.BULK_PRIORITY), behind other tenants' first files. Call it last before the commit: it holds a
    lock of the tenant until then."""
    if not item_ids:
        return 0
    session = db()
    lane = FAST_LANE_TASKS * current_app.config["CLAPQ"].items_per_task
    session.execute(select(func.pg_advisory_xact_lock(LANE_LOCK, func.hashtext(cast(g.tenant_id, Text)))))
    # the tenant's files waiting, these included, counted up to what decides (a tenant with 100,000 waiting is
    # not counted whole at each upload), through ix_items_tenant_waiting (without it, a tenant with fewer waiting
    # than the limit had the whole table read: helper-49). Files parked for a worker of another model hold no
    # place in the queue: counted, they sent all the tenant's uploads to the bulk lane (helper-49)
    waiting = (select(Item.id).where(Item.status.in_(("queued", "running")), Item.tenant_id == g.tenant_id,
                                     in_the_queue())
               .limit(lane + len(item_ids)).subquery())
    return max(0, lane - (session.scalar(select(func.count()).select_from(waiting)) - len(item_ids)))


def send_committed(item_ids: list, fast: int, **log_extra) -> None:
    """Send the tasks of files this request committed (clapq.queue.send_or_mark), the first `fast` of them in
    the queue's first lane (lane_room, counted before the commit)."""
    if not item_ids:
        return
    settings = current_app.config["CLAPQ"]
    send_or_mark(current_app.extensions["clapq_celery"], settings.database_url, item_ids, settings.items_per_task,
                 fast=fast, **log_extra)
