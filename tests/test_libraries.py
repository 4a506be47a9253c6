"""A library renamed (PATCH /v1/libraries/<id>), and a library of another model than the service runs embedded again
into a new library of its model (POST /v1/libraries/<id>/reembed): the same stored files, names, metadata and order;
the old library untouched."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
import time
import uuid

import numpy as np
from sqlalchemy import text

from api import create_app
from api.removal import reclaimed
from clapq.blobs import BLOB_LOCK, BlobStore
from clapq.db import get_engine, session_scope
from clapq.models import WAITING_FOR_MODEL
from tests.audio import write
from tests.conftest import auth, just_before, retire, wait_for_a_lock_wait, wait_job
from tests.test_api_errors import err


def _file_row(settings, lib_id: str, filename: str, size: int, status: str) -> None:
    """A file of the library in `status`, in a job of its own, whose bytes the store does not hold."""
    with session_scope(settings.database_url) as s:
        s.execute(text("WITH j AS (INSERT INTO jobs (id, tenant_id, library_id, kind) SELECT gen_random_uuid(), "
                       "tenant_id, id, 'upload' FROM libraries WHERE id = :l RETURNING id, tenant_id, library_id) "
                       "INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, status) "
                       "SELECT gen_random_uuid(), tenant_id, library_id, id, :h, :f, :n, :s FROM j"),
                  {"l": lib_id, "h": uuid.uuid4().hex * 2, "f": filename, "n": size, "s": status})


def _vector(client, key: str, item: str) -> np.ndarray:
    r = client.get(f"/v1/items/{item}/embedding", headers=auth(key))
    assert r.status_code == 200, r.get_json()
    return np.asarray(r.get_json()["vector"], dtype=np.float32)


def test_a_library_of_a_retired_model_is_embedded_again_into_a_new_one(client, new_key, serving_worker, settings,
                                                                       tmp_path):
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "field"}, headers=auth(key)).get_json()["id"]
    files = {name: write(tmp_path / name, secs, seed=seed).read_bytes()
             for name, secs, seed in (("rain.wav", 0.6, 61), ("long.wav", 12.0, 62), ("dog.wav", 0.4, 63))}
    files["broken.wav"] = b"RIFF not a wav file at all" * 10
    meta = {"rain.wav": {"path": "a/rain.wav", "take": 3}}
    r = client.post(f"/v1/libraries/{lib}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": [(io.BytesIO(b), n) for n, b in files.items()],
                          "metadata": '{"rain.wav": {"path": "a/rain.wav", "take": 3}}'})
    assert r.status_code == 202, r.get_json()
    old_items = {e["filename"]: e["id"] for e in r.get_json()["items"]}
    assert wait_job(client, key, r.get_json()["job_id"])["status"] == "done_with_errors"
    # a cancelled file: queued, then cancelled (a job of its own, held in the queue's first place by nothing)
    quiet = write(tmp_path / "quiet.wav", 0.5, seed=64).read_bytes()
    _file_row(settings, lib, "quiet.wav", len(quiet), "cancelled")
    before = {n: _vector(client, key, i) for n, i in old_items.items() if n != "broken.wav"}
    other = retire(settings.database_url, lib)
    assert err(client.post("/v1/search", json={"library_id": lib, "text": "rain"}, headers=auth(key)),
               409)["message"].endswith(f"(POST /v1/libraries/{lib}/reembed; `clapq reembed --library field "
                                        "--into NEW`)")

    r = client.post(f"/v1/libraries/{lib}/reembed", json={"name": "field, new model"}, headers=auth(key))
    assert r.status_code == 202, r.get_json()
    made = r.get_json()
    new = made["library"]
    assert new["name"] == "field, new model" and new["model"]["id"] != other and new["item_count"] == 4, made
    assert (made["queued"], made["failed"], made["cancelled_left_out"]) == (3, 1, 1), made
    state = wait_job(client, key, made["job_id"])
    assert state["status"] == "done_with_errors" and state["counts"]["done"] == 3, state
    assert state["counts"]["failed"] == 1 and state["errors"][0]["filename"] == "broken.wav", state
    items = client.get(f"/v1/libraries/{new['id']}/items", headers=auth(key)).get_json()["items"]
    # the same files, in the order they were uploaded, with their metadata; the cancelled one left out
    assert [i["filename"] for i in items] == ["rain.wav", "long.wav", "dog.wav", "broken.wav"], items
    assert items[0]["metadata"] == meta["rain.wav"] and items[0]["job_id"] == made["job_id"], items[0]
    assert items[3]["status"] == "failed" and items[3]["error"], items[3]
    for item in items[:3]:  # embedded anew (the same weights here): the vectors the files gave before
        assert item["status"] == "done" and item["duration_s"] is not None, item
        assert np.array_equal(_vector(client, key, item["id"]), before[item["filename"]]), item["filename"]
    segments = client.get(f"/v1/items/{items[1]['id']}/segments", headers=auth(key)).get_json()
    assert [(s["start_s"], s["end_s"]) for s in segments["segments"]] == [(0.0, 10.0), (2.0, 12.0)], segments
    found = client.post("/v1/search", json={"library_id": new["id"], "text": "rain", "k": 5}, headers=auth(key))
    assert found.status_code == 200 and len(found.get_json()["results"]) == 3, found.get_json()
    # the old library as it was, still of its model
    old = client.get(f"/v1/libraries/{lib}", headers=auth(key)).get_json()
    assert old["model"]["id"] == other and old["counts"] == {"queued": 0, "running": 0, "done": 3, "failed": 1,
                                                             "cancelled": 1}, old
    # deleted, it leaves the stored files the new library holds: each still downloads whole
    gone = client.delete(f"/v1/libraries/{lib}", headers=auth(key)).get_json()["deleted"]
    assert gone["items"] == 5 and gone["stored_files"] == 1, gone  # the cancelled file's bytes, held by no other
    for item in items:
        r = client.get(f"/v1/items/{item['id']}/audio", headers=auth(key))
        assert r.status_code == 200 and r.data == files[item["filename"]], item["filename"]


def test_a_reembed_that_cannot_be_says_why(client, new_key, settings, tmp_path):
    key, stranger = new_key(), new_key()
    lib = client.post("/v1/libraries", json={"name": "ours"}, headers=auth(key)).get_json()["id"]
    e = err(client.post(f"/v1/libraries/{lib}/reembed", json={"name": "again"}, headers=auth(key)), 409)
    assert e["code"] == "same_model" and e["message"].startswith("library 'ours' is of the model this service runs"), e
    retire(settings.database_url, lib)
    e = err(client.post(f"/v1/libraries/{lib}/reembed", json={"name": "again"}, headers=auth(key)), 409)
    assert e["message"] == "library 'ours' has no files to re-embed (none, or only cancelled ones)", e
    for body, said in (({}, "'name' must be a string"), ({"name": "x", "model": "y"}, "which a re-embed does not take"),
                       ([], "send a JSON object like"), ({"name": " "}, "'name' must be a string")):
        assert said in err(client.post(f"/v1/libraries/{lib}/reembed", json=body, headers=auth(key)),
                           400)["message"], body
    assert "already exists" in err(client.post(f"/v1/libraries/{lib}/reembed", json={"name": "ours"},
                                               headers=auth(key)), 409)["message"]
    # another tenant's library is none of theirs
    assert err(client.post(f"/v1/libraries/{lib}/reembed", json={"name": "mine"}, headers=auth(stranger)),
               404)["code"] == "not_found"
    # over the backlog's bound, as an upload would be: a 429, and no library made (a file of another library of
    # the tenant, not embedded yet, is the backlog here)
    _file_row(settings, lib, "a.wav", 1, "queued")
    other = client.post("/v1/libraries", json={"name": "another"}, headers=auth(key)).get_json()["id"]
    _file_row(settings, other, "b.wav", 1, "queued")
    busy = create_app(dataclasses.replace(settings, max_pending=1, max_pending_per_tenant=1)).test_client()
    e = err(busy.post(f"/v1/libraries/{lib}/reembed", json={"name": "later"}, headers=auth(key)), 429)
    assert e["code"] == "busy" and "1 of your files is waiting to be embedded" in e["message"], e
    # nothing was made by any of these
    names = [x["name"] for x in client.get("/v1/libraries", headers=auth(key)).get_json()["libraries"]]
    assert names == ["ours", "another"], names
    # the library's own files waiting (for its model, which no worker here runs) are no backlog of this request:
    # it is their way out (a library of a tenant's share of them got 429s for ever, and `clapq reembed` waited)
    assert client.delete(f"/v1/libraries/{other}", headers=auth(key)).status_code == 200
    busy = create_app(dataclasses.replace(settings, max_pending=10**9, max_pending_per_tenant=1)).test_client()
    r = busy.post(f"/v1/libraries/{lib}/reembed", json={"name": "later"}, headers=auth(key))
    assert r.status_code == 202 and r.get_json()["queued"] == 1, r.get_json()
    for made in (r.get_json()["library"]["id"], lib):
        assert client.delete(f"/v1/libraries/{made}", headers=auth(key)).status_code == 200


def test_files_parked_for_a_retired_model_do_not_hold_back_uploads(client, new_key, settings):
    """Files of a library of another model than the service runs, parked for a worker of it (what a worker does with
    their tasks once CLAPQ_MODEL changed), hold no place in the queue: counted, a tenant with a share of them got 429
    for every upload into a library of the new model, told its files were waiting to be embedded. A file waiting
    for this service's workers still counts, against the tenant's share and the service's bound."""
    key = new_key()
    old = client.post("/v1/libraries", json={"name": "old model"}, headers=auth(key)).get_json()["id"]
    new = client.post("/v1/libraries", json={"name": "new model"}, headers=auth(key)).get_json()["id"]
    retire(settings.database_url, old)
    _file_row(settings, old, "parked.wav", 1, "queued")
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET claimed_by = :m WHERE library_id = :l"), {"m": WAITING_FOR_MODEL, "l": old})

    def send(app, name):
        return app.post(f"/v1/libraries/{new}/batches", headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(b"not audio " + name.encode()), name)]})

    with session_scope(settings.database_url) as s:  # other tests' files waiting, this service's workers' to embed
        others = s.execute(text("SELECT count(*) FROM items WHERE status IN ('queued', 'running') "
                                "AND claimed_by IS DISTINCT FROM :m"), {"m": WAITING_FOR_MODEL}).scalar()
    tenant, service = {"max_pending": 10**9, "max_pending_per_tenant": 1}, {"max_pending": others + 1,
                                                                           "max_pending_per_tenant": 10**9}
    try:
        for bounds in (tenant, service):
            busy = create_app(dataclasses.replace(settings, **bounds)).test_client()
            r = send(busy, "a.wav")
            assert r.status_code == 202, (bounds, r.get_json())
            assert client.post(f"/v1/jobs/{r.get_json()['job_id']}/cancel", headers=auth(key)).status_code in (200, 409)
        _file_row(settings, new, "waiting.wav", 1, "queued")
        for bounds, said in ((tenant, "1 of your files is waiting"),
                             (service, f"the service has {others + 1} files or more waiting")):
            busy = create_app(dataclasses.replace(settings, **bounds)).test_client()
            assert said in err(send(busy, "b.wav"), 429)["message"], bounds
    finally:
        for lib in (old, new):
            assert client.delete(f"/v1/libraries/{lib}", headers=auth(key)).status_code == 200


