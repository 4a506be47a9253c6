"""The cache of files' digests that `clapq upload` and `clapq delete --gone-from` keep between runs
(clapq/digests.py), on real files and a real SQLite file."""

from __future__ import annotations

import time
from pathlib import Path

from clapq import digests as d
from clapq.blobs import file_sha256


def reading(monkeypatch, wait_until=None) -> list[Path]:
    """Count the files the cache reads (the real reader), after `wait_until(path)` returns where given."""
    reads: list[Path] = []

    def read(p):
        reads.append(Path(p))
        if wait_until is not None:
            wait_until(p)
        return file_sha256(p)

    monkeypatch.setattr(d, "file_sha256", read)
    return reads


def test_a_file_changed_just_before_a_long_read_is_not_kept(tmp_path, monkeypatch):
    """A read that ends more than SETTLE_S after the file's last change, but began within it (a big file on
    a slow disk): a write during it, within the file system's clock tick of the change before (a second on
    ext3 or ext4 of 128-byte inodes), leaves size and both times as they were, so the file is not kept.
    It was: settled was counted from the read's end, and on an ext4 of 128-byte inodes a file whose first
    4 MiB were rewritten 0.3 s after they were read, in its first second, kept the digest of its old bytes
    for every later run (helper-68)."""
    f = tmp_path / "take1.wav"
    f.write_bytes(b"A" * 1000)

    def slow_disk(p):  # the read ends once the file's last change is more than SETTLE_S ago
        while time.time_ns() - Path(p).stat().st_ctime_ns <= d.SETTLE_S * 1e9 + 1e8:
            time.sleep(0.1)

    reads = reading(monkeypatch, slow_disk)
    cache = d.Digests(tmp_path / "digests.sqlite3")
    assert cache(f) == file_sha256(f) and len(reads) == 1
    reads2 = reading(monkeypatch)
    assert cache(f) == file_sha256(f) and reads2 == [f]  # read again: its change was too near its first read
    cache.close()


def test_a_settled_file_is_kept_and_read_again_once_rewritten(tmp_path, monkeypatch):
    """The normal case: a file changed long enough before it was read is kept, and is not read again until
    its bytes change, the same size with its modification time set back included."""
    import os

    monkeypatch.setattr(d, "SETTLE_S", 0.0)
    f = tmp_path / "a.wav"
    f.write_bytes(b"A" * 1000)
    reads = reading(monkeypatch)
    cache = d.Digests(tmp_path / "digests.sqlite3")
    assert cache(f) == cache(f) == file_sha256(f) and reads == [f]
    before = f.stat()
    f.write_bytes(b"B" * 1000)
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cache(f) == file_sha256(f) and reads == [f, f]
    cache.close()


def test_files_of_a_file_system_that_keeps_no_change_time_are_read_at_each_run(tmp_path, monkeypatch):
    """On FAT, exFAT, sshfs, rclone the change time is the modification time (or none), so a file rewritten
    with its size and modification time set back looked the same: its files are not kept. The type is read
    from /proc/self/mountinfo: here this folder's own type, taken as one of them."""
    import pytest

    monkeypatch.setattr(d, "SETTLE_S", 0.0)
    f = tmp_path / "a.wav"
    f.write_bytes(b"A" * 1000)
    cache = d.Digests(tmp_path / "digests.sqlite3")
    kind = cache.kind(f.stat().st_dev)
    if kind is None:
        pytest.skip("no /proc/self/mountinfo, or this folder's device is not in it")
    assert kind not in d.NO_CTIME  # the suite's temporary folders keep a change time
    reads = reading(monkeypatch)
    cache(f), cache(f)
    assert reads == [f]
    monkeypatch.setattr(d, "NO_CTIME", frozenset({kind}))
    assert cache(f) == cache(f) == file_sha256(f) and reads == [f, f, f]
    cache.close()


