"""Job semantics: copies of files the library holds count as those files stand (a failed file uploaded
again is retried), cancel, retry-failed, listing and paging, backpressure."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import re
import threading
import uuid

from tests.audio import write
from tests.conftest import auth, just_before, row_lockable, wait_for_a_lock_wait, wait_job
from tests.test_e2e import upload


def test_duplicates_count_as_done_and_jobs_page(client, new_key, worker, tmp_path):
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "j"}, headers=auth(key)).get_json()
    files = [write(tmp_path / f"{i}.wav", 1.0, freq=200 + 100 * i, seed=i) for i in range(5)]
    first = upload(client, key, lib["id"], files[:3]).get_json()
    assert wait_job(client, key, first["job_id"])["status"] == "done"
    # files[0] again (twice) plus two new ones
    second = upload(client, key, lib["id"], [files[0], files[3], files[0], files[4]]).get_json()
    dup = [i for i in second["items"] if "duplicate_of" in i]
    assert len(dup) == 2 and {i["duplicate_of"] for i in dup} == {first["items"][0]["id"]}
    job = wait_job(client, key, second["job_id"])
    assert job["status"] == "done" and job["counts"]["total"] == 4 and job["counts"]["done"] == 4
    assert job["counts"]["duplicates"] == 2 and job["progress"] == 1.0

    third = upload(client, key, lib["id"], [files[1]]).get_json()
    wait_job(client, key, third["job_id"])
    page1 = client.get("/v1/jobs?limit=2", headers=auth(key)).get_json()
    assert [j["id"] for j in page1["jobs"]] == [third["job_id"], second["job_id"]]  # newest first
    page2 = client.get(f"/v1/jobs?limit=2&cursor={page1['next_cursor']}", headers=auth(key)).get_json()
    assert [j["id"] for j in page2["jobs"]] == [first["job_id"]] and page2["next_cursor"] is None
    assert client.get("/v1/jobs?cursor=garbage", headers=auth(key)).status_code == 400
    # made-up cursors: an offset past Postgres's +-15:59 (was a 500) is read in UTC; no time zone, or a
    # time before year 1 in UTC, is not a cursor this API returns
    def made(when: str) -> str:
        return base64.urlsafe_b64encode(f"{when}|{uuid.uuid4()}".encode()).decode().rstrip("=")

    for when in ("2020-01-01T00:00:00+23:00", "2020-01-01T00:00:00+14:00"):
        r = client.get(f"/v1/jobs?cursor={made(when)}", headers=auth(key))
        assert r.status_code == 200 and r.get_json()["jobs"] == [], (when, r.get_json())  # all newer than 2020
    for when in ("2020-01-01T00:00:00", "0001-01-01T00:00:00+01:00"):
        r = client.get(f"/v1/jobs?cursor={made(when)}", headers=auth(key))
        assert r.status_code == 400 and "cursor" in r.get_json()["error"]["message"], (when, r.get_json())
    assert client.get("/v1/jobs", headers=auth(new_key())).get_json()["jobs"] == []

    items = client.get(f"/v1/jobs/{first['job_id']}/items?limit=2", headers=auth(key)).get_json()
    rest = client.get(f"/v1/jobs/{first['job_id']}/items?limit=2&cursor={items['next_cursor']}",
                      headers=auth(key)).get_json()
    assert sorted(i["id"] for i in items["items"] + rest["items"]) == sorted(i["id"] for i in first["items"])
    assert rest["next_cursor"] is None
    assert client.get(f"/v1/jobs/{first['job_id']}/items?status=bogus", headers=auth(key)).status_code == 400


def test_a_batch_is_listed_in_the_order_its_files_were_sent(client, new_key, tmp_path):
    """A library's listing and a job's go oldest first, and a batch's files share one created_at: they
    come in the order the batch sent them (their ids sort so), page after page. Before, in the order of
    their random ids."""
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "in order"}, headers=auth(key)).get_json()
    names = ["m", "b", "z", "a", "q", "c", "y", "k"]
    sent = upload(client, key, lib["id"], [write(tmp_path / f"{n}.wav", 0.2, seed=300 + i)
                                           for i, n in enumerate(names)]).get_json()
    assert [i["filename"] for i in sent["items"]] == [f"{n}.wav" for n in names]
    for listing in (f"/v1/libraries/{lib['id']}/items", f"/v1/jobs/{sent['job_id']}/items"):
        seen, cursor = [], None
        while True:
            page = client.get(listing, query_string={"limit": 3, **({"cursor": cursor} if cursor else {})},
                              headers=auth(key)).get_json()
            seen += [i["id"] for i in page["items"]]
            if not (cursor := page["next_cursor"]):
                break
        assert seen == [i["id"] for i in sent["items"]], listing


def test_uploading_a_failed_file_again_retries_it_in_the_new_job(client, new_key, worker, tmp_path):
    """Not a silent "duplicate, done": the new job tracks the file again and reports how it ended."""
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "again"}, headers=auth(key)).get_json()
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"still not audio")
    good = write(tmp_path / "fine.wav", 1.0, seed=4)
    first = upload(client, key, lib["id"], [bad, good]).get_json()
    assert wait_job(client, key, first["job_id"])["status"] == "done_with_errors"
    bad_id = first["items"][0]["id"]

    second = client.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), content_type="multipart/form-data",
                         data={"files": [(io.BytesIO(p.read_bytes()), p.name) for p in (bad, good, bad)],
                               "metadata": json.dumps({"broken.wav": {"take": 2}})}).get_json()
    retried, dup, again = second["items"]
    sha = hashlib.sha256(bad.read_bytes()).hexdigest()  # each file's, of the bytes received
    assert retried == {"id": bad_id, "filename": "broken.wav", "sha256": sha, "status": "queued", "retry_of": "failed"}
    assert dup["duplicate_of"] == first["items"][1]["id"] and dup["status"] == "done"
    # the same bytes twice in one batch: one retry, then a duplicate of it
    assert again == {"id": bad_id, "filename": "broken.wav", "sha256": sha, "status": "queued", "duplicate_of": bad_id}
    job = wait_job(client, key, second["job_id"])
    assert job["status"] == "done_with_errors", job
    # both copies of the broken file failed: the retried one, and its copy in the same batch
    assert job["counts"]["failed"] == 2 and job["counts"]["duplicates"] == 2 and job["counts"]["total"] == 3
    assert [e["item_id"] for e in job["errors"]] == [bad_id]
    assert "not a readable audio file" in job["errors"][0]["error"]
    item = client.get(f"/v1/items/{bad_id}", headers=auth(key)).get_json()
    assert item["status"] == "failed" and item["attempts"] == 1 and item["job_id"] == second["job_id"]
    assert item["metadata"] == {"take": 2}  # what the retry was sent with
    # the file now belongs to the newer job; the first keeps the file that worked
    old = client.get(f"/v1/jobs/{first['job_id']}", headers=auth(key)).get_json()
    assert old["status"] == "done" and old["counts"]["total"] == 1


def test_retry_failed_and_cancel(client, new_key, worker, tmp_path, settings):
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "r"}, headers=auth(key)).get_json()
    good = write(tmp_path / "good.wav", 1.0)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"definitely not audio")
    up = upload(client, key, lib["id"], [good, bad]).get_json()
    job = wait_job(client, key, up["job_id"])
    assert job["status"] == "done_with_errors"
    failed = client.get(f"/v1/jobs/{up['job_id']}/items?status=failed", headers=auth(key)).get_json()["items"]
    assert [i["filename"] for i in failed] == ["bad.wav"] and failed[0]["attempts"] == 1
    # the worker's log is structured JSON that names the tenant, job, item and task
    lines = [json.loads(x) for x in worker.output().splitlines() if x.startswith("{")]
    hit = [x for x in lines if x.get("msg") == "item failed" and x.get("item_id") == failed[0]["id"]]
    assert hit and hit[0]["job_id"] == up["job_id"] and hit[0]["task_id"] and hit[0]["tenant_id"]
    r = client.post(f"/v1/jobs/{up['job_id']}/retry", headers=auth(key))
    assert r.status_code == 202 and r.get_json()["requeued"] == 1
    again = wait_job(client, key, up["job_id"])
    assert again["status"] == "done_with_errors" and again["counts"]["done"] == 1  # the good one untouched
    assert client.get(f"/v1/items/{failed[0]['id']}", headers=auth(key)).get_json()["attempts"] == 1
    assert client.post(f"/v1/jobs/{up['job_id']}/cancel", headers=auth(key)).status_code == 409
    r = client.post("/v1/search", json={"library_id": lib["id"], "item_id": failed[0]["id"]}, headers=auth(key))
    assert r.status_code == 409 and r.get_json()["error"]["message"].startswith(
        f"item {failed[0]['id']} has no embedding: it failed: "), r.get_json()

    # cancel a job whose items cannot start: a library of the tenant whose work the worker never sees
    from api import create_app

    paused = create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:9/0")).test_client()
    files = [(io.BytesIO(good.read_bytes() + b"%d" % i), f"{i}.wav") for i in range(3)]
    up2 = paused.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), data={"files": files},
                      content_type="multipart/form-data").get_json()
    assert up2["items"] and client.get(f"/v1/jobs/{up2['job_id']}", headers=auth(key)).get_json()["status"] == "queued"
    # one of them as a worker's task holds it while embedding it
    from sqlalchemy import text

    from clapq.db import session_scope
    from worker.store import heartbeat

    running = up2["items"][0]["id"]
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET status = 'running', claimed_by = 'task-x' WHERE id = :i"), {"i": running})
        assert heartbeat(s, [uuid.UUID(running)], "task-x") == set()
    c = client.post(f"/v1/jobs/{up2['job_id']}/cancel", headers=auth(key)).get_json()
    assert c["status"] == "cancelled" and c["counts"]["cancelled"] == 3
    assert c["progress"] == 0.0 and c["eta_s"] is None, c  # where the cancel stopped it (it said 1.0: all of it)
    r = client.post("/v1/search", json={"library_id": lib["id"], "item_id": up2["items"][1]["id"]}, headers=auth(key))
    assert r.status_code == 409 and "its embedding was cancelled; retry its job" in r.get_json()["error"]["message"]
    # the running one too: that task's next heartbeat names it, and the task drops its windows
    with session_scope(settings.database_url) as s:
        assert heartbeat(s, [uuid.UUID(running)], "task-x") == {uuid.UUID(running)}


def test_backpressure_answers_429_with_retry_after(client, new_key, settings):
    from api import create_app

    full = create_app(dataclasses.replace(settings, max_pending=0)).test_client()
    key = new_key()
    lib = full.post("/v1/libraries", json={"name": "bp"}, headers=auth(key)).get_json()
    r = full.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), content_type="multipart/form-data",
                  data={"files": [(io.BytesIO(b"x"), "x.wav")]})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert "CLAPQ_MAX_PENDING" in r.get_json()["error"]["message"]


def test_a_tenants_share_of_the_backlog_is_a_quarter_of_it_unless_set():
    from clapq.settings import Settings

    assert Settings.from_env({}).max_pending_per_tenant == 50_000
    assert Settings.from_env({"CLAPQ_MAX_PENDING": "20000"}).max_pending_per_tenant == 5_000
    assert Settings.from_env({"CLAPQ_MAX_PENDING": "2"}).max_pending_per_tenant == 1
    assert Settings.from_env({"CLAPQ_MAX_PENDING": "20000",
                              "CLAPQ_MAX_PENDING_PER_TENANT": "20000"}).max_pending_per_tenant == 20_000


def test_one_tenants_backlog_does_not_hold_back_another_tenants_uploads(client, new_key, worker, settings, tmp_path):
    """A tenant with CLAPQ_MAX_PENDING_PER_TENANT files waiting gets 429 for its next batch, told of its
    own files; another tenant's batch goes in. Before, one tenant could fill the whole backlog, and the
    others' uploads were refused with its size (helper-35). One file is left waiting here: a row copied
    from an uploaded one, with no task, so no worker takes it."""
    from sqlalchemy import text

    from api import create_app
    from clapq.db import session_scope

    capped = create_app(dataclasses.replace(settings, max_pending_per_tenant=1)).test_client()
    a, b = new_key(), new_key()
    libs = {k: capped.post("/v1/libraries", json={"name": "share"}, headers=auth(k)).get_json()["id"] for k in (a, b)}
    up = upload(client, a, libs[a], [write(tmp_path / "a.wav", 1.0, seed=61)]).get_json()
    assert wait_job(client, a, up["job_id"])["status"] == "done"
    first = up["items"][0]["id"]
    with session_scope(settings.database_url) as s:
        waiting = s.execute(text(
            "INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, status) "
            "SELECT gen_random_uuid(), tenant_id, library_id, job_id, repeat('ab', 32), 'waiting.wav', 1, 'queued' "
            "FROM items WHERE id = :i RETURNING id"), {"i": first}).scalar_one()
    try:
        r = capped.post(f"/v1/libraries/{libs[a]}/batches", headers=auth(a), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(b"x"), "x.wav")]})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
        assert r.get_json()["error"]["message"] == ("1 of your files is waiting to be embedded (at most 1 a tenant, "
                                                    "CLAPQ_MAX_PENDING_PER_TENANT); retry later")
        # a retry queues files as an upload does: refused the same way (cancel and retry went past the share)
        r = capped.post(f"/v1/jobs/{up['job_id']}/retry", headers=auth(a))
        assert r.status_code == 429 and "CLAPQ_MAX_PENDING_PER_TENANT" in r.get_json()["error"]["message"]
        r = capped.post(f"/v1/libraries/{libs[b]}/batches", headers=auth(b), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(b"y"), "y.wav")]})
        assert r.status_code == 202, r.get_json()
    finally:
        with session_scope(settings.database_url) as s:
            s.execute(text("DELETE FROM items WHERE id = :i"), {"i": waiting})


def test_per_file_size_limit(client, new_key, settings):
    from api import create_app

    small = create_app(dataclasses.replace(settings, max_file_bytes=100)).test_client()
    key = new_key()
    lib = small.post("/v1/libraries", json={"name": "fs"}, headers=auth(key)).get_json()
    r = small.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), content_type="multipart/form-data",
                   data={"files": [(io.BytesIO(b"x" * 10), "ok.wav"), (io.BytesIO(b"x" * 500), "big.wav")]})
    assert r.status_code == 413 and "big.wav" in r.get_json()["error"]["message"]
    assert client.get(f"/v1/libraries/{lib['id']}", headers=auth(key)).get_json()["item_count"] == 0


def test_a_copy_of_a_file_still_queued_is_not_done(client, new_key, settings, tmp_path, worker):
    """A job whose files the library holds but has not embedded yet (another job queued them) reports
    them as those files stand: queued while they are, failed (with the reason) if they fail, done when
    they are done. Before, such a job said 'done' at once, and stayed 'done' whatever became of them."""
    import hashlib

    from sqlalchemy import text

    from clapq.db import session_scope

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "pending copies"}, headers=auth(key)).get_json()
    wav = write(tmp_path / "a.wav", 0.5, seed=41)
    sha = hashlib.sha256(wav.read_bytes()).hexdigest()
    with session_scope(settings.database_url) as s:  # an earlier job's file, queued (no worker needed)
        tenant = s.execute(text("SELECT tenant_id FROM libraries WHERE id = :l"), {"l": lib["id"]}).scalar()
        earlier = s.execute(text("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES "
                                 "(gen_random_uuid(), :t, :l, 'upload') RETURNING id"),
                            {"t": tenant, "l": lib["id"]}).scalar()
        item = s.execute(text("INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, "
                              "metadata, status, attempts) VALUES (gen_random_uuid(), :t, :l, :j, :s, 'a.wav', 1, "
                              "'{}', 'queued', 0) RETURNING id"),
                         {"t": tenant, "l": lib["id"], "j": earlier, "s": sha}).scalar()
    r = upload(client, key, lib["id"], [wav, wav]).get_json()
    assert [i["duplicate_of"] for i in r["items"]] == [str(item)] * 2
    job = client.get(f"/v1/jobs/{r['job_id']}", headers=auth(key)).get_json()
    assert job["status"] == "queued" and job["counts"]["queued"] == 2 and job["progress"] == 0.0, job
    assert job["finished_at"] is None
    # a cancel of this job has nothing of its own to stop, and says which job embeds its files
    e = client.post(f"/v1/jobs/{r['job_id']}/cancel", headers=auth(key))
    assert e.status_code == 409 and e.get_json()["error"]["message"] == (
        "this job's files still to embed are copies of files another upload sent first, and that job embeds "
        f"them: cancel job {earlier} to stop them"), e.get_json()
    listed = client.get(f"/v1/jobs/{r['job_id']}/items", headers=auth(key)).get_json()["items"]
    assert [i["id"] for i in listed] == [str(item)]
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET status = 'failed', error = 'broken', finished_at = now() WHERE id = :i"),
                  {"i": item})
    job = client.get(f"/v1/jobs/{r['job_id']}", headers=auth(key)).get_json()
    assert job["status"] == "failed" and job["counts"]["failed"] == 2 and job["finished_at"], job
    assert [e["item_id"] for e in job["errors"]] == [str(item)]
    # the job that queued the file first is cancelled: for this job the file is not embedded, so it is
    # an error this job's retry can undo
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET status = 'queued', error = NULL, finished_at = NULL WHERE id = :i"),
                  {"i": item})
    cancel = client.post(f"/v1/jobs/{earlier}/cancel", headers=auth(key))
    assert cancel.status_code == 200 and cancel.get_json()["status"] == "cancelled", cancel.get_json()
    job = client.get(f"/v1/jobs/{r['job_id']}", headers=auth(key)).get_json()
    assert job["status"] == "failed" and job["counts"]["failed"] == 2, job
    assert job["errors"][0]["error"].startswith(f"cancelled with job {earlier}, which uploaded it first"), job
    # its items listing says the same: failed, with why (and ?status= narrows by that)
    items = f"/v1/jobs/{r['job_id']}/items"
    failed = client.get(f"{items}?status=failed", headers=auth(key)).get_json()["items"]
    assert [(i["id"], i["status"], i["error"]) for i in failed] == [(str(item), "failed", job["errors"][0]["error"])]
    assert client.get(f"{items}?status=cancelled", headers=auth(key)).get_json()["items"] == []
    assert client.get(f"/v1/jobs/{earlier}/items?status=cancelled", headers=auth(key)).get_json()["items"][0][
        "status"] == "cancelled"  # the job that cancelled it lists it as it is
    # the retry moves the file to this job, whose worker then embeds it (the other job's cancel no longer
    # stops it); the second copy in this batch stays a copy
    retried = client.post(f"/v1/jobs/{r['job_id']}/retry", headers=auth(key)).get_json()
    assert retried["requeued"] == 1 and retried["status"] in ("queued", "running"), retried
    job = wait_job(client, key, r["job_id"])
    assert job["status"] == "done" and job["counts"] == {"queued": 0, "running": 0, "done": 2, "failed": 0,
                                                         "cancelled": 0, "total": 2, "duplicates": 1}, job
    assert client.get(f"/v1/items/{item}", headers=auth(key)).get_json()["job_id"] == r["job_id"]
    before = client.get(f"/v1/jobs/{earlier}", headers=auth(key)).get_json()
    assert before["counts"]["total"] == 0 and before["status"] == "cancelled", before
    # a retry with nothing to re-queue is a 409, and leaves the cancelled job cancelled (it said done); it
    # says where the files went (it said nothing had failed or been cancelled, against its own status)
    e = client.post(f"/v1/jobs/{earlier}/retry", headers=auth(key))
    assert e.status_code == 409 and e.get_json()["error"]["message"] == (
        "this job holds no files any more (they were deleted, or sent again and moved to the job of that upload); "
        "nothing to retry"), e.get_json()
    assert client.get(f"/v1/jobs/{earlier}", headers=auth(key)).get_json() == before
    # the copy left points at this job's own file: were this job cancelled, both count as cancelled (not
    # as failed by "another" job's cancel)
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET status = 'cancelled' WHERE id = :i"), {"i": item})
        s.execute(text("UPDATE jobs SET cancelled = true WHERE id = :j"), {"j": r["job_id"]})
    job = client.get(f"/v1/jobs/{r['job_id']}", headers=auth(key)).get_json()
    assert job["counts"]["cancelled"] == 2 and job["counts"]["failed"] == 0 and job["errors"] == [], job
    assert job["finished_at"] >= job["created_at"]


def job_rows(settings, library_id: str, files, started_s: float = 100, finished_s: float = 0,
             claimed_by: str | None = None, job_age_s: float = 0) -> tuple[uuid.UUID, dict[str, uuid.UUID]]:
    """A job of `files` ((name, bytes, status), ...) written straight into Postgres, as a worker leaves
    them: started `started_s` ago, those that ended `finished_s` ago; returns the job's id and the items'
    by name. Progress tests need no waiting; an ETA, a live worker of the library's model (`serving_worker`):
    without one nothing moves, and the job says why instead (test_a_job_that_cannot_move_says_why)."""
    from sqlalchemy import text

    from clapq.db import session_scope

    with session_scope(settings.database_url) as s:
        tenant = s.execute(text("SELECT tenant_id FROM libraries WHERE id = :l"), {"l": library_id}).scalar()
        job = s.execute(text("INSERT INTO jobs (id, tenant_id, library_id, kind, created_at) VALUES "
                             "(gen_random_uuid(), :t, :l, 'upload', now() - make_interval(secs => :age)) RETURNING id"),
                        {"t": tenant, "l": library_id, "age": job_age_s}).scalar()
        ids = {name: s.execute(text(
            "INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, status, attempts, "
            "claimed_by, started_at, finished_at) VALUES (gen_random_uuid(), :t, :l, :j, :s, :n, :b, :st, 1, :by, "
            "now() - make_interval(secs => :started), CASE WHEN :st IN ('done', 'failed', 'cancelled') "
            "THEN now() - make_interval(secs => :finished) END) RETURNING id"),
            {"t": tenant, "l": library_id, "j": job, "s": uuid.uuid4().hex * 2, "n": f"{name}.wav", "b": size,
             "st": status, "by": claimed_by, "started": started_s, "finished": finished_s}).scalar()
            for name, size, status in files}
    return job, ids


def test_progress_and_eta_weigh_files_by_their_size(client, new_key, settings, serving_worker):
    """A long recording and a short clip in one job: with the clip done the job is a tenth of the way,
    not half, and its ETA is about nine times the time so far; with the recording done, nine tenths and a
    ninth."""
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "weights"}, headers=auth(key)).get_json()
    for done, expect, eta in (("short", 0.1, 9 * 100), ("long", 0.9, 100 / 9)):
        job, _ = job_rows(settings, lib["id"], [(name, size, "done" if name == done else "running")
                                                for name, size in (("long", 9_000_000), ("short", 1_000_000))])
        got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
        assert got["status"] == "running" and got["counts"]["done"] == 1 and got["counts"]["running"] == 1, got
        assert got["progress"] == expect, got
        assert abs(got["eta_s"] - eta) < 0.1 * eta, got


def test_a_long_file_moves_its_job_before_it_ends(client, new_key, settings, serving_worker):
    """A running 9 MB recording and a finished 1 MB clip: once the worker's heartbeat records the
    recording half embedded, the job is 0.1 + 0.45 of the way and its ETA counts that half; the item
    shows its share. A beat of another task records nothing, and a new try of the file starts again from
    0. (Beats through the worker's own store.heartbeat.)"""
    from sqlalchemy import text

    from clapq.db import session_scope
    from worker import store

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "part-way"}, headers=auth(key)).get_json()
    job, ids = job_rows(settings, lib["id"], [("long", 9_000_000, "running"), ("short", 1_000_000, "done")],
                        claimed_by="task-1")

    def beat(task_id, shares):
        with session_scope(settings.database_url) as s:
            return store.heartbeat(s, [ids["long"]], task_id, shares)

    def seen():
        got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
        item = client.get(f"/v1/items/{ids['long']}", headers=auth(key)).get_json()
        return got, item

    got, item = seen()
    assert got["progress"] == 0.1 and item["progress"] == 0.0, (got, item)
    assert beat("task-1", {ids["long"]: 0.5}) == set()
    got, item = seen()
    assert got["status"] == "running" and got["progress"] == 0.55 and item["progress"] == 0.5, (got, item)
    assert abs(got["eta_s"] - 4.5 * 100 / 5.5) < 10, got  # 4.5 MB left at 5.5 MB a 100 s
    short = client.get(f"/v1/items/{ids['short']}", headers=auth(key)).get_json()
    assert short["progress"] == 1.0, short  # a finished file
    # another task's beat finds the file not its own (and says so), and records nothing
    assert beat("task-2", {ids["long"]: 0.9}) == {ids["long"]}
    assert seen()[0]["progress"] == 0.55
    # a new try (the worker died, the sweeper sent it again) starts from 0
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET status = 'queued' WHERE id = :i"), {"i": ids["long"]})
        model = s.execute(text("SELECT model_id FROM libraries WHERE id = :l"), {"l": lib["id"]}).scalar()
        assert [c.id for c in store.claim(s, [ids["long"]], model, 3, "task-3", 60)] == [ids["long"]]
    got, item = seen()
    assert got["progress"] == 0.1 and item["progress"] == 0.0, (got, item)


