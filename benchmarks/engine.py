"""Engine throughput, three ways in one run on one machine, with the full-size default CLAP (random weights).

  raw        the model's batched forward on precomputed features (the ceiling)
  reference  what a user writes by hand: ClapProcessor + ClapModel, one file at a time, one INSERT per file
  pipeline   the worker's engine in this process (decoder children, full batches, log-mel + model on the
             device), vectors collected instead of written: no HTTP, queue or database (optional)
  clapq      upload through the HTTP API -> worker -> vectors in Postgres, first upload byte to job `done`
             (the jobs' last finished_at: when the last item was written, Postgres now(); the benchmark
             polls once a second, as `clapq upload --wait` does, so its requests take no CPU from the worker)

The three are timed in turn, `--rounds` times, on one warm service (the model loaded once in this
process, the worker and API started once), so each round's ratios compare runs a few seconds apart;
the summary is the median of the rounds. Prints a table, clapq/raw and clapq/reference, peak RSS of
API and worker, and writes JSON to benchmarks/results/engine_<host>.json.
Usage: python benchmarks/engine.py --clips 48 --rounds 3
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clapq.settings import ATTENTIONS  # noqa: E402


def build_full_model(path: Path) -> Path:
    """The default ClapConfig (HTSAT-tiny audio tower + RoBERTa-base text tower), random weights."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    from tests.tinyclap import _tokenizer

    if (path / "model.safetensors").exists():
        return path
    torch.manual_seed(0)
    model = ClapModel(ClapConfig()).eval()
    model.save_pretrained(path)
    fe = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")
    ClapProcessor(feature_extractor=fe, tokenizer=_tokenizer()).save_pretrained(path)
    return path


def _write_clip(path: Path, i: int, rate: int) -> None:
    t = np.arange(10 * rate) / rate
    noise = np.random.default_rng(i).standard_normal((t.size, 2))
    x = 0.3 * np.sin(2 * np.pi * (80 + 13 * i) * t)[:, None] + 0.05 * noise
    sf.write(str(path), x.astype(np.float32), rate, subtype="PCM_16")


