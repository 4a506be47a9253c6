"""Deleting items and libraries: gone from every answer at once, their files removed from disk only where
no other item (of any library or tenant) holds the same bytes, and never while an upload of those bytes
is committing."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from api import create_app
from api.removal import reclaimed
from clapq.blobs import BLOB_LOCK, BlobStore, file_sha256
from clapq.db import get_engine, session_scope
from clapq.models import Embedding, Item, Job, Segment
from tests.audio import write
from tests.conftest import auth, just_before, row_lockable, wait_for_a_lock_wait, wait_job
from tests.test_e2e import upload


def _library(client, key, name):
    return client.post("/v1/libraries", json={"name": name}, headers=auth(key)).get_json()["id"]


def _done(client, key, lib, paths) -> dict:
    """Upload, wait for the job, and return {filename: item id}."""
    up = upload(client, key, lib, paths).get_json()
    assert wait_job(client, key, up["job_id"])["status"] == "done"
    return {it["filename"]: it["id"] for it in up["items"]}


def _vectors(settings, item_id) -> int:
    with session_scope(settings.database_url) as s:
        return (s.scalar(select(text("count(*)")).select_from(Segment).where(Segment.item_id == item_id))
                + s.scalar(select(text("count(*)")).select_from(Embedding).where(Embedding.item_id == item_id)))


def test_deleting_items(client, new_key, worker, settings, tmp_path):
    key, other = new_key(), new_key()
    a, b = _library(client, key, "a"), _library(client, key, "b")
    x = write(tmp_path / "x.wav", 3.0, seed=11)
    shared = write(tmp_path / "shared.wav", 2.0, seed=12)
    y = write(tmp_path / "y.wav", 12.0, seed=13)  # two windows
    ids = _done(client, key, a, [x, shared, y])
    in_b = _done(client, key, b, [shared])["shared.wav"]
    # y sent again in a later job: that job holds a copy of it
    again = upload(client, key, a, [y]).get_json()["job_id"]
    assert wait_job(client, key, again)["counts"]["duplicates"] == 1
    store = BlobStore(settings.blob_dir)
    sha = {name: client.get(f"/v1/items/{i}", headers=auth(key)).get_json()["sha256"] for name, i in ids.items()}
    assert _vectors(settings, ids["y.wav"]) == 3  # two windows (0-10 s, 2-12 s) and the pooled vector

    # another tenant cannot delete it, or learn that it exists
    assert client.delete(f"/v1/items/{ids['x.wav']}", headers=auth(other)).status_code == 404

    r = client.delete(f"/v1/items/{ids['x.wav']}", headers=auth(key))
    assert r.status_code == 200 and r.get_json()["deleted"] == {"item": ids["x.wav"], "items": 1, "stored_files": 1}
    assert client.get(f"/v1/items/{ids['x.wav']}", headers=auth(key)).status_code == 404
    assert client.delete(f"/v1/items/{ids['x.wav']}", headers=auth(key)).status_code == 404
    assert not store.exists(sha["x.wav"]) and _vectors(settings, ids["x.wav"]) == 0
    shard = store.path_for(sha["x.wav"]).parent  # no empty shard directory left behind
    assert not shard.exists() or any(shard.iterdir())
    hits = client.get("/v1/search", query_string={"library_id": a, "q": "a tone", "k": 10}, headers=auth(key))
    assert ids["x.wav"] not in {h["item_id"] for h in hits.get_json()["results"]}
    assert len(hits.get_json()["results"]) == 2
    known = client.post(f"/v1/libraries/{a}/known", json={"sha256": [sha["x.wav"]]}, headers=auth(key))
    assert known.get_json()["known"] == []

    # bytes another library holds stay on disk, and that library's item is untouched
    r = client.delete(f"/v1/items/{ids['shared.wav']}", headers=auth(key))
    assert r.get_json()["deleted"]["stored_files"] == 0 and store.exists(sha["shared.wav"])
    assert client.get(f"/v1/items/{in_b}/audio", headers=auth(key)).data == shared.read_bytes()
    assert _vectors(settings, in_b) == 2

    # the job that held a copy of y no longer counts it
    assert client.delete(f"/v1/items/{ids['y.wav']}", headers=auth(key)).status_code == 200
    job = client.get(f"/v1/jobs/{again}", headers=auth(key)).get_json()
    assert job["counts"]["duplicates"] == 0 and job["counts"]["total"] == 0 and job["status"] == "done"
    assert _vectors(settings, ids["y.wav"]) == 0 and not store.exists(sha["y.wav"])

    # sent again, a deleted file is a new item, embedded and stored again
    back = _done(client, key, a, [x])["x.wav"]
    assert back != ids["x.wav"] and store.exists(sha["x.wav"]) and _vectors(settings, back) == 2

    # the library's items, paged and by status
    page = client.get(f"/v1/libraries/{a}/items", query_string={"limit": 1}, headers=auth(key)).get_json()
    assert [i["id"] for i in page["items"]] == [back] and page["next_cursor"] is None
    assert client.get(f"/v1/libraries/{a}/items", query_string={"status": "failed"},
                      headers=auth(key)).get_json()["items"] == []
    assert client.get(f"/v1/libraries/{a}/items", query_string={"status": "gone"}, headers=auth(key)).status_code == 400
    assert client.get(f"/v1/libraries/{a}/items", headers=auth(other)).status_code == 404


def test_deleting_many_items_in_one_request(app, client, new_key, worker, settings, tmp_path):
    """POST /v1/libraries/<id>/deletions deletes the items of that library it names, in one request, as
    DELETE /v1/items/<id> deletes one (`clapq delete` sent a request a file: 500 files took 53 s, helper-73).
    The ids that name no item of the library, an unknown one, another library's and another tenant's, are
    `not_found` alike (no leak), and stay; `stored_files` counts as a one-item DELETE does. A body it cannot
    take is a 400 that deletes nothing; the rate limit counts the request once."""
    key, other = new_key(), new_key()
    a, b, theirs = _library(client, key, "bulk-a"), _library(client, key, "bulk-b"), _library(client, other, "t")
    x, y = write(tmp_path / "x.wav", 1.0, seed=81), write(tmp_path / "y.wav", 1.0, seed=82)
    shared = write(tmp_path / "shared.wav", 1.0, seed=83)
    ids = _done(client, key, a, [x, y, shared])
    in_b = _done(client, key, b, [shared])["shared.wav"]
    their = _done(client, other, theirs, [x])["x.wav"]  # the same bytes as x, in another tenant's library
    store = BlobStore(settings.blob_dir)
    unknown = "5f1c0000-0000-4000-8000-00000000dead"
    sent = [ids["shared.wav"], unknown, in_b, ids["x.wav"].upper(), their]

    def deletions(body, lib=a, who=key):
        return client.post(f"/v1/libraries/{lib}/deletions", json=body, headers=auth(who))

    # what the other tenant sends: its own library answers not_found for every one of ours, and ours is a 404
    r = deletions({"item_ids": [ids["x.wav"]]}, theirs, other)
    assert r.status_code == 200 and r.get_json() == {"deleted": {"items": 0, "stored_files": 0, "files": []},
                                                     "not_found": [ids["x.wav"]]}, r.get_json()
    r = deletions({"item_ids": [ids["x.wav"]]}, a, other)
    assert r.status_code == 404 and r.get_json()["error"]["message"] == "library not found", r.get_json()

    # bodies it does not take: a 400 saying why, nothing deleted
    for body, said in (
            ({"item_ids": []}, 'send {"item_ids": [...]}: the ids of 1 to 1000 items of the library, each once'),
            ({"item_ids": ids["y.wav"]}, 'send {"item_ids": [...]}'), ([ids["y.wav"]], 'send {"item_ids": [...]}'),
            ({"ids": [ids["y.wav"]]}, "the JSON body has 'ids', which /deletions does not take"),
            ({"item_ids": [ids["y.wav"], 7]}, "item_ids[1] is 7, not an item id"),
            ({"item_ids": [ids["y.wav"], None]}, "item_ids[1] is null, not an item id"),
            ({"item_ids": ["y.wav"]}, 'item_ids[0] is "y.wav", not an item id'),
            ({"item_ids": [ids["y.wav"], "{%s}" % ids["y.wav"].upper()]},
             f"item_ids[1] is item_ids[0] again ({ids['y.wav']})"),
            ({"item_ids": [str(uuid.uuid4()) for _ in range(1001)]},
             "1001 item ids in one request; the limit is 1000")):
        r = deletions(body)
        assert r.status_code == 400 and said in r.get_json()["error"]["message"], (body, r.get_json())
    r = client.post(f"/v1/libraries/{a}/deletions", data=b'{"item_ids": [', headers=auth(key))
    assert r.status_code == 400 and "does not parse" in r.get_json()["error"]["message"], r.get_json()
    assert client.get(f"/v1/libraries/{a}", headers=auth(key)).get_json()["item_count"] == 3

    r = deletions({"item_ids": sent})
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {  # in the order sent; ids as the API writes them
        "deleted": {"items": 2, "stored_files": 1, "files": [
            {"id": ids["shared.wav"], "filename": "shared.wav", "path": None},
            {"id": ids["x.wav"], "filename": "x.wav", "path": None}]},
        "not_found": [unknown, in_b, their]}, r.get_json()
    for gone in (ids["shared.wav"], ids["x.wav"]):
        assert client.get(f"/v1/items/{gone}", headers=auth(key)).status_code == 404
        assert _vectors(settings, gone) == 0
    # the other library's item, and the other tenant's, are untouched; x's bytes stay for that tenant
    assert client.get(f"/v1/items/{in_b}/audio", headers=auth(key)).data == shared.read_bytes()
    assert client.get(f"/v1/items/{their}/audio", headers=auth(other)).data == x.read_bytes()
    assert _vectors(settings, their) == 2 and store.exists(file_sha256(x))
    assert [i["id"] for i in client.get(f"/v1/libraries/{a}/items", headers=auth(key)).get_json()["items"]] \
        == [ids["y.wav"]]
    # sent again: all not found
    assert deletions({"item_ids": sent[:2]}).get_json()["not_found"] == sent[:2]
    # the last file's bytes: stored_files 1, and the file leaves the disk
    r = deletions({"item_ids": [ids["y.wav"]]})
    assert r.get_json()["deleted"]["stored_files"] == 1 and not store.exists(file_sha256(y)), r.get_json()

    # a request of many ids counts once against the key's rate limit, as any request
    limited, capped = create_app(dataclasses.replace(settings, rate_limit="2/minute")).test_client(), new_key()
    lib = limited.post("/v1/libraries", json={"name": "capped"}, headers=auth(capped)).get_json()["id"]
    r = limited.post(f"/v1/libraries/{lib}/deletions", json={"item_ids": [str(uuid.uuid4()) for _ in range(1000)]},
                     headers=auth(capped))
    assert r.status_code == 200 and len(r.get_json()["not_found"]) == 1000
    r = limited.post(f"/v1/libraries/{lib}/deletions", json={"item_ids": [unknown]}, headers=auth(capped))
    assert r.status_code == 429 and r.get_json()["error"]["code"] == "rate_limited", r.get_json()


def test_deleting_a_library(client, new_key, worker, settings, tmp_path):
    key = new_key()
    c, d = _library(client, key, "c"), _library(client, key, "d")
    own = write(tmp_path / "own.wav", 2.0, seed=21)
    shared = write(tmp_path / "shared.wav", 2.0, seed=22)
    up = upload(client, key, c, [own, shared]).get_json()
    assert wait_job(client, key, up["job_id"])["status"] == "done"
    kept = _done(client, key, d, [shared])["shared.wav"]
    page = client.get(f"/v1/libraries/{c}/items", query_string={"limit": 1}, headers=auth(key)).get_json()
    second = client.get(f"/v1/libraries/{c}/items", query_string={"limit": 1, "cursor": page["next_cursor"]},
                        headers=auth(key)).get_json()
    assert {i["filename"] for i in page["items"] + second["items"]} == {"own.wav", "shared.wav"}

    assert client.delete(f"/v1/libraries/{c}", headers=auth(new_key())).status_code == 404
    r = client.delete(f"/v1/libraries/{c}", headers=auth(key))
    assert r.status_code == 200 and r.get_json()["deleted"] == {"library": c, "items": 2, "stored_files": 1}
    for url in (f"/v1/libraries/{c}", f"/v1/jobs/{up['job_id']}", f"/v1/libraries/{c}/items",
                *(f"/v1/items/{i['id']}" for i in up["items"])):
        assert client.get(url, headers=auth(key)).status_code == 404, url
    assert [lib["id"] for lib in client.get("/v1/libraries", headers=auth(key)).get_json()["libraries"]] == [d]
    assert client.get("/v1/search", query_string={"library_id": c, "q": "x"}, headers=auth(key)).status_code == 404
    store = BlobStore(settings.blob_dir)
    reclaimed(30)  # removed after the answer
    assert not store.exists(file_sha256(own)) and store.exists(file_sha256(shared))
    assert client.get(f"/v1/items/{kept}/audio", headers=auth(key)).data == shared.read_bytes()
    assert _vectors(settings, up["items"][0]["id"]) == 0 and _vectors(settings, kept) == 2


def test_a_librarys_deletion_counts_the_files_an_upload_committed_into_it_meanwhile(app, client, new_key, settings,
                                                                                    tmp_path):
    """`clapq delete --library L --yes` while `clapq upload` sent into L: "deleted library 'L4': 0 files", where the
    upload's first request (128 files) had committed between the deletion's items and its library, and went with
    the library by cascade, unsaid (helper-91). Here a connection inserts a job and an item into the library as
    an upload does and commits once the deletion waits on it: they are deleted and counted."""
    key = new_key()
    lib = _library(client, key, "filled meanwhile")
    upload(client, key, lib, [write(tmp_path / "first.wav", 0.5, seed=41)])
    engine = get_engine(settings.database_url)
    answer = {}

    def delete():
        answer["r"] = app.test_client().delete(f"/v1/libraries/{lib}", headers=auth(key))

    with engine.connect() as upload_tx:
        job = upload_tx.scalar(text(
            "INSERT INTO jobs (id, tenant_id, library_id, kind) SELECT gen_random_uuid(), tenant_id, id, 'upload' "
            "FROM libraries WHERE id = :l RETURNING id"), {"l": lib})
        upload_tx.execute(text(
            "INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, status) "
            "SELECT gen_random_uuid(), tenant_id, id, :j, :sha, 'meanwhile.wav', 4, 'queued' FROM libraries "
            "WHERE id = :l"), {"l": lib, "j": job, "sha": hashlib.sha256(os.urandom(8)).hexdigest()})
        t = threading.Thread(target=delete)
        t.start()
        wait_for_a_lock_wait(engine, "the deletion did not wait for the upload's transaction")
        upload_tx.commit()
    t.join(30)
    assert answer["r"].status_code == 200, answer["r"].get_data(as_text=True)
    assert answer["r"].get_json()["deleted"]["items"] == 2, answer["r"].get_json()
    with session_scope(settings.database_url) as s:
        assert s.scalar(text("SELECT count(*) FROM items WHERE library_id = :l"), {"l": lib}) == 0


def test_a_deleted_files_bytes_stay_for_an_upload_committing_them(app, client, new_key, worker, settings, tmp_path):
    """An upload holds BLOB_LOCK shared from moving its blobs into place until its items commit. Here a
    connection holds it as such an upload would, while an item with the same bytes is deleted: the blob
    is not removed while the lock is held, and once the "upload" commits an item holding those bytes, it
    is not removed at all. Without the lock the file would be gone before that item's row committed."""
    key = new_key()
    lib = _library(client, key, "e")
    z = write(tmp_path / "z.wav", 1.5, seed=31)
    item = _done(client, key, lib, [z])["z.wav"]
    holder = _done(client, key, lib, [write(tmp_path / "other.wav", 1.0, seed=32)])["other.wav"]
    store, sha = BlobStore(settings.blob_dir), file_sha256(z)
    engine = get_engine(settings.database_url)
    answer = {}

    def delete():
        answer["r"] = app.test_client().delete(f"/v1/items/{item}", headers=auth(key))

    with engine.connect() as upload_tx:
        upload_tx.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": BLOB_LOCK})
        t = threading.Thread(target=delete)
        t.start()
        deadline = time.monotonic() + 30
        with engine.connect() as look:
            while look.scalar(select(Item.id).where(Item.id == item)) is not None and time.monotonic() < deadline:
                look.rollback()
                time.sleep(0.05)
        time.sleep(0.3)
        assert t.is_alive() and store.exists(sha)  # the item is gone; its file waits for the lock
        upload_tx.execute(text(
            "INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, status) "
            "SELECT gen_random_uuid(), tenant_id, library_id, job_id, :sha, 'z-again.wav', size_bytes, 'failed' "
            "FROM items WHERE id = :holder"), {"sha": sha, "holder": holder})
        upload_tx.commit()
    t.join(30)
    assert answer["r"].status_code == 200 and answer["r"].get_json()["deleted"]["stored_files"] == 0
    assert store.exists(sha)


