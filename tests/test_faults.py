"""Fault injection with real processes: kill, stop and cut off workers, Redis and Postgres mid-job;
every file still ends embedded exactly once (or failed with a reason) and the job says so."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select, text

from clapq.db import get_engine, session_scope
from clapq.embedded import EmbeddedRedis
from clapq.models import Embedding, Item, Segment
from clapq.queue import BULK_PRIORITY, EMBED_QUEUE, lanes, queued_tasks
from tests.audio import signal as tone
from tests.conftest import WorkerProcess, auth, make_env, queued_of_an_unserved_model

pytestmark = pytest.mark.slow

FAST_RECOVERY = dict(CLAPQ_HEARTBEAT_S="1", CLAPQ_STALE_AFTER_S="4", CLAPQ_SWEEP_INTERVAL_S="1",
                     CLAPQ_ITEMS_PER_TASK="8")


class Beat:
    """`clapq beat`: the sweeper loop, as a real process."""

    def __init__(self, env, log_path):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "beat"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture()
def stack(services, tiny_model, tmp_path):
    """A private Redis, worker(s) and sweeper, so killing them cannot disturb other tests."""
    redis = EmbeddedRedis(tmp_path / "redis")
    redis.start()
    env = make_env(services, tiny_model, tmp_path / "blobs", REDIS_URL=redis.url, **FAST_RECOVERY)
    from api import create_app
    from clapq.settings import Settings

    settings = Settings.from_env(env)
    st = {"env": env, "redis": redis, "settings": settings, "workers": [], "beat": None, "tmp": tmp_path,
          "client": create_app(settings).test_client()}

    def worker() -> WorkerProcess:
        w = WorkerProcess(env, tmp_path / f"worker{len(st['workers'])}.log").start()
        st["workers"].append(w)
        return w

    def beat() -> Beat:
        st["beat"] = Beat(env, tmp_path / "beat.log")
        return st["beat"]

    st["worker"], st["start_beat"] = worker, beat
    try:
        yield st
    finally:
        for w in st["workers"]:
            w.stop(signal.SIGKILL)
        if st["beat"]:
            st["beat"].stop()
        redis.stop()


def make_batch(n: int, seconds: float = 0.5, first: int = 0) -> list[tuple[io.BytesIO, str]]:
    import soundfile as sf

    out = []
    for i in range(first, first + n):  # other `first`, other bytes
        buf = io.BytesIO()
        sf.write(buf, tone(seconds, 16_000, 1, freq=100 + 7 * i, seed=i), 16_000, format="WAV")
        out.append((io.BytesIO(buf.getvalue()), f"f{i:03d}.wav"))
    return out


def start_job(st, n: int, key: str | None = None, first: int = 0) -> tuple[str, str, str]:
    from tests.conftest import auth as _auth

    with session_scope(st["settings"].database_url) as s:
        from clapq.keys import create_key

        key = key or create_key(s, f"faults-{uuid.uuid4().hex[:8]}")
    c = st["client"]
    lib = c.post("/v1/libraries", json={"name": "faults"}, headers=_auth(key)).get_json()
    r = c.post(f"/v1/libraries/{lib['id']}/batches", headers=_auth(key), data={"files": make_batch(n, first=first)},
               content_type="multipart/form-data")
    assert r.status_code == 202, r.get_json()
    return key, lib["id"], r.get_json()["job_id"]


def job(st, key, job_id) -> dict:
    return st["client"].get(f"/v1/jobs/{job_id}", headers=auth(key)).get_json()


def wait_until(pred, timeout: float, what):
    """`pred()` once it is true; `what` (text, or a function giving it at the end) says what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def logs_tail(st, chars: int = 4000) -> str:
    """The end of each worker's and the sweeper's log, for a failure's message."""
    paths = sorted(st["tmp"].glob("worker*.log")) + [st["tmp"] / "beat.log"]
    return "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-chars:]}" for p in paths if p.exists())


def wait_finished(st, key, job_id, timeout=240) -> dict:
    return wait_until(lambda: (j := job(st, key, job_id))["status"] not in ("queued", "running") and j,
                      timeout, lambda: f"job {job_id} to finish: {job(st, key, job_id)}{logs_tail(st)}")


def job_under_way(st, n: int, done_at_least: int) -> tuple[str, str]:
    """A worker and the sweeper running, and an n-file job that has embedded some of its files."""
    st["worker"]()
    st["start_beat"]()
    key, _, job_id = start_job(st, n)
    wait_until(lambda: job(st, key, job_id)["counts"]["done"] >= done_at_least, 120, "some progress")
    return key, job_id


def assert_exactly_once(st, job_id: str, n: int, segments: int = 1) -> None:
    """Every item done, with exactly one pooled vector and exactly its `segments`: no duplicates."""
    with session_scope(st["settings"].database_url) as s:
        jid = uuid.UUID(job_id)
        items = s.scalars(select(Item).where(Item.job_id == jid)).all()
        assert len(items) == n and {i.status for i in items} == {"done"}
        ids = [i.id for i in items]
        seg = dict(s.execute(select(Segment.item_id, func.count()).where(Segment.item_id.in_(ids))
                             .group_by(Segment.item_id)).all())
        emb = dict(s.execute(select(Embedding.item_id, func.count()).where(Embedding.item_id.in_(ids))
                             .group_by(Embedding.item_id)).all())
    assert set(seg.values()) == {segments} and len(seg) == n
    assert set(emb.values()) == {1} and len(emb) == n


def task_files(message: bytes) -> list:
    """The item ids a task waiting in a lane carries (kombu's JSON envelope around Celery's base64 body)."""
    import base64

    return json.loads(base64.b64decode(json.loads(message)["body"]))[0][0]


def files_in_order(st, job_id: str) -> list[str]:
    """A job's item ids in the order its upload sent them, as its tasks take them."""
    with session_scope(st["settings"].database_url) as s:
        return [str(i) for i in s.scalars(select(Item.id).where(Item.job_id == uuid.UUID(job_id))
                                          .order_by(Item.created_at, Item.id))]


def test_sigkill_worker_mid_job(stack):
    key, job_id = job_under_way(stack, 200, 30)
    stack["workers"][-1].stop(signal.SIGKILL)  # the whole worker, pool children and decoders included
    before = job(stack, key, job_id)["counts"]
    assert before["done"] < 200
    stack["worker"]()
    assert wait_finished(stack, key, job_id)["status"] == "done"
    assert_exactly_once(stack, job_id, 200)


def test_sigterm_worker_keeps_finished_work(stack):
    key, job_id = job_under_way(stack, 120, 20)
    stack["workers"][-1].stop(signal.SIGTERM)  # warm shutdown: the running chunk finishes and is acked
    done_at_stop = job(stack, key, job_id)["counts"]["done"]
    assert done_at_stop >= 20
    stack["worker"]()
    assert wait_finished(stack, key, job_id)["status"] == "done"
    assert_exactly_once(stack, job_id, 120)


def upload_one(stack, path: Path, library: str) -> tuple[str, str, str]:
    """(key, library id, item id) of `path` uploaded alone, by a new tenant into a new library."""
    with session_scope(stack["settings"].database_url) as s:
        from clapq.keys import create_key

        key = create_key(s, f"faults-{uuid.uuid4().hex[:8]}")
    c = stack["client"]
    lib = c.post("/v1/libraries", json={"name": library}, headers=auth(key)).get_json()
    r = c.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), content_type="multipart/form-data",
               data={"files": [(io.BytesIO(path.read_bytes()), path.name)]}).get_json()
    return key, lib["id"], r["items"][0]["id"]


@pytest.mark.parametrize("group", [False, True], ids=["main process", "process group"])
def test_a_worker_told_to_stop_hands_back_a_long_file_within_seconds(stack, group):
    """SIGTERM to the worker's main process alone, as `docker compose stop` sends it, while it embeds a 4-hour
    recording (a batch of one: a minute or more of the tiny model). Celery's warm shutdown let its task run on to
    the file's end, past any supervisor's grace (Compose's 60 s, `clapq up`'s 30), which killed it: the file
    embedded again from its start and that try counted, "worker lost" (or here, where nothing kills it, the
    file finished before the worker stopped). Now the task stops within seconds and hands the file back, queued,
    its try given back and saying why; the next worker takes it on its first counted try. (Deleted then: its 2,879
    windows of silence, one vector, in the graph every test's library shares, flooded a later walk of silent
    files' ties, which fell back to comparing every row: test_search's equal-scores test, in CI.) `group`: to every
    process of the worker at once, as systemd's default KillMode (control-group) sends it: the pool child died of
    it mid-file, "worker lost", its try counted, whatever the main process's stop would have done."""
    from tests.audio import long_silence

    # decoding the recording takes more than the stack's CLAPQ_DECODE_CPU_S (5 s) of a core: the next worker too
    long_env = {**stack["env"], "CLAPQ_BATCH_SIZE": "1", "CLAPQ_DECODE_TIMEOUT_S": "600"}
    w = WorkerProcess(long_env, stack["tmp"] / "worker-long.log").start()
    stack["workers"].append(w)
    key, lib, item = upload_one(stack, long_silence(stack["tmp"] / "set.flac", 240, rate=8_000), "sets")
    c = stack["client"]
    wait_until(lambda: c.get(f"/v1/items/{item}", headers=auth(key)).get_json()["progress"], 120,
               lambda: f"the recording to be part-way: {logs_tail(stack)}")
    if group:  # the main process, its pool child and the decoders it started, each sent SIGTERM at once
        os.killpg(w.proc.pid, signal.SIGTERM)
    else:
        os.kill(w.proc.pid, signal.SIGTERM)  # the main process alone: its pool child hears it from there
    w.proc.wait(180)
    got = c.get(f"/v1/items/{item}", headers=auth(key)).get_json()
    assert got["status"] == "queued" and got["attempts"] == 0, (got, logs_tail(stack))  # before: done, attempts 1
    assert "the worker stopped before it finished the file" in got["error"], got
    assert resent_counted(stack) == {"worker_stopped": 1}  # counted in /metrics, as the worker handed it back
    stack["workers"].append(WorkerProcess(long_env, stack["tmp"] / "worker-long-next.log").start())
    taken = wait_until(lambda: (g := c.get(f"/v1/items/{item}", headers=auth(key)).get_json())["progress"] and g,
                       180, lambda: f"the recording to be taken again: {logs_tail(stack)}")
    assert taken["status"] == "running" and taken["attempts"] == 1, taken
    assert c.delete(f"/v1/libraries/{lib}", headers=auth(key)).status_code == 200


    def windows_kept() -> int:
        with session_scope(stack["settings"].database_url) as s:
            return s.scalar(select(func.count()).select_from(Segment).where(Segment.item_id == uuid.UUID(item)))

    wait_until(lambda: windows_kept() == 0, 30, "no window of the recording kept")  # it stopped within seconds


