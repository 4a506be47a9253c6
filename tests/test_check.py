"""`clapq check --verify`: how it reads the store (a bounded pace, its progress, a file that cannot be read).
The cases of a running service (a file removed, damaged, held by none, in flight) are in test_cli.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import requests

from api.items import DOWNLOAD_BLOCK
from clapq import check as checking
from clapq.blobs import BlobStore, file_sha256
from tests.audio import write
from tests.conftest import auth
from tests.test_e2e import upload


def _stored(client, key, tmp_path, n: int, seed: int) -> dict[str, str]:
    """n new files uploaded (not embedded: no worker is needed to store them); {filename: sha256}."""
    lib = client.post("/v1/libraries", json={"name": f"check-{seed}"}, headers=auth(key)).get_json()["id"]
    paths = [write(tmp_path / f"c{seed}-{i}.wav", 1.0 + i, 22_050, 1, freq=300 + 50 * i, seed=seed + i)
             for i in range(n)]
    r = upload(client, key, lib, paths)
    assert r.status_code == 202, r.get_json()
    return {it["filename"]: client.get(f"/v1/items/{it['id']}", headers=auth(key)).get_json()["sha256"]
            for it in r.get_json()["items"]}


def test_verify_reads_at_its_rate_and_says_how_far_it_is(client, new_key, settings, tmp_path, monkeypatch):
    """A --verify of a large store reads at most --rate bytes a second (it waits for the rest) and says how far
    it is every PROGRESS_S; here every block, and the waits it asks for recorded instead of slept."""
    shas = _stored(client, new_key(), tmp_path, 3, seed=40)
    store = BlobStore(settings.blob_dir)
    total = sum(store.path_for(s).stat().st_size for s in shas.values())
    said, waits = [], []
    monkeypatch.setattr(checking, "PROGRESS_S", 0)
    monkeypatch.setattr(checking.time, "sleep", waits.append)
    report = checking.check(settings.database_url, settings.blob_dir, verify=True, rate=1.0, say=said.append)
    assert report["verified"] and not report["damaged"], report
    assert said and all(line.startswith("verified ") and " stored files (" in line for line in said), said
    # at 1 byte a second, the wait asked for after the last block is for about every byte read (less the time
    # the reading took)
    assert len(waits) >= 3 and max(waits) > total / 2, (waits, total)
    waits.clear()
    checking.check(settings.database_url, settings.blob_dir, verify=True, rate=0, say=said.append)
    assert waits == []  # 0: no bound


def test_a_stored_file_that_cannot_be_read_is_damaged(client, new_key, settings, env, tmp_path, eio_library):
    """A stored file whose read fails partway (EIO: a failing disk; real read errors, from an LD_PRELOAD library)
    is listed as damaged, saying why, and the check goes on to the other files, where it stopped at the first
    such file with the error alone."""
    from tests import eio

    shas = _stored(client, new_key(), tmp_path, 2, seed=50)
    store = BlobStore(settings.blob_dir)
    bad, good = shas["c50-0.wav"], shas["c50-1.wav"]
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "check", "--verify", "--json"], capture_output=True,
                         text=True, timeout=300, env={**env, **eio.env(eio_library, [store.path_for(bad)])})
    report = json.loads(out.stdout)
    assert out.returncode == 1, out.stderr
    damaged = {e["sha256"]: e for e in report["damaged"]}
    assert damaged[bad]["hashes_to"] == "not readable (Input/output error)", damaged
    assert [i["filename"] for i in damaged[bad]["items"]] == ["c50-0.wav"]
    assert good not in damaged


def test_a_rate_that_is_no_rate_is_a_usage_error(env):
    """--rate -1 read as no bound (a negative wait is none), and 'nan' the same: said, before anything is read."""
    for raw in ("-1", "nan", "fast"):
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "check", "--verify", "--rate", raw],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 2 and f"{raw!r} is not a rate: give MB a second" in out.stderr, out.stderr


def test_many_files_no_item_holds_are_counted_and_the_first_named(settings):
    """21 stray files in the store: the words name the first ORPHANS_SHOWN and count the rest (20,000 of them,
    left by a crash, were 20,000 lines with nothing in them to mend), --json lists every one. A part being
    uploaded (blobs/tmp) is neither."""
    import hashlib

    store, strays = BlobStore(settings.blob_dir), []
    writing = store.writer()  # an upload's part arriving: a temporary file, none of the check's business
    writing.write(b"part of a file")
    try:
        for i in range(21):
            data = f"stray {i}".encode()
            sha = hashlib.sha256(data).hexdigest()
            store.path_for(sha).parent.mkdir(parents=True, exist_ok=True)
            store.path_for(sha).write_bytes(data)
            strays.append(sha)
        report = checking.check(settings.database_url, settings.blob_dir)
        assert set(strays) <= {o["sha256"] for o in report["orphans"]} and not report["ok"]
        lines = checking.describe(report, settings.blob_dir)
        unheld = {o["sha256"] for o in report["orphans"]}
        named = [line for line in lines if line.startswith("  ") and line.split()[0] in unheld]
        assert len(named) == checking.ORPHANS_SHOWN == 20, lines
        more = len(report["orphans"]) - 20
        assert f"  and {more} more (--json lists every one)" in lines, lines
        assert writing.tmp_path.exists() and not [o for o in report["other_files"] if o["path"].startswith("tmp/")]
    finally:
        writing.discard()
        for sha in strays:
            store.path_for(sha).unlink()


def test_a_store_that_holds_none_of_the_items_files_is_asked_about(client, new_key, env, tmp_path):
    """CLAPQ_BLOB_DIR set to another folder than the service's: every item's file is missing, which is said
    first, before the list, as a store that may not be this database's."""
    _stored(client, new_key(), tmp_path, 2, seed=60)
    other = tmp_path / "other-blobs"
    other.mkdir()
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "check"], capture_output=True, text=True, timeout=120,
                         env={**env, "CLAPQ_BLOB_DIR": str(other)})
    assert out.returncode == 1, out.stderr
    first = out.stdout.splitlines()[1]
    assert first.startswith("none of the ") and f"is in {other}: is it this service's store" in first, out.stdout


