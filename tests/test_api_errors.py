"""Every client error is a 4xx with the same envelope and a message that names the limit."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import auth


def err(r, status):
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True)[:500])
    body = r.get_json()
    assert set(body) == {"error"} and body["error"]["message"] and body["error"]["code"]
    return body["error"]


@pytest.fixture()
def lib(client, new_key):
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "l"}, headers=auth(key)).get_json()
    return key, lib["id"]


def test_a_library_name_is_one_name_however_its_accents_are_written(client, new_key, settings):
    """"Café" typed (NFC) and "Café" from a macOS folder name (NFD: e + combining accent) are one name:
    stored in NFC, and a second library under the other spelling is a 409, also against a library made
    before names were normalised (its NFD name stored as it came)."""
    from sqlalchemy import text

    from clapq.db import session_scope

    key = new_key()
    nfc, nfd = "Caf\u00e9", "Cafe\u0301"
    made = client.post("/v1/libraries", json={"name": nfd}, headers=auth(key))
    assert made.status_code == 201 and made.get_json()["name"] == nfc
    assert "already exists" in err(client.post("/v1/libraries", json={"name": nfc}, headers=auth(key)), 409)["message"]
    with session_scope(settings.database_url) as s:  # a name stored before the rule
        s.execute(text("UPDATE libraries SET name = :n WHERE id = :i"), {"n": "Fe\u0301te", "i": made.get_json()["id"]})
    err(client.post("/v1/libraries", json={"name": "F\u00e9te"}, headers=auth(key)), 409)
    assert client.post("/v1/libraries", json={"name": nfc}, headers=auth(new_key())).status_code == 201  # per tenant


def test_library_validation(client, new_key):
    key = new_key()
    err(client.post("/v1/libraries", data="nope", headers=auth(key)), 400)
    err(client.post("/v1/libraries", json={"name": ""}, headers=auth(key)), 400)
    err(client.post("/v1/libraries", json={"name": 5}, headers=auth(key)), 400)
    assert client.post("/v1/libraries", json={"name": "x"}, headers=auth(key)).status_code == 201
    err(client.post("/v1/libraries", json={"name": "x"}, headers=auth(key)), 409)
    err(client.get("/v1/libraries/not-a-uuid", headers=auth(key)), 404)
    err(client.get("/v1/items//segments", headers=auth(key)), 404)  # an empty id: no redirect page
    err(client.get(f"/v1/libraries/{uuid.uuid4()}", headers=auth(key)), 404)
    err(client.get(f"/v1/jobs/{uuid.uuid4()}", headers=auth(key)), 404)
    err(client.get(f"/v1/items/{uuid.uuid4()}", headers=auth(key)), 404)
    err(client.delete("/v1/libraries", headers=auth(key)), 405)


def test_a_name_where_an_id_goes_is_said_to_be_no_id(client, new_key):
    """`clapq` takes a library's name or id, the API ids only: a search with library_id=field, beside a library
    listed as 'field', was "library 'field' not found" (helper-118), and /v1/libraries/field "library not found".
    Still a 404, as for an unknown id, saying that it is no id and where ids are."""
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "field"}, headers=auth(key)).get_json()
    said = ("library not found: 'field' is not an id (ids are UUIDs: GET /v1/libraries gives each library's beside "
            "its name)")
    for r in (client.get("/v1/search", query_string={"library_id": "field", "q": "rain"}, headers=auth(key)),
              client.post("/v1/search", json={"library_ids": [lib["id"], "field"], "q": "rain"}, headers=auth(key)),
              client.get("/v1/libraries/field/items", headers=auth(key))):
        assert err(r, 404)["message"] == said
    e = err(client.get("/v1/jobs/last", headers=auth(key)), 404)
    assert e["message"] == "job not found: 'last' is not an id (ids are UUIDs, as the API gives them)", e
    assert err(client.get(f"/v1/libraries/{uuid.uuid4()}", headers=auth(key)), 404)["message"] == "library not found"


def test_upload_validation(client, lib, settings):
    key, lib_id = lib
    url = f"/v1/libraries/{lib_id}/batches"
    err(client.post(url, json={"files": []}, headers=auth(key)), 415)
    err(client.post(url, data={"other": "x"}, headers=auth(key), content_type="multipart/form-data"), 400)
    e = err(client.post(url, headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(b"x"), "a.wav")], "metadata": "{bad"}), 400)
    assert "metadata" in e["message"]
    e = err(client.post(url, headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(b"x"), "a.wav")], "metadata": '{"b.wav": {}}'}), 400)
    assert "b.wav" in e["message"]
    # metadata rides along with every search result: over 16 KiB of JSON for one file is refused, by name
    big = json.dumps({"a.wav": {"notes": "x" * (16 << 10)}})
    e = err(client.post(url, headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(b"x"), "a.wav")], "metadata": big}), 413)
    assert e["code"] == "metadata_too_large" and "'a.wav'" in e["message"] and "16384" in e["message"], e
    many = [(io.BytesIO(b"%d" % i), f"{i}.wav") for i in range(settings.max_files_per_batch + 1)]
    e = err(client.post(url, headers=auth(key), content_type="multipart/form-data", data={"files": many}), 413)
    assert str(settings.max_files_per_batch) in e["message"]


def test_upload_metadata_is_keyed_by_the_name_however_its_accents_are_written(client, lib):
    """A batch's metadata keyed "Café.wav" as typed (NFC), for a part named as a macOS folder spells it (NFD: e
    and a combining accent), was a 400 "'metadata' names files not in this batch: ['Café.wav']", a name that
    looks like the file's (helper-118); names are one name in either form, as a library's, a query's and a
    filter's are. A key that is a part's name without its folders says the part's name; a file's metadata that is
    not an object names the file."""
    key, lib_id = lib
    url = f"/v1/libraries/{lib_id}/batches"

    def send(files, meta):
        parts = [(io.BytesIO(data), name) for name, data in files]
        return client.post(url, headers=auth(key), content_type="multipart/form-data",
                           data={"files": parts, "metadata": json.dumps(meta)})

    r = send([("Cafe\u0301.wav", b"RIFF nfd"), ("Fe\u0301te.wav", b"RIFF nfd 2")],
             {"Caf\u00e9.wav": {"place": "caf\u00e9"}, "Fe\u0301te.wav": {"n": 2}})
    assert r.status_code == 202, r.get_json()
    got = {i["filename"]: client.get(f"/v1/items/{i['id']}", headers=auth(key)).get_json()["metadata"]
           for i in r.get_json()["items"]}
    assert got == {"Caf\u00e9.wav": {"place": "caf\u00e9"}, "F\u00e9te.wav": {"n": 2}}, got
    # one name given twice, once in each form: which was meant cannot be told
    e = err(send([("Caf\u00e9.wav", b"RIFF x")], {"Caf\u00e9.wav": {"a": 1}, "Cafe\u0301.wav": {"a": 2}}), 400)
    assert e["message"] == "'metadata' names 'Caf\u00e9.wav' twice (its accents written in two ways); name each file " \
        "once", e
    e = err(send([("sub/b.wav", b"RIFF y")], {"b.wav": {}}), 400)
    assert e["message"] == "'metadata' names files not in this batch: ['b.wav'] (the batch has 'sub/b.wav': metadata " \
        "is keyed by each part's filename as sent, its folders included)", e
    e = err(send([("a.wav", b"RIFF z")], {"a.wav": 5}), 400)
    assert e["message"] == "'metadata' of 'a.wav' must be an object (of key: value), not 5", e


def test_an_upload_reads_every_part_it_is_sent_or_says_why_not(client, lib):
    """Parts under other names were dropped unseen (a second file sent as 'file', a 'tags' field, metadata
    sent as a file as `curl -F metadata=@meta.json` sends it), and a body cut short or without its boundary
    was answered "no files"; a Content-Type in capitals was a 415."""
    key, lib_id = lib
    url = f"/v1/libraries/{lib_id}/batches"
    for extra in ({"file": (io.BytesIO(b"RIFF2"), "b.wav")}, {"tags": "foley"}):
        e = err(client.post(url, headers=auth(key), content_type="multipart/form-data",
                            data={"files": (io.BytesIO(b"RIFF1"), "a.wav"), **extra}), 400)
        assert e["message"].startswith(f"the form has a part {next(iter(extra))!r}, which an upload does not take"), e
    # `curl -F files=c.wav` (no @) sends the name as text: said, not dropped beside the real file
    e = err(client.post(url, headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(b"RIFF1"), "a.wav"), "c.wav"]}), 400)
    assert e["message"] == "a 'files' part came as a text field, not a file: give it a filename (with curl: " \
                           "-F files=@path)", e
    meta = io.BytesIO(json.dumps({"a.wav": {"tags": ["foley"]}}).encode())
    r = client.post(url, headers=auth(key), content_type="multipart/form-data",
                    data={"files": (io.BytesIO(b"RIFF meta as a file"), "a.wav"), "metadata": (meta, "meta.json")})
    assert r.status_code == 202, r.get_json()
    item = r.get_json()["items"][0]["id"]
    assert client.get(f"/v1/items/{item}", headers=auth(key)).get_json()["metadata"] == {"tags": ["foley"]}
    e = err(client.post(url, headers=auth(key), content_type="multipart/form-data",
                        data={"files": (io.BytesIO(b"RIFF3"), "a.wav"), "metadata": (io.BytesIO(b"\xff{"), "m")}), 400)
    assert e["message"] == "'metadata' is not UTF-8 text", e
    nameless = b'--b\r\nContent-Disposition: form-data; filename="d.wav"\r\n\r\nRIFF\r\n--b--\r\n'
    e = err(client.post(url, headers=auth(key), data=nameless, content_type="multipart/form-data; boundary=b"), 400)
    assert e["message"].startswith("the form has a part with no name, which an upload does not take"), e
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="c.wav"\r\n\r\nRIFF cut'
    for body, ctype in ((part, "multipart/form-data; boundary=b"),  # no closing boundary: cut short
                        (part + b"\r\n--b--\r\n", "multipart/form-data")):  # no boundary given
        e = err(client.post(url, headers=auth(key), data=body, content_type=ctype), 400)
        assert e["message"].startswith("the form could not be read ("), e
    # a file's name in Latin-1 (curl -F of a name from an old disk): werkzeug's "'utf-8' codec can't decode" said
    # neither which part nor what to send (h139)
    latin = b'--b\r\nContent-Disposition: form-data; name="files"; filename="caf\xe9.wav"\r\n\r\nRIFF\r\n--b--\r\n'
    e = err(client.post(url, headers=auth(key), data=latin, content_type="multipart/form-data; boundary=b"), 400)
    assert e["message"].startswith("the form could not be read: a part's headers are not UTF-8 (") and \
        e["message"].endswith("send each file's name (and each field's) as UTF-8"), e
    r = client.post(url, headers=auth(key), data=part + b"\r\n--b--\r\n",
                    content_type="Multipart/Form-Data; boundary=b")
    assert r.status_code == 202 and [i["filename"] for i in r.get_json()["items"]] == ["c.wav"], r.get_json()


def test_known_lists_only_held_bytes_of_this_library(client, lib, new_key, worker, settings, tmp_path):
    """POST /known answers which digests the library holds (a failed file is not held: sending it again
    retries it; one that failed for a reason in its bytes is named in `failed`, with its item and error, so that
    `clapq upload` need not send it again at every run) and which of those are not embedded yet; a bad body,
    too many digests and another tenant's library get errors."""
    from sqlalchemy import update

    from clapq.db import session_scope
    from clapq.models import Item
    from tests.audio import write
    from tests.conftest import wait_job
    from tests.test_e2e import upload

    key, lib_id = lib
    good = write(tmp_path / "good.wav", 0.5, seed=3)
    bad = good.with_name("bad.wav")
    bad.write_bytes(b"not audio at all" * 10)
    job = upload(client, key, lib_id, [good, bad]).get_json()
    assert wait_job(client, key, job["job_id"])["status"] == "done_with_errors"
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (good, bad)] + ["0" * 64]
    r = client.post(f"/v1/libraries/{lib_id}/known", json={"sha256": digests}, headers=auth(key))
    good_id, bad_id = job["items"][0]["id"], job["items"][1]["id"]
    failed = {digests[1]: {"item_id": bad_id, "error": "not a readable audio file (Invalid data found when "
                                                          "processing input)"}}
    assert r.status_code == 200 and r.get_json() == {"known": digests[:1], "pending": [], "pending_jobs": {},
                                                     "pending_items": {}, "items": {digests[0]: good_id}, "sent_from": {},
                                                     "failed": failed, "missing": []}, r.get_json()
    # the path in its folder `clapq upload` keeps in the metadata, for a folder uploaded again after a rename
    assert client.patch(f"/v1/items/{good_id}", json={"metadata": {"path": "sub/good.wav", "folder": "/srv/x"}},
                        headers=auth(key)).status_code == 200
    r = client.post(f"/v1/libraries/{lib_id}/known", json={"sha256": digests}, headers=auth(key))
    assert r.get_json()["sent_from"] == {digests[0]: {"path": "sub/good.wav", "folder": "/srv/x"}}
    # a file not embedded yet (queued again here by hand; it was started once, so no task takes it in)
    with session_scope(settings.database_url) as s:
        s.execute(update(Item).where(Item.library_id == uuid.UUID(lib_id), Item.sha256 == digests[0])
                  .values(status="queued"))
    r = client.post(f"/v1/libraries/{lib_id}/known", json={"sha256": digests}, headers=auth(key))
    with session_scope(settings.database_url) as s:
        s.execute(update(Item).where(Item.library_id == uuid.UUID(lib_id), Item.sha256 == digests[0])
                  .values(status="done"))
    assert r.get_json() == {"known": digests[:1], "pending": digests[:1], "pending_jobs": {digests[0]: job["job_id"]},
                            "pending_items": {digests[0]: good_id}, "items": {digests[0]: good_id},
                            "sent_from": {digests[0]: {"path": "sub/good.wav", "folder": "/srv/x"}}, "failed": failed,
                            "missing": []}
    # a failure that was not the file's (a worker lost on it at each try, so its attempts ran out; or one from
    # before the worker said whose it was): not named, so `clapq upload` sends it again, a retry
    for fault in (False, None):
        with session_scope(settings.database_url) as s:
            s.execute(update(Item).where(Item.id == uuid.UUID(bad_id)).values(failed_in_file=fault))
        assert client.post(f"/v1/libraries/{lib_id}/known", json={"sha256": digests}, headers=auth(key)
                           ).get_json()["failed"] == {}
    for body in ({"sha256": ["ABC"]}, {"sha256": "0" * 64}, {"sha256": ["0" * 64, 5]}, ["0" * 64], None):
        assert "sha256" in err(client.post(f"/v1/libraries/{lib_id}/known", json=body, headers=auth(key)), 400)["message"]
    assert "10000" in err(client.post(f"/v1/libraries/{lib_id}/known", json={"sha256": ["0" * 64] * 10_001},
                                      headers=auth(key)), 400)["message"]
    # 10,000 digests laid out as a pretty-printer lays them out (920 kB) are taken, as any JSON body up to
    # 16 MiB is: a limit of 800 kB read before the body refused them (helper-39)
    many = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]
    r = client.post(f"/v1/libraries/{lib_id}/known", data=json.dumps({"sha256": many}, indent=12),
                    content_type="application/json", headers=auth(key))
    assert r.status_code == 200 and r.get_json()["known"] == [], r.get_json()
    # a field /known does not take, or a key given twice, is refused as search's are (both were ignored)
    e = err(client.post(f"/v1/libraries/{lib_id}/known", json={"sha256": [], "sha265": digests}, headers=auth(key)), 400)
    assert e["message"] == "the JSON body has 'sha265', which /known does not take; send {\"sha256\": [...]}", e
    e = err(client.post(f"/v1/libraries/{lib_id}/known", data='{"sha256": [], "sha256": []}', headers=auth(key)), 400)
    assert e["message"] == "the JSON body gives 'sha256' more than once; give it once", e
    err(client.post(f"/v1/libraries/{lib_id}/known", json={"sha256": digests}, headers=auth(new_key())), 404)