def test_an_exfat_card_rewritten_with_its_times_set_back_is_read_again(tmp_path, monkeypatch):
    """The real case, where this machine can mount one (root, mkfs.exfat and exfat-fuse): on exFAT the change
    time is the modification time, and a recording rewritten in place with its size and modification time
    kept (`touch -r`) kept its old digest, so `clapq upload` skipped it (helper-68)."""
    import os
    import shutil
    import subprocess

    import pytest

    tools = [shutil.which(t) for t in ("mkfs.exfat", "mount.exfat-fuse", "losetup", "umount")]
    if os.geteuid() != 0 or None in tools:
        pytest.skip("needs root, mkfs.exfat and exfat-fuse")
    image, card = tmp_path / "card.img", tmp_path / "card"
    with open(image, "wb") as fh:
        fh.truncate(16 << 20)
    subprocess.run([tools[0], str(image)], check=True, capture_output=True)
    loop = subprocess.run([tools[2], "-f", "--show", str(image)], check=True, capture_output=True,
                          text=True).stdout.strip()
    card.mkdir()
    try:
        subprocess.run([tools[1], loop, str(card)], check=True, capture_output=True)
        try:
            monkeypatch.setattr(d, "SETTLE_S", 0.0)
            f = card / "take1.wav"
            f.write_bytes(b"A" * 1000)
            cache = d.Digests(tmp_path / "digests.sqlite3")
            assert cache(f) == file_sha256(f)
            before = f.stat()
            with open(f, "r+b") as fh:
                fh.write(b"B" * 1000)
            os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
            after = f.stat()
            assert (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) == \
                (before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)  # all look the same
            assert cache(f) == file_sha256(f) == file_sha256(f)
            cache.close()
        finally:
            subprocess.run([tools[3], str(card)], check=False, capture_output=True)
    finally:
        subprocess.run([tools[2], "-d", loop], check=False, capture_output=True)


def test_another_file_system_mounted_where_one_was_is_told_from_it(tmp_path, monkeypatch):
    """Two drives mounted in turn at one path get one device number (the same loop device, /dev/sdb1), and
    their files one inode number where both were written alike; a file of the same size and both times (the
    same second on ext3, or ext4 of 128-byte inodes, set here with debugfs) took the other drive's digest.
    The file system's id (statfs f_fsid, from an ext4's UUID) tells them apart (helper-68). Where this
    machine can loop-mount ext4 images as root."""
    import os
    import shutil
    import subprocess

    import pytest

    tools = [shutil.which(t) for t in ("mkfs.ext4", "debugfs", "mount", "umount")]
    if os.geteuid() != 0 or None in tools:
        pytest.skip("needs root, mkfs.ext4 and debugfs")
    monkeypatch.setattr(d, "SETTLE_S", 0.0)
    point, cache = tmp_path / "drive", d.Digests(tmp_path / "digests.sqlite3")
    point.mkdir()
    images = []
    for name in ("a", "b"):
        image, src = tmp_path / f"{name}.img", tmp_path / "t.wav"
        with open(image, "wb") as fh:
            fh.truncate(8 << 20)
        src.write_bytes(name.encode() * 1000)
        subprocess.run([tools[0], "-q", "-F", "-I", "128", str(image)], check=True, capture_output=True)
        for cmd in (f"write {src} t.wav", "sif t.wav mtime 20260101000000", "sif t.wav ctime 20260101000000"):
            subprocess.run([tools[1], "-w", "-R", cmd, str(image)], check=True, capture_output=True)
        images.append(image)
    seen = []
    for image in images:
        mounted = subprocess.run([tools[2], "-o", "loop", str(image), str(point)], capture_output=True)
        if mounted.returncode:
            pytest.skip(f"cannot loop-mount: {mounted.stderr.decode(errors='replace').strip()}")
        try:
            f = point / "t.wav"
            st = f.stat()
            seen.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            assert cache(f) == file_sha256(f)
        finally:
            subprocess.run([tools[3], str(point)], check=True, capture_output=True)
    assert seen[0] == seen[1]  # all five the same
    cache.close()


def test_a_file_whose_modification_time_is_in_the_future_is_kept(tmp_path, monkeypatch):
    """A recording from a recorder whose clock ran ahead, copied with its times (`cp -p`): its change time is
    when it was copied, and it is kept once that is SETTLE_S past. It was read at every run, as its
    modification time was never SETTLE_S past (helper-68)."""
    import os

    monkeypatch.setattr(d, "SETTLE_S", 0.0)
    f = tmp_path / "a.wav"
    f.write_bytes(b"A" * 1000)
    os.utime(f, ns=(time.time_ns() + 10**15,) * 2)  # ~11 days ahead
    reads = reading(monkeypatch)
    cache = d.Digests(tmp_path / "digests.sqlite3")
    assert cache(f) == cache(f) == file_sha256(f) and reads == [f]
    cache.close()


