"""Embedding metrics shared across processes: workers add to counters in Redis, /metrics reads them."""

from __future__ import annotations

import logging

from clapq.queue import redis_client

log = logging.getLogger(__name__)

KEY = "clapq:metrics"
# seconds per model batch (decode excluded): a CPU batch of 16 full-size windows takes seconds
BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def record_batch(app, windows: int, seconds: float) -> None:
    """Called by the worker after each model batch; never lets a Redis hiccup fail the work."""
    try:
        pipe = redis_client(app).pipeline(transaction=False)
        pipe.hincrby(KEY, "windows_total", windows)
        pipe.hincrby(KEY, "batches_total", 1)
        pipe.hincrbyfloat(KEY, "batch_seconds_sum", seconds)
        for b in BATCH_BUCKETS:
            if seconds <= b:
                pipe.hincrby(KEY, f"batch_le_{b}", 1)
        pipe.execute()
    except Exception:
        log.warning("metrics update failed", exc_info=True)


def record_items(app, done: int = 0, failed: int = 0) -> None:
    try:
        pipe = redis_client(app).pipeline(transaction=False)
        pipe.hincrby(KEY, "items_done_total", done)
        pipe.hincrby(KEY, "items_failed_total", failed)
        pipe.execute()
    except Exception:
        log.warning("metrics update failed", exc_info=True)


def read(app, client=None) -> dict[str, float]:
    raw = (client or redis_client(app)).hgetall(KEY)
    return {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw.items()}
