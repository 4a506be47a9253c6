"""How long POST /v1/libraries/<id>/reembed takes to answer for a large library, and where the time goes.

    python benchmarks/reembed.py --sizes 20000,200000
    python benchmarks/reembed.py --sizes 200000 --rounds 3 --tag -after

Starts its own embedded PostgreSQL 18 + pgvector and Redis, migrates, builds the tests' tiny CLAP checkpoint (the
API checks the model it serves; nothing is embedded) and runs the API in this process (api.create_app, Flask's test
client: the request's own time, no HTTP). For each size N, a library of N files of a retired model (rows only,
written by SQL as an upload records them, done, with metadata.path; the stored files are never read: every one is
its source item's, which the re-embed's check of removed files passes over), re-embedded once per round into a new
library. No worker runs: the tasks stay in Redis, emptied after each round, and the new library's files are set
done, so that the next round meets no backlog. CLAPQ_ITEMS_PER_TASK is its default (16) unless --per-task says.

The split: each SQL statement the request runs (timed on the cursor), named by what it does, and the lane decision
(api.db.lane_room, its statements included), the sending of the tasks (api.db.send_committed: Redis, and a mark of
what it did not take) and the commit; `python` is the rest (Flask, building parameters, reading rows back).

Prints a table and writes JSON to benchmarks/results/reembed<tag>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from the repository root

from benchmarks.report import save  # noqa: E402

# what a statement does, by a piece of its text (the first that matches)
KINDS = (("pg_advisory_xact_lock_shared", "blob lock"), ("INSERT INTO items", "copy"),
         ("INSERT INTO libraries", "library + job rows"), ("INSERT INTO jobs", "library + job rows"),
         ("NOT EXISTS", "removed-meanwhile check"), ("unnest(CAST(%(s)s", "removed-meanwhile check"),
         ("status != ", "read source ids"), ("status = %(status_1)s", "count cancelled"),
         ("FROM items", "backpressure counts"), ("", "other statements"))


def fill(cur, tenant, model_id: int, n: int, tag: str) -> str:
    """A library of model `model_id` holding n done files (its id)."""
    library, job = uuid.uuid4(), uuid.uuid4()
    cur.execute("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (%s, %s, %s, %s)",
                (str(library), str(tenant), f"old-{tag}", model_id))
    cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (%s, %s, %s, 'upload')",
                (str(job), str(tenant), str(library)))
    for lo in range(0, n, 50_000):
        cur.execute("""
            INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, metadata, status,
                               attempts, duration_s, created_at)
            SELECT gen_random_uuid(), %(t)s, %(l)s, %(j)s, encode(sha256(convert_to(%(tag)s || '-' || i, 'UTF8')),
                   'hex'), 'take-' || i || '.wav', 100000, jsonb_build_object('path', 'field/take-' || i || '.wav',
                   'folder', 'f0'), 'done', 1, 10.0, now() - interval '1 day' + i * interval '1 ms'
            FROM generate_series(%(lo)s, %(hi)s) i""",
                    {"t": str(tenant), "l": str(library), "j": str(job), "tag": tag, "lo": lo,
                     "hi": min(n, lo + 50_000) - 1})
    return str(library)


class Split:
    """Seconds by what the request did: its statements (by KINDS) and the functions `timed` wraps."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.c0: float | None = None  # when the commit under way began
        self.depth = 0  # within a timed function, its statements count as its own

    def statement(self, sql: str, seconds: float) -> None:
        if not self.depth:
            self.s[next(kind for piece, kind in KINDS if piece in sql)] += seconds

    def timed(self, name: str, fn):
        def run(*args, **kwargs):
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[name] += time.perf_counter() - t0
                self.depth -= 1
        return run


