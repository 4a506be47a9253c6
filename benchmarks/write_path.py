"""What storing a finished batch costs Postgres as the library grows: the worker's vector write.

    python benchmarks/write_path.py --sizes 0,10000,40000
    python benchmarks/write_path.py --sizes 10000,100000 --clips 16 --delete   # what deleting costs

Starts its own embedded PostgreSQL 18 + pgvector, migrates it with `clapq.db.migrate`, and for each
size N fills one library with N stored 10 s clips (items, one segment and one pooled vector each,
clustered like real embeddings: `search_scale.Synth`) by binary COPY, with the HNSW indexes dropped
during the load and rebuilt after it as the migrations define them. Then it writes `--clips` new
clips through the worker's own `worker.store.write_items`, `--batch` per statement as the worker
does, and reports the CPU time of every Postgres process per clip and the wall time per batch.
The HNSW indexes are maintained on every insert; this measures what that costs at each size.

Prints a table and writes JSON to benchmarks/results/write_path<tag>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a plain script from the repository root

from benchmarks.search_scale import DIM, Synth, connect, copy_items, copy_segments  # noqa: E402


def postgres_cpu_s() -> float:
    """CPU seconds of every process named postgres on the machine (server, backends, WAL writer...)."""
    total = 0.0
    for p in psutil.process_iter(["name"]):
        try:
            if (p.info["name"] or "").startswith("postgres"):
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def hnsw_indexes(cur) -> list[tuple[str, str]]:
    cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE indexdef ILIKE '%USING hnsw%' ORDER BY 1")
    return cur.fetchall()


def fill(cur, n: int, seed: int, model_id: int, tenant, library, job) -> tuple[float, float]:
    """n done clips of one window each in `library`; returns (load seconds, index build seconds)."""
    defs = hnsw_indexes(cur)
    for name, _ in defs:
        cur.execute(f"DROP INDEX {name}")
    t0 = time.perf_counter()
    if n:
        syn = Synth(n, 300, 24, seed)
        # 10 s clips, as the engine benchmark's: one window per item
        syn.n_items = n
        syn.counts = np.ones(n, dtype=np.int64)
        syn.item_cluster = syn.rng.choice(syn.C, size=n, p=syn.popularity)
        syn.item_category = syn.rng.integers(0, 8, size=n)
        syn.duration = np.full(n, 10.0)
        syn.item_ids = [uuid.uuid4() for _ in range(n)]
        syn.seg_item = np.arange(n)
        syn.seg_window = np.zeros(n, dtype=np.int64)
        copy_items(cur, syn, tenant, library, job)
        copy_segments(cur, syn, np.empty((n, DIM), np.float32), model_id, library)
        cur.execute("INSERT INTO embeddings (item_id, model_id, library_id, vector, windows) "
                    "SELECT item_id, model_id, library_id, l2_normalize(avg(vector)), count(*) FROM segments "
                    "WHERE library_id = %s GROUP BY 1, 2, 3", (str(library),))
        cur.execute("VACUUM (ANALYZE) items")
        cur.execute("VACUUM (ANALYZE) segments")
        cur.execute("VACUUM (ANALYZE) embeddings")
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    cur.execute("SET maintenance_work_mem = '2GB'")
    for _, sql in defs:
        cur.execute(sql)
    cur.execute("CHECKPOINT")
    return load, time.perf_counter() - t0


def write_clips(url: str, cur, clips: int, batch: int, seed: int, model_id: int, tenant, library, job) -> dict:
    """`clips` new running items, written `batch` at a time through the worker's write_items."""
    from clapq.db import session_scope
    from worker.audio import AudioInfo
    from worker.store import Claimed, write_items

    syn = Synth(clips * 4, 300, 24, seed + 1)
    vecs = syn.segment_vectors(0, syn.n_items)[:clips]
    ids = [uuid.uuid4() for _ in range(clips)]
    for iid in ids:
        cur.execute("INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, status, "
                    "attempts) VALUES (%s, %s, %s, %s, %s, %s, 1, 'running', 1)",
                    (str(iid), str(tenant), str(library), str(job), hashlib.sha256(iid.bytes).hexdigest(),
                     f"new_{iid.hex[:8]}.wav"))
    info = AudioInfo(sample_rate=44_100, channels=2, frames=441_000, format="WAV")
    per_batch = []
    c0 = postgres_cpu_s()
    for lo in range(0, clips, batch):
        finished = [(Claimed(id=ids[i], sha256="", library_id=library, model_id=model_id), info, [(0.0, 10.0)],
                     vecs[i:i + 1]) for i in range(lo, min(clips, lo + batch))]
        t0 = time.perf_counter()
        with session_scope(url) as s:
            write_items(s, finished)
        per_batch.append(time.perf_counter() - t0)
    cpu = postgres_cpu_s() - c0
    return {"clips": clips, "postgres_cpu_ms_per_clip": cpu / clips * 1e3,
            "wall_ms_per_clip": sum(per_batch) / clips * 1e3,
            "batch_wall_ms_p50": float(np.median(per_batch)) * 1e3}


