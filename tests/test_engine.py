"""The embedding engine: timed segments, per-window parity, determinism, and decoder isolation."""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from clapq.blobs import BlobStore
from tests.audio import long_silence, write
from tests.conftest import auth, job_of_own, wait_job
from tests.reference import audio_48k, load_reference, reference_embed
from tests.test_e2e import upload
from worker.audio import DecodeError
from worker.decoder import Abandoned, DecoderProcess


@pytest.fixture(scope="module")
def reference(tiny_model):
    return load_reference(tiny_model)


def test_long_file_segments_match_reference_windows(client, new_key, worker, tmp_path, reference):
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "long"}, headers=auth(key)).get_json()
    path = write(tmp_path / "long.flac", 23.0, 16_000, 2, freq=330, seed=3)
    up = upload(client, key, lib["id"], [path]).get_json()
    assert wait_job(client, key, up["job_id"])["status"] == "done"
    item_id = up["items"][0]["id"]
    segs = client.get(f"/v1/items/{item_id}/segments?vectors=1", headers=auth(key)).get_json()["segments"]
    # 10 s windows every 5 s, the last one ending at the end of the file
    assert [(s["start_s"], s["end_s"]) for s in segs] == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (13.0, 23.0)]
    assert "vector" not in client.get(f"/v1/items/{item_id}/segments", headers=auth(key)).get_json()["segments"][0]

    audio = audio_48k(path)
    vecs = np.array([s["vector"] for s in segs], dtype=np.float32)
    for s, v in zip(segs, vecs):
        start = int(round(s["start_s"] * 48_000))
        ref = reference_embed(reference, audio[start : start + 480_000])
        assert float(ref @ v) >= 0.9999, s
    pooled = np.array(client.get(f"/v1/items/{item_id}/embedding", headers=auth(key)).get_json()["vector"])
    mean = vecs.mean(axis=0)
    np.testing.assert_allclose(pooled, mean / np.linalg.norm(mean), atol=1e-5)


def test_same_file_same_vectors_whatever_the_batch(client, new_key, worker, tmp_path):
    """Bit-for-bit: alone, with other files around it, in another order, in another library."""
    key = new_key()
    target = write(tmp_path / "target.wav", 12.5, 44_100, 2, freq=500, seed=42)
    others = [write(tmp_path / f"o{i}.wav", 1.0 + 3 * i, 48_000, 1, freq=100 * (i + 2), seed=i) for i in range(5)]
    seen = []
    for n, batch in enumerate([[target], others[:3] + [target] + others[3:], [others[4], target]]):
        lib = client.post("/v1/libraries", json={"name": f"d{n}"}, headers=auth(key)).get_json()
        up = upload(client, key, lib["id"], batch).get_json()
        assert wait_job(client, key, up["job_id"])["status"] == "done"
        tid = next(i["id"] for i in up["items"] if i["filename"] == "target.wav")
        segs = client.get(f"/v1/items/{tid}/segments?vectors=1", headers=auth(key)).get_json()["segments"]
        seen.append(np.array([s["vector"] for s in segs], dtype=np.float32))
    assert seen[0].shape == (2, 512)  # 0-10 s and 2.5-12.5 s
    assert all(np.array_equal(seen[0], s) for s in seen[1:])


@pytest.fixture()
def fifo(tmp_path):
    path = tmp_path / "hangs.wav"
    os.mkfifo(path)  # opening it for reading blocks forever: a decoder that hangs
    return path


def test_decoder_hang_is_killed_and_the_next_file_decodes(fifo, tmp_path):
    """A decoder blocked in its read of the file (a FIFO: as a blob store on a hung network mount, or a machine too
    busy to give it its share) is killed at the clock's limit, and the file fails, but not for a reason in its bytes:
    it has used nothing like its CPU limit. Before, the clock's limit failed it as the file's, and `clapq upload` left
    the file out of every later run."""
    good = write(tmp_path / "good.wav", 1.0)
    d = DecoderProcess()
    try:
        d.decode(good, tmp_path / "warm.f32", timeout_s=60, max_duration_s=None)  # started: ready for the file at once
        t0 = time.monotonic()
        with pytest.raises(DecodeError, match=r"longer than 2 s \(CLAPQ_DECODE_TIMEOUT_S\), in which the decoder "
                                              r"worked \d+\.\d s of CPU time: the machine was too busy") as err:
            d.decode(fifo, tmp_path / "out1.f32", timeout_s=2, max_duration_s=None, cpu_s=1)
        assert not err.value.in_file
        assert time.monotonic() - t0 < 30 and d.proc is None
        info, n = d.decode(good, tmp_path / "out2.f32", timeout_s=60, max_duration_s=None)
        assert n == 48_000 and info.sample_rate == 48_000
    finally:
        d.close()


def test_a_decoder_that_works_past_its_cpu_limit_fails_in_the_files_bytes(tmp_path):
    """A file whose decoding takes more than its CPU limit of the decoder's own time (30 minutes of silence at
    192 kHz, a few seconds of a core, given half a second here: as a codec that spins on crafted bytes) fails as
    the file's, with the clock's limit far off; its child is killed and the next file decodes in a new one. The
    limit is each file's own: a long-lived child that has worked longer than it on earlier files, and a new
    child's start, count for nothing."""
    import psutil

    huge = long_silence(tmp_path / "huge.flac", 30)
    good = write(tmp_path / "good.wav", 1.0)
    d = DecoderProcess()
    try:
        d.decode(good, tmp_path / "warm.f32", timeout_s=60, max_duration_s=None)
        pid = d.proc.pid
        with pytest.raises(DecodeError, match="longer than"):  # 6 of its 30 minutes, with no CPU limit
            d.decode(huge, tmp_path / "part.f32", timeout_s=120, max_duration_s=360)
        (tmp_path / "part.f32").unlink()
        worked = psutil.Process(pid).cpu_times()
        below = (worked.user + worked.system) / 2  # a limit less than this child has worked in all
        info, n = d.decode(good, tmp_path / "again.f32", timeout_s=60, max_duration_s=None, cpu_s=below)
        assert n == 48_000 and d.proc.pid == pid
        with pytest.raises(DecodeError, match=r"^decoding took more than 0.5 s of the decoder's CPU time "
                                              r"\(CLAPQ_DECODE_CPU_S\); gave up$") as err:
            d.decode(huge, tmp_path / "out.f32", timeout_s=120, max_duration_s=None, cpu_s=0.5)
        assert err.value.in_file and d.proc is None
        info, n = d.decode(good, tmp_path / "next.f32", timeout_s=60, max_duration_s=None, cpu_s=0.5)
        assert n == 48_000 and d.proc.pid != pid
    finally:
        d.close()


def test_a_decode_stops_once_its_file_is_no_longer_wanted(fifo, tmp_path):
    """`stop()` turning true while a file decodes (the file deleted, its job cancelled) stops the child at
    once: Abandoned, not the timeout's DecodeError 60 s later; the next file decodes in a new child."""
    good = write(tmp_path / "good.wav", 1.0)
    d = DecoderProcess()
    unwanted = threading.Event()
    try:
        d.decode(good, tmp_path / "warm.f32", timeout_s=60, max_duration_s=None)
        pid = d.proc.pid
        threading.Timer(1.0, unwanted.set).start()
        with pytest.raises(Abandoned):
            d.decode(fifo, tmp_path / "out.f32", timeout_s=60, max_duration_s=None, stop=unwanted.is_set)
        assert d.proc is None
        info, n = d.decode(good, tmp_path / "again.f32", timeout_s=60, max_duration_s=None, stop=lambda: False)
        assert n == 48_000 and d.proc.pid != pid
    finally:
        d.close()


def test_decoder_crash_fails_only_that_file(fifo, tmp_path):
    """A decoder that dies on a file twice fails that file (signal named); the next file decodes in a new
    child. One that dies once (killed from outside: the OOM killer, an operator) is not the file's fault:
    the file is tried again in a new child and decodes."""
    good = write(tmp_path / "good.wav", 1.0)
    d = DecoderProcess()

    def crash():  # the codec segfaults mid-file: whichever child holds the file now
        while (proc := d.proc) is None:  # between one child's end and the next one's start
            time.sleep(0.05)
        os.kill(proc.pid, 11)

    try:
        d.decode(good, tmp_path / "warm.f32", timeout_s=60, max_duration_s=None)
        pid = d.proc.pid
        threading.Timer(1.0, crash).start()
        threading.Timer(4.0, crash).start()
        with pytest.raises(DecodeError, match=r"crashed on this file, twice \(signal 11\)") as err:
            d.decode(fifo, tmp_path / "out.f32", timeout_s=60, max_duration_s=None)
        assert err.value.in_file  # a crash in the codec, in two children: the file's bytes
        info, n = d.decode(good, tmp_path / "again.f32", timeout_s=60, max_duration_s=None)
        assert n == 48_000 and d.proc.pid != pid
        # killed once while on a good file (it waits on a pipe that becomes that file when the kill comes)
        later = tmp_path / "later.wav"
        os.mkfifo(later)

        def killed_from_outside():
            while (proc := d.proc) is None:
                time.sleep(0.05)
            os.kill(proc.pid, 9)
            os.replace(good, later)

        threading.Timer(1.0, killed_from_outside).start()
        info, n = d.decode(later, tmp_path / "retried.f32", timeout_s=60, max_duration_s=None)
        assert n == 48_000 and info.sample_rate == 48_000
    finally:
        d.close()


def test_a_decoder_killed_from_outside_twice_is_not_the_files_fault(fifo, tmp_path):
    """Two SIGKILLs (the OOM killer making room on a loaded machine, at each of the file's two children) fail the
    file, but not for a reason in its bytes: only a crash of the decoder's own (SIGSEGV, SIGBUS, SIGABRT...) is.
    The file was marked as its bytes' and left out of every later `clapq upload` run."""
    d = DecoderProcess()

    def killed():
        while (proc := d.proc) is None:
            time.sleep(0.05)
        os.kill(proc.pid, 9)

    try:
        d.decode(write(tmp_path / "good.wav", 1.0), tmp_path / "warm.f32", timeout_s=60, max_duration_s=None)
        threading.Timer(1.0, killed).start()
        threading.Timer(4.0, killed).start()
        with pytest.raises(DecodeError, match=r"crashed on this file, twice \(signal 9\)") as err:
            d.decode(fifo, tmp_path / "out.f32", timeout_s=60, max_duration_s=None)
        assert not err.value.in_file
    finally:
        d.close()


def test_a_decoder_child_of_other_code_than_its_parent_blames_no_file(tmp_path, monkeypatch, caplog):
    """A decoder child is a fresh interpreter that runs the code it finds now: after clapq was upgraded in place
    (`git pull`, `pip install -U`) under a running worker, or where `python -m` finds another copy of it first,
    other code than its parent's, here one that answers a status the parent does not know, and the parent failed
    the good file with the child's answer for a reason ("{'sample_rate': 48000, ...}", in its bytes). A child
    starts in the folder of its parent's own packages, so a copy in the working directory or on PYTHONPATH (a
    checkout beside a non-editable install) is not what it runs; and neither the child's check (the code it
    loaded against the parent's, passed on its command line) nor the parent's (the code on disk against its own,
    before it starts a child) lets a file be blamed: CodeChanged, which stops the worker (tests/test_faults.py),
    saying which of the two it is."""
    import clapq
    import worker
    import worker.decoder
    from worker import CodeChanged

    good = write(tmp_path / "good.wav", 1.0)
    code = tmp_path / "code"
    for pkg in (Path(clapq.__file__).parent, Path(worker.__file__).parent):
        shutil.copytree(pkg, code / pkg.name, ignore=shutil.ignore_patterns("__pycache__"))
    child = code / "worker" / "decoder.py"
    child.write_text(child.read_text().replace('reply = ("ok", ', 'reply = ("decoded", '))
    monkeypatch.chdir(code)  # `python -m` looks in the working directory first
    monkeypatch.setenv("PYTHONPATH", str(code))
    d = DecoderProcess()
    try:
        # the changed copy in the working directory and on PYTHONPATH is not what the child runs: it decodes
        # (before: CodeChanged, the worker stopped, and stopped again each time it was restarted there)
        info, n = d.decode(good, "good.f32", timeout_s=60, max_duration_s=None)  # a relative path: the caller's
        assert n == 48_000 and (code / "good.f32").stat().st_size == 4 * 48_000
        # a child that runs another copy all the same (here: its root pointed at the copy) says so
        d.kill()  # as a crash, a timeout or the OOM killer ends one: the next file starts a new child
        monkeypatch.setattr(worker.decoder, "CODE_ROOT", code)
        with pytest.raises(CodeChanged, match="found another copy of clapq first") as err:
            d.decode(good, tmp_path / "b.f32", timeout_s=60, max_duration_s=None)
        assert not err.value.upgraded and d.proc is None
        said = [r.messages for r in caplog.records if r.getMessage() == "the decoder wrote messages about this file"]
        assert said == [f"this decoder runs the code in {code}, other than its parent's"], said
        # this process's own code changed on disk: no child is started at all
        monkeypatch.undo()
        monkeypatch.setattr(worker, "CODE", "0" * 64)
        with pytest.raises(CodeChanged, match="changed on disk since this process started") as err:
            d.decode(good, tmp_path / "c.f32", timeout_s=60, max_duration_s=None)
        assert err.value.upgraded and d.proc is None
        monkeypatch.undo()  # the same code again: decodes
        info, n = d.decode(good, tmp_path / "d.f32", timeout_s=60, max_duration_s=None)
        assert n == 48_000
    finally:
        d.close()


