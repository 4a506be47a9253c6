"""How a model pass's size changes its cost a window: the full-size audio tower on one thread, passes of 1, 2, 4,
8, 16 windows (rows), in fp32 and, where the CPU multiplies it natively, bf16.

    python benchmarks/pass_rows.py [--rounds 5] [--rows 1,2,4,8,16]

Why: with CLAPQ_LANES=auto a CPU worker runs one one-thread pass per core, each taking CLAPQ_BATCH_SIZE / lanes
windows; on a machine of many cores a pass takes few windows. The full-size default CLAP (random weights) is
loaded through the production loader (default CLAPQ_ATTENTION) and timed as a lane runs it
(`AudioEmbedder._tower` on precomputed log-mel, torch on one thread). Sizes take turns round by round, so a
machine whose speed drifts moves them alike. Prints ms a window per size and writes
benchmarks/results/pass_rows[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import build_full_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--windows", type=int, default=32, help="windows timed a size a round (a multiple of each size)")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/clapq-bench-full-clap"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]

    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from clapq.malloc import keep_freed_memory, torch_huge_pages
    from clapq.precision import cpu_has_bf16
    from worker.embedder import AudioEmbedder

    keep_freed_memory(), torch_huge_pages()  # as the worker allocates
    torch.set_num_threads(1)  # as one lane runs
    ckpt = resolve(str(build_full_model(args.model_dir)))
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    embedders = {p: AudioEmbedder(get_clap(ckpt, "cpu", p)) for p in precisions}
    first = next(iter(embedders.values()))
    rng = np.random.default_rng(1)
    mel = first.features((rng.standard_normal((max(sizes), first.window_samples)) * 0.1).astype(np.float32))
    ms: dict[str, dict[int, list[float]]] = {p: {n: [] for n in sizes} for p in precisions}
    for p, emb in embedders.items():  # warm-up
        for n in sizes:
            emb._tower(mel[:n])
    for _ in range(args.rounds):
        for p, emb in embedders.items():
            for n in sizes:
                passes = max(1, args.windows // n)
                t0 = time.perf_counter()
                for _ in range(passes):
                    emb._tower(mel[:n])
                ms[p][n].append(1000 * (time.perf_counter() - t0) / (passes * n))
    machine = (f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu (native bf16: "
               f"{'yes' if cpu_has_bf16() else 'no'}), torch {torch.__version__}, one thread")
    print(f"{machine}; full-size audio tower, {args.rounds} rounds alternated; ms a window (median, min-max)")
    for p in precisions:
        base = float(np.median(ms[p][max(sizes)]))
        for n in sizes:
            xs = ms[p][n]
            print(f"{p:<6}{n:>4} rows {np.median(xs):>8.1f}  ({min(xs):.1f}-{max(xs):.1f})"
                  f"  x{np.median(xs) / base:.2f} of {max(sizes)} rows")
    out = ROOT / "benchmarks" / "results" / f"pass_rows{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rounds": args.rounds, "ms_a_window": ms}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