def test_a_failed_file_whose_stored_copy_is_missing_is_told_how_to_send_it(client, new_key, settings, env,
                                                                          tmp_path):
    """A failed item (its bytes not audio) whose stored copy is gone: the advice that mends the others, `clapq upload`
    of its folder or with --resend, leaves it out as failed before, so the check names --retry-failed for it (found
    by hand: check listed it again after both)."""
    from sqlalchemy import text

    from clapq.db import session_scope

    sha = _stored(client, new_key(), tmp_path, 1, seed=70)["c70-0.wav"]
    # not while a worker embeds it (one of the suite's may be running): its write marks the file done, whatever
    # was set meanwhile (the clean-clone run of session 36 lost that race); queued, a worker no longer claims it
    deadline = time.monotonic() + 120
    while True:
        with session_scope(settings.database_url) as s:
            if s.execute(text("UPDATE items SET status = 'failed', error = 'not a readable audio file' "
                              "WHERE sha256 = :s AND status <> 'running'"), {"s": sha}).rowcount:
                break
        assert time.monotonic() < deadline, "the file is still being embedded"
        time.sleep(0.2)
    stored = BlobStore(settings.blob_dir).path_for(sha)
    kept = stored.read_bytes()
    stored.unlink()
    try:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "check"], capture_output=True, text=True,
                             timeout=120, env=env)
    finally:
        stored.write_bytes(kept)
    assert out.returncode == 1, out.stderr
    assert "'c70-0.wav', failed" in out.stdout, out.stdout
    assert ("a failed one, which `clapq upload` leaves out as failed before: `clapq upload FILE --library LIBRARY "
            "--retry-failed` sends it again") in out.stdout, out.stdout



