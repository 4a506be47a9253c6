"""Maintenance loop: re-enqueue items Postgres says are pending but no queued task will deliver, remove
stored files that no item holds any more, and rebuild a vector index after a large deletion."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from sqlalchemy import func, or_, select, text, update
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisDown
from redis.exceptions import TimeoutError as RedisSilent
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from clapq import metrics
from clapq.blobs import BlobStore, reclaim_queued, remove_stale_uploads
from clapq.db import get_engine, session_scope
from clapq.models import NO_MESSAGE, NOT_SENT, WAITING_FOR_MODEL, EmbeddingModel, Item, Library, park
from clapq.presence import beat_done, beat_failed, serving
from clapq.queue import (NotSent, enqueue_items, first_lane_room, lift_bulk, make_celery, queued_tasks,
                         redis_client)
from clapq.settings import Settings
from worker.store import silent_for

log = logging.getLogger(__name__)

# the API removes a deletion's files right after its commit (a library's on a thread of its own, after its answer:
# api.removal.reclaim_later); what is queued longer was left by a crash or a race (clapq.models.BlobReclaim)
RECLAIM_AFTER_S = 60

VECTOR_INDEXES = (("segments", "ix_segments_vector_hnsw"), ("embeddings", "ix_embeddings_vector_hnsw"))
REINDEX_LOCK = 0x636C6170_71726978  # "clapqrix": one index rebuild at a time, however many beats run
DEAD_SHARE = 0.2  # and at least Settings.reindex_min_dead dead rows
RETRY_FAILED_S = 3600
PICK_MOST = 10_000  # files of each kind a pass sends again; the rest wait for the next
_failed: dict[str, float] = {}  # index -> when its last rebuild failed (time.monotonic)


def sweep_once(settings: Settings, app, pause: tuple | None = None) -> int:
    """One pass; returns how many items were sent again. `pause`: a time Postgres was away, (start or None, end),
    which does not count as a running file's silence (see Sweeps)."""
    client = redis_client(app)
    with session_scope(settings.database_url) as s:
        # only files a live worker can embed are sent: one of a model none serves went round the queue for ever
        # (clapq.presence.serve); it waits, queued, until a worker of its model starts
        served = sorted(serving(client, s.scalars(select(EmbeddingModel.id)).all()))

        def pick(*where) -> list:  # the longest silent first (ix_items_pending): of more than a pass takes,
            # the oldest files, not any
            return s.execute(select(Item.id, Item.attempts, Library.model_id, Item.tenant_id, Item.created_at,
                                    Item.job_id, Item.claimed_by)
                             .join(Library, Library.id == Item.library_id).where(*where)
                             .order_by(Item.updated_at, Item.id).limit(PICK_MOST)
                             .with_for_update(of=Item, skip_locked=True)).all()

        # running, but no heartbeat for a while: its worker is gone (killed, lost, shut down)
        lost = pick(Item.status == "running", silent_for(settings.stale_after_s), *_beside(pause, settings))
        # queued with no message (clapq.models.NO_MESSAGE): left for a worker of their model when none ran, or
        # committed while Redis did not take their task; sent now (where one serves their model)
        parked = pick(Item.status == "queued", Item.claimed_by.in_(NO_MESSAGE), Library.model_id.in_(served))
        # other queued rows are only orphans when the broker holds nothing: a lost message, a Redis restart that
        # lost its data, or an enqueue that failed after the commit where the API could not mark it
        orphans = []
        if queued_tasks(client) == 0:
            orphans = pick(Item.status == "queued", silent_for(settings.stale_after_s), Library.model_id.in_(served),
                           or_(Item.claimed_by.is_(None), Item.claimed_by.not_in(NO_MESSAGE)))
        sent = [r for r in lost + parked + orphans if r.model_id in served]
        waiting = [r.id for r in lost if r.model_id not in served]
        # back to queued, so the new task's claim takes them (attempts still count every try)
        if sent:
            s.execute(update(Item).where(Item.id.in_([r.id for r in sent]), Item.status.in_(("queued", "running")))
                      .values(status="queued", progress=None, updated_at=func.now(), claimed_by=None))
        if waiting:
            s.execute(update(Item).where(Item.id.in_(waiting), Item.status == "running")
                      .values(status="queued", progress=None, updated_at=func.now(), claimed_by=WAITING_FOR_MODEL,
                              error="worker lost (its process died); no running worker serves this library's model, "
                                    "so it waits for one"))
        # Files tried before (a dead worker's) go one per task, in the first lane: if one of them is what kills
        # workers, it can only take itself down from now on, and its attempts run out while the others finish.
        # Those never tried (a Redis that lost its data, an upload's unsent tasks) go as an upload's do, counted
        # with their tenant's files waiting, before the commit (clapq.queue.first_lane_room): all in the first, a
        # lost backlog of 10,000 went ahead of every other tenant's next upload (helper-49). Tenants in one order,
        # so that two beats take their locks alike
        fresh: dict = {}
        for r in sorted((r for r in sent if not r.attempts), key=lambda r: (r.created_at, r.id)):
            fresh.setdefault(r.tenant_id, []).append(r.id)
        groups = [([r.id for r in sent if r.attempts], 1, None)]
        groups += [(ids, settings.items_per_task, first_lane_room(s, tenant, ids, settings.items_per_task))
                   for tenant, ids in sorted(fresh.items())]
    unsent = []
    for n, (ids, per_task, fast) in enumerate(groups):
        try:
            enqueue_items(app, ids, per_task, fast=fast)
        except NotSent as exc:  # marked again, so that a later pass sends them (unmarked, they waited as orphans)
            unsent = exc.ids + [i for later, _, _ in groups[n + 1:] for i in later]
            break
    _count_resent(app, lost, parked, orphans, served, set(unsent))
    if unsent:
        with session_scope(settings.database_url) as s:
            park(s, unsent, NOT_SENT)
        raise RuntimeError(f"{len(unsent)} of {len(sent)} stranded files not sent; the next pass sends them")
    # a tenant's backlog moves by a task at each pass once workers took the one moved before, whatever other
    # tenants keep uploading (clapq.queue.lift_bulk)
    if lift_bulk(client):
        log.info("the bulk lane's oldest task moved to the first lane, which other files kept busy")
    if sent:
        _said(settings, lost, parked, orphans, served)
    if waiting:
        log.warning("files whose worker is gone wait for a worker of their model, which none running serves; they "
                    "are sent as soon as one does", extra={"count": len(waiting)})
    return len(sent)