def test_while_a_file_is_part_way_the_heartbeat_records_it_often(new_key, client, settings):
    """A task's heartbeat (every 300 s here) beats every PROGRESS_EVERY_S while the task has a file
    part-way, so a job follows a long file without waiting for CLAPQ_HEARTBEAT_S; with none, it stays
    quiet."""
    import time

    from sqlalchemy import text

    from clapq.db import session_scope
    from worker.heartbeat import PROGRESS_EVERY_S, beating

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "beats"}, headers=auth(key)).get_json()
    job, ids = job_rows(settings, lib["id"], [("long", 100, "running")], started_s=0, claimed_by="task-beats")
    item = ids["long"]

    def row():
        with session_scope(settings.database_url) as s:
            return s.execute(text("SELECT progress, updated_at FROM items WHERE id = :i"), {"i": item}).one()

    def until(share):
        deadline = time.monotonic() + 60
        while row().progress != share and time.monotonic() < deadline:
            time.sleep(0.2)
        return row()

    before = row()
    progress: dict = {}
    with beating(settings.database_url, {item}, "task-beats", 300, progress=progress):
        time.sleep(PROGRESS_EVERY_S + 1)
        assert row() == before  # nothing part-way: no beat before the interval
        progress[item] = 0.25
        now = until(0.25)
        assert now.progress == 0.25 and now.updated_at > before.updated_at, now
        progress[item] = 0.5
        assert until(0.5).progress == 0.5
    assert client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()["progress"] == 0.5