def test_an_upload_into_a_library_deleted_meanwhile_is_a_404(client, new_key, settings):
    """The library is deleted after the upload looked it up and before its rows went in (here by a
    trigger on the job's insert, as a DELETE from another client would): a 404 that says what happened,
    not a 500, and nothing of the upload stored."""
    import uuid

    key = new_key()
    lib = _library(client, key, "vanishing")
    body = b"RIFF" + os.urandom(2000)  # bytes no other test's item holds
    with session_scope(settings.database_url) as s:
        s.execute(text(f"""
            CREATE FUNCTION test_vanish() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN DELETE FROM libraries WHERE id = NEW.library_id; RETURN NEW; END $$;
            CREATE TRIGGER test_vanish BEFORE INSERT ON jobs FOR EACH ROW
            WHEN (NEW.library_id = '{uuid.UUID(lib)}') EXECUTE FUNCTION test_vanish()"""))
    try:
        r = client.post(f"/v1/libraries/{lib}/batches", headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(body), "late.wav")]})
    finally:
        with session_scope(settings.database_url) as s:
            s.execute(text("DROP TRIGGER test_vanish ON jobs; DROP FUNCTION test_vanish()"))
    assert r.status_code == 404 and "deleted while it ran" in r.get_json()["error"]["message"]
    with session_scope(settings.database_url) as s:
        assert s.scalar(text("SELECT count(*) FROM items WHERE filename = 'late.wav' AND library_id = :l"),
                        {"l": lib}) == 0
    # its file was queued for removal before it would have moved into the store: the queue is emptied at
    # the request's end, and no file is left
    sha = hashlib.sha256(body).hexdigest()
    assert not BlobStore(settings.blob_dir).exists(sha) and _queued(settings, [sha]) == set()