def test_a_library_is_renamed_and_keeps_its_files(client, new_key, serving_worker, tmp_path):
    key, stranger = new_key(), new_key()
    lib = client.post("/v1/libraries", json={"name": "feild"}, headers=auth(key)).get_json()["id"]
    other = client.post("/v1/libraries", json={"name": "sfx"}, headers=auth(key)).get_json()["id"]
    wav = write(tmp_path / "a.wav", 0.5, seed=71).read_bytes()
    r = client.post(f"/v1/libraries/{lib}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": (io.BytesIO(wav), "a.wav")})
    assert wait_job(client, key, r.get_json()["job_id"])["status"] == "done"
    r = client.patch(f"/v1/libraries/{lib}", json={"name": " Field — Café "}, headers=auth(key))
    assert r.status_code == 200, r.get_json()
    got = r.get_json()
    assert got["name"] == "Field — Caf\u00e9" and got["id"] == lib and got["counts"]["done"] == 1, got
    assert got == client.get(f"/v1/libraries/{lib}", headers=auth(key)).get_json()
    # its files and vectors stay: searched under its new name as before
    found = client.post("/v1/search", json={"library_id": lib, "text": "tone"}, headers=auth(key)).get_json()
    assert [x["filename"] for x in found["results"]] == ["a.wav"], found
    # its own name, written another way in Unicode (e + combining accent), is no conflict; nor another case of it
    assert client.patch(f"/v1/libraries/{lib}", json={"name": "Field — Cafe\u0301"},
                        headers=auth(key)).get_json()["name"] == "Field — Caf\u00e9"
    assert client.patch(f"/v1/libraries/{lib}", json={"name": "field"}, headers=auth(key)).get_json()["name"] == "field"
    e = err(client.patch(f"/v1/libraries/{lib}", json={"name": "sfx"}, headers=auth(key)), 409)
    assert e["message"] == "a library named 'sfx' already exists", e
    for body, said in (({}, "'name' must be a string"), ({"name": "x\ty"}, "control characters"),
                       ({"name": "x", "model": "y"}, "which a library's PATCH does not take"),
                       ({"name": str(uuid.uuid4())}, "must not be a library id")):
        assert said in err(client.patch(f"/v1/libraries/{lib}", json=body, headers=auth(key)), 400)["message"], body
    assert err(client.patch(f"/v1/libraries/{lib}", json={"name": "mine"}, headers=auth(stranger)),
               404)["code"] == "not_found"
    names = sorted(x["name"] for x in client.get("/v1/libraries", headers=auth(key)).get_json()["libraries"])
    assert names == ["field", "sfx"], names
    assert client.delete(f"/v1/libraries/{other}", headers=auth(key)).status_code == 200
    assert err(client.patch(f"/v1/libraries/{other}", json={"name": "gone"}, headers=auth(key)), 404)