def test_what_a_codec_prints_is_one_log_line_naming_the_item(tmp_path, caplog):
    """libmpg123 prints a line on stderr for each damaged frame of an MP3 it decodes anyway. The decoder
    child's stderr is logged as one line per file, with the ids the caller passed, instead of running
    into the worker's JSON log as bare text; a clean file logs nothing."""
    import logging

    from tests.make_audio import Unavailable, tone_and_chirp, write_av

    try:
        mp3 = write_av(tmp_path / "a.mp3", tone_and_chirp(5.0, 44_100, 2), 44_100, "mp3", "libmp3lame", "fltp")
    except Unavailable as exc:
        pytest.skip(str(exc))
    data = bytearray(mp3.read_bytes())
    rng = np.random.default_rng(0)
    for at in range(2000, len(data) - 100, 1500):  # a few bytes of side information in frames here and there
        data[at + 6 : at + 12] = rng.integers(0, 256, 6, dtype=np.uint8).tobytes()
    mp3.write_bytes(bytes(data))
    d = DecoderProcess()
    try:
        with caplog.at_level(logging.INFO, logger="worker.decoder"):
            info, n = d.decode(mp3, tmp_path / "out.f32", timeout_s=60, max_duration_s=None,
                               log_extra={"item_id": "item-1"})
            assert n == 240_000 and info.format == "mp3"
            said = [r for r in caplog.records if r.getMessage() == "the decoder wrote messages about this file"]
            assert len(said) == 1 and said[0].item_id == "item-1", caplog.records
            assert "libmpg123" in said[0].messages and said[0].file == mp3.name, said[0].messages
            caplog.clear()
            d.decode(write(tmp_path / "clean.wav", 1.0), tmp_path / "out2.f32", timeout_s=60, max_duration_s=None)
            assert caplog.records == []
            # a child that died leaving a long traceback: a warning with its start and its last line
            os.write(d.messages, b"Traceback (most recent call last):\n" + b"  x\n" * 1000 + b"TypeError: why")
            d._report(mp3, None, died=True)
            (said,) = caplog.records
            assert said.levelno == logging.WARNING and said.messages.startswith("Traceback"), said.messages
            assert said.messages.endswith("TypeError: why") and "bytes left out" in said.messages
            assert os.fstat(d.messages).st_size == 0
    finally:
        d.close()


def cached_bytes(path: Path) -> int:
    """How many of a file's bytes the page cache holds (util-linux's fincore)."""
    if shutil.which("fincore") is None:
        pytest.skip("needs util-linux's fincore")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def test_a_blob_leaves_the_page_cache_once_decoded(tmp_path):
    """A blob is written once (the API), and stays in the page cache for the one read that needs it soon:
    a decoder child's, which then drops its pages (clapq.pagecache), failed or not."""
    control = write(tmp_path / "control.wav", 5.0, 44_100, 2)
    if cached_bytes(control) == 0:
        pytest.skip("this filesystem keeps no written pages in the page cache")
    store = BlobStore(tmp_path / "blobs")
    blob = store.path_for(store.put_bytes(control.read_bytes()))
    assert cached_bytes(blob) >= blob.stat().st_size  # whole pages
    d = DecoderProcess()
    try:
        info, n = d.decode(blob, tmp_path / "out.f32", timeout_s=60, max_duration_s=None)
        assert n == 240_000 and info.channels == 2
        assert cached_bytes(blob) == 0
        not_audio = store.path_for(store.put_bytes(b"not audio at all" * 1000))
        assert cached_bytes(not_audio) > 0
        with pytest.raises(DecodeError):  # a file that fails is dropped too
            d.decode(not_audio, tmp_path / "out2.f32", timeout_s=60, max_duration_s=None)
        assert cached_bytes(not_audio) == 0
    finally:
        d.close()
    from clapq.pagecache import drop_cached

    os.mkfifo(tmp_path / "pipe")
    drop_cached(tmp_path / "pipe")  # returns at once: a pipe in a blob's place hangs no decoder


def test_decoding_into_a_file_an_earlier_try_filled_leaves_only_this_try(tmp_path):
    """The decoder writes into the file the worker made, without truncating it first (see decode_to_file);
    what a crashed earlier try left past this one's end is cut, and the samples are decode()'s."""
    from worker.audio import decode, decode_to_file

    src = write(tmp_path / "a.wav", 2.0, 44_100, 2)
    out = tmp_path / "out.f32"
    out.write_bytes(b"\x7f" * 5_000_000)
    info, n = decode_to_file(src, out)
    samples, _ = decode(src)
    assert out.stat().st_size == 4 * n and np.array_equal(np.fromfile(out, np.float32), samples)
    assert info.sample_rate == 44_100 and info.channels == 2


def job_status(settings, job_id: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from clapq.db import session_scope
    from clapq.models import Item

    with session_scope(settings.database_url) as s:
        return dict(s.execute(select(Item.status, func.count()).where(Item.job_id == uuid.UUID(job_id))
                              .group_by(Item.status)).all())


def job_of_blobs(settings, lib_id: str, known_item_id: str, files: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """A job in the library of `known_item_id` whose items are these (filename, sha256) blobs: rows only,
    no message sent; returns the job id and the item ids."""
    from clapq.db import session_scope
    from clapq.models import Item, Job

    with session_scope(settings.database_url) as s:
        tenant = s.get(Item, uuid.UUID(known_item_id)).tenant_id
        job = Job(tenant_id=tenant, library_id=uuid.UUID(lib_id))
        s.add(job)
        s.flush()
        items = [Item(tenant_id=tenant, library_id=job.library_id, job_id=job.id, sha256=sha, filename=name,
                      size_bytes=0) for name, sha in files]
        s.add_all(items)
        s.flush()
        return str(job.id), [str(i.id) for i in items]


def queued_files(client, key: str, settings, tmp_path, library: str, files: list[tuple[str, float, int]]):
    """A new library with one embedded file, then a job of these generated files (name, seconds, seed):
    rows only, no message sent. Returns the job id and the item ids."""
    lib = client.post("/v1/libraries", json={"name": library}, headers=auth(key)).get_json()
    first = upload(client, key, lib["id"], [write(tmp_path / f"{library}-first.wav", 1.0, seed=files[0][2] - 1)]).get_json()
    assert wait_job(client, key, first["job_id"])["status"] == "done"
    blobs = BlobStore(settings.blob_dir)
    return job_of_blobs(settings, lib["id"], first["items"][0]["id"], [
        (name, blobs.put_bytes(write(tmp_path / name, seconds, seed=seed).read_bytes())) for name, seconds, seed in files])


def in_a_worker_process(env: dict, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a child interpreter set up as `clapq worker` sets up its tasks (which send with the
    worker's app); `tasks` is worker.tasks."""
    script = "import worker.celery_app\nworker.celery_app.app.set_current()\nfrom worker import tasks\n" + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)


def test_hanging_file_fails_alone_in_a_job(client, new_key, worker, settings, tmp_path):
    """Through the real worker: the hung item fails with a reason, its neighbour is embedded."""
    from clapq.queue import enqueue_items

    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "poison"}, headers=auth(key)).get_json()
    good = write(tmp_path / "good.wav", 2.0, seed=5)
    up = upload(client, key, lib["id"], [good]).get_json()
    assert wait_job(client, key, up["job_id"])["status"] == "done"
    blobs = BlobStore(settings.blob_dir)
    sha = uuid.uuid4().hex + uuid.uuid4().hex
    os.mkfifo(blobs.path_for(sha).parent.mkdir(parents=True, exist_ok=True) or blobs.path_for(sha))
    good2 = write(tmp_path / "good2.wav", 3.0, seed=6)
    sha2 = blobs.put_bytes(good2.read_bytes())
    job_id, ids = job_of_blobs(settings, lib["id"], up["items"][0]["id"], [("hangs.wav", sha), ("good2.wav", sha2)])
    from clapq.queue import make_celery

    enqueue_items(make_celery(settings), ids, 4)
    done = wait_job(client, key, job_id, timeout=240)
    assert done["status"] == "done_with_errors", done
    assert done["counts"]["done"] == 1 and done["counts"]["failed"] == 1
    assert "longer than" in done["errors"][0]["error"] and done["errors"][0]["filename"] == "hangs.wav"
    assert client.get("/readyz").status_code == 200


def test_a_task_that_fails_unexpectedly_hands_its_files_back_and_they_are_embedded(client, new_key, worker,
                                                                                  settings, env, tmp_path):
    """A task that dies of an unexpected error (injected here, after its claim) releases every file it
    held and sends each off again: the running worker embeds them without waiting for the sweeper
    (which these tests do not run), each file on its second attempt."""
    from clapq.db import session_scope
    from clapq.models import Item

    key = new_key()
    # rows without a message: only the failing task below will ever send one
    job_id, ids = queued_files(client, key, settings, tmp_path, "handed back",
                               [(f"h{i}.wav", 1.5, 30 + i) for i in range(3)])
    code = f"""
from worker import pipeline
def broken(*args, **kwargs):
    raise RuntimeError("injected fault")
pipeline.run = broken
result = tasks.embed_items.apply(args=[{ids!r}])
print(result.state, result.result)
"""
    # the files go back after CLAPQ_STALE_AFTER_S, the sweeper's wait: 5 s here
    r = in_a_worker_process({**env, "CLAPQ_STALE_AFTER_S": "5", "CLAPQ_HEARTBEAT_S": "1"}, code)
    assert r.returncode == 0 and "FAILURE injected fault" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "re-enqueue failed" not in r.stderr, r.stderr[-3000:]
    assert job_status(settings, job_id) == {"queued": 3}  # not at once: a machine-wide fault gets time to pass
    done = wait_job(client, key, job_id, timeout=240)
    assert done["status"] == "done" and done["counts"]["done"] == 3, done
    with session_scope(settings.database_url) as s:
        assert sorted(s.get(Item, uuid.UUID(i)).attempts for i in ids) == [2, 2, 2]


def test_a_scratch_disk_that_fails_hands_files_back_without_counting_the_try(client, new_key, worker, settings,
                                                                              env, tmp_path):
    """The worker's scratch disk is full (injected: every decode raises the ScratchError a full disk gives):
    the task's files go back to the queue with this try not counted, where each try counted and three
    failed a file for good with another file's scratch path in its error (helper-41); the task ends
    without an error and the worker rests before its next task. The running worker then embeds them all,
    each on its first counted attempt."""
    from clapq.db import session_scope
    from clapq.models import Item

    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "full scratch",
                               [(f"s{i}.wav", 1.0, 70 + i) for i in range(3)])
    code = f"""
import errno, time
from worker import decoder
from worker.audio import ScratchError
def full(self, src, dst, *args, **kwargs):
    raise ScratchError(errno.ENOSPC, f"cannot write to the scratch file {{dst}}: No space left on device")
decoder.DecoderProcess.decode = full
began = time.monotonic()
result = tasks.embed_items.apply(args=[{ids!r}])
print(result.state, result.result, round(time.monotonic() - began))
"""
    r = in_a_worker_process({**env, "CLAPQ_STALE_AFTER_S": "3", "CLAPQ_HEARTBEAT_S": "1"}, code)
    assert r.returncode == 0, r.stderr[-3000:]
    state, rest = r.stdout.split(" ", 1)
    assert state == "SUCCESS" and "'handed_back': 3" in rest and int(rest.rsplit(" ", 1)[1]) >= 3, r.stdout
    assert "cannot write decoded audio to the scratch directory" in r.stderr, r.stderr[-3000:]
    done = wait_job(client, key, job_id, timeout=240)
    assert done["status"] == "done" and done["counts"]["done"] == 3, done
    with session_scope(settings.database_url) as s:
        assert sorted(s.get(Item, uuid.UUID(i)).attempts for i in ids) == [1, 1, 1]


def test_a_task_begun_after_its_worker_was_told_to_stop_takes_no_file(client, new_key, worker, settings, env,
                                                                     tmp_path):
    """A task its pool child starts once the worker's warm shutdown has begun (worker.stopping told: a message
    handed to the child as the stop came) claimed its files, a try counted, and, a first try, went on claiming
    queued files of later tasks (CLAPQ_CLAIM_FOR_S) until its heartbeat heard of the stop, up to 2 s later; a
    claim that came while it held no file unfinished went on for the whole window, as the stop was read from the
    files it held then. Now its message goes back untouched, and no file is taken."""
    from clapq.db import session_scope
    from clapq.models import Item
    from clapq.queue import enqueue_items, make_celery

    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "told to stop",
                               [(f"t{i}.wav", 1.0, 120 + i) for i in range(3)])
    code = f"""
from worker import stopping
stopping.tell()  # as the worker's main process does as its warm shutdown begins
result = tasks.embed_items.apply(args=[{ids[:1]!r}])
print(result.state)
"""
    r = in_a_worker_process({**env, "CLAPQ_CLAIM_FOR_S": "30", "CLAPQ_HEARTBEAT_S": "1"}, code)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert job_status(settings, job_id) == {"queued": 3}, (r.stdout, r.stderr[-3000:])  # before: {'done': 3}
    with session_scope(settings.database_url) as s:
        assert [s.get(Item, uuid.UUID(i)).attempts for i in ids] == [0, 0, 0]
    enqueue_items(make_celery(settings), ids, 4)  # as the message put back would be, to the next worker
    done = wait_job(client, key, job_id, timeout=240)
    assert done["status"] == "done" and done["counts"]["done"] == 3, done


def test_a_file_handed_back_for_scratch_again_and_again_is_counted_in_the_end(settings):
    """A file whose decoded audio never fits the scratch disk went round uncounted for ever (helper-44): each
    file goes back uncounted SCRATCH_FREE_TRIES times in a day, then its tries count, and it fails in the
    end with the scratch error as its reason."""
    from clapq.queue import make_celery
    from worker.tasks import SCRATCH_FREE_TRIES, _scratch_free

    app = make_celery(settings)
    big, other = uuid.uuid4(), uuid.uuid4()
    assert [_scratch_free(app, {big}) for _ in range(SCRATCH_FREE_TRIES)] == [{big}] * SCRATCH_FREE_TRIES
    assert _scratch_free(app, {big, other}) == {other}