def test_a_library_deleted_while_an_uploads_body_arrives_is_a_404(client, new_key, settings):
    """The library is deleted, and the deletion committed, while an upload's body is still arriving (after
    the checks that read the library): the 404 that says so, not a 500, and nothing of the upload kept."""
    key = new_key()
    lib = _library(client, key, "gone mid-body")
    body = b"RIFF" + os.urandom(6000)  # bytes no other test's item holds
    head = (b'--cut\r\nContent-Disposition: form-data; name="files"; filename="mid.wav"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    whole = head + body + b"\r\n--cut--\r\n"
    deleted = []

    class DeletedMidway(io.RawIOBase):  # the body as a slow client sends it, 1 KiB a read
        at = 0

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, offset, whence=0):
            self.at = offset if whence == 0 else (self.at + offset if whence == 1 else len(whole) + offset)
            return self.at

        def tell(self):
            return self.at

        def readinto(self, b):
            if self.at > len(head) and not deleted:
                with session_scope(settings.database_url) as s:
                    s.execute(text("DELETE FROM libraries WHERE id = :l"), {"l": lib})
                deleted.append(self.at)
            chunk = whole[self.at:self.at + min(len(b), 1024)]
            b[:len(chunk)] = chunk
            self.at += len(chunk)
            return len(chunk)

    r = client.post(f"/v1/libraries/{lib}/batches", headers=auth(key), input_stream=DeletedMidway(),
                    content_type="multipart/form-data; boundary=cut", content_length=len(whole))
    assert deleted and r.status_code == 404, (deleted, r.status_code, r.get_data(as_text=True)[:300])
    assert "deleted while it ran" in r.get_json()["error"]["message"]
    sha = hashlib.sha256(body).hexdigest()
    assert not BlobStore(settings.blob_dir).exists(sha) and _queued(settings, [sha]) == set()


