"""Search after a large deletion, before and after VACUUM repairs the HNSW graph.

    python benchmarks/delete_vacuum.py --n 400000

Deleting a library removes its rows at once, but its windows stay in the segments' HNSW graph (one
graph for every library) as dead elements until VACUUM removes them and re-links their neighbours.
This loads a synthetic store of N segment vectors (search_scale.py's clustered data), half of its
items in library A and half in library B, builds the shipped index (m 24 / ef_construction 128),
then for M text-like queries on library A (the API's settings: ef_search 100, iterative scan
strict_order) measures recall@k against exact ground truth and the SQL latency:

  1. before: B's windows live in the graph, filtered out by library;
  2. after B is deleted (`DELETE FROM items`, as api.removal does; segments go by cascade), before
     any vacuum: B's windows are dead elements the scan still visits;
  3. after the repair, timed: `--repair vacuum`, a manual VACUUM of segments (autovacuum does the
     same work, throttled by autovacuum_vacuum_cost_delay, so it takes longer in wall time); or
     `--repair reindex`, what pgvector's README advises: REINDEX INDEX CONCURRENTLY (a new graph of
     the live rows, built while searches and writes go on), then VACUUM.

Prints a table and writes JSON to benchmarks/results/delete_vacuum_<N>_<repair>.json.
"""

from __future__ import annotations

import argparse
import hashlib
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import save  # noqa: E402
from benchmarks.search_scale import (  # noqa: E402
    DIM,
    Synth,
    build_sql,
    connect,
    copy_items,
    copy_segments,
    ground_truth,
    human,
    lat_stats,
    log,
    pg_mem,
    run_config,
    scalar,
    score,
    start_tuned,
)

API_SETTINGS = ["SET LOCAL hnsw.iterative_scan = strict_order", "SET LOCAL hnsw.ef_search = 100"]


def sizes(cur) -> dict:
    return {"segments_hnsw_bytes": scalar(cur, "SELECT pg_relation_size('ix_segments_vector_hnsw')"),
            "segments_table_bytes": scalar(cur, "SELECT pg_table_size('segments')")}