def test_text_postgres_cannot_store_is_refused_not_a_500(client, lib, tmp_path):
    """A NUL character or an unpaired surrogate, anywhere in a JSON body, a query string, a form or the
    upload's metadata: 400 naming where, not an error deep inside Postgres."""
    from tests.audio import write

    key, lib_id = lib
    for name in ("a\x00b", "\ud800"):
        assert "JSON body" in err(client.post("/v1/libraries", json={"name": name}, headers=auth(key)), 400)["message"]
    assert "NUL" in err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "rain\x00"},
                                   headers=auth(key)), 400)["message"]
    assert "JSON body" in err(client.post("/v1/search", json={"library_id": lib_id, "text": "x",
                                                               "filter": {"tag\x00": "a"}}, headers=auth(key)), 400)["message"]
    assert "form" in err(client.post("/v1/search", data={"library_id": lib_id, "text": "rain\x00"},
                                     content_type="multipart/form-data", headers=auth(key)), 400)["message"]
    # bytes that are not UTF-8 once %-decoded were read as U+FFFD and searched for (helper-52); a query of
    # invisible characters alone is nothing to search for; an empty or unknown library id is named
    for query in (f"library_id={lib_id}&q=%FF", f"library_id={lib_id}&q=%ED%A0%80",
                  f"library_id={lib_id}&q=x&filter=" + '{"metadata": {"a": "%FF"}}'):
        assert err(client.get(f"/v1/search?{query}", headers=auth(key)), 400)["message"].startswith(
            "the query string is not UTF-8 once its %-escapes are decoded"), query
        assert err(client.post("/v1/search", data=query, content_type="application/x-www-form-urlencoded",
                               headers=auth(key)), 400)["message"].startswith("the form is not UTF-8"), query
    assert client.get(f"/v1/search?library_id={lib_id}&q=caf%C3%A9", headers=auth(key)).status_code == 200
    # a multipart field is decoded by werkzeug, each byte that is not UTF-8 as U+FFFD: the query is refused
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="library_id"\r\n\r\n{lib_id}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="q"\r\n\r\n').encode() + \
        b"caf\xe9\r\n" + f"--{boundary}--\r\n".encode()
    assert "U+FFFD" in err(client.post("/v1/search", data=body, content_type=f"multipart/form-data; boundary={boundary}",
                                       headers=auth(key)), 400)["message"]
    # a file input left empty, as a browser's FormData sends it (no filename, no bytes), is no clip: beside a text
    # query it was "give exactly one of ..."; alone it is no query; a named empty file is still a clip to refuse
    def form(audio_part: bytes, q: str = "rain"):
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="library_id"\r\n\r\n{lib_id}\r\n' +
                (f'--{boundary}\r\nContent-Disposition: form-data; name="q"\r\n\r\n{q}\r\n' if q else "")).encode()
        return client.post("/v1/search", data=body + audio_part + f"--{boundary}--\r\n".encode(),
                           content_type=f"multipart/form-data; boundary={boundary}", headers=auth(key))

    no_file = (f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename=""\r\n'
               "Content-Type: application/octet-stream\r\n\r\n\r\n").encode()
    r = form(no_file)
    assert r.status_code == 200 and r.get_json()["results"] == [], r.get_json()
    assert err(form(no_file, q=""), 400)["message"].startswith("give exactly one of")
    assert err(form(no_file.replace(b'filename=""', b'filename="a.wav"'), q=""), 400)["message"] == \
        "the 'audio' clip 'a.wav' could not be decoded: the file is empty (0 bytes)"
    # and so is one of letters or marks that show nothing: a variation selector, Hangul fillers (they were searched
    # for, a page of results for a query that showed nothing); an emoji with its selector is something
    for q in ("\u200b", "\ufe0f", " \u3164\u3164 ", "\u115f\u1160", "\U000e0100\u034f", "\u2800"):
        assert err(client.get("/v1/search", query_string={"library_id": lib_id, "q": q}, headers=auth(key)),
                   400)["message"] == "the query text has no visible characters", ascii(q)
    assert client.get("/v1/search", query_string={"library_id": lib_id, "q": "\u2764\ufe0f"},
                      headers=auth(key)).status_code == 200
    assert err(client.get("/v1/search", query_string={"library_id": "", "q": "x"}, headers=auth(key)),
               400)["message"] == "a library id given is empty ('library_id=' or an empty 'library_ids' value)"
    assert client.get(f"/v1/search?library_id={lib_id}&q=%EE%80%80", headers=auth(key)).status_code == 200
    unknown = str(uuid.uuid4())
    e = err(client.post("/v1/search", json={"library_ids": [lib_id, unknown], "q": "x"}, headers=auth(key)), 404)
    assert e["message"] == f"library {unknown!r} not found", e
    wav = write(tmp_path / "a.wav", 0.2)
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": (io.BytesIO(wav.read_bytes()), "a.wav"), "metadata": '{"a.wav": {"k": "\\u0000"}}'})
    assert "'metadata'" in err(r, 400)["message"]


def test_every_multipart_text_field_that_is_not_utf8_is_refused(client, lib, settings, tmp_path):
    """werkzeug reads each byte of a multipart text field that is not UTF-8 as U+FFFD: only a search's query text
    was refused for it, so a search's 'filter' with a Latin-1 "café" matched nothing, silently, and an upload's
    'metadata' field was stored with U+FFFD in place of its letters. Every text field is a 400 naming it; the
    same in UTF-8 is taken, and nothing of the refused upload is stored."""
    from sqlalchemy import func, select

    from clapq.db import session_scope
    from clapq.models import Item
    from tests.audio import write

    key, lib_id = lib
    boundary = "b0undary"

    def form(fields: list[tuple[str, bytes]], files: list[tuple[str, str, bytes]] = ()) -> dict:
        body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n'.encode() + v + b"\r\n"
                        for n, v in fields)
        body += b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"; filename="{f}"\r\n'
                         f'Content-Type: application/octet-stream\r\n\r\n'.encode() + v + b"\r\n" for n, f, v in files)
        return {"data": body + f"--{boundary}--\r\n".encode(), "headers": auth(key),
                "content_type": f"multipart/form-data; boundary={boundary}"}

    text = '{"metadata": {"place": "caf\u00e9"}}'
    query = [("library_id", lib_id.encode()), ("q", b"rain")]
    r = client.post("/v1/search", **form([*query, ("filter", text.encode("latin-1"))]))
    assert "field 'filter' holds U+FFFD" in err(r, 400)["message"]
    r = client.post("/v1/search", **form([*query, ("filter", text.encode())]))
    assert r.status_code == 200, r.get_json()
    wav = write(tmp_path / "a.wav", 1.0).read_bytes()
    url = f"/v1/libraries/{lib_id}/batches"
    meta = '{"a.wav": {"place": "caf\u00e9"}}'
    r = client.post(url, **form([("metadata", meta.encode("latin-1"))], [("files", "a.wav", wav)]))
    assert "field 'metadata' holds U+FFFD" in err(r, 400)["message"]
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.library_id == uuid.UUID(lib_id))) == 0
    r = client.post(url, **form([("metadata", meta.encode())], [("files", "a.wav", wav)]))
    assert r.status_code == 202, r.get_json()
    item = client.get(f"/v1/items/{r.get_json()['items'][0]['id']}", headers=auth(key)).get_json()
    assert item["metadata"] == {"place": "caf\u00e9"}
    # a file sent as a part with no filename, as requests' `files=[("files", (None, data))]` sends it, is a text
    # field of its bytes: it was told its text was not UTF-8 ("holds U+FFFD"), of an audio file
    e = err(client.post(url, **form([("files", wav)])), 400)
    assert e["message"] == "a 'files' part came as a text field, not a file: give it a filename (with curl: " \
                           "-F files=@path)", e
    e = err(client.post("/v1/search", **form([("library_id", lib_id.encode()), ("audio", wav)])), 400)
    assert e["message"] == "'audio' came as a text field, not a file: give it a filename (with curl: " \
                           "-F audio=@clip.wav)", e


def test_filenames_are_sanitised(client, lib):
    key, lib_id = lib
    names = ["../../etc/passwd.wav", "a\x00b.wav", "x" * 400 + ".wav", "/abs/dir/n.wav", "..", "c\u2028d\u2029.wav"]
    data = {"files": [(io.BytesIO(b"bytes %d" % i), n) for i, n in enumerate(names)]}
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), data=data,
                    content_type="multipart/form-data")
    assert r.status_code == 202
    shown = [i["filename"] for i in r.get_json()["items"]]
    assert shown[0] == "passwd.wav" and shown[1] == "ab.wav" and shown[3] == "n.wav" and shown[4] == "unnamed"
    assert shown[5] == "cd.wav"  # Unicode's line and paragraph separators: a name shown on two lines
    assert len(shown[2]) <= 200 and shown[2].endswith(".wav")
    assert all("/" not in n and "\\" not in n and "\x00" not in n for n in shown)
    # downloads keep the name in UTF-8 and give clients that read only the ASCII `filename` (curl -OJ) one
    # that is never empty nor hidden
    data = {"files": [(io.BytesIO(b"rain %d" % i), n) for i, n in enumerate(["雨.wav", "café live.wav", "雨"])]}
    items = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), data=data,
                        content_type="multipart/form-data").get_json()["items"]
    got = [client.get(f"/v1/items/{i['id']}/audio", headers=auth(key)).headers["Content-Disposition"] for i in items]
    assert got[0] == f"attachment; filename=\"{items[0]['id']}.wav\"; filename*=UTF-8''%E9%9B%A8.wav"
    assert got[1] == "attachment; filename=\"cafe live.wav\"; filename*=UTF-8''caf%C3%A9%20live.wav"
    from api.items import attachment

    assert attachment('a "b\\c".wav', "x") == "attachment; filename=\"a bc.wav\"; filename*=UTF-8''a%20%22b%5Cc%22.wav"
    # a name left as its suffix ("\u200b.wav" is stored as ".wav") would save as a hidden file
    assert attachment(".wav", "x") == 'attachment; filename="x.wav"'
    # a percent sign in `filename` some browsers read as an escape: "%2e%2e%2f" as "../" (helper-55)
    assert attachment("%2e%2e%2fx.wav", "x") == "attachment; filename=\"2e2e2fx.wav\"; filename*=UTF-8''%252e%252e%252fx.wav"
    assert got[2] == f"attachment; filename=\"{items[2]['id']}\"; filename*=UTF-8''%E9%9B%A8"


def test_search_validation(client, lib, settings, tmp_path):
    key, lib_id = lib
    err(client.get("/v1/search", query_string={"q": "x"}, headers=auth(key)), 400)
    err(client.get("/v1/search", query_string={"library_id": lib_id}, headers=auth(key)), 400)
    e = err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "x", "k": settings.max_k + 1},
                       headers=auth(key)), 400)
    assert str(settings.max_k) in e["message"]
    err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "x", "k": "ten"}, headers=auth(key)), 400)
    err(client.post("/v1/search", json={"library_id": lib_id, "text": "x", "k": True}, headers=auth(key)), 400)
    # JSON has numbers: one sent as a string is refused there (a form's and a query string's are all text)
    for field, value in (("k", "2"), ("offset", "0"), ("min_score", "0.5"), ("item_id", 7)):
        e = err(client.post("/v1/search", json={"library_id": lib_id, "text": "x", field: value}, headers=auth(key)), 400)
        assert f"'{field}' must be" in e["message"], e
    e = err(client.post("/v1/search", json={"library_id": lib_id, "text": "x" * (settings.max_query_chars + 1)},
                        headers=auth(key)), 400)
    assert str(settings.max_query_chars) in e["message"]
    err(client.post("/v1/search", data="[]", headers=auth(key), content_type="application/json"), 400)
    # numbers too large for a float (Python's JSON reads them as ints): 400s, not OverflowError 500s
    huge = "1" + "0" * 400
    for body in (f'"min_score": {huge}', f'"filter": {{"duration_s": {{"min": {huge}}}}}'):
        err(client.post("/v1/search", data=f'{{"library_id": "{lib_id}", "text": "x", {body}}}',
                        headers=auth(key), content_type="application/json"), 400)
    # "text": null is no text: the "q" beside it is the query
    r = client.post("/v1/search", json={"library_id": lib_id, "q": "rain", "text": None}, headers=auth(key))
    assert r.status_code == 200, r.get_json()
    r = client.get("/v1/search", query_string={"library_id": lib_id, "q": "empty library"}, headers=auth(key))
    assert r.status_code == 200 and r.get_json()["results"] == []
    # libraries given in a shape that is not theirs: said so, not a 404 for a library that exists
    for body, says in (({"library_ids": lib_id}, "'library_ids' must be a list"),
                       ({"library_id": [lib_id]}, "'library_id' must be one library id"),
                       ({"library_ids": [lib_id, 7]}, "'library_id' must be one library id")):
        assert says in err(client.post("/v1/search", json={**body, "text": "x"}, headers=auth(key)), 400)["message"]
    e = err(client.get(f"/v1/search?library_ids={lib_id},{lib_id}&q=x", headers=auth(key)), 400)
    assert "library_ids=A&library_ids=B" in e["message"], e
    # a JSON list as a form's text (one id in it has no comma; it was a 404 for a library "[...]")
    e = err(client.post("/v1/search", data={"library_ids": json.dumps([lib_id]), "q": "x"}, headers=auth(key),
                        content_type="multipart/form-data"), 400)
    assert "library_ids=A&library_ids=B in a query string or a form; a list in a JSON body" in e["message"], e
    # a URL-encoded form (`curl -d library_id=...&q=...`) is a form too
    r = client.post("/v1/search", data={"library_id": lib_id, "q": "rain", "k": "2"}, headers=auth(key))
    assert r.status_code == 200 and r.get_json()["results"] == [], r.get_json()
    # a field given twice would be read as its first value: said instead (the libraries may repeat)
    e = err(client.get(f"/v1/search?library_id={lib_id}&q=rain&q=wind", headers=auth(key)), 400)
    assert e["message"] == "the query string gives 'q' more than once; give it once", e
    assert err(client.get("/v1/jobs?limit=1&limit=2", headers=auth(key)), 400)["message"].startswith(
        "the query string gives 'limit' more than once")
    r = client.get(f"/v1/search?library_id={lib_id}&library_id={lib_id}&q=rain", headers=auth(key))
    assert r.status_code == 200, r.get_json()
    from tests.audio import write

    clip = write(tmp_path / "c.wav", 0.5).read_bytes()
    e = err(client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                        data={"library_id": lib_id, "audio": [(io.BytesIO(clip), "a.wav"), (io.BytesIO(clip), "b.wav")]}),
            400)
    assert e["message"] == "the form gives 'audio' more than once; give it once", e
    long_clip = write(tmp_path / "long.wav", 601.0, 8_000).read_bytes()
    e = err(client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                        data={"library_id": lib_id, "audio": (io.BytesIO(long_clip), "long.wav")}), 400)
    assert e["message"] == "the 'audio' clip 'long.wav' lasts longer than 600 s, the limit for a search clip; send a " \
        "part of it"
    # named as display_name gives it: its folders and control characters go; with no name, the part is named
    e = err(client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                        data={"library_id": lib_id, "audio": (io.BytesIO(b"not audio"), "takes/day\x1b1.wav")}), 400)
    assert e["message"].startswith("the 'audio' clip 'day1.wav' could not be decoded: "), e
    e = err(client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(clip), "a.wav")], "metadata": ['{"a.wav": {}}', '{}']}), 400)
    assert e["message"] == "the form gives 'metadata' more than once; give it once", e


def test_a_form_of_many_large_text_fields_is_refused_as_it_is_read(client, new_key, lib):
    """Werkzeug holds each text field of a multipart form in memory, up to 16 MiB each, and up to 1,016 parts,
    but nothing bounds their sum below the request limit of 2 GiB: a form of forty 16 MB fields took an API
    process from 0.5 to 1.15 GB before its 400 for fields an upload does not take, so a few such requests at once
    could have it killed for memory. Past 32 MiB of fields (and part headers) in all it is now a 413 as it is
    read, for an upload as for a search; a file part's bytes go to disk and do not count."""
    key, lib_id = lib
    field = b"a" * (15 << 20)
    body = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n%s\r\n' % (i, field) for i in range(3))
    body += b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.wav"\r\n\r\nRIFF\r\n--b--\r\n'
    for url in (f"/v1/libraries/{lib_id}/batches", "/v1/search"):
        e = err(client.post(url, headers=auth(key), data=body, content_type="multipart/form-data; boundary=b"), 413)
        assert e["code"] == "payload_too_large" and "other than files" in e["message"], e
    # files of the same size in all are taken: their bytes are not held
    big = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.wav\"\r\n\r\n" + b"RIFF" + field * 3
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), data=big + b"\r\n--b--\r\n",
                    content_type="multipart/form-data; boundary=b")
    assert r.status_code == 202, r.get_data(as_text=True)[:300]


