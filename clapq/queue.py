"""The Celery app (Redis broker) shared by the API, which enqueues, and the worker, which consumes."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

import kombu.exceptions
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from clapq.settings import Settings

log = logging.getLogger(__name__)

EMBED_TASK = "clapq.embed_items"
# published after a deletion or a cancel commits: workers beat at once (worker.heartbeat), so a file
# dropped while it is being embedded stops now, not at the next CLAPQ_HEARTBEAT_S
ITEMS_GONE_CHANNEL = "clapq:items-gone"
EMBED_QUEUE = "embed"
# Two lanes in the one queue. kombu's Redis transport keeps a list per priority step (0, 3, 6, 9: EMBED_QUEUE
# for 0, then EMBED_QUEUE + its separator + the step), and a worker takes from the lower steps first. A
# tenant's first files waiting (FAST_LANE_TASKS tasks' worth) go in the first lane, its files beyond those in
# BULK_PRIORITY's, and so do all its files sent while any of its files waits there (first_lane_room): a few files
# uploaded behind another tenant's 10,000 wait for a few tasks, not for all of them, and no upload of a tenant
# goes ahead of its own files in the bulk lane. Every other send (a dead worker's files, a worker's hand-back, a
# retry) goes in the first lane: it is overdue work.
BULK_PRIORITY = 6
FAST_LANE_TASKS = 4
# Two sends of one tenant's files at once each counted the other's files, committed first, as waiting before its own,
# and both went in the bulk lane (helper-50): each counts, under this lock of its tenant, just before its commit,
# which releases it. Postgres keeps advisory locks of two int4 keys apart from those of one bigint.
LANE_LOCK = 0x636C616E  # "clan"

# Longer than any task may run (hard limit below), so Redis never hands a
# running task to a second worker; a duplicate would be harmless anyway.
VISIBILITY_TIMEOUT_S = 3 * 3600
TASK_HARD_LIMIT_S = 2 * 3600
TASK_SOFT_LIMIT_S = TASK_HARD_LIMIT_S - 60


# A process that only sends tasks (the API, the sweeper) gives up on a Redis that does not answer within
# this, trying once more (a restarted Redis, a stale connection): ~4 s at most, where kombu's defaults
# waited for as long as it hung. The rows are committed before; the sweeper sends what was not sent.
SEND_TIMEOUT_S = 2


def make_celery(settings: Settings, sender: bool = False) -> Celery:
    """The Celery app; `sender`: for a process that only sends tasks, with bounded waits on Redis."""
    app = Celery("clapq", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=EMBED_QUEUE,
        task_routes={EMBED_TASK: {"queue": EMBED_QUEUE}},
        task_time_limit=TASK_HARD_LIMIT_S,
        task_soft_time_limit=TASK_SOFT_LIMIT_S,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # pool children load the model before they report ready (see worker.tasks._warm_up)
        worker_proc_alive_timeout=600,
        worker_send_task_events=False,
        enable_utc=True,
    )
    if sender:
        app.conf.broker_transport_options.update(socket_timeout=SEND_TIMEOUT_S, socket_connect_timeout=SEND_TIMEOUT_S)
        app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                                              "interval_max": 0.2}
    return app


_clients: dict[tuple[int, str, bool], redis.Redis] = {}


def redis_client(app: Celery, quick: bool = False) -> redis.Redis:
    """A pooled redis-py client on the broker's Redis, one per process (a forked child builds its
    own). kombu's connection_for_write() builds and pings a new connection every time: 3 ms of a
    cached search's ~10 ms. `quick`: for best-effort messages, one try with a 1 s limit."""
    key = (os.getpid(), app.conf.broker_url, quick)
    client = _clients.get(key)
    if client is None:
        limits = (dict(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)) if quick
                  else dict(socket_timeout=10, socket_connect_timeout=5))
        client = _clients[key] = redis.Redis.from_url(key[1], health_check_interval=30, **limits)
    return client


# Redis for what may be skipped: the API's text cache, its count of requests per key, and sending tasks the
# sweeper would send anyway. After a failure, each process leaves Redis alone for PAUSE_S, so a Redis that
# hangs costs one request its time limit, not every request.
PAUSE_S = 10.0
REDIS_ERRORS = (redis.RedisError, OSError, kombu.exceptions.OperationalError)
_paused_until: dict[tuple[int, str], float] = {}
_pause_lock = threading.Lock()


