"""Tenant isolation: another tenant's ids are 404 everywhere, and never appear in search."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest

from tests.audio import write
from tests.conftest import auth, wait_job
from tests.test_e2e import upload


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("iso")
    return [write(d / f"a{i}.wav", 2.0 + i, 48_000, 1, freq=300 + 90 * i, seed=10 + i) for i in range(3)]


def test_other_tenant_sees_nothing(client, new_key, worker, files):
    a, b = new_key(), new_key()
    lib_a = client.post("/v1/libraries", json={"name": "mine"}, headers=auth(a)).get_json()
    up = upload(client, a, lib_a["id"], files).get_json()
    assert wait_job(client, a, up["job_id"])["status"] == "done"
    item = up["items"][0]["id"]

    for path in (f"/v1/libraries/{lib_a['id']}", f"/v1/jobs/{up['job_id']}", f"/v1/items/{item}",
                 f"/v1/items/{item}/audio", f"/v1/items/{item}/embedding"):
        r = client.get(path, headers=auth(b))
        assert r.status_code == 404, path
        assert r.get_json()["error"]["code"] == "not_found"
        assert client.get(path, headers=auth(a)).status_code == 200, path
    assert client.get("/v1/libraries", headers=auth(b)).get_json()["libraries"] == []
    r = client.post(f"/v1/libraries/{lib_a['id']}/batches", headers=auth(b),
                    data={"files": [(open(files[0], "rb"), "x.wav")]}, content_type="multipart/form-data")
    assert r.status_code == 404
    r = client.get("/v1/search", query_string={"library_id": lib_a["id"], "q": "tone"}, headers=auth(b))
    assert r.status_code == 404

    # B uploads the very same bytes into its own library: B sees only its own items
    lib_b = client.post("/v1/libraries", json={"name": "mine"}, headers=auth(b)).get_json()
    up_b = upload(client, b, lib_b["id"], files[:1]).get_json()
    assert "duplicate_of" not in up_b["items"][0]
    assert wait_job(client, b, up_b["job_id"])["status"] == "done"
    res = client.get("/v1/search", query_string={"library_id": lib_b["id"], "q": "tone", "k": 50},
                     headers=auth(b)).get_json()["results"]
    assert [r["item_id"] for r in res] == [up_b["items"][0]["id"]]


def test_a_file_two_tenants_hold_says_nothing_of_the_other(client, new_key, settings, tmp_path):
    """The stored file of some bytes is every tenant's that uploaded them; what one tenant is told never
    depends on whether another holds them (helper-35): its download's Last-Modified is its own item's
    time, not the shared file's, and deleting its copy counts the file as gone from its libraries
    (`stored_files`), while the bytes stay on disk for the other tenant."""
    import datetime as dt
    import os

    from werkzeug.http import parse_date

    from clapq.blobs import BlobStore

    path = write(tmp_path / "shared.wav", 1.0, 48_000, 1, freq=500, seed=77)
    a, b = new_key(), new_key()
    ids = {}
    for key in (a, b):
        lib = client.post("/v1/libraries", json={"name": "shared"}, headers=auth(key)).get_json()
        ids[key] = upload(client, key, lib["id"], [path]).get_json()["items"][0]["id"]
    sha = client.get(f"/v1/items/{ids[a]}", headers=auth(a)).get_json()["sha256"]
    blob = BlobStore(settings.blob_dir).path_for(sha)
    os.utime(blob, (978_307_200, 978_307_200))  # the shared file's time: 2001, as if another uploaded it then
    for key in (a, b):
        r = client.get(f"/v1/items/{ids[key]}/audio", headers=auth(key))
        assert r.status_code == 200 and r.data == path.read_bytes()
        modified = parse_date(r.headers["Last-Modified"])
        assert dt.datetime.now(dt.timezone.utc) - modified < dt.timedelta(hours=1), r.headers["Last-Modified"]
        r = client.get(f"/v1/items/{ids[key]}/audio",
                       headers={**auth(key), "If-Unmodified-Since": "Mon, 01 Jan 2002 00:00:00 GMT"})
        assert r.status_code == 412 and "2001" not in r.get_json()["error"]["message"]
    r = client.delete(f"/v1/items/{ids[b]}", headers=auth(b))
    assert r.status_code == 200 and r.get_json()["deleted"]["stored_files"] == 1  # as if no one else held it
    assert blob.is_file() and client.get(f"/v1/items/{ids[a]}/audio", headers=auth(a)).status_code == 200
    r = client.delete(f"/v1/items/{ids[a]}", headers=auth(a))
    assert r.status_code == 200 and r.get_json()["deleted"]["stored_files"] == 1 and not blob.exists()


def test_unknown_and_revoked_keys_get_the_same_401(client, settings, new_key):
    from sqlalchemy import func, update

    from clapq.db import session_scope
    from clapq.keys import hash_key
    from clapq.models import ApiKey

    key = new_key()
    assert client.get("/v1/libraries", headers=auth(key)).status_code == 200
    with session_scope(settings.database_url) as s:
        s.execute(update(ApiKey).where(ApiKey.key_hash == hash_key(key)).values(revoked_at=func.now()))
        stored = s.query(ApiKey.key_hash).all()
    assert all(key not in h for (h,) in stored)  # only hashes are stored
    revoked = client.get("/v1/libraries", headers=auth(key))
    unknown = client.get("/v1/libraries", headers=auth("cq_not-a-key"))
    missing = client.get("/v1/libraries")
    assert revoked.status_code == unknown.status_code == missing.status_code == 401
    assert revoked.get_json() == unknown.get_json() == missing.get_json()
    # and the same headers, WWW-Authenticate among them: nothing tells a revoked key from one never made
    assert dict(revoked.headers) == dict(unknown.headers) == dict(missing.headers)
    assert revoked.headers["WWW-Authenticate"] == 'Bearer realm="clapq"'


def test_a_file_never_reads_another_stored_file(client, new_key, worker, tmp_path):
    """FFmpeg's concat demuxer reads the files a text file names, relative to it: an upload of
    "ffconcat version 1.0 / file <sha256>", ground until its own digest shares the first 4 hex digits with
    the other (so it is stored in the same folder), was embedded as another tenant's stored file of that
    digest (helper-55): whether anyone held some bytes was told, and their sound embedded as the uploader's.
    It fails now as a file that names nothing stored does, and decoding it reads no other file."""
    import hashlib
    import itertools

    from worker.audio import DecodeError, decode

    path = write(tmp_path / "theirs.wav", 3.0, 48_000, 1, freq=640, seed=55)
    a, b = new_key(), new_key()
    lib_b = client.post("/v1/libraries", json={"name": "theirs"}, headers=auth(b)).get_json()
    up = upload(client, b, lib_b["id"], [path]).get_json()
    assert wait_job(client, b, up["job_id"])["status"] == "done"
    target = hashlib.sha256(path.read_bytes()).hexdigest()

    def beside(sha: str) -> bytes:  # a concat script naming `sha`, stored in the folder of `target`
        for n in itertools.count():
            data = f"ffconcat version 1.0\nfile {sha}\n# {n}\n".encode()
            if hashlib.sha256(data).hexdigest()[:4] == target[:4]:
                return data

    lib_a = client.post("/v1/libraries", json={"name": "probe"}, headers=auth(a)).get_json()
    errors = []
    for n, sha in enumerate((target, target[:4] + "0" * 60)):  # a stored file, and none
        probe = tmp_path / f"probe{n}.ffconcat"
        probe.write_bytes(beside(sha))
        r = upload(client, a, lib_a["id"], [probe]).get_json()
        job = wait_job(client, a, r["job_id"])
        item = client.get(f"/v1/items/{r['items'][0]['id']}", headers=auth(a)).get_json()
        assert job["status"] == "failed" and item["status"] == "failed", item
        errors.append(item["error"])
        # decoded directly, beside a copy of the named file, as in the blob store
        (tmp_path / "store").mkdir(exist_ok=True)
        (tmp_path / "store" / target).write_bytes(path.read_bytes())
        (tmp_path / "store" / "blob").write_bytes(probe.read_bytes())
        with pytest.raises(DecodeError):
            decode(tmp_path / "store" / "blob")
    assert errors[0] == errors[1], errors


def test_a_patch_of_another_tenants_item_neither_locks_nor_waits_for_it(client, new_key, settings):
    """PATCH locks the item it changes; given another tenant's item id it locked that row too, and waited
    behind whatever held it (its owner's PATCH, a worker's write) before its 404 (helper-55)."""
    import threading

    from sqlalchemy import text

    from clapq.db import session_scope

    a, b = new_key(), new_key()
    lib = client.post("/v1/libraries", json={"name": "held"}, headers=auth(a)).get_json()
    r = client.post(f"/v1/libraries/{lib['id']}/batches", headers=auth(a), content_type="multipart/form-data",
                    data={"files": [(io.BytesIO(b"not audio at all"), "x.wav")]})
    item = r.get_json()["items"][0]["id"]
    answers = []
    with session_scope(settings.database_url) as s:  # the owner's transaction holds the row meanwhile
        s.execute(text("SELECT id FROM items WHERE id = :i FOR UPDATE"), {"i": item})
        t = threading.Thread(target=lambda: answers.append(
            client.patch(f"/v1/items/{item}", json={"metadata": {"x": 1}}, headers=auth(b)).status_code))
        t.start()
        t.join(10)
        done = not t.is_alive()
    t.join()
    assert done and answers == [404], answers
    assert client.get(f"/v1/items/{item}", headers=auth(a)).get_json()["metadata"] == {}


def test_the_stored_audio_is_its_owners_alone(tmp_path):
    """A new blob store's folder is the service user's alone (0700), and so is each stored file (0600): its shard
    folders were 0755 under a 0755 root, so any account on the machine could list which files a library holds
    (the file names are their bytes' sha256). An existing folder's mode is the operator's and is kept."""
    import stat

    from clapq.blobs import BlobStore

    store = BlobStore(tmp_path / "data" / "blobs")
    w = store.writer()
    w.write(b"RIFF")
    sha = w.commit()
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path_for(sha).stat().st_mode) == 0o600
    (tmp_path / "shared").mkdir(mode=0o755)
    assert stat.S_IMODE(BlobStore(tmp_path / "shared").root.stat().st_mode) == 0o755