def test_a_download_of_a_damaged_stored_file_is_cut_off_not_a_good_looking_whole(client, new_key, settings,
                                                                                  start_api, tmp_path):
    """A stored file whose bytes no longer hash to its name (bit rot: a byte flipped) was downloaded whole, a 200
    with the uploaded file's ETag (its sha256) and length: damaged bytes that looked like the good ones, and only
    `clapq check --verify` could tell. A download of the whole file is hashed as it goes out now, and its last
    block held back until the hash is known: where it is not the name, the connection is cut there (the client
    sees a body shorter than its Content-Length, never a whole 200), and the API's log says which file and to run
    `clapq check --verify`, in one line (gunicorn's "Error handling request" and a traceback repeated it). The good
    file beside it, and a range of the damaged one, are served as before."""
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "damaged-download"}, headers=auth(key)).get_json()["id"]
    # d0 longer than a block (api.items.DOWNLOAD_BLOCK), so that blocks of it are sent before the hash is known
    paths = [write(tmp_path / f"d{i}.wav", s, 22_050, 1, freq=300 + 50 * i, seed=80 + i)
             for i, s in enumerate((30.0, 3.0, 3.0))]
    assert paths[0].stat().st_size > DOWNLOAD_BLOCK > paths[2].stat().st_size
    r = upload(client, key, lib, paths)
    assert r.status_code == 202, r.get_json()
    ids = {it["filename"]: it["id"] for it in r.get_json()["items"]}
    bad = BlobStore(settings.blob_dir).path_for(file_sha256(paths[0]))
    damaged = bytearray(paths[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # same size, one bit other
    base, h = start_api(), auth(key)
    bad.write_bytes(bytes(damaged))
    small = BlobStore(settings.blob_dir).path_for(file_sha256(paths[2]))
    small.write_bytes(paths[1].read_bytes())  # d2's stored file has d1's bytes: no longer its name
    try:
        # a file of one block: nothing sent before the hash is known, so a 500, no bytes of it
        got = requests.get(f"{base}/v1/items/{ids['d2.wav']}/audio", headers=h, timeout=60)
        assert got.status_code == 500 and got.json()["error"]["code"] == "internal_error", (got.status_code, got.text)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # urllib3: IncompleteRead
            got = requests.get(f"{base}/v1/items/{ids['d0.wav']}/audio", headers=h, timeout=60)
            pytest.fail(f"a whole answer: {got.status_code}, {len(got.content)} of {len(damaged)} bytes, "
                        f"{'the damaged ones' if got.content == bytes(damaged) else 'others'}")
        # a range of it is not hashed (that would read the whole file for a few bytes): served as stored
        part = requests.get(f"{base}/v1/items/{ids['d0.wav']}/audio", headers={**h, "Range": "bytes=0-99"}, timeout=60)
        assert part.status_code == 206 and part.content == bytes(damaged[:100])
        # the whole file as a range (as a browser's player asks) is hashed as a 200 is
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(f"{base}/v1/items/{ids['d0.wav']}/audio", headers={**h, "Range": "bytes=0-"}, timeout=60)
    finally:
        bad.write_bytes(paths[0].read_bytes())
        small.write_bytes(paths[2].read_bytes())
    good = requests.get(f"{base}/v1/items/{ids['d1.wav']}/audio", headers=h, timeout=60)
    assert good.status_code == 200 and good.content == paths[1].read_bytes()
    whole = requests.get(f"{base}/v1/items/{ids['d0.wav']}/audio", headers=h, timeout=60)  # mended
    assert whole.status_code == 200 and whole.content == paths[0].read_bytes()
    log = (tmp_path / "api0.log").read_text()
    assert f"the stored file {file_sha256(paths[0])} of item {ids['d0.wav']} is damaged" in log, log[-3000:]
    assert "run `clapq check --verify`" in log, log[-3000:]
    # clapq's line alone: gunicorn logged the cut again, "Error handling request" and a traceback repeating it
    assert "Error handling request" not in log and "Traceback" not in log, log[-3000:]


def _read_by(log: str) -> int:
    """Bytes the API's gunicorn workers (their pids from its log) have read from files so far."""
    pids = re.findall(r"Booting worker with pid: (\d+)", log)
    assert pids, log[-3000:]
    return sum(int(next(line for line in open(f"/proc/{pid}/io") if line.startswith("rchar:")).split()[1])
               for pid in pids)


def test_a_range_of_a_stored_file_reads_that_range_not_the_bytes_before_it(client, new_key, start_api, tmp_path):
    """A range that starts far into a file (a browser's player seeking to a window of a long recording) read every
    byte before it and threw them away, 8 KiB at a time, under gunicorn: werkzeug skips by reading where its file
    wrapper cannot seek, and gunicorn's (wsgi.file_wrapper) cannot, where the test client's can. A seek to minute 13
    of a 20-minute FLAC read 62 MB for 30 MB sent. A range is read from its start now."""
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "ranges"}, headers=auth(key)).get_json()["id"]
    path = write(tmp_path / "long.wav", 60.0, 48_000, 1, freq=440, seed=7)  # 5.8 MB
    whole = path.read_bytes()
    r = upload(client, key, lib, [path])
    assert r.status_code == 202, r.get_json()
    url = f"{start_api()}/v1/items/{r.get_json()['items'][0]['id']}/audio"
    log = tmp_path / "api0.log"
    for rng, first, last in (("bytes=-100", len(whole) - 100, len(whole) - 1), ("bytes=5000000-", 5_000_000,
                             len(whole) - 1), ("bytes=4000000-4000999", 4_000_000, 4_000_999)):
        before = _read_by(log.read_text())
        got = requests.get(url, headers={**auth(key), "Range": rng}, timeout=60)
        read = _read_by(log.read_text()) - before
        assert got.status_code == 206 and got.content == whole[first:last + 1], (rng, got.status_code)
        assert got.headers["Content-Range"] == f"bytes {first}-{last}/{len(whole)}", got.headers
        assert read < last + 1 - first + 2 * DOWNLOAD_BLOCK, (rng, read)
