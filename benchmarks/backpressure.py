"""What the upload's backlog check costs, with a large backlog.

    python benchmarks/backpressure.py --items 1000000 --pending 200000

Every upload request first counts the files waiting to be embedded (queued or running), all of them,
against CLAPQ_MAX_PENDING, and since session 23, where that count reaches CLAPQ_MAX_PENDING_PER_TENANT,
the caller's own too (api/batches.py `backpressure`). The backlog is bounded by that check, so the
counts read at most about CLAPQ_MAX_PENDING rows. This loads ITEMS rows into an embedded Postgres
migrated as the service's is, PENDING of them waiting (a heavy tenant holding most, 3 others the rest),
and times the whole count (all the API runs below a tenant's share), one statement counting both at
once, and the caller's own count alone, for a light tenant and the heavy one; and, on the same table,
the count of every item by state that each /metrics scrape runs; and the bounded count of the caller's
own that picks the lane of an upload's tasks (session 26), for a light, the heavy and an idle tenant (one
with 5% more items, all embedded, nothing waiting), with migration 0012's index of each tenant's waiting
files and without it; and (session 38) the count of files parked for a worker of another model, which a
fourth tenant's waiting files are.

Prints a table and writes JSON to benchmarks/results/backpressure_<ITEMS>.json.
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
from benchmarks.search_scale import connect, log  # noqa: E402
from clapq.models import IN_BULK_LANE, WAITING_FOR_MODEL  # noqa: E402

WHOLE = "SELECT count(*) FROM items WHERE status IN ('queued', 'running')"
BOTH = ("SELECT count(*), count(*) FILTER (WHERE tenant_id = %(t)s) FROM items "
        "WHERE status IN ('queued', 'running')")
# since session 38, files parked for a worker of another model are left out of the caller's own, and counted on
# their own (ix_items_no_message) to be taken from the whole where it reaches a bound
PARKED_AS = f"'{WAITING_FOR_MODEL}'"
OWN = ("SELECT count(*) FROM items WHERE status IN ('queued', 'running') AND tenant_id = %(t)s "
       f"AND (claimed_by IS NULL OR claimed_by != {PARKED_AS})")
PARKED = f"SELECT count(*) FROM items WHERE status = 'queued' AND claimed_by = {PARKED_AS}"
# which lane an upload's tasks go in (clapq.queue.first_lane_room, since session 43; api/db.py lane_room before):
# the caller's files waiting, counted up to 4 tasks of 16 and the upload's own 32, files parked for a worker of
# another model left out, and of those how many are marked as in the bulk lane
LANE = (f"SELECT count(*), count(*) FILTER (WHERE claimed_by = '{IN_BULK_LANE}') FROM (SELECT claimed_by FROM items "
        f"WHERE status IN ('queued', 'running') AND tenant_id = %(t)s AND (claimed_by IS NULL OR claimed_by != "
        f"{PARKED_AS}) LIMIT 96) AS waiting")
# what each /metrics scrape runs (api/metrics.py), on the same table: every item, by state
BY_STATE = "SELECT status, count(*) FROM items GROUP BY status"
QUERIES = {"whole": (WHOLE, None), "both_light_tenant": (BOTH, 1), "both_heavy_tenant": (BOTH, 0),
           "own_light_tenant": (OWN, 1), "own_heavy_tenant": (OWN, 0), "lane_light_tenant": (LANE, 1),
           "lane_heavy_tenant": (LANE, 0), "lane_idle_tenant": (LANE, 4), "parked": (PARKED, None),
           "metrics_by_state": (BY_STATE, None)}

LANE_NAMES = [name for name, (sql, _) in QUERIES.items() if sql is LANE]


def timed(cur, sql: str, params: dict, rounds: int) -> dict:
    ms = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        cur.execute(sql, params)
        cur.fetchall()
        ms.append((time.perf_counter() - t0) * 1000)
    cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
    plan = [r[0] for r in cur.fetchall()]
    return {"p50_ms": round(statistics.median(ms), 2), "max_ms": round(max(ms), 2), "plan": plan}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--pending", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()

    from clapq.db import migrate
    from clapq.embedded import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="clapq-backpressure-"))
    pg = EmbeddedPostgres(tmp / "pgdata")
    try:
        url = pg.start()
        migrate(url)
        conn = connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("INSERT INTO models (name, weights_sha256, dim) VALUES ('m', repeat('0', 64), 512) RETURNING id")
            model = cur.fetchone()[0]
            tenants = []
            for i in range(5):
                cur.execute("INSERT INTO tenants (id, name) VALUES (gen_random_uuid(), %s) RETURNING id", (f"t{i}",))
                tenant = cur.fetchone()[0]
                cur.execute("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (gen_random_uuid(), %s, 'l', %s) "
                            "RETURNING id", (tenant, model))
                lib = cur.fetchone()[0]
                cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (gen_random_uuid(), %s, %s, "
                            "'upload') RETURNING id", (tenant, lib))
                tenants.append((tenant, lib, cur.fetchone()[0]))
            # tenant 0 is the heavy one: 85% of the backlog and of the library; the next three share the rest;
            # tenant 4, idle, has 5% more items, all embedded, and nothing waiting
            t0 = time.perf_counter()
            for i, (tenant, lib, job) in enumerate(tenants):
                share = 0.85 if i == 0 else 0.05
                n, waiting = int(args.items * share), (0 if i == 4 else int(args.pending * share))
                cur.execute(
                    "INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, status, "
                    "created_at, updated_at) SELECT gen_random_uuid(), %(t)s, %(l)s, %(j)s, "
                    "encode(sha256(convert_to(%(t)s::text || g::text, 'UTF8')), 'hex'), 'f.wav', 1700000, "
                    "CASE WHEN g <= %(w)s THEN 'queued' ELSE 'done' END, now(), now() "
                    "FROM generate_series(1, %(n)s) g", {"t": tenant, "l": lib, "j": job, "w": waiting, "n": n})
            # tenant 3's files waiting are parked for a worker of another model (its CLAPQ_MODEL changed)
            cur.execute(f"UPDATE items SET claimed_by = {PARKED_AS} WHERE tenant_id = %s AND status = 'queued'",
                        (tenants[3][0],))
            cur.execute("VACUUM ANALYZE items")
            log(f"{args.items} items, {args.pending} waiting, loaded in {time.perf_counter() - t0:.0f} s")
            res = {"items": args.items, "pending": args.pending, "rounds": args.rounds,
                   "machine": MACHINE, "postgres": conn.server_version}
            for name, (sql, who) in QUERIES.items():
                res[name] = timed(cur, sql, {} if who is None else {"t": tenants[who][0]}, args.rounds)
            # what migration 0012's index saves the lane count: the same counts without it
            cur.execute("DROP INDEX ix_items_tenant_waiting")
            for name in LANE_NAMES:
                sql, who = QUERIES[name]
                res[name + "_without_0012"] = timed(cur, sql, {"t": tenants[who][0]}, args.rounds)
        conn.close()
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.items:,} items, {args.pending:,} waiting; p50 / max of {args.rounds} counts")
    for name in [*QUERIES, *(n + "_without_0012" for n in LANE_NAMES)]:
        print(f"{name:31} {res[name]['p50_ms']:8.2f} ms {res[name]['max_ms']:8.2f} ms   {res[name]['plan'][0][:70]}")
    save(f"backpressure_{args.items}.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