def test_json_of_millions_of_values_is_refused_before_it_is_parsed(client, new_key, lib):
    """16 MiB of `[{},{},...]` is 5.6 million dicts: parsing it took an API process from 0.5 to 1.3 GB before
    /known said it was not a list of digests, and it kept that memory. JSON (a body, an upload's 'metadata', a
    search's filter) of more than a million values, by its commas and brackets, is a 413 before it is parsed."""
    key, lib_id = lib
    many = b"[" + b",".join([b"{}"] * 500_001) + b"]"  # a million and three marks
    e = err(client.post(f"/v1/libraries/{lib_id}/known", headers=auth(key), data=many,
                        content_type="application/json"), 413)
    assert e["code"] == "payload_too_large" and "1000000 values" in e["message"], e
    meta = b'{"a.wav": {"tags": [' + b",".join([b"0"] * 1_000_001) + b"]}}"
    e = err(client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(b"RIFF"), "a.wav")], "metadata": meta.decode()}), 413)
    assert e["message"].startswith("'metadata' holds more than 1000000 values"), e
    # a million, as large a request as is asked for: parsed, and answered for what it is
    e = err(client.post(f"/v1/libraries/{lib_id}/known", headers=auth(key), content_type="application/json",
                        data=b"[" + b",".join([b"0"] * 1_000_000) + b"]"), 400)
    assert e["message"].startswith("send {"), e


def test_a_url_encoded_search_form_of_millions_of_fields_is_refused_before_it_is_parsed(client, new_key, lib):
    """16 MiB of "k&k&k..." is 8 million fields: parsed twice (the UTF-8 check, then werkzeug) it took an API
    process from 0.5 to 1.26 GB before the 400 for a field given twice. A URL-encoded form of more fields than a
    multipart one may have parts (MAX_FORM_PARTS) is a 413 before it is parsed; one of that many is read."""
    key, lib_id = lib
    most = client.application.config["MAX_FORM_PARTS"]
    for fields, status in ((most + 1, 413), (most, 400)):
        body = "&".join([f"library_ids={lib_id}"] * (fields - 1) + ["k=x"])
        e = err(client.post("/v1/search", headers=auth(key), data=body,
                            content_type="application/x-www-form-urlencoded"), status)
        assert (e["code"], e["message"]) == (("payload_too_large", f"the form has {fields} fields; a search's form may "
                                              f"have at most {most} (give many libraries as a JSON body's "
                                              "'library_ids')") if status == 413 else
                                             ("bad_request", "'k' must be an integer")), e
    body = ("k&" * (4 << 20))[:-1]
    e = err(client.post("/v1/search", headers=auth(key), data=body, content_type="application/x-www-form-urlencoded"),
            413)
    assert e["message"].startswith("the form has 4194304 fields"), e
    # a multipart one of more parts is said in a search's words, as the URL-encoded one is (it was told of an upload's
    # 'files' parts and files a batch)
    e = err(client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                        data={"library_ids": [lib_id] * most, "q": "x"}), 413)
    assert e["message"] == (f"the form has more than {most} parts, or a field over 16 MiB; a search's form may have at "
                            f"most {most} (give many libraries as a JSON body's 'library_ids')"), e


def test_body_over_limit_is_413(settings, new_key):
    import dataclasses

    from api import create_app

    small = create_app(dataclasses.replace(settings, max_request_bytes=1000)).test_client()
    key = new_key()
    lib_id = small.post("/v1/libraries", json={"name": "s"}, headers=auth(key)).get_json()["id"]
    data = {"files": [(io.BytesIO(b"x" * 5000), "big.wav")]}
    e = err(small.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), data=data,
                       content_type="multipart/form-data"), 413)
    assert "1000" in e["message"]
    # a chunked body (no Content-Length; gunicorn marks it terminated) is cut off at the limit too
    e = err(small.post(f"/v1/libraries/{lib_id}/batches", headers={**auth(key), "Transfer-Encoding": "chunked"},
                       environ_overrides={"wsgi.input_terminated": True},
                       input_stream=io.BytesIO(b"--b\r\n" + b"x" * 5000),
                       content_type="multipart/form-data; boundary=b"), 413)
    assert "1000" in e["message"]


def test_an_upload_answered_unread_leaves_its_connection_usable(start_api, new_key):
    """Against gunicorn (`clapq api`): uploads answered before their bodies are read (a 404 for an unknown
    library; a 401 for a wrong key), then, half a second later, a request on the same connection. Gunicorn
    alone said "keep-alive" and closed the connection once it found more than 64 KiB unread, and that second
    request was cut off unanswered; the rest of such a body is now read first."""
    import http.client
    from urllib.parse import urlsplit

    base = urlsplit(start_api())
    key = new_key()
    body = b"--b\r\n" + os.urandom(1024 * 1024)
    conn = http.client.HTTPConnection(base.hostname, base.port, timeout=30)
    try:
        for headers in (auth(key), {"Authorization": "Bearer cq_nope"}):
            conn.request("POST", f"/v1/libraries/{uuid.uuid4()}/batches", body=body,
                         headers={**headers, "Content-Type": "multipart/form-data; boundary=b"})
            r = conn.getresponse()
            assert (r.status, r.getheader("Connection")) in ((404, "keep-alive"), (401, "keep-alive")), r.status
            r.read()
            time.sleep(0.5)
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    finally:
        conn.close()


