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
# BULK_PRIORITY's: a few files uploaded behind another tenant's 10,000 wait for a few tasks, not for all of
# them. Every other send (the sweeper's, a worker's hand-back) goes in the first lane: it is overdue work.
BULK_PRIORITY = 6
FAST_LANE_TASKS = 4

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
                 countdown: float | None = None, **log_extra) -> None:
    """Send the tasks of these committed, queued files (`fast`, `countdown`: see enqueue_items). Those Redis does
    not take are marked as having no message (clapq.models.NOT_SENT), and the sweeper sends them at its next pass,
    whatever the queue holds; unmarked, they waited CLAPQ_STALE_AFTER_S and an empty queue. A failed mark
    leaves them to that."""
    unsent = enqueue_committed(app, item_ids, per_task, fast=fast, countdown=countdown, **log_extra)
    if not unsent:
        return
    from clapq.db import session_scope
    from clapq.models import NOT_SENT, park

    try:
        with session_scope(database_url) as s:
            park(s, unsent, NOT_SENT)
    except Exception:
        log.warning("could not mark the files whose tasks were not sent; the sweeper finds them later",
                    exc_info=True, extra=log_extra)


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
    for n, chunk in enumerate(parts):
        bulk = fast is not None and n * per_task >= fast
        try:
            app.send_task(EMBED_TASK, args=[[str(i) for i in chunk]], queue=EMBED_QUEUE, countdown=countdown,
                          priority=BULK_PRIORITY if bulk else None)
        except Exception as exc:
            raise NotSent([i for part in parts[n:] for i in part]) from exc
    return len(parts)


def announce_items_gone(app: Celery) -> None:
    """Tell every worker that items were deleted or cancelled (call after the commit). Best effort, and
    quick to give up: a worker that misses it learns at its next heartbeat, and a Redis that hangs holds
    the caller's response up for a second at most."""
    try:
        redis_client(app, quick=True).publish(ITEMS_GONE_CHANNEL, b"1")
    except Exception:
        log.warning("could not tell the workers of deleted or cancelled files; they learn at their next heartbeat",
                    exc_info=True)
