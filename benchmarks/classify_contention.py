"""How long a text search waits behind a classify of many new labels on an API process's model thread.

    python benchmarks/classify_contention.py [--model-dir DIR] [--labels 200] [--rounds 5] [--per-call 200,64,16]

Each API process runs its model on one thread (api.query.on_model_thread). A classify of 200 labels no one
has asked for before embeds all 200; a search's one text that arrives meanwhile queues behind that work.
This loads the full-size default CLAP text tower (random weights, built by engine.py) in this process,
starts a classify's labels through api.query.embed_in_turns with each --per-call size (200: one turn,
the behaviour before session 30), and 0.2 s later one query text; it reports the query's latency and the
labels' total time, medians over the rounds (each round with labels of its own). Prints a table and writes
JSON to benchmarks/results/classify_contention.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import build_full_model  # noqa: E402
from benchmarks.report import MACHINE, save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "clapq-bench-full-clap")
    ap.add_argument("--labels", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-call", default="200,64,16")
    args = ap.parse_args()
    import torch

    from api.query import embed_in_turns, on_model_thread
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap

    clap = get_clap(resolve(str(build_full_model(args.model_dir))), "cpu", text_only=True)
    embed_in_turns(clap, ["warm-up", "a second warm-up text"])
    words = ["rain", "door", "engine", "choir", "thunder", "footsteps", "kettle", "crowd", "wind", "bell"]
    out = {"machine": f"{MACHINE}, torch {torch.__version__}, {torch.get_num_threads()} threads",
           "labels": args.labels, "by_per_call": {}}
    print(f"{args.labels} new labels, then one query 0.2 s later; medians of {args.rounds} rounds")
    print(f"{'texts a turn':>12} {'query waits ms':>15} {'labels take s':>14}")
    for per_call in [int(x) for x in args.per_call.split(",")]:
        waits, totals = [], []
        for r in range(args.rounds):
            labels = [f"{words[i % 10]} {words[(i // 10) % 10]} take {r} {per_call} {i}" for i in range(args.labels)]
            done = {}

            def classify():
                t0 = time.perf_counter()
                embed_in_turns(clap, labels, per_call)
                done["s"] = time.perf_counter() - t0

            t = threading.Thread(target=classify)
            t.start()
            time.sleep(0.2)
            t0 = time.perf_counter()
            on_model_thread(clap.embed_text, [f"a dog barking far away {r} {per_call}"])
            waits.append((time.perf_counter() - t0) * 1000)
            t.join()
            totals.append(done["s"])
        row = {"query_ms": statistics.median(waits), "labels_s": statistics.median(totals),
               "query_ms_all": waits, "labels_s_all": totals}
        out["by_per_call"][per_call] = row
        print(f"{per_call:>12} {row['query_ms']:>15.0f} {row['labels_s']:>14.2f}")
    save("classify_contention.json", out, indent=2)


if __name__ == "__main__":
    main()
