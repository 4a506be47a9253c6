"""Whether storing an upload's bytes takes longer when the store holds them already.

    python benchmarks/blob_commit.py --mb 40 --trials 12

The blob store is shared by every tenant. If committing bytes already stored takes a different time
than committing new ones, an upload's answer tells a tenant that another tenant holds that file
(helper-35, helper-37). This writes MB of random bytes through `BlobWriter` as the API does (64 KiB
writes, hashed as they come), then commits them, alternating:
- new: bytes the store does not hold;
- again: the same bytes as the trial before, already stored. The replaced copy is released after the
  commit, as the API releases it once its answer is sent (`release` is timed apart).

Each commit is timed from the first write to the end of `commit()`, which is what an upload's answer
waits for. Prints medians and ranges, and writes JSON to benchmarks/results/blob_commit_<MB>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import MACHINE, save, spread_ms, spread_text  # noqa: E402
from clapq.blobs import BlobStore  # noqa: E402

CHUNK = 64 << 10


def store_once(store: BlobStore, data: bytes) -> tuple[float, float]:
    """(ms until committed, ms to release the copy it replaced)."""
    t0 = time.perf_counter()
    w = store.writer()
    for i in range(0, len(data), CHUNK):
        w.write(data[i:i + CHUNK])
    w.commit()
    t1 = time.perf_counter()
    getattr(w, "release", lambda: None)()  # code before session 23 (a worktree, for the "before" figures) has none
    return (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=40)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--dir", default=None, help="where the store lives (default: a temp dir, on the disk of /tmp)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="clapq-blob-commit-", dir=args.dir))
    store = BlobStore(root)
    got: dict[str, list[float]] = {"new": [], "again": [], "release_again": []}
    try:
        store_once(store, os.urandom(args.mb << 20))  # warm-up
        for _ in range(args.trials):
            data = os.urandom(args.mb << 20)
            ms, _ = store_once(store, data)
            got["new"].append(ms)
            ms, rel = store_once(store, data)
            got["again"].append(ms)
            got["release_again"].append(rel)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {"mb": args.mb, "trials": args.trials, "machine": MACHINE,
           **{k: spread_ms(v, every=True) for k, v in got.items()}}
    print(f"{args.mb} MB, {args.trials} alternated trials: median (min-max) ms")
    for k in got:
        print(f"{k:14} {spread_text(res[k])}")
    save(f"blob_commit_{args.mb}.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