def test_every_endpoint_answers_another_tenants_ids_as_unknown_ones(client, app, new_key, worker, files):
    """Each /v1 route that takes an id, each method: tenant B sending tenant A's library, job or item id gets
    the answer an id no one has gets, 404 with the same body and headers (the ids aside), and A's rows are as
    they were. Routes are read from the app, so a new one is asked too (its request body below, where the
    404 would otherwise hide behind a 400 for the body)."""
    import uuid

    a, b = new_key(), new_key()
    lib = client.post("/v1/libraries", json={"name": "theirs"}, headers=auth(a)).get_json()["id"]
    up = upload(client, a, lib, files).get_json()
    assert wait_job(client, a, up["job_id"])["status"] == "done"
    item = up["items"][0]["id"]
    before = {p: client.get(p, headers=auth(a)).get_json() for p in (f"/v1/libraries/{lib}", f"/v1/items/{item}")}
    sha = before[f"/v1/items/{item}"]["sha256"]
    path = before[f"/v1/items/{item}"]["metadata"].get("path")
    theirs = {"lib_id": lib, "job_id": up["job_id"], "item_id": item}
    labels = {"json": {"labels": ["rain", "dog"]}}
    bodies = {
        "/v1/libraries/<lib_id>/batches": {"data": {"files": [(io.BytesIO(b"RIFF...."), "x.wav")]},
                                           "content_type": "multipart/form-data"},
        "/v1/libraries/<lib_id>/known": {"json": {"sha256": [sha]}},
        "/v1/libraries/<lib_id>/moves": {"json": {"moves": [{"item_id": item, "from": {"path": path, "folder": None},
                                                             "to": {"path": "b.wav", "folder": "f"}}]}},
        "/v1/libraries/<lib_id>/deletions": {"json": {"item_ids": [item]}},
        "/v1/libraries/<lib_id>/classify": labels, "/v1/items/<item_id>/classify": labels,
        ("PATCH", "/v1/items/<item_id>"): {"json": {"metadata": {"x": 1}}},
    }
    asked = []
    # deletions last, so that each of the others meets A's rows as they are
    rules = sorted((r for r in app.url_map.iter_rules() if r.arguments and r.rule.startswith("/v1/")),
                   key=lambda r: "DELETE" in r.methods)
    for rule in rules:
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            kwargs = bodies.get((method, rule.rule), bodies.get(rule.rule, {})) if method != "GET" else {}
            answers = []
            for ids in (theirs, {k: str(uuid.uuid4()) for k in theirs}):
                url = rule.rule
                for name in rule.arguments:
                    url = url.replace(f"<{name}>", ids[name])
                kw = {**kwargs, "data": {k: [(io.BytesIO(b"RIFF...."), "x.wav")] for k in kwargs["data"]}} \
                    if "data" in kwargs else kwargs
                r = client.open(url, method=method, headers=auth(b), **kw)
                text = r.get_data(as_text=True)
                for name, value in ids.items():
                    text = text.replace(value, f"<{name}>")
                answers.append((r.status_code, text, sorted(k for k in r.headers.keys() if k != "Date")))
            assert answers[0][0] == 404 and answers[0] == answers[1], (method, rule.rule, answers)
            asked.append(f"{method} {rule.rule}")
    assert len(asked) >= 20, asked
    # a search of B's own library by A's item ("more like this"): as an unknown item
    lib_b = client.post("/v1/libraries", json={"name": "mine"}, headers=auth(b)).get_json()["id"]
    for by in (item, str(uuid.uuid4())):
        r = client.post("/v1/search", json={"library_id": lib_b, "item_id": by}, headers=auth(b))
        assert (r.status_code, r.get_json()) == (404, {"error": {"code": "not_found", "message": "item not found",
                                                                  "status": 404}}), r.get_json()
    assert {p: client.get(p, headers=auth(a)).get_json() for p in before} == before
    assert client.get(f"/v1/jobs/{up['job_id']}", headers=auth(a)).get_json()["status"] == "done"