def test_a_file_deleted_between_an_uploads_insert_and_its_lock_is_a_503_and_sending_again_stores_it(
        client, new_key, settings, tmp_path):
    """Bytes the library holds are uploaded again, and the item holding them is deleted, and the deletion
    committed, after the upload's insert found them there and before it locked their row: a 503 conflict
    (send again), not a 500 and not a job naming a file that is gone. Nothing of the upload is kept, and
    the batch sent again stores the file as a new item."""
    key = new_key()
    lib = _library(client, key, "gone before the lock")
    f = tmp_path / "raced.wav"
    f.write_bytes(b"RIFF" + os.urandom(3000))  # bytes no other test's item holds
    sha = file_sha256(f)
    first = upload(client, key, lib, [f]).get_json()["items"][0]["id"]
    def delete_it() -> None:
        with session_scope(settings.database_url) as s:
            s.execute(text("DELETE FROM items WHERE id = :i"), {"i": first})

    # the upload's look at the items its insert found already there: the other request's deletion commits
    # just before it
    with just_before(settings.database_url,
                     lambda sql: "FOR UPDATE" in sql and sql.lstrip().startswith("SELECT items.sha256"),
                     delete_it) as deleted:
        r = upload(client, key, lib, [f])
    assert deleted and r.status_code == 503, (deleted, r.status_code, r.get_data(as_text=True)[:300])
    assert r.get_json()["error"]["code"] == "conflict" and r.headers["Retry-After"] == "1"
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.sha256 == sha)) == 0
    # no item holds the bytes, so the failed upload's end removed the stored copy
    assert not BlobStore(settings.blob_dir).exists(sha) and _queued(settings, [sha]) == set()
    again = upload(client, key, lib, [f])
    assert again.status_code == 202, again.get_json()
    item = again.get_json()["items"][0]
    assert item["status"] == "queued" and item["id"] != first and "duplicate_of" not in item
    assert BlobStore(settings.blob_dir).exists(sha) and _queued(settings, [sha]) == set()


def test_two_deletions_of_one_item_at_once_uncount_its_copies_once(app, client, new_key, worker, settings, tmp_path):
    """Two requests delete the same item, which another job holds a copy of, at the same moment (both
    wait here on the item's row, then go): one deletes it, the other answers 404, and the job that held
    the copy counts it once, not twice (duplicates 0, never -1)."""
    key = new_key()
    lib = _library(client, key, "twice")
    f = write(tmp_path / "f.wav", 1.0, seed=41)
    item = _done(client, key, lib, [f])["f.wav"]
    copy_job = upload(client, key, lib, [f]).get_json()["job_id"]
    assert wait_job(client, key, copy_job)["counts"]["duplicates"] == 1
    engine = get_engine(settings.database_url)
    answers = []

    def delete():
        answers.append(app.test_client().delete(f"/v1/items/{item}", headers=auth(key)).status_code)

    with engine.connect() as holder:
        holder.execute(select(Item.id).where(Item.id == item).with_for_update())
        threads = [threading.Thread(target=delete) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        with engine.connect() as look:
            while time.monotonic() < deadline and look.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%DELETE FROM items%'")) < 2:
                look.rollback()
                time.sleep(0.05)
        holder.commit()
    for t in threads:
        t.join(30)
    assert sorted(answers) == [200, 404]
    assert client.get(f"/v1/jobs/{copy_job}", headers=auth(key)).get_json()["counts"]["duplicates"] == 0


def _queued(settings, shas) -> set[str]:
    with session_scope(settings.database_url) as s:
        return set(s.scalars(text("SELECT sha256 FROM blob_reclaims WHERE sha256 = ANY(:s)"), {"s": list(shas)}))


def _backdate(settings, shas) -> None:
    """As if queued an hour ago: the maintenance loop leaves a minute to the API that deleted them."""
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE blob_reclaims SET queued_at = now() - interval '1 hour' WHERE sha256 = ANY(:s)"),
                  {"s": list(shas)})


def test_files_left_by_a_deletion_that_never_removed_them_are_removed_once_no_item_holds_them(
        client, new_key, worker, settings, tmp_path):
    """Rows deleted by SQL, as a deletion whose process died after its commit leaves them (or a library's
    cascade, a tenant's): the trigger queued their bytes, and the maintenance loop's pass removes each
    file once no item of any library holds it, and not before."""
    from worker.sweeper import collect_blobs

    key = new_key()
    a, b = _library(client, key, "left-a"), _library(client, key, "left-b")
    both = write(tmp_path / "both.wav", 1.0, seed=51)
    only = write(tmp_path / "only.wav", 1.0, seed=52)
    in_a = _done(client, key, a, [both, only])
    in_b = _done(client, key, b, [both])["both.wav"]
    store, sha = BlobStore(settings.blob_dir), {p.name: file_sha256(p) for p in (both, only)}
    with session_scope(settings.database_url) as s:
        s.execute(text("DELETE FROM libraries WHERE id = :a"), {"a": a})  # its items go by cascade
    assert _queued(settings, sha.values()) == set(sha.values())
    assert store.exists(sha["both.wav"]) and store.exists(sha["only.wav"])
    collect_blobs(settings)  # queued under a minute ago: the API that deleted them may be removing them now
    assert store.exists(sha["only.wav"])
    _backdate(settings, sha.values())
    collect_blobs(settings)
    assert not store.exists(sha["only.wav"]) and _queued(settings, sha.values()) == set()
    assert client.get(f"/v1/items/{in_b}/audio", headers=auth(key)).data == both.read_bytes()  # b holds it
    assert client.get(f"/v1/items/{in_a['only.wav']}", headers=auth(key)).status_code == 404

    with session_scope(settings.database_url) as s:
        s.execute(text("DELETE FROM items WHERE id = :b"), {"b": in_b})
    _backdate(settings, [sha["both.wav"]])
    collect_blobs(settings)
    assert not store.exists(sha["both.wav"])


def _removal_waits(engine, timeout: float = 60) -> None:
    """Until a removal of stored files waits for the blob lock (the exclusive BLOB_LOCK), or an AssertionError."""
    deadline = time.monotonic() + timeout
    with engine.connect() as look:
        while not look.scalar(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = "
                "current_database() AND query LIKE 'SELECT pg_advisory_xact_lock(%'")):
            assert time.monotonic() < deadline, "no removal of stored files waited for the blob lock"
            look.rollback()
            time.sleep(0.05)


