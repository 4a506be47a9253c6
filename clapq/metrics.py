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


# Why files went to the queue again (clapq_files_resent_total{reason}), sent by the maintenance loop (`clapq beat`)
# or handed back by a worker: a service that sends many files again (workers killed, Redis losing its data, a full
# scratch disk) showed only in the log, a line each time
RESENT_REASONS = (
    "worker_lost",     # the sweeper: running, its worker silent past CLAPQ_STALE_AFTER_S (that try counted)
    "task_lost",       # the sweeper: queued with no task in a Redis that held none (restarted empty, lost messages)
    "no_task",         # the sweeper: Redis did not take their task as they were uploaded or sent again
    "model_served",    # the sweeper: they waited for a worker of their model, which one now serves
    "worker_stopped",  # a worker told to stop (SIGTERM) hands back the files it had not finished
    "worker_error",    # a worker's unexpected error hands back the task's files (that try counted)
    "database_away",   # a task Celery retries after a passing fault hands back the files it took from later tasks
    "scratch_full",    # decoded audio could not be written to the scratch disk
    "code_changed",    # the worker's code changed on disk; it stops
    "process_died",    # a task's message came back after its process died: its files go on one per task
    "other_model",     # sent to a worker of another model: sent again for a worker of theirs
    "locked",          # another transaction held them locked as the task claimed them
)


def record_resent(app, reason: str, n: int) -> None:
    """`n` files sent to the queue again for `reason` (one of RESENT_REASONS)."""
    if n:
        _add(app, {f"resent_{reason}": n})


def read(app, client=None) -> dict[str, float]:
    raw = (client or redis_client(app)).hgetall(KEY)
    return {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw.items()}