def test_a_client_that_stops_sending_or_reading_does_not_hold_the_api(start_api, new_key):
    """Against gunicorn with one process of one thread, so that one held thread is the whole API: a request
    whose body stops arriving, with no key (its 401 read the rest of the body, at the client's pace), or with
    one (an upload's 408, in the envelope), and a client that pipelines requests and reads none of the answers,
    each left open while /healthz is asked. Each held its thread for as long as it kept its connection open: 8
    such connections, with no key, stopped an API of 2 x 4 threads for good; now a client that sends or reads
    nothing for CLAPQ_CLIENT_TIMEOUT_S is cut off."""
    import socket
    from urllib.parse import urlsplit

    url = start_api(CLAPQ_API_WORKERS="1", CLAPQ_API_THREADS="1", CLAPQ_CLIENT_TIMEOUT_S="1")
    base, key = urlsplit(url), new_key()
    lib = requests.post(f"{url}/v1/libraries", json={"name": "slow"}, headers=auth(key), timeout=30).json()["id"]
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.wav"\r\n\r\nRIFF' + b"x" * 1000

    def held(head: str, sent: bytes = b"") -> socket.socket:
        sock = socket.create_connection((base.hostname, base.port), timeout=60)
        sock.sendall(head.encode() + sent)
        return sock

    def healthz() -> None:  # answered while the other connection stays open (it waited for ever)
        assert requests.get(f"{url}/healthz", timeout=60).json() == {"status": "ok"}

    with held("POST /v1/libraries HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              "Content-Length: 1000000\r\n\r\n", b'{"name": "x", '):
        healthz()
    with held(f"POST /v1/libraries/{lib}/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
              "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n", part) as upload:
        answer = b""
        while chunk := upload.recv(65536):  # the answer, then the connection closed
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        e = json.loads(body)["error"]
        assert e["code"] == "request_timeout" and "CLAPQ_CLIENT_TIMEOUT_S" in e["message"], e
        healthz()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.settimeout(60)
    sock.connect((base.hostname, base.port))
    with sock:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        healthz()
    assert requests.get(f"{url}/v1/libraries/{lib}", headers=auth(key), timeout=30).json()["counts"]["queued"] == 0


def test_an_upload_of_many_files_does_not_run_out_of_open_files(start_api, new_key):
    """Each file of an upload is held open while the request is read. At a soft limit of open files below
    that (here 256, for 300 files; at the usual 1,024, an upload of 1,000 files beside any other request of
    its process, or two uploads at once), the upload was a 500 "Too many open files", and so was any request
    of another tenant that opened a file meanwhile. `clapq api` raises its soft limit to what uploads on all
    its threads take, within the hard limit (where that is lower it warns: not tested here)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * (1000 + 16) + 256:
        pytest.skip(f"the hard limit of open files here ({hard}) is below what `clapq api` raises the soft one to")
    url = start_api(open_files=256)
    key = new_key()
    lib = requests.post(f"{url}/v1/libraries", json={"name": "many"}, headers=auth(key), timeout=30).json()["id"]
    files = [("files", (f"{i}.wav", b"RIFF" + os.urandom(64))) for i in range(300)]
    r = requests.post(f"{url}/v1/libraries/{lib}/batches", files=files, headers=auth(key), timeout=120)
    assert r.status_code == 202, r.text[:300]
    assert len(r.json()["items"]) == 300


def test_a_broken_chunked_body_is_a_400_in_json(start_api, new_key):
    """Against gunicorn: a chunked body whose framing is broken (a chunk size that is not hex) was a 500, from
    gunicorn's parse error raised as the request read its body; it is the client's 400, in the envelope, for
    JSON and for an upload broken part way through its file."""
    import socket
    from urllib.parse import urlsplit

    url = start_api()
    base, key = urlsplit(url), new_key()
    lib = requests.post(f"{url}/v1/libraries", json={"name": "chunks"}, headers=auth(key), timeout=30).json()["id"]
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.wav"\r\n\r\nRIFF' + b"x" * 100_000
    for path, ctype, first in (("/v1/libraries", "application/json", b'{"nam'),
                               (f"/v1/libraries/{lib}/batches", "multipart/form-data; boundary=b", part)):
        with socket.create_connection((base.hostname, base.port), timeout=30) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: {ctype}"
                         "\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n" % len(first) + first
                         + b"\r\nzz\r\nxx\r\n0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer[:500]
        assert json.loads(body)["error"]["message"].startswith("the request body is malformed: InvalidChunkSize"), body
    listed = requests.get(f"{url}/v1/libraries/{lib}", headers=auth(key), timeout=30).json()
    assert listed["item_count"] == 0, listed


@pytest.mark.parametrize("threads", ["4", "1"])  # gunicorn's gthread worker, and its sync one
def test_requests_gunicorn_refuses_itself_are_answered_in_the_envelope(start_api, threads):
    """Against gunicorn: a request it cannot parse, or over its limits, never reaches the app, and was answered with
    an HTML page (`<title>Bad Request</title>`). Each is the envelope now, at the status gunicorn picks, with a
    sentence that says what to change, and the connection closed."""
    import socket
    from urllib.parse import urlsplit

    base = urlsplit(start_api(CLAPQ_API_WORKERS="1", CLAPQ_API_THREADS=threads))

    def answer(raw: bytes) -> tuple[int, dict, dict]:
        with socket.create_connection((base.hostname, base.port), timeout=30) as sock:
            sock.sendall(raw)
            got = b""
            while chunk := sock.recv(65536):  # to the end: the connection is closed after it
                got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert headers.get("content-type") == "application/json", got[:300]
        assert headers.get("x-content-type-options") == "nosniff", got[:300]  # it shows the client's bytes
        assert int(headers["content-length"]) == len(body) and headers["connection"] == "close", got[:300]
        return int(lines[0].split()[1]), json.loads(body), headers

    cases = [
        # a header over 8,190 bytes, and more than 100 headers
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431,
         "request_header_fields_too_large", "more than 100 header fields, or one over 8190 bytes, and was not read"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n", 431,
         "request_header_fields_too_large", "more than 100 header fields, or one over 8190 bytes, and was not read"),
        # a GET search's line over 8,190 bytes
        (b"GET /v1/search?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long",
         "the request line (method, path and query string) is longer than 8190 bytes, and was not read; send long "
         "parameters in a POST's JSON body (POST /v1/search takes a search's)"),
        (b"POST /v1/libraries HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n", 400, "bad_request",
         "the request is not valid HTTP, and was not read: Invalid HTTP Header: 'CONTENT-LENGTH'"),
        (b"POST /v1/libraries HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400,
         "bad_request", "the request is not valid HTTP, and was not read: Invalid HTTP Header: 'CONTENT-LENGTH'"),
        (b"HELLO THERE\r\n\r\n", 400, "bad_request", "the request is not valid HTTP, and was not read: "),
    ]
    for raw, status, code, words in cases:
        got, body, _ = answer(raw)
        assert (got, body["error"]["code"], body["error"]["status"]) == (status, code, status), (raw[:60], body)
        assert set(body) == {"error"} and words in body["error"]["message"], (raw[:60], body)
    # the client's bytes shown back are cut short: not 9,000 of them
    assert len(answer(b"GET /" + b"a" * 8000 + b" HTTP/9.9\r\n\r\n")[1]["error"]["message"]) < 400


def test_metrics_count_the_requests_of_every_api_process(start_api, tmp_path):
    """`clapq api` runs several gunicorn processes; each scrape of /metrics was answered by one of them, with
    its own requests only, so a counter went down from one scrape to the next (1068, 830, 1069). Every
    scrape now counts them all: never fewer than the requests sent before it, and never fewer than the
    scrape before."""
    import glob
    import re
    import signal
    import time

    import psutil

    # a temporary directory of its own: another `clapq api` started meanwhile on this machine (a benchmark,
    # a second test run) makes its folder beside it
    own = tmp_path / "tmp"
    own.mkdir()
    base = start_api(TMPDIR=str(own))
    (shared,) = glob.glob(os.path.join(own, "clapq-api-metrics-*"))  # the one `clapq api` made
    for _ in range(40):  # a connection each: gunicorn's processes take them in turn as they accept
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
    seen = []
    for _ in range(6):
        r = requests.get(f"{base}/metrics", timeout=10)
        assert r.headers["Content-Type"].count("charset") == 1, r.headers["Content-Type"]
        seen.append(sum(float(n) for n in re.findall(
            r'^clapq_http_request_duration_seconds_count\{[^}]*endpoint="/healthz"[^}]*\} (\S+)$', r.text, re.M)))
    assert all(n >= 40 for n in seen) and seen == sorted(seen), seen
    # a worker process that ends (a timeout, a reload) is replaced, and the folder the counts live in stays:
    # it was removed as that worker left, and its replacement failed to boot, which stopped the API
    master = next(p for p in psutil.process_iter(["cmdline", "environ"])
                  if "clapq.cli" in (p.info["cmdline"] or []) and (p.info["environ"] or {}).get("CLAPQ_PORT")
                  == base.rsplit(":", 1)[1])
    gone = master.children()[0]
    gone.send_signal(signal.SIGTERM)
    gone.wait(30)
    deadline = time.monotonic() + 30
    while len(master.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.path.isdir(shared) and master.is_running() and len(master.children()) == 2
    assert requests.get(f"{base}/healthz", timeout=10).status_code == 200


def test_json_sent_as_curl_d_sends_it_is_read_as_json(client, new_key, settings):
    """`curl -d '{"name": "x"}'` sends JSON labelled as a form: it was answered "send a JSON object like
    {...}", the object it had sent. JSON is read whatever the Content-Type (creating a library, and
    search, whose URL-encoded forms are still forms); a JSON body over 16 MiB is a 413 before it is read into
    memory, which the 2 GiB request limit for uploads allowed."""
    key = new_key()
    form = "application/x-www-form-urlencoded"
    made = client.post("/v1/libraries", data='{"name": "curl"}', content_type=form, headers=auth(key))
    assert made.status_code == 201, made.get_json()
    lib_id = made.get_json()["id"]
    r = client.post("/v1/search", data=json.dumps({"library_id": lib_id, "q": "rain"}), content_type=form,
                    headers=auth(key))
    assert r.status_code == 200 and r.get_json()["results"] == [], r.get_json()
    r = client.post("/v1/search", data=f"library_id={lib_id}&q=rain", content_type=form, headers=auth(key))
    assert r.status_code == 200, r.get_json()
    # JSON that does not parse is said so, with where (a trailing comma was told "send a JSON object like
    # {...}"); so is a JSON array sent as curl -d sends it (it was read as a form field named '[1]'), and a
    # search's 'mode' of 0 or false (read as left out) (helper-39)
    for path, body in (("/v1/libraries", '{"name": "x",}'), ("/v1/search", '{"library_id": "%s", "q": "x",}' % lib_id),
                       ("/v1/libraries", '{"name": "x"'), ("/v1/search", "[1, 2")):
        e = err(client.post(path, data=body, content_type=form, headers=auth(key)), 400)
        assert e["message"].startswith("the JSON body does not parse: "), (path, body, e)
    # so is any other JSON value (a string was read as a form field named '"rain"', helper-51)
    for body in ("[1]", '"rain"', ' "rain', "42", "null"):
        assert err(client.post("/v1/search", data=body, content_type=form, headers=auth(key)), 400)["message"] \
            .startswith(("send a JSON object", "the JSON body does not parse: ")), body
    assert err(client.post("/v1/libraries", data="name=x", content_type=form, headers=auth(key)), 400)["message"] == \
        'send a JSON object like {"name": "my sounds"}'
    for mode in (0, False, "Items"):
        e = err(client.post("/v1/search", json={"library_id": lib_id, "q": "x", "mode": mode}, headers=auth(key)), 400)
        assert e["message"] == "'mode' must be 'items' or 'segments'", (mode, e)
    assert client.get("/v1/search", query_string={"library_id": lib_id, "q": "x", "mode": ""},
                      headers=auth(key)).status_code == 200
    # HEAD is a GET without its body (it was a 400)
    r = client.head("/v1/search", query_string={"library_id": lib_id, "q": "rain"}, headers=auth(key))
    assert r.status_code == 200 and r.data == b"", r.status_code
    huge = b'{"name": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    e = err(client.post("/v1/libraries", data=huge, content_type="application/json", headers=auth(key)), 413)
    assert e["message"].endswith("a JSON body or a form without files may be at most 16777216 bytes"), e

    # chunked, with no length to check first: read up to the limit and no further (it was read whole, up to
    # the 2 GiB request limit, into memory), for JSON and for search's URL-encoded form
    for path, head, mime in (("/v1/libraries", b'{"name": "', "application/json"),
                             ("/v1/search", f"library_id={lib_id}&q=".encode(), form)):
        body = io.BytesIO(head + b"x" * (64 * 1024 * 1024))
        e = err(client.post(path, headers={**auth(key), "Transfer-Encoding": "chunked"}, content_type=mime,
                            environ_overrides={"wsgi.input_terminated": True}, input_stream=body), 413)
        assert e["message"] == "the body is over the limit: a JSON body or a form without files may be at most " \
            "16777216 bytes", e
        assert body.tell() <= 17 * 1024 * 1024, (path, body.tell())  # how far it was read


def test_a_compressed_body_is_a_415_not_read_as_if_plain(client, new_key):
    """A body sent with `Content-Encoding: gzip` (some HTTP clients and proxies compress what they send) was read
    as it came: a gzipped search was told "send a JSON object like ...", which it had sent, a gzipped upload "the
    form could not be read", and plain JSON labelled gzip was taken as plain. Each is a 415 that says so, with
    Accept-Encoding: identity (RFC 9110); `identity`, or no body, is as before."""
    import gzip

    key = new_key()
    lib_id = client.post("/v1/libraries", json={"name": "gz"}, headers=auth(key)).get_json()["id"]
    search = json.dumps({"library_id": lib_id, "q": "rain"}).encode()
    for path, body, coding in (("/v1/search", gzip.compress(search), "gzip"), ("/v1/search", search, "gzip"),
                               ("/v1/libraries", json.dumps({"name": "other"}).encode(), "br"),
                               ("/v1/libraries", gzip.compress(b'{"name": "other"}'), "identity, gzip")):
        r = client.post(path, data=body, content_type="application/json",
                        headers={**auth(key), "Content-Encoding": coding})
        e = err(r, 415)
        assert e["code"] == "unsupported_media_type" and f"Content-Encoding: {coding};" in e["message"], (path, e)
        assert r.headers["Accept-Encoding"] == "identity", r.headers
    upload = client.post(f"/v1/libraries/{lib_id}/batches", headers={**auth(key), "Content-Encoding": "gzip"},
                         content_type="multipart/form-data", data={"files": [(io.BytesIO(b"x" * 100), "a.wav")]})
    assert err(upload, 415)["code"] == "unsupported_media_type"
    assert client.get(f"/v1/libraries/{lib_id}/items", headers=auth(key)).get_json()["items"] == []  # nothing stored
    r = client.post("/v1/search", data=search, content_type="application/json",
                    headers={**auth(key), "Content-Encoding": "identity"})
    assert r.status_code == 200 and r.get_json()["results"] == [], r.get_json()
    e = err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "rain"}, data=gzip.compress(b"x"),
                       headers={**auth(key), "Content-Encoding": "gzip"}), 400)  # a body never read: refused as one
    assert e["message"].startswith("GET /v1/search reads no body"), e


def test_health_metrics_and_openapi(client, worker, app):
    from clapq.presence import BEAT_KEY, beat_done
    from clapq.queue import redis_client

    celery = app.extensions["clapq_celery"]
    assert client.get("/healthz").get_json() == {"status": "ok"}
    # the maintenance loop is said when it made no pass lately (a dead beat was seen nowhere, helper-41), and
    # the API stays ready: it serves without one
    redis_client(celery).delete(BEAT_KEY)
    # the worker's model process says it serves the API's model once it has loaded it
    deadline = time.monotonic() + 60
    while client.get("/readyz").get_json()["checks"]["embedding"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.2)
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"] == {"postgres": "ok", "redis": "ok", "workers": "ok", "model": "ok",
                                          "maintenance": "warning: the maintenance loop made no pass lately "
                                                         "(start `clapq beat`)", "embedding": "ok", "code": "ok"}
    # where no worker serves it (workers of another CLAPQ_MODEL, here none at all on another Redis database),
    # uploads would wait queued: said, a warning
    from api import create_app

    elsewhere = create_app(dataclasses.replace(app.config["CLAPQ"], redis_url=app.config["CLAPQ"].redis_url
                                               .rsplit("/", 1)[0] + "/7")).test_client()
    # and no live worker at all is a warning too: the API searches and takes uploads without one (it was a
    # 503, while a hung model process left the API ready, helper-54)
    answer = elsewhere.get("/readyz")
    checks = answer.get_json()["checks"]
    assert answer.status_code == 200 and checks["workers"].startswith("warning: no live worker") and checks[
        "embedding"].startswith("warning: no process holding this service's model (model "), checks
    assert "clapq_maintenance_live 0.0" in client.get("/metrics").get_data(as_text=True)
    beat_done(celery, 1)
    assert client.get("/readyz").get_json()["checks"]["maintenance"] == "ok"
    m = client.get("/metrics")
    assert m.status_code == 200 and m.mimetype == "text/plain"
    body = m.get_data(as_text=True)
    for name in ("clapq_items{state=\"done\"}", "clapq_redis_up 1.0", "clapq_queue_depth", "clapq_workers_live 1.0",
                 "clapq_maintenance_live 1.0", "clapq_database_up 1.0",
                 "clapq_embed_batch_seconds_bucket", "clapq_windows_total", "clapq_http_request_duration_seconds"):
        assert name in body, name
    import shutil

    free = float(body.split("\nclapq_blob_free_bytes ")[1].split()[0])
    size = float(body.split("\nclapq_blob_size_bytes ")[1].split()[0])
    assert free == pytest.approx(shutil.disk_usage(client.application.config["CLAPQ"].blob_dir).free, rel=0.05)
    assert 0 < free <= size
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.") and "/v1/search" in spec["paths"]


def test_readyz_workers_are_workers_of_the_apis_model(app, settings, env, tiny_model, tmp_path):
    """/readyz's workers check said ok while the only live worker served another model than the API's (another
    CLAPQ_MODEL), whose uploads all waited queued. It is ok once a live worker serves the API's model, and says
    which model the live workers serve where none does. Real workers, on a Redis database of their own."""
    from api import create_app
    from api.models_info import registered_model_id
    from clapq.checkpoint import resolve
    from clapq.presence import served_models
    from clapq.queue import redis_client
    from tests.conftest import WorkerProcess
    from tests.test_engine import another_model

    own = {**env, "REDIS_URL": env["REDIS_URL"].rsplit("/", 1)[0] + "/10"}
    api = create_app(dataclasses.replace(settings, redis_url=own["REDIS_URL"]))
    client, redis = api.test_client(), redis_client(api.extensions["clapq_celery"])
    ckpt = resolve(settings.model)
    model = registered_model_id(ckpt.name, ckpt.weights_sha256, settings.database_url)

    def served_once(n: int) -> dict:
        deadline = time.monotonic() + 90
        while len(got := served_models(redis)) < n:
            assert time.monotonic() < deadline, got
            time.sleep(0.2)
        return got

    other = WorkerProcess({**own, "CLAPQ_MODEL": str(another_model(tiny_model, tmp_path))},
                          tmp_path / "other.log").start()
    mine = None
    try:
        (others,) = served_once(1)
        assert others != model
        checks = client.get("/readyz").get_json()["checks"]
        assert checks["workers"] == (f"warning: the only live worker does not serve this service's model (model "
                                     f"{model}): it serves model {others} (other-model) (a CLAPQ_MODEL not the "
                                     f"API's); uploads wait queued until a worker of model {model} runs"), checks
        assert checks["embedding"].startswith("warning: no process holding this service's model"), checks
        mine = WorkerProcess(own, tmp_path / "mine.log").start()
        assert set(served_once(2)) == {model, others}
        checks = client.get("/readyz").get_json()["checks"]
        assert checks["workers"] == checks["embedding"] == "ok", checks
        mine.stop()
        checks = client.get("/readyz").get_json()["checks"]
        assert checks["workers"].startswith("warning: the only live worker does not serve"), checks
    finally:
        for w in (other, mine):
            if w is not None:
                w.stop()


def test_readyz_hides_paths_with_spaces_whole(env, tmp_path, caplog):
    """/readyz takes no key, so it says why the model cannot be loaded without the server's paths ("<path>"); a
    path with a space was hidden only up to it: a model in the data directory /tmp/.../my data/clap model was said
    as "<path> data/clap model". The paths the server is configured with are hidden whole; the log names them."""
    import logging

    from api import create_app
    from clapq.settings import Settings

    data = tmp_path / "my data"
    model = data / "models" / "clap model"
    client = create_app(Settings.from_env({**env, "CLAPQ_DATA_DIR": str(data), "CLAPQ_MODEL": str(model)})).test_client()
    with caplog.at_level(logging.WARNING, logger="api.health"):
        ready = client.get("/readyz")
    said = ready.get_json()["checks"]["model"]
    assert ready.status_code == 503 and "data" not in said and "model'" not in said and "clap model" not in said, said
    assert said.startswith("error: directory <path> does not exist. cannot load the CLAP model '<path>'. Point"), said
    assert said.endswith("(the API's log names the paths)"), said
    assert any(f"directory {model} does not exist" in r.getMessage() for r in caplog.records), caplog.records
    # a sentence's last stop is its own, not the path's; a path the server does not know is hidden up to a space
    from api.health import _known_paths, _unplaced

    known = _known_paths(Settings.from_env({**env, "CLAPQ_DATA_DIR": str(data), "CLAPQ_MODEL": str(model)}))
    assert _unplaced(f"no weights in {model}. Or in /elsewhere/x.", known) == (
        "no weights in <path>. Or in <path> (the API's log names the paths)")
    # a data directory given relative: its word alone is no path (it was hidden anywhere in a sentence: helper-105)
    relative = _known_paths(Settings.from_env({**env, "CLAPQ_DATA_DIR": "data", "CLAPQ_MODEL": str(model)}))
    assert _unplaced("the model's data is not there", relative) == "the model's data is not there"


def test_the_api_description_bounds_k_as_this_service_does(settings, client, new_key):
    """/openapi.json said k at most 1000 and offset at most 10,000 whatever CLAPQ_MAX_K was: under CLAPQ_MAX_K=50 a
    client checking its requests by the schema sent k=100, which the API refuses (and under a larger one refused a
    k the API takes). The bounds are this service's, for GET's parameters and POST's body alike."""
    from api import create_app

    small = create_app(dataclasses.replace(settings, max_k=50)).test_client()
    key = new_key()
    lib_id = small.post("/v1/libraries", json={"name": "k"}, headers=auth(key)).get_json()["id"]
    for spec, most in ((small.get("/openapi.json").get_json(), 50), (client.get("/openapi.json").get_json(), 1000)):
        search = spec["paths"]["/v1/search"]
        params = {p["name"]: p["schema"] for p in search["get"]["parameters"]}
        body = search["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert params["k"]["maximum"] == body["k"]["maximum"] == most, (params["k"], body["k"])
        assert params["offset"]["maximum"] == body["offset"]["maximum"] == 10 * most, params["offset"]
    assert err(small.get("/v1/search", query_string={"library_id": lib_id, "q": "x", "k": 51}, headers=auth(key)),
               400)["message"] == "'k' must be between 1 and 50"
    assert small.get("/v1/search", query_string={"library_id": lib_id, "q": "x", "k": 50, "offset": 500},
                     headers=auth(key)).status_code == 200


def test_the_readme_names_every_metric_family(client):
    """README's Observability named 5 of the 13 metric families /metrics gives (helper-90): one scraping it found
    clapq_items, clapq_workers_live, clapq_blob_size_bytes, clapq_items_failed_total and the histograms under no
    name it could look up. Each family the API exports is named there."""
    body = client.get("/metrics").get_data(as_text=True)
    # (a registry outside multiprocess mode gives each histogram's `_created` time as a family of its own)
    families = set(re.findall(r"^# HELP (clapq_\w+) ", body, re.MULTILINE)) - set(
        re.findall(r"^# HELP (clapq_\w+_created) ", body, re.MULTILINE))
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert {"clapq_items", "clapq_http_request_duration_seconds"} <= families, families
    assert not sorted(f for f in families if f"`{f}`" not in readme)


def test_made_up_methods_share_one_series_in_metrics(client):
    """/metrics takes no key: a request of a made-up method each made a latency series of its own, so anyone
    could grow the scrape and its files without end (helper-55). Other methods are labelled "other"."""
    for method in ("ZZZHELPERA", "ZZZHELPERB"):
        assert client.open("/healthz", method=method).status_code == 405
    body = client.get("/metrics").get_data(as_text=True)
    assert "ZZZHELPER" not in body
    counted = [line for line in body.splitlines() if line.startswith("clapq_http_request_duration_seconds_count{")
               and all(f'{k}="{v}"' in line for k, v in (("method", "other"), ("endpoint", "unmatched"),
                                                           ("status", "405")))]
    assert counted and float(counted[0].split()[-1]) >= 2, body[:2000]


@pytest.mark.parametrize("ttl", [3600.0, 0.0])
def test_items_by_state_are_counted_at_most_once_in_a_while(settings, monkeypatch, ttl):
    """/metrics takes no key, and its count of items by state reads every item (38 ms at 1M): scrapes
    sent one after another count once per COUNTS_TTL_S, so they cannot keep Postgres busy; with no such
    while, each scrape counts."""
    from sqlalchemy import event

    import api.metrics
    from api import create_app
    from clapq.db import get_engine

    monkeypatch.setattr(api.metrics, "COUNTS_TTL_S", ttl)
    client = create_app(settings).test_client()
    counts = []

    def seen(conn, cursor, statement, *args):
        if "GROUP BY items.status" in statement:
            counts.append(statement)

    engine = get_engine(settings.database_url)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for _ in range(3):
            r = client.get("/metrics")
            assert r.status_code == 200 and 'clapq_items{state="done"}' in r.get_data(as_text=True)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(counts) == (1 if ttl else 3), counts


def test_metrics_go_out_while_postgres_is_down(settings):
    """Postgres down (here: an address where nothing listens): /metrics still answers, with Redis's and the
    disk's figures and clapq_database_up 0; the whole scrape was a 503 for as long as the outage lasted,
    and those figures went with it (helper-41)."""
    import dataclasses

    from api import create_app

    down = dataclasses.replace(settings, database_url="postgresql://clapq@127.0.0.1:1/clapq")
    r = create_app(down).test_client().get("/metrics")
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and "clapq_database_up 0.0" in body and "clapq_redis_up 1.0" in body, body
    assert "clapq_queue_depth" in body and "clapq_blob_free_bytes" in body and "clapq_items{" not in body, body
    r = create_app(settings).test_client().get("/metrics")
    assert "clapq_database_up 1.0" in r.get_data(as_text=True)
    # a server that takes the connection and never answers: the count is waited for as /readyz's checks are
    # (it held each scrape for the connect timeout, 10 s, Prometheus's own, helper-44)
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        hung = dataclasses.replace(settings, database_url=f"postgresql://clapq@127.0.0.1:{silent.getsockname()[1]}/x")
        body = create_app(hung).test_client().get("/metrics").get_data(as_text=True)
        assert "clapq_database_up 0.0" in body and "clapq_redis_up 1.0" in body, body
    finally:
        silent.close()


def test_a_search_is_bounded_by_its_filter_and_its_time(client, lib, settings):
    """A metadata filter of 10,000 keys ran for minutes, and one of 100,000 'in' values held 17 GB of
    Postgres's memory, long after the client had gone (helper-52): a filter takes at most 32 keys and 256
    values, and a search's statements are stopped past CLAPQ_SEARCH_TIMEOUT_S, a 400 that says so (here a
    search held up by a lock on the items, past a limit of 1 s)."""
    from sqlalchemy import text as sql

    from api import create_app
    from clapq.db import get_engine

    key, lib_id = lib
    many = {f"k{i}": "v" for i in range(33)}
    e = err(client.post("/v1/search", json={"library_id": lib_id, "text": "r", "filter": {"metadata": many}},
                        headers=auth(key)), 400)
    assert e["message"] == "'filter.metadata' has 33 keys; a search takes at most 32", e
    wide = {"a": {"in": list(range(200))}, "b": {"in": list(range(56))}, "c": 1}
    e = err(client.post("/v1/search", json={"library_id": lib_id, "text": "r", "filter": {"metadata": wide}},
                        headers=auth(key)), 400)
    assert e["message"].startswith("'filter.metadata' has 257 values (each 'in' value counts); a search takes at "
                                   "most 256"), e
    # an object in 'in' matched by partial containment, where alone it is refused; an empty list matched
    # every list (helper-52)
    for value, said in (({"in": [1, {"x": 1}]}, "not an object"), ([], "an empty list would match every list"),
                        ({"in": ["a", []]}, "an empty list would match every list"), ([{}], "not an object"),
                        (["a", []], "an empty list would match every list"),
                        ({"in": []}, "'in' is an empty list, which no file matches"),
                        ({"in": "a"}, "'in' takes a list of values, not \"a\""),
                        ({"any": ["a"]}, "an object takes 'in' alone (a value is never an object), not 'any'")):
        e = err(client.post("/v1/search", json={"library_id": lib_id, "text": "r", "filter": {"metadata": {"t": value}}},
                            headers=auth(key)), 400)
        assert e["message"].startswith("metadata filter on 't': ") and said in e["message"], e
    most = {"a": {"in": list(range(255))}, "c": 1}
    r = client.post("/v1/search", json={"library_id": lib_id, "text": "r", "filter": {"metadata": most}},
                    headers=auth(key))
    assert r.status_code == 200, r.get_json()
    impatient = create_app(dataclasses.replace(settings, search_timeout_s=1, preload_text=False)).test_client()
    with get_engine(settings.database_url).connect() as conn:
        conn.execute(sql("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
        e = err(impatient.get("/v1/search", query_string={"library_id": lib_id, "q": "r"}, headers=auth(key)), 400)
        # so is a duplicates search (a vector search too; helper-53)
        assert err(impatient.get(f"/v1/items/{uuid.uuid4()}/duplicates", headers=auth(key)), 400)["code"] == "too_slow"
        conn.rollback()
    assert e["code"] == "too_slow" and e["message"].startswith("a statement of the search ran longer than 1 s "
                                                               "(CLAPQ_SEARCH_TIMEOUT_S) and was stopped"), e
    assert impatient.get("/v1/search", query_string={"library_id": lib_id, "q": "r"},
                         headers=auth(key)).status_code == 200


def test_what_json_cannot_carry_is_a_400_naming_where(client, lib, settings):
    """NaN and Infinity (Python's parser takes them, JSON has neither), a number too large for a float or
    too close to 0 for one (not read as 0), nesting past 32 levels and a metadata filter that is not an object: 400s, never 500s; a refused
    upload leaves no temporary file."""
    from clapq.blobs import BlobStore

    key, lib_id = lib
    h = {**auth(key), "Content-Type": "application/json"}
    for body, where in ((f'{{"library_id": "{lib_id}", "text": "rain", "k": NaN}}', "NaN"),
                        (f'{{"library_id": "{lib_id}", "text": "rain", "offset": -Infinity}}', "-Infinity"),
                        (f'{{"library_id": "{lib_id}", "text": "rain", "filter": {{"metadata": {{"a": 1e400}}}}}}',
                         "1e400"),
                        # read as 0, and searched (or stored, by a PATCH) so: a 200
                        (f'{{"library_id": "{lib_id}", "text": "rain", "filter": {{"metadata": {{"a": 1e-400}}}}}}',
                         "1e-400")):
        e = err(client.post("/v1/search", data=body, headers=h), 400)
        assert where in e["message"] and "JSON body" in e["message"], e
    # an integer of more digits than Python converts was told to call sys.set_int_max_str_digits(), and one in a
    # query string that it is no integer
    for body in (f'{{"library_id": "{lib_id}", "text": "rain", "k": {"9" * 5000}}}',
                 f'{{"library_id": "{lib_id}", "text": "rain", "filter": {{"metadata": {{"a": -{"1" * 4301}}}}}}}'):
        e = err(client.post("/v1/search", data=body, headers=h), 400)
        assert e["message"].startswith("the JSON body has an integer of ") and "sys." not in e["message"], e
    assert client.patch(f"/v1/items/{uuid.uuid4()}", json={"metadata": {"a": int("9" * 4300)}},
                        headers=auth(key)).status_code == 404  # as many as Python takes: read, then no such item
    for k in ("9" * 5000, "-" + "9" * 30, "0" * 40 + "5"):
        r = client.get("/v1/search", query_string={"library_id": lib_id, "q": "rain", "k": k}, headers=auth(key))
        assert (r.status_code, r.get_json().get("error", {}).get("message")) == (
            (200, None) if k.endswith("05") else (400, "'k' must be between 1 and 1000")), (k[:8], r.get_json())
    deep = '{"name": ' + "[" * 40 + "]" * 40 + "}"
    assert "nested" in err(client.post("/v1/libraries", data=deep, headers=h), 400)["message"]
    deeper = '{"name": ' + "[" * 5000 + "]" * 5000 + "}"  # past the parser's own recursion limit
    assert "nested" in err(client.post("/v1/libraries", data=deeper, headers=h), 400)["message"]
    for bad in ("x", [1], 5, False, "", 0):  # the last three read as no filter at all
        e = err(client.post("/v1/search", json={"library_id": lib_id, "text": "r", "filter": {"metadata": bad}},
                            headers=auth(key)), 400)
        assert "filter.metadata" in e["message"]
        e = err(client.post("/v1/search", json={"library_id": lib_id, "text": "r", "filter": {"duration_s": bad}},
                            headers=auth(key)), 400)
        assert "'duration_s' filter takes 'min' and/or 'max' seconds" in e["message"], e
    err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "r", "filter": '{"metadata": "x"}'},
                   headers=auth(key)), 400)
    tmp = BlobStore(settings.blob_dir).tmp_dir
    before = set(tmp.iterdir())
    e = err(client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                        data={"files": (io.BytesIO(b"RIFF"), "d.wav"), "metadata": '{"d.wav": {"x": NaN}}'}), 400)
    assert "'metadata'" in e["message"] and "NaN" in e["message"]
    assert set(tmp.iterdir()) == before


