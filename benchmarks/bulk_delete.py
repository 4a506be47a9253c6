"""Deleting many files of a library: a request a file (DELETE /v1/items/<id>) against a thousand a request
(POST /v1/libraries/<id>/deletions), over HTTP and through `clapq delete --gone-from`.

    python benchmarks/bulk_delete.py --gone 500,5000 --old-cli /tmp/clapq-before
    python benchmarks/bulk_delete.py --gone 5000 --rounds 3 --ways http_deletions,cli
    python benchmarks/bulk_delete.py --transactions 1000x1,5000x1,10000x1,20000x1,1000x35,200x719 --gone ''

Starts its own embedded PostgreSQL 18 + pgvector and Redis, migrates, and serves `clapq api` (gunicorn, its
default 2 processes x 4 threads, at the default CLAPQ_RATE_LIMIT of 1200 requests a minute unless
--rate-limit says otherwise) on a free port. Needs CLAPQ_MODEL (or --model): a checkpoint on disk, which the
API checks at start; the text tower is not loaded.

`--gone N,...`: for each N, a library holding N files "sent" from a folder and since deleted from it, and one
file still there (rows written by SQL as `clapq upload` records them: metadata.path and .folder, a window and
a pooled vector each, a small stored file each), deleted each of four ways (`--ways`), `--rounds` times, each
time on a fresh copy and with an API key of its own (the rate limit counts each run alone): N DELETEs over one
HTTP connection (`http_delete_each`); POSTs to /deletions, a thousand ids each (`http_deletions`); `clapq delete
--gone-from FOLDER --yes` of this checkout (`cli`); and, with `--old-cli DIR` (a checkout of an earlier clapq:
`git archive 1dbf6c1 | tar -x -C DIR`), its `clapq delete --gone-from` (`cli_old`). The CLI's time includes
starting Python and listing the library (500 items a GET).

`--transactions NxW,...`: how long one deletion transaction of N items of W windows each holds their rows
(api.removal.delete_items, in this process, as /deletions runs it), in a library of `--library-items`
other files (W = 1: a 10 s clip; 35: a 3-minute song; 719: an hour). The HNSW indexes are dropped for
these fills: a DELETE does not touch an index (it marks heap rows dead; VACUUM's cost is
benchmarks/delete_vacuum.py's).

Prints a table and writes JSON to benchmarks/results/bulk_delete<tag>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import wave
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from the repository root

from benchmarks.report import save  # noqa: E402
from benchmarks.write_path import hnsw_indexes, postgres_cpu_s  # noqa: E402

VECTOR = "(SELECT array_agg(random()::real) FROM generate_series(1, 512) WHERE {ref} IS NOT NULL)::vector(512)"


def fill(cur, tenant, library, job, n: int, windows: int, tag: str, folder: str | None = None) -> list[str]:
    """n done files of `windows` windows each in the library (their ids); with `folder`, recorded as sent from
    it at paths gone/<tag>-<i>.wav."""
    meta = "jsonb_build_object('path', 'gone/' || %(tag)s || '-' || i || '.wav', 'folder', %(folder)s)" if folder \
        else "'{}'::jsonb"
    cur.execute(f"""
        INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, metadata, status,
                           attempts, duration_s)
        SELECT gen_random_uuid(), %(t)s, %(l)s, %(j)s, encode(sha256(convert_to(%(tag)s || '-' || i, 'UTF8')), 'hex'),
               %(tag)s || '-' || i || '.wav', 1000, {meta}, 'done', 1, %(w)s * 5.0 + 5
        FROM generate_series(1, %(n)s) i RETURNING id""",
                {"t": str(tenant), "l": str(library), "j": str(job), "tag": tag, "n": n, "w": windows,
                 "folder": folder})
    ids = [str(r[0]) for r in cur.fetchall()]
    cur.execute(f"""
        INSERT INTO segments (item_id, model_id, library_id, vector, window_index, start_s, end_s)
        SELECT i.id, l.model_id, i.library_id, {VECTOR.format(ref="w + length(i.filename)")}, w, 5.0 * w,
               5.0 * w + 10
        FROM items i JOIN libraries l ON l.id = i.library_id, generate_series(0, %(w)s - 1) w
        WHERE i.id = ANY(%(ids)s::uuid[])""", {"w": windows, "ids": ids})
    cur.execute("""
        INSERT INTO embeddings (item_id, model_id, library_id, vector, windows)
        SELECT s.item_id, s.model_id, s.library_id, s.vector, %(w)s FROM segments s
        WHERE s.item_id = ANY(%(ids)s::uuid[]) AND s.window_index = 0""", {"w": windows, "ids": ids})
    return ids


def new_library(cur, tenant, model_id: int, name: str) -> tuple:
    library, job = uuid.uuid4(), uuid.uuid4()
    cur.execute("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (%s, %s, %s, %s)",
                (str(library), str(tenant), name, model_id))
    cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (%s, %s, %s, 'upload')",
                (str(job), str(tenant), str(library)))
    return library, job


def transactions(url: str, cur, tenant, model_id: int, specs: list[tuple[int, int]], library_items: int) -> list:
    """One delete_items transaction per spec, in a library of library_items other files; seconds each."""
    from api.removal import delete_items
    from clapq.db import session_scope
    from clapq.models import Item

    library, job = new_library(cur, tenant, model_id, "big")
    t0 = time.perf_counter()
    for start in range(0, library_items, 50_000):
        fill(cur, tenant, library, job, min(50_000, library_items - start), 1, f"base{start}")
    cur.execute("VACUUM (ANALYZE) items, segments, embeddings")
    print(f"library of {library_items} files filled in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for n, windows in specs:
        ids = fill(cur, tenant, library, job, n, windows, f"tx{n}x{windows}")
        cur.execute("ANALYZE items, segments, embeddings")
        cur.execute("CHECKPOINT")
        c0, t0 = postgres_cpu_s(), time.perf_counter()
        with session_scope(url) as s:
            gone = delete_items(s, Item.id.in_([uuid.UUID(i) for i in ids]))
        wall = time.perf_counter() - t0
        rows.append({"items": n, "windows_each": windows, "deleted": len(gone), "transaction_s": round(wall, 3),
                     "ms_per_item": round(wall / n * 1e3, 3), "postgres_cpu_s": round(postgres_cpu_s() - c0, 2)})
        print(f"{n:>6} files of {windows:>3} windows: one transaction {wall:7.3f} s ({wall / n * 1e3:.3f} ms a "
              f"file; Postgres {rows[-1]['postgres_cpu_s']} CPU-s)", flush=True)
        cur.execute("DELETE FROM blob_reclaims")
    return rows


def start_api(env: dict, port: int, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "api"], env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(log.read_text()[-3000:])
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(log.read_text()[-3000:])
        time.sleep(0.3)


WAYS = ("http_delete_each", "http_deletions", "cli", "cli_old")


def gone_runs(cur, env: dict, base: str, tenant, model_id: int, blob_dir: Path, n: int,
              old_cli: Path | None, ways: list[str], rounds: int) -> list:
    """The ways of deleting n files gone from a folder, `rounds` times each, each on a fresh library; seconds
    each."""
    from clapq.blobs import BlobStore
    from clapq.client import folder_id

    from clapq.db import session_scope
    from clapq.keys import create_key

    store, rows = BlobStore(blob_dir), []
    for way, rnd in ((w, r) for w in ways if w != "cli_old" or old_cli for r in range(rounds)):
        with session_scope(env["DATABASE_URL"]) as s:  # a key of its own: the rate limit counts each run alone
            key = create_key(s, "bench")
        h = {"Authorization": f"Bearer {key}"}
        folder = Path(tempfile.mkdtemp(prefix="clapq-gone-", dir=blob_dir.parent))
        with wave.open(str(folder / "kept.wav"), "wb") as wav:  # the one file still there
            wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(8000), wav.writeframes(b"\0\1" * 800)
        name = f"gone-{n}-{way}-{rnd}"
        library, job = new_library(cur, tenant, model_id, name)
        ids = fill(cur, tenant, library, job, n, 1, name, folder_id(folder))
        fill(cur, tenant, library, job, 1, 1, name + "-kept", folder_id(folder))
        cur.execute("UPDATE items SET metadata = jsonb_set(metadata, '{path}', '\"kept.wav\"') "
                    "WHERE library_id = %s AND filename LIKE '%%-kept-%%'", (str(library),))
        cur.execute("SELECT sha256 FROM items WHERE library_id = %s", (str(library),))
        for (sha,) in cur.fetchall():  # the stored files, which the deletions remove
            p = store.path_for(sha)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"RIFF" + sha.encode())
        # each way from a settled database: the last way's dead rows vacuumed, its writes flushed
        cur.execute("VACUUM (ANALYZE) items, segments, embeddings, blob_reclaims")
        cur.execute("CHECKPOINT")
        t0 = time.perf_counter()
        said = ""
        if way == "http_delete_each":
            with requests.Session() as s:
                s.headers.update(h)
                for i in ids:
                    while (r := s.delete(f"{base}/v1/items/{i}", timeout=60)).status_code == 429:
                        time.sleep(float(r.headers.get("Retry-After", "1")))
                    assert r.status_code == 200, r.text
            requests_sent = n
        elif way == "http_deletions":
            with requests.Session() as s:
                s.headers.update(h)
                for lo in range(0, n, 1000):
                    r = s.post(f"{base}/v1/libraries/{library}/deletions", json={"item_ids": ids[lo:lo + 1000]},
                               timeout=600)
                    assert r.status_code == 200 and r.json()["deleted"]["items"] == len(ids[lo:lo + 1000]), r.text
            requests_sent = -(-n // 1000)
        else:
            root = old_cli if way == "cli_old" else ROOT
            p = subprocess.run([sys.executable, "-m", "clapq.cli", "delete", "--gone-from", str(folder), "--yes",
                                "--library", name, "--url", base, "--key", key],
                               env={**env, "PYTHONPATH": str(root)}, cwd=root, capture_output=True, text=True)
            assert p.returncode == 0 and p.stdout.count("\n") == n, (p.stdout[-500:], p.stderr[-2000:])
            said = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
            requests_sent = None
        wall = time.perf_counter() - t0
        cur.execute("SELECT count(*) FROM items WHERE library_id = %s", (str(library),))
        left = cur.fetchone()[0]
        assert left == 1, left
        rows.append({"files": n, "way": way, "round": rnd, "seconds": round(wall, 2), "requests": requests_sent,
                     "ms_per_file": round(wall / n * 1e3, 2), **({"cli_said": said} if said else {})})
        print(f"{n:>6} files, {way:<17} {wall:8.2f} s ({wall / n * 1e3:6.2f} ms a file)"
              + (f"  [{said}]" if said else ""), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--gone", default="500,5000", help="files gone from a folder, deleted each way ('' for none)")
    ap.add_argument("--ways", default=",".join(WAYS), help="which of them to time (cli_old needs --old-cli)")
    ap.add_argument("--rounds", type=int, default=1, help="times each way is timed")
    ap.add_argument("--old-cli", type=Path, help="a checkout of an earlier clapq, whose `clapq delete` is timed too")
    ap.add_argument("--transactions", default="", help="NxW,...: one deletion transaction of N files of W windows")
    ap.add_argument("--library-items", type=int, default=100_000, help="other files of the --transactions library")
    ap.add_argument("--rate-limit", default="1200/minute", help="CLAPQ_RATE_LIMIT of the API")
    ap.add_argument("--model", default=os.environ.get("CLAPQ_MODEL"), help="a CLAP checkpoint (the API checks it)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if not args.model:
        raise SystemExit("give --model or CLAPQ_MODEL: a CLAP checkpoint on disk")

    from benchmarks.search_scale import connect
    from clapq.db import dispose_engines, migrate, session_scope
    from clapq.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
    from clapq.keys import create_key

    work = Path(tempfile.mkdtemp(prefix="clapq-bulk-delete-"))
    pg, redis = EmbeddedPostgres(work / "pgdata"), EmbeddedRedis(work / "redis")
    url, api, result = pg.start(), None, {}
    try:
        redis_url = redis.start()
        migrate(url)
        conn = connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        for name, _ in hnsw_indexes(cur):
            cur.execute(f"DROP INDEX {name}")
        cur.execute("INSERT INTO models (name, weights_sha256, dim) VALUES ('synthetic', %s, 512) RETURNING id",
                    ("0" * 64,))
        model_id = cur.fetchone()[0]
        with session_scope(url) as s:  # the tenant (each run of --gone has a key of its own)
            create_key(s, "bench")
        cur.execute("SELECT id FROM tenants WHERE name = 'bench'")
        tenant = cur.fetchone()[0]
        specs = [tuple(int(x) for x in spec.split("x")) for spec in filter(None, args.transactions.split(","))]
        if specs:
            result["transactions"] = transactions(url, cur, tenant, model_id, specs, args.library_items)
        sizes = [int(x) for x in filter(None, args.gone.split(","))]
        if sizes:
            port, blob_dir = free_port(), work / "blobs"
            env = {k: v for k, v in os.environ.items() if not k.startswith("CLAPQ_")}
            env.update(DATABASE_URL=url, REDIS_URL=redis_url, CLAPQ_MODEL=args.model, CLAPQ_BLOB_DIR=str(blob_dir),
                       CLAPQ_HOST="127.0.0.1", CLAPQ_PORT=str(port), CLAPQ_PRELOAD_TEXT="0",
                       CLAPQ_RATE_LIMIT=args.rate_limit, HF_HUB_OFFLINE="1", CLAPQ_LOG_LEVEL="warning",
                       PYTHONPATH=str(ROOT))
            api = start_api(env, port, work / "api.log")
            result["gone"] = []
            for n in sizes:
                result["gone"] += gone_runs(cur, env, f"http://127.0.0.1:{port}", tenant, model_id, blob_dir, n,
                                            args.old_cli, args.ways.split(","), args.rounds)
        conn.close()
    finally:
        if api is not None:
            api.terminate()
            api.wait(60)
        dispose_engines()
        redis.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rate_limit": args.rate_limit,
              **result}
    save(f"bulk_delete{args.tag}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
