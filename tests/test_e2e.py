"""End to end: upload a mixed batch through the API, a real worker embeds it, search it by text."""

from __future__ import annotations

import io

import numpy as np
import pytest

from clapq.blobs import BlobStore
from tests.audio import write
from tests.reference import audio_48k, load_reference, reference_embed
from tests.conftest import auth, retire, wait_job

# name, seconds, rate, channels, soundfile subtype
BATCH = [
    ("tone_a.wav", 3.5, 48_000, 1, "PCM_16"),
    ("tone_b.flac", 7.0, 44_100, 2, "PCM_24"),
    ("short.wav", 0.4, 8_000, 1, "PCM_16"),
    ("exact10.wav", 10.0, 22_050, 2, "FLOAT"),
    ("long.flac", 23.0, 16_000, 1, "PCM_16"),
]


def reference_vector(model_dir, path) -> np.ndarray:
    return reference_embed(load_reference(model_dir), audio_48k(path))


def upload(client, key, lib_id, paths, metadata=None):
    data = {"files": [(io.BytesIO(p.read_bytes()), p.name) for p in paths]}
    if metadata is not None:
        import json

        data["metadata"] = json.dumps(metadata)
    return client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), data=data,
                       content_type="multipart/form-data")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    paths = [write(d / name, secs, rate, ch, freq=200 + 150 * i, seed=i, subtype=sub)
             for i, (name, secs, rate, ch, sub) in enumerate(BATCH)]
    corrupt = d / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\xff" * 40)
    return paths, corrupt