def test_get_search_takes_what_post_takes(client, lib):
    key, lib_id = lib
    for qs in ({"library_id": lib_id, "text": "rain"}, {"library_ids": lib_id, "q": "rain"}):
        r = client.get("/v1/search", query_string=qs, headers=auth(key))
        assert r.status_code == 200 and r.get_json()["results"] == [], r.get_json()
    e = err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "rain", "text": "dog"},
                       headers=auth(key)), 400)
    assert "once" in e["message"]
    err(client.post("/v1/search", json={"library_id": lib_id, "q": "rain", "text": "dog"}, headers=auth(key)), 400)
    # an empty one is left out in JSON too, as in a query string (JSON was told "give the query text once")
    for q, text in (("", "rain"), ("rain", ""), ("rain", None)):
        r = client.post("/v1/search", json={"library_id": lib_id, "q": q, "text": text}, headers=auth(key))
        assert r.status_code == 200 and r.get_json()["results"] == [], (q, text, r.get_json())
        r = client.get("/v1/search", query_string={"library_id": lib_id, "q": q, "text": text or ""}, headers=auth(key))
        assert r.status_code == 200, (q, text, r.get_json())
    assert err(client.post("/v1/search", json={"library_id": lib_id, "q": "", "text": ""}, headers=auth(key)),
               400)["message"].startswith("give exactly one of")
    err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "x", "k": "1_0"}, headers=auth(key)), 400)
    err(client.post("/v1/search", json={"library_id": lib_id, "text": "x", "min_score": True}, headers=auth(key)), 400)
    # a misspelt field would be ignored, and the results quietly unfiltered or of another size: refused
    e = err(client.post("/v1/search", json={"library_id": lib_id, "text": "x", "filters": {"metadata": {"a": 1}}},
                        headers=auth(key)), 400)
    assert e["message"].startswith("the JSON body has 'filters', which search does not take; it takes library_id"), e
    e = err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "x", "limit": 2}, headers=auth(key)), 400)
    assert "the query string has 'limit'" in e["message"], e
    e = err(client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                        data={"library_id": lib_id, "text": "x", "kk": "2"}), 400)
    assert "the form has 'kk'" in e["message"], e
    e = err(client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                        data={"library_id": lib_id, "clip": (io.BytesIO(b"RIFF"), "a.wav")}), 400)
    assert "'clip'; the clip goes in 'audio'" in e["message"], e
    e = err(client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                        data={"library_id": lib_id, "audio": "clip.wav"}), 400)
    assert e["message"] == "'audio' came as a text field, not a file: give it a filename (with curl: " \
                           "-F audio=@clip.wav)", e
    # in JSON (base64) or a query string it was told it "came as a text field", as if a form had been sent
    for r, where in ((client.post("/v1/search", json={"library_id": lib_id, "audio": "UklGRg=="}, headers=auth(key)),
                      "the JSON body"),
                     (client.get("/v1/search", query_string={"library_id": lib_id, "audio": "a.wav"}, headers=auth(key)),
                      "the query string")):
        assert err(r, 400)["message"] == f"{where} has 'audio': a clip goes as a file of a multipart form, POST " \
            "/v1/search (with curl: -F audio=@clip.wav)"
    e = err(client.post(f"/v1/search?library_id={lib_id}", json={"text": "x"}, headers=auth(key)), 400)
    assert "not in the query string" in e["message"], e
    r = client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                    data={"library_id": lib_id, "q": "rain", "k": "3", "mode": "segments"})
    assert r.status_code == 200, r.get_json()


def test_a_query_parameter_an_endpoint_does_not_take_is_refused(client, lib):
    """A parameter a view does not read was ignored, and the answer quietly other than asked for:
    `GET /v1/jobs?status=failed` listed every job, `classify?top=1` gave three labels. Refused, naming what
    the endpoint takes, before anything is done (a DELETE with one deletes nothing)."""
    key, lib_id = lib
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": (io.BytesIO(b"RIFF kept"), "a.wav")})
    item = r.get_json()["items"][0]["id"]
    for method, url, says in (
            ("get", "/v1/jobs?status=failed", "the query string has 'status', which GET /v1/jobs does not take; "
                                              "it takes cursor, limit"),
            ("post", f"/v1/libraries/{lib_id}/classify?top=1", "it takes cursor, limit"),
            ("get", f"/v1/items/{item}/segments?vector=1", "it takes vectors"),
            ("delete", f"/v1/items/{item}?force=1", "which DELETE /v1/items/<item_id> does not take; it takes none")):
        e = err(getattr(client, method)(url, headers=auth(key), json={"labels": ["a"]} if method == "post" else None),
                400)
        assert e["message"].startswith("the query string has ") and says in e["message"], e
    assert client.get(f"/v1/items/{item}", headers=auth(key)).status_code == 200  # not deleted
    for url in (f"/v1/libraries/{lib_id}/items?status=queued&limit=5", "/v1/jobs?limit=2",
                f"/v1/items/{item}/segments?vectors=1"):
        assert client.get(url, headers=auth(key)).status_code in (200, 409), url


def test_a_body_an_operation_does_not_read_is_refused(client, lib):
    """POST /v1/items/<id>/audio-link takes its `expires_in_s` in the query string and read no body: sent as every
    other POST's parameters are, `-d '{"expires_in_s": 5}'`, it was ignored, and the link lasted an hour. Refused
    (and a job's cancel and retry, which read none either, as `{"item_ids": [...]}` cancelled the whole job),
    saying where it goes; a POST with no body, or an empty one, is answered as before."""
    key, lib_id = lib
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": (io.BytesIO(b"RIFF kept"), "a.wav")})
    item, job = r.get_json()["items"][0]["id"], r.get_json()["job_id"]
    link = f"/v1/items/{item}/audio-link"
    for body in ({"json": {"expires_in_s": 5}}, {"data": "expires_in_s=5"}, {"data": "{}"}):
        e = err(client.post(link, headers=auth(key), **body), 400)
        assert e["message"] == ("POST /v1/items/<item_id>/audio-link reads no body, so what it held would be "
                                "ignored: give expires_in_s in the query string (?expires_in_s=60)"), e
    for action in ("cancel", "retry"):
        e = err(client.post(f"/v1/jobs/{job}/{action}", headers=auth(key), json={"item_ids": [item]}), 400)
        assert e["message"] == (f"POST /v1/jobs/<job_id>/{action} reads no body, so what it held would be "
                                "ignored: send it with none"), e
    for body in ({}, {"data": b""}):
        r = client.post(f"{link}?expires_in_s=5", headers=auth(key), **body)
        assert r.status_code == 200, r.get_json()
        expires = dt.datetime.fromisoformat(r.get_json()["expires_at"])
        assert (expires - dt.datetime.now(dt.timezone.utc)).total_seconds() < 10, expires


def test_a_body_sent_with_a_get_or_a_delete_is_refused(client, lib):
    """A GET's or a DELETE's body was never read, so what it held was ignored, unsaid: `DELETE
    /v1/libraries/<id>` with `{"item_ids": [...]}`, a bulk deletion as other APIs take one, deleted the whole
    library, and `requests.get(url, json={...})` searched with the defaults. Each is a 400 that says where it
    goes (nothing deleted); with no body, or an empty one, each is answered as before."""
    key, lib_id = lib
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": [(io.BytesIO(b"RIFF one"), "a.wav"), (io.BytesIO(b"RIFF two"), "b.wav")]})
    item, other = (i["id"] for i in r.get_json()["items"])
    e = err(client.delete(f"/v1/libraries/{lib_id}", headers=auth(key), json={"item_ids": [item]}), 400)
    assert e["message"] == ("DELETE /v1/libraries/<lib_id> reads no body, so what it held would be ignored: it "
                            "deletes the whole library, every file in it; to delete some of its files, POST their "
                            'ids to /v1/libraries/<id>/deletions ({"item_ids": [...]})'), e
    e = err(client.delete(f"/v1/items/{item}", headers=auth(key), data="force"), 400)
    assert e["message"] == "DELETE /v1/items/<item_id> reads no body, so what it held would be ignored: send it " \
                           "with none", e
    assert client.get(f"/v1/libraries/{lib_id}", headers=auth(key)).get_json()["item_count"] == 2  # none deleted
    e = err(client.get("/v1/search", headers=auth(key), json={"library_id": lib_id, "text": "rain", "k": 1}), 400)
    assert e["message"] == ("GET /v1/search reads no body, so what it held would be ignored: give its fields in "
                            "the query string, or POST the JSON body to /v1/search"), e
    e = err(client.get("/v1/jobs", headers=auth(key), json={"limit": 1}), 400)
    assert e["message"] == ("GET /v1/jobs reads no body, so what it held would be ignored: give its parameters in "
                            "the query string"), e
    assert client.get("/v1/jobs", headers=auth(key), data=b"").status_code == 200
    chunked = {"headers": {**auth(key), "Transfer-Encoding": "chunked"},
               "environ_overrides": {"wsgi.input_terminated": True}}
    e = err(client.delete(f"/v1/items/{item}", input_stream=io.BytesIO(b"{}"), **chunked), 400)
    assert e["message"].startswith("DELETE /v1/items/<item_id> reads no body"), e
    assert client.delete(f"/v1/items/{item}", input_stream=io.BytesIO(b""), **chunked).status_code == 200
    assert client.delete(f"/v1/libraries/{lib_id}", headers=auth(key)).get_json()["deleted"]["items"] == 1
    assert client.get(f"/v1/items/{other}", headers=auth(key)).status_code == 404


def test_library_names_must_show_something(client, new_key):
    key = new_key()
    for name in ("tab\there", "line\nbreak", "\u200b", " \u200b "):
        err(client.post("/v1/libraries", json={"name": name}, headers=auth(key)), 400)
    for name in ("line\u2028separator", "para\u2029graph"):  # Unicode's line breaks (were 201)
        e = err(client.post("/v1/libraries", json={"name": name}, headers=auth(key)), 400)
        assert "line breaks" in e["message"], e
    # letters and symbols that show nothing: a Hangul filler, braille blanks, a variation selector (were 201: a
    # library that looked nameless)
    for name in ("\u3164", "\u115f\u1160", "\u2800\u2800", "\ufe0f"):
        e = err(client.post("/v1/libraries", json={"name": name}, headers=auth(key)), 400)
        assert e["message"] == "'name' must be a string of at most 200 characters with something visible in it", e
    # names that look like another's: a zero-width space beside "x", a direction override, a byte-order mark
    for name in ("x\u200b", "\u202e evil", "\ufeffbom"):
        e = err(client.post("/v1/libraries", json={"name": name}, headers=auth(key)), 400)
        assert "invisible formatting characters" in e["message"], e
    for name in ("family \U0001F468\u200d\U0001F467", "\U0001F3F4\U000E0067\U000E0062\U000E0077\U000E006C\U000E0073\U000E007F walks"):
        # an emoji sequence's joiner, a subdivision flag's tag characters (Wales): part of what shows
        assert client.post("/v1/libraries", json={"name": name}, headers=auth(key)).status_code == 201, name
    for name in (str(uuid.uuid4()), str(uuid.uuid4()).upper(), uuid.uuid4().hex):  # `--library ID` would mean two
        assert "must not be a library id" in err(client.post("/v1/libraries", json={"name": name}, headers=auth(key)),
                                                  400)["message"]
    e = err(client.post("/v1/libraries", json={"name": "sfx", "model": "other"}, headers=auth(key)), 400)
    assert e["message"] == ("the body has 'model', which a library does not take; it takes 'name' "
                            '({"name": "my sounds"})'), e
    assert client.post("/v1/libraries", json={"name": " Field — 雨 "}, headers=auth(key)).get_json()["name"] == \
        "Field — 雨"