def test_a_file_larger_decoded_than_the_whole_scratch_disk_fails_alone_at_once(client, new_key, worker, settings,
                                                                             env, tmp_path, small_disk):
    """A scratch disk of 1 MiB and a 6 s file (1.15 MB decoded): no wait makes room for it on this worker, yet the
    task handed every file back as for a full disk, and the file went round 3 uncounted and 3 counted tries (12
    minutes at the defaults, measured) before it failed with "No space left on device", the task's other files
    held back with it. It fails at once, saying so, and the small files of its task are embedded by that task."""
    from clapq.db import session_scope
    from clapq.models import Item

    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "small scratch",
                               [("big.wav", 6.0, 80), ("s1.wav", 1.0, 81), ("s2.wav", 1.0, 82)])
    code = f"""
result = tasks.embed_items.apply(args=[{ids!r}])
print(result.state, result.result)
"""
    r = in_a_worker_process({**env, "CLAPQ_SCRATCH_DIR": str(small_disk), "CLAPQ_HEARTBEAT_S": "1"}, code)
    assert r.returncode == 0 and r.stdout.startswith("SUCCESS") and "handed_back" not in r.stdout, \
        r.stdout + r.stderr[-3000:]
    assert job_status(settings, job_id) == {"done": 2, "failed": 1}
    with session_scope(settings.database_url) as s:
        big = s.get(Item, uuid.UUID(ids[0]))
        assert big.status == "failed" and big.attempts == 1, (big.status, big.attempts)
        assert "larger than the whole scratch disk it is decoded to (1.0 MB: a worker's CLAPQ_SCRATCH_DIR)" \
            in big.error, big.error


def test_a_scratch_disk_full_for_now_is_told_from_one_too_small(tmp_path, small_disk, monkeypatch):
    """Out of room (ENOSPC) is the machine's fault while the file would fit the disk were it empty (a
    ScratchError: the task's files wait for room, as before), unless the room is there again once the file has
    been read (a file larger than the whole disk gives its room back as soon as it fills it, and the file of the
    decoder beside it was handed back with its whole task, helper-64: decoded once more instead), and the file's
    own where its decoded audio is larger than the whole disk (a DecodeError of the file, said at once). Either
    way no scratch bytes are left."""
    import worker.audio as audio
    from worker.audio import ScratchError, ScratchTooSmall, decode_to_file

    out = small_disk / "decoded.f32"
    (small_disk / "others").write_bytes(bytes(900_000))  # other files decoded ahead
    with pytest.raises(ScratchError, match="No space left on device"):
        decode_to_file(write(tmp_path / "one.wav", 1.0, seed=3), out)  # 192 kB decoded
    assert out.stat().st_size == 0
    (small_disk / "others").unlink()
    info, n = decode_to_file(write(tmp_path / "one.wav", 1.0, seed=3), out)  # room again: it fits
    assert n == 48_000
    (small_disk / "others").write_bytes(bytes(100_000))
    with pytest.raises(ScratchTooSmall, match="larger than the whole scratch disk"):
        decode_to_file(write(tmp_path / "six.wav", 6.0, seed=4), out)  # 1.15 MB decoded, the disk 1 MiB
    assert issubclass(ScratchTooSmall, DecodeError) and out.stat().st_size == 0
    real = audio.stream

    def then_room(*args, **kwargs):  # the other file's scratch removed while this one is read
        yield from real(*args, **kwargs)
        (small_disk / "others").unlink(missing_ok=True)

    monkeypatch.setattr(audio, "stream", then_room)
    (small_disk / "others").write_bytes(bytes(900_000))
    info, n = decode_to_file(write(tmp_path / "one.wav", 1.0, seed=3), out)
    assert n == 48_000 and out.stat().st_size == 4 * 48_000


def test_decoded_files_leave_the_reserve_of_a_disk_shared_with_the_database(tmp_path, small_disk):
    """A worker's decoded scratch files leave CLAPQ_DISK_RESERVE_MB of their disk free where the embedded Postgres or
    Redis shares it (clapq.room.disk_reserve, as uploads do): a two-hour file decodes to 1.4 GB, and filled such a
    disk to its last byte, where Postgres could not write and stopped. Past the reserve it is as a full disk (a
    ScratchError, the machine's: the task's files wait for room), and no scratch bytes are left; with room again,
    or no reserve, the file decodes. Here a 1 MiB disk holding 400 kB of other files, half of it reserved."""
    from worker.audio import ScratchError

    one = write(tmp_path / "one.wav", 1.0, seed=3)  # 192 kB decoded
    out = small_disk / "decoded.f32"
    (small_disk / "others").write_bytes(bytes(400_000))
    d = DecoderProcess()
    try:
        with pytest.raises(ScratchError, match="no space left on device but the last 0.5 MB, kept free for the "
                                               r"database that shares it \(CLAPQ_DISK_RESERVE_MB\)"):
            d.decode(one, out, timeout_s=60, max_duration_s=None, reserve=512 << 10)
        assert out.stat().st_size == 0
        info, n = d.decode(one, out, timeout_s=60, max_duration_s=None)  # no reserve: it fits
        assert n == 48_000
        (small_disk / "others").unlink()
        info, n = d.decode(one, out, timeout_s=60, max_duration_s=None, reserve=512 << 10)  # room again
        assert n == 48_000 and out.stat().st_size == 4 * 48_000
    finally:
        d.close()


def test_a_reserve_the_file_fits_only_without_is_the_machines_not_the_files(tmp_path, small_disk):
    """A file that would fit its scratch disk were it empty fails as its own (ScratchTooSmall, at once, for good)
    only where it is larger than the whole disk, as README says: CLAPQ_DISK_RESERVE_MB is the machine's setting.
    With a reserve of most of the disk, a 192 kB file on a 1 MiB disk failed at once "larger than the whole scratch
    disk it is decoded to (0.1 MB ...)", and with a reserve as large as the disk (CLAPQ_DISK_RESERVE_MB=2048 beside
    a scratch tmpfs of 1 GB) every file failed so, "(-1.0 MB ...)". Each is a ScratchError that says the reserve:
    the task's files wait for room, as for a full disk; a file larger than the whole disk is still its own."""
    from worker.audio import ScratchError, ScratchTooSmall, decode_to_file

    out = small_disk / "decoded.f32"
    one = write(tmp_path / "one.wav", 1.0, seed=3)  # 192 kB decoded
    for reserve in (900 << 10, 2 << 20):
        with pytest.raises(ScratchError, match=rf"but the last {reserve / 2**20:g} MB, kept free for the database"):
            decode_to_file(one, out, reserve=reserve)
        assert out.stat().st_size == 0
    with pytest.raises(ScratchTooSmall, match=r"larger than the whole scratch disk it is decoded to \(1\.0 MB"):
        decode_to_file(write(tmp_path / "six.wav", 6.0, seed=4), out, reserve=2 << 20)  # 1.15 MB decoded
    assert out.stat().st_size == 0


def another_model(tiny_model, tmp_path):
    """A copy of the tiny checkpoint with other weights: another model for clapq."""
    from safetensors.numpy import load_file, save_file

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    return other


def test_a_worker_of_another_model_leaves_the_files_for_one_of_theirs(client, new_key, worker, settings, env,
                                                                      tmp_path, tiny_model):
    """A worker started with another checkpoint (another CLAPQ_MODEL, a newer revision downloaded) beside the
    right ones failed every file it was sent, "bound to a different model" (helper-41: 507 of 600 in 5 s).
    It leaves them queued, saying why, without counting a try, and sends them again at once (left to the
    sweeper they waited CLAPQ_STALE_AFTER_S, helper-44): a worker of their model embeds them."""
    from clapq.db import session_scope
    from clapq.models import Item

    other = another_model(tiny_model, tmp_path)
    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "other model",
                               [(f"m{i}.wav", 1.0, 80 + i) for i in range(3)])
    began = time.monotonic()
    r = in_a_worker_process({**env, "CLAPQ_MODEL": str(other)},
                            f"print(tasks.embed_items.apply(args=[{ids!r}]).result)")
    assert r.returncode == 0 and r.stdout.strip() == "{'claimed': 0}", r.stdout + r.stderr[-3000:]
    assert "files it was sent are of libraries bound to another model: sent again" in r.stderr, r.stderr[-3000:]
    # sent again at once (not left for the sweeper, which these tests do not run): the worker of their model
    # embeds them, each on its first try
    done = wait_job(client, key, job_id, timeout=240)
    assert done["status"] == "done" and done["counts"]["done"] == 3, done
    with session_scope(settings.database_url) as s:
        assert [(s.get(Item, uuid.UUID(i)).attempts, s.get(Item, uuid.UUID(i)).error) for i in ids] == [(1, None)] * 3
    assert time.monotonic() - began < 120


def test_a_message_that_comes_back_to_a_worker_of_another_model_leaves_its_files_queued(
        client, new_key, worker, settings, env, tmp_path, tiny_model):
    """A task's message that comes back (Celery's retry after Postgres was away, or a redelivery after the
    process running it died) can reach a worker of another model beside the right ones, and find the files a
    worker of their model claimed under its task id still running. That worker left them running and sent
    them again: the new task found them taken, and they waited CLAPQ_STALE_AFTER_S for the sweeper, which
    counted another try (helper-63, a Postgres restart with such a worker up). They go back to the queue and
    a worker of their model embeds them at once; a try that the outage cut short is given back, the try of a
    process that died counts."""
    from sqlalchemy import func, update

    from clapq.db import session_scope
    from clapq.models import Item

    other = another_model(tiny_model, tmp_path)
    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "came back",
                               [(f"c{i}.wav", 1.0, 120 + i) for i in range(4)])
    redelivered, retried = ids[:2], ids[2:]
    with session_scope(settings.database_url) as s:  # as the right worker's claims left them
        for task, which in (("task-redelivered", redelivered), ("task-retried", retried)):
            s.execute(update(Item).where(Item.id.in_([uuid.UUID(i) for i in which]))
                      .values(status="running", claimed_by=task, attempts=1, started_at=func.now()))
    r = in_a_worker_process({**env, "CLAPQ_MODEL": str(other)}, (
        f"print(tasks.embed_items.apply(args=[{redelivered!r}], task_id='task-redelivered').result)\n"
        "tasks._mark_retry(tasks.embed_items.app, 'task-retried', 1)  # as the try the outage stopped does\n"
        f"print(tasks.embed_items.apply(args=[{retried!r}], task_id='task-retried', retries=1).result)"))
    assert r.returncode == 0 and r.stdout.split() == ["{'claimed':", "0}"] * 2, r.stdout + r.stderr[-3000:]
    done = wait_job(client, key, job_id, timeout=240)
    assert done["status"] == "done" and done["counts"]["done"] == 4, done
    with session_scope(settings.database_url) as s:
        assert [(s.get(Item, uuid.UUID(i)).attempts, s.get(Item, uuid.UUID(i)).error) for i in ids] == \
            [(2, None)] * 2 + [(1, None)] * 2


def test_a_tasks_files_locked_by_another_transaction_are_sent_again(client, new_key, worker, settings, env,
                                                                     tmp_path):
    """A task's claim skips the rows another transaction holds locked (SKIP LOCKED: it does not wait on another
    worker's claim), and a file it skipped while still queued had no message any more: the task was acked with
    "claimed 0". Two `clapq upload` of one folder at once: the second upload's request locks the first's items
    (FOR UPDATE, to tell a retry from a copy) until it commits, and the first's tasks, sent as it committed, met
    them so: 8 of 41 files stayed queued, no task, until the maintenance loop took them as orphans (after
    CLAPQ_STALE_AFTER_S, and only once the whole queue was empty). Here a connection holds a job's rows locked as
    that upload does while their task runs: it sends them again (a moment later), and they are embedded once
    the lock goes, each on its first try."""
    from sqlalchemy import text

    from clapq.db import get_engine, session_scope
    from clapq.models import Item

    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "locked meanwhile",
                               [(f"l{i}.wav", 1.0, 160 + i) for i in range(3)])
    with get_engine(settings.database_url).connect() as other:
        other.execute(text("SELECT id FROM items WHERE id = ANY(CAST(:ids AS uuid[])) ORDER BY id FOR UPDATE"),
                      {"ids": ids})
        r = in_a_worker_process(env, f"print(tasks.embed_items.apply(args=[{ids!r}]).result)")
        other.rollback()
    assert r.returncode == 0 and r.stdout.strip() == "{'claimed': 0, 'locked': 3}", r.stdout + r.stderr[-3000:]
    done = wait_job(client, key, job_id, timeout=240)
    assert done["status"] == "done" and done["counts"]["done"] == 3, done
    with session_scope(settings.database_url) as s:
        assert [s.get(Item, uuid.UUID(i)).attempts for i in ids] == [1] * 3