def test_a_librarys_deletion_answers_before_its_stored_files_are_removed(app, client, new_key, settings, tmp_path):
    """A library's DELETE answers once its rows are deleted, and its stored files are removed after, by the API
    process's removal thread: 20,000 small files took 12 s to delete, 9.6 s of it unlinking them in the request
    (benchmarks/library_delete.py), and each thousand of them waited for the uploads holding the blob lock at that
    moment. Here a connection holds BLOB_LOCK shared, as an upload moving its files into place does: the answer
    comes all the same (it waited for the lock before), counting the files, which are still on disk and queued;
    once the lock is let go, the removal thread removes them."""
    key = new_key()
    lib = _library(client, key, "answered first")
    paths = [write(tmp_path / f"first{i}.wav", 0.5, seed=400 + i) for i in range(3)]
    assert upload(client, key, lib, paths).status_code == 202
    store, shas = BlobStore(settings.blob_dir), {file_sha256(p) for p in paths}
    engine = get_engine(settings.database_url)
    answer = []
    with engine.connect() as upload_tx:
        upload_tx.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": BLOB_LOCK})
        t = threading.Thread(target=lambda: answer.append(app.test_client().delete(f"/v1/libraries/{lib}",
                                                                                   headers=auth(key))))
        t.start()
        _removal_waits(engine)  # the request's own removal before, the removal thread's now
        t.join(60)
        assert not t.is_alive(), "the deletion's answer waited for the removal of its stored files"
        assert answer[0].status_code == 200, answer[0].get_data(as_text=True)
        assert answer[0].get_json()["deleted"] == {"library": lib, "items": 3, "stored_files": 3}, answer[0].get_json()
        assert all(store.exists(sha) for sha in shas) and _queued(settings, shas) == shas
        upload_tx.rollback()
    reclaimed(30)
    assert not any(store.exists(sha) for sha in shas) and _queued(settings, shas) == set()


KILLED_AFTER_THE_ANSWER = """
import json, os, sys, time

from api import create_app
from clapq.settings import Settings

lib, key, out = sys.argv[1:]
r = create_app(Settings.from_env()).test_client().delete(f"/v1/libraries/{lib}",
                                                         headers={"Authorization": f"Bearer {key}"})
with open(out + ".part", "w") as f:
    json.dump([r.status_code, r.get_json()], f)
os.rename(out + ".part", out)
time.sleep(600)  # killed by the test meanwhile
"""


def test_stored_files_of_a_library_whose_api_died_after_the_answer_are_removed_by_the_maintenance_loop(
        client, new_key, env, settings, tmp_path):
    """The API process that deleted a library is killed (SIGKILL) after its answer and before its removal thread
    removed the stored files (here it waits for the blob lock, held as an upload holds it): the digests were
    queued in the deletion's own transaction (the trigger of migration 0007), so the maintenance loop's pass
    removes the files once they are queued a minute, as after any crash; none is left for ever."""
    from worker.sweeper import collect_blobs

    key = new_key()
    lib = _library(client, key, "killed after the answer")
    paths = [write(tmp_path / f"killed{i}.wav", 0.5, seed=410 + i) for i in range(2)]
    assert upload(client, key, lib, paths).status_code == 202
    store, shas = BlobStore(settings.blob_dir), {file_sha256(p) for p in paths}
    engine, out = get_engine(settings.database_url), tmp_path / "answer.json"
    with engine.connect() as upload_tx:
        upload_tx.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": BLOB_LOCK})
        proc = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_THE_ANSWER, lib, key, str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 90
            while not out.exists():
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "no answer while the blob lock was held"
                time.sleep(0.1)
            _removal_waits(engine)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        upload_tx.rollback()
    status, body = json.loads(out.read_text())
    assert status == 200 and body["deleted"] == {"library": lib, "items": 2, "stored_files": 2}, body
    assert all(store.exists(sha) for sha in shas) and _queued(settings, shas) == shas
    collect_blobs(settings)  # queued under a minute ago: an API may be removing them now
    assert all(store.exists(sha) for sha in shas)
    _backdate(settings, shas)
    collect_blobs(settings)
    assert not any(store.exists(sha) for sha in shas) and _queued(settings, shas) == set()


CRASH_AFTER_THE_FILES_MOVED = """
import os, sys

import api.uploads
from api import create_app
from clapq import blobs
from clapq.blobs import BlobWriter
from clapq.db import get_engine
from clapq.settings import Settings

race, lib, other, key, *paths = sys.argv[1:]
commit, queue, moved, tries, inner = BlobWriter.commit, api.uploads.queue_unnamed, [], [], []
settings = Settings.from_env()
client = create_app(settings).test_client()


def send(library):
    return client.post(f"/v1/libraries/{library}/batches", headers={"Authorization": f"Bearer {key}"},
                       data={"files": [(open(p, "rb"), os.path.basename(p)) for p in paths]},
                       content_type="multipart/form-data")


def queue_then_a_race(shas):  # what another request does right then, between the two transactions
    global race
    queue(shas)
    if inner:
        return
    tries.append(len(shas))
    if race == "removal":  # a deletion's removal of the same bytes: takes the queue rows, no item holds them
        race = ""
        blobs.reclaim(get_engine(settings.database_url), blobs.BlobStore(settings.blob_dir), shas)
    elif race == "upload":  # an upload of the same bytes into another library commits: it unqueues them
        race = ""
        inner.append(1)
        assert send(other).status_code == 202
        inner.clear()


def commit_then_die(self):  # dies as under SIGKILL: no exception, no teardown, no rollback
    digest = commit(self)
    if not inner:
        moved.append(digest)
        if len(moved) == len(paths):
            print(f"queued {len(tries)} times", file=sys.stderr, flush=True)
            os._exit(9)
    return digest


BlobWriter.commit, api.uploads.queue_unnamed = commit_then_die, queue_then_a_race
r = send(lib)
sys.exit(f"the upload ended instead of dying: {r.status_code} {r.get_data(as_text=True)[:300]}")
"""


@pytest.mark.parametrize("race", ["", "removal", "upload"],
                         ids=["alone", "a-removal-took-the-queue-rows", "an-upload-of-the-same-bytes-committed"])
