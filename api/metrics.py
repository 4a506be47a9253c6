"""GET /metrics in Prometheus format: items by state, queue depth, embed throughput, latencies."""

from __future__ import annotations

import hmac
import logging
import os
import shutil
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest, mmap_dict, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from api.errors import ApiError
from api.health import CHECK_TIMEOUT_S, running
from clapq import metrics
from clapq.db import session_scope
from clapq.models import Item
from clapq.presence import beat_alive, live_workers
from clapq.queue import best_effort, queued_tasks

bp = Blueprint("metrics", __name__)
log = logging.getLogger(__name__)


class _AllocatedDict(mmap_dict.MmapedDict):
    """prometheus_client's file of one process's counts (PROMETHEUS_MULTIPROC_DIR), its blocks allocated before
    they are mapped. It sizes the file with truncate, which allocates nothing, and writes through a memory map: on
    a full disk the first write to a page with no block killed the process with SIGBUS, so every request of a new
    route or status lost its connection unanswered, and each gunicorn process started in its place died too
    (helper-88: `clapq up`'s folder is in its data directory). posix_fallocate says ENOSPC instead (an OSError)."""

    def __init__(self, filename, read_mode=False):
        if not read_mode:
            with open(filename, "ab") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    try:
                        _allocate(f.fileno(), mmap_dict._INITIAL_MMAP_SIZE, 0)
                    except OSError:
                        os.unlink(filename)  # an empty file broke every /metrics (its reader wants a header)
                        raise
        super().__init__(filename, read_mode)

    def _init_value(self, key):
        # an entry: its length (4), its key padded to 8 bytes, its value and timestamp (16); the file doubles
        need, capacity = self._used + len(key.encode("utf-8")) + 32, self._capacity
        while need > capacity:
            capacity *= 2
        if capacity > self._capacity:
            _allocate(self._f.fileno(), capacity, self._capacity)
        super()._init_value(key)