def delete_library(url: str, library) -> dict:
    """DELETE /v1/libraries/<id>: its items (cascading to segments and pooled vectors, and queueing their
    bytes by migration 0007's trigger) through the API's own `delete_items`, then the library, then
    `clapq.blobs.reclaim` of those bytes; seconds each. This benchmark writes no blob files, so the
    reclaim times its database side (the queue, the "held by an item?" check, the lock) and a failed
    unlink per file, not the unlinks themselves."""
    import tempfile

    from sqlalchemy import delete

    from api.removal import delete_items
    from clapq.blobs import BlobStore, reclaim
    from clapq.db import get_engine, session_scope
    from clapq.models import Item, Library

    c0, t0 = postgres_cpu_s(), time.perf_counter()
    with session_scope(url) as s:
        shas = list(delete_items(s, Item.library_id == library).values())
    t1 = time.perf_counter()
    with session_scope(url) as s:
        s.execute(delete(Library).where(Library.id == library))
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as empty:
        reclaim(get_engine(url), BlobStore(empty), shas)
    return {"deleted_items": len(shas), "delete_items_s": round(t1 - t0, 2), "delete_library_s": round(t2 - t1, 2),
            "reclaim_s": round(time.perf_counter() - t2, 2), "delete_postgres_cpu_s": round(postgres_cpu_s() - c0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default="0,10000,40000", help="library sizes (stored clips) to measure at")
    ap.add_argument("--clips", type=int, default=480, help="clips written at each size")
    ap.add_argument("--batch", type=int, default=16, help="clips per write statement (the worker's batch)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--drop", default="", help="indexes to drop before measuring, comma-separated "
                    "(what a write costs without them)")
    ap.add_argument("--delete", action="store_true", help="then delete each library as DELETE /v1/libraries "
                    "does, and time it")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    sizes = sorted(int(x) for x in args.sizes.split(","))

    from clapq.db import dispose_engines, migrate
    from clapq.embedded import EmbeddedPostgres

    # the embedded server as `clapq up` runs it (its settings, not search_scale's tuned ones)
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="clapq-write-")) / "pgdata")
    url = pg.start()
    rows = []
    try:
        migrate(url)
        conn = connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        pgvector = cur.fetchone()[0]
        for name in filter(None, args.drop.split(",")):
            cur.execute(f"DROP INDEX {name}")
        indexes = hnsw_indexes(cur)
        for i, n in enumerate(sizes):
            tenant, library, job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
            cur.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (str(tenant), f"w{i}"))
            cur.execute("INSERT INTO models (name, weights_sha256, dim) VALUES (%s, %s, %s) RETURNING id",
                        (f"synthetic-{i}", hashlib.sha256(str(i).encode()).hexdigest(), DIM))
            model_id = cur.fetchone()[0]
            cur.execute("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (%s, %s, 'w', %s)",
                        (str(library), str(tenant), model_id))
            cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (%s, %s, %s, 'upload')",
                        (str(job), str(tenant), str(library)))
            # each size starts from empty tables: the previous size's rows are removed
            cur.execute("TRUNCATE segments, embeddings")
            load_s, build_s = fill(cur, n, args.seed + i, model_id, tenant, library, job)
            r = {"library_clips": n, "load_s": round(load_s, 1), "index_build_s": round(build_s, 1),
                 **write_clips(url, cur, args.clips, args.batch, args.seed + i, model_id, tenant, library, job)}
            print(f"{n:>8} clips stored: Postgres {r['postgres_cpu_ms_per_clip']:6.2f} CPU-ms a clip, "
                  f"write {r['wall_ms_per_clip']:6.2f} ms a clip (batch p50 {r['batch_wall_ms_p50']:.0f} ms); "
                  f"index build {build_s:.1f} s", flush=True)
            if args.delete:
                r.update(delete_library(url, library))
                print(f"{'':>8} deleting the library's {r['deleted_items']} items: {r['delete_items_s']} s "
                      f"then the library {r['delete_library_s']} s, the queued bytes {r['reclaim_s']} s "
                      f"(Postgres {r['delete_postgres_cpu_s']} CPU-s in all)",
                      flush=True)
            rows.append(r)
        conn.close()
    finally:
        dispose_engines()
        pg.stop()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "pgvector": pgvector,
              "hnsw_indexes": [d for _, d in indexes], "batch": args.batch, "rows": rows}
    out = HERE / "results" / f"write_path{args.tag}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