def test_a_sigterm_to_the_whole_worker_while_a_file_decodes_leaves_its_decoder_to_the_task(stack):
    """SIGTERM to every process of the worker at once (systemd's default KillMode) while a long file is being
    decoded: the decoder child died of it, and the task, handing the file back for the stop, first started it
    again in a new decoder ("decoder died (signal 15); trying the file again in a new one"). Now the decoder is
    left to the task, which ends it; the file goes back to the queue, its try not counted."""
    import psutil

    from tests.audio import long_silence

    env = {**stack["env"], "CLAPQ_BATCH_SIZE": "1", "CLAPQ_DECODE_TIMEOUT_S": "600", "CLAPQ_DECODE_CPU_S": "600"}
    w = WorkerProcess(env, stack["tmp"] / "worker-decoding.log").start()
    stack["workers"].append(w)
    # minutes of a core to decode
    key, lib, item = upload_one(stack, long_silence(stack["tmp"] / "long.flac", 120, rate=192_000), "decoding")
    c = stack["client"]

    def decoding():
        for p in psutil.Process(w.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "worker.decoder" in p.cmdline() and p.cpu_times().user > 1:
                    return p

    wait_until(decoding, 120, lambda: f"the file to be decoding: {logs_tail(stack)}")
    os.killpg(w.proc.pid, signal.SIGTERM)
    w.proc.wait(60)
    got = c.get(f"/v1/items/{item}", headers=auth(key)).get_json()
    assert got["status"] == "queued" and got["attempts"] == 0, (got, logs_tail(stack))
    assert "decoder died" not in w.output(), w.output()[-3000:]  # before: "decoder died (signal 15)"
    assert c.delete(f"/v1/libraries/{lib}", headers=auth(key)).status_code == 200


def test_a_task_run_twice_at_once_changes_nothing(stack):
    """A task still running when the broker hands its message out again (past the visibility timeout) runs a
    second time, under the same task id, beside the first. Here every task of a 41-file job is sent twice
    to two idle workers (the first task's copy once a worker holds it). Its first file is a pipe nobody
    writes to, so its decoder hangs until CLAPQ_DECODE_TIMEOUT_S (10 s) and that task is surely still
    running when its copy starts. The copy finds its files running under its own id, as when Celery hands
    back the message of a pool child that died, and sends each on alone; whichever run writes a file first,
    it is tried once or twice. The job ends with the pipe failed and every other file embedded exactly
    once: one pooled vector, one segment. (Each of the first task's files was asserted tried twice, which
    held only where the single tasks claimed them before the first task wrote them: a race, which a clean
    CI run of session 23 lost, with [2, 2, 1, 1, ...].)"""
    from clapq.blobs import BlobStore
    from clapq.queue import EMBED_QUEUE, EMBED_TASK, chunks, make_celery
    from tests.test_engine import job_of_blobs

    for _ in range(2):
        stack["worker"]()
    key, lib_id, first = start_job(stack, 1)
    assert wait_finished(stack, key, first)["status"] == "done"
    settings = stack["settings"]
    with session_scope(settings.database_url) as s:
        known = str(s.scalar(select(Item.id).where(Item.job_id == uuid.UUID(first))))
    blobs = BlobStore(settings.blob_dir)
    hangs = uuid.uuid4().hex + uuid.uuid4().hex
    blobs.path_for(hangs).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(blobs.path_for(hangs))
    files = [("hangs.wav", hangs)] + [(name, blobs.put_bytes(buf.getvalue()))
                                      for buf, name in make_batch(41)[1:]]  # f000 is `first`'s bytes
    job_id, ids = job_of_blobs(settings, lib_id, known, files)
    app = make_celery(settings)
    tasks = chunks(ids, settings.items_per_task)
    for n, chunk in enumerate(tasks):
        task_id = str(uuid.uuid4())
        for copy in range(2):  # what a redelivery sends: the same task, the same id
            app.send_task(EMBED_TASK, args=[chunk], queue=EMBED_QUEUE, task_id=task_id)
            if n == copy == 0:
                # the copy only once a worker holds the first: sent back to back, both could reach the
                # same worker (kombu's Redis transport can hand a worker two messages at once), which
                # would run them one after the other instead of side by side
                def claimed() -> bool:
                    with session_scope(settings.database_url) as s:
                        return s.scalar(select(Item.status).where(Item.id == uuid.UUID(chunk[0]))) == "running"

                wait_until(claimed, 60, "the first task claimed")
    finished = wait_finished(stack, key, job_id)
    assert finished["status"] == "done_with_errors" and finished["counts"]["done"] == 40, finished
    assert [e["filename"] for e in finished["errors"]] == ["hangs.wav"], finished["errors"]
    with session_scope(settings.database_url) as s:
        rows = s.execute(select(Item.id, Item.status, Item.attempts).where(Item.job_id == uuid.UUID(job_id))).all()
        counts = [dict(s.execute(select(t.item_id, func.count()).where(t.item_id.in_([r.id for r in rows]))
                                 .group_by(t.item_id)).all()) for t in (Segment, Embedding)]
    status, attempts = {str(r.id): r.status for r in rows}, {str(r.id): r.attempts for r in rows}
    good = [i for i in ids if i != ids[0]]
    assert {status[i] for i in good} == {"done"} and status[ids[0]] == "failed", status
    for per_item in counts:  # segments, then pooled vectors
        assert {per_item.get(uuid.UUID(i)) for i in good} == {1} and uuid.UUID(ids[0]) not in per_item, per_item
    assert {attempts[i] for i in ids} <= {1, 2}, attempts


@pytest.mark.parametrize("claim_for_s", ["0", "10"])  # a CPU's default, a GPU's
def test_a_tenants_few_files_go_ahead_of_another_tenants_backlog(stack, claim_for_s):
    """The queue has two lanes: a tenant's first files waiting (FAST_LANE_TASKS tasks' worth) go in the first,
    its files beyond that in the bulk lane, which a worker takes from only when the first is empty. So 3
    files uploaded behind another tenant's 96 are embedded after that tenant's first 32 (4 tasks of 8), not
    after all 104: the queue was one FIFO, and a tenant's few files waited behind every file queued before.
    A task claiming files of later tasks ahead (CLAPQ_CLAIM_FOR_S) stops while the first lane holds tasks:
    it takes the oldest, and 65 of the bulk lane's 72 went before the 3 (helper-49)."""
    stack["env"]["CLAPQ_CLAIM_FOR_S"] = claim_for_s
    from clapq.queue import BULK_PRIORITY, FAST_LANE_TASKS

    broker = redis.Redis.from_url(stack["redis"].url)
    first, bulk = lanes()[0], next(k for k in lanes() if k.endswith(str(BULK_PRIORITY)))
    per_task = stack["settings"].items_per_task
    assert FAST_LANE_TASKS * per_task == 32, "the counts below assume 4 tasks of 8 files"
    key_a, lib_a, big = start_job(stack, 96)  # no worker yet: every task waits in the queue
    assert (broker.llen(first), broker.llen(bulk)) == (4, 8)
    key_b, _, small = start_job(stack, 3, first=500)  # another tenant, nothing of its own waiting
    assert (broker.llen(first), broker.llen(bulk)) == (5, 8)
    r = stack["client"].post(f"/v1/libraries/{lib_a}/batches", headers=auth(key_a),
                             data={"files": make_batch(8, first=200)}, content_type="multipart/form-data")
    assert r.status_code == 202, r.get_json()
    more = r.get_json()["job_id"]
    assert (broker.llen(first), broker.llen(bulk)) == (5, 9) and queued_tasks(broker) == 14  # A has 96 waiting
    stack["worker"]()
    for key, job_id in ((key_b, small), (key_a, big), (key_a, more)):
        assert wait_finished(stack, key, job_id)["status"] == "done"
    with session_scope(stack["settings"].database_url) as s:
        def finished(job_id: str) -> list:
            return sorted(s.scalars(select(Item.finished_at).where(Item.job_id == uuid.UUID(job_id))
                                    .order_by(Item.created_at, Item.id)))
        a_first, a_rest = finished(big)[:32], finished(big)[32:] + finished(more)
        b = finished(small)
    # of the bulk lane's files, only those that filled the last batch of B's task (a worker tops a short batch
    # up with queued files) end with B's; before, B's task came after all 96
    early = [t for t in a_rest if t <= max(b)]
    assert len(early) < stack["settings"].batch_size, ("B's 3 files waited behind the bulk lane", b, a_rest)
    assert len([t for t in a_rest if t <= max(a_first)]) < stack["settings"].batch_size
    assert_exactly_once(stack, small, 3)


def test_files_parked_for_another_model_do_not_send_a_tenants_uploads_to_the_bulk_lane(stack):
    """Files waiting for a worker of another model hold no place in the queue: counted as waiting, 40 of them
    sent every upload of their tenant to the bulk lane, behind every other tenant's backlog (helper-49)."""
    from clapq.models import WAITING_FOR_MODEL, Library
    from tests.conftest import job_of_own

    broker = redis.Redis.from_url(stack["redis"].url)
    key, lib, _ = start_job(stack, 1, first=900)
    with session_scope(stack["settings"].database_url) as s:
        tenant_id = s.scalar(select(Library.tenant_id).where(Library.id == uuid.UUID(lib)))
        _, _, old_lib, j = job_of_own(s, f"old-{uuid.uuid4()}")
        old_lib.tenant_id = j.tenant_id = tenant_id
        s.flush()
        s.add_all([Item(tenant_id=tenant_id, library_id=old_lib.id, job_id=j.id, sha256=uuid.uuid4().hex * 2,
                        filename=f"old{i}.wav", size_bytes=1, claimed_by=WAITING_FOR_MODEL) for i in range(40)])
    try:
        r = stack["client"].post(f"/v1/libraries/{lib}/batches", headers=auth(key),
                                 data={"files": make_batch(3, first=950)}, content_type="multipart/form-data")
        assert r.status_code == 202, r.get_json()
        assert [broker.llen(k) for k in lanes()] == [2, 0, 0, 0]
    finally:
        # their tasks go with this test's Redis: left queued, they were orphans the next test's sweep sent once they
        # had been silent CLAPQ_STALE_AFTER_S (4 s), which the lost-backlog test counted (97 sent for its 96, in a
        # clean-clone run where it reached its sweep 4 s after this test's first file and before its other three)
        with session_scope(stack["settings"].database_url) as s:
            s.execute(text("UPDATE items SET status = 'cancelled' WHERE status = 'queued' AND library_id IN (:l, :o)"),
                      {"l": lib, "o": old_lib.id})


def test_a_lost_backlog_the_sweeper_sends_again_keeps_its_lanes(stack):
    """A Redis that lost its data: the sweeper sends a tenant's never-tried files as an upload would, its first
    FAST_LANE_TASKS tasks' worth in the first lane and the rest in the bulk lane. All in the first, another
    tenant's 3 files went behind all 96 (helper-49). Those it sends in the bulk lane are marked as in it, as an
    upload's are, so the tenant's next upload goes behind them."""
    from clapq import presence
    from clapq.models import IN_BULK_LANE, Library
    from clapq.queue import make_celery
    from worker.sweeper import sweep_once

    broker = redis.Redis.from_url(stack["redis"].url)
    key_a, lib_a, big = start_job(stack, 96)
    broker.delete(*lanes())
    with session_scope(stack["settings"].database_url) as s:
        # files earlier tests left queued or running (their private Redis gone, or rows written with no task) would be
        # sent by this sweep too, and counted (97 for 96 in two clean-clone runs): cancelled, as no test waits on them
        s.execute(text("UPDATE items SET status = 'cancelled' WHERE status IN ('queued', 'running') AND job_id <> :j"),
                  {"j": big})
        s.execute(text("UPDATE items SET updated_at = now() - interval '1 hour' WHERE job_id = :j"), {"j": big})
        model_id = s.scalar(select(Library.model_id).where(Library.id == uuid.UUID(lib_a)))
    app = make_celery(stack["settings"])
    presence.serve(app, model_id)
    try:
        wait_until(lambda: presence.serving(broker, {model_id}), 10, "the model said served")
        assert sweep_once(stack["settings"], app) == 96
        # 4 tasks in the first lane and 8 in the bulk, of which the pass then moved the oldest (lift_bulk)
        assert [broker.llen(k) for k in lanes()] == [5, 0, 7, 0]
        start_job(stack, 3, first=500)
        assert [broker.llen(k) for k in lanes()] == [6, 0, 7, 0]
        with session_scope(stack["settings"].database_url) as s:
            marked = s.scalars(select(Item.id).where(Item.job_id == uuid.UUID(big), Item.claimed_by == IN_BULK_LANE))
            assert sorted(map(str, marked)) == sorted(files_in_order(stack, big)[32:])
            # as if workers ran all but A's last 16, in the bulk lane: A's next 3 go behind those
            s.execute(text("UPDATE items SET status = 'done' WHERE id = ANY(CAST(:ids AS uuid[]))"),
                      {"ids": files_in_order(stack, big)[:80]})
        r = stack["client"].post(f"/v1/libraries/{lib_a}/batches", headers=auth(key_a),
                                 data={"files": make_batch(3, first=300)}, content_type="multipart/form-data")
        assert r.status_code == 202, r.get_json()
        assert [broker.llen(k) for k in lanes()] == [6, 0, 8, 0]  # unmarked: [7, 0, 7, 0]
    finally:
        presence.unserve(app)
        broker.delete(*lanes())


def test_the_sweeper_sends_the_longest_silent_files_first(stack, monkeypatch):
    """More stranded files than a pass sends (worker.sweeper.PICK_MOST): the longest silent go first, the rest
    at the next passes. The pick had no order, so a file could wait pass after pass behind later ones."""
    from clapq import presence
    from clapq.models import Library
    from clapq.queue import make_celery
    from worker import sweeper

    broker = redis.Redis.from_url(stack["redis"].url)
    _, lib, job_id = start_job(stack, 8)
    broker.delete(*lanes())  # a Redis that lost its data
    files = files_in_order(stack, job_id)
    with session_scope(stack["settings"].database_url) as s:  # the last sent, the longest silent
        s.execute(text("UPDATE items SET updated_at = now() - interval '1 hour' - make_interval(mins => o.n::int) "
                       "FROM unnest(CAST(:ids AS uuid[])) WITH ORDINALITY AS o(id, n) WHERE items.id = o.id"),
                  {"ids": files})
        model_id = s.scalar(select(Library.model_id).where(Library.id == uuid.UUID(lib)))
    app = make_celery(stack["settings"])
    presence.serve(app, model_id)
    monkeypatch.setattr(sweeper, "PICK_MOST", 3)
    try:
        wait_until(lambda: presence.serving(broker, {model_id}), 10, "the model said served")
        assert sweeper.sweep_once(stack["settings"], app) == 3
        assert [task_files(m) for m in broker.lrange(lanes()[0], 0, -1)] == [files[5:]]  # in upload order
    finally:
        presence.unserve(app)
        broker.delete(*lanes())


def test_a_tenants_backlog_moves_a_task_at_each_sweep_while_the_first_lane_is_busy(stack):
    """Workers take from the bulk lane only while the first is empty; other tenants' first files, uploaded one
    batch after another, kept a tenant's backlog waiting for as long as they came. At each pass the sweeper
    moves the bulk lane's oldest task to the back of the first lane, once workers took the one it moved before:
    the backlog's next files, in order. A worker embeds a moved task as any other, and nothing moves while the
    first lane is empty."""
    from clapq.queue import make_celery
    from worker.sweeper import sweep_once

    broker = redis.Redis.from_url(stack["redis"].url)
    settings = stack["settings"]
    app = make_celery(settings)
    key_a, _, big = start_job(stack, 96)  # no worker yet: A's first 4 tasks in the first lane, 8 in the bulk
    broker.rename(lanes()[0], "held")  # the first lane empty: nothing moves
    assert sweep_once(settings, app) == 0 and [broker.llen(k) for k in lanes()] == [0, 0, 8, 0]
    broker.rename("held", lanes()[0])
    key_b, _, small = start_job(stack, 3, first=500)
    assert [broker.llen(k) for k in lanes()] == [5, 0, 8, 0]

    a_files = files_in_order(stack, big)
    per_task = settings.items_per_task
    assert sweep_once(settings, app) == 0
    assert [broker.llen(k) for k in lanes()] == [6, 0, 7, 0]
    # the newest in the first lane (taken last of those there), the oldest of the bulk lane's
    assert task_files(broker.lindex(lanes()[0], 0)) == a_files[4 * per_task:5 * per_task]
    # while it waits there (no worker took it), no other moves
    assert sweep_once(settings, app) == 0 and [broker.llen(k) for k in lanes()] == [6, 0, 7, 0]
    # workers take the first lane through the one moved, and another tenant's upload keeps it busy: the next
    # pass moves the backlog's next task
    taken = [broker.rpop(lanes()[0]) for _ in range(6)]
    assert task_files(taken[-1]) == a_files[4 * per_task:5 * per_task]
    key_c, _, other = start_job(stack, 3, first=700)
    assert sweep_once(settings, app) == 0 and [broker.llen(k) for k in lanes()] == [2, 0, 6, 0]
    assert task_files(broker.lindex(lanes()[0], 0)) == a_files[5 * per_task:6 * per_task]
    broker.rpush(lanes()[0], *reversed(taken))  # the tasks taken go back where they were, for the worker below
    stack["worker"]()
    for key, job_id in ((key_b, small), (key_c, other), (key_a, big)):
        assert wait_finished(stack, key, job_id)["status"] == "done"
    assert_exactly_once(stack, big, 96)


def test_the_sweeper_moves_no_more_while_the_task_it_moved_last_waits(stack):
    """Nothing takes from the first lane (no worker up yet, every worker busy, or workers slower than a task a
    pass: a 2-core CPU takes ~100 s for 16 four-minute songs, a pass is 30 s): the sweeper moved the bulk
    lane's oldest task to the first lane at every pass regardless, so a tenant's whole backlog went into the
    first lane, a task a pass, and another tenant's few files uploaded then waited behind all of it, as in one
    FIFO (helper-50: 8 passes, all 8 of A's bulk tasks ahead of B's). While the task it moved last still waits
    in the first lane, it moves no other; once a worker took it, the next pass moves the next, in order."""
    from clapq.queue import make_celery
    from worker.sweeper import sweep_once

    broker = redis.Redis.from_url(stack["redis"].url)
    settings = stack["settings"]
    app = make_celery(settings)
    _, _, big = start_job(stack, 96)  # no worker: A's first 4 tasks in the first lane, 8 in the bulk
    small = big
    try:
        for _ in range(8):
            assert sweep_once(settings, app) == 0
        assert [broker.llen(k) for k in lanes()] == [5, 0, 7, 0], "more than one task moved while none was taken"
        _, _, small = start_job(stack, 3, first=500)  # B, nothing waiting: behind A's first 4 and the one moved
        a_files = files_in_order(stack, big)
        per_task = settings.items_per_task
        ahead = [task_files(broker.rpop(lanes()[0])) for _ in range(5)]  # workers take A's 5, B's task waits
        assert ahead == [a_files[n * per_task:(n + 1) * per_task] for n in range(5)]
        assert sweep_once(settings, app) == 0 and [broker.llen(k) for k in lanes()] == [2, 0, 6, 0]
        assert task_files(broker.lindex(lanes()[0], 0)) == a_files[5 * per_task:6 * per_task]
    finally:
        broker.delete(*lanes())
        with session_scope(settings.database_url) as s:
            s.execute(text("UPDATE items SET status = 'cancelled' WHERE status = 'queued' AND job_id IN (:a, :b)"),
                      {"a": big, "b": small})


def test_two_uploads_of_a_tenant_at_once_still_put_its_first_files_in_the_first_lane(stack, monkeypatch):
    """A tenant with nothing waiting sends two uploads of 32 at once (lane: 32 files). Each committed, then
    counted the tenant's files waiting: both saw the other's 32 and put all their tasks in the bulk lane, where
    one after the other put 4 tasks in the first lane (helper-50). Each now counts before its commit, under a
    lock of its tenant (api.db.lane_room). Here neither sends before both committed (a barrier)."""
    import threading

    import api.batches
    from clapq.keys import create_key

    broker = redis.Redis.from_url(stack["redis"].url)
    with session_scope(stack["settings"].database_url) as s:
        key = create_key(s, f"faults-{uuid.uuid4().hex[:8]}")
    lib = stack["client"].post("/v1/libraries", json={"name": "faults"}, headers=auth(key)).get_json()
    real, barrier = api.batches.send_committed, threading.Barrier(2)

    def both_committed(ids, fast, **kw):
        barrier.wait(10)
        return real(ids, fast, **kw)

    monkeypatch.setattr(api.batches, "send_committed", both_committed)
    codes = []

    def upload(first: int) -> None:
        r = stack["client"].post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key),
                                 data={"files": make_batch(32, first=first)}, content_type="multipart/form-data")
        codes.append(r.status_code)

    threads = [threading.Thread(target=upload, args=(f,)) for f in (3000, 4000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert codes == [202, 202]
        assert [broker.llen(k) for k in lanes()] == [4, 0, 4, 0]  # before: [0, 0, 8, 0]
    finally:
        broker.delete(*lanes())
        with session_scope(stack["settings"].database_url) as s:
            s.execute(text("UPDATE items SET status = 'cancelled' WHERE status = 'queued' AND library_id = :l"),
                      {"l": lib["id"]})


def test_a_tenants_next_upload_does_not_overtake_its_files_in_the_bulk_lane(stack):
    """A uploads 48 (4 tasks in the first lane, 2 in the bulk); workers run its first 4. It had 16 waiting, so its
    next 8 went in the first lane, ahead of its own 16 older ones, which waited in the bulk lane behind every
    other tenant's first files (a task a pass, clapq.queue.lift_bulk; helper-50). They go in the bulk lane, behind
    them, while any of A's files is marked as in it; once a worker's claim took those, A's next go in the first
    lane again."""
    from clapq.models import IN_BULK_LANE, Library
    from worker.store import claim

    broker = redis.Redis.from_url(stack["redis"].url)
    key, lib, old = start_job(stack, 48)
    assert [broker.llen(k) for k in lanes()] == [4, 0, 2, 0]
    taken = [task_files(broker.rpop(lanes()[0])) for _ in range(4)]
    other = old  # B's job, once it has one

    def marked() -> int:
        with session_scope(stack["settings"].database_url) as s:
            return s.scalar(select(func.count()).where(Item.library_id == uuid.UUID(lib), Item.status == "queued",
                                                       Item.claimed_by == IN_BULK_LANE))

    try:
        with session_scope(stack["settings"].database_url) as s:  # as if a worker ran A's first 4 tasks
            s.execute(text("UPDATE items SET status = 'done' WHERE id = ANY(CAST(:ids AS uuid[]))"),
                      {"ids": [i for t in taken for i in t]})
        assert marked() == 16
        _, _, other = start_job(stack, 3, first=800)  # another tenant's first files: the first lane is busy
        r = stack["client"].post(f"/v1/libraries/{lib}/batches", headers=auth(key),
                                 data={"files": make_batch(8, first=600)}, content_type="multipart/form-data")
        assert r.status_code == 202, r.get_json()
        assert [broker.llen(k) for k in lanes()] == [1, 0, 3, 0]  # before: [2, 0, 2, 0]
        assert marked() == 24
        # the bulk lane's tasks, A's in the order it sent them, taken by a worker's claim: A's 24 running, none marked
        bulk = [task_files(broker.rpop(lanes()[2])) for _ in range(3)]
        assert bulk[2] == [i["id"] for i in r.get_json()["items"]]
        with session_scope(stack["settings"].database_url) as s:
            model_id = s.scalar(select(Library.model_id).where(Library.id == uuid.UUID(lib)))
            got = claim(s, [uuid.UUID(i) for t in bulk for i in t], model_id, 3, "task-of-a-worker", 60)
        assert len(got) == 24 and marked() == 0
        r = stack["client"].post(f"/v1/libraries/{lib}/batches", headers=auth(key),
                                 data={"files": make_batch(8, first=650)}, content_type="multipart/form-data")
        assert r.status_code == 202, r.get_json()
        assert [broker.llen(k) for k in lanes()] == [2, 0, 0, 0]  # 24 waiting: room for 8 in the first lane
    finally:
        broker.delete(*lanes())
        with session_scope(stack["settings"].database_url) as s:
            s.execute(text("UPDATE items SET status = 'cancelled' WHERE status IN ('queued', 'running') "
                           "AND (library_id = :l OR job_id = :o)"), {"l": lib, "o": other})


def test_a_redis_that_hangs_holds_no_request(stack):
    """Redis stops answering (SIGSTOP), connections open. An upload still answers 202 with its files
    committed: the send gives up (within ~4 s; before, it waited for as long as Redis hung) and leaves them
    to the sweeper. Text searches answer without the cache, and skip Redis altogether for a while after
    the failure. Once Redis answers again the sweeper sends the files and the job ends done."""
    import threading

    from api import create_app

    stack["worker"]()
    stack["start_beat"]()
    key, lib_id, first = start_job(stack, 2)
    assert wait_finished(stack, key, first)["status"] == "done"
    # no rate limit: the upload's send is the first to meet the stopped Redis
    client = create_app(dataclasses.replace(stack["settings"], rate_limit="")).test_client()
    client.get(f"/v1/search?library_id={lib_id}&q=warm+up", headers=auth(key))  # its pool's connection is open

    def answered(request) -> object:
        out = []
        t = threading.Thread(target=lambda: out.append(request()), daemon=True)
        t.start()
        t.join(60)
        assert out, "the request waited on the stopped Redis"
        return out[0]

    redis_pid = stack["redis"].proc.pid
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        up = answered(lambda: client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key),
                                          data={"files": make_batch(6)[2:]}, content_type="multipart/form-data"))
        assert up.status_code == 202, up.get_json()
        queued = answered(lambda: client.get(f"/v1/jobs/{up.get_json()['job_id']}", headers=auth(key)))
        assert queued.get_json()["counts"]["queued"] == 4, queued.get_json()  # committed, for the sweeper to send
        for q in ("rain on a roof", "a door creaks"):
            r = answered(lambda: client.get(f"/v1/search?library_id={lib_id}&q={q}", headers=auth(key)))
            assert r.status_code == 200, r.get_json()
        # /metrics still gives the database's figures, and says Redis did not answer (it was a 500; helper-38)
        m = answered(lambda: client.get("/metrics"))
        body = m.get_data(as_text=True)
        assert m.status_code == 200 and 'clapq_items{state="done"}' in body and "clapq_redis_up 0.0" in body, body
        assert "clapq_queue_depth" not in body
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    job_id = up.get_json()["job_id"]
    assert wait_finished(stack, key, job_id)["status"] == "done"
    assert_exactly_once(stack, job_id, 4)