def test_a_retry_a_day_later_takes_its_eta_from_the_retry(client, new_key, settings, serving_worker):
    """A job ran a day ago: 90 MB embedded, two files of 5 MB failed. Retried now, with one of them done
    since, its ETA is of the retry's pace (seconds), not 5 MB at the first day's pace (90 + 5 MB a day,
    ~4,500 s). (The retry through an API whose queue is out of reach: no worker takes the files.)"""
    from sqlalchemy import text

    from api import create_app
    from clapq.db import session_scope

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "next day"}, headers=auth(key)).get_json()
    day = 24 * 3600
    job, ids = job_rows(settings, lib["id"], [("old", 90_000_000, "done"), ("a", 5_000_000, "failed"),
                                              ("b", 5_000_000, "failed")],
                        started_s=day, finished_s=day - 60, job_age_s=day)
    paused = create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:9/0")).test_client()
    r = paused.post(f"/v1/jobs/{job}/retry", headers=auth(key))
    assert r.status_code == 202 and r.get_json()["requeued"] == 2, r.get_json()
    with session_scope(settings.database_url) as s:
        assert s.execute(text("SELECT now() - retried_at < interval '1 minute' FROM jobs WHERE id = :j"),
                         {"j": job}).scalar()
        # as if the retry was 100 s ago, and a worker has just finished the first retried file
        s.execute(text("UPDATE jobs SET retried_at = now() - interval '100 seconds' WHERE id = :j"), {"j": job})
        s.execute(text("UPDATE items SET status = 'done', started_at = now() - interval '90 seconds', "
                       "finished_at = now() WHERE id = :i"), {"i": ids["a"]})
        # and holds the other (its task claimed both)
        s.execute(text("UPDATE items SET status = 'running', started_at = now() - interval '90 seconds' "
                       "WHERE id = :i"), {"i": ids["b"]})
    got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
    assert got["status"] == "running" and got["progress"] == 0.95, got
    assert abs(got["eta_s"] - 100) < 10, got  # 5 MB left at 5 MB a 100 s


