"""Content-addressed blob store on a local directory: files are named by their sha256."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import text
from sqlalchemy.engine import Engine

from clapq.room import RESERVE_CHECK_BYTES, kept_free
from clapq.threads import one_thread

log = logging.getLogger(__name__)


class NotAFile(OSError):
    """What is at a file's path is no longer a regular file (open_file)."""


def open_file(p: Path | str):
    """The file opened to read (binary, buffered), where it is still a regular file. One replaced by a pipe since
    it was listed (a FIFO made at its path) made `clapq upload` wait for a writer for ever, as it hashed or sent it
    (helper-135): opened without waiting (O_NONBLOCK) and looked at (fstat), it is NotAFile, which names it. What
    is hashed is opened here (hash_file), so the look and the read are of one open file."""
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAFile(errno.EINVAL, "no longer a file: a pipe, a device or a folder is in its place since it "
                           "was listed", str(p))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def hash_file(path: Path | str, h=None, out: BinaryIO | None = None):
    """Feed a file's bytes, 4 MiB at a time, into `h` (a new sha256 if None), and write them to `out` too
    where given (a copy checked as it is made, read once); returns `h`."""
    h = hashlib.sha256() if h is None else h
    with open_file(path) as f:
        while block := f.read(1 << 22):
            h.update(block)
            if out is not None:
                out.write(block)
    return h