def make_clips(n: int, rate: int = 44_100) -> list[Path]:
    """10 s stereo clips at 44.1 kHz (so every path pays for a resample, as real libraries do), written
    once on all cores and kept between runs (1,024 take 30 s on one core: device time on a lent GPU)."""
    folder = Path(tempfile.gettempdir()) / f"clapq-bench-clips-{n}-{rate}"
    out = [folder / f"clip{i:04d}.wav" for i in range(n)]
    if not (folder / "complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        with cf.ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write_clip, out, range(n), [rate] * n, chunksize=8))
        (folder / "complete").touch()
    return out


def _tree(pid: int) -> list:
    """A process and its living descendants (none if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_peak_mb(pid: int) -> float:
    """VmHWM of a process and all its descendants' largest (the pool child holds the model)."""
    best = 0.0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return best


def _until_quiet(cpu_seconds, busy: float, timeout: float) -> None:
    """Until `cpu_seconds()` grows by less than `busy` a second for two seconds running, or `timeout`."""
    deadline, quiet = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and quiet < 2:
        t0 = cpu_seconds()
        time.sleep(1.0)
        quiet = quiet + 1 if cpu_seconds() - t0 < busy else 0


def pids_cpu_s(pids) -> float:
    """CPU seconds used so far by these processes (utime + stime from /proc; a gone one counts 0). No
    psutil, which the GPU machine's image may lack (raw and pipeline run there)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its living descendants."""
    return pids_cpu_s(p.pid for p in _tree(pid))


def proc_cpu_s(pids=()) -> float:
    """CPU seconds of this process (all its threads) and of `pids`."""
    return time.process_time() + pids_cpu_s(pids)


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, timeout: float = 300) -> None:
    """Until a process tree stops using CPU (the API processes preload their text towers at start)."""
    _until_quiet(lambda: tree_cpu_s(pid), 0.1, timeout)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Raw:
    """The model's batched forward on precomputed features, loaded once and timed as often as asked:
    on the device, in the precision, compiled or not and in as many lanes as the worker (clapq.precision,
    worker.embedder.lanes_for): the audio tower, projection and normalisation of AudioEmbedder."""

    def __init__(self, model_dir: Path, batch: int, device: torch.device, precision: str, compiled: bool,
                 lanes: int, attention: str = "sdpa") -> None:
        from transformers import ClapFeatureExtractor

        from clapq.checkpoint import resolve
        from clapq.clap import get_clap
        from worker.embedder import AudioEmbedder

        self.embedder = AudioEmbedder(get_clap(resolve(str(model_dir)), str(device), precision, attention=attention),
                                      compile_model=compiled, lanes=lanes)
        fe = ClapFeatureExtractor.from_pretrained(model_dir)
        self.device, self.batch = device, batch
        rng = np.random.default_rng(1)
        self.feats = fe([rng.standard_normal(480_000).astype(np.float32) * 0.1 for _ in range(batch)],
                        sampling_rate=48_000, return_tensors="pt")["input_features"].to(device)
        for _ in range(1 if device.type == "cpu" else 3):  # warm-up (GPU: kernel selection)
            self.embedder.embed_features(self.feats)
        _sync(device)

    def run(self, n: int) -> dict:
        cpu0, t0 = proc_cpu_s(), time.perf_counter()
        done = 0
        while done < n:
            self.embedder.embed_features(self.feats)  # ends with the vectors on the host: synchronised
            done += self.batch
        secs = time.perf_counter() - t0
        return {"clips": done, "seconds": secs, "clips_per_s": done / secs,
                "cpu_ms_per_clip": 1000 * (proc_cpu_s() - cpu0) / done}


class Pipeline:
    """The worker's engine in this process, without HTTP, queue or database: decoder children read
    ahead, windows are packed into full batches, log-mel and audio tower run on the device; vectors
    are collected, not written. What is left of clapq/raw once the service's own costs are taken out,
    and runnable where no Postgres or Redis is (the GPU machine: numpy, torch, transformers, soundfile
    and soxr are all it needs)."""

    def __init__(self, model_dir: Path, batch: int, device: torch.device, precision: str, decoders: int,
                 compiled: bool, lanes: int, attention: str = "sdpa") -> None:
        from clapq.checkpoint import resolve
        from clapq.clap import get_clap
        from worker.decoder import DecoderPool
        from worker.embedder import AudioEmbedder

        self.embedder = AudioEmbedder(get_clap(resolve(str(model_dir)), str(device), precision, attention=attention),
                                      compile_model=compiled, lanes=lanes)
        self.embedder.embed(np.zeros((batch, self.embedder.window_samples), np.float32))  # warm-up
        self.pool = DecoderPool(decoders)
        self.pool.warm()
        self.batch = batch

    def run(self, clips: list[Path], scratch: Path) -> dict:
        import types
        import uuid

        from worker import pipeline

        files = {f"{i:064x}": p for i, p in enumerate(clips)}  # the blob store's sha256 -> path, for these files
        blobs = types.SimpleNamespace(path_for=files.__getitem__)
        # what the pipeline reads of a claimed item (worker.store.Claimed), without its database import
        items = [types.SimpleNamespace(id=uuid.uuid4(), sha256=sha, job_id=None, filename=None) for sha in files]
        done: list = []

        def failed(d) -> None:
            raise RuntimeError(f"{d.item.sha256}: {d.error}")

        scratch.mkdir(parents=True, exist_ok=True)
        opts = pipeline.Options(batch_size=self.batch, scratch_dir=scratch)
        children = [d.proc.pid for d in self.pool._free.queue if d.alive()]  # warm, and restarted only on a crash
        cpu0, t0 = proc_cpu_s(children), time.perf_counter()  # this process and its decoder children
        pipeline.run(items, blobs, self.pool, self.embedder, opts, done.extend, failed)
        secs = time.perf_counter() - t0
        assert len(done) == len(clips), (len(done), len(clips))
        return {"clips": len(clips), "seconds": secs, "clips_per_s": len(clips) / secs,
                "cpu_ms_per_clip": 1000 * (proc_cpu_s(children) - cpu0) / len(clips)}

    def close(self) -> None:
        self.pool.close()