def test_celerys_own_retry_after_an_outage_counts_no_try(new_key, client, settings):
    """A task that Celery runs again after the database went away (its own retry) finds its own files still
    running under its id, and files it had taken from later tasks that the try before could not hand back:
    neither counts a try, and the borrowed ones are not said to be a dead process's (three outages during
    the same files failed them for good, helper-41). A message handed back after its process died (no
    retry) still counts one."""
    from sqlalchemy import text

    from clapq.db import session_scope
    from clapq.models import Item
    from worker import store

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "outage"}, headers=auth(key)).get_json()
    job, ids = job_rows(settings, lib["id"], [("own", 100, "running"), ("borrowed", 100, "running")],
                        claimed_by="task-o")
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET attempts = 1 WHERE job_id = :j"), {"j": job})
        model = s.execute(text("SELECT model_id FROM libraries WHERE id = :l"), {"l": lib["id"]}).scalar()
        assert [c.id for c in store.claim(s, [ids["own"]], model, 3, "task-o", 60, retry=True)] == [ids["own"]]
        assert store.release_borrowed(s, [ids["own"]], "task-o", retry=True) == [ids["borrowed"]]
    with session_scope(settings.database_url) as s:
        own, borrowed = s.get(Item, ids["own"]), s.get(Item, ids["borrowed"])
        assert (own.status, own.attempts) == ("running", 1)
        assert (borrowed.status, borrowed.attempts, borrowed.error) == ("queued", 0, store.OUTAGE)
        s.execute(text("UPDATE items SET status = 'running', claimed_by = 'task-o', attempts = 1 WHERE job_id = :j"),
                  {"j": job})
    with session_scope(settings.database_url) as s:  # the process died: its message comes back
        assert [c.resumed for c in store.claim(s, [ids["own"]], model, 3, "task-o", 60)] == [True]
        assert store.release_borrowed(s, [ids["own"]], "task-o") == [ids["borrowed"]]
    with session_scope(settings.database_url) as s:
        own, borrowed = s.get(Item, ids["own"]), s.get(Item, ids["borrowed"])
        assert (own.attempts, borrowed.attempts, borrowed.error) == (2, 1, store.LOST)