def file_sha256(path: Path | str) -> str:
    return hash_file(path).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the names in a directory durable (a rename or a new entry in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StorageFull(OSError):
    """The upload area has no space left (`reserved`: only what is kept free for the databases on its disk)."""

    def __init__(self, message: str, reserved: int = 0) -> None:
        super().__init__(message)
        self.reserved = reserved


FULL = (errno.ENOSPC, errno.EDQUOT)  # the errors that mean StorageFull


class StorageUnwritable(OSError):
    """The upload area cannot be written: its disk is read-only (remounted so after an error), or its
    folder's permissions changed. The operator's to fix; an upload was a 500 "internal error" (helper-59)."""


UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # the errors that mean StorageUnwritable


def _refusal(exc: OSError) -> OSError | None:
    """What a failed write of the upload area means to the client (None: an error of another kind)."""
    if exc.errno in FULL:
        return StorageFull("no space left in the upload area", getattr(exc, "reserved", 0))
    if exc.errno in UNWRITABLE:
        return StorageUnwritable(exc.strerror or str(exc))
    return None

# A blob is shared by every item (of any library or tenant) that holds its bytes, and is removed when the
# last of them is deleted. Two sides must not interleave, so both hold this Postgres advisory lock: an
# upload, shared, from moving its blobs into place until its item rows commit; removal, exclusive, from
# checking that no item holds the bytes until the file is unlinked. An upload of the same bytes at that
# moment either commits its item first (the blob stays) or moves its own copy into place after the unlink.
BLOB_LOCK = 0x636C6170_71626C62  # "clapqblb"

RECLAIM_CHUNK = 1000  # blobs checked and unlinked per hold of the exclusive lock: uploads wait no longer
STALE_UPLOAD_S = 24 * 3600  # a temporary upload file untouched this long was left by a killed API process
TMP = "tmp"  # ROOT/tmp: uploads being received (BlobWriter), no stored file
SECRET, SECRET_BYTES = ".link-secret", 32  # ROOT/.link-secret: what audio links are signed with (BlobStore.secret)
HEX = frozenset("0123456789abcdef")


def is_digest(name: str) -> bool:
    """A sha256 as the store names its files: 64 lowercase hex digits."""
    return len(name) == 64 and set(name) <= HEX


def path_in(root: Path | str, sha256: str) -> Path:
    """Where a store at `root` keeps the file of this digest, ROOT/ab/cd/<sha256>; a backup's copy of a store
    is laid out the same. A digest that is none never reaches a path."""
    if not is_digest(sha256):
        raise ValueError("not a sha256 hex digest")
    return Path(root) / sha256[:2] / sha256[2:4] / sha256


def scan(root: Path | str) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """The files of a store at `root` (or of a backup's copy of one): {digest: bytes} of those at their place
    (ROOT/ab/cd/<sha256>), and (path in the store, bytes) of every other file in it (a stray, a copy cut short),
    temporary uploads (ROOT/tmp) left out: requests write them, and the maintenance loop removes those a killed
    API process left. A folder gone when its turn comes (a deletion removes the shard its last file leaves)
    held nothing."""
    root = Path(root)
    stored, other = {}, []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel = here.relative_to(root).parts
        if not rel:
            dirnames[:] = [d for d in dirnames if d != TMP]
            filenames = [f for f in filenames if not f.startswith(SECRET)]  # BlobStore.secret's
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            try:
                size = path.lstat().st_size
            except FileNotFoundError:  # removed meanwhile
                continue
            if len(rel) == 2 and is_digest(name) and name[:2] == rel[0] and name[2:4] == rel[1] and path.is_file():
                stored[name] = size
            else:
                other.append((str(path.relative_to(root)), size))
    return stored, other


def chunks(seq: list[str], size: int = RECLAIM_CHUNK) -> Iterator[list[str]]:
    """`seq` a RECLAIM_CHUNK (or `size`) at a time: what one hold of BLOB_LOCK takes."""
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


class BlobWriter:
    """A file-like sink that hashes while it writes to a temporary file in the store."""

    def __init__(self, store: "BlobStore") -> None:
        self._store = store
        try:
            fd, name = tempfile.mkstemp(prefix="upload-", dir=store.tmp_dir)
        except OSError as exc:  # no inode, or no block for its name, left: as full as no byte left (helper-59)
            if (refusal := _refusal(exc)) is not None:
                raise refusal from exc
            raise
        self._file: BinaryIO = os.fdopen(fd, "w+b")
        self.tmp_path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self._checked = -RESERVE_CHECK_BYTES  # the size at which the disk's room was last looked at
        self.sha256: str | None = None
        self._replaced: weakref.finalize | None = None  # the stored copy a commit replaced, held open

    # werkzeug's multipart parser needs write(), seek() and read() on the stream
    def write(self, data: bytes) -> int:
        try:
            if self._store.reserve_bytes and self.size - self._checked >= RESERVE_CHECK_BYTES:
                self._checked = self.size
                self._store.check_room()
            n = self._file.write(data)
        except OSError as exc:
            self._give_up(exc)
            raise
        self._hash.update(data)
        self.size += len(data)
        return n

    def seek(self, *args) -> int:
        return self._file.seek(*args)

    def tell(self) -> int:
        return self._file.tell()

    def read(self, *args) -> bytes:
        return self._file.read(*args)

    def flush(self) -> None:
        self._file.flush()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()

    @property
    def digest(self) -> str:
        """The sha256 of what was written so far (all of it once the part has been received)."""
        return self.sha256 or self._hash.hexdigest()

    def commit(self) -> str:
        """Fsync, then move into place under its hash; returns the sha256. Bytes already stored (a copy,
        a failed file sent again) take the same path and replace the stored copy with their own, identical
        bytes (which also mends a damaged copy): a stored file is shared by every tenant, and an upload
        that kept it (rehashing it, no fsync, no rename) answered in another time than one that did not,
        which told a tenant that someone else holds the file (helper-35: 0.13 s against 0.09 s for 40 MB).
        A reader of the old copy keeps reading it (the rename swaps the name, not the open file)."""
        if self.sha256 is not None:
            return self.sha256
        digest = self.digest
        final = self._store.path_for(digest)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())  # where a full disk often shows first (NFS, delayed allocation)
            self._file.close()
            new_dirs = [d for d in (final.parent.parent, final.parent) if not d.is_dir()]
            final.parent.mkdir(parents=True, exist_ok=True)
            self._hold_replaced(final)
            # same filesystem: an atomic rename, so a reader never sees half a blob
            os.replace(self.tmp_path, final)
            # the rename (and any shard directory made for it) is on disk before the caller commits
            # the item row: a power cut must not leave a row whose blob's name was never written
            for d in {final.parent, *(n.parent for n in new_dirs)}:
                fsync_dir(d)
        except OSError as exc:
            self._give_up(exc)
            raise
        self.sha256 = digest
        return digest

    def _hold_replaced(self, final: Path) -> None:
        """Keep the stored copy this commit replaces open, so that the file system frees its blocks when
        `release` closes it (after the answer is sent), not during the rename: freeing them made an upload of
        bytes already stored 6 ms slower at 40 MB, which told a tenant that another holds them (helper-37).
        Closed when the writer is collected, whatever happens."""
        try:
            fd = os.open(final, os.O_RDONLY)
        except OSError:  # not stored yet (or unreadable: the rename replaces it all the same)
            return
        self._replaced = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """Let the file system free the stored copy this commit replaced (see _hold_replaced), now."""
        if self._replaced is not None:
            self._replaced()

    def release_later(self) -> None:
        """The same, on this process's closer thread: freed in the request's thread, after its answer, the
        copy held up the next request on the same connection (5-8 ms against 1 ms at 40 MB, which told the
        same thing; helper-38)."""
        if self._replaced is not None and self._replaced.alive:
            _, close, args, _ = self._replaced.detach()
            one_thread("clapq-blob-closer").submit(close, *args)

    def _give_up(self, exc: OSError) -> None:
        """After a failed write or commit: the part is discarded, and a full disk or quota is StorageFull, a
        read-only one StorageUnwritable (the caller re-raises any other error)."""
        self.discard()
        if (refusal := _refusal(exc)) is not None:
            raise refusal from exc

    def discard(self) -> None:
        self.release()
        try:
            if not self._file.closed:
                self._file.close()  # flushes what is buffered, which fails again on a full disk
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)