def test_a_postgres_that_hangs_holds_no_request(services, tiny_model, tmp_path, monkeypatch):
    """Postgres stops answering (SIGSTOP of the postmaster and its backends), pooled connections open. The
    kernel still acknowledges what is sent, so nothing ended such a wait before (libpq has no deadline of
    its own): every request touching the database hung. Now requests answer 503 database_unavailable
    within seconds, while a statement that is only slow (pg_sleep, the server answering beside it) goes on
    to its end; once Postgres runs again the next request is served on a new connection."""
    import threading

    import psutil

    from api import create_app
    from clapq import db as clapq_db
    from clapq.db import migrate
    from clapq.embedded import EmbeddedPostgres
    from clapq.keys import create_key
    from clapq.settings import Settings

    # a Postgres of its own: the suite's must keep answering the other tests
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    stopped: list = []
    try:
        migrate(url)
        monkeypatch.setattr(clapq_db, "STALL_S", 1.0)
        monkeypatch.setattr(clapq_db, "PROBE_S", 1.0)
        monkeypatch.setattr(clapq_db, "CONNECT_TIMEOUT_S", 2)
        with session_scope(url) as s:
            key = create_key(s, "hang")
        settings = Settings.from_env(make_env(services, tiny_model, tmp_path / "blobs", DATABASE_URL=url,
                                              CLAPQ_RATE_LIMIT=""))
        client = create_app(settings).test_client()
        lib = client.post("/v1/libraries", json={"name": "hangs"}, headers=auth(key)).get_json()
        search = f"/v1/search?library_id={lib['id']}&q=rain+on+a+roof"
        assert client.get(search, headers=auth(key)).status_code == 200  # the pool's connections are open

        # slow is not hung: a statement longer than STALL_S goes on while the server answers the probes
        t0 = time.monotonic()
        with get_engine(url).connect() as conn:
            assert conn.execute(text("SELECT pg_sleep(3), 7")).all()[0][1] == 7
        assert time.monotonic() - t0 >= 3

        postmaster = psutil.Process(int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0]))
        stopped = [postmaster, *postmaster.children(recursive=True)]
        for proc in stopped:
            proc.send_signal(signal.SIGSTOP)
        answers: list = []

        def ask(path: str) -> None:
            r = client.get(path, headers=auth(key))
            answers.append((r.status_code, r.get_json()))

        threads = [threading.Thread(target=ask, args=(p,), daemon=True)
                   for p in (search, f"/v1/libraries/{lib['id']}", "/v1/libraries")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 3, f"requests still waiting on the stopped Postgres after 60 s: {answers}"
        assert [a[0] for a in answers] == [503] * 3, answers
        assert all(a[1]["error"]["code"] == "database_unavailable" for a in answers), answers
        for proc in stopped:
            proc.send_signal(signal.SIGCONT)
        stopped = []
        r = client.get(search, headers=auth(key))
        assert r.status_code == 200, r.get_json()
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)
        pg.stop()