def _deleted_meanwhile(app, settings, key: str, lib: str, at, gone: tuple[str, str] | None = None
                       ) -> tuple[list, tuple[int, dict]]:
    """The library of other model `lib`, re-embedded into 'moved', and deleted by another request (DELETE
    /v1/libraries/<id>, or of `gone`, ("items", id): DELETE /v1/items/<id>; in a thread) that commits just before
    the re-embed's first statement `at` matches: [the deletion's answer] and the re-embed's answer (status,
    JSON), the deletion ended. The deletion's removal of the stored files waits for the re-embed's transaction
    where it holds the shared BLOB_LOCK, or else ends at once; `then` returns in either case, the deletion
    committed."""
    engine = get_engine(settings.database_url)
    table, row = gone or ("libraries", lib)
    deleted: list = []
    deleter = threading.Thread(target=lambda: deleted.append(
        app.test_client().delete(f"/v1/{table}/{row}", headers=auth(key))))

    def delete_it() -> None:
        deleter.start()
        deadline = time.monotonic() + 30
        with engine.connect() as look:  # the exclusive lock of the removal waiting, or the deletion done
            while deleter.is_alive() and not look.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = "
                    "current_database() AND query LIKE 'SELECT pg_advisory_xact_lock(%'")):
                assert time.monotonic() < deadline, "the deletion neither ended nor waited for the re-embed"
                look.rollback()
                time.sleep(0.05)
            look.rollback()
            assert look.scalar(text(f"SELECT count(*) FROM {table} WHERE id = :i"), {"i": row}) == 0

    client = app.test_client()
    with just_before(settings.database_url, at, delete_it) as met:
        r = client.post(f"/v1/libraries/{lib}/reembed", json={"name": "moved"}, headers=auth(key))
    deleter.join(60)
    assert met and not deleter.is_alive() and deleted, (met, deleted)
    return deleted, (r.status_code, r.get_json())