def test_a_cancel_whose_files_all_finished_leaves_a_done_job(client, new_key, settings):
    """A cancel that came while the last batch ran: the batch is written whole, so every file ended done,
    and the job stayed "cancelled" for good, its retry and cancel both 409s and `clapq upload` exiting 1
    (helper-54). Its status follows its files once none is cancelled; a failure recorded for a file
    cancelled meanwhile is not one (clapq_items_failed_total counted it)."""
    from sqlalchemy import text

    from clapq.db import session_scope
    from worker import store

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "late cancel"}, headers=auth(key)).get_json()
    for files, cancelled, status in (([("a", 10, "done")], True, "done"),
                                     ([("a", 10, "done"), ("b", 10, "cancelled")], True, "cancelled"),
                                     ([("a", 10, "failed")], True, "failed"),
                                     ([("a", 10, "cancelled")], False, "cancelled")):
        job, ids = job_rows(settings, lib["id"], files)
        with session_scope(settings.database_url) as s:
            s.execute(text("UPDATE jobs SET cancelled = :c WHERE id = :j"), {"c": cancelled, "j": job})
        got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
        assert got["status"] == status, (files, cancelled, got)
    with session_scope(settings.database_url) as s:
        assert store.record_failure(s, ids["a"], "broken") is False  # cancelled: left as it is
    assert client.get(f"/v1/items/{ids['a']}", headers=auth(key)).get_json()["status"] == "cancelled"
    job, ids = job_rows(settings, lib["id"], [("c", 10, "running")])
    with session_scope(settings.database_url) as s:
        assert store.record_failure(s, ids["c"], "broken") is True


def test_a_retry_moving_copies_keeps_a_deletion_of_another_copy_committed_meanwhile(client, new_key, settings):
    """A job holds two copies: one of a file another job's cancel stopped (its retry moves it to this job)
    and one of an embedded file, which is deleted, and committed, while the retry runs. The job then holds no
    copy: the retry wrote back the count it had read less the one it moved, which undid the deletion's, and
    the job showed a copy (done) that is gone (helper-60)."""
    from sqlalchemy import func, select

    from api.removal import delete_items
    from clapq.db import session_scope
    from clapq.models import Item, Job, JobDuplicate, Library

    key = new_key()
    lib = uuid.UUID(client.post("/v1/libraries", json={"name": "copies"}, headers=auth(key)).get_json()["id"])
    with session_scope(settings.database_url) as s:
        tenant = s.get(Library, lib).tenant_id
        first, second = Job(tenant_id=tenant, library_id=lib, cancelled=True), Job(tenant_id=tenant, library_id=lib)
        s.add_all([first, second])
        s.flush()
        stopped, embedded = (Item(tenant_id=tenant, library_id=lib, job_id=first.id, sha256=uuid.uuid4().hex * 2,
                                  filename=f"{status}.wav", size_bytes=1, status=status)
                             for status in ("cancelled", "done"))
        s.add_all([stopped, embedded])
        s.flush()
        s.add_all([JobDuplicate(job_id=second.id, item_id=i.id, copies=1) for i in (stopped, embedded)])
        second.duplicates = 2
        job, gone = second.id, embedded.id
    def delete_it() -> None:
        with session_scope(settings.database_url) as s:
            delete_items(s, Item.id == gone)

    # the retry's lock of the files it may queue: the other request's deletion commits just before it
    with just_before(settings.database_url, lambda sql: "FOR NO KEY UPDATE" in sql, delete_it) as deleted:
        r = client.post(f"/v1/jobs/{job}/retry", headers=auth(key))
    assert deleted and r.status_code == 202, (deleted, r.status_code, r.get_json())
    assert r.get_json()["requeued"] == 1
    with session_scope(settings.database_url) as s:
        held = s.scalar(select(func.coalesce(func.sum(JobDuplicate.copies), 0)).where(JobDuplicate.job_id == job))
        assert (s.get(Job, job).duplicates, held) == (0, 0)
    counts = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()["counts"]
    assert (counts["duplicates"], counts["done"], counts["total"]) == (0, 0, 1), counts


def test_a_cancel_of_a_job_whose_library_is_deleted_meanwhile_is_a_404(client, new_key, settings):
    """The job's library is deleted, and the deletion committed, after the cancel read the job and before it
    wrote it: a 404, as a moment later, not a 500 (its UPDATE of the job matched no row: a helper's race run
    of cancels and library deletions)."""
    from sqlalchemy import text

    from clapq.db import session_scope
    from clapq.models import Item, Job, Library

    key = new_key()
    lib = uuid.UUID(client.post("/v1/libraries", json={"name": "going"}, headers=auth(key)).get_json()["id"])
    with session_scope(settings.database_url) as s:
        tenant = s.get(Library, lib).tenant_id
        job = Job(tenant_id=tenant, library_id=lib)
        s.add(job)
        s.flush()
        s.add(Item(tenant_id=tenant, library_id=lib, job_id=job.id, sha256=uuid.uuid4().hex * 2, filename="q.wav",
                   size_bytes=1))
        job_id = job.id
    def delete_it() -> None:
        with session_scope(settings.database_url) as s:
            s.execute(text("DELETE FROM libraries WHERE id = :l"), {"l": lib})

    # the cancel's lock of the files it stops, which comes before its write of the job
    with just_before(settings.database_url, lambda sql: "FOR NO KEY UPDATE" in sql, delete_it) as deleted:
        r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert deleted and r.status_code == 404, (deleted, r.status_code, r.get_data(as_text=True)[:300])
    assert r.get_json()["error"]["code"] == "not_found"


def test_a_cancel_and_a_retry_lock_their_files_in_id_order(app, new_key, settings):
    """A cancel's and a retry's UPDATE of a job's files took their rows in its scan's order, where a library's
    deletion takes them in id order: at the same moment, each held a row the other waited on, a deadlock that
    failed the deletion with a 503 (a helper's race run: 7 of 15 deletions beside a cancel of a 400-file job).
    Two files, A < B by id, B written first; a third connection holds A: the cancel (then the retry) waits
    for A holding nothing of B's."""
    from sqlalchemy import text

    from clapq.db import get_engine, session_scope
    from clapq.models import Item, Job, Library

    key = new_key()
    client = app.test_client()
    lib = uuid.UUID(client.post("/v1/libraries", json={"name": "order"}, headers=auth(key)).get_json()["id"])
    a, b = sorted((uuid.uuid4(), uuid.uuid4()))
    with session_scope(settings.database_url) as s:
        tenant = s.get(Library, lib).tenant_id
        job = Job(tenant_id=tenant, library_id=lib)
        s.add(job)
        s.flush()
        for item_id in (b, a):  # B first, in the heap too
            s.add(Item(id=item_id, tenant_id=tenant, library_id=lib, job_id=job.id, sha256=item_id.hex * 2,
                       filename=f"{item_id}.wav", size_bytes=1))
            s.flush()
        job_id = job.id
    engine = get_engine(settings.database_url)
    for action, status in (("cancel", 200), ("retry", 202)):
        answers = []
        worker = threading.Thread(target=lambda: answers.append(
            app.test_client().post(f"/v1/jobs/{job_id}/{action}", headers=auth(key)).status_code))
        with engine.connect() as holder:
            holder.execute(text("SELECT 1 FROM items WHERE id = :i FOR UPDATE"), {"i": a})
            worker.start()
            wait_for_a_lock_wait(engine, f"the {action} never waited for A")
            assert row_lockable(engine, b), f"the {action} holds B while it waits for A"
            holder.commit()
        worker.join(30)
        assert answers == [status], (action, answers)