def test_an_api_killed_between_moving_an_uploads_files_and_committing_its_rows_leaves_no_file_behind(
        client, new_key, env, settings, tmp_path, race):
    """The API process dies after an upload's files moved into the store and before its rows committed:
    no item names the files, and the maintenance loop removes them, because they were queued for removal
    before they moved. Also when a deletion's removal of the same bytes took the queue rows between the
    upload's two transactions (the upload queues them again). When an upload of the same bytes committed
    there instead, its items name the files: they stay, and nothing is queued again. An upload that
    commits takes its files off the queue."""
    from worker.sweeper import collect_blobs

    key = new_key()
    lib, other = _library(client, key, f"cut mid-commit {race}"), _library(client, key, f"beside it {race}")
    paths = [tmp_path / f"cut{i}.wav" for i in range(3)]
    for p in paths:
        p.write_bytes(b"RIFF" + os.urandom(2000))  # bytes no other item holds
    shas = {file_sha256(p) for p in paths}
    died = subprocess.run([sys.executable, "-c", CRASH_AFTER_THE_FILES_MOVED, race, lib, other, key,
                           *map(str, paths)], env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr[-3000:]
    assert f"queued {2 if race == 'removal' else 1} times" in died.stderr, died.stderr[-3000:]
    store = BlobStore(settings.blob_dir)
    assert all(store.exists(sha) for sha in shas)  # in place when the process died

    def named_in(library) -> int:
        with session_scope(settings.database_url) as s:
            return s.scalar(select(func.count()).select_from(Item)
                            .where(Item.sha256.in_(shas), Item.library_id == library))

    assert named_in(lib) == 0 and named_in(other) == (3 if race == "upload" else 0)
    assert _queued(settings, shas) == (set() if race == "upload" else shas)
    _backdate(settings, shas)
    collect_blobs(settings)
    assert all(store.exists(sha) == (race == "upload") for sha in shas) and _queued(settings, shas) == set()

    # the same files uploaded by a process that lives: stored, and nothing of theirs left queued
    r = upload(client, key, lib, paths)
    assert r.status_code == 202, r.get_json()
    assert all(store.exists(sha) for sha in shas) and _queued(settings, shas) == set()


def test_removal_waits_for_a_deletion_of_the_last_item_holding_the_bytes(client, new_key, worker, settings, tmp_path):
    """Queued bytes, still held by one item that a transaction is deleting at that moment: removal waits
    for it (the trigger holds BLOB_LOCK shared until the commit), then removes the file. Had it gone on,
    it would have found the bytes held, dropped them from the queue and kept the file, which that
    deletion's own queue row (a no-op on the existing one) would never have removed."""
    from clapq.blobs import reclaim

    key = new_key()
    a, b = _library(client, key, "race-a"), _library(client, key, "race-b")
    f = write(tmp_path / "f.wav", 1.0, seed=53)
    first = _done(client, key, a, [f])["f.wav"]
    last = _done(client, key, b, [f])["f.wav"]
    store, sha, engine = BlobStore(settings.blob_dir), file_sha256(f), get_engine(settings.database_url)
    with session_scope(settings.database_url) as s:
        s.execute(text("DELETE FROM items WHERE id = :i"), {"i": first})  # queued; `last` holds the bytes
    removed = []
    with engine.connect() as deleting:
        deleting.execute(text("DELETE FROM items WHERE id = :i"), {"i": last})
        t = threading.Thread(target=lambda: removed.append(reclaim(engine, store, [sha])))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and store.exists(sha)
        deleting.commit()
    t.join(30)
    assert removed == [1] and not store.exists(sha) and _queued(settings, [sha]) == set()


def test_a_large_deletion_gets_its_vector_indexes_rebuilt(client, new_key, worker, settings, tmp_path):
    """`clapq beat`'s index repair: a table with few dead rows is left to autovacuum; after a deletion
    past the threshold, each vector index is rebuilt (a new index, valid, in the old one's place) and the
    table vacuumed; a rebuild's leftover from an earlier cut-short run is dropped first, and a rebuild that
    failed waits an hour before the next try."""
    import dataclasses

    from worker import sweeper
    from worker.sweeper import repair_indexes

    key = new_key()
    lib = _library(client, key, "large")
    _done(client, key, lib, [write(tmp_path / f"l{i}.wav", 1.0, seed=61 + i) for i in range(3)])
    engine = get_engine(settings.database_url)

    def one(sql):
        with engine.connect() as c:
            return c.scalar(text(sql))

    def dead(table):
        return one(f"SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = '{table}'")

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("ALTER TABLE segments SET (autovacuum_enabled = false); "
                       "ALTER TABLE embeddings SET (autovacuum_enabled = false)"))
    try:
        # what a rebuild killed midway leaves: an invalid index, named as REINDEX CONCURRENTLY names its copy
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            with pytest.raises(IntegrityError):  # many windows share a model: the build fails, the index stays
                c.execute(text("CREATE UNIQUE INDEX CONCURRENTLY ix_segments_vector_hnsw_ccnew ON segments (model_id)"))
        assert one("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = 'ix_segments_vector_hnsw_ccnew'::regclass")
        before = {i: one(f"SELECT '{i}'::regclass::oid") for i in ("ix_segments_vector_hnsw", "ix_embeddings_vector_hnsw")}
        assert repair_indexes(dataclasses.replace(settings, reindex_min_dead=10**9)) == []
        assert client.delete(f"/v1/libraries/{lib}", headers=auth(key)).status_code == 200
        deadline = time.monotonic() + 30
        while (dead("segments") < 3 or dead("embeddings") < 3) and time.monotonic() < deadline:
            time.sleep(0.2)  # the deleting session's statistics reach the server within a second or so
        # a rebuild that fails (here its memory setting; a full disk in life) is not tried again for an hour
        assert repair_indexes(dataclasses.replace(settings, reindex_min_dead=1, reindex_memory_mb=10**9),
                              dead_share=0) == []
        assert set(sweeper._failed) == set(before)
        assert repair_indexes(dataclasses.replace(settings, reindex_min_dead=1), dead_share=0) == []
        sweeper._failed.clear()  # an hour later
        assert repair_indexes(dataclasses.replace(settings, reindex_min_dead=1), dead_share=0) == \
            ["ix_segments_vector_hnsw", "ix_embeddings_vector_hnsw"]
        for index, oid in before.items():
            assert one(f"SELECT '{index}'::regclass::oid") != oid
            assert one(f"SELECT indisvalid FROM pg_index WHERE indexrelid = '{index}'::regclass")
        assert one("SELECT to_regclass('ix_segments_vector_hnsw_ccnew')") is None
        assert dead("segments") == 0
    finally:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("DROP INDEX IF EXISTS ix_segments_vector_hnsw_ccnew; "
                           "ALTER TABLE segments RESET (autovacuum_enabled); ALTER TABLE embeddings RESET (autovacuum_enabled)"))


