"""Requests per API key, counted in Redis so that every API process (on every machine) shares one count.

`CLAPQ_RATE_LIMIT` (default 1200 a minute, `clapq.settings`) is checked with the `limits` library's
moving window: at most that many requests in any stretch of that length. A request over it gets 429
`rate_limited` with `Retry-After` (when the oldest counted request leaves the window) before its body is
read, and is not counted. Counting is best effort (`clapq.queue.best_effort`): while Redis does not
answer, requests pass uncounted, so an outage of the broker never becomes one of search or of the job
pages."""

from __future__ import annotations

import math
import os
import time

from flask import Flask, current_app, g
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from api.errors import ApiError
from clapq.queue import best_effort


class KeyRateLimit:
    def __init__(self, app: Flask, spec: str) -> None:
        self.items: list[RateLimitItem] = parse_many(spec) if spec else []
        self._celery = app.extensions["clapq_celery"]
        self._limiters: dict[int, MovingWindowRateLimiter] = {}  # per process: gunicorn forks after import

    def _limiter(self, redis) -> MovingWindowRateLimiter:
        limiter = self._limiters.get(os.getpid())
        if limiter is None:  # on the broker's quick pooled client, whatever REDIS_URL form it takes
            limiter = self._limiters[os.getpid()] = MovingWindowRateLimiter(
                RedisStorage("redis://", connection_pool=redis.connection_pool, key_prefix="clapq:rate"))
        return limiter

    def check(self, key_id: str) -> None:
        """Count one request of this key against every limit; ApiError 429, counted against none, if it is
        over any of them."""
        if not self.items:
            return
        with best_effort(self._celery, "counting a request against CLAPQ_RATE_LIMIT") as redis:
            if redis is None:
                return
            limiter = self._limiter(redis)
            if len(self.items) > 1:  # a request one limit refuses must not use up another's count
                over = [i for i in self.items if not limiter.test(i, key_id)]
                if over:
                    self._refuse(limiter, over, key_id)
            for item in self.items:
                if not limiter.hit(item, key_id):  # for one limit, the only call: it tests and counts at once
                    self._refuse(limiter, [item], key_id)

    @staticmethod
    def _refuse(limiter: MovingWindowRateLimiter, over: list[RateLimitItem], key_id: str) -> None:
        """429 naming the limit that holds the key back longest, with that wait."""
        waits = [(max(1, math.ceil(limiter.get_window_stats(i, key_id).reset_time - time.time())), i) for i in over]
        wait, item = max(waits, key=lambda w: w[0])
        raise ApiError(429, "rate_limited", f"this API key has sent more than {_spoken(item)} (CLAPQ_RATE_LIMIT); "
                       f"try again in {wait} s", {"Retry-After": str(wait)})

    def describe(self) -> str | None:
        return "; ".join(_spoken(i) for i in self.items) or None

    def windows(self) -> list[dict]:
        """Each limit as numbers, for a client to keep within (`clapq`'s waits do): read from `describe`'s words,
        a client would break on any change of their wording."""
        return [{"requests": i.amount, "seconds": i.get_expiry(), "said": _spoken(i)} for i in self.items]


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
