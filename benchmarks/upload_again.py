"""What `clapq upload` reads to run again on a folder with nothing new: the sha256 of every file, which it asks
the library about. Each file read (as every run did before clapq.digests), against the digests kept from a run
before (a stat and a SQLite look-up a file). The folder's pages are dropped from the page cache first
(posix_fadvise DONTNEED on each file), as for a folder last read a day before.

    python benchmarks/upload_again.py --files 256 --mb 8 --out benchmarks/results/upload_again_vm.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from clapq import digests as d
from clapq.blobs import file_sha256


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=256)
    ap.add_argument("--mb", type=float, default=8.0, help="size of each file")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        size = int(args.mb * 1e6)
        paths = []
        for i in range(args.files):
            p = folder / f"{i:05d}.wav"
            p.write_bytes(os.urandom(64) + bytes(size - 64))
            paths.append(p)
        d.SETTLE_S = 0.0  # the files were just written: kept at once here
        cache = Path(tmp) / "digests.sqlite3"
        out = {"files": args.files, "mb_each": args.mb, "total_mb": args.files * size / 1e6}
        evict(paths)
        t = time.perf_counter()
        every = [file_sha256(p) for p in paths]
        out["read_every_file_s"] = round(time.perf_counter() - t, 3)
        first = d.Digests(cache)
        evict(paths)
        t = time.perf_counter()
        assert [first(p) for p in paths] == every
        first.close()
        out["first_run_with_cache_s"] = round(time.perf_counter() - t, 3)
        evict(paths)
        again = d.Digests(cache)
        t = time.perf_counter()
        assert [again(p) for p in paths] == every
        again.close()
        out["run_again_s"] = round(time.perf_counter() - t, 3)
    print(json.dumps(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