QUIET_TIMEOUT_S = 120.0


def wait_quiet() -> None:
    """Until the whole machine is idle for two seconds running (after a run, Postgres and the service
    finish their own work: autovacuum, acks, the last polls), so no path is timed beside another's tail;
    at most QUIET_TIMEOUT_S (--quiet-timeout)."""
    _until_quiet(machine_cpu_s, max(0.15, 0.03 * (os.cpu_count() or 1)), QUIET_TIMEOUT_S)


def bench_speedups(model_dir: Path, batch: int, reps: int = 3) -> dict:
    """CPU variants of the audio tower against fp32 eager: clips/s and the worst cosine to eager."""
    import copy

    from transformers import ClapFeatureExtractor, ClapModel

    fe = ClapFeatureExtractor.from_pretrained(model_dir)
    base = ClapModel.from_pretrained(model_dir).eval()
    rng = np.random.default_rng(2)
    feats = fe([rng.standard_normal(480_000).astype(np.float32) * 0.1 for _ in range(batch)],
               sampling_rate=48_000, return_tensors="pt")["input_features"]

    def run(fn):
        with torch.inference_mode():
            out = fn(feats)  # warm-up (and compilation)
            t0 = time.perf_counter()
            for _ in range(reps):
                out = fn(feats)
            secs = (time.perf_counter() - t0) / reps
        v = getattr(out, "pooler_output", out).float()
        return torch.nn.functional.normalize(v, dim=-1), batch / secs

    ref, eager_cps = run(lambda x: base.get_audio_features(input_features=x))
    out = {"eager_fp32": {"clips_per_s": eager_cps, "min_cosine": 1.0}}

    def variant(name, fn):
        try:
            v, cps = run(fn)
            out[name] = {"clips_per_s": cps, "min_cosine": float((v * ref).sum(-1).min())}
        except Exception as exc:  # a variant this torch build cannot do is reported, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return base.get_audio_features(input_features=x)

    variant("autocast_bf16", bf16)
    half = copy.deepcopy(base).to(torch.bfloat16)  # what CLAPQ_PRECISION=bf16 (auto where native) loads
    variant("bf16_weights", lambda x: half.get_audio_features(input_features=x.to(torch.bfloat16)))
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    variant("channels_last", lambda x: cl.get_audio_features(input_features=x.contiguous(
        memory_format=torch.channels_last)))
    q = copy.deepcopy(base)
    q.audio_model = torch.ao.quantization.quantize_dynamic(q.audio_model, {torch.nn.Linear}, dtype=torch.qint8)
    q.audio_projection = torch.ao.quantization.quantize_dynamic(q.audio_projection, {torch.nn.Linear},
                                                                dtype=torch.qint8)
    variant("int8_dynamic_linear", lambda x: q.get_audio_features(input_features=x))
    def compiled(model, dtype):  # what CLAPQ_COMPILE=1 runs: the audio tower compiled, the projection eager
        tower = torch.compile(model.audio_model)
        return lambda x: model.audio_projection(tower(input_features=x.to(dtype)).pooler_output)

    variant("torch_compile", compiled(copy.deepcopy(base), torch.float32))
    variant("bf16_weights_compile", compiled(half, torch.bfloat16))
    # the window attention through torch's fused kernel, as the loader sets it up (CLAPQ_ATTENTION=sdpa)
    from clapq.clap import use_fused_attention

    fused, fused_half = copy.deepcopy(base), copy.deepcopy(half)
    if use_fused_attention(fused.audio_model) and use_fused_attention(fused_half.audio_model):
        variant("fused_attention_fp32", lambda x: fused.get_audio_features(input_features=x))
        variant("fused_attention_bf16", lambda x: fused_half.get_audio_features(input_features=x.to(torch.bfloat16)))
        variant("fused_attention_fp32_compile", compiled(fused, torch.float32))
        variant("fused_attention_bf16_compile", compiled(fused_half, torch.bfloat16))
    return out