def _allocate(fd: int, size: int, was: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.ftruncate(fd, was)  # as it was: a file grown without blocks is the SIGBUS this avoids
        raise


_uncounted: list = []  # the error that left a request of this process uncounted, once said
# what each process's counts are opened as (values.MultiProcessValue); only where prometheus_client's file is the
# one _AllocatedDict knows (0.20 to 0.26 at least: its initial size, and _init_value growing it by doubling), so
# that another release keeps its own code, SIGBUS on a full disk and all, rather than break every request
if isinstance(getattr(mmap_dict, "_INITIAL_MMAP_SIZE", None), int) and \
        getattr(values, "MmapedDict", None) is mmap_dict.MmapedDict and hasattr(mmap_dict.MmapedDict, "_init_value"):
    values.MmapedDict = _AllocatedDict

REQUEST_SECONDS = Histogram("clapq_http_request_duration_seconds", "HTTP request latency",
                            ["method", "endpoint", "status"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
# the methods labelled by name; any other is "other": a request of any made-up method (gunicorn takes any
# token of capitals) made a series of its own, and 3,000 such requests, with no key, in 3 s grew /metrics to
# 5 MB and its files to 9 MB, without end (helper-55)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# items counted by state at most once in this while per API process: the count reads every item (38 ms at
# 1M, benchmarks/backpressure.py), and /metrics takes no key, so scrapes sent as fast as they answer would
# keep Postgres busy; Prometheus scrapes every 15 s or more
COUNTS_TTL_S = 5.0


class StateCollector:
    """Read at scrape time from Postgres and Redis, so every API process reports the same truth (the
    items by state as of at most COUNTS_TTL_S ago)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._counts: tuple[float, dict | None] | None = None
        self._lock = threading.Lock()

    def _item_counts(self, url: str) -> dict | None:
        """The items by state, or None while Postgres does not answer within CHECK_TIMEOUT_S (a server that
        hangs held each scrape 10 s, Prometheus's own timeout, helper-44); asked again after COUNTS_TTL_S.
        One count at a time: scrapes that arrive meanwhile wait for its answer, and one still waiting on a
        hung server is not started again."""
        def count() -> dict:
            with session_scope(url) as s:
                return dict(s.execute(select(Item.status, func.count()).group_by(Item.status)).all())

        with self._lock:
            if self._counts is not None and time.monotonic() - self._counts[0] < COUNTS_TTL_S:
                return self._counts[1]
        try:
            counts = running(("metrics item counts", url), count).result(timeout=CHECK_TIMEOUT_S)
        except FutureTimeout:  # still counting: this scrape goes on without
            return None
        except (SQLAlchemyError, OSError):
            counts = None
        with self._lock:
            self._counts = (time.monotonic(), counts)
        return counts

    def collect(self):
        settings = self.app.config["CLAPQ"]
        celery = self.app.extensions["clapq_celery"]
        # while Postgres is down the other figures still go out (the whole scrape was a 503, and Redis's and
        # the disk's figures went with it just when they were wanted, helper-41)
        counts = self._item_counts(settings.database_url)
        yield GaugeMetricFamily("clapq_database_up", "Whether Postgres answered the count of items by state",
                                value=float(counts is not None))
        if counts is not None:
            items = GaugeMetricFamily("clapq_items", "Items by state", labels=["state"])
            for state in ("queued", "running", "done", "failed", "cancelled"):
                items.add_metric([state], counts.get(state, 0))
            yield items
        # what Redis holds, if it answers now (one try, 1 s; skipped for a while after a failure): a Redis that
        # hangs answered every scrape 500, the database's figures with it (helper-38)
        kept = None
        with best_effort(celery, "reading the figures kept in Redis for /metrics") as client:
            if client is not None:
                kept = (queued_tasks(client), live_workers(celery, client), metrics.read(celery, client),
                        beat_alive(celery, client))
        yield GaugeMetricFamily("clapq_redis_up", "Whether Redis answered this scrape: the queue depth, live "
                                "workers and embed figures need it", value=float(kept is not None))
        if kept is not None:
            yield GaugeMetricFamily("clapq_queue_depth", "Tasks waiting in the broker", value=kept[0])
            yield GaugeMetricFamily("clapq_workers_live", "Workers with a fresh presence key", value=kept[1])
            yield GaugeMetricFamily("clapq_maintenance_live", "Whether the maintenance loop (clapq beat) made a pass "
                                    "lately: without it, files a dead worker left are never sent again",
                                    value=float(kept[3]))
        # uploads fail with 507 once the stored files' disk is full: seen here before users see it
        try:
            where = settings.blob_dir
            while not where.exists() and where != where.parent:  # made by the first upload: the disk it will be on
                where = where.parent
            disk = shutil.disk_usage(where)
        except OSError:  # a folder this process may not read: the other figures still go out
            disk = None
        if disk is not None:
            yield GaugeMetricFamily("clapq_blob_free_bytes",
                                    "Free bytes on the disk of the stored files (CLAPQ_BLOB_DIR)", value=disk.free)
            yield GaugeMetricFamily("clapq_blob_size_bytes", "Size of the disk of the stored files (CLAPQ_BLOB_DIR)",
                                    value=disk.total)
        if kept is None:
            return
        m = kept[2]
        for name, help_ in (("windows_total", "Audio windows embedded"), ("items_done_total", "Items embedded"),
                            ("items_failed_total", "Items failed")):
            c = CounterMetricFamily(f"clapq_{name[:-6]}", help_)
            c.add_metric([], m.get(name, 0.0))
            yield c
        resent = CounterMetricFamily("clapq_files_resent", "Files sent to the queue again, by why: by the maintenance "
                                     "loop (worker_lost, task_lost, no_task, model_served) or handed back by a worker",
                                     labels=["reason"])
        for reason in metrics.RESENT_REASONS:
            resent.add_metric([reason], m.get(f"resent_{reason}", 0.0))
        yield resent
        h = HistogramMetricFamily("clapq_embed_batch_seconds", "Model time per batch of windows")
        buckets = [(str(b), m.get(f"batch_le_{b}", 0.0)) for b in metrics.BATCH_BUCKETS]
        buckets.append(("+Inf", m.get("batches_total", 0.0)))
        h.add_metric([], buckets, m.get("batch_seconds_sum", 0.0))
        yield h


def register(app: Flask) -> None:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # gunicorn workers share one view of the latencies
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REQUEST_SECONDS)
    registry.register(StateCollector(app))
    app.extensions["clapq_metrics"] = registry

    @app.before_request
    def _start_timer():
        g._t0 = time.perf_counter()

    @app.after_request
    def _observe(response):
        if "_t0" in g:
            method = request.method if request.method in METHODS else "other"
            try:
                REQUEST_SECONDS.labels(method, request.url_rule.rule if request.url_rule else "unmatched",
                                       str(response.status_code)).observe(time.perf_counter() - g._t0)
            except OSError as exc:  # its file's disk is full (_AllocatedDict): the answer goes out uncounted
                if not _uncounted:  # once a process, not at every request while the disk is full
                    _uncounted.append(exc)
                    log.warning("requests are not counted in /metrics: %s (PROMETHEUS_MULTIPROC_DIR=%s)", exc,
                                os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        return response


@bp.get("/metrics")
def metrics_endpoint():
    token = current_app.config["CLAPQ"].metrics_token
    if token:  # the whole service's activity, which a tenant's key does not open (an API without a proxy in front)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                                                 token.encode("utf-8", "surrogateescape")):
            raise ApiError(401, "unauthorized", "/metrics takes the token CLAPQ_METRICS_TOKEN sets: send "
                           "'Authorization: Bearer <token>' (in Prometheus's scrape config: authorization: "
                           "credentials: <token>)", {"WWW-Authenticate": 'Bearer realm="clapq metrics"'})
    # as content_type: it carries its charset already (as mimetype, Flask added a second)
    return Response(generate_latest(current_app.extensions["clapq_metrics"]), content_type=CONTENT_TYPE_LATEST)
