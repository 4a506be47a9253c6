"""What waiting on Postgres through clapq's wait callback costs a statement.

    python benchmarks/db_wait.py --statements 5000 --rounds 6

Since session 26 psycopg2 waits through `clapq.db._wait` (a Postgres that stops answering mid-statement is
asked whether it answers at all, and given up if not), where libpq waited in C. This times, on an embedded
Postgres over its Unix socket, through the service's own engine (`clapq.db.get_engine`), rounds of small
statements (`SELECT 1`) and of a larger result (10,000 rows of a 512-float vector's size), alternating the
callback and libpq's own wait in every round, and prints the medians and the difference per statement.

Prints a table and writes JSON to benchmarks/results/db_wait.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import MACHINE, save  # noqa: E402

BIG = "SELECT g, repeat('x', 2048) FROM generate_series(1, 10000) g"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--statements", type=int, default=5000, help="SELECT 1 per round and way")
    ap.add_argument("--big", type=int, default=20, help="large results per round and way")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    from psycopg2 import extensions as ext
    from sqlalchemy import text

    from clapq import db
    from clapq.embedded import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="clapq-db-wait-"))
    pg = EmbeddedPostgres(tmp / "pgdata")
    out: dict = {"machine": MACHINE, "statements": args.statements, "big": args.big, "rounds": args.rounds,
                 "small_us": {"callback": [], "libpq": []}, "big_ms": {"callback": [], "libpq": []}}
    try:
        url = pg.start()
        with db.get_engine(url).connect() as conn:  # get_engine installs the callback
            for r in range(args.rounds):
                for way in (("callback", "libpq") if r % 2 == 0 else ("libpq", "callback")):
                    ext.set_wait_callback(db._wait if way == "callback" else None)
                    t0 = time.perf_counter()
                    for _ in range(args.statements):
                        conn.execute(text("SELECT 1")).all()
                    out["small_us"][way].append((time.perf_counter() - t0) / args.statements * 1e6)
                    t0 = time.perf_counter()
                    for _ in range(args.big):
                        conn.execute(text(BIG)).all()
                    out["big_ms"][way].append((time.perf_counter() - t0) / args.big * 1e3)
            ext.set_wait_callback(db._wait)
            out["postgres"] = conn.connection.dbapi_connection.server_version
    finally:
        db.dispose_engines()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for key in ("small_us", "big_ms"):
        out[key] = {way: {"median": round(statistics.median(v), 2), "all": [round(x, 2) for x in v]}
                    for way, v in out[key].items()}
    small, big = out["small_us"], out["big_ms"]
    print(f"\n{'':26} {'callback':>10} {'libpq':>10} {'difference':>11}")
    print(f"{'SELECT 1, µs a statement':26} {small['callback']['median']:10.2f} {small['libpq']['median']:10.2f} "
          f"{small['callback']['median'] - small['libpq']['median']:+11.2f}")
    print(f"{'10,000 rows (20 MB), ms':26} {big['callback']['median']:10.2f} {big['libpq']['median']:10.2f} "
          f"{big['callback']['median'] - big['libpq']['median']:+11.2f}")
    save("db_wait.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
