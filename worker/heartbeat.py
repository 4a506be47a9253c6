"""A background thread that keeps a task's claimed items fresh while it works on them."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator

from sqlalchemy.exc import InterfaceError, OperationalError

from clapq.db import session_scope

log = logging.getLogger(__name__)

MIN_GAP_S = 1.0  # at least this long between two beats of a task, however many deletions wake it
PROGRESS_EVERY_S = 2.0  # while a long file is part-way, a beat this often records its progress
_waiting: set[threading.Event] = set()  # one per running task's heartbeat, set when items go
_subscribed: dict[str, threading.Event] = {}  # per Redis: set while this process's listener is subscribed
_lock = threading.Lock()


def _listen(redis_url: str, subscribed: threading.Event) -> None:
    """For this process's life: on each message of clapq.queue.ITEMS_GONE_CHANNEL, wake every heartbeat.
    `subscribed` is set once Redis has confirmed the subscription (again after each reconnect)."""
    import redis

    from clapq.queue import ITEMS_GONE_CHANNEL

    outage = False
    while True:
        try:
            pubsub = redis.Redis.from_url(redis_url, socket_connect_timeout=5, health_check_interval=30).pubsub()
            pubsub.subscribe(ITEMS_GONE_CHANNEL)
            while True:
                msg = pubsub.get_message(timeout=30)
                if msg is None:
                    continue
                if msg["type"] == "subscribe":
                    subscribed.set()
                    outage = False
                elif msg["type"] == "message":
                    for wake in list(_waiting):
                        wake.set()
        except Exception:  # Redis away: heartbeats still come every interval; listen again shortly
            subscribed.clear()
            if not outage:  # once an outage, not every 5 s
                log.warning("not listening for deleted or cancelled files; heartbeats notice them", exc_info=True)
            outage = True
            time.sleep(5)


def listening(redis_url: str) -> threading.Event:
    """This process's listener on `redis_url`, started on first use (the worker's warm-up, in the pool
    child after the fork); the event is set while it is subscribed."""
    with _lock:
        if redis_url not in _subscribed:
            _subscribed[redis_url] = threading.Event()
            threading.Thread(target=_listen, args=(redis_url, _subscribed[redis_url]), name="items-gone",
                             daemon=True).start()
        return _subscribed[redis_url]


@contextlib.contextmanager
def beating(url: str, ids: Collection[uuid.UUID], task_id: str, interval_s: float,
            on_gone: Callable[[set[uuid.UUID]], None] | None = None,
            redis_url: str | None = None, progress: dict[uuid.UUID, float] | None = None,
            on_stop: Callable[[], None] | None = None) -> Iterator[None]:
    """Beat for `ids` every `interval_s`, and at once when the API announces deleted or cancelled files
    on `redis_url`; `on_gone(ids)` hears of those the task no longer holds (deleted meanwhile, or taken
    by another task), so it can stop working on them. Each beat records `progress` (item id -> share of
    its windows embedded, which the task updates as it goes) for the items it names; between beats, every
    PROGRESS_EVERY_S, the shares that moved are recorded too (those rows alone): a job's progress follows a
    long file closely. `on_stop()` is called once, within PROGRESS_EVERY_S, after the worker is told to stop
    (worker.stopping)."""
    from worker import stopping
    from worker.store import heartbeat

    stop, wake = threading.Event(), threading.Event()
    if redis_url:
        listening(redis_url)

    def loop() -> None:
        last, written = time.monotonic(), {}  # the last full beat; the shares recorded so far
        told = False  # on_stop called
        failing = False  # beats fail while the database does not answer (said once, and once when one goes through)
        while True:
            woken = wake.wait(max(0.0, min(last + interval_s - time.monotonic(), PROGRESS_EVERY_S)))
            if woken:  # at most one such beat a MIN_GAP_S
                stop.wait(MIN_GAP_S - (time.monotonic() - last))
            wake.clear()
            if stop.is_set():
                return
            if on_stop is not None and not told and stopping.told():
                told = True
                on_stop()
            full = woken or time.monotonic() - last >= interval_s
            shares = dict(progress) if progress else {}  # a copy, taken whole: the task edits it as it goes
            moved = {i: p for i, p in shares.items() if written.get(i) != p}
            if not full and not moved:
                continue
            if full:
                last = time.monotonic()
            try:
                with session_scope(url) as s:
                    s.connection()
                    if stop.is_set():  # the task ended while this beat connected: a new try may hold its files
                        return
                    # a full beat: every file the task holds (the task adds to `ids` as it goes); between
                    # them, only the files part-way whose share moved
                    named = list(ids) if full else list(moved)
                    gone = heartbeat(s, named, task_id, shares if full else moved)
                written.update(moved)
                if failing:
                    failing = False
                    log.info("this task's heartbeats go through again", extra={"task_id": task_id})
                if gone and on_gone is not None:
                    on_gone(gone)
            except (OperationalError, InterfaceError) as exc:  # Postgres away (a restart): a line, not a traceback
                # at each beat, every second of the outage (helper-142)
                if not failing:
                    failing = True
                    said = str(getattr(exc, "orig", None) or exc).strip().splitlines()
                    log.warning(f"this task's heartbeat failed, the database did not answer ({type(exc).__name__}: "
                                f"{said[0] if said else 'no detail'}): tried again every beat, said again once one "
                                "goes through", extra={"task_id": task_id, "count": len(ids)})
            except Exception:  # a missed beat only risks a harmless duplicate run
                log.warning("heartbeat failed", exc_info=True)

    t = threading.Thread(target=loop, name="heartbeat", daemon=True)
    _waiting.add(wake)
    t.start()
    try:
        yield
    finally:
        _waiting.discard(wake)
        stop.set()
        wake.set()
        t.join(5)