def _by_reason(lost: list, parked: list, orphans: list) -> dict[str, list]:
    """The files a pass sends again, by why (clapq.metrics.RESENT_REASONS; _said's words for each)."""
    return {"worker_lost": lost, "no_task": [r for r in parked if r.claimed_by == NOT_SENT],
            "model_served": [r for r in parked if r.claimed_by != NOT_SENT], "task_lost": orphans}


def _count_resent(app, lost: list, parked: list, orphans: list, served, unsent: set) -> None:
    """Count in /metrics (clapq_files_resent_total) the files this pass sent, by why; not those Redis did not take,
    which the next pass sends (and counts)."""
    for reason, rows in _by_reason(lost, parked, orphans).items():
        metrics.record_resent(app, reason, sum(1 for r in rows if r.model_id in served and r.id not in unsent))


def _said(settings: Settings, lost: list, parked: list, orphans: list, served) -> None:
    """One line for each reason files were sent again, naming them and their jobs: a count alone ("re-enqueued
    stranded items", count 1) was all the log said after a worker was killed mid-file, after Redis restarted empty
    and after an upload's tasks were not taken, so the operator could not tell which happened, nor to which files
    (helper-136)."""
    rows_of = _by_reason(lost, parked, orphans)
    why = {"worker lost": (rows_of["worker_lost"], f"whose worker went silent for over {settings.stale_after_s} s "
                           "(CLAPQ_STALE_AFTER_S): killed, crashed or cut off mid-file; that try counts "
                           "(attempts), and each goes in a task of its own"),
           "no task": (rows_of["no_task"], "whose task Redis did not take as they were uploaded or sent again (it "
                       "was away)"),
           "model served": (rows_of["model_served"], "that waited for a worker of their model, which one now serves"),
           "task lost": (rows_of["task_lost"], "queued with no task in Redis, which held none: Redis restarted empty "
                         "(its data lost) or lost their messages")}
    for reason, (rows, words) in why.items():
        rows = [r for r in rows if r.model_id in served]
        if rows:
            log.warning(f"re-enqueued stranded items: {len(rows)} file{'s' if len(rows) > 1 else ''} {words}",
                        extra={"count": len(rows), "reason": reason, "item_ids": [str(r.id) for r in rows[:10]],
                               "job_ids": sorted({str(r.job_id) for r in rows})[:10]})