@contextlib.contextmanager
def best_effort(app: Celery, what: str) -> Iterator[redis.Redis | None]:
    """The quick client (one try, 1 s), or None while Redis is left alone after a failure. A Redis error in
    the block ends it (the caller goes on without) and starts a pause, said once in the log with `what` the
    process was doing; other exceptions pass."""
    key = (os.getpid(), app.conf.broker_url)
    if time.monotonic() < _paused_until.get(key, 0.0):
        yield None
        return
    try:
        yield redis_client(app, quick=True)
    except REDIS_ERRORS as exc:
        with _pause_lock:
            if time.monotonic() >= _paused_until.get(key, 0.0):
                log.warning("Redis failed while %s (%s): for %g s this process leaves it alone for what can do "
                            "without it (the text cache, counting requests, sending tasks the sweeper sends later)",
                            what, exc, PAUSE_S)
            _paused_until[key] = time.monotonic() + PAUSE_S


def lanes() -> list[str]:
    """The Redis lists that hold the queue's tasks, first lane first (see BULK_PRIORITY)."""
    from kombu.transport.redis import PRIORITY_STEPS

    return [_lane(step) for step in PRIORITY_STEPS]


def _lane(step: int) -> str:
    from kombu.transport.redis import Channel

    return f"{EMBED_QUEUE}{Channel.sep}{step}" if step else EMBED_QUEUE


# The task lift_bulk moved last (the message as it lies in the list): while it still waits in the first lane,
# no other moves.
LIFTED_KEY = "clapq:lifted"
_LIFT = """
if redis.call('LLEN', KEYS[1]) == 0 then return 0 end
local last = redis.call('GET', KEYS[3])
if last and redis.call('LPOS', KEYS[1], last) then return 0 end
local task = redis.call('RPOPLPUSH', KEYS[2], KEYS[1])
if not task then return 0 end
redis.call('SET', KEYS[3], task)
return 1
"""
_lift_refused = False  # said once per process


def lift_bulk(client: redis.Redis) -> bool:
    """Move the bulk lane's oldest task to the back of the first lane, where the first holds tasks and the task
    moved last is no longer among them (a worker took it); whether one moved. The sweeper does this at each pass
    (clapq beat): workers take from the bulk lane only while the first is empty, so without it other tenants'
    first files, uploaded one batch after another, kept a tenant's backlog waiting for as long as they came.
    One at a time: moved at every pass while nothing took from the first lane (no worker up yet, or workers
    slower than a task a pass), a tenant's whole backlog went into it, and other tenants' first files waited
    behind all of it (helper-50). kombu pushes on the left and workers pop on the right. One script, so that
    two beats move one task between them. Needs Redis 6.0.6 (LPOS)."""
    global _lift_refused
    try:
        return bool(client.eval(_LIFT, 3, _lane(0), _lane(BULK_PRIORITY), LIFTED_KEY))
    except redis.ResponseError as exc:  # an older Redis: the sweeper's other work goes on without this
        if not _lift_refused:
            log.warning("the bulk lane's tasks are not moved ahead while the first lane is busy: this Redis refused "
                        "the script (%s); it needs Redis 6.0.6 or later", exc)
        _lift_refused = True
        return False



def queued_tasks(client: redis.Redis) -> int:
    """How many tasks wait in the queue, in all its lanes."""
    pipe = client.pipeline(transaction=False)
    for key in lanes():
        pipe.llen(key)
    return sum(pipe.execute())


def in_the_queue():
    """Of files waiting (queued or running), those that hold a place in the queue: not those parked for a worker
    of another model than any serves (clapq.models.WAITING_FOR_MODEL), which wait for no worker here."""
    from sqlalchemy import or_

    from clapq.models import WAITING_FOR_MODEL, Item

    return or_(Item.claimed_by.is_(None), Item.claimed_by != WAITING_FOR_MODEL)


def first_lane_files(per_task: int) -> int:
    """The most files of one send that go in the queue's first lane (first_lane_room): those after go in the bulk
    lane whatever waits."""
    return FAST_LANE_TASKS * max(1, per_task)