@contextmanager
def splitting(engine, split: Split):
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    def before(conn, cursor, statement, parameters, context, executemany):
        conn.info["t0"] = time.perf_counter()

    def after(conn, cursor, statement, parameters, context, executemany):
        split.statement(statement, time.perf_counter() - conn.info.pop("t0"))

    def commit(conn):
        split.c0 = time.perf_counter()

    def committed(session):
        if split.c0 is not None and not split.depth:
            split.s["commit"] += time.perf_counter() - split.c0
        split.c0 = None

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "commit", commit)
    event.listen(Session, "after_commit", committed)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
        event.remove(engine, "commit", commit)
        event.remove(Session, "after_commit", committed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default="20000,200000", help="files of the library re-embedded")
    ap.add_argument("--rounds", type=int, default=2, help="re-embeds of each library")
    ap.add_argument("--per-task", type=int, help="CLAPQ_ITEMS_PER_TASK (its default where not given)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from benchmarks.search_scale import connect
    from clapq.db import dispose_engines, get_engine, migrate, session_scope
    from clapq.embedded import EmbeddedPostgres, EmbeddedRedis
    from clapq.keys import create_key
    from clapq.settings import Settings
    from tests.tinyclap import build_tiny_clap

    work = Path(tempfile.mkdtemp(prefix="clapq-reembed-"))
    pg, redis = EmbeddedPostgres(work / "pgdata"), EmbeddedRedis(work / "redis")
    url, rows = pg.start(), []
    try:
        redis_url = redis.start()
        migrate(url)
        model = build_tiny_clap(work / "tiny-clap")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAPQ_")}
        env.update(DATABASE_URL=url, REDIS_URL=redis_url, CLAPQ_MODEL=str(model), CLAPQ_BLOB_DIR=str(work / "blobs"),
                   CLAPQ_DATA_DIR=str(work), CLAPQ_PRELOAD_TEXT="0", CLAPQ_RATE_LIMIT="", HF_HUB_OFFLINE="1",
                   CLAPQ_LOG_LEVEL="warning")
        if args.per_task:
            env["CLAPQ_ITEMS_PER_TASK"] = str(args.per_task)
        settings = Settings.from_env(env)

        import api.db
        import api.libraries
        from api import create_app
        from clapq.queue import lanes, redis_client

        app = create_app(settings)
        client = app.test_client()
        conn = connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("INSERT INTO models (name, weights_sha256, dim) VALUES ('retired', %s, 512) RETURNING id",
                    ("0" * 64,))
        retired = cur.fetchone()[0]
        split = Split()
        for name in ("lane_room", "send_committed"):  # as api.libraries calls them
            setattr(api.libraries, name, split.timed(name.replace("_", " "), getattr(api.libraries, name)))
        engine = get_engine(url)
        for n in (int(x) for x in args.sizes.split(",")):
            with session_scope(url) as s:  # a tenant of its own for each size
                key = create_key(s, f"bench-{n}")
            cur.execute("SELECT id FROM tenants WHERE name = %s", (f"bench-{n}",))
            tenant = cur.fetchone()[0]
            t0 = time.perf_counter()
            lib = fill(cur, tenant, retired, n, f"s{n}")
            cur.execute("VACUUM (ANALYZE) items")
            print(f"library of {n} files filled in {time.perf_counter() - t0:.1f} s", flush=True)
            for rnd in range(args.rounds):
                cur.execute("CHECKPOINT")
                split.s.clear()
                with splitting(engine, split):
                    t0 = time.perf_counter()
                    r = client.post(f"/v1/libraries/{lib}/reembed", json={"name": f"new-{rnd}"},
                                    headers={"Authorization": f"Bearer {key}"})
                    wall = time.perf_counter() - t0
                assert r.status_code == 202 and r.get_json()["queued"] == n, r.get_json()
                r_client = redis_client(app.extensions["clapq_celery"])
                tasks = sum(r_client.llen(k) for k in lanes())
                by_lane = [r_client.llen(k) for k in lanes()]
                cur.execute("SELECT count(*) FILTER (WHERE claimed_by IS NOT NULL) FROM items WHERE job_id = %s",
                            (r.get_json()["job_id"],))
                marked = cur.fetchone()[0]
                parts = {k: round(v, 3) for k, v in sorted(split.s.items(), key=lambda kv: -kv[1])}
                parts["python"] = round(wall - sum(split.s.values()), 3)
                rows.append({"files": n, "round": rnd, "seconds": round(wall, 3), "tasks_in_redis": tasks,
                             "tasks_by_lane": by_lane, "marked_files": marked, "split_s": parts})
                print(f"{n:>7} files, round {rnd}: {wall:7.3f} s; {tasks} tasks in Redis {by_lane}, "
                      f"{marked} files marked", flush=True)
                for k, v in parts.items():
                    print(f"    {k:<26} {v:8.3f} s", flush=True)
                r_client.delete(*lanes())
                cur.execute("UPDATE items SET status = 'done', claimed_by = NULL WHERE job_id = %s",
                            (r.get_json()["job_id"],))
                cur.execute("VACUUM (ANALYZE) items")
        conn.close()
    finally:
        dispose_engines()
        redis.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    save(f"reembed{args.tag}.json", {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                     "items_per_task": settings.items_per_task, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
