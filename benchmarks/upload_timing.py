"""Whether an upload, or the request after it on the same connection, tells that the bytes were stored already.

    python benchmarks/upload_timing.py --url http://127.0.0.1:8000 --key cq_... --mb 40 --trials 8

Stored files are shared by every tenant, so an upload of bytes another tenant holds must take the time an
upload of new bytes takes, and so must whatever the same connection asks next (helper-35, helper-37,
helper-38). Against a running API (`clapq up`), this alternates, on one keep-alive connection:
- new: MB of random bytes, uploaded into a fresh library;
- stored: MB of random bytes uploaded into one library first ("another tenant"), then the same bytes into a
  fresh library; the second upload is the one timed.
After each timed upload it sends GET /healthz on the same connection. Prints the medians and ranges of the
answer and of that GET, and writes JSON to benchmarks/results/upload_timing_<MB>[_TAG].json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.report import save, spread_ms, spread_text  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--mb", type=int, default=40)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    u = urllib.parse.urlsplit(args.url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
    auth = {"Authorization": f"Bearer {args.key}"}

    def call(method: str, path: str, body=None, headers=None) -> tuple[int, bytes]:
        conn.request(method, path, body, {**auth, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()

    def library() -> str:
        status, body = call("POST", "/v1/libraries", json.dumps({"name": f"timing-{uuid.uuid4().hex[:8]}"}),
                            {"Content-Type": "application/json"})
        assert status == 201 or status == 200, (status, body)
        return json.loads(body)["id"]

    def upload(lib: str, data: bytes) -> tuple[float, float]:
        b = uuid.uuid4().hex
        payload = (f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="x.wav"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
        conn.request("POST", f"/v1/libraries/{lib}/batches", payload,
                     {**auth, "Content-Type": f"multipart/form-data; boundary={b}"})
        t0 = time.perf_counter()
        r = conn.getresponse()
        r.read()
        t1 = time.perf_counter()
        assert r.status == 202, r.status
        status, _ = call("GET", "/healthz")
        assert status == 200
        return (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000

    got: dict[str, list[tuple[float, float]]] = {"new": [], "stored": []}
    for _ in range(args.trials):
        for kind in got:
            data = os.urandom(args.mb << 20)
            if kind == "stored":
                upload(library(), data)  # someone else stores them first
            got[kind].append(upload(library(), data))
    res = {"mb": args.mb, "trials": args.trials, "url": args.url}
    print(f"{args.mb} MB, {args.trials} alternated trials, one keep-alive connection: median (min-max) ms")
    for kind, rows in got.items():
        for i, what in enumerate(("answer", "next_get")):
            v = [r[i] for r in rows]
            res[f"{kind}_{what}"] = spread_ms(v, every=True)
            print(f"{kind:7} {what:9} {spread_text(res[f'{kind}_{what}'])}")
    save(f"upload_timing_{args.mb}{args.tag}.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
