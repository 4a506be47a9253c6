"""Requests per API key, counted in Redis so that every API process (on every machine) shares one count.

`CLAPQ_RATE_LIMIT` (default 1200 a minute, `clapq.settings`) is checked with the `limits` library's
moving window: at most that many requests in any stretch of that length. A request over it gets 429
`rate_limited` with `Retry-After` (when the oldest counted request leaves the window) before its body is
read. Counting is best effort: while Redis does not answer, requests pass (and a warning says so every
PAUSE_S), so an outage of the broker never becomes one of search or of the job pages."""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import redis
from flask import Flask, current_app, g
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from api.errors import ApiError
from clapq.queue import redis_client

log = logging.getLogger(__name__)

# after Redis failed to count a request, requests go uncounted this long before it is asked again: a Redis
# that hangs costs one request its 1 s limit, not every request
PAUSE_S = 10.0


class KeyRateLimit:
    def __init__(self, app: Flask, spec: str) -> None:
        self.items: list[RateLimitItem] = parse_many(spec) if spec else []
        self._celery = app.extensions["clapq_celery"]
        self._limiters: dict[int, MovingWindowRateLimiter] = {}  # per process: gunicorn forks after import
        self._skip_until = 0.0
        self._lock = threading.Lock()

    def _limiter(self) -> MovingWindowRateLimiter:
        pid = os.getpid()
        limiter = self._limiters.get(pid)
        if limiter is None:
            # the broker's pooled client (whatever REDIS_URL form it takes), quick to give up
            pool = redis_client(self._celery, quick=True).connection_pool
            limiter = self._limiters[pid] = MovingWindowRateLimiter(
                RedisStorage("redis://", connection_pool=pool, key_prefix="clapq:rate"))
        return limiter

    def check(self, key_id: str) -> None:
        """Count one request of this key; ApiError 429 if it is over a limit."""
        if not self.items or time.monotonic() < self._skip_until:
            return
        try:
            limiter = self._limiter()
            for item in self.items:
                if not limiter.hit(item, key_id):
                    reset_at = limiter.get_window_stats(item, key_id).reset_time
                    wait = max(1, math.ceil(reset_at - time.time()))
                    raise ApiError(429, "rate_limited",
                                   f"this API key has sent more than {_spoken(item)} (CLAPQ_RATE_LIMIT); try again in "
                                   f"{wait} s", {"Retry-After": str(wait)})
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                if time.monotonic() >= self._skip_until:
                    log.warning("requests are not counted against CLAPQ_RATE_LIMIT for %g s: Redis did not "
                                "answer (%s)", PAUSE_S, exc)
                self._skip_until = time.monotonic() + PAUSE_S

    def describe(self) -> str | None:
        return "; ".join(_spoken(i) for i in self.items) or None


def _spoken(item: RateLimitItem) -> str:
    """'1200 requests per minute', '10 requests per 5 seconds'."""
    unit = item.GRANULARITY.name
    per = f"{unit}" if item.multiples == 1 else f"{item.multiples} {unit}s"
    return f"{item.amount} request{'s' if item.amount != 1 else ''} per {per}"


def install(app: Flask, spec: str) -> None:
    app.extensions["clapq_rate_limit"] = KeyRateLimit(app, spec)


def check_request() -> None:
    """before_request hook for /v1, after authentication (g.key_id)."""
    current_app.extensions["clapq_rate_limit"].check(g.key_id)