def test_limits_and_which_413(client, lib, settings):
    """GET /v1/limits says what the service takes; a 413 for too many form parts says so, not that the
    body is too large; a range past the file's end is a 416 with its own code."""
    key, lib_id = lib
    assert client.get("/v1/limits", headers=auth(key)).get_json() == {
        "max_file_bytes": settings.max_file_bytes, "max_files_per_batch": settings.max_files_per_batch,
        "max_request_bytes": settings.max_request_bytes, "max_duration_s": settings.max_duration_s, "max_clip_s": 600,
        "max_query_chars": settings.max_query_chars, "max_filter_keys": 32, "max_filter_values": 256,
        "search_timeout_s": 60, "max_k": settings.max_k, "rate_limit": "1200 requests per minute",
        "rate_limits": [{"requests": 1200, "seconds": 60, "said": "1200 requests per minute"}],
        "max_deletions": 1000, "client_timeout_s": settings.client_timeout_s or None,
        "model": client.get(f"/v1/libraries/{lib_id}", headers=auth(key)).get_json()["model"]}
    fields = {f"f{i}": "x" for i in range(settings.max_files_per_batch + 20)}
    e = err(client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                        data={"files": (io.BytesIO(b"RIFF"), "a.wav"), **fields}), 413)
    assert "parts" in e["message"] and "larger than the limit" not in e["message"], e
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": (io.BytesIO(b"RIFF 16 bytes..."), "a.wav")})
    item = r.get_json()["items"][0]["id"]
    r = client.get(f"/v1/items/{item}/audio", headers={**auth(key), "Range": "bytes=100-200"})
    e = err(r, 416)
    assert e["code"] == "requested_range_not_satisfiable" and r.headers["Content-Range"] == "bytes */16", r.headers
    # said in words a person can act on (was werkzeug's "The server cannot provide the requested range.")
    assert e["message"] == "the range asked for (bytes=100-200) begins past the end of the file, which has 16 bytes " \
        "(bytes 0-15); ask for a range within them, or send no Range for the whole file", e
    r = client.get(f"/v1/items/{item}/audio", headers={**auth(key), "Range": "bytes=2-5"})
    assert r.status_code == 206 and r.data == b"FF 1" and r.headers["Content-Range"] == "bytes 2-5/16"
    # a unit that is not bytes, a header that does not parse, several ranges: ignored, the whole file
    for rng in ("items=0-3", "bytes=x-y", "bytes=0-1,4-5"):
        r = client.get(f"/v1/items/{item}/audio", headers={**auth(key), "Range": rng})
        assert r.status_code == 200 and r.data == b"RIFF 16 bytes..." and "Content-Range" not in r.headers, rng
    # the last N bytes of a shorter file: all of it (was a 416)
    r = client.get(f"/v1/items/{item}/audio", headers={**auth(key), "Range": "bytes=-99999999999"})
    assert r.status_code == 206 and r.data == b"RIFF 16 bytes..." and r.headers["Content-Range"] == "bytes 0-15/16"
    # preconditions: a failed one is a 412 in the envelope (If-Match's carried the whole file), and
    # If-Unmodified-Since is honoured (it was ignored)
    etag = client.get(f"/v1/items/{item}/audio", headers=auth(key)).headers["ETag"]
    for headers, status in (({"If-Match": '"other"'}, 412), ({"If-Match": f'"other", {etag}'}, 200),
                            ({"If-Match": "*"}, 200), ({"If-Match": f"W/{etag}"}, 412),
                            ({"If-Unmodified-Since": "Mon, 01 Jan 1990 00:00:00 GMT"}, 412),
                            ({"If-Unmodified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}, 200),
                            ({"If-Unmodified-Since": "not a date"}, 200),
                            ({"If-Match": etag, "If-Unmodified-Since": "Mon, 01 Jan 1990 00:00:00 GMT"}, 200)):
        r = client.get(f"/v1/items/{item}/audio", headers={**auth(key), **headers})
        if status == 412:
            assert err(r, 412)["code"] == "precondition_failed" and r.content_type == "application/json", headers
        else:
            assert r.status_code == 200 and r.data == b"RIFF 16 bytes...", headers
    # a method the path does not take: 405 with the methods it does (Allow), in the same envelope
    r = client.put("/v1/libraries", headers=auth(key))
    assert err(r, 405)["code"] == "method_not_allowed" and {"GET", "POST"} <= set(r.headers["Allow"].split(", "))
    # and says so in its sentence, which is what `clapq` and most clients show (werkzeug's "The method is not
    # allowed for the requested URL." named neither, helper-90)
    assert err(r, 405)["message"] == "'/v1/libraries' does not take PUT; it takes GET, POST"
    assert err(client.delete("/v1/libraries/x/items", headers=auth(key)), 405)["message"].endswith("it takes GET")


def test_a_library_of_another_model_is_refused_not_mixed(client, new_key, worker, settings, tmp_path):
    """A library whose vectors came from another model than the service runs (CLAPQ_MODEL changed):
    uploading into it, retrying its jobs, searching it and classifying it or its items are 409s; before,
    classify scored the new model's label vectors against the old model's audio vectors."""
    from tests.audio import write
    from tests.conftest import retire, wait_job

    key = new_key()
    lib_id = client.post("/v1/libraries", json={"name": "old"}, headers=auth(key)).get_json()["id"]
    wav = write(tmp_path / "a.wav", 0.5, seed=31)
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": (io.BytesIO(wav.read_bytes()), "a.wav")})
    item, job = r.get_json()["items"][0]["id"], r.get_json()["job_id"]
    assert wait_job(client, key, job)["status"] == "done"
    labels = {"labels": ["rain", "dog"]}
    assert client.post(f"/v1/items/{item}/classify", json=labels, headers=auth(key)).status_code == 200
    retire(settings.database_url, lib_id)  # as if embedded by a model this service no longer runs
    for r in (client.post(f"/v1/items/{item}/classify", json=labels, headers=auth(key)),
              client.post(f"/v1/libraries/{lib_id}/classify", json=labels, headers=auth(key)),
              client.post("/v1/search", json={"library_id": lib_id, "text": "rain"}, headers=auth(key)),
              client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                          data={"files": (io.BytesIO(b"RIFF"), "b.wav")}),
              # a retry would queue files that fail again, each for the model: refused as an upload is
              client.post(f"/v1/jobs/{job}/retry", headers=auth(key))):
        assert err(r, 409)["code"] == "model_mismatch"
    # which library, of several, and whose model: it said "the library was embedded with another model", also
    # where the library searched was the service's and the item searched by was of another
    served = client.post("/v1/libraries", json={"name": "new"}, headers=auth(key)).get_json()
    model = served["model"]["name"]
    e = err(client.post("/v1/search", json={"library_ids": [served["id"], lib_id], "text": "rain"},
                        headers=auth(key)), 409)
    assert e["message"].startswith(f"library 'old' ({lib_id}) was embedded with another model (retired) than this "
                                   f"service runs ({model}, CLAPQ_MODEL)"), e
    for r in (client.post("/v1/search", json={"library_id": served["id"], "item_id": item}, headers=auth(key)),
              client.post(f"/v1/items/{item}/classify", json=labels, headers=auth(key))):
        assert err(r, 409)["message"].startswith(f"the item's library 'old' ({lib_id}) was embedded with another "
                                                 "model (retired)"), r.get_json()


def test_the_same_weights_under_another_path_are_the_same_model(client, new_key, settings, tmp_path, tiny_model):
    """CLAPQ_MODEL spelled another way (a link to the same checkpoint, as `./clap` against `/srv/clap`): an
    API serving it is the same model for the libraries made before (no 409) and registers no second row."""
    import dataclasses

    from sqlalchemy import text

    from api import create_app
    from clapq.checkpoint import register_model, resolve
    from clapq.db import session_scope

    key = new_key()
    lib_id = client.post("/v1/libraries", json={"name": "spelt"}, headers=auth(key)).get_json()["id"]
    link = tmp_path / "same-clap"
    link.symlink_to(tiny_model)
    other = create_app(dataclasses.replace(settings, model=str(link))).test_client()
    r = other.post("/v1/search", json={"library_id": lib_id, "text": "rain"}, headers=auth(key))
    assert r.status_code == 200, r.get_json()
    with session_scope(settings.database_url) as s:
        ids = {register_model(s, resolve(name)) for name in (str(tiny_model), str(link))}
        rows = s.execute(text("SELECT count(*) FROM models WHERE weights_sha256 = :w"),
                         {"w": resolve(str(link)).weights_sha256}).scalar()
    assert len(ids) == 1 and rows == 1


def test_an_upload_holds_no_transaction_while_its_body_arrives(app, new_key, settings):
    """While a slow client sends its files, the upload's checks (auth, library, backlog) are done and their
    transaction is over: no connection sits idle in transaction for the minutes a large upload takes."""
    import threading
    import time

    from sqlalchemy import text

    from clapq.db import session_scope

    key = new_key()
    c = app.test_client()
    lib_id = c.post("/v1/libraries", json={"name": "slow"}, headers=auth(key)).get_json()["id"]
    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="slow.wav"\r\n\r\n'
    tail = b"RIFF slow\r\n--b--\r\n"
    go = threading.Event()

    class Slow(io.RawIOBase):
        """The body, with a pause after the part's headers until `go` (seekable only for the test client
        to measure its length)."""

        data, pos = head + tail, 0

        def readable(self):
            return True

        def seekable(self):
            return True

        def tell(self):
            return self.pos

        def seek(self, offset, whence=0):
            self.pos = len(self.data) if whence == 2 else offset
            return self.pos

        def readinto(self, buf):
            if self.pos == len(head):
                go.wait(60)  # the client pauses half-way
            stop = min(self.pos + len(buf), len(head) if self.pos < len(head) else len(self.data))
            chunk = self.data[self.pos:stop]
            buf[:len(chunk)] = chunk
            self.pos = stop
            return len(chunk)

    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=app.test_client().post(
        f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data; boundary=b",
        input_stream=Slow())))
    t.start()
    try:
        time.sleep(1.0)  # the request is in, reading its body
        with session_scope(settings.database_url) as s:
            waiting = s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                                    "AND query LIKE '%FROM items%status IN%'"))
    finally:
        go.set()
        t.join(60)
    assert waiting == 0
    assert answer["r"].status_code == 202, answer["r"].get_json()


def test_a_full_upload_area_is_a_507_for_uploads_and_clip_searches(settings, new_key, small_disk, caplog):
    """The blob store on a disk with 1 MiB: a 2 MB upload, and a 2 MB clip sent to search, are 507s
    with the envelope (the clip search was a 500), said in the log for the operator (only the access log
    showed it, helper-41), and leave no partial file; a small upload works."""
    import dataclasses

    from api import create_app

    c = create_app(dataclasses.replace(settings, blob_dir=small_disk / "blobs")).test_client()
    key = new_key()
    lib_id = c.post("/v1/libraries", json={"name": "full"}, headers=auth(key)).get_json()["id"]
    big = b"RIFF" + bytes(2_000_000)
    e = err(c.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                   data={"files": [(io.BytesIO(big), "big.wav")]}), 507)
    assert e["code"] == "insufficient_storage" and "full" in e["message"]
    # what is left, and that waiting alone makes no room ("try again later" had a user wait: helper-88)
    assert re.fullmatch(r"the upload area is full \([01]\.\d MB free, too little for this request's files\); try "
                        r"again once it has room", e["message"]), e
    assert any("the disk of the stored files is full" in r.getMessage() for r in caplog.records), caplog.records
    e = err(c.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                   data={"library_id": lib_id, "audio": (io.BytesIO(big), "q.wav")}), 507)
    assert e["code"] == "insufficient_storage"
    assert [p for p in (small_disk / "blobs").rglob("*") if p.is_file()] == []
    r = c.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
               data={"files": [(io.BytesIO(b"RIFF" + bytes(1000)), "small.wav")]})
    assert r.status_code == 202, r.get_json()


def test_uploads_leave_the_last_megabytes_of_a_disk_they_share_with_the_embedded_postgres(settings, services, new_key,
                                                                                          small_disk, tmp_path):
    """Uploads filled the data directory's disk to its last byte, and then its embedded Postgres could not write and
    stopped, and `clapq up` with it (helper-88: a 400 MB data directory filled by an upload). Where the embedded
    Postgres or Redis (the data directory's pg/ or redis/) runs on the stored files' disk, uploads leave
    CLAPQ_DISK_RESERVE_MB (auto: 128 MB) free: here a 1 MiB disk, so a 1 KB file is refused, 507 saying so, and
    leaves no file; on a disk of their own, or with the reserve set to 0, the same upload is taken. So it is where
    the pg/ and redis/ there are an earlier `clapq up`'s, no server running (DATABASE_URL and REDIS_URL name others):
    they kept the disk's last 128 MB from uploads all the same."""
    import dataclasses

    from api import create_app
    from clapq.room import disk_reserve
    from clapq.settings import Settings

    data = small_disk / "data"
    (data / "pg").mkdir(parents=True)
    (data / "redis").mkdir()
    # the embedded servers running say so (the suite's, in the data directory of their own)
    assert disk_reserve(services["base"] / "blobs", services["base"], None) == 128 << 20
    key = new_key()
    small = b"RIFF" + bytes(1000)

    def upload(**changes):
        c = create_app(dataclasses.replace(settings, **changes)).test_client()
        lib_id = c.post("/v1/libraries", json={"name": f"reserve {uuid.uuid4()}"}, headers=auth(key)).get_json()["id"]
        return c.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                      data={"files": [(io.BytesIO(small), "small.wav")]})

    # an earlier `clapq up`'s, stopped: nothing kept (a stale pid file, a process gone, is not a server either)
    (data / "pg" / "postmaster.pid").write_text("999999999\n/var/lib/postgresql\n")
    assert disk_reserve(data / "blobs", data, None) == 0
    assert upload(data_dir=data, blob_dir=data / "blobs", disk_reserve_mb=None).status_code == 202
    import shutil

    shutil.rmtree(data / "blobs")
    (data / "redis" / "redis.pid").write_text(f"{os.getpid()}\n")  # a Redis that runs
    assert disk_reserve(data / "blobs", data, None) == 128 << 20
    e = err(upload(data_dir=data, blob_dir=data / "blobs", disk_reserve_mb=None), 507)
    assert re.fullmatch(r"the upload area is full \([01]\.\d MB free, the last 128 MB of which are kept free for the "
                        r"database that shares its disk, CLAPQ_DISK_RESERVE_MB\); try again once it has room",
                        e["message"]), e
    assert [p for p in (data / "blobs").rglob("*") if p.is_file()] == []
    # the database on another disk: nothing kept
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "redis").mkdir(parents=True)
    (elsewhere / "redis" / "redis.pid").write_text(f"{os.getpid()}\n")
    assert disk_reserve(data / "blobs", elsewhere, None) == 0
    assert upload(data_dir=elsewhere, blob_dir=data / "blobs", disk_reserve_mb=None).status_code == 202
    assert upload(data_dir=data, blob_dir=data / "blobs", disk_reserve_mb=0).status_code == 202
    assert Settings.from_env({"CLAPQ_DISK_RESERVE_MB": "512"}).disk_reserve_mb == 512
    with pytest.raises(SystemExit, match="CLAPQ_DISK_RESERVE_MB must be at least 0"):
        Settings.from_env({"CLAPQ_DISK_RESERVE_MB": "-1"})