def test_upload_poll_search(client, new_key, worker, corpus, tiny_model, settings):
    paths, corrupt = corpus
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "sfx"}, headers=auth(key))
    assert lib.status_code == 201, lib.get_json()
    lib = lib.get_json()
    assert lib["model"]["dim"] == 512

    r = upload(client, key, lib["id"], paths + [corrupt], metadata={"tone_a.wav": {"tag": "a"}})
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert [i["filename"] for i in body["items"]] == [p.name for p in paths] + ["corrupt.wav"]
    job = wait_job(client, key, body["job_id"])
    assert job["status"] == "done_with_errors", job
    assert job["counts"]["done"] == len(paths) and job["counts"]["failed"] == 1
    assert job["errors"][0]["filename"] == "corrupt.wav" and job["errors"][0]["error"]

    ids = {i["filename"]: i["id"] for i in body["items"]}
    vectors = {}
    for name, secs, rate, ch, _ in BATCH:
        item = client.get(f"/v1/items/{ids[name]}", headers=auth(key)).get_json()
        assert item["status"] == "done" and item["error"] is None
        assert item["sample_rate"] == rate and item["channels"] == ch
        assert item["duration_s"] == pytest.approx(secs, abs=1e-3)
        emb = client.get(f"/v1/items/{ids[name]}/embedding", headers=auth(key)).get_json()
        assert emb["dim"] == 512 and emb["model"]["id"] == lib["model"]["id"]
        vectors[name] = np.array(emb["vector"], dtype=np.float32)
        assert np.linalg.norm(vectors[name]) == pytest.approx(1.0, abs=1e-4)
    assert client.get(f"/v1/items/{ids['tone_a.wav']}", headers=auth(key)).get_json()["metadata"] == {"tag": "a"}
    bad = client.get(f"/v1/items/{ids['corrupt.wav']}", headers=auth(key)).get_json()
    assert bad["status"] == "failed" and bad["error"]
    r = client.get(f"/v1/items/{ids['corrupt.wav']}/embedding", headers=auth(key))
    assert r.status_code == 409
    # says why, and what to do: it never gets a vector unless it is sent again
    assert bad["error"] in r.get_json()["error"]["message"] and "upload the file again once it plays" in r.get_json()["error"]["message"]

    # the stored vector of a clip of 10 s or less equals the hand-written reference path
    for name in ("tone_a.wav", "short.wav", "exact10.wav", "tone_b.flac"):
        ref = reference_vector(tiny_model, next(p for p in paths if p.name == name))
        assert float(ref @ vectors[name]) >= 0.9999, name

    audio = client.get(f"/v1/items/{ids['tone_b.flac']}/audio", headers=auth(key))
    assert audio.status_code == 200 and audio.data == paths[1].read_bytes()
    assert audio.headers["Content-Type"] == "audio/flac"
    assert "attachment" in audio.headers["Content-Disposition"]

    # text search: best first, score = cosine similarity with the text tower's vector
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap

    qvec = get_clap(resolve(str(tiny_model)), "cpu", text_only=True).embed_text(["a calm sine tone"])[0]
    best = {}
    for name in vectors:  # an item scores as its best-matching segment
        segs = client.get(f"/v1/items/{ids[name]}/segments?vectors=1", headers=auth(key)).get_json()["segments"]
        best[name] = max((float(qvec @ np.array(sg["vector"], dtype=np.float32)), sg["start_s"], sg["end_s"])
                         for sg in segs)
    expected = sorted(((b[0], n) for n, b in best.items()), reverse=True)
    for no in ("no", "", "False"):  # an empty value is a no, as a left-out one (api.errors.yes_no)
        plain = client.get(f"/v1/items/{ids[name]}/segments?vectors={no}", headers=auth(key)).get_json()["segments"]
        assert plain and not any("vector" in sg for sg in plain), no
    assert "vector" in client.get(f"/v1/items/{ids[name]}/segments?vectors=YES", headers=auth(key)).get_json()[
        "segments"][0]
    r = client.get(f"/v1/items/{ids[name]}/segments?vectors=2", headers=auth(key))  # not a yes or a no: said
    assert r.status_code == 400 and "vectors=1" in r.get_json()["error"]["message"], r.get_json()
    res = client.get("/v1/search", query_string={"library_id": lib["id"], "q": "a calm sine tone", "k": 3},
                     headers=auth(key)).get_json()
    assert [r["filename"] for r in res["results"]] == [n for _, n in expected[:3]]
    for r, (score, name) in zip(res["results"], expected):
        assert r["score"] == pytest.approx(score, abs=1e-4)
        assert (r["segment"]["start_s"], r["segment"]["end_s"]) == pytest.approx(best[name][1:], abs=1e-3)
    res2 = client.post("/v1/search", json={"library_id": lib["id"], "text": "a calm sine tone", "k": 10},
                       headers=auth(key)).get_json()
    assert len(res2["results"]) == len(paths)  # failed items are not searchable
    assert res2["results"][:3] == res["results"]

    # the same bytes again: one item, reported as a duplicate, nothing re-embedded, the stored copy
    # still those bytes and no temporary file left
    blob = BlobStore(settings.blob_dir).path_for(client.get(f"/v1/items/{ids['tone_a.wav']}",
                                                            headers=auth(key)).get_json()["sha256"])
    again = upload(client, key, lib["id"], paths[:1]).get_json()
    assert again["items"][0]["duplicate_of"] == ids["tone_a.wav"]
    assert blob.read_bytes() == paths[0].read_bytes() and list(BlobStore(settings.blob_dir).tmp_dir.iterdir()) == []
    assert wait_job(client, key, again["job_id"])["status"] == "done"
    assert "metadata_ignored" not in again["items"][0]
    # sent again with other metadata: still a copy, and the answer says the metadata was not stored;
    # PATCH is how it changes, and search filters see the change
    name = paths[0].name
    assert name == "tone_a.wav"
    same = upload(client, key, lib["id"], paths[:1], metadata={name: {"tag": "a"}}).get_json()
    assert "metadata_ignored" not in same["items"][0]
    other = upload(client, key, lib["id"], paths[:1], metadata={name: {"tag": "b"}}).get_json()
    assert other["items"][0]["duplicate_of"] == ids[name] and other["items"][0]["metadata_ignored"] is True
    assert client.get(f"/v1/items/{ids[name]}", headers=auth(key)).get_json()["metadata"] == {"tag": "a"}
    patched = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {"tag": "b"}}, headers=auth(key))
    assert patched.status_code == 200 and patched.get_json()["metadata"] == {"tag": "b"}
    found = client.post("/v1/search", json={"library_id": lib["id"], "text": "tone", "k": 10,
                                            "filter": {"metadata": {"tag": "b"}}}, headers=auth(key)).get_json()
    assert [r["item_id"] for r in found["results"]] == [ids[name]]
    # If-Match: a PATCH made on what an earlier GET showed is refused (412) once the item has changed since,
    # so that the change made in between is not overwritten; the answer carries the new ETag
    read = client.get(f"/v1/items/{ids[name]}", headers=auth(key))
    tag = read.headers["ETag"]
    assert client.get(f"/v1/items/{ids[name]}", headers=auth(key)).headers["ETag"] == tag  # the same item, the same tag
    first = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {"tag": "c"}},
                         headers={**auth(key), "If-Match": tag})
    assert first.status_code == 200 and first.headers["ETag"] not in (None, tag), first.headers
    late = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {"tag": "d"}},
                        headers={**auth(key), "If-Match": tag})
    assert late.status_code == 412 and late.get_json()["error"]["code"] == "precondition_failed", late.get_json()
    assert first.headers["ETag"] in late.get_json()["error"]["message"]
    weak = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {"tag": "d"}},
                        headers={**auth(key), "If-Match": "W/" + first.headers["ETag"]})
    assert weak.status_code == 412 and "is a weak ETag, which If-Match never matches" in \
        weak.get_json()["error"]["message"], weak.get_json()
    assert client.get(f"/v1/items/{ids[name]}", headers=auth(key)).get_json()["metadata"] == {"tag": "c"}
    assert client.patch(f"/v1/items/{ids[name]}", json={"metadata": {"tag": "b"}},
                        headers={**auth(key), "If-Match": "*"}).status_code == 200
    for body in ({"metadata": [1]}, {"tag": "b"}, {"metadata": {}, "filename": "x"}, None):
        r = client.patch(f"/v1/items/{ids[name]}", json=body, headers=auth(key))
        assert r.status_code == 400 and "metadata" in r.get_json()["error"]["message"], body
    # a key it does not take is named, as every other JSON body's is (was only "send a JSON object like ...",
    # which did not say that a "filename" sent beside the metadata, or a misspelt "metdata", was the matter)
    for body, key_sent in (({"metadata": {}, "filename": "x"}, "filename"), ({"metdata": {"tag": "c"}}, "metdata")):
        r = client.patch(f"/v1/items/{ids[name]}", json=body, headers=auth(key))
        assert r.status_code == 400 and r.get_json()["error"]["message"].startswith(
            f"the body has {key_sent!r}, which PATCH /v1/items/<id> does not take; it takes 'metadata' only"), \
            r.get_json()
    r = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {"notes": "x" * (16 << 10)}}, headers=auth(key))
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "metadata_too_large", r.get_json()
    assert client.get(f"/v1/items/{ids[name]}", headers=auth(key)).get_json()["metadata"] == {"tag": "b"}
    assert client.patch(f"/v1/items/{ids[name]}", json={"metadata": {}}, headers=auth(new_key())).status_code == 404
    # metadata is measured as it comes back: Postgres writes 1e300 out in full, 301 digits, so 2,300 of them
    # (14 KB sent) made an item of 695 KB whose metadata GET gave could not be sent back (helper-52)
    huge = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {"n": [1e300] * 2300}}, headers=auth(key))
    assert huge.status_code == 413 and "as stored (numbers written out in full" in \
        huge.get_json()["error"]["message"], huge.get_json()
    # the answer and its ETag are the item as stored, as a GET gives it (1e20 was answered as sent, and its
    # ETag, sent back with If-Match, met a 412)
    patched = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {"n": 1e20, "tag": "b"}}, headers=auth(key))
    read = client.get(f"/v1/items/{ids[name]}", headers=auth(key))
    assert patched.get_json() == read.get_json() and read.get_json()["metadata"]["n"] == 10**20, patched.get_json()
    assert patched.headers["ETag"] == read.headers["ETag"]
    assert client.patch(f"/v1/items/{ids[name]}", json={"metadata": read.get_json()["metadata"]},
                        headers={**auth(key), "If-Match": patched.headers["ETag"]}).status_code == 200
    # conditional requests: a GET with the ETag held is a 304; If-None-Match on a PATCH is honoured; an
    # If-Match that is no ETag of this API is said to be none (it was "the item has changed since")
    tag = read.headers["ETag"]
    cached = client.get(f"/v1/items/{ids[name]}", headers={**auth(key), "If-None-Match": tag})
    assert cached.status_code == 304 and cached.data == b"", cached.status_code
    assert client.get(f"/v1/items/{ids[name]}", headers={**auth(key), "If-None-Match": '"other"'}).status_code == 200
    assert client.get(f"/v1/items/{ids[name]}", headers={**auth(key), "If-None-Match": "W/" + tag}).status_code == 304
    # If-Match on a GET is not a precondition here (werkzeug's answered 412 carrying the item, helper-53)
    assert client.get(f"/v1/items/{ids[name]}", headers={**auth(key), "If-Match": '"abc"'}).status_code == 200
    for header in ("*", tag):
        r = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {}}, headers={**auth(key), "If-None-Match": header})
        assert r.status_code == 412 and r.get_json()["error"]["message"].startswith("If-None-Match: the item exists"), r
    for header in ("garbage", '"garbage"'):
        r = client.patch(f"/v1/items/{ids[name]}", json={"metadata": {}}, headers={**auth(key), "If-Match": header})
        assert r.status_code == 412 and "is not an ETag this API gives" in r.get_json()["error"]["message"], r.get_json()
    assert client.get(f"/v1/items/{ids[name]}", headers=auth(key)).get_json()["metadata"] == {"n": 10**20, "tag": "b"}


