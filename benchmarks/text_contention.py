"""How much a busy audio model slows the API's text tower on the same CPU, by the model's nice level.

    python benchmarks/text_contention.py [--model-dir DIR] [--queries 20]

Loads the full-size default CLAP text tower (random weights, built by engine.py) in this process
and times one-query embeddings (tokenizer + get_text_features), first on an idle machine, then
while a child process runs the audio tower on full batches of 16 windows non-stop (what
`clapq worker` does during ingest) at nice 0, 10 and 19. This isolates CPU sharing from the rest
of ingest (decoding, Postgres writes); benchmarks/search_http.py measures the whole service.
Prints a table and writes JSON to benchmarks/results/text_contention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import build_full_model  # noqa: E402

BUSY = """
import os, sys
os.nice({nice})
sys.path.insert(0, {root!r})
import numpy as np
from clapq.checkpoint import resolve
from clapq.clap import get_clap
from worker.embedder import AudioEmbedder
e = AudioEmbedder(get_clap(resolve({model!r}), "cpu"))
x = (np.random.default_rng(0).standard_normal((16, e.window_samples)) * 0.1).astype(np.float32)
e.embed(x)
print("busy", flush=True)
while True:
    e.embed(x)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "clapq-bench-full-clap")
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    import torch

    from clapq.checkpoint import resolve
    from clapq.clap import get_clap

    model_dir = build_full_model(args.model_dir)
    clap = get_clap(resolve(str(model_dir)), "cpu", text_only=True)
    clap.embed_text(["warm-up"])

    def median_ms(tag: str) -> float:
        times = []
        for i in range(args.queries):
            t0 = time.perf_counter()
            clap.embed_text([f"a dog barking far away, take {i} {tag}"])
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    out = {"machine": f"{os.cpu_count()} cpu, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "idle_ms": median_ms("idle"), "busy_ms_by_nice": {}}
    print(f"text tower, one query, idle: {out['idle_ms']:.1f} ms (median of {args.queries})")
    for nice in (0, 10, 19):
        busy = subprocess.Popen([sys.executable, "-c", BUSY.format(nice=nice, root=str(ROOT), model=str(model_dir))],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            busy.stdout.readline()
            time.sleep(2)
            ms = median_ms(f"nice{nice}")
        finally:
            busy.kill()
            busy.wait()
        out["busy_ms_by_nice"][nice] = ms
        print(f"  with the audio model busy at nice {nice:>2}: {ms:6.1f} ms ({ms / out['idle_ms']:.2f}x idle)")
    dest = ROOT / "benchmarks" / "results" / "text_contention.json"
    dest.write_text(json.dumps(out, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
