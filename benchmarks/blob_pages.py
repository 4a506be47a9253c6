"""What a blob's pages cost the machine when they stay in the page cache, against dropping them once the
decoder has read them, as clapq does (clapq.pagecache): the API writes each upload through the blob store
(64 KiB writes as werkzeug's parser hands them over, sha256, fsync, rename), and a decoder reads it
`--lag` files later, as a worker a little behind the uploads does. "kept" is the code before session 17;
"dropped" is the shipped code.

Each file is a distinct 1.76 MB (10 s of 44.1 kHz stereo 16-bit WAV). Prints wall, this process's CPU
and the whole machine's busy CPU per file (kernel threads included); alternates the ways in rounds,
since this VM drifts (the first way of each round changes). The blobs stay on disk until the end, as a
library's do: kept, their pages pile up in the page cache, which grows into free memory, as a running
service's does until memory is full; a VM whose host takes free memory back (free page reporting, as on
the project's CPU machine) then pays for every fresh page. (Deleting them between ways would free pages
that the next way reuses cheaply, whichever it is.)

    python benchmarks/blob_pages.py [--dir DIR] [--n 200] [--lag 48] [--rounds 3] [--tag _s17]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scratch_write import timed_per_file  # noqa: E402
from clapq import blobs  # noqa: E402
from clapq.pagecache import drop_cached  # noqa: E402

SIZE = 1_764_000
CHUNK = 64 * 1024


def run_way(root: Path, way: str, n: int, lag: int, seed: int) -> dict:
    """`n` new blobs into a store under `root`, each read `lag` files later and then dropped or kept."""
    store = blobs.BlobStore(root / f"{way}-{seed}")
    data = bytearray(np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8).tobytes())
    pending: list[Path] = []

    def read(path: Path) -> None:  # the decoder: one read of the whole file, then its drop
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        if way == "dropped":
            drop_cached(path)

    def run() -> None:
        for i in range(n):
            data[:8] = (seed * 1_000_000 + i).to_bytes(8, "little")  # distinct bytes, distinct blobs
            w = store.writer()
            view = memoryview(data)
            for k in range(0, SIZE, CHUNK):
                w.write(view[k : k + CHUNK])
            pending.append(store.path_for(w.commit()))
            if len(pending) > lag:
                read(pending.pop(0))
        for path in pending:
            read(path)

    return timed_per_file(n, run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "clapq-blob-pages"),
                    help="where the blob stores go (default: under the temp directory)")
    ap.add_argument("--n", type=int, default=200, help="files per way per round")
    ap.add_argument("--lag", type=int, default=48, help="files written before the first is read")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="", help="added to the results file's name")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for r in range(args.rounds):
            for way in ("kept", "dropped")[:: 1 if r % 2 == 0 else -1]:
                m = run_way(root, way, args.n, args.lag, seed=2 * r + (way == "dropped"))
                rows.append({"round": r + 1, "way": way, **m})
                print(f"round {r + 1}  {way:<8} wall {m['wall_ms']:5.2f} ms  this process "
                      f"{m['process_cpu_ms']:5.2f} CPU-ms  machine {m['machine_busy_ms']:5.2f} CPU-ms  per file")
    finally:
        shutil.rmtree(root)
    for way in ("kept", "dropped"):
        busy = [row["machine_busy_ms"] for row in rows if row["way"] == way]
        print(f"{way:<8} machine CPU-ms per file: mean {np.mean(busy):.2f} (rounds {', '.join(f'{b:.2f}' for b in busy)})")
    print(f"{args.n} files of {SIZE / 1e6:.2f} MB per way and round, read {args.lag} files behind, in {root}")
    out = ROOT / "benchmarks" / "results" / f"blob_pages{args.tag}_{platform.node()}.json"
    out.write_text(json.dumps({"dir": str(root), "n": args.n, "lag": args.lag, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