def test_a_disk_with_no_inode_left_is_a_507_too(settings, new_key, small_disk, caplog):
    """Bytes left but no inode (or no block for a new name): creating the part's temporary file failed with
    ENOSPC, answered 500 'internal error' with no word to the operator (helper-59: a blob tmpfs whose
    inodes ran out). Now a 507 as for a full disk, for uploads and clip searches, said in the log."""
    import dataclasses
    import subprocess

    from api import create_app

    c = create_app(dataclasses.replace(settings, blob_dir=small_disk / "blobs")).test_client()
    key = new_key()
    lib_id = c.post("/v1/libraries", json={"name": "no-inodes"}, headers=auth(key)).get_json()["id"]
    st = os.statvfs(small_disk)
    subprocess.run(["mount", "-o", f"remount,nr_inodes={st.f_files - st.f_ffree}", str(small_disk)], check=True)
    wav = b"RIFF" + bytes(1000)
    e = err(c.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                   data={"files": [(io.BytesIO(wav), "a.wav")]}), 507)
    assert e["code"] == "insufficient_storage"
    assert e["message"] == ("the upload area is full (no file can be created there: its disk has no inode left); "
                            "try again once it has room"), e
    assert any("the disk of the stored files is full" in r.getMessage() for r in caplog.records), caplog.records
    err(c.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
               data={"library_id": lib_id, "audio": (io.BytesIO(wav), "q.wav")}), 507)


def test_a_read_only_upload_area_is_a_503_said_in_the_log(settings, new_key, small_disk, caplog):
    """The blob store's disk remounted read-only (as ext4 does after an error): an upload answered 500
    'internal error' (helper-59). Now a 503 with Retry-After (`clapq upload` waits an outage out) and an
    error in the log naming the folder, for uploads and clip searches."""
    import dataclasses
    import subprocess

    from api import create_app

    c = create_app(dataclasses.replace(settings, blob_dir=small_disk / "blobs")).test_client()
    key = new_key()
    lib_id = c.post("/v1/libraries", json={"name": "read-only"}, headers=auth(key)).get_json()["id"]
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    wav = b"RIFF" + bytes(1000)
    for r in (c.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                     data={"files": [(io.BytesIO(wav), "a.wav")]}),
              c.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                     data={"library_id": lib_id, "audio": (io.BytesIO(wav), "q.wav")})):
        assert err(r, 503)["code"] == "storage_unavailable" and r.headers["Retry-After"] == "30"
    assert any("the folder of the stored files cannot be written (Read-only file system)" in r.getMessage()
               for r in caplog.records), caplog.records


def test_a_search_clip_whose_decoding_fails_for_no_reason_in_its_bytes_is_a_503(settings, new_key, tmp_path):
    """A clip's decoder that the machine gives no time (held by SIGSTOP: a machine too busy, a paused VM) until
    the clock's limit, min(60, CLAPQ_DECODE_TIMEOUT_S): the decoding fails, by the decoder's own word "not the file
    at fault", but the search answered 400 "the 'audio' clip could not be decoded", a fault of the request that
    `clapq search --like` does not send again. Now a 503 with Retry-After, and the same clip sent again is searched
    (a new decoder child takes it)."""
    import signal

    from api import create_app
    from tests.audio import write
    from worker.decoder import get_pool

    c = create_app(dataclasses.replace(settings, decode_timeout_s=2, decode_cpu_s=1)).test_client()
    key = new_key()
    lib_id = c.post("/v1/libraries", json={"name": "stalled-decoder"}, headers=auth(key)).get_json()["id"]
    clip = write(tmp_path / "q.wav", 2.0, 48_000)
    pool = get_pool(1)  # the API's decoders for clips
    pool.warm()
    (decoder,) = list(pool._free.queue)
    os.kill(decoder.proc.pid, signal.SIGSTOP)

    def search():
        return c.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                      data={"library_id": lib_id, "audio": (open(clip, "rb"), "q.wav")})

    r = search()
    e = err(r, 503)
    assert e["code"] == "decoder_unavailable" and "not the file at fault" in e["message"], e
    assert r.headers["Retry-After"] == "5"
    r = search()
    assert r.status_code == 200, r.get_json()


def api_of_a_copy(start_api, tmp_path, monkeypatch, before=None, **env) -> tuple[Path, str]:
    """`clapq api` running a copy of the code (the `clapq`, `worker` and `api` packages), which a test may change as an
    upgrade in place would: the copy's folder, and the API's URL. `before(folder)` changes the copy before it starts;
    `env`, more of the API's environment."""
    import shutil

    import clapq
    import worker

    code = tmp_path / "code"
    for pkg in (Path(clapq.__file__).parent, Path(worker.__file__).parent, Path(worker.__file__).parent.parent / "api"):
        shutil.copytree(pkg, code / pkg.name, ignore=shutil.ignore_patterns("__pycache__"))
    if before is not None:
        before(code)
    monkeypatch.chdir(tmp_path)  # `python -m` looks in the working directory first
    # one gunicorn process, so that each request meets the one the test looks at
    return code, start_api(PYTHONPATH=str(code), CLAPQ_API_WORKERS="1", **env)


def test_an_api_upgraded_in_place_answers_a_search_clip_503_to_restart(start_api, new_key, tmp_path, monkeypatch):
    """The API decodes a search clip in a decoder child, a fresh interpreter that runs the code on disk now: after
    clapq was upgraded in place under a running API (here a copy of the code it runs, changed after it started and
    before its first search by a clip), one started then would run other code than the API. Not the clip's fault,
    and no wait mends it: a 503 `code_changed` that says the API must be restarted (the client stops on it rather
    than waiting), not a 400 blaming the clip or a 500 (before, the search went on with the new decoder)."""
    from tests.audio import write

    code, base = api_of_a_copy(start_api, tmp_path, monkeypatch)
    h = auth(new_key())
    lib_id = requests.post(f"{base}/v1/libraries", json={"name": "upgraded"}, headers=h, timeout=30).json()["id"]
    clip = write(tmp_path / "q.wav", 2.0, 48_000).read_bytes()

    def search():
        return requests.post(f"{base}/v1/search", data={"library_id": lib_id}, files={"audio": ("q.wav", clip)},
                             headers=h, timeout=120)

    assert requests.get(f"{base}/readyz", timeout=30).json()["checks"]["code"] == "ok"
    with open(code / "worker" / "audio.py", "a") as f:
        f.write("\n# a newer version\n")
    # /readyz says so (a warning: restarted one at a time, every API would be out of service meanwhile)
    r = requests.get(f"{base}/readyz", timeout=30)
    assert r.json()["checks"]["code"].startswith("warning: clapq's code changed on disk since this API process "
                                                 "started"), r.json()
    for _ in range(2):  # and again: no wait mends it
        r = search()
        assert r.status_code == 503, r.text
        e = r.json()["error"]
        assert e["code"] == "code_changed" and "the API must be restarted" in e["message"], e
        assert e["message"].endswith("(ask the API's operator)"), e


def test_under_clapq_up_a_search_clip_of_an_api_upgraded_in_place_says_to_restart_up(start_api, new_key, tmp_path,
                                                                                      monkeypatch):
    """Under `clapq up` (CLAPQ_UP, which it sets for its roles) whoever reads the 503 `code_changed` runs the API:
    it said "(ask the API's operator)" to the operator, and now says how, restarting `clapq up` (found by hand,
    `clapq search --like` after an upgrade in place under a running `clapq up`)."""
    from tests.audio import write

    code, base = api_of_a_copy(start_api, tmp_path, monkeypatch, CLAPQ_UP="1")
    h = auth(new_key())
    lib_id = requests.post(f"{base}/v1/libraries", json={"name": "upgraded-up"}, headers=h, timeout=30).json()["id"]
    with open(code / "worker" / "audio.py", "a") as f:
        f.write("\n# a newer version\n")
    r = requests.post(f"{base}/v1/search", data={"library_id": lib_id}, headers=h, timeout=120,
                      files={"audio": ("q.wav", write(tmp_path / "q.wav", 2.0, 48_000).read_bytes())})
    assert r.status_code == 503 and r.json()["error"]["code"] == "code_changed", r.text
    assert r.json()["error"]["message"].endswith("(restart `clapq up`: Ctrl-C, then start it again)"), r.text


@pytest.mark.parametrize("package", ["clapq", "api"])
def test_an_api_upgraded_in_place_loads_none_of_the_new_code_and_a_process_it_starts_then_stops_it(
        start_api, new_key, tmp_path, monkeypatch, package):
    """clapq upgraded in place under a running API, here a new version whose model loader has another name. The API
    imports the model's modules (torch) at its first search by text, not at start (CLAPQ_PRELOAD_TEXT=0 here; a
    search while the preload runs is the same): that search imported the new module into the old API, a 500
    (ImportError). Now it loads none of the new code: a 503 `code_changed` that says the API must be restarted, as a
    search clip's is; /readyz says why, and stays ready (every API process of the machine has the same disk under it,
    and each still answers). A gunicorn process that died is forked again from the master, which runs the old code,
    and imported the new API beside it; now it refuses to, which stops the API, saying why, for `clapq up` (or the
    supervisor) to start it again on the new code. A new version of the `api` package alone is one too (it was
    not in the code the API compared: /readyz said ok)."""
    import psutil

    code, base = api_of_a_copy(start_api, tmp_path, monkeypatch)
    h = auth(new_key())
    lib_id = requests.post(f"{base}/v1/libraries", json={"name": "upgraded"}, headers=h, timeout=30).json()["id"]
    if package == "clapq":
        clap = code / "clapq" / "clap.py"
        clap.write_text(clap.read_text().replace("def get_clap(", "def load_clap("))
    else:
        with open(code / "api" / "search.py", "a") as f:
            f.write("\n# a newer version\n")
    r = requests.get(f"{base}/readyz", timeout=30)
    assert r.json()["checks"]["code"].startswith("warning: clapq's code changed on disk since this API process "
                                                 "started"), r.json()
    assert r.status_code == 200 and r.json()["status"] == "ready", r.json()
    for _ in range(2):  # no wait mends it
        r = requests.post(f"{base}/v1/search", json={"library_id": lib_id, "text": "a dog barking"}, headers=h,
                          timeout=120)
        assert r.status_code == 503, r.text
        e = r.json()["error"]
        assert e["code"] == "code_changed" and "the API must be restarted" in e["message"], e
    assert requests.get(f"{base}/v1/libraries", headers=h, timeout=30).status_code == 200  # the rest as before

    [master] = [p for p in psutil.process_iter(["cmdline", "environ"])
                if "clapq.cli" in (p.info["cmdline"] or []) and (p.info["environ"] or {}).get("PYTHONPATH") == str(code)
                and "clapq.cli" not in p.parent().cmdline()]
    [child] = master.children()
    child.kill()  # the OOM killer, a native crash
    assert master.wait(60) != 0
    log = (tmp_path / "api0.log").read_text()
    assert "clapq: the code on disk changed since this API started (clapq upgraded in place?)" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_an_api_upgraded_in_place_while_it_loads_the_model_keeps_none_of_it(start_api, new_key, tmp_path,
                                                                            monkeypatch):
    """The upgrade in place comes while the API imports the model's modules (torch: seconds), here made to come then
    by clapq.clap itself: what it imported may be part old and part new, and was used from then on (a 200). Now that
    search and every one after it answer 503 `code_changed`, as where the change came first."""

    def upgraded_as_the_model_loads(code: Path) -> None:
        clap, search = code / "clapq" / "clap.py", code / "api" / "search.py"
        clap.write_text(clap.read_text().replace(
            "from __future__ import annotations\n",
            f"from __future__ import annotations\n\nwith open({str(search)!r}, 'a') as f:\n"
            "    f.write('# a newer version\\n')\n", 1))

    code, base = api_of_a_copy(start_api, tmp_path, monkeypatch, before=upgraded_as_the_model_loads)
    h = auth(new_key())
    lib_id = requests.post(f"{base}/v1/libraries", json={"name": "upgraded"}, headers=h, timeout=30).json()["id"]
    assert "a newer version" not in (code / "api" / "search.py").read_text()
    for _ in range(2):
        r = requests.post(f"{base}/v1/search", json={"library_id": lib_id, "text": "a dog barking"}, headers=h,
                          timeout=120)
        assert r.status_code == 503 and r.json()["error"]["code"] == "code_changed", r.text
    assert "a newer version" in (code / "api" / "search.py").read_text()


@pytest.mark.parametrize("seconds", [20.0, 6.0])
def test_a_search_clip_the_apis_temporary_folder_has_no_room_for_is_a_507(client, new_key, small_disk, tmp_path,
                                                                          monkeypatch, seconds):
    """The API keeps a search clip, and its decoded samples, in its temporary folder (TMPDIR) while it searches;
    where that is full, the search answered 500 internal_error (the saved copy's ENOSPC), or 400 naming "a worker's
    CLAPQ_SCRATCH_DIR" for samples larger than the whole folder. Now a 507, as an upload's full disk is. A 1 MiB
    folder: a 20 s WAV (1.9 MB) does not fit, a 6 s one (576 KB) does but not its samples (1.15 MB)."""
    import tempfile

    from werkzeug.datastructures import FileStorage
    from werkzeug.test import encode_multipart

    from tests.audio import write

    key = new_key()
    lib_id = client.post("/v1/libraries", json={"name": "small-tmp"}, headers=auth(key)).get_json()["id"]
    clip = write(tmp_path / "q.wav", seconds, 48_000)
    boundary, body = encode_multipart({"library_id": lib_id,  # in memory
                                       "audio": FileStorage(open(clip, "rb"), filename="q.wav")})
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))  # as TMPDIR would for the API process
    r = client.post("/v1/search", headers=auth(key), data=body,
                    content_type=f"multipart/form-data; boundary={boundary}")
    e = err(r, 507)
    assert e["code"] == "insufficient_storage" and "the API's temporary folder (TMPDIR" in e["message"], e
    assert list(small_disk.iterdir()) == []  # nothing of the clip is left there


def test_a_disk_that_fills_before_the_commit_is_storage_full_and_keeps_no_part(small_disk):
    """The last bytes of a part sit in the writer's buffer; the disk fills before the commit flushes them:
    StorageFull (a 507), not a bare OSError (a 500), and the partial file is removed all the same."""
    from clapq.blobs import BlobStore, StorageFull

    store = BlobStore(small_disk / "blobs")
    w = store.writer()
    w.write(b"x" * 100)  # buffered: no write reaches the disk yet
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(65536)):  # to the last byte the disk has
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(StorageFull):
        w.commit()
    assert list(store.tmp_dir.iterdir()) == []


def test_a_request_that_deadlocks_is_a_503_to_send_again_and_applies_nothing(client, lib, settings):
    """Postgres aborting a request's transaction as a deadlock victim (SQLSTATE 40P01, raised here by a
    trigger on the upload's item insert) is a 503 with Retry-After that says to send it again, not a
    500; nothing of the request is stored, and the same upload sent again works."""
    from sqlalchemy import text

    from clapq.db import session_scope

    key, lib_id = lib
    body = b"RIFF" + bytes(2000)
    with session_scope(settings.database_url) as s:
        s.execute(text("""
            CREATE FUNCTION test_deadlock() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = 'deadlock_detected'; END $$;
            CREATE TRIGGER test_deadlock BEFORE INSERT ON items FOR EACH ROW
            WHEN (NEW.filename = 'deadlock.wav') EXECUTE FUNCTION test_deadlock()"""))
    try:
        r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(body), "deadlock.wav")]})
        e = err(r, 503)
        assert e["code"] == "database_conflict" and "send it again" in e["message"]
        assert r.headers["Retry-After"] == "1"
        with session_scope(settings.database_url) as s:
            assert s.scalar(text("SELECT count(*) FROM jobs WHERE library_id = :l"), {"l": lib_id}) == 0
            assert s.scalar(text("SELECT count(*) FROM items WHERE library_id = :l"), {"l": lib_id}) == 0
    finally:
        with session_scope(settings.database_url) as s:
            s.execute(text("DROP TRIGGER test_deadlock ON items; DROP FUNCTION test_deadlock()"))
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": [(io.BytesIO(body), "deadlock.wav")]})
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["items"][0]["status"] == "queued"


def test_postgres_away_is_a_503_and_readyz_answers_in_bounded_time(settings):
    """Postgres refusing connections (nothing on its port) and Postgres taking them but never answering
    (a socket that listens and never accepts, as a stopped server or a dead link looks): a request is a 503
    database_unavailable with a Retry-After, not a 500 or a hang, and /readyz says postgres is down while
    Redis is fine, without waiting on the silent server."""
    import dataclasses
    import socket
    import threading

    from api import create_app

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        for port, why in ((refused_port, "refused"), (silent.getsockname()[1], "silent")):
            app = create_app(dataclasses.replace(settings, database_url=f"postgresql://clapq@127.0.0.1:{port}/clapq"))
            c = app.test_client()
            r = c.get("/v1/libraries", headers=auth("cq_anything"))
            e = err(r, 503)
            assert e["code"] == "database_unavailable" and "try again in 5 s" in e["message"], (why, e)
            assert r.headers["Retry-After"] == "5", why
            answered = []
            probe = threading.Thread(target=lambda: answered.append(c.get("/readyz")), daemon=True)
            probe.start()
            probe.join(60)  # a hang fails here, not the suite's timeout
            assert answered, f"/readyz did not answer with Postgres {why}"
            ready = answered[0]
            assert ready.status_code == 503, (why, ready.get_json())
            checks = ready.get_json()["checks"]
            assert checks["postgres"].startswith("error:") and checks["redis"] == "ok", (why, checks)
            if why == "silent":
                assert checks["postgres"] == "error: no answer in 3 s", checks
    finally:
        silent.close()