def test_an_audio_link_opens_its_items_audio_and_nothing_else(client, new_key, worker, files, settings):
    """POST /v1/items/<id>/audio-link: a URL of the item's audio that needs no key, for an <audio> element (the
    search page's player, which fetched the whole file with the key before it played a note of it). It opens that
    item's audio, by range too, and nothing else: not another item's, not another route, not once it expired, not
    once its key was revoked or the item deleted."""
    import base64
    import time

    from clapq.blobs import scan
    from clapq.db import session_scope
    from clapq.keys import create_key, revoke_key

    with session_scope(settings.database_url) as s:
        key = create_key(s, "linking")
    other = new_key()
    lib = client.post("/v1/libraries", json={"name": "linked"}, headers=auth(key)).get_json()
    up = upload(client, key, lib["id"], files[:2]).get_json()
    assert wait_job(client, key, up["job_id"])["status"] == "done"
    item, second = (i["id"] for i in up["items"])
    r = client.post(f"/v1/items/{item}/audio-link", headers=auth(key))
    assert r.status_code == 200, r.get_json()
    url, expires = r.get_json()["url"], dt.datetime.fromisoformat(r.get_json()["expires_at"])
    assert url.startswith(f"/v1/items/{item}/audio?link=")
    assert abs((expires - dt.datetime.now(dt.timezone.utc)).total_seconds() - 3600) < 60, expires
    whole = files[0].read_bytes()
    r = client.get(url)
    assert r.status_code == 200 and r.data == whole and r.headers["Content-Type"] == "audio/wav"
    assert r.headers["Cache-Control"] == "private, no-cache"  # no shared cache keeps it for others
    r = client.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.data == whole[100:200]
    link = url.partition("?link=")[2]

    def refused(path: str, said: str, code: int = 401) -> None:
        r = client.get(path)
        assert r.status_code == code and said in r.get_json()["error"]["message"], (path, r.get_json())

    # another item's audio, another route of this one, a link changed by a character, or no link at all
    refused(f"/v1/items/{second}/audio?link={link}", "this audio link is not valid: not one this service made for "
                                                     "this item, or the API key that asked for it was revoked")
    refused(f"/v1/items/{item}?link={link}", "missing or invalid API key")
    refused(f"/v1/items/{item}/segments?link={link}", "missing or invalid API key")
    changed = link[:-3] + ("A" if link[-3] != "A" else "B") + link[-2:]
    refused(f"/v1/items/{item}/audio?link={changed}", "this audio link is not valid")
    for bad in ("", "x", "!!!", base64.urlsafe_b64encode(b"\0" * 60).decode()):
        refused(f"/v1/items/{item}/audio?link={bad}", "this audio link is not valid")
    # one spelling of a link: not with its padding, nor another last character that decodes to the same bytes, nor
    # characters the decoder leaves out (each opened the audio)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(link[-1])
    assert base64.urlsafe_b64decode(link[:-1] + alphabet[last ^ 1] + "=") == base64.urlsafe_b64decode(link + "=")
    for spelt in (link + "=", link + "==", link[:-1] + alphabet[last ^ 1], link[:-1] + alphabet[last ^ 3],
                  link[:4] + "!!!!" + link[4:], link[:4] + "%0A" + link[4:] + "="):
        refused(f"/v1/items/{item}/audio?link={spelt}", "this audio link is not valid")
    # another tenant's item is none of theirs to link; the length of a link is bounded
    assert client.post(f"/v1/items/{item}/audio-link", headers=auth(other)).status_code == 404
    for given, said in (("0", "between 1 and 604800"), ("604801", "between 1 and 604800"), ("soon", "an integer")):
        r = client.post(f"/v1/items/{item}/audio-link?expires_in_s={given}", headers=auth(key))
        assert r.status_code == 400 and said in r.get_json()["error"]["message"], r.get_json()
    # expired
    short = client.post(f"/v1/items/{item}/audio-link?expires_in_s=1", headers=auth(key)).get_json()["url"]
    time.sleep(2.1)
    refused(short, "this audio link expired")
    assert client.get(url).status_code == 200
    # signed with a secret kept beside the stored files, not in the database (which holds the key's hash): made
    # again when removed, and every link made before stops; the store's check takes it for no stray
    secret = settings.blob_dir / ".link-secret"
    assert secret.is_file() and secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32
    assert [p for p, _ in scan(settings.blob_dir)[1] if ".link-secret" in p] == []
    secret.unlink()
    refused(url, "this audio link is not valid")
    url = client.post(f"/v1/items/{item}/audio-link", headers=auth(key)).get_json()["url"]
    assert client.get(url).status_code == 200 and secret.is_file()
    # the item deleted: its link finds nothing; the key revoked: none of its links open
    second_url = client.post(f"/v1/items/{second}/audio-link", headers=auth(key)).get_json()["url"]
    assert client.delete(f"/v1/items/{second}", headers=auth(key)).status_code == 200
    refused(second_url, "item not found", 404)
    with session_scope(settings.database_url) as s:
        revoke_key(s, key)
    refused(url, "the API key that asked for it was revoked")