def test_a_retry_queues_only_the_files_it_locked(client, new_key, settings):
    """A file of the job that fails between the retry's lock of its failed files and its UPDATE (a worker
    ending it) is left as it is, for the next retry: the UPDATE took such a file unlocked, out of id order,
    and a library's deletion at that moment was still a deadlock (helper-60)."""
    from sqlalchemy import text

    from clapq.db import session_scope
    from clapq.models import Item, Job, Library

    key = new_key()
    lib = uuid.UUID(client.post("/v1/libraries", json={"name": "late"}, headers=auth(key)).get_json()["id"])
    with session_scope(settings.database_url) as s:
        tenant = s.get(Library, lib).tenant_id
        job = Job(tenant_id=tenant, library_id=lib)
        s.add(job)
        s.flush()
        failed, running = (Item(tenant_id=tenant, library_id=lib, job_id=job.id, sha256=uuid.uuid4().hex * 2,
                                filename=f"{status}.wav", size_bytes=1, status=status, claimed_by="t", attempts=1)
                           for status in ("failed", "running"))
        s.add_all([failed, running])
        s.flush()
        job_id, late = job.id, running.id
    def fail_it() -> None:
        with session_scope(settings.database_url) as s:
            s.execute(text("UPDATE items SET status = 'failed' WHERE id = :i"), {"i": late})

    with just_before(settings.database_url, lambda sql: sql.lstrip().startswith("UPDATE items SET job_id"),
                     fail_it) as ended:
        r = client.post(f"/v1/jobs/{job_id}/retry", headers=auth(key))
    assert ended and r.status_code == 202 and r.get_json()["requeued"] == 1, (ended, r.status_code, r.get_json())
    with session_scope(settings.database_url) as s:
        assert s.get(Item, late).status == "failed"


def test_a_job_that_cannot_move_says_why(client, new_key, settings, serving_worker):
    """A job whose files still to embed cannot move says why in `waiting`, with no `eta_s` (it showed a growing
    ETA, 304 s, and looked like slow progress): no live worker at all, none of its library's model (CLAPQ_MODEL
    changed), Redis not answering. Where a worker of its model is live, `waiting` is null and the ETA stands.
    The library says so too, and the jobs' listing."""
    from sqlalchemy import text

    from api import create_app
    from api.jobs import NO_WORKER, REDIS_AWAY
    from clapq.db import session_scope
    from clapq.settings import Settings

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "stuck"}, headers=auth(key)).get_json()
    job, _ = job_rows(settings, lib["id"], [("a", 1_000_000, "done"), ("b", 1_000_000, "running")])
    got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
    assert got["waiting"] is None and got["eta_s"] is not None, got
    assert client.get(f"/v1/libraries/{lib['id']}", headers=auth(key)).get_json()["waiting"] is None

    def seen(api) -> tuple:
        one = api.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
        listed = api.get("/v1/jobs", headers=auth(key)).get_json()["jobs"][0]
        library = api.get(f"/v1/libraries/{lib['id']}", headers=auth(key)).get_json()
        assert one["status"] == "running" and one["progress"] == 0.5 and listed["id"] == str(job), one
        assert listed["waiting"] == library["waiting"] == one["waiting"], (listed, library, one)
        return one["waiting"], one["eta_s"]

    # no worker at all: a queue (another Redis database) no worker listens to
    no_worker = dataclasses.replace(settings, redis_url=settings.redis_url.rsplit("/", 1)[0] + "/7")
    assert seen(create_app(no_worker).test_client()) == (NO_WORKER, None)
    # under `clapq up` (CLAPQ_UP, which it sets for its roles), whose worker is starting or starting again: not
    # told to start one (it said "start `clapq worker`", which would run a second beside up's), nor is /readyz
    under_up = create_app(Settings.from_env({"CLAPQ_UP": "1"}, **{
        f.name: getattr(no_worker, f.name) for f in dataclasses.fields(Settings) if f.name != "under_up"}))
    why, eta = seen(under_up.test_client())
    assert eta is None and why.startswith("no live worker: `clapq up`'s worker is starting, or was started again "
                                          "after it ended") and "start `" not in why and "stopped answering" in why
    ready = under_up.test_client().get("/readyz").get_json()["checks"]["workers"]
    assert ready.startswith("warning: no live worker: `clapq up`'s worker is starting"), ready
    # Redis away: nothing is handed out
    assert seen(create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:9/0")).test_client()) == \
        (REDIS_AWAY, None)
    # workers live, but of another model than the library's: the service's CLAPQ_MODEL changed
    with session_scope(settings.database_url) as s:
        other = s.execute(text("INSERT INTO models (name, weights_sha256, dim) VALUES (:n, :w, 512) RETURNING id"),
                          {"n": "old-clap", "w": uuid.uuid4().hex * 2}).scalar()
        s.execute(text("UPDATE libraries SET model_id = :m WHERE id = :l"), {"m": other, "l": lib["id"]})
    why, eta = seen(client)
    assert eta is None and why == (f"no live worker serves this library's model (model {other}, old-clap): workers "
                                   "whose CLAPQ_MODEL is another, one still loading it, or one that hangs; the files "
                                   "wait queued until one does"), why
    # a job with nothing left to embed waits for nothing
    done, _ = job_rows(settings, lib["id"], [("c", 10, "done")])
    assert client.get(f"/v1/jobs/{done}", headers=auth(key)).get_json()["waiting"] is None


def test_a_job_whose_running_files_are_not_heard_from_says_so(client, new_key, settings, serving_worker):
    """A worker killed while it embeds a job's last files: they stay `running` until CLAPQ_STALE_AFTER_S has passed
    since their last heartbeat, and the job showed a growing ETA meanwhile ("about 12 min left", then 24: helper-88).
    Once none of them has beaten for three heartbeats, `waiting` says so, and when the maintenance loop takes them
    back; files that beat lately are not waiting."""
    from sqlalchemy import text

    from clapq.db import session_scope

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "silent"}, headers=auth(key)).get_json()
    job, ids = job_rows(settings, lib["id"], [("a", 1_000_000, "done"), ("b", 1_000_000, "running")])
    got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
    assert got["waiting"] is None and got["eta_s"] is not None, got
    silent = 3 * settings.heartbeat_s + 5
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET updated_at = now() - make_interval(secs => :s) WHERE id = :i"),
                  {"s": silent, "i": ids["b"]})
    # the seconds since the heartbeat grow while the test runs, past the next whole one between two answers
    said = (r"its running file has not been heard from for (\d+) s \(a worker stopped\?\): the maintenance loop "
            rf"queues it again once {settings.stale_after_s} s have passed \(CLAPQ_STALE_AFTER_S\), in about \d+ s")
    for got in (client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json(),
                client.get("/v1/jobs", headers=auth(key)).get_json()["jobs"][0]):
        assert got["eta_s"] is None and (m := re.fullmatch(said, got["waiting"] or "")) and int(m[1]) >= silent, got
    # past CLAPQ_STALE_AFTER_S, or dated back to 2000 as `clapq up` hands back the files of its worker that ended:
    # the next pass takes it (it said "not been heard from for 849,000,000 s ..., in about 0 s")
    for when in ("now() - make_interval(secs => :s)", "'2000-01-01 00:00:00+00'"):
        with session_scope(settings.database_url) as s:
            s.execute(text(f"UPDATE items SET updated_at = {when} WHERE id = :i"),
                      {"s": settings.stale_after_s + 1, "i": ids["b"]})
        got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
        assert got["eta_s"] is None and got["waiting"] == (
            "its running file's worker stopped (no heartbeat for CLAPQ_STALE_AFTER_S or more, or `clapq up` handed "
            "it back): the maintenance loop queues it again at its next pass, every "
            f"{settings.sweep_interval_s} s (CLAPQ_SWEEP_INTERVAL_S)"), got


