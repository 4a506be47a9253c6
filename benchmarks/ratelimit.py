"""What counting a request against CLAPQ_RATE_LIMIT costs the API: `api.ratelimit`'s check, as every /v1
request runs it, against an embedded Redis (or REDIS_URL), beside a bare PING on the same connection.

    python benchmarks/ratelimit.py [--requests 3000] [--limit 1200/minute]

The key's window fills as it runs, so the later checks are those of a key near its limit (the moving
window's list holds up to the limit's count of timestamps); checks over the limit are timed too."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api import create_app  # noqa: E402
from api.errors import ApiError  # noqa: E402
from clapq.embedded import EmbeddedRedis  # noqa: E402
from clapq.queue import redis_client  # noqa: E402
from clapq.settings import Settings  # noqa: E402


def timed(fn, n: int) -> tuple[float, float]:
    """Milliseconds a call: wall, and this process's CPU."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e3, (time.process_time() - c0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--limit", default="1200/minute")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        url = os.environ.get("REDIS_URL")
        if not url:
            redis = EmbeddedRedis(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "redis")
            url = redis.start()
            stack.callback(redis.stop)
        # no database is reached: the check runs before any handler
        settings = Settings.from_env({"DATABASE_URL": "postgresql://unused/none", "REDIS_URL": url,
                                      "CLAPQ_RATE_LIMIT": args.limit})
        app = create_app(settings)
        limit = app.extensions["clapq_rate_limit"]
        ping = redis_client(app.extensions["clapq_celery"], quick=True)
        rows = []
        for rep in range(3):
            wall, cpu = timed(lambda i: ping.ping(), args.requests)
            rows.append({"what": "PING", "rep": rep, "calls": args.requests, "wall_ms": wall, "cpu_ms": cpu})
            key = f"bench-{os.getpid()}-{time.time_ns()}"  # a fresh key: its window fills, then it is refused
            spent = {"passed": [0, 0.0, 0.0], "refused": [0, 0.0, 0.0]}
            for _ in range(args.requests):
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    limit.check(key)
                    outcome = "passed"
                except ApiError:  # a second call reads when the window frees up, for Retry-After
                    outcome = "refused"
                s = spent[outcome]
                s[0] += 1
                s[1] += time.perf_counter() - t0
                s[2] += time.process_time() - c0
            for outcome, (n, wall, cpu) in spent.items():
                if n:
                    rows.append({"what": f"check, {outcome}", "rep": rep, "calls": n, "wall_ms": wall / n * 1e3,
                                 "cpu_ms": cpu / n * 1e3})
    print(f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}; "
          f"CLAPQ_RATE_LIMIT={args.limit}, {args.requests} checks of one key a round")
    print(f"{'call':18s} {'calls':>6s} {'wall ms':>8s} {'client CPU ms':>14s}")
    for r in rows:
        print(f"{r['what']:18s} {r['calls']:6d} {r['wall_ms']:8.3f} {r['cpu_ms']:14.3f}")
    out = Path(args.out or Path(__file__).parent / "results" / "ratelimit.json")
    out.write_text(json.dumps({"limit": args.limit, "requests": args.requests, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