def test_an_audio_link_is_not_written_in_the_apis_log(start_api, new_key, files, tmp_path):
    """gunicorn's access log wrote each request line whole: an audio link's token, which opens the item's audio
    without a key until it expires (an hour, up to 7 days), was in `clapq api`'s output for whoever reads its logs
    (helper-117). The line is written with the token as `***`, for a link that opens the file and one refused."""
    import time

    import requests

    base, key = start_api(), new_key()
    headers = {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "logged"}, headers=headers, timeout=30).json()
    with open(files[0], "rb") as f:
        up = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=headers,
                           files=[("files", (files[0].name, f))], timeout=60).json()
    item = up["items"][0]["id"]
    url = requests.post(f"{base}/v1/items/{item}/audio-link", headers=headers, timeout=30).json()["url"]
    token = url.partition("?link=")[2]
    assert requests.get(base + url, headers={"Range": "bytes=0-99"}, timeout=30).status_code == 206
    assert requests.get(f"{base}/v1/items/{item}/audio?x=1&link={token[::-1]}", timeout=30).status_code == 401
    log = tmp_path / "api0.log"
    deadline = time.monotonic() + 10  # each process writes its line once it has answered
    while log.read_text().count("/audio?") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    out = log.read_text()
    assert token not in out and token[::-1] not in out, out[-3000:]
    # the API's whole output is JSON (CLAPQ_LOG_FORMAT's default), gunicorn's lines too: they were loose text
    records = [json.loads(line) for line in out.splitlines()]
    assert any(r["logger"] == "gunicorn.error" and r["msg"].startswith("Listening at") for r in records), out[-3000:]
    audio = sorted((r["msg"], r["method"], r["query"], r["status"]) for r in records
                   if r["logger"] == "gunicorn.access" and r["path"] == f"/v1/items/{item}/audio")
    assert audio == [(f"GET /v1/items/{item}/audio?link=*** HTTP/1.1 206", "GET", "link=***", 206),
                     (f"GET /v1/items/{item}/audio?x=1&link=*** HTTP/1.1 401", "GET", "x=1&link=***", 401)], audio
