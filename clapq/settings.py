"""One settings object, read from the environment, used by API, worker, CLI and tests."""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path

DEFAULT_MODEL = "laion/clap-htsat-unfused"
# CLAPQ_PRECISION's explicit values (clapq.precision maps them to torch dtypes), besides "auto"
PRECISION_NAMES = ("fp32", "bf16", "fp16")
# how the audio tower's window attention is computed (CLAPQ_ATTENTION): torch's fused kernel, or transformers' own
ATTENTIONS = ("sdpa", "eager")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")  # what both logging and Celery take


def _int(env: dict[str, str], name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    """An integer setting, within [lo, hi] where given: a 0 batch or 0 attempts is a sentence at start,
    not a worker that spins or fails every file."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"clapq: {name} must be an integer, got {raw!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise SystemExit(f"clapq: {name} must be {span}, got {value}")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"clapq: {name} must be 1 or 0, got {raw!r}")


def _auto_bool(env: dict[str, str], name: str) -> bool | None:
    """auto (None: the code decides), 1 or 0."""
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return _bool(env, name, False)
    raise SystemExit(f"clapq: {name} must be auto, 1 or 0, got {raw!r}")


def _auto_int(env: dict[str, str], name: str, lo: int | None = None) -> int | None:
    """auto (None: the code decides) or an integer, at least `lo` where given."""
    if (env.get(name) or "").strip().lower() in ("", "auto"):
        return None
    return _int(env, name, 0, lo)


DEFAULT_RATE_LIMIT = "1200/minute"
# the moving window keeps one timestamp in Redis per request counted: a limit's count is its memory
MAX_RATE_LIMIT_REQUESTS = 100_000
MAX_RATE_LIMIT_WINDOW_S = 31 * 86400


def _rate_limit(env: dict[str, str]) -> str:
    """CLAPQ_RATE_LIMIT as the `limits` library reads it ("1200/minute", "20/second;10000/hour"); "" when 0
    (no limit). A count or a period of 0 (which the library would read as 1), and counts or periods past
    the bounds above, are refused rather than turned into another limit."""
    raw = (env.get("CLAPQ_RATE_LIMIT") or "").strip()
    if raw == "":
        return DEFAULT_RATE_LIMIT
    if raw == "0":
        return ""
    from limits import parse_many

    try:
        items = parse_many(raw)
    except ValueError:
        items = []
    zero_period = re.search(r"(?:/|\bper)\s*0+\s*[a-z]", raw, re.IGNORECASE)
    if (not items or zero_period or any(not 1 <= i.amount <= MAX_RATE_LIMIT_REQUESTS for i in items)
            or any(i.get_expiry() > MAX_RATE_LIMIT_WINDOW_S for i in items)):
        raise SystemExit(f"clapq: CLAPQ_RATE_LIMIT must be requests per key and period, such as '1200/minute' or "
                         f"'20/second;10000/hour' (1 to {MAX_RATE_LIMIT_REQUESTS} requests, a period of 1 second "
                         f"to 31 days), or 0 for no limit; got {raw!r}")
    return raw


def claim_window_s(setting: int | None, device_type: str) -> int:
    """How long a first try goes on claiming queued files of later tasks (CLAPQ_CLAIM_FOR_S). `auto`
    (None): 10 s on a GPU, whose decoders would otherwise take turns with the model at each task; 0 on
    a CPU, where decoders and model share every core (no gain measured) and a task stays about a batch
    long, so it ends within `clapq up`'s grace on Ctrl-C."""
    if setting is not None:
        return max(0, setting)
    return 10 if device_type == "cuda" else 0



def _choice(env: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw not in allowed:
        raise SystemExit(f"clapq: {name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


def default_data_dir() -> Path:
    """Where the embedded mode keeps Postgres, Redis and blobs unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "clapq"


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str | None
    redis_url: str | None
    data_dir: Path
    blob_dir: Path
    disk_reserve_mb: int | None  # None: auto (clapq.room.disk_reserve)
    model: str
    device: str
    batch_size: int | None  # None: auto (worker.embedder.batch_for)
    items_per_task: int
    claim_for_s: int | None  # None: auto (claim_window_s)
    max_request_bytes: int
    max_files_per_batch: int
    max_query_chars: int
    max_k: int
    exact_search_max_windows: int
    hnsw_ef_search: int
    search_timeout_s: int
    client_timeout_s: int
    max_attempts: int
    decoders: int
    worker_concurrency: int
    decode_timeout_s: int
    decode_cpu_s: int
    max_duration_s: int
    scratch_dir: Path
    heartbeat_s: int
    stale_after_s: int
    sweep_interval_s: int
    reindex_min_dead: int
    reindex_memory_mb: int
    max_pending: int
    max_pending_per_tenant: int
    max_file_bytes: int
    compile_model: bool | None  # None: auto (clapq.precision.compile_applies)
    lanes: int | None  # None: auto (worker.embedder.lanes_for)
    precision: str
    attention: str
    text_int8: bool
    worker_nice: int
    preload_text: bool
    log_level: str
    rate_limit: str  # "" for none
    # what /metrics takes as `Authorization: Bearer`; "" for none (the default: Prometheus scrapes it with no key)
    metrics_token: str = dataclasses.field(default="", repr=False)
    # a role `clapq up` started (it sets CLAPQ_UP): its worker is up's to start, not the user's
    under_up: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "Settings":
        env = dict(os.environ if env is None else env)
        # ~ as the home directory, as `clapq up` and pgserver take it: the shell leaves it after '=' (--data-dir=~/d)
        # and in an env file; `clapq restore` made a folder '~' here, then failed (helper-98)
        data_dir = Path(overrides.pop("data_dir", None) or env.get("CLAPQ_DATA_DIR") or default_data_dir()).expanduser()
        values = dict(
            database_url=env.get("DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            data_dir=data_dir,
            blob_dir=Path(env.get("CLAPQ_BLOB_DIR") or data_dir / "blobs").expanduser(),
            disk_reserve_mb=_auto_int(env, "CLAPQ_DISK_RESERVE_MB", 0),
            model=env.get("CLAPQ_MODEL") or DEFAULT_MODEL,
            device=env.get("CLAPQ_DEVICE") or "auto",
            # None: auto, decided by each worker for its device and cores (worker.embedder.batch_for)
            batch_size=_auto_int(env, "CLAPQ_BATCH_SIZE", 1),
            # a task of one batch's files: raising the batch for a GPU raises the task with it. The API cuts
            # uploads into tasks without knowing the workers' cores: 16 where the batch is auto (a worker of a
            # larger batch fills it from later tasks' files)
            items_per_task=_int(env, "CLAPQ_ITEMS_PER_TASK", _auto_int(env, "CLAPQ_BATCH_SIZE", 1) or 16, 1),
            # a worker's task goes on claiming queued files of later tasks for this long, so its decoders
            # do not wait for the next task; 0: only to fill its last batch; auto: by device
            claim_for_s=_auto_int(env, "CLAPQ_CLAIM_FOR_S"),
            max_request_bytes=_int(env, "CLAPQ_MAX_REQUEST_BYTES", 2 * 1024**3, 1),
            max_files_per_batch=_int(env, "CLAPQ_MAX_FILES_PER_BATCH", 1000, 1),
            max_query_chars=_int(env, "CLAPQ_MAX_QUERY_CHARS", 1000, 1),
            max_k=_int(env, "CLAPQ_MAX_K", 1000, 1),
            # filters (and libraries) that leave at most this many windows are searched exactly
            exact_search_max_windows=_int(env, "CLAPQ_EXACT_SEARCH_MAX_WINDOWS", 5000, 0),
            # candidates the HNSW index keeps while it walks (pgvector's hnsw.ef_search, 1-1000): more
            # finds more of the true nearest at more cost; one value for every round and page of a
            # search, so that k=1 is the first of k=10 and pages neither repeat nor skip
            # (benchmarks/search_consistency.py)
            hnsw_ef_search=_int(env, "CLAPQ_HNSW_EF_SEARCH", 100, 1, 1000),
            # a search's statements are stopped past this (0: never): nothing else stops one whose client
            # has gone
            search_timeout_s=_int(env, "CLAPQ_SEARCH_TIMEOUT_S", 60, 0),
            # how long the API waits for a client that sends nothing more of its request's body, or reads
            # nothing of its answer, before it closes the connection (0: for ever): each such client holds
            # one of its threads (api.uploads.finish_bodies)
            client_timeout_s=_int(env, "CLAPQ_CLIENT_TIMEOUT_S", 60, 0),
            max_attempts=_int(env, "CLAPQ_MAX_ATTEMPTS", 3, 1),
            # 0: chosen by the worker for its device (worker.decoder.pool_size)
            decoders=_int(env, "CLAPQ_DECODERS", 0, 0),
            worker_concurrency=_int(env, "CLAPQ_WORKER_CONCURRENCY", 1, 1),
            # a file's decoding is given up after this long on the clock, as not the file's fault (a busy machine, a
            # read that does not return), or after CLAPQ_DECODE_CPU_S of the decoder's CPU time, as the file's (a codec
            # that spins on its bytes): half the clock's by default, so a decoder given half a core reaches it first
            decode_timeout_s=_int(env, "CLAPQ_DECODE_TIMEOUT_S", 600, 1),
            decode_cpu_s=_int(env, "CLAPQ_DECODE_CPU_S", max(1, _int(env, "CLAPQ_DECODE_TIMEOUT_S", 600, 1) // 2), 1),
            max_duration_s=_int(env, "CLAPQ_MAX_DURATION_S", 4 * 3600, 1),
            scratch_dir=Path(env.get("CLAPQ_SCRATCH_DIR") or Path(tempfile.gettempdir()) / "clapq-scratch"),
            heartbeat_s=_int(env, "CLAPQ_HEARTBEAT_S", 15, 1),
            stale_after_s=_int(env, "CLAPQ_STALE_AFTER_S", 120, 1),
            sweep_interval_s=_int(env, "CLAPQ_SWEEP_INTERVAL_S", 30, 1),
            # a vector table with this many dead rows, and dead rows 20% of its live ones (a large
            # deletion), gets its HNSW index rebuilt by `clapq beat` before VACUUM repairs the old graph
            # element by element, ~9x slower (benchmarks/delete_vacuum.py); 0: never, leave it to autovacuum
            reindex_min_dead=_int(env, "CLAPQ_REINDEX_MIN_DEAD", 50_000, 0),
            reindex_memory_mb=_int(env, "CLAPQ_REINDEX_MEMORY_MB", 1024, 64),
            max_pending=_int(env, "CLAPQ_MAX_PENDING", 200_000, 1),
            # a tenant's share of that backlog (a quarter of it unless set): one tenant cannot fill it and hold
            # back everyone else's uploads
            max_pending_per_tenant=_int(env, "CLAPQ_MAX_PENDING_PER_TENANT",
                                        max(1, _int(env, "CLAPQ_MAX_PENDING", 200_000, 1) // 4), 1),
            max_file_bytes=_int(env, "CLAPQ_MAX_FILE_BYTES", 2 * 1024**3, 1),
            # ingest runs at a lower CPU priority than the API, so a search's text tower is not
            # starved by bulk embedding on the same machine (benchmarks/search_http.py)
            worker_nice=_int(env, "CLAPQ_WORKER_NICE", 19, 0, 19),
            # each API process loads its text tower in the background at start, not on the first search
            preload_text=_bool(env, "CLAPQ_PRELOAD_TEXT", True),
            compile_model=_auto_bool(env, "CLAPQ_COMPILE"),
            # model passes side by side in a worker process, each on its share of torch's threads
            lanes=_auto_int(env, "CLAPQ_LANES", 1),
            # the models' arithmetic: auto = half precision on a GPU (bf16, or fp16 where bf16 is not
            # native), bf16 on a CPU that multiplies it natively, else fp32 (clapq.precision.pick_dtype);
            # bf16 is ~1.9x faster on such a CPU at cosine >= 0.9999 to fp32
            precision=_choice(env, "CLAPQ_PRECISION", ("auto", *PRECISION_NAMES), "auto"),
            # the audio tower's window attention through torch's fused scaled_dot_product_attention (sdpa):
            # 1.2-1.5x faster on a CPU at cosine >= 0.99999 to transformers' own code (eager)
            attention=_choice(env, "CLAPQ_ATTENTION", ATTENTIONS, "sdpa"),
            # the API's text tower in int8 on a CPU: ~3x faster uncached text queries, cosine >= 0.999
            text_int8=_bool(env, "CLAPQ_TEXT_INT8", False),
            log_level=_choice(env, "CLAPQ_LOG_LEVEL", LOG_LEVELS, "info").upper(),
            # requests per API key, shared by every API process through Redis (api.ratelimit)
            rate_limit=_rate_limit(env),
            metrics_token=(env.get("CLAPQ_METRICS_TOKEN") or "").strip(),
            under_up=env.get("CLAPQ_UP") == "1",
        )
        values.update(overrides)
        if values["heartbeat_s"] >= values["stale_after_s"]:
            raise SystemExit(f"clapq: CLAPQ_HEARTBEAT_S ({values['heartbeat_s']}) must be less than "
                             f"CLAPQ_STALE_AFTER_S ({values['stale_after_s']}): items still being embedded "
                             "would be taken for lost")
        if values["decode_cpu_s"] > values["decode_timeout_s"]:
            raise SystemExit(f"clapq: CLAPQ_DECODE_CPU_S ({values['decode_cpu_s']}) must not be more than "
                             f"CLAPQ_DECODE_TIMEOUT_S ({values['decode_timeout_s']}): a decoder that spins on a file "
                             "would be stopped by the clock first, and the file never found at fault")
        return cls(**values)

    def require_urls(self, redis: bool = True) -> "Settings":
        """Production processes are configured only from the environment (`redis`: whether this one uses Redis;
        `clapq migrate` does not)."""
        missing = [n for n, v in (("DATABASE_URL", self.database_url), ("REDIS_URL", self.redis_url if redis else 1))
                   if not v]
        if missing:
            raise SystemExit(
                f"clapq: {' and '.join(missing)} must be set for this command "
                "(or use `clapq up` for the embedded all-in-one mode)"
            )
        return self
