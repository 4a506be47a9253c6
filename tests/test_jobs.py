"""Job semantics: duplicates count as done (a failed file uploaded again is retried), cancel, retry-failed,
listing and paging, backpressure."""

from __future__ import annotations

import dataclasses
import io
import json

from tests.audio import write
from tests.conftest import auth, wait_job
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
    assert client.get("/v1/jobs", headers=auth(new_key())).get_json()["jobs"] == []

    items = client.get(f"/v1/jobs/{first['job_id']}/items?limit=2", headers=auth(key)).get_json()
    rest = client.get(f"/v1/jobs/{first['job_id']}/items?limit=2&cursor={items['next_cursor']}",
                      headers=auth(key)).get_json()
    assert sorted(i["id"] for i in items["items"] + rest["items"]) == sorted(i["id"] for i in first["items"])
    assert rest["next_cursor"] is None
    assert client.get(f"/v1/jobs/{first['job_id']}/items?status=bogus", headers=auth(key)).status_code == 400


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

    second = upload(client, key, lib["id"], [bad, good, bad]).get_json()
    retried, dup, again = second["items"]
    assert retried == {"id": bad_id, "filename": "broken.wav", "status": "queued", "retry_of": "failed"}
    assert dup["duplicate_of"] == first["items"][1]["id"] and dup["status"] == "done"
    # the same bytes twice in one batch: one retry, then a duplicate of it
    assert again == {"id": bad_id, "filename": "broken.wav", "status": "queued", "duplicate_of": bad_id}
    job = wait_job(client, key, second["job_id"])
    assert job["status"] == "done_with_errors", job
    assert job["counts"]["failed"] == 1 and job["counts"]["duplicates"] == 2 and job["counts"]["total"] == 3
    assert [e["item_id"] for e in job["errors"]] == [bad_id]
    assert "not a readable audio file" in job["errors"][0]["error"]
    item = client.get(f"/v1/items/{bad_id}", headers=auth(key)).get_json()
    assert item["status"] == "failed" and item["attempts"] == 1 and item["job_id"] == second["job_id"]
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

    # cancel a job whose items cannot start: a library of the tenant whose work the worker never sees
    from api import create_app

    paused = create_app(dataclasses.replace(settings, redis_url="redis://127.0.0.1:9/0")).test_client()
    files = [(io.BytesIO(good.read_bytes() + b"%d" % i), f"{i}.wav") for i in range(3)]
    up2 = paused.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), data={"files": files},
                      content_type="multipart/form-data").get_json()
    assert up2["items"] and client.get(f"/v1/jobs/{up2['job_id']}", headers=auth(key)).get_json()["status"] == "queued"
    c = client.post(f"/v1/jobs/{up2['job_id']}/cancel", headers=auth(key)).get_json()
    assert c["status"] == "cancelled" and c["counts"]["cancelled"] == 3


def test_backpressure_answers_429_with_retry_after(client, new_key, settings):
    from api import create_app

    full = create_app(dataclasses.replace(settings, max_pending=0)).test_client()
    key = new_key()
    lib = full.post("/v1/libraries", json={"name": "bp"}, headers=auth(key)).get_json()
    r = full.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), content_type="multipart/form-data",
                  data={"files": [(io.BytesIO(b"x"), "x.wav")]})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert "CLAPQ_MAX_PENDING" in r.get_json()["error"]["message"]


def test_per_file_size_limit(client, new_key, settings):
    from api import create_app

    small = create_app(dataclasses.replace(settings, max_file_bytes=100)).test_client()
    key = new_key()
    lib = small.post("/v1/libraries", json={"name": "fs"}, headers=auth(key)).get_json()
    r = small.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(key), content_type="multipart/form-data",
                   data={"files": [(io.BytesIO(b"x" * 10), "ok.wav"), (io.BytesIO(b"x" * 500), "big.wav")]})
    assert r.status_code == 413 and "big.wav" in r.get_json()["error"]["message"]
    assert client.get(f"/v1/libraries/{lib['id']}", headers=auth(key)).get_json()["item_count"] == 0
