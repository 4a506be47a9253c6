"""Live-worker keys in Redis (with a TTL), so /readyz can tell that someone will do the work."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from clapq.queue import redis_client

log = logging.getLogger(__name__)

PREFIX = "clapq:workers:"
TTL_S = 30
_stop = threading.Event()
_state: dict = {}


def _key(hostname: str) -> str:
    return f"{PREFIX}{hostname}:{os.getpid()}"


def start(app, hostname: str, interval_s: float = 10.0) -> None:
    _state["key"] = _key(hostname)
    info = json.dumps({"hostname": hostname, "pid": os.getpid(), "started": time.time()})

    def loop() -> None:
        while True:
            try:
                redis_client(app).set(_state["key"], info, ex=TTL_S)
            except Exception:  # Redis away: the key expires and /readyz says so
                log.warning("presence update failed", exc_info=True)
            if _stop.wait(interval_s):
                return

    threading.Thread(target=loop, name="presence", daemon=True).start()


def stop(app) -> None:
    _stop.set()
    if "key" in _state:
        try:
            redis_client(app).delete(_state["key"])
        except Exception:  # noqa: S110 - it expires anyway
            pass


# the maintenance loop (`clapq beat`) sets this after each pass: without it, files a dead worker left are
# never sent again, and nothing said so (helper-41)
BEAT_KEY = "clapq:beat"


def beat_done(app, interval_s: float) -> None:
    """Said by the maintenance loop after a pass: alive for three intervals (and half a minute more)."""
    redis_client(app).set(BEAT_KEY, str(time.time()), ex=int(3 * interval_s + 30))


def beat_alive(app, client=None) -> bool:
    return bool((client or redis_client(app)).exists(BEAT_KEY))


def live_workers(app, client=None) -> int:
    return sum(1 for _ in (client or redis_client(app)).scan_iter(match=PREFIX + "*", count=100))