def a_job_with_a_pipe(services, tiny_model, tmp_path, url: str, redis_url: str, n: int, pipe_at: int, **extra):
    """On a migrated Postgres of a test's own (`url`) and its Redis: a job of `n` files committed with no task sent,
    the stored file of the `pipe_at`-th (in filename order) a pipe nobody writes to, whose decoding gives up after
    CLAPQ_DECODE_TIMEOUT_S (5 s); (env, st, key, job id, item ids in filename order)."""
    from api import create_app
    from clapq.blobs import BlobStore
    from clapq.db import migrate
    from clapq.keys import create_key
    from clapq.settings import Settings

    migrate(url)
    env = make_env(services, tiny_model, tmp_path / "blobs", DATABASE_URL=url, REDIS_URL=redis_url,
                   **{"CLAPQ_HEARTBEAT_S": "1", "CLAPQ_DECODE_TIMEOUT_S": "5", "CLAPQ_RATE_LIMIT": "", **extra})
    settings = Settings.from_env(env)
    st = {"settings": settings, "client": create_app(settings).test_client(), "tmp": tmp_path}
    with session_scope(url) as s:
        key = create_key(s, "away")
    lib = st["client"].post("/v1/libraries", json={"name": "away"}, headers=auth(key)).get_json()
    paused = create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:9/0")).test_client()
    r = paused.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), data={"files": make_batch(n)},
                    content_type="multipart/form-data")  # committed, its tasks not sent
    job_id = r.get_json()["job_id"]
    with session_scope(url) as s:
        items = s.scalars(select(Item).where(Item.job_id == uuid.UUID(job_id)).order_by(Item.filename)).all()
        ids, pipe = [str(i.id) for i in items], BlobStore(settings.blob_dir).path_for(items[pipe_at].sha256)
    pipe.unlink()
    os.mkfifo(pipe)
    return env, st, key, job_id, ids


def test_a_postgres_away_across_celerys_retries_counts_no_try(services, tiny_model, tmp_path):
    """Postgres stops answering while a task is under way. The task's next write gives up (a passing fault)
    and Celery runs it again, and again while Postgres stays away. No try is counted for that: a retry whose
    claim met the database still away left no mark that the next was Celery's retry too, which then took its
    own files, still running under its id, for a dead process's, sent each on alone and counted a second try
    against them (helper-51, with 40 s: attempts 2 on every file; with CLAPQ_MAX_ATTEMPTS=3, a few such
    outages during one long file failed it). The task is held under way by a file that is a pipe nobody
    writes to, whose decoding gives up after CLAPQ_DECODE_TIMEOUT_S (5 s): the task's first write after
    that (its batch, the pipe's failure) meets the stopped Postgres."""
    import psutil

    from clapq.embedded import EmbeddedPostgres

    pg, broker = EmbeddedPostgres(tmp_path / "pg"), EmbeddedRedis(tmp_path / "redis")
    url = pg.start()  # a Postgres of its own: the suite's must keep answering the other tests
    broker.start()
    stopped: list = []
    worker = None
    try:
        env, st, key, job_id, ids = a_job_with_a_pipe(services, tiny_model, tmp_path, url, broker.url, 8, 0,
                                                      CLAPQ_DB_STALL_S="1", CLAPQ_ITEMS_PER_TASK="8")
        settings = st["settings"]
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        from clapq.queue import EMBED_TASK, make_celery

        # in the bulk lane: Celery sent its retries in the same lane, where they waited behind the first lane
        # with their files claimed and no longer beating (until the sweeper took them for a dead worker's)
        make_celery(settings).send_task(EMBED_TASK, args=[ids], queue=EMBED_QUEUE, priority=BULK_PRIORITY)
        wait_until(lambda: job(st, key, job_id)["counts"].get("running") == 8, 60, "the task under way")
        postmaster = psutil.Process(int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0]))
        stopped = [postmaster, *postmaster.children(recursive=True)]
        for proc in stopped:
            proc.send_signal(signal.SIGSTOP)
        # the pipe's failure is written at ~5 s and given up at ~11 s; the retry's claim connects at ~13 s and
        # gives up at ~23 s; the next retry's claim waits for Postgres. Meanwhile each retry's message is
        # seen, delivered and waiting for its countdown, in kombu's hash of unacknowledged messages. Held until a
        # retry's claim has met the outage (a second retry): a fixed 30 s, which a run here outlasted by 3 s only,
        # ended it first on a slower machine, and no claim met it
        retry_lanes: set = set()
        broker_client = redis.Redis.from_url(broker.url)

        def retried() -> Counter:
            return Counter(re.findall(r"embed_items\[([0-9a-f-]+)\] retry: Retry in", worker.output()))

        deadline = time.monotonic() + 120
        while not (retry_lanes and max(retried().values(), default=0) >= 2):
            assert time.monotonic() < deadline, f"no retry's claim met the outage: {retried()}, {retry_lanes}"
            for raw in broker_client.hvals("unacked"):
                message = json.loads(raw)[0]
                if message["headers"].get("retries"):
                    retry_lanes.add(message["properties"].get("priority"))
            time.sleep(0.2)
        for proc in stopped:
            proc.send_signal(signal.SIGCONT)
        stopped = []
        final = wait_finished(st, key, job_id, timeout=120)
        assert final["status"] == "done_with_errors" and final["counts"]["done"] == 7, final
        assert retry_lanes == {0}, f"the retries' priorities: {retry_lanes}"  # {6} before
        with session_scope(url) as s:
            tries = Counter(s.scalars(select(Item.attempts).where(Item.job_id == uuid.UUID(job_id))))
        assert tries == {1: 8}, tries
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)
        if worker is not None:
            worker.stop(signal.SIGKILL)
        broker.stop()
        pg.stop()


def test_files_a_task_cannot_hand_back_while_postgres_restarts_are_one_line_each(services, tiny_model, tmp_path):
    """A Postgres restart under a task that holds files of later tasks: the task's write fails, and so does its
    hand-back of those files, which Celery's retry of the task then mends. Each such failure was logged "handing files
    back failed" with a full traceback; a connection error is one line, saying what mends it (other errors keep
    their traceback). A worker against a Postgres of its own, stopped and started: the task's own three files fill
    three rows of a four-row batch, which takes a fourth file from a later task, a pipe whose decoding waits for a
    writer: the test ends it once Postgres is stopped and a heartbeat met that, and its failure meets the stopped
    Postgres. (It was left to CLAPQ_DECODE_TIMEOUT_S, 5 s from the claim, which a test process a few seconds late
    to stop Postgres let pass first.)"""
    from clapq.blobs import BlobStore
    from clapq.embedded import EmbeddedPostgres
    from clapq.queue import EMBED_TASK, make_celery

    pg, broker = EmbeddedPostgres(tmp_path / "pg"), EmbeddedRedis(tmp_path / "redis")
    url = pg.start()  # a Postgres of its own, stopped below
    broker.start()
    worker = None
    try:
        env, st, key, job_id, ids = a_job_with_a_pipe(services, tiny_model, tmp_path, url, broker.url, 4, 3,
                                                      CLAPQ_ITEMS_PER_TASK="3", CLAPQ_BATCH_SIZE="4",
                                                      CLAPQ_DECODE_TIMEOUT_S="600")
        with session_scope(url) as s:
            pipe = BlobStore(st["settings"].blob_dir).path_for(s.get(Item, uuid.UUID(ids[3])).sha256)
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        make_celery(st["settings"]).send_task(EMBED_TASK, args=[ids[:3]], queue=EMBED_QUEUE)

        def borrowed() -> bool:
            with session_scope(url) as s:
                return s.scalar(select(Item.status).where(Item.id == uuid.UUID(ids[3]))) == "running"

        def retried() -> bool:
            # whoever has the pipe open to read sees its end (a decoder tries a file more than one way, each
            # opening it again): its decoding fails
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:  # ENXIO: no reader now
                assert exc.errno == errno.ENXIO, exc
            return "embed_items[" in worker.output() and " retry: Retry in" in worker.output()

        wait_until(borrowed, 60, lambda: f"the later task's file taken: {worker.output()[-3000:]}")
        pg.stop()
        wait_until(lambda: "this task's heartbeat failed" in worker.output(), 60,
                   lambda: f"a heartbeat to meet the stopped Postgres: {worker.output()[-3000:]}")
        wait_until(retried, 60, lambda: f"the task's retry: {worker.output()[-3000:]}")
        pipe.unlink()
        pipe.write_bytes(b"not a sound")  # its next decoding, once it is handed back, fails at once too
        pg.start()
        final = wait_finished(st, key, job_id, timeout=180)
        assert final["counts"]["done"] == 3, final
        said = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
        failed = [r for r in said if "back failed" in r["msg"]]
        assert [r["msg"].split(" (")[0] for r in failed] == [
            "handing 1 file back failed, the database did not answer"], failed
        assert failed[0]["msg"].endswith("): Celery's retry of this task hands them back"), failed
        assert failed[0]["level"] == "warning" and "exc" not in failed[0], failed  # one line: no traceback
        # and its heartbeats, which failed each second with a traceback: said once, and once when one goes through
        beats = [r["msg"].split(" (")[0] for r in said if r["logger"] == "worker.heartbeat"]
        assert beats[:1] == ["this task's heartbeat failed, the database did not answer"], beats
        assert not [r for r in said if r["logger"] == "worker.heartbeat" and "exc" in r], beats
    finally:
        if worker is not None:
            worker.stop(signal.SIGKILL)
        broker.stop()
        pg.stop()


