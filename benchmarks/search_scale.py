"""How segment search scales: HNSW recall, latency, build time and size at N segments.

    python benchmarks/search_scale.py --n 100000

Starts its own embedded PostgreSQL 18 + pgvector (or uses --database-url), migrates it with
`clapq.db.migrate`, and loads a synthetic library of N unit-length 512-d segment vectors
(~N/4 items of ~4 windows each, clustered like real embeddings, with JSONB metadata whose
`category` keeps ~10% and ~1% of rows) through binary COPY. The HNSW index is dropped before
the load and rebuilt after it (timed). Then, for M "text-like" queries, it measures recall@k
of the HNSW index against exact search, the p50/p95 latency of the SQL alone, and whether k rows
come back with metadata filters, for several hnsw.ef_search values and pgvector 0.8 iterative
scan modes; the same again for a halfvec(512) expression index; and exact (filter first, then
order) search as the fallback for selective filters.

Ground truth is computed exactly in numpy (float32 matmul, float64 re-check of the boundary)
over the very float32 values that were COPYed, with the same filters; the exact SQL query
(a MATERIALIZED CTE, so the index cannot order it) is timed on the same queries and its
agreement with numpy is reported as a sanity check.

Prints a table and writes JSON to benchmarks/results/search_scale_<N>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

DIM = 512
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a plain script from the repository root

# category shares (items); the filters below keep ~10% and ~1% of rows
CATEGORIES = {
    "music": 0.30, "foley": 0.22, "voice": 0.15, "nature": 0.12, "ambience": 0.10,
    "weapons": 0.05, "ui": 0.05, "sci-fi": 0.01,
}
FILTERS = {"all": None, "10%": {"category": "ambience"}, "1%": {"category": "sci-fi"}}
LICENSES = ["cc0", "cc-by", "cc-by-nc", "proprietary"]
FORMATS = [("wav", 0.5), ("flac", 0.3), ("mp3", 0.15), ("ogg", 0.05)]


# ----------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_bytes(s: str) -> int:
    s = s.strip().upper().replace("IB", "B")
    for suffix, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


def pg_mem(nbytes: int) -> str:
    return f"{max(1, nbytes >> 20)}MB"


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def vec_text(v: np.ndarray) -> str:
    """pgvector text format; 9 significant digits round-trip float32 exactly."""
    return "[" + ",".join(f"{float(x):.9g}" for x in v) + "]"


def connect(url: str):
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    kw = {"dbname": u.database, "user": u.username}
    if u.password:
        kw["password"] = u.password
    host = u.host or u.query.get("host")
    if host:
        kw["host"] = host
    if u.port:
        kw["port"] = u.port
    conn = psycopg2.connect(**kw)
    return conn


def scalar(cur, sql: str, params=None):
    cur.execute(sql, params)
    return cur.fetchone()[0]


def build_memory(n: int, m: int) -> int:
    """maintenance_work_mem for an in-memory HNSW build of n vectors: each element's vector and
    neighbour lists plus 30% headroom, between 1 and 4 GB."""
    graph_bytes = int(n * (8 + 4 * DIM + (2 * m + m // 2) * 10 + 64) * 1.3)
    return min(max(graph_bytes, 1 << 30), 4 << 30)


def start_tuned(pgdata: Path, shared_buffers: int):
    """The embedded Postgres with room for a large HNSW index in shared_buffers and no checkpoints
    in the middle of a bulk load; returns (server, url)."""
    from clapq.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(pgdata)
    conn = connect(pg.start())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"ALTER SYSTEM SET shared_buffers = '{pg_mem(shared_buffers)}'")
        cur.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
        cur.execute("ALTER SYSTEM SET checkpoint_timeout = '30min'")
    conn.close()
    pg.stop()
    pg = EmbeddedPostgres(pgdata)
    url = pg.start()
    log(f"embedded Postgres in {pgdata} (shared_buffers {pg_mem(shared_buffers)})")
    return pg, url


# ----------------------------------------------------------------------------- synthetic data

class Synth:
    """Clustered unit vectors: cluster centre + low-rank within-cluster variation + a little
    isotropic noise (real embeddings have low intrinsic dimension); items are points of a
    cluster, segments are small moves of their item, queries sit near a centre with a
    'modality gap' of isotropic noise (like CLAP text vs audio vectors)."""

    def __init__(self, n_segments: int, n_clusters: int, rank: int, seed: int, n_super: int = 20) -> None:
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.n = n_segments
        self.C, self.r = n_clusters, rank
        # centres are not independent random directions (those are all orthogonal in 512-d):
        # a shared component (embedding spaces are anisotropic) + one of n_super broad families
        # ("music", "speech", "nature"...) + the cluster's own direction. Centre cosines come out
        # ~0.6 within a family and ~0.2 across families.
        g = rng.standard_normal(DIM)
        fam = rng.standard_normal((max(1, n_super), DIM))
        own = rng.standard_normal((n_clusters, DIM))
        a, b, c = (0.45, 0.6, 0.6) if n_super else (0.0, 0.0, 1.0)
        self.family = rng.integers(max(1, n_super), size=n_clusters)
        self.centres = unit_rows((a * g + b * fam[self.family] + c * own).astype(np.float32) / np.sqrt(DIM))
        # per-cluster basis of its within-cluster variation (rows roughly unit length)
        self.basis = (rng.standard_normal((n_clusters, rank, DIM)) / np.sqrt(DIM)).astype(np.float32)
        self.spread = rng.uniform(0.45, 1.0, n_clusters).astype(np.float32)
        # cluster popularity: long-tailed, like a real library (lots of music, a little sci-fi)
        self.popularity = rng.dirichlet(np.full(n_clusters, 0.7))

        # items and their windows: 1 + Poisson(3) windows (mean 4), cut to exactly N segments
        counts = 1 + rng.poisson(3.0, size=int(n_segments / 4 * 1.3) + 16)
        csum = np.cumsum(counts)
        n_items = int(np.searchsorted(csum, n_segments) + 1)
        counts = counts[:n_items].copy()
        counts[-1] -= int(csum[n_items - 1] - n_segments)
        assert counts.sum() == n_segments and counts.min() >= 1
        self.n_items = n_items
        self.counts = counts
        self.item_cluster = rng.choice(n_clusters, size=n_items, p=self.popularity)
        # metadata, independent of the vectors (the filter does not follow the query's topic)
        cats = list(CATEGORIES)
        self.item_category = rng.choice(len(cats), size=n_items, p=np.array(list(CATEGORIES.values())))
        # duration consistent with the window count (10 s windows every 5 s; <= 10 s is one window)
        u = rng.uniform(0.0, 1.0, n_items)
        self.duration = np.where(counts == 1, 1.0 + 9.0 * u, 10.0 + 5.0 * (counts - 2) + 5.0 * np.maximum(u, 1e-3))
        self.item_ids = [uuid.UUID(bytes=rng.bytes(16), version=4) for _ in range(n_items)]
        self.seg_item = np.repeat(np.arange(n_items), counts)           # item index of each segment
        first = np.cumsum(counts) - counts
        self.seg_window = np.arange(n_segments) - np.repeat(first, counts)
        self.seg_category = self.item_category[self.seg_item]

    def _lowrank(self, clusters: np.ndarray, scale: np.ndarray) -> np.ndarray:
        w = self.rng.standard_normal((len(clusters), self.r)).astype(np.float32) / np.sqrt(self.r)
        out = np.empty((len(clusters), DIM), np.float32)
        for s in range(0, len(clusters), 2048):  # bounded memory for basis[clusters]
            sl = slice(s, s + 2048)
            out[sl] = np.einsum("nr,nrd->nd", w[sl], self.basis[clusters[sl]])
        return out * scale[:, None]

    def iso(self, n: int) -> np.ndarray:
        return (self.rng.standard_normal((n, DIM)) / np.sqrt(DIM)).astype(np.float32)

    def segment_vectors(self, item_lo: int, item_hi: int) -> np.ndarray:
        cl = self.item_cluster[item_lo:item_hi]
        item = self.centres[cl] + self._lowrank(cl, self.spread[cl]) + 0.15 * self.iso(len(cl))
        unit_rows(item)
        cnt = self.counts[item_lo:item_hi]
        seg_cl = np.repeat(cl, cnt)
        seg = np.repeat(item, cnt, axis=0)
        seg += self._lowrank(seg_cl, np.full(len(seg_cl), 0.22, np.float32)) + 0.08 * self.iso(len(seg_cl))
        return unit_rows(seg)

    def queries(self, m: int) -> np.ndarray:
        cl = self.rng.choice(self.C, size=m, p=self.popularity)
        q = self.centres[cl] + self._lowrank(cl, 0.5 * self.spread[cl]) + 0.6 * self.iso(m)
        return unit_rows(q)

    def item_meta(self, i: int) -> dict:
        rng = self.rng
        n_tags = int(rng.integers(1, 5))
        tags = sorted({f"tag{int(t):03d}" for t in rng.zipf(1.6, n_tags) % 300})
        return {
            "category": list(CATEGORIES)[self.item_category[i]],
            "tags": tags,
            "duration": round(float(self.duration[i]), 2),
            "license": LICENSES[int(rng.integers(len(LICENSES)))],
            "source": f"collection-{int(rng.integers(40)):02d}",
        }


# ----------------------------------------------------------------------------- loading

def copy_items(cur, syn: Synth, tenant, library, job) -> None:
    from clapq.db import libpq_waits

    fmts, fp = zip(*FORMATS)
    fmt_idx = syn.rng.choice(len(fmts), size=syn.n_items, p=np.array(fp))
    buf = io.StringIO()

    def flush():
        buf.seek(0)
        with libpq_waits():  # COPY is not done through psycopg2's wait callback (clapq.db)
            cur.copy_expert(
                "COPY items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, metadata, status, "
                "attempts, duration_s, sample_rate, channels, audio_format) FROM STDIN", buf)
        buf.seek(0)
        buf.truncate()

    for i in range(syn.n_items):
        iid = syn.item_ids[i]
        meta = json.dumps(syn.item_meta(i)).replace("\\", "\\\\")
        fmt = fmts[fmt_idx[i]]
        dur = float(syn.duration[i])
        buf.write(f"{iid}\t{tenant}\t{library}\t{job}\t{hashlib.sha256(iid.bytes).hexdigest()}\t"
                  f"clip_{i:07d}.{fmt}\t{int(dur * 48000 * 4 * (1.0 if fmt == 'wav' else 0.2))}\t{meta}\tdone\t1\t"
                  f"{dur:.3f}\t48000\t2\t{fmt}\n")
        if (i + 1) % 50000 == 0:
            flush()
    flush()


SEG_DTYPE = np.dtype([
    ("nf", ">i2"),
    ("l_id", ">i4"), ("id", ">i8"),
    ("l_item", ">i4"), ("item", "V16"),
    ("l_model", ">i4"), ("model", ">i4"),
    ("l_lib", ">i4"), ("lib", "V16"),
    ("l_win", ">i4"), ("win", ">i4"),
    ("l_start", ">i4"), ("start", ">f8"),
    ("l_end", ">i4"), ("end", ">f8"),
    ("l_vec", ">i4"), ("vdim", ">i2"), ("vunused", ">i2"), ("vec", ">f4", (DIM,)),
])
PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
PGCOPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def copy_segments(cur, syn: Synth, V: np.ndarray, model_id: int, library: uuid.UUID,
                  items_per_chunk: int = 8000, first_id: int = 1) -> None:
    """Binary COPY (pgvector's binary format: int16 dim, int16 unused, float4[dim], big-endian), ids
    from first_id on (a range the caller has reserved, where the table holds rows already)."""
    from clapq.db import libpq_waits

    item_bytes = np.frombuffer(b"".join(u.bytes for u in syn.item_ids), dtype="V16")
    lib_bytes = np.frombuffer(library.bytes, dtype="V16")[0]
    seg_lo = 0
    for lo in range(0, syn.n_items, items_per_chunk):
        hi = min(syn.n_items, lo + items_per_chunk)
        vecs = syn.segment_vectors(lo, hi)
        n = len(vecs)
        sl = slice(seg_lo, seg_lo + n)
        V[sl] = vecs
        rec = np.empty(n, SEG_DTYPE)
        rec["nf"] = 8
        rec["l_id"], rec["id"] = 8, np.arange(first_id + seg_lo, first_id + seg_lo + n)
        rec["l_item"], rec["item"] = 16, item_bytes[syn.seg_item[sl]]
        rec["l_model"], rec["model"] = 4, model_id
        rec["l_lib"], rec["lib"] = 16, lib_bytes
        win = syn.seg_window[sl]
        dur = syn.duration[syn.seg_item[sl]]
        last = np.r_[syn.seg_item[sl][1:] != syn.seg_item[sl][:-1], True]
        start = np.where(last & (win > 0), np.maximum(dur - 10.0, 0.0), 5.0 * win)
        rec["l_win"], rec["win"] = 4, win
        rec["l_start"], rec["start"] = 8, start
        rec["l_end"], rec["end"] = 8, np.minimum(start + 10.0, dur)
        rec["l_vec"], rec["vdim"], rec["vunused"], rec["vec"] = 4 + 4 * DIM, DIM, 0, vecs
        with libpq_waits():
            cur.copy_expert(
                "COPY segments (id, item_id, model_id, library_id, window_index, start_s, end_s, vector) "
                "FROM STDIN WITH (FORMAT binary)",
                io.BytesIO(PGCOPY_HEADER + rec.tobytes() + PGCOPY_TRAILER))
        seg_lo += n
    assert seg_lo == syn.n
    cur.execute("SELECT setval(pg_get_serial_sequence('segments', 'id'), max(id)) FROM segments")


# ----------------------------------------------------------------------------- ground truth

def ground_truth(V: np.ndarray, Q: np.ndarray, masks: dict[str, np.ndarray], k: int,
                 half: bool = False, extra: int = 10, chunk: int = 65536) -> dict[str, np.ndarray]:
    """Indexes (0-based) of the top k+extra rows by cosine similarity per query and filter,
    best first. half: rank with both sides rounded to float16, as a halfvec index sees them."""
    kk = k + extra
    m = len(Q)
    Qc = Q.astype(np.float16).astype(np.float32) if half else Q
    best_s = {f: np.full((m, kk), -np.inf, np.float32) for f in masks}
    best_i = {f: np.zeros((m, kk), np.int64) for f in masks}
    for lo in range(0, len(V), chunk):
        Vc = V[lo:lo + chunk]
        if half:
            Vc = Vc.astype(np.float16).astype(np.float32)
        S = Qc @ Vc.T  # (m, chunk)
        for f, mask in masks.items():
            Sf = S if mask is None else np.where(mask[lo:lo + chunk][None, :], S, -np.inf)
            take = min(kk, Sf.shape[1])
            part = np.argpartition(-Sf, take - 1, axis=1)[:, :take]
            cs = np.take_along_axis(Sf, part, axis=1)
            alls = np.concatenate([best_s[f], cs], axis=1)
            alli = np.concatenate([best_i[f], part + lo], axis=1)
            sel = np.argpartition(-alls, kk - 1, axis=1)[:, :kk]
            best_s[f] = np.take_along_axis(alls, sel, axis=1)
            best_i[f] = np.take_along_axis(alli, sel, axis=1)
    out = {}
    for f in masks:
        # re-rank candidates in float64 against the stored float32 values
        idx = best_i[f]
        s64 = np.einsum("mkd,md->mk", V[idx].astype(np.float64), Q.astype(np.float64))
        s64[~np.isfinite(best_s[f])] = -np.inf
        order = np.argsort(-s64, axis=1)
        out[f] = np.take_along_axis(idx, order, axis=1)
    return out


def true_dist(V: np.ndarray, q: np.ndarray, idx) -> np.ndarray:
    if len(idx) == 0:
        return np.zeros(0)
    return 1.0 - V[np.asarray(idx)].astype(np.float64) @ q.astype(np.float64)


# ----------------------------------------------------------------------------- queries

def build_sql(kind: str, filt: dict | None, relaxed: bool) -> str:
    """kind 'vector' or 'halfvec': ORDER BY distance LIMIT k, which HNSW can serve;
    kind 'exact'/'exact_half': the same rows ranked inside a MATERIALIZED CTE (filter first,
    then every distance computed), which no index can order."""
    half = kind in ("halfvec", "exact_half")
    d = "s.vector::halfvec(512) <=> %(q)s::halfvec(512)" if half else "s.vector <=> %(q)s::vector"
    where = ("s.library_id = %(lib)s AND s.model_id = %(model)s AND i.tenant_id = %(tenant)s"
             + (" AND i.metadata @> %(filter)s::jsonb" if filt else ""))
    core = (f"SELECT s.id, s.item_id, s.window_index, {d} AS d FROM segments s "
            f"JOIN items i ON i.id = s.item_id WHERE {where}")
    if kind.startswith("exact"):
        return f"WITH c AS MATERIALIZED ({core}) SELECT id, d FROM c ORDER BY d LIMIT %(k)s"
    sql = f"{core} ORDER BY {d} LIMIT %(k)s"
    if relaxed:  # relaxed_order may return rows slightly out of order: re-sort them
        sql = f"WITH r AS MATERIALIZED ({sql}) SELECT id, d FROM r ORDER BY d"
    return sql


def plan_summary(cur, sql: str, params: dict, settings: list[str]) -> dict:
    cur.execute("BEGIN")
    for s in settings:
        cur.execute(s)
    cur.execute("EXPLAIN (FORMAT JSON) " + sql, params)
    plan = cur.fetchone()[0][0]["Plan"]
    cur.execute("ROLLBACK")
    nodes = []

    def walk(p):
        nodes.append(p.get("Node Type") + (f" [{p['Index Name']}]" if "Index Name" in p else ""))
        for c in p.get("Plans", []):
            walk(c)
    walk(plan)
    return {"uses_hnsw": any("hnsw" in n for n in nodes), "nodes": nodes}


def run_config(cur, sql: str, settings: list[str], base: dict, Q: np.ndarray, k: int,
               qidx: list[int]) -> tuple[list[list[int]], np.ndarray]:
    ids, lat = [], []
    for j in qidx:
        params = dict(base, q=vec_text(Q[j]), k=k)
        cur.execute("BEGIN")
        for s in settings:
            cur.execute(s)
        t0 = time.perf_counter()
        cur.execute(sql, params)
        rows = cur.fetchall()
        lat.append((time.perf_counter() - t0) * 1000.0)
        cur.execute("COMMIT")
        ids.append([r[0] - 1 for r in rows])  # ids were loaded as row index + 1
    return ids, np.array(lat)


def score(V, Q, truth: np.ndarray, got: list[list[int]], qidx: list[int], k: int) -> dict:
    """recall@k: a returned row counts if its true (float32) distance is within the k-th
    true distance (+1e-6, for ties and rounding); rows missing count as misses."""
    rec, full, nret = [], 0, []
    for j, ids in zip(qidx, got):
        kth = true_dist(V, Q[j], truth[j][k - 1:k])[0]
        d = true_dist(V, Q[j], ids[:k])
        rec.append(min(k, int((d <= kth + 1e-6).sum())) / k)
        full += len(ids) >= k
        nret.append(len(ids))
    return {"recall": float(np.mean(rec)), "recall_min": float(np.min(rec)),
            "lost_frac": float(np.mean(np.array(rec) < 0.5)),
            "k_returned_frac": full / len(qidx), "mean_rows": float(np.mean(nret))}


def lat_stats(lat: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "mean_ms": float(lat.mean())}


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="segment vectors")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=300)
    ap.add_argument("--rank", type=int, default=24, help="intrinsic dimension of a cluster")
    ap.add_argument("--families", type=int, default=20,
                    help="broad families the cluster centres belong to (0: independent random centres)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--m", type=int, default=16, help="HNSW m (the migration's value)")
    ap.add_argument("--ef-construction", type=int, default=64, help="HNSW ef_construction (the migration's)")
    ap.add_argument("--ef-search", default="40,100,200,400")
    ap.add_argument("--max-scan-tuples", type=int, default=20000, help="hnsw.max_scan_tuples (pgvector default)")
    ap.add_argument("--maintenance-work-mem", default="auto",
                    help="for CREATE INDEX; auto = enough for the graph (>= 1GB, <= 4GB)")
    ap.add_argument("--parallel-workers", type=int, default=1,
                    help="max_parallel_maintenance_workers (1 = leader + 1 worker on 2 cores)")
    ap.add_argument("--shared-buffers", default="auto", help="embedded server only; auto = 1GB..3GB by N")
    ap.add_argument("--exact-queries", type=int, default=None,
                    help="queries the exact SQL is timed on (default: all up to N=200k, else 40)")
    ap.add_argument("--no-halfvec", action="store_true")
    ap.add_argument("--variants", default="24:128",
                    help="extra vector HNSW builds to compare, m:ef_construction,... ('' for none)")
    ap.add_argument("--database-url", default=None, help="use this Postgres (must be empty or clapq-migrated)")
    ap.add_argument("--data-dir", default=None, help="where the embedded Postgres lives (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the embedded data dir")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/search_scale_<N>.json)")
    args = ap.parse_args()

    efs = [int(x) for x in args.ef_search.split(",")]
    n, k, m_q = args.n, args.k, args.queries
    exact_q = args.exact_queries if args.exact_queries is not None else (m_q if n <= 200_000 else 40)
    exact_q = min(exact_q, m_q)
    # HNSW graph in memory ~ (vector + neighbour lists) per element; leave 30% headroom
    mwm = build_memory(n, args.m) if args.maintenance_work_mem == "auto" else parse_bytes(args.maintenance_work_mem)
    sb = (min(max(1 << 30, int(n * 2600 * 1.2)), 3 << 30) if args.shared_buffers == "auto"
          else parse_bytes(args.shared_buffers))

    # SIGTERM behaves like Ctrl-C so the finally below always stops Postgres
    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)

    from clapq.db import migrate

    pg = None
    tmp = None
    result: dict = {"n_segments": n}
    t_start = time.perf_counter()
    try:
        if args.database_url:
            url = args.database_url
        else:
            tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="clapq-bench-"))
            pg, url = start_tuned(tmp / "pgdata", sb)
        migrate(url)
        conn = connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        server = {}
        for name, sql in [("version", "SELECT version()"),
                          ("pgvector", "SELECT extversion FROM pg_extension WHERE extname = 'vector'"),
                          ("shared_buffers", "SHOW shared_buffers"), ("work_mem", "SHOW work_mem"),
                          ("jit_available", "SELECT pg_jit_available()"),
                          ("max_parallel_workers_per_gather", "SHOW max_parallel_workers_per_gather")]:
            server[name] = scalar(cur, sql)
        if scalar(cur, "SELECT count(*) FROM segments"):
            raise SystemExit("the database already has segments; point --database-url at an empty one")
        result["machine"] = {"cpus": os.cpu_count(), "ram_gib": round(os.sysconf("SC_PAGE_SIZE")
                             * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "platform": platform.platform(),
                             "load_avg_at_start": os.getloadavg()}
        result["server"] = server
        result["params"] = {"queries": m_q, "k": k, "clusters": args.clusters, "rank": args.rank,
                            "families": args.families,
                            "seed": args.seed, "m": args.m, "ef_construction": args.ef_construction,
                            "ef_search": efs, "max_scan_tuples": args.max_scan_tuples,
                            "maintenance_work_mem": pg_mem(mwm), "parallel_workers": args.parallel_workers,
                            "exact_queries": exact_q, "filters": FILTERS}
        log(f"{server['version'].split(' on ')[0]}, pgvector {server['pgvector']}")

        # ---- synthetic library
        t0 = time.perf_counter()
        syn = Synth(n, args.clusters, args.rank, args.seed, args.families)
        tenant, library, job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        cur.execute("BEGIN")
        cur.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (str(tenant), f"bench-{tenant.hex[:8]}"))
        cur.execute("INSERT INTO models (name, weights_sha256, dim) VALUES (%s, %s, %s) RETURNING id",
                    ("synthetic-clustered-512", hashlib.sha256(b"synthetic").hexdigest(), DIM))
        model_id = cur.fetchone()[0]
        cur.execute("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (%s, %s, %s, %s)",
                    (str(library), str(tenant), "bench", model_id))
        cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (%s, %s, %s, 'upload')",
                    (str(job), str(tenant), str(library)))
        cur.execute("DROP INDEX IF EXISTS ix_segments_vector_hnsw")
        cur.execute("COMMIT")
        V = np.empty((n, DIM), np.float32)
        cur.execute("BEGIN")
        t_items = time.perf_counter()
        copy_items(cur, syn, tenant, library, job)
        t_items = time.perf_counter() - t_items
        t_segs = time.perf_counter()
        copy_segments(cur, syn, V, model_id, library)
        cur.execute("COMMIT")
        t_segs = time.perf_counter() - t_segs
        t_vac = time.perf_counter()
        cur.execute("VACUUM (ANALYZE) items")
        cur.execute("VACUUM (ANALYZE) segments")
        t_vac = time.perf_counter() - t_vac
        load_s = time.perf_counter() - t0
        log(f"loaded {syn.n_items} items + {n} segments in {load_s:.1f}s "
            f"(items COPY {t_items:.1f}s, segments COPY {t_segs:.1f}s, vacuum/analyze {t_vac:.1f}s)")
        result["load"] = {"items": syn.n_items, "segments": n, "total_s": load_s, "items_copy_s": t_items,
                          "segments_copy_s": t_segs, "vacuum_analyze_s": t_vac,
                          "segments_per_s": n / t_segs}

        # ---- the filters: true shares and the planner's estimate
        cats = list(CATEGORIES)
        masks = {"all": None}
        sel = {}
        for fname, filt in FILTERS.items():
            if filt is None:
                continue
            mask = syn.seg_category == cats.index(filt["category"])
            masks[fname] = mask
            fjson = json.dumps(filt)
            cur.execute("EXPLAIN (FORMAT JSON) SELECT 1 FROM items WHERE library_id = %s AND metadata @> %s::jsonb",
                        (str(library), fjson))
            est = cur.fetchone()[0][0]["Plan"]["Plan Rows"]
            t1 = time.perf_counter()
            cnt = scalar(cur, "SELECT count(*) FROM items WHERE library_id = %s AND metadata @> %s::jsonb",
                         (str(library), fjson))
            count_ms = (time.perf_counter() - t1) * 1000
            sel[fname] = {"filter": filt, "segments_share": float(mask.mean()), "items": int(cnt),
                          "items_share": cnt / syn.n_items, "planner_est_items": est,
                          "planner_est_share": est / syn.n_items, "count_items_ms": count_ms}
            log(f"filter {fname}: {mask.mean():.2%} of segments, {cnt} items; planner estimates {est} items; "
                f"count(*) {count_ms:.1f} ms")
        result["filters"] = sel

        # ---- HNSW build (vector)
        def build(name: str, expr: str, opclass: str, m: int = args.m, efc: int = args.ef_construction) -> dict:
            notices_before = len(conn.notices)
            cur.execute(f"SET maintenance_work_mem = '{pg_mem(mwm)}'")
            cur.execute(f"SET max_parallel_maintenance_workers = {args.parallel_workers}")
            cur.execute("SET client_min_messages = debug1")
            # the heap is small (vectors live in TOAST), so without this reloption Postgres plans a
            # serial build below ~8 MB of heap; set it so every N builds the same way
            cur.execute(f"ALTER TABLE segments SET (parallel_workers = {args.parallel_workers})")
            t1 = time.perf_counter()
            cur.execute(f"CREATE INDEX {name} ON segments USING hnsw ({expr} {opclass}) "
                        f"WITH (m = {m}, ef_construction = {efc})")
            secs = time.perf_counter() - t1
            cur.execute("RESET client_min_messages")
            cur.execute("ALTER TABLE segments RESET (parallel_workers)")
            cur.execute("RESET maintenance_work_mem")
            notes = [x.strip() for x in conn.notices[notices_before:]
                     if any(w in x.lower() for w in ("hnsw", "parallel", "maintenance_work_mem", "graph"))]
            size = scalar(cur, "SELECT pg_relation_size(%s::regclass)", (name,))
            log(f"built {name} in {secs:.1f}s, {human(size)}" + (f" ({'; '.join(notes)})" if notes else ""))
            return {"build_s": secs, "size_bytes": size, "bytes_per_row": size / n, "m": m,
                    "ef_construction": efc, "notices": notes[-5:]}

        indexes = {"vector": build("ix_segments_vector_hnsw", "vector", "vector_cosine_ops")}
        cur.execute("ANALYZE segments")

        # ---- storage
        st = {}
        st["segments_heap"] = scalar(cur, "SELECT pg_relation_size('segments')")
        st["segments_toast"] = scalar(cur, "SELECT coalesce(pg_total_relation_size(reltoastrelid), 0) "
                                           "FROM pg_class WHERE oid = 'segments'::regclass")
        st["segments_table"] = scalar(cur, "SELECT pg_table_size('segments')")  # heap + toast + fsm/vm
        st["segments_btree_indexes"] = scalar(
            cur, "SELECT sum(pg_relation_size(indexrelid))::bigint FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                 "JOIN pg_am a ON a.oid = c.relam WHERE indrelid = 'segments'::regclass AND a.amname = 'btree'")
        st["items_total"] = scalar(cur, "SELECT pg_total_relation_size('items')")
        st["stored_vector_bytes"] = scalar(cur, "SELECT avg(pg_column_size(vector))::float8 FROM "
                                                "(SELECT vector FROM segments LIMIT 1000) x")
        result["storage"] = st

        # ---- ground truth
        t1 = time.perf_counter()
        Q = syn.queries(m_q)
        truth = ground_truth(V, Q, masks, k)
        truth_half = None if args.no_halfvec else ground_truth(V, Q, masks, k, half=True)
        log(f"ground truth for {m_q} queries x {len(masks)} filters in {time.perf_counter() - t1:.1f}s")

        base = {"lib": str(library), "model": model_id, "tenant": str(tenant)}
        all_q = list(range(m_q))
        results = []

        def record(kind, fname, ef, mode, sql, settings, qidx, tr):
            base_f = dict(base, filter=json.dumps(FILTERS[fname])) if FILTERS[fname] else base
            plan = plan_summary(cur, sql, dict(base_f, q=vec_text(Q[qidx[0]]), k=k), settings)
            ids, lat = run_config(cur, sql, settings, base_f, Q, k, qidx)
            row = {"index": kind, "filter": fname, "ef_search": ef, "iterative_scan": mode,
                   "queries": len(qidx), **score(V, Q, tr[fname], ids, qidx, k), **lat_stats(lat),
                   "uses_hnsw": plan["uses_hnsw"], "plan": " > ".join(plan["nodes"])}
            results.append(row)
            print(fmt_row(row), flush=True)
            return row

        print(HEADER, flush=True)
        kinds = ["vector"] + ([] if args.no_halfvec else ["halfvec"])
        for kind in kinds:
            if kind == "halfvec":
                indexes["halfvec"] = build("ix_segments_vector_halfvec_hnsw", "(vector::halfvec(512))",
                                           "halfvec_cosine_ops")
                cur.execute("ANALYZE segments")
                print(HEADER, flush=True)
            # warm the index and the heap once (untimed)
            run_config(cur, build_sql(kind, None, False), [f"SET LOCAL hnsw.ef_search = {max(efs)}"],
                       base, Q, k, all_q)
            for fname in FILTERS:
                modes = ["off"] if FILTERS[fname] is None else ["off", "strict_order", "relaxed_order"]
                for mode in modes:
                    for ef in efs:
                        # enable_sort = off: the planner must take the HNSW order (no top-N sort)
                        settings = [f"SET LOCAL hnsw.ef_search = {ef}",
                                    f"SET LOCAL hnsw.iterative_scan = {mode}",
                                    f"SET LOCAL hnsw.max_scan_tuples = {args.max_scan_tuples}",
                                    "SET LOCAL enable_sort = off"]
                        sql = build_sql(kind, FILTERS[fname], mode == "relaxed_order")
                        record(kind, fname, ef, mode, sql, settings, all_q, truth)
                if FILTERS[fname]:
                    # the planner left alone, with the API's iterative mode: which plan does it pick?
                    for ef in efs:
                        settings = [f"SET LOCAL hnsw.ef_search = {ef}",
                                    "SET LOCAL hnsw.iterative_scan = strict_order",
                                    f"SET LOCAL hnsw.max_scan_tuples = {args.max_scan_tuples}"]
                        record(kind + "/planner", fname, ef, "strict_order", build_sql(kind, FILTERS[fname], False),
                               settings, all_q, truth)
            # exact: filter first, every distance computed, then top k (no index can order it)
            ekind = "exact" if kind == "vector" else "exact_half"
            for fname in FILTERS:
                record(ekind, fname, None, "-", build_sql(ekind, FILTERS[fname], False), [],
                       all_q[:exact_q], truth)
            if kind == "halfvec":  # the halfvec ceiling: exact halfvec ranking vs float32 truth
                for fname in FILTERS:
                    got = [list(truth_half[fname][j][:k]) for j in all_q]
                    r = score(V, Q, truth[fname], got, all_q, k)
                    results.append({"index": "numpy_halfvec_exact", "filter": fname, "ef_search": None,
                                    "iterative_scan": "-", "queries": m_q, **r})

        # exact fallback with a GIN index on items.metadata (not in the schema; what it would buy)
        t1 = time.perf_counter()
        cur.execute("CREATE INDEX bench_items_metadata_gin ON items USING gin (metadata jsonb_path_ops)")
        gin_s = time.perf_counter() - t1
        cur.execute("ANALYZE items")
        for fname in ("10%", "1%"):
            record("exact+gin", fname, None, "-", build_sql("exact", FILTERS[fname], False), [],
                   all_q[:exact_q], truth)
        # and the planner left alone (strict_order, ef 40) now that a GIN index exists
        for fname in ("10%", "1%"):
            settings = ["SET LOCAL hnsw.ef_search = 40", "SET LOCAL hnsw.iterative_scan = strict_order",
                        f"SET LOCAL hnsw.max_scan_tuples = {args.max_scan_tuples}"]
            record("vector+gin/planner", fname, 40, "strict_order", build_sql("vector", FILTERS[fname], False),
                   settings, all_q, truth)
        result["gin"] = {"build_s": gin_s,
                         "size_bytes": scalar(cur, "SELECT pg_relation_size('bench_items_metadata_gin')")}
        for fname in ("10%", "1%"):
            cur.execute("EXPLAIN (FORMAT JSON) SELECT 1 FROM items WHERE library_id = %s AND metadata @> %s::jsonb",
                        (str(library), json.dumps(FILTERS[fname])))
            result["filters"][fname]["planner_est_items_with_gin"] = cur.fetchone()[0][0]["Plan"]["Plan Rows"]


        # other HNSW build parameters for the vector index, alone on the table (the planner must not
        # pick another index): a quicker sweep, the index forced as above
        variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",") if v.strip()]
        if variants:
            cur.execute("DROP INDEX bench_items_metadata_gin")
            cur.execute("DROP INDEX ix_segments_vector_hnsw")
            cur.execute("DROP INDEX IF EXISTS ix_segments_vector_halfvec_hnsw")
            print(HEADER, flush=True)
        for vm, vefc in variants:
            label = f"vector m{vm}/efc{vefc}"
            indexes[label] = build("ix_segments_vector_hnsw", "vector", "vector_cosine_ops", vm, vefc)
            cur.execute("ANALYZE segments")
            run_config(cur, build_sql("vector", None, False), [f"SET LOCAL hnsw.ef_search = {max(efs)}"],
                       base, Q, k, all_q)  # warm
            sweep = [("all", "off", ef) for ef in efs]
            sweep += [(f, mode, ef) for f in ("10%", "1%") for mode in ("strict_order", "relaxed_order")
                      for ef in efs[:2]]
            for fname, mode, ef in sweep:
                settings = [f"SET LOCAL hnsw.ef_search = {ef}", f"SET LOCAL hnsw.iterative_scan = {mode}",
                            f"SET LOCAL hnsw.max_scan_tuples = {args.max_scan_tuples}",
                            "SET LOCAL enable_sort = off"]
                record(label, fname, ef, mode, build_sql("vector", FILTERS[fname], mode == "relaxed_order"),
                       settings, all_q, truth)
            cur.execute("DROP INDEX ix_segments_vector_hnsw")

        result["indexes"] = indexes
        result["results"] = results
        result["capacity"] = capacity(n, st, indexes)
        result["elapsed_s"] = time.perf_counter() - t_start
        result["machine"]["load_avg_at_end"] = os.getloadavg()
        cur.close()
        conn.close()
    finally:
        if pg is not None:
            try:
                pg.stop()
                log("Postgres stopped")
            except Exception as e:  # noqa: BLE001 - report, keep cleaning up
                log(f"stopping Postgres failed: {e}")
        if tmp is not None and not args.keep and not args.data_dir:
            shutil.rmtree(tmp, ignore_errors=True)

    out = Path(args.out) if args.out else HERE / "results" / f"search_scale_{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print_summary(result)
    log(f"wrote {out}")
    return 0


def capacity(n: int, st: dict, indexes: dict) -> dict:
    per_row_table = st["segments_table"] / n
    per_row_btree = st["segments_btree_indexes"] / n
    out = {"table_bytes_per_segment": per_row_table, "btree_bytes_per_segment": per_row_btree,
           "items_bytes_per_segment": st["items_total"] / n}
    for name, ix in indexes.items():
        out[f"{name}_hnsw_bytes_per_segment"] = ix["bytes_per_row"]
        out[f"{name}_hnsw_gib_per_million"] = ix["bytes_per_row"] * 1e6 / 2**30
        out[f"{name}_total_bytes_per_segment"] = per_row_table + per_row_btree + ix["bytes_per_row"]
    return out


HEADER = (f"{'index':<19}{'filter':>7}{'ef':>5}  {'iterative':<14}{'recall@k':>9}{'min':>6}"
          f"{'lost':>6}{'k back':>8}{'rows':>6}{'p50 ms':>9}{'p95 ms':>9}  plan")


def fmt_row(r: dict) -> str:
    ef = "-" if r.get("ef_search") is None else str(r["ef_search"])
    p50 = f"{r['p50_ms']:9.2f}{r['p95_ms']:9.2f}" if "p50_ms" in r else f"{'':>18}"
    hn = ("hnsw" if r.get("uses_hnsw") else "no index order") if "uses_hnsw" in r else ""
    return (f"{r['index']:<19}{r['filter']:>7}{ef:>5}  {r['iterative_scan']:<14}{r['recall']:9.3f}"
            f"{r['recall_min']:6.2f}{r['lost_frac']:6.3f}{r['k_returned_frac']:8.2f}{r['mean_rows']:6.1f}{p50}  {hn}")


def print_summary(res: dict) -> None:
    n = res["n_segments"]
    print()
    print(f"== N = {n:,} segments ({res['load']['items']:,} items), {res['params']['queries']} queries, "
          f"k = {res['params']['k']}, m = {res['params']['m']}, ef_construction = {res['params']['ef_construction']}")
    print(f"load {res['load']['total_s']:.1f}s ({res['load']['segments_per_s']:.0f} segments/s COPY)")
    for name, ix in res["indexes"].items():
        print(f"hnsw {name:<19} build {ix['build_s']:7.1f}s  size {human(ix['size_bytes']):>10}  "
              f"{ix['bytes_per_row']:.0f} B/segment")
    st = res["storage"]
    print(f"segments table {human(st['segments_table'])} (heap {human(st['segments_heap'])}, toast "
          f"{human(st['segments_toast'])}), btree indexes {human(st['segments_btree_indexes'])}, "
          f"items {human(st['items_total'])}")
    for f, s in res["filters"].items():
        print(f"filter {f:>4} {json.dumps(s['filter'])}: {s['segments_share']:.2%} of segments; planner "
              f"estimate {s['planner_est_share']:.2%} of items; count(*) {s['count_items_ms']:.1f} ms")
    print(HEADER)
    for r in res["results"]:
        print(fmt_row(r))


if __name__ == "__main__":
    sys.exit(main())
