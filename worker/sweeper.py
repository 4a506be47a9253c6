"""Maintenance loop: re-enqueue items Postgres says are pending but no queued task will deliver, and
remove stored files that no item holds any more."""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, select, update

from clapq.blobs import BlobStore, reclaim, remove_stale_uploads
from clapq.db import get_engine, session_scope
from clapq.models import Item
from clapq.queue import EMBED_QUEUE, enqueue_items, make_celery, redis_client
from clapq.settings import Settings
from worker.store import silent_for

log = logging.getLogger(__name__)

# the API removes a deletion's files right after its commit; what is queued longer was left by a crash
# or a race (clapq.models.BlobReclaim)
RECLAIM_AFTER_S = 60


def _queue_depth(app) -> int:
    return int(redis_client(app).llen(EMBED_QUEUE))


def sweep_once(settings: Settings, app) -> int:
    """One pass; returns how many items were re-enqueued."""
    with session_scope(settings.database_url) as s:
        # running, but no heartbeat for a while: its worker is gone (killed, lost, shut down)
        lost = list(s.scalars(select(Item.id).where(Item.status == "running",
                                                   silent_for(settings.stale_after_s)).limit(10_000)
                             .with_for_update(skip_locked=True)))
        # queued rows are only orphans when the broker holds nothing: a lost message,
        # a Redis restart that lost its data, or an enqueue that failed after the commit
        orphans = []
        if _queue_depth(app) == 0:
            orphans = list(s.scalars(select(Item.id).where(Item.status == "queued",
                                                        silent_for(settings.stale_after_s)).limit(10_000)
                             .with_for_update(skip_locked=True)))
        ids = lost + orphans
        if ids:
            # back to queued, so the new task's claim takes them (attempts still count every try)
            s.execute(update(Item).where(Item.id.in_(ids), Item.status.in_(("queued", "running")))
                      .values(status="queued", updated_at=func.now()))
    if ids:
        # Items whose worker died go one per task: if one of them is what kills workers, it can
        # only take itself down from now on, and its attempts run out while the others finish.
        enqueue_items(app, lost, 1)
        enqueue_items(app, orphans, settings.items_per_task)
        log.warning("re-enqueued stranded items", extra={"count": len(ids)})
    return len(ids)


def collect_blobs(settings: Settings) -> int:
    """Remove the queued blobs no item holds and stale temporary uploads; returns how many files."""
    store = BlobStore(settings.blob_dir)
    removed = reclaim(get_engine(settings.database_url), store, older_than_s=RECLAIM_AFTER_S)
    stale = remove_stale_uploads(store)
    if removed or stale:
        log.info("removed files no item holds", extra={"blobs": removed, "stale_uploads": stale})
    return removed + stale


def run_forever(settings: Settings) -> None:
    app = make_celery(settings)
    log.info("sweeper started", extra={"interval_s": settings.sweep_interval_s})
    steps = {"sweep": lambda: sweep_once(settings, app), "blob removal": lambda: collect_blobs(settings)}
    while True:
        for name, step in steps.items():
            try:
                step()
            except Exception:  # keep going through transient outages (Redis or Postgres restarting)
                log.exception(f"{name} failed")
        time.sleep(settings.sweep_interval_s)
