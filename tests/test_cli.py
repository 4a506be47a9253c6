"""The README's first command: `clapq up` starts everything, serves a user, persists, and stops cleanly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests

from clapq.blobs import file_sha256
from clapq.db import session_scope
from clapq.embedded import free_port
from tests.audio import write

ROOT = Path(__file__).resolve().parents[1]


def _env(tiny_model, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CLAPQ_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(CLAPQ_MODEL=str(tiny_model), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
               CLAPQ_BATCH_SIZE="4", TOKENIZERS_PARALLELISM="false",
               CLAPQ_COMPILE="0")  # as conftest: no compile at each worker start on CPUs without bf16
    env.update(extra)
    return env


def _leftovers(data_dir: Path) -> list[str]:
    """Processes still running that belong to this data directory (postgres, redis, our children)."""
    found = []
    for p in psutil.process_iter(attrs=("pid", "cmdline", "environ")):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.info["environ"] or {}
        except (psutil.Error, TypeError):
            continue
        if str(data_dir) in cmd or env.get("CLAPQ_DATA_DIR") == str(data_dir):
            found.append(f"{p.info['pid']}: {cmd[:120]}")
    return found


class Up:
    def __init__(self, data_dir: Path, env: dict[str, str], log: Path, cwd: Path | None = None,
                 cwd_removed: bool = False, nohup: bool = False) -> None:
        self.port = free_port()
        self.log = log
        self.out = open(log, "ab")
        # in another working directory, clapq imported as the `clapq` command does: from where it is installed
        # (PYTHONPATH here), not from that directory, which `python -m` puts first on sys.path; `cwd_removed`: that
        # directory removed as it starts
        cli = (["-m", "clapq.cli"] if cwd is None
               else ["-c", "import os, sys; del sys.path[0]; " + ("os.rmdir(os.getcwd()); " if cwd_removed else "")
                     + "from clapq.cli import main; main()"])
        # `nohup`: SIGHUP ignored, as `nohup clapq up` starts it
        self.proc = subprocess.Popen([*(["nohup"] if nohup else []), sys.executable, *cli, "up", "--data-dir",
                                      str(data_dir), "--port", str(self.port)], env=env, stdout=self.out, cwd=cwd,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "clapq is up:" in text:
                return text.split("API key: ")[-1].split()[0]
            assert self.proc.poll() is None, text[-3000:]
            time.sleep(0.2)
        raise AssertionError(self.log.read_text()[-3000:])

    def stop(self, sig: int = signal.SIGINT) -> int:  # SIGINT: what Ctrl-C sends
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


@pytest.fixture()
def up_runner(tmp_path, tiny_model):
    started: list[Up] = []

    def start(data_dir: Path, cwd: Path | None = None, cwd_removed: bool = False, nohup: bool = False,
              **env: str) -> Up:
        u = Up(data_dir, _env(tiny_model, CLAPQ_MAX_REQUEST_BYTES=str(16 << 20), **env),
               tmp_path / f"up{len(started)}.log", cwd, cwd_removed, nohup)
        started.append(u)
        return u

    yield start
    for u in started:
        u.stop()


def _wait_job(base, h, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{base}/v1/jobs/{job_id}", headers=h, timeout=10).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.3)
    raise AssertionError(job)


def test_up_in_a_terminal_writes_its_roles_logs_as_text(tmp_path, tiny_model):
    """`clapq up` run by a person, in a terminal: its roles wrote JSON records (every request of the search page one
    line of braces and quotes). In a terminal they are text; where the output is not one (a file, a log collector,
    every other test here) they stay JSON, and CLAPQ_LOG_FORMAT still decides where it is set."""
    import pty

    main, other = pty.openpty()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "up", "--data-dir", str(tmp_path / "data"),
                             "--port", str(port)], env=_env(tiny_model), stdout=other, stderr=other,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    os.close(other)
    out = b""

    def read(until, timeout: float) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            if select.select([main], [], [], 0.2)[0]:
                try:
                    out += os.read(main, 65536)
                except OSError:  # every writer gone: it has ended
                    return
    try:
        read(lambda: b"clapq is up" in out and b" ready." in out, 120)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        read(lambda: b"/healthz" in out, 10)
    finally:
        proc.send_signal(signal.SIGINT)
        read(lambda: proc.poll() is not None, 90)  # read on: a full terminal would hold its writers
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        os.close(main)
    text = out.decode(errors="replace")
    lines = text.splitlines()
    assert not [line for line in lines if line.lstrip().startswith('{"')], text[-3000:]
    assert any(re.search(r" INFO celery\.apps\.worker: clapq@\S+ ready\.", line) for line in lines), text[-3000:]
    assert any(re.search(r'"GET /healthz HTTP/1\.1" 200', line) for line in lines), text[-3000:]


def test_up_serves_persists_and_stops(tmp_path, tiny_model, up_runner):
    data_dir = tmp_path / "data"
    up = up_runner(data_dir)
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 200
    # a second `clapq up` on the same data would start its own Redis and workers beside these: refused
    second = subprocess.run([sys.executable, "-m", "clapq.cli", "up", "--data-dir", str(data_dir), "--port",
                             str(free_port())], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"another `clapq up` (pid {up.proc.pid}), or processes it started, are using {data_dir}" in \
        second.stderr, second.stderr

    lib = requests.post(f"{base}/v1/libraries", json={"name": "field recordings"}, headers=h, timeout=30).json()
    files = [write(tmp_path / f"f{i}.wav", 1.5 + i, 44_100, 2, freq=250 * (i + 1), seed=i) for i in range(3)]
    with_bad = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in files]
    with_bad.append(("files", ("notes.mp3", b"this is a text file, not audio", "audio/mpeg")))
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", files=with_bad, headers=h, timeout=60)
    assert r.status_code == 202, r.text
    job = _wait_job(base, h, r.json()["job_id"])
    assert job["status"] == "done_with_errors" and job["counts"]["done"] == 3
    assert job["errors"][0]["filename"] == "notes.mp3"
    r = requests.get(f"{base}/v1/search", params={"library_id": lib["id"], "q": "birdsong", "k": 2},
                     headers=h, timeout=60)
    res = r.json()
    assert len(res["results"]) == 2 and res["results"][0]["score"] >= res["results"][1]["score"]
    assert "query;dur=" in r.headers["Server-Timing"] and "search;dur=" in r.headers["Server-Timing"]
    # ingest yields the CPU to the API's text tower: workers (and their decoders) run niced
    nices = {}
    for proc in psutil.process_iter(attrs=("cmdline", "environ", "nice")):
        cmd = " ".join(proc.info["cmdline"] or [])
        if (proc.info["environ"] or {}).get("CLAPQ_DATA_DIR") == str(data_dir) and "clapq.cli" in cmd:
            nices.setdefault(cmd.split("clapq.cli")[-1].split()[0], set()).add(proc.info["nice"])
    assert nices.get("worker") == {19} and nices.get("api") == {0}, nices

    # a chunked upload over the limit is refused with 413, through the real server
    def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.wav\"\r\n\r\n"
        for _ in range(64):
            yield b"\0" * (1 << 20)

    try:
        r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", data=body(), timeout=60,
                          headers={**h, "Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and str(16 << 20) in r.json()["error"]["message"], r.text
    except requests.ConnectionError:
        pass  # the server may close the connection while we are still sending: also a refusal
    assert requests.get(f"{base}/v1/libraries/{lib['id']}", headers=h, timeout=10).json()["item_count"] == 4

    # the README's folder flow: `clapq upload DIR` then `clapq search`
    folder = tmp_path / "folder"
    (folder / "rain").mkdir(parents=True)
    write(folder / "rain" / "heavy.flac", 2.0, 48_000, 1, freq=900, seed=7)
    write(folder / "drone.wav", 12.0, 22_050, 1, freq=60, seed=8)
    (folder / "readme.txt").write_text("not audio, skipped by suffix")
    shutil.copyfile(folder / "drone.wav", folder / "rain" / "drone copy.wav")  # the same bytes: one item
    os.symlink(folder / "gone", folder / "gone.wav")  # a broken link and a pipe (opened, it would wait forever)
    os.mkfifo(folder / "pipe.wav")
    os.symlink(folder, folder / "rain" / "loop")  # a link to a folder, here a loop: named, not followed
    # a link to a file of the folder, sorting first: the file was stored under the link's name, and said to be
    # a copy of its link (helper-51)
    os.symlink(folder / "rain" / "heavy.flac", folder / "a link.flac")
    cli = [sys.executable, "-m", "clapq.cli"]
    out = subprocess.run(cli + ["upload", str(folder), "--library", "folder lib", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["files"] == 3 and summary["duplicates"] == 1 and summary["failed"] == 0, summary
    # not a terminal: progress is whole lines (no carriage returns), the last one the final count
    progress = [line for line in out.stderr.splitlines() if "files processed" in line]
    assert "\r" not in out.stderr and progress and progress[-1] == "3/3 files processed (100%)", out.stderr
    assert out.stderr.splitlines()[:4] == [
        "left out 1 file not named as audio (.txt)",
        "left out 2 entries with an audio file's name that are not a file (a broken link, a pipe, a device): gone.wav, "
        "pipe.wav",
        "not followed: 1 link to a folder (rain/loop); upload the folder it points to on its own",
        "left out 1 link to files of this folder, which are sent under their own names: a link.flac → "
        "rain/heavy.flac"], out.stderr
    assert out.stderr.splitlines()[4] == "created library 'folder lib'", out.stderr
    assert out.stderr.splitlines()[5].startswith("uploading 3 files ("), out.stderr  # before the request
    assert "1 file had the same bytes as another and is stored once: rain/drone copy.wav (= drone.wav)" in \
        out.stderr.splitlines(), out.stderr
    # given only the data directory, the client finds the address and key `up` left there (this `up` is not on
    # port 8000: with the key alone, helper-51's search went to 8000)
    out = subprocess.run(cli + ["search", "heavy rain", "--library", "folder lib", "--data-dir", str(data_dir)],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    # each file by its path in the folder (the server keeps the base name, and the path in its metadata)
    assert out.returncode == 0 and sorted(line.split()[1] for line in out.stdout.splitlines()) == \
        ["drone.wav", "rain/heavy.flac"], out.stdout + out.stderr
    # by a sound: the file itself comes first, with the window that matched
    out = subprocess.run(cli + ["search", "--like", str(folder / "rain" / "heavy.flac"), "--library", "folder lib",
                                "--url", base, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    best = out.stdout.splitlines()[0].split()
    assert best[:2] == ["1.0000", "rain/heavy.flac"] and best[-2:] == ["0-2", "s"], out.stdout
    # --json: the API's answer, for scripts (a path with spaces moved the id's column, helper-57)
    out = subprocess.run(cli + ["search", "--like", str(folder / "rain" / "heavy.flac"), "--library", "folder lib",
                                "--url", base, "--key", key, "--json", "-k", "1"], env=_env(tiny_model),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    [hit] = json.loads(out.stdout)["results"]
    assert hit["metadata"]["path"] == "rain/heavy.flac" and hit["segment"] == {"start_s": 0.0, "end_s": 2.0}, hit
    out = subprocess.run(cli + ["search", "rain", "--like", str(folder / "drone.wav"), "--library", "folder lib",
                                "--url", base, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "either words to search for or --like FILE" in out.stderr, out.stderr
    out = subprocess.run(cli + ["search", "--library", "folder lib", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "give words to search for, or --like FILE" in out.stderr, out.stderr
    out = subprocess.run(cli + ["search", " ", "--library", "folder lib", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "the words to search for are empty" in out.stderr, out.stderr
    out = subprocess.run(cli + ["libraries", "--url", f"{base}/v1", "--key", key], env=_env(tiny_model),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and f"the address of the API's root, without /v1 ({base}/v1 now;" in out.stderr, \
        (out.returncode, out.stderr)
    # the same folder again with one file more: only the new one is sent
    write(folder / "rain" / "light.ogg", 1.0, 44_100, 2, freq=1500, seed=9)
    out = subprocess.run(cli + ["upload", str(folder), "--library", "folder lib", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["files"] == 4 and summary["skipped"] == 3 and summary["duplicates"] == 1, out.stdout
    assert out.stderr.splitlines()[4].startswith("uploading 1 file ("), out.stderr
    assert "3 of 4 files are in the library already: not sent again" in out.stderr, out.stderr
    # the copy, not sent this time, is named as on the first run
    assert "1 file had the same bytes as another and is stored once: rain/drone copy.wav (= drone.wav)" in \
        out.stderr.splitlines(), out.stderr
    assert summary["renamed"] == 0, summary
    # a file moved and renamed in the folder: its item takes the new path (search showed the old one), its
    # other metadata kept; the copy of another file, whose path is still there, moves nothing (helper-36)
    moved = next(r for r in requests.get(f"{base}/v1/search", params={"library_id": summary["library_id"],
                                                                        "q": "heavy", "k": 10}, headers=h,
                                         timeout=60).json()["results"] if r["metadata"]["path"] == "rain/heavy.flac")
    from clapq.client import folder_id

    assert moved["metadata"] == {"path": "rain/heavy.flac", "folder": folder_id(folder)}
    # as an earlier version sent it (no folder), with metadata of the user's: a run with the file where it
    # was records this folder with it, once, and its metadata stays
    assert requests.patch(f"{base}/v1/items/{moved['item_id']}", json={"metadata": {"path": "rain/heavy.flac",
                                                                                     "mic": "zoom"}},
                          headers=h, timeout=30).status_code == 200
    out = subprocess.run(cli + ["upload", str(folder), "--library", "folder lib", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["renamed"] == 0, out.stdout + out.stderr
    assert ("1 file sent by an earlier version: recorded this folder with it (once), so that later renames are "
            "told") in out.stderr.splitlines(), out.stderr
    assert requests.get(f"{base}/v1/items/{moved['item_id']}", headers=h, timeout=30).json()["metadata"] == {
        "path": "rain/heavy.flac", "mic": "zoom", "folder": folder_id(folder)}
    (folder / "storm").mkdir()
    (folder / "rain" / "heavy.flac").rename(folder / "storm" / "heavy rain.flac")
    out = subprocess.run(cli + ["upload", str(folder), "--library", "folder lib", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["renamed"] == 1, out.stdout + out.stderr
    assert ("1 file renamed or moved since it was sent: its path in the library updated: rain/heavy.flac -> "
            "storm/heavy rain.flac") in out.stderr.splitlines(), out.stderr
    item = requests.get(f"{base}/v1/items/{moved['item_id']}", headers=h, timeout=30).json()
    assert item["metadata"] == {"path": "storm/heavy rain.flac", "folder": folder_id(folder), "mic": "zoom"}, item
    # the same bytes in another folder, under another name, uploaded into the library: that folder has
    # nothing renamed (it flipped the path at each upload of either folder, helper-37)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(folder / "storm" / "heavy rain.flac", other / "take 2.flac")
    out = subprocess.run(cli + ["upload", str(other), "--library", "folder lib", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["renamed"] == 0, out.stdout + out.stderr
    assert requests.get(f"{base}/v1/items/{moved['item_id']}", headers=h, timeout=30).json()["metadata"] == \
        item["metadata"]
    # the file sent on its own, from its folder: not that folder's layout, so its path stays
    out = subprocess.run(cli + ["upload", str(folder / "storm" / "heavy rain.flac"), "--library", "folder lib",
                                "--url", base, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["renamed"] == 0, out.stdout + out.stderr
    assert requests.get(f"{base}/v1/items/{moved['item_id']}", headers=h, timeout=30).json()["metadata"]["path"] == \
        "storm/heavy rain.flac"
    # a folder without audio files is an error that creates no library
    (tmp_path / "no audio").mkdir()
    (tmp_path / "no audio" / "notes.txt").write_text("text")
    out = subprocess.run(cli + ["upload", str(tmp_path / "no audio"), "--library", "never", "--url", base,
                                "--key", key], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no audio files under" in out.stderr and ".flac" in out.stderr, out.stderr
    # a misspelt library is named back with the ones there are, and is not created
    out = subprocess.run(cli + ["search", "heavy rain", "--library", "folder lob", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stdout == "", out.stdout
    assert "no library named 'folder lob' (libraries: 'field recordings', 'folder lib')" in out.stderr, out.stderr
    requests.post(f"{base}/v1/libraries", json={"name": "empty"}, headers=h, timeout=30).raise_for_status()
    out = subprocess.run(cli + ["search", "rain", "--library", "empty", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == ""
    assert "no results: library 'empty' has no files" in out.stderr, out.stderr
    # a library whose only file failed is not one still being filled: said so
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + b"\0" * 60)
    out = subprocess.run(cli + ["upload", str(tmp_path / "broken.wav"), "--library", "broken", "--url", base,
                                "--key", key], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "failed: broken.wav (item " in out.stderr, out.stderr
    out = subprocess.run(cli + ["search", "rain", "--library", "broken", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == ""
    assert "no results: none of the files of library 'broken' could be embedded: 1 file failed (broken.wav: " \
        in out.stderr, out.stderr
    (tmp_path / "broken too.wav").write_bytes(b"RIFF" + b"\1" * 60)
    out = subprocess.run(cli + ["upload", str(tmp_path / "broken too.wav"), "--library", "broken", "--url", base,
                                "--key", key], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    job = json.loads(out.stdout)["jobs"][0]
    out = subprocess.run(cli + ["search", "rain", "--library", "broken", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert "could be embedded: 2 files failed, such as broken.wav: " in out.stderr, out.stderr
    assert "`clapq jobs show " in out.stderr and " --all` lists its job's; `clapq jobs` the others)" in out.stderr
    assert job not in out.stderr  # the first file's job, not the second's
    broken = [x for x in requests.get(f"{base}/v1/libraries", headers=h, timeout=10).json()["libraries"]
              if x["name"] == "broken"][0]
    got = requests.get(f"{base}/v1/libraries/{broken['id']}", headers=h, timeout=10).json()
    assert got["item_count"] == 2 and got["counts"] == {"queued": 0, "running": 0, "done": 0, "failed": 2,
                                                        "cancelled": 0}, got
    assert requests.delete(f"{base}/v1/libraries/{broken['id']}", headers=h, timeout=30).ok

    # a file over what the API takes (CLAPQ_MAX_REQUEST_BYTES, read from /v1/limits) is named and left
    # out before anything is sent, instead of the API refusing its request on every run; the rest go in
    # (128 copies of one clip, as one item), and the command fails
    partial = tmp_path / "partial"
    partial.mkdir()
    clip = write(partial / "c000.wav", 0.2, 8_000, 1, freq=300, seed=7).read_bytes()
    for i in range(1, 128):
        (partial / f"c{i:03d}.wav").write_bytes(clip)
    with open(partial / "zz_long.wav", "wb") as f:
        f.truncate(20 << 20)  # over the 16 MiB limit
    out = subprocess.run(cli + ["upload", str(partial), "--library", "partial", "--url", base, "--key", key,
                                "--no-wait"], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "not sent: zz_long.wav: 21.0 MB, larger than this server takes (16.8 MB;" in out.stderr, out.stderr
    summary = json.loads(out.stdout)
    assert summary["files"] == 129 and summary["not_sent"] == 1 and len(summary["jobs"]) == 1, summary
    assert summary["duplicates"] == 127 and "127 files had the same bytes as another and are stored once: " \
        "c001.wav (= c000.wav), " in out.stderr and " and 117 more\n" in out.stderr, out.stderr
    libs = requests.get(f"{base}/v1/libraries", headers=h, timeout=10).json()["libraries"]
    assert [x["item_count"] for x in libs if x["name"] == "partial"] == [1]
    # run again without the file the API refused: the 128 copies it holds are not sent again
    (partial / "zz_long.wav").unlink()
    out = subprocess.run(cli + ["upload", str(partial), "--library", "partial", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "uploading" not in out.stderr, out.stderr
    summary = json.loads(out.stdout)
    assert summary["jobs"] == [] and summary["skipped"] == 128 and summary["duplicates"] == 127, out.stdout
    assert "127 files had the same bytes as another and are stored once: c001.wav (= c000.wav), " in out.stderr

    # `clapq delete`: files by the ids `clapq search` prints, or a whole library (with --yes only, when
    # stdin is not a terminal); an id of another library's file is named and deleted nowhere
    heavy = best[2]
    out = subprocess.run(cli + ["delete", heavy, lib["id"], "--library", "folder lib", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stdout == f"deleted storm/heavy rain.flac ({heavy})\n", out.stdout + out.stderr
    assert f"no item '{lib['id']}' in library 'folder lib'" in out.stderr, out.stderr
    assert requests.get(f"{base}/v1/items/{heavy}", headers=h, timeout=10).status_code == 404
    out = subprocess.run(cli + ["delete", "--library", "partial", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode != 0 and "needs --yes" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = subprocess.run(cli + ["delete", "--library", "partial", "--yes", "--url", base, "--key", key],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "deleted library 'partial': 1 file\n", out.stdout + out.stderr

    # `keys create` works while `up` runs on the same data directory
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "keys", "create", "--tenant", "second",
                          "--data-dir", str(data_dir)], env=_env(tiny_model), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr
    key2 = out.stdout.strip()
    assert key2.startswith("cq_") and "\n" not in key2
    h2 = {"Authorization": f"Bearer {key2}"}
    assert requests.get(f"{base}/v1/libraries/{lib['id']}", headers=h2, timeout=10).status_code == 404
    # a leaked key is revoked by the first characters `keys list` shows, at once
    keys = [sys.executable, "-m", "clapq.cli", "keys"]
    out = subprocess.run(keys + ["list", "--data-dir", str(data_dir)], env=_env(tiny_model), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and f"{key2[:10]}…  second " in out.stdout and out.stdout.count("active") == 2, out
    out = subprocess.run(keys + ["revoke", key2[:10] + "…", "--data-dir", str(data_dir)], env=_env(tiny_model),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"revoked {key2[:10]}… of tenant 'second'" in out.stdout, out
    assert requests.get(f"{base}/v1/libraries", headers=h2, timeout=10).status_code == 401
    assert requests.get(f"{base}/v1/libraries", headers=h, timeout=10).status_code == 200
    out = subprocess.run(keys + ["revoke", key2[:10], "--data-dir", str(data_dir)], env=_env(tiny_model),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"{key2[:10]}… of tenant 'second' was revoked already, at " in out.stdout, out
    # fewer characters than `keys list` shows name no key: "cq_" and 3 more revoked whichever key began so
    # (helper-39)
    for given in ("cq_", key[:6], key[:9] + "…"):
        out = subprocess.run(keys + ["revoke", given, "--data-dir", str(data_dir)], env=_env(tiny_model),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and f"{given.rstrip('…')!r} is not a key, nor the start of one" in out.stderr, out
    # a key cut one character past what `keys list` shows is said to be neither (helper-51)
    out = subprocess.run(keys + ["revoke", key[:11], "--data-dir", str(data_dir)], env=_env(tiny_model),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and f"no key is {key[:11]!r} (11 characters; a whole key has {len(key)}): give " \
        "the whole key, or its first 10 characters" in out.stderr, out
    assert requests.get(f"{base}/v1/libraries", headers=h, timeout=10).status_code == 200

    assert up.stop() == 0
    assert _leftovers(data_dir) == []

    # `keys create` without `up` starts and stops the embedded Postgres itself
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "keys", "create", "--tenant", "third",
                          "--data-dir", str(data_dir)], env=_env(tiny_model), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().startswith("cq_"), out.stderr
    assert _leftovers(data_dir) == []

    # data persists across restarts, and the same owner key is shown again
    up2 = up_runner(data_dir)
    assert up2.wait_ready() == key
    base2 = f"http://127.0.0.1:{up2.port}"
    libs = requests.get(f"{base2}/v1/libraries", headers=h, timeout=10).json()["libraries"]
    assert [(x["name"], x["item_count"]) for x in libs] == [("field recordings", 4), ("folder lib", 2),
                                                            ("empty", 0)]
    res2 = requests.get(f"{base2}/v1/search", params={"library_id": lib["id"], "q": "birdsong", "k": 2},
                        headers=h, timeout=60).json()
    assert res2["results"] == res["results"]
    assert up2.stop(signal.SIGHUP) == 0  # the terminal closed: everything stops, the embedded Postgres too
    assert _leftovers(data_dir) == []


def test_up_run_in_a_folder_of_other_clapq_packages_starts_its_own(tmp_path, tiny_model, up_runner):
    """`clapq up` started its roles (API, worker, beat) as `python -m clapq.cli ROLE`, and checked CLAPQ_DEVICE with
    `python -c`, in the user's working directory, which Python puts first on sys.path: run in a folder that holds a
    `clapq`, `api` or `worker` package (a checkout of another version), each child imported that one instead (here
    each stopped on its ImportError, and `up` with them). Now each starts in the folder of `up`'s own packages, and
    a role goes back to the user's directory: a relative CLAPQ_MODEL is still the model in it, for the worker that
    embeds and the API that searches."""
    here = tmp_path / "here"
    for name in ("clapq", "api", "worker"):
        (here / name).mkdir(parents=True)
        (here / name / "__init__.py").write_text(f"raise ImportError('the decoy {name} of the working directory')\n")
    shutil.copytree(tiny_model, here / "model")
    up = up_runner(tmp_path / "data", cwd=here, CLAPQ_MODEL="model", CLAPQ_DEVICE="cpu", CLAPQ_PRECISION="fp32")
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 120
    while (checks := requests.get(f"{base}/readyz", timeout=30).json()["checks"]) and not all(
            v == "ok" for v in checks.values()):  # the worker has loaded the model, the beat made a pass
        assert time.monotonic() < deadline and up.proc.poll() is None, (checks, up.log.read_text()[-3000:])
        time.sleep(0.5)
    lib = requests.post(f"{base}/v1/libraries", json={"name": "here"}, headers=h, timeout=30).json()
    f = write(tmp_path / "a.wav", 1.0)
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (f.name, f.read_bytes(), "audio/wav"))])
    assert _wait_job(base, h, r.json()["job_id"], timeout=180)["status"] == "done"
    r = requests.get(f"{base}/v1/search", params={"library_id": lib["id"], "q": "birdsong"}, headers=h, timeout=60)
    assert r.status_code == 200 and len(r.json()["results"]) == 1, r.text
    assert "decoy" not in up.log.read_text(), up.log.read_text()[-3000:]


def test_up_run_in_a_directory_since_removed_starts(tmp_path, tiny_model, up_runner):
    """`clapq up` run in a directory removed meanwhile (a temporary one, a checkout deleted in another terminal), with
    absolute paths: its API's gunicorn could not tell its working directory, a FileNotFoundError traceback, and `up`
    stopped. Its roles now start in the folder of its own packages, and stay there where the user's is gone."""
    here = tmp_path / "here"
    here.mkdir()
    up = up_runner(tmp_path / "data", cwd=here, cwd_removed=True)
    key = up.wait_ready()
    assert not here.exists()
    r = requests.get(f"http://127.0.0.1:{up.port}/v1/libraries", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200 and "Traceback" not in up.log.read_text(), up.log.read_text()[-3000:]


def test_a_role_started_again_after_its_directory_was_removed_stays_where_it_started(tmp_path, tiny_model, up_runner):
    """README: where the directory `clapq up` was run in is removed meanwhile, its roles stay where they started. One
    removed after `up` started (a temporary folder, a checkout deleted in another terminal) made every role `up` started
    again (an API killed by the OOM killer, one stopped by an upgrade in place) fail at once on going back to it
    (FileNotFoundError), and after three tries `up` stopped everything."""
    here = tmp_path / "here"
    here.mkdir()
    up = up_runner(tmp_path / "data", cwd=here)
    key = up.wait_ready()
    here.rmdir()
    (api,) = [c for c in psutil.Process(up.proc.pid).children() if c.cmdline()[-1:] == ["api"]]
    api.kill()
    base, deadline = f"http://127.0.0.1:{up.port}", time.monotonic() + 120
    while "clapq: `clapq api` was killed by signal 9; starting it again" not in up.log.read_text():
        assert time.monotonic() < deadline and up.proc.poll() is None, up.log.read_text()[-3000:]
        time.sleep(0.3)
    while True:
        assert time.monotonic() < deadline and up.proc.poll() is None, up.log.read_text()[-3000:]
        with contextlib.suppress(requests.ConnectionError, requests.Timeout):
            r = requests.get(f"{base}/v1/libraries", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            if r.status_code == 200 and "Listening at" in up.log.read_text().rsplit("starting it again", 1)[1]:
                break
        time.sleep(0.3)
    assert "Traceback" not in up.log.read_text(), up.log.read_text()[-3000:]


def test_a_killed_up_takes_its_processes_with_it(tmp_path, tiny_model, up_runner):
    """`kill -9` of `clapq up`: its worker, beat, API and Redis stop too (before, they ran on as orphans,
    a second `clapq up` started beside them, and a dead embedded Redis went unnoticed). Then it starts
    again on the same data. The embedded Postgres is a daemon shared by every process on the directory
    (pgserver): the next `clapq up` takes it over. Its embedded Redis killed is started again; its
    Postgres killed stops everything, without a traceback."""
    data_dir = tmp_path / "data"
    up = up_runner(data_dir)
    up.wait_ready()
    up.proc.kill()
    up.proc.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [p for p in _leftovers(data_dir) if "postgres" not in p]
        if not left:
            break
        time.sleep(0.5)
    assert left == [], left
    again = up_runner(data_dir)
    key = again.wait_ready()
    base = f"http://127.0.0.1:{again.port}"
    assert requests.get(f"{base}/v1/libraries", headers={"Authorization": f"Bearer {key}"}, timeout=10).ok
    # the embedded Redis dies: `clapq up` says so and starts it again on its port, and the service works on
    # (before: it served on without one); the Postgres server dies: it says so and stops everything
    def children(name: str) -> list[psutil.Process]:
        return [p for p in psutil.process_iter(attrs=("cmdline",)) if name in " ".join(p.info["cmdline"] or [])
                and p.parent() is not None and p.parent().pid == again.proc.pid
                and p.status() != psutil.STATUS_ZOMBIE]

    redis = children("redis-server")
    assert len(redis) == 1
    redis[0].kill()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [p for p in children("redis-server") if p.pid != redis[0].pid]:
        time.sleep(0.3)
    assert "clapq: the embedded Redis has stopped (the embedded Redis exited (-9)" in again.log.read_text(), \
        again.log.read_text()[-2000:]
    h = {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "after redis"}, headers=h, timeout=30).json()
    f = write(tmp_path / "r.wav", 1.0)
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (f.name, f.read_bytes(), "audio/wav"))])
    assert r.status_code == 202, r.text
    assert _wait_job(base, h, r.json()["job_id"], timeout=180)["status"] == "done"
    postmaster = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    assert again.proc.wait(90) == 1
    assert "the embedded Postgres" in again.log.read_text() and "is not running any more; stopping everything" \
        in again.log.read_text(), again.log.read_text()[-2000:]
    assert "Traceback" not in again.log.read_text()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _leftovers(data_dir):
        time.sleep(0.5)
    assert _leftovers(data_dir) == []


def _copy_of_the_code(tmp_path: Path) -> Path:
    """A copy of clapq's `clapq`, `worker` and `api` packages, which a test changes as an upgrade in place would; a
    `clapq up` started in `tmp_path` with PYTHONPATH the copy runs it (its roles start in the copy's folder)."""
    import api
    import clapq
    import worker

    code = tmp_path / "code"
    for pkg in (clapq, worker, api):
        shutil.copytree(Path(pkg.__file__).parent, code / pkg.__name__, ignore=shutil.ignore_patterns("__pycache__"))
    return code


def _wait_log(up: Up, since: int, *wanted: str, timeout: float = 120.0) -> str:
    """up's log from character `since` on, once it holds one of `wanted`."""
    deadline = time.monotonic() + timeout
    while not any(w in (text := up.log.read_text(errors="replace")[since:]) for w in wanted):
        assert time.monotonic() < deadline and up.proc.poll() is None, text[-3000:]
        time.sleep(0.2)
    return text


def _roles(up: Up, role: str) -> list[psutil.Process]:
    """The processes of `role` (api, worker, beat) `up` runs now: not one that has ended and waits to be reaped."""
    found = []
    for c in psutil.Process(up.proc.pid).children():
        with contextlib.suppress(psutil.Error):  # a zombie's cmdline, or one gone meanwhile
            if c.status() != psutil.STATUS_ZOMBIE and c.cmdline()[-1:] == [role]:
                found.append(c)
    return found


def _api_again(up: Up, since: int, key: str, timeout: float = 120.0) -> str:
    """up's log from `since`, once an API started after that answers."""
    deadline = time.monotonic() + timeout
    while True:
        text = _wait_log(up, since, "Listening at", timeout=max(1.0, deadline - time.monotonic()))
        with contextlib.suppress(requests.ConnectionError, requests.Timeout):
            if requests.get(f"http://127.0.0.1:{up.port}/v1/libraries", headers={"Authorization": f"Bearer {key}"},
                            timeout=5).status_code == 200:
                return up.log.read_text(errors="replace")[since:]
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.3)


def test_a_hup_to_the_api_after_an_upgrade_in_place_stops_it_in_a_line_and_up_starts_it_on_the_new_code(
        tmp_path, tiny_model, up_runner):
    """`kill -HUP` of the API's gunicorn master after clapq was upgraded in place under it: gunicorn forked all its
    processes again, each refused the new code and said so, and the master, halting on the first, met the second as
    it stopped the rest, a traceback of gunicorn's (exit 1). Now the master stops first, in one line, forks nothing
    on the new code, and `clapq up` starts the API again on it. A HUP to `clapq up` then stops everything, with
    nothing left running (ps)."""
    code = _copy_of_the_code(tmp_path)
    data_dir = tmp_path / "data"
    up = up_runner(data_dir, cwd=tmp_path, PYTHONPATH=str(code), CLAPQ_API_WORKERS="3")
    key = up.wait_ready()
    (api,) = [c for c in psutil.Process(up.proc.pid).children() if c.cmdline()[-1:] == ["api"]]
    with open(code / "api" / "search.py", "a") as f:
        f.write("\n# a newer version\n")
    since = len(up.log.read_text(errors="replace"))
    api.send_signal(signal.SIGHUP)
    log = _api_again(up, since, key)
    stopped, again = log.split("clapq: `clapq api` exited with 4 after clapq's code changed on disk (not counted as "
                               "a crash)", 1)
    assert stopped.count("clapq: the code on disk changed since this API started (clapq upgraded in place?)") == 1, \
        log[-3000:]
    assert "Booting worker" not in stopped and "Traceback" not in up.log.read_text(), log[-3000:]
    assert requests.get(f"http://127.0.0.1:{up.port}/readyz", timeout=30).json()["checks"]["code"] == "ok"
    assert up.stop(signal.SIGHUP) == 0  # the terminal closed
    assert _leftovers(data_dir) == []
    assert "Traceback" not in up.log.read_text()


def test_an_api_started_again_in_the_middle_of_an_upgrade_in_place_waits_for_the_code_to_settle(
        tmp_path, tiny_model, up_runner):
    """An API `clapq up` started again (here it was killed) while clapq was upgraded in place (`git pull` changing
    one file, then another) took the half-changed tree for its code, and answered 503 code_changed to what loaded
    code, until started again by hand. `up` now starts it once the code on disk has stayed the same for a while."""
    code = _copy_of_the_code(tmp_path)
    up = up_runner(tmp_path / "data", cwd=tmp_path, PYTHONPATH=str(code), CLAPQ_PRELOAD_TEXT="0")
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "upgraded"}, headers=h, timeout=30).json()
    (api,) = [c for c in psutil.Process(up.proc.pid).children() if c.cmdline()[-1:] == ["api"]]
    with open(code / "api" / "search.py", "a") as f:  # the first file of the upgrade
        f.write("\n# a newer version\n")
    since = len(up.log.read_text(errors="replace"))
    api.kill()
    # `up` waits for the code to settle (before: it started the API at once, and it listened on the half-changed code)
    _wait_log(up, since, "once that has stayed the same for 2 s", "Listening at")
    with open(code / "clapq" / "clap.py", "a") as f:  # and the next
        f.write("\n# a newer version\n")
    _api_again(up, since, key)
    assert requests.get(f"{base}/readyz", timeout=30).json()["checks"]["code"] == "ok"
    r = requests.post(f"{base}/v1/search", json={"library_id": lib["id"], "text": "a dog barking"}, headers=h,
                      timeout=120)
    assert r.status_code == 200, r.text
    # an upgrade done in steps (edits, pulls): each role that ends on new code is no crash. Before, the 4th end in
    # 5 minutes stopped everything (helper-104)
    for step in range(3):
        (api,) = _roles(up, "api")
        with open(code / "api" / "search.py", "a") as f:
            f.write(f"\n# step {step}\n")
        since = len(up.log.read_text(errors="replace"))
        api.kill()
        text = _api_again(up, since, key)
        assert "not counted as a crash" in text, text[-3000:]
    # a worker still on the code before ends once the API was started again on the new (as it stops on its next
    # task): no crash either (before: counted, the code on disk being what the API was last started on). Killed
    # while `up` waits for the code to settle before starting the API: `up` sees it end after that
    for step in range(5):
        with open(code / "api" / "search.py", "a") as f:
            f.write(f"\n# and step {step}\n")
        changed = time.time()
        apis, workers = _roles(up, "api"), _roles(up, "worker")
        if len(apis) == 1 and len(workers) == 1 and workers[0].create_time() < changed:
            break
        time.sleep(3)  # one of them starting again: the next step
    else:
        pytest.fail("no API and worker both running on the code before, 5 times")
    since = len(up.log.read_text(errors="replace"))
    apis[0].kill()
    _wait_log(up, since, "once that has stayed the same for 2 s")
    with contextlib.suppress(psutil.NoSuchProcess):  # it stopped itself meanwhile: the same for `up`
        workers[0].kill()
    text = _wait_log(up, since, "`clapq worker` was killed", "`clapq worker` exited")
    (ended,) = [line for line in text.splitlines() if "`clapq worker`" in line]
    assert "after clapq's code changed on disk (not counted as a crash)" in ended, text[-3000:]
    assert up.proc.poll() is None and "stopping everything" not in up.log.read_text(errors="replace")


def test_a_closed_terminal_stops_up_cleanly_and_nohup_keeps_it(tmp_path, tiny_model, up_runner):
    """The terminal `clapq up` runs in closes (SIGHUP): everything stopped, but `up` could not say "clapq stopped" on
    it (EIO), a traceback and exit 1. Now exit 0, nothing left running. `nohup clapq up` (SIGHUP ignored) stopped all
    the same, its handler put in place of the ignore: it now runs on, and still starts again what ends."""
    import pty

    data_dir = tmp_path / "data"
    pid, fd = pty.fork()
    if pid == 0:  # a terminal's session: `up` its controlling process, as a shell's foreground job is
        try:
            os.execve(sys.executable, [sys.executable, "-m", "clapq.cli", "up", "--data-dir", str(data_dir), "--port",
                                       str(free_port())], _env(tiny_model))
        finally:
            os._exit(127)
    out, deadline = b"", time.monotonic() + 120
    while b"Ctrl-C stops" not in out:  # closed mid-line too: the print cut off by it met EIO (a traceback, exit 1)
        assert time.monotonic() < deadline, out.decode(errors="replace")[-3000:]
        if select.select([fd], [], [], 1)[0]:
            try:
                out += os.read(fd, 65536)
            except OSError:  # it ended
                break
    os.close(fd)  # the terminal closes: its controlling process gets SIGHUP, and writes to it fail
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code == 0, (code, out.decode(errors="replace")[-3000:])
    assert _leftovers(data_dir) == []

    up = up_runner(data_dir, nohup=True)
    up.wait_ready()
    up.proc.send_signal(signal.SIGHUP)
    (api,) = [c for c in psutil.Process(up.proc.pid).children() if c.cmdline()[-1:] == ["api"]]
    api.kill()  # `up` still minds its roles: it did not stop on the HUP
    _wait_log(up, 0, "clapq: `clapq api` was killed by signal 9; starting it again")
    assert up.proc.poll() is None and "clapq stopped" not in up.log.read_text()
    assert up.stop() == 0
    assert _leftovers(data_dir) == []


def test_up_output_on_a_disk_full_for_a_while_is_written_there_once_it_has_room(small_disk):
    """`clapq up > up.log` on a disk full for a while: its first write that failed (ENOSPC) pointed its stdout (and
    so that of every role it started again, which takes it) at /dev/null for good, and its lines and the roles' logs
    went nowhere once the disk had room again. Only a terminal closed (EIO) or a pipe's reader gone (EPIPE) does so
    now; a line that cannot be written is still dropped, no traceback."""
    from clapq.cli import _Unfailing

    log, filler = small_disk / "up.log", small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):  # the disk full
        while os.write(fd, b"\0" * 65536):
            pass
    os.close(fd)
    with open(log, "w", buffering=1) as stream:  # line-buffered: each line written as it comes, as to a terminal
        out = _Unfailing(stream)
        assert out.write("clapq is up: http://127.0.0.1:8000\n") == 35  # dropped, said written
        filler.unlink()
        out.write("clapq: `clapq api` exited with 1; starting it again\n")
        out.flush()
        assert os.readlink(f"/proc/self/fd/{stream.fileno()}") == str(log)  # before: /dev/null
    assert "clapq: `clapq api` exited with 1; starting it again\n" in log.read_text()


def test_an_api_killed_mid_request_is_started_again(tmp_path, tiny_model, up_runner):
    """`clapq api` (gunicorn's master) killed while one of its workers serves a slow upload: the orphaned worker
    held the port, every new API failed to bind, and after four tries in seconds `up` stopped everything. What
    the dead API left behind goes with it now, and the API answers again."""
    import glob
    import socket

    tmp = tmp_path / "tmp"  # up's own temporary directory: another suite on the machine makes folders in /tmp
    tmp.mkdir()
    data_dir = tmp_path / "data"
    up = up_runner(data_dir, TMPDIR=str(tmp))
    key = up.wait_ready()
    base = f"http://127.0.0.1:{up.port}"
    lib = requests.post(f"{base}/v1/libraries", json={"name": "slow"}, headers={"Authorization": f"Bearer {key}"},
                        timeout=30).json()
    def apis() -> list[psutil.Process]:
        found = []
        for c in psutil.Process(up.proc.pid).children():
            with contextlib.suppress(psutil.Error):  # one that has just ended (a zombie until `up` reaps it)
                if c.cmdline()[-1:] == ["api"]:
                    found.append(c)
        return found

    (api,) = apis()
    with socket.create_connection(("127.0.0.1", up.port), timeout=30) as slow:  # an upload that is still arriving
        slow.sendall(f"POST /v1/libraries/{lib['id']}/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
                     '--b\r\nContent-Disposition: form-data; name="files"; filename="a.wav"\r\n\r\nRIFF'.encode())
        time.sleep(1.0)  # a worker has taken it, and waits for the rest of the body
        api.kill()
        deadline = time.monotonic() + 90
        while "clapq: `clapq api` was killed by signal 9; starting it again" not in up.log.read_text():
            assert time.monotonic() < deadline and up.proc.poll() is None, up.log.read_text()[-3000:]
            time.sleep(0.3)
        while True:  # the new API answers (the old one's idle worker may answer once more before it goes)
            assert time.monotonic() < deadline and up.proc.poll() is None, up.log.read_text()[-3000:]
            new = [c for c in apis() if c.pid != api.pid]
            try:
                if new and requests.get(f"{base}/healthz", timeout=2).status_code == 200 and \
                        "Listening at" in up.log.read_text().rsplit("starting it again", 1)[1]:
                    break
            except (requests.ConnectionError, requests.Timeout):  # refused; or taken by the orphan, unanswered
                pass
            time.sleep(0.3)
        time.sleep(3)  # where the port was held, each new API failed at once and `up` gave up within seconds
        assert up.proc.poll() is None and "Connection in use" not in up.log.read_text(), up.log.read_text()[-3000:]
    # the API's request counts live in the data directory, fresh for each start: the killed one left no
    # folder in the temporary directory, as it did at every restart
    assert (data_dir / "api-metrics").is_dir() and glob.glob(str(tmp / "clapq-api-metrics-*")) == []


def _a_long_file_running(up: Up, tmp_path: Path) -> tuple:
    """A quarter of an hour uploaded to `up` and being embedded: its URL, auth header, the batch's answer and
    the `clapq worker` process embedding it."""
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "long"}, headers=h, timeout=30).json()
    f = write(tmp_path / "long.flac", 900.0, 8_000, 1, freq=300)  # running for a while
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=120,
                      files=[("files", (f.name, f.read_bytes(), "audio/flac"))]).json()
    deadline = time.monotonic() + 120
    while requests.get(f"{base}/v1/items/{r['items'][0]['id']}", headers=h, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline, up.log.read_text()[-3000:]
        time.sleep(0.1)
    return base, h, r, next(c for c in psutil.Process(up.proc.pid).children() if c.cmdline()[-1:] == ["worker"])


def test_files_left_running_by_the_last_up_are_queued_again_at_start(tmp_path, tiny_model, up_runner):
    """A worker killed while it embeds a file, then `clapq up` stopped and started again: the file stayed
    `running` until CLAPQ_STALE_AFTER_S passed (1.5-2.5 minutes with the new worker idle; an hour here, so the
    test does not wait for it). The new `up` owns the embedded database, where no worker of it runs yet, and
    hands such files back to the queue at once."""
    data_dir = tmp_path / "data"
    up = up_runner(data_dir, CLAPQ_STALE_AFTER_S="3600")
    base, h, r, worker = _a_long_file_running(up, tmp_path)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool child, mid-file
    assert up.stop() == 0
    up2 = up_runner(data_dir, CLAPQ_STALE_AFTER_S="3600")
    up2.wait_ready()  # the same key: it is kept in the data directory
    assert "clapq: 1 file left running when clapq last stopped goes back to the queue" in up2.log.read_text()
    base2 = f"http://127.0.0.1:{up2.port}"
    assert _wait_job(base2, h, r["job_id"], timeout=300)["status"] == "done"


def test_a_long_file_up_is_stopped_on_keeps_its_tries(tmp_path, tiny_model, up_runner):
    """`clapq up` stopped (Ctrl-C) while its worker embeds a long recording, past the stop's grace: the file is
    embedded again from its start at the next start, and that try was counted, so a 3-hour FLAC being embedded
    across three restarts failed for good, "gave up after 3 attempts; last error: worker lost" (found by hand:
    CLAPQ_BATCH_SIZE=1, stopped at 5-8% each time). `up` then gave that try back after it killed the worker; now
    the worker's task hands the file back itself within seconds (worker.stopping), that try not counted, and `up`
    says what it waits for and what becomes of the file. (Four hours, the longest a file may be, at a batch of
    one: 35 to 90 s of the tiny model on 2 cores, past the 20 s grace.)"""
    from tests.audio import long_silence

    data_dir = tmp_path / "data"
    env = dict(CLAPQ_STALE_AFTER_S="3600", CLAPQ_BATCH_SIZE="1", CLAPQ_LANES="1", CLAPQ_CLAIM_FOR_S="0")
    up = up_runner(data_dir, **env)
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "sets"}, headers=h, timeout=30).json()
    f = long_silence(tmp_path / "set.flac", 240, rate=8_000)
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=120,
                      files=[("files", (f.name, f.read_bytes(), "audio/flac"))]).json()
    item, deadline = r["items"][0]["id"], time.monotonic() + 120
    while not (got := requests.get(f"{base}/v1/items/{item}", headers=h, timeout=10).json())["progress"]:
        assert time.monotonic() < deadline and got["status"] in ("queued", "running"), got
        time.sleep(0.2)
    assert got["attempts"] == 1, got
    assert up.stop() == 0
    log = up.log.read_text()
    assert "clapq: stopping: the worker stops within seconds (up to 20 s), keeping the files it finished; one it " \
           "has not (a long recording) is embedded again from its start when clapq next starts" in log, log[-3000:]
    # the worker's task handed it back (before: it ran on, was killed past the grace, and `up` gave the try back)
    handed = [json.loads(line) for line in log.splitlines() if '"the worker is stopping: files not' in line]
    assert [r["count"] for r in handed] == [1], log[-3000:]
    assert "goes back to the queue" not in log.split("clapq: stopping:", 1)[1], log[-3000:]
    up2 = up_runner(data_dir, **env)
    up2.wait_ready()
    base2, deadline = f"http://127.0.0.1:{up2.port}", time.monotonic() + 120
    assert "left running when clapq last stopped" not in up2.log.read_text()  # it was queued, not left running
    while not (got := requests.get(f"{base2}/v1/items/{item}", headers=h, timeout=10).json())["progress"]:
        assert time.monotonic() < deadline and got["status"] in ("queued", "running"), got
        time.sleep(0.2)
    assert got["attempts"] == 1, got  # this try alone: the one the stop cut short was given back (it was 2)
    requests.post(f"{base2}/v1/jobs/{r['job_id']}/cancel", headers=h, timeout=30)  # so that up2 stops at once


def test_files_of_a_worker_that_ended_are_queued_again_at_once(tmp_path, tiny_model, up_runner):
    """The worker of a running `clapq up` killed while it embeds a file: `up` started another, and the file
    stayed `running` until CLAPQ_STALE_AFTER_S passed (2 minutes by default, the job's ETA growing meanwhile;
    an hour here, so the test does not wait for it: helper-88). No other worker runs on `up`'s embedded
    database, so `up` hands such files back to the queue as it starts the new worker."""
    data_dir = tmp_path / "data"
    up = up_runner(data_dir, CLAPQ_STALE_AFTER_S="3600")
    base, h, r, worker = _a_long_file_running(up, tmp_path)
    item = r["items"][0]["id"]
    worker.kill()  # the worker's main process, mid-file: `up` kills the rest of its group
    assert _wait_job(base, h, r["job_id"], timeout=300)["status"] == "done"
    log = up.log.read_text()
    assert "clapq: `clapq worker` was killed by signal 9; starting it again" in log, log[-3000:]
    assert "clapq: 1 file the worker that ended was embedding goes back to the queue" in log, log[-3000:]
    assert requests.get(f"{base}/v1/items/{item}", headers=h, timeout=10).json()["attempts"] == 2


def test_a_worker_that_dies_is_started_again(tmp_path, tiny_model, up_runner):
    """The worker of `clapq up` is killed (the OOM killer, say): `clapq up` says so and starts another,
    which embeds the next upload; none of the dead one's processes stay. One that keeps dying stops
    everything with a sentence instead of restarting forever."""
    data_dir = tmp_path / "data"
    up = up_runner(data_dir)
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}

    def worker(other_than: int | None = None, timeout: float = 60) -> psutil.Process:
        """The running `clapq worker` child of this `clapq up` (not `other_than`), waited for."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and up.proc.poll() is None:
            for c in psutil.Process(up.proc.pid).children():
                try:
                    if c.cmdline()[-1:] == ["worker"] and c.pid != other_than and c.status() != psutil.STATUS_ZOMBIE:
                        return c
                except psutil.Error:
                    pass
            time.sleep(0.3)
        raise AssertionError(up.log.read_text()[-2000:])

    first = worker()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not first.children():  # its pool child has started
        time.sleep(0.3)
    dead_family = [first, *first.children(recursive=True)]
    assert len(dead_family) >= 2
    first.kill()
    worker(other_than=first.pid)
    assert "clapq: `clapq worker` was killed by signal 9; starting it again" in up.log.read_text()
    lib = requests.post(f"{base}/v1/libraries", json={"name": "after"}, headers=h, timeout=30).json()
    f = write(tmp_path / "a.wav", 1.0)
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (f.name, f.read_bytes(), "audio/wav"))])
    assert _wait_job(base, h, r.json()["job_id"], timeout=180)["status"] == "done"

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(running, dead_family)):
        time.sleep(0.3)
    assert [p.pid for p in dead_family if running(p)] == []
    for _ in range(3):  # three more ends in five minutes: the fourth in the window stops everything
        try:
            w = worker()
        except AssertionError:
            break  # `clapq up` has stopped
        w.kill()
        with contextlib.suppress(psutil.Error):
            w.wait(30)
    assert up.proc.wait(120) == 1
    assert "`clapq worker` was killed by signal 9, its 4th end in 5 minutes; stopping everything" in \
        up.log.read_text(), up.log.read_text()[-2000:]
    assert _leftovers(data_dir) == [] or all("postgres" in p for p in _leftovers(data_dir))


def test_ctrl_c_during_start_up_stops_at_once(tmp_path, tiny_model, up_runner):
    """Ctrl-C while `clapq up` is still starting (its Postgres just up): it stops what it started without
    waiting for the API to answer, and never says it is up."""
    data_dir = tmp_path / "starting"
    up = up_runner(data_dir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (data_dir / "pg" / "postmaster.pid").is_file():
        time.sleep(0.05)
    t0 = time.monotonic()
    assert up.stop() == 0
    assert time.monotonic() - t0 < 60
    log = up.log.read_text(errors="replace")
    assert "clapq is up" not in log and "clapq stopped" in log and "Traceback" not in log, log[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _leftovers(data_dir):
        time.sleep(0.5)
    assert _leftovers(data_dir) == []


def test_an_embedded_postgres_without_room_is_said_so(tmp_path, tiny_model, small_disk):
    """`clapq up` on a data directory whose disk is full: initdb (a new one) or pg_ctl (one that has data)
    cannot write, and `up` ended in a Python traceback of pgserver's CalledProcessError (helper-88: a data
    directory filled by an upload, where Postgres had stopped). Now one sentence, exit 1, saying the disk has
    no room; and a Postgres that stops while `up` runs is said to lack room where its disk is full."""
    from clapq.embedded import EmbeddedPostgres

    out = subprocess.run([sys.executable, "-m", "clapq.cli", "up", "--data-dir", str(small_disk / "d"), "--port",
                          str(free_port())], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (f"clapq: the embedded Postgres ({small_disk / 'd' / 'pg'}) did not start (initdb exited with 1): its "
            "disk has only 1.0 MB free, too little for Postgres; make room there") in out.stderr, out.stderr[-3000:]
    assert _leftovers(small_disk / "d") == []
    assert EmbeddedPostgres(small_disk / "d" / "pg").gone() == (
        f"the embedded Postgres ({small_disk / 'd' / 'pg'}) is not running any more: its disk has only 1.0 MB free, "
        "too little for Postgres; make room there")
    assert EmbeddedPostgres(tmp_path / "pg").gone() == f"the embedded Postgres ({tmp_path / 'pg'}) is not running any more"


def test_keys_of_a_data_directory_no_up_has_used_are_refused(tmp_path, tiny_model):
    """Without --data-dir (or with a mistyped one) `keys create` made a new database in a directory no `clapq up`
    used and printed a key that the running service answered with 401 (helper-51)."""
    for cmd in (["create", "--tenant", "bob"], ["list"], ["revoke", "cq_abcdefg"]):
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "keys", *cmd, "--data-dir", str(tmp_path / "new")],
                             env=_env(tiny_model), capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and out.stdout == "", (cmd, out.stdout, out.stderr)
        assert f"clapq: no clapq data in {tmp_path / 'new'}: no `clapq up` has run with it" in out.stderr, out.stderr
    assert not (tmp_path / "new").exists()
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "l", "--data-dir",
                          str(tmp_path / "new")], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no API key: pass --key, set CLAPQ_API_KEY, or pass --data-dir" in out.stderr, out


def test_a_key_needs_a_tenant_name(tmp_path, tiny_model):
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "keys", "create", "--tenant", "  ", "--data-dir",
                          str(tmp_path)], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "clapq: --tenant needs a name" in out.stderr, out.stderr
    assert not (tmp_path / "pg").exists()  # refused before anything was started


def test_a_new_key_says_whether_its_tenant_is_new_and_how_keys_list_shows_it(settings, tiny_model):
    """Keys for a team (helper-127): `keys create --tenant` printed the key alone, whether the tenant was the team's
    or a new one. A misspelt or recapitalised name made a tenant of its own, unsaid, whose key saw none of the
    team's libraries and jobs (its upload made a second 'field' no one else saw), and the team's keys were told
    apart in `keys list` only by starts no command had shown. Now it says which, on stderr, the key alone on
    stdout as before."""
    from clapq.keys import revoke_key

    team = f"studio-{uuid.uuid4().hex[:8]}"

    def create(tenant: str) -> tuple[str, str]:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "keys", "create", "--tenant", tenant],
                             env=_env(tiny_model, DATABASE_URL=settings.database_url), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and re.fullmatch(r"cq_[\w-]{43}\n", out.stdout), (out.stdout, out.stderr)
        return out.stdout.strip(), out.stderr

    alice, said = create(team)
    assert said == (f"clapq: new tenant {team!r}: its keys reach its own libraries and jobs only, none of another "
                    f"tenant's; `clapq keys list` shows this key as {alice[:10]}…\n"), said
    bob, said = create(team)
    assert said == (f"clapq: a key of tenant {team!r}, which has 1 other active key: each of its keys reaches the same "
                    f"libraries and jobs; `clapq keys list` shows this key as {bob[:10]}…\n"), said
    with session_scope(settings.database_url) as s:
        revoke_key(s, alice)
        revoke_key(s, bob)
    carol, said = create(team)
    assert f"a key of tenant {team!r}, which has no other active key: " in said, said
    key, said = create(team.capitalize())
    assert said.startswith(
        f"clapq: new tenant {team.capitalize()!r} (beside {team!r}, a name close to it: if you meant that tenant, "
        f"revoke this key, `clapq keys revoke {key[:10]}`, and give its name): its keys reach its own libraries"), said
    typo = team.replace("studio", "studoi")  # close to both, which differ by case alone
    key, said = create(typo)
    assert said.startswith(
        f"clapq: new tenant {typo!r} (beside {team.capitalize()!r}, {team!r}, names close to it: if you meant one of "
        f"those, revoke this key, `clapq keys revoke {key[:10]}`, and give its name): its keys reach its own"), said


def test_spaces_around_a_tenant_name_are_dropped_and_said(settings, tiny_model):
    """`keys create --tenant " studio"` made a tenant " studio" beside "studio", whose keys reached none of the
    team's libraries, named only as a close name (helper-131). The spaces are dropped now, and said; a tenant whose
    name has them (made before) keeps its keys, and `--tenant` of that very name still makes keys for it."""
    from clapq.keys import create_key, tenant_for_key

    team, old = f"studio-{uuid.uuid4().hex[:8]}", f" old-{uuid.uuid4().hex[:8]} "
    with session_scope(settings.database_url) as s:
        old_key = create_key(s, old)

    def create(tenant: str) -> tuple[str, str]:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "keys", "create", "--tenant", tenant],
                             env=_env(tiny_model, DATABASE_URL=settings.database_url), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        with session_scope(settings.database_url) as s:
            return tenant_for_key(s, out.stdout.strip()).name, out.stderr

    assert create(team)[0] == team
    tenant, said = create(f" {team}\t")
    assert tenant == team and said.startswith(
        f"clapq: --tenant {f' {team}{chr(9)}'!r} taken as {team!r}, without the spaces around it; a key of tenant "
        f"{team!r}, which has 1 other active key:"), said
    tenant, said = create(f"  new-{team} ")
    assert tenant == f"new-{team}" and said.startswith(
        f"clapq: --tenant {f'  new-{team} '!r} taken as {f'new-{team}'!r}, without the spaces around it; new tenant "
        f"{f'new-{team}'!r}"), said
    tenant, said = create(old)
    assert tenant == old and said.startswith(f"clapq: a key of tenant {old!r}, which has 1 other active key"), said
    with session_scope(settings.database_url) as s:
        assert tenant_for_key(s, old_key).name == old


def test_a_database_that_cannot_be_used_and_a_busy_port_are_sentences(tmp_path, tiny_model):
    """DATABASE_URL that refuses connections or does not parse: `clapq migrate`, `keys create` and `up`
    say which database and why (password hidden), no traceback. A port something already listens on:
    `clapq up` refuses it before starting anything (another server's /healthz would have answered ours), and leaves
    no data directory it made (one was left behind, empty but for its lock file), nor one of its parents; one that
    was there before stays as it was."""
    import socket

    port = free_port()  # nothing listens there
    for url, why in ((f"postgresql://clapq:secret@127.0.0.1:{port}/x",
                      # `keys` cannot reach it, `migrate` and `up` cannot set it up
                      f" the database at postgresql://clapq:***@127.0.0.1:{port}/x: connection to server at"),
                     ("postgresql://clapq:secret@127.0.0.1:notaport/x",
                      "clapq: DATABASE_URL is not a database URL like postgresql://")):
        env = _env(tiny_model, DATABASE_URL=url, REDIS_URL="redis://127.0.0.1:1/0")
        for cmd in (["migrate"], ["keys", "create", "--tenant", "t"], ["up", "--data-dir", str(tmp_path / "d"),
                                                                     "--port", str(free_port())]):
            out = subprocess.run([sys.executable, "-m", "clapq.cli", *cmd], env=env, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 1 and "Traceback" not in out.stderr, (cmd, out.stderr[-3000:])
            assert why in out.stderr and "secret" not in out.stderr, (cmd, out.stderr[-3000:])
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "a.txt").write_text("kept")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for data_dir in (tmp_path / "e", tmp_path / "x" / "new", mine):
            out = subprocess.run([sys.executable, "-m", "clapq.cli", "up", "--data-dir", str(data_dir), "--host",
                                  "127.0.0.1", "--port", str(taken)], env=_env(tiny_model),
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
            assert f"cannot serve on 127.0.0.1:{taken}" in out.stderr and "--port" in out.stderr, out.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()  # refused before anything was made
    assert (mine / "notes" / "a.txt").read_text() == "kept" and not (mine / "pg").exists()
    # a --host that is not this machine's (an address of TEST-NET-1, a name that does not resolve) is said so:
    # it was told to stop another server or pass --port (helper-108)
    for host in ("192.0.2.1", "no-such-host.invalid"):
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "up", "--data-dir", str(tmp_path / "e"), "--host",
                              host, "--port", str(free_port())], env=_env(tiny_model), capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and f"{host!r} is not an address of this machine: pass --host with one of its " \
            "addresses" in out.stderr and "another `clapq up`" not in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "e").exists()
    # a port that is no port, or no API processes: a sentence (a traceback from bind; a gunicorn that
    # listened and never answered)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "up", "--data-dir", str(tmp_path / "f"), "--port",
                          "99999"], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "argument --port: '99999' is not a port" in out.stderr, out.stderr[-3000:]
    for name, value in (("CLAPQ_API_WORKERS", "0"), ("CLAPQ_PORT", "-1"), ("CLAPQ_API_THREADS", "many")):
        env = _env(tiny_model, DATABASE_URL="postgresql://x@127.0.0.1:1/x", REDIS_URL="redis://127.0.0.1:1/0")
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "api"], env={**env, name: value},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and f"clapq: {name}={value!r}: give a whole number from" in out.stderr, out.stderr


@pytest.mark.parametrize("model", ["/nonexistent/clap", "laion/clap-htsat-unfused"])
def test_no_model_means_a_clear_error(tmp_path, model):
    env = _env("x", CLAPQ_MODEL=model, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "up", "--data-dir", str(tmp_path / "d")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "CLAPQ_MODEL" in out.stderr and "local directory" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("cmd", ["up", "worker", "api"])
def test_a_model_of_vectors_the_schema_cannot_store_stops_at_start(tmp_path, tiny_model, cmd):
    """A CLAP checkpoint whose projection is not 512-d (the vector columns' dimension): the API said it was
    ready, made libraries of it and took uploads, and the worker failed every write of their vectors,
    retrying each file (helper-63). Every command stops at start with a sentence, touching nothing."""
    other = tmp_path / "clap-256"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["projection_dim"] = 256
    (other / "config.json").write_text(json.dumps(config))
    env = _env(other, DATABASE_URL="postgresql://nowhere/x", REDIS_URL="redis://nowhere:1/0")
    out = subprocess.run([sys.executable, "-m", "clapq.cli", cmd] + (["--data-dir", str(tmp_path / "d")]
                                                                      if cmd == "up" else []),
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == (f"clapq: {other} makes 256-dimensional vectors (its config.json's projection_dim), "
                                  "and clapq stores 512-dimensional ones, as LAION's CLAP checkpoints make "
                                  "(laion/clap-htsat-unfused, laion/larger_clap_general): point CLAPQ_MODEL at "
                                  "one of those"), out.stderr[-2000:]


@pytest.mark.parametrize("cmd", ["up", "worker", "api"])
@pytest.mark.parametrize("device, precision, message", [
    ("cpu", "fp16", "CLAPQ_PRECISION=fp16 needs a GPU; on a CPU use bf16 or fp32"),
    ("cuda", "auto", "CLAPQ_DEVICE=cuda but no GPU is visible to torch"),
])
def test_a_device_or_precision_the_machine_cannot_run_stops_at_start(tmp_path, tiny_model, cmd, device,
                                                                     precision, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = _env(tiny_model, CLAPQ_PRECISION=precision, CLAPQ_DEVICE=device, DATABASE_URL="postgresql://nowhere/x",
               REDIS_URL="redis://nowhere:1/0")
    out = subprocess.run([sys.executable, "-m", "clapq.cli", cmd] + (["--data-dir", str(tmp_path)] if cmd == "up"
                                                                      else []),
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == f"clapq: {message}"


def test_upload_requests_fill_whole_worker_batches(tmp_path):
    """`clapq upload` sends 128 files a request (whole batches of 16 for the worker, no padded one per
    request with short files), and splits before a request would pass the byte limit."""
    from clapq import client

    paths = []
    for i in range(300):
        p = tmp_path / f"{i:03d}.wav"
        p.write_bytes(b"x" * 10)
        paths.append(p)
    assert [len(b) for b in client.batches(paths)] == [128, 128, 44]
    assert [p for b in client.batches(paths) for p in b] == paths
    two = client.REQUEST_OVERHEAD + 2 * (10 + client.PART_OVERHEAD)  # two 10-byte files fit, a third does not
    assert [len(b) for b in client.batches(paths[:7], max_bytes=two)] == [2, 2, 2, 1]


def test_upload_bodies_stream_from_disk_and_parse_as_sent(tmp_path):
    """`clapq upload` sends each request from the files as it goes (a 2 GB recording never sits in the
    client's memory), with a Content-Length, and the body is the multipart form the API reads."""
    import io
    import tracemalloc

    from werkzeug.formparser import parse_form_data

    from clapq import client

    (tmp_path / "sub").mkdir()
    small = tmp_path / "sub" / "a.wav"
    small.write_bytes(b"RIFF small")
    big = tmp_path / "big.wav"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # 64 MiB of zeros, sparse on disk
    with client.multipart_body(tmp_path, [small, big]) as body:
        tracemalloc.start()
        sent = io.BytesIO()
        total = 0
        while chunk := body.read(1 << 14):  # urllib3's block size
            assert len(chunk) <= 1 << 14
            total += len(chunk)
            if total < (1 << 20):  # keep only the start: the form header, the metadata and the small file
                sent.write(chunk)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert total == len(body) and peak < (4 << 20), peak  # streamed, not built in memory
        handles = [fh for _, (_, fh, _) in body.encoder.fields[1:]]
    assert all(fh.f.closed for fh in handles)
    head = sent.getvalue()
    assert b'name="metadata"' in head and b'filename="sub/a.wav"' in head and b"RIFF small" in head
    # whatever the read sizes (None and -1: the rest; 0: nothing), the bytes are the encoder's own
    mid = tmp_path / "mid.wav"
    mid.write_bytes(os.urandom(600_000))  # across the 256 KiB blocks the body is read in
    for sizes in ([1 << 14] * 3 + [None], [0, 5, -1], [1 << 20] * 3):
        with client.multipart_body(tmp_path, [small, mid]) as body:
            whole = body.encoder.to_string()
        with client.multipart_body(tmp_path, [small, mid]) as body:
            got = b"".join(body.read(n) for n in sizes) + body.read()
            assert body.read() == b"" and body.read(0) == b""
        boundary = body.content_type.split("boundary=")[1].encode()
        assert len(got) == len(whole) and got.replace(boundary, b"") == whole.replace(whole[2:34], b""), sizes
    with client.multipart_body(tmp_path, [small]) as body:
        environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": body.content_type, "CONTENT_LENGTH": str(len(body)),
                   "wsgi.input": io.BytesIO(body.read())}
    _, form, files = parse_form_data(environ)
    assert json.loads(form["metadata"]) == {"sub/a.wav": {"path": "sub/a.wav", "folder": client.folder_id(tmp_path)}}
    assert len(client.folder_id(tmp_path)) == 16 and str(tmp_path) not in form["metadata"]  # not the user's path
    assert files["files"].filename == "sub/a.wav" and files["files"].read() == b"RIFF small"


@pytest.mark.parametrize("cmd", [["upload", "FOLDER", "--library", "x"], ["search", "--library", "x", "a dog"],
                                 ["delete", "--library", "x", "--yes"], ["jobs"],
                                 ["jobs", "retry", "96d2439e-0a6f-4abc-84ef-33835f51996b"]])
def test_client_commands_say_when_the_api_is_not_there(tmp_path, tiny_model, cmd):
    port = free_port()  # nothing listens there
    argv = [str(tmp_path) if a == "FOLDER" else a for a in cmd]
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    out = subprocess.run([sys.executable, "-m", "clapq.cli", *argv, "--url", f"http://127.0.0.1:{port}",
                          "--key", "cq_x"], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"cannot reach the clapq API at http://127.0.0.1:{port}" in out.stderr
    assert "Connection refused" in out.stderr


@contextlib.contextmanager
def fake_api(answer, bodies: list | None = None, port: int = 0):
    """A stand-in for the API on a free port: `answer(method, path)` gives (status, JSON or None, headers),
    None for a request that is never answered, or "drop" to close the connection without an answer. Request bodies are read, and kept in `bodies` as
    (method, path, body) if given."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if bodies is not None:
                bodies.append((method, self.path, body))
            got = answer(method, self.path)
            if got is None:
                time.sleep(30)
                return
            if got == "drop":  # the connection closes without an answer, as in a restart
                self.close_connection = True
                return
            status, obj, headers = got
            body = json.dumps(obj).encode() if obj is not None else b""
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply("GET")

        def do_POST(self):
            self.reply("POST")

        def do_DELETE(self):
            self.reply("DELETE")

        def log_message(self, *args):
            pass

    with _serving(Handler, port) as url:
        yield url


@contextlib.contextmanager
def _serving(handler, port: int = 0) -> Iterator[str]:
    """An HTTP server of `handler` on a port (a free one: 0), in a thread; its URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _proxy(base: str, decide: Callable[[str, str, bytes], object]) -> Iterator[str]:
    """A proxy in front of the API at `base`, on a free port: each request goes on to the API as it came, unless
    `decide(method, path, body)` gives "cut" (it goes on, and its answer is dropped: the connection is closed
    without one, as a restart or a network's fault cuts it after the API has done what it asked) or (status, body,
    headers) (answered by the proxy, as a proxy's size limit or a 503 does)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            got = decide(self.command, self.path, body)
            if got is not None and got != "cut":
                status, text, headers = got
                answer, sent = text.encode(), {"Content-Length": str(len(text.encode())), **headers}
            else:
                r = requests.request(self.command, base + self.path, data=body, timeout=120, headers={
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")})
                if got == "cut":
                    self.close_connection = True
                    return
                status, answer = r.status_code, r.content
                sent = {k: v for k, v in r.headers.items()
                        if k.lower() not in ("connection", "transfer-encoding", "content-encoding", "content-length")}
                sent["Content-Length"] = str(len(answer))
            self.send_response(status)
            for k, v in sent.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = do_DELETE = do_PATCH = reply

        def log_message(self, *args):
            pass

    with _serving(Handler) as url:
        yield url


def _upload(folder: Path, url: str, tiny_model, library: str = "x", **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", library, "--url",
                             url, "--key", "cq_x"], env=_env(tiny_model), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_a_key_the_api_does_not_take_is_said_in_the_commands_terms(tiny_model):
    """A 401: the command names --key and CLAPQ_API_KEY, where it passed on the API's words for HTTP
    clients, "send 'Authorization: Bearer <key>'" (helper-36)."""
    def answer(method, path):
        return 401, {"error": {"code": "unauthorized", "status": 401,
                               "message": "missing or invalid API key: send 'Authorization: Bearer <key>'"}}, {}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url,
                              "--key", "cq_revoked"], env=_env(tiny_model), capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 1 and out.stderr.strip() == (
        "clapq: GET /v1/libraries: the API does not take this key (unknown or revoked): pass the one `clapq up` or "
        "`clapq keys create` printed, with --key or CLAPQ_API_KEY"), out.stderr


def test_a_data_directory_whose_up_is_stopped_is_said_so_where_another_server_answers(tmp_path, tiny_model):
    """`clapq jobs --data-dir D`, where D's `clapq up` is not running and another `up` (of another data
    directory) now serves the port D's last run did: the command said D's key was "unknown or revoked" (helper-88:
    two data directories run in turn on one port). Where D's lock is free it says that D's `up` is not running
    and how to go on; while D's `up` runs (its lock held), a 401 is still said as before."""
    import fcntl

    def answer(method, path):
        return 401, {"error": {"code": "unauthorized", "status": 401,
                               "message": "missing or invalid API key: send 'Authorization: Bearer <key>'"}}, {}

    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "api_key").write_text("cq_of_d\n")
    (data_dir / "clapq-up.lock").write_text("12345\n")
    with fake_api(answer) as url:
        (data_dir / "url").write_text(url + "\n")

        def jobs(*more) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "clapq.cli", "jobs", "--data-dir", str(data_dir), *more],
                                  env=_env(tiny_model), capture_output=True, text=True, timeout=60)

        out = jobs()
        assert out.returncode == 1 and out.stderr.strip() == (
            f"clapq: GET /v1/jobs: the API at {url} does not take the key of {data_dir}, whose `clapq up` is not "
            "running: another server answers at the address it served last. Start it again (`clapq up --data-dir "
            f"{data_dir}` with the --port it had), or pass --url and --key"), out.stderr
        # a key of the user's own (--key, CLAPQ_API_KEY) is not called D's (it was "the key of D")
        out = jobs("--key", "cq_mine")
        assert out.returncode == 1 and out.stderr.strip() == (
            f"clapq: GET /v1/jobs: the API at {url} does not take this key, and the `clapq up` of {data_dir}, "
            "whose address it is, is not running: another server answers there. Start it again (`clapq up "
            f"--data-dir {data_dir}` with the --port it had), or pass --url"), out.stderr
        with open(data_dir / "clapq-up.lock") as held:  # as a running `up` holds it
            fcntl.flock(held, fcntl.LOCK_EX)
            out = jobs()
    assert out.returncode == 1 and "the API does not take this key (unknown or revoked)" in out.stderr, out.stderr


def test_an_upload_that_is_redirected_says_where_instead_of_resending_a_spent_body(tmp_path, tiny_model):
    """A proxy answering 307 to the upload: following it would resend a body already read from disk
    (nothing, against the full Content-Length) and wait out the timeout; the command names the new place."""
    def answer(method, path):
        if path == "/v1/limits":
            return 404, None, {}
        if method == "GET":  # the library lookup
            return 200, {"libraries": [{"id": "lib1", "name": "x"}]}, {}
        return 307, None, {"Location": "https://clapq.example/v1/libraries/lib1/batches"}

    write(tmp_path / "a.wav", 0.5)
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err, err
    assert "was redirected (307) to https://clapq.example/v1/libraries/lib1/batches" in err, err


def test_a_search_that_finds_nothing_while_files_are_queued_says_so(tiny_model):
    """No results from a library whose files are still queued: the command says they are still to embed, not
    that the library has none. The other two answers (an empty library, one whose files all failed) are
    tested against the real service in test_up_serves_persists_and_stops; here a stand-in keeps files queued."""
    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 3}]}, {}
        if path == "/v1/search":
            return 200, {"results": []}, {}
        return 200, {"id": "lib1", "name": "x", "item_count": 3,
                     "counts": {"queued": 2, "running": 1, "done": 0, "failed": 0, "cancelled": 0}}, {}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url,
                              "--key", "cq_x"], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "", out.stdout
    assert "no results: library 'x' has 3 files still to embed; search again once they are" in out.stderr, out.stderr


def _commands_at(base: str, key: str, tiny_model, library: str | None = None,
                 cache: Path | None = None) -> Callable[..., subprocess.CompletedProcess]:
    """`clapq COMMAND ...` run against the API at `base` with `key`, its output captured, no terminal to ask at;
    with `--library library` where given, and its digests kept under `cache` (XDG_CACHE_HOME) where given."""
    def clapq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args, *(("--library", library) if library else ()),
                               "--url", base, "--key", key],
                              env=_env(tiny_model, **({"XDG_CACHE_HOME": str(cache)} if cache else {})),
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    return clapq


def test_an_upload_with_nothing_to_send_into_a_library_of_another_model_says_so(start_api, new_key, worker, settings,
                                                                                 tmp_path, tiny_model):
    """A folder uploaded once, run again after the service's CLAPQ_MODEL changed: nothing to send, and it said
    only that the files were in the library already, exit 0, where the search that follows answered 409
    (helper-108). It now says that the library is bound to another model, and where it is searched. The
    library is made another model's as a service of that model would have left it: its row names that model."""
    from sqlalchemy import update

    from clapq.models import EmbeddingModel, Library

    base, key = start_api(), new_key()
    folder = tmp_path / "old"
    folder.mkdir()
    write(folder / "a.wav", 0.5, seed=92)

    clapq = _commands_at(base, key, tiny_model)
    first = clapq("upload", str(folder), "--library", "old")
    assert first.returncode == 0 and "bound to model" not in first.stderr, first.stderr
    lib = json.loads(first.stdout)["library_id"]
    with session_scope(settings.database_url) as s:
        other = EmbeddingModel(name="/srv/other-clap", weights_sha256=uuid.uuid4().hex * 2, dim=512)
        s.add(other)
        s.flush()
        s.execute(update(Library).where(Library.id == lib).values(model_id=other.id))
        other_id = other.id
    out = clapq("upload", str(folder), "--library", "old")
    assert out.returncode == 0 and json.loads(out.stdout)["skipped"] == 1, out
    assert f"library 'old' is bound to model {other_id} (/srv/other-clap), not the one this service runs (model " \
        in out.stderr and "and here a search of it is refused (409)" in out.stderr, out.stderr
    assert "POST /v1/search failed (409): library 'old'" in clapq("search", "tone", "--library", "old").stderr


def test_a_search_clip_stated_longer_than_the_limit_is_refused_before_it_is_sent(start_api, new_key, tmp_path,
                                                                                 tiny_model):
    """`clapq search --like` of a 15-minute WAV sent all of its 317 MB before the API's 400 (helper-108). A clip whose
    header gives its exact length (WAV) over `max_clip_s` is refused before it is sent now; one whose header's length
    is an estimate (FLAC) is still sent, and the API refuses it by decoding, as before."""
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    assert requests.post(f"{base}/v1/libraries", json={"name": "long"}, headers=h, timeout=30).status_code == 201
    limit = requests.get(f"{base}/v1/limits", headers=h, timeout=30).json()["max_clip_s"]

    def like(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", "search", "--like", str(path), "--library", "long",
                               "--url", base, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                              timeout=300)

    wav = write(tmp_path / "long.wav", limit + 1, 8_000)
    out = like(wav)
    assert out.returncode == 1 and out.stderr == f"clapq: {wav} lasts {limit + 1} s, longer than {limit} s, the " \
        "limit for a search clip: search with a part of it (nothing was sent)\n", out.stderr
    out = like(write(tmp_path / "long.flac", limit + 1, 8_000))
    assert out.returncode == 1 and f"the 'audio' clip 'long.flac' lasts longer than {limit} s, the limit for a " \
        "search clip; send a part of it" in out.stderr, out.stderr
    out = like(write(tmp_path / "short.wav", 2, 8_000))  # within it: searched
    assert out.returncode == 0 and "no results" in out.stderr, out.stderr
    # a name that is not UTF-8 (a Latin-1 "café" from an old drive) was a UnicodeEncodeError traceback, exit 1
    odd = wav.rename(tmp_path / os.fsdecode(b"caf\xe9.wav"))
    out = like(odd)
    assert out.returncode == 1 and out.stderr == f"clapq: {tmp_path}/caf\\xe9.wav lasts {limit + 1} s, longer than " \
        f"{limit} s, the limit for a search clip: search with a part of it (nothing was sent)\n", out.stderr
    out = like(write(tmp_path / "short.wav", 2, 8_000).rename(tmp_path / os.fsdecode(b"d\xe9j\xe0.wav")))
    assert out.returncode == 0 and "no results" in out.stderr, out.stderr


def test_a_search_clip_named_mp3_that_is_not_mp3_is_said_in_one_sentence(start_api, new_key, tmp_path, tiny_model):
    """`clapq search --like broken.mp3`, a file named .mp3 that is not MP3: libmpg123, which libsndfile runs as the
    client looks at the clip's length, wrote three lines of its own ("Note: Illegal Audio-MPEG-Header 0x00000000 at
    offset 2996.", "Note: Trying to resync...", "Note: Hit end of (available) data during resync.") before the API's
    sentence (helper-125). Now the API's sentence alone; a WAV stated too long is still refused before it is sent."""
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    assert requests.post(f"{base}/v1/libraries", json={"name": "x"}, headers=h, timeout=30).status_code == 201
    clapq = _commands_at(base, key, tiny_model, library="x")
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"this is not an mp3 file at all" * 100)
    out = clapq("search", "--like", str(broken))
    assert out.returncode == 1 and out.stderr == "clapq: POST /v1/search failed (400): the 'audio' clip 'broken.mp3' " \
        "could not be decoded: not a readable audio file (Invalid data found when processing input)\n", out.stderr
    limit = requests.get(f"{base}/v1/limits", headers=h, timeout=30).json()["max_clip_s"]
    wav = write(tmp_path / "long.wav", limit + 1, 8_000)
    out = clapq("search", "--like", str(wav))
    assert out.returncode == 1 and out.stderr.startswith(f"clapq: {wav} lasts {limit + 1} s, longer than"), out.stderr


def test_a_search_clip_from_a_pipe_is_read_once_and_sent_again_as_it_was(start_api, new_key, tmp_path, tiny_model):
    """`clapq search --like <(ffmpeg ...)`: a pipe was refused ("a pipe or a device, not a sound file"), and the
    search's tries each opened its path again, where a pipe gives its bytes once: a search sent again (here after a
    503) would send nothing (helper-141). A pipe's bytes are read once, within what the API takes in a request, and
    each try sends them; a device is still refused."""
    base, key = start_api(), new_key()
    requests.post(f"{base}/v1/libraries", json={"name": "piped"}, headers={"Authorization": f"Bearer {key}"},
                  timeout=30).raise_for_status()
    clip = write(tmp_path / "clip.wav", 2.0, seed=1412).read_bytes()
    searches = []

    def decide(method, path, body):
        if method == "POST" and path == "/v1/search":
            searches.append(body)
            if len(searches) == 1:
                return 503, json.dumps({"error": {"code": "unavailable", "status": 503, "message": "restarting"}}), {
                    "Content-Type": "application/json", "Retry-After": "1"}
        return None

    with _proxy(base, decide) as url:
        out = subprocess.run(["bash", "-c", f"exec {shlex.quote(sys.executable)} -m clapq.cli search --like <(cat "
                              f"{shlex.quote(str(tmp_path / 'clip.wav'))}) --library piped --url {url} --key {key}"],
                             env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "no results" in out.stderr, out.stderr
    assert len(searches) == 2 and all(clip in body for body in searches), [len(b) for b in searches]
    device = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "--like", "/dev/null", "--library", "piped",
                             "--url", base, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                            timeout=60)
    assert device.returncode == 2 and "/dev/null is a device or a socket, not a sound file" in device.stderr, device


def test_a_search_clip_from_a_pipe_is_named_as_the_pipe_given_not_by_its_descriptor(start_api, new_key, tmp_path,
                                                                                    tiny_model):
    """`clapq search --like <(cat clip)` sent its clip named "63", the last part of the /dev/fd/63 the shell gave,
    and the API's refusal named it so: "the 'audio' clip '63' could not be decoded"; the command's own refusals said
    "/dev/fd/63". A pipe of a descriptor goes by "the pipe given to --like", or by "standard input" where it is
    the command's (`... | clapq search --like /dev/fd/0`), in both; a named pipe (mkfifo) by its own name."""
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    requests.post(f"{base}/v1/libraries", json={"name": "piped"}, headers=h, timeout=30).raise_for_status()
    limit = requests.get(f"{base}/v1/limits", headers=h, timeout=30).json()["max_clip_s"]
    (tmp_path / "notes.txt").write_text("not a sound\n" * 100)
    write(tmp_path / "long.wav", limit + 1, 8_000)

    def like(arg: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"{arg.replace('CLAPQ', shlex.quote(sys.executable) + ' -m clapq.cli')} "
                               f"--library piped --url {base} --key {key}"], env=_env(tiny_model), capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)

    out = like("CLAPQ search --like <(cat notes.txt)")
    assert out.returncode == 1 and "POST /v1/search failed (400): the 'audio' clip 'the pipe given to --like' could " \
        "not be decoded: " in out.stderr and "'63'" not in out.stderr, out.stderr
    out = like("cat notes.txt | CLAPQ search --like /dev/fd/0")
    assert out.returncode == 1 and "failed (400): the 'audio' clip 'standard input' could not be decoded: " \
        in out.stderr, out.stderr
    out = like("CLAPQ search --like <(cat long.wav)")  # refused before it is sent, as a file is
    assert out.returncode == 1 and out.stderr == f"clapq: the pipe given to --like lasts {limit + 1} s, longer than " \
        f"{limit} s, the limit for a search clip: search with a part of it (nothing was sent)\n", out.stderr
    os.mkfifo(tmp_path / "take.wav")
    out = like("cat notes.txt > take.wav & CLAPQ search --like take.wav")
    assert out.returncode == 1 and "failed (400): the 'audio' clip 'take.wav' could not be decoded: " in out.stderr, \
        out.stderr


def test_a_search_that_finds_some_while_files_are_queued_says_the_rest_are_not_searched_yet(
        start_api, new_key, worker, settings, tmp_path, tiny_model):
    """A search right after `clapq upload --no-wait` found the files embedded so far and said nothing of the
    rest, as if the library were searched whole (helper-108): it now says how many are still to embed. The
    queued file is a row as an upload writes it, tried once already so that no worker's task claims it."""
    from sqlalchemy import update

    from clapq.models import Item, Job, Library

    base, key = start_api(), new_key()
    folder = tmp_path / "partly"
    folder.mkdir()
    write(folder / "a.wav", 0.5, seed=91)

    clapq = _commands_at(base, key, tiny_model)
    assert clapq("upload", str(folder), "--library", "partly").returncode == 0
    out = clapq("search", "tone", "--library", "partly")
    assert out.returncode == 0 and "a.wav" in out.stdout and out.stderr == "", out
    lib = json.loads(clapq("libraries", "--json").stdout)[0]["id"]
    with session_scope(settings.database_url) as s:
        tenant = s.get(Library, lib).tenant_id
        job = Job(tenant_id=tenant, library_id=lib)
        s.add(job)
        s.flush()
        queued = Item(tenant_id=tenant, library_id=lib, job_id=job.id, sha256="d" * 64, filename="b.wav",
                      size_bytes=1, status="queued", attempts=1)
        s.add(queued)
    try:
        out = clapq("search", "tone", "--library", "partly")
        assert out.returncode == 0 and "a.wav" in out.stdout, out
        assert out.stderr == "library 'partly' has 1 file still to embed, not searched yet; search again once it " \
            "is\n", out.stderr
    finally:  # a queued row with no task is an orphan the sweeps of later tests (test_faults) would send and count
        with session_scope(settings.database_url) as s:
            s.execute(update(Item).where(Item.id == queued.id).values(status="cancelled"))


def test_a_search_lists_every_matching_window_and_pages_on(start_api, new_key, worker, tmp_path, tiny_model):
    """`clapq search` printed each file's best window alone, the first -k: the other moments of a long recording,
    and the results past the first page, were to be had only from the API (helper-125). `--windows` lists the
    windows (mode segments), each with its own times; `--offset N` leaves out the first N, so pages joined are the
    search's whole list; a page past the last says so, not why the library has no results."""
    base, key = start_api(), new_key()
    folder = tmp_path / "recordings"
    folder.mkdir()
    write(folder / "long.flac", 60, 8_000, freq=300, seed=3)
    write(folder / "short.wav", 2, 8_000, freq=900, seed=4)
    clapq = _commands_at(base, key, tiny_model)
    assert clapq("upload", str(folder), "--library", "rec").returncode == 0
    lib = json.loads(clapq("libraries", "--json").stdout)[0]["id"]
    want = requests.post(f"{base}/v1/search", json={"library_id": lib, "text": "a low hum", "k": 6,
                                                    "mode": "segments"},
                         headers={"Authorization": f"Bearer {key}"}, timeout=60).json()["results"]
    assert sum(r["filename"] == "long.flac" for r in want) >= 5, want  # several moments of one file

    def rows(*args: str) -> list[tuple[str, str, str]]:
        out = clapq("search", "a low hum", "--library", "rec", *args)
        assert out.returncode == 0 and out.stderr == "", out
        return [(line.split()[1], line.split()[2], line.split()[3]) for line in out.stdout.splitlines()]

    said = [(r["filename"], r["item_id"], f"{r['start_s']:g}-{r['end_s']:g}") for r in want]
    assert rows("--windows", "-k", "6") == said
    assert rows("--windows", "-k", "3") + rows("--windows", "-k", "3", "--offset", "3") == said
    files = rows("-k", "1") + rows("-k", "1", "--offset", "1")  # files, one line each, paged too
    assert sorted(name for name, _, _ in files) == ["long.flac", "short.wav"], files
    out = clapq("search", "a low hum", "--library", "rec", "--offset", "2")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "no results past the first 2: this search has " \
        "no more\n", out


def test_a_search_by_a_file_of_the_library_takes_its_item_id(start_api, new_key, worker, tmp_path, tiny_model):
    """The search page searched by a file of the library ("More like this") and the API by an `item_id`; `clapq
    search` only by words or a clip sent (`--like FILE`, at most 600 s: a long recording could not be searched by),
    so a script holding the item ids `--json` gave had no way (helper-125). `--like-item ITEM` searches by the
    file, left out of its results; an id that is not one is a usage error, and one of no file of yours is said."""
    base, key = start_api(), new_key()
    folder = tmp_path / "takes"
    folder.mkdir()
    for n, freq in enumerate((300, 320, 1800)):
        write(folder / f"take{n}.wav", 3, 8_000, freq=freq, seed=n)
    clapq = _commands_at(base, key, tiny_model)
    assert clapq("upload", str(folder), "--library", "takes").returncode == 0
    found = json.loads(clapq("search", "a tone", "--library", "takes", "--json").stdout)["results"]
    item = next(r["item_id"] for r in found if r["filename"] == "take0.wav")
    want = requests.post(f"{base}/v1/search", json={"library_id": found[0]["library_id"], "item_id": item},
                         headers={"Authorization": f"Bearer {key}"}, timeout=60).json()["results"]
    out = clapq("search", "--like-item", item, "--library", "takes")
    assert out.returncode == 0 and out.stderr == "", out
    assert [line.split()[1:3] for line in out.stdout.splitlines()] == [[r["filename"], r["item_id"]] for r in want]
    assert sorted(r["filename"] for r in want) == ["take1.wav", "take2.wav"], want  # the file itself left out
    out = clapq("search", "--like-item", "take0.wav", "--library", "takes")
    assert out.returncode == 2 and "'take0.wav' is not an item id: give one as `clapq search` prints it" in \
        out.stderr, out.stderr
    out = clapq("search", "--like-item", str(uuid.uuid4()), "--library", "takes")
    assert out.returncode == 1 and out.stderr == "clapq: POST /v1/search failed (404): item not found\n", out.stderr
    out = clapq("search", "a tone", "--like-item", item, "--library", "takes")
    assert out.returncode == 2 and "give --like-item ITEM (a file of your libraries) alone" in out.stderr, out.stderr


def test_a_search_whose_library_is_deleted_as_it_answers_prints_its_results_and_exits_0(tiny_model):
    """After a search that found some, `clapq search` asks the library's counts to say how many files are still to
    embed (helper-108). A library deleted between the two (another terminal's `clapq delete --yes`) made that look a
    404: the results printed, then "clapq: ... not found" and exit 1, a search that had succeeded. The stand-in API
    answers as the real one does in that moment: the search's results, then 404 for the library."""
    lib = {"id": "0b1c2d3e-1111-2222-3333-444455556666", "name": "field", "item_count": 1, "model": None}

    def answer(method, path):
        if method == "GET" and path == "/v1/libraries":
            return 200, {"libraries": [lib]}, {}
        if method == "POST" and path == "/v1/search":
            return 200, {"results": [{"item_id": "i1", "library_id": lib["id"], "filename": "rain.wav", "metadata": {},
                                      "score": 0.5, "segment": {"start_s": 0.0, "end_s": 10.0}}], "plan": "exact"}, {}
        return 404, {"error": {"code": "not_found", "message": "library not found", "status": 404}}, {}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "field", "--url", url,
                              "--key", "cq_x"], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "rain.wav" in out.stdout and out.stderr == "", out


def test_search_output_lines_up_and_stops_quietly_in_a_pipe(tiny_model):
    """`clapq search ... | head -1`: the reader stops early, which was a BrokenPipeError traceback; a negative
    score put its row out of line; a time of 10790.123 s printed as 10790.1 (6 significant figures), and now, past a
    file's first minute, as a clock, as a player seeks ("10790.123-10800 s" was to be worked out)."""
    many = [{"item_id": f"i{n}", "library_id": "lib1", "filename": f"{'long name ' * 8}{n}.wav", "metadata": {},
             "score": -0.01 if n == 1 else 0.5, "segment": {"start_s": 10790.123, "end_s": 10800.0}}
            for n in range(3000)]  # more than a pipe holds, so the writer is still writing when head exits

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 3000}]}, {}
        return 200, {"results": many}, {}

    with fake_api(answer) as url:
        cmd = [sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url, "--key", "cq_x"]
        whole = subprocess.run(cmd, env=_env(tiny_model), capture_output=True, text=True, timeout=60)
        first = subprocess.Popen(cmd, env=_env(tiny_model), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = first.stdout.readline()
        first.stdout.close()  # as head does once it has its line
        err = first.stderr.read()
        first.wait(60)
    rows = whole.stdout.splitlines()
    assert whole.returncode == 0 and rows[0].endswith("  2:59:50.123-3:00:00"), rows[0]
    assert rows[1].index("long name") == rows[0].index("long name") and rows[1].startswith("-0.0100"), rows[:2]
    assert line == rows[0] + "\n" and first.returncode == 141 and err == "", (first.returncode, err)


def test_a_window_past_a_files_first_minute_is_a_clock():
    """One form within a window, the hours where its end has them; within the first minute, seconds as before."""
    from clapq.client import _window

    assert [_window(*w) for w in [(0, 0.5), (50, 60), (55, 65), (3595, 3605), (3725, 3735.25)]] == \
        ["0-0.5 s", "50-60 s", "0:55-1:05", "0:59:55-1:00:05", "1:02:05-1:02:15.25"]
    # an end within half a millisecond of the hour (a recording a sample short of it) is said as the hour it
    # rounds to, its start in the same form: "59:50-0:00" dropped the hour; so of the minute
    assert [_window(*w) for w in [(3590, 3599.9996), (50, 60.0004)]] == ["0:59:50-1:00:00", "50-60 s"]


def test_names_a_terminal_cannot_show_are_written_escaped(tiny_model):
    """A result named with an emoji, printed where stdout's encoding is ASCII (LANG=C, PYTHONIOENCODING=ascii):
    a UnicodeEncodeError traceback in the middle of the results (helper-104); now the name, escaped."""
    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 1}]}, {}
        return 200, {"results": [{"item_id": "i1", "library_id": "lib1", "filename": "rain \U0001f327.wav",
                                  "metadata": {}, "score": 0.5, "segment": {"start_s": 0.0, "end_s": 10.0}}]}, {}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url,
                              "--key", "cq_x"], env={**_env(tiny_model), "PYTHONIOENCODING": "ascii"},
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "rain \\U0001f327.wav" in out.stdout, out.stdout
    # --json in JSON's escapes, which a JSON reader reads back (before: Python's \U0001f327, "Invalid \escape")
    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url,
                              "--key", "cq_x", "--json"], env={**_env(tiny_model), "PYTHONIOENCODING": "ascii"},
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert json.loads(out.stdout)["results"][0]["filename"] == "rain \U0001f327.wav", out.stdout


def test_a_failed_file_is_named_by_its_path_in_the_folder(tmp_path, tiny_model):
    """Two files of one base name in different folders: the one that failed is named by its path, as it
    was sent, not by the base name the server keeps (which would not say which of the two it was)."""
    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": [{"id": "i1", "filename": "take.wav"},
                                                     {"id": "i2", "filename": "take.wav"}]}, {}
        return 200, {"status": "done_with_errors", "progress": 1.0, "counts": {"done": 1, "failed": 1, "total": 2},
                     "errors": [{"item_id": "i2", "filename": "take.wav", "error": "not a readable audio file"}]}, {}

    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
    write(tmp_path / "day1" / "take.wav", 0.5)
    write(tmp_path / "day2" / "take.wav", 0.5, seed=1)
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "failed: day2/take.wav (item i2): not a readable audio file" in err, err


@pytest.mark.parametrize("asked", [True, False])
def test_files_another_upload_sent_meanwhile_are_said_so_not_as_copies(tmp_path, tiny_model, asked):
    """Two `clapq upload` of one folder into one new library at once: the library did not hold the files when
    the second asked, so it sent them too, and the API answered each as a `duplicate_of` the first's items.
    The second then said "151 files had the same bytes as another and are stored once: a.wav (= a file in
    the library), ...", every file of the folder, and "duplicates": 151 (helper-91). The files whose bytes
    another upload sent first are said so, apart; copies within the folder are still named by their first.
    A server older than /known (404), which is sent every file, is said of as before: its library held them."""
    import re

    write(tmp_path / "a.wav", 0.5, seed=1)
    write(tmp_path / "b.wav", 0.5, seed=2)
    (tmp_path / "copy of a.wav").write_bytes((tmp_path / "a.wav").read_bytes())
    theirs = {"a.wav": "o1", "b.wav": "o2", "copy of a.wav": "o1"}  # the items the other upload made
    bodies: list = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/known"):  # asked before the other upload's request was in
            return (200, {"known": [], "pending": []}, {}) if asked else (404, None, {})
        if path.endswith("/batches"):
            names = [n.decode() for n in re.findall(rb'filename="([^"]*)"', bodies[-1][2])]
            return 202, {"job_id": "job1", "items": [{"id": theirs[n], "filename": n, "status": "queued",
                                                      "duplicate_of": theirs[n]} for n in names]}, {}
        if path == "/v1/jobs/job1":
            return 200, {"status": "done_with_errors", "progress": 1.0,
                         "errors": [{"item_id": "o2", "filename": "b.wav", "error": "not a readable audio file"}],
                         "counts": {"done": 2, "failed": 1, "cancelled": 0, "total": 3, "duplicates": 3}}, {}
        return 404, None, {}

    with fake_api(answer, bodies) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    if not asked:
        assert "3 files had the same bytes as another and are stored once: a.wav (= a file in the library), " \
            "copy of a.wav (= a file in the library), b.wav (= a file in the library)\n" in err, err
        assert "another upload" not in err and json.loads(out)["by_another"] == 0, (out, err)
        return
    assert "a file in the library" not in err, err
    assert "2 files were sent by another upload into this library while this one ran (their bytes came from it " \
        "first), and are stored once: a.wav, b.wav\n" in err, err
    assert "1 file had the same bytes as another and is stored once: copy of a.wav (= a.wav)\n" in err, err
    assert "failed: b.wav (item o2): not a readable audio file" in err, err
    summary = json.loads(out)
    assert p.returncode == 1 and summary["by_another"] == 2 and summary["duplicates"] == 1, out


@pytest.mark.parametrize("retried", [False, True])
def test_a_job_cancelled_while_the_upload_waits_is_said_and_fails_the_command(tmp_path, tiny_model, retried):
    """A job cancelled from elsewhere (the API, another terminal) while `clapq upload` waits for it: the
    command says how many files were not embedded and how to send them, counts them in its summary and
    exits 1. Before, it ended as if all were well (exit 0, "failed": 0). Retried (from there too) before
    the command ended: asked again once the rest had ended, it is told as it stands, done, and the command
    exits 0; it was told as cancelled, failing the command for files that were in (helper-36)."""
    looks = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": [{"id": f"i{i}", "filename": f"{i}.wav"} for i in range(3)]}, {}
        if path != "/v1/jobs/job1":
            return 404, None, {}
        looks.append(path)
        if retried and len(looks) > 1:
            return 200, {"status": "done", "progress": 1.0, "errors": [],
                         "counts": {"done": 3, "failed": 0, "cancelled": 0, "total": 3}}, {}
        return 200, {"status": "cancelled", "progress": 0.3333, "errors": [],
                     "counts": {"done": 1, "failed": 0, "cancelled": 2, "total": 3}}, {}

    for i in range(3):
        write(tmp_path / f"{i}.wav", 0.5, seed=i)
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert len(looks) == 2, looks  # the cancelled job asked again once
    if retried:
        assert p.returncode == 0, (out, err)
        assert "cancelled" not in err and json.loads(out)["cancelled"] == 0, (out, err)
    else:
        assert p.returncode == 1, (out, err)
        assert "cancelled: 2 files of job job1 not embedded (the job was cancelled); run this upload again" in err, err
        assert json.loads(out)["cancelled"] == 2 and json.loads(out)["failed"] == 0, out


@pytest.mark.parametrize("refusal", [404, 401])
def test_a_library_deleted_while_the_files_are_sent_is_said_without_advice_to_resume(tmp_path, tiny_model, refusal):
    """The library deleted between two of the command's requests (404): it says so, and that nothing of this
    run is kept, not "N files were uploaded; run the same command again for the rest" (helper-36). Another
    refusal (a key revoked meanwhile, 401) asks nothing more (helper-37: the look at the library was refused too, and
    its sentence replaced the advice), and advises the same command with another key of the tenant: with its own,
    revoked, the same command is refused again (helper-127)."""
    def answer(method, path):
        if path == "/v1/limits":
            return 200, {"max_files_per_batch": 1}, {}
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/known"):
            return 200, {"known": [], "pending": []}, {}
        if path.endswith("/batches") and not sent:
            sent.append(path)
            return 202, {"job_id": "job1", "items": [{"id": "i0", "filename": "0.wav"}]}, {}
        asked.append(path)
        if refusal == 401:
            return 401, {"error": {"code": "unauthorized", "message": "missing or invalid API key", "status": 401}}, {}
        return 404, {"error": {"code": "not_found", "message": "library not found", "status": 404}}, {}

    sent: list = []
    asked: list = []
    for i in range(2):
        write(tmp_path / f"{i}.wav", 0.5, seed=i)
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1, (out, err)
    if refusal == 404:
        assert "clapq: library 'x' was deleted while the upload ran; nothing of this run is kept in it" in err, err
        assert "run the same command again" not in err and asked == ["/v1/libraries/lib1/batches", "/v1/libraries/lib1"]
    else:
        assert err.count("the API does not take this key") == 1 and asked == ["/v1/libraries/lib1/batches"], err
        assert ("clapq: 1 of 2 files were uploaded (jobs job1); they are being embedded, as the tenant's: run the same "
                "command again with another key of the tenant (--key or CLAPQ_API_KEY; `clapq keys create --tenant "
                "NAME` makes one) for the rest: files the library holds already are not sent again") in err, err


def test_an_empty_library_this_command_did_not_create_is_asked_what_it_holds(tmp_path, tiny_model):
    """Two uploads of one folder into one library at the same moment: the second finds the library empty,
    made by the first, and asks which bytes it holds before each request, so what the first has sent is
    not sent again. It asked only where the library held files when the command began, and sent the whole
    folder twice (helper-36)."""
    from clapq.blobs import file_sha256

    a = write(tmp_path / "a.wav", 0.5, seed=1)
    write(tmp_path / "b.wav", 0.5, seed=2)
    bodies: list = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/known"):
            return 200, {"known": [file_sha256(a)], "pending": []}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": [{"id": "i1", "filename": "b.wav"}]}, {}
        if path == "/v1/jobs/job1":
            return 200, {"status": "done", "progress": 1.0, "errors": [],
                         "counts": {"done": 1, "failed": 0, "cancelled": 0, "total": 1}}, {}
        return 404, None, {}

    with fake_api(answer, bodies) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out, err)
    sent = [body for method, path, body in bodies if path.endswith("/batches")]
    assert len(sent) == 1 and b'filename="b.wav"' in sent[0] and b'filename="a.wav"' not in sent[0]
    assert json.loads(out)["skipped"] == 1, out


def test_files_the_library_lacks_here_and_there_go_in_full_requests(tmp_path, tiny_model):
    """A library that holds a folder's files but a few, spread through it (broken files that failed, tried
    again at each run): the files it lacks are gathered into full requests, one job for the lot, where each
    request's worth of files asked about was sent on its own: a folder of 30,000 files with 160 broken ones
    made 115 requests and jobs of one or two files, and 230 lines, at every nightly run (helper-65)."""
    from clapq.blobs import file_sha256

    clip = write(tmp_path / "c00.wav", 0.05, 8_000).read_bytes()
    for i in range(1, 60):
        (tmp_path / f"c{i:02d}.wav").write_bytes(clip + bytes([i]))
    lacked = {file_sha256(tmp_path / f"c{i:02d}.wav") for i in range(0, 60, 6)}  # 10 files, in 6 of the 10s
    bodies: list = []

    def answer(method, path):
        if path == "/v1/limits":
            return 200, {"max_files_per_batch": 10}, {}
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 50}]}, {}
        if path.endswith("/known"):
            asked = json.loads(bodies[-1][2])["sha256"]
            return 200, {"known": [d for d in asked if d not in lacked], "pending": []}, {}
        if path.endswith("/batches"):
            n = bodies[-1][2].count(b'name="files"')
            return 202, {"job_id": f"job{n}", "items": [{"id": f"i{i}", "filename": "c.wav"} for i in range(n)]}, {}
        if path.startswith("/v1/jobs/"):
            return 200, {"status": "done", "progress": 1.0, "errors": [],
                         "counts": {"done": 10, "failed": 0, "cancelled": 0, "total": 10}}, {}
        return 404, None, {}

    with fake_api(answer, bodies) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, (out, err)
    sent = [body for method, path, body in bodies if path.endswith("/batches")]
    assert [body.count(b'name="files"') for body in sent] == [10], err
    assert err.count("uploading ") == 1 and json.loads(out)["skipped"] == 50, (out, err)


def test_a_folder_uploaded_again_is_read_only_where_it_changed(tmp_path, monkeypatch, capsys):
    """A run again asks the library about each file by its digest: the digests of a run before are kept, by
    each file's path, device, inode, size, and modification and change times, so only files that changed
    are read. Every run read every byte of the folder: a nightly upload of 250 GB with nothing new read
    250 GB (helper-65). A file written just before it is read is not kept (it may still be being written),
    and one whose bytes change is read again, even with its size and modification time kept as they were."""
    from clapq import client as c
    from clapq import digests as d
    from clapq.blobs import file_sha256

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reads: list[str] = []
    monkeypatch.setattr(d, "file_sha256", lambda p: reads.append(Path(p).name) or file_sha256(p))
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        write(folder / f"{i}.wav", 0.2, seed=i)
    asked: list[set] = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 3}]}, {}
        if path.endswith("/known"):
            asked.append(set(json.loads(bodies[-1][2])["sha256"]))
            return 200, {"known": sorted(asked[-1]), "pending": []}, {}
        return 404, None, {}

    def run() -> list[str]:
        reads.clear()
        monkeypatch.setattr(c, "_digests", None)
        assert c.upload_folder(c.Client(url, "cq_x"), folder, "x") == 0, capsys.readouterr()
        c._digests.close()
        return sorted(reads)

    bodies: list = []
    with fake_api(answer, bodies) as url:
        assert run() == ["0.wav", "1.wav", "2.wav"]
        assert run() == ["0.wav", "1.wav", "2.wav"]  # just written: not kept
        monkeypatch.setattr(d, "SETTLE_S", 0.0)
        assert run() == ["0.wav", "1.wav", "2.wav"]
        assert run() == [] and asked[-1] == asked[0]
        # other bytes of the same size, the modification time set back: its change time moved
        one = folder / "1.wav"
        before = one.stat()
        one.write_bytes(one.read_bytes()[:-1] + b"\x7f")
        os.utime(one, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert one.stat().st_size == before.st_size
        assert run() == ["1.wav"] and file_sha256(one) in asked[-1] and len(asked[-1] - asked[0]) == 1


def test_the_bytes_at_a_path_are_read_where_no_digest_of_them_is_known_yet(tmp_path, monkeypatch):
    """A renamed file's old path, where another file now is, asked about before that file's digest was
    read (it is in a later request's worth of the folder, as on a run resumed): the file is read, through
    the cache of digests (helper-65: a first version of it called an argument of Where.has that had the
    reading function's name, "'str' object is not callable", found resuming a folder of 8,197 files)."""
    from clapq import client as c
    from clapq.blobs import file_sha256

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(c, "_digests", None)
    a, b = write(tmp_path / "a.wav", 0.2, seed=1), write(tmp_path / "b.wav", 0.2, seed=2)
    where = c.Where(tmp_path, [a, b])
    assert where.has("a.wav", file_sha256(a)) is True and where.has("b.wav", file_sha256(a)) is False
    assert where.holds("b.wav", file_sha256(b)) and not where.holds("a.wav", file_sha256(b))
    c._digests.close()


def test_a_jobs_copies_are_not_said_as_part_of_its_last_count():
    """A job's counts as `clapq jobs show`, `jobs wait` and `upload` print them: its copies were said in brackets
    after the last count, "14 done, 2 failed (1 of them copies of another file's bytes, stored once)", which read as
    a failed copy where the copy was done and the two failed were broken files."""
    from clapq.client import _counted

    assert _counted({"done": 14, "failed": 2, "duplicates": 1}) == \
        "14 done, 2 failed; 1 of its files is a copy of another file's bytes, stored once"
    assert _counted({"done": 3, "queued": 2, "duplicates": 2}) == \
        "3 done, 2 queued; 2 of its files are copies of another file's bytes, stored once"
    assert _counted({"done": 3}) == "3 done" and _counted({}) == "no files"


def test_more_failures_than_a_job_lists_are_all_named_and_counted(tmp_path, tiny_model):
    """A job's `errors` hold its first 100 failures; a job of 150 broken files is read to the end from its
    listing of failed items, so every file is named and the summary counts 150 (it said 100)."""
    failed = [{"id": f"i{i}", "filename": f"{i:03}.wav", "error": "not a readable audio file", "status": "failed"}
              for i in range(150)]

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": [{"id": i["id"], "filename": i["filename"]} for i in failed]}, {}
        if path.startswith("/v1/jobs/job1/items?"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
            assert query["status"] == ["failed"], query
            start = int(query.get("cursor", ["0"])[0])
            return 200, {"items": failed[start:start + 60], "next_cursor": str(start + 60) if start + 60 < 150
                         else None}, {}
        return 200, {"status": "failed", "progress": 1.0, "errors": [
            {"item_id": i["id"], "filename": i["filename"], "error": i["error"]} for i in failed[:100]],
            "counts": {"done": 0, "failed": 150, "cancelled": 0, "total": 150}}, {}

    for i in range(150):
        (tmp_path / f"{i:03}.wav").write_bytes(b"not audio %d" % i)
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and json.loads(out)["failed"] == 150, (out, err)
    assert sum(line.startswith("failed: ") for line in err.splitlines()) == 150 and "failed: 149.wav" in err, err


def test_a_file_gone_before_its_request_is_left_out_and_the_rest_sent(tmp_path, tiny_model):
    """A file removed after the folder was looked through (here while the command asks which files the
    library holds): its request leaves it out, saying so, and the other files go. Before, the whole upload
    stopped at it."""
    bodies = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 1}]}, {}
        if path.endswith("/known"):
            (tmp_path / "b.wav").unlink()
            return 200, {"known": [], "pending": []}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": [{"id": "i1", "filename": "a.wav"}, {"id": "i3", "filename": "c.wav"}]}, {}
        return 200, {"status": "done", "progress": 1.0, "errors": [],
                     "counts": {"done": 2, "failed": 0, "cancelled": 0, "total": 2}}, {}

    for i, name in enumerate("abc"):
        write(tmp_path / f"{name}.wav", 0.3, seed=i)
    with fake_api(answer, bodies) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "not sent: b.wav: gone since the upload began (removed or moved meanwhile)" in err, \
        (out, err)
    assert json.loads(out)["not_sent"] == 1 and "uploaded 2 files (job job1)" in err, (out, err)
    [sent] = [body for method, path, body in bodies if path.endswith("/batches")]
    assert b'filename="a.wav"' in sent and b'filename="c.wav"' in sent and b'filename="b.wav"' not in sent


@pytest.mark.parametrize("change", ["shrinks", "grows"])
def test_a_file_that_changes_size_while_it_is_sent_stops_its_request(tmp_path, change):
    """The request's Content-Length counts on each file's size when it was opened: a file that shrinks
    while it is sent left the API, and the command, waiting for bytes that never came (up to 10 minutes);
    one that grows sent a body the API could not parse ("no files"). Either now raises Changed, which
    closes the request's connection, and `clapq upload` sends the batch again without that file."""
    from clapq.client import Changed, multipart_body

    f = tmp_path / "rec.wav"
    f.write_bytes(os.urandom(3 << 20))
    with multipart_body(tmp_path, [f]) as body:
        assert len(body) > 3 << 20
        body.read(1 << 20)
        with open(f, "r+b") as w:
            if change == "shrinks":
                w.truncate(2 << 20)
            else:
                w.seek(0, 2)
                w.write(b"more")
        with pytest.raises(Changed, match=f"rec.wav: it {dict(shrinks='shrank', grows='grew')[change]} while it "
                                          "was being sent"):
            while body.read(1 << 16):
                pass


def test_folders_and_files_that_cannot_be_read_are_said_not_tracebacks(tmp_path, tiny_model):
    """Run without root's right to read anything (setpriv drops it): a folder that cannot be entered is
    named among what was left out (rglob passed over it without a word), a file in it given by name, to
    upload or to search by, is a sentence and not a PermissionError traceback, and so is such a folder
    given as the one to upload."""
    bodies = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": [{"id": "i1", "filename": "a.wav"}]}, {}
        return 200, {"status": "done", "progress": 1.0, "errors": [],
                     "counts": {"done": 1, "failed": 0, "cancelled": 0, "total": 1}}, {}

    (tmp_path / "ok").mkdir()
    (tmp_path / "locked").mkdir()
    write(tmp_path / "ok" / "a.wav", 0.3)
    write(tmp_path / "locked" / "x.wav", 0.3, seed=1)
    (tmp_path / "locked").chmod(0)
    unprivileged = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                    "-dac_override,-dac_read_search", sys.executable, "-m", "clapq.cli"]
    try:
        with fake_api(answer, bodies) as url:
            def run(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run(unprivileged + [*args, "--library", "x", "--url", url, "--key", "cq_x"],
                                      env=_env(tiny_model), capture_output=True, text=True, timeout=60)

            p = run("upload", str(tmp_path))
            # the rest is sent, and the command fails: what it was asked to upload was not all looked at (it
            # exited 0, helper-42)
            assert p.returncode == 1 and json.loads(p.stdout)["unreadable"] == 1, (p.stdout, p.stderr)
            assert "left out, as they cannot be read: locked (Permission denied)" in p.stderr, p.stderr
            assert "1 folder or file could not be read (listed above): any audio in them was not sent" in \
                p.stderr.splitlines(), p.stderr
            assert [path for method, path, body in bodies if path.endswith("/batches")] == ["/v1/libraries/lib1/batches"]
            locked = tmp_path / "locked"
            for args in (("upload", str(locked / "x.wav")), ("search", "--like", str(locked / "x.wav")),
                         ("upload", str(locked))):
                p = run(*args)
                assert p.returncode in (1, 2) and "Traceback" not in p.stderr, (args, p.stderr)
                assert f"cannot read {args[-1]}: Permission denied" in p.stderr, (args, p.stderr)
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_hidden_folders_that_cannot_be_read_are_left_out_as_any_hidden_ones(start_api, new_key, tmp_path, tiny_model):
    """A drive a Mac has used keeps `.Trashes` and `.Spotlight-V100`, and a Linux desktop another user's
    `.Trash-1000`, which the user uploading cannot read: hidden folders, left out whatever they hold, were
    named as folders that cannot be read, "any audio in them was not sent", and the upload exited 1, at every
    run (helper-134). Not run as root, whom no mode stops (setpriv drops its right to read anything)."""
    base, key = start_api(), new_key()
    drive = tmp_path / "drive"
    (drive / "Music").mkdir(parents=True)
    write(drive / "Music" / "a.wav", 0.5, seed=1340)
    for hidden in (".Trash-1000", ".Spotlight-V100", ".fseventsd"):
        (drive / hidden).mkdir()
        write(drive / hidden / "x.wav", 0.3, seed=1341)
    (drive / ".Trash-1000").chmod(0)  # cannot be listed
    (drive / ".Spotlight-V100").chmod(0o444)  # listed, but its files cannot be looked at
    unprivileged = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                    "-dac_override,-dac_read_search", sys.executable, "-m", "clapq.cli"]
    try:
        p = subprocess.run(unprivileged + ["upload", str(drive), "--library", "drive", "--url", base, "--key", key,
                                           "--no-wait"], env=_env(tiny_model), capture_output=True, text=True,
                           timeout=300)
    finally:
        for hidden in (".Trash-1000", ".Spotlight-V100"):
            (drive / hidden).chmod(0o755)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert (summary["files"], summary["unreadable"], summary["not_sent"]) == (1, 0, 0), summary
    assert "cannot be read" not in p.stderr and "could not be read" not in p.stderr, p.stderr
    assert "left out 1 file with hidden names (starting with '.')" in p.stderr.splitlines(), p.stderr


def test_ctrl_d_at_the_delete_question_deletes_nothing(tiny_model):
    """`clapq delete --library x` at a terminal asks first; Ctrl-D (no answer) is "no", not an EOFError
    traceback."""
    import pty

    bodies = []

    def answer(method, path):
        return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 3}]}, {}

    main, tty = pty.openpty()
    try:
        with fake_api(answer, bodies) as url:
            p = subprocess.Popen([sys.executable, "-m", "clapq.cli", "delete", "--library", "x", "--url", url,
                                  "--key", "cq_x"], env=_env(tiny_model), stdin=tty, stdout=tty, stderr=tty)
            seen, deadline, asked = b"", time.monotonic() + 60, False
            while p.poll() is None or select.select([main], [], [], 0.2)[0]:  # all it writes, to its end
                assert time.monotonic() < deadline, seen
                if select.select([main], [], [], 0.2)[0]:
                    try:
                        seen += os.read(main, 4096)
                    except OSError:  # the terminal's other end is closed: all was read
                        break
                if b"[y/N]" in seen and not asked:  # the question; then Ctrl-D
                    os.write(main, b"\x04")
                    asked = True
            p.wait(30)
    finally:
        os.close(main)
        os.close(tty)
    out = seen.decode(errors="replace")
    assert asked and p.returncode == 1 and "nothing deleted" in out and "Traceback" not in out, out
    assert [method for method, path, body in bodies if method != "GET"] == []


def test_one_file_can_be_uploaded_without_its_folder(tmp_path, tiny_model):
    """`clapq upload FILE` sends that file alone (not the others beside it), under its own name, whatever
    its suffix; a path that does not exist is a sentence."""
    bodies = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": [{"id": "i1", "filename": "episode 12.take"}]}, {}
        if path.startswith("/v1/jobs/"):
            return 200, {"status": "done", "progress": 1.0, "counts": {"done": 1, "failed": 0, "total": 1}, "errors": []}, {}
        return 404, None, {}

    write(tmp_path / "other.wav", 0.5)
    one = tmp_path / "episode 12.take"
    one.write_bytes(write(tmp_path / "e.wav", 0.5, seed=3).read_bytes())
    with fake_api(answer, bodies) as url:
        p = _upload(one, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    sent = [b for m, path, b in bodies if path.endswith("/batches")]
    assert len(sent) == 1 and b'filename="episode 12.take"' in sent[0] and b"other.wav" not in sent[0], sent
    assert json.loads(out)["files"] == 1
    p = _upload(tmp_path / "nowhere.wav", "http://127.0.0.1:9", tiny_model)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.strip().endswith("nowhere.wav does not exist"), err


def test_a_broken_link_given_to_upload_or_search_is_said_a_broken_link(tmp_path, tiny_model):
    """`clapq upload take.wav` of a link whose file was moved (or on a drive not mounted) said "take.wav does not
    exist", of a name `ls` shows; a loop of links the same. Each now says what it is."""
    (tmp_path / "take.wav").symlink_to("moved/take.wav")
    (tmp_path / "a.wav").symlink_to("b.wav")
    (tmp_path / "b.wav").symlink_to("a.wav")

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", *args, "--library", "x", "--url", "http://127.0.0.1:9",
                              "--key", "cq_x"], env=_env(tiny_model), cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2, out.stderr
        return out.stderr.strip()

    said = "clapq: take.wav is a broken link: it points to moved/take.wav, which does not exist"
    assert run("upload", "take.wav") == said and run("search", "--like", "take.wav") == said
    assert run("upload", "a.wav") == "clapq: a.wav is a link that leads back to itself (a loop of links)"
    assert run("upload", "nowhere.wav") == "clapq: nowhere.wav does not exist"


def test_a_failed_file_names_its_copies_and_counts_them(tmp_path, tiny_model):
    """A file that failed, with a copy of its bytes in the same request and another in a later one: the
    failure is listed once (both jobs report the one item), with both copies named, and the summary
    counts three failed files."""
    requests_seen = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path == "/v1/limits":
            return 200, {"max_files_per_batch": 2}, {}
        if path.endswith("/batches"):
            requests_seen.append(path)
            if len(requests_seen) == 1:
                return 202, {"job_id": "job1", "items": [{"id": "i1", "filename": "a.wav"},
                                                         {"id": "i1", "filename": "b.wav", "duplicate_of": "i1"}]}, {}
            return 202, {"job_id": "job2", "items": [{"id": "i1", "filename": "c.wav", "duplicate_of": "i1"}]}, {}
        error = [{"item_id": "i1", "filename": "a.wav", "error": "not a readable audio file"}]
        if "/items" in path:
            return 200, {"items": [{"id": "i1", "filename": "a.wav", "status": "failed", **error[0]}],
                         "next_cursor": None}, {}
        n = 2 if path.startswith("/v1/jobs/job1") else 1  # a job counts each file it was sent, copies too
        return 200, {"status": "done_with_errors", "progress": 1.0, "counts": {"done": 0, "failed": n, "total": n},
                     "errors": error}, {}

    for name in ("a.wav", "b.wav", "c.wav"):
        (tmp_path / name).write_bytes(b"not audio, the same bytes")
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and len(requests_seen) == 2, err
    failures = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert failures == ["failed: a.wav (item i1): not a readable audio file (and 2 files with the same bytes: b.wav, "
                        "c.wav)"], err
    assert json.loads(out)["failed"] == 3 and json.loads(out)["duplicates"] == 2, out


def test_a_server_without_known_gets_every_file(tmp_path, tiny_model):
    """An older server answers 404 to /known: the command sends every file instead of stopping."""
    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 3}]}, {}
        if path.endswith("/known"):
            return 404, {"error": {"code": "not_found", "message": "not found", "status": 404}}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": []}, {}
        return 200, {"status": "done", "progress": 1.0, "counts": {"done": 2, "failed": 0, "total": 2}, "errors": []}, {}

    write(tmp_path / "a.wav", 0.5)
    write(tmp_path / "b.wav", 0.5, seed=1)
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and err.startswith("uploading 2 files ("), err
    assert json.loads(out)["skipped"] == 0


def test_files_held_but_not_embedded_yet_are_waited_for(tmp_path, tiny_model):
    """Run again while an earlier upload's files are still queued (its wait stopped with Ctrl-C): they are
    not sent again, and the command waits for the earlier job as well as its own, its failures included.
    A server that does not say which job holds them: the command says how many are not searchable yet."""
    import hashlib

    a = write(tmp_path / "a.wav", 0.5)
    write(tmp_path / "b.wav", 0.5, seed=1)
    held = hashlib.sha256(a.read_bytes()).hexdigest()
    polled, says_job, cancelled = [], [True], [False]

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 1}]}, {}
        if path.endswith("/known"):
            return 200, {"known": [held], "pending": [held],
                         **({"pending_jobs": {held: "job0"}, "pending_items": {held: "i0"}} if says_job[0] else {})}, {}
        if path.endswith("/batches"):
            return 202, {"job_id": "job1", "items": []}, {}
        job = path.split("/")[3].split("?")[0] if path.startswith("/v1/jobs/") else None
        polled.append(job)
        if job == "job0" and cancelled[0]:  # cancelled while it waited: one of its two files is this folder's
            if "/items" in path:
                return 200, {"items": [{"id": "i0", "filename": "x.wav", "status": "cancelled", "error": None},
                                       {"id": "i9", "filename": "other.wav", "status": "cancelled", "error": None}],
                             "next_cursor": None}, {}
            return 200, {"status": "cancelled", "progress": 1.0,
                         "counts": {"done": 0, "failed": 0, "cancelled": 2, "total": 2}, "errors": []}, {}
        if job == "job0":
            if "/items" in path:
                return 200, {"items": [{"id": "i0", "filename": "a.wav", "status": "failed",
                                        "error": "not a readable audio file"}], "next_cursor": None}, {}
            # the earlier job held a file of another folder too, which failed: not this command's to tell
            return 200, {"status": "done_with_errors", "progress": 1.0,
                         "counts": {"done": 0, "failed": 2, "total": 2},
                         "errors": [{"item_id": "i0", "filename": "x.wav", "error": "not a readable audio file"},
                                    {"item_id": "i9", "filename": "other.wav", "error": "empty"}]}, {}
        return 200, {"status": "done", "progress": 1.0, "counts": {"done": 1, "failed": 0, "total": 1}, "errors": []}, {}

    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.startswith("uploading 1 file ("), err
    assert ("1 of 2 files is in the library already (1 of them still being embedded, in job job0 of an earlier "
            "upload: waiting for it too)") in err, err
    assert "3/3 files processed" in err and "failed: a.wav (item i0): not a readable audio file" in err, err
    assert "other.wav" not in err and json.loads(out)["failed"] == 1, (err, out)
    assert {"job0", "job1"} <= set(polled) and json.loads(out)["earlier_jobs"] == ["job0"], (polled, out)
    cancelled[0] = True
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "cancelled: 1 file of job job0" in err and json.loads(out)["cancelled"] == 1, err
    says_job[0] = False
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "1 of 2 files is in the library already (1 of them not embedded yet" in err, err


def test_an_upload_cut_off_by_a_restart_sends_what_the_api_did_not_take(tmp_path, tiny_model):
    """The API restarts (`clapq up` starts a crashed one again) while a batch is on its way, and closes its
    connection unanswered: the command asks which of the files the library holds once it answers, and sends
    only the rest, where it stopped with 'run the same command again' (helper-57). A batch the API took before
    the cut is not sent twice: its job is waited for. A look-up cut off is asked again. A batch cut off at
    every try (a proxy's lower size limit) stops the command after MAX_CUTS more."""
    import hashlib

    from clapq.client import MAX_CUTS

    a, b = write(tmp_path / "a.wav", 0.5), write(tmp_path / "b.wav", 0.5, seed=1)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    posts, knowns, took = [], [], {"first": False, "always_cut": False}

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 1}]}, {}
        if path == "/v1/limits":
            return 404, None, {}
        if path.endswith("/known"):
            knowns.append(path)
            if len(knowns) == 1:
                return "drop"  # a look-up cut off: asked again
            if len(knowns) > 2 and took["first"]:  # the cut batch was stored, its answer lost
                return 200, {"known": digests, "pending": digests, "pending_jobs": dict.fromkeys(digests, "job0"),
                             "pending_items": {d: f"i{n}" for n, d in enumerate(digests)}}, {}
            return 200, {"known": []}, {}
        if path.endswith("/batches"):
            posts.append(path)
            if len(posts) == 1 or took["always_cut"]:
                return "drop"
            return 202, {"job_id": "job1", "items": [{"id": "i0", "status": "queued"},
                                                     {"id": "i1", "status": "queued"}]}, {}
        return 200, {"status": "done", "progress": 1.0, "counts": {"done": 2, "failed": 0, "total": 2}, "errors": []}, {}

    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert f"the connection to {url} was lost during POST /v1/libraries/lib1/known" in err, err
    assert (f"the connection to {url} was lost during POST /v1/libraries/lib1/batches (the API restarted" in err
            and "asking which of them the library holds, to send the rest" in err), err
    assert "uploading 2 files again (" in err and len(posts) == 2 and json.loads(out)["jobs"] == ["job1"], (err, out)
    # the API took the batch before the cut: nothing is sent twice, and its job is waited for
    posts.clear(), knowns.clear()
    took["first"] = True
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and len(posts) == 1, err
    # (this run's job, not an earlier run's: its files were said to be "in the library already", helper-148)
    got = json.loads(out)
    assert (got["jobs"], got["earlier_jobs"], got["skipped"]) == (["job0"], [], 0) and "again (" not in err, (err, out)
    assert "the API stored 2 files before the connection was cut (job job0): not sent again" in err.splitlines(), err
    # cut off at every try: stops, saying how to go on
    posts.clear(), knowns.clear()
    took.update(first=False, always_cut=True)
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=90)
    assert p.returncode == 1 and len(posts) == MAX_CUTS + 1 and out == "", err
    assert err.rstrip().splitlines()[-1].endswith("while it was being sent): Remote end closed connection without "
                                                  "response"), err


def test_ctrl_c_says_what_was_uploaded_and_how_to_resume(tmp_path, tiny_model):
    """Ctrl-C while the second request is on its way: no traceback, the first request's job is named with
    how to resume, exit 130. Ctrl-C while waiting for the jobs: they go on, and the command says so."""
    import threading

    posted, second, polled = threading.Event(), threading.Event(), threading.Event()

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path == "/v1/limits" or path.endswith("/known"):
            return 404, None, {}
        if method == "GET":  # a job, never finished
            polled.set()
            return 200, {"status": "running", "progress": 0.0, "counts": {"done": 0, "failed": 0, "total": 1}, "errors": []}, {}
        if posted.is_set():  # the second upload request: never answered
            second.set()
            return None
        posted.set()
        return 202, {"job_id": "job1", "items": []}, {}

    def interrupted(folder: Path, when: threading.Event) -> tuple[int, str]:
        p = _upload(folder, url, tiny_model)
        try:
            assert when.wait(60)
            time.sleep(0.5)  # into the next request (or the wait between polls)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
        return p.returncode, err

    with fake_api(answer) as url:
        two = tmp_path / "two requests"
        two.mkdir()
        clip = write(two / "c000.wav", 0.05, 8_000).read_bytes()
        for i in range(1, 129):  # 129 files: 128 in the first request, 1 in the second
            (two / f"c{i:03d}.wav").write_bytes(clip + bytes([i]))
        # once the second request has come (set at the first's, the signal could reach a loaded client before
        # that request's answer: "interrupted while sending 128 files")
        rc, err = interrupted(two, second)
        assert rc == 130 and "Traceback" not in err, err
        assert ("clapq: interrupted; 128 of 129 files were uploaded (jobs job1); the 1 file being sent when it "
                "stopped may be stored as well; run the same command again") in err, err
        one = tmp_path / "one request"
        one.mkdir()
        write(one / "a.wav", 0.5)
        posted.clear()
        rc, err = interrupted(one, polled)
        assert rc == 130 and "Traceback" not in err, err
        assert "clapq: stopped waiting; the uploaded files are still being embedded (jobs job1" in err, err


def test_ctrl_c_after_many_requests_names_some_jobs_not_all(tmp_path, tiny_model):
    """Ctrl-C after many upload requests: the line that says what is in names ten of the jobs and how many
    more, as the other lines that name jobs do. It named every one: at 128 files a request, a folder of 50,000
    files interrupted halfway printed one line of 200 job ids, 7,500 characters (helper-65)."""
    import threading

    posted = threading.Event()
    posts: list[str] = []

    def answer(method, path):
        if path == "/v1/limits":
            return 200, {"max_files_per_batch": 1}, {}
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path.endswith("/known"):
            return 200, {"known": [], "pending": []}, {}
        if len(posts) == 12:  # the 13th request: never answered
            posted.set()
            return None
        posts.append(path)
        return 202, {"job_id": f"job{len(posts)}", "items": [{"id": f"i{len(posts)}", "filename": "c.wav"}]}, {}

    clip = write(tmp_path / "c00.wav", 0.05, 8_000).read_bytes()
    for i in range(1, 14):
        (tmp_path / f"c{i:02d}.wav").write_bytes(clip + bytes([i]))
    with fake_api(answer) as url:
        p = _upload(tmp_path, url, tiny_model)
        try:
            assert posted.wait(60)
            time.sleep(0.5)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err
    named = ", ".join(f"job{i}" for i in range(1, 11))
    assert f"clapq: interrupted; 12 of 14 files were uploaded (jobs {named} and 2 more); the 1 file being sent" in err, err
    line = next(x for x in err.splitlines() if x.startswith("clapq: interrupted"))
    assert "job11" not in line and "job12" not in line, err


def test_ordinary_mishaps_are_sentences_not_tracebacks(tmp_path, tiny_model):
    """A key pasted with a curly quote; Ctrl-C while a search waits for its answer; a file of a later
    request deleted while the first request is sent: each ends with a sentence (and how to resume), and the
    deleted file is left out, named."""
    import threading

    posted = threading.Event()
    folder = tmp_path / "two requests"
    folder.mkdir()
    clip = write(folder / "c000.wav", 0.05, 8_000).read_bytes()
    for i in range(1, 129):  # 129 files: 128 in the first request, 1 in the second
        (folder / f"c{i:03d}.wav").write_bytes(clip + bytes([i]))

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}]}, {}
        if path == "/v1/limits" or path.endswith("/known"):
            return 404, None, {}
        if path.startswith("/v1/search"):
            posted.set()
            return None  # never answered
        if method == "POST":
            (folder / "c128.wav").unlink()  # the second request's file goes away meanwhile
            return 202, {"job_id": "job1", "items": []}, {}
        return 200, {"status": "done", "progress": 1.0, "counts": {"done": 128, "failed": 0, "total": 128}, "errors": []}, {}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url,
                              "--key", "cq_abc\u2019"], env=_env(tiny_model), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "the API key has characters no key has" in out.stderr, out.stderr
        p = subprocess.Popen([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url,
                              "--key", "cq_x"], env=_env(tiny_model), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            assert posted.wait(60)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            p.kill()
        assert p.returncode == 130 and "Traceback" not in err and "clapq: interrupted" in err, err
        p = _upload(folder, url, tiny_model)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1 and "Traceback" not in err, err
        # that file is named, and left out (it stopped the whole upload before)
        assert "not sent: c128.wav: gone since the upload began (removed or moved meanwhile)" in err, err
        assert "1 file not sent (listed above as 'not sent')" in err, err


def test_waiting_asks_about_one_job_at_a_time():
    """`clapq upload` waits by asking about every job once, then about the oldest that has not ended and one
    other, in turn (the next at once when one has): the API answers two requests a second however many jobs
    a folder made. A first job of long files that ends last no longer keeps the others at their first look."""
    from collections import Counter

    from clapq.client import Client, watch_jobs

    ends_after = {"j1": 3, "j2": 1, "j3": 2}  # the look at which each job has ended
    looks: Counter = Counter()

    def answer(method, path):
        job = path.rsplit("/", 1)[-1]
        looks[job] += 1
        ended = looks[job] >= ends_after[job]
        return 200, {"status": "done" if ended else "running", "errors": [], "progress": 1.0 if ended else 0.5,
                     "counts": {"done": int(ended), "failed": 0, "total": 1}}, {}

    seen = []
    with fake_api(answer) as url:
        states = watch_jobs(Client(url, "cq_x"), ["j1", "j2", "j3"],
                            lambda done, total, share: seen.append((done, total, round(share, 3))), poll_s=0.01)
    assert [s["status"] for s in states] == ["done"] * 3
    assert dict(looks) == ends_after  # j2 once; j3 once more after it ended, j1 at each look
    assert seen == [(1, 3, 0.667), (2, 3, 0.833), (3, 3, 1.0)]  # a running job's share counts
    # the first job ends last: the others' ends are seen while it runs (they were not looked at again)
    ends_after.update(j1=6, j2=2, j3=2)
    looks.clear()
    seen.clear()
    with fake_api(answer) as url:
        watch_jobs(Client(url, "cq_x"), ["j1", "j2", "j3"],
                   lambda done, total, share: seen.append((done, total, round(share, 3))), poll_s=0.01)
    assert (2, 3, 0.833) in seen[:4] and seen[-1] == (3, 3, 1.0), seen
    assert dict(looks) == ends_after, looks  # none asked about once it had ended


def test_waiting_on_many_jobs_shows_them_end_as_the_workers_go():
    """Forty jobs, which the workers end in the order they were sent, one for every second request the API
    answers: the files processed shown are never more than two jobs behind those done. Asking only in turn,
    one job a poll, each job was seen to end a whole round of the jobs after it did: at 128 files a
    request, a folder of 30,000 files showed "20%" for two minutes while half of it was done (helper-65)."""
    from clapq.client import Client, watch_jobs

    n, asked = 40, [0]

    def ended(k: int) -> bool:  # job k (from 1) ends at the API's (n + 2k)th answer
        return asked[0] >= n + 2 * k

    def answer(method, path):
        asked[0] += 1
        end = ended(int(path.rsplit("/j", 1)[-1]))
        return 200, {"status": "done" if end else "queued", "errors": [], "progress": float(end),
                     "counts": {"done": int(end), "failed": 0, "total": 1}}, {}

    lags = []
    with fake_api(answer) as url:
        watch_jobs(Client(url, "cq_x"), [f"j{k}" for k in range(1, n + 1)],
                   lambda done, total, share: lags.append(sum(map(ended, range(1, n + 1))) - done), poll_s=0.01)
    assert lags[-1] == 0 and max(lags) <= 2, lags
    assert asked[0] <= n + 3 * n, asked  # about two requests a poll, one more for each job as it ends


def test_waiting_for_an_earlier_runs_jobs_too_follows_the_oldest_first():
    """A run again of a folder whose first run was stopped halfway waits for its own jobs and for the first
    run's still embedding, which it lists after its own, while the workers end the first run's first: the files
    processed shown are never more than two jobs behind those done. Asked in the list's order, its own first job,
    queued behind the others, was the one asked about at each poll and the first run's in turn, one a poll:
    20,000 files stopped at 12,000 sent and run again showed "3184/15008 files processed (20%)" and "none of its
    files is being embedded" for minutes while thousands were (helper-138)."""
    from clapq.client import Client, watch_jobs

    n, asked = 40, [0]
    made = {f"j{k}": f"2026-12-07T19:{k:02d}:00.000000+00:00" for k in range(1, n + 1)}  # j1 the oldest

    def ended(k: int) -> bool:  # job k (from 1) ends at the API's (n + 2k)th answer: the oldest first
        return asked[0] >= n + 2 * k

    def answer(method, path):
        asked[0] += 1
        job = path.rsplit("/", 1)[-1]
        end = ended(int(job[1:]))
        return 200, {"status": "done" if end else "queued", "errors": [], "progress": float(end),
                     "counts": {"done": int(end), "failed": 0, "total": 1}, "created_at": made[job]}, {}

    lags = []
    listed = [f"j{k}" for k in range(n // 2 + 1, n + 1)] + [f"j{k}" for k in range(1, n // 2 + 1)]  # its own first
    with fake_api(answer) as url:
        states = watch_jobs(Client(url, "cq_x"), listed,
                            lambda done, total, share: lags.append(sum(map(ended, range(1, n + 1))) - done),
                            poll_s=0.01)
    assert [s["created_at"] for s in states] == [made[j] for j in listed]  # in the order asked for
    assert lags[-1] == 0 and max(lags) <= 2, lags
    assert asked[0] <= n + 3 * n, asked


def test_a_long_wait_writes_a_line_to_a_log_at_each_tenth_and_at_most_every_30_s(monkeypatch, capsys):
    """Waiting with its stderr not a terminal (a log), `clapq upload` writes a line of progress at each tenth
    of the work done, and at most once a LOG_EVERY_S as the count moves, and the last count at the end. It
    wrote one at each move of the count: a line a second, for hours, while a folder of thousands of files
    was embedded (helper-65). Time here is the polls' own (a second each), not the clock's."""
    import types

    from clapq import client as c

    looks = [0]
    clock = types.SimpleNamespace(t=0.0)
    monkeypatch.setattr(c, "time", types.SimpleNamespace(monotonic=lambda: clock.t, sleep=lambda s: setattr(
        clock, "t", clock.t + s)))

    def answer(method, path):  # 3 files embedded a second, 200 in all, the last a file that failed
        looks[0] += 1
        done = min(200, 3 * looks[0])
        return 200, {"status": "done_with_errors" if done == 200 else "running", "progress": done / 200,
                     "errors": [{"item_id": "i1", "filename": "x.wav", "error": "broken"}] if done == 200 else [],
                     "counts": {"done": done - (done == 200), "failed": int(done == 200), "total": 200}}, {}

    with fake_api(answer) as url:
        assert c._wait(c.Client(url, "cq_x"), ["j1"], [1000], {"i1": "a/x.wav"}, {}) == (1, 0, 0, 0)
    lines = [line for line in capsys.readouterr().err.splitlines() if "files processed" in line]
    assert lines[-1] == "200/200 files processed (100%)" and 10 <= len(lines) <= 14, lines
    assert [int(line.split("(")[1].split("%")[0]) // 10 for line in lines[:3]] == [0, 1, 2], lines


def test_a_library_deleted_while_the_upload_waits_is_said():
    """The library (and so its jobs) deleted from elsewhere while `clapq upload` waits: a sentence, where it
    was "GET /v1/jobs/<id> failed (404): job not found"."""
    from clapq.client import Client, watch_jobs

    looks = []

    def answer(method, path):
        looks.append(path)
        if len(looks) > 1:
            return 404, {"error": {"code": "not_found", "message": "job not found", "status": 404}}, {}
        return 200, {"status": "running", "errors": [], "progress": 0.5, "counts": {"done": 0, "failed": 0, "total": 1}}, {}

    with fake_api(answer) as url, pytest.raises(SystemExit) as ended:
        watch_jobs(Client(url, "cq_x"), ["j1"], poll_s=0.01)
    assert str(ended.value.code) == ("clapq: job j1 is gone: its library was deleted while the upload waited for it; "
                                     "nothing more to wait for")


def test_the_time_left_is_said_at_the_pace_so_far():
    """`clapq upload` says about how long is left (the API's per-job ETA was never shown), from its own
    first look: nothing before 10 s of pace or any share gained, nor at the end."""
    from clapq.client import time_left

    assert time_left(5, 0.1, 0.9) == "" and time_left(60, 0.0, 0.9) == "" and time_left(60, 0.5, 0.0) == ""
    assert time_left(20, 0.5, 0.5) == ", about 20 s left"
    assert time_left(60, 0.25, 0.75) == ", about 3 min left"
    assert time_left(600, 0.1, 0.9) == ", about 1 h 30 min left"
    # files that wait (for a worker of their model, for the sweeper) move nothing: the pace's few seconds
    # left would be said for minutes; once nothing has moved for a minute and longer than that, that is said
    assert time_left(300, 0.999, 0.001, still_s=30) == ", about 0 s left"
    assert time_left(300, 0.999, 0.001, still_s=150) == ", no progress for 2 min"
    assert time_left(600, 0.1, 0.9, still_s=120) == ", about 1 h 30 min left"  # a long file, heartbeats apart
    # nothing moved at all for minutes (a hung worker): said, where it said nothing (helper-54)
    assert time_left(180, 0.0, 1.0, still_s=180) == ", no progress for 3 min" and time_left(30, 0.0, 1.0, 30) == ""


def test_the_share_shown_weighs_jobs_by_the_bytes_sent():
    """A job of 100 short clips, done, and one of a single long recording, 40% embedded: by files the
    share would read 99.6%; by the bytes each job was sent (10 and 90 MB) it reads 46%."""
    from collections import Counter

    from clapq.client import Client, watch_jobs

    looks: Counter = Counter()

    def answer(method, path):
        job = path.rsplit("/", 1)[-1]
        looks[job] += 1
        if job == "clips":
            return 200, {"status": "done", "progress": 1.0, "errors": [],
                         "counts": {"done": 100, "failed": 0, "total": 100}}, {}
        ended = looks[job] >= 2
        return 200, {"status": "done" if ended else "running", "progress": 1.0 if ended else 0.4, "errors": [],
                     "counts": {"done": int(ended), "failed": 0, "total": 1}}, {}

    seen = []
    with fake_api(answer) as url:
        watch_jobs(Client(url, "cq_x"), ["clips", "long"], lambda done, total, share: seen.append((done, total, share)),
                   poll_s=0.01, weights=[10e6, 90e6])
    assert [(d, t, round(s, 3)) for d, t, s in seen] == [(100, 101, 0.46), (101, 101, 1.0)]
    # only an empty file sent, queued: 0 bytes to weigh by is not 100% done (it read "0/1 files processed (100%)")
    looks.clear()
    seen.clear()
    with fake_api(answer) as url:
        watch_jobs(Client(url, "cq_x"), ["long"], lambda done, total, share: seen.append((done, total, share)),
                   poll_s=0.01, weights=[0])
    assert seen == [(0, 1, 0.4), (1, 1, 1.0)], seen


def test_an_api_that_goes_away_for_a_while_is_waited_for(monkeypatch, capsys):
    """While a command waits on its jobs, the API answers 503 (its database is down), then a proxy's 502
    page, then closes the connection unanswered: the command says so and asks again as told. An API that answered once and then stops answering
    (a restart) is asked again until it is back, and given up on after OUTAGE_WAIT_S with a sentence."""
    import threading

    from clapq import client as c
    from clapq.client import Client, watch_jobs

    answers = iter([
        (503, {"error": {"code": "database_unavailable", "status": 503,
                         "message": "the database is not answering (down, restarting or overloaded); try again"
                                    " in 5 s"}}, {"Retry-After": "1"}),
        (502, None, {"Retry-After": "1"}),
        "drop",
        (200, {"status": "done", "progress": 1.0, "counts": {"done": 1, "failed": 0, "total": 1}, "errors": []}, {}),
    ])
    done = {"status": "done", "progress": 1.0, "counts": {"done": 1, "failed": 0, "total": 1}, "errors": []}
    with fake_api(lambda method, path: next(answers)) as url:
        api = Client(url, "cq_x")
        assert watch_jobs(api, ["j1"], poll_s=0.01)[0]["status"] == "done"  # the third answer
    err = capsys.readouterr().err
    assert ("GET /v1/jobs/j1: the API is unavailable for now (the database is not answering (down, restarting "
            "or overloaded); try again in 5 s); trying again in 1 s") in err, err
    assert "the API is unavailable for now (502 Bad Gateway); trying again in 1 s" in err, err
    assert f"the connection to {url} was lost during GET /v1/jobs/j1 (" in err, err
    # the API is gone (a restart) and back on the same port a moment later
    port = int(url.rsplit(":", 1)[1])
    back = threading.Event()

    def restart():
        time.sleep(2)
        with fake_api(lambda method, path: (200, done, {}), port=port):
            back.set()
            time.sleep(30)

    threading.Thread(target=restart, daemon=True).start()
    assert api.call("GET", "/v1/jobs/j1")["status"] == "done" and back.is_set()
    assert f"clapq: the API at {url} stopped answering" in capsys.readouterr().err
    # gone for longer than the command waits: a sentence, not a traceback
    monkeypatch.setattr(c, "OUTAGE_WAIT_S", 3)
    api.url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as gone:
        api.call("GET", "/v1/jobs/j1")
    assert "stopped answering" in str(gone.value.code) and "gave up after trying for 0.05 minutes" in str(gone.value.code)


def test_a_busy_api_is_waited_for_and_a_library_made_meanwhile_is_used(tmp_path, tiny_model):
    """The API's backlog is full (429, Retry-After): the command waits as asked and sends the same files
    again instead of stopping. The library was created by another upload between the look and the
    create (409): it is looked up again and used. Names are compared without surrounding spaces, as the
    API stores them. Hidden files are left out, and said to be."""
    looks, posts = [], []

    def answer(method, path):
        if path == "/v1/libraries" and method == "GET":
            looks.append(path)
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 0}] if len(looks) > 1 else []}, {}
        if path == "/v1/libraries":
            return 409, {"error": {"code": "conflict", "message": "a library named 'x' already exists",
                                   "status": 409}}, {}
        if path == "/v1/limits":
            return 404, None, {}
        if path.endswith("/batches"):
            posts.append(path)
            if len(posts) == 1:
                return 429, {"error": {"code": "busy", "message": "9 files are waiting", "status": 429}}, \
                    {"Retry-After": "1"}
            return 202, {"job_id": "job1", "items": []}, {}
        return 200, {"status": "done", "progress": 1.0, "counts": {"done": 1, "failed": 0, "total": 1}, "errors": []}, {}

    write(tmp_path / "a.wav", 0.5)
    write(tmp_path / "._a.wav", 0.1)  # macOS's resource fork beside a copied file
    (tmp_path / ".trash").mkdir()
    write(tmp_path / ".trash" / "old.wav", 0.1)
    for name in ("cover.jpg", "notes.txt", "notes2.txt"):
        (tmp_path / name).write_text("not audio")
    bodies: list = []
    with fake_api(answer, bodies) as url:
        p = _upload(tmp_path, url, tiny_model, library="  x ")
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "left out 2 files with hidden names (starting with '.')" in err, err
    assert "left out 3 files not named as audio (.txt ×2, .jpg)" in err, err
    assert "the API is busy (9 files are waiting); trying again in 1 s" in err, err
    assert len(posts) == 2 and len(looks) == 2
    sent = [b for m, path, b in bodies if path.endswith("/batches")]
    unbound = [b.replace(b.split(b"\r\n", 1)[0], b"") for b in sent]  # each request has its own boundary
    assert unbound[0] == unbound[1] and b'filename="a.wav"' in sent[1] and b"._a.wav" not in sent[1]


def test_a_library_is_found_however_its_accents_are_written(tmp_path):
    """`--library Café` finds the library whether the name was typed (NFC) or taken from a macOS folder
    name (NFD), including one stored before the API normalised names; an exact match comes first."""
    from clapq.client import Client

    libs = [{"id": "lib1", "name": "Cafe\u0301"}, {"id": "lib2", "name": "F\u00eate"}, {"id": "lib3", "name": "Fe\u0302te"}]

    def answer(method, path):
        return (200, {"libraries": libs}, {}) if (method, path) == ("GET", "/v1/libraries") else (500, None, {})

    with fake_api(answer) as url:
        c = Client(url, "cq_x")
        assert c.library("Caf\u00e9", create=False)["id"] == "lib1"
        assert c.library(" Cafe\u0301 ", create=False)["id"] == "lib1"
        assert c.library("F\u00eate", create=False)["id"] == "lib2"  # NFC; lib3 is its old NFD twin
        with pytest.raises(SystemExit, match="no library named 'Cafe'"):
            c.library("Cafe", create=False)


def test_a_stored_path_that_cannot_be_looked_at_is_not_taken_as_renamed(tmp_path):
    """Only "no such file" says a file sent from this folder is gone from it: a stored name too long for the
    file system (a name of undecodable bytes, each kept as a 3-byte U+FFFD) stopped the whole upload with
    "cannot read", on every run (helper-37)."""
    from clapq.client import _gone

    (tmp_path / "here.wav").write_bytes(b"x")
    assert _gone(tmp_path, "gone.wav") and _gone(tmp_path, "here.wav/below.wav")
    assert not _gone(tmp_path, "here.wav")
    assert not _gone(tmp_path, "\ufffd" * 90 + ".wav")  # 274 bytes: ENAMETOOLONG
    assert not _gone(tmp_path, "nul\0.wav")


def test_names_with_control_characters_print_on_one_line():
    """A file named with a newline, a tab or an escape sequence is printed (search results, failed files) on
    its one line, its control characters written as in a Python string; other names as they are."""
    from clapq.client import printable, shown_name

    assert shown_name({"filename": "x.wav", "metadata": {"path": "sub/new\nline.wav"}}) == "sub/new\\nline.wav"
    assert printable("a\tb\x1b[31m.wav") == "a\\tb\\x1b[31m.wav"
    assert shown_name({"filename": "été 🎵 x.wav", "metadata": {}}) == "été 🎵 x.wav"
    # joiners are part of a name: an emoji family, a Persian word (they were written \u200d, helper-42); a
    # direction override is not, here or in the name the API keeps
    from api.uploads import display_name
    from clapq.client import _megabytes

    for name in ("👨\u200d👩\u200d👧.wav", "می\u200cخواهم.wav"):
        assert printable(name) == name and display_name(name) == name
    assert printable("\u202egpj.wav") == "\\u202egpj.wav" and display_name("\u202egpj.wav") == "gpj.wav"
    assert printable(os.fsdecode(b"caf\xe9.wav")) == "caf\\xe9.wav"  # the byte, not "\udce9"
    # sizes: a small upload is not "0.0 MB"
    assert [_megabytes(n) for n in (0, 5, 999, 1000, 40_000, 1_700_000, 2_300_000_000)] == \
        ["0 bytes", "5 bytes", "999 bytes", "1 kB", "40 kB", "1.7 MB", "2,300.0 MB"]


def test_a_library_named_as_another_ones_id_is_the_one_meant():
    """`--library X` where one library is named X and another's id is X: the one named X (a `delete --yes`
    of the other would remove the wrong files); an id still finds its library where no name matches."""
    from clapq.client import Client

    libs = [{"id": "5f1c0000-0000-4000-8000-000000000001", "name": "sfx", "item_count": 85},
            {"id": "5f1c0000-0000-4000-8000-000000000002", "name": "5f1c0000-0000-4000-8000-000000000001",
             "item_count": 0}]
    with fake_api(lambda method, path: (200, {"libraries": libs}, {})) as url:
        client = Client(url, "cq_x")
        assert client.library(libs[0]["id"], create=False)["id"] == libs[1]["id"]
        assert client.library(libs[1]["id"], create=False)["name"] == libs[1]["name"]
        assert client.library(" sfx ", create=False)["id"] == libs[0]["id"]
        # an id pasted in capitals, in braces or without hyphens is the same id
        assert client.library(libs[1]["id"].upper().replace("5F1C", "5f1C"), create=False)["id"] == libs[1]["id"]
        assert client.library("{%s}" % libs[1]["id"].replace("-", ""))["id"] == libs[1]["id"]
        # an id none of the caller's libraries has (another tenant's, a typo) is said as such, for a search
        # and for an upload: it advised creating a library named as the id, which the API refuses (helper-39)
        for create in (False, True):
            with pytest.raises(SystemExit) as said:
                client.library("00000000-0000-0000-0000-000000000000", create=create)
            assert str(said.value.code) == ("clapq: none of your libraries has the id 00000000-0000-0000-0000-"
                                            "000000000000 (libraries: 'sfx', '5f1c0000-0000-4000-8000-000000000001'"
                                            "); give a library's name or the id its creation printed"), said.value


def test_an_item_named_twice_is_deleted_once(tiny_model):
    """`clapq delete ID ID`: the id sent once, and no "no item" for the second (it deleted, then said the id
    named nothing, and failed); so too against a server older than /deletions, a DELETE a file."""
    item = {"id": "5f1c0000-0000-4000-8000-0000000000a1", "library_id": "lib1", "filename": "a.wav", "metadata": {}}
    for older in (False, True):
        bodies = []

        def answer(method, path):
            if path == "/v1/libraries":
                return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 1}]}, {}
            if path.endswith("/deletions"):
                if older:
                    return 404, {"error": {"code": "not_found", "message": "no endpoint", "status": 404}}, {}
                return 200, {"deleted": {"items": 1, "stored_files": 1, "files": [
                    {"id": item["id"], "filename": "a.wav", "path": None}]}, "not_found": []}, {}
            return 200, item if method == "GET" else {"deleted": {"item": item["id"], "items": 1, "stored_files": 1}}, {}

        with fake_api(answer, bodies) as url:
            p = subprocess.run([sys.executable, "-m", "clapq.cli", "delete", item["id"], item["id"].upper(), "--library",
                                "x", "--url", url, "--key", "cq_x"], env=_env(tiny_model), capture_output=True,
                               text=True, timeout=60)
        assert p.returncode == 0 and p.stdout == f"deleted a.wav ({item['id']})\n", (p.stdout, p.stderr)
        sent = [(m, path, json.loads(body)) for m, path, body in bodies if m == "POST"]
        assert sent == [("POST", "/v1/libraries/lib1/deletions", {"item_ids": [item["id"]]})], bodies
        assert [m for m, path, body in bodies if m == "DELETE"] == ["DELETE"] * older
    # a library given as nothing is said before anything is asked
    for blank in ("", "   "):
        p = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", ".", "--library", blank, "--url",
                            "http://127.0.0.1:9"], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "argument --library: give a library name or id" in p.stderr, p.stderr


def test_files_gone_from_a_folder_are_deleted_on_a_server_older_than_deletions(tiny_model, tmp_path):
    """A server without POST /deletions (404) gets a DELETE a file, as before, and no GET: the files come from
    the library's own listing."""
    from clapq.client import folder_id

    folder = tmp_path / "f"
    folder.mkdir()
    kept = write(folder / "kept.wav", 0.5, seed=91)
    gone = "5f1c0000-0000-4000-8000-0000000000b1"
    # kept.wav's item holds its bytes (an item of other bytes at its path is an earlier version, deleted)
    listed = [{"id": i, "library_id": "lib1", "filename": name, "size_bytes": size, "sha256": sha,
               "metadata": {"path": name, "folder": folder_id(folder)}}
              for i, name, size, sha in ((gone, "gone.wav", 1, "a" * 64), ("5f1c0000-0000-4000-8000-0000000000b2",
                                         "kept.wav", kept.stat().st_size, file_sha256(kept)))]
    bodies: list = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 2}]}, {}
        if path.startswith("/v1/libraries/lib1/items"):
            return 200, {"items": listed, "next_cursor": None}, {}
        if method == "DELETE" and path == f"/v1/items/{gone}":
            return 200, {"deleted": {"item": gone, "items": 1, "stored_files": 1}}, {}
        return 404, {"error": {"code": "not_found", "message": "no endpoint", "status": 404}}, {}

    with fake_api(answer, bodies) as url:
        p = subprocess.run([sys.executable, "-m", "clapq.cli", "delete", "--gone-from", str(folder), "--yes",
                            "--library", "x", "--url", url, "--key", "cq_x"], env=_env(tiny_model),
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == f"deleted gone.wav ({gone})\n", (p.stdout, p.stderr)
    assert [(m, path) for m, path, _ in bodies if not path.startswith("/v1/libraries?")
            and path != "/v1/libraries" and not path.startswith("/v1/libraries/lib1/items")] == [
        ("POST", "/v1/libraries/lib1/deletions"), ("DELETE", f"/v1/items/{gone}")], bodies


def test_a_library_created_beside_one_of_a_close_name_says_so(start_api, new_key, capsys):
    """`clapq upload DIR --library feild` beside a library "field" made a second library and sent the whole
    folder into it, said only as "created library 'feild'" (helper-108): it now names the library of the close
    name. A name far from every one is said as before."""
    from clapq.client import Client

    base, key = start_api(), new_key()
    for name in ("field", "podcasts"):
        assert requests.post(f"{base}/v1/libraries", json={"name": name}, headers={"Authorization": f"Bearer {key}"},
                             timeout=30).status_code == 201
    assert Client(base, key).library("feild")["name"] == "feild"
    assert capsys.readouterr().err == "created library 'feild' (beside 'field', a name close to it: if you meant " \
        "that library, stop with Ctrl-C and give its name; `clapq delete --library feild --yes` removes this new one)\n"
    assert Client(base, key).library("rain")["name"] == "rain"
    assert capsys.readouterr().err == "created library 'rain'\n"
    assert Client(base, key).library("feild")["name"] == "feild"  # there now: found, nothing said
    assert capsys.readouterr().err == ""
    # several close names, two of them differing by case, are each named (two by case were one)
    for name in ("take1", "Take1", "take2"):
        assert requests.post(f"{base}/v1/libraries", json={"name": name}, headers={"Authorization": f"Bearer {key}"},
                             timeout=30).status_code == 201
    assert Client(base, key).library("take3")["name"] == "take3"
    assert capsys.readouterr().err == "created library 'take3' (beside 'take1', 'Take1', 'take2', names close to " \
        "it: if you meant one of those, stop with Ctrl-C and give its name; `clapq delete --library take3 --yes` " \
        "removes this new one)\n"


def test_a_library_created_is_said_and_so_is_one_named_alike(capsys):
    """A library created by an upload is said, and one whose name differs from an existing one's only by
    case says so: `--library Basic` beside "basic" is a second library, which went unsaid."""
    from clapq.client import Client

    libs = [{"id": "5f1c0000-0000-4000-8000-000000000001", "name": "basic", "item_count": 3}]

    def answer(method, path):
        if method == "POST":
            return 201, {"id": "5f1c0000-0000-4000-8000-000000000009", "name": "Basic"}, {}
        return 200, {"libraries": libs}, {}

    with fake_api(answer) as url:
        assert Client(url, "cq_x").library("Basic")["name"] == "Basic"
        assert capsys.readouterr().err == "created library 'Basic' (beside 'basic': names differ by case)\n"
        assert Client(url, "cq_x").library("other")["id"].endswith("9")
        assert capsys.readouterr().err == "created library 'other'\n"
        # looked up, not created (search, delete): the name in other capitals is offered
        with pytest.raises(SystemExit, match="no library named 'BASIC'; did you mean 'basic'"):
            Client(url, "cq_x").library("BASIC", create=False)


def test_names_a_multipart_form_cannot_carry_still_reach_the_api_with_their_paths(client, new_key, tmp_path):
    """File names with a line break, a backslash, "%22" or bytes that are not UTF-8: `clapq upload` sends
    a name the API reads back as sent, so the batch's 'metadata' finds every file (before, the API refused
    the batch, on every run) and each item keeps its real path."""
    real = ["new\nline.wav", "back\\slash.wav", "100%22.wav", 'q"uote.wav', "100% rain.wav",
            os.fsdecode(b"caf\xe9.wav"), "sub/tab\there.wav",
            "back_slash.wav", os.fsdecode(b"caf\xe8.wav")]  # the same names once sent as above: made distinct
    items, stored = _one_request_of(client, new_key(), tmp_path, real)
    assert stored == [n.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for n in real]
    assert [i["filename"] for i in items][:3] == ["new_line.wav", "back_slash.wav", "100_.wav"]
    assert "caf\ufffd.wav" in [i["filename"] for i in items] and "caf\ufffd~2.wav" in [i["filename"] for i in items]


def test_names_that_differ_only_in_how_their_accents_are_written_go_in_one_request(client, new_key, tmp_path):
    """"Café.wav" typed on Linux (NFC) beside "Café.wav" copied from a Mac (NFD, "e" + U+0301) are two files, whose
    names the API reads as one: the request holding both was refused (400 "'metadata' names 'Café.wav' twice"), and
    `clapq upload` stopped there, at every run, none of the folder's later files sent (helper-134). The second is
    sent as "Café~2.wav"; each item keeps its own path, as the folder spells it."""
    real = ["Caf\u00e9.wav", "Cafe\u0301.wav", "F\u00eate/a.wav", "Fe\u0302te/a.wav"]
    items, stored = _one_request_of(client, new_key(), tmp_path, real)
    assert [i["filename"] for i in items] == ["Caf\u00e9.wav", "Caf\u00e9~2.wav", "a.wav", "a~2.wav"], items
    assert stored == real, stored


def _one_request_of(client, key: str, folder: Path, names: list[str]) -> tuple[list[dict], list[str]]:
    """Files of these names (not audio) in `folder`, sent into a new library in one request as `clapq upload`
    builds it: the batch's items, and the path each keeps in its metadata."""
    from clapq import client as cli_client
    from tests.conftest import auth

    paths = []
    for i, name in enumerate(names):
        p = folder / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"RIFF not audio %d" % i)
        paths.append(p)
    lib = client.post("/v1/libraries", json={"name": "names"}, headers=auth(key)).get_json()["id"]
    with cli_client.multipart_body(folder, paths) as body:
        r = client.post(f"/v1/libraries/{lib}/batches", data=body.read(), content_type=body.content_type,
                        headers=auth(key))
    assert r.status_code == 202, r.get_json()
    items = r.get_json()["items"]
    return items, [client.get(f"/v1/items/{i['id']}", headers=auth(key)).get_json()["metadata"]["path"]
                   for i in items]


def test_a_path_update_never_overwrites_an_edit_made_meanwhile(start_api, new_key, worker, tmp_path):
    """`clapq upload` gave a renamed file its new path with a GET, then a PATCH of the whole metadata; an
    edit made between the two was overwritten (helper-37). Against a server without /moves it still does,
    and the PATCH carries the GET's ETag: it is refused (412), the item read again, and both changes kept.
    Through /moves (one statement) the path changes only where the item still has the path it had, and the
    rest of its metadata is never sent at all."""
    from clapq import client as cli_client

    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "edits"}, headers=h, timeout=30).json()["id"]
    root = cli_client.folder_id(tmp_path)
    with open(write(tmp_path / "a.wav", 0.5, seed=3), "rb") as f:
        sent = requests.post(f"{base}/v1/libraries/{lib}/batches", files={"files": ("a.wav", f)},
                             data={"metadata": json.dumps({"a.wav": {"path": "old/a.wav", "folder": root}})},
                             headers=h, timeout=60)
    assert sent.status_code == 202, sent.text
    item = sent.json()["items"][0]["id"]
    # embedded first: a worker finishing the item between the command's second GET and its PATCH changes the
    # ETag once more (a third read, correct, but not what this test counts)
    _wait_job(base, h, sent.json()["job_id"])
    c = cli_client.Client(base, key)
    read, tags = c.item, []

    def read_then_someone_edits(item_id):
        got = read(item_id)
        tags.append(got[1])
        if len(tags) == 1:  # a user tags the file between the command's GET and its PATCH
            assert requests.patch(f"{base}/v1/items/{item_id}", json={"metadata": {**got[0]["metadata"],
                                                                                   "mic": "zoom"}},
                                  headers=h, timeout=30).status_code == 200
        return got

    c.item = read_then_someone_edits
    assert cli_client._patch_paths(c, root, [(item, "old/a.wav", "a.wav", root)]) == {item}
    assert len(tags) == 2 and tags[0] and tags[0] != tags[1], tags
    assert requests.get(f"{base}/v1/items/{item}", headers=h, timeout=30).json()["metadata"] == {
        "path": "a.wav", "folder": root, "mic": "zoom"}

    # /moves: the item moved again, one whose path was changed since it was seen (by another run) left as it
    # is, an unknown id and one of another tenant's ignored; every other field of the metadata kept
    c.item = read
    with open(write(tmp_path / "b.wav", 0.5, seed=4), "rb") as f:
        sent = requests.post(f"{base}/v1/libraries/{lib}/batches", files={"files": ("b.wav", f)},
                             data={"metadata": json.dumps({"b.wav": {"path": "b.wav", "folder": root}})},
                             headers=h, timeout=60)
    other = sent.json()["items"][0]["id"]
    assert requests.patch(f"{base}/v1/items/{other}", json={"metadata": {"path": "elsewhere.wav", "folder": root}},
                          headers=h, timeout=30).status_code == 200
    assert cli_client._update_paths(c, lib, tmp_path, [(item, "a.wav", "sub/a.wav", root),
                                                       (other, "b.wav", "c.wav", root),
                                                       (str(uuid.uuid4()), "x.wav", "y.wav", root)]) == \
        (["a.wav -> sub/a.wav"], 0)
    assert requests.get(f"{base}/v1/items/{item}", headers=h, timeout=30).json()["metadata"] == {
        "path": "sub/a.wav", "folder": root, "mic": "zoom"}
    assert requests.get(f"{base}/v1/items/{other}", headers=h, timeout=30).json()["metadata"]["path"] == "elsewhere.wav"
    # an item whose folder is JSON null or a number counts as one without a folder (as /known lists it), and
    # `from` takes any text, "" too (a 400 for the whole request, at every run, helper-43); metadata that
    # would grow past 16 KiB is left, and said
    for kept, seen in ((None, None), (7, None), ("", ""), ("f" * 100, "f" * 100)):
        assert requests.patch(f"{base}/v1/items/{other}", json={"metadata": {"path": "x.wav", "folder": kept}},
                              headers=h, timeout=30).status_code == 200
        r = requests.post(f"{base}/v1/libraries/{lib}/moves", headers=h, timeout=30, json={"moves": [
            {"item_id": other, "from": {"path": "x.wav", "folder": seen}, "to": {"path": "x.wav", "folder": root}}]})
        assert r.status_code == 200 and r.json() == {"moved": [other], "too_large": []}, (kept, r.text)
        assert requests.get(f"{base}/v1/items/{other}", headers=h, timeout=30).json()["metadata"]["folder"] == root
    r = requests.post(f"{base}/v1/libraries/{lib}/moves", headers=h, timeout=30, json={"moves": [
        {"item_id": other, "from": {"path": "x.wav", "folder": None}, "to": {"path": "y.wav", "folder": root}}]})
    assert r.status_code == 200 and r.json() == {"moved": [], "too_large": []}, r.text
    assert requests.patch(f"{base}/v1/items/{other}", json={"metadata": {"path": "x.wav", "folder": root,
                                                                          "notes": "n" * 16_000}},
                          headers=h, timeout=30).status_code == 200
    r = requests.post(f"{base}/v1/libraries/{lib}/moves", headers=h, timeout=30, json={"moves": [
        {"item_id": other, "from": {"path": "x.wav", "folder": root}, "to": {"path": "y" * 400, "folder": root}}]})
    assert r.status_code == 200 and r.json() == {"moved": [], "too_large": [other]}, r.text
    stranger = {"Authorization": f"Bearer {new_key()}"}
    r = requests.post(f"{base}/v1/libraries/{lib}/moves", json={"moves": []}, headers=stranger, timeout=30)
    assert r.status_code == 404, r.text
    for body, said in (({"moves": [{"item_id": item, "from": {"path": "a"}, "to": {"path": "b", "folder": root}}]},
                        "move 0 is not one"),
                       ({"moves": [{"item_id": "x", "from": {"path": "a", "folder": None},
                                    "to": {"path": "b", "folder": root}}]}, "move 0: 'x' is not an item id"),
                       ({"moves": [], "dry_run": True}, "the JSON body has 'dry_run', which /moves does not take")):
        r = requests.post(f"{base}/v1/libraries/{lib}/moves", json=body, headers=h, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(said), r.text


def test_names_swapped_or_given_to_new_bytes_move_their_paths_and_odd_names_stay(start_api, new_key, tmp_path,
                                                                                  tiny_model):
    """Paths follow the bytes: two files that swapped names both move; a file renamed, and its old name
    given to a new recording, moves to its new name (the library had two items under the old name). A
    file whose name is not UTF-8 (stored with U+FFFD) and that is still there is not "renamed" onto a copy
    of it, as it was at every run (helper-42)."""
    base, key = start_api(), new_key()
    folder = tmp_path / "f"
    folder.mkdir()
    for i, name in enumerate(["a.wav", "b.wav", "take.wav", os.fsdecode(b"lat\xea.wav")]):
        (folder / name).write_bytes(write(tmp_path / "made.wav", 0.5, seed=20 + i).read_bytes())
    cmd = [sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "paths", "--url", base, "--key",
           key, "--no-wait"]
    out = subprocess.run(cmd, env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from clapq.blobs import file_sha256

    before = {file_sha256(p): p.name for p in folder.iterdir()}
    (folder / "a.wav").rename(folder / "t")
    (folder / "b.wav").rename(folder / "a.wav")
    (folder / "t").rename(folder / "b.wav")
    (folder / "take.wav").rename(folder / "take-1.wav")
    write(folder / "take.wav", 0.5, seed=40)  # a new recording under the old name
    shutil.copyfile(folder / os.fsdecode(b"lat\xea.wav"), folder / "A-copy.wav")
    out = subprocess.run(cmd, env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["renamed"] == 3, out.stdout + out.stderr
    h = {"Authorization": f"Bearer {key}"}
    lib = json.loads(out.stdout)["library_id"]
    items = requests.get(f"{base}/v1/libraries/{lib}/items", headers=h, timeout=30).json()["items"]
    paths = {i["sha256"]: i["metadata"]["path"] for i in items}
    now = {file_sha256(p): p.relative_to(folder).as_posix() for p in sorted(folder.iterdir())
           if p.name != "A-copy.wav"}
    assert paths == {sha: name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                     for sha, name in now.items()}, (paths, before)
    # and the name a download, classify and duplicates give follows the path (it stayed the first upload's,
    # helper-51)
    assert {i["filename"] for i in items} == {"a.wav", "b.wav", "take-1.wav", "take.wav", "lat\ufffd.wav"} and \
        all(i["filename"] == i["metadata"]["path"] for i in items), items
    # a copy of the folder, uploaded into the same library, takes nothing: its files stay the first folder's,
    # whose renames are still told (taking them flipped the items between the two at each run, helper-43)
    from clapq.client import folder_id

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    copied = [*cmd[:cmd.index(str(folder))], str(copy), *cmd[cmd.index(str(folder)) + 1:]]
    out = subprocess.run(copied, env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["renamed"] == 0, out.stdout + out.stderr
    assert "recorded this folder" not in out.stderr, out.stderr
    assert ("5 files at the same paths here were sent from another folder (this one before it was moved or "
            "renamed, or a copy of it): their renames here are not followed") in out.stderr, out.stderr
    (folder / "b.wav").rename(folder / "b2.wav")
    out = subprocess.run(cmd, env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["renamed"] == 1, out.stdout + out.stderr
    items = requests.get(f"{base}/v1/libraries/{lib}/items", headers=h, timeout=30).json()["items"]
    assert sorted(i["metadata"]["path"] for i in items if i["metadata"]["folder"] == folder_id(folder)) == \
        ["a.wav", "b2.wav", "lat\ufffd.wav", "take-1.wav", "take.wav"], items
    assert sorted(i["filename"] for i in items) == ["a.wav", "b2.wav", "lat\ufffd.wav", "take-1.wav", "take.wav"]


def _three_files_and_a_library(base: str, key: str, tmp_path: Path, monkeypatch, library: str, seed: int):
    """A client, and a folder of a.wav, b.wav and c.wav to upload into `library`, made already: not created by the
    upload, which hashes the files to ask which of them the library holds (digests kept under tmp_path)."""
    from clapq import client as c

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "f"
    folder.mkdir()
    for i, name in enumerate("abc"):
        write(folder / f"{name}.wav", 0.3, seed=seed + i)
    api = c.Client(base, key)
    api.library(library)
    return api, folder


def test_a_file_removed_while_the_upload_runs_is_said_gone_not_unreadable(start_api, new_key, tmp_path, monkeypatch,
                                                                         capsys):
    """A file removed (or moved away) after the folder was looked through, here while the real API was asked
    which files the library holds, was "not sent: b.wav: cannot be read (No such file or directory)", as if
    its permissions were to blame; it is said gone since the upload began. The rest is sent, and the command
    exits 1 (not all it found was sent), as before."""
    from clapq import client as c

    api, folder = _three_files_and_a_library(start_api(), new_key(), tmp_path, monkeypatch, "gone-meanwhile", 80)
    real = c.Client.call

    def call(self, method, path, *args, **kw):
        answer = real(self, method, path, *args, **kw)
        if path.endswith("/known") and (folder / "b.wav").exists():
            (folder / "b.wav").unlink()
        return answer

    monkeypatch.setattr(c.Client, "call", call)
    assert c.upload_folder(api, folder, "gone-meanwhile", wait=False) == 1
    out, err = capsys.readouterr()
    assert "not sent: b.wav: gone since the upload began (removed or moved meanwhile)" in err.splitlines(), err
    assert "cannot be read" not in err, err
    assert json.loads(out)["not_sent"] == 1 and "uploaded 2 files" in err, (out, err)


def test_a_file_replaced_by_a_pipe_while_the_upload_runs_is_named_not_waited_on(start_api, new_key, tmp_path,
                                                                                 monkeypatch, capsys):
    """A file replaced by a FIFO after the folder was listed (here while the library was looked up): `clapq
    upload` opened it to hash it, and then to send it, and waited for a writer for ever. It is named, not sent,
    and the rest is sent (exit 1, as for a file gone meanwhile). A watcher opens the pipe for writing where a
    reader waits on it (which lets that reader go on), and says so."""
    import threading

    from clapq import client as c

    api, folder = _three_files_and_a_library(start_api(), new_key(), tmp_path, monkeypatch, "piped", 420)
    real, pipe, done, waited = c.Client.call, folder / "b.wav", threading.Event(), []

    def call(self, method, path, *args, **kw):
        if path == "/v1/libraries" and pipe.is_file():
            pipe.unlink()
            os.mkfifo(pipe)
        return real(self, method, path, *args, **kw)

    def watch() -> None:
        while not done.wait(5):
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader has it open
            except OSError:
                continue
            waited.append(True)

    monkeypatch.setattr(c.Client, "call", call)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code = c.upload_folder(api, folder, "piped", wait=False)
    finally:
        done.set()
        watcher.join()
    out, err = capsys.readouterr()
    assert not waited, err
    assert code == 1 and "not sent: b.wav: no longer a file: a pipe, a device or a folder is in its place since it " \
        "was listed" in err.splitlines(), err
    assert json.loads(out)["not_sent"] == 1 and "uploaded 2 files" in err, (out, err)


def test_a_windows_drives_recycle_bin_and_system_folder_are_left_out(start_api, new_key, tmp_path, tiny_model):
    """A drive used on Windows, uploaded whole: its recycle bin's deleted files were sent into the library as
    the user's sounds, and Windows's record of each (named with the deleted file's extension) failed, exit 1.
    `$RECYCLE.BIN` and `System Volume Information` are left out, named, as hidden folders are, and so is a
    Synology share's recycle bin, `#recycle`."""
    base, key = start_api(), new_key()
    drive = tmp_path / "drive"
    bin_ = drive / "$RECYCLE.BIN" / "S-1-5-21-3623811015-3361044348-30300820-1013"
    for d in (drive / "Music", bin_, drive / "System Volume Information"):
        d.mkdir(parents=True)
    write(drive / "Music" / "song.wav", 0.3, seed=90)
    write(bin_ / "$R8K2Z1F.wav", 0.3, seed=91)  # a file deleted on Windows
    (bin_ / "$I8K2Z1F.wav").write_bytes(b"\x02" + bytes(543))  # Windows's record of it
    (drive / "System Volume Information" / "IndexerVolumeGuid").write_bytes(b"{x}")
    (drive / "Music" / "#recycle").mkdir()
    write(drive / "Music" / "#recycle" / "old take.wav", 0.3, seed=92)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(drive), "--library", "drive", "--url", base,
                          "--key", key, "--no-wait"], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["files"] == 1, out.stdout + out.stderr
    assert "left out the recycle bins, snapshots and system folders that Windows, macOS and NAS systems keep " \
        "(deleted files, earlier copies of the share, and their own data): $RECYCLE.BIN, Music/#recycle, System " \
        "Volume Information" in out.stderr.splitlines(), out.stderr
    assert "not named as audio" not in out.stderr, out.stderr  # the system folder's files are not looked at
    items = requests.get(f"{base}/v1/libraries/{json.loads(out.stdout)['library_id']}/items",
                         headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["items"]
    assert [i["metadata"]["path"] for i in items] == ["Music/song.wav"], items


def test_nas_snapshots_trash_and_index_folders_are_left_out(start_api, new_key, tmp_path, tiny_model):
    """A Synology or QNAP share, or a Mac's shared folder, uploaded whole over the network: its snapshots (an
    earlier copy of the whole share each), recycle bins, thumbnails and macOS's trash and files being written
    were sent as the user's sounds. They are left out, named (Synology's @eaDir, beside every folder, by its name
    and count); the user's own folders of ordinary names ("recycle", "Snapshots", "eaDir") are sent, and so are
    macOS's names that are plain words below the top, where a share has none: "Session/Temporary Items" was left
    out (helper-141)."""
    base, key = start_api(), new_key()
    share = tmp_path / "share"
    own = ["Music/song.wav", "Field/rain.wav", "recycle/r.wav", "Snapshots/s.wav", "eaDir/e.wav",
           "Temporary/t.wav", "Session/Temporary Items/take.wav", "Field/Network Trash Folder/n.wav"]
    system = ["#snapshot/GMT+00_2026-12-01-00-00/Music/old.wav", "#recycle/gone.wav", "Music/@eaDir/song.wav/x.wav",
              "Field/@eaDir/rain.wav/x.wav", "@Recently-Snapshot/GMT+00_2026-12-01_0000/Music/older.wav",
              "@Recycle/binned.wav", ".@__thumb/song.wav", "Network Trash Folder/trashed.wav",
              "Temporary Items/folders.501/copying.wav"]
    for i, rel in enumerate(own + system):
        (share / rel).parent.mkdir(parents=True, exist_ok=True)
        write(share / rel, 0.3, seed=300 + i)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(share), "--library", "share", "--url", base,
                          "--key", key, "--no-wait"], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["files"] == len(own), out.stdout + out.stderr
    assert "left out the recycle bins, snapshots and system folders that Windows, macOS and NAS systems keep " \
        "(deleted files, earlier copies of the share, and their own data): #recycle, #snapshot, @Recently-Snapshot, " \
        "@Recycle, Network Trash Folder, Temporary Items, @eaDir ×2" in out.stderr.splitlines(), out.stderr
    items = requests.get(f"{base}/v1/libraries/{json.loads(out.stdout)['library_id']}/items",
                         headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["items"]
    assert sorted(i["metadata"]["path"] for i in items) == sorted(own), items


def test_a_first_upload_refused_removes_the_library_it_created(start_api, new_key, tmp_path, tiny_model, monkeypatch,
                                                               capsys):
    """A first upload whose first request the API refuses (here its upload area full: a 507) left behind the
    library it created, listed by `clapq libraries` with 0 files. It is removed, saying so; one that another
    upload into the name (another terminal's, here through a server that takes files) put files into meanwhile
    is kept, and said so."""
    from clapq import client as c

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    full, key = start_api(CLAPQ_DISK_RESERVE_MB=str(1 << 30)), new_key()  # more than any disk has: all refused
    folder, other = tmp_path / "f", tmp_path / "other"
    for i, p in enumerate([folder / "a.wav", folder / "b.wav", other / "c.wav"]):
        p.parent.mkdir(exist_ok=True)
        write(p, 0.3, seed=400 + i)

    def names() -> dict[str, int]:
        libs = requests.get(f"{full}/v1/libraries", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
        return {lib["name"]: lib["item_count"] for lib in libs["libraries"]}

    out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "first", "--url", full,
                          "--key", key, "--no-wait"], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "failed (507)" in out.stderr, out.stdout + out.stderr
    assert "created library 'first'" in out.stderr.splitlines(), out.stderr
    assert "clapq: removed library 'first', which this upload created: nothing was uploaded into it" in \
        out.stderr.splitlines(), out.stderr
    assert "first" not in names()

    ok, api, real, raced = start_api(), c.Client(full, key), c.Client.call, []

    def call(self, method, path, *args, **kw):
        if self is api and path.endswith("/batches") and not raced:  # another upload into the name, meanwhile
            raced.append(c.upload_folder(c.Client(ok, key), other, "first", wait=False))
        return real(self, method, path, *args, **kw)

    monkeypatch.setattr(c.Client, "call", call)
    with pytest.raises(SystemExit) as stopped:
        c.upload_folder(api, folder, "first", wait=False)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and raced == [0] and "failed (507)" in err, err
    assert "clapq: kept library 'first', which this upload created: another upload put files into it meanwhile" in \
        err.splitlines(), err
    assert names()["first"] == 1


def test_deleting_a_large_library_says_so_before_it_is_sent(capsys):
    """`clapq delete --library L --yes` of a library of 19,000 files said nothing until the API answered (13 s, once
    72 s, in session 42's walk), as if it hung: it says "deleting library 'L' (N files)…" on stderr before its
    request, from SAY_DELETING files; a small library's deletion says only what was deleted."""
    from clapq import client as c

    said_before = []

    def answer(method, path):
        if method == "GET" and path.startswith("/v1/libraries"):
            return 200, {"libraries": [{"id": "0b1c2d3e-1111-2222-3333-444455556677", "name": "big",
                                        "item_count": 19_000},
                                       {"id": "0b1c2d3e-1111-2222-3333-444455556678", "name": "small",
                                        "item_count": 3}]}, {}
        if method == "DELETE":
            said_before.append(capsys.readouterr().err)
            n = 19_000 if path.endswith("677") else 3
            return 200, {"deleted": {"library": path.rsplit("/", 1)[1], "items": n, "stored_files": n}}, {}
        return 404, {"error": {"code": "not_found", "message": "not found", "status": 404}}, {}

    with fake_api(answer) as url:
        assert c.delete(c.Client(url, "cq_x"), "big", [], yes=True) == 0
        assert said_before == ["deleting library 'big' (19000 files)…\n"], said_before
        assert capsys.readouterr().out == "deleted library 'big': 19000 files\n"
        assert c.delete(c.Client(url, "cq_x"), "small", [], yes=True) == 0
        assert said_before[1:] == [""], said_before
        assert capsys.readouterr().out == "deleted library 'small': 3 files\n"


def test_a_created_library_not_removed_is_not_said_to_hold_nothing(capsys):
    """The removal of a library an upload created (`?if_empty=1`) that fails other than by a 409, here an API of an
    earlier version, which takes no if_empty (400): it said the library "holds nothing" and to delete it with
    `clapq delete --library NAME --yes`, where nothing had told whether it held anything (since e2b5c3b no look is
    made), and another upload into the name may have put files in it, which that command deletes."""
    from clapq import client as c

    lib = "0b1c2d3e-1111-2222-3333-444455556677"

    def answer(method, path):
        if method == "DELETE" and path == f"/v1/libraries/{lib}?if_empty=1":
            return 400, {"error": {"code": "bad_request", "status": 400, "message": "the query string has "
                                   "'if_empty', which DELETE /v1/libraries/<lib_id> does not take; it takes none"}}, {}
        return 404, {"error": {"code": "not_found", "message": "not found", "status": 404}}, {}

    with fake_api(answer) as url:
        c._remove_if_empty(c.Client(url, "cq_x"), {"id": lib, "name": "new one"})
    err = capsys.readouterr().err
    assert "holds nothing" not in err, err
    assert err.startswith("clapq: library 'new one', which this upload created, was not removed (clapq: DELETE "), err
    assert err.endswith(": nothing of this upload is in it, but another upload into the name may be: where `clapq "
                        "libraries` lists it with 0 files, `clapq delete --library 'new one' --yes` removes it\n"), err


def test_a_first_upload_whose_cut_request_was_stored_keeps_the_library_as_holding_its_own_files(
        start_api, new_key, tmp_path, tiny_model):
    """A first upload (it creates the library) whose first request's connection was cut after the API stored its
    files, and whose next request was refused (here a proxy's size limit, 413): its removal of the library it made
    found files in it and said "another upload put files into it meanwhile", where they were its own, from the cut
    request (helper-141). It knows them (asked after the cut which the library holds): the library is kept, said to
    hold them, and a run again sends the rest."""
    base, key = start_api(CLAPQ_MAX_FILES_PER_BATCH="1"), new_key()  # a request a file
    folder = tmp_path / "f"
    folder.mkdir()
    for i, name in enumerate(("a.wav", "b.wav")):
        write(folder / name, 0.3, seed=1410 + i)
    batches = []

    def decide(method, path, body):
        if method == "POST" and path.endswith("/batches"):
            batches.append(path)
            return "cut" if len(batches) == 1 else (413, "<html>413 Request Entity Too Large</html>",
                                                    {"Content-Type": "text/html"})
        return None

    env = _env(tiny_model, XDG_CACHE_HOME=str(tmp_path / "cache"))
    with _proxy(base, decide) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "first", "--url",
                              url, "--key", key, "--no-wait"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "failed (413)" in out.stderr and len(batches) == 2, out.stderr
    assert "another upload" not in out.stderr, out.stderr
    assert ("clapq: kept library 'first', which this upload created: it holds 1 file of this upload, which the API "
            "stored from a request whose connection was cut before its answer came; run the same command again for "
            "the rest: files the library holds already are not sent again") in out.stderr.splitlines(), out.stderr
    h = {"Authorization": f"Bearer {key}"}
    lib = next(x for x in requests.get(f"{base}/v1/libraries", headers=h, timeout=30).json()["libraries"]
               if x["name"] == "first")
    items = requests.get(f"{base}/v1/libraries/{lib['id']}/items", headers=h, timeout=30).json()["items"]
    assert [i["metadata"]["path"] for i in items] == ["a.wav"], items
    again = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "first", "--url",
                            base, "--key", key, "--no-wait"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["skipped"], json.loads(again.stdout)["jobs"] != []) == (1, True), again.stdout


def test_files_a_cut_request_stored_are_this_uploads_and_their_job_is_waited_for(start_api, new_key, env, tmp_path,
                                                                               tiny_model):
    """A request whose connection was cut after the API stored its files (its job made, its answer lost): the
    command asked which of them the library holds and sent the rest, but told the stored ones as "1 of 2 files is
    in the library already (... in job J of an earlier upload: waiting for it too): not sent again", `skipped` 1,
    as if an earlier run had sent them. They are this run's: uploaded, their job one of its `jobs`, and waited for.
    No worker takes the jobs (a Redis database of its own) until the command sends its second request, after it
    asked: the cut request's files are still queued then, in a job the command never heard of."""
    from tests.conftest import WorkerProcess

    own = {**env, "REDIS_URL": env["REDIS_URL"].rsplit("/", 1)[0] + "/11"}
    base, key = start_api(CLAPQ_MAX_FILES_PER_BATCH="1", REDIS_URL=own["REDIS_URL"]), new_key()  # a request a file
    folder = tmp_path / "f"
    folder.mkdir()
    for i, name in enumerate(("a.wav", "b.wav")):
        write(folder / name, 0.3, seed=1480 + i)
    batches, workers = [], []

    def decide(method, path, body):
        if method == "POST" and path.endswith("/batches"):
            batches.append(path)
            if len(batches) == 1:
                return "cut"
            workers.append(WorkerProcess(own, tmp_path / "worker.log").start())
        return None

    try:
        with _proxy(base, decide) as url:
            out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "cut",
                                  "--url", url, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                                 timeout=300)
    finally:
        for w in workers:
            w.stop()
    assert out.returncode == 0 and len(batches) == 2 and len(workers) == 1, out.stderr
    got = json.loads(out.stdout)
    assert (got["skipped"], len(got["jobs"]), got["earlier_jobs"]) == (0, 2, []), (got, out.stderr)
    assert "in the library already" not in out.stderr and "earlier upload" not in out.stderr, out.stderr
    cut_job, b_job = got["jobs"]
    lines = out.stderr.splitlines()
    assert f"the API stored 1 file before the connection was cut (job {cut_job}): not sent again" in lines, lines
    assert f"uploaded 1 file (job {b_job})" in lines, lines
    # the wait covered the cut request's job: both files are embedded once the command ends
    h = {"Authorization": f"Bearer {key}"}
    items = requests.get(f"{base}/v1/libraries/{got['library_id']}/items", headers=h, timeout=30).json()["items"]
    assert sorted((i["metadata"]["path"], i["status"], i["job_id"]) for i in items) == [
        ("a.wav", "done", cut_job), ("b.wav", "done", b_job)], items


def test_a_macos_appledouble_file_given_on_its_own_is_said_to_be_metadata(start_api, new_key, tmp_path, tiny_model):
    """`clapq upload ._x.flac`, the AppleDouble file a Mac writes beside x.flac on a drive it copies to (a folder's
    are left out, hidden), was sent and failed as "not a readable audio file (Invalid data found when processing
    input)". It is said to be macOS's metadata beside x.flac, not audio, and nothing is sent or created (exit 1).
    Told by its bytes: a file of such a name that is audio is sent, as any file given on its own."""
    base, key = start_api(), new_key()
    write(tmp_path / "x.flac", 0.3, seed=410)
    entries = b"\x00\x00\x00\x09\x00\x00\x00\x32\x00\x00\x0e\xb0" + b"\x00\x00\x00\x02\x00\x00\x0e\xe2\x00\x00\x01\x1e"
    header = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02" + entries
    (tmp_path / "._x.flac").write_bytes(header + b"ATTR" + bytes(4096 - len(header) - 4))
    write(tmp_path / "._y.wav", 0.3, seed=411)  # audio, named as macOS's metadata

    def upload(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(tmp_path / name), "--library", "mac",
                               "--url", base, "--key", key, "--no-wait"], env=_env(tiny_model), capture_output=True,
                              text=True, timeout=300)

    out = upload("._x.flac")
    assert out.returncode == 1 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        f"clapq: {tmp_path / '._x.flac'} is macOS metadata beside x.flac (an AppleDouble file: its Finder information "
        "and extended attributes, which a Mac writes beside each file it copies to a drive or share), not audio: "
        f"upload {tmp_path / 'x.flac'} itself; nothing was uploaded"], out.stderr
    libs = requests.get(f"{base}/v1/libraries", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert libs["libraries"] == [], libs
    out = upload("._y.wav")
    assert out.returncode == 0 and json.loads(out.stdout)["files"] == 1, out.stdout + out.stderr


def _uploaded_and_embedded(folder: Path, files: dict[str, bytes], base: str, key: str, tiny_model) -> list[dict]:
    """`clapq upload` of a folder of these files, waited for: its items, once it ends with all of them sent."""
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", folder.name, "--url",
                          base, "--key", key], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["files"] == len(files) and summary["failed"] == 0, out.stdout + out.stderr
    return requests.get(f"{base}/v1/libraries/{summary['library_id']}/items",
                        headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["items"]


def test_dsd_files_are_sent_and_embedded(start_api, new_key, worker, tmp_path, tiny_model):
    """A folder of DSD recordings (.dsf, .dff), which FFmpeg decodes, was "no audio files under ... (looked for
    ...)", every file "not named as audio": they are sent, and embedded."""
    from tests.make_audio import dsd_bytes

    items = _uploaded_and_embedded(tmp_path / "dsd", {"tone.dsf": dsd_bytes("dsf"),
                                                      "tone.dff": dsd_bytes("dff", freq=660.0)},
                                   start_api(), new_key(), tiny_model)
    assert sorted((i["filename"], i["format"], i["status"]) for i in items) == \
        [("tone.dff", "iff", "done"), ("tone.dsf", "dsf", "done")], items


def test_shorten_files_are_sent_and_embedded(start_api, new_key, worker, tmp_path, tiny_model):
    """A folder of Shorten files (.shn, lossless, common in old live-recording archives), which FFmpeg decodes, was
    "no audio files under ... (looked for ...)", every file "not named as audio": they are sent, and embedded."""
    from tests.make_audio import shn_bytes

    items = _uploaded_and_embedded(tmp_path / "shn", {"d1t01.shn": shn_bytes(), "d1t02.shn": shn_bytes(freq=660.0)},
                                   start_api(), new_key(), tiny_model)
    assert sorted((i["filename"], i["format"], i["sample_rate"], i["status"]) for i in items) == \
        [("d1t01.shn", "shn", 22_050, "done"), ("d1t02.shn", "shn", 22_050, "done")], items


def test_an_audacity_projects_blocks_are_not_sent_as_sounds(start_api, new_key, tmp_path, tiny_model):
    """An Audacity 2 project keeps its audio beside it, song.aup's in song_data/e00/d00/*.au, blocks of a few
    seconds each: a folder holding one sent them (thousands, for an hour's project) as sounds of their own. Such a
    folder is left out, named; a folder named so with no project beside it is sent as any other."""
    base, key = start_api(), new_key()
    folder = tmp_path / "f"
    blocks = folder / "proj" / "song_data" / "e00" / "d00"
    blocks.mkdir(parents=True)
    (folder / "proj" / "song.aup").write_text("<project/>")
    for i in range(3):
        write(blocks / f"e000000{i}.au", 0.3, seed=110 + i)
    write(folder / "keep.wav", 0.3, seed=113)
    (folder / "field_data").mkdir()
    write(folder / "field_data" / "wind.wav", 0.3, seed=114)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "aup", "--url", base,
                          "--key", key, "--no-wait"], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["files"] == 2, out.stdout + out.stderr
    assert "left out the data folders of Audacity projects (their audio in pieces of a few seconds each, not sounds " \
        "of their own: export a project to upload its sound): proj/song_data" in out.stderr.splitlines(), out.stderr
    items = requests.get(f"{base}/v1/libraries/{json.loads(out.stdout)['library_id']}/items",
                         headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["items"]
    assert sorted(i["metadata"]["path"] for i in items) == ["field_data/wind.wav", "keep.wav"], items


def test_a_folder_moved_away_while_it_is_uploaded_stops_the_upload(start_api, new_key, tmp_path, monkeypatch, capsys):
    """The folder itself moved away (or its drive unmounted) after its first request: each file left was said
    "not sent" on a line of its own, thousands of them, and the command went on to its end. It stops at the
    first, saying the folder is gone, what was uploaded and that running it again sends the rest."""
    from clapq import client as c

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base, key = start_api(CLAPQ_MAX_FILES_PER_BATCH="2"), new_key()
    folder = tmp_path / "f"
    folder.mkdir()
    for i, name in enumerate("abcdef"):
        write(folder / f"{name}.wav", 0.3, seed=100 + i)
    real = c.Client.call

    def call(self, method, path, *args, **kw):
        answer = real(self, method, path, *args, **kw)
        if path.endswith("/batches") and folder.exists():
            folder.rename(tmp_path / "away")
        return answer

    monkeypatch.setattr(c.Client, "call", call)
    with pytest.raises(SystemExit) as stopped:
        c.upload_folder(c.Client(base, key), folder, "moved-away", wait=False)
    out, err = capsys.readouterr()
    assert stopped.value.code == 1 and out == "", (out, err)
    assert f"clapq: {folder} is gone since the upload began (moved or renamed, or its drive unmounted): no more of " \
        "its files can be sent" in err.splitlines(), err
    assert "clapq: 2 of 6 files were uploaded (jobs " in err and "run the same command again for the rest" in err, err
    assert "not sent:" not in err, err
    # the request after the move is not said to be sent: it was "uploading 2 files (0 bytes)" just before the stop
    assert [line for line in err.splitlines() if line.startswith("uploading ")] == ["uploading 2 files (58 kB)"], err


def _folder_with_a_subfolder(tmp_path: Path, seed: int) -> Path:
    """tmp_path/f: a.wav and z.wav beside sub/ (b, c, e and deeper/d.wav), short clips, for the subfolder-gone tests."""
    folder = tmp_path / "f"
    (folder / "sub" / "deeper").mkdir(parents=True)
    for i, name in enumerate(["a.wav", "sub/b.wav", "sub/c.wav", "sub/deeper/d.wav", "sub/e.wav", "z.wav"]):
        write(folder / name, 0.3, seed=seed + i)
    return folder


def test_a_subfolder_moved_away_while_it_is_uploaded_is_one_line(start_api, new_key, tmp_path, monkeypatch, capsys):
    """A subfolder moved away (or removed) after the upload's first request: each of its files was "not sent" on a
    line of its own (thousands, for a folder of an album's worth), each after a request sent again without it,
    and its requests were "uploading 2 files (0 bytes)". It is one line for the subfolder, with its count of
    files; the rest is sent, and the command exits 1 (not all it found was sent)."""
    from clapq import client as c

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base, key = start_api(CLAPQ_MAX_FILES_PER_BATCH="2"), new_key()
    folder = _folder_with_a_subfolder(tmp_path, seed=120)
    real = c.Client.call

    def call(self, method, path, *args, **kw):
        answer = real(self, method, path, *args, **kw)
        if path.endswith("/batches") and (folder / "sub").exists():
            (folder / "sub").rename(tmp_path / "away")
        return answer

    monkeypatch.setattr(c.Client, "call", call)
    assert c.upload_folder(c.Client(base, key), folder, "sub-moved-away", wait=False) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("not sent:")] == \
        ["not sent: sub/: gone since the upload began (removed or moved meanwhile), its 3 files"], err
    assert "3 files not sent (listed above as 'not sent')" in lines, err
    # its files left in a request are not counted as sent, nor their 0 bytes
    assert [line for line in lines if line.startswith("uploading ")] == \
        ["uploading 2 files (58 kB)", "uploading 1 file (29 kB)"], err
    assert json.loads(out)["not_sent"] == 3, out
    items = requests.get(f"{base}/v1/libraries/{json.loads(out)['library_id']}/items",
                         headers={"Authorization": f"Bearer {key}"}, timeout=30).json()["items"]
    assert sorted(i["metadata"]["path"] for i in items) == ["a.wav", "sub/b.wav", "z.wav"], items


def test_a_subfolder_moved_away_as_its_request_is_made_is_one_line(start_api, new_key, tmp_path, monkeypatch, capsys):
    """The subfolder moved away after a request's files were looked at, before they were opened to be sent: each
    of its files in the request was left out on a line of its own, the request made again without each. All of
    them are left out at once, in the one line that counts its files, the rest of the request sent."""
    from clapq import client as c

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base, key = start_api(CLAPQ_MAX_FILES_PER_BATCH="4"), new_key()
    folder = _folder_with_a_subfolder(tmp_path, seed=130)
    real = c._present

    def present(*args):
        here = real(*args)
        if (folder / "sub").exists():
            (folder / "sub").rename(tmp_path / "away")
        return here

    monkeypatch.setattr(c, "_present", present)
    assert c.upload_folder(c.Client(base, key), folder, "sub-moved-as-sent", wait=False) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("not sent:")] == \
        ["not sent: sub/: gone since the upload began (removed or moved meanwhile), its 4 files"], err
    assert [line for line in lines if line.startswith("uploaded ")] == [
        f"uploaded 1 file (job {job})" for job in json.loads(out)["jobs"]], err
    assert json.loads(out)["not_sent"] == 4 and len(json.loads(out)["jobs"]) == 2, out


def test_files_gone_from_the_folder_are_deleted_on_request_and_renamed_ones_kept(start_api, new_key, tmp_path,
                                                                                   tiny_model):
    """Files deleted from a folder stay in the library, and their ids were to be found by hand (helper-57).
    `clapq delete --gone-from FOLDER` deletes the files sent from that folder that are no longer in it; one
    renamed or moved within it (not uploaded since) is kept, and so are other folders' files. A folder with no
    audio left (a drive not mounted) deletes nothing, and one nothing was sent from says so."""
    base, key = start_api(), new_key()
    folder, other, drive = tmp_path / "f", tmp_path / "g", tmp_path / "drive"
    for d in (folder / "sub", other, drive):
        d.mkdir(parents=True)
    for i, name in enumerate(["a.wav", "b.wav", "c.wav", "sub/d.wav", os.fsdecode(b"lat\xea.wav")]):
        (folder / name).write_bytes(write(tmp_path / "made.wav", 0.5, seed=60 + i).read_bytes())
    write(other / "a.wav", 0.5, seed=70)
    write(drive / "x.wav", 0.5, seed=71)

    def clapq(*args: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args, "--library", "gone", "--url", base, "--key",
                               key], env=_env(tiny_model), capture_output=True, text=True, timeout=300, stdin=stdin)

    for d in (folder, other, drive):
        assert clapq("upload", str(d), "--no-wait").returncode == 0
    (folder / "a.wav").unlink()
    (folder / "b.wav").rename(folder / "sub" / "b2.wav")  # moved, not uploaded since
    (drive / "x.wav").unlink()
    h = {"Authorization": f"Bearer {key}"}

    def paths() -> list:
        lib = requests.get(f"{base}/v1/libraries", headers=h, timeout=30).json()["libraries"][0]["id"]
        items = requests.get(f"{base}/v1/libraries/{lib}/items", headers=h, timeout=30).json()["items"]
        return sorted(i["metadata"]["path"] for i in items)

    every = ["a.wav", "a.wav", "b.wav", "c.wav", "lat\ufffd.wav", "sub/d.wav", "x.wav"]
    assert paths() == every
    out = clapq("delete", "--gone-from", str(folder))  # no terminal to ask at
    assert out.returncode == 1 and "delete 1 file of library 'gone' no longer in" in out.stderr and \
        "Deleting them needs --yes" in out.stderr, out.stderr
    assert paths() == every
    out = clapq("delete", "--gone-from", str(folder), "--yes")
    assert out.returncode == 0 and out.stdout.startswith("deleted a.wav (") and out.stdout.count("\n") == 1, out
    assert "1 file renamed or moved within" in out.stderr and "(b.wav); `clapq upload` updates" in out.stderr, out
    assert paths() == ["a.wav", "b.wav", "c.wav", "lat\ufffd.wav", "sub/d.wav", "x.wav"]
    out = clapq("delete", "--gone-from", str(folder), "--yes")
    assert out.returncode == 0 and out.stdout.startswith("nothing to delete: every file"), out
    out = clapq("delete", "--gone-from", str(drive), "--yes")
    assert out.returncode == 1 and "holds no audio files at all (a drive not mounted?)" in out.stderr, out.stderr
    assert len(paths()) == 6
    out = clapq("delete", "--gone-from", str(folder / "c.wav"))
    assert out.returncode == 1 and "is not a folder" in out.stderr, out.stderr
    # a folder within the one uploaded (or above it) sent nothing: it said "every file ... is still there"
    out = clapq("delete", "--gone-from", str(folder / "sub"), "--yes")
    assert out.returncode == 1 and f"no file of library 'gone' was sent from {folder / 'sub'}: --gone-from takes " \
        "the folder `clapq upload` was given" in out.stderr, out
    assert len(paths()) == 6
    out = clapq("delete", "5f1c0000-0000-4000-8000-0000000000a1", "--gone-from", str(folder))
    assert out.returncode == 1 and "not both" in out.stderr, out.stderr


def test_deleting_files_an_upload_sent_says_that_the_next_upload_sends_them_again(start_api, new_key, tmp_path,
                                                                                  tiny_model):
    """A take deleted as junk by its id (`clapq delete ID`), its file left in the folder: the next `clapq upload` of
    the folder sent it again ("uploading 1 file"), and it was back in the library, with nothing said at either end
    (helper-120). The deletion now says so of the files it deleted that `clapq upload` sent from a folder (their
    metadata.path), naming them; not of a file sent otherwise (the API, without a path)."""
    base, key = start_api(), new_key()
    folder = tmp_path / "takes"
    folder.mkdir()
    for i in range(3):
        write(folder / f"take {i}.wav", 0.5, seed=170 + i)
    clapq = _commands_at(base, key, tiny_model, library="takes")
    out = clapq("upload", str(folder), "--no-wait")
    assert out.returncode == 0, out
    h, lib = {"Authorization": f"Bearer {key}"}, json.loads(out.stdout)["library_id"]
    posted = requests.post(f"{base}/v1/libraries/{lib}/batches", headers=h, timeout=30,
                           files={"files": ("api.wav", write(tmp_path / "api.wav", 0.5, seed=175).read_bytes())})
    assert posted.status_code == 202, posted.text
    items = requests.get(f"{base}/v1/libraries/{lib}/items", headers=h, timeout=30).json()["items"]
    ids = {(i["metadata"] or {}).get("path", i["filename"]): i["id"] for i in items}
    out = clapq("delete", ids["take 1.wav"])
    assert out.returncode == 0 and out.stdout == f"deleted take 1.wav ({ids['take 1.wav']})\n", out
    assert out.stderr == "1 file deleted was sent by `clapq upload` from a folder: the next upload of that folder " \
        "sends it again where it is still there (delete or move it out of the folder too, to keep it out of the " \
        "library): take 1.wav\n", out.stderr
    out = clapq("delete", ids["take 0.wav"], ids["api.wav"], ids["take 2.wav"])
    assert out.returncode == 0 and out.stdout.count("deleted ") == 3, out
    assert out.stderr.startswith("2 files deleted were sent by `clapq upload` from a folder: the next upload of that "
                                 "folder sends them again where they are still there") and \
        out.stderr.endswith(": take 0.wav, take 2.wav\n"), out.stderr
    out = clapq("upload", str(folder), "--no-wait")  # what it said: they are back
    assert out.returncode == 0 and "uploading 3 files" in out.stderr, out.stderr


def test_thousands_of_files_gone_from_the_folder_are_deleted_a_thousand_a_request(start_api, new_key, settings,
                                                                                  tmp_path, tiny_model):
    """`clapq delete --gone-from` sent a DELETE a file: 500 files gone from a folder took 53 s (helper-73). It
    sends their ids to POST /v1/libraries/<id>/deletions, a thousand a request: 1,005 files gone are two
    requests (the server's access log counts them) and no DELETE, each file still said on stdout, and their
    number at the end; the file still in the folder, and another folder's, stay."""
    from sqlalchemy import select

    from clapq.client import folder_id
    from clapq.models import Item, Job, Library

    base, key = start_api(), new_key()
    folder = tmp_path / "many"
    folder.mkdir()
    write(folder / "kept.wav", 0.5, seed=90)
    h = {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "many"}, headers=h, timeout=30).json()["id"]
    with session_scope(settings.database_url) as s:  # as `clapq upload` records them, without the upload
        tenant = s.get(Library, lib).tenant_id
        job = Job(tenant_id=tenant, library_id=lib)
        s.add(job)
        s.flush()
        root = folder_id(folder)
        s.add_all([Item(tenant_id=tenant, library_id=lib, job_id=job.id, sha256=f"{n:064x}", filename=f"g{n}.wav",
                        size_bytes=1, status="done", meta={"path": f"sub/g{n:04d}.wav", "folder": root})
                   for n in range(1005)]
                  + [Item(tenant_id=tenant, library_id=lib, job_id=job.id, sha256=file_sha256(folder / "kept.wav"),
                          filename="kept.wav", size_bytes=(folder / "kept.wav").stat().st_size, status="done",
                          meta={"path": "kept.wav", "folder": root}),
                     Item(tenant_id=tenant, library_id=lib, job_id=job.id, sha256="e" * 64, filename="o.wav",
                          size_bytes=1, status="done", meta={"path": "o.wav", "folder": "another folder"})])
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "delete", "--gone-from", str(folder), "--yes",
                          "--library", "many", "--url", base, "--key", key], env=_env(tiny_model),
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert sorted(line.split(" (")[0] for line in out.stdout.splitlines()) == [
        f"deleted sub/g{n:04d}.wav" for n in range(1005)], out.stdout[:300]
    assert out.stderr == "deleted 1005 files of library 'many'\n", out.stderr
    log = (tmp_path / "api0.log").read_text()
    assert log.count(f"POST /v1/libraries/{lib}/deletions") == 2 and "DELETE /v1/items" not in log, log[-2000:]
    with session_scope(settings.database_url) as s:
        assert sorted(s.scalars(select(Item.filename).where(Item.library_id == lib))) == ["kept.wav", "o.wav"]


def _a_kept_at_b(base: str, key: str, out: subprocess.CompletedProcess) -> None:
    """delete --gone-from of a folder whose b.wav holds a.wav's bytes deleted nothing, and kept a.wav's item."""
    assert out.returncode == 0 and "deleted" not in out.stdout, out
    assert "1 file renamed or moved within" in out.stderr and "(a.wav)" in out.stderr, out
    h = {"Authorization": f"Bearer {key}"}
    lib = requests.get(f"{base}/v1/libraries", headers=h, timeout=30).json()["libraries"][0]["id"]
    items = requests.get(f"{base}/v1/libraries/{lib}/items", headers=h, timeout=30).json()["items"]
    assert sorted(i["metadata"]["path"] for i in items) == ["a.wav", "b.wav"], items


def test_a_file_renamed_over_another_is_not_gone_from_the_folder(start_api, new_key, tmp_path, tiny_model):
    """`mv a.wav b.wav` over a b.wav the library holds too: a.wav's bytes are still in the folder (at a path
    another item has), and its item is kept, as `clapq upload` then follows the rename. Only the files at
    paths no item had were read for the digests of the gone ones, and a.wav's item was deleted. b.wav's
    earlier bytes are nowhere in the folder: its item goes (it was kept, at the path a.wav's then took,
    helper-77)."""
    base, key = start_api(), new_key()
    folder = tmp_path / "f"
    folder.mkdir()
    write(folder / "a.wav", 0.5, seed=90)
    write(folder / "b.wav", 0.5, seed=91)  # the same length: the same size

    def clapq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args, "--library", "over", "--url", base, "--key",
                               key], env=_env(tiny_model), capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)

    assert clapq("upload", str(folder), "--no-wait").returncode == 0
    b_item = _library_items(base, key)["b.wav"]
    (folder / "a.wav").rename(folder / "b.wav")
    out = clapq("delete", "--gone-from", str(folder), "--yes")
    assert out.returncode == 0 and out.stdout == f"deleted b.wav ({b_item})\n", out
    assert "1 file renamed or moved within" in out.stderr and "(a.wav)" in out.stderr, out
    assert list(_library_items(base, key)) == ["a.wav"]
    assert clapq("upload", str(folder), "--no-wait").returncode == 0
    assert list(_library_items(base, key)) == ["b.wav"]


def _library_items(base: str, key: str) -> dict[str, str]:
    """The first library's items by path."""
    h = {"Authorization": f"Bearer {key}"}
    lib = requests.get(f"{base}/v1/libraries", headers=h, timeout=30).json()["libraries"][0]["id"]
    items = requests.get(f"{base}/v1/libraries/{lib}/items", headers=h, timeout=30).json()["items"]
    return {i["metadata"]["path"]: i["id"] for i in sorted(items, key=lambda i: i["metadata"]["path"])}


def test_delete_gone_from_reads_the_files_whatever_digests_are_kept(start_api, new_key, tmp_path, tiny_model):
    """`cp -p a.wav b.wav && rm a.wav` with both files the same size and time: a.wav's bytes are at b.wav, and
    its item is not gone. Where the change time follows the modification time (FAT drives, sshfs mounts:
    checked on sshfs), b.wav's size, times and inode are what they were, so the digest `clapq upload` kept for
    it (clapq.digests) is its old bytes': read through that cache, delete --gone-from deleted a.wav's item,
    and the run again after it found b.wav held and sent nothing, so the library held a.wav's bytes no more.
    It reads the files it looks at, as before the cache: deleting is not done on a digest kept."""
    from clapq import digests
    from clapq.blobs import file_sha256

    base, key = start_api(), new_key()
    folder = tmp_path / "f"
    folder.mkdir()
    a, b = write(folder / "a.wav", 0.5, seed=94), write(folder / "b.wav", 0.5, seed=95)  # the same size
    cache = tmp_path / "cache"

    def clapq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args, "--library", "kept", "--url", base, "--key",
                               key], env=_env(tiny_model, XDG_CACHE_HOME=str(cache)), capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)

    assert clapq("upload", str(folder), "--no-wait").returncode == 0
    old_b = file_sha256(b)
    b.write_bytes(a.read_bytes())
    a.unlink()
    # what such a file system leaves in the cache: b.wav's stat as it is now, with its old bytes' digest (here,
    # where a write moves the change time, it is written in as the cache would have kept it)
    kept = digests.Digests(cache / "clapq" / "digests.sqlite3")
    kept.db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
                    (os.fsencode(os.path.abspath(b)), digests._stat(os.stat(b), os.statvfs(b).f_fsid), old_b,
                     kept.today))
    kept.close()
    out = clapq("delete", "--gone-from", str(folder), "--yes")
    _a_kept_at_b(base, key, out)


def test_delete_gone_from_deletes_the_earlier_version_of_a_file_changed_in_place(start_api, new_key, worker, tmp_path,
                                                                                  tiny_model):
    """A folder uploaded and cleaned every night (`clapq upload` then `clapq delete --gone-from`): a file
    re-exported in place (other bytes at the same path, of the same size or not), replaced by a copy of another
    file of the folder, or a broken one fixed in place, left the item of its earlier version in the library,
    searchable at the same path as the new one, and --gone-from kept it, as something was at its path
    (helper-77). Those earlier versions, whose bytes are nowhere in the folder, are deleted and said as changed
    in place; the rest stays, each file of the folder once at its path. A file whose kept digest (clapq.digests)
    says other bytes than it holds is read, and its item kept: nothing is deleted on a kept digest."""
    from clapq import digests

    folder, cache = tmp_path / "Sounds", tmp_path / "cache"
    folder.mkdir()
    for i, name in enumerate(["same.wav", "longer.wav", "copied.wav", "source.wav", "kept.wav"]):
        write(folder / name, 0.5, seed=120 + i)  # all of one size
    (folder / "broken.wav").write_bytes(b"not audio yet\n" * 40)
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}

    def clapq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args, "--library", "nightly", "--url", base,
                               "--key", key], env=_env(tiny_model, XDG_CACHE_HOME=str(cache)), capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)

    def items() -> list[tuple[str, str, bool]]:  # (path, status, whether the file at that path holds its bytes)
        lib = requests.get(f"{base}/v1/libraries", headers=h, timeout=30).json()["libraries"][0]["id"]
        got = requests.get(f"{base}/v1/libraries/{lib}/items?limit=100", headers=h, timeout=30).json()["items"]
        return sorted((i["metadata"]["path"], i["status"], file_sha256(folder / i["metadata"]["path"]) == i["sha256"])
                      for i in got)

    assert clapq("upload", str(folder)).returncode == 1  # broken.wav failed
    write(folder / "same.wav", 0.5, seed=130)  # re-exported: the same size, other bytes
    write(folder / "longer.wav", 0.8, seed=131)
    shutil.copyfile(folder / "source.wav", folder / "copied.wav")  # the library holds these bytes: no new item
    write(folder / "broken.wav", 0.5, seed=132)  # fixed in place
    out = clapq("upload", str(folder))
    assert out.returncode == 0, out.stderr
    assert len(items()) == 9  # each earlier version beside the new one (copied.wav's: beside source.wav's item)
    # the digest kept for kept.wav says other bytes than it holds: it is read, and its item kept
    kept = digests.Digests(cache / "clapq" / "digests.sqlite3")
    kf = folder / "kept.wav"
    kept.db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
                    (os.fsencode(os.path.abspath(kf)), digests._stat(os.stat(kf), os.statvfs(kf).f_fsid), "0" * 64,
                     kept.today))
    kept.close()
    out = clapq("delete", "--gone-from", str(folder), "--yes")
    assert out.returncode == 0, out
    assert sorted(line.split(" (")[0] for line in out.stdout.splitlines()) == [
        "deleted broken.wav", "deleted copied.wav", "deleted longer.wav", "deleted same.wav"], out.stdout
    assert "4 files changed in place since they were sent (other bytes at the same path: re-exported, replaced or " \
        "fixed): the earlier versions go, not the file: " in out.stderr, out.stderr
    assert items() == [("broken.wav", "done", True), ("kept.wav", "done", True), ("longer.wav", "done", True),
                       ("same.wav", "done", True), ("source.wav", "done", True)]
    out = clapq("delete", "--gone-from", str(folder), "--yes")
    assert out.returncode == 0 and out.stdout.startswith("nothing to delete: every file"), out


def test_an_upload_says_which_files_changed_in_place_and_that_their_earlier_versions_stay(start_api, new_key, worker,
                                                                                         tmp_path, tiny_model):
    """A mix re-exported over its file, uploaded again: its new bytes were sent as a new file and the item of its
    earlier version stayed, so a search found both under one path with no way to tell which is current, and the
    upload said only "uploading 1 file" (helper-120). It now names the files changed in place whose earlier version
    the library still holds, and the command that deletes them, once: by the digest the run before kept for each
    path (clapq.digests), asked about with the rest. A file replaced by a copy of another is one (nothing sent); a
    file whose earlier bytes are elsewhere in the folder (renamed, then a new file at its name) is not, nor one
    only touched. The first run, into a new library, asks nothing and read no digest, so its run again read every
    file, and knew nothing of them before: it keeps the digests of the files it sends, hashed as they are sent."""
    from clapq import digests

    folder, cache = tmp_path / "My Sounds", tmp_path / "cache"
    folder.mkdir()
    names = ["mix.wav", "copied.wav", "source.wav", "old.wav", "touched.wav"]
    for i, name in enumerate(names):
        write(folder / name, 0.5, seed=150 + i)
    time.sleep(2.1)  # written more than SETTLE_S before the first run reads them: their digests are kept
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    clapq = _commands_at(base, key, tiny_model, library="mixes", cache=cache)

    def paths() -> list[str]:
        lib = requests.get(f"{base}/v1/libraries", headers=h, timeout=30).json()["libraries"][0]["id"]
        got = requests.get(f"{base}/v1/libraries/{lib}/items?limit=100", headers=h, timeout=30).json()["items"]
        return sorted(i["metadata"]["path"] for i in got)

    out = clapq("upload", str(folder))
    assert out.returncode == 0 and json.loads(out.stdout)["changed"] == 0 and "changed in place" not in out.stderr, out
    kept = digests.Digests(cache / "clapq" / "digests.sqlite3")
    assert [kept.kept_digest(folder / n) for n in names] == [file_sha256(folder / n) for n in names]
    kept.close()
    write(folder / "mix.wav", 0.8, seed=160)  # the new mix
    shutil.copyfile(folder / "source.wav", folder / "copied.wav")
    (folder / "old.wav").rename(folder / "renamed.wav")
    write(folder / "old.wav", 0.5, seed=161)
    os.utime(folder / "touched.wav")
    time.sleep(2.1)  # as a change made minutes before the run: the new digests are kept, and the change said once
    out = clapq("upload", str(folder))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["changed"], summary["renamed"], summary["skipped"]) == (2, 1, 4), out
    assert "2 files changed in place since they were sent (other bytes at the same path: re-exported, replaced or " \
        "fixed): the library still holds their earlier versions, which searches find under those paths too, until " \
        f"`clapq delete --gone-from '{folder}' --library mixes` deletes them: copied.wav, mix.wav\n" in out.stderr, \
        out.stderr
    assert paths() == ["copied.wav", "mix.wav", "mix.wav", "old.wav", "renamed.wav", "source.wav", "touched.wav"]
    out = clapq("upload", str(folder))  # said once, at the run that found the change
    assert out.returncode == 0 and json.loads(out.stdout)["changed"] == 0 and "changed in place" not in out.stderr, out
    out = clapq("delete", "--gone-from", str(folder), "--yes")
    assert out.returncode == 0, out
    assert sorted(line.split(" (")[0] for line in out.stdout.splitlines()) == ["deleted copied.wav",
                                                                               "deleted mix.wav"], out.stdout
    assert paths() == ["mix.wav", "old.wav", "renamed.wav", "source.wav", "touched.wav"]


def test_a_file_that_failed_in_its_bytes_is_followed_when_renamed(start_api, new_key, worker, tmp_path, tiny_model):
    """A broken file moved within its folder: `clapq upload` does not send it again (it failed in its bytes), and
    left its item at its old path, as /known gave no path for it; --gone-from kept it as "renamed or moved
    within ...; `clapq upload` updates their paths", at every run, which no upload did (helper-77). Its path is
    updated as any renamed file's, and --gone-from then finds nothing to say."""
    folder = tmp_path / "Sounds"
    (folder / "later").mkdir(parents=True)
    write(folder / "good.wav", 0.5, seed=140)
    (folder / "broken.wav").write_bytes(b"not audio\n" * 40)
    base, key = start_api(), new_key()

    def clapq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args, "--library", "moved", "--url", base,
                               "--key", key], env=_env(tiny_model, XDG_CACHE_HOME=str(tmp_path / "cache")),
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    assert clapq("upload", str(folder)).returncode == 1
    failed = _library_items(base, key)["broken.wav"]
    (folder / "broken.wav").rename(folder / "later" / "broken2.wav")
    out = clapq("upload", str(folder))
    assert out.returncode == 0 and "1 file renamed or moved since it was sent: its path in the library updated: " \
        "broken.wav -> later/broken2.wav" in out.stderr, out.stderr
    assert json.loads(out.stdout)["failed_before"] == 1 and json.loads(out.stdout)["renamed"] == 1, out.stdout
    assert _library_items(base, key) == {"good.wav": _library_items(base, key)["good.wav"], "later/broken2.wav": failed}
    out = clapq("delete", "--gone-from", str(folder), "--yes")
    assert out.returncode == 0 and out.stdout.startswith("nothing to delete: every file") and out.stderr == "", out


def test_a_folder_renamed_is_followed_when_told_where_it_was(start_api, new_key, tmp_path, tiny_model):
    """`mv ~/Sounds ~/Sounds2`, and the nightly commands pointed at the new name: the library followed the folder
    no more, for good. The upload said its files were "sent from another folder: their renames here are not
    followed", and --gone-from found no file sent from it (or, once one new file was, "nothing to delete"), so
    files deleted or renamed since stayed in the library at their old paths (helper-77). `clapq upload NEW
    --moved-from OLD` makes the files sent from OLD this folder's: at their paths here, renamed ones at their
    new one (a path that still holds a file's bytes is kept, whatever copies there are), and those gone at their
    old path, for --gone-from to delete. Another folder's files stay."""
    old, new, other = tmp_path / "Sounds", tmp_path / "Sounds2", tmp_path / "other"
    for d in (old / "sub", other):
        d.mkdir(parents=True)
    for i, name in enumerate(["a.wav", "b.wav", "sub/c.wav", "gone.wav"]):
        write(old / name, 0.5 + 0.1 * i, seed=150 + i)
    write(other / "o.wav", 0.5, seed=160)

    def clapq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args, "--library", "renamed", "--url", base,
                               "--key", key], env=_env(tiny_model, XDG_CACHE_HOME=str(tmp_path / "cache")),
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    base, key = start_api(), new_key()
    for d in (old, other):
        assert clapq("upload", str(d), "--no-wait").returncode == 0
    before = _library_items(base, key)
    old.rename(new)
    (new / "gone.wav").unlink()
    (new / "b.wav").rename(new / "sub" / "b2.wav")
    out = clapq("upload", str(new), "--no-wait")
    assert out.returncode == 0 and "2 files at the same paths here were sent from another folder" in out.stderr, out
    assert clapq("delete", "--gone-from", str(new), "--yes").returncode == 1  # no file was sent from it
    assert _library_items(base, key) == before
    shutil.copyfile(new / "a.wav", new / "0copy.wav")  # listed first: a.wav's item stays at a.wav, which holds it
    out = clapq("upload", str(new), "--no-wait", "--moved-from", str(old))
    assert out.returncode == 0 and "4 files sent from " in out.stderr and " taken as this folder's (1 at another " \
        "path here)" in out.stderr and "another folder" not in out.stderr, out.stderr
    assert _library_items(base, key) == {**{k: v for k, v in before.items() if k != "b.wav"},
                                         "sub/b2.wav": before["b.wav"]}
    out = clapq("delete", "--gone-from", str(new), "--yes")
    assert out.returncode == 0 and out.stdout == f"deleted gone.wav ({before['gone.wav']})\n", out
    assert sorted(_library_items(base, key)) == ["a.wav", "o.wav", "sub/b2.wav", "sub/c.wav"]
    out = clapq("upload", str(new), "--no-wait")  # its files are this folder's: nothing more to say
    assert out.returncode == 0 and "another folder" not in out.stderr and json.loads(out.stdout)["skipped"] == 4, out
    (new / "sub" / "c.wav").rename(new / "c2.wav")
    out = clapq("upload", str(new), "--no-wait")
    assert json.loads(out.stdout)["renamed"] == 1 and "c2.wav" in _library_items(base, key), out.stderr
    out = clapq("upload", str(new), "--no-wait", "--moved-from", str(old))
    assert "no file of library 'renamed' was sent from" in out.stderr, out.stderr


@pytest.mark.parametrize("failing", [False, True])
def test_files_another_moved_from_took_meanwhile_are_said_so(tmp_path, tiny_model, failing):
    """Two `clapq upload NEW --moved-from OLD` at once: each /moves is made only where the item still is as it was
    seen, so the second run moved nothing, and said "0 files sent from OLD taken as this folder's" of the 136 files
    the first had made this folder's (helper-91). It says that they were made this folder's meanwhile. Where the
    API fails instead (`failing`, a 500 from /moves on), the paths are said to be left as they were and the upload
    goes on, its files being in: the library listed again for that count failed the same way, and the command
    ended there with its error, exit 1, before its summary (without --no-wait, before waiting for its jobs)."""
    from clapq.blobs import file_sha256
    from clapq.client import folder_id

    old, new = tmp_path / "Sounds", tmp_path / "Sounds2"
    new.mkdir()
    shas = {name: file_sha256(write(new / name, 0.5, seed=i)) for i, name in enumerate(["a.wav", "b.wav"])}
    moved: list = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 2}]}, {}
        if path.endswith("/known"):
            return 200, {"known": sorted(shas.values()), "pending": [], "items": {d: f"i{n}" for n, d in shas.items()},
                         "sent_from": {d: {"path": n, "folder": folder_id(old)} for n, d in shas.items()}}, {}
        if failing and (moved or path.endswith("/moves")):
            moved.append(path)
            return 500, {"error": {"code": "internal", "message": "internal error", "status": 500}}, {}
        if path.startswith("/v1/libraries/lib1/items"):  # the other run's moves are in once this one tries its own
            where = folder_id(new if moved else old)
            return 200, {"items": [{"id": f"i{n}", "sha256": d, "metadata": {"path": n, "folder": where}}
                                   for n, d in shas.items()], "next_cursor": None}, {}
        if path.endswith("/moves"):
            moved.append(path)
            return 200, {"moved": [], "too_large": []}, {}
        return 404, None, {}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(new), "--library", "x", "--no-wait",
                              "--moved-from", str(old), "--url", url, "--key", "cq_x"], env=_env(tiny_model),
                             capture_output=True, text=True, timeout=60)
    assert moved and out.returncode == 0 and json.loads(out.stdout)["skipped"] == 2, out
    if failing:
        assert "the paths of files renamed since they were sent are left as they were" in out.stderr, out.stderr
        return
    assert "0 files" not in out.stderr and f"2 files sent from {old} were made this folder's meanwhile, by another " \
        "`clapq upload --moved-from` at the same time\n" in out.stderr, out.stderr


def test_a_server_that_is_not_clapq_is_said_so_not_a_traceback(tmp_path, tiny_model):
    """--url pointing at another server: a file server's 200 of HTML (a proxy's login page) was a
    JSONDecodeError traceback, and another server's 404 page was printed as 300 characters of its HTML
    (helper-42). Both now say the answer is not clapq's and to check --url."""
    import functools
    import http.server
    import threading

    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "libraries").write_text("<html><body>Please log in</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        for at, said in ((url, f"the answer from {url} is not a JSON object, so not the clapq API's: check --url "
                                "(or CLAPQ_URL), the address `clapq up` printed"),
                         (url + "/v2", "failed (404): 404 File not found; this is not the clapq API's answer: check "
                                       "--url (or CLAPQ_URL)")):
            out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", at,
                                  "--key", "cq_x"], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
            assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
            assert said in out.stderr and "<html" not in out.stderr.lower(), out.stderr
    finally:
        server.shutdown()


def test_a_file_named_like_an_option_and_several_files_to_upload_are_said_how_to_give(tiny_model, tmp_path):
    """`clapq upload -take1.wav` said "the following arguments are required: folder|file", of a command given
    a file, `clapq upload *.wav` only "unrecognized arguments: b.wav", and `clapq search rain on a roof`
    "unrecognized arguments: on a roof": each now says how to give them."""
    for name in ("-take1.wav", "a.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"RIFF")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args], env=_env(tiny_model), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    out = run("upload", "-take1.wav", "--library", "x")
    assert out.returncode == 2 and "(-take1.wav is read as an option: give a file or folder whose name begins " \
        "with '-' as ./-take1.wav)" in out.stderr, out.stderr
    out = run("search", "--like", "-take1.wav", "--library", "x")
    assert out.returncode == 2 and "give a file or folder whose name begins with '-' as ./-take1.wav" in \
        out.stderr, out.stderr
    out = run("upload", "a.wav", "b.wav", "--library", "x")
    assert out.returncode == 2 and "unrecognized arguments: b.wav (`clapq upload` takes one folder or one file, " \
        "and was given 2: `clapq upload FOLDER` sends every audio file under it)" in out.stderr, out.stderr
    out = run("search", "rain", "on", "a", "roof", "--library", "x")
    assert out.returncode == 2 and "unrecognized arguments: on a roof (the words to search for go in quotes, as " \
        "one: clapq search 'rain on a roof' ...)" in out.stderr, out.stderr
    out = run("upload", "a.wav", "--library", "x", "--yes")  # not files: only argparse's words, with the command's usage
    assert out.returncode == 2 and out.stderr.splitlines()[-1] == "clapq upload: error: unrecognized arguments: --yes", \
        out.stderr
    assert out.stderr.startswith("usage: clapq upload "), out.stderr  # was clapq's, its list of commands


def test_a_misspelt_option_is_said_with_the_option_meant(tiny_model, tmp_path):
    """`clapq search rain --libary field` said only "the following arguments are required: --library", of a
    command given it, `--no-wiat` only "unrecognized arguments", and `clapq jobs --limt 3` "invalid choice: '3'":
    each now names the option meant, of the command it was given to (helper-108)."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args], env=_env(tiny_model), capture_output=True,
                              text=True, timeout=60)

    for args, said in ((("search", "rain", "--libary", "field"), "the following arguments are required: --library "
                        "(--libary is not an option of `clapq search`: did you mean --library?)"),
                       (("upload", str(tmp_path), "--library", "x", "--no-wiat"), "unrecognized arguments: --no-wiat "
                        "(--no-wiat is not an option of `clapq upload`: did you mean --no-wait?)"),
                       (("jobs", "show", str(uuid.uuid4()), "--jsno"), "(--jsno is not an option of `clapq jobs show`: "
                        "did you mean --json?)"),
                       (("jobs", "--limt", "3"), "(--limt is not an option of `clapq jobs`: did you mean --limit?)"),
                       (("keys", "create", "--tenent=bob"), "(--tenent is not an option of `clapq keys create`: did "
                        "you mean --tenant?)")):
        out = run(*args)
        assert out.returncode == 2 and said in out.stderr.splitlines()[-1], (args, out.stderr)
    # an option far from every one is left to argparse's words; one shortened as argparse takes it is no typo;
    # words after '--' are words
    out = run("upload", str(tmp_path), "--library", "x", "--yes")
    assert out.returncode == 2 and out.stderr.splitlines()[-1] == "clapq upload: error: unrecognized arguments: --yes", \
        out.stderr
    out = run("search", "--lib", "x", "--url", "http://127.0.0.1:9", "--key", "cq_x", "--", "--libary")
    assert out.returncode == 1 and "did you mean" not in out.stderr and "cannot reach the clapq API" in out.stderr, \
        out.stderr


def test_search_and_delete_arguments_are_read_as_a_user_means_them(tiny_model, tmp_path):
    """`--k 5` was taken for `--key 5` (argparse's abbreviations); `clapq search -hum` said only "ignored
    explicit argument 'um'"; `--like` a file that does not exist said "is not a file"; `-k 0` went to the
    API; an item id given in capitals and as typed was deleted, then said to be missing; an item of another
    of your libraries was "no item" with no word of where it is (helper-42)."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *args], env=_env(tiny_model), capture_output=True,
                              text=True, timeout=60)

    out = run("search", "--k", "0", "rain", "--library", "x", "--url", "http://127.0.0.1:9")
    assert out.returncode == 2 and "argument -k/--k: '0' is not a number of results" in out.stderr, out.stderr
    # other options may still be shortened, as before (`--lib`, `--no` for --no-wait: helper-43)
    out = run("upload", str(tmp_path / "none"), "--lib", "x", "--no")
    assert out.returncode == 2 and "does not exist" in out.stderr, out.stderr
    out = run("search", "-hum", "--library", "x")
    assert out.returncode == 2 and "words that begin with '-' go after '--'" in out.stderr, out.stderr
    # an option before the command said only "invalid choice: '/data'" (helper-71)
    out = run("--data-dir", str(tmp_path), "upload", str(tmp_path), "--library", "x")
    assert out.returncode == 2 and "(options go after the command: `clapq upload --data-dir ...`)" in out.stderr, \
        out.stderr
    out = run("--data-dir=" + str(tmp_path), "keys", "list")
    assert out.returncode == 2 and "`clapq keys list --data-dir ...`" in out.stderr, out.stderr
    out = run("search", "--like", str(tmp_path / "nope.wav"), "--library", "x")
    assert out.returncode == 2 and f"clapq: {tmp_path / 'nope.wav'} does not exist" in out.stderr, out.stderr
    out = run("search", "--like", str(tmp_path), "--library", "x")
    assert out.returncode == 2 and "is a folder, not a sound file" in out.stderr, out.stderr
    out = run("search", "rain", "-k", "0", "--library", "x")
    assert out.returncode == 2 and "'0' is not a number of results" in out.stderr, out.stderr

    item = "5f1c0000-0000-4000-8000-0000000000aa"
    other = "5f1c0000-0000-4000-8000-0000000000bb"
    bodies: list = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 1}]}, {}
        if path == "/v1/libraries/lib2":
            return 200, {"id": "lib2", "name": "field", "item_count": 1}, {}
        if path == "/v1/libraries/lib1/deletions":  # item is this library's, other another's
            return 200, {"deleted": {"items": 1, "stored_files": 1, "files": [
                {"id": item, "filename": "a.wav", "path": None}]}, "not_found": [other]}, {}
        if path == f"/v1/items/{other}" and method == "GET":
            return 200, {"id": other, "library_id": "lib2", "filename": "b.wav", "metadata": {}}, {}
        return 404, {"error": {"code": "not_found", "message": "no such item", "status": 404}}, {}

    with fake_api(answer, bodies) as url:
        out = run("delete", item, item.upper(), other, "not-an-id", "--library", "x", "--url", url, "--key", "cq_x")
    assert [(m, p, json.loads(b)) for m, p, b in bodies if m in ("POST", "DELETE")] == [
        ("POST", "/v1/libraries/lib1/deletions", {"item_ids": [item, other]})], bodies
    assert out.returncode == 1 and f"no item '{item.upper()}'" not in out.stderr, out.stderr
    assert out.stdout == f"deleted a.wav ({item})\n", out.stdout
    assert out.stderr.splitlines() == [
        f"clapq: no item '{other}' in library 'x' (give item ids as `clapq search` prints them); it is in library "
        "'field'", "clapq: no item 'not-an-id' in library 'x' (give item ids as `clapq search` prints them)"], \
        out.stderr


def test_video_files_are_sent_for_their_audio_track(tmp_path):
    """A folder's video files are uploaded (the worker decodes their audio track); pictures, text, MIDI
    (notes, not sound) and .ts (TypeScript as often as MPEG-TS) are counted as left out."""
    from clapq import client

    names = ["a.avi", "b.MPG", "c.m2ts", "d.m4v", "e.mp4", "f.mkv", "g.webm", "h.wmv", "i.wav", "j.ogv", "k.vob"]
    for name in names + ["cover.jpg", "notes.txt", "song.mid", "app.ts"]:
        (tmp_path / name).write_bytes(b"x")
    found = client.audio_files(tmp_path)
    assert [p.name for p in found.audio] == names
    assert found.other == {".jpg": 1, ".txt": 1, ".mid": 1, ".ts": 1}  # .ts: TypeScript as often as video


def test_files_the_api_cannot_take_are_named_not_sent(tmp_path):
    """Before sending, a file that vanished since the listing or is over the server's limits is named
    with its reason; the rest are sent."""
    from clapq import client

    ok = tmp_path / "ok.wav"
    ok.write_bytes(b"x" * 100)
    big = tmp_path / "big.wav"
    big.write_bytes(b"x" * 5000)
    gone = tmp_path / "gone.wav"
    sendable, too_big, refused = client._sendable([ok, big, gone], tmp_path, {"max_file_bytes": 4000})
    assert sendable == [ok] and list(too_big) == [big]
    assert too_big[big].startswith("big.wav: 0.0 MB, larger than this server takes") and "CLAPQ_MAX_FILE_BYTES" in \
        too_big[big]
    assert refused == ["gone.wav: gone since the upload began (removed or moved meanwhile)"]
    # requests are cut to the server's file count and size, with room for the multipart around the files
    assert [len(b) for b in client.batches([ok] * 5, max_files=2)] == [2, 2, 1]
    assert [len(b) for b in client.batches([ok] * 5, max_bytes=client.REQUEST_OVERHEAD + 2 * (100 + 1024))] == \
        [2, 2, 1]


def test_a_file_over_a_lowered_limit_that_the_library_holds_is_not_refused(start_api, new_key, worker, tmp_path,
                                                                            tiny_model):
    """A server whose CLAPQ_MAX_FILE_BYTES was lowered after a folder was uploaded: a file over the new limit
    that the library holds is not sent again anyway, so it is not refused, and its rename is followed. It was
    named "not sent" at every run, which then exited 1, and its path stayed the old one (helper-51). A new
    file over the limit is still refused."""
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "small.wav", 0.5, seed=1)
    write(folder / "big.wav", 8.0, seed=2)  # 48 kHz, 16-bit: 768 kB
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}

    def upload(url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "lowered",
                               "--url", url, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                              timeout=300)

    out = upload(base)
    assert out.returncode == 0, out.stderr
    lowered = start_api(CLAPQ_MAX_FILE_BYTES="100000")
    (folder / "big.wav").rename(folder / "renamed big.wav")
    write(folder / "new big.wav", 8.0, seed=3)
    out = upload(lowered)
    assert out.returncode == 1, out.stderr
    assert [line[:42] for line in out.stderr.splitlines() if line.startswith("not sent:")] == \
        ["not sent: new big.wav: 0.8 MB, larger than"], out.stderr
    assert "its path in the library updated: big.wav -> renamed big.wav" in out.stderr, out.stderr
    lib = next(x for x in requests.get(f"{base}/v1/libraries", headers=h, timeout=10).json()["libraries"]
               if x["name"] == "lowered")
    items = requests.get(f"{base}/v1/libraries/{lib['id']}/items", headers=h, timeout=10).json()["items"]
    assert sorted(i["metadata"].get("path") for i in items) == ["renamed big.wav", "small.wav"], items


def test_no_library_is_created_when_no_file_can_be_sent(tmp_path, tiny_model):
    """Every file over the server's limit: each is named, and the command ends before it creates the
    library (it made an empty one, and printed a summary of no jobs)."""
    bodies = []

    def answer(method, path):
        if path == "/v1/limits":
            return 200, {"max_file_bytes": 1000}, {}
        return 200, {"libraries": []}, {}

    for name in ("a.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"x" * 5000)
    with fake_api(answer, bodies) as url:
        p = _upload(tmp_path, url, tiny_model)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1 and out == "", (out, err)
        assert "not sent: a.wav: 0.0 MB, larger than this server takes" in err, err
        assert err.endswith("clapq: none of the 2 files can be sent (said above); nothing was uploaded\n"), err
        p = _upload(tmp_path / "a.wav", url, tiny_model)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 1 and err.endswith("clapq: the file cannot be sent (said above); nothing was uploaded\n")
    assert [method for method, path, body in bodies if method == "POST"] == []


def test_https_to_a_plain_http_api_says_so(tiny_model):
    """`--url https://...` against the API, which serves plain HTTP: the TLS handshake fails, and the command
    says that, not that the connection was lost because the API restarted."""
    with fake_api(lambda method, path: (200, {"libraries": []}, {})) as url:
        url = url.replace("http://", "https://")
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url,
                              "--key", "cq_x"], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"clapq: the TLS handshake with {url} failed (" in out.stderr and "use an http:// URL" in out.stderr, \
        out.stderr


def test_text_that_is_not_utf8_is_refused_before_it_is_sent(tmp_path, tiny_model):
    """Words, a library name or a tenant name in bytes of another encoding (a Latin-1 terminal): a usage error
    that says so, where the API answered 'an unpaired surrogate (not valid Unicode)' and `keys create` gave a
    traceback (helper-57)."""
    write(tmp_path / "a.wav", 0.2)
    latin1 = os.fsdecode(b"caf\xe9")
    for args in (["search", latin1, "--library", "x", "--url", "http://127.0.0.1:9", "--key", "cq_x"],
                 ["upload", str(tmp_path), "--library", latin1, "--url", "http://127.0.0.1:9", "--key", "cq_x"],
                 ["keys", "create", "--tenant", latin1, "--data-dir", str(tmp_path)]):
        out = subprocess.run([sys.executable, "-m", "clapq.cli", *args], env=_env(tiny_model), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "bytes that are not UTF-8 in the " in out.stderr and "(0xe9)" in out.stderr \
            and "Traceback" not in out.stderr, out.stderr


def test_client_help_says_where_the_address_and_key_come_from(tiny_model):
    """--help of the client commands names the data directory's `clapq up` as where the address comes from, as
    it is (it said http://127.0.0.1:8000 while a search went to the port `clapq up --port` was given)."""
    for cmd in ("upload", "search", "delete"):
        out = subprocess.run([sys.executable, "-m", "clapq.cli", cmd, "--help"], env=_env(tiny_model, COLUMNS="200"),
                             capture_output=True, text=True, timeout=60).stdout
        assert ("(default $CLAPQ_URL, else the address the data dir's `clapq up` serves on, else "
                "http://127.0.0.1:8000)") in out and "to read its owner key and address from" in out, out


def test_every_command_help_says_what_it_does(tiny_model):
    """`clapq migrate --help` (api, worker, beat, keys list...) was a bare usage line: what each does was only in
    `clapq --help`, and nothing said these take no options but the environment (helper-71)."""
    def helped(*cmd: str) -> str:
        return subprocess.run([sys.executable, "-m", "clapq.cli", *cmd, "--help"], env=_env(tiny_model, COLUMNS="200"),
                              capture_output=True, text=True, timeout=60).stdout
    assert "\nApply database migrations. Configured from the environment (README, Configuration), not by options.\n" \
        in helped("migrate"), helped("migrate")
    for cmd in (("api",), ("worker",), ("beat",)):
        assert "Configured from the environment" in helped(*cmd), helped(*cmd)
    assert "\nPrint a new API key for a tenant (created if new).\n" in helped("keys", "create")
    assert "\nSearch a library by words, or by a sound with --like FILE.\n" in helped("search")
    for cmd in ("show", "wait", "cancel", "retry"):  # `clapq jobs show` ... (helper-72)
        assert helped("jobs", cmd).split("\n\n")[1][0].isupper(), helped("jobs", cmd)


@pytest.mark.parametrize("url", ["localhost:8000", "http://", "http://127.0.0.1:99999", "ftp://example.org"])
def test_an_unusable_api_address_is_a_sentence(tmp_path, tiny_model, url):
    write(tmp_path / "a.wav", 0.2)
    for cmd in (["upload", str(tmp_path), "--library", "x"], ["search", "rain", "--library", "x"]):
        out = subprocess.run([sys.executable, "-m", "clapq.cli", *cmd, "--url", url, "--key", "cq_x"],
                             env=_env(tiny_model), capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"clapq: {url!r} is not an API address like http://127.0.0.1:8000" in out.stderr, out.stderr


def test_a_drives_lost_and_found_does_not_fail_its_upload(tmp_path, monkeypatch):
    """Every ext4 drive has a lost+found only root may read: with folders that cannot be read failing the
    command, a drive uploaded whole failed at every run for it (helper-43). At a mount point it is passed
    over; anywhere else, and any other folder, is still said and fails the command."""
    import pathlib

    from clapq.client import audio_files

    for name in ("lost+found", "sub/lost+found", "locked"):
        (tmp_path / name).mkdir(parents=True)
    write(tmp_path / "a.wav", 0.2)
    real_scandir, real_is_mount = os.scandir, pathlib.Path.is_mount

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) in ("lost+found", "locked"):  # as for a user who is not root
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(pathlib.Path, "is_mount", lambda self: self == tmp_path or real_is_mount(self))
    listing = audio_files(tmp_path)
    assert [p.name for p in listing.audio] == ["a.wav"]
    assert sorted(listing.closed) == ["locked (Permission denied)", "sub/lost+found (Permission denied)"]


def test_an_upload_that_only_waits_for_files_of_another_model_says_so(start_api, new_key, settings, tmp_path,
                                                                       tiny_model, worker):
    """A service restarted on another CLAPQ_MODEL while a library's files were queued: `clapq upload` of that
    folder again sent nothing (the library holds every file) and waited for them with no progress for ever,
    as they wait for a worker of their model (helper-63). It stops at once with a sentence, exit 1, as an
    upload of a new file into that library does (409 model_mismatch); GET /v1/limits says the service's model."""
    from sqlalchemy import text

    from clapq.db import session_scope

    base, key = start_api(), new_key()
    folder = tmp_path / "old"
    folder.mkdir()
    write(folder / "a.wav", 0.5, seed=41)
    write(folder / "b.wav", 0.5, seed=42)
    env = _env(tiny_model)
    run = [sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "retired", "--url", base, "--key", key]
    first = subprocess.run(run + ["--no-wait"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    lib = json.loads(first.stdout)["library_id"]
    # embedded first, so that no task of theirs is left for the suite's worker to take once they are made queued
    # again below (it did, in the whole suite: they were embedded meanwhile, and the upload had nothing to wait for)
    assert _wait_job(base, {"Authorization": f"Bearer {key}"}, json.loads(first.stdout)["jobs"][0])["status"] == "done"
    with session_scope(settings.database_url) as s:  # the service now runs another model; the files still queued
        s.execute(text("DELETE FROM embeddings WHERE item_id IN (SELECT id FROM items WHERE library_id = :l)"),
                  {"l": lib})
        s.execute(text("DELETE FROM segments WHERE item_id IN (SELECT id FROM items WHERE library_id = :l)"),
                  {"l": lib})
        other = s.execute(text("INSERT INTO models (name, weights_sha256, dim) VALUES ('retired', :w, 512) "
                               "RETURNING id"), {"w": uuid.uuid4().hex * 2}).scalar()
        s.execute(text("UPDATE libraries SET model_id = :m WHERE id = :l"), {"m": other, "l": lib})
        s.execute(text("UPDATE items SET status = 'queued', claimed_by = NULL WHERE library_id = :l"), {"l": lib})
    limits = requests.get(f"{base}/v1/limits", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert limits["model"]["name"] == str(tiny_model) and limits["model"]["id"] != other, limits
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1, again.stderr[-3000:]
    assert again.stderr.strip().endswith(
        f"clapq: library 'retired' is bound to model {other} (retired), and this service runs model "
        f"{limits['model']['id']} ({tiny_model}): its 2 files not embedded yet wait for a worker of the library's "
        "model, and it takes no new files; run the library's model (CLAPQ_MODEL) to finish them, or embed its files "
        "with this one into a new library: `clapq reembed --library retired --into NEW`"), again.stderr[-3000:]
    # and `clapq jobs wait` of their job, which waited as the upload did (helper-72)
    job = json.loads(first.stdout)["jobs"][0]
    waited = subprocess.run([sys.executable, "-m", "clapq.cli", "jobs", "wait", job, "--url", base, "--key", key],
                            env=env, capture_output=True, text=True, timeout=120)
    assert waited.returncode == 1 and waited.stderr.startswith(
        f"clapq: library 'retired' is bound to model {other} (retired), and this service runs model "), waited.stderr
    # which `clapq reembed` does: a new library of the service's model, its files embedded there, the old one kept
    moved = subprocess.run([sys.executable, "-m", "clapq.cli", "reembed", "--library", "retired", "--into", "current",
                            "--url", base, "--key", key], env=env, capture_output=True, text=True, timeout=300)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert f"of model {limits['model']['id']} ({tiny_model}): 2 files of 'retired' queued to be embedded (job " in \
        moved.stderr and "'retired' is left as it was: `clapq delete --library retired` deletes it" in moved.stderr, \
        moved.stderr[-3000:]
    assert re.fullmatch(r"job \S+: done: 2 done\n", moved.stdout), moved.stdout
    libs = {x["name"]: x for x in requests.get(f"{base}/v1/libraries", headers={"Authorization": f"Bearer {key}"},
                                               timeout=30).json()["libraries"]}
    assert libs["current"]["item_count"] == 2 and libs["retired"]["item_count"] == 2, libs
    again = subprocess.run([sys.executable, "-m", "clapq.cli", "reembed", "--library", "current", "--into", "x",
                            "--url", base, "--key", key], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "is of the model this service runs" in again.stderr, again.stderr
    # the same command again (after a Ctrl-C stopped its wait, say): the job to follow is named, not a new library
    again = subprocess.run([sys.executable, "-m", "clapq.cli", "reembed", "--library", "retired", "--into", "current",
                            "--url", base, "--key", key], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.endswith(
        "a library named 'current' already exists; if an earlier `clapq reembed` made it, its job goes on (`clapq "
        "jobs` lists it, `clapq jobs wait JOB` follows it); else give --into another name\n"), again.stderr


def test_a_reembed_fails_only_for_files_that_fail_anew(start_api, new_key, settings, tmp_path, tiny_model, worker):
    """`clapq reembed` of a library that holds a file failed for a reason in its bytes: the file comes failed
    into the new library, said so, and the command exits 0 once the rest is embedded (it exited 1 at every
    re-embed of such a library, though nothing new had failed, as `clapq upload` does not for the files it does
    not send again: `clapq reembed ... && clapq delete --library OLD` never went on). A file that fails in the
    new library (its stored copy lost) is an exit 1."""
    from clapq.blobs import BlobStore
    from tests.conftest import retire

    base, key = start_api(), new_key()
    env, h = _env(tiny_model), {"Authorization": f"Bearer {key}"}

    def retired(name: str, files: dict[str, bytes]) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for filename, data in files.items():
            (folder / filename).write_bytes(data)
        up = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", name, "--no-wait",
                             "--url", base, "--key", key], env=env, capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr[-3000:]
        _wait_job(base, h, json.loads(up.stdout)["jobs"][0])
        retire(settings.database_url, json.loads(up.stdout)["library_id"])
        return name

    def reembed(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", "reembed", "--library", name, "--into",
                               f"{name}, now", "--url", base, "--key", key], env=env, capture_output=True, text=True,
                              timeout=300)

    good = write(tmp_path / "good.wav", 0.5, seed=47).read_bytes()
    moved = reembed(retired("with a broken file", {"good.wav": good, "broken.wav": b"RIFF not a wav" * 20}))
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "1 file that failed in 'with a broken file' for a reason in their bytes comes failed" in moved.stderr, \
        moved.stderr[-3000:]
    assert re.fullmatch(r"job \S+: done_with_errors: 1 done, 1 failed\n", moved.stdout), moved.stdout
    lost = write(tmp_path / "lost.wav", 0.5, freq=1239.0, seed=48).read_bytes()  # bytes no other test holds
    name = retired("with a lost file", {"lost.wav": lost})
    assert BlobStore(settings.blob_dir).remove(hashlib.sha256(lost).hexdigest())
    moved = reembed(name)
    assert moved.returncode == 1 and "failed: lost.wav (item " in moved.stderr, moved.stderr[-3000:]
    assert re.fullmatch(r"job \S+: failed: 1 failed\n", moved.stdout), moved.stdout


def _upload_with_key(folder: Path, library: str, base: str, key: str, tiny_model) -> subprocess.Popen:
    """`clapq upload FOLDER --library LIBRARY` against the API at `base`, its stdout and stderr read by the test."""
    return subprocess.Popen([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", library, "--url",
                             base, "--key", key], env=_env(tiny_model), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _stderr_until(p: subprocess.Popen, prefix: str) -> list[str]:
    """The lines `p` writes to stderr up to the first that begins with `prefix`, which it must write."""
    said: list[str] = []
    while not (said and said[-1].startswith(prefix)):
        said.append(p.stderr.readline())
        assert said[-1], said
    return said


def test_files_deleted_while_the_upload_waits_are_said_and_counted(start_api, new_key, tmp_path, tiny_model):
    """Files of the upload deleted from the library (the API, another terminal) while `clapq upload` waits for
    them: they were said nowhere, and the summary left them out ("files": 4, one cancelled, none failed or not
    sent, after "0/1 files processed"), so files sent were silently not in the library (helper-110's messy
    folder: 60 items, 64 of 1,345 files). Now each is named, and counted as `deleted`. The files stay queued here, as the API runs
    a model no worker serves, until the rest of the job is cancelled."""
    from tests.test_engine import another_model

    base, key = start_api(CLAPQ_MODEL=str(another_model(tiny_model, tmp_path))), new_key()
    h = {"Authorization": f"Bearer {key}"}
    folder = tmp_path / "take"
    folder.mkdir()
    for i, name in enumerate(("a.wav", "b.wav", "c.wav")):
        write(folder / name, 0.5, seed=1100 + i)
    (folder / "sub").mkdir()
    write(folder / "sub" / "copy of a.wav", 0.5, seed=1100)
    p = _upload_with_key(folder, "racy", base, key, tiny_model)
    try:
        said = _stderr_until(p, "uploaded 4 files (job ")
        job = said[-1].split("(job ")[1].rstrip(")\n")
        lib = requests.get(f"{base}/v1/jobs/{job}", headers=h, timeout=30).json()["library_id"]
        items = {i["metadata"]["path"]: i["id"] for i in
                 requests.get(f"{base}/v1/libraries/{lib}/items", headers=h, timeout=30).json()["items"]}
        r = requests.post(f"{base}/v1/libraries/{lib}/deletions", headers=h, timeout=30,
                          json={"item_ids": [items["a.wav"], items["b.wav"]]})
        assert r.status_code == 200 and r.json()["deleted"]["items"] == 2, r.text
        assert requests.post(f"{base}/v1/jobs/{job}/cancel", headers=h, timeout=30).status_code == 200
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 1, err  # for the cancelled file, as before
    assert "cancelled: 1 file of job " in err, err
    assert (f"deleted: 3 files of job {job} deleted from the library while the upload waited (from the API or "
            "another terminal): a.wav, b.wav, sub/copy of a.wav; a run of this upload again sends them again") in err, err
    summary = json.loads(out)
    assert (summary["files"], summary["cancelled"], summary["deleted"], summary["failed"]) == (4, 1, 3, 0), summary


def test_a_key_revoked_while_the_upload_waits_says_its_files_are_in(start_api, new_key, settings, tmp_path,
                                                                     tiny_model):
    """A key revoked (`clapq keys revoke`) while `clapq upload` waits for its files: it said only "the API does not
    take this key (unknown or revoked)", exit 1, so whoever ran it could not tell whether the files sent were lost
    (helper-127: a team member's key revoked during a 4-file upload, the files embedded meanwhile). They are the
    tenant's and are embedded whatever became of the key: it says so, with the jobs, and how to follow them. The
    files stay queued here, as the API runs a model no worker serves."""
    from clapq.keys import create_key, revoke_key
    from tests.test_engine import another_model

    base, key = start_api(CLAPQ_MODEL=str(another_model(tiny_model, tmp_path))), new_key()
    folder = tmp_path / "take"
    folder.mkdir()
    for i in range(2):
        write(folder / f"{i}.wav", 0.5, seed=1270 + i)
    p = _upload_with_key(folder, "team", base, key, tiny_model)
    try:
        said = _stderr_until(p, "uploaded 2 files (job ")
        job = said[-1].split("(job ")[1].rstrip(")\n")
        with session_scope(settings.database_url) as s:
            tenant = revoke_key(s, key)[1]
            other = create_key(s, tenant)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 1 and out == "", (out, err)
    assert "the API does not take this key (unknown or revoked)" in err, err
    assert (f"clapq: stopped waiting; the uploaded files are the tenant's and still being embedded (jobs {job}): "
            "`clapq jobs wait JOB` with another key of the tenant (--key or CLAPQ_API_KEY; `clapq keys create "
            "--tenant NAME` makes one) follows them") in err, err
    r = requests.get(f"{base}/v1/jobs/{job}", headers={"Authorization": f"Bearer {other}"}, timeout=30)
    assert r.status_code == 200 and r.json()["counts"]["queued"] == 2, r.text


def test_copies_of_files_this_upload_sent_are_not_said_to_be_left_unwaited(start_api, new_key, tmp_path, tiny_model):
    """A copy whose original this run sent in an earlier request is held, queued in this run's own job, when the
    library is asked about it: it was said as "1 of them not embedded yet: `clapq search` finds them once they
    are", as if the command would not wait for it, while it waits for its job (helper-110's second run of a
    messy folder: "5 of them"). The API runs a model no worker serves, so the files stay queued, and takes one
    file a request, so the copy, two files behind its original (the files are asked about a request ahead), is
    asked about after its original was sent."""
    from tests.test_engine import another_model

    base = start_api(CLAPQ_MODEL=str(another_model(tiny_model, tmp_path)), CLAPQ_MAX_FILES_PER_BATCH="1")
    key = new_key()
    h = {"Authorization": f"Bearer {key}"}
    assert requests.post(f"{base}/v1/libraries", json={"name": "copies"}, headers=h, timeout=30).status_code == 201
    folder = tmp_path / "take"
    folder.mkdir()
    write(folder / "a.wav", 0.5, seed=1110)
    write(folder / "b.wav", 0.5, seed=1111)
    shutil.copy(folder / "a.wav", folder / "c.wav")
    p = _upload_with_key(folder, "copies", base, key, tiny_model)
    try:
        said = _stderr_until(p, "1 file had the same bytes as another")
        for job in [line.split("(job ")[1].rstrip(")\n") for line in said if line.startswith("uploaded 1 file (job ")]:
            assert requests.post(f"{base}/v1/jobs/{job}/cancel", headers=h, timeout=30).status_code == 200
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert "1 of 3 files is in the library already: not sent again\n" in said, said
    assert said[-1] == "1 file had the same bytes as another and is stored once: c.wav (= a.wav)\n", said
    assert err.count("cancelled: 1 file of job ") == 2 and json.loads(out)["skipped"] == 1, (out, err)


def test_a_folder_is_sent_whole_where_the_shell_allows_few_open_files(start_api, new_key, tmp_path, tiny_model):
    """`clapq upload` holds every file of a request open while it streams them, up to 128 files. Under a soft
    limit of open files below that (`ulimit -n 128`, or 256 where the interpreter and libraries hold more),
    the files past the limit were not sent, each said "cannot be read (Too many open files)", at every request,
    and the upload exited 1 (helper-62's soak). A request now holds no more files than the limit leaves room for."""
    import resource

    base, key = start_api(), new_key()
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        write(folder / f"t{i:02d}.wav", 0.2, seed=6200 + i)

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "few fds", "--no-wait",
                          "--url", base, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL, preexec_fn=few_files)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Too many open files" not in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["files"], summary["not_sent"], summary["unreadable"]) == (60, 0, 0)
    h = {"Authorization": f"Bearer {key}"}
    lib = requests.get(f"{base}/v1/libraries", headers=h, timeout=30).json()["libraries"][0]
    assert lib["item_count"] == 60


def test_an_upload_no_worker_can_embed_says_why_it_waits(start_api, new_key, env, tmp_path, tiny_model):
    """`clapq upload` into a service with no live worker (only the API runs: its queue, another Redis database,
    has no worker) showed its files processed and, after a minute, "no progress for N min", as if the workers
    were slow. It says why nothing moves, as the job does (`waiting`), from its first line of progress; at a
    terminal on a line of its own, once (longer than the terminal is wide, the line updated in place would wrap
    and leave a line behind at each update)."""
    import pty

    from api.jobs import NO_WORKER

    base, key = start_api(REDIS_URL=env["REDIS_URL"].rsplit("/", 1)[0] + "/8"), new_key()
    folder = tmp_path / "idle"
    folder.mkdir()
    write(folder / "a.wav", 0.5, seed=69)
    write(folder / "b.wav", 0.5, seed=70)
    proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "idle", "--url",
                             base, "--key", key], env=_env(tiny_model), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    said = _stderr_lines(proc, 120, lambda said: any("waiting:" in line for line in said))
    assert f"0/2 files processed (0%); waiting: {NO_WORKER}" in said, said
    # again at a terminal: it sends nothing (the library holds both) and waits for the first run's files
    main, tty = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "idle", "--url",
                             base, "--key", key], env=_env(tiny_model), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=tty, start_new_session=True)
    seen, deadline = b"", time.monotonic() + 120
    try:
        while seen.count(b"; waiting (see above)") < 3 and time.monotonic() < deadline:  # three updates
            if select.select([main], [], [], 1.0)[0]:
                seen += os.read(main, 4096)
    finally:
        _stop_at_terminal(proc, main, tty)
    out = seen.decode(errors="replace")
    assert out.count(f"waiting: {NO_WORKER}") == 1, out
    assert out.count("\r0/2 files processed (0%); waiting (see above)\x1b[K") >= 3, out


def test_the_time_left_after_a_wait_is_at_the_pace_since_the_files_moved(tiny_model):
    """Clips queued behind another job's long recording: `clapq upload` (and `clapq jobs wait`) measured its pace
    from its first look, the wait behind the recording included, and once the clips moved said "1/4 files
    processed (19%, about 7 min left)" of files that took a second more. The pace is measured from the last look
    at which the job was waiting. A stand-in API: waiting for 10 s, then 30%, at 20 s 60% (about 7 s left at the
    pace since the wait; 13 s at the pace since the start), then done."""
    lib, model = "0b1c2d3e-1111-2222-3333-444455556666", {"id": 1, "name": "m", "weights_sha256": "x", "dim": 512}
    job, start = "9a8b7c6d-1111-2222-3333-444455556666", time.monotonic()

    def state() -> dict:
        t = time.monotonic() - start
        status, share = ("queued", 0.0) if t < 10 else ("running", 0.3) if t < 20 else ("running", 0.6) \
            if t < 22 else ("done", 1.0)
        counts = {"queued": 4 if t < 10 else 0, "running": 4 if 10 <= t < 22 else 0, "done": 4 if t >= 22 else 0,
                  "failed": 0, "cancelled": 0, "total": 4, "duplicates": 0}
        return {"id": job, "library_id": lib, "status": status, "counts": counts, "progress": share, "eta_s": None,
                "waiting": "behind a long recording" if t < 10 else None, "errors": [], "warnings": [],
                "created_at": "2026-12-07T12:00:00+00:00", "finished_at": None}

    def answer(method, path):
        if path.startswith(f"/v1/jobs/{job}/items"):
            return 200, {"items": [], "next_cursor": None}, {}
        if path.startswith(f"/v1/jobs/{job}"):
            return 200, state(), {}
        if path.startswith(f"/v1/libraries/{lib}"):
            return 200, {"id": lib, "name": "clips", "item_count": 4, "model": model}, {}
        if path.startswith("/v1/limits"):
            return 200, {"model": model}, {}
        return 404, {"error": {"code": "not_found", "message": "not found", "status": 404}}, {}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "jobs", "wait", job, "--url", url, "--key", "cq_x"],
                             env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    lines = out.stderr.splitlines()
    assert out.returncode == 0 and "0/4 files processed (0%); waiting: behind a long recording" in lines, out
    # at 30%, a second after the wait: no pace yet (it said "about 23 s left", at the pace since the first look)
    assert "0/4 files processed (30%)" in lines, lines
    sixty = r"0/4 files processed \(60%, about (\d+) s left\)"
    left = [int(m[1]) for line in lines if (m := re.fullmatch(sixty, line))]
    assert len(left) == 1 and left[0] <= 10, lines


def test_a_reason_to_wait_that_counts_its_seconds_is_not_written_at_every_poll(start_api, new_key, settings,
                                                                              serving_worker, tiny_model):
    """A worker killed mid-job: its job waits for the maintenance loop, saying its running files have not been
    heard from "for 45 s ... in about 75 s", a count that moves every second. `clapq upload` (and `clapq jobs
    wait`) wrote that reason again at each poll, as a new one: in a log a line a second, and at a terminal a line
    a second above the one updated in place, for the two minutes the files wait (helper-117: 75 lines). A reason
    whose figures alone changed is written again at most once a LOG_EVERY_S."""
    import pty

    from sqlalchemy import text

    from tests.test_jobs import job_rows

    base, key = start_api(), new_key()
    lib = requests.post(f"{base}/v1/libraries", json={"name": "killed"}, headers={"Authorization": f"Bearer {key}"},
                        timeout=30).json()
    job, ids = job_rows(settings, lib["id"], [("a", 1_000_000, "done"), ("b", 1_000_000, "running")])
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET updated_at = now() - make_interval(secs => :s) WHERE id = :i"),
                  {"s": 3 * settings.heartbeat_s + 5, "i": ids["b"]})
    said = "waiting: its running file has not been heard from for "
    cmd = [sys.executable, "-m", "clapq.cli", "jobs", "wait", str(job), "--url", base, "--key", key]
    proc = subprocess.Popen(cmd, env=_env(tiny_model), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = _stderr_lines(proc, 8)
    assert sum(said in line for line in lines) == 1, lines
    main, tty = pty.openpty()
    proc = subprocess.Popen(cmd, env=_env(tiny_model), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=tty, start_new_session=True)
    seen, deadline = b"", time.monotonic() + 8
    try:
        while time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 4096)
    finally:
        _stop_at_terminal(proc, main, tty)
    out = seen.decode(errors="replace")
    assert out.count(said) == 1 and out.count("; waiting (see above)") >= 4, out


def test_a_retry_said_during_a_wait_at_a_terminal_takes_the_progress_lines_place(tiny_model):
    """At a terminal a wait's line of progress is updated in place, with no newline; a 503 (or 429) met meanwhile
    was written on at its end, "0/4 files processed (50%)clapq: GET ...: the API is unavailable" (helper-131). It
    now clears that line first, and the progress is written again below it."""
    import pty

    lib, model = "0b1c2d3e-1111-2222-3333-444455556677", {"id": 1, "name": "m", "weights_sha256": "x", "dim": 512}
    job, looks = "9a8b7c6d-1111-2222-3333-444455556677", [0]

    def answer(method, path):
        if path.startswith(f"/v1/jobs/{job}/items"):
            return 200, {"items": [], "next_cursor": None}, {}
        if path.startswith(f"/v1/jobs/{job}"):
            looks[0] += 1
            if looks[0] == 4:
                return 503, {"error": {"code": "unavailable", "message": "restarting", "status": 503}}, \
                    {"Retry-After": "1"}
            ended = looks[0] > 5
            counts = {"queued": 0, "running": 0 if ended else 4, "done": 4 if ended else 0, "failed": 0,
                      "cancelled": 0, "total": 4, "duplicates": 0}
            return 200, {"id": job, "library_id": lib, "status": "done" if ended else "running", "counts": counts,
                         "progress": 1.0 if ended else 0.5, "eta_s": None, "waiting": None, "errors": [],
                         "warnings": [], "created_at": "2026-12-07T12:00:00+00:00", "finished_at": None}, {}
        if path.startswith(f"/v1/libraries/{lib}"):
            return 200, {"id": lib, "name": "clips", "item_count": 4, "model": model}, {}
        if path.startswith("/v1/limits"):
            return 200, {"model": model}, {}
        return 404, {"error": {"code": "not_found", "message": "not found", "status": 404}}, {}

    main, tty = pty.openpty()
    with fake_api(answer) as url:
        proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "jobs", "wait", job, "--url", url, "--key",
                                 "cq_x"], env=_env(tiny_model), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=tty, start_new_session=True)
        seen, deadline = b"", time.monotonic() + 30
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if select.select([main], [], [], 0.5)[0]:
                    seen += os.read(main, 4096)
            while select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 4096)
        finally:
            with contextlib.suppress(ProcessLookupError):  # it ended
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            os.close(main)
            os.close(tty)
    out = seen.decode(errors="replace")
    said = f"clapq: GET /v1/jobs/{job}: the API is unavailable for now (restarting); trying again in 1 s"
    assert proc.returncode == 0 and f"\r\x1b[K{said}" in out and "%)clapq" not in out, out
    assert "\r4/4 files processed (100%)" in out.split(said)[1], out


def _stderr_lines(proc, seconds: float, enough: Callable[[list], bool] = lambda lines: False) -> list[str]:
    """The lines a `clapq` run (started in a session of its own, its stderr a text pipe) writes for `seconds`, or
    until they are `enough`; then it is killed."""
    lines, deadline = [], time.monotonic() + seconds
    try:
        while not enough(lines) and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 0.5)[0]:
                line = proc.stderr.readline()
                if not line:
                    break
                lines.append(line.rstrip("\n"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return lines


def _stop_at_terminal(proc, main: int, tty: int) -> None:
    """Kill a `clapq` run at a pseudo-terminal (its session), and close the terminal's two ends."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    os.close(main)
    os.close(tty)


def test_a_reason_to_wait_that_comes_and_goes_is_written_once_at_a_terminal(start_api, new_key, env, tmp_path,
                                                                            tiny_model):
    """A job's `waiting` that comes and goes (a job whose tasks take turns with another tenant's is behind its
    files between its own; here a worker of its model that comes, says it serves, and goes): at a terminal the
    reason was written on a line of its own again at each return. It is written once; the line updated in place
    says "waiting (see above)" while it holds, and nothing while it does not."""
    import pty

    import redis

    from api.jobs import NO_WORKER
    from clapq.presence import SERVING

    db = env["REDIS_URL"].rsplit("/", 1)[0] + "/9"
    base, key = start_api(REDIS_URL=db), new_key()
    folder = tmp_path / "turns"
    folder.mkdir()
    write(folder / "a.wav", 0.5, seed=71)
    r = redis.Redis.from_url(db)
    main, tty = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "turns", "--url",
                             base, "--key", key], env=_env(tiny_model), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=tty, start_new_session=True)
    seen, serving = b"", None

    def until(count: int, what: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 120
        while seen.count(what) < count and time.monotonic() < deadline:
            if select.select([main], [], [], 1.0)[0]:
                seen += os.read(main, 4096)
        assert seen.count(what) >= count, seen

    try:
        until(1, b"; waiting (see above)\x1b[K")
        lib = requests.get(f"{base}/v1/libraries", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
        serving = SERVING.format(model=lib["libraries"][0]["model"]["id"])
        r.zadd(serving, {"test": r.time()[0] + 3600})  # a worker of its model says it serves (none takes the file)
        until(1, b"files processed (0%)\x1b[K")
        r.delete(serving)  # and is gone
        until(seen.count(b"; waiting (see above)\x1b[K") + 2, b"; waiting (see above)\x1b[K")
    finally:
        if serving is not None:
            r.delete(serving)
        _stop_at_terminal(proc, main, tty)
    out = seen.decode(errors="replace")
    assert out.count(f"waiting: {NO_WORKER}") == 1, out


def test_clapq_libraries_lists_the_callers_libraries(start_api, new_key, tiny_model, settings):
    """`clapq libraries`: each of the key's libraries on a line (its files, id and name), none of another
    tenant's; `--json` the API's answer; none yet says how one is made. A new user learnt their libraries' names
    only from the error of a wrong `--library` (helper-71). A library bound to another model than the service runs
    says so on its line: its searches and uploads answer 409 (helper-85)."""
    base, key, other = start_api(), new_key(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    made = [requests.post(f"{base}/v1/libraries", json={"name": name}, headers=h, timeout=30).json()
            for name in ("field recordings", "foley")]
    requests.post(f"{base}/v1/libraries", json={"name": "theirs"}, headers={"Authorization": f"Bearer {other}"},
                  timeout=30).raise_for_status()

    def libraries(k: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", "libraries", "--url", base, "--key", k, *extra],
                              env=_env(tiny_model), capture_output=True, text=True, timeout=120)

    out = libraries(key)
    assert out.returncode == 0 and out.stdout.splitlines() == [
        f"       0  {lib['id']}  {lib['name']}" for lib in made], out.stdout + out.stderr
    out = libraries(key, "--json")
    assert out.returncode == 0 and [(lib["id"], lib["name"], lib["item_count"]) for lib in json.loads(out.stdout)] \
        == [(lib["id"], lib["name"], 0) for lib in made], out.stdout + out.stderr
    out = libraries(new_key())
    assert out.returncode == 0 and out.stdout == "" and \
        out.stderr == "no libraries yet: `clapq upload FOLDER --library NAME` makes one\n", out.stderr
    from sqlalchemy import text

    from clapq.db import session_scope

    with session_scope(settings.database_url) as s:  # as after a restart of the service on another CLAPQ_MODEL
        retired = s.execute(text("INSERT INTO models (name, weights_sha256, dim) VALUES ('retired', :w, 512) "
                                 "RETURNING id"), {"w": uuid.uuid4().hex * 2}).scalar()
        s.execute(text("UPDATE libraries SET model_id = :m WHERE id = :l"), {"m": retired, "l": made[1]["id"]})
    out = libraries(key)
    assert out.returncode == 0 and out.stdout.splitlines() == [
        f"       0  {made[0]['id']}  field recordings",
        f"       0  {made[1]['id']}  foley  (model {retired} (retired), not the one this service runs: it is searched "
        "and takes files only where that model runs; `clapq reembed --library foley --into NEW` embeds its files with "
        "this one)"], out.stdout + out.stderr
    # an empty new name is said so (it was "give a library name or id": an id is never a new name), and the name a
    # library has already is said so, exit 0 (it was "renamed library 'foley' (...) to 'foley'")
    out = libraries(key, "rename", "foley", " ")
    assert out.returncode == 2 and "argument NEW: the new name is empty: give the name the library is to have" in \
        out.stderr and "library name or id" not in out.stderr, out.stderr
    for given in ("foley", made[1]["id"]):
        out = libraries(key, "rename", given, " foley")
        assert out.returncode == 0 and out.stdout == f"library 'foley' ({made[1]['id']}) has that name already: " \
            "nothing renamed\n", out.stdout + out.stderr
    # renamed, by name or id; a name taken is the API's sentence, exit 1
    out = libraries(key, "rename", "foley", "foley, old")
    assert out.returncode == 0 and out.stdout == f"renamed library 'foley' ({made[1]['id']}) to 'foley, old'\n", \
        out.stdout + out.stderr
    out = libraries(key, "rename", made[1]["id"], "field recordings")
    assert out.returncode == 1 and out.stderr.endswith("failed (409): a library named 'field recordings' already "
                                                       "exists\n"), out.stderr
    out = libraries(key)
    assert [line.strip().split("  ")[2] for line in out.stdout.splitlines()] == ["field recordings", "foley, old"], out.stdout


def _jobs(base: str, key: str, tiny_model, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clapq.cli", "jobs", *args, "--url", base, "--key", key],
                          env=_env(tiny_model), capture_output=True, text=True, timeout=300)


def test_clapq_jobs_shows_a_jobs_failed_files_with_their_item_ids_and_retries_them(start_api, new_key, worker,
                                                                                    tmp_path, tiny_model):
    """`clapq jobs`, `jobs show`, `jobs retry`, `jobs wait` and `jobs cancel` against a real API and worker: a job
    of broken files is listed with its counts; shown with each failed file's path, item id (what `clapq delete`
    takes) and why, the first 20 and how many more, or all with --all; retried and followed to its end (exit 1, as
    its files fail again); a cancel with nothing to stop is the API's sentence, exit 1. `clapq upload` names the
    item id of each failed file too. Before, only curl could reach a job an upload left behind (helper-72)."""
    base, key = start_api(), new_key()
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    write(folder / "good.wav", 0.5, seed=72)
    for i in range(22):
        (folder / "sub" / f"b{i:02}.wav").write_bytes(b"not audio %d" % i)
    up = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "mixed", "--url", base,
                         "--key", key], env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert up.returncode == 1, up.stderr
    job = json.loads(up.stdout)["jobs"][0]
    h = {"Authorization": f"Bearer {key}"}
    failed = requests.get(f"{base}/v1/jobs/{job}/items", params={"status": "failed", "limit": 500}, headers=h,
                          timeout=30).json()["items"]
    lines = [f"failed: {i['metadata']['path']} (item {i['id']}): {i['error']}" for i in failed]
    assert len(lines) == 22 and all(line in up.stderr.splitlines() for line in lines), up.stderr

    out = _jobs(base, key, tiny_model)
    assert out.returncode == 0 and out.stdout.splitlines()[1:] == [
        f"{out.stdout.splitlines()[1][:16]}  {job}  done_with_errors  1/22/23            mixed"], out.stdout
    assert out.stdout.splitlines()[0].split() == ["created", "(UTC)", "job", "state", "done/failed/total", "library"]
    listed = json.loads(_jobs(base, key, tiny_model, "--json").stdout)
    assert [(j["id"], j["status"], j["counts"]["failed"]) for j in listed] == [(job, "done_with_errors", 22)], listed

    out = _jobs(base, key, tiny_model, "show", job)
    shown = out.stdout.splitlines()
    assert out.returncode == 0 and shown[0].startswith(f"job {job}: done_with_errors, library 'mixed' ("), out.stdout
    assert shown[2] == "23/23 files processed (100%): 1 done, 22 failed", out.stdout
    assert shown[3:] == lines[:20] + [f"... and 2 more failed files: `clapq jobs show {job} --all` lists them"], shown
    out = _jobs(base, key, tiny_model, "show", job.upper(), "--all")  # any form of the id
    assert out.returncode == 0 and out.stdout.splitlines()[3:] == lines, out.stdout
    out = _jobs(base, key, tiny_model, "show", job, "--json", "--all")
    assert [e["item_id"] for e in json.loads(out.stdout)["errors"]] == [i["id"] for i in failed], out.stdout

    out = _jobs(base, key, tiny_model, "retry", job)
    assert out.returncode == 0 and out.stdout == (f"job {job}: 22 files queued again; `clapq jobs wait {job}` follows "
                                                  "it to its end\n"), out.stdout + out.stderr
    out = _jobs(base, key, tiny_model, "wait", job)
    assert out.returncode == 1 and out.stdout == f"job {job}: done_with_errors: 1 done, 22 failed\n", out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("failed: ")] == lines, out.stderr
    assert "23/23 files processed (100%)" in out.stderr, out.stderr
    out = _jobs(base, key, tiny_model, "cancel", job)
    assert out.returncode == 1 and out.stderr == (f"clapq: cannot cancel job {job}: nothing of this job's is queued "
                                                  "or running; nothing to cancel\n"), out.stderr

    # another tenant's job is no job of theirs; a malformed id is said before anything is asked
    other = new_key()
    for cmd in ("show", "wait", "cancel", "retry"):
        out = _jobs(base, other, tiny_model, cmd, job)
        assert out.returncode == 1 and out.stderr.startswith(f"clapq: no job {job} (`clapq jobs` lists yours"), \
            (cmd, out.stderr)
    out = _jobs(base, key, tiny_model, "show", "96d2439e-0a6f")
    assert out.returncode == 2 and "argument JOB: '96d2439e-0a6f' is not a job id" in out.stderr, out.stderr
    out = _jobs(base, other, tiny_model)
    assert out.returncode == 0 and out.stdout == "" and \
        out.stderr == "no jobs yet: `clapq upload FOLDER --library NAME` makes one\n", out.stderr
    assert json.loads(_jobs(base, other, tiny_model, "--json").stdout) == []


def test_clapq_jobs_says_why_a_job_waits_and_cancels_and_requeues_it(start_api, new_key, env, tmp_path, tiny_model):
    """Jobs no worker can embed (only the API runs: its queue, another Redis database, has no worker): `clapq jobs`
    and `jobs show` say why they wait, as `clapq upload` does; `jobs cancel` stops one and `jobs retry` queues its
    files again, and a second retry is the API's 409 sentence, exit 1. `--limit` shows the newest, and says there
    are older ones."""
    from api.jobs import NO_WORKER

    base, key = start_api(REDIS_URL=env["REDIS_URL"].rsplit("/", 1)[0] + "/8"), new_key()
    jobs = []
    for n in range(2):
        folder = tmp_path / f"idle{n}"
        folder.mkdir()
        write(folder / "a.wav", 0.5, seed=720 + n)
        write(folder / "b.wav", 0.5, seed=730 + n)
        up = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "idle", "--no-wait",
                             "--url", base, "--key", key], env=_env(tiny_model), capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stderr
        jobs += json.loads(up.stdout)["jobs"]
    first, last = jobs
    out = _jobs(base, key, tiny_model)
    rows = out.stdout.splitlines()
    assert out.returncode == 0 and [r.split()[2:6] for r in rows[1::2]] == [
        [last, "queued", "0/0/2", "idle"], [first, "queued", "0/0/2", "idle"]], out.stdout
    assert rows[2::2] == [f"    waiting: {NO_WORKER}"] * 2, out.stdout
    out = _jobs(base, key, tiny_model, "--limit", "1")
    assert [r.split()[2] for r in out.stdout.splitlines()[1::2]] == [last], out.stdout
    assert out.stderr == "older jobs: `clapq jobs --limit 2` shows more\n", out.stderr

    out = _jobs(base, key, tiny_model, "show", first)
    assert out.returncode == 0 and out.stdout.splitlines()[2:] == [
        "0/2 files processed (0%): 2 queued", f"waiting: {NO_WORKER}"], out.stdout
    out = _jobs(base, key, tiny_model, "cancel", first)
    assert out.returncode == 0 and out.stdout.startswith(f"cancelled job {first}: 2 cancelled ("), out.stdout
    out = _jobs(base, key, tiny_model, "show", first)
    assert out.stdout.splitlines()[0].startswith(f"job {first}: cancelled, ") and \
        out.stdout.splitlines()[2] == "0/2 files processed (0%): 2 cancelled", out.stdout
    out = _jobs(base, key, tiny_model, "retry", first)
    assert out.returncode == 0 and out.stdout.startswith(f"job {first}: 2 files queued again;"), out.stdout
    assert _jobs(base, key, tiny_model, "show", first).stdout.splitlines()[2] == "0/2 files processed (0%): 2 queued"
    out = _jobs(base, key, tiny_model, "retry", first)
    assert out.returncode == 1 and out.stderr == (f"clapq: cannot retry job {first}: nothing of this job's failed "
                                                  "or was cancelled; nothing to retry\n"), out.stderr


def test_files_that_failed_in_their_bytes_are_not_sent_again_until_they_change(start_api, new_key, worker, tmp_path,
                                                                                 tiny_model):
    """A folder uploaded every night (cron) with broken files in it: each run sent them again (their bytes over
    HTTP), the worker decoded them again (a file that hangs its decoder held one for CLAPQ_DECODE_TIMEOUT_S), and
    the run told them as new failures and exited 1 (helper-74). A file that failed for a reason in its bytes is
    now sent once: later runs leave it out, say so, and exit 0 where nothing else went wrong; `--retry-failed`
    sends it again, and so does a change of its bytes (the file fixed in place). An HTTP client that sends the
    bytes itself retries them, as before."""
    folder = tmp_path / "Sounds"
    folder.mkdir()
    write(folder / "good.wav", 0.5, seed=7)
    (folder / "list.wav").write_bytes(b"a shopping list, not audio\n" * 20)
    (folder / "noise.ogg").write_bytes(os.urandom(3000))
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}

    def upload(*extra: str) -> tuple[subprocess.CompletedProcess, dict]:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "upload", str(folder), "--library", "nightly",
                              "--url", base, "--key", key, *extra], env=_env(tiny_model), capture_output=True,
                             text=True, timeout=300)
        return out, json.loads(out.stdout or "{}")

    def decodes(item_id: str) -> int:  # the worker's log says each failure, once a try
        return sum('"item failed"' in line and item_id in line for line in worker.output().splitlines())

    out, summary = upload()
    assert out.returncode == 1 and summary["failed"] == 2 and summary.get("failed_before", 0) == 0, out.stderr
    lib = summary["library_id"]
    failed = {i["metadata"]["path"]: i["id"] for i in requests.get(
        f"{base}/v1/libraries/{lib}/items", params={"status": "failed"}, headers=h, timeout=30).json()["items"]}
    assert sorted(failed) == ["list.wav", "noise.ogg"] and all(decodes(i) == 1 for i in failed.values()), failed

    out, summary = upload()  # the next night: nothing sent, nothing decoded, nothing told as new
    assert out.returncode == 0, out.stderr
    assert summary["jobs"] == [] and summary["failed"] == 0 and summary["failed_before"] == 2, summary
    assert summary["skipped"] == 1, summary  # good.wav
    assert "uploading" not in out.stderr and "failed:" not in out.stderr, out.stderr
    assert ("2 files failed before and were not sent again (`clapq upload --retry-failed` sends them, or `clapq "
            "jobs retry`): list.wav, noise.ogg") in out.stderr.splitlines(), out.stderr
    assert all(decodes(i) == 1 for i in failed.values()), worker.output()[-3000:]

    out, summary = upload("--retry-failed")  # asked for: sent, decoded and told again
    assert out.returncode == 1 and len(summary["jobs"]) == 1 and summary["failed"] == 2, out.stderr
    assert summary["failed_before"] == 0 and "uploading 2 files" in out.stderr, out.stderr
    assert all(decodes(i) == 2 for i in failed.values()), worker.output()[-3000:]

    write(folder / "list.wav", 0.5, seed=8)  # fixed in place: other bytes at the same path are sent
    out, summary = upload()
    assert out.returncode == 0 and len(summary["jobs"]) == 1 and summary["failed_before"] == 1, out.stderr
    assert "uploading 1 file" in out.stderr and "sends it, or `clapq jobs retry`): noise.ogg" in out.stderr, out.stderr
    job = requests.get(f"{base}/v1/jobs/{summary['jobs'][0]}", headers=h, timeout=30).json()
    assert job["status"] == "done" and job["counts"]["done"] == 1, job
    assert decodes(failed["noise.ogg"]) == 2

    # bytes sent by hand (curl) are a retry of the failed item, as they always were
    r = requests.post(f"{base}/v1/libraries/{lib}/batches", headers=h, timeout=60,
                      files=[("files", ("noise.ogg", (folder / "noise.ogg").read_bytes()))])
    assert r.status_code == 202 and r.json()["items"][0]["retry_of"] == "failed", r.json()


@pytest.mark.parametrize("code", ["model_unavailable", "code_changed"])
def test_a_model_the_api_cannot_serve_stops_the_command_at_once(tiny_model, code):
    """A 503 `model_unavailable` (the API cannot load its CLAP checkpoint, or its weights were replaced while it
    ran) is not an outage that waiting mends: the command stops at once with the API's sentence, exit 1. It was
    taken for one, and `clapq search` said "trying again in 5 s" for 10 minutes before it gave up. Nor is a 503
    `code_changed` (clapq upgraded in place under the API, a search clip's decoder would run other code)."""
    why = ("the weights in /srv/clap changed while clapq ran: ...; restart every clapq process (API, workers) so "
           "that each serves the checkpoint now there")

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 3}]}, {}
        return 503, {"error": {"code": code, "message": why, "status": 503}}, {"Retry-After": "5"}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "x", "--url", url,
                              "--key", "cq_x"], env=_env(tiny_model), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == "", out.stdout
    assert "trying again" not in out.stderr and why in out.stderr, out.stderr


def test_a_deletion_whose_answer_was_lost_does_not_report_what_it_deleted_as_missing(tmp_path, tiny_model):
    """`clapq delete LIB ID...` whose POST /deletions loses its connection after the API deleted the items (a
    restart, a proxy's timeout): the request is sent again, and the API, rightly, finds those ids no more. The
    command said "no item ..." for each file it had deleted and exited 1. Now ids not found after a lost try are
    said to be gone, maybe by the lost try, and are not a failure; without a lost try they still are (exit 1)."""
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    posts = []

    def answer(method, path):
        if path == "/v1/libraries":
            return 200, {"libraries": [{"id": "lib1", "name": "x", "item_count": 2}]}, {}
        if path.endswith("/deletions"):
            posts.append(path)
            if len(posts) == 1 and drop:
                return "drop"  # the API deleted them; its answer never came
            return 200, {"deleted": {"items": 0, "stored_files": 0, "files": []}, "not_found": ids}, {}
        return 404, {"error": {"code": "not_found", "message": "no such item", "status": 404}}, {}

    for drop in (True, False):
        posts.clear()
        with fake_api(answer) as url:
            out = subprocess.run([sys.executable, "-m", "clapq.cli", "delete", *ids, "--library", "x", "--url", url,
                                  "--key", "k"], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
        if drop:
            assert out.returncode == 0 and len(posts) == 2, (posts, out.stderr)
            assert f"the connection to {url} was lost during POST /v1/libraries/lib1/deletions" in out.stderr
            for i in ids:
                assert (f"clapq: {i} is no item of library 'x' now: the connection was lost while it was being "
                        "deleted, and the try whose answer was lost may have deleted it") in out.stderr, out.stderr
            assert "no item" not in out.stderr.replace("is no item of", ""), out.stderr
        else:
            assert out.returncode == 1 and len(posts) == 1, (posts, out.stderr)
            assert all(f"clapq: no item {i!r} in library 'x'" in out.stderr for i in ids), out.stderr


def test_a_data_directory_copied_as_root_while_it_ran_starts_its_own_postgres(tmp_path):
    """A copy of a data directory (`cp -r`, taken while `clapq up` ran, then started beside the original) holds
    the original's postmaster.pid, whose pid is a live Postgres of another directory: pgserver took it for this
    copy's server and connected to the socket it names, so the copy served the original's database (or failed
    where the original had stopped and the pid was another process's, as after a power cut). And as root, `cp -r`
    made the files root's where Postgres runs as `pgserver`: it stopped on "Permission denied" (helper-97).
    Now the copy starts a server of its own, on its own files."""
    import psycopg2

    from clapq.embedded import EmbeddedPostgres

    def one(url: str, sql: str):
        with contextlib.closing(psycopg2.connect(url.replace("+psycopg2", ""))) as c, c.cursor() as cur:
            cur.execute(sql)
            c.commit()
            return cur.fetchone() if cur.description else None

    original = EmbeddedPostgres(tmp_path / "a" / "pg")
    url = original.start()
    one(url, "CREATE TABLE t (v text); INSERT INTO t VALUES ('before the copy')")
    original.stop()
    (tmp_path / "b").mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "a" / "pg"), str(tmp_path / "b" / "pg")], check=True)
    url = original.start()
    try:
        # as a copy taken now would hold it
        shutil.copyfile(tmp_path / "a" / "pg" / "postmaster.pid", tmp_path / "b" / "pg" / "postmaster.pid")
        copy = EmbeddedPostgres(tmp_path / "b" / "pg")
        try:
            copy_url = copy.start()
            assert str(tmp_path / "b" / "pg") in copy_url, copy_url
            one(copy_url, "INSERT INTO t VALUES ('in the copy')")
            assert one(copy_url, "SELECT string_agg(v, ',' ORDER BY v) FROM t") == ("before the copy,in the copy",)
            assert one(url, "SELECT string_agg(v, ',' ORDER BY v) FROM t") == ("before the copy",)
        finally:
            copy.stop()
    finally:
        original.stop()
    # a postmaster.pid whose pid is a process that is no Postgres (a power cut, the pid given to another since)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        pidfile = tmp_path / "b" / "pg" / "postmaster.pid"
        pidfile.write_text(f"{sleeper.pid}\n{tmp_path / 'b' / 'pg'}\n1\n5432\n{tmp_path / 'elsewhere'}\n\n0 0\nready\n")
        copy = EmbeddedPostgres(tmp_path / "b" / "pg")
        try:
            assert one(copy.start(), "SELECT count(*) FROM t") == (2,)
        finally:
            copy.stop()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_copy_of_a_running_data_directory_stops_its_own_postgres(tmp_path):
    """A copy taken while `clapq up` ran holds the original's postmaster.pid, set aside as a copy's, and its list of
    the processes holding the server (pgserver's .handle_pids.json), the original's `clapq up` and children: alive,
    so they were kept, and when the copy's last process let go its server was not the last holder's to stop. The
    copy's `clapq up` stopped (Ctrl-C) and left its Postgres running on the copy for good. Where the pid file is set
    aside, no process holds that server: the list goes too. Here a sleep stands for the original's processes."""
    from clapq.embedded import EmbeddedPostgres

    original = EmbeddedPostgres(tmp_path / "a" / "pg")
    original.start()
    original.stop()
    (tmp_path / "b").mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "a" / "pg"), str(tmp_path / "b" / "pg")], check=True)
    original.start()
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        copied = tmp_path / "b" / "pg"
        shutil.copyfile(tmp_path / "a" / "pg" / "postmaster.pid", copied / "postmaster.pid")  # as a copy taken now
        (copied / ".handle_pids.json").write_text(json.dumps([sleeper.pid]))
        copy = EmbeddedPostgres(copied)
        copy.start()
        started = int((copied / "postmaster.pid").read_text().split()[0])
        copy.stop()
        assert not psutil.pid_exists(started) or psutil.Process(started).status() == psutil.STATUS_ZOMBIE, \
            "the copy's Postgres still runs"
    finally:
        sleeper.kill()
        sleeper.wait()
        original.stop()


def test_a_running_service_backed_up_is_restored_elsewhere_with_the_same_results(tmp_path, tiny_model, up_runner):
    """README "Backups and moving": `clapq backup DEST` while `clapq up` runs, `clapq restore DEST --data-dir NEW`,
    then `clapq up --data-dir NEW` serves the same items, search results (ids and scores), jobs and owner key, and
    takes new uploads; what was deleted after the backup is back, with its file. There was no way but copying
    the data directory, which is no backup while the service runs (helper-97)."""
    cli = [sys.executable, "-m", "clapq.cli"]
    up = up_runner(tmp_path / "a")
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "l"}, headers=h, timeout=30).json()
    files = [write(tmp_path / f"f{i}.wav", 1.0 + i / 2, 22_050, 1, freq=200 * (i + 1), seed=i) for i in range(5)]
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (p.name, p.read_bytes(), "audio/wav")) for p in files])
    assert _wait_job(base, h, r.json()["job_id"])["counts"]["done"] == 5

    def state(base: str) -> tuple:
        found = requests.get(f"{base}/v1/search", params={"library_id": lib["id"], "q": "a bell", "k": 10},
                             headers=h, timeout=60).json()["results"]
        jobs = requests.get(f"{base}/v1/jobs", headers=h, timeout=30).json()
        return [(x["item_id"], x["score"], x["filename"]) for x in found], jobs

    before = state(base)
    assert len(before[0]) == 5
    out = subprocess.run(cli + ["backup", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "a")],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backed up 5 items and their 5 stored files" in out.stderr, out.stderr
    # after the backup: a file deleted (its stored file removed at once) is in the backup still
    gone = before[0][0][0]
    assert requests.delete(f"{base}/v1/items/{gone}", headers=h, timeout=30).status_code == 200
    again = subprocess.run(cli + ["backup", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "a")],
                           env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "exists already and is not an empty folder" in again.stderr, again.stderr
    assert up.stop() == 0
    # a stored file lost before a backup (its item fails when embedded again) is said, and the rest backed up;
    # a store that holds none of the database's files is not its store
    stored = sorted(p for p in (tmp_path / "a" / "blobs").glob("??/??/*") if p.is_file())
    assert len(stored) == 4
    lost = stored[0].read_bytes()
    stored[0].unlink()
    out = subprocess.run(cli + ["backup", str(tmp_path / "backup-lost"), "--data-dir", str(tmp_path / "a")],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"warning: 1 stored file that items hold is missing from .* \(its name: [0-9a-f]{64}\), as it is "
                     r"in the service: backed up without it;", out.stderr), out.stderr
    # and what to do about it, with the command's --data-dir (it named a digest, and nothing to run)
    assert f"backed up without it; `clapq check --data-dir {tmp_path / 'a'}` names its items and how to mend them, " \
        "and a backup after that holds it" in out.stderr, out.stderr
    assert "backed up 4 items and their 3 stored files" in out.stderr, out.stderr
    # its restore says so too (it said only 'restored 4 items and their 3 stored files'), where the user who
    # restores it may not be the one who saw the backup's warning
    out = subprocess.run(cli + ["restore", str(tmp_path / "backup-lost"), "--data-dir", str(tmp_path / "c")],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("warning: 1 stored file that items hold was missing from the service when it was backed up, and is "
            f"missing here too: `clapq check --data-dir {tmp_path / 'c'}` names their items") in out.stderr, out.stderr
    for p in stored[1:]:
        p.unlink()
    out = subprocess.run(cli + ["backup", str(tmp_path / "backup-none"), "--data-dir", str(tmp_path / "a")],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "none of the 4 stored files that items hold is in" in out.stderr, out.stderr
    assert not (tmp_path / "backup-none").exists()
    stored[0].write_bytes(lost)

    out = subprocess.run(cli + ["restore", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "b")],
                         env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"start it with `clapq up --data-dir {tmp_path / 'b'}`" in out.stderr, out.stderr
    twice = subprocess.run(cli + ["restore", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "b")],
                           env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    # what to do where the backup is to take a data directory's place: a restore onto it is refused, running or not
    # (running, it said "stop it first", and, stopped, "holds clapq's tables already: restore into a new data
    # directory", and no more), and how to put it there is said, the data as it is kept (helper-126)
    b, b_new, b_old = (shlex.quote(f"{tmp_path / 'b'}{end}") for end in ("", ".restored", ".before-restore"))
    in_its_place = (f"a restore goes into a new data directory, and leaves this one as it is. To put the backup in its "
                    f"place: `clapq restore {shlex.quote(str(tmp_path / 'backup'))} --data-dir {b_new}`, then, `clapq "
                    f"up` stopped, `mv {b} {b_old} && mv {b_new} {b}` (its data as it is now kept in {b_old})\n")
    assert twice.returncode == 1 and twice.stderr.endswith(
        f"clapq: {tmp_path / 'b'} holds a clapq service's data already (its database has clapq's tables); nothing in "
        f"it was touched: {in_its_place}"), twice.stderr
    (tmp_path / "a-file").write_text("")
    onto_file = subprocess.run(cli + ["restore", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "a-file")],
                               env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert onto_file.returncode == 1 and "is a file: restore into a new folder" in onto_file.stderr, onto_file.stderr
    assert "Traceback" not in onto_file.stderr
    up = up_runner(tmp_path / "b")
    assert up.wait_ready() == key  # the owner's key, and its file, came along
    running = subprocess.run(cli + ["restore", str(tmp_path / "backup"), "--data-dir", str(tmp_path / "b")],
                             env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert running.returncode == 1 and re.fullmatch(
        rf"clapq: {re.escape(str(tmp_path / 'b'))} is the data directory of a running `clapq up` \(pid \d+\), which "
        rf"holds its data: {re.escape(in_its_place)}", running.stderr), running.stderr
    base = f"http://127.0.0.1:{up.port}"
    assert state(base) == before
    from sqlalchemy import text

    from clapq.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path / "b" / "pg")  # the running one's, shared
    try:
        with session_scope(pg.start()) as s:
            shas = set(s.scalars(text("SELECT sha256 FROM items")))
    finally:
        pg.stop()
    assert len(shas) == 5 and all((tmp_path / "b" / "blobs" / d[:2] / d[2:4] / d).is_file() for d in shas)
    new = write(tmp_path / "new.wav", 1.0, 22_050, 1, freq=1234, seed=9)
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (new.name, new.read_bytes(), "audio/wav"))])
    assert _wait_job(base, h, r.json()["job_id"])["counts"]["done"] == 1
    assert requests.get(f"{base}/v1/libraries/{lib['id']}", headers=h, timeout=10).json()["item_count"] == 6


def _check(tiny_model, data_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clapq.cli", "check", *flags, "--data-dir", str(data_dir)],
                          env=_env(tiny_model), capture_output=True, text=True, timeout=300)


def test_check_finds_missing_damaged_and_unheld_stored_files_and_mends_them(tmp_path, tiny_model, up_runner):
    """README "Checking the stored files": `clapq check` while `clapq up` runs lists the items whose stored file
    was removed by hand, with --verify those whose file no longer hashes to its name (a byte flipped), and the
    stored files no item holds (one dropped into the store), never the file of an upload between its move into
    place and its rows' commit; --remove-orphans removes those no item holds, and `clapq upload --resend` writes
    a missing or damaged copy anew. Nothing told an operator before: a search returned such an item, and its
    download or re-embed failed (helper-99)."""
    from sqlalchemy import text

    from clapq.embedded import EmbeddedPostgres

    data = tmp_path / "a"
    up = up_runner(data)
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "l"}, headers=h, timeout=30).json()
    folder = tmp_path / "music"
    folder.mkdir()
    files = [write(folder / f"f{i}.wav", 1.0 + i / 2, 22_050, 1, freq=200 * (i + 1), seed=i) for i in range(4)]
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (p.name, p.read_bytes(), "audio/wav")) for p in files])
    assert _wait_job(base, h, r.json()["job_id"])["counts"]["done"] == 4
    ids = {x["filename"]: x["id"] for x in r.json()["items"]}
    out = _check(tiny_model, data, "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checked 4 items and 4 stored files" in out.stdout and "agree" in out.stdout, out.stdout

    def at(p: Path) -> Path:
        d = file_sha256(p)
        return data / "blobs" / d[:2] / d[2:4] / d

    at(files[0]).unlink()  # removed by hand, a lost disk
    damaged = bytearray(at(files[1]).read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # bit rot: same size, other bytes
    at(files[1]).write_bytes(bytes(damaged))
    stray = write(tmp_path / "stray.wav", 0.5, 22_050, 1, freq=999, seed=7)  # left by a crash, no row
    at(stray).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stray, at(stray))
    (data / "blobs" / "notes.txt").write_text("an operator's")

    # an upload between its file's move into place and its rows' commit: held there, as its commit waits on a
    # lock of its blob_reclaims row (taken off the queue with the rows' commit)
    flight = write(tmp_path / "flight.wav", 0.7, 22_050, 1, freq=555, seed=8)
    pg = EmbeddedPostgres(data / "pg")  # the running one's, shared
    url = pg.start()
    from clapq.db import get_engine

    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO blob_reclaims (sha256) VALUES (:s)"), {"s": file_sha256(flight)})
    holder = engine.connect()
    holder.execute(text("SELECT 1 FROM blob_reclaims WHERE sha256 = :s FOR UPDATE"), {"s": file_sha256(flight)})
    import threading

    answers: list = []
    sender = threading.Thread(target=lambda: answers.append(requests.post(
        f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=300,
        files=[("files", (flight.name, flight.read_bytes(), "audio/wav"))])))
    checking = None
    try:
        sender.start()
        deadline = time.monotonic() + 60
        while not at(flight).is_file():  # moved into place, its rows not committed
            assert time.monotonic() < deadline and sender.is_alive()
            time.sleep(0.1)
        checking = subprocess.Popen([sys.executable, "-m", "clapq.cli", "check", "--verify", "--json", "--data-dir",
                                     str(data)], env=_env(tiny_model), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)

        def waiting_on_the_blob_lock() -> bool:
            with engine.connect() as conn:
                return bool(conn.scalar(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")))

        while not waiting_on_the_blob_lock():  # the check waits for the upload's commit, before it says anything
            assert time.monotonic() < deadline and checking.poll() is None, checking.communicate()
            time.sleep(0.1)
    finally:
        holder.rollback()
        holder.close()
        sender.join(120)
    assert answers and answers[0].status_code == 202, answers
    stdout, stderr = checking.communicate(timeout=300)
    assert checking.returncode == 1, stdout + stderr
    report = json.loads(stdout)
    assert report["items"] == 5 and report["stored_files"] == 5  # the upload's and the stray one in
    assert [(e["sha256"], [(i["id"], i["library"], i["filename"]) for i in e["items"]]) for e in report["missing"]] \
        == [(file_sha256(files[0]), [(ids["f0.wav"], "l", "f0.wav")])]
    assert [(e["sha256"], e["hashes_to"], [i["filename"] for i in e["items"]]) for e in report["damaged"]] \
        == [(file_sha256(files[1]), hashlib.sha256(damaged).hexdigest(), ["f1.wav"])]
    # the upload's file is not one no item holds: only the stray one is
    assert report["orphans"] == [{"sha256": file_sha256(stray), "bytes": stray.stat().st_size,
                                  "queued_for_removal": False}]
    assert report["other_files"] == [{"path": "notes.txt", "bytes": 13}]
    assert _wait_job(base, h, answers[0].json()["job_id"])["counts"]["done"] == 1

    # the words: each item by its library and file, and what to do
    out = _check(tiny_model, data)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"item {ids['f0.wav']}: library 'l' of tenant " in out.stdout, out.stdout
    # its commands take the --data-dir it was given, as the default one's service is not this one (they said
    # `clapq check --remove-orphans`, which checked another store)
    assert f"--resend --data-dir {data}`" in out.stdout, out.stdout
    assert f"`clapq check --remove-orphans --data-dir {data}` removes it" in out.stdout, out.stdout
    assert "damaged" not in out.stdout  # not read without --verify

    out = _check(tiny_model, data, "--remove-orphans")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"no item holds 1 stored file \([\d.]+ kB\), removed now", out.stdout), out.stdout
    assert not at(stray).exists() and (data / "blobs" / "notes.txt").exists()  # not clapq's: left as it is

    # `clapq upload` sends again the file whose stored copy the server lost, and leaves out the rest the library
    # holds (it left out that one too, and only --resend, which sends every file, mended it); --resend writes
    # every stored copy anew, the damaged one's too, which no upload can tell without reading it
    cli = [sys.executable, "-m", "clapq.cli"]
    for flags in ([], ["--resend"]):
        sent = subprocess.run(cli + ["upload", str(folder), "--library", "l", "--url", base, "--key", key, *flags],
                              env=_env(tiny_model), capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        if not flags:
            summary = json.loads(sent.stdout)
            assert summary["mended"] == 1 and summary["skipped"] == 3 and summary["resent"] == 0, sent.stdout
            assert re.search(r"1 file the library held was sent again, as the server had lost its stored copy "
                             r"\(gone from its disk; .*\): written anew, its item kept: f0\.wav", sent.stderr), sent.stderr
            assert at(files[0]).read_bytes() == files[0].read_bytes() and at(files[1]).read_bytes() == bytes(damaged)
            assert requests.get(f"{base}/v1/items/{ids['f0.wav']}", headers=h, timeout=30).json()["status"] == "done"
    assert json.loads(sent.stdout)["resent"] == 4 and "written anew" in sent.stderr, sent.stdout + sent.stderr
    assert "another upload" not in sent.stderr, sent.stderr
    (data / "blobs" / "notes.txt").unlink()
    out = _check(tiny_model, data, "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checked 5 items and 5 stored files" in out.stdout and "agree" in out.stdout, out.stdout
    for name in ("f0.wav", "f1.wav"):
        got = requests.get(f"{base}/v1/items/{ids[name]}/audio", headers=h, timeout=30)
        assert got.status_code == 200 and got.content == (folder / name).read_bytes()
    with engine.connect() as conn:  # no item, and no row of them, was changed into another
        assert conn.scalar(text("SELECT count(*) FROM items WHERE status = 'done'")) == 5
    engine.dispose()
    pg.stop()


def test_a_backup_that_fills_its_disk_leaves_nothing_behind(settings, small_disk, tmp_path):
    """A backup cut short by a full disk (its stored files larger than the disk it is written to) left
    DEST.partial, as much of the backup as fit, on that full disk, and said only 'No space left on device' with
    the path of a temporary file in it: the disk stayed full until someone found the folder. Now nothing of it
    is kept, and the sentence says so."""
    import random

    from clapq.backup import BackupError, backup
    from clapq.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    for seed in range(3):  # 1.2 MB where 1 MiB fits
        store.put_bytes(random.Random(seed).randbytes(400_000))
    for dest in (small_disk / "bk", small_disk):  # a new folder; the disk's own, empty
        with pytest.raises(BackupError) as caught:
            backup(settings.database_url, store.root, dest, say=lambda m: None)
        assert re.search(r"No space left on device.*nothing of the backup is kept", str(caught.value)), caught.value
        assert sorted(p.name for p in small_disk.iterdir()) == []
        assert os.statvfs(small_disk).f_bfree == os.statvfs(small_disk).f_blocks


@contextlib.contextmanager
def _new_database(settings, prefix: str) -> Iterator[tuple[str, str]]:
    """A new, empty database on the tests' Postgres, its name and URL; dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from clapq.db import get_engine, normalise_url

    admin = create_engine(normalise_url(settings.database_url), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(normalise_url(settings.database_url)).set(database=name).render_as_string(hide_password=False)
    try:
        yield name, url
    finally:
        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture()
def own_database(settings):
    """A new database of its own, migrated, on the tests' Postgres: a backup of the shared one names the stored files
    of every test that ran before (which a test's own store lacks: 'none of the N stored files ... is in')."""
    from clapq.db import migrate

    with _new_database(settings, "bk") as (_, url):
        migrate(url)
        yield url


def test_a_backup_into_an_empty_disk_s_mount_point_is_written_on_that_disk(own_database, small_disk, tmp_path):
    """README: `clapq backup DEST` takes a new or empty folder. An empty one that is a disk's mount point (a USB disk at
    /mnt/backup, the commonest place for a backup) was written beside it, as /mnt/backup.partial on the disk that holds
    /mnt, then renamed over the mount point, which rename(2) refuses: every such backup failed once it had copied
    everything ('Device or resource busy'), onto the wrong disk. It is written in the folder now, its manifest last."""
    from clapq.backup import backup, read_manifest
    from clapq.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    store.put_bytes(b"not one of the database's files")
    manifest = backup(own_database, store.root, small_disk, say=lambda m: None)
    assert read_manifest(small_disk) == manifest
    assert sorted(p.name for p in small_disk.iterdir()) == ["backup.json", "blobs", "clapq.dump"]
    assert not (small_disk.parent / "small.partial").exists()
    # the folder keeps its own mode (a disk's root: 0755 here), so the dump is the owner's alone itself, as blobs/ is
    os.chmod(small_disk, 0o755)
    assert [oct(os.stat(small_disk / name).st_mode & 0o777) for name in ("clapq.dump", "blobs")] == ["0o600", "0o700"]


def test_a_backup_killed_while_moving_its_parts_into_its_folder_is_cleared_by_the_next(own_database, tmp_path):
    """A backup into a folder that exists (empty: a disk's mount point) is written in DEST/.clapq-backup.partial and
    its parts moved up, backup.json last. Killed between two moves (a power cut, SIGKILL: no cleanup runs), it left
    parts beside the partial folder and no backup.json, and every later `clapq backup DEST` refused the folder as
    not empty, where the user had put nothing. The next backup recognises what a backup moved up (the partial
    folder names them while they move) and clears it; a file of the user's beside them stops it, nothing deleted."""
    from clapq.backup import INSIDE, BackupError, backup, read_manifest
    from clapq.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    store.put_bytes(b"a stored file")
    dest = tmp_path / "disk"
    dest.mkdir()
    killed = ("import os, sys\n"
              "from pathlib import Path\n"
              "from clapq.backup import backup\n"
              "real, dest = os.replace, Path(sys.argv[3])\n"
              "def replace(src, dst):\n"
              "    real(src, dst)\n"
              "    if Path(dst).parent == dest:  # the first part moved up: killed, as by a power cut\n"
              "        os._exit(9)\n"
              "os.replace = replace\n"
              "backup(sys.argv[1], Path(sys.argv[2]), dest, say=lambda m: None)\n")

    def kill_while_moving() -> None:
        out = subprocess.run([sys.executable, "-c", killed, own_database, str(store.root), str(dest)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 9, out.stderr
        assert INSIDE in os.listdir(dest) and len(os.listdir(dest)) == 2 and "backup.json" not in os.listdir(dest)

    kill_while_moving()
    said: list[str] = []
    manifest = backup(own_database, store.root, dest, say=said.append)
    assert read_manifest(dest) == manifest
    assert sorted(os.listdir(dest)) == ["backup.json", "blobs", "clapq.dump"]
    assert any("cut short" in line and str(dest) in line for line in said), said
    # a file of the user's beside what was left: the folder is not the backup's to clear
    for name in os.listdir(dest):
        shutil.rmtree(dest / name) if (dest / name).is_dir() else (dest / name).unlink()
    kill_while_moving()
    (dest / "notes.txt").write_text("the user's")
    left = sorted(os.listdir(dest))
    with pytest.raises(BackupError, match="exists already and is not an empty folder"):
        backup(own_database, store.root, dest, say=lambda m: None)
    assert sorted(os.listdir(dest)) == left and (dest / "notes.txt").read_text() == "the user's"


def test_a_second_backup_into_the_same_place_is_refused_while_the_first_runs(own_database, tmp_path, monkeypatch):
    """Two `clapq backup DEST` at once (a cron job and a hand's, or two at once into one empty folder): each began by
    removing the work folder (DEST.partial, DEST/.clapq-backup.partial) as an earlier backup's cut short, so the
    second removed the first's mid-copy and wrote its own there. The second is refused at once now, saying why,
    and the first goes on to a whole backup; one killed leaves no lock (a flock ends with its process: the
    moving-parts test's killed backup is cleared by the next)."""
    import threading

    from clapq import backup as backing
    from clapq.backup import BackupError, backup, read_manifest
    from clapq.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    store.put_bytes(b"a stored file")
    real, copying, go_on = backing._copy_blob, threading.Event(), threading.Event()

    def copy_blob(*args, **kw):
        if threading.current_thread().name == "first":  # the first backup, mid-copy until the second has tried
            copying.set()
            assert go_on.wait(60)
        return real(*args, **kw)

    monkeypatch.setattr(backing, "_copy_blob", copy_blob)
    (tmp_path / "empty").mkdir()
    for dest in (tmp_path / "new", tmp_path / "empty"):
        copying.clear(), go_on.clear()
        first: dict = {}
        thread = threading.Thread(name="first", target=lambda: first.update(
            manifest=backup(own_database, store.root, dest, say=lambda m: None)))
        thread.start()
        try:
            assert copying.wait(60)
            with pytest.raises(BackupError) as caught:
                backup(own_database, store.root, dest, say=lambda m: None)
            assert str(caught.value) == (f"another backup into {dest} is running (its work folder is in use): wait "
                                         "for it to end, or back up into another folder")
        finally:
            go_on.set()
            thread.join(60)
        assert read_manifest(dest) == first["manifest"] and first["manifest"]["files"] == 0, first
        assert sorted(os.listdir(dest)) == ["backup.json", "blobs", "clapq.dump"]
        assert not (tmp_path / "new.partial").exists()
        with pytest.raises(BackupError, match="exists already and is not an empty folder"):  # once it is whole
            backup(own_database, store.root, dest, say=lambda m: None)
        assert read_manifest(dest) == first["manifest"]


def test_a_one_item_service_whose_only_stored_file_is_lost_is_backed_up_with_a_warning(own_database, tmp_path):
    """README "Backups and moving": a backup refuses a store that holds none of the files items name as not the
    database's store, which it took from a one-item service whose only stored file was lost: 'none of the 1
    stored files ... is in', no backup of its database at all. One file missing is one file lost (a warning, the
    rest backed up); the refusal is for several missing, none there, as `clapq check` asks."""
    from clapq.backup import BackupError, backup
    from clapq.blobs import BlobStore
    from clapq.models import Item
    from tests.conftest import job_of_own

    store = BlobStore(tmp_path / "blobs")
    with session_scope(own_database) as s:
        tenant, _, lib, job = job_of_own(s, f"one-{uuid.uuid4()}")
        s.add(Item(tenant_id=tenant.id, library_id=lib.id, job_id=job.id, filename="only.wav", size_bytes=9,
                   sha256=hashlib.sha256(b"lost file").hexdigest()))
    said: list[str] = []
    manifest = backup(own_database, store.root, tmp_path / "bk", say=said.append)
    assert manifest["items"] == 1 and manifest["files"] == 0 and manifest["missing_files"] == 1, manifest
    assert any(line.startswith("warning: 1 stored file that items hold is missing from") for line in said), said
    with session_scope(own_database) as s:  # two, both missing: not this database's store, as before
        s.add(Item(tenant_id=tenant.id, library_id=lib.id, job_id=job.id, filename="other.wav", size_bytes=10,
                   sha256=hashlib.sha256(b"other file").hexdigest()))
    with pytest.raises(BackupError, match="none of the 2 stored files that items hold is in"):
        backup(own_database, store.root, tmp_path / "bk2", say=lambda m: None)
    assert not (tmp_path / "bk2").exists()


def test_a_stored_file_damaged_in_the_service_is_left_out_of_its_backup_which_restores(own_database, tiny_model,
                                                                                      tmp_path):
    """A stored file damaged in the service (bit rot: its bytes no longer its sha256) was copied into the backup as
    it was, and the restore, which checks every file against its name, refused the whole backup for it: 'cannot
    be restored: its stored file ... is damaged'. A service with one such file made backups that none could
    restore, and said nothing as it made them. The backup checks each file as it copies it now: a damaged one is
    left out, as a lost one is, with a warning that points to `clapq check --verify`, and the rest restores."""
    from clapq.backup import backup
    from clapq.blobs import BlobStore, path_in
    from clapq.models import Item
    from tests.conftest import job_of_own

    store = BlobStore(tmp_path / "blobs")
    good = store.put_bytes(b"a good stored file")
    rotten = hashlib.sha256(b"a stored file, as uploaded").hexdigest()
    path_in(store.root, rotten).parent.mkdir(parents=True, exist_ok=True)
    path_in(store.root, rotten).write_bytes(b"a stored file, as rotted")
    with session_scope(own_database) as s:
        tenant, _, lib, job = job_of_own(s, f"rot-{uuid.uuid4()}")
        s.add_all([Item(tenant_id=tenant.id, library_id=lib.id, job_id=job.id, filename=f"{sha}.wav", size_bytes=1,
                        sha256=sha) for sha in (good, rotten)])
    said: list[str] = []
    manifest = backup(own_database, store.root, tmp_path / "bk", say=said.append, check="clapq check")
    assert manifest["files"] == 1 and manifest["damaged_files"] == 1 and manifest["missing_files"] == 1, manifest
    assert any(line.startswith(f"warning: 1 stored file that items hold is damaged in {store.root}") and rotten in line
               and "`clapq check --verify` names their items" in line for line in said), said
    assert sorted(p.name for p in (tmp_path / "bk" / "blobs").rglob("*") if p.is_file()) == [good]
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "restore", str(tmp_path / "bk"), "--data-dir",
                          str(tmp_path / "new")], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warning: 1 stored file that items hold was missing from the service when it was backed up (damaged " \
           "there), and is missing here too" in out.stderr, out.stderr


def test_a_backup_of_a_newer_clapq_is_refused_before_anything_is_restored(own_database, tiny_model, tmp_path):
    """A backup made by a newer clapq (its schema migrated past what this version knows: a machine moved to with an
    older checkout) was restored, files and rows, and only then did the migration refuse it, 'the database was
    migrated by a newer clapq ...; nothing was changed', where the new data directory held it all (and not the
    owner's key): a data directory this clapq cannot start, that a second restore refuses as used. The backup
    records its schema revision now, and a restore refuses one this clapq does not know before it touches
    anything."""
    from sqlalchemy import text

    from clapq.backup import backup
    from clapq.blobs import BlobStore

    with session_scope(own_database) as s:
        s.execute(text("UPDATE alembic_version SET version_num = 'f00dfacef00d'"))  # as a newer clapq leaves it
    backup(own_database, BlobStore(tmp_path / "blobs").root, tmp_path / "bk", say=lambda m: None)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "restore", str(tmp_path / "bk"), "--data-dir",
                          str(tmp_path / "new")], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert re.search(r"is a backup of a newer clapq \(schema revision f00dfacef00d; this version knows up to "
                     r"\w+\): restore it with that version or a newer one; nothing was restored", out.stderr), out.stderr
    assert not (tmp_path / "new").exists()


def test_a_restore_into_an_own_postgres_says_where_the_stored_files_went(settings, tiny_model, tmp_path):
    """`clapq restore` with DATABASE_URL but not CLAPQ_BLOB_DIR put the stored files in the default data directory's
    blobs/ and said 'restored into DATABASE_URL and CLAPQ_BLOB_DIR: start the service on them', where CLAPQ_BLOB_DIR
    named nothing: a service started with its own (compose's /data/blobs) had rows without files. It names the
    folder now, and that it is the default."""
    import psycopg2
    from sqlalchemy.engine import make_url

    from clapq.backup import backup
    from clapq.blobs import BlobStore

    backup(settings.database_url, BlobStore(settings.blob_dir).root, tmp_path / "bk", say=lambda m: None)
    with contextlib.closing(psycopg2.connect(settings.database_url.replace("+psycopg2", ""))) as c:
        c.autocommit = True
        c.cursor().execute("CREATE DATABASE restored_here")
    target = make_url(settings.database_url).set(database="restored_here").render_as_string(hide_password=False)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "restore", str(tmp_path / "bk")],
                         env=_env(tiny_model, DATABASE_URL=target, XDG_DATA_HOME=str(tmp_path / "xdg")),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    blobs = tmp_path / "xdg" / "clapq" / "blobs"
    assert f"restored into DATABASE_URL and {blobs} (the default: CLAPQ_BLOB_DIR is not set): start the service " \
           f"on them, with CLAPQ_BLOB_DIR={blobs}" in out.stderr, out.stderr
    assert blobs.is_dir()


def test_a_restore_into_a_data_dir_with_its_own_blob_dir_says_to_start_it_with_that_blob_dir(settings, tiny_model,
                                                                                              tmp_path):
    """`clapq restore BK --data-dir D` with CLAPQ_BLOB_DIR set (and no DATABASE_URL) puts the rows in D's embedded
    Postgres and the stored files in CLAPQ_BLOB_DIR, then said "restored: start it with `clapq up --data-dir D`":
    started so, from a shell without CLAPQ_BLOB_DIR, the service looked in D/blobs, which does not exist, and every
    item's stored file was missing (helper-109). It names the folder now, in the command it gives."""
    from clapq.backup import backup
    from clapq.blobs import BlobStore

    backup(settings.database_url, BlobStore(settings.blob_dir).root, tmp_path / "bk", say=lambda m: None)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "restore", str(tmp_path / "bk"), "--data-dir",
                          str(tmp_path / "d")], env=_env(tiny_model, CLAPQ_BLOB_DIR=str(tmp_path / "files")),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"start it with `CLAPQ_BLOB_DIR={tmp_path / 'files'} clapq up --data-dir {tmp_path / 'd'}`" in out.stderr, \
        out.stderr
    assert (tmp_path / "files").is_dir() and not (tmp_path / "d" / "blobs").exists()


def test_a_worker_whose_scratch_folder_cannot_be_written_stops_at_start_saying_so(settings, tiny_model, tmp_path):
    """CLAPQ_SCRATCH_DIR set to a folder the worker cannot make or write (a read-only mount, another user's, a path
    under a file): the worker started, and every task failed, "OSError: [Errno 30] Read-only file system" in the log
    only, its files left `running` until CLAPQ_STALE_AFTER_S, sent again and failing again, with /readyz ready and
    `clapq upload` saying "a worker stopped?" (helper-109). It stops at start now, with a sentence naming the
    variable, as for a model it cannot load, so `clapq up` (or the supervisor) shows why."""
    (tmp_path / "a-file").write_text("")
    scratch = tmp_path / "a-file" / "scratch"
    proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "worker"], start_new_session=True,
                            env=_env(tiny_model, DATABASE_URL=settings.database_url, REDIS_URL=settings.redis_url,
                                     CLAPQ_SCRATCH_DIR=str(scratch)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the worker is still running:\n{err[-2000:]}") from None
    assert proc.returncode == 1, err
    assert err.startswith(f"clapq: CLAPQ_SCRATCH_DIR {scratch} cannot be written (") and "Traceback" not in err, err
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "worker"], capture_output=True, text=True, timeout=60,
                         env=_env(tiny_model, DATABASE_URL=settings.database_url, REDIS_URL=settings.redis_url,
                                  CLAPQ_SCRATCH_DIR=str(tmp_path / "a-file")))
    assert out.returncode == 1 and out.stderr.startswith(f"clapq: CLAPQ_SCRATCH_DIR {tmp_path / 'a-file'} is a file, "
                                                         "not a folder"), out.stderr  # was "(File exists)"


def test_a_worker_whose_scratch_disk_is_full_for_now_starts_and_says_so(settings, tiny_model, tmp_path):
    """A scratch disk full for now (here: no file can be made on it) is no reason for a worker not to start: each
    file waits for room as it is decoded. The check at start stopped it (helper-111), and under `clapq up`, a worker
    started again on it at each end would stop the whole service, search included, after its third try."""
    full = tmp_path / "full"
    full.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=8", "tmpfs", str(full)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    proc = None
    try:
        with contextlib.suppress(OSError):  # every inode taken: no file, no folder can be made on it
            for i in range(64):
                (full / f"f{i}").touch()
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "worker"], start_new_session=True,
                                    env=_env(tiny_model, DATABASE_URL=settings.database_url,
                                             REDIS_URL=settings.redis_url, CLAPQ_SCRATCH_DIR=str(full / "scratch")),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while b" ready." not in log.read_bytes():  # Celery's line once the worker takes tasks
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.3)
        said = log.read_text(errors="replace")
        assert f"clapq: warning: CLAPQ_SCRATCH_DIR {full / 'scratch'} has no room now (No space left on device): " \
            "files wait for room as they are decoded" in said, said
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_a_backup_or_data_directory_where_nothing_can_be_written_is_a_sentence(settings, tiny_model, tmp_path):
    """An operator's slips, each a traceback before (helper-109): `clapq backup` into a place it cannot write (a
    disk not mounted, a folder of another user's, a read-only mount) said only "[Errno 30] Read-only file system:
    'DEST.partial'" (here "[Errno 17] File exists: 'PARENT'"), a name the operator never gave; `clapq restore` and `clapq up` given a --data-dir that cannot
    be made printed a NotADirectoryError (or PermissionError) traceback. Each is one sentence now, naming what was
    given, and leaves nothing behind. A file stands for the place here, as root may write anywhere else."""
    from clapq.backup import backup
    from clapq.blobs import BlobStore

    backup(settings.database_url, BlobStore(settings.blob_dir).root, tmp_path / "bk", say=lambda m: None)
    (tmp_path / "a-file").write_text("")
    nowhere = tmp_path / "a-file" / "sub"
    cli = [sys.executable, "-m", "clapq.cli"]
    out = subprocess.run(cli + ["backup", str(nowhere)],
                         env=_env(tiny_model, DATABASE_URL=settings.database_url, CLAPQ_BLOB_DIR=str(settings.blob_dir)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"clapq: cannot write the backup into {nowhere}: ") and \
        out.stderr.rstrip().endswith("; nothing was written"), out.stderr
    for command in (["restore", str(tmp_path / "bk")], ["up", "--port", str(free_port())]):
        out = subprocess.run(cli + command + ["--data-dir", str(nowhere)], env=_env(tiny_model),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, (command, out.stderr)
        assert out.stderr.startswith(f"clapq: cannot make the data directory {nowhere}: "), (command, out.stderr)
    assert (tmp_path / "a-file").read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bk"]


def test_a_database_url_that_is_not_the_service_s_database_is_a_sentence(settings, tiny_model, tmp_path):
    """DATABASE_URL set wrong (no server there, a database without clapq's tables, another kind of database): `clapq
    check`, `clapq backup` and `clapq restore` printed a traceback, an OperationalError, 'relation "items" does not
    exist' or a ModuleNotFoundError for MySQLdb, and `clapq migrate` the last (helper-109). Each says what is wrong
    with the URL now, its password left out, and writes nothing."""
    import psycopg2
    from sqlalchemy.engine import make_url

    from clapq.backup import backup
    from clapq.blobs import BlobStore

    backup(settings.database_url, BlobStore(settings.blob_dir).root, tmp_path / "bk", say=lambda m: None)
    with contextlib.closing(psycopg2.connect(settings.database_url.replace("+psycopg2", ""))) as c:
        c.autocommit = True
        c.cursor().execute("CREATE DATABASE not_clapq")
    other = make_url(settings.database_url).set(database="not_clapq").render_as_string(hide_password=False)
    (tmp_path / "blobs").mkdir()
    cli = [sys.executable, "-m", "clapq.cli"]
    commands = (["check"], ["backup", str(tmp_path / "new-bk")], ["restore", str(tmp_path / "bk")], ["migrate"])
    for url, said in (("postgresql://clapq:s3cret@127.0.0.1:9/clapq",
                       r"cannot (reach|set up) the database at postgresql://clapq:\*\*\*@127\.0\.0\.1:9/clapq: "
                       r'connection to server at "127\.0\.0\.1", port 9 failed'),
                      ("mysql://clapq:s3cret@127.0.0.1/clapq",
                       r"DATABASE_URL is not a PostgreSQL URL like postgresql://user:password@host:5432/clapq "
                       r"\(it begins mysql://\)")):
        for command in commands:
            out = subprocess.run(cli + command, env=_env(tiny_model, DATABASE_URL=url, CLAPQ_BLOB_DIR=str(tmp_path / "blobs")),
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 1 and "Traceback" not in out.stderr and "s3cret" not in out.stderr, \
                (command, out.stderr)
            assert re.fullmatch(f"clapq: {said}.*\n", out.stderr), (command, out.stderr)
    for command in commands[:2]:
        out = subprocess.run(cli + command, env=_env(tiny_model, DATABASE_URL=other, CLAPQ_BLOB_DIR=str(tmp_path / "blobs")),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, (command, out.stderr)
        assert re.fullmatch(r"clapq: the database at \S+/not_clapq\S* holds no clapq tables: it is not the service's "
                            r"database \(DATABASE_URL\), or no `clapq migrate` has run on it\n", out.stderr), \
            (command, out.stderr)
    assert not (tmp_path / "new-bk").exists() and list((tmp_path / "blobs").iterdir()) == []


def test_a_database_whose_clapq_tables_are_in_a_schema_of_their_own_is_checked_and_backed_up(settings, tiny_model,
                                                                                                tmp_path):
    """A DATABASE_URL whose clapq tables live in a schema of their own (`ALTER DATABASE ... SET search_path = clapq`,
    so `clapq migrate` made them there, and every statement of the service finds them): `clapq check` and `clapq
    backup` looked for them in `public` alone, and refused it as "holds no clapq tables: it is not the service's
    database", a working service they had checked and backed up before that look (helper-111). And `clapq restore`
    into it, looking in `public` alone too, copied the backup's files into its store before pg_restore failed."""
    from sqlalchemy import create_engine, text

    from clapq.db import get_engine, migrate

    with _new_database(settings, "sp") as (name, url):
        with create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text("CREATE SCHEMA clapq"))
            conn.execute(text(f"ALTER DATABASE {name} SET search_path = clapq"))
        migrate(url)
        with get_engine(url).connect() as conn:
            assert conn.scalar(text("SELECT to_regclass('public.items')")) is None
            assert conn.scalar(text("SELECT to_regclass('items')::text")) == "items"
        (tmp_path / "blobs").mkdir()
        env = _env(tiny_model, DATABASE_URL=url, CLAPQ_BLOB_DIR=str(tmp_path / "blobs"))
        cli = [sys.executable, "-m", "clapq.cli"]
        out = subprocess.run(cli + ["check"], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "the database and the stored files agree" in out.stdout, out.stderr
        out = subprocess.run(cli + ["backup", str(tmp_path / "bk")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and (tmp_path / "bk" / "backup.json").is_file(), out.stderr
        # and a restore into it is refused before anything is touched, as into one whose tables are in public
        # (it copied the backup's files into the store, then pg_restore failed: "CREATE SCHEMA clapq")
        from clapq.blobs import BlobStore, scan

        BlobStore(settings.blob_dir).put_bytes(b"a stored file of the service backed up")
        out = subprocess.run(cli + ["backup", str(tmp_path / "other-bk")], env=_env(
            tiny_model, DATABASE_URL=settings.database_url, CLAPQ_BLOB_DIR=str(settings.blob_dir)),
            capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        before = scan(tmp_path / "blobs")
        out = subprocess.run(cli + ["restore", str(tmp_path / "other-bk")], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 1 and "holds clapq's tables already" in out.stderr, out.stderr
        assert scan(tmp_path / "blobs") == before and not before[0], "the restore wrote into the service's store"


def test_a_backup_goes_on_past_a_shard_folder_a_deletion_removed_as_it_was_listed(own_database, tmp_path):
    """The first pass lists the store's shard folders (ROOT/ab/cd), then each one's files; a deletion meanwhile
    removes a shard folder its last file leaves empty (most hold one file up to tens of thousands of files), and
    one listed just before it went failed the whole backup, 'No such file or directory' (likely during a library's
    deletion: 1000 removals a second). A shard gone when its turn comes holds nothing to back up. Here a link to
    no folder stands for it, deterministically."""
    from clapq.backup import backup
    from clapq.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    store.put_bytes(b"a file no row holds")
    (store.root / "ff").mkdir()
    (store.root / "ff" / "ee").symlink_to(tmp_path / "removed")
    manifest = backup(own_database, store.root, tmp_path / "bk", say=lambda m: None)
    assert manifest["missing_files"] == 0 and (tmp_path / "bk" / "backup.json").is_file()


def test_a_backup_into_the_store_it_backs_up_is_refused(own_database, tmp_path):
    """`clapq backup DIR/blobs/bk` (a slip of the path, or a link into the store) was taken: the backup's every file
    was then one `clapq check` listed as not clapq's in the store, exit 1 for good, never removed, and the backup
    went with the store it was meant to outlive (helper-109). It is refused now, through a link too, writing
    nothing."""
    from clapq.backup import BackupError, backup
    from clapq.blobs import BlobStore, scan

    store = BlobStore(tmp_path / "blobs")
    store.put_bytes(b"a stored file")
    before = scan(store.root)
    (tmp_path / "link").symlink_to(store.root)
    for dest in (store.root / "bk", tmp_path / "link" / "backups" / "today"):
        with pytest.raises(BackupError) as caught:
            backup(own_database, store.root, dest, say=lambda m: None)
        assert f"{dest} is inside the stored files' folder it backs up, {store.root} (CLAPQ_BLOB_DIR)" in \
            str(caught.value), caught.value
    assert scan(store.root) == before and not any((store.root / n).exists() for n in ("bk", "bk.partial", "backups"))
    backup(own_database, store.root, tmp_path / "bk", say=lambda m: None)  # beside it: taken


def test_a_restore_given_a_data_dir_with_a_tilde_goes_where_clapq_up_looks(settings, tiny_model, tmp_path):
    """`clapq up --data-dir=~/d` (the shell leaves a ~ after '=' as it is; so does an env file's CLAPQ_DATA_DIR)
    serves $HOME/d, but `clapq restore BK --data-dir=~/d` made a folder named '~' in the working directory, then
    failed, 'Parent directory of pgdata does not exist: $HOME/d' (pgserver expands it). Every command takes ~ as
    the home directory now, as `clapq up` did."""
    from clapq.backup import backup
    from clapq.blobs import BlobStore

    backup(settings.database_url, BlobStore(settings.blob_dir).root, tmp_path / "bk", say=lambda m: None)
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "restore", str(tmp_path / "bk"), "--data-dir=~/d"],
                         env=_env(tiny_model, HOME=str(tmp_path / "home")), cwd=tmp_path / "cwd",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"start it with `clapq up --data-dir {tmp_path / 'home' / 'd'}`" in out.stderr, out.stderr
    assert (tmp_path / "home" / "d" / "pg").is_dir() and list((tmp_path / "cwd").iterdir()) == []


def test_pg_dump_and_pg_restore_are_not_given_the_password_on_their_command_line():
    """clapq backup/restore of your own Postgres: the password goes to pg_dump/pg_restore in PGPASSWORD, as a
    command line is what `ps` shows every account on the machine. SQLAlchemy's URL.set(password=None) leaves a
    password as it is (None means 'not given' there), so DATABASE_URL's password was on their command line,
    `--dbname=postgresql://clapq:secret@db/clapq`, for the whole dump."""
    from clapq.backup import _libpq

    target, env = _libpq("postgresql+psycopg2://clapq:p%40ss%2Fw@db.example:5433/clapq?sslmode=require")
    assert target == "postgresql://clapq@db.example:5433/clapq?sslmode=require" and env["PGPASSWORD"] == "p@ss/w"


def test_a_backup_whose_stored_file_was_damaged_is_not_restored(settings, tiny_model, tmp_path):
    """A backup's stored file changed since it was written (bit rot on the backup disk, a file edited by hand) was
    restored as it was, under the name of bytes it no longer holds: an item whose audio is not what it searches
    as, and nothing would tell. Each file's bytes are checked against its name (their sha256) as it is restored
    now, and a damaged one stops the restore before the rows, naming it."""
    import hashlib

    from clapq.backup import backup
    from clapq.blobs import BlobStore

    backup(settings.database_url, BlobStore(settings.blob_dir).root, tmp_path / "bk", say=lambda m: None)
    before = json.loads((tmp_path / "bk" / "backup.json").read_text())
    # bytes of this test alone: the service's store is the session's, and another test's file of the same bytes
    # was in the backup already (CI: FileExistsError on its shard folder)
    held = f"the bytes an item holds ({uuid.uuid4()})".encode()
    sha = hashlib.sha256(held).hexdigest()
    damaged = tmp_path / "bk" / "blobs" / sha[:2] / sha[2:4] / sha
    damaged.parent.mkdir(parents=True, exist_ok=True)
    damaged.write_bytes(held + b", bit-rotted")
    (tmp_path / "bk" / "backup.json").write_text(json.dumps({**before, "files": before["files"] + 1}))
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "restore", str(tmp_path / "bk"), "--data-dir",
                          str(tmp_path / "new")], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"its stored file {sha} is damaged (its bytes are no longer those it was stored as)" in out.stderr, \
        out.stderr
    assert "nothing was restored into the database" in out.stderr, out.stderr
    if not before["files"]:  # the first it copied: nothing left (it said '0 stored files copied whole ...')
        assert f"no stored file copied into {tmp_path / 'new' / 'blobs'}; nothing was restored" in out.stderr, out.stderr
    assert not (tmp_path / "new" / "blobs" / sha[:2] / sha[2:4] / sha).exists()


def _backup_of_one_file(own_database, tmp_path, data: bytes) -> tuple[Path, str]:
    """A backup (tmp_path/bk) of a service of one item, whose stored file holds `data`; and that file's sha256."""
    from clapq.backup import backup
    from clapq.blobs import BlobStore
    from clapq.models import Item
    from tests.conftest import job_of_own

    store = BlobStore(tmp_path / "service-blobs")
    sha = store.put_bytes(data)
    with session_scope(own_database) as s:
        tenant, _, lib, job = job_of_own(s, f"one-{uuid.uuid4()}")
        s.add(Item(tenant_id=tenant.id, library_id=lib.id, job_id=job.id, filename="one.wav", size_bytes=len(data),
                   sha256=sha))
    backup(own_database, store.root, tmp_path / "bk", say=lambda m: None)
    return tmp_path / "bk", sha


def test_a_restore_into_another_service_s_store_is_refused_writing_nothing(own_database, tiny_model, tmp_path):
    """`clapq restore BK --data-dir NEW` with CLAPQ_BLOB_DIR still set to a running service's store (exported for that
    service; the data directory's blobs/ of another) copied the backup's files into that store, and said to start the
    restored service on it. Two services then shared one store: a library deleted in the restored one (`clapq delete
    --library alpha --yes`, 30 files) removed 30 stored files the running one's items held, which `clapq check` of
    it then listed as missing, their downloads failing. A restore refuses now, before it makes anything, a store
    that is another data directory's blobs/, that holds stored files the backup does not, that an API served links
    from, or that is inside the backup itself; a store holding only files of the backup (a restore into the same
    place that stopped) is taken as before."""
    from clapq.blobs import SECRET, BlobStore, path_in, scan

    bk, sha = _backup_of_one_file(own_database, tmp_path, b"the one stored file of the service backed up")
    live = tmp_path / "live"  # a `clapq up` data directory: its Postgres and its store
    (live / "pg").mkdir(parents=True)
    BlobStore(live / "blobs").put_bytes(b"a stored file of the live service")
    other = BlobStore(tmp_path / "other-store")  # CLAPQ_BLOB_DIR of a service with its own Postgres
    other.put_bytes(b"a stored file of another service")
    served = BlobStore(tmp_path / "served")  # one whose files are the backup's, served by an API
    served.secret()
    cli = [sys.executable, "-m", "clapq.cli", "restore", str(bk), "--data-dir", str(tmp_path / "new")]
    for store, why in ((live / "blobs", f"the stored files' folder of the data directory {live}, which holds a "
                                        "service's database"),
                       (other.root, "a service's store, or another backup's: it holds 1 stored file this backup "
                                    "does not (the first: "),
                       (served.root, f"a service's store: it holds the {SECRET} an API signs its audio links with"),
                       (bk / "blobs", f"inside the backup restored, {bk}")):
        before = scan(store)
        out = subprocess.run(cli, env=_env(tiny_model, CLAPQ_BLOB_DIR=str(store)), capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, (store, out.stderr)
        assert out.stderr.startswith(f"clapq: the stored files' folder restored into, {store} (CLAPQ_BLOB_DIR), is "
                                     f"{why}"), (store, out.stderr)
        assert "a deletion in either would remove files the other still holds; nothing was restored: restore into a " \
            "new (or empty) folder, CLAPQ_BLOB_DIR unset (the data directory's blobs/) or set to a new one" in \
            out.stderr, out.stderr
        assert scan(store) == before and not (tmp_path / "new").exists(), store
    # a store that holds only files of this backup (a restore into it that stopped) is restored into
    again = BlobStore(tmp_path / "again")
    path_in(again.root, sha).parent.mkdir(parents=True)
    shutil.copyfile(path_in(bk / "blobs", sha), path_in(again.root, sha))
    out = subprocess.run(cli, env=_env(tiny_model, CLAPQ_BLOB_DIR=str(again.root)), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "restored 1 items and their 1 stored files" in out.stderr, out.stderr


def test_a_damaged_or_cut_short_dump_is_refused_before_anything_is_restored(own_database, tiny_model, tmp_path):
    """A backup's clapq.dump changed since it was written (bit rot on the backup's disk, a copy of the backup cut
    short) had nothing to be checked against: one byte changed in its plain parts (here a trigger function's body,
    `pg_advisory_xact_loc_shared`) was restored without a word, a service whose deletions then fail; one cut short
    failed only in pg_restore, after every stored file was copied, saying 'pg_restore failed: ... could not read
    from input file: end of file' and nothing of what it left. The backup records its dump's sha256 now, and a
    restore checks it before it makes anything; a backup of an earlier clapq (none recorded) whose pg_restore fails
    says that no row was restored, and where the files it copied are."""
    bk, _ = _backup_of_one_file(own_database, tmp_path, b"a stored file")
    manifest = json.loads((bk / "backup.json").read_text())
    assert manifest["dump_sha256"] == file_sha256(bk / "clapq.dump"), manifest
    whole = (bk / "clapq.dump").read_bytes()
    word = b"pg_advisory_xact_lock_shared"
    assert word in whole
    cli = [sys.executable, "-m", "clapq.cli", "restore", str(bk), "--data-dir", str(tmp_path / "new")]
    for damaged in (whole.replace(word, b"pg_advisory_xact_locZ_shared", 1), whole[: len(whole) // 2]):
        (bk / "clapq.dump").write_bytes(damaged)
        out = subprocess.run(cli, env=_env(tiny_model), capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"clapq: {bk} cannot be restored: its clapq.dump is damaged or cut short (its bytes are no longer " \
            "those the backup wrote: their sha256 differs from its backup.json's); nothing was restored: restore " \
            "another backup" in out.stderr, out.stderr
        assert not (tmp_path / "new").exists()
    # an earlier clapq's backup, cut short: pg_restore fails, and the restore says what it left
    (bk / "backup.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "dump_sha256"}))
    out = subprocess.run(cli, env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"clapq: {bk} cannot be restored: pg_restore failed: " in out.stderr, out.stderr
    assert "; nothing was restored into the database (its rows go in one transaction); the backup's 1 stored files (1 " \
        f"copied now, the rest there before) are in {tmp_path / 'new' / 'blobs'}, which no row holds (a restore into " \
        "the same place takes them as they are)" in out.stderr, out.stderr
    (bk / "clapq.dump").write_bytes(whole)  # the backup whole again: restored into the same place
    out = subprocess.run(cli, env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "restored 1 items and their 1 stored files" in out.stderr, out.stderr


def test_a_restore_cut_short_mid_copy_leaves_no_half_written_file_and_says_what_it_left(settings, tiny_model,
                                                                                       eio_library, tmp_path):
    """A restore whose copy of a stored file stopped partway (a read error of the backup's disk here; an exception
    or Ctrl-C the same) left `<sha256>.part` in the store restored into, half a file that `clapq check` then
    listed as a file clapq did not write, and said only 'Input/output error'. The part is removed now, and the
    sentence names what is left: the files copied whole before it, which no row holds."""
    import random

    from clapq.backup import backup
    from clapq.blobs import BlobStore, path_in, scan
    from tests import eio

    backup(settings.database_url, BlobStore(settings.blob_dir).root, tmp_path / "bk", say=lambda m: None)
    before = json.loads((tmp_path / "bk" / "backup.json").read_text())
    files = sorted((hashlib.sha256(data).hexdigest(), data)
                   for data in (random.Random(seed).randbytes(300_000) for seed in range(2)))
    for sha, data in files:  # two files more in the backup, as if its rows named them
        path_in(tmp_path / "bk" / "blobs", sha).parent.mkdir(parents=True, exist_ok=True)
        path_in(tmp_path / "bk" / "blobs", sha).write_bytes(data)
    (tmp_path / "bk" / "backup.json").write_text(json.dumps({**before, "files": before["files"] + 2}))
    cut = path_in(tmp_path / "bk" / "blobs", files[1][0])  # the second copied: its read fails halfway
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "restore", str(tmp_path / "bk"), "--data-dir",
                          str(tmp_path / "new")], env={**_env(tiny_model), **eio.env(eio_library, [cut])},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    restored = tmp_path / "new" / "blobs"
    # the files before it, in the order they are copied, are there whole, and nothing else
    whole = sorted(sha for sha in scan(tmp_path / "bk" / "blobs")[0] if sha < files[1][0])
    assert sorted(p.name for p in restored.rglob("*") if p.is_file()) == whole, "a half-written file is left"
    assert all(file_sha256(path_in(restored, sha)) == sha for sha in whole)
    assert f"cannot be restored: copying its stored file {files[1][0]} failed (Input/output error)" in out.stderr, \
        out.stderr
    copied = len(whole)
    assert (f"{copied} stored file{'s' if copied != 1 else ''} copied whole into {restored} before it stopped, "
            "which no row holds") in out.stderr, out.stderr
    assert "nothing was restored into the database" in out.stderr, out.stderr


def test_a_backup_cut_short_in_its_folder_is_not_restored_and_said_so(tiny_model, tmp_path):
    """A backup into a folder that exists, cut short (the machine lost power), leaves DEST/.clapq-backup.partial and
    no backup.json; `clapq restore DEST` said 'a backup cut short is left as DEST.partial', a folder that is not
    there. It says the backup has no backup.json, which a backup writes last, so it was cut short."""
    (tmp_path / "bk" / ".clapq-backup.partial" / "blobs").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "clapq.cli", "restore", str(tmp_path / "bk"), "--data-dir",
                          str(tmp_path / "new")], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert (f"{tmp_path / 'bk'} is not a clapq backup (no readable backup.json, which a backup writes last: one cut "
            "short has none)") in out.stderr, out.stderr
    assert not (tmp_path / "new").exists()


def test_a_file_cut_short_is_embedded_as_far_as_it_reads_and_said_so(start_api, new_key, worker, tmp_path, tiny_model):
    """A copy that stopped halfway (its FLAC header states 12 s, 5.9 s are there) was embedded as a whole file
    would be, `done`, its duration the only trace (helper-115). Now the item keeps why (`warning`), its job lists
    it (`warnings`), and `clapq upload` and `clapq jobs show` name it ("in part: ..."); the upload still exits 0,
    the file being embedded as far as it reads. A whole file of the same upload has no warning."""
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    folder = tmp_path / "takes"
    (folder / "sub").mkdir(parents=True)
    write(folder / "whole.flac", 12.0, 44_100, seed=1200)
    data = write(tmp_path / "cut.flac", 12.0, 44_100, seed=1201).read_bytes()
    (folder / "sub" / "cut.flac").write_bytes(data[: len(data) // 2])
    p = _upload_with_key(folder, "cut", base, key, tiny_model)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    summary = json.loads(out)
    assert (summary["files"], summary["failed"], summary["in_part"]) == (2, 0, 1), summary
    said = re.findall(r"^in part: sub/cut\.flac \(item ([0-9a-f-]{36})\): (.*)$", err, re.M)
    assert len(said) == 1, err
    item_id, warning = said[0]
    assert re.fullmatch(r"only \d\.\d s of the 12\.0 s its header states could be read \(the file is cut short or "
                        r"damaged there\); those were embedded", warning), warning
    item = requests.get(f"{base}/v1/items/{item_id}", headers=h, timeout=30).json()
    assert item["status"] == "done" and item["warning"] == warning and 4 < item["duration_s"] < 8, item
    assert warning.startswith(f"only {item['duration_s']:.1f} s "), (warning, item)
    job = requests.get(f"{base}/v1/jobs/{summary['jobs'][0]}", headers=h, timeout=30).json()
    assert job["status"] == "done" and job["errors"] == [], job
    assert job["warnings"] == [{"item_id": item_id, "filename": "cut.flac", "warning": warning}], job
    others = requests.get(f"{base}/v1/libraries/{summary['library_id']}/items", headers=h, timeout=30).json()["items"]
    assert [(i["filename"], i["warning"]) for i in others if i["id"] != item_id] == [("whole.flac", None)], others
    # named by its path in the folder, as the upload names it: "in part: cut.flac" was of which folder's cut.flac
    shown = subprocess.run([sys.executable, "-m", "clapq.cli", "jobs", "show", summary["jobs"][0], "--url", base,
                            "--key", key], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"in part: sub/cut.flac (item {item_id}): {warning}\n" in shown.stdout, shown
    waited = subprocess.run([sys.executable, "-m", "clapq.cli", "jobs", "wait", summary["jobs"][0], "--url", base,
                             "--key", key], env=_env(tiny_model), capture_output=True, text=True, timeout=120)
    assert waited.returncode == 0 and f"in part: sub/cut.flac (item {item_id}): {warning}\n" in waited.stderr, waited


def test_the_paths_of_files_embedded_in_part_are_read_in_one_listing_within_the_keys_rate(
        start_api, new_key, worker, tmp_path, tiny_model):
    """`clapq jobs show` and `clapq jobs wait` name each file embedded in part by its path in the folder: they asked
    for each one's item, a GET a file (up to 100), unpaced; at a CLAPQ_RATE_LIMIT of 10 a minute, 12 such files met
    a 429 and the command waited most of a minute (helper-141). They are read from the job's listing, one request
    here, each request kept to half of the key's limit."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    base, key, other = start_api(), new_key(tenant), new_key(tenant)
    folder = tmp_path / "takes"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        data = write(tmp_path / "whole.flac", 2.0, 44_100, seed=1420 + i).read_bytes()
        (folder / "sub" / f"cut{i:02}.flac").write_bytes(data[: len(data) // 2])
    p = _upload_with_key(folder, "cut", base, key, tiny_model)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and json.loads(out)["in_part"] == 12, err
    job = json.loads(out)["jobs"][0]
    limited = start_api(rate_limit="10/minute")
    for cmd, k in (("show", key), ("wait", other)):  # a key each: the limit is a key's
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "clapq.cli", "jobs", cmd, job, "--url", limited, "--key", k],
                              env=_env(tiny_model), capture_output=True, text=True, timeout=180)
        said = re.findall(r"^in part: (\S+) \(item ", done.stdout + done.stderr, re.M)
        assert done.returncode == 0 and said == [f"sub/cut{i:02}.flac" for i in range(12)], done
        assert "trying again" not in done.stderr and time.monotonic() - t0 < 30, done.stderr


def test_a_429_while_the_paths_of_files_embedded_in_part_are_read_is_waited_out(tiny_model):
    """The listing `clapq jobs show` reads the paths of a job's files embedded in part from, answered 429 (the key's
    other uses spent its limit): the command waits as the answer says and goes on, naming each by its path."""
    job, lib = "0b1c2d3e-1111-2222-3333-444455556677", "0b1c2d3e-1111-2222-3333-444455556678"
    ids = [f"0b1c2d3e-1111-2222-3333-{i:012}" for i in range(3)]
    asked = []

    def answer(method, path):
        asked.append(path)
        if path == f"/v1/jobs/{job}":
            return 200, {"id": job, "library_id": lib, "status": "done", "progress": 1.0, "errors": [],
                         "counts": {"done": 3, "failed": 0, "running": 0, "queued": 0, "cancelled": 0, "total": 3},
                         "warnings": [{"item_id": i, "filename": f"{n}.flac", "warning": "cut short"}
                                      for n, i in enumerate(ids)]}, {}
        if path == f"/v1/libraries/{lib}":
            return 200, {"id": lib, "name": "takes"}, {}
        if path == "/v1/limits":
            return 200, {"rate_limits": [{"requests": 1200, "seconds": 60}]}, {}
        if path.startswith(f"/v1/jobs/{job}/items?") and asked.count(path) == 1:
            return 429, {"error": {"code": "rate_limited", "status": 429, "message": "over the limit; try again"}}, {
                "Retry-After": "1"}
        if path.startswith(f"/v1/jobs/{job}/items?"):
            return 200, {"items": [{"id": i, "filename": f"{n}.flac", "metadata": {"path": f"album {n}/{n}.flac"}}
                                   for n, i in enumerate(ids)], "next_cursor": None}, {}
        return 404, {"error": {"code": "not_found", "status": 404, "message": "not found"}}, {}

    with fake_api(answer) as url:
        out = subprocess.run([sys.executable, "-m", "clapq.cli", "jobs", "show", job, "--url", url, "--key", "cq_x"],
                             env=_env(tiny_model), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "trying again in 1 s" in out.stderr, out
    assert re.findall(r"^in part: (.*) \(item ", out.stdout, re.M) == [f"album {n}/{n}.flac" for n in range(3)], out
    assert not [p for p in asked if p.startswith("/v1/items/")], asked


def test_up_says_it_migrates_its_data_directory_and_what_a_newer_ones_takes(tmp_path, up_runner):
    """`clapq up` on the data directory of an earlier clapq (an upgrade: `git pull`, `make up`) migrated its schema
    unsaid, from 0006 to 0015 on one made on 2026-12-04 (helper-130): nothing told the operator that the data was now
    an upgraded one, which an earlier clapq no longer opens, nor, on a migration of minutes (0003's), what `up` was
    doing. It says so as it begins and once done. On a data directory a newer clapq migrated, it said to run
    `alembic downgrade`, which needs a DATABASE_URL that an embedded database has none of; it says what can be run
    there, and changes nothing."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    import migrations
    from clapq.db import _migrations, normalise_url
    from clapq.embedded import EmbeddedPostgres

    scripts = _migrations()[1]
    head = scripts.get_current_head()
    before = scripts.get_revision(head).down_revision
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(tmp_path, 0o755)

    def on_embedded(work):
        pg = EmbeddedPostgres(data / "pg")
        try:
            url = normalise_url(pg.start())
            engine = create_engine(url)
            try:
                return work(url, engine)
            finally:
                engine.dispose()
        finally:
            pg.stop()

    def to_before(url, engine):
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        command.upgrade(cfg, before)

    on_embedded(to_before)
    up = up_runner(data)
    up.wait_ready()
    log = up.log.read_text()
    assert (f"clapq: the database of {data}: migrating its schema from revision {before} to {head}, this clapq's "
            "(on a large library this can take minutes: README, Upgrading)\n"
            f"clapq: the database of {data}: schema migrated from revision {before} to {head}; an earlier clapq no "
            "longer opens it\n") in log, log[-3000:]
    assert up.stop() == 0

    def to_newer(url, engine):
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))

    on_embedded(to_newer)
    up = up_runner(data)
    assert up.proc.wait(120) == 1
    log = up.log.read_text()
    assert (f"clapq: the data directory {data} was migrated by a newer clapq (schema revision 0099; this version "
            f"knows up to {head}); nothing was changed: run that newer version on it. This one opens a copy of the "
            "data directory, or a `clapq backup`, made before that upgrade (README, Upgrading)\n") in log, log[-3000:]
    assert "alembic" not in log
    def revision(url, engine):
        with engine.connect() as conn:
            return conn.scalar(text("SELECT version_num FROM alembic_version"))

    assert on_embedded(revision) == "0099"


def _a_newer_version(code: Path, head: str) -> None:
    """The copy of the code (_copy_of_the_code, with its migrations) upgraded in place to a version whose migration
    0099 adds a column to items."""
    (code / "migrations" / "versions" / "0099_a_newer_version.py").write_text(
        f'"""A newer version\'s migration."""\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f'revision = "0099"\ndown_revision = "{head}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        'def upgrade() -> None:\n    op.add_column("items", sa.Column("newer", sa.Text(), nullable=True))\n\n\n'
        'def downgrade() -> None:\n    op.drop_column("items", "newer")\n')
    with open(code / "clapq" / "models.py", "a") as f:
        f.write("\n# a newer version\n")


def test_up_upgraded_in_place_to_a_version_with_a_migration_migrates_and_goes_on(tmp_path, tiny_model, up_runner):
    """clapq upgraded in place under a running `clapq up` (`git pull`) to a version with a new migration: each role
    started again on the new code stopped on the schema older than its own, saying to run `clapq migrate`, which no
    embedded database is reached by, and the worker's fourth end in 5 minutes stopped everything (helper-130). `up`
    now has the new code migrate the database before it starts a role again on it, and says so; files uploaded then
    are embedded."""
    import migrations
    from clapq.db import _migrations

    head = _migrations()[1].get_current_head()
    code = _copy_of_the_code(tmp_path)
    shutil.copytree(Path(migrations.__file__).parent, code / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    data_dir = tmp_path / "data"
    up = up_runner(data_dir, cwd=tmp_path, PYTHONPATH=str(code))
    key = up.wait_ready()
    base, h = f"http://127.0.0.1:{up.port}", {"Authorization": f"Bearer {key}"}
    _a_newer_version(code, head)
    since = len(up.log.read_text(errors="replace"))
    (worker,) = _roles(up, "worker")
    worker.kill()
    text = _wait_log(up, since, f"schema migrated from revision {head} to 0099")
    assert f"clapq: the database of {data_dir}: schema migrated from revision {head} to 0099 (clapq's code changed " \
           "on disk)\n" in text, text[-3000:]
    lib = requests.post(f"{base}/v1/libraries", json={"name": "after"}, headers=h, timeout=30).json()
    f = write(tmp_path / "a.wav", 1.0)
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (f.name, f.read_bytes(), "audio/wav"))])
    assert _wait_job(base, h, r.json()["job_id"], timeout=180)["status"] == "done"
    text = up.log.read_text(errors="replace")[since:]
    assert "older than this clapq's" not in text and "stopping everything" not in text and up.proc.poll() is None, \
        text[-3000:]


def test_up_told_to_stop_stops_a_migration_of_new_code_that_waits_for_a_lock(tmp_path, tiny_model, up_runner):
    """The new code's migration under a running `clapq up` (upgraded in place) had no time limit and said nothing
    while it ran: one that waits for a table's lock (a long query, a backup's pg_dump) held `up`, and a SIGTERM to
    `up` waited for it too, as long as the lock was held. `up` says that it runs on after MIGRATING_SAY_AFTER_S, and
    a SIGTERM stops it at once: its transaction is rolled back, the schema stays at the old revision."""
    import migrations
    from sqlalchemy import text as sql

    from clapq.db import _migrations, get_engine
    from clapq.embedded import EmbeddedPostgres

    head = _migrations()[1].get_current_head()
    code = _copy_of_the_code(tmp_path)
    shutil.copytree(Path(migrations.__file__).parent, code / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    data_dir = tmp_path / "data"
    up = up_runner(data_dir, cwd=tmp_path, PYTHONPATH=str(code))
    up.wait_ready()
    pg = EmbeddedPostgres(data_dir / "pg")  # the running one's, shared
    engine = get_engine(pg.start())
    holder = engine.connect()
    try:
        holder.execute(sql("SELECT 1 FROM items LIMIT 1"))  # its lock on items, held until this transaction ends
        _a_newer_version(code, head)
        since = len(up.log.read_text(errors="replace"))
        (worker,) = _roles(up, "worker")
        worker.kill()
        _wait_log(up, since, "the new code's migration (`clapq migrate`) has run for ", timeout=90)
        # the migration's own line, which `up` passes on: said once its first try waited MIGRATE_LOCK_WAIT_MS (5 s)
        # from its start, which a loaded machine may have slowed past `up`'s line at 10 s
        log = _wait_log(up, since, f"clapq: the database of {data_dir}: migrating the schema waits for other sessions "
                        "to let go of a table it changes", timeout=60)
        assert re.search(rf"clapq: the database of {re.escape(str(data_dir))}: the new code's migration \(`clapq "
                         r"migrate`\) has run for 1\d s; the roles that ended start again once it is done", log), \
            log[-3000:]
        told = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        up.proc.wait(60)  # before: it waited for the migration, for as long as the lock was held
        took = time.monotonic() - told
        log = up.log.read_text(errors="replace")[since:]
        assert took < 30 and f"clapq: the database of {data_dir}: told to stop: stopped the new code's migration" \
            in log and "its transaction is rolled back, and the schema stays as it was" in log, (took, log[-3000:])
        assert "clapq stopped" in log and "Traceback" not in log, log[-3000:]
        assert not [p for p in _leftovers(data_dir) if "clapq.cli migrate" in p]
        holder.rollback()
        assert holder.scalar(sql("SELECT version_num FROM alembic_version")) == head
        assert holder.scalar(sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' "
                                 "AND column_name = 'newer'")) == 0
    finally:
        holder.close()
        engine.dispose()
        pg.stop()