def bench_reference(model_dir: Path, clips: list[Path], db_url: str, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> dict:
    """Hand-written: one file at a time through ClapProcessor + ClapModel (`.to(device)`, fp32, as
    the model card shows; or in `dtype`, to compare at equal arithmetic), one INSERT per file."""
    import psycopg2
    import soxr
    from transformers import ClapModel, ClapProcessor

    processor = ClapProcessor.from_pretrained(model_dir)
    model = ClapModel.from_pretrained(model_dir).eval().to(device, dtype=dtype)
    conn = psycopg2.connect(db_url.replace("postgresql+psycopg2", "postgresql"))
    with conn, conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS vector; DROP TABLE IF EXISTS ref_vectors; "
                    "CREATE TABLE ref_vectors (name text primary key, v vector(512))")
    t0 = time.perf_counter()
    for p in clips:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
        audio = soxr.resample(data.mean(axis=1), rate, 48_000, quality="HQ")
        inputs = processor(audio=audio, sampling_rate=48_000, truncation="rand_trunc", padding="repeatpad",
                           return_tensors="pt")
        with torch.inference_mode():
            out = model.get_audio_features(**{k: v.to(device, dtype=dtype if v.is_floating_point() else None)
                                              for k, v in inputs.items()})
        v = getattr(out, "pooler_output", out)[0].float().cpu().numpy()
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO ref_vectors VALUES (%s, %s)", (p.name, "[" + ",".join(map(str, v)) + "]"))
    secs = time.perf_counter() - t0
    conn.close()
    return {"clips": len(clips), "seconds": secs, "clips_per_s": len(clips) / secs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`clapq worker` + `clapq api` on the embedded Postgres and Redis, started once for every timed run."""

    def __init__(self, model_dir: Path, db_url: str, redis_url: str, work: Path, batch_size: int,
                 device: torch.device, precision: str, decoders: int, items_per_task: int,
                 api_workers: int = 1, compiled: bool = False, claim_for_s: int | None = None,
                 worker_nice: int | None = None, lanes: int = 1, attention: str = "sdpa") -> None:
        self.db_url, self.redis_url, self.work = db_url, redis_url, work
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAPQ_")}
        port = _free_port()
        env.update(DATABASE_URL=db_url, REDIS_URL=redis_url, CLAPQ_MODEL=str(model_dir), CLAPQ_DATA_DIR=str(work),
                   CLAPQ_BLOB_DIR=str(work / "blobs"), CLAPQ_BATCH_SIZE=str(batch_size),
                   CLAPQ_ITEMS_PER_TASK=str(items_per_task), CLAPQ_PORT=str(port), CLAPQ_HOST="127.0.0.1",
                   CLAPQ_API_WORKERS=str(api_workers), HF_HUB_OFFLINE="1", CLAPQ_LOG_LEVEL="WARNING",
                   CLAPQ_DEVICE=str(device), CLAPQ_PRECISION=precision, CLAPQ_DECODERS=str(decoders),
                   CLAPQ_COMPILE="1" if compiled else "0", CLAPQ_LANES=str(lanes),
                   CLAPQ_ATTENTION=attention)
        if claim_for_s is not None:
            env["CLAPQ_CLAIM_FOR_S"] = str(claim_for_s)
        if worker_nice is not None:
            env["CLAPQ_WORKER_NICE"] = str(worker_nice)
        self.env, self.base = env, f"http://127.0.0.1:{port}"
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Service":
        cli = [sys.executable, "-m", "clapq.cli"]
        self.logs = open(self.work / "clapq.log", "ab")
        try:
            for cmd in ("worker", "api"):
                self.procs.append(subprocess.Popen(cli + [cmd], env=self.env, stdout=self.logs,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
            self.worker, self.api = self.procs
            self._ready()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _ready(self) -> None:
        import requests

        from clapq.db import session_scope
        from clapq.keys import create_key

        with session_scope(self.db_url) as s:
            self.key = create_key(s, f"bench-{time.time_ns()}")
        self.headers = {"Authorization": f"Bearer {self.key}"}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # API up and a worker with the model loaded
            try:
                if requests.get(self.base + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("the service stopped while starting")
            time.sleep(0.5)
        # the pool child loads (and warms, and maybe compiles) the model after the worker reports ready,
        # and each API process preloads its text tower: wait for both once, before the first run
        wait_idle(self.worker.pid)
        wait_idle(self.api.pid)

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # the service's own account, before the work folder goes
            self.logs.flush()
            print((self.work / "clapq.log").read_text(errors="replace")[-6000:], file=sys.stderr)
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        self.logs.close()

    def run(self, clips: list[Path], per_upload: int = 32, upload_threads: int = 1) -> dict:
        """Upload `clips` into a new library and time first upload byte -> the last item written."""
        import requests

        wait_quiet()
        base, h = self.base, self.headers
        lib = requests.post(base + "/v1/libraries", json={"name": f"bench-{time.time_ns()}"}, headers=h,
                            timeout=300).json()

        from clapq.client import Client, multipart_body, watch_jobs

        def post(chunk: list[Path]) -> str:
            with multipart_body(chunk[0].parent, chunk) as body:  # streamed from disk, as `clapq upload` does
                r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", data=body, timeout=600,
                                  headers={**h, "Content-Type": body.content_type})
            r.raise_for_status()
            return r.json()["job_id"]

        def cpu_now() -> dict:
            return {"api": tree_cpu_s(self.api.pid), "worker": tree_cpu_s(self.worker.pid), "machine": machine_cpu_s()}

        def model_s() -> float:  # the workers' own account of time in model batches (clapq.metrics)
            import redis

            from clapq.metrics import KEY

            return float(redis.Redis.from_url(self.redis_url).hget(KEY, "batch_seconds_sum") or 0)

        chunks = [clips[i : i + per_upload] for i in range(0, len(clips), per_upload)]
        model0, cpu0 = model_s(), cpu_now()
        wall0, t0 = time.time(), time.perf_counter()
        # one request at a time on a CPU; a GPU consumes clips faster than one client sends them
        with cf.ThreadPoolExecutor(max_workers=upload_threads) as pool:
            jobs = list(pool.map(post, chunks))
        uploaded = time.perf_counter() - t0
        # as `clapq upload` waits (one job a second); the clock stops at the last item's finished_at
        states = watch_jobs(Client(base, self.key), jobs)
        assert all(s["status"] == "done" for s in states), states
        # where the cores went, per clip (up to a second of idle polling after the end is included)
        cpu = {k: v - cpu0[k] for k, v in cpu_now().items()}
        cpu["other"] = cpu["machine"] - cpu["api"] - cpu["worker"]  # Postgres, Redis, this client, the OS
        last = max(datetime.datetime.fromisoformat(s["finished_at"]).timestamp() for s in states)
        secs = last - wall0
        # the model's share of the wall time (the rest: waiting for decoded files, task hand-overs, the
        # first upload), and its batch time, which is raw's where nothing else competes for the cores
        model = model_s() - model0
        return {"clips": len(clips), "seconds": secs, "clips_per_s": len(clips) / secs, "upload_seconds": uploaded,
                "model_busy": model / secs, "model_ms_per_clip": 1000 * model / len(clips),
                "cpu_ms_per_clip": {k: 1000 * v / len(clips) for k, v in cpu.items()},
                "worker_peak_rss_mb": rss_peak_mb(self.worker.pid), "api_peak_rss_mb": rss_peak_mb(self.api.pid)}


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def main() -> None:
    global QUIET_TIMEOUT_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3,
                    help="raw, reference and clapq are timed this many times, in turn, on one warm service; "
                         "the ratios are each round's, summarised by their median (this VM drifts by 10%%)")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "clapq-bench-full-clap")
    ap.add_argument("--only", default="raw,reference,clapq")
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    ap.add_argument("--files-per-upload", type=int, default=32, help="files per batch upload (one job each)")
    ap.add_argument("--items-per-task", type=int, default=None,
                    help="files per Celery task (default as the service: CLAPQ_ITEMS_PER_TASK's default, the batch)")
    ap.add_argument("--device", default=os.environ.get("CLAPQ_DEVICE", "auto"),
                    help="cpu, cuda, ... (default $CLAPQ_DEVICE or auto): raw, reference and the worker use it")
    ap.add_argument("--precision", default=os.environ.get("CLAPQ_PRECISION", "auto"),
                    help="auto, fp32, bf16, fp16 (default $CLAPQ_PRECISION or auto, as the worker): raw, pipeline "
                         "and the worker use it")
    ap.add_argument("--attention", choices=ATTENTIONS, default=os.environ.get("CLAPQ_ATTENTION", "sdpa"),
                    help="the audio tower's window attention (CLAPQ_ATTENTION; default as the worker: sdpa, torch's "
                         "fused kernel; eager: transformers' own code): raw, pipeline and the worker alike")
    ap.add_argument("--reference-precision", choices=("fp32", "same"), default="fp32",
                    help="fp32: the reference as the model card writes it (default); same: in --precision, "
                         "to see what the engine gains at equal arithmetic")
    ap.add_argument("--decoders", type=int, default=None,
                    help="decoder children per worker (default as `clapq worker`: 2 on a CPU, all cores but one "
                         "on a GPU)")
    ap.add_argument("--compile", choices=("auto", "1", "0"), default=None,
                    help="the audio tower compiled (CLAPQ_COMPILE; default as the worker: auto, which compiles on "
                         "a CPU in fp32): raw, pipeline and the worker alike")
    ap.add_argument("--api-workers", type=int, default=None,
                    help="API processes (CLAPQ_API_WORKERS; default 1 on a CPU, a quarter of the cores on a GPU)")
    ap.add_argument("--upload-threads", type=int, default=None,
                    help="concurrent upload requests (default 1 on a CPU, 4 on a GPU)")
    ap.add_argument("--claim-for-s", type=int, default=None,
                    help="CLAPQ_CLAIM_FOR_S for the worker (default as the service, auto: its tasks go on "
                         "claiming later tasks' files for 10 s on a GPU, 0 s on a CPU; 0: only to fill their last batch)")
    ap.add_argument("--worker-nice", type=int, default=None,
                    help="CLAPQ_WORKER_NICE for the worker (default as the service: 19, so that ingest yields "
                         "the CPU to searches; 0 leaves it at the API's and Postgres's priority)")
    ap.add_argument("--lanes", type=int, default=None,
                    help="model passes side by side (CLAPQ_LANES) in raw, pipeline and the worker; default: the worker's auto")
    ap.add_argument("--quiet-timeout", type=float, default=QUIET_TIMEOUT_S,
                    help="longest wait for an idle machine before each timed path, seconds")
    args = ap.parse_args()
    from clapq.malloc import keep_freed_memory, torch_huge_pages

    # raw, pipeline and the reference in this process allocate as the worker does (clapq.malloc): the
    # ceiling is measured with the same allocator settings as the service (torch reads the huge-page
    # switch at its first allocation, not at import)
    kept, huge = keep_freed_memory(), torch_huge_pages()
    # a time limit's SIGTERM unwinds the stack, so the service's processes (their own sessions) stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.items_per_task = args.items_per_task or args.batch
    QUIET_TIMEOUT_S = args.quiet_timeout
    from clapq.precision import compile_applies, cpu_has_bf16, dtype_name, pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.precision)
    from clapq.settings import Settings

    asked = (Settings.from_env({"CLAPQ_COMPILE": os.environ.get("CLAPQ_COMPILE", "")}).compile_model
             if args.compile is None else {"auto": None, "1": True, "0": False}[args.compile])
    compiled = compile_applies(asked, device, dtype)
    if compiled and device.type == "cpu" and not (shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++")):
        print("no C++ compiler: the tower runs eager (as the worker would after its warning)", file=sys.stderr)
        compiled = False
    from worker.embedder import THREADS, lanes_for

    lanes = lanes_for(args.lanes, device, compiled, args.batch, THREADS)
    ref_dtype = dtype if args.reference_precision == "same" else torch.float32
    gpu = device.type == "cuda"
    from worker.decoder import pool_size

    decoders = pool_size(args.decoders or 0, device.type)  # what `clapq worker` (one process) would start
    upload_threads = args.upload_threads or (4 if gpu else 1)
    # receiving a 10 s WAV costs the API ~6 ms of CPU (parse, hash, write): a GPU's 1,000 clips/s needs
    # several API processes; on a 2-core CPU one is plenty
    api_workers = args.api_workers or (max(2, (os.cpu_count() or 2) // 4) if gpu else 1)
    model_dir = build_full_model(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="clapq-bench-"))
    os.chmod(work, 0o755)
    clips = make_clips(args.clips)
    results: dict = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu "
                                f"(native bf16: {'yes' if cpu_has_bf16() else 'no'}), torch "
                                f"{torch.__version__}, threads {torch.get_num_threads()}"
                                + (f", {torch.cuda.get_device_name(device)}" if gpu else ""),
                     "device": str(device), "precision": dtype_name(dtype), "compiled": compiled, "lanes": lanes,
                     "attention": args.attention,
                     "reference_precision": dtype_name(ref_dtype), "decoders": decoders, "upload_threads": upload_threads,
                     "api_workers": api_workers, "items_per_task": args.items_per_task,
                     "claim_for_s": "auto" if args.claim_for_s is None else args.claim_for_s,
                     "worker_nice": Settings.from_env({}).worker_nice if args.worker_nice is None else args.worker_nice,
                     "clips": args.clips, "batch": args.batch, "clip_seconds": 10, "keeps_freed_memory": kept, "huge_pages": huge,
                     "rounds": []}
    paths = [p for p in ("raw", "pipeline", "reference", "clapq") if p in args.only.split(",")]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)  # last out: clips, blobs and the databases
        db_url = redis_url = None
        if {"reference", "clapq"} & set(paths):  # Postgres and Redis only where a path writes
            from clapq.db import migrate
            from clapq.embedded import EmbeddedPostgres, EmbeddedRedis

            pg, redis = EmbeddedPostgres(work / "pg"), EmbeddedRedis(work / "redis")
            db_url = pg.start()
            stack.callback(pg.stop)
            redis_url = redis.start()
            stack.callback(redis.stop)
            migrate(db_url)
        if "speedups" in args.only.split(","):
            results["speedups"] = bench_speedups(model_dir, args.batch)
        raw = Raw(model_dir, args.batch, device, args.precision, compiled, lanes, args.attention) if "raw" in paths else None
        engine = (Pipeline(model_dir, args.batch, device, args.precision, decoders, compiled, lanes, args.attention)
                  if "pipeline" in paths else None)
        if engine is not None:
            stack.callback(engine.close)
        service = (stack.enter_context(Service(model_dir, db_url, redis_url, work, args.batch, device,
                                               args.precision, decoders, args.items_per_task, api_workers,
                                               compiled, args.claim_for_s, args.worker_nice, lanes,
                                               args.attention))
                   if "clapq" in paths else None)
        for r in range(args.rounds if paths else 0):
            one: dict = {}
            if raw is not None:
                wait_quiet()
                one["raw"] = raw.run(args.clips)
            if engine is not None:
                wait_quiet()
                one["pipeline"] = engine.run(clips, work / "scratch")
                if "raw" in one:
                    one["pipeline_over_raw"] = one["pipeline"]["clips_per_s"] / one["raw"]["clips_per_s"]
            if "reference" in paths:
                wait_quiet()
                one["reference"] = bench_reference(model_dir, clips, db_url, device, ref_dtype)
            if service is not None:
                one["clapq"] = service.run(clips, args.files_per_upload, upload_threads)
                for name in ("raw", "reference"):
                    if name in one:
                        one[f"clapq_over_{name}"] = one["clapq"]["clips_per_s"] / one[name]["clips_per_s"]
            results["rounds"].append(one)
            if "clapq" in one:
                c = one["clapq"]
                print(f"  clapq: model busy {c['model_busy']:.0%} of the time, {c['model_ms_per_clip']:.1f} ms a "
                      "clip in model batches" + (f" (raw: {1000 / one['raw']['clips_per_s']:.1f})" if "raw" in one else ""))
            print(f"round {r + 1}: " + "  ".join(
                f"{k} {v['clips_per_s']:.2f} clips/s" + (f" ({v['cpu_ms_per_clip']:.0f} CPU-ms/clip)"
                                                        if isinstance(v.get("cpu_ms_per_clip"), float) else "")
                if isinstance(v, dict) else f"{k} {v:.2f}" for k, v in one.items()), flush=True)
    rounds = results["rounds"]
    print(f"\n{results['machine']}; {args.clips} clips of 10 s, batch {args.batch}, {len(rounds)} rounds; "
          f"model in {results['precision']}{' compiled' if compiled else ''}, reference in "
          f"{results['reference_precision']} eager")
    if paths:
        print(f"{'path':<10} {'median clips/s':>15} {'min':>7} {'max':>7}")
    for name in paths:
        cps = [one[name]["clips_per_s"] for one in rounds]
        results[name] = {"clips_per_s": _median(cps), "min": min(cps), "max": max(cps)}
        print(f"{name:<10} {_median(cps):>15.2f} {min(cps):>7.2f} {max(cps):>7.2f}")
    for name, v in results.get("speedups", {}).items():
        print(f"  cpu variant {name:<22} " + (f"{v['clips_per_s']:6.2f} clips/s  min cos {v['min_cosine']:.5f}"
                                              if "error" not in v else v["error"]))
    if {"raw", "pipeline"} <= set(paths):
        ratios = [one["pipeline_over_raw"] for one in rounds]
        results["pipeline_over_raw"] = _median(ratios)
        print(f"pipeline/raw: median {_median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    if "clapq" in paths:
        for name in ("raw", "reference"):
            if name in paths:
                ratios = [one[f"clapq_over_{name}"] for one in rounds]
                results[f"clapq_over_{name}"] = _median(ratios)
                print(f"clapq/{name}: median {_median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        last = rounds[-1]["clapq"]
        print(f"upload (all requests returned) after {_median([o['clapq']['upload_seconds'] for o in rounds]):.1f} s")
        print(f"peak RSS: worker {last['worker_peak_rss_mb']:.0f} MB, api {last['api_peak_rss_mb']:.0f} MB")
        per = {k: _median([o["clapq"]["cpu_ms_per_clip"][k] for o in rounds]) for k in last["cpu_ms_per_clip"]}
        print("CPU ms per clip in clapq: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items()))
    out = ROOT / "benchmarks" / "results" / f"engine{args.tag}_{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
