"""Maintenance loop: re-enqueue items Postgres says are pending but no queued task will deliver."""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, select, update

from clapq.db import session_scope
from clapq.models import Item
from clapq.queue import EMBED_QUEUE, TASK_HARD_LIMIT_S, enqueue_items, make_celery
from clapq.settings import Settings

log = logging.getLogger(__name__)

QUEUED_GRACE_S = 60


def _queue_depth(app) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.client.llen(EMBED_QUEUE))


def sweep_once(settings: Settings, app, queued_grace_s: float = QUEUED_GRACE_S) -> int:
    """One pass; returns how many items were re-enqueued."""
    now = func.now()

    def older_than(seconds: float):
        return Item.updated_at < now - func.make_interval(0, 0, 0, 0, 0, 0, seconds)

    with session_scope(settings.database_url) as s:
        # running past the hard time limit: its worker is gone
        ids = list(s.scalars(select(Item.id).where(Item.status == "running",
                                                   older_than(TASK_HARD_LIMIT_S + 300)).limit(10_000)))
        # queued rows are only orphans when the broker holds nothing: a lost message,
        # a Redis restart that lost its data, or an enqueue that failed after the commit
        if _queue_depth(app) == 0:
            ids += list(s.scalars(select(Item.id).where(Item.status == "queued",
                                                        older_than(queued_grace_s)).limit(10_000)))
        if ids:
            s.execute(update(Item).where(Item.id.in_(ids)).values(updated_at=now))
    if ids:
        enqueue_items(app, ids, settings.items_per_task)
        log.warning("re-enqueued stranded items", extra={"count": len(ids)})
    return len(ids)


def run_forever(settings: Settings, interval_s: float = 30.0) -> None:
    app = make_celery(settings)
    logging.basicConfig(level=settings.log_level)
    while True:
        try:
            sweep_once(settings, app)
        except Exception:  # keep sweeping through transient outages
            log.exception("sweep failed")
        time.sleep(interval_s)