def measure(cur, name: str, V, Q, truth, base: dict, k: int) -> dict:
    qidx = list(range(len(Q)))
    run_config(cur, build_sql("vector", None, False), API_SETTINGS, base, Q, k, qidx[:10])  # warm the cache
    got, lat = run_config(cur, build_sql("vector", None, False), API_SETTINGS, base, Q, k, qidx)
    r = {"phase": name, **score(V, Q, truth, got, qidx, k), **lat_stats(lat)}
    log(f"{name:<28} recall@{k} {r['recall']:.3f} (k rows {r['k_returned_frac']:.0%}), "
        f"p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=400_000, help="segment vectors, both libraries")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repair", choices=("vacuum", "reindex"), default="vacuum")
    ap.add_argument("--data-dir", default=None, help="where the embedded Postgres lives (default: a temp dir)")
    args = ap.parse_args()

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)

    from clapq.db import migrate

    n, k = args.n, args.k
    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="clapq-vacuum-"))
    pg, result = None, {"n_segments": n}
    try:
        pg, url = start_tuned(tmp / "pgdata", min(max(1 << 30, int(n * 2600 * 1.2)), 3 << 30))
        migrate(url)
        conn = connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
        result["server"] = {"version": scalar(cur, "SELECT version()").split(" on ")[0],
                            "pgvector": scalar(cur, "SELECT extversion FROM pg_extension WHERE extname = 'vector'")}
        # the shipped index, as the migrations left it: rebuilt after the load, with the same definition
        index_def = scalar(cur, "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_segments_vector_hnsw'")
        result["index"] = index_def

        syn = Synth(n, 300, 24, args.seed, 20)
        tenant, lib_a, lib_b, job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        cur.execute("BEGIN")
        cur.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (str(tenant), f"bench-{tenant.hex[:8]}"))
        cur.execute("INSERT INTO models (name, weights_sha256, dim) VALUES (%s, %s, %s) RETURNING id",
                    ("synthetic-clustered-512", hashlib.sha256(b"synthetic").hexdigest(), DIM))
        model_id = cur.fetchone()[0]
        for lib, name in ((lib_a, "kept"), (lib_b, "deleted")):
            cur.execute("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (%s, %s, %s, %s)",
                        (str(lib), str(tenant), name, model_id))
        cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (%s, %s, %s, 'upload')",
                    (str(job), str(tenant), str(lib_a)))
        cur.execute("DROP INDEX ix_segments_vector_hnsw")
        V = np.empty((n, DIM), np.float32)
        t0 = time.perf_counter()
        copy_items(cur, syn, tenant, lib_a, job)
        copy_segments(cur, syn, V, model_id, lib_a)
        # every other item (and its windows) moves to library B
        in_b = np.arange(syn.n_items) % 2 == 1
        b_ids = [str(syn.item_ids[i]) for i in np.flatnonzero(in_b)]
        cur.execute("UPDATE items SET library_id = %s WHERE id = ANY(%s::uuid[])", (str(lib_b), b_ids))
        cur.execute("UPDATE segments SET library_id = %s WHERE item_id = ANY(%s::uuid[])", (str(lib_b), b_ids))
        cur.execute("COMMIT")
        cur.execute("VACUUM (FULL, ANALYZE) items")
        cur.execute("VACUUM (FULL, ANALYZE) segments")
        result["load_s"] = round(time.perf_counter() - t0, 1)
        cur.execute("SET maintenance_work_mem = '%s'" % pg_mem(min(4 << 30, max(1 << 30, n * 4000))))
        t0 = time.perf_counter()
        cur.execute(index_def)
        result["index_build_s"] = round(time.perf_counter() - t0, 1)
        cur.execute("RESET maintenance_work_mem")
        cur.execute("ANALYZE segments")
        log(f"loaded {n} segments ({int((~in_b[syn.seg_item]).sum())} in A) in {result['load_s']} s, "
            f"index built in {result['index_build_s']} s")

        in_a = ~in_b[syn.seg_item]
        Q = syn.queries(args.queries)
        truth = ground_truth(V, Q, {"a": in_a}, k)["a"]
        base = {"lib": str(lib_a), "model": model_id, "tenant": str(tenant)}
        phases, size = [], {"before": sizes(cur)}
        phases.append(measure(cur, "before", V, Q, truth, base, k))

        t0 = time.perf_counter()
        cur.execute("DELETE FROM items WHERE library_id = %s", (str(lib_b),))
        deleted = cur.rowcount
        result["delete_s"] = round(time.perf_counter() - t0, 2)
        log(f"deleted library B's {deleted} items in {result['delete_s']} s")
        phases.append(measure(cur, "deleted, not vacuumed", V, Q, truth, base, k))

        result["repair"] = args.repair
        if args.repair == "reindex":
            cur.execute("SET maintenance_work_mem = '%s'" % pg_mem(min(4 << 30, max(1 << 30, n * 4000))))
            t0 = time.perf_counter()
            cur.execute("REINDEX INDEX CONCURRENTLY ix_segments_vector_hnsw")
            result["reindex_s"] = round(time.perf_counter() - t0, 1)
            cur.execute("RESET maintenance_work_mem")
            log(f"REINDEX INDEX CONCURRENTLY {result['reindex_s']} s")
        t0 = time.perf_counter()
        cur.execute("VACUUM segments")
        result["vacuum_segments_s"] = round(time.perf_counter() - t0, 1)
        size["after_repair"] = sizes(cur)
        log(f"VACUUM segments {result['vacuum_segments_s']} s")
        phases.append(measure(cur, "repaired", V, Q, truth, base, k))
        result.update(phases=phases, sizes=size, deleted_items=deleted,
                      deleted_segments=int(in_b[syn.seg_item].sum()))
        conn.close()
    finally:
        if pg is not None:
            pg.stop()
        if not args.data_dir:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{n} segments, half deleted; queries on the other half ({args.queries}, k {k})")
    print(f"{'phase':<24}{'recall':>8}{'k rows':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for r in result["phases"]:
        print(f"{r['phase']:<24}{r['recall']:>8.3f}{r['k_returned_frac']:>8.0%}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}")
    print(f"delete {result['delete_s']} s; " + (f"REINDEX CONCURRENTLY {result['reindex_s']} s, then "
          if args.repair == "reindex" else "") + f"VACUUM segments {result['vacuum_segments_s']} s; HNSW index "
          f"{human(size['before']['segments_hnsw_bytes'])} before, {human(size['after_repair']['segments_hnsw_bytes'])} after")
    save(f"delete_vacuum_{n}_{args.repair}.json", result, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