def test_a_deletion_or_a_cancel_wakes_the_heartbeat_of_a_task_running_the_files(client, new_key, settings):
    """The API announces deleted and cancelled files on Redis once it has committed. A task running them
    beats at once, not at its next heartbeat (300 s away here), and hears which of its files are gone,
    so it stops embedding them now: deleted one by one, or several in one request (/deletions)."""
    import uuid

    from clapq.models import Job, Library
    from worker.heartbeat import beating, listening

    key = new_key()
    lib = uuid.UUID(_library(client, key, "wake"))
    with session_scope(settings.database_url) as s:
        tenant = s.get(Library, lib).tenant_id
        job = Job(tenant_id=tenant, library_id=lib)
        s.add(job)
        s.flush()
        items = [Item(tenant_id=tenant, library_id=lib, job_id=job.id, sha256=os.urandom(32).hex(),
                      filename=f"long{i}.wav", size_bytes=1, status="running", claimed_by="task-wake", attempts=1)
                 for i in range(5)]
        s.add_all(items)
        s.flush()
        ids, job_id = [it.id for it in items], job.id
    held, heard, news = set(ids), [], threading.Event()

    def on_gone(gone: set) -> None:  # as worker.tasks does
        held.difference_update(gone)
        heard.append(gone)
        news.set()

    with beating(settings.database_url, held, "task-wake", 300, on_gone=on_gone, redis_url=settings.redis_url):
        assert listening(settings.redis_url).wait(30), "the listener never subscribed"
        assert client.delete(f"/v1/items/{ids[0]}", headers=auth(key)).status_code == 200
        assert news.wait(60), "a deletion did not wake the heartbeat"
        assert heard == [{ids[0]}]
        news.clear()
        r = client.post(f"/v1/libraries/{lib}/deletions", json={"item_ids": [str(ids[3]), str(ids[4])]},
                        headers=auth(key))
        assert r.status_code == 200 and r.get_json()["deleted"]["items"] == 2, r.get_json()
        assert news.wait(60), "a deletion of several files did not wake the heartbeat"
        assert heard[1] == {ids[3], ids[4]}
        news.clear()
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200
        assert news.wait(60), "a cancel did not wake the heartbeat"
        assert heard[2] == {ids[1], ids[2]} and not held


def test_a_deletion_and_a_vector_write_lock_files_in_one_order(settings):
    """A library's deletion and a worker's vector write both lock the rows of the files they touch, and
    did so in different orders (the deletion in its scan's, the write in its batch's): each could hold a
    row the other waited on, a deadlock Postgres broke by failing one (a helper saw the deletion's 503).
    Both now lock in id order, as do the task's heartbeat and its hand-back of files after an error. Two
    files, A < B by id, B uploaded first; a third connection holds one row and tries the other without
    waiting, which says what the blocked statement holds."""
    import datetime as dt
    import uuid

    import numpy as np

    from api.removal import delete_items
    from tests.conftest import job_of_own
    from worker.audio import AudioInfo
    from worker.store import Claimed, heartbeat, release, write_items

    a, b = uuid.UUID(int=1), uuid.UUID(int=2**128 - 1)
    with session_scope(settings.database_url) as s:
        tenant, model, lib, job = job_of_own(s, "lock-order-test")
        now = dt.datetime.now(dt.timezone.utc)
        for item_id, created in ((b, now - dt.timedelta(seconds=1)), (a, now)):  # B first, in the heap too
            s.add(Item(id=item_id, tenant_id=tenant.id, library_id=lib.id, job_id=job.id, sha256=item_id.hex * 2,
                       filename=f"{item_id.int}.wav", size_bytes=1, status="running", created_at=created,
                       claimed_by="lock-order-task"))
            s.flush()
        lib_id = lib.id
        claimed = {i: Claimed(i, i.hex * 2, lib.id, model.id, job.id, tenant.id) for i in (a, b)}

    engine = get_engine(settings.database_url)

    errors = []

    def started(work) -> threading.Thread:  # `work(session)` in a thread; what it raises, in `errors`
        def run() -> None:
            try:
                with session_scope(settings.database_url) as s:
                    work(s)
            except Exception as exc:  # said by the assertions below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    # the write, given B before A, with B held: it waits on B holding A (it held nothing: A was free)
    info = AudioInfo(sample_rate=48_000, channels=1, frames=48_000, format="WAV")
    vec = np.ones((1, 512), np.float32)
    for held, mode, work, other, free in (
        # the task's heartbeat and its hand-back after an error, with A held as the task's own vector write
        # holds it: each waits on A holding nothing (their UPDATEs took B first, in their scan's order)
        (a, "NO KEY UPDATE", lambda s: heartbeat(s, [b, a], "lock-order-task"), b, True),
        (a, "NO KEY UPDATE", lambda s: release(s, [b, a], "handed back", "lock-order-task"), b, True),
        (b, "UPDATE", lambda s: write_items(s, [(claimed[i], info, [(0.0, 1.0)], vec) for i in (b, a)]), a, False),
        # again, with A held as a job's cancel, /moves or a heartbeat holds it: it waits on A holding nothing
        # (its lock let A pass, and its UPDATE, in the batch's order, took B first: a deadlock with a cancel)
        (a, "NO KEY UPDATE", lambda s: write_items(s, [(claimed[i], info, [(0.0, 1.0)], vec) for i in (b, a)]), b,
         True),
        # the deletion, with A held: it waits on A holding nothing (it held B, taken first in its scan)
        (a, "KEY SHARE", lambda s: delete_items(s, Item.library_id == lib_id), b, True),
    ):
        with engine.connect() as holder:
            holder.execute(text(f"SELECT 1 FROM items WHERE id = :i FOR {mode}"), {"i": held})
            thread = started(work)
            wait_for_a_lock_wait(engine, errors)
            assert row_lockable(engine, other, mode) == free
            holder.rollback()
        thread.join(30)
        assert not errors and not thread.is_alive()
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.library_id == lib_id)) == 0


