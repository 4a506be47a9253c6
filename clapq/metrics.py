"""Embedding metrics shared across processes: workers add to counters in Redis, /metrics reads them."""

from __future__ import annotations

import logging

from clapq.queue import best_effort, redis_client

log = logging.getLogger(__name__)

KEY = "clapq:metrics"
# seconds per model batch (decode excluded): a CPU batch of 16 full-size windows takes seconds
BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _add(app, fields: dict[str, float]) -> None:
    """Add to the shared figures, best effort: one try of a second, then Redis is left alone for a while,
    said once (a Redis that hung held each batch up for 10 s, and one away logged a traceback at each batch,
    helper-41); nothing here fails the work."""
    try:
        with best_effort(app, "adding to the embed figures (/metrics)") as client:
            if client is not None:
                pipe = client.pipeline(transaction=False)
                for name, n in fields.items():
                    (pipe.hincrbyfloat if isinstance(n, float) else pipe.hincrby)(KEY, name, n)
                pipe.execute()
    except Exception:
        log.warning("metrics update failed", exc_info=True)


def record_batch(app, windows: int, seconds: float) -> None:
    """Called by the worker after each model batch."""
    _add(app, {"windows_total": windows, "batches_total": 1, "batch_seconds_sum": float(seconds),
               **{f"batch_le_{b}": 1 for b in BATCH_BUCKETS if seconds <= b}})


def record_items(app, done: int = 0, failed: int = 0) -> None:
    _add(app, {"items_done_total": done, "items_failed_total": failed})


def read(app, client=None) -> dict[str, float]:
    raw = (client or redis_client(app)).hgetall(KEY)
    return {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw.items()}