def _retired_library(client, key: str, settings, tmp_path, seeds) -> tuple[str, dict]:
    """A library of files embedded, then bound to a model the service no longer runs: its id, and
    {filename: bytes}. Bytes of their own (a tone no other test writes): stored files are shared by every item
    that holds the same bytes, and a file of 0.5 s of seed 94 that another test had uploaded stayed on disk where
    this module's test looked for its removal (in the whole suite, not alone)."""
    lib = client.post("/v1/libraries", json={"name": "old"}, headers=auth(key)).get_json()["id"]
    files = {f"{seed}.wav": write(tmp_path / f"{seed}.wav", 0.5, freq=1237.0, seed=seed).read_bytes() for seed in seeds}
    r = client.post(f"/v1/libraries/{lib}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": [(io.BytesIO(b), n) for n, b in files.items()]})
    assert r.status_code == 202 and wait_job(client, key, r.get_json()["job_id"])["status"] == "done", r.get_json()
    retire(settings.database_url, lib)
    return lib, files


def test_a_library_deleted_if_empty_is_kept_where_an_upload_commits_into_it_meanwhile(client, new_key, settings):
    """`DELETE /v1/libraries/<id>?if_empty=1` (how `clapq upload` removes the library it made for a first request
    the API refused): an upload into it whose rows are in but not committed as the deletion asks is waited for, and
    the library, holding its file now, is kept (409 library_not_empty); a check and a delete of two requests would
    have deleted that file with it (helper-135). An empty one is deleted; a value other than a yes or no, or none, is
    a 400."""
    key = new_key()
    made = [client.post("/v1/libraries", headers=auth(key), json={"name": f"maybe {n}"}).get_json()["id"]
            for n in (1, 2)]
    e = err(client.delete(f"/v1/libraries/{made[0]}?if_empty=perhaps", headers=auth(key)), 400)
    assert "if_empty=1" in e["message"], e
    engine = get_engine(settings.database_url)
    with engine.connect() as upload:
        upload.execute(text("WITH j AS (INSERT INTO jobs (id, tenant_id, library_id, kind) SELECT gen_random_uuid(), "
                            "tenant_id, id, 'upload' FROM libraries WHERE id = :l RETURNING id, tenant_id, library_id) "
                            "INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, "
                            "status) SELECT gen_random_uuid(), tenant_id, library_id, id, :h, 'late.wav', 10, 'queued' "
                            "FROM j"), {"l": made[0], "h": uuid.uuid4().hex * 2})
        answer: list = []
        asked = threading.Thread(target=lambda: answer.append(
            client.delete(f"/v1/libraries/{made[0]}?if_empty=1", headers=auth(key))), daemon=True)
        asked.start()
        wait_for_a_lock_wait(engine, "the deletion did not wait for the upload committing into the library")
        upload.commit()
    asked.join(60)
    e = err(answer[0], 409)
    assert e["code"] == "library_not_empty" and "holds 1 file," in e["message"], e
    # given with no value, as a flag (`?if_empty`): it was read as 0, and deleted the library with its file
    for bare in ("if_empty", "if_empty=", "if_empty=%20"):
        e = err(client.delete(f"/v1/libraries/{made[0]}?{bare}", headers=auth(key)), 400)
        assert e["message"] == ("'if_empty' has no value; use if_empty=1 to delete the library only where it holds "
                                "no file, or leave it out"), e
    kept = client.get(f"/v1/libraries/{made[0]}", headers=auth(key)).get_json()
    assert kept["item_count"] == 1, kept
    r = client.delete(f"/v1/libraries/{made[1]}?if_empty=1", headers=auth(key))
    assert r.status_code == 200 and r.get_json()["deleted"] == {"library": made[1], "items": 0, "stored_files": 0}, \
        r.get_json()
    client.delete(f"/v1/libraries/{made[0]}", headers=auth(key))