class BlobStore:
    """Blobs live at ROOT/ab/cd/<sha256>; user filenames never reach a path."""

    def __init__(self, root: Path | str, reserve_bytes: int = 0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():  # the library's audio and which files it holds are its owner's alone
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp_dir = self.root / TMP
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.reserve_bytes = reserve_bytes  # what uploads leave free on its disk (disk_reserve)

    def check_room(self) -> None:
        """An OSError ENOSPC where the disk has no more than the reserve left: a part being written stops there,
        as it would at the disk's last byte (BlobWriter.write checks each RESERVE_CHECK_BYTES)."""
        st = os.statvfs(self.tmp_dir)
        if st.f_bavail * st.f_frsize <= self.reserve_bytes:
            raise kept_free(self.reserve_bytes)

    def path_for(self, sha256: str) -> Path:
        return path_in(self.root, sha256)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def remove(self, sha256: str) -> bool:
        """Unlink a blob (only under BLOB_LOCK, once no item holds it), and its shard directories if that
        left them empty (no upload is moving a blob into them: it would hold the lock); False if it was
        not there."""
        path = self.path_for(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        for d in (path.parent, path.parent.parent):
            try:
                d.rmdir()
            except OSError:  # not empty
                break
        return True

    def secret(self) -> bytes:
        """32 random bytes kept beside the stored files (ROOT/.link-secret, the owner's alone), made by the first
        process that asks: what the API signs audio links with, beside the key's stored hash, so that reading the
        database (a backup of it, a read-only login) makes no link. Every API process reads this folder, and only
        they and the workers do. Read at each use: removed, it is made again, and every link made before stops."""
        path = self.root / SECRET
        try:
            got = path.read_bytes()
        except FileNotFoundError:
            got = None
        if got is not None and len(got) == SECRET_BYTES:
            return got
        if got is not None:
            path.unlink(missing_ok=True)  # cut short by hand: made again
        fd, tmp = tempfile.mkstemp(prefix=SECRET + ".", dir=self.root)  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # two processes at once: one's is kept, and both read it
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return path.read_bytes()

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put_bytes(self, data: bytes) -> str:
        w = self.writer()
        w.write(data)
        return w.commit()


def queue_reclaim(engine: Engine, shas: Iterable[str]) -> None:
    """Queue these blobs for `reclaim`, in a transaction of their own: an upload's, before they move into
    place (its rows' commit takes them off again, `unqueue_reclaim`), and again when its rows never
    committed. (A deleted item's are queued by the trigger of migration 0007, in the deleting transaction.)"""
    shas = sorted(set(shas))
    if shas:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO blob_reclaims (sha256) SELECT unnest(CAST(:shas AS text[])) "
                              "ON CONFLICT DO NOTHING"), {"shas": shas})