def first_lane_room(session, tenant_id, item_ids: list, per_task: int, premarked: bool = False) -> int:
    """How many of `item_ids`, queued files of the tenant that this transaction sends (in this order, `per_task` a
    task), go in the queue's first lane (enqueue_items' `fast`), and the rest marked as in the bulk lane
    (clapq.models.IN_BULK_LANE). Call it last before the commit: it holds a lock of the tenant until then.
    `premarked`: the caller's insert marked those after the first first_lane_files(per_task) already (they go in
    the bulk lane whatever is decided here), so that only the first are written again: marked here, the 200,000
    files of a re-embed were each written twice, 17-31 s (benchmarks/reembed.py).

    The invariant: no file of a tenant goes in a lane ahead of an earlier file of the same tenant still waiting in
    the bulk lane. So the first lane takes as many as keep the tenant's files waiting under FAST_LANE_TASKS tasks'
    worth, and none while any of its files waiting is marked: once workers ran a tenant's first files, its next
    upload went in the first lane, ahead of its own older files in the bulk lane (helper-50). Which waiting files
    are in the bulk lane is known from Postgres, not Redis: the mark is written in the transaction that queues the
    file, before its task is sent, and the claim that takes it replaces it (worker.store.claim sets claimed_by).
    A Redis that loses its data leaves marks on files no task holds: the tenant's next files go in the bulk lane
    meanwhile (later, not lost), and the sweeper, sending those files again, decides their lanes here anew. A
    worker that dies had claimed its files (unmarked: they are sent again in the first lane, as overdue), or had
    not yet, and the message goes back to the lane it came from, its files still marked. A mark
    outlives its file's place in the bulk lane only while the sweeper's lift_bulk has moved its task to the first
    lane and no worker took it yet: the tenant's next files then wait in the bulk lane, which is later than
    needed, never out of order."""
    from sqlalchemy import Text, any_, cast, func, select, update
    from sqlalchemy.dialects.postgresql import ARRAY

    from clapq.models import IN_BULK_LANE, Item

    if not item_ids:
        return 0
    per_task = max(1, per_task)
    lane = first_lane_files(per_task)
    session.execute(select(func.pg_advisory_xact_lock(LANE_LOCK, func.hashtext(cast(tenant_id, Text)))))
    # the tenant's files waiting, these included, counted up to what decides (a tenant with 100,000 waiting is
    # not counted whole at each upload), index-only through ix_items_tenant_waiting (without it, a tenant with fewer
    # waiting than the limit had the whole table read: helper-49). Files parked for a worker of another model hold
    # no place in the queue: counted, they sent all the tenant's uploads to the bulk lane (helper-49). Where fewer
    # than the limit wait, all are seen, and so is any mark; where more, none goes in the first lane anyway
    waiting = (select(Item.claimed_by).where(Item.status.in_(("queued", "running")), Item.tenant_id == tenant_id,
                                             in_the_queue())
               .limit(lane + len(item_ids)).subquery())
    counted, marked = session.execute(select(func.count(), func.count().filter(waiting.c.claimed_by == IN_BULK_LANE))
                                      .select_from(waiting)).one()
    if premarked:  # not the caller's own marks; where not all of them are seen, more than `lane` wait: fast is 0
        marked -= len(item_ids) - min(lane, len(item_ids))
    fast = 0 if marked > 0 else max(0, lane - (counted - len(item_ids)))
    bulk = bulk_part(item_ids, per_task, fast)
    if premarked:
        bulk = bulk[:max(0, lane - (len(item_ids) - len(bulk)))]
    if bulk:
        # one array, not a bound value an id: IN of 200,000 ids took 17 s of a re-embed (benchmarks/reembed.py)
        session.execute(update(Item).where(Item.id == any_(cast(bulk, ARRAY(Item.id.type))), Item.status == "queued")
                        .values(claimed_by=IN_BULK_LANE))
    return fast


def bulk_part(item_ids: list, per_task: int, fast: int | None) -> list:
    """Those of `item_ids` that enqueue_items sends in the bulk lane: the chunks that begin at `fast` or later."""
    if fast is None:
        return []
    per_task = max(1, per_task)
    return list(item_ids[_first_lane_chunks(fast, per_task) * per_task:])