def test_a_run_that_holds_the_cache_open_does_not_lock_another_out(tmp_path, monkeypatch):
    """One `clapq upload` that read a file, uploading or waiting for its job (here: for a line on stdin),
    and another started meanwhile (another folder): the second opens the cache and keeps what it reads. The
    first held a transaction open from its first new digest to its exit (or its 1000th), so the second
    waited 5 s on its lock and then read every file, saying nothing (helper-68)."""
    import subprocess
    import sys
    import textwrap

    monkeypatch.setattr(d, "SETTLE_S", 0.0)
    cache, a, b = tmp_path / "digests.sqlite3", tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(b"A" * 1000)
    b.write_bytes(b"B" * 1000)
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from clapq import digests as d
        d.SETTLE_S = 0.0
        cache = d.Digests(Path({str(cache)!r}))
        cache(Path({str(a)!r}))
        print("read", flush=True)
        sys.stdin.readline()
        cache.close()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "read\n"
        second = d.Digests(cache)
        assert second.db is not None
        assert second(b) == file_sha256(b)
        second.close()
        reads = reading(monkeypatch)
        assert d.Digests(cache)(b) == file_sha256(b) and reads == []  # kept by the second run
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    reads = reading(monkeypatch)
    again = d.Digests(cache)
    assert again(a) == file_sha256(a) and again(b) == file_sha256(b) and reads == []  # both runs' kept
    again.close()


def test_a_damaged_row_is_read_again_not_asked_about(tmp_path, monkeypatch):
    """A row whose digest is not a sha256 in lowercase hex (damage on disk: SQLite keeps no checksums): the
    file is read again. Asked about, the library refused the request (400) at every run (helper-68)."""
    import sqlite3

    monkeypatch.setattr(d, "SETTLE_S", 0.0)
    f, path = tmp_path / "a.wav", tmp_path / "digests.sqlite3"
    f.write_bytes(b"A" * 1000)
    cache = d.Digests(path)
    cache(f)
    cache.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE digests SET sha256 = 'zz' || substr(sha256, 3)")
    db.close()
    reads = reading(monkeypatch)
    cache = d.Digests(path)
    assert cache(f) == file_sha256(f) and reads == [f]
    cache.close()


def test_the_cache_is_made_readable_by_its_user_only(tmp_path, monkeypatch):
    """The cache holds the absolute paths of the user's files: the folders clapq creates for it are 0700 and
    the file 0600, whatever the umask; a folder that was there keeps its mode. It was made by the umask (0644
    in a 0755 folder), readable by every user of the host."""
    import os
    import stat

    monkeypatch.setattr(d, "SETTLE_S", 0.0)
    f = tmp_path / "a.wav"
    f.write_bytes(b"A" * 1000)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared / "cache"))
    old = os.umask(0o022)
    try:
        cache = d.Digests()
        assert cache(f) == file_sha256(f)
        cache.close()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert d.cache_path() == shared / "cache" / "clapq" / "digests.sqlite3"
    assert (mode(shared), mode(shared / "cache"), mode(shared / "cache" / "clapq"), mode(d.cache_path())) == (
        0o755, 0o700, 0o700, 0o600)
    reads = reading(monkeypatch)
    assert d.Digests()(f) == file_sha256(f) and reads == []  # kept, in the file of that mode


def test_a_pipe_where_a_file_was_is_said_not_waited_on(tmp_path):
    """A FIFO at a file's path when it is hashed (made there since the folder was listed): the read waited for a
    writer for ever. `clapq upload` looked first with an open of its own, and closed it, and a pipe made between
    that look and the read still hung it; the read's own open looks now (clapq.blobs.open_file), and the cache
    keeps nothing for it."""
    import os
    import threading

    from clapq.blobs import NotAFile

    pipe = tmp_path / "b.wav"
    os.mkfifo(pipe)
    cache, got = d.Digests(tmp_path / "digests.sqlite3"), []

    def read() -> None:
        try:
            got.append(cache(pipe))
        except OSError as exc:
            got.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # let the waiting reader go, to end the test
        reader.join(20)
        raise AssertionError("the digest waited on the pipe for a writer")
    assert isinstance(got[0], NotAFile) and "no longer a file: a pipe" in str(got[0]), got
    pipe.unlink()
    pipe.write_bytes(b"A" * 1000)
    assert cache(pipe) == file_sha256(pipe)