def test_a_job_behind_others_or_left_to_a_stopped_maintenance_loop_says_so(client, new_key, settings, app):
    """Workers of its model live, a job still does not move where its files have no task and the maintenance loop
    that sends them (`clapq beat`) made no pass lately, and while the workers are on other files queued before
    its own: after its first files (the queue's first lane), a job's rest wait behind another tenant's backlog
    in the bulk lane, and its ETA at the pace of those first files promised a minute, growing at every poll.
    Each says so, with no ETA; where nothing is queued before its files, or the loop runs, it is not waiting.
    (A model of the test's own, which this process says it serves as a worker does: no other test's files are
    of it.)"""
    from sqlalchemy import text

    from clapq.db import session_scope
    from clapq.presence import serve, unserve

    celery = app.extensions["clapq_celery"]
    other_key, key = new_key(), new_key()
    backlog_lib = client.post("/v1/libraries", json={"name": "backlog"}, headers=auth(other_key)).get_json()
    lib = client.post("/v1/libraries", json={"name": "behind"}, headers=auth(key)).get_json()
    with session_scope(settings.database_url) as s:
        model = s.execute(text("INSERT INTO models (name, weights_sha256, dim) VALUES ('own', :w, 512) RETURNING id"),
                          {"w": uuid.uuid4().hex * 2}).scalar()
        s.execute(text("UPDATE libraries SET model_id = :m WHERE id IN (:a, :b)"),
                  {"m": model, "a": backlog_lib["id"], "b": lib["id"]})
    serve(celery, model)
    try:
        _behind_others_or_unsent(client, settings, celery, key, backlog_lib, lib)
    finally:
        unserve(celery)


def _behind_others_or_unsent(client, settings, celery, key, backlog_lib, lib) -> None:
    from sqlalchemy import Engine, event, text

    from clapq.db import session_scope
    from clapq.models import NOT_SENT
    from clapq.presence import BEAT_KEY, beat_done
    from clapq.queue import redis_client

    # another tenant's: one file being embedded, and files queued before this job came
    backlog, _ = job_rows(settings, backlog_lib["id"], [("busy", 10, "running")]
                          + [(f"q{i}", 1_000_000, "queued") for i in range(3)], job_age_s=60)
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET created_at = now() - interval '1 minute', updated_at = now() - interval "
                       "'1 minute' WHERE job_id = :j"), {"j": backlog})
    def still(job) -> None:  # its files stood still for 40 s: the first ended, the rest queued, 40 s ago
        with session_scope(settings.database_url) as s:
            s.execute(text("UPDATE items SET updated_at = now() - interval '40 seconds', finished_at = CASE WHEN "
                           "finished_at IS NOT NULL THEN now() - interval '40 seconds' END WHERE job_id = :j"),
                      {"j": job})

    job, _ = job_rows(settings, lib["id"], [("first", 1_000_000, "done"), ("rest", 1_000_000, "queued")])
    # a file of it ended just now: it is taking turns with the backlog's tasks, moving, not behind (two tenants'
    # jobs each read "behind" the other's for a moment, flipping every few tenths of a second, helper-70)
    got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
    assert got["waiting"] is None and got["eta_s"] is not None, got
    still(job)
    got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
    assert got["status"] == "running" and got["eta_s"] is None and got["waiting"] == (
        "none of its files is being embedded: the workers are on files queued before them (the queue's order: "
        "README, Operations)"), got
    # the jobs' listing (up to 500) asks which files are ahead once, not for each job: it scanned the items for
    # each, ~6 s for a page of 500 on a table of 400,000 (helper-70)
    for _ in range(4):
        still(job_rows(settings, lib["id"], [("first", 1_000_000, "done"), ("rest", 1_000_000, "queued")])[0])
    across: list[str] = []  # statements on files of any job, not of one

    def count(conn, cursor, statement, *args) -> None:
        if "FROM items" in statement and "items.job_id =" not in statement:
            across.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        listed = client.get("/v1/jobs", headers=auth(key)).get_json()["jobs"]
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    # each behind the tenant's own jobs queued before it (the newest behind 4 of its files), and the backlog's
    own = ("none of its files is being embedded: the workers are on files queued before them, {} of them this "
           "tenant's own, of its other jobs (a tenant's files are embedded in the order they were sent: `clapq jobs` "
           "lists them) (the queue's order: README, Operations)")
    assert [j["waiting"] for j in listed] == [own.format(n) for n in (4, 3, 2, 1)] + [got["waiting"]], listed
    assert len(across) <= 3, across  # which files are ahead, and which of them are the tenant's own
    # the backlog is through, and no file of the model is being embedded: its files are next (a message on its
    # way), not behind any
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET status = 'done', finished_at = now() WHERE job_id = :j"), {"j": backlog})
    got = client.get(f"/v1/jobs/{job}", headers=auth(key)).get_json()
    assert got["waiting"] is None, got

    # files Redis did not take, which only the maintenance loop sends
    unsent, _ = job_rows(settings, lib["id"], [("a", 10, "queued"), ("b", 10, "queued")], claimed_by=NOT_SENT)
    redis_client(celery).delete(BEAT_KEY)
    got = client.get(f"/v1/jobs/{unsent}", headers=auth(key)).get_json()
    assert got["status"] == "queued" and got["eta_s"] is None and got["waiting"] == (
        "2 of its files have no task in the queue (Redis did not take it, or they waited for a worker of their "
        "model), and the maintenance loop that sends them made no pass lately (start `clapq beat`)"), got
    beat_done(celery, 1)
    assert client.get(f"/v1/jobs/{unsent}", headers=auth(key)).get_json()["waiting"] is None


def test_a_job_behind_its_own_tenants_backlog_says_how_many_of_the_files_ahead_are_its_own(client, new_key, settings,
                                                                                           app):
    """A team sharing one server, two of them with keys of one tenant (helper-127): one's few files, uploaded behind
    the other's backlog of 896, waited for all of it, as a tenant's files go in the order sent (and one person's
    3 files behind their own backlog of 1,700 waited 6 minutes), told only "the workers are on files queued before
    them", read as another tenant's backlog, where `clapq jobs` listed the tenant's jobs in the way. It now says
    how many of those files are the tenant's own; another tenant's queued before them are not counted, nor said.
    (A model of the test's own, which this process says it serves as a worker does: no other test's files are of
    it.)"""
    from sqlalchemy import text

    from clapq.db import session_scope
    from clapq.presence import serve, unserve

    celery = app.extensions["clapq_celery"]
    team = f"team-{uuid.uuid4().hex[:8]}"
    alice, bob, other = new_key(team), new_key(team), new_key()
    libs = [client.post("/v1/libraries", json={"name": name}, headers=auth(k)).get_json()
            for name, k in (("big", alice), ("small", bob), ("theirs", other))]
    with session_scope(settings.database_url) as s:
        model = s.execute(text("INSERT INTO models (name, weights_sha256, dim) VALUES ('own', :w, 512) RETURNING id"),
                          {"w": uuid.uuid4().hex * 2}).scalar()
        s.execute(text("UPDATE libraries SET model_id = :m WHERE id IN (:a, :b, :c)"),
                  {"m": model, "a": libs[0]["id"], "b": libs[1]["id"], "c": libs[2]["id"]})
    serve(celery, model)
    try:
        # the other tenant's file being embedded and two queued, first; then alice's backlog; then bob's files
        theirs, _ = job_rows(settings, libs[2]["id"], [("busy", 10, "running"), ("t0", 10, "queued"),
                                                       ("t1", 10, "queued")], job_age_s=120)
        backlog, _ = job_rows(settings, libs[0]["id"], [(f"b{i}", 10, "queued") for i in range(5)], job_age_s=90)
        few, _ = job_rows(settings, libs[1]["id"], [("a", 10, "queued"), ("b", 10, "queued")], job_age_s=40)
        with session_scope(settings.database_url) as s:
            for job, age in ((theirs, 120), (backlog, 90), (few, 40)):
                s.execute(text("UPDATE items SET updated_at = now() - make_interval(secs => :a) WHERE job_id = :j"),
                          {"a": age, "j": job})
        behind = "none of its files is being embedded: the workers are on files queued before them"
        order = " (the queue's order: README, Operations)"
        for key in (bob, alice):  # the tenant's keys alike
            got = client.get(f"/v1/jobs/{few}", headers=auth(key)).get_json()
            assert got["eta_s"] is None and got["waiting"] == (
                f"{behind}, 5 of them this tenant's own, of its other jobs (a tenant's files are embedded in the "
                f"order they were sent: `clapq jobs` lists them){order}"), got
        # two of the backlog's files queued again since (a worker's hand-back): behind the few, not before them
        # (helper-129: a job's first file alone was compared, and all 5 were counted)
        with session_scope(settings.database_url) as s:
            s.execute(text("UPDATE items SET updated_at = now() - interval '10 seconds' WHERE id IN (SELECT id FROM "
                           "items WHERE job_id = :j ORDER BY id LIMIT 2)"), {"j": backlog})
        got = client.get(f"/v1/jobs/{few}", headers=auth(bob)).get_json()
        assert got["waiting"] == (f"{behind}, 3 of them this tenant's own, of its other jobs (a tenant's files are "
                                  f"embedded in the order they were sent: `clapq jobs` lists them){order}"), got
        # the backlog itself is behind the other tenant's files only, which are not told
        assert client.get(f"/v1/jobs/{backlog}", headers=auth(alice)).get_json()["waiting"] == behind + order
    finally:
        unserve(celery)


