"""What writing a decoded clip to the worker's scratch file costs, opened as decode_to_file opens it
(no O_TRUNC) against a truncating open ("wb", as before session 8), in the scratch directory's filesystem,
and against one kept file overwritten each time (what reusing scratch files would save; session 16).

Each try does what the worker and its decoder do with one file: mkstemp, the write of 10 s at 48 kHz
float32 (1.92 MB), the read back, unlink. Prints wall and this process's CPU per file, and the whole
machine's busy CPU per file from /proc/stat (the kernel's writeback threads included); alternates the
two ways in rounds, since this VM drifts.

    python benchmarks/scratch_write.py [--dir DIR] [--n 200] [--rounds 3] [--tag _s16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = np.random.default_rng(0).standard_normal(480_000).astype(np.float32).tobytes()


def machine_busy_s() -> float:
    """Seconds of CPU the whole machine has spent busy (not idle, not waiting on I/O) since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


WAYS = {"wb": "O_TRUNC (wb)", "plain": "no O_TRUNC", "kept": "kept, rewritten"}


def one_file(directory: str, way: str) -> None:
    if way == "kept":  # the same file each time, its pages in the page cache already: never unlinked
        path = os.path.join(directory, "decoded-kept.f32")
    else:
        fd, path = tempfile.mkstemp(prefix="decoded-", suffix=".f32", dir=directory)
        os.close(fd)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if way == "wb" else 0)
    with open(os.open(path, flags, 0o600), "wb") as out:
        out.write(SAMPLES)
    np.fromfile(path, np.float32)
    if way != "kept":
        os.unlink(path)


def timed_per_file(n: int, run) -> dict:
    """Wall, this process's CPU and the machine's busy CPU per file of `run()`, which handles `n` files;
    a second's pause before (earlier writeback settles) and after (writeback its last files started is
    counted)."""
    time.sleep(1)
    wall, cpu, busy = time.perf_counter(), process_cpu_s(), machine_busy_s()
    run()
    wall = time.perf_counter() - wall
    time.sleep(1)
    cpu, busy = process_cpu_s() - cpu, machine_busy_s() - busy
    return {"wall_ms": 1e3 * wall / n, "process_cpu_ms": 1e3 * cpu / n, "machine_busy_ms": 1e3 * busy / n}


def measure(directory: str, way: str, n: int) -> dict:
    one_file(directory, way)

    def run() -> None:
        for _ in range(n):
            one_file(directory, way)

    return timed_per_file(n, run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "clapq-scratch"),
                    help="where to write (default: the worker's default scratch directory)")
    ap.add_argument("--n", type=int, default=200, help="files per way per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="", help="added to the results file's name")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    where = os.path.realpath(args.dir)
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    fs = max(((m, t) for m, t in mounts if where == m or where.startswith(m.rstrip("/") + "/")),
             key=lambda mt: len(mt[0]), default=(None, None))[1]
    rows = []
    for r in range(args.rounds):
        for way, label in WAYS.items():
            m = measure(args.dir, way, args.n)
            rows.append({"round": r + 1, "open": label, **m})
            print(f"round {r + 1}  {label:<15} wall {m['wall_ms']:5.2f} ms  this process "
                  f"{m['process_cpu_ms']:5.2f} CPU-ms  machine {m['machine_busy_ms']:5.2f} CPU-ms  per file")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(args.dir, "decoded-kept.f32"))
    print(f"{args.n} files of 1.92 MB per way and round in {args.dir}" + (f" ({fs})" if fs else ""))
    out = ROOT / "benchmarks" / "results" / f"scratch_write{args.tag}_{platform.node()}.json"
    out.write_text(json.dumps({"dir": args.dir, "n": args.n, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