def test_after_postgres_was_away_running_files_are_not_taken_for_lost_at_once(services, tiny_model, tmp_path):
    """While Postgres does not answer no worker can record a heartbeat (and a task Celery retries beats not at
    all until its countdown ends): at the sweeper's first pass after an outage longer than
    CLAPQ_STALE_AFTER_S every running file looked lost, and was sent again one per task with a try counted,
    while its worker, alive, lost it. The time Postgres was away (from the last pass that went through to the
    next) does not count as silence: a file beating until the outage is taken CLAPQ_STALE_AFTER_S after it,
    and one silent that long before it (a dead worker's) at once."""
    from clapq.embedded import EmbeddedPostgres
    from clapq.db import migrate
    from clapq.queue import make_celery
    from clapq.settings import Settings
    from tests.conftest import job_of_own
    from worker.sweeper import Sweeps

    pg, broker = EmbeddedPostgres(tmp_path / "pg"), EmbeddedRedis(tmp_path / "redis")
    url = pg.start()  # a Postgres of its own, stopped below
    broker.start()
    try:
        migrate(url)
        settings = Settings.from_env(make_env(services, tiny_model, tmp_path / "blobs", DATABASE_URL=url,
                                              REDIS_URL=broker.url, CLAPQ_HEARTBEAT_S="1", CLAPQ_STALE_AFTER_S="3"))
        with session_scope(url) as s:
            tenant, _, lib, j = job_of_own(s, "away")
            s.add_all([Item(tenant_id=tenant.id, library_id=lib.id, job_id=j.id, sha256=c * 64, filename=f"{c}.wav",
                            size_bytes=1, status="running", attempts=1, claimed_by="task-1") for c in "ab"])

        def status() -> dict:
            with session_scope(url) as s:
                return dict(s.execute(select(Item.filename, Item.status)).all())

        sweeps = Sweeps(settings, make_celery(settings))
        assert sweeps() == 0 and status() == {"a.wav": "running", "b.wav": "running"}
        with session_scope(url) as s:  # a.wav beats until the outage; b.wav's worker died an hour ago
            s.execute(text("UPDATE items SET updated_at = now() - interval '1 hour' WHERE filename = 'b.wav'"))
            s.execute(text("UPDATE items SET updated_at = now() WHERE filename = 'a.wav'"))
        pg.stop()
        with pytest.raises(Exception):
            sweeps()
        time.sleep(4)  # longer than CLAPQ_STALE_AFTER_S
        pg.start()
        deadline = time.monotonic() + 60
        while sweeps.away:  # the pool's connections to the stopped server may fail a pass first
            assert time.monotonic() < deadline, "no pass went through"
            with contextlib.suppress(Exception):
                sweeps()
        back = time.monotonic()
        assert status() == {"a.wav": "running", "b.wav": "queued"}  # a.wav: queued before
        sweeps()
        assert status()["a.wav"] == "running"
        while time.monotonic() - back < 3.5:
            time.sleep(0.2)
        sweeps()
        assert status()["a.wav"] == "queued"
    finally:
        broker.stop()
        pg.stop()


@contextlib.contextmanager
def a_server_that_never_answers():
    """A TCP port whose connections the kernel takes and nobody answers (a stopped Postgres): its URL."""
    import socket

    from psycopg2 import extensions as ext

    from clapq import db as clapq_db

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    callback = ext.get_wait_callback()
    ext.set_wait_callback(clapq_db._wait)
    try:
        yield f"postgresql://clapq@127.0.0.1:{listener.getsockname()[1]}/clapq"
    finally:
        ext.set_wait_callback(callback)
        listener.close()


def test_a_connect_that_gets_no_answer_says_so(monkeypatch):
    """The error names a new connection, not a statement (psycopg2 changes a connect's status at its first
    poll, which the message was read from)."""
    import psycopg2

    from clapq import db as clapq_db

    monkeypatch.setattr(clapq_db, "CONNECT_TIMEOUT_S", 1)
    with a_server_that_never_answers() as url:
        with pytest.raises(clapq_db.NoAnswer, match="did not answer a new connection in 1 s"):
            psycopg2.connect(url)