def _beside(pause: tuple | None, settings: Settings) -> list:
    """A running file's silence without the part of it in `pause` (start or None: from the file's last beat,
    end), at least CLAPQ_STALE_AFTER_S."""
    if pause is None:
        return []
    start, end = pause
    since = Item.updated_at if start is None else func.greatest(start, Item.updated_at)
    overlap = func.greatest(func.make_interval(), func.least(end, func.now()) - since)
    return [Item.updated_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, settings.stale_after_s) - overlap]


class Sweeps:
    """The sweeper's passes, and what they learn of Postgres. While it does not answer, no worker can record a
    heartbeat, and a task that Celery retries after such a fault beats not at all until its countdown ends
    (up to 2 min): at the first pass after an outage longer than CLAPQ_STALE_AFTER_S every running file
    looked lost, and was sent again one per task with a try counted, while its worker, alive, lost it. So the
    time from the last pass that went through before a failed one to the first after it (Postgres's clock)
    does not count as silence: a file is taken once it has been silent CLAPQ_STALE_AFTER_S beside that time. A
    file silent that long before the outage is taken at once, and a Postgres that fails a pass now and then
    (a deadlock, a stall) holds back no dead worker's files for longer than its last outage (helper-53: not
    taking any files for CLAPQ_STALE_AFTER_S after each failed pass, one pass in four failing took none)."""

    def __init__(self, settings: Settings, app):
        self.settings, self.app = settings, app
        self.good_at = None  # Postgres's time at the last pass that went through
        self.away_since = None  # ... at the last one before a pass failed (None: none failed since)
        self.away = False
        self.pause: tuple | None = None  # the last outage: (its start, None where unknown; its end)

    def __call__(self) -> int:
        try:
            with session_scope(self.settings.database_url) as s:
                now = s.scalar(select(func.now()))
            if self.away:
                self.pause = (self.away_since, now)
            sent = sweep_once(self.settings, self.app, pause=self.pause)
        except (OperationalError, InterfaceError):
            if not self.away:
                self.away, self.away_since = True, self.good_at
            raise
        if self.away:
            self.away = False
            log.info("Postgres answers again: the time it was away does not count as a running file's silence",
                     extra={"since": str(self.pause[0]), "until": str(self.pause[1])})
        self.good_at = now
        return sent


def collect_blobs(settings: Settings) -> int:
    """Remove the queued blobs no item holds and stale temporary uploads; returns how many files."""
    store = BlobStore(settings.blob_dir)
    removed = reclaim_queued(get_engine(settings.database_url), store, RECLAIM_AFTER_S)
    stale = remove_stale_uploads(store)
    if removed or stale:
        log.info("removed files no item holds", extra={"blobs": removed, "stale_uploads": stale})
    return removed + stale