def _first_lane_chunks(fast: int, per_task: int) -> int:
    return -(-fast // per_task)  # those that begin within the first `fast`


def enqueue_committed(app: Celery, item_ids: list, per_task: int, fast: int | None = None,
                      countdown: float | None = None, **log_extra) -> list:
    """Send committed items' tasks if Redis takes them now (`fast`, `countdown`: see enqueue_items); returns those
    it did not take, which stay queued in Postgres for the sweeper (`clapq beat`) to send."""
    unsent = list(item_ids)
    if not unsent:
        return []
    try:
        with best_effort(app, "sending tasks (the sweeper sends them later)") as client:
            if client is None:
                log.info("tasks not sent, Redis did not answer lately; the sweeper sends them", extra=log_extra)
                return unsent
            try:
                enqueue_items(app, unsent, per_task, countdown=countdown, fast=fast)
                return []
            except NotSent as exc:
                unsent = exc.ids
                raise exc.__cause__ from None  # a Redis error: best_effort says so and leaves Redis alone a while
    except Exception:  # committed: the sweeper sends them
        log.exception("enqueue failed; items stay queued for the sweeper", extra=log_extra)
    return unsent


def send_or_mark(app: Celery, database_url: str, item_ids: list, per_task: int, fast: int | None = None,
                 countdown: float | None = None, **log_extra) -> int:
    """Send the tasks of these committed, queued files (`fast`, `countdown`: see enqueue_items); how many were sent.
    Those Redis does not take are marked as having no message (clapq.models.NOT_SENT), and the sweeper sends them at
    its next pass, whatever the queue holds; unmarked, they waited CLAPQ_STALE_AFTER_S and an empty queue. A failed
    mark leaves them to that."""
    unsent = enqueue_committed(app, item_ids, per_task, fast=fast, countdown=countdown, **log_extra)
    if not unsent:
        return len(item_ids)
    from clapq.db import session_scope
    from clapq.models import NOT_SENT, park

    try:
        with session_scope(database_url) as s:
            park(s, unsent, NOT_SENT)
    except Exception:
        log.warning("could not mark the files whose tasks were not sent; the sweeper finds them later",
                    exc_info=True, extra=log_extra)
    return len(item_ids) - len(unsent)


def chunks(ids: list, size: int) -> list[list]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


class NotSent(Exception):
    """Sending failed part-way (the cause is chained): `ids` are the items whose task did not go."""

    def __init__(self, ids: list) -> None:
        super().__init__(f"{len(ids)} items' tasks not sent")
        self.ids = ids


def enqueue_items(app: Celery, item_ids: list, per_task: int, countdown: float | None = None,
                  fast: int | None = None) -> int:
    """Send one task per chunk of items (to run no sooner than `countdown` seconds from now, if given);
    call only after the rows are committed. The chunks that begin within the first `fast` items go in the
    queue's first lane, the rest in the bulk lane (BULK_PRIORITY); all in the first lane where `fast` is
    None. A failure raises NotSent, naming the items not sent."""
    per_task = max(1, per_task)
    parts = chunks(list(item_ids), per_task)
    first = len(parts) if fast is None else _first_lane_chunks(fast, per_task)
    sent = 0  # the tasks Redis has taken: a failed pipeline may have taken some of the rest too (sent again, a
    # task finds its files claimed or done: harmless)
    try:
        with app.producer_or_acquire() as producer, producer.batch(max_size=SEND_BATCH * 4) as batch:
            for n, chunk in enumerate(parts):
                if n > sent and n % SEND_BATCH == 0:
                    batch.flush()
                    sent = n
                try:
                    app.send_task(EMBED_TASK, args=[[str(i) for i in chunk]], queue=EMBED_QUEUE, countdown=countdown,
                                  priority=BULK_PRIORITY if n >= first else None, producer=producer)
                except Exception:  # those before it go, as they did sent one by one
                    batch.flush()
                    sent = n
                    raise
            batch.flush()
            sent = len(parts)
    except Exception as exc:  # a failed pipeline's own error (kombu's BatchPublishError) is said as Redis's
        if sent < len(parts):
            batched = isinstance(exc, kombu.exceptions.BatchPublishError) and exc.__cause__ is not None
            cause = exc.__cause__ if batched else exc
            raise NotSent([i for part in parts[sent:] for i in part]) from cause
    return len(parts)


# Tasks sent in pipelines to Redis (kombu 5.7's Producer.batch: publishes buffered, sent at each flush and at the
# end; an error discards what was not sent): a task a round trip, a re-embed of 200,000 files (12,500 tasks) spent
# 8 s sending them (benchmarks/reembed.py)
SEND_BATCH = 1000


def announce_items_gone(app: Celery) -> None:
    """Tell every worker that items were deleted or cancelled (call after the commit). Best effort, and
    quick to give up: a worker that misses it learns at its next heartbeat, and a Redis that hangs holds
    the caller's response up for a second at most."""
    try:
        redis_client(app, quick=True).publish(ITEMS_GONE_CHANNEL, b"1")
    except Exception:
        log.warning("could not tell the workers of deleted or cancelled files; they learn at their next heartbeat",
                    exc_info=True)