def unqueue_reclaim(conn, shas: Iterable[str]) -> None:
    """In the caller's transaction, which commits items holding these bytes: they are no longer to go.
    The rows are locked in digest order, as every writer of this table takes them (migration 0008), so
    two uploads sharing files wait for each other instead of deadlocking."""
    conn.execute(text("DELETE FROM blob_reclaims WHERE sha256 IN (SELECT sha256 FROM blob_reclaims "
                      "WHERE sha256 = ANY(CAST(:shas AS text[])) ORDER BY sha256 FOR UPDATE)"),
                 {"shas": sorted(set(shas))})


def _reclaim_chunk(conn, store: BlobStore, chunk: list[str]) -> int:
    """In the caller's transaction, under the exclusive BLOB_LOCK: take these digests' queue rows, keep
    the digests some item holds again (uploaded since), unlink the rest; returns how many were removed."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": BLOB_LOCK})
    taken = list(conn.scalars(text("DELETE FROM blob_reclaims WHERE sha256 = ANY(CAST(:shas AS text[])) "
                                   "RETURNING sha256"), {"shas": chunk}))
    held = set(conn.scalars(text("SELECT DISTINCT sha256 FROM items WHERE sha256 = ANY(CAST(:shas AS text[]))"),
                            {"shas": taken}))
    removed = 0
    for sha in taken:
        if sha not in held:
            try:
                removed += store.remove(sha)
            except OSError:  # the rows are gone either way: a file left over is only space
                log.exception("could not remove a deleted file's blob", extra={"sha256": sha})
    return removed


def reclaim(engine: Engine, store: BlobStore, shas: Iterable[str]) -> int:
    """Unlink the blobs of these queued digests (table blob_reclaims; a deletion's own) that no item holds
    any more; returns how many files were removed.

    Each chunk is one transaction: its queue rows are taken and its files unlinked, then it commits. A
    crash before the commit leaves the rows queued, and unlinking a file already gone is a no-op, so a
    later pass (`reclaim_queued`) finishes the chunk."""
    removed = 0
    for chunk in chunks(sorted(set(shas))):
        with engine.begin() as conn:
            removed += _reclaim_chunk(conn, store, chunk)
    return removed


def reclaim_queued(engine: Engine, store: BlobStore, older_than_s: float) -> int:
    """`reclaim` every digest queued at least `older_than_s` ago (the maintenance loop's pass)."""
    removed = 0
    while True:
        with engine.begin() as conn:
            chunk = list(conn.scalars(text(
                "SELECT sha256 FROM blob_reclaims WHERE queued_at <= now() - make_interval(secs => :s) "
                "ORDER BY queued_at LIMIT :n"), {"s": older_than_s, "n": RECLAIM_CHUNK}))
            if not chunk:
                return removed
            removed += _reclaim_chunk(conn, store, chunk)


def remove_stale_uploads(store: BlobStore, older_than_s: float = STALE_UPLOAD_S) -> int:
    """Remove temporary upload files nothing has written for `older_than_s` (a request ends by committing
    or discarding its own; these were left by an API process killed mid-upload); returns how many."""
    cutoff, removed = time.time() - older_than_s, 0
    for path in store.tmp_dir.glob("upload-*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # its request ended meanwhile
            pass
    return removed