def test_two_deletions_of_files_of_the_same_jobs_lock_the_jobs_in_one_order(settings):
    """A deletion updates the row of every job its files (or copies of them) are in, and its UPDATE took them in
    its plan's order: the scan of jobs, or the hash of its per-job sums, sized by the deletion's estimate, so a
    deletion of a few files and one of many files of the same jobs took them in different orders, and each could
    hold a job the other waited on: a deadlock, which Postgres broke by failing one (a 503 database_conflict).
    Now they lock them in id order, after their files. Eight jobs (inserted in reverse id order, their tables
    analyzed, as on a live service), each with one file of the small deletion and 40 of the large; for each job,
    a third connection holds its row while the small deletion waits on it (holding no job above it) and the
    large one starts; then both go, and neither fails."""
    from api.removal import delete_items
    from tests.conftest import job_of_own

    jobs = [uuid.UUID(int=(k + 1) << 100) for k in range(8)]
    few, many = [], []
    with session_scope(settings.database_url) as s:
        tenant, _, lib, _ = job_of_own(s, "job-lock-order-test")
        for job in reversed(jobs):  # the heap in reverse id order
            s.add(Job(id=job, tenant_id=tenant.id, library_id=lib.id))
            s.flush()
        for n, (job, side) in enumerate((j, side) for j in jobs for side in [few] + [many] * 40):
            side.append(uuid.uuid4())
            s.add(Item(id=side[-1], tenant_id=tenant.id, library_id=lib.id, job_id=job, sha256=f"{n:064x}",
                       filename=f"{n}.wav", size_bytes=1, status="done"))
    engine = get_engine(settings.database_url)
    with engine.connect() as c:
        c.execute(text("ANALYZE jobs, items, job_duplicates"))
        c.commit()

    errors = []

    def started(ids) -> threading.Thread:  # their deletion, rolled back (each round deletes the same files)
        def run() -> None:
            try:
                with session_scope(settings.database_url) as s:
                    delete_items(s, Item.id.in_(ids), commit=False)
                    s.rollback()
            except Exception as exc:  # said by the assertions below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    for held in jobs:
        with engine.connect() as holder:
            holder.execute(text("SELECT 1 FROM jobs WHERE id = :i FOR NO KEY UPDATE"), {"i": held})
            threads = [started(few)]
            wait_for_a_lock_wait(engine, errors)
            assert [j for j in jobs if j > held and not row_lockable(engine, j, "NO KEY UPDATE", "jobs")] == []
            threads.append(started(many))
            wait_for_a_lock_wait(engine, errors, waiting=2)
            holder.rollback()
        for t in threads:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in threads), (jobs.index(held), errors)
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.library_id == lib.id)) == 8 * 41


def test_reads_of_an_item_deleted_while_they_run_are_not_500s(client, new_key, worker, settings, tmp_path):
    """A duplicates lookup whose item is deleted while it runs answers the item as it read it: its search's
    rollback expired the item, and reading it again after the deletion was a 500 (a helper's race run: 15 in
    a minute). A lookup by item (duplicates, segments) whose library is deleted between its read of the item
    and of the library answers 404, as a moment later, not a 500."""
    key = new_key()
    lib = _library(client, key, "deleted under a read")
    ids = _done(client, key, lib, [write(tmp_path / "a.wav", 1.0, seed=61), write(tmp_path / "b.wav", 1.0, seed=62)])
    def run(marker: str, sql: str, item_id, path: str):
        """GET `path`, with `sql` committed just before its first statement that has `marker`."""
        def delete_it() -> None:
            with session_scope(settings.database_url) as s:
                s.execute(text(sql), {"i": item_id})

        with just_before(settings.database_url, lambda statement: marker in statement, delete_it) as met:
            return met, client.get(path, headers=auth(key))

    a = ids["a.wav"]
    done, r = run("embeddings.windows", "DELETE FROM items WHERE id = :i", a, f"/v1/items/{a}/duplicates")
    assert done and r.status_code == 200, (r.status_code, r.get_data(as_text=True)[:300])
    assert r.get_json()["item_id"] == a
    gone_lib = "DELETE FROM libraries WHERE id = (SELECT library_id FROM items WHERE id = :i)"
    for what, item in (("segments", ids["b.wav"]), ("duplicates", next(iter(_done(
            client, key, _library(client, key, "deleted under a read 2"), [tmp_path / "a.wav"]).values())))):
        done, r = run("FROM libraries", gone_lib, item, f"/v1/items/{item}/{what}")
        assert done and r.status_code == 404, (what, r.status_code, r.get_data(as_text=True)[:300])


def test_an_upload_of_files_the_library_holds_locks_them_in_id_order(app, new_key, settings, tmp_path):
    """An upload of bytes the library holds already locks their items (to decide whether each is a copy or a
    retry) in id order, as a deletion, a job's cancel and retry and a worker's vector write lock theirs: in
    digest order, it held one a library's deletion waited on while it waited on one the deletion held. Two
    files, A < B by id and B < A by digest; a third connection holds A: the upload waits for A holding nothing
    of B's."""
    key = new_key()
    client = app.test_client()
    lib = _library(client, key, "sent again")
    files = sorted((write(tmp_path / f"{n}.wav", 0.5, seed=70 + n) for n in range(2)), key=file_sha256, reverse=True)
    ids = [it["id"] for it in upload(client, key, lib, files).get_json()["items"]]  # ids in the order sent
    a, b = ids
    assert a < b and file_sha256(files[1]) < file_sha256(files[0])
    engine = get_engine(settings.database_url)
    answers = []
    sender = threading.Thread(target=lambda: answers.append(upload(app.test_client(), key, lib, files).status_code))
    with engine.connect() as holder:
        holder.execute(text("SELECT 1 FROM items WHERE id = :i FOR UPDATE"), {"i": a})
        sender.start()
        wait_for_a_lock_wait(engine, "the upload never waited for A")
        assert row_lockable(engine, b), "the upload holds B while it waits for A"
        holder.commit()
    sender.join(30)
    assert answers == [202]


def test_a_patch_whose_item_is_deleted_once_it_committed_is_a_404(client, new_key, settings, tmp_path):
    """An item deleted by another request between a PATCH's commit and its read of the item as stored (its
    answer): a 404, as a GET then gives, not a 500 ('Could not refresh instance')."""
    key = new_key()
    lib = _library(client, key, "patched then gone")
    item = upload(client, key, lib, [write(tmp_path / "p.wav", 0.5, seed=81)]
                  ).get_json()["items"][0]["id"]
    def delete_it() -> None:
        with session_scope(settings.database_url) as s:
            s.execute(text("DELETE FROM items WHERE id = :i"), {"i": item})

    # the PATCH's read of the item after its commit (its lock's read says FOR UPDATE)
    with just_before(settings.database_url,
                     lambda sql: sql.lstrip().startswith("SELECT items.") and "FOR UPDATE" not in sql,
                     delete_it) as deleted:
        r = client.patch(f"/v1/items/{item}", json={"metadata": {"k": 1}}, headers=auth(key))
    assert deleted and r.status_code == 404, (deleted, r.status_code, r.get_data(as_text=True)[:300])


def test_a_library_deleted_once_its_creation_committed_is_a_404(client, new_key, settings):
    """A library deleted by another request between its creation's commit and the read of it as stored (the
    201's body): a 404, as a GET then gives, not a 500 ('Could not refresh instance'; left by helper-60)."""
    key = new_key()

    def delete_it() -> None:
        with session_scope(settings.database_url) as s:
            s.execute(text("DELETE FROM libraries WHERE name = 'made then gone'"))

    with just_before(settings.database_url,
                     lambda sql: sql.lstrip().startswith("SELECT libraries.") and "WHERE libraries.id" in sql,
                     delete_it) as deleted:
        r = client.post("/v1/libraries", json={"name": "made then gone"}, headers=auth(key))
    assert deleted and r.status_code == 404, (deleted, r.status_code, r.get_data(as_text=True)[:300])