def test_an_upload_into_a_library_being_deleted_if_empty_is_refused_not_deleted_with_it(client, new_key, settings):
    """`?if_empty=1` found the library empty under its row's lock, then deleted as a DELETE without it does: whose
    first pass committed, letting the lock go, before its second took it again, and an upload that committed in that
    moment had its file deleted with the library (200, "items": 1). The lock is held from the look to the end: the
    upload waits for it and then finds no library (its insert refused), and nothing of it is deleted."""
    from sqlalchemy.exc import IntegrityError

    key = new_key()
    lib_id = client.post("/v1/libraries", headers=auth(key), json={"name": "empty"}).get_json()["id"]
    engine, seen, upload = get_engine(settings.database_url), [], []

    def insert() -> None:
        try:
            with engine.begin() as conn:
                conn.execute(text("WITH j AS (INSERT INTO jobs (id, tenant_id, library_id, kind) SELECT "
                                  "gen_random_uuid(), tenant_id, id, 'upload' FROM libraries WHERE id = :l RETURNING "
                                  "id, tenant_id, library_id) INSERT INTO items (id, tenant_id, library_id, job_id, "
                                  "sha256, filename, size_bytes, status) SELECT gen_random_uuid(), tenant_id, "
                                  "library_id, id, :h, 'late.wav', 10, 'queued' FROM j"),
                             {"l": lib_id, "h": uuid.uuid4().hex * 2})
            upload.append("committed")
        except IntegrityError as exc:  # the library gone under it
            upload.append(exc)

    def upload_meanwhile() -> None:  # until it has committed, or waits on the deletion's lock
        threading.Thread(target=insert, daemon=True).start()
        deadline = time.monotonic() + 30
        with engine.connect() as look:
            while not upload and not look.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type "
                                                      "= 'Lock' AND datname = current_database()")):
                assert time.monotonic() < deadline, "the upload neither committed nor waited"
                look.rollback()
                time.sleep(0.05)

    def second_library_lock(sql: str) -> bool:  # the deletion's library lock after its look and first pass
        if "FROM libraries" in sql and sql.rstrip().endswith("FOR UPDATE"):
            seen.append(sql)
        return len(seen) == 2

    with just_before(settings.database_url, second_library_lock, upload_meanwhile) as met:
        r = client.delete(f"/v1/libraries/{lib_id}?if_empty=1", headers=auth(key))
    deadline = time.monotonic() + 30
    while not upload and time.monotonic() < deadline:
        time.sleep(0.05)
    assert met and r.status_code == 200, (met, r.get_json())
    assert r.get_json()["deleted"] == {"library": lib_id, "items": 0, "stored_files": 0}, r.get_json()
    assert len(upload) == 1 and isinstance(upload[0], IntegrityError), upload


