"""Deleting a whole library of many small files (DELETE /v1/libraries/<id>): where its time goes.

    python benchmarks/library_delete.py --files 20000 --scenarios alone,worker,upload

Starts its own embedded PostgreSQL 18 + pgvector and Redis, migrates, and builds the tests' tiny CLAP (or takes
--model). For each scenario a library of `--files` done files (rows written by SQL as an upload and a worker leave
them: an item, a window and a pooled vector each; the HNSW indexes dropped, as a DELETE does not touch them), whose
stored files are on disk as an upload lays them out (ROOT/ab/cd/<sha256>, a few hundred bytes each), is deleted by
the API's own endpoint, in
this process (a Flask test client: the same code gunicorn runs), timed, and its time split by what it waited on:
each SQL statement by kind (the row locks of the items, of their jobs and of the library, the item DELETE with its
cascade to segments and pooled vectors and the trigger that queues the digests, the blob lock, the reclaim's queue
rows and its look for items that still hold a digest, the tenant look of `stored_files`), the commits, the unlinks
(BlobStore.remove: a file and the shard folders it leaves empty), `announce_gone` (Redis), and the rest (Python).
Scenarios: `alone`; `worker`: a `clapq worker` embedding a backlog of `--backlog` files of another library
meanwhile; `upload`: the same, and a client uploading batches of 20 new files into that library over HTTP (a
`clapq api` of its own) all along. After the answer, it times the removal left to the API process's thread, where
there is one (api.removal.reclaimed), then what the maintenance loop's blob pass has left to do (clapq.blobs.
reclaim_queued), and checks that no stored file of the library is left.

Prints a table and writes JSON to benchmarks/results/library_delete<tag>.json.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import wave
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from the repository root

from benchmarks.bulk_delete import fill, start_api  # noqa: E402
from benchmarks.report import save  # noqa: E402
from benchmarks.write_path import hnsw_indexes  # noqa: E402


def kind(statement: str) -> str:
    """What a statement of the deletion is, by its text."""
    s = " ".join(statement.split())
    if "pg_advisory_xact_lock" in s:
        return "sql: blob lock (wait)"
    if s.startswith("DELETE FROM blob_reclaims"):
        return "sql: reclaim queue rows"
    if "SELECT DISTINCT sha256 FROM items" in s:
        return "sql: reclaim held check"
    if "DELETE FROM items" in s:
        return "sql: item delete + cascade + trigger"
    if "FOR UPDATE" in s and "FROM items" in s and "jobs" not in s:
        return "sql: item row locks"
    if "FROM jobs" in s and "FOR NO KEY UPDATE" in s:
        return "sql: job row locks"
    if "FROM libraries" in s and "FOR UPDATE" in s:
        return "sql: library row lock"
    if s.startswith("DELETE FROM libraries"):
        return "sql: library delete"
    if "items.tenant_id" in s and ("items.sha256 IN" in s or "items.sha256 = ANY" in s):
        return "sql: stored_files tenant look"
    return "sql: other"


class Split:
    """Seconds spent in each part of a request, in the thread that records."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = collections.defaultdict(float)
        self.counts: dict[str, int] = collections.defaultdict(int)
        self.thread: int | None = None
        self._started: dict[int, float] = {}

    def add(self, part: str, seconds: float) -> None:
        if threading.get_ident() == self.thread:
            self.parts[part] += seconds
            self.counts[part] += 1

    def install(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Connection, Engine

        import api.libraries
        import api.removal
        from clapq.blobs import BlobStore

        @event.listens_for(Engine, "before_cursor_execute")
        def before(conn, cursor, statement, params, context, executemany):
            conn.info["clapq_t0"] = time.perf_counter()

        @event.listens_for(Engine, "after_cursor_execute")
        def after(conn, cursor, statement, params, context, executemany):
            self.add(kind(statement), time.perf_counter() - conn.info.pop("clapq_t0"))

        commit = Connection._commit_impl

        def timed_commit(conn, *a, **kw):
            t0 = time.perf_counter()
            try:
                return commit(conn, *a, **kw)
            finally:
                self.add("sql: commit", time.perf_counter() - t0)

        Connection._commit_impl = timed_commit
        remove = BlobStore.remove

        def timed_remove(store, sha):
            t0 = time.perf_counter()
            try:
                return remove(store, sha)
            finally:
                self.add("unlink (file + empty shard folders)", time.perf_counter() - t0)

        BlobStore.remove = timed_remove
        announce = api.libraries.announce_gone

        def timed_announce():
            t0 = time.perf_counter()
            try:
                return announce()
            finally:
                self.add("announce_gone (Redis)", time.perf_counter() - t0)

        api.libraries.announce_gone = timed_announce


def wav_bytes(seed: int, seconds: float = 0.5, rate: int = 16000) -> bytes:
    samples = (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 3000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate), w.writeframes(samples.tobytes())
    return buf.getvalue()


def upload(base: str, key: str, library: str, seeds: range) -> None:
    files = [("files", (f"f{s}.wav", wav_bytes(s), "audio/wav")) for s in seeds]
    r = requests.post(f"{base}/v1/libraries/{library}/batches", files=files,
                      headers={"Authorization": f"Bearer {key}"}, timeout=600)
    assert r.status_code == 202, r.text


def counts(base: str, key: str, library: str) -> dict:
    return requests.get(f"{base}/v1/libraries/{library}", headers={"Authorization": f"Bearer {key}"},
                        timeout=60).json()["counts"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000, help="files of the library deleted")
    ap.add_argument("--scenarios", default="alone,worker,upload")
    ap.add_argument("--backlog", type=int, default=3000, help="files of the other library the worker embeds")
    ap.add_argument("--model", help="a CLAP checkpoint (default: the tests' tiny one, built here)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from benchmarks.search_scale import connect
    from clapq.db import dispose_engines, migrate, session_scope
    from clapq.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
    from clapq.keys import create_key
    from clapq.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="clapq-library-delete-"))
    model = args.model
    if not model:
        from tests.tinyclap import build_tiny_clap
        model = str(build_tiny_clap(work / "tiny-clap"))
    pg, redis = EmbeddedPostgres(work / "pgdata"), EmbeddedRedis(work / "redis")
    url, procs, rows = pg.start(), [], []
    try:
        redis_url = redis.start()
        migrate(url)
        blob_dir = work / "blobs"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAPQ_")}
        env.update(DATABASE_URL=url, REDIS_URL=redis_url, CLAPQ_MODEL=model, CLAPQ_BLOB_DIR=str(blob_dir),
                   CLAPQ_DATA_DIR=str(work), CLAPQ_HOST="127.0.0.1", CLAPQ_PORT=str(port), CLAPQ_PRELOAD_TEXT="0",
                   CLAPQ_RATE_LIMIT="0", CLAPQ_COMPILE="0", HF_HUB_OFFLINE="1", CLAPQ_LOG_LEVEL="warning",
                   TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
        settings = Settings.from_env(env)
        from api import create_app, removal
        from clapq.blobs import BlobStore, reclaim_queued
        from clapq.db import get_engine

        app = create_app(settings)
        client = app.test_client()
        split = Split()
        split.install()
        base = f"http://127.0.0.1:{port}"
        procs.append(start_api(env, port, work / "api.log"))
        with session_scope(url) as s:
            key = create_key(s, "bench")
        h = {"Authorization": f"Bearer {key}"}
        conn = connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        for name, _ in hnsw_indexes(cur):  # a DELETE does not touch them; 20,000 rows filled into them took 5 min
            cur.execute(f"DROP INDEX {name}")
        store = BlobStore(blob_dir)
        other = requests.post(f"{base}/v1/libraries", json={"name": "other"}, headers=h, timeout=60).json()["id"]
        seed = 0
        if {"worker", "upload"} & set(args.scenarios.split(",")):
            log = open(work / "worker.log", "ab")
            procs.append(subprocess.Popen([sys.executable, "-m", "clapq.cli", "worker"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        for scenario in args.scenarios.split(","):
            lib = client.post("/v1/libraries", json={"name": f"big-{scenario}"}, headers=h).get_json()["id"]
            cur.execute("SELECT tenant_id FROM libraries WHERE id = %s", (lib,))
            tenant = cur.fetchone()[0]
            job = str(uuid.uuid4())
            cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (%s, %s, %s, 'upload')",
                        (job, tenant, lib))
            t0 = time.perf_counter()
            fill(cur, tenant, lib, job, args.files, 1, f"{scenario}-{uuid.uuid4().hex[:8]}")
            cur.execute("SELECT sha256 FROM items WHERE library_id = %s", (lib,))
            shas = [r[0] for r in cur.fetchall()]
            for sha in shas:
                p = store.path_for(sha)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"RIFF" + sha.encode() * 8)
            os.sync()
            cur.execute("VACUUM (ANALYZE) items, segments, embeddings, blob_reclaims")
            cur.execute("CHECKPOINT")
            print(f"[{scenario}] library of {args.files} files and their stored files made in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            stop, uploaded = threading.Event(), []
            feeder = None
            if scenario in ("worker", "upload"):
                for lo in range(seed, seed + args.backlog, 100):
                    upload(base, key, other, range(lo, lo + 100))
                seed += args.backlog
                deadline = time.monotonic() + 120  # the worker busy on them before the deletion starts
                while counts(base, key, other)["done"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.5)
            if scenario == "upload":
                def feed(start: int) -> None:
                    n = start
                    while not stop.is_set():
                        upload(base, key, other, range(n, n + 20))
                        uploaded.append(20)
                        n += 20
                feeder = threading.Thread(target=feed, args=(seed + 1_000_000,), daemon=True)
                feeder.start()
                time.sleep(2)
            before = counts(base, key, other) if scenario != "alone" else None
            split.parts.clear(), split.counts.clear()
            split.thread = threading.get_ident()
            t0 = time.perf_counter()
            r = client.delete(f"/v1/libraries/{lib}", headers=h)
            total = time.perf_counter() - t0
            split.thread = None
            stop.set()
            if feeder is not None:
                feeder.join()
            after = counts(base, key, other) if scenario != "alone" else None
            assert r.status_code == 200, r.get_data(as_text=True)
            answer = r.get_json()["deleted"]
            t0 = time.perf_counter()
            if hasattr(removal, "reclaimed"):  # the stored files removed after the answer
                removal.reclaimed()
            later_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            swept = reclaim_queued(get_engine(url), store, 0)  # what the maintenance loop's pass has left
            sweep_s = time.perf_counter() - t0
            left = sum(store.exists(s) for s in shas)
            parts = dict(sorted(split.parts.items(), key=lambda kv: -kv[1]))
            rest = total - sum(parts.values())
            row = {"scenario": scenario, "files": args.files, "total_s": round(total, 2),
                   "parts_s": {k: round(v, 3) for k, v in parts.items()} | {"other (Python, Flask)": round(rest, 3)},
                   "calls": dict(split.counts), "answer": answer, "removed_after_the_answer_s": round(later_s, 2),
                   "swept_after": swept,
                   "sweep_after_s": round(sweep_s, 2), "stored_files_left": left}
            if before is not None:
                row["other_library"] = {"before": before, "after": after, "embedded_meanwhile":
                                        after["done"] - before["done"], "uploaded_meanwhile": sum(uploaded)}
            rows.append(row)
            print(f"[{scenario}] DELETE of {args.files} files: {total:.2f} s, answer {answer}", flush=True)
            for part, secs in row["parts_s"].items():
                print(f"    {part:<40} {secs:8.3f} s  ({split.counts.get(part, '')} calls)", flush=True)
            print(f"    after the answer: the removal thread {later_s:.2f} s, then the blob pass: {swept} files in "
                  f"{sweep_s:.2f} s; stored files left: {left}", flush=True)
            if before is not None:
                print(f"    other library meanwhile: {row['other_library']}", flush=True)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
                p.wait(30)
            except Exception:
                pass
        dispose_engines()
        redis.stop()
        pg.stop()
    save(f"library_delete{args.tag}.json", {"machine": f"{platform.machine()} {os.cpu_count()} cpu",
                                            "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