def test_files_of_a_model_no_worker_serves_are_left_queued_not_sent_round(settings, env, worker):
    """A worker sent files of a model no live worker serves leaves them queued, saying why, and neither sends
    them again nor rests: sent round, they kept the queue from ever being empty (see test_faults)."""
    from clapq.db import session_scope
    from clapq.models import Item
    from tests.conftest import queued_of_an_unserved_model
    from clapq.models import WAITING_FOR_MODEL

    ids = [str(i) for i in queued_of_an_unserved_model(settings.database_url, 3)]
    r = in_a_worker_process(env, f"print(tasks.embed_items.apply(args=[{ids!r}]).result)")
    assert r.returncode == 0 and r.stdout.strip() == "{'claimed': 0}", r.stdout + r.stderr[-3000:]
    assert "which no running worker serves: they stay queued until a worker of their model starts" in r.stderr
    assert "sent again" not in r.stderr, r.stderr[-3000:]
    with session_scope(settings.database_url) as s:
        rows = [s.get(Item, uuid.UUID(i)) for i in ids]
        assert {(i.status, i.attempts, i.claimed_by) for i in rows} == {("queued", 0, WAITING_FOR_MODEL)}
        assert all(i.error.startswith("waiting for a worker that serves this library's model") for i in rows)


def test_which_models_live_workers_serve(settings):
    """clapq.presence: a worker process says which model it serves until it ends, or stops refreshing."""
    import time as _time

    from clapq import presence
    from clapq.queue import make_celery, redis_client

    app = make_celery(settings)
    client = redis_client(app)
    model = 10_000_000 + uuid.uuid4().int % 1_000_000  # no row needed: the sorted set is all there is
    assert presence.serving(client, {model, model + 1}) == set()
    presence.serve(app, model)
    deadline = _time.monotonic() + 10
    while not presence.serving(client, {model}) and _time.monotonic() < deadline:
        _time.sleep(0.05)
    assert presence.serving(client, {model, model + 1}) == {model}
    client.zadd(presence.SERVING.format(model=model + 1), {"gone:1": _time.time() - 1})  # its refresh lapsed
    assert presence.serving(client, {model, model + 1}) == {model}
    presence.unserve(app)
    assert presence.serving(client, {model}) == set()


def test_a_first_try_fills_its_batch_from_later_files_and_a_retry_does_not(client, new_key, worker, settings,
                                                                            env, tmp_path):
    """Through the real task (run in a child interpreter, batch 4): a retried file runs alone, its batch
    padded, and takes no other file in (if it kills workers, it kills no one else's attempt); a file on
    its first try takes the queued ones into its batch, which are then done on their first attempt."""
    from sqlalchemy import update

    from clapq.db import session_scope
    from clapq.models import Item

    key = new_key()
    names = ["retry.wav", "fresh0.wav", "fresh1.wav", "fresh2.wav"]
    job_id, ids = queued_files(client, key, settings, tmp_path, "top-up", [(n, 1.0, 60 + i) for i, n in enumerate(names)])
    with session_scope(settings.database_url) as s:  # the first file failed once already
        s.execute(update(Item).where(Item.id == uuid.UUID(ids[0])).values(attempts=1, started_at=func_now_minus(300)))
        # the oldest in the queue, so the top-up takes these whatever other tests left behind
        s.execute(update(Item).where(Item.id.in_([uuid.UUID(i) for i in ids[2:]])).values(updated_at=func_now_minus(86400)))
    code = f"""
for ids in ({ids[:1]!r}, {ids[1:2]!r}):
    print(tasks.embed_items.apply(args=[ids]).result)
"""
    # CLAPQ_CLAIM_FOR_S=0: only the last batch is filled, so the counts do not depend on what else is queued
    r = in_a_worker_process({**env, "CLAPQ_CLAIM_FOR_S": "0"}, code)
    assert r.returncode == 0, r.stderr[-3000:]
    retry, fresh = r.stdout.split("\n")[:2]
    assert retry == str({"claimed": 1, "done": 1, "failed": 0}), r.stdout
    assert fresh == str({"claimed": 3, "done": 3, "failed": 0}), r.stdout
    done = wait_job(client, key, job_id)
    assert done["status"] == "done" and done["counts"]["done"] == 4, done
    with session_scope(settings.database_url) as s:
        assert [s.get(Item, uuid.UUID(i)).attempts for i in ids] == [2, 1, 1, 1]


def test_a_first_try_goes_on_with_queued_files_of_later_tasks(client, new_key, worker, settings, env, tmp_path):
    """Through the real task (batch 4, CLAPQ_CLAIM_FOR_S=30): a task of one file goes on
    claiming the queued files whose own messages have not come yet (none are sent here), a batch's worth
    at a time, and embeds them all, each on its first attempt."""
    from clapq.db import session_scope
    from clapq.models import Item

    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "goes on", [(f"g{i}.wav", 1.0, 81 + i) for i in range(7)])
    r = in_a_worker_process({**env, "CLAPQ_CLAIM_FOR_S": "30"},  # `auto` is 0 on a CPU
                            f"print(tasks.embed_items.apply(args=[{ids[:1]!r}]).result)\n")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = ast.literal_eval(r.stdout.split("\n")[0])
    assert counts["claimed"] >= 7 and counts["done"] >= 7 and counts["failed"] == 0, r.stdout
    assert job_status(settings, job_id) == {"done": 7}
    with session_scope(settings.database_url) as s:
        assert [s.get(Item, uuid.UUID(i)).attempts for i in ids] == [1] * 7


def test_a_passing_fault_sends_borrowed_files_back_without_charging_them(client, new_key, worker, settings, env,
                                                                         tmp_path):
    """The database drops the batch's write (an OperationalError, once): Celery runs the task again with
    its own two files, together, this try not counted either (they were on attempt 2, and three outages
    failed them for good, helper-41); the 2 files it had taken from later tasks
    (their messages spent) go back to the queue at once, this try not counted, and are sent off again
    after CLAPQ_STALE_AFTER_S: the running worker embeds them on attempt 1."""
    from clapq.db import session_scope
    from clapq.models import Item

    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "passing fault",
                               [(f"p{i}.wav", 1.0, 91 + i) for i in range(4)])
    code = """
from sqlalchemy.exc import OperationalError
from worker import store
real, calls = store.write_items, []
def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
        raise OperationalError("INSERT INTO segments", {}, Exception("server closed the connection unexpectedly"))
    return real(*args, **kwargs)
store.write_items = flaky
result = tasks.embed_items.apply(args=[%r])
print(result.state, result.result)
""" % ids[:2]
    r = in_a_worker_process({**env, "CLAPQ_CLAIM_FOR_S": "30", "CLAPQ_STALE_AFTER_S": "5",
                                  "CLAPQ_HEARTBEAT_S": "1"}, code)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "handing files back failed" not in r.stderr, r.stderr[-3000:]
    # the retry ran its two files together (only a message back from a dead process splits them)
    counts = ast.literal_eval(r.stdout.strip().split("SUCCESS ", 1)[1].split("\n")[0])
    assert counts["done"] >= 2 and "split" not in counts, r.stdout
    done = wait_job(client, key, job_id, timeout=240)
    assert done["status"] == "done" and done["counts"]["done"] == 4, done
    with session_scope(settings.database_url) as s:
        assert [s.get(Item, uuid.UUID(i)).attempts for i in ids] == [1, 1, 1, 1]


def test_a_retried_message_whose_process_died_is_a_death_not_celerys_retry(client, new_key, settings, env, tmp_path):
    """A message Celery retried (retries 1) whose process then died comes back with the same count: its files,
    still running under its id, go on one per task with that try counted, as after any death. Only the run
    the failing try marked in Redis is taken for Celery's own retry (its files stay together, no try
    counted). On `retries` alone a file that killed its worker was tried for ever (helper-44)."""
    from sqlalchemy import update

    from clapq.db import session_scope
    from clapq.models import Item
    from clapq.queue import make_celery, redis_client
    from worker.tasks import RETRY_MARK

    key = new_key()
    job_id, ids = queued_files(client, key, settings, tmp_path, "died in a retry",
                               [(f"d{i}.wav", 1.0, 90 + i) for i in range(2)])
    for task, marked in (("task-died", False), ("task-retried", True)):
        with session_scope(settings.database_url) as s:  # as the process that died left them
            s.execute(update(Item).where(Item.id.in_([uuid.UUID(i) for i in ids]))
                      .values(status="running", claimed_by=task, attempts=1, started_at=func_now_minus(60)))
        if marked:
            redis_client(make_celery(settings)).set(RETRY_MARK.format(task=task, n=1), b"1", ex=60)
        code = f"""
from worker import pipeline
pipeline.run = lambda *a, **k: None  # what follows the claim is not what this test looks at
print(tasks.embed_items.apply(args=[{ids!r}], task_id={task!r}, retries=1).result)
"""
        r = in_a_worker_process({**env, "CLAPQ_CLAIM_FOR_S": "0"}, code)
        assert r.returncode == 0, r.stderr[-3000:]
        with session_scope(settings.database_url) as s:
            rows = [s.get(Item, uuid.UUID(i)) for i in ids]
            if marked:
                assert r.stdout.strip().startswith("{'claimed': 2"), r.stdout
                assert [(i.status, i.attempts) for i in rows] == [("running", 1)] * 2
            else:  # sent on one per task (a running worker may have taken them since: then on attempt 2)
                assert r.stdout.strip() == "{'claimed': 0, 'split': 2}", r.stdout
                assert all((i.status, i.attempts, i.error) == ("queued", 1, "worker lost (its process died)")
                           or i.attempts == 2 for i in rows), [(i.status, i.attempts, i.error) for i in rows]
    with session_scope(settings.database_url) as s:  # no message goes to a worker: left as they are
        s.execute(update(Item).where(Item.id.in_([uuid.UUID(i) for i in ids])).values(status="cancelled"))


def test_how_long_a_task_claims_later_files():
    """CLAPQ_CLAIM_FOR_S: auto (the default) is 10 s on a GPU and 0 on a CPU; a number is that number."""
    from clapq.settings import Settings, claim_window_s

    auto = Settings.from_env({}).claim_for_s
    assert auto is None and Settings.from_env({"CLAPQ_CLAIM_FOR_S": "auto"}).claim_for_s is None
    assert (claim_window_s(auto, "cuda"), claim_window_s(auto, "cpu")) == (10, 0)
    assert claim_window_s(Settings.from_env({"CLAPQ_CLAIM_FOR_S": "30"}).claim_for_s, "cpu") == 30
    assert claim_window_s(Settings.from_env({"CLAPQ_CLAIM_FOR_S": "0"}).claim_for_s, "cuda") == 0
    with pytest.raises(SystemExit, match="CLAPQ_CLAIM_FOR_S"):
        Settings.from_env({"CLAPQ_CLAIM_FOR_S": "soon"})


A_BUFFER_FREED_AND_ALLOCATED_AGAIN = """
import resource, sys
import numpy as np
from clapq.malloc import keep_freed_memory

def rss_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])

kept = keep_freed_memory() if sys.argv[1] == "1" else False
for _ in range(3):  # a 64 MiB buffer, as a batch's activations: allocated, filled, freed, again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(8 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    held = rss_kib()
    del a
    returned_kib = held - rss_kib()
print(kept, faults, returned_kib)
"""