def test_a_deletion_of_the_library_committed_while_it_is_reembedded_leaves_the_new_ones_files(
        app, client, new_key, serving_worker, settings, tmp_path):
    """The library re-embedded is deleted, and the deletion commits, after the re-embed has copied its files
    (the INSERT of the new items ran) and before it commits: the deletion's removal of their stored files waits
    for the re-embed's transaction (the shared BLOB_LOCK it holds) and then finds the new items holding them.
    Every file of the new library is on disk, embeds, and downloads whole. The deletion answers before that
    removal (api.removal.reclaim_later), while the copies are not committed: its `stored_files` counts the 3 files
    that no item of the tenant held once it committed (it said 0 when it waited for the re-embed)."""
    key = new_key()
    lib, files = _retired_library(client, key, settings, tmp_path, (91, 92, 93))
    # the lane's lock: the last statement before the commit (after the copy, and the count of cancelled files)
    deleted, (status, made) = _deleted_meanwhile(app, settings, key, lib, lambda sql: "hashtext(" in sql)
    assert status == 202 and made["queued"] == 3, made
    store = BlobStore(settings.blob_dir)
    items = client.get(f"/v1/libraries/{made['library']['id']}/items", headers=auth(key)).get_json()["items"]
    assert sorted(i["filename"] for i in items) == sorted(files), items
    assert [i["filename"] for i in items if not store.exists(i["sha256"])] == [], "stored files removed"
    assert deleted[0].status_code == 200, deleted[0].get_json()
    assert deleted[0].get_json()["deleted"] == {"library": lib, "items": 3, "stored_files": 3}, deleted[0].get_json()
    reclaimed(30)
    assert [i["filename"] for i in items if not store.exists(i["sha256"])] == [], "stored files removed"
    assert wait_job(client, key, made["job_id"])["status"] == "done"
    for item in items:
        r = client.get(f"/v1/items/{item['id']}/audio", headers=auth(key))
        assert r.status_code == 200 and r.data == files[item["filename"]], item["filename"]