def test_a_signal_raised_while_probing_is_not_taken_for_an_answer(monkeypatch):
    """An exception a signal handler raises in the probe's wait (Celery's soft time limit) reaches the caller;
    it was swallowed and counted as the server answering, so the statement waited on."""
    from clapq import db as clapq_db

    class SoftLimit(Exception):
        pass

    def soft_limit(*_):
        raise SoftLimit

    monkeypatch.setattr(clapq_db, "PROBE_S", 3.0)
    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        with a_server_that_never_answers() as url:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(SoftLimit):
                clapq_db._answers(url)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_signal_raised_in_a_statement_reaches_the_caller_as_itself(services):
    """A signal handler that raises while a statement waits (Celery's soft time limit) now interrupts the wait,
    and the wait callback's exception closes the connection. The caller of session_scope sees that exception,
    not InterfaceError 'connection already closed' from the rollback after it (helper-48: the worker takes
    InterfaceError for a passing fault, and retried the task with the try not counted)."""
    class SoftLimit(Exception):
        pass

    def soft_limit(*_):
        raise SoftLimit

    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(SoftLimit):
            with session_scope(services["database_url"]) as s:
                s.execute(text("SELECT pg_sleep(3)"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with session_scope(services["database_url"]) as s:  # the pool gives a working connection after it
        assert s.execute(text("SELECT 1")).scalar() == 1


def test_the_embedded_redis_answers_only_with_its_password(services):
    """Any local user can reach a loopback port: the embedded Redis takes commands only after AUTH with the
    password in REDIS_URL (helper-35: its query cache and queues were open to all), which is in a file only
    this user can read and not on the server's command line."""
    import psutil
    import redis

    server = services["redis"]
    assert redis.Redis.from_url(services["redis_url"]).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port).get("clapq:anything")
    conf = server.data_dir / "redis.conf"
    assert conf.stat().st_mode & 0o777 == 0o600 and server.password in conf.read_text()
    # its folder too: the append-only file beside it holds the cache and the tasks (helper-38)
    assert server.data_dir.stat().st_mode & 0o777 == 0o700
    assert server.password not in " ".join(psutil.Process(server.proc.pid).cmdline())


def test_redis_restarted_empty_mid_job(stack):
    key, job_id = job_under_way(stack, 120, 10)
    redis: EmbeddedRedis = stack["redis"]
    redis.proc.kill()  # no shutdown, no save
    redis.proc.wait()
    shutil.rmtree(redis.data_dir)  # and its data is gone
    assert job(stack, key, job_id)["counts"]["done"] < 120
    redis.start()  # same port, empty
    assert wait_finished(stack, key, job_id, timeout=300)["status"] == "done"
    assert_exactly_once(stack, job_id, 120)


def test_enqueue_fails_after_commit(stack):
    """The API's broker is unreachable when it enqueues: the rows are committed, marked as sent nowhere, and
    the sweeper delivers them at its next pass, not once they have been silent CLAPQ_STALE_AFTER_S (an hour
    here) with the queue empty."""
    from api import create_app

    stack["worker"]()
    stack["beat"] = Beat({**stack["env"], "CLAPQ_STALE_AFTER_S": "3600"}, stack["tmp"] / "beat.log")
    broken = dataclasses.replace(stack["settings"], redis_url="redis://127.0.0.1:9/0")
    stack["client"] = create_app(broken).test_client()
    key, _, job_id = start_job(stack, 12)
    assert job(stack, key, job_id)["status"] == "queued"
    assert wait_finished(stack, key, job_id, timeout=120)["status"] == "done"
    assert_exactly_once(stack, job_id, 12)


def test_files_of_a_model_no_worker_serves_wait_without_holding_up_the_rest(stack):
    """Files of a library bound to a model no worker runs were sent round for ever: each worker that met one
    sent it back at once and rested 5 s, so the queue was never empty and the sweeper never sent the files a
    dead worker had left (test_sigkill_worker_mid_job hung in CI, with such files left by other tests). They
    now stay queued, saying why, with no message in the queue, and the sweeper sends only files a live worker
    serves: here the files of a job whose messages were lost are delivered beside them."""
    waiting = queued_of_an_unserved_model(stack["settings"].database_url, 12)
    key, _, job_id = start_job(stack, 10)
    redis.Redis.from_url(stack["redis"].url).delete(*lanes())  # its messages lost, as by a Redis restart
    stack["worker"]()
    stack["start_beat"]()
    assert wait_finished(stack, key, job_id, timeout=120)["status"] == "done"
    assert_exactly_once(stack, job_id, 10)
    time.sleep(3)  # three more sweeps: nothing of theirs is sent
    assert queued_tasks(redis.Redis.from_url(stack["redis"].url)) == 0
    with session_scope(stack["settings"].database_url) as s:
        rows = s.execute(select(Item.status, Item.attempts).where(Item.id.in_(waiting))).all()
    assert rows == [("queued", 0)] * 12, rows
    log = stack["workers"][-1].output()
    assert "which no running worker serves" not in log and "sent again for a worker of theirs" not in log, log[-3000:]


def test_files_whose_worker_died_while_their_model_had_none_go_once_one_serves(stack):
    """A dead worker's files of a model no live worker serves (the only worker of it away, or still loading as
    `clapq up` starts) wait, queued with no message, and are sent at the first pass after a worker of theirs
    says it serves, busy queue or not (helper-45: set queued as any other, they waited CLAPQ_STALE_AFTER_S more
    and an empty queue, which steady uploads may never leave)."""
    from clapq import presence
    from clapq.queue import make_celery
    from tests.conftest import job_of_own
    from clapq.models import WAITING_FOR_MODEL
    from worker.sweeper import sweep_once

    settings = dataclasses.replace(stack["settings"], stale_after_s=3600)
    with session_scope(settings.database_url) as s:
        tenant, model, lib, j = job_of_own(s, f"away-{uuid.uuid4()}")
        items = [Item(tenant_id=tenant.id, library_id=lib.id, job_id=j.id, sha256=uuid.uuid4().hex * 2,
                      filename=f"lost{i}.wav", size_bytes=1, status="running", attempts=1, claimed_by="dead-task")
                 for i in range(3)]
        s.add_all(items)
        s.flush()
        s.execute(text("UPDATE items SET updated_at = now() - interval '2 hours' WHERE job_id = :j"), {"j": j.id})
        ids, model_id = [i.id for i in items], model.id

    def rows() -> list:
        with session_scope(settings.database_url) as s:
            return s.execute(select(Item.status, Item.claimed_by).where(Item.id.in_(ids))).all()

    app = make_celery(settings)
    broker = redis.Redis.from_url(settings.redis_url)
    sweep_once(settings, app)
    assert rows() == [("queued", WAITING_FOR_MODEL)] * 3 and broker.llen(EMBED_QUEUE) == 0
    with session_scope(settings.database_url) as s:  # and the item says why it waits
        assert set(s.scalars(select(Item.error).where(Item.id.in_(ids)))) == {
            "worker lost (its process died); no running worker serves this library's model, so it waits for one"}
    broker.rpush(EMBED_QUEUE, b"another upload's task")  # the queue is busy from now on
    presence.serve(app, model_id)
    try:
        wait_until(lambda: presence.serving(broker, {model_id}), 10, "the model said served")
        sweep_once(settings, app)
        assert rows() == [("queued", None)] * 3
        assert broker.llen(EMBED_QUEUE) == 1 + 3  # one task each: they were tried
        sweep_once(settings, app)  # sent once
        assert broker.llen(EMBED_QUEUE) == 4
    finally:
        presence.unserve(app)
        broker.delete(*lanes())


def test_the_sweeper_says_why_and_which_files_it_sends_again(stack, caplog):
    """Each reason files are sent again is its own log line, naming them and their jobs: after a worker killed mid-file,
    Redis restarted empty and an upload whose tasks Redis did not take, the log said "re-enqueued stranded items"
    with a count alone, the same for all three (helper-136, clapq run as separate processes)."""
    import logging

    from clapq import presence
    from clapq.models import NOT_SENT
    from clapq.queue import make_celery
    from tests.conftest import job_of_own
    from worker.sweeper import sweep_once

    settings = stack["settings"]
    with session_scope(settings.database_url) as s:
        tenant, model, lib, j = job_of_own(s, f"said-{uuid.uuid4()}")
        kinds = [("running", 1, "dead-task")] * 2 + [("queued", 0, NOT_SENT)] + [("queued", 0, None)] * 3
        items = [Item(tenant_id=tenant.id, library_id=lib.id, job_id=j.id, sha256=uuid.uuid4().hex * 2,
                      filename=f"f{i}.wav", size_bytes=1, status=status, attempts=tries, claimed_by=by)
                 for i, (status, tries, by) in enumerate(kinds)]
        s.add_all(items)
        s.flush()
        s.execute(text("UPDATE items SET updated_at = now() - interval '1 hour' WHERE job_id = :j"), {"j": j.id})
        ids, model_id, job_id = [str(i.id) for i in items], model.id, str(j.id)
    app = make_celery(settings)
    broker = redis.Redis.from_url(settings.redis_url)
    presence.serve(app, model_id)
    try:
        wait_until(lambda: presence.serving(broker, {model_id}), 10, "the model said served")
        with caplog.at_level(logging.WARNING, logger="worker.sweeper"):
            assert sweep_once(settings, app) == 6
    finally:
        presence.unserve(app)
        broker.delete(*lanes())
    said = {r.reason: r for r in caplog.records if r.name == "worker.sweeper" and hasattr(r, "reason")}
    assert set(said) == {"worker lost", "no task", "task lost"}, [r.getMessage() for r in caplog.records]
    assert [said["worker lost"].count, said["no task"].count, said["task lost"].count] == [2, 1, 3]
    assert sorted(said["worker lost"].item_ids) == sorted(ids[:2]) and said["no task"].item_ids == [ids[2]]
    assert sorted(said["task lost"].item_ids) == sorted(ids[3:])
    assert all(r.job_ids == [job_id] for r in said.values())
    assert "went silent for over 4 s (CLAPQ_STALE_AFTER_S)" in said["worker lost"].getMessage()
    assert "that try counts" in said["worker lost"].getMessage()
    assert "Redis restarted empty" in said["task lost"].getMessage()
    # and counted, by the same reasons, in /metrics (the stack's own Redis: these alone)
    assert resent_counted(stack) == {"worker_lost": 2, "no_task": 1, "task_lost": 3}


def resent_counted(st) -> dict[str, float]:
    """clapq_files_resent_total's reasons that are not 0, as the stack's API's /metrics says them."""
    body = st["client"].get("/metrics").get_data(as_text=True)
    counted = {m[1]: float(m[2])
               for m in re.finditer(r'^clapq_files_resent_total\{reason="(\w+)"\} (\S+)$', body, re.M)}
    assert len(counted) == 12, body
    return {k: v for k, v in counted.items() if v}


def test_files_a_dead_worker_left_are_counted_as_sent_again(stack):
    """Files sent again showed only in the log (a line at each pass): the maintenance loop's resends, and the files a
    worker hands back, are counted in /metrics by why (clapq_files_resent_total), across processes (in Redis). A
    worker killed mid-job: the real `clapq beat` sends its running files again, each counted once, worker_lost."""
    key, job_id = job_under_way(stack, 40, 4)

    def running_now() -> int:
        with session_scope(stack["settings"].database_url) as s:
            return s.scalar(select(func.count()).select_from(Item).where(Item.job_id == uuid.UUID(job_id),
                                                                          Item.status == "running"))

    for _ in range(5):  # killed between two tasks, it held no file (CI saw it once): a new worker, and again
        wait_until(running_now, 60, lambda: f"a file running: {job(stack, key, job_id)}")
        stack["workers"][-1].stop(signal.SIGKILL)
        running = running_now()
        if running:
            break
        stack["worker"]()
    assert running, job(stack, key, job_id)
    wait_until(lambda: resent_counted(stack).get("worker_lost") == running, 60,
               lambda: f"{running} files counted as sent again: {resent_counted(stack)}{logs_tail(stack)}")
    stack["worker"]()
    assert wait_finished(stack, key, job_id)["status"] == "done"
    assert resent_counted(stack)["worker_lost"] == running


def test_a_worker_says_once_that_redis_does_not_take_its_presence_and_once_that_it_does_again(stack, caplog):
    """A worker process tells Redis every few seconds that it serves its model; while Redis was down each try was a
    warning with a traceback, "serving update failed", for as long as it was down, saying neither what failed nor
    what it meant (helper-136). Now one line says it and what it costs, and one that Redis answers again."""
    import logging

    from clapq import presence
    from clapq.queue import make_celery

    settings = stack["settings"]
    app = make_celery(settings)
    stack["redis"].stop()
    with caplog.at_level(logging.INFO, logger="clapq.presence"):
        presence.serve(app, 987654, interval_s=0.1)
        try:
            time.sleep(1.5)  # ~15 tries
            stack["redis"].start()  # the same port and password, empty
            broker = redis.Redis.from_url(settings.redis_url)
            wait_until(lambda: presence.serving(broker, {987654}), 10, "the model said served again")
        finally:
            presence.unserve(app)
    said = [r for r in caplog.records if r.name == "clapq.presence"]
    assert len(said) == 2 and [r.levelname for r in said] == ["WARNING", "INFO"], [r.getMessage() for r in said]
    assert not said[0].exc_info
    assert said[0].getMessage().startswith("this worker process cannot tell Redis that it serves model 987654 "
                                           "(ConnectionError: "), said[0].getMessage()
    assert "the maintenance loop takes no worker to serve it" in said[0].getMessage()
    assert said[1].getMessage() == "Redis answers again: this worker process tells it that it serves model 987654 again"


def test_beat_as_a_containers_first_process_stops_on_sigterm(stack):
    """`docker compose stop` sends SIGTERM to the container's first process, which has no default action for it:
    `clapq beat` ran on until Docker killed it 10 s later, "Exited (137)" (helper-136, in a PID namespace of its own
    as in a container). It now ends after the step it is in, exit 0, saying so."""
    import psutil

    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) to give the beat a PID namespace of its own")
    log_path = stack["tmp"] / "beat-pid1.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "clapq.cli",
                                 "beat"], env=stack["env"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or "sweeper started" in log_path.read_text(errors="replace"), 60,
                   lambda: log_path.read_text(errors="replace"))
        if proc.poll() is not None:
            pytest.skip(f"unshare --pid refused here: {log_path.read_text(errors='replace')[-500:]}")
        (beat,) = psutil.Process(proc.pid).children()
        started = time.monotonic()
        beat.send_signal(signal.SIGTERM)
        assert proc.wait(8) == 0, log_path.read_text(errors="replace")
        assert time.monotonic() - started < 5
        said = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        assert said[-1]["msg"].startswith("the maintenance loop stopped, as it was told to"), said[-1]
        assert said[-1]["pid"] == 1  # the first process of its namespace, as in a container
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def failing_sends(app, after: int):
    """`app` whose Redis refuses every task sent after the first `after` (a connection lost mid-send)."""
    import redis as redis_py

    send, sent = app.send_task, []

    def flaky(*args, **kwargs):
        if len(sent) >= after:
            raise redis_py.ConnectionError("connection lost mid-send")
        sent.append(args)
        return send(*args, **kwargs)

    app.send_task = flaky
    return sent


def test_files_whose_task_was_not_sent_are_marked_and_sent_at_the_next_pass(stack):
    """A send that fails part-way marks only the files whose task did not go (helper-46: all 12 were marked,
    and the 8 already queued went twice); and a sweeper whose own send fails marks its files again (it had
    cleared their mark first, and they fell back to waiting CLAPQ_STALE_AFTER_S and an empty queue)."""
    from clapq import presence
    from clapq.models import NOT_SENT, park
    from clapq.queue import enqueue_committed, make_celery
    from tests.conftest import job_of_own
    from worker.sweeper import sweep_once

    settings = dataclasses.replace(stack["settings"], stale_after_s=3600)
    broker = redis.Redis.from_url(settings.redis_url)
    with session_scope(settings.database_url) as s:
        tenant, model, lib, j = job_of_own(s, f"flaky-{uuid.uuid4()}")
        items = [Item(tenant_id=tenant.id, library_id=lib.id, job_id=j.id, sha256=uuid.uuid4().hex * 2,
                      filename=f"f{i}.wav", size_bytes=1) for i in range(12)]
        s.add_all(items)
        s.flush()
        ids, model_id = [i.id for i in items], model.id
    app = make_celery(settings)
    failing_sends(app, after=1)
    unsent = enqueue_committed(app, ids, 8)
    assert unsent == ids[8:] and broker.llen(EMBED_QUEUE) == 1

    def marks() -> dict:
        with session_scope(settings.database_url) as s:
            return dict(s.execute(select(Item.claimed_by, func.count()).where(Item.id.in_(ids))
                                  .group_by(Item.claimed_by)).all())

    with session_scope(settings.database_url) as s:
        park(s, unsent, NOT_SENT)  # as the API does (api.db.send_committed)
    assert marks() == {None: 8, NOT_SENT: 4}
    broker.delete(*lanes())
    presence.serve(app, model_id)
    try:
        wait_until(lambda: presence.serving(broker, {model_id}), 10, "the model said served")
        sweeper_app = make_celery(settings)
        failing_sends(sweeper_app, after=0)
        with pytest.raises(RuntimeError, match="4 of 4 stranded files not sent"):
            sweep_once(settings, sweeper_app)
        assert marks() == {None: 8, NOT_SENT: 4} and broker.llen(EMBED_QUEUE) == 0
        assert sweep_once(settings, make_celery(settings)) == 4  # the next pass, its Redis back
        assert marks() == {None: 12} and broker.llen(EMBED_QUEUE) == 1
    finally:
        presence.unserve(app)
        broker.delete(*lanes())


def test_the_beat_removes_files_no_item_holds(stack):
    """`clapq beat` finishes what deletions left on disk: the files of a library deleted by SQL (its items
    went by cascade, as when a deleting API process dies after its commit), and temporary uploads a killed
    API process left; a recent temporary upload (a request still running) stays."""
    from clapq.blobs import BlobStore
    from tests.test_delete import _backdate

    st, store = stack, BlobStore(stack["settings"].blob_dir)
    key, lib, _ = start_job(st, 1)
    # bytes no other test's item holds (those would keep them); no worker: the files wait, queued
    files = [(io.BytesIO(b"RIFF" + os.urandom(1000)), f"r{i}.wav") for i in range(3)]
    r = st["client"].post(f"/v1/libraries/{lib}/batches", headers=auth(key), data={"files": files},
                          content_type="multipart/form-data")
    assert r.status_code == 202, r.get_json()
    with session_scope(st["settings"].database_url) as s:
        shas = list(s.scalars(select(Item.sha256).where(Item.job_id == uuid.UUID(r.get_json()["job_id"]))))
        s.execute(text("DELETE FROM libraries WHERE id = :l"), {"l": lib})
    _backdate(st["settings"], shas)
    stale, fresh = store.tmp_dir / "upload-stale", store.tmp_dir / "upload-fresh"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"arriving")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    assert len(shas) == 3 and all(store.exists(sha) for sha in shas)
    ready = st["client"].get("/readyz").get_json()["checks"]
    assert ready["maintenance"].startswith("warning: the maintenance loop made no pass lately"), ready
    st["start_beat"]()
    wait_until(lambda: not any(store.exists(sha) for sha in shas) and not stale.exists(), 60, "the beat's removal")
    assert fresh.exists()
    # and says that it is alive, which /readyz and /metrics tell (helper-41: a dead beat was seen nowhere)
    wait_until(lambda: st["client"].get("/readyz").get_json()["checks"]["maintenance"] == "ok", 30, "the beat's pass")
    assert "clapq_maintenance_live 1.0" in st["client"].get("/metrics").get_data(as_text=True)


