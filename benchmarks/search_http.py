"""Search through the HTTP API at N segments: latency with cached and uncached text, recall, and
search while the worker is busy ingesting.

    python benchmarks/search_http.py --n 1000000

One run, one machine:
  1. an embedded Postgres (tuned as in search_scale.py) migrated with the product's migrations,
     and the full-size default CLAP (random weights) registered as the model a library is bound to;
  2. N synthetic segment vectors (search_scale.Synth: clustered, with metadata) COPYed into that
     library, and the product's own HNSW index (models.HNSW_OPTIONS) built on them (timed);
  3. `clapq api` (gunicorn) serving the library; "text-like" query vectors put in the API's text
     cache under their query strings, so a search runs exactly as a repeated user query does;
  4. measured, per filter (none, 10%, 1% of rows): p50/p95 of `POST /v1/search` (k=10) from a
     keep-alive client, item-level recall@10 against numpy over the same float32 vectors, and the
     plan the API chose (index or exact);
  5. uncached text queries through the API against the bare text tower (tokenizer +
     get_text_features in this process, one query at a time, same model files);
  6. the same cached and uncached queries while `clapq worker` embeds a batch of clips uploaded
     through the API (the full-size model on CPU, both cores busy), and again with the worker at
     the default nice level vs. the one `clapq worker` sets.

Prints tables and writes JSON to benchmarks/results/search_http_<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.engine import _free_port, build_full_model, make_clips, wait_idle  # noqa: E402
from benchmarks.search_scale import (  # noqa: E402
    CATEGORIES,
    FILTERS,
    Synth,
    build_memory,
    connect,
    copy_items,
    copy_segments,
    human,
    log,
    pg_mem,
    scalar,
    start_tuned,
)

WORDS = ["rain", "thunder", "dog", "cat", "engine", "door", "glass", "crowd", "bird", "wind", "piano",
         "guitar", "footsteps", "alarm", "siren", "water", "fire", "laser", "explosion", "whistle"]


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) if xs else float("nan")


def lat(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": pct(xs, 50), "p95_ms": pct(xs, 95), "mean_ms": statistics.fmean(xs) if xs else 0}


def item_truth(V: np.ndarray, first: np.ndarray, Q: np.ndarray, keep: np.ndarray | None, k: int):
    """Each item's best segment score per query (items x queries), and the true k-th best item
    score per query (the recall threshold); one pass over V, in blocks of whole items."""
    best = np.empty((len(first), len(Q)), np.float32)
    bounds = np.r_[first, len(V)]
    for lo in range(0, len(first), 20_000):
        hi = min(len(first), lo + 20_000)
        S = V[bounds[lo]:bounds[hi]] @ Q.T
        best[lo:hi] = np.maximum.reduceat(S, first[lo:hi] - bounds[lo], axis=0)
    if keep is not None:
        best[~keep] = -np.inf
    kth = np.partition(best, -k, axis=0)[-k]
    return best, kth


def api_env(url: str, redis_url: str, model_dir: Path, work: Path, **extra: str) -> dict:
    """The environment `clapq api` runs under in these benchmarks: this run's database, Redis and model,
    quiet logs, and no rate limit (thousands of searches a minute with one key: timed, not refused; with
    a limit on, each request pays one Redis call more, ~0.14 ms: benchmarks/ratelimit.py)."""
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("CLAPQ_")}
    env.update(DATABASE_URL=url, REDIS_URL=redis_url, CLAPQ_MODEL=str(model_dir), CLAPQ_DATA_DIR=str(work),
               CLAPQ_BLOB_DIR=str(work / "blobs"), CLAPQ_HOST="127.0.0.1", HF_HUB_OFFLINE="1",
               CLAPQ_LOG_LEVEL="WARNING", CLAPQ_RATE_LIMIT="0", **extra)
    return env


def seed_text_cache(env: dict, ckpt, tenant, texts: list[str], Q: np.ndarray) -> None:
    """Put query vectors in the API's Redis text cache under their strings, so that a search for one of
    them by `tenant` runs exactly as a repeated user query does (the key names the API's text tower
    precision and the tenant)."""
    import redis

    from api.query import text_cache_key
    from clapq.precision import model_precision
    from clapq.settings import Settings

    st = Settings.from_env(env)
    tower = model_precision(st.device, st.precision, st.text_int8)
    rc = redis.Redis.from_url(env["REDIS_URL"])
    for t, q in zip(texts, Q):
        rc.set(text_cache_key(ckpt, t, tower, tenant), q.astype(np.float32).tobytes())


class Api:
    """`clapq api` / `clapq worker` as the README starts them, stopped on exit."""

    def __init__(self, env: dict, work: Path) -> None:
        self.env, self.work, self.procs = env, work, {}
        self.log = open(work / "clapq.log", "ab")

    def start(self, name: str, *extra: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "clapq.cli", name, *extra], env=self.env, stdout=self.log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.log.close()


def wait_ready(http, base: str, need_worker: bool, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = http.get(base + ("/readyz" if need_worker else "/healthz"), timeout=5)
            if r.status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{base} not ready after {timeout:.0f}s")


class NullCursor:
    """Takes COPY data and discards it (regenerating a stored library's vectors)."""

    def copy_expert(self, sql, data) -> None:
        pass

    def execute(self, sql, params=None) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="segment vectors")
    ap.add_argument("--queries", type=int, default=200, help="cached text queries per filter")
    ap.add_argument("--uncached", type=int, default=30, help="uncached text queries (full-size text tower)")
    ap.add_argument("--ingest-clips", type=int, default=64, help="10 s clips ingested during phase 6 (0: skip)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--parallel-workers", type=int, default=1)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "clapq-bench-full-clap")
    ap.add_argument("--out", default=None)
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="keep the database here; if it already holds this N (same seed), reuse it: no load, no build")
    args = ap.parse_args()
    n, k = args.n, args.k

    import requests
    import torch

    from clapq.checkpoint import register_model, resolve
    from clapq.clap import get_clap
    from clapq.db import migrate, session_scope
    from clapq.embedded import EmbeddedRedis
    from clapq.keys import create_key
    from clapq.models import HNSW_OPTIONS

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="clapq-search-http-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    reuse = (work / "pgdata").is_dir()
    model_dir = build_full_model(args.model_dir)
    ckpt = resolve(str(model_dir))
    sb = min(max(1 << 30, int(n * 2600 * 1.2)), 3 << 30)
    pg, url = start_tuned(work / "pgdata", sb)
    red = EmbeddedRedis(work / "redis")
    api = None
    res: dict = {"n_segments": n, "k": k, "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg()}}
    try:
        redis_url = red.start()
        migrate(url)
        conn = connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        old = None
        if reuse:
            cur.execute("SELECT t.name, l.id, j.id, (SELECT count(*) FROM segments s WHERE s.library_id = l.id) "
                        "FROM libraries l "
                        "JOIN tenants t ON t.id = l.tenant_id JOIN jobs j ON j.library_id = l.id WHERE l.name = 'big'")
            old = cur.fetchone()
            if old is None or old[3] != n:
                raise SystemExit(f"{work} holds another database; use an empty --work-dir")
        tenant_name = old[0] if old else f"bench-{uuid.uuid4().hex[:8]}"
        with session_scope(url) as s:
            model_id = register_model(s, ckpt)
            key = create_key(s, tenant_name)
        tenant = scalar(cur, "SELECT id FROM tenants WHERE name = %s", (tenant_name,))
        library, job = (uuid.UUID(str(old[1])), uuid.UUID(str(old[2]))) if old else (uuid.uuid4(), uuid.uuid4())
        if not old:
            cur.execute("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (%s, %s, 'big', %s)",
                        (str(library), str(tenant), model_id))
            cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (%s, %s, %s, 'upload')",
                        (str(job), str(tenant), str(library)))

        # ---- 2. synthetic library, the product's index built after the load
        t0 = time.perf_counter()
        syn = Synth(n, 300, 24, args.seed, 20)
        V = np.empty((n, 512), np.float32)
        if reuse:  # the same draws in the same order regenerate the very vectors stored
            copy_items(NullCursor(), syn, tenant, library, job)
            copy_segments(NullCursor(), syn, V, model_id, library)
        else:
            cur.execute("DROP INDEX ix_segments_vector_hnsw")
            cur.execute("BEGIN")
            copy_items(cur, syn, tenant, library, job)
            copy_segments(cur, syn, V, model_id, library)
            cur.execute("COMMIT")
            cur.execute("VACUUM (ANALYZE) items")
            cur.execute("VACUUM (ANALYZE) segments")
        load_s = time.perf_counter() - t0
        log(f"{'regenerated' if reuse else 'loaded'} {syn.n_items} items, {n} segments in {load_s:.0f}s")
        build_s = None
        if not reuse:
            cur.execute(f"SET maintenance_work_mem = '{pg_mem(build_memory(n, HNSW_OPTIONS['m']))}'")
            cur.execute(f"SET max_parallel_maintenance_workers = {args.parallel_workers}")
            cur.execute(f"ALTER TABLE segments SET (parallel_workers = {args.parallel_workers})")
            t0 = time.perf_counter()
            cur.execute("CREATE INDEX ix_segments_vector_hnsw ON segments USING hnsw (vector vector_cosine_ops) "
                        f"WITH (m = {HNSW_OPTIONS['m']}, ef_construction = {HNSW_OPTIONS['ef_construction']})")
            build_s = time.perf_counter() - t0
            cur.execute("ALTER TABLE segments RESET (parallel_workers)")
            cur.execute("RESET maintenance_work_mem")
            cur.execute("ANALYZE segments")
        size = scalar(cur, "SELECT pg_relation_size('ix_segments_vector_hnsw')")
        log(f"HNSW m{HNSW_OPTIONS['m']}/efc{HNSW_OPTIONS['ef_construction']}: {human(size)}"
            + (f", built in {build_s:.0f}s" if build_s else " (reused)"))
        res["load_s"], res["index"] = load_s, {**HNSW_OPTIONS, "build_s": build_s, "size_bytes": size}

        # ---- 3. the API, and the cache holding the query vectors under their strings
        port = _free_port()
        env = api_env(url, redis_url, model_dir, work, CLAPQ_PORT=str(port))
        api = Api(env, work)
        api_proc = api.start("api")
        base = f"http://127.0.0.1:{port}"
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"
        wait_ready(http, base, need_worker=False)
        wait_idle(api_proc.pid)
        Q = syn.queries(args.queries)
        texts = [f"bench query {i}" for i in range(args.queries)]
        seed_text_cache(env, ckpt, tenant, texts, Q)

        first = np.cumsum(syn.counts) - syn.counts
        cats = list(CATEGORIES)
        item_ids = [str(u) for u in syn.item_ids]
        index_of = {u: i for i, u in enumerate(item_ids)}

        def search(text: str, filt, lib=library, server: dict | None = None) -> tuple[float, dict]:
            """One POST /v1/search: client-side ms and the body; the API's Server-Timing (ms spent
            embedding the query, and searching) is appended to `server`."""
            body = {"library_id": str(lib), "text": text, "k": k}
            if filt:
                body["filter"] = {"metadata": filt}
            for attempt in (1, 2):  # a keep-alive connection the server closed while we were idle
                t1 = time.perf_counter()
                try:
                    r = http.post(base + "/v1/search", json=body, timeout=300)
                    break
                except requests.ConnectionError:
                    if attempt == 2:
                        raise
            ms = (time.perf_counter() - t1) * 1000
            r.raise_for_status()
            for part in r.headers.get("Server-Timing", "").split(","):
                name, _, dur = part.strip().partition(";dur=")
                if dur and server is not None:
                    server.setdefault(name, []).append(float(dur))
            return ms, r.json()

        # ---- 4. cached text, per filter
        # the first pass after a restart reads the 2.5 GiB graph into shared_buffers page by page (the
        # embedded server has no pg_prewarm); it is reported, then every number below is warm
        res["cold_first_pass"] = {}
        for fname, filt in FILTERS.items():
            res["cold_first_pass"][fname] = lat([search(t, filt)[0] for t in texts])
            log(f"first pass (cold), filter {fname:>4}: p50 {res['cold_first_pass'][fname]['p50_ms']:.1f} ms, "
                f"p95 {res['cold_first_pass'][fname]['p95_ms']:.1f} ms")
        res["cached"] = {}
        for fname, filt in FILTERS.items():
            keep = None if filt is None else (syn.item_category == cats.index(filt["category"]))
            times, recalls, plans, full, bodies = [], [], {}, 0, []
            # requests back to back (ground truth afterwards: idle gaps would let keep-alive
            # connections close and caches cool)
            server: dict[str, list[float]] = {}
            for t in texts:
                ms, body = search(t, filt, server=server)
                times.append(ms)
                bodies.append(body)
            best, kth = item_truth(V, first, Q, keep, k)
            for j, body in enumerate(bodies):
                plans[body["plan"]] = plans.get(body["plan"], 0) + 1
                got = [index_of[r["item_id"]] for r in body["results"]]
                full += len(got) == k
                recalls.append(sum(best[i, j] >= kth[j] - 1e-6 for i in got) / k)
            row = {**lat(times), "recall_at_k": float(np.mean(recalls)), "k_back": full / len(texts), "plans": plans,
                   "server_timing_p50_ms": {n_: pct(v, 50) for n_, v in server.items()}}
            res["cached"][fname] = row
            log(f"cached text, filter {fname:>4}: p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, "
                f"recall@{k} {row['recall_at_k']:.3f}, k back {row['k_back']:.0%}, plans {plans}, "
                f"server p50 {row['server_timing_p50_ms']}")

        # ---- 5. uncached text: API vs the bare text tower
        clap = get_clap(ckpt, "cpu", text_only=True)
        run = uuid.uuid4().hex[:6]  # never in the cache, even with a reused --work-dir
        fresh = [f"{WORDS[i % len(WORDS)]} {WORDS[(7 * i + 3) % len(WORDS)]} take {i} {run}"
                 for i in range(args.uncached)]
        clap.embed_text(["warm-up"])
        bare = []
        for t in fresh:
            t1 = time.perf_counter()
            clap.embed_text([t + " (bare)"])
            bare.append((time.perf_counter() - t1) * 1000)
        del clap
        search("warm up the api's text tower", None)
        server = {}
        uncached = [search(t, None, server=server)[0] for t in fresh]
        res["uncached"] = {"api": lat(uncached), "bare_text_tower": lat(bare),
                           "ratio_p50": pct(uncached, 50) / pct(bare, 50),
                           "server_timing_p50_ms": {n_: pct(v, 50) for n_, v in server.items()}}
        log(f"uncached text: API p50 {pct(uncached, 50):.0f} ms / p95 {pct(uncached, 95):.0f} ms; bare text tower "
            f"p50 {pct(bare, 50):.0f} ms; ratio {res['uncached']['ratio_p50']:.2f}; "
            f"server p50 {res['uncached']['server_timing_p50_ms']}")

        # ---- 6. the same while the worker ingests
        if args.ingest_clips:
            clips = make_clips(args.ingest_clips)
            res["during_ingest"] = {}
            import psutil

            for nice in ("0", None):  # None: what `clapq worker` does by default (nice 19)
                wenv = dict(env, CLAPQ_ITEMS_PER_TASK="16")
                if nice is not None:
                    wenv["CLAPQ_WORKER_NICE"] = nice
                api.env = wenv
                worker = api.start("worker")
                wait_ready(http, base, need_worker=True)
                wait_idle(worker.pid)  # the pool child loads and warms the model after readiness
                nices = sorted({q.nice() for q in [psutil.Process(worker.pid),
                                                   *psutil.Process(worker.pid).children(recursive=True)]})
                lib = http.post(base + "/v1/libraries", json={"name": f"ingest-{nice}-{time.time_ns()}"},
                                timeout=60).json()
                files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in clips]
                t_up = time.perf_counter()
                job = http.post(f"{base}/v1/libraries/{lib['id']}/batches", files=files, timeout=600).json()["job_id"]
                time.sleep(1)  # the first batch is on the model
                cached, unc, i, server = [], [], 0, {}
                while True:
                    state = http.get(f"{base}/v1/jobs/{job}", timeout=60).json()
                    if state["status"] not in ("queued", "running"):
                        break
                    cached.append(search(texts[i % len(texts)], None)[0])
                    unc.append(search(f"during ingest {nice} {i} {run}", None, server=server)[0])
                    i += 1
                ingest_s = time.perf_counter() - t_up
                label = f"nice {nice}" if nice is not None else "clapq worker default"
                res["during_ingest"][label] = {"worker_nice": nices, "cached": lat(cached), "uncached": lat(unc),
                                               "uncached_server_timing_p50_ms": {n_: pct(v, 50) for n_, v in server.items()},
                                               "ingest_s": ingest_s, "clips_per_s": len(clips) / ingest_s,
                                               "job_status": state["status"]}
                log(f"during ingest ({label}, worker nice {nices}): cached p50 {pct(cached, 50):.0f} / p95 {pct(cached, 95):.0f} ms, "
                    f"uncached p50 {pct(unc, 50):.0f} / p95 {pct(unc, 95):.0f} ms over {len(cached)} pairs; "
                    f"ingest {len(clips) / ingest_s:.2f} clips/s; uncached server p50 "
                    f"{res['during_ingest'][label]['uncached_server_timing_p50_ms']}")
                api.stop("worker")
    finally:
        if api is not None:
            api.close()
        red.stop()
        pg.stop()

    out = Path(args.out) if args.out else HERE / "results" / f"search_http_{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps({k_: res[k_] for k_ in ("cached", "uncached", "during_ingest") if k_ in res}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
