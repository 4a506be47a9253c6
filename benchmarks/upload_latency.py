"""Latency of one-file upload requests against a running service (`make up`), as a client that sends
each file on its own sees it (curl in a loop, a plugin); `clapq upload` sends 128 files a request.

    python benchmarks/upload_latency.py --file some.wav [--n 150] [--url URL] [--key KEY] [--tag NAME]

Each request sends the file with 16 random bytes appended, so every one is new bytes (stored, and
queued for the worker, which runs beside the requests as it would in use). The first `--warmup`
requests are left out. Prints the median and p90 and, with --tag, writes
benchmarks/results/upload_latency_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import requests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path, required=True)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--url", default=os.environ.get("CLAPQ_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--key", default=os.environ.get("CLAPQ_API_KEY"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    if not args.key:
        raise SystemExit("pass --key or set CLAPQ_API_KEY (the key `make up` printed)")
    h = {"Authorization": f"Bearer {args.key}"}
    with requests.Session() as http:
        lib = http.post(f"{args.url}/v1/libraries", json={"name": f"upload-latency-{time.time_ns()}"}, headers=h,
                        timeout=60)
        lib.raise_for_status()
        data, secs = args.file.read_bytes(), []
        for i in range(args.n):
            t0 = time.perf_counter()
            r = http.post(f"{args.url}/v1/libraries/{lib.json()['id']}/batches", headers=h, timeout=60,
                          files={"files": (f"{i:05d}{args.file.suffix}", data + os.urandom(16))})
            secs.append(time.perf_counter() - t0)
            r.raise_for_status()
    kept = sorted(secs[args.warmup:])
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cpu", "file_bytes": len(data) + 16,
           "requests": len(kept), "median_ms": 1000 * statistics.median(kept),
           "p90_ms": 1000 * kept[int(0.9 * (len(kept) - 1))]}
    print(f"one-file uploads of {out['file_bytes']} bytes: median {out['median_ms']:.2f} ms, "
          f"p90 {out['p90_ms']:.2f} ms over {out['requests']} requests")
    if args.tag:
        path = Path(__file__).parent / "results" / f"upload_latency_{args.tag}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
