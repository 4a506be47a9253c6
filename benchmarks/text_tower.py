"""The API's text tower on a CPU: fp32, bf16 (CLAPQ_PRECISION) and int8 dynamic quantisation
(CLAPQ_TEXT_INT8=1).

    python benchmarks/text_tower.py [--model-dir DIR] [--queries 40]

Loads the full-size default CLAP text tower (RoBERTa-base, random weights, built by engine.py) three
times through the production loader, fp32, bf16 and int8, and times one-query embeddings (tokenizer +
get_text_features + normalisation: what an uncached text search pays) in alternation, so all see the
same machine. Reports p50/p95 ms per query and the worst cosine of each tower's vectors to fp32's.
Prints a table and writes JSON to benchmarks/results/text_tower_<host>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import build_full_model  # noqa: E402

WORDS = ("dog barking rain thunder engine idling crowd cheering violin solo glass breaking footsteps "
         "on gravel birds at dawn a door slams heavy traffic wind through trees church bells baby "
         "laughing typing on a keyboard distant siren ocean waves a cat purring").split()


def queries(n: int) -> list[str]:
    """n distinct short captions, 2 to 8 words, the length of real search queries."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) + f" {i}" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "clapq-bench-full-clap")
    ap.add_argument("--queries", type=int, default=40)
    args = ap.parse_args()

    import torch

    from clapq.checkpoint import resolve
    from clapq.clap import LoadedClap

    ckpt = resolve(str(build_full_model(args.model_dir)))
    towers = {p: LoadedClap(ckpt, "cpu", p, text_only=True) for p in ("fp32", "bf16")}
    towers["int8"] = LoadedClap(ckpt, "cpu", "fp32", text_only=True, text_int8=True)
    texts = queries(args.queries)
    for tower in towers.values():  # warm-up
        tower.embed_text(texts[:2])
    ms: dict[str, list[float]] = {name: [] for name in towers}
    vecs: dict[str, list[np.ndarray]] = {name: [] for name in towers}
    for t in texts:
        for name, tower in towers.items():
            t0 = time.perf_counter()
            v = tower.embed_text([t])
            ms[name].append((time.perf_counter() - t0) * 1000)
            vecs[name].append(v[0])
    from clapq.precision import cpu_has_bf16

    out = {"machine": f"{platform.node()} {platform.machine()} (native bf16: {'yes' if cpu_has_bf16() else 'no'}), "
                      f"torch {torch.__version__}, threads {torch.get_num_threads()}",
           "queries": len(texts)}
    print(f"{out['machine']}; {len(texts)} one-text queries, alternating towers")
    print(f"{'tower':<6} {'p50 ms':>8} {'p95 ms':>8} {'x fp32':>7} {'min cos':>8} {'mean cos':>9}")
    for name, xs in ms.items():
        xs = sorted(xs)
        cos = (np.stack(vecs["fp32"]) * np.stack(vecs[name])).sum(1)
        out[name] = {"p50_ms": statistics.median(xs), "p95_ms": xs[int(0.95 * (len(xs) - 1))],
                     "min_cosine_to_fp32": float(cos.min()), "mean_cosine_to_fp32": float(cos.mean())}
        out[name]["speedup_p50"] = out["fp32"]["p50_ms"] / out[name]["p50_ms"]
        print(f"{name:<6} {out[name]['p50_ms']:>8.1f} {out[name]['p95_ms']:>8.1f} {out[name]['speedup_p50']:>7.2f} "
              f"{cos.min():>8.5f} {cos.mean():>9.5f}")
    path = ROOT / "benchmarks" / "results" / f"text_tower_{platform.node()}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