def test_bytes_stored_already_take_the_path_new_ones_take(tmp_path):
    """Committing bytes the store holds already writes and renames them as new bytes are (a new inode,
    the same bytes): the stored file is every tenant's, and keeping it (no fsync, no rename) made such an
    upload answer sooner, which told a tenant that another holds the file (helper-35). A stored file that
    no longer hashes the same (cut short, or its bytes damaged, outside clapq) is replaced too."""
    store = BlobStore(tmp_path)
    data = bytes(range(256)) * 100
    sha = store.put_bytes(data)
    path = store.path_for(sha)
    inode = path.stat().st_ino
    assert store.put_bytes(data) == sha and path.stat().st_ino != inode and path.read_bytes() == data
    # the copy replaced is held open until release (the API's: once its answer is sent), so that its blocks
    # are not freed during the rename, which made such an upload the slower one (helper-37)
    import os
    from pathlib import Path

    def held() -> bool:
        fds = Path("/proc/self/fd")
        return any(os.readlink(fds / fd) == f"{path} (deleted)" for fd in os.listdir(fds)
                   if (fds / fd).is_symlink())

    w = store.writer()
    w.write(data)
    w.commit()
    assert held() and path.read_bytes() == data
    w.release()
    assert not held()
    # the API's way: after its answer, on the process's closer thread, so that neither the answer nor the
    # next request on the connection waits for the freeing (helper-38)
    import time

    w = store.writer()
    w.write(data)
    w.commit()
    assert held()
    w.release_later()
    deadline = time.monotonic() + 10
    while held() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not held()
    path.write_bytes(data[:100])
    assert store.put_bytes(data) == sha and path.read_bytes() == data
    path.write_bytes(bytes(len(data)))  # the right size, other bytes
    assert store.put_bytes(data) == sha and path.read_bytes() == data
    assert list(store.tmp_dir.iterdir()) == []