def test_a_job_queued_behind_a_long_recording_being_embedded_says_so(client, new_key, settings, app):
    """A few clips uploaded while the worker embeds another job's long recording, queued before them and now the
    only file running (minutes on a CPU: 2 min for 3 hours with the tiny model at a batch of one): the clips' job
    stood `queued` at 0%, its `waiting` null and its ETA null, and `clapq upload` said "no progress for 2 min"
    with no reason, as if something hung. Behind only files being embedded (none queued before its own) it says
    so, as behind queued ones; once the recording is embedded, its files are next, not behind any. (A model of
    the test's own, which this process says it serves as a worker does: no other test's files are of it.)"""
    from sqlalchemy import text

    from api.jobs import BEHIND_RUNNING
    from clapq.db import session_scope
    from clapq.presence import serve, unserve

    celery = app.extensions["clapq_celery"]
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "sets and clips"}, headers=auth(key)).get_json()
    with session_scope(settings.database_url) as s:
        model = s.execute(text("INSERT INTO models (name, weights_sha256, dim) VALUES ('own', :w, 512) RETURNING id"),
                          {"w": uuid.uuid4().hex * 2}).scalar()
        s.execute(text("UPDATE libraries SET model_id = :m WHERE id = :l"), {"m": model, "l": lib["id"]})
    serve(celery, model)
    try:
        long_job, long_ids = job_rows(settings, lib["id"], [("set", 600_000_000, "running")], job_age_s=60)
        clips, _ = job_rows(settings, lib["id"], [(f"clip{i}", 1_000_000, "queued") for i in range(3)])
        got = client.get(f"/v1/jobs/{clips}", headers=auth(key)).get_json()
        assert got["waiting"] is None, got  # just queued: the worker may take them at any moment
        with session_scope(settings.database_url) as s:  # queued 40 s ago; the recording's heartbeat is fresh
            s.execute(text("UPDATE items SET updated_at = now() - interval '40 seconds' WHERE job_id = :j"),
                      {"j": clips})
        listed = client.get("/v1/jobs", headers=auth(key)).get_json()["jobs"]
        for got in (client.get(f"/v1/jobs/{clips}", headers=auth(key)).get_json(),
                    next(j for j in listed if j["id"] == str(clips))):
            assert got["status"] == "queued" and got["eta_s"] is None and got["waiting"] == BEHIND_RUNNING, got
        # the recording's own job is moving, not waiting
        assert client.get(f"/v1/jobs/{long_job}", headers=auth(key)).get_json()["waiting"] is None
        # a job queued after the clips is behind them, queued before its own (the tenant's own, which it says)
        later, _ = job_rows(settings, lib["id"], [("later", 1_000_000, "queued")])
        with session_scope(settings.database_url) as s:
            s.execute(text("UPDATE items SET updated_at = now() - interval '35 seconds' WHERE job_id = :j"),
                      {"j": later})
        assert client.get(f"/v1/jobs/{later}", headers=auth(key)).get_json()["waiting"] == (
            "none of its files is being embedded: the workers are on files queued before them, 3 of them this "
            "tenant's own, of its other jobs (a tenant's files are embedded in the order they were sent: `clapq jobs` "
            "lists them) (the queue's order: README, Operations)")
        # the recording embedded: the clips are next (a worker takes them now), not behind any
        with session_scope(settings.database_url) as s:
            s.execute(text("UPDATE items SET status = 'done', finished_at = now() - interval '35 seconds' "
                           "WHERE id = :i"), {"i": long_ids["set"]})
        assert client.get(f"/v1/jobs/{clips}", headers=auth(key)).get_json()["waiting"] is None
    finally:
        unserve(celery)


def test_a_job_whose_files_were_deleted_keeps_when_it_finished(client, new_key, settings):
    """A job all of whose files were deleted was listed `done` 0/0/0 with `finished_at` null, as if it had never
    ended: its finish time was its files', which went with them. Now a job finished when its last file ended, deleted
    since or not; one whose last files to go were deleted before they ended (queued), when they were deleted; and so
    for a job's copies of files deleted. Listed, each says the same."""
    import datetime

    from sqlalchemy import text

    from clapq.db import session_scope

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "emptied"}, headers=auth(key)).get_json()["id"]
    ended, ids = job_rows(settings, lib, [("a", 1000, "done"), ("b", 1000, "failed")], finished_s=50, job_age_s=200)
    queued, qids = job_rows(settings, lib, [("q", 1000, "queued")], job_age_s=200)
    half, hids = job_rows(settings, lib, [("d", 1000, "done"), ("r", 1000, "queued")], finished_s=50, job_age_s=200)
    copy, _ = job_rows(settings, lib, [])  # its one file a copy of "a"
    with session_scope(settings.database_url) as s:
        s.execute(text("INSERT INTO job_duplicates (job_id, item_id, copies) VALUES (:j, :i, 1)"),
                  {"j": copy, "i": ids["a"]})
        s.execute(text("UPDATE jobs SET duplicates = 1 WHERE id = :j"), {"j": copy})
        now = s.execute(text("SELECT now()")).scalar()

    def job(j) -> dict:
        return client.get(f"/v1/jobs/{j}", headers=auth(key)).get_json()

    before = {j: job(j)["finished_at"] for j in (ended, copy)}
    assert all(before.values()) and job(queued)["finished_at"] is None and job(half)["finished_at"] is None
    for i in [*ids.values(), *qids.values(), hids["r"]]:
        assert client.delete(f"/v1/items/{i}", headers=auth(key)).status_code == 200
    listed = {j["id"]: j for j in client.get("/v1/jobs", headers=auth(key)).get_json()["jobs"]}
    for j in (ended, queued, half, copy):
        got = job(j)
        assert got["status"] == "done" and got["finished_at"] is not None, got
        assert listed[str(j)]["finished_at"] == got["finished_at"], (listed[str(j)], got)
    assert job(ended)["finished_at"] == before[ended] and job(copy)["finished_at"] == before[copy]
    assert job(ended)["counts"]["total"] == 0 and job(copy)["counts"]["total"] == 0
    for j in (queued, half):  # ended by the deletion
        assert datetime.datetime.fromisoformat(job(j)["finished_at"]) >= now, job(j)
