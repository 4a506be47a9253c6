"""Memory bounds: API RSS while it receives a multi-GB upload, worker RSS on a 2-hour file.

  python benchmarks/memory.py --upload-gb 2 --hours 2 [--full-model DIR] [--max-worker-s 300]

The worker case embeds with the full-size default CLAP (random weights, built by engine.py) and can
be capped in time: peak RSS is reached within the first batches and stays flat while the file
streams (decoded audio lives in a scratch file, not in memory). Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import _free_port, build_full_model, rss_peak_mb, wait_idle  # noqa: E402


def rss_mb(pid: int) -> float:
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return sum(p.memory_info().rss for p in procs) / 2**20


def api_upload(env: dict, gb: float, work: Path) -> dict:
    import requests

    from clapq.db import session_scope
    from clapq.keys import create_key

    port = _free_port()
    env = dict(env, CLAPQ_PORT=str(port), CLAPQ_HOST="127.0.0.1", CLAPQ_API_WORKERS="1",
               CLAPQ_MAX_REQUEST_BYTES=str(int((gb + 1) * 2**30)), CLAPQ_MAX_FILE_BYTES=str(int((gb + 1) * 2**30)))
    api = subprocess.Popen([sys.executable, "-m", "clapq.cli", "api"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                requests.get(base + "/healthz", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        with session_scope(env["DATABASE_URL"]) as s:
            key = create_key(s, f"mem-{time.time_ns()}")
        h = {"Authorization": f"Bearer {key}"}
        lib = requests.post(base + "/v1/libraries", json={"name": "mem"}, headers=h, timeout=120).json()
        wait_idle(api.pid)  # the API process preloads its text tower at start; measure after that
        before = rss_mb(api.pid)
        chunk = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
        total = int(gb * 1024)
        peak = [before]

        def body():
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="huge.wav"\r\n\r\n'
            for i in range(total):
                if i % 64 == 0:
                    peak.append(rss_mb(api.pid))
                yield chunk[:-8] + i.to_bytes(8, "little")
            yield b"\r\n--b--\r\n"

        t0 = time.perf_counter()
        r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", data=body(), timeout=3600,
                          headers={**h, "Content-Type": "multipart/form-data; boundary=b"})
        secs = time.perf_counter() - t0
        peak.append(rss_mb(api.pid))
        return {"upload_mb": total, "status": r.status_code, "seconds": secs, "api_rss_before_mb": before,
                "api_rss_peak_mb": max(peak), "api_rss_growth_mb": max(peak) - before}
    finally:
        os.killpg(api.pid, signal.SIGKILL)
        api.wait()


def worker_long_file(model_dir: Path, hours: float, work: Path, max_s: float) -> dict:
    """The worker's embedding pipeline on one long file, in a child we can measure and stop."""
    path = work / "long.wav"
    with sf.SoundFile(str(path), "w", samplerate=44_100, channels=2, subtype="PCM_16") as f:
        t = np.arange(44_100 * 60) / 44_100
        block = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)], 1)
        for _ in range(int(hours * 60)):
            f.write(block.astype(np.float32))
    script = f"""
import sys, uuid, time
from pathlib import Path
from clapq.malloc import keep_freed_memory, torch_huge_pages
keep_freed_memory()  # as the worker's pool child does before it loads the model
torch_huge_pages()
from clapq.blobs import BlobStore
from clapq.checkpoint import resolve
from clapq.clap import get_clap
from worker import pipeline
from worker.decoder import get_pool
from worker.embedder import THREADS, AudioEmbedder, lanes_for
from worker.store import Claimed
blobs = BlobStore({str(work / 'blobs')!r})
w = blobs.writer()
with open({str(path)!r}, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
        w.write(block)
sha = w.commit()
clap = get_clap(resolve({str(model_dir)!r}), "cpu")
emb = AudioEmbedder(clap, lanes=lanes_for(None, clap.device, False, 16, THREADS))  # the worker's auto lanes
n = [0]
def on_batch(k, secs):
    n[0] += k
    print("windows", n[0], flush=True)
pipeline.run([Claimed(uuid.uuid4(), sha, None, 1)], blobs, get_pool(2), emb,
             pipeline.Options(batch_size=16, scratch_dir=Path({str(work)!r})),
             lambda fin: print("done", len(fin[0][1]), flush=True), lambda d: sys.exit(d.error), on_batch)
"""
    log = work / "long.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    t0 = time.monotonic()
    samples = []
    while proc.poll() is None and time.monotonic() - t0 < max_s:
        samples.append(rss_mb(proc.pid))
        time.sleep(1)
    lines = log.read_text().splitlines()
    windows = max([int(x.split()[1]) for x in lines if x.startswith("windows")] or [0])
    finished = any(x.startswith("done") for x in lines) and proc.returncode == 0
    peak = rss_peak_mb(proc.pid) if proc.poll() is None else max(samples or [0])
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    total = len(__import__("worker.windows", fromlist=["spans"]).spans(int(hours * 3600 * 48_000), 48_000,
                                                                        480_000, 240_000))
    return {"hours": hours, "windows_total": total, "windows_embedded": windows, "finished": finished,
            "seconds": time.monotonic() - t0, "worker_peak_rss_mb": max(peak, max(samples or [0])),
            "rss_first_minute_mb": max(samples[:60] or [0]), "rss_last_minute_mb": max(samples[-60:] or [0])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upload-gb", type=float, default=2.0)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--max-worker-s", type=float, default=300)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "clapq-bench-full-clap")
    ap.add_argument("--only", default="api,worker", help="api: the 2 GB upload; worker: the long file")
    args = ap.parse_args()
    from clapq.db import migrate
    from clapq.embedded import EmbeddedPostgres, EmbeddedRedis

    model_dir = build_full_model(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="clapq-mem-"))
    os.chmod(work, 0o755)
    pg, redis = EmbeddedPostgres(work / "pg"), EmbeddedRedis(work / "redis")
    out = {}
    try:
        db_url, redis_url = pg.start(), redis.start()
        migrate(db_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAPQ_")}
        env.update(DATABASE_URL=db_url, REDIS_URL=redis_url, CLAPQ_MODEL=str(model_dir),
                   CLAPQ_BLOB_DIR=str(work / "blobs"), HF_HUB_OFFLINE="1", CLAPQ_LOG_LEVEL="WARNING")
        if "api" in args.only:
            out["api_upload"] = api_upload(env, args.upload_gb, work)
            print(json.dumps(out["api_upload"], indent=1), flush=True)
        if "worker" in args.only:
            out["worker_long_file"] = worker_long_file(model_dir, args.hours, work, args.max_worker_s)
            print(json.dumps(out["worker_long_file"], indent=1), flush=True)
    finally:
        redis.stop()
        pg.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    dest = ROOT / "benchmarks" / "results" / f"memory_{args.only.replace(',', '_')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