def test_the_worker_keeps_freed_memory_for_its_next_buffers():
    """clapq.malloc: under glibc's defaults a freed 64 MiB buffer goes back to the kernel, and the next one
    is fresh pages, faulted in and zeroed again; with the worker's settings the memory stays in the process
    and the third buffer reuses the pages of the first (no page faults)."""
    def third_buffer(keep: bool) -> tuple[str, int, int]:
        r = subprocess.run([sys.executable, "-c", A_BUFFER_FREED_AND_ALLOCATED_AGAIN, "1" if keep else "0"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        kept, faults, returned_kib = r.stdout.split()
        return kept, int(faults), int(returned_kib)

    kept, faults, returned_kib = third_buffer(True)
    assert kept == "True" and faults < 100 and returned_kib < 8 << 10, (kept, faults, returned_kib)
    kept, faults, returned_kib = third_buffer(False)  # the defaults, for contrast: what the settings save
    assert kept == "False" and returned_kib > 48 << 10, (kept, faults, returned_kib)


# Whether the kernel may back the buffer's mapping with huge pages (THPeligible: what madvise changes),
# not how much of it is so backed now (AnonHugePages: what free memory allows; with the page cache full and
# memory fragmented, a run beside others' work got less than half)
TORCH_BUFFER_ON_HUGE_PAGES = """
import sys
from clapq.malloc import torch_huge_pages
on = torch_huge_pages()
import torch
x = torch.ones(8 << 20, dtype=torch.float64)  # 64 MiB, as a batch's activations
at, eligible, inside = x.data_ptr(), None, False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
        start, end = (int(v, 16) for v in head.split("-"))
        inside = start <= at < end
    elif inside and head == "THPeligible:":
        eligible = line.split()[1]
print(on, eligible)
"""


def test_torch_buffers_of_the_worker_are_on_huge_pages():
    """clapq.malloc.torch_huge_pages: a 64 MiB torch buffer's mapping may be backed by transparent huge pages;
    with the switch set to 0 beforehand (a user's choice, which it keeps), not where the kernel gives huge
    pages only to those who ask (`madvise`)."""
    from clapq.malloc import thp_mode

    if thp_mode() not in ("always", "madvise"):
        pytest.skip(f"this kernel gives no transparent huge pages (mode {thp_mode()!r})")

    def run(preset: str | None) -> tuple[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if preset is not None:
            env["THP_MEM_ALLOC_ENABLE"] = preset
        r = subprocess.run([sys.executable, "-c", TORCH_BUFFER_ON_HUGE_PAGES], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        on, eligible = r.stdout.split()
        return on, eligible

    assert run(None) == ("True", "1")
    on, eligible = run("0")
    assert on == "False", on
    if thp_mode() == "madvise":
        assert eligible == "0", eligible


def test_the_worker_process_that_holds_the_model_runs_with_those_settings(worker):
    """The pool child applies clapq.malloc before it loads the model, and says so when the model is in."""
    from clapq.malloc import thp_mode

    deadline = time.monotonic() + 120
    while not (loaded := [line for line in worker.output().splitlines() if "model loaded" in line]):
        assert time.monotonic() < deadline, worker.output()[-3000:]
        time.sleep(0.2)
    line = loaded[-1].replace("=True", '": true').replace("=False", '": false')  # JSON or key=value lines
    assert 'keeps_freed_memory": true' in line, line
    huge = thp_mode() in ("always", "madvise")
    assert f'huge_pages": {"true" if huge else "false"}' in line, line
    assert 'batch": 4' in line, line  # CLAPQ_BATCH_SIZE as the tests set it


def test_two_hour_file_streams_with_bounded_memory(tmp_path, tiny_model):
    """A 2-hour file is decoded and embedded without ever holding it whole at 48 kHz (1.4 GB)."""
    path = tmp_path / "two_hours.wav"
    with sf.SoundFile(str(path), "w", samplerate=8_000, channels=1, subtype="PCM_16") as f:
        block = (0.3 * np.sin(2 * np.pi * 220 * np.arange(8_000 * 60) / 8_000)).astype(np.float32)
        for _ in range(120):
            f.write(block)
    script = f"""
import sys, uuid, numpy as np
from pathlib import Path
from clapq.malloc import keep_freed_memory, torch_huge_pages
# as in the worker: memory stays bounded though freed memory is never returned, and on huge pages
assert keep_freed_memory()
torch_huge_pages()
from clapq.blobs import BlobStore
from clapq.checkpoint import resolve
from clapq.clap import get_clap
from worker import pipeline
from worker.decoder import get_pool
from worker.embedder import AudioEmbedder
from worker.store import Claimed
blobs = BlobStore({str(tmp_path / 'blobs')!r})
w = blobs.writer(); w.write(Path({str(path)!r}).read_bytes()); sha = w.commit()
emb = AudioEmbedder(get_clap(resolve({str(tiny_model)!r}), "cpu"))
out = []
opts = pipeline.Options(batch_size=16, scratch_dir=Path({str(tmp_path)!r}))
pipeline.run([Claimed(uuid.uuid4(), sha, None, 1)], blobs, get_pool(1), emb, opts,
             lambda fin: out.extend(fin), lambda d: sys.exit("failed: " + d.error))
d, vecs = out[0]
# VmHWM, this process's own peak since exec: ru_maxrss keeps the peak of the process before exec, which under
# vfork is pytest's (942 MB in a whole run, the CI's failure of session 31, against ~510 MB of this script's own)
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(len(d.windows), d.windows[-1][2], d.info.duration_s, hwm)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    windows, last_end, duration, maxrss_kb = r.stdout.split()
    assert int(windows) == 1439 and float(last_end) == pytest.approx(7200.0) and float(duration) == 7200.0
    assert int(maxrss_kb) < 900 * 1024, f"peak RSS {int(maxrss_kb) // 1024} MB"  # 48 kHz float32 whole: 1382 MB
    assert not list(tmp_path.glob("decoded-*.f32"))  # scratch files removed


def test_duration_limit_fails_the_item_with_the_limit_named(tiny_model, tmp_path):
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from worker import pipeline
    from worker.audio import decode
    from worker.decoder import DecoderPool
    from worker.embedder import AudioEmbedder
    from worker.store import Claimed

    from worker.audio import TooLong

    path = write(tmp_path / "three.wav", 3.0, 8_000)
    with pytest.raises(TooLong, match="longer than the limit of 2 s"):
        decode(path, max_duration_s=2)
    assert decode(path, max_duration_s=4)[1].duration_s == 3.0
    d = DecoderProcess()  # as the worker and a clip search meet it: through the child, told apart
    try:
        with pytest.raises(TooLong, match="longer than the limit of 2 s"):
            d.decode(path, tmp_path / "out.f32", timeout_s=60, max_duration_s=2)
    finally:
        d.close()
    blobs, failed = BlobStore(tmp_path / "blobs"), []
    item = Claimed(uuid.uuid4(), blobs.put_bytes(path.read_bytes()), None, 1)
    pool = DecoderPool(1)
    try:
        pipeline.run([item], blobs, pool, AudioEmbedder(get_clap(resolve(str(tiny_model)), "cpu")),
                     pipeline.Options(batch_size=4, scratch_dir=tmp_path, max_duration_s=2),
                     lambda fin: pytest.fail("embedded"), failed.append)
    finally:
        pool.close()
    assert [d.error for d in failed] == ["the audio is longer than the limit of 2 s (CLAPQ_MAX_DURATION_S)"]


def test_a_batch_is_written_with_one_statement_exactly_and_reruns_drop_stale_windows(settings):
    """Every finished item of a model batch goes to Postgres in one statement; float32 values
    round-trip bit for bit; a re-run with fewer windows leaves no stale segment behind; an item deleted
    meanwhile is skipped, not a foreign-key error that fails the batch."""
    from sqlalchemy import delete, event, func, select, update

    from clapq.db import get_engine, session_scope
    from clapq.models import Embedding, Item, Segment
    from worker.audio import AudioInfo
    from worker.store import Claimed, write_items
    from worker.windows import pooled

    with session_scope(settings.database_url) as s:
        tenant, model, lib, job = job_of_own(s, "batch-write-test")
        items = [Item(tenant_id=tenant.id, library_id=lib.id, job_id=job.id, sha256=f"{i:064x}",
                      filename=f"{i}.wav", size_bytes=1, status="running") for i in range(3)]
        s.add_all(items)
        s.flush()
        claimed = [Claimed(it.id, it.sha256, lib.id, model.id, job.id, tenant.id) for it in items]

    rng = np.random.default_rng(7)
    windows = [1, 4, 2]
    vectors = [rng.standard_normal((n, 512)).astype(np.float32) for n in windows]
    spans = [[(5.0 * w, 5.0 * w + 10.0) for w in range(n)] for n in windows]
    info = AudioInfo(sample_rate=44_100, channels=2, frames=25 * 44_100, format="WAV")
    statements = []

    def count(*_args, **_kw):
        statements.append(1)

    engine = get_engine(settings.database_url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        with session_scope(settings.database_url) as s:
            assert write_items(s, [(c, info, sp, v) for c, sp, v in zip(claimed, spans, vectors)]) == 7
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == 1

    # the second item is re-run with two windows instead of four
    with session_scope(settings.database_url) as s:
        write_items(s, [(claimed[1], info, spans[1][:2], vectors[1][:2])])
    with session_scope(settings.database_url) as s:
        for c, n, sp, v in zip(claimed, [1, 2, 2], spans, vectors):
            rows = s.execute(select(Segment.window_index, Segment.start_s, Segment.end_s, Segment.vector)
                             .where(Segment.item_id == c.id).order_by(Segment.window_index)).all()
            assert [(r.window_index, r.start_s, r.end_s) for r in rows] == [(w, *sp[w]) for w in range(n)]
            assert np.array_equal(np.stack([np.asarray(r.vector, np.float32) for r in rows]), v[:n])
            stored = np.asarray(s.scalar(select(Embedding.vector).where(Embedding.item_id == c.id)), np.float32)
            assert np.array_equal(stored, pooled(v[:n]))
            item = s.get(Item, c.id)
            assert (item.status, item.duration_s, item.sample_rate, item.channels) == ("done", 25.0, 44_100, 2)

    # an item deleted while it was being embedded is left out; the rest of the batch is written
    with session_scope(settings.database_url) as s:
        s.execute(delete(Item).where(Item.id == claimed[0].id))
    with session_scope(settings.database_url) as s:
        assert write_items(s, [(c, info, sp, v) for c, sp, v in zip(claimed, spans, vectors)]) == 6
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Segment).where(Segment.item_id == claimed[0].id)) == 0
        assert s.scalar(select(func.count()).select_from(Segment).where(Segment.item_id == claimed[1].id)) == 4
    # the heartbeat names the items its task no longer holds: deleted (0), finished (1); not one still running
    from worker.store import heartbeat

    with session_scope(settings.database_url) as s:
        s.execute(update(Item).where(Item.id == claimed[2].id).values(status="running", claimed_by="task-t"))
    with session_scope(settings.database_url) as s:
        assert heartbeat(s, [c.id for c in claimed], "task-t") == {claimed[0].id, claimed[1].id}


def test_a_task_is_one_batch_of_files_unless_set():
    """Raising CLAPQ_BATCH_SIZE for a GPU raises the files per task with it (a 16-file task would leave a
    256-row batch to be filled by claiming later tasks' files, each of those tasks then a Celery round
    trip with nothing to do); an explicit CLAPQ_ITEMS_PER_TASK still wins."""
    from clapq.settings import Settings

    assert (Settings.from_env({}).batch_size, Settings.from_env({}).items_per_task) == (None, 16)  # auto: 16 a task
    assert Settings.from_env({"CLAPQ_BATCH_SIZE": "auto"}).items_per_task == 16
    assert Settings.from_env({"CLAPQ_BATCH_SIZE": "256"}).items_per_task == 256
    assert Settings.from_env({"CLAPQ_BATCH_SIZE": "256", "CLAPQ_ITEMS_PER_TASK": "64"}).items_per_task == 64


def test_compile_rule_and_its_setting():
    """auto compiles the audio tower on a CPU in fp32 only; 1 and 0 decide everywhere; anything else is
    a sentence at start."""
    import torch

    from clapq.precision import compile_applies
    from clapq.settings import Settings

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert compile_applies(None, cpu, torch.float32) and not compile_applies(None, cpu, torch.bfloat16)
    assert not compile_applies(None, gpu, torch.float16) and not compile_applies(None, gpu, torch.bfloat16)
    assert compile_applies(True, gpu, torch.bfloat16) and not compile_applies(False, cpu, torch.float32)
    assert [Settings.from_env({"CLAPQ_COMPILE": v}).compile_model for v in ("", "auto", " AUTO ", "1", "0")] == \
        [None, None, None, True, False]
    with pytest.raises(SystemExit, match="CLAPQ_COMPILE must be auto, 1 or 0, got 'maybe'"):
        Settings.from_env({"CLAPQ_COMPILE": "maybe"})


def test_a_compiled_tower_matches_eager_and_a_failed_compile_runs_eager(tiny_model, env, tmp_path):
    """The worker's start-up as it runs on a CPU in fp32: compiled, its vectors are eager's to cosine
    0.99999 and bit for bit the same whatever else is in the batch; with no working C++ compiler the
    compile fails and the worker runs eager instead of dying."""
    script = """
import json, numpy as np
from worker import tasks
settings, emb, model_id, pool = tasks._runtime()
from clapq.checkpoint import resolve
from clapq.clap import get_clap
from worker.embedder import AudioEmbedder
rng = np.random.default_rng(3)
w = (rng.standard_normal((6, emb.window_samples)) * 0.1).astype(np.float32)
a, b = emb.embed(w[:4]), emb.embed(w[[0, 4, 5, 1]])
eager = AudioEmbedder(emb.clap).embed(w[:4])
print(json.dumps({"compiled": emb.audio_model is not emb.clap.model.audio_model, "same": bool(np.array_equal(a[0], b[0])),
                  "cos": float((a * eager).sum(1).min())}))
pool.close()
"""
    import shutil

    runs = {}
    have_cxx = bool(shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++"))
    for name, extra in [("no compiler", {"CXX": "/bin/false"})] + [("ok", {})] * have_cxx:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                           env={**env, "CLAPQ_COMPILE": "1", "CLAPQ_PRECISION": "fp32", **extra,
                                "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name.replace(" ", "_"))})
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (json.loads(r.stdout.strip().splitlines()[-1]), r.stderr)
    failed = runs["no compiler"][0]
    assert not failed["compiled"] and failed["same"] and failed["cos"] >= 0.99999, failed
    assert "torch.compile failed; the audio tower runs eager" in runs["no compiler"][1]
    if not have_cxx:
        pytest.skip("no C++ compiler here: only the fallback was checked")
    ok = runs["ok"][0]
    assert ok["compiled"] and ok["same"] and ok["cos"] >= 0.99999, ok
    assert "torch.compile failed" not in runs["ok"][1]


def test_only_passing_faults_are_retried_as_transient():
    """A dropped connection, a deadlock or a refused connection are retried with backoff; errors that come
    back on every try (bad data, a broken constraint, a bug in a statement) are not."""
    from psycopg2 import errors
    from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError, ProgrammingError

    from worker.tasks import TRANSIENT

    def wrapped(cls, orig):
        return cls("UPDATE items ...", {}, orig)

    assert isinstance(wrapped(OperationalError, errors.AdminShutdown()), TRANSIENT)
    assert isinstance(wrapped(OperationalError, errors.DeadlockDetected()), TRANSIENT)
    assert isinstance(wrapped(InterfaceError, Exception("connection already closed")), TRANSIENT)
    assert isinstance(ConnectionRefusedError(), TRANSIENT)
    for cls, orig in ((IntegrityError, errors.UniqueViolation()), (DataError, errors.InvalidTextRepresentation()),
                      (ProgrammingError, errors.UndefinedColumn())):
        assert not isinstance(wrapped(cls, orig), TRANSIENT), cls


def test_decoder_pool_size_follows_the_device():
    """Two decoders beside a CPU model (it uses every core); beside a GPU, enough to feed it."""
    from worker.decoder import pool_size

    assert pool_size(5, "cuda", cpu_count=16) == 5 and pool_size(5, "cpu") == 5  # CLAPQ_DECODERS wins
    assert pool_size(0, "cpu", cpu_count=64) == 2
    assert pool_size(0, "cuda", 1, cpu_count=16) == 15
    assert pool_size(0, "cuda", 4, cpu_count=16) == 3
    assert pool_size(0, "cuda", 1, cpu_count=2) == 2


def test_precision_rule_and_its_errors():
    """CLAPQ_PRECISION=auto: bf16 on a CPU that multiplies bf16 natively, fp32 on one that would emulate
    it; explicit choices are honoured, impossible ones refused with a sentence."""
    import torch

    from clapq.precision import cpu_has_bf16, model_precision, pick_dtype
    from clapq.settings import Settings

    cpu = torch.device("cpu")
    flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split(":")[1].split()}
    assert cpu_has_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)  # torch's probe agrees with the kernel's
    assert pick_dtype(cpu) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert pick_dtype(cpu, "auto", cpu_bf16=True) == torch.bfloat16
    assert pick_dtype(cpu, "auto", cpu_bf16=False) == torch.float32
    assert pick_dtype(cpu, "bf16", cpu_bf16=False) == torch.bfloat16  # asked for: emulated, but honoured
    assert pick_dtype(cpu, "fp32", cpu_bf16=True) == torch.float32
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        pick_dtype(cpu, "fp16")
    assert model_precision("cpu", "bf16") == "bf16" and model_precision("cpu", "fp32") == "fp32"
    assert model_precision("cpu", "bf16", text_int8=True) == "int8"  # the int8 text tower is built from fp32
    assert Settings.from_env({"CLAPQ_PRECISION": " BF16 "}).precision == "bf16"
    assert Settings.from_env({}).precision == "auto"
    with pytest.raises(SystemExit, match="CLAPQ_PRECISION must be one of auto, fp32, bf16, fp16, got 'fp64'"):
        Settings.from_env({"CLAPQ_PRECISION": "fp64"})


@pytest.mark.parametrize("precision,lanes", [("fp32", 1), ("bf16", 1), ("fp32", 2), ("bf16", 2)])
def test_each_precision_is_deterministic_and_matches_the_fp32_reference(tiny_model, reference, tmp_path,
                                                                        precision, lanes):
    """Whatever the machine's auto choice, both precisions and one or two lanes are checked here: a
    window's vector is bit for bit the same whatever else is in its batch (in two lanes: whichever lane
    ran it, and in a batch that does not split evenly), and within cosine 0.9999 of the hand-written
    fp32 path."""
    import torch

    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from worker.embedder import AudioEmbedder

    emb = AudioEmbedder(get_clap(resolve(str(tiny_model)), "cpu", precision), lanes=lanes)
    assert emb.clap.precision == precision
    assert emb.clap.model.audio_model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    waves = [audio_48k(write(tmp_path / f"w{i}.wav", 10.0, rate, ch, freq=f, seed=i))[:480_000]
             for i, (rate, ch, f) in enumerate([(44_100, 2, 500), (16_000, 1, 330), (48_000, 1, 90),
                                                (22_050, 2, 1200), (48_000, 2, 60)])]
    target, others = waves[0], waves[1:]
    batches = [[target, *others[:3]], [others[3], others[2], target, others[0]], [target] * 4]
    if lanes == 2:  # 3 rows: the second lane's part is padded to the first's 2, so the shapes stay
        batches.append([others[1], others[2], target])
    seen = [emb.embed(np.stack(b))[[i for i, w in enumerate(b) if w is target][0]] for b in batches]
    assert all(np.array_equal(seen[0], v) for v in seen[1:])
    assert float(reference_embed(reference, target) @ seen[0]) >= 0.9999


def _window_attentions(model):
    from transformers.models.clap.modeling_clap import ClapAudioSelfAttention

    return [m for m in model.audio_model.modules() if isinstance(m, ClapAudioSelfAttention)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_window_attention_keeps_each_windows_vector(tmp_path, precision):
    """The loader runs the audio tower's window attention through torch's fused kernel (CLAPQ_ATTENTION=sdpa,
    the default). On a model whose stages also attend within shifted windows, under their mask, as every
    stage of the full-size model does (the suite's tiny model has one layer a stage, so none): a window's
    vector is bit for bit the same whatever else is in its batch, within cosine 0.99999 of transformers'
    own attention in fp32 (0.9999 in bf16, whose rounding differs by CPU) and 0.9999 of the hand-written fp32 path; a ClapModel loaded
    elsewhere keeps transformers' code. Several heads a stage and a relative position bias that is not
    zeros, as the full-size model has: with one head and a new model's zero bias, fused code that laid
    out the heads or the bias wrong gave the same vectors, and passed the load's check and this test."""
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from tests.tinyclap import build_tiny_clap
    from worker.embedder import AudioEmbedder

    model_dir = build_tiny_clap(tmp_path / "shifted", depths=(2, 2, 2, 2), heads=(2, 4, 8, 16), position_bias=True)
    ckpt = resolve(str(model_dir))
    fused = AudioEmbedder(get_clap(ckpt, "cpu", precision))
    eager = AudioEmbedder(get_clap(ckpt, "cpu", precision, attention="eager"))
    assert (fused.clap.attention, eager.clap.attention) == ("sdpa", "eager")
    assert all("forward" in m.__dict__ for m in _window_attentions(fused.clap.model))
    assert not any("forward" in m.__dict__ for m in _window_attentions(eager.clap.model))
    masks = []
    for m in _window_attentions(fused.clap.model):
        m.register_forward_pre_hook(lambda mod, args: masks.append(len(args) > 1 and args[1] is not None))
    waves = [audio_48k(write(tmp_path / f"w{i}.wav", 10.0, rate, ch, freq=f, seed=i))[:480_000]
             for i, (rate, ch, f) in enumerate([(44_100, 2, 500), (16_000, 1, 330), (48_000, 1, 90)])]
    got = fused.embed(np.stack(waves))
    assert any(masks) and not all(masks)  # shifted windows under their mask, and plain ones
    assert np.array_equal(fused.embed(np.stack([waves[2], waves[0]]))[1], got[0])
    assert float(np.min(np.sum(got * eager.embed(np.stack(waves)), axis=1))) >= \
        (0.99999 if precision == "fp32" else 0.9999)
    reference = load_reference(model_dir)
    assert all(float(reference_embed(reference, w) @ v) >= 0.9999 for w, v in zip(waves, got))
    assert not any("forward" in m.__dict__ for m in _window_attentions(reference[1]))


def test_the_fused_attention_is_called_as_transformers_4_calls_it(tmp_path):
    """pyproject takes transformers 4.45 and later, whose ClapAudioAttention (to 4.57) calls its attention module
    as self.self(hidden_states, attention_mask, head_mask, output_attentions). The fused forward took three
    arguments, and the load's check called it itself with two: it passed, and every pass of the audio tower
    then raised a TypeError (with transformers 4.57.1 installed, a worker's first pass stopped it as one that
    "cannot load its model", and `clapq up` stopped everything after three restarts). Here
    the two modules take 4.57's signature and call: the check goes through the module that calls the attention,
    the tower runs fused and gives transformers' vectors; asked for the attention probabilities (or given a
    head mask), the fused forward runs transformers' own."""
    import torch
    from transformers import ClapModel
    from transformers.models.clap.modeling_clap import ClapAudioAttention, ClapAudioSelfAttention

    from clapq.clap import use_fused_attention
    from tests.tinyclap import build_tiny_clap

    class SelfAttention457(ClapAudioSelfAttention):
        def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
            assert head_mask is None  # what transformers 4.57's tower passes (no head pruning)
            return super().forward(hidden_states, attention_mask, output_attentions=output_attentions)

    class Attention457(ClapAudioAttention):
        def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
            out = self.self(hidden_states, attention_mask, head_mask, output_attentions)
            return (self.output(out[0], hidden_states),) + out[1:]

    model_dir = build_tiny_clap(tmp_path / "shifted", depths=(2, 2, 2, 2), heads=(2, 4, 8, 16), position_bias=True)
    reference, model = (ClapModel.from_pretrained(model_dir).eval() for _ in range(2))
    for m in model.audio_model.modules():
        if isinstance(m, ClapAudioAttention):
            m.__class__ = Attention457
        elif isinstance(m, ClapAudioSelfAttention):
            m.__class__ = SelfAttention457
    assert use_fused_attention(model.audio_model)
    mel = torch.randn(2, 1, 1001, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = reference.audio_model(input_features=mel).pooler_output
        got = model.audio_model(input_features=mel).pooler_output
        assert float(torch.nn.functional.cosine_similarity(got, want).min()) >= 0.99999
        m = _window_attentions(model)[1]  # a shifted layer's
        x, tokens = torch.randn(8, 64, m.all_head_size), 64
        mask = torch.where(torch.rand(4, tokens, tokens) < 0.3, -100.0, 0.0)
        assert len(m(x, mask, None, True)) == 2  # its probabilities, by transformers' code
        assert torch.allclose(m(x, mask, None, False)[0], type(m).forward(m, x, mask)[0], atol=1e-5)


def test_an_attention_that_transformers_changed_keeps_its_own_code(tiny_model, caplog):
    """Where this transformers' attention module computes something else than the code the fused kernel
    replaces (another release), the loader's check at start sees it: the tower keeps its own code, and
    the log says why it is slower. CLAPQ_ATTENTION takes sdpa or eager only."""
    import logging

    from transformers import ClapModel
    from transformers.models.clap.modeling_clap import ClapAudioSelfAttention

    from clapq.clap import use_fused_attention
    from clapq.settings import Settings

    class Changed(ClapAudioSelfAttention):
        def forward(self, hidden_states, attention_mask=None, output_attentions=False):
            return (super().forward(hidden_states, attention_mask, output_attentions)[0] * 2,)

    model = ClapModel.from_pretrained(tiny_model).eval()
    for m in _window_attentions(model):
        m.__class__ = Changed
    with caplog.at_level(logging.WARNING, logger="clapq.clap"):
        assert not use_fused_attention(model.audio_model)
    assert not any("forward" in m.__dict__ for m in _window_attentions(model))
    assert "runs transformers' own, slower code" in caplog.text
    assert use_fused_attention(ClapModel.from_pretrained(tiny_model).eval().audio_model)
    # a mask of another kind than the additive one it adds (boolean, in some release) goes to transformers' code
    import torch

    from clapq.clap import _fused_window_attention

    att = _window_attentions(ClapModel.from_pretrained(tiny_model).eval())[0]
    tokens = att.relative_position_index.shape[0]
    x, flags = torch.randn((4, tokens, att.all_head_size)), torch.rand((2, tokens, tokens)) < 0.3
    with torch.inference_mode():
        assert torch.equal(_fused_window_attention(att, x, flags)[0], type(att).forward(att, x, flags)[0])
    assert [Settings.from_env({"CLAPQ_ATTENTION": v}).attention for v in ("", "sdpa", "EAGER")] == \
        ["sdpa", "sdpa", "eager"]
    with pytest.raises(SystemExit, match="CLAPQ_ATTENTION must be one of sdpa, eager, got 'flash'"):
        Settings.from_env({"CLAPQ_ATTENTION": "flash"})


def test_a_bf16_model_keeps_no_view_of_the_checkpoint_file(tiny_model):
    """After the cast nothing may point into the checkpoint's memory map, or the whole fp32 file stays
    mapped and counted in the process's memory (clapq.clap._own_buffers)."""
    from clapq.checkpoint import resolve
    from clapq.clap import LoadedClap

    def in_the_map(clap):
        maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(".safetensors")]
        spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps]
        tensors = list(clap.model.parameters()) + list(clap.model.buffers())
        return [t.shape for t in tensors if any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in spans)]

    ckpt = resolve(str(tiny_model))
    fp32 = LoadedClap(ckpt, "cpu", "fp32")
    assert in_the_map(fp32)  # the control: fp32 weights are the map itself, and this test sees that
    assert not in_the_map(LoadedClap(ckpt, "cpu", "bf16"))


def test_claim_more_takes_only_fresh_queued_items_of_this_model(settings):
    """What a task may add to fill its last batch: queued, never tried, in a library of its model, in a
    job not cancelled, oldest first, up to the limit; claimed like its own items (running, attempt 1)."""
    from sqlalchemy import update

    from clapq.db import session_scope
    from clapq.models import EmbeddingModel, Item, Job, Library, Tenant
    from worker.store import claim_more

    with session_scope(settings.database_url) as s:
        tenant = Tenant(name=f"more-{uuid.uuid4()}")
        ours, other = (EmbeddingModel(name=f"m-{uuid.uuid4()}", weights_sha256=uuid.uuid4().hex * 2, dim=512)
                       for _ in range(2))
        s.add_all([tenant, ours, other])
        s.flush()
        lib, lib_other = Library(tenant_id=tenant.id, name="a", model_id=ours.id), \
            Library(tenant_id=tenant.id, name="b", model_id=other.id)
        s.add_all([lib, lib_other])
        s.flush()
        job, job_cancelled, job_other = (Job(tenant_id=tenant.id, library_id=lib.id),
                                         Job(tenant_id=tenant.id, library_id=lib.id, cancelled=True),
                                         Job(tenant_id=tenant.id, library_id=lib_other.id))
        s.add_all([job, job_cancelled, job_other])
        s.flush()

        def item(name, j, lb, **kw):
            it = Item(tenant_id=tenant.id, library_id=lb.id, job_id=j.id, sha256=uuid.uuid4().hex * 2,
                      filename=name, size_bytes=1, **kw)
            s.add(it)
            s.flush()
            return it

        fresh = [item(f"fresh{i}", job, lib) for i in range(3)]
        for i, it in enumerate(fresh):  # their age in the queue: fresh0 the oldest
            s.execute(update(Item).where(Item.id == it.id).values(updated_at=func_now_minus(10 - i)))
        item("retried", job, lib, attempts=1)
        item("user retry", job, lib, started_at=func_now_minus(60))  # a retry resets attempts, not started_at
        item("running", job, lib, status="running", attempts=1)
        item("cancelled", job_cancelled, lib)
        item("other model", job_other, lib_other)
        fresh_ids = [it.id for it in fresh]
    # other models' and cancelled or tried items are never taken, and a limit is a limit
    with session_scope(settings.database_url) as s:
        got = claim_more(s, ours.id, 3, "task-a", 300, limit=2)
    assert {c.id for c in got} == set(fresh_ids[:2]) and all(c.attempt == 1 for c in got)  # the oldest two
    with session_scope(settings.database_url) as s:
        got = claim_more(s, ours.id, 3, "task-b", 300, limit=10)
        assert [c.id for c in got] == fresh_ids[2:]
        assert claim_more(s, ours.id, 3, "task-c", 300, limit=10) == []
    with session_scope(settings.database_url) as s:
        rows = {it.filename: (it.status, it.claimed_by, it.attempts)
                for it in s.query(Item).filter(Item.tenant_id == tenant.id)}
    assert rows["fresh0"] == ("running", "task-a", 1) and rows["fresh2"] == ("running", "task-b", 1)
    assert rows["retried"] == ("queued", None, 1) and rows["cancelled"][0] == "queued"
    assert rows["user retry"] == ("queued", None, 0)
    assert rows["other model"][0] == "queued" and rows["running"] == ("running", None, 1)


def func_now_minus(seconds: float):
    from sqlalchemy import func

    return func.now() - func.make_interval(0, 0, 0, 0, 0, 0, seconds)


def test_a_task_fills_its_last_batch_with_more_files_and_pads_only_at_the_end(tiny_model, tmp_path):
    """With 3 one-window files and batch 4 the pipeline asks for 1 more file before it pads. Here that
    file has 2 windows: one fills the batch, the other starts the next, which then asks for 3; it gets the
    last file, asks for 2 more, gets none, and only then is the last batch padded."""
    from clapq.blobs import BlobStore
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from worker import pipeline
    from worker.decoder import DecoderPool
    from worker.embedder import AudioEmbedder
    from worker.store import Claimed

    blobs = BlobStore(tmp_path / "blobs")

    def claimed(i, seconds=2.0):
        w = blobs.writer()
        w.write(write(tmp_path / f"f{i}.wav", seconds, 16_000, freq=200 + 50 * i, seed=i).read_bytes())
        return Claimed(uuid.uuid4(), w.commit(), None, 1)

    own, spare = [claimed(i) for i in range(3)], [claimed(3, seconds=12.0), claimed(4)]
    asked, batches, done = [], [], []

    def top_up(rows):
        asked.append(rows)
        more, spare[:] = spare[:rows], spare[rows:]
        return more

    emb = AudioEmbedder(get_clap(resolve(str(tiny_model)), "cpu"))
    pool = DecoderPool(1)
    try:
        pipeline.run(own, blobs, pool, emb, pipeline.Options(batch_size=4, scratch_dir=tmp_path), done.extend,
                     lambda d: pytest.fail(d.error), on_batch=lambda n, secs: batches.append(n), top_up=top_up)
    finally:
        pool.close()
    assert asked == [1, 3, 2] and batches == [4, 2]
    assert sorted(len(d.windows) for d, _ in done) == [1, 1, 1, 1, 2]


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_files_vectors_do_not_depend_on_how_full_its_batch_is_in_fp32(tiny_model, tmp_path, lanes):
    """A matrix product gives a row other bits when the product has another number of rows (MKL in fp32, oneDNN
    in bf16: with the full-size model, a pass of 8 windows against 16 moved a window by 6e-4 in bf16; BENCHMARKS.md,
    helper-84). The suite's model shows it in fp32 only, so the tests that run a worker, in bf16 where the CPU
    multiplies it natively (`auto`), would not see a batch run part-empty. The pipeline pads every batch to full
    and the embedder cuts it into equal lanes: a file alone at the end of a backlog, its batch 3 zero rows of 4,
    gets the vectors it gets in full batches beside other files, on other rows."""
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from worker import pipeline
    from worker.decoder import DecoderPool
    from worker.embedder import AudioEmbedder
    from worker.store import Claimed

    clap = get_clap(resolve(str(tiny_model)), "cpu", "fp32")
    probe = (np.random.default_rng(5).standard_normal((4, 480_000)) * 0.1).astype(np.float32)
    one = AudioEmbedder(clap)
    if np.array_equal(one.embed(probe[:1])[0], one.embed(probe)[0]):
        pytest.skip("this machine's fp32 products give a row the same bits whatever their rows: nothing to see here")
    blobs = BlobStore(tmp_path / "blobs")
    target = Claimed(uuid.uuid4(), blobs.put_bytes(write(tmp_path / "t.wav", 7.5, 44_100, 2, freq=500, seed=42)
                                                   .read_bytes()), None, 1)  # 1 window, as each of the others
    others = [Claimed(uuid.uuid4(), blobs.put_bytes(write(tmp_path / f"o{i}.wav", secs, 16_000, freq=150 * (i + 2),
                                                          seed=i).read_bytes()), None, 1)
              for i, secs in enumerate((2.0, 7.0, 4.0))]
    emb = AudioEmbedder(clap, lanes=lanes)
    pool = DecoderPool(1)
    seen, batches = [], []
    try:
        for files in ([target], [others[0], others[1], target, others[2]], [others[0], target, others[1], others[2]]):
            done = []
            pipeline.run(files, blobs, pool, emb, pipeline.Options(batch_size=4, scratch_dir=tmp_path), done.extend,
                         lambda d: pytest.fail(d.error), on_batch=lambda n, secs: batches.append(n))
            seen.append(next(v for d, v in done if d.item.id == target.id))
    finally:
        pool.close()
    assert batches == [1, 4, 4]  # alone: 1 window and 3 zero rows; then in full batches, on rows 2 and 1
    assert seen[0].shape == (1, 512)
    assert all(np.array_equal(seen[0], v) for v in seen[1:])


def test_a_file_dropped_meanwhile_runs_no_more_windows(tiny_model, tmp_path):
    """A 30 s file (5 windows) and a 1 s one, batch 4. After the first batch the long file's id appears in
    `dropped` (as the heartbeat adds a file deleted meanwhile): its fifth window is not run, it never
    reaches on_done and its scratch file is gone; the short file's batch still runs."""
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from worker import pipeline
    from worker.decoder import DecoderPool
    from worker.embedder import AudioEmbedder
    from worker.store import Claimed

    blobs = BlobStore(tmp_path / "blobs")
    long, short = (Claimed(uuid.uuid4(), blobs.put_bytes(write(tmp_path / f"{n}.wav", secs, 16_000, seed=80 + secs)
                                                         .read_bytes()), None, 1) for n, secs in (("l", 30), ("s", 1)))
    dropped, batches, done = set(), [], []

    def on_batch(n, secs):
        batches.append(n)
        dropped.add(long.id)

    emb = AudioEmbedder(get_clap(resolve(str(tiny_model)), "cpu"))
    pool = DecoderPool(1)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    try:
        pipeline.run([long, short], blobs, pool, emb, pipeline.Options(batch_size=4, scratch_dir=scratch),
                     done.extend, lambda d: pytest.fail(d.error), on_batch=on_batch, dropped=dropped)
    finally:
        pool.close()
    assert batches == [4, 1] and [d.item.id for d, _ in done] == [short.id]
    assert list(scratch.iterdir()) == []


def test_a_long_file_reports_its_share_of_windows_embedded(tiny_model, tmp_path):
    """Files of 1, 2 and 5 windows (1, 15 and 30 s), batch 2: after each batch the 5-window file's share of
    windows embedded is in `progress` (which the heartbeat records), 1/5 then 3/5, and gone once it is
    done; the 2-window file, which also spans two batches but no more than a batch of windows, never is."""
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from worker import pipeline
    from worker.decoder import DecoderPool
    from worker.embedder import AudioEmbedder
    from worker.store import Claimed

    blobs = BlobStore(tmp_path / "blobs")
    short, mid, long = (Claimed(uuid.uuid4(), blobs.put_bytes(write(tmp_path / f"{secs}.wav", secs, 16_000, seed=90 + secs)
                                                              .read_bytes()), None, 1) for secs in (1, 15, 30))
    progress, seen, done = {}, [], []
    emb = AudioEmbedder(get_clap(resolve(str(tiny_model)), "cpu"))
    pool = DecoderPool(1)
    try:
        pipeline.run([short, mid, long], blobs, pool, emb, pipeline.Options(batch_size=2, scratch_dir=tmp_path),
                     done.extend, lambda d: pytest.fail(d.error), on_batch=lambda n, secs: seen.append(dict(progress)),
                     progress=progress)
    finally:
        pool.close()
    # on_batch comes as a batch's vectors are back, before they are counted
    assert seen == [{}, {}, {long.id: 0.2}, {long.id: 0.6}] and progress == {}
    assert sorted(len(d.windows) for d, _ in done) == [1, 2, 5]


def test_the_engine_benchmarks_pipeline_path_embeds_its_clips(tiny_model, tmp_path):
    """benchmarks/engine.py's `pipeline` path, the first step of the prepared GPU check (benchmarks/gpu.sh,
    whose first failure ends it), drives worker.pipeline with items of its own making. Those once lacked
    a field the pipeline had come to read (job_id), and the GPU call would have been spent on a traceback."""
    import torch

    from benchmarks.engine import Pipeline, _write_clip

    clips = [tmp_path / f"clip{i}.wav" for i in range(3)]
    for i, path in enumerate(clips):
        _write_clip(path, i, 44_100)
    engine = Pipeline(tiny_model, 2, torch.device("cpu"), "fp32", 1, False, 1)
    try:
        out = engine.run(clips, tmp_path / "scratch")  # it checks that every clip came back embedded
    finally:
        engine.close()
    assert out["clips"] == 3 and out["clips_per_s"] > 0


def _installed_closure(roots: list[str]) -> set[str]:
    """The installed distributions `roots` need, themselves included (extras followed), by canonical name."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extras_of: dict[str, frozenset] = {}
    todo = [(name, frozenset()) for name in roots]
    while todo:
        name, extras = todo.pop()
        name = canonicalize_name(name)
        if name in extras_of and extras <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, frozenset()) | extras
        for line in distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras_of[name])):
                todo.append((req.name, frozenset(req.extras)))
    return set(extras_of)


def test_the_gpu_check_carries_every_package_the_service_needs_beside_the_images():
    """The lent GPU machine has torch, transformers and their kind, and no network: benchmarks/gpu.sh
    installs the service's other packages from a fixed list of wheels. A dependency added to the project
    and not to that list would end the GPU's one call on an ImportError. PyAV alone is left out on
    purpose (its wheel would not fit the call's 64 MiB carry; it is imported only for files soundfile
    cannot read, and the benchmark's clips are WAV)."""
    import re

    from packaging.utils import canonicalize_name

    from tests.conftest import ROOT

    script = (ROOT / "benchmarks" / "gpu.sh").read_text()
    listed = {canonicalize_name(w.split("==")[0]) for w in re.search(r'WHEELS="([^"]*)"', script)[1].split()}
    image = _installed_closure(["torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "numpy"])
    needed = _installed_closure(["clapq"]) - image - {"clapq"}
    assert "soundfile" in needed and "celery" in needed  # the walk found the project's requirements
    assert needed - listed == {"av"}


def test_a_file_dropped_while_it_decodes_is_not_decoded_on(tiny_model, tmp_path):
    """A file whose decoding does not end (a pipe in its blob's place, as hours of audio take a while) and
    a 1 s file, two decoder children. A second in, the first's id appears in `dropped`: its decoding stops
    (it is neither failed by the 30 s decode timeout nor done), the second file is embedded, and no
    scratch file is left."""
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from worker import pipeline
    from worker.decoder import DecoderPool
    from worker.embedder import AudioEmbedder
    from worker.store import Claimed

    blobs = BlobStore(tmp_path / "blobs")
    short = Claimed(uuid.uuid4(), blobs.put_bytes(write(tmp_path / "s.wav", 1.0, 16_000, seed=5).read_bytes()),
                    None, 1)
    endless = Claimed(uuid.uuid4(), "ab" * 32, None, 1)
    blobs.path_for(endless.sha256).parent.mkdir(parents=True)
    os.mkfifo(blobs.path_for(endless.sha256))
    dropped, done = set(), []
    threading.Timer(1.0, dropped.add, (endless.id,)).start()
    emb = AudioEmbedder(get_clap(resolve(str(tiny_model)), "cpu"))
    pool = DecoderPool(2)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    try:
        pipeline.run([endless, short], blobs, pool, emb,
                     pipeline.Options(batch_size=4, scratch_dir=scratch, decode_timeout_s=30),
                     done.extend, lambda d: pytest.fail(d.error), dropped=dropped)
    finally:
        pool.close()
    assert [d.item.id for d, _ in done] == [short.id]
    assert list(scratch.iterdir()) == []


def test_the_decoders_go_on_into_later_files_while_the_model_works(tiny_model, tmp_path):
    """`more()` is asked as soon as the read-ahead (2 deep here) has taken a task's last file, so the
    next files decode before the task's first batch runs, not after it; when it returns [] the stream
    ends, and only then does the last batch ask `top_up` to fill it, and pad."""
    from clapq.checkpoint import resolve
    from clapq.clap import get_clap
    from worker import pipeline
    from worker.decoder import DecoderPool
    from worker.embedder import AudioEmbedder
    from worker.store import Claimed

    blobs = BlobStore(tmp_path / "blobs")
    files = [Claimed(uuid.uuid4(), blobs.put_bytes(write(tmp_path / f"m{i}.wav", 1.0, 16_000, seed=70 + i)
                                                   .read_bytes()), None, 1) for i in range(6)]
    chunks, spare, events = [files[2:3], files[3:5], []], files[5:], []

    def more():
        events.append("more")
        return chunks.pop(0)

    def top_up(rows):
        events.append(f"top_up {rows}")
        got, spare[:] = spare[:rows], spare[rows:]
        return got

    emb = AudioEmbedder(get_clap(resolve(str(tiny_model)), "cpu"))
    pool, done = DecoderPool(1), []
    try:
        pipeline.run(files[:2], blobs, pool, emb, pipeline.Options(batch_size=4, scratch_dir=tmp_path, read_ahead=2),
                     done.extend, lambda d: pytest.fail(d.error),
                     on_batch=lambda n, secs: events.append(f"batch {n}"), top_up=top_up, more=more)
    finally:
        pool.close()
    assert events == ["more", "more", "more", "batch 4", "top_up 3", "top_up 2", "batch 2"]
    assert sorted(d.item.id for d, _ in done) == sorted(f.id for f in files)


def test_files_decoded_ahead_leave_no_scratch_file_when_a_task_stops_early(tmp_path):
    """An error in the middle of a task closes the read-ahead: the files it had decoded (or was decoding)
    for later batches are deleted, not left in the scratch directory. So does an error raised by the
    items themselves (claiming later files)."""
    from worker import pipeline
    from worker.decoder import DecoderPool
    from worker.store import Claimed

    blobs, scratch = BlobStore(tmp_path / "blobs"), tmp_path / "scratch"
    scratch.mkdir()
    items = [Claimed(uuid.uuid4(), blobs.put_bytes(write(tmp_path / f"r{i}.wav", 1.0, seed=40 + i).read_bytes()),
                     None, 1) for i in range(5)]
    pool = DecoderPool(2)
    try:
        ahead = pipeline.read_ahead(pool, blobs, items, 48_000,
                                    pipeline.Options(scratch_dir=scratch, read_ahead=4))
        first = next(ahead)
        assert first.error is None and first.raw_path.exists()
        ahead.close()  # what an exception in the task's loop does to the generator
        first.cleanup()  # the one handed out is the task's to delete
        assert list(scratch.iterdir()) == []

        def then_a_fault():  # claiming later files (Postgres) fails after three
            yield from items[:3]
            raise RuntimeError("claim failed")

        for depth in (2, 4):  # the fault while refilling, and while filling the read-ahead at the start
            handed = []
            with pytest.raises(RuntimeError, match="claim failed"):
                for d in pipeline.read_ahead(pool, blobs, then_a_fault(), 48_000,
                                             pipeline.Options(scratch_dir=scratch, read_ahead=depth)):
                    handed.append(d)
            for d in handed:
                d.cleanup()
            assert list(scratch.iterdir()) == [], depth
    finally:
        pool.close()


def test_files_decoded_ahead_wait_while_they_hold_the_scratch_allowed(tmp_path, monkeypatch):
    """A GPU reads a batch ahead (256 files), and 256 recordings of hours each would have filled the scratch
    disk (helper-56). While the files decoded ahead hold AHEAD_BYTES, a further decode starts only for the
    file the model takes next: with room for nothing, two decoders and a read-ahead of 6, at most the file
    handed out, one a decoder each and the next are on disk (before, all seven), and every file still comes,
    in order."""
    from worker import pipeline
    from worker.decoder import DecoderPool
    from worker.store import Claimed

    blobs, scratch = BlobStore(tmp_path / "blobs"), tmp_path / "scratch"
    scratch.mkdir()
    items = [Claimed(uuid.uuid4(), blobs.put_bytes(write(tmp_path / f"h{i}.wav", 1.0, seed=80 + i).read_bytes()),
                     None, 1) for i in range(7)]
    monkeypatch.setattr(pipeline, "AHEAD_BYTES", 1)
    pool, handed, on_disk = DecoderPool(2), [], []
    try:
        for d in pipeline.read_ahead(pool, blobs, items, 48_000, pipeline.Options(scratch_dir=scratch, read_ahead=6)):
            assert d.error is None and d.n == 48_000, d.error
            handed.append(d.item.id)
            time.sleep(1.0)  # the model at work: without the wait, the decoders fill the read-ahead meanwhile
            on_disk.append(sum(f.stat().st_size > 0 for f in scratch.iterdir()))  # waiting ones: made, empty
            d.cleanup()
    finally:
        pool.close()
    assert handed == [i.id for i in items]
    assert max(on_disk) <= 2 + pool.size, on_disk  # before: [7, 6, 5, 4, 3, 2, 1]


def test_scratch_files_of_killed_workers_are_removed_at_the_next_start(tmp_path):
    """A worker killed mid-task (SIGKILL, the OOM killer) leaves its decoded files behind, up to 1.4 GB for
    a 2-hour file. Each worker process decodes into its own directory, locked while it lives, and a
    starting one removes the directories nobody holds; a live process's directory is left alone."""
    import textwrap

    from worker.pipeline import own_scratch

    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from worker.pipeline import own_scratch
        d = own_scratch(Path({str(tmp_path)!r}))
        (d / "decoded-x.f32").write_bytes(bytes(1024))
        print(d.name, flush=True)
        time.sleep(float(sys.argv[1]))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ended = subprocess.run([sys.executable, "-c", code, "0"], env=env, capture_output=True, text=True, check=True)
    running = subprocess.Popen([sys.executable, "-c", code, "60"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        alive = running.stdout.readline().strip()
        old = tmp_path / "worker-old-layout"  # no lock file and untouched for two days: an earlier version's
        old.mkdir()
        os.utime(old, (time.time() - 2 * 86400,) * 2)
        # no lock file but in use: a tmp cleaner took the lock of a live worker, or one is being made now
        (tmp_path / "worker-lost-its-lock").mkdir()
        mine = own_scratch(tmp_path)
        assert mine.name.startswith(f"worker-{os.getpid()}-") and [p.name for p in mine.iterdir()] == [".lock"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, alive, "worker-lost-its-lock"])
        assert ended.stdout.strip() != alive and (tmp_path / alive / "decoded-x.f32").exists()
    finally:
        running.kill()
        running.wait()


def test_a_full_scratch_disk_is_not_the_files_fault(tmp_path):
    """Writing decoded samples where the disk is full (/dev/full answers every write with ENOSPC) raises
    ScratchError, directly and through a decoder child, not DecodeError (which fails the file for good):
    the task hands its files back instead. The child lives on and decodes the next file."""
    from worker.audio import ScratchError, decode_to_file

    src = write(tmp_path / "a.wav", 1.0, 44_100, 2)
    with pytest.raises(ScratchError) as direct:
        decode_to_file(src, "/dev/full")
    assert direct.value.errno == errno.ENOSPC and not isinstance(direct.value, DecodeError)
    with pytest.raises(ScratchError):
        decode_to_file(src, tmp_path / "gone" / "out.f32")  # the scratch directory was removed
    d = DecoderProcess()
    try:
        with pytest.raises(ScratchError) as via_child:
            d.decode(src, Path("/dev/full"), timeout_s=60, max_duration_s=None)
        assert via_child.value.errno == errno.ENOSPC and "scratch file" in str(via_child.value)
        pid = d.proc.pid
        info, n = d.decode(src, tmp_path / "ok.f32", timeout_s=60, max_duration_s=None)
        assert n == 48_000 and d.proc.pid == pid
    finally:
        d.close()


def test_lanes_rule_and_its_setting():
    """CLAPQ_LANES=auto: one model pass per core on a CPU with an eager tower, as many as divide the
    batch's rows; one on a GPU and for a compiled tower; a number is honoured up to the batch's rows."""
    import torch

    from clapq.settings import Settings
    from worker.embedder import lanes_for

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert lanes_for(None, cpu, False, 16, 2) == 2 and lanes_for(None, cpu, False, 16, 64) == 16
    assert lanes_for(None, cpu, False, 16, 6) == 4 and lanes_for(None, cpu, False, 16, 1) == 1  # no padded rows
    assert lanes_for(None, cpu, True, 16, 2) == 1 and lanes_for(None, gpu, False, 256, 16) == 1
    assert lanes_for(3, cpu, True, 16, 2) == 3 and lanes_for(32, cpu, False, 16, 2) == 16
    assert [Settings.from_env({"CLAPQ_LANES": v}).lanes for v in ("", "auto", "1", "4")] == [None, None, 1, 4]


def test_batch_rule_gives_each_cores_pass_eight_windows():
    """CLAPQ_BATCH_SIZE=auto: on a CPU with an eager tower and auto lanes, 8 windows for each core's one-thread pass
    (16 on 2 cores, as before; a batch of 16 left passes of 1 window on 16 cores, and 2 cores of 6 idle), up to 32
    cores, then a multiple of the cores within the cap;
    16 on a GPU, for a compiled tower and beside a set CLAPQ_LANES; a number is used as given."""
    import torch

    from clapq.settings import Settings
    from worker.embedder import batch_for, lanes_for

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for threads, batch in [(1, 8), (2, 16), (6, 48), (16, 128), (32, 256), (64, 256), (96, 192), (512, 512)]:
        assert batch_for(None, cpu, False, None, threads) == batch
        assert lanes_for(None, cpu, False, batch, threads) == threads  # every core a pass, none idle
    # 8 windows a pass up to 32 cores; past that the cap (~17 MB a window) leaves fewer
    assert [batch_for(None, cpu, False, None, t) // t for t in (32, 64, 96, 512)] == [8, 4, 2, 1]
    assert batch_for(None, cpu, True, None, 16) == 16 and batch_for(None, gpu, False, None, 16) == 16
    assert batch_for(None, cpu, False, 2, 16) == 16 and batch_for(4, cpu, False, None, 16) == 4
    assert [Settings.from_env({"CLAPQ_BATCH_SIZE": v}).batch_size for v in ("", "auto", "4")] == [None, None, 4]
    with pytest.raises(SystemExit, match="CLAPQ_LANES must be at least 1, got 0"):
        Settings.from_env({"CLAPQ_LANES": "0"})


def test_a_lane_that_holds_only_padding_is_not_run(tiny_model):
    """A batch's last rows pad it (the last batch of a job, a retry's batch): a lane whose rows are all padding is
    not run, and the lanes run give each wanted window the bits a full batch gives it."""
    from clapq.clap import get_clap
    from clapq.checkpoint import resolve
    from worker.embedder import AudioEmbedder

    emb = AudioEmbedder(get_clap(resolve(str(tiny_model)), "cpu", "fp32"), lanes=2)
    try:
        waves = np.zeros((4, emb.window_samples), np.float32)
        waves[0] = np.sin(np.arange(emb.window_samples) * 0.01) * 0.3
        full = emb.embed(waves)
        assert full.shape[0] == 4
        one = emb.embed(waves, wanted=1)
        assert one.shape[0] == 2  # the second lane, rows 2-3, was not run
        assert np.array_equal(one, full[:2])
        assert emb.embed(waves, wanted=3).shape[0] == 4
    finally:
        emb.close()


def test_settings_out_of_range_are_sentences():
    """A setting that would make a worker spin, fail every file or die in Celery's own checks stops every
    process at start with the setting named."""
    from clapq.settings import Settings

    for env, says in [({"CLAPQ_BATCH_SIZE": "0"}, "CLAPQ_BATCH_SIZE must be at least 1, got 0"),
                      ({"CLAPQ_MAX_ATTEMPTS": "0"}, "CLAPQ_MAX_ATTEMPTS must be at least 1"),
                      ({"CLAPQ_WORKER_CONCURRENCY": "0"}, "CLAPQ_WORKER_CONCURRENCY must be at least 1"),
                      ({"CLAPQ_SWEEP_INTERVAL_S": "-1"}, "CLAPQ_SWEEP_INTERVAL_S must be at least 1"),
                      ({"CLAPQ_WORKER_NICE": "25"}, "CLAPQ_WORKER_NICE must be from 0 to 19"),
                      ({"CLAPQ_HNSW_EF_SEARCH": "1001"}, "CLAPQ_HNSW_EF_SEARCH must be from 1 to 1000"),
                      ({"CLAPQ_HEARTBEAT_S": "60", "CLAPQ_STALE_AFTER_S": "30"}, "must be less than"),
                      ({"CLAPQ_DECODE_CPU_S": "0"}, "CLAPQ_DECODE_CPU_S must be at least 1, got 0"),
                      ({"CLAPQ_DECODE_TIMEOUT_S": "60", "CLAPQ_DECODE_CPU_S": "61"},
                       "CLAPQ_DECODE_CPU_S (61) must not be more than CLAPQ_DECODE_TIMEOUT_S (60)"),
                      ({"CLAPQ_DECODE_CPU_S": "601"}, "must not be more than CLAPQ_DECODE_TIMEOUT_S (600)"),
                      ({"CLAPQ_LOG_LEVEL": "verbose"}, "CLAPQ_LOG_LEVEL must be one of debug, info")]:
        with pytest.raises(SystemExit) as e:
            Settings.from_env(env)
        assert says in str(e.value.code), (env, e.value.code)
    assert Settings.from_env({"CLAPQ_LOG_LEVEL": "warning"}).log_level == "WARNING"
    # the CPU limit a file's decoding may use, as the file's: half the clock's unless set
    assert [Settings.from_env(env).decode_cpu_s for env in (
        {}, {"CLAPQ_DECODE_TIMEOUT_S": "10"}, {"CLAPQ_DECODE_TIMEOUT_S": "1"},
        {"CLAPQ_DECODE_TIMEOUT_S": "60", "CLAPQ_DECODE_CPU_S": "60"})] == [300, 5, 1, 60]
    assert Settings.from_env({}).log_level == "INFO"
    from clapq import logs

    with pytest.raises(SystemExit) as e:
        logs.configure("INFO", "xml")
    assert "CLAPQ_LOG_FORMAT must be json or text" in str(e.value.code)
