"""The audio tower's window attention: transformers' own code (eager) against torch's fused kernel (sdpa).

    python benchmarks/attention.py [--rounds 7] [--batch 16] [--compiled]

The full-size default CLAP (random weights), loaded through the production loader with CLAPQ_ATTENTION's
two values, timed as the worker runs it (`AudioEmbedder.embed_features` on precomputed log-mel, in the
worker's lanes), in fp32 and, where the CPU multiplies it natively, bf16; `--compiled` adds both compiled
in fp32 (what CLAPQ_COMPILE=auto runs there). The variants take turns round by round, so a machine whose
speed drifts (a shared VM) moves them alike: the ratios are each round's. Prints a table and writes
benchmarks/results/attention[_TAG].json.
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
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/clapq-bench-full-clap"))
    ap.add_argument("--compiled", action="store_true", help="also both attentions compiled, in fp32")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from clapq.malloc import keep_freed_memory, torch_huge_pages
    from clapq.precision import cpu_has_bf16
    from worker.embedder import THREADS, AudioEmbedder, lanes_for

    keep_freed_memory(), torch_huge_pages()  # as the worker allocates
    ckpt = resolve(str(build_full_model(args.model_dir)))
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    variants: dict[str, AudioEmbedder] = {}
    for precision in precisions:
        for attention in ("eager", "sdpa"):
            clap = get_clap(ckpt, "cpu", precision, attention=attention)
            assert clap.attention == attention, (clap.attention, attention)
            lanes = lanes_for(None, clap.device, False, args.batch, THREADS)
            variants[f"{precision} {attention}"] = AudioEmbedder(clap, lanes=lanes)
            if args.compiled and precision == "fp32":
                variants[f"{precision} {attention} compiled"] = AudioEmbedder(clap, compile_model=True)
    rng = np.random.default_rng(1)
    first = next(iter(variants.values()))
    mel = first.features((rng.standard_normal((args.batch, first.window_samples)) * 0.1).astype(np.float32))
    vectors, first_pass_s = {}, {}
    for name, emb in variants.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        vectors[name] = emb.embed_features(mel)
        first_pass_s[name] = time.perf_counter() - t0
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, emb in variants.items():
            t0 = time.perf_counter()
            emb.embed_features(mel)
            emb.embed_features(mel)
            speeds[name].append(2 * args.batch / (time.perf_counter() - t0))

    def median(xs):
        return float(np.median(xs))

    rows = {}
    for name in variants:
        base = name.replace("sdpa", "eager")
        row = {"clips_per_s": speeds[name], "median": median(speeds[name]), "first_pass_s": first_pass_s[name],
               "min_cosine_to_eager": float(np.min(np.sum(vectors[name] * vectors[base], axis=1)))}
        if base != name:
            row["over_eager"] = [s / e for s, e in zip(speeds[name], speeds[base])]
        rows[name] = row
    machine = (f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu (native bf16: "
               f"{'yes' if cpu_has_bf16() else 'no'}), torch {torch.__version__}, threads {THREADS}")
    print(f"{machine}; full-size tower, batch {args.batch}, {args.rounds} rounds alternated")
    print(f"{'variant':<24}{'median clips/s':>16}{'min':>8}{'max':>8}{'sdpa/eager (median)':>22}{'min cos':>10}")
    for name, r in rows.items():
        ratio = f"{median(r['over_eager']):.2f}" if "over_eager" in r else "-"
        print(f"{name:<24}{r['median']:>16.2f}{min(r['clips_per_s']):>8.2f}{max(r['clips_per_s']):>8.2f}"
              f"{ratio:>22}{r['min_cosine_to_eager']:>10.6f}")
    out = ROOT / "benchmarks" / "results" / f"attention{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "batch": args.batch, "rounds": args.rounds, "variants": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