def _drop_leftovers(conn, table: str, index: str) -> None:
    """Drop what a rebuild cut short left (its beat killed, or the rebuild failed): an invalid copy of
    the index, which takes disk and which every write to the table still updates."""
    for leftover in conn.scalars(text(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = CAST(:t AS regclass) AND NOT i.indisvalid AND c.relname ~ :names"),
            {"t": table, "names": f"^{index}_cc(new|old)[0-9]*$"}):
        conn.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{leftover}"'))


def repair_indexes(settings: Settings, dead_share: float = DEAD_SHARE) -> list[str]:
    """After a large deletion (dead rows at least `reindex_min_dead` and `dead_share` of the live ones),
    rebuild the table's HNSW index, then VACUUM it; returns the indexes rebuilt.

    Deleted rows stay in the HNSW graph until VACUUM removes them and re-links their neighbours one by
    one: 334 s for 100k deleted of 200k windows, where REINDEX INDEX CONCURRENTLY (a new graph of the
    live rows) and the VACUUM after it took 37 s, and left an index half the size and searches 20%
    faster (benchmarks/delete_vacuum.py). Searches and writes go on meanwhile, on the old graph until
    the new one replaces it. An autovacuum already repairing the table gives way to the rebuild. A
    rebuild that fails (a disk without room for the copy) is not tried again for an hour."""
    if not settings.reindex_min_dead:
        return []
    rebuilt = []
    engine = get_engine(settings.database_url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if not conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": REINDEX_LOCK}):
            return rebuilt
        try:
            for table, index in VECTOR_INDEXES:
                if time.monotonic() - _failed.get(index, -RETRY_FAILED_S) < RETRY_FAILED_S:
                    continue
                live, dead = conn.execute(text("SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables "
                                               "WHERE relid = CAST(:t AS regclass)"), {"t": table}).one()
                if dead < max(settings.reindex_min_dead, dead_share * live):
                    continue
                _drop_leftovers(conn, table, index)
                log.info("rebuilding a vector index after a large deletion",
                         extra={"index": index, "live_rows": live, "dead_rows": dead})
                t0 = time.monotonic()
                try:
                    conn.execute(text("SELECT set_config('maintenance_work_mem', :m, false)"),
                                 {"m": f"{settings.reindex_memory_mb}MB"})
                    conn.execute(text(f"REINDEX INDEX CONCURRENTLY {index}"))
                except DBAPIError:
                    _failed[index] = time.monotonic()
                    log.exception("rebuilding a vector index failed; autovacuum repairs it meanwhile, and the "
                                  "rebuild is tried again in an hour", extra={"index": index})
                    _drop_leftovers(conn, table, index)
                    continue
                conn.execute(text(f"VACUUM {table}"))
                log.info("rebuilt a vector index", extra={"index": index, "seconds": round(time.monotonic() - t0, 1)})
                rebuilt.append(index)
        finally:
            conn.execute(text("RESET maintenance_work_mem; SELECT pg_advisory_unlock(:k)"), {"k": REINDEX_LOCK})
    return rebuilt


# Postgres or Redis down, restarting or not answering: said in one line at each pass, not a traceback
OUTAGES = (OperationalError, InterfaceError, RedisDown, RedisSilent, BrokerError)


# set by `clapq beat` on SIGTERM or SIGINT (clapq.cli.cmd_beat): each loop ends after the step it is in
STOP = threading.Event()


def _every(interval_s: int, steps: dict) -> None:
    while not STOP.is_set():
        for name, step in steps.items():
            if STOP.is_set():
                return
            try:
                step()
            except OUTAGES as exc:  # keep going through transient outages
                why = str(getattr(exc, "orig", None) or exc).strip().splitlines()
                log.warning(f"{name} failed: {why[0] if why else type(exc).__name__}; tried again in {interval_s} s")
            except Exception:
                log.exception(f"{name} failed")
        STOP.wait(interval_s)


def _failing(exc: Exception) -> str:
    """Why a pass failed, as /readyz (which takes no key) may say it: the part, not its server's address."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return "it cannot use Postgres; its log says why"
    if isinstance(exc, (RedisDown, RedisSilent, BrokerError)):
        return "it cannot use Redis; its log says why"
    return f"{type(exc).__name__}, which its log says"


def run_forever(settings: Settings) -> None:
    app = make_celery(settings, sender=True)
    log.info("sweeper started", extra={"interval_s": settings.sweep_interval_s})
    # a rebuild takes minutes on a large store: in its own thread, so that sweeping goes on meanwhile
    threading.Thread(target=_every, args=(settings.sweep_interval_s, {"index repair": lambda: repair_indexes(settings)}),
                     name="index-repair", daemon=True).start()
    sweeps = Sweeps(settings, app)

    def sweep() -> None:  # said alive only after a sweep that went through (every sweep failing said ok, helper-44)
        try:
            sweeps()
        except Exception as exc:  # said failing, not dead: /readyz told to start the beat that ran (helper-119)
            with contextlib.suppress(Exception):
                beat_failed(app, settings.sweep_interval_s, _failing(exc))
            raise
        try:
            beat_done(app, settings.sweep_interval_s)
        except Exception as exc:  # Redis away: /readyz says so itself
            log.warning("could not record in Redis that the maintenance loop is alive (%s)", exc)

    _every(settings.sweep_interval_s, {"sweep": sweep, "blob removal": lambda: collect_blobs(settings)})
    log.info("the maintenance loop stopped, as it was told to (SIGTERM or Ctrl-C), after its step in progress")