def test_a_beat_whose_sweeps_fail_is_not_said_alive(stack):
    """`clapq beat` with a Postgres that refuses it: every sweep fails, and the maintenance loop is not said
    alive (the key was set after each pass whatever its sweep did, so /readyz said ok, helper-44), nor dead:
    /readyz said "made no pass lately (start `clapq beat`)" of a beat that ran, through a Postgres outage
    (helper-119); it says that it runs, for how long its passes have failed and which part, not the server's
    address (it takes no key). Each failure is one line saying why (it was a traceback at every pass of each of its
    three loops)."""
    import re

    beat = Beat({**stack["env"], "DATABASE_URL": "postgresql://clapq@127.0.0.1:1/clapq"}, stack["tmp"] / "beat.log")
    try:
        wait_until(lambda: (stack["tmp"] / "beat.log").read_text().count("sweep failed") >= 3, 60, "three sweeps")
        checks = stack["client"].get("/readyz").get_json()["checks"]
        assert re.fullmatch(r"warning: the maintenance loop \(`clapq beat`\) runs, but its passes have failed for "
                            r"[1-9][0-9]* s \(it cannot use Postgres; its log says why\): files a dead worker left, or "
                            r"whose task Redis did not take, are not sent again until one goes through",
                            checks["maintenance"]), checks
        assert checks["postgres"] == "ok"  # the API's: only the beat's is refused
        # an outage is a line a pass that says why, not a traceback a pass
        log = (stack["tmp"] / "beat.log").read_text()
        assert "sweep failed: connection to server at" in log and "Traceback" not in log, log[-3000:]
    finally:
        beat.stop()


def test_postgres_connections_dropped_mid_write(stack):
    key, job_id = job_under_way(stack, 120, 10)
    engine = get_engine(stack["settings"].database_url)
    killed = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and job(stack, key, job_id)["status"] == "running":
        with engine.begin() as conn:
            killed += conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                        "WHERE application_name = 'clapq-worker'")).scalar()
        time.sleep(0.3)
    assert killed > 0
    assert wait_finished(stack, key, job_id, timeout=300)["status"] == "done"
    assert_exactly_once(stack, job_id, 120)


def poison_job(stack) -> tuple[str, str, uuid.UUID]:
    """A job of 6 files, the first of which becomes a file whose read never returns (a FIFO): the decoder
    waits on it until whatever holds it is killed, as a crash in native code would end it."""
    from clapq.blobs import BlobStore

    settings = stack["settings"]
    key, lib_id, job_id = start_job(stack, 6)
    with session_scope(settings.database_url) as s:
        poison = s.scalars(select(Item).where(Item.job_id == uuid.UUID(job_id)).order_by(Item.filename)).first()
        poison_id, sha = poison.id, poison.sha256
    path = BlobStore(settings.blob_dir).path_for(sha)
    path.unlink()
    os.mkfifo(path)
    return key, job_id, poison_id


def kill_on_each_try(stack, poison_id: uuid.UUID, kill, each=lambda: None) -> int:
    """Call kill() each time the poison file is running on a new attempt, until it has failed, and each()
    every 0.3 s; returns the kills (kill() returns whether it could kill)."""
    kills = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with session_scope(stack["settings"].database_url) as s:
            item = s.get(Item, poison_id)
            status, attempts = item.status, item.attempts
        if status == "failed":
            break
        each()
        if status == "running" and attempts > kills and kill():
            kills += 1
        time.sleep(0.3)
    return kills


def failed_in_its_bytes(stack, key: str, item_id: uuid.UUID) -> dict | None:
    """What /known says of a failed file's bytes under `failed` (those `clapq upload` does not send again unasked:
    they failed for a reason in their bytes), None where it names them not."""
    with session_scope(stack["settings"].database_url) as s:
        item = s.get(Item, item_id)
        lib, sha = item.library_id, item.sha256
    r = stack["client"].post(f"/v1/libraries/{lib}/known", json={"sha256": [sha]}, headers=auth(key))
    assert r.status_code == 200 and sha not in r.get_json()["known"], r.get_json()
    return r.get_json()["failed"].get(sha)


def test_a_decode_past_its_cpu_limit_fails_in_the_files_bytes_and_one_past_the_clock_does_not(stack):
    """Two files of a job whose decoding does not end in time, each failing alone while the rest are embedded. One
    whose read never returns (a FIFO: a blob store on a hung network mount; a machine too busy to give its decoder
    its share is the same to the clock) is killed after CLAPQ_DECODE_TIMEOUT_S having used no CPU time: not for a
    reason in its bytes, so `clapq upload` sends it again. Before, the clock's limit counted as the file's, and a good
    file on a machine overloaded at that moment was left out of every later run for good. One that works its decoder
    past CLAPQ_DECODE_CPU_S (an hour of silence at 192 kHz, seconds of a core, against a limit of 1 s here:
    as a codec that spins on crafted bytes) fails for a reason in its bytes, so a folder uploaded every night does
    not send it again to hold a decoder at every run (helper-74)."""
    from clapq.blobs import BlobStore
    from tests.audio import long_silence

    key, job_id, poison_id = poison_job(stack)
    with session_scope(stack["settings"].database_url) as s:
        spins = s.scalars(select(Item).where(Item.job_id == uuid.UUID(job_id)).order_by(Item.filename)).all()[1]
        spins_id, sha = spins.id, spins.sha256
    long_silence(BlobStore(stack["settings"].blob_dir).path_for(sha), 60)  # in its stored copy's place
    # the clock's limit well past the second the spinning file may use, however busy this machine is
    w = WorkerProcess(dict(stack["env"], CLAPQ_DECODE_TIMEOUT_S="30", CLAPQ_DECODE_CPU_S="1"),
                      stack["tmp"] / "limits.log").start()
    stack["workers"].append(w)
    final = wait_finished(stack, key, job_id)
    assert final["status"] == "done_with_errors" and final["counts"]["done"] == 4, final
    errors = {e["item_id"]: e["error"] for e in final["errors"]}
    assert re.fullmatch(r"decoding took longer than 30 s \(CLAPQ_DECODE_TIMEOUT_S\), in which the decoder worked "
                        r"0\.\d s of CPU time: the machine was too busy or the stored copy too slow to read, not the "
                        r"file at fault; gave up", errors[str(poison_id)]), errors
    assert failed_in_its_bytes(stack, key, poison_id) is None
    error = "decoding took more than 1 s of the decoder's CPU time (CLAPQ_DECODE_CPU_S); gave up"
    assert errors[str(spins_id)] == error, errors
    assert failed_in_its_bytes(stack, key, spins_id) == {"item_id": str(spins_id), "error": error}


def test_a_stored_copy_that_cannot_be_read_fails_but_not_in_its_bytes(stack):
    """A file whose stored copy the worker cannot read (a directory in its place, as a blob store on a mount that
    went wrong may show; an I/O error, too many open files, no permission meet the same check) fails, but not for
    a reason in its bytes: `clapq upload` sends it again, where before it was marked as the file's ("decoder
    error: IsADirectoryError") and left out of every later run for good. A file of text named .wav beside it in
    the same job is still marked as failed in its bytes; the rest are embedded."""
    from clapq.blobs import BlobStore

    settings = stack["settings"]
    key, _, job_id = start_job(stack, 6)
    with session_scope(settings.database_url) as s:
        first, second = s.scalars(select(Item).where(Item.job_id == uuid.UUID(job_id)).order_by(Item.filename)).all()[:2]
        lost, text_id = (first.id, first.sha256), (second.id, second.sha256)
    blobs = BlobStore(settings.blob_dir)
    blobs.path_for(lost[1]).unlink()
    blobs.path_for(lost[1]).mkdir()
    blobs.path_for(text_id[1]).write_bytes(b"this is a shopping list, not audio\n" * 30)
    try:
        stack["worker"]()
        final = wait_finished(stack, key, job_id)
    finally:
        blobs.path_for(lost[1]).rmdir()
    assert final["status"] == "done_with_errors" and final["counts"]["done"] == 4, final
    errors = {e["item_id"]: e["error"] for e in final["errors"]}
    assert errors[str(lost[0])].startswith("the stored copy of the file could not be read ("), errors
    assert failed_in_its_bytes(stack, key, lost[0]) is None
    assert errors[str(text_id[0])].startswith("not a readable audio file"), errors
    assert failed_in_its_bytes(stack, key, text_id[0]) == {"item_id": str(text_id[0]), "error": errors[str(text_id[0])]}


def test_an_io_error_partway_through_a_stored_copy_fails_it_but_not_in_its_bytes(stack, eio_library):
    """A worker whose reads of one stored copy fail with EIO from its middle on (a failing disk under the blob
    store, a network mount's hiccup: real read errors, from an LD_PRELOAD library in the worker and its decoder
    children): the file fails, "the stored copy of the file could not be read (Input/output error)", not for a
    reason in its bytes, so `clapq upload` sends it again. It was embedded and done with the first half of its
    audio alone, and the same bytes were never sent again. The job's other files are embedded whole."""
    from clapq.blobs import BlobStore
    from tests import eio

    settings = stack["settings"]
    with session_scope(settings.database_url) as s:
        from clapq.keys import create_key

        key = create_key(s, f"faults-{uuid.uuid4().hex[:8]}")
    c = stack["client"]
    lib = c.post("/v1/libraries", json={"name": "eio"}, headers=auth(key)).get_json()
    r = c.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), content_type="multipart/form-data",
               data={"files": make_batch(3, seconds=20.0)})
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["job_id"]
    with session_scope(settings.database_url) as s:
        items = s.scalars(select(Item).where(Item.job_id == uuid.UUID(job_id)).order_by(Item.filename)).all()
        bad, bad_sha = items[0].id, items[0].sha256
    stack["env"].update(eio.env(eio_library, [BlobStore(settings.blob_dir).path_for(bad_sha)], at="50%"))
    stack["worker"]()
    final = wait_finished(stack, key, job_id)
    assert final["status"] == "done_with_errors" and final["counts"]["done"] == 2, final
    assert final["errors"] == [{"item_id": str(bad), "filename": "f000.wav",
                                "error": "the stored copy of the file could not be read (Input/output error)"}], final
    assert failed_in_its_bytes(stack, key, bad) is None
    with session_scope(settings.database_url) as s:
        done = s.scalars(select(Item).where(Item.job_id == uuid.UUID(job_id), Item.status == "done")).all()
        assert sorted(round(i.duration_s, 1) for i in done) == [20.0, 20.0]


def test_poison_file_that_kills_its_worker_fails_after_the_attempt_limit(stack):
    """A file on which the worker dies every time: failed after CLAPQ_MAX_ATTEMPTS, the rest completes. Not
    for a reason known to be in its bytes (the workers may have died of something else): `clapq upload` sends it
    again, a retry."""
    key, job_id, poison_id = poison_job(stack)
    stack["start_beat"]()

    def worker_up() -> None:  # a new worker after each kill
        if not stack["workers"] or stack["workers"][-1].proc is None:
            stack["worker"]()

    def kill() -> bool:  # the whole worker
        stack["workers"][-1].stop(signal.SIGKILL)
        return True

    kills = kill_on_each_try(stack, poison_id, kill, each=worker_up)
    final = wait_finished(stack, key, job_id)
    assert final["status"] == "done_with_errors", final
    assert final["counts"]["done"] == 5 and final["counts"]["failed"] == 1
    err = final["errors"][0]["error"]
    assert "gave up after 3 attempts" in err, err
    assert kills == 3
    assert failed_in_its_bytes(stack, key, poison_id) is None


