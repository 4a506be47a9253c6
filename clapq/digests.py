"""The sha256 of files `clapq upload` and `clapq delete --gone-from` read (or `clapq upload` sends, hashed as they
go: Digests.sent), kept between runs by what the file system says of each file, so that a folder uploaded again
reads only the files that changed.

A run again asked the library about every file by its digest, and so read every byte of the folder at every
run: a nightly upload of 250 GB with nothing new read 250 GB (helper-65). A digest is kept for a file's
absolute path with its file system's id, device, inode, size, and modification and change times (ns):
writing a file changes its change time, which programs cannot set (`touch -d`, `cp -p` and `rsync -t` set
the modification time only), so a file whose six are the same holds the same bytes. A file changed less
than `SETTLE_S` before its read began is not kept (it may still be being written, within the file system's
clock tick), nor are files of a file system that keeps no change time (NO_CTIME: FAT, exFAT, sshfs), read at
each run; nor where the file system's id cannot be had. Kept in SQLite under $XDG_CACHE_HOME/clapq
(~/.cache/clapq), 0600 in folders made 0700; where that cannot be opened or written, every file is read, as
before. Entries not used for 60 days are dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from pathlib import Path

from clapq.blobs import file_sha256

SETTLE_S = 2.0
KEEP_DAYS = 60
COMMIT_EVERY = 1000
COMMIT_S = 1.0
# file systems (as /proc/self/mountinfo names them) whose change time is not one: FAT and exFAT keep none
# (Linux gives the modification time, or before 5.19 the creation time, as exfat-fuse gives the modification
# time), nor does SFTP (sshfs), nor object stores (rclone, s3fs, gcsfuse); fuseblk is exfat-fuse or ntfs-3g.
# There a file rewritten with its size and its modification time set back (a tag editor that keeps file
# times, `touch -r`) looks the same, so their files are read at each run (helper-68)
NO_CTIME = frozenset({"vfat", "msdos", "exfat", "fuseblk", "fuse.exfat", "fuse.sshfs", "sshfs", "fuse.rclone",
                      "rclone", "fuse.s3fs", "s3fs", "fuse.gcsfuse", "gcsfuse"})


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clapq" / "digests.sqlite3"


class Digests:
    """file -> sha256, through the cache where it can be opened (else each file is read)."""

    def __init__(self, path: Path | None = None) -> None:
        self.db: sqlite3.Connection | None = None
        # rows not written yet, written in one short transaction at most every COMMIT_S or COMMIT_EVERY rows:
        # a transaction kept open between them held the file's lock through the run, the wait for its job
        # included, and another run (another folder) waited 5 s for it and then read every file (helper-68)
        self.kept: dict[bytes, tuple[str, str]] = {}  # path: (stat, sha256)
        self.used: set[bytes] = set()
        # path: the digest a run before kept for it, where this run found the file changed since (earlier)
        self.before: dict[bytes, str] = {}
        self.since = time.monotonic()
        self.kinds: dict[int, str | None] = {}
        self.today = int(time.time() // 86400)
        with contextlib.suppress(OSError, sqlite3.Error):
            path = path or cache_path()
            _private(path)
            db = sqlite3.connect(path, timeout=5)
            db.execute("CREATE TABLE IF NOT EXISTS digests (path BLOB PRIMARY KEY, stat TEXT NOT NULL, "
                        "sha256 TEXT NOT NULL, used INTEGER NOT NULL)")
            db.execute("DELETE FROM digests WHERE used < ?", (self.today - KEEP_DAYS,))
            db.commit()
            self.db = db

    def __call__(self, p: Path) -> str:
        """The file's sha256; OSError where it cannot be read."""
        started = time.time_ns()
        digest, key, fsid, stat = self._look(p)
        if digest is not None:
            return digest
        digest = file_sha256(p)
        if key is None:
            return digest
        after = os.stat(p)
        # settled before the read began: a write during a long read (a big file, a slow disk) within the
        # file system's clock tick of the change before (a second on ext3, 128-byte-inode ext4, HFS+) leaves
        # all six as they were, and its bytes not read (helper-68). By the change time only: a write sets it
        # (and the modification time) to the clock's time, where a modification time may have been set to any
        # (a recorder's clock a year ahead: such files were read at every run, helper-68)
        settled = started - after.st_ctime_ns > SETTLE_S * 1e9
        if _stat(after, fsid) == stat and settled:
            self.kept[key] = (stat, digest)
            self._written()
        return digest

    def kept_digest(self, p: Path) -> str | None:
        """The digest kept for the file as it is now, without reading it (None: none kept, or none can be)."""
        with contextlib.suppress(OSError):
            return self._look(p)[0]
        return None

    def sent(self, p: Path, digest: str, opened: os.stat_result, opened_ns: int) -> None:
        """Keep the digest of a file read whole elsewhere (`clapq upload` sending it), as a read here would keep
        it: where the file is still as it was when it was opened (`opened`: its fstat then, at `opened_ns`), and
        had settled by then. A `digest` that is not one (lowercase hex sha256) is not kept."""
        if not _SHA256.fullmatch(digest):
            return
        with contextlib.suppress(OSError):
            _, key, fsid, stat = self._look(p)
            if key is not None and stat == _stat(opened, fsid) and opened_ns - opened.st_ctime_ns > SETTLE_S * 1e9:
                self.kept[key] = (stat, digest)
                self._written()

    def earlier(self, p: Path) -> str | None:
        """The digest a run before kept for this path, where this run found the file changed since it was kept
        (its bytes, or only its times: compare it with the file's digest now); None where none was kept, or the
        file is as it was. Known once the file has been looked at (its digest asked for)."""
        return self.before.get(os.fsencode(os.path.abspath(p)))

    def _look(self, p: Path) -> tuple[str | None, bytes | None, int, str]:
        """The digest kept for the file as it is now (None where none is), and its key, file system id and
        stat as kept (key None: none is kept for this file, whose digest is read at every run)."""
        if self.db is None:
            return None, None, 0, ""
        key = os.fsencode(os.path.abspath(p))
        before = os.stat(p)
        if self.kind(before.st_dev) in NO_CTIME:
            return None, None, 0, ""
        # the file system's own id (ext4 and btrfs: from its UUID), as another one mounted where it was has
        # the same device number, and may have a file of the same inode, size and times (helper-68)
        try:
            fsid = os.statvfs(p).f_fsid
        except OSError:  # a FUSE file system without statfs (ENOSYS): read, not taken for unreadable
            return None, None, 0, ""
        stat = _stat(before, fsid)
        row = self.kept.get(key)
        if row is None:
            try:
                row = self.db.execute("SELECT stat, sha256, used FROM digests WHERE path = ?", (key,)).fetchone()
            except sqlite3.Error:
                row = None
            if row is not None and row[0] == stat and row[2] != self.today:
                self.used.add(key)
                self._written()
        if row is not None and _SHA256.fullmatch(row[1] if isinstance(row[1], str) else ""):
            if row[0] == stat:
                return row[1], key, fsid, stat
            self.before.setdefault(key, row[1])
        return None, key, fsid, stat

    def kind(self, dev: int) -> str | None:
        """The type of the file system of this device, as /proc/self/mountinfo says (None where it does not:
        not Linux, or a btrfs subvolume's own device number, which keeps a change time)."""
        if dev not in self.kinds:
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
                    for line in f:  # ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [TAGS...] - TYPE SOURCE OPTIONS
                        fields, rest = line.split(" - ", 1)
                        major, minor = fields.split()[2].split(":")
                        self.kinds.setdefault(os.makedev(int(major), int(minor)), rest.split()[0])
            self.kinds.setdefault(dev, None)
        return self.kinds[dev]

    def _written(self) -> None:
        if len(self.kept) + len(self.used) >= COMMIT_EVERY or time.monotonic() - self.since >= COMMIT_S:
            self.commit()

    def commit(self) -> None:
        """Write the rows kept since the last time, in one transaction."""
        if self.db is None:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO digests (path, stat, sha256, used) VALUES (?, ?, ?, ?)",
                                    [(k, st, dg, self.today) for k, (st, dg) in self.kept.items()])
                self.db.executemany("UPDATE digests SET used = ? WHERE path = ?",
                                    [(self.today, k) for k in self.used])
        except sqlite3.Error:  # locked by another run for long, a full disk: this run reads the rest
            self.db.close()
            self.db = None
        self.kept.clear()
        self.used.clear()
        self.since = time.monotonic()

    def close(self) -> None:
        self.commit()
        if self.db is not None:
            self.db.close()
            self.db = None


# a row's digest not of this form (a damaged file: SQLite keeps no checksums) is read again: asked about, the
# library refused the whole request (400), at every run until the cache was deleted (helper-68)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _private(path: Path) -> None:
    """Create the cache's missing folders 0700 and its file 0600 (before SQLite opens it, which makes its
    journal of the same mode): it holds the absolute paths of the user's files, and was made by the umask
    (0644, in a 0755 folder), readable by every user of the host. Folders that exist keep their modes."""
    for folder in reversed((path.parent, *path.parent.parents)):
        if not folder.is_dir():
            folder.mkdir(mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))


def _stat(st: os.stat_result, fsid: int) -> str:
    return f"{fsid}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