def _described(spec: dict, schema: dict | None, value, where: str) -> list[str]:
    """What of `value` (an answer's JSON) the spec's `schema` leaves out: a field it does not name, or a
    value of another JSON type, by where in the answer it is."""
    while schema and "$ref" in schema:
        schema = spec["components"][schema["$ref"].split("/")[-2]][schema["$ref"].split("/")[-1]]
    if not schema:
        return [f"{where}: no schema"]
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    python = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
              "integer": int, "number": (int, float)}
    if kinds and not any(isinstance(value, python[k]) and not (k in ("integer", "number") and isinstance(value, bool))
                         for k in kinds):
        return [f"{where}: {type(value).__name__}, described as {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    missing = []
    if isinstance(value, dict) and "properties" in schema:
        for k, v in value.items():
            if k not in schema["properties"]:
                missing.append(f"{where}.{k}: not described")
            else:
                missing += _described(spec, schema["properties"][k], v, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value[:3]):
            missing += _described(spec, schema["items"], v, f"{where}[{i}]")
    return missing


def test_the_api_description_names_what_the_api_answers(client, new_key, worker, settings, tmp_path):
    """/openapi.json against the answers of a real session: every status answered is one the operation lists,
    and every field of a JSON answer is one its schema names, of the type it gives (helper-52: search results
    lacked library_id and the window's times, Item, Library and Job fields the API gives, and several
    operations' statuses; a Flask route for static files answered that no operation describes)."""
    import re

    spec = client.get("/openapi.json").get_json()
    key = new_key()
    h = auth(key)
    seen, problems = set(), []

    def call(method: str, path: str, **kwargs):
        r = client.open(path.split("?")[0], method=method, headers={**h, **kwargs.pop("headers", {})},
                        query_string=path.partition("?")[2] or None, **kwargs)
        template = next((t for t in spec["paths"] if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", t),
                                                                  path.split("?")[0])), None)
        op = spec["paths"].get(template, {}).get(method.lower())
        if op is None:
            problems.append(f"{method} {path}: no operation")
            return r
        seen.add((template, method))
        answer = op["responses"].get(str(r.status_code))
        if answer is None:
            problems.append(f"{method} {template}: {r.status_code} not listed")
        elif r.is_json and r.status_code < 400:
            schema = answer.get("content", {}).get("application/json", {}).get("schema")
            problems.extend(f"{method} {template} {r.status_code} {p}" for p in _described(spec, schema, r.get_json(), ""))
        return r

    lib = call("POST", "/v1/libraries", json={"name": "described"}).get_json()
    paths = [write(tmp_path / f"d{i}.wav", 12.0 if i else 1.0, seed=i) for i in range(2)]
    up = call("POST", f"/v1/libraries/{lib['id']}/batches", data={
        "files": [(io.BytesIO(p.read_bytes()), p.name) for p in paths + paths[:1]],
        "metadata": '{"d0.wav": {"tag": "a"}}'}, content_type="multipart/form-data").get_json()
    job, item = up["job_id"], up["items"][1]["id"]
    assert wait_job(client, key, job)["status"] == "done"
    for method, path, kwargs in (
            ("GET", "/v1/libraries", {}), ("GET", f"/v1/libraries/{lib['id']}", {}),
            ("PATCH", f"/v1/libraries/{lib['id']}", {"json": {"name": "described"}}),
            ("GET", f"/v1/libraries/{lib['id']}/items", {}), ("GET", "/v1/jobs", {}), ("GET", f"/v1/jobs/{job}", {}),
            ("GET", f"/v1/jobs/{job}/items", {}), ("GET", f"/v1/items/{item}", {}),
            ("PATCH", f"/v1/items/{item}", {"json": {"metadata": {"tag": "b"}}}),
            ("GET", f"/v1/items/{item}/embedding", {}), ("GET", f"/v1/items/{item}/segments?vectors=1", {}),
            ("GET", f"/v1/items/{item}/audio", {}), ("GET", f"/v1/items/{item}/duplicates", {}),
            ("POST", f"/v1/items/{item}/audio-link?expires_in_s=60", {}),
            ("GET", f"/v1/search?library_id={lib['id']}&q=tone", {}),
            ("POST", "/v1/search", {"json": {"library_id": lib["id"], "text": "tone", "mode": "segments"}}),
            ("POST", "/v1/search", {"json": {"library_ids": [lib["id"]], "item_id": item}}),
            ("POST", f"/v1/libraries/{lib['id']}/classify", {"json": {"labels": ["a", "b"]}}),
            ("POST", f"/v1/items/{item}/classify", {"json": {"labels": ["a", "b"]}}),
            ("POST", f"/v1/libraries/{lib['id']}/known", {"json": {"sha256": ["0" * 64]}}),
            ("POST", f"/v1/libraries/{lib['id']}/moves", {"json": {"moves": []}}),
            ("GET", "/v1/limits", {}), ("POST", f"/v1/jobs/{job}/cancel", {}), ("POST", f"/v1/jobs/{job}/retry", {}),
            ("GET", "/healthz", {}), ("GET", "/readyz", {}), ("GET", "/metrics", {}), ("GET", "/openapi.json", {}),
            ("POST", "/v1/search", {"json": {"library_id": lib["id"], "text": "x", "k": 0}}),
            # a body over the 16 MiB limit of JSON: a 413 each operation that reads one lists (helper-73: five did not)
            *(("POST", path, {"data": b"{}" + b" " * (17 << 20)}) for path in (
                "/v1/libraries", f"/v1/libraries/{lib['id']}/known", "/v1/search",
                f"/v1/libraries/{lib['id']}/classify", f"/v1/items/{item}/classify")),
            ("POST", f"/v1/libraries/{lib['id']}/deletions",
             {"json": {"item_ids": [up["items"][0]["id"], "5f1c0000-0000-4000-8000-00000000dead"]}}),
            ("POST", f"/v1/libraries/{lib['id']}/reembed", {"json": {"name": "again"}}),  # 409: the served model
            ("DELETE", f"/v1/items/{item}", {}), ("DELETE", f"/v1/libraries/{lib['id']}", {})):
        call(method, path, **kwargs)
    # a library of another model, embedded again into a new one (tests.test_reembed)
    old = call("POST", "/v1/libraries", json={"name": "described, old"}).get_json()
    up = call("POST", f"/v1/libraries/{old['id']}/batches", content_type="multipart/form-data",
              data={"files": [(io.BytesIO(paths[0].read_bytes()), "o.wav")]}).get_json()
    assert wait_job(client, key, up["job_id"])["status"] == "done"
    retire(settings.database_url, old["id"])
    assert call("POST", f"/v1/libraries/{old['id']}/reembed", json={"name": "described, new"}).status_code == 202
    assert client.get("/static/x.txt").get_json()["error"]["message"].startswith("no endpoint")  # Flask's: none
    # OPTIONS of each path (api.errors.options): a 204 whose Allow names the methods described, and a browser's
    # CORS preflight a 403 (helper-143: neither was described; /healthz's was Flask's empty 200, text/html)
    ids = {"library_id": lib["id"], "job_id": job, "item_id": item}
    for template, ops in spec["paths"].items():
        path = re.sub(r"\{(\w+)\}", lambda m: ids[m[1]], template)
        plain = call("OPTIONS", path)
        allowed = set(plain.headers.get("Allow", "").split(", ")) - {"HEAD"}
        assert plain.status_code == 204 and allowed == {m.upper() for m in ops}, (template, plain.status_code, allowed)
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        assert call("OPTIONS", path, headers=preflight).get_json()["error"]["code"] == "cross_origin_not_allowed"
    assert problems == [], "\n".join(problems)
    # and every operation is one of them
    assert {(t, m.upper()) for t, ops in spec["paths"].items() for m in ops} - seen == set()