def test_only_errors_of_reaching_postgres_are_503s(settings):
    """A statement Postgres cancels (here a statement timeout, 57014; a deadlock or a full disk alike)
    raises the same OperationalError class as a refused connection, but sending it again does not help:
    it stays a 500, logged with its traceback. A refused connection and a server shutting down are 503s."""
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc

    from api.errors import database_unavailable
    from clapq.db import get_engine

    with get_engine(settings.database_url).connect() as conn:
        conn.execute(sa.text("SET statement_timeout = 50"))
        with pytest.raises(sa_exc.OperationalError) as cancelled:
            conn.execute(sa.text("SELECT pg_sleep(2)"))
        conn.rollback()
    assert cancelled.value.orig.pgcode == "57014" and not database_unavailable(cancelled.value)
    refused = sa.create_engine("postgresql+psycopg2://clapq@127.0.0.1:9/clapq", poolclass=sa.pool.NullPool)
    with pytest.raises(sa_exc.OperationalError) as unreachable:
        refused.connect()
    assert database_unavailable(unreachable.value)
    engine = get_engine(settings.database_url)
    with engine.connect() as victim, engine.connect() as admin:
        pid = victim.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(sa_exc.DBAPIError) as terminated:
            victim.execute(sa.text("SELECT 1"))
    assert database_unavailable(terminated.value)


def test_the_api_answers_under_a_server_that_gives_the_connection_as_the_body(app, new_key, tmp_path):
    """WSGI lets a server hand the connection itself to the app as the request body (werkzeug's own server,
    `flask run`, does). The API read bodies on to their end after answering (finish_bodies), which there
    waited for the client's next request: every POST and PATCH with a body hung. It reads at most the
    declared length now. Under werkzeug's threaded server: a JSON body, an upload, an answer given before
    its body was read (a 401), and a PATCH."""
    import threading

    from werkzeug.serving import make_server

    from tests.audio import write

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base, h = f"http://127.0.0.1:{server.server_port}", auth(new_key())
        with requests.Session() as s:  # one connection kept alive where the server allows it
            made = s.post(f"{base}/v1/libraries", json={"name": "under werkzeug"}, headers=h, timeout=20)
            assert made.status_code == 201, made.text
            clip = write(tmp_path / "a.wav", 0.5).read_bytes()
            sent = s.post(f"{base}/v1/libraries/{made.json()['id']}/batches", files={"files": ("a.wav", clip)},
                          headers=h, timeout=20)
            assert sent.status_code == 202, sent.text
            refused = s.post(f"{base}/v1/libraries/{made.json()['id']}/batches", files={"files": ("a.wav", clip)},
                             headers={"Authorization": "Bearer cq_not_a_key"}, timeout=20)
            assert refused.status_code == 401, refused.text
            item = sent.json()["items"][0]["id"]
            patched = s.patch(f"{base}/v1/items/{item}", json={"metadata": {"mic": "zoom"}}, headers=h, timeout=20)
            assert patched.status_code == 200 and patched.json()["metadata"] == {"mic": "zoom"}, patched.text
    finally:
        server.shutdown()
        thread.join()


def test_a_path_no_endpoint_has_is_said_so(client, new_key):
    """A path the API does not have (`--url http://host:8000/v1` makes GET /v1/v1/libraries) was told
    werkzeug's "check your spelling"; it names the path and where the API's paths begin (helper-42)."""
    e = err(client.get("/v1/v1/libraries", headers=auth(new_key())), 404)
    assert e["message"] == "no endpoint '/v1/v1/libraries': the API's paths begin /v1/ right after its address " \
        "(GET /openapi.json lists them)", e
    e = err(client.get("/v1/libraries/x/nothing", headers=auth(new_key())), 404)
    assert e["message"].startswith("no endpoint '/v1/libraries/x/nothing'"), e
    # a path that begins as the API's do is not told to begin so (GET /v1/items, helper-57)
    e = err(client.get("/v1/items", headers=auth(new_key())), 404)
    assert e["message"] == "no endpoint '/v1/items': GET /openapi.json lists the API's paths", e
    e = err(client.get("/api/v1/libraries", headers=auth(new_key())), 404)
    assert "the API's paths begin /v1/ right after its address" in e["message"], e
    assert err(client.get(f"/v1/items/{uuid.uuid4()}", headers=auth(new_key())), 404)["message"] == "item not found"
    # a path with a trailing '/', as many web frameworks write theirs, names the path without it
    key = new_key()
    for method, path in (("post", "/v1/libraries/"), ("get", f"/v1/jobs/{uuid.uuid4()}/"), ("get", "/healthz/"),
                         ("delete", f"/v1/items/{uuid.uuid4()}//")):
        e = err(getattr(client, method)(path, headers=auth(key)), 404)
        assert e["message"] == f"no endpoint {path!r}: the path is {path.rstrip('/')!r}, with no '/' at its end", e
    e = err(client.get("/v1/nothing/", headers=auth(key)), 404)
    assert e["message"] == "no endpoint '/v1/nothing/': GET /openapi.json lists the API's paths", e


def test_a_slow_but_steady_reader_gets_the_whole_answer(start_api, new_key):
    """Against gunicorn: an answer of 7.7 MB (a page of 500 items whose metadata is large) to a client that
    reads it steadily, never pausing for anything near CLAPQ_CLIENT_TIMEOUT_S (2 s here), but takes longer than
    that in all (a slow link; ~5 s here) arrives whole. The answer was written in one sendall, whose timeout is the
    longest the whole write may take (Python's, since 3.5), so it was cut off once the write had lasted
    CLAPQ_CLIENT_TIMEOUT_S (6.4 of 7.7 MB came), with a 200 and the whole Content-Length."""
    import socket
    from urllib.parse import urlsplit

    url = start_api(CLAPQ_API_WORKERS="1", CLAPQ_API_THREADS="1", CLAPQ_CLIENT_TIMEOUT_S="2")
    base, key = urlsplit(url), new_key()
    lib = requests.post(f"{url}/v1/libraries", json={"name": "slow reader"}, headers=auth(key), timeout=30).json()["id"]
    n = 500
    files = [("files", (f"{i}.wav", b"RIFF" + os.urandom(64))) for i in range(n)]
    meta = json.dumps({f"{i}.wav": {"notes": "x" * 15_000} for i in range(n)})
    r = requests.post(f"{url}/v1/libraries/{lib}/batches", files=files, data={"metadata": meta}, headers=auth(key),
                      timeout=120)
    assert r.status_code == 202, r.text[:300]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before connecting: a small window
    sock.settimeout(60)
    sock.connect((base.hostname, base.port))
    with sock:
        sock.sendall(f"GET /v1/libraries/{lib}/items?limit=500 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(32 * 1024):  # ~16 KB at a time, pausing 10 ms: steady, slower than the link
            answer += chunk
            time.sleep(0.01)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:300]
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    assert length > 7_000_000 and len(body) == length, (length, len(body))
    assert len(json.loads(body)["items"]) == n


def test_an_api_whose_metrics_disk_is_full_still_answers(start_api, small_disk):
    """`clapq api` counts its requests in files each of its processes maps into memory (PROMETHEUS_MULTIPROC_DIR:
    `clapq up`'s is in its data directory). Where that disk was full, the first write to a page of such a file the
    disk had no room for killed the process with SIGBUS: every request of a route and status not counted before
    lost its connection with no answer, and each process started in its place died at its first one (helper-88, a
    full data directory: `clapq upload` said the connection was lost, at every try). The files' blocks are now
    allocated before they are written to, so a full disk leaves the request uncounted and answered."""
    counts = small_disk / "metrics"
    counts.mkdir()
    base = start_api(PROMETHEUS_MULTIPROC_DIR=str(counts))
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # every block of the disk taken
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    # routes and statuses each of its processes has not counted yet: new entries, past the pages written so far
    paths = [p.split("{")[0].rstrip("/") or "/" for p in requests.get(f"{base}/openapi.json", timeout=30).json()["paths"]]
    for path in paths * 2:  # two processes: each takes its turn at a connection
        for method in ("GET", "POST", "DELETE"):
            r = requests.request(method, f"{base}{path}", timeout=30)
            assert r.status_code < 500 or r.status_code == 503, (method, path, r.status_code, r.text)
    assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
    assert "clapq_http_request_duration_seconds" in requests.get(f"{base}/metrics", timeout=30).text


def test_metrics_take_the_token_where_one_is_set(settings, new_key):
    """CLAPQ_METRICS_TOKEN: /metrics answers only the requests that send it (as Prometheus's scrape config can), so
    an API its tenants reach with no proxy in front need not show them the whole service's activity; a tenant's key
    does not open it, the 401 does not say the token, and the probes and the API description still take no key."""
    from api import create_app
    from clapq.settings import Settings

    assert Settings.from_env({}).metrics_token == "" and Settings.from_env(
        {"CLAPQ_METRICS_TOKEN": " s3cret "}).metrics_token == "s3cret"
    app = create_app(dataclasses.replace(settings, metrics_token="s3cret-token"))
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, auth(new_key()), {"Authorization": "Basic s3cret-token"},
                    {"Authorization": "Bearer s3cret-token-and-more"}):
        r = client.get("/metrics", headers=headers)
        e = err(r, 401)
        assert "CLAPQ_METRICS_TOKEN" in e["message"] and "s3cret" not in e["message"], e
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="clapq metrics"'
    r = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert r.status_code == 200 and "clapq_items{" in r.get_data(as_text=True)
    assert client.get("/healthz").status_code == client.get("/openapi.json").status_code == 200
    assert client.get("/readyz").status_code != 401
    assert "s3cret" not in repr(app.config["CLAPQ"])  # a settings object logged or printed does not show it


def test_options_is_said_in_headers_and_a_cors_preflight_is_refused_in_json(client, new_key):
    """OPTIONS was Flask's empty 200 labelled text/html, and a browser's CORS preflight (no key: a page of another
    origin about to send one) a 401 "missing or invalid API key", though the page held a right one. OPTIONS is a
    204 with the path's methods in Allow, key or none; a preflight a 403 that says the API allows no other origin."""
    key = new_key()
    for headers in (auth(key), {}):
        r = client.options("/v1/libraries", headers=headers)
        assert r.status_code == 204 and r.data == b"" and "Content-Type" not in r.headers, (r.status_code, r.headers)
        assert set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST", "OPTIONS"}, r.headers
    r = client.options(f"/v1/items/{uuid.uuid4()}", headers=auth(key))
    assert r.status_code == 204 and set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "PATCH", "DELETE",
                                                                             "OPTIONS"}, r.headers
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    e = err(client.options("/v1/search", headers=preflight), 403)
    assert e["code"] == "cross_origin_not_allowed" and e["message"] == (
        "a browser asked whether a page of 'https://app.example' may call this API (a CORS preflight): the API "
        "allows no other origin; call it from a server of yours, or serve the page from the API's own origin "
        "(http://localhost/), as the API's search page is"), e
    r = client.options("/v1/search", headers=preflight)
    assert not any(h.lower().startswith("access-control-allow") for h in r.headers.keys()), r.headers
    assert err(client.options("/v1/nothing", headers=preflight), 404)["message"].startswith("no endpoint '/v1/nothing'")


def test_a_json_field_that_does_not_parse_is_quoted_as_it_came(client, lib):
    """`requests.post(url, data={'filter': {...}})` sends a dict's keys alone: 'filter' came as "metadata" and was
    told "'filter' is not valid JSON", and an upload's 'metadata' so, with nothing to show that only a key came. What
    came is quoted, and what to send said; a dict of two keys came as the field twice, whose values are quoted too."""
    key, lib_id = lib

    def sent(**kwargs):  # the body and type requests makes of them
        p = requests.Request("POST", "http://api/", **kwargs).prepare()
        return {"data": p.body, "content_type": p.headers["Content-Type"], "headers": auth(key)}

    e = err(client.post("/v1/search", **sent(data={"library_id": lib_id, "q": "rain",
                                                   "filter": {"metadata": {"genre": "rock"}}})), 400)
    assert e["message"] == ("'filter' is not valid JSON (Expecting value: line 1 column 1 (char 0)): it came as "
                            "'metadata'; give it as JSON text (a dict given as a form field's value, as in "
                            "requests.post(url, data={'filter': {...}}), is sent as its keys alone: send json.dumps "
                            "of it), or send the whole search as a JSON body"), e
    e = err(client.get("/v1/search", query_string={"library_id": lib_id, "q": "rain", "filter": "{genre: " + "x" * 90},
                       headers=auth(key)), 400)
    assert f"it came as '{{genre: {'x' * 72}'...; give it as JSON text" in e["message"], e
    e = err(client.post("/v1/search", **sent(data={"library_id": lib_id, "q": "rain",
                                                   "filter": {"metadata": {}, "duration_s": {"min": 1}}})), 400)
    assert e["message"] == ("the form gives 'filter' more than once ('metadata', 'duration_s'); give it once, as JSON "
                            "text: a dict given as a form field's value, as in requests.post(url, data={'filter': "
                            "{...}}), is sent as its keys alone: send json.dumps of it"), e
    batch = f"/v1/libraries/{lib_id}/batches"
    e = err(client.post(batch, **sent(files=[("files", ("a.wav", b"RIFF a"))],
                                      data={"metadata": {"a.wav": {"tags": ["x"]}}})), 400)
    assert e["message"].startswith("'metadata' is not valid JSON (Expecting value: line 1 column 1 (char 0)): it came "
                                   "as 'a.wav'; give it as JSON text (a dict given as a form field's value, as in "
                                   "requests.post(url, data={'metadata': {...}}), is sent as its keys alone"), e
    e = err(client.post(batch, **sent(files=[("files", ("a.wav", b"RIFF a")), ("files", ("b.wav", b"RIFF b"))],
                                      data={"metadata": {"a.wav": {}, "b.wav": {}}})), 400)
    assert e["message"].startswith("the form gives 'metadata' more than once ('a.wav', 'b.wav'); give it once, as "
                                   "JSON text"), e
    assert client.get(f"/v1/libraries/{lib_id}", headers=auth(key)).get_json()["item_count"] == 0
    r = client.post(batch, **sent(files=[("files", ("a.wav", b"RIFF a"))], data={"metadata": json.dumps({"a.wav": {}})}))
    assert r.status_code == 202, r.get_json()


def test_an_optional_query_parameter_given_empty_is_as_if_left_out(client, lib):
    """`limit=` and `k=` took their defaults, but `status=` (as a page's select of "any status" sends it) was a 400
    "'status' must be one of ...", and `threshold=` one too: each optional parameter given empty is now as if it
    were not given."""
    key, lib_id = lib
    r = client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), content_type="multipart/form-data",
                    data={"files": [(io.BytesIO(b"RIFF one"), "a.wav"), (io.BytesIO(b"RIFF two"), "b.wav")]})
    job, items = r.get_json()["job_id"], [i["id"] for i in r.get_json()["items"]]
    for path in (f"/v1/libraries/{lib_id}/items", f"/v1/jobs/{job}/items"):
        for query in ("status=", "status=&limit=&cursor=", ""):
            r = client.get(f"{path}?{query}", headers=auth(key))
            assert r.status_code == 200 and [i["id"] for i in r.get_json()["items"]] == items, (path, query, r.data)
        assert client.get(f"{path}?status=done", headers=auth(key)).get_json()["items"] == []
        assert "'status' must be one of" in err(client.get(f"{path}?status=dnoe", headers=auth(key)), 400)["message"]
    # the default threshold, then the item's own 409: it is not embedded (no worker here)
    assert err(client.get(f"/v1/items/{items[0]}/duplicates?threshold=&limit=", headers=auth(key)),
               409)["code"] == "not_embedded"
    assert "'threshold' must be a number" in err(client.get(f"/v1/items/{items[0]}/duplicates?threshold=x",
                                                            headers=auth(key)), 400)["message"]
    r = client.post(f"/v1/items/{items[0]}/audio-link?expires_in_s=", headers=auth(key))
    assert r.status_code == 200, r.data
    r = client.get(f"/v1/search?library_id={lib_id}&q=rain&k=&offset=&min_score=&mode=&filter=&item_id=",
                   headers=auth(key))
    assert r.status_code == 200 and r.get_json()["k"] == 10, r.data