def test_poison_file_that_kills_only_the_pool_child_takes_no_other_file_with_it(stack):
    """The pool child dies on a file (a native crash, the OOM killer) but the worker's main process lives:
    Celery hands the same message back at once. Its files then go on one per task, as the sweeper sends
    those of a dead worker, so the file that kills runs out of attempts alone and the rest are embedded."""
    import psutil

    w = stack["worker"]()
    key, job_id, poison_id = poison_job(stack)

    def kill() -> bool:  # the pool child only, once the main process has started one
        kids = [p for p in psutil.Process(w.proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        if len(kids) != 1:
            return False
        kids[0].kill()
        return True

    kills = kill_on_each_try(stack, poison_id, kill)
    assert w.proc.poll() is None  # the main process lived through it all
    final = wait_finished(stack, key, job_id)
    assert final["status"] == "done_with_errors", final
    assert final["counts"]["done"] == 5 and final["counts"]["failed"] == 1, final
    assert "gave up after 3 attempts" in final["errors"][0]["error"], final
    assert kills == 3
    with session_scope(stack["settings"].database_url) as s:
        others = s.scalars(select(Item.attempts).where(Item.job_id == uuid.UUID(job_id), Item.id != poison_id)).all()
    assert max(others) <= 2, others  # the try that crashed, and their own


def test_files_borrowed_by_a_task_whose_process_died_go_on_at_once(stack):
    """A task fills its last batch with files of a later task (claim_more), and its pool child dies while
    it holds them: the later task found them taken and ended. When Celery hands the first message back,
    those files go on at once, one per task, not after CLAPQ_STALE_AFTER_S (an hour here, and no sweeper
    runs): before, they waited for the sweeper with the worker idle."""
    import psutil

    from clapq.blobs import BlobStore

    settings = stack["settings"]
    key, _, first = start_job(stack, 8)  # one task (CLAPQ_ITEMS_PER_TASK 8), sent before any worker runs
    later_key, _, later = start_job(stack, 8, first=8)  # a tenant of its own, other bytes
    with session_scope(settings.database_url) as s:
        poison = s.scalars(select(Item).where(Item.job_id == uuid.UUID(later)).order_by(Item.filename)).first()
        poison_id, sha = poison.id, poison.sha256
    path = BlobStore(settings.blob_dir).path_for(sha)  # a read that never returns, as a native hang would
    path.unlink()
    os.mkfifo(path)
    # batches of 16: the first task's 8 one-window files leave 8 rows of its last batch to fill
    w = WorkerProcess(dict(stack["env"], CLAPQ_BATCH_SIZE="16", CLAPQ_STALE_AFTER_S="3600", CLAPQ_DECODE_TIMEOUT_S="5"),
                      stack["tmp"] / "borrow.log").start()
    stack["workers"].append(w)

    def held_by_the_first_task():  # the later job's files, taken by the first job's task
        with session_scope(settings.database_url) as s:
            mine = set(s.scalars(select(Item.claimed_by).where(Item.job_id == uuid.UUID(first))))
            rows = s.execute(select(Item.status, Item.claimed_by).where(Item.id == poison_id)).one()
        return rows.status == "running" and rows.claimed_by in mine

    wait_until(held_by_the_first_task, 120, "the first task to take the later job's files")
    kids = [p for p in psutil.Process(w.proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
    assert len(kids) == 1, kids
    kids[0].kill()
    done = wait_finished(stack, later_key, later, timeout=180)
    assert done["counts"]["done"] == 7 and done["counts"]["failed"] == 1, done
    assert wait_finished(stack, key, first)["counts"]["done"] == 8
    assert w.proc.poll() is None


def test_a_worker_that_cannot_load_its_model_stops_and_drops_no_file(stack, tiny_model, tmp_path):
    """Weights that pass the start-up check (config, hash) but do not load: the worker stops, where before it
    took each message and dropped it (the files stayed `queued`, with no error, until the sweeper). The
    files are untouched, and a worker that can load the model embeds them from the same messages."""
    broken = tmp_path / "broken-clap"
    shutil.copytree(tiny_model, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file" * 100)
    key, lib_id, job_id = start_job(stack, 2)
    log_path = tmp_path / "broken-worker.log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "clapq.cli", "worker"], env={**stack["env"], "CLAPQ_MODEL": str(broken)},
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            p.wait(180)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text_log = log_path.read_text(errors="replace")
    assert "this worker cannot load its model" in text_log, text_log[-3000:]
    with session_scope(stack["settings"].database_url) as s:
        items = s.scalars(select(Item).where(Item.job_id == uuid.UUID(job_id))).all()
        assert [(i.status, i.attempts, i.error) for i in items] == [("queued", 0, None)] * 2
    stack["worker"]()  # no sweeper runs here: only the original messages can bring the files
    final = wait_finished(stack, key, job_id)
    assert final["status"] == "done" and final["counts"]["done"] == 2, final


def test_a_pool_child_started_after_the_weights_were_replaced_does_not_embed_as_the_old_model(stack, tiny_model,
                                                                                            tmp_path):
    """`clapq worker` takes its model's identity (the weights' sha256) in its main process, and each pool child
    loads the weights from the checkpoint's directory after the fork. Weights replaced there while it ran (another
    checkpoint copied over) were loaded by the pool child that replaced a dead one (the OOM killer, a native
    crash) under the identity the main process had taken: its vectors were stored as the old model's, beside
    theirs in its libraries (cosine 0.003 to what that model gives, against clapq up). Now such a child says the
    weights changed and stops the worker, so that its supervisor starts it again on the checkpoint now there, as
    the model it is."""
    import psutil

    from tests.test_model_fetch import _replace_weights

    ckpt_dir = tmp_path / "clap"
    shutil.copytree(tiny_model, ckpt_dir)
    w = WorkerProcess({**stack["env"], "CLAPQ_MODEL": str(ckpt_dir)}, tmp_path / "replaced.log").start()
    stack["workers"].append(w)
    deadline = time.monotonic() + 90
    while w.output().count('"model loaded"') < 1:
        assert time.monotonic() < deadline, w.output()[-3000:]
        time.sleep(0.2)
    _replace_weights(ckpt_dir)
    kids = [p for p in psutil.Process(w.proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
    assert len(kids) == 1, kids
    kids[0].kill()
    deadline = time.monotonic() + 90
    while w.proc.poll() is None and w.output().count('"model loaded"') < 2:
        assert time.monotonic() < deadline, w.output()[-3000:]
        time.sleep(0.2)
    assert w.output().count('"model loaded"') == 1, w.output()[-3000:]  # loaded once, the weights it identified
    w.proc.wait(60)
    assert "changed while clapq ran" in w.output(), w.output()[-3000:]


def worker_of_a_copy(stack, tmp_path, monkeypatch, **env) -> tuple[WorkerProcess, Path]:
    """`clapq worker` running a copy of the code (the `clapq` and `worker` packages), which a test may change as an
    upgrade in place would, its model loaded; the copy's folder."""
    import clapq
    import worker

    code = tmp_path / "code"
    for pkg in (Path(clapq.__file__).parent, Path(worker.__file__).parent):
        shutil.copytree(pkg, code / pkg.name, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)  # `python -m` looks in the working directory first
    w = WorkerProcess({**stack["env"], "PYTHONPATH": str(code), **env}, tmp_path / "upgraded.log").start()
    stack["workers"].append(w)
    wait_until(lambda: '"model loaded"' in w.output(), 90, lambda: w.output()[-3000:])
    return w, code


def upgrade(code: Path) -> None:
    """A new version of the decoder child: a status its parent of the old one does not know."""
    child = code / "worker" / "decoder.py"
    child.write_text(child.read_text().replace('reply = ("ok", ', 'reply = ("decoded", '))


def kill_decoders(w: WorkerProcess) -> None:
    """As a crash, a timeout or the OOM killer ends them: the next file starts new ones."""
    import psutil

    decoders = [p for p in psutil.Process(w.proc.pid).children(recursive=True)
                if "worker.decoder" in " ".join(p.cmdline())]
    assert decoders
    for p in decoders:
        p.kill()


def stopped_blaming_no_file(stack, w: WorkerProcess, ids: list) -> list:
    """Once the worker has stopped, saying that its code changed, with none of these files failed: their (status,
    attempts, error)."""
    def items():
        with session_scope(stack["settings"].database_url) as s:
            return [(i.status, i.attempts, i.error) for i in s.scalars(select(Item).where(Item.id.in_(ids))).all()]

    wait_until(lambda: w.proc.poll() is not None or any(st == "failed" for st, _, _ in items()), 120,
               lambda: f"the worker to stop: {items()}\n{w.output()[-3000:]}")
    assert not any(st == "failed" for st, _, _ in items()), (items(), w.output()[-3000:])
    assert w.proc.wait(60) is not None
    assert "the worker's code changed on disk since it started" in w.output(), w.output()[-3000:]
    return items()


def test_a_worker_whose_code_changed_on_disk_stops_and_blames_no_file(stack, tmp_path, monkeypatch):
    """clapq upgraded in place (`git pull`, `pip install -U`) under a running worker, here a new status in the
    decoder child's answer. The worker's decoder children are fresh interpreters: the next one started (after a
    crash, a timeout, the OOM killer) ran the new code, and the worker, still running the old, failed each good file
    of its next task (its write of the child's answer a ValueError, every try counted). Now the worker stops at its
    next task, before it takes the files, saying why, so that its supervisor starts it again on the new code; the
    files are untouched, and a worker of the new code embeds them from the same message."""
    w, code = worker_of_a_copy(stack, tmp_path, monkeypatch)
    upgrade(code)
    kill_decoders(w)
    key, _, job_id = start_job(stack, 3)
    ids = [uuid.UUID(i) for i in files_in_order(stack, job_id)]
    assert stopped_blaming_no_file(stack, w, ids) == [("queued", 0, None)] * 3
    stack["worker"]()  # the new code, restarted (the repository's, as the copy was before the change)
    final = wait_finished(stack, key, job_id)
    assert final["status"] == "done" and final["counts"]["done"] == 3, final
    assert_exactly_once(stack, job_id, 3)


def test_a_worker_upgraded_in_place_mid_task_hands_its_files_back_uncounted(stack, tmp_path, monkeypatch):
    """The upgrade comes while a task runs, and its decoder children die (killed from outside, one on a file whose
    read does not return, a FIFO) or are still starting (a child that loads the new code finds so itself): the
    child that would take the file again runs the new code. The task hands every file it holds back to the queue
    at once, this try not counted, and the worker stops, saying why; none fails, and a worker of the new code
    embeds them all."""
    from clapq.blobs import BlobStore

    key, _, job_id = start_job(stack, 3)  # before any worker runs: the first file's read is made to hang first
    ids = [uuid.UUID(i) for i in files_in_order(stack, job_id)]
    with session_scope(stack["settings"].database_url) as s:
        sha = s.scalars(select(Item.sha256).where(Item.job_id == uuid.UUID(job_id)).order_by(Item.filename)).first()
    blob = BlobStore(stack["settings"].blob_dir).path_for(sha)
    data = blob.read_bytes()
    blob.unlink()
    os.mkfifo(blob)
    w, code = worker_of_a_copy(stack, tmp_path, monkeypatch, CLAPQ_DECODE_TIMEOUT_S="300")
    wait_until(lambda: job(stack, key, job_id)["counts"].get("running", 0) > 0, 60, "the task to take its files")
    upgrade(code)
    kill_decoders(w)
    items = stopped_blaming_no_file(stack, w, ids)
    back = [(st, n) for st, n, why in items if st != "done" and "code changed on disk" in why]
    assert back and back == [("queued", 0)] * len(back) and len(back) + sum(st == "done" for st, _, _ in items) == 3, \
        items  # the file that hung at least (those after it wait for it, in order)
    blob.unlink()
    blob.write_bytes(data)
    stack["worker"]()
    final = wait_finished(stack, key, job_id)
    assert final["status"] == "done" and final["counts"]["done"] == 3, final
    assert_exactly_once(stack, job_id, 3)


def test_a_pool_child_started_after_the_code_changed_on_disk_stops_the_worker(stack, tmp_path, monkeypatch):
    """The same upgrade in place, met by a pool child that replaced a dead one (the OOM killer, a native crash):
    forked from Celery's main process, which runs the old code, it would import the modules it had not yet loaded
    (the pipeline, the decoder) from the new. It stops the worker at its warm-up, saying why, before it takes a
    file, as a pool child that meets changed weights does."""
    import psutil

    w, code = worker_of_a_copy(stack, tmp_path, monkeypatch)
    with open(code / "worker" / "audio.py", "a") as f:
        f.write("\n# a newer version\n")
    kids = [p for p in psutil.Process(w.proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
    assert len(kids) == 1, kids
    kids[0].kill()
    w.proc.wait(120)
    assert "the worker's code changed on disk since it started" in w.output(), w.output()[-3000:]
    assert w.output().count('"model loaded"') == 1, w.output()[-3000:]