def test_a_reembed_of_a_library_deleted_before_it_copied_its_files_makes_nothing(app, client, new_key,
                                                                                   serving_worker, settings, tmp_path):
    """The deletion commits just before the re-embed reads and copies the library's files (one statement): the copy
    finds none, and the re-embed answers 404 (the library is gone, as a moment later), making no library; the
    deletion's removal removes the stored files no item holds."""
    key = new_key()
    lib, files = _retired_library(client, key, settings, tmp_path, (94, 95))
    deleted, (status, made) = _deleted_meanwhile(
        app, settings, key, lib, lambda sql: "INSERT INTO items" in sql and "row_number()" in sql)
    assert status == 404 and made["error"]["code"] == "not_found", made
    assert deleted[0].get_json()["deleted"] == {"library": lib, "items": 2, "stored_files": 2}, deleted[0].get_json()
    assert client.get("/v1/libraries", headers=auth(key)).get_json()["libraries"] == []
    reclaimed(30)  # removed after the answer
    assert not any(BlobStore(settings.blob_dir).exists(hashlib.sha256(b).hexdigest()) for b in files.values())


def test_a_removal_of_stored_files_does_not_wait_for_a_reembeds_copy(app, client, new_key, serving_worker, settings,
                                                                     tmp_path):
    """While a re-embed copies a library's files (one statement: 0.6 s for 20,000 files), a removal of stored
    files (the exclusive BLOB_LOCK) is not held off: the re-embed took the shared lock before its copy, and a
    removal waiting for it held up every upload and deletion that came after, of any tenant, for as long."""
    key = new_key()
    lib, _ = _retired_library(client, key, settings, tmp_path, (96,))
    free = []

    def try_the_lock() -> None:
        with get_engine(settings.database_url).begin() as conn:
            free.append(conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": BLOB_LOCK}))

    with just_before(settings.database_url, lambda sql: "INSERT INTO items" in sql and
                     "row_number()" in sql, try_the_lock):
        r = client.post(f"/v1/libraries/{lib}/reembed", json={"name": "copied"}, headers=auth(key))
    assert r.status_code == 202 and free == [True], (free, r.get_json())


def test_a_file_deleted_and_removed_between_a_reembeds_copy_and_its_lock_is_a_503(
        app, client, new_key, serving_worker, settings, tmp_path):
    """A file of the library is deleted, and its stored copy removed (its removal waits for no one), after the
    re-embed copied it and before the re-embed took the shared BLOB_LOCK: the new item would name a file no longer
    on disk, so nothing is made, and a 503 says to send it again (as an upload's race does); sent again, the
    re-embed makes the library of the files left, every one on disk."""
    key = new_key()
    lib, files = _retired_library(client, key, settings, tmp_path, (97, 98))
    item = {i["filename"]: i["id"] for i in client.get(f"/v1/libraries/{lib}/items", headers=auth(key)).get_json()[
        "items"]}["97.wav"]
    deleted, (status, made) = _deleted_meanwhile(app, settings, key, lib,
                                                 lambda sql: "pg_advisory_xact_lock_shared(" in sql, ("items", item))
    assert deleted[0].get_json()["deleted"] == {"item": item, "items": 1, "stored_files": 1}, deleted[0].get_json()
    assert status == 503 and made["error"]["code"] == "conflict", made
    store = BlobStore(settings.blob_dir)
    assert not store.exists(hashlib.sha256(files["97.wav"]).hexdigest())
    assert [x["name"] for x in client.get("/v1/libraries", headers=auth(key)).get_json()["libraries"]] == ["old"]
    r = client.post(f"/v1/libraries/{lib}/reembed", json={"name": "moved"}, headers=auth(key))
    assert r.status_code == 202 and r.get_json()["queued"] == 1, r.get_json()
    items = client.get(f"/v1/libraries/{r.get_json()['library']['id']}/items", headers=auth(key)).get_json()["items"]
    assert [(i["filename"], store.exists(i["sha256"])) for i in items] == [("98.wav", True)], items
    assert wait_job(client, key, r.get_json()["job_id"])["status"] == "done"


def test_a_reembeds_files_past_the_first_lane_are_marked_as_they_are_copied_and_all_end_embedded(
        app, client, new_key, serving_worker, settings, tmp_path, monkeypatch):
    """A re-embed marks its queued files past the first lane's room (FAST_LANE_TASKS tasks' worth) as in the bulk
    lane in the copy itself, counting its queued files only (a file failed in its bytes comes first here), and the
    lane's decision writes no row again where the tenant has nothing else waiting: its UPDATE of every file in the
    bulk lane took 17-31 s of a re-embed of 200,000 (benchmarks/reembed.py). The marks and the first lane are as an
    upload's, and every file, sent in one pipeline to Redis, ends embedded."""
    import api.libraries
    from api.db import send_committed
    from clapq.models import IN_BULK_LANE
    from clapq.queue import FAST_LANE_TASKS

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "many"}, headers=auth(key)).get_json()["id"]
    broken = client.post(f"/v1/libraries/{lib}/batches", headers=auth(key), content_type="multipart/form-data",
                         data={"files": [(io.BytesIO(b"RIFF not a wav file at all" * 10), "broken.wav")]})
    assert wait_job(client, key, broken.get_json()["job_id"])["status"] == "failed"
    lane = FAST_LANE_TASKS * settings.items_per_task
    files = {f"{seed}.wav": write(tmp_path / f"{seed}.wav", 0.3, freq=1531.0, seed=seed).read_bytes()
             for seed in range(200, 200 + lane + 2 * settings.items_per_task - 1)}
    r = client.post(f"/v1/libraries/{lib}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": [(io.BytesIO(b), n) for n, b in files.items()]})
    assert wait_job(client, key, r.get_json()["job_id"])["status"] == "done", r.get_json()
    retire(settings.database_url, lib)
    sends, updated = [], []
    monkeypatch.setattr(api.libraries, "send_committed", lambda ids, fast, **extra: sends.append((ids, fast, extra)))

    def rows(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().startswith("UPDATE items"):
            updated.append(cursor.rowcount)

    from sqlalchemy import event

    event.listen(get_engine(settings.database_url), "after_cursor_execute", rows)
    try:
        r = client.post(f"/v1/libraries/{lib}/reembed", json={"name": "many, new model"}, headers=auth(key))
    finally:
        event.remove(get_engine(settings.database_url), "after_cursor_execute", rows)
    made = r.get_json()
    assert r.status_code == 202 and (made["queued"], made["failed"]) == (len(files), 1), made
    assert sum(updated) == 0, updated
    items = client.get(f"/v1/libraries/{made['library']['id']}/items?limit=100", headers=auth(key)).get_json()["items"]
    assert items[0]["filename"] == "broken.wav" and items[0]["status"] == "failed", items[0]
    queued = [uuid.UUID(i["id"]) for i in items[1:]]
    [(ids, fast, extra)] = sends
    assert (ids, fast) == (queued, lane), (ids, fast)
    with session_scope(settings.database_url) as s:
        marked = s.scalars(text("SELECT id FROM items WHERE job_id = :j AND claimed_by = :m ORDER BY id"),
                           {"j": made["job_id"], "m": IN_BULK_LANE}).all()
    assert marked == queued[lane:], (len(marked), len(queued))
    with app.app_context():
        send_committed(ids, fast, **extra)
    state = wait_job(client, key, made["job_id"])
    assert state["status"] == "done_with_errors" and state["counts"]["done"] == len(files), state
