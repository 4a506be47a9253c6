"""A background thread that keeps a task's claimed items fresh while it works on them."""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Collection, Iterator

from clapq.db import session_scope

log = logging.getLogger(__name__)


@contextlib.contextmanager
def beating(url: str, ids: Collection[uuid.UUID], task_id: str, interval_s: float,
            on_gone: Callable[[set[uuid.UUID]], None] | None = None) -> Iterator[None]:
    """Beat for `ids` every `interval_s`; `on_gone(ids)` hears of those the task no longer holds (deleted
    meanwhile, or taken by another task), so it can stop working on them."""
    from worker.store import heartbeat

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                with session_scope(url) as s:
                    gone = heartbeat(s, list(ids), task_id)  # the task may add items to `ids` as it goes
                if gone and on_gone is not None:
                    on_gone(gone)
            except Exception:  # a missed beat only risks a harmless duplicate run
                log.warning("heartbeat failed", exc_info=True)

    t = threading.Thread(target=loop, name="heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
