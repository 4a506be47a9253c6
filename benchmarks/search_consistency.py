"""Does the index plan answer one search the same way whatever `k`, `offset` and `min_score` ask for?
And its recall, on a library where a few long files make most of the windows.

    python benchmarks/search_consistency.py

One run, one machine:
  1. an embedded Postgres migrated with the product's migrations, the full-size default CLAP (random
     weights) registered as the library's model, and a synthetic library COPYed into it: short clips
     (search_scale.Synth: clustered, 1-5 windows each) beside --long hour-long files whose windows are
     nearly the same vector (noise, a drone, room tone: cosine ~0.995 between any two of them), so the
     library is past CLAPQ_EXACT_SEARCH_MAX_WINDOWS and the API takes the HNSW index plan;
  2. `clapq api` serving it, once for each --ef (CLAPQ_HNSW_EF_SEARCH), with query vectors put in the
     API's text cache under their strings (a search runs exactly as a repeated user query does);
  3. for three kinds of query, "text-like" (near a clip cluster, as search_scale.py), "near-long" (near
     the long files' shared direction: a search for what they hold) and "far" (a random direction,
     about equally far from every window: what a random test model's text tower gives), through
     `POST /v1/search`:
     - recall@k of items and of segments against numpy over the same float32 vectors, and by how much
       the k-th item shown scores below the true k-th (a miss among near-ties costs ~0);
     - whether the first result of k=1 is the first of k=k (items and segments);
     - whether --pages pages of --page-k segments joined give the same list as one search for all of
       them: no window repeated or skipped;
     - min_score set just under the true k-th best item's score: how many of the k qualifying items
       come back;
     - p50 latency of the k=k items search.

Prints a table and writes JSON to benchmarks/results/search_consistency.json. --work-dir keeps the
database, so the same library can be measured again after a change to the API (run from that checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.engine import _free_port, build_full_model, wait_idle  # noqa: E402
from benchmarks.search_http import (  # noqa: E402
    Api,
    NullCursor,
    api_env,
    item_truth,
    lat,
    seed_text_cache,
    wait_ready,
)
from benchmarks.search_scale import (  # noqa: E402
    DIM,
    Synth,
    connect,
    copy_items,
    copy_segments,
    log,
    scalar,
    start_tuned,
    unit_rows,
)
from worker.windows import span_json  # noqa: E402


def window_rows(syn: Synth) -> dict[tuple[str, float], int]:
    """Each window's row of the library's vectors (V), by its item's id and its start_s as a search result gives it
    (worker.windows.span_json; copy_segments stores these windows)."""
    first = np.cumsum(syn.counts) - syn.counts
    rows = {}
    for i in range(syn.n_items):
        c, d = int(syn.counts[i]), float(syn.duration[i])
        for w in range(c):
            s0 = max(d - 10.0, 0.0) if w == c - 1 and w > 0 else 5.0 * w
            rows[(str(syn.item_ids[i]), span_json(s0, min(s0 + 10.0, d))["start_s"])] = int(first[i] + w)
    return rows


class WithLongFiles(Synth):
    """Synth's clips, then `long` items of `windows` windows each (an hour is 719 windows of 10 s every
    5 s), every window a small move of one shared direction."""

    def __init__(self, clip_segments: int, long: int, windows: int, spread: float, seed: int) -> None:
        super().__init__(clip_segments, 300, 24, seed, 20)
        self.n_clips = self.n_items
        self.drone = unit_rows(self.iso(1))[0]
        self.blob_spread = spread
        counts = np.full(long, windows)
        self.counts = np.r_[self.counts, counts]
        self.item_cluster = np.r_[self.item_cluster, np.full(long, -1)]
        self.item_category = np.r_[self.item_category, np.zeros(long, int)]
        self.duration = np.r_[self.duration, np.full(long, 10.0 + 5.0 * (windows - 1))]
        self.item_ids += [uuid.UUID(bytes=self.rng.bytes(16), version=4) for _ in range(long)]
        self.n_items += long
        self.n += long * windows
        self.seg_item = np.repeat(np.arange(self.n_items), self.counts)
        first = np.cumsum(self.counts) - self.counts
        self.seg_window = np.arange(self.n) - np.repeat(first, self.counts)
        self.seg_category = self.item_category[self.seg_item]

    def segment_vectors(self, item_lo: int, item_hi: int) -> np.ndarray:
        parts = []
        if item_lo < self.n_clips:
            parts.append(super().segment_vectors(item_lo, min(item_hi, self.n_clips)))
        n_long = int(self.counts[max(item_lo, self.n_clips):item_hi].sum())
        if n_long:
            parts.append(unit_rows(self.drone + self.blob_spread * self.iso(n_long)))
        return np.concatenate(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--clips", type=int, default=4000, help="windows of short clips (~1,000 clips)")
    ap.add_argument("--long", type=int, default=30, help="hour-long files")
    ap.add_argument("--long-windows", type=int, default=719, help="windows of each long file (719: an hour)")
    ap.add_argument("--spread", type=float, default=0.1, help="isotropic noise on the long files' windows")
    ap.add_argument("--queries", type=int, default=40, help="queries of each kind")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--pages", type=int, default=6, help="pages compared with one search for all of them")
    ap.add_argument("--page-k", type=int, default=50, help="results a page")
    ap.add_argument("--ef", default="default,40,100,200,400",
                    help="CLAPQ_HNSW_EF_SEARCH values, one API each (default: the API's own choice)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "clapq-bench-full-clap")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="keep the database here; if it already holds a library, reuse it (same arguments)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = args.k

    import requests

    from clapq.checkpoint import register_model, resolve
    from clapq.db import migrate, session_scope
    from clapq.embedded import EmbeddedRedis
    from clapq.keys import create_key

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="clapq-search-consistency-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    model_dir = build_full_model(args.model_dir)
    ckpt = resolve(str(model_dir))
    pg, url = start_tuned(work / "pgdata", 1 << 30)
    red = EmbeddedRedis(work / "redis")
    api = None
    syn = WithLongFiles(args.clips, args.long, args.long_windows, args.spread, args.seed)
    res: dict = {"args": {k_: str(v) for k_, v in vars(args).items()}, "items": syn.n_items, "segments": syn.n,
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "load_avg_at_start": os.getloadavg()}}
    try:
        redis_url = red.start()
        migrate(url)
        conn = connect(url)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT t.name, l.id FROM libraries l JOIN tenants t ON t.id = l.tenant_id WHERE l.name = 'long'")
        old = cur.fetchone()
        tenant_name = old[0] if old else f"bench-{uuid.uuid4().hex[:8]}"
        with session_scope(url) as s:
            model_id = register_model(s, ckpt)
            key = create_key(s, tenant_name)
        tenant = scalar(cur, "SELECT id FROM tenants WHERE name = %s", (tenant_name,))
        V = np.empty((syn.n, DIM), np.float32)
        if old:  # the same draws in the same order regenerate the very vectors stored
            library = uuid.UUID(str(old[1]))
            copy_items(NullCursor(), syn, tenant, library, None)
            copy_segments(NullCursor(), syn, V, model_id, library)
            if scalar(cur, "SELECT count(*) FROM segments WHERE library_id = %s", (str(library),)) != syn.n:
                raise SystemExit(f"{work} holds another library; use the same arguments or an empty --work-dir")
        else:
            library, job = uuid.uuid4(), uuid.uuid4()
            cur.execute("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (%s, %s, 'long', %s)",
                        (str(library), str(tenant), model_id))
            cur.execute("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (%s, %s, %s, 'upload')",
                        (str(job), str(tenant), str(library)))
            cur.execute("BEGIN")
            copy_items(cur, syn, tenant, library, job)
            copy_segments(cur, syn, V, model_id, library)
            cur.execute("COMMIT")
            cur.execute("VACUUM (ANALYZE) items")
            cur.execute("VACUUM (ANALYZE) segments")
        log(f"{'reused' if old else 'loaded'} {syn.n_items} items ({args.long} of {args.long_windows} windows), "
            f"{syn.n} segments")

        # PYTHONPATH: the API of this checkout, whatever is installed
        env = api_env(url, redis_url, model_dir, work, CLAPQ_API_WORKERS="1", PYTHONPATH=str(HERE.parent))
        # text-like: near a clip cluster; near-long: near the long files' shared direction (a search for
        # what they hold); far: a random direction, about as far from every window
        kinds = {"text-like": syn.queries(args.queries),
                 "near-long": unit_rows(syn.drone + unit_rows(syn.iso(args.queries))),
                 "far": unit_rows(syn.iso(args.queries))}
        for name, Q in kinds.items():
            seed_text_cache(env, ckpt, tenant, [f"{name} {j}" for j in range(len(Q))], Q)
        first = np.cumsum(syn.counts) - syn.counts
        truth = {}
        for name, Q in kinds.items():
            best, kth = item_truth(V, first, Q, None, k)
            S = V @ Q.T
            truth[name] = (best, kth, S, -np.partition(-S, k - 1, axis=0)[k - 1])
        window_of = window_rows(syn)
        index_of = {str(u): i for i, u in enumerate(syn.item_ids)}
        res["runs"] = {}
        for ef in args.ef.split(","):
            port = _free_port()
            api = Api(dict(env, CLAPQ_PORT=str(port), **({"CLAPQ_HNSW_EF_SEARCH": ef} if ef != "default" else {})),
                      work)
            api_proc = api.start("api")
            base = f"http://127.0.0.1:{port}"
            http = requests.Session()
            http.headers["Authorization"] = f"Bearer {key}"
            wait_ready(http, base, need_worker=False)
            wait_idle(api_proc.pid)

            def search(text: str, **opts) -> tuple[float, list]:
                t1 = time.perf_counter()
                r = http.post(base + "/v1/search", json={"library_id": str(library), "text": text, **opts},
                              timeout=300)
                ms = (time.perf_counter() - t1) * 1000
                if r.status_code != 200:
                    raise SystemExit(f"search failed ({r.status_code}): {r.text}")
                body = r.json()
                plans[body["plan"]] = plans.get(body["plan"], 0) + 1
                return ms, body["results"]

            def spans(results: list) -> list:
                return [(r["item_id"], r["start_s"]) for r in results]

            res["runs"][ef] = {}
            for name, Q in kinds.items():
                best, kth, S, seg_kth = truth[name]
                plans: dict = {}
                row: dict = {k_: [] for k_ in ("items", "segments", "top1_items", "top1_segments", "pages_equal",
                                               "pages_repeated", "min_score", "ms", "gap")}
                for j in range(len(Q)):
                    text = f"{name} {j}"
                    ms, items = search(text, k=k)
                    row["ms"].append(ms)
                    row["items"].append(sum(best[index_of[r["item_id"]], j] >= kth[j] - 1e-6 for r in items) / k)
                    if len(items) == k:  # how much worse than the true k-th item the k-th shown is
                        row["gap"].append(float(kth[j]) - items[-1]["score"])
                    row["top1_items"].append(search(text, k=1)[1][:1] == items[:1])
                    segs = spans(search(text, k=k, mode="segments")[1])
                    row["segments"].append(sum(S[window_of[w], j] >= seg_kth[j] - 1e-6 for w in segs) / k)
                    row["top1_segments"].append(spans(search(text, k=1, mode="segments")[1]) == segs[:1])
                    whole = spans(search(text, k=args.page_k * args.pages, mode="segments")[1])
                    paged = []
                    for p in range(args.pages):
                        paged += spans(search(text, k=args.page_k, offset=p * args.page_k, mode="segments")[1])
                    row["pages_equal"].append(paged == whole)
                    row["pages_repeated"].append(len(paged) - len(set(paged)))
                    # every item at or above the true k-th best score qualifies: k of them come back if found
                    threshold = round(float(kth[j]) - 1e-4, 6)
                    row["min_score"].append(len(search(text, k=k, min_score=threshold)[1]) / k)
                out = {"queries": len(Q), "plans": plans, "items_recall_at_k": float(np.mean(row["items"])),
                       "segments_recall_at_k": float(np.mean(row["segments"])),
                       "kth_score_gap_mean": float(np.mean(row["gap"] or [np.nan])),
                       "kth_score_gap_max": float(np.max(row["gap"] or [np.nan])),
                       "top1_same_items": float(np.mean(row["top1_items"])),
                       "top1_same_segments": float(np.mean(row["top1_segments"])),
                       "pages_equal_one_search": float(np.mean(row["pages_equal"])),
                       "pages_repeated_windows_mean": float(np.mean(row["pages_repeated"])),
                       "min_score_share_back": float(np.mean(row["min_score"])), "items_k": lat(row["ms"])}
                res["runs"][ef][name] = out
                log(f"ef {ef:>7}, {name:>9}: recall@{k} items {out['items_recall_at_k']:.3f} segments "
                    f"{out['segments_recall_at_k']:.3f} (k-th item score short by {out['kth_score_gap_mean']:.4f}"
                    f" mean, {out['kth_score_gap_max']:.4f} max); k=1 first = k={k} first: items {out['top1_same_items']:.0%}"
                    f" segments {out['top1_same_segments']:.0%}; {args.pages} pages of {args.page_k} = one search "
                    f"{out['pages_equal_one_search']:.0%} ({out['pages_repeated_windows_mean']:.1f} windows "
                    f"repeated); min_score brings back {out['min_score_share_back']:.0%}; items p50 "
                    f"{out['items_k']['p50_ms']:.1f} ms; plans {plans}")
            api.close()
            api = None
    finally:
        if api is not None:
            api.close()
        red.stop()
        pg.stop()

    out_path = Path(args.out) if args.out else HERE / "results" / "search_consistency.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res["runs"], indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
