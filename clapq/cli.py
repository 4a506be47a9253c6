"""The `clapq` command: up (all-in-one), api, worker, migrate, keys create/list/revoke, backup, restore."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import difflib
import errno
import fcntl
import json
import importlib
import io
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from clapq.settings import Settings, claim_window_s


def _fail(message: str, code: int = 2) -> None:
    print(f"clapq: {message}", file=sys.stderr)
    raise SystemExit(code)


# the folder this installation's packages (clapq, api, worker) are imported from. A child interpreter of clapq's own
# starts there: `python -m` and `python -c` put their working directory first on sys.path, so one started where the user
# ran `clapq up` imported a folder `clapq`, `api` or `worker` there (a checkout of another version) instead. A role of
# `clapq up` goes back to the user's directory as it starts (START_DIR, at the end of this file), where the relative
# paths given to it (CLAPQ_MODEL, TMPDIR, HF_HOME...) mean what they meant; its own sys.path[0] stays this folder
CODE_ROOT = Path(__file__).resolve().parent.parent
START_DIR = "CLAPQ_START_DIR"


# pick_dtype in a child interpreter (torch only, no transformers: a second or two): `clapq worker`
# must not import torch before Celery forks
_PRECISION_CHECK = """import sys
from clapq.precision import pick_device, pick_dtype
try:
    pick_dtype(pick_device(sys.argv[1]), sys.argv[2])
except ValueError as exc:
    sys.exit(str(exc))
"""


def _check_model(settings: Settings) -> None:
    """Stop with a sentence, before anything starts, when the model cannot be loaded as configured: no
    checkpoint, or an explicit CLAPQ_DEVICE / CLAPQ_PRECISION this machine cannot run (a GPU that is
    not there, fp16 on a CPU, bf16 on a GPU without it; `auto` for both always has an answer)."""
    from clapq.checkpoint import ModelUnavailable, resolve

    try:
        resolve(settings.model)
    except ModelUnavailable as exc:
        _fail(str(exc))
    if (settings.device, settings.precision) != ("auto", "auto"):
        try:
            r = subprocess.run([sys.executable, "-c", _PRECISION_CHECK, settings.device, settings.precision],
                               capture_output=True, text=True, timeout=300, cwd=CODE_ROOT)
        except subprocess.TimeoutExpired:
            _fail(f"checking CLAPQ_DEVICE={settings.device} took over 5 minutes (is the GPU driver hung?)")
        if r.returncode:
            _fail((r.stderr.strip().splitlines() or ["cannot check CLAPQ_DEVICE and CLAPQ_PRECISION"])[-1])


def _schema_served(settings: Settings) -> None:
    """Stop with a sentence, before anything starts, where the database's schema is older than this clapq reads
    (clapq.db.not_migrated): `clapq api`, `worker` and `beat` started before `clapq migrate` ran on it."""
    from clapq.db import not_migrated

    try:
        _where(settings.database_url)
    except RuntimeError as exc:
        _fail(str(exc), 1)
    if why := not_migrated(settings.database_url):
        _fail(why, 1)


def _where(url: str) -> str:
    """The database URL as a sentence may show it (no password); one that is not a PostgreSQL URL is a RuntimeError
    with a sentence: a mysql:// one was a ModuleNotFoundError traceback (helper-109)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        u = make_url(url)
        where = u.render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):  # their messages repeat the URL, password and all
        raise RuntimeError("DATABASE_URL is not a database URL like postgresql://user:password@host:5432/clapq "
                           "(its port, host or name cannot be read)") from None
    if u.drivername not in ("postgresql", "postgres", "postgresql+psycopg2"):  # clapq.db.normalise_url's
        raise RuntimeError(f"DATABASE_URL is not a PostgreSQL URL like postgresql://user:password@host:5432/clapq "
                           f"(it begins {u.drivername}://)")
    return where


def _why(exc: Exception) -> str:
    """The first line of a database error's own words (SQLAlchemy's add the statement and a link)."""
    why = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return why[0] if why else type(exc).__name__


def _migrate(url: str, data_dir: Path | None = None, starting=None) -> tuple[str | None, str]:
    """Bring the schema up to date; its revisions before and after (clapq.db.migrate; `starting` is its). A database
    that cannot be reached, parsed or changed (no right to create the vector extension, say) is a RuntimeError with
    a sentence, not a traceback. The embedded database of `data_dir` that a newer clapq migrated is said as what
    can be done there: no `alembic downgrade` reaches it (that takes a DATABASE_URL), so it is that version, or
    a copy made before the upgrade (helper-130)."""
    from sqlalchemy.exc import SQLAlchemyError

    from clapq.db import NewerSchema, migrate

    where = _where(url)
    try:
        return migrate(url, starting)
    except SQLAlchemyError as exc:
        raise RuntimeError(f"cannot set up the database at {where}: {_why(exc)}") from None
    except NewerSchema as exc:
        if data_dir is None:
            raise
        raise RuntimeError(f"the data directory {data_dir} was migrated by a newer clapq (schema revision "
                           f"{exc.revision}; this version knows up to {exc.head}); nothing was changed: run that "
                           "newer version on it. This one opens a copy of the data directory, or a `clapq backup`, "
                           "made before that upgrade (README, Upgrading)") from None


def _clapq_database(url: str, tables: bool = True) -> None:
    """A RuntimeError with a sentence where the service's database cannot be reached, or holds no clapq tables
    (`tables`; DATABASE_URL naming another database): `clapq check`, `backup` and `restore` met both as a traceback,
    an OperationalError or 'relation "items" does not exist' (helper-109)."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from clapq.db import get_engine

    where = _where(url)
    try:
        with get_engine(url).connect() as conn:
            # where the service's own statements find them: its connection's search_path (a database whose
            # clapq tables are in a schema of their own, `ALTER DATABASE ... SET search_path`), not only public's
            ours = conn.scalar(text("SELECT to_regclass('items') IS NOT NULL"))
    except SQLAlchemyError as exc:
        raise RuntimeError(f"cannot reach the database at {where}: {_why(exc)}") from None
    if tables and not ours:
        raise RuntimeError(f"the database at {where} holds no clapq tables: it is not the service's database "
                           "(DATABASE_URL), or no `clapq migrate` has run on it")


def _make_data_dir(data_dir: Path, instead: str) -> None:
    """The data directory, made where it is not there yet. One that cannot be (a file of that name, a disk mounted
    read-only or not at all, a folder of another user's) was a traceback from `clapq up` and `clapq restore`
    (helper-109); it is a sentence now."""
    # os.path's, which say False where the path cannot be looked at (a folder of another user's): pathlib's raised
    # PermissionError, a traceback, before Python 3.12 (helper-111)
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):  # was a FileExistsError traceback
        _fail(f"the data directory {data_dir} is a file: {instead}", 1)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"cannot make the data directory {data_dir}: {exc.strerror or exc}", 1)


def _migrated(before: str | None, after: str) -> str:
    """What a migration did, in words: a deploy script's log said "migrations applied" whether it applied any."""
    if before is None:
        return f"a database with no clapq tables: schema created, at revision {after}"
    if before == after:
        return f"schema already at revision {after}, this clapq's newest: nothing to apply"
    return f"schema migrated from revision {before} to {after}"


def cmd_migrate(args) -> None:
    try:
        # Postgres alone: a migration run by hand (README, Upgrading) was refused without a REDIS_URL it never used
        said = _migrated(*_migrate(Settings.from_env().require_urls(redis=False).database_url))
    except RuntimeError as exc:
        _fail(str(exc), 1)
    print(said, file=sys.stderr)


def host_port(host: str, port) -> str:
    """host:port, an IPv6 address in brackets ([::1]:8000), as gunicorn's --bind and URLs write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cmd_api(args) -> None:
    os.environ["CLAPQ_PROCESS"] = "clapq-api"
    settings = Settings.from_env().require_urls()
    _check_model(settings)
    _schema_served(settings)
    host = os.environ.get("CLAPQ_HOST", "0.0.0.0")
    port = _whole("CLAPQ_PORT", "8000", 1, 65535)
    workers = _whole("CLAPQ_API_WORKERS", "2", 1, 256)
    threads = _whole("CLAPQ_API_THREADS", "4", 1, 1024)
    _open_files_for_uploads(threads, settings.max_files_per_batch)
    # gunicorn's processes count their requests in files here, so /metrics adds up all of them, not one
    # process's (a counter that went down from one scrape to the next); fresh for each start, as the files
    # of processes gone would count again
    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="clapq-api-metrics-")
    argv = ["gunicorn", "api.wsgi:app", "--bind", host_port(host, port), "--workers", str(workers),
            "--threads", str(threads), "--timeout", "300",
            # gunicorn's own refusals (a malformed request, a line or headers over its limits) in the API's JSON
            # envelope; the class gunicorn itself picks for this many threads (sync for one), as a subclass
            "--worker-class", f"api.gunicorn_errors.JsonError{'Thread' if threads > 1 else 'Sync'}Worker",
            "--graceful-timeout", "20", "--access-logfile", "-",
            # an audio link's token, which opens a tenant's file without a key, is not written in it
            "--logger-class", "api.gunicorn_log.HiddenLinkLogger",
            # the longest request line gunicorn takes (its maximum but for none at all): a GET search of
            # ~900 characters outside ASCII (9 bytes each, percent-encoded), 8,000 in ASCII; POST takes any
            "--limit-request-line", "8190",
            # gunicorn's runtime-control socket lives at one path per user ($HOME/.gunicorn/gunicorn.ctl),
            # which two services on one machine (or `make up` beside `make test`) would share; unused here
            "--no-control-socket"]
    from gunicorn.app.wsgiapp import WSGIApplication
    from gunicorn.errors import HaltServer

    class API(WSGIApplication):
        def load_config(self) -> None:  # again at each `kill -HUP`
            super().load_config()
            self.cfg.set("on_reload", _stop_on_new_code)

    # taken here, in gunicorn's master, before it forks a process: each one it forks, now or after one died, holds
    # the code on disk to what the master runs (api.wsgi), and its searches to it (api.query.loaded). The `api`
    # package too: gunicorn puts its working directory first on sys.path, where a folder `api` of the user's (a
    # checkout of another version) was the app its processes imported
    for package in ("api", "worker"):
        importlib.import_module(package)

    sys.argv = argv
    master = os.getpid()
    try:
        API("%(prog)s [OPTIONS] [APP_MODULE]").run()
    except HaltServer as exc:
        # halting, gunicorn reaps the rest, and a second process that failed to load (both forked again after a crash,
        # on new code: api.wsgi) raised this again there, a traceback; each one has said why
        raise SystemExit(exc.exit_status) from None
    finally:
        # gunicorn's worker processes are forked inside run() and leave it through here too (sys.exit): only
        # the master, at its end, removes the folder its workers share (a worker replaced meanwhile would
        # find it gone and fail to boot, which stops the master)
        if made is not None and os.getpid() == master:
            shutil.rmtree(made, ignore_errors=True)


def _stop_on_new_code(arbiter) -> None:
    """gunicorn's on_reload: a `kill -HUP` of its master forks all its processes again, each of which refused the new
    code on disk (api.wsgi), and the master, halting on the first, met the second as it stopped the rest: a traceback
    of gunicorn's, exit 1. Where the code changed, the master stops first, as a process forked then would, for
    `clapq up` (or the supervisor) to start it again on the new code."""
    import worker
    from gunicorn.errors import HaltServer

    from api import CODE_CHANGED

    if worker.code_on_disk() != worker.CODE:
        print(CODE_CHANGED, file=sys.stderr, flush=True)
        raise HaltServer("the code on disk changed since this API started", arbiter.APP_LOAD_ERROR)


OPEN_FILES = 65_536  # the soft limit of open files clapq api asks for, at least


def _open_files_for_uploads(threads: int, files_per_batch: int) -> None:
    """Raise this process's soft limit of open files (gunicorn's processes inherit it) to what uploads on every
    thread at once hold: each file of an upload is a temporary file held open until the request has been read
    (api.uploads), so at the usual soft limit of 1,024 (`ulimit -n`; systemd's and Docker's default), two
    uploads of 1,000 files in one process were 500s, and so was any request of another tenant that opened a file
    or a connection meanwhile (helper-75). Only the soft limit moves: to OPEN_FILES (or more where uploads need
    more), within the hard one, as each kept-alive connection holds a file too; where the hard limit is below what
    uploads need, a warning names it."""
    import resource

    need = threads * (files_per_batch + 16) + 256  # a form's parts (MAX_FORM_PARTS), and the process's own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(need, OPEN_FILES)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < need:
        print(f"clapq: warning: this process may open {soft} files (ulimit -n), fewer than the {need} that uploads of "
              f"{files_per_batch} files (CLAPQ_MAX_FILES_PER_BATCH) on each of its {threads} threads (CLAPQ_API_THREADS) "
              "hold at once: raise the limit, or lower one of those", file=sys.stderr, flush=True)


def _port(raw: str) -> int:
    """--port: a TCP port, or argparse's usage error naming the option."""
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port: give a whole number from 1 to 65535")
    return int(raw)


def _whole(name: str, default: str, lo: int, hi: int) -> int:
    """An integer setting from the environment, or a sentence that says what it takes."""
    raw = os.environ.get(name, default)
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        _fail(f"{name}={raw!r}: give a whole number from {lo} to {hi}")
    return value


def _check_scratch(root: Path) -> None:
    """A scratch folder the worker cannot make or write in (a read-only mount, another user's, a path under a
    file) stops it at start with a sentence. It started, and every task then failed on it, "OSError: [Errno 30]
    Read-only file system", leaving its files `running` until CLAPQ_STALE_AFTER_S, sent again, failing again,
    while /readyz said ready and `clapq upload` said "a worker stopped?" (helper-109). A disk full for now is no
    reason to stop (under `clapq up`, a worker started again on it at each end would stop the whole service after
    its third try, helper-111): the worker starts, saying so, and each file waits for room as it is decoded."""
    import tempfile

    if os.path.lexists(root) and not os.path.isdir(root):
        _fail(f"CLAPQ_SCRATCH_DIR {root} is a file, not a folder: workers decode each file into it; give a folder", 1)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".check-"):
            pass
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"clapq: warning: CLAPQ_SCRATCH_DIR {root} has no room now ({exc.strerror}): files wait for room "
                  "as they are decoded, and go back to the queue where none comes", file=sys.stderr, flush=True)
            return
        _fail(f"CLAPQ_SCRATCH_DIR {root} cannot be written ({exc.strerror or exc}): workers decode each file into "
              "it; give a folder this user can write, on a disk with room for the decoded audio", 1)


def cmd_worker(args) -> None:
    os.environ["CLAPQ_PROCESS"] = "clapq-worker"
    settings = Settings.from_env().require_urls()
    _check_model(settings)
    _check_scratch(settings.scratch_dir)
    _schema_served(settings)
    if settings.worker_nice > 0:  # the pool children inherit it
        os.nice(settings.worker_nice)
    from worker.celery_app import app

    from clapq import logs

    logs.configure(settings.log_level)  # Celery's setup_logging does it again; a warning at its start is logged
    # Celery's banner is loose text on stdout; in JSON its facts are in the records that follow (the broker
    # connected to, "ready")
    quiet = ["--quiet"] if logs.log_format() == "json" else []
    # the node name has this process's id: two workers on one host were both clapq@host.0 (helper-41)
    app.worker_main([*quiet, "worker", "--loglevel", settings.log_level, "--pool", "prefork",
                     "--concurrency", str(settings.worker_concurrency), "--queues", "embed",
                     "--without-gossip", "--without-mingle", "--hostname",
                     f"clapq@{os.uname().nodename}.{os.getpid()}"])


def _database_url(settings: Settings, data_dir: Path, stack: list, watch: list | None = None) -> str:
    if settings.database_url:
        return settings.database_url
    from clapq.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(data_dir / "pg")
    url = pg.start()
    stack.append(pg.stop)
    if watch is not None:  # pgserver keeps one server per directory and process: it cannot be restarted here
        watch.append(("the embedded Postgres", pg.gone, None))
    return url


def _service_data(args, also: str = ""):
    """(settings, stack, URL) of the service's database: DATABASE_URL, else the embedded one of --data-dir,
    shared with a `clapq up` running on it, else started here (the stack stops it)."""
    settings = Settings.from_env(data_dir=args.data_dir)
    if not settings.database_url and not (settings.data_dir / "pg").is_dir():
        # a new database here would hold keys no running service knows (helper-51: `keys create` without the
        # --data-dir `clapq up` was given printed a key that got 401s)
        _fail(f"no clapq data in {settings.data_dir}: no `clapq up` has run with it. Pass --data-dir, the directory "
              f"`clapq up` uses (it prints it as 'data:'), or set DATABASE_URL to the service's database{also}", 1)
    stack: list = []
    try:
        return settings, stack, _database_url(settings, settings.data_dir, stack)
    except RuntimeError as exc:
        _fail(str(exc), 1)


def _with_keys(args, work) -> None:
    """work(session) on the service's database (_service_data); what it returns is printed. DATABASE_URL's schema is
    the operator's to migrate (`clapq migrate`, compose's one-shot): one older than this clapq's stops a key's
    command as it stops `clapq api` (clapq.db.not_migrated), where `clapq keys list` migrated it, unsaid, beside the
    services of the older version (a migration may block writes for minutes: 0003) (helper-119). A data
    directory's embedded database, which no `clapq migrate` reaches, is migrated first, as `clapq up` does at its
    start, and that is said."""
    from clapq.db import not_migrated, session_scope

    settings, stack, url = _service_data(args)
    try:
        if settings.database_url:
            _clapq_database(url)
            if why := not_migrated(url):
                raise RuntimeError(why)
        elif (done := _migrate(url, settings.data_dir))[0] != done[1]:
            print(f"clapq: {_whose_database(settings.data_dir)}{_migrated(*done)} (as `clapq up` does at its start)",
                  file=sys.stderr)
        with session_scope(url) as s:
            out = work(s)
        print(out)
    except RuntimeError as exc:
        _fail(str(exc), 1)
    finally:
        for stop in reversed(stack):
            stop()


def cmd_keys_create(args) -> None:
    from clapq.keys import create_key_said

    if not args.tenant.strip():
        _fail("--tenant needs a name")

    def create(s) -> str:
        key, said = create_key_said(s, args.tenant)
        print(f"clapq: {said}", file=sys.stderr)  # stdout holds the key alone, for scripts
        return key

    _with_keys(args, create)


def _data_dir_flag(args) -> str:
    """" --data-dir DIR" where the command was given one, for the commands its words advise: without it they
    would reach the default data directory's service, or none."""
    return f" --data-dir {shlex.quote(str(args.data_dir))}" if args.data_dir is not None else ""


def cmd_backup(args) -> None:
    from clapq.backup import BackupError, backup

    settings, stack, url = _service_data(args, " (and CLAPQ_BLOB_DIR to its stored files)")
    try:
        _clapq_database(url)
        key = None if settings.database_url else settings.data_dir / "api_key"
        backup(url, settings.blob_dir, args.dest, key_file=key, say=lambda m: print(m, file=sys.stderr),
               check=f"clapq check{_data_dir_flag(args)}")
    except (BackupError, RuntimeError, OSError) as exc:
        _fail(str(exc), 1)
    finally:
        for stop in reversed(stack):
            stop()


def cmd_check(args) -> None:
    from clapq.check import check, describe

    settings, stack, url = _service_data(args, " (and CLAPQ_BLOB_DIR to its stored files)")
    try:
        if not settings.blob_dir.is_dir():
            _fail(f"no stored files at {settings.blob_dir} (CLAPQ_BLOB_DIR): not this service's store", 1)
        _clapq_database(url)
        report = check(url, settings.blob_dir, verify=args.verify, remove_orphans=args.remove_orphans,
                       rate=args.rate * 1e6, say=lambda m: print(m, file=sys.stderr, flush=True))
    except (RuntimeError, OSError) as exc:
        _fail(str(exc), 1)
    finally:
        for stop in reversed(stack):
            stop()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(describe(report, settings.blob_dir, _data_dir_flag(args))))
    sys.exit(0 if report["ok"] else 1)


def _in_its_place(backup: Path, data_dir: Path) -> str:
    """How to put a backup in the place of a data directory's data, which a restore never writes over (helper-126:
    a restore onto a running service's said "stop it first", and, stopped, it was refused all the same)."""
    new, old = (shlex.quote(f"{data_dir}{end}") for end in (".restored", ".before-restore"))
    here = shlex.quote(str(data_dir))
    return (f"a restore goes into a new data directory, and leaves this one as it is. To put the backup in its place: "
            f"`clapq restore {shlex.quote(str(backup))} --data-dir {new}`, then, `clapq up` stopped, `mv {here} {old} "
            f"&& mv {new} {here}` (its data as it is now kept in {old})")


def cmd_restore(args) -> None:
    from clapq.backup import KEY, BackupError, holds_clapq_tables, ready_to_restore, refuse_shared_store, restore

    settings = Settings.from_env(data_dir=args.data_dir)
    data_dir = settings.data_dir
    # a clapq data directory already (or one a restore that failed made): whether it holds a service's data is said
    # first, its database asked, before its store is taken for another service's
    ours = not settings.database_url and (data_dir / "pg").is_dir()
    try:  # before anything is made: the backup whole, and a store no other service uses
        manifest = ready_to_restore(args.backup, settings.blob_dir, None if settings.database_url else data_dir,
                                    store=not ours)
    except BackupError as exc:
        _fail(str(exc), 1)
    lock = None
    if not settings.database_url:  # a `clapq up` on the data directory restored into: refused
        _make_data_dir(data_dir, "restore into a new folder (`clapq up --data-dir` it then)")
        lock = _lock_data_dir(data_dir, code=1, busy=lambda pid: f"{data_dir} is the data directory of a running "
                              f"`clapq up` (pid {pid}), which holds its data: {_in_its_place(args.backup, data_dir)}")
    stack: list = []
    try:
        url = _database_url(settings, data_dir, stack)
        _clapq_database(url, tables=False)  # restore() refuses one that holds them
        if ours and holds_clapq_tables(url):
            raise RuntimeError(f"{data_dir} holds a clapq service's data already (its database has clapq's tables); "
                               f"nothing in it was touched: {_in_its_place(args.backup, data_dir)}")
        if ours:
            refuse_shared_store(args.backup, settings.blob_dir, data_dir)
        restore(args.backup, url, settings.blob_dir, say=lambda m: print(m, file=sys.stderr),
                check=f"clapq check{_data_dir_flag(args)}", manifest=manifest)
        _migrate(url)  # a backup of an earlier clapq: brought to this one's schema
        if manifest.get("api_key") and not settings.database_url and not (data_dir / KEY).exists():
            shutil.copyfile(args.backup / KEY, data_dir / KEY)  # the owner's key goes on working
            os.chmod(data_dir / KEY, 0o600)
    except (BackupError, RuntimeError, OSError) as exc:
        _fail(str(exc), 1)
    finally:
        for stop in reversed(stack):
            stop()
        if lock is not None:
            lock.close()
    if not settings.database_url and os.environ.get("CLAPQ_BLOB_DIR"):
        # the files are not in the data directory, where a `clapq up --data-dir` without it looks: every item's
        # stored file missing (it said to start it so, helper-109)
        blobs = shlex.quote(str(settings.blob_dir.resolve()))
        print(f"restored into {data_dir}, its stored files into {blobs} (CLAPQ_BLOB_DIR): start it with "
              f"`CLAPQ_BLOB_DIR={blobs} clapq up --data-dir {shlex.quote(str(data_dir))}`", file=sys.stderr)
    elif not settings.database_url:
        print(f"restored: start it with `clapq up --data-dir {data_dir}`", file=sys.stderr)
    else:  # CLAPQ_BLOB_DIR unset, the files are in the default data directory, which a service may not use
        default = "" if os.environ.get("CLAPQ_BLOB_DIR") else " (the default: CLAPQ_BLOB_DIR is not set)"
        print(f"restored into DATABASE_URL and {settings.blob_dir}{default}: start the service on them, with "
              f"CLAPQ_BLOB_DIR={settings.blob_dir}", file=sys.stderr)


def _utc(t) -> str:
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def cmd_keys_list(args) -> None:
    from clapq.keys import list_keys

    def table(s) -> str:
        rows = [(k.prefix + "…", tenant, _utc(k.created_at), f"revoked {_utc(k.revoked_at)}" if k.revoked_at else "active")
                for k, tenant in list_keys(s)]
        head = ("key", "tenant", "created (UTC)", "state")
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(3)]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in [head, *rows])

    _with_keys(args, table)


def cmd_keys_revoke(args) -> None:
    from clapq.keys import NoSuchKey, revoke_key

    def revoke(s) -> str:
        try:
            key, tenant, before = revoke_key(s, args.key.strip())
        except NoSuchKey as exc:
            _fail(str(exc), 1)
        if before:
            return f"{key.prefix}… of tenant {tenant!r} was revoked already, at {_utc(key.revoked_at)} UTC"
        return f"revoked {key.prefix}… of tenant {tenant!r}: requests with it get 401 from now on"

    _with_keys(args, revoke)


def _whose_database(data_dir: Path | None) -> str:
    """How a migration's line names the database it migrated: a data directory's embedded one, or (None)
    DATABASE_URL's."""
    return f"the database of {data_dir}: " if data_dir is not None else "DATABASE_URL's database: "


def _migrate_up(url: str, data_dir: Path | None) -> None:
    """`clapq up`'s migration, said where it applies any: on an earlier clapq's data (`git pull`, `make up`) it
    migrated unsaid, so nothing told the operator that the data was now an upgraded one, which an earlier clapq no
    longer opens, nor what `up` was doing through a migration of minutes (0003's) (helper-130). `data_dir`: its
    embedded database's, None for DATABASE_URL's."""
    where = _whose_database(data_dir)

    def starting(before: str, head: str) -> None:
        print(f"clapq: {where}migrating its schema from revision {before} to {head}, this clapq's (on a large library "
              "this can take minutes: README, Upgrading)", file=sys.stderr, flush=True)

    before, after = _migrate(url, data_dir, starting)
    if before is not None and before != after:
        print(f"clapq: {where}{_migrated(before, after)}"
              f"{'; an earlier clapq no longer opens it' if data_dir is not None else ''}", file=sys.stderr, flush=True)


def _hand_back_running(url: str, whose: str = "left running when clapq last stopped", heartbeat_s: int | None = None,
                       then: str = "") -> None:
    """Files the last `clapq up` left running (stopped or killed before its worker finished them) are
    stranded: no worker of this data directory runs yet. Dated back, they are what the maintenance loop's
    first pass, as beat starts, queues again (one a task, as a lost worker's are), where they waited
    CLAPQ_STALE_AFTER_S with the new worker idle. So are those of a worker of this `up` that ended.
    With `heartbeat_s`, those alone its live worker was on (_being_embedded), each given back the try `up`'s own
    stop cut short (_hand_back_stopped). `then` follows the line that says how many."""
    from sqlalchemy import func, update

    from clapq.db import session_scope
    from clapq.models import Item

    which = [Item.status == "running"]
    values = {"updated_at": datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)}
    if heartbeat_s is not None:
        which = _being_embedded(heartbeat_s)
        values["attempts"] = func.greatest(Item.attempts - 1, 0)
    with session_scope(url) as s:
        n = s.execute(update(Item).where(*which).values(**values)).rowcount
    if n:
        print(f"clapq: {n} file{'s' if n != 1 else ''} {whose} go{'es' if n == 1 else ''} back to the queue{then}",
              file=sys.stderr, flush=True)


def _being_embedded(heartbeat_s: int) -> tuple:
    """The running files of the embedded database whose worker was heard from lately (three heartbeats): those
    its live worker is on. One whose worker died before (killed for memory on it) is not among them."""
    from sqlalchemy import func

    from clapq.models import Item

    return (Item.status == "running",
            Item.updated_at >= func.now() - func.make_interval(0, 0, 0, 0, 0, 0, 3 * heartbeat_s))


def _stopping_worker(url: str, heartbeat_s: int, grace: float) -> None:
    """As `clapq up` stops a worker that is embedding files, say what it waits for and what becomes of them: the
    worker's task writes what it finished and hands back the rest within seconds (worker.stopping), where `up`
    said nothing for the 30 s a long recording's task ran on past."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from clapq.db import session_scope
    from clapq.models import Item

    try:
        with session_scope(url) as s:
            n = s.scalar(select(func.count()).select_from(Item).where(*_being_embedded(heartbeat_s)))
    except SQLAlchemyError:  # Postgres away: nothing to say of them
        return
    if n:
        print(f"clapq: stopping: the worker stops within seconds (up to {grace:.0f} s), keeping the files it "
              "finished; one it has not (a long recording) is embedded again from its start when clapq next starts",
              file=sys.stderr, flush=True)


def _hand_back_stopped(url: str, heartbeat_s: int) -> None:
    """The files `clapq up`'s worker was still embedding when `up` stopped it, as it was told to stop (Ctrl-C,
    SIGTERM, its terminal closed): a try the stop cut short, not the file's, is given back (attempts), and they are
    dated back for the next start's first pass. Each stop counted a try, and a 3-hour recording being embedded
    across three restarts failed for good, "gave up after 3 attempts; last error: worker lost" (its embedding
    takes minutes on a CPU, past the stop's grace). A file whose worker died on it before the stop (killed for
    memory) keeps its try: its worker was not heard from lately, or `up` dated it back as it started another."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        _hand_back_running(url, "the worker was embedding", heartbeat_s,
                           then=", to be embedded again from the start when clapq next starts (a try its stop cut "
                                "short is not counted against CLAPQ_MAX_ATTEMPTS)")
    except SQLAlchemyError:  # Postgres away: the next start hands them back, their tries counted
        pass


def _hand_back_after_worker(url: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    try:
        _hand_back_running(url, "the worker that ended was embedding")
    except SQLAlchemyError:  # Postgres away: the maintenance loop finds them after CLAPQ_STALE_AFTER_S
        pass


def _default_key(url: str, data_dir: Path) -> str:
    """The local owner's key, kept (0600) in the data directory so every start can show it."""
    from clapq.db import session_scope
    from clapq.keys import create_key, tenant_for_key

    path = data_dir / "api_key"
    if path.is_file():
        key = path.read_text().strip()
        with session_scope(url) as s:
            if tenant_for_key(s, key) is not None:
                return key
    with session_scope(url) as s:
        key = create_key(s, "default")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _wait_http(url: str, procs: list[subprocess.Popen], stop, timeout: float = 120.0) -> bool:
    """Whether the API answered; False when stop() says Ctrl-C came meanwhile (no waiting on for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop():
            return False
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{' '.join(p.args[-2:])} exited with {p.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the API did not answer on {url} within {timeout:.0f} s")


def _terminate(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _lock_data_dir(data_dir: Path, instead: str = "or give this one its own --data-dir", code: int = 2,
                   busy=None):
    """One `clapq up` per data directory: a second would start its own Redis and workers on the same
    Postgres, Redis files and blobs. The children it starts hold the lock too (pass_fds), so it is free
    only when this process and every one of them has ended (they die with it: die_with_parent). `instead`: what
    else the user may do, said after "stop it first"; `busy(pid)`: the whole sentence instead, where stopping it
    is not what to do."""
    f = open(data_dir / "clapq-up.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        _fail(busy(holder) if busy else f"another `clapq up` (pid {holder}), or processes it started, are using "
              f"{data_dir}; stop it first, {instead}", code)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


MAX_RESTARTS, RESTART_WINDOW_S = 3, 300  # `clapq up` starts a child that ends again, up to 3 times in 5 minutes
SETTLE_S, SETTLE_MOST_S = 2.0, 60.0  # a role is started again once the code changing on disk has stayed the same


def _settled_code(started_on: str, stop) -> str:
    """The code on disk (worker.code_on_disk) a role of `clapq up` is to start again on, once it has stayed the same
    for SETTLE_S where it is not `started_on`, the code the roles started on (or for at most SETTLE_MOST_S; not once
    stop() says Ctrl-C came): one that ends as clapq is upgraded in place (a worker stops on its next task, an API
    on `kill -HUP`) was started again in the middle of the `git pull` or `pip install -U`, took the half-changed
    tree for its code, and answered 503 code_changed (the API) or stopped again (a worker) once the rest came."""
    from worker import code_on_disk

    now = code_on_disk()
    if now == started_on:
        return now
    print(f"clapq: clapq's code changed on disk (upgraded in place?); starting it again once that has stayed the same "
          f"for {SETTLE_S:g} s", file=sys.stderr, flush=True)
    deadline = time.monotonic() + SETTLE_MOST_S
    while not stop() and time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        then, now = now, code_on_disk()
        if now == then:
            break
    return now


MIGRATING_SAY_AFTER_S = 10.0  # `up` says that the new code's migration runs on, after this long and then every minute
MIGRATING_SAY_EVERY_S = 60.0
MIGRATING_STOP_S = 10.0  # how long a migration told to stop has to end before it is killed


def _migrate_on_new_code(env: dict, data_dir: Path | None) -> bool:
    """The database migrated by the code now on disk (`clapq migrate` run on it), before `clapq up` starts a role
    again on it: upgraded in place (`git pull`) to a version with a migration, each role started again on the new code
    stopped on the schema older than its own, saying to run `clapq migrate` (which no embedded database is reached
    by), and the worker's fourth end in 5 minutes stopped everything (helper-130). `up`'s own code is the old, so the
    new code's command does it; what it says is said with the data directory. Whether it succeeded: one that failed
    (a DATABASE_URL not answering for a while) is tried again as the next role starts, which meanwhile waits for its
    database or stops on its schema, as before.

    It had no time limit, and said nothing while it ran: a migration waiting for a table's lock (a long query, a
    backup's pg_dump) held `up`, and a SIGTERM or Ctrl-C to `up` waited for it (helper-142). A signal that stops `up`
    now stops it at once (its migrations are one transaction, which Postgres rolls back as its connection closes: the
    schema stays as it was), and `up` says every minute, from MIGRATING_SAY_AFTER_S on, that it still runs."""
    import threading

    from clapq.embedded import die_with_parent

    where = _whose_database(data_dir)
    told: list[int] = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def on_signal(signum, frame) -> None:  # heard here, and by `up`'s own handler, which then stops everything
        told.append(signum)
        if callable(prev := before[signum]):
            prev(signum, frame)

    for sig, prev in before.items():
        if sig != signal.SIGHUP or prev != signal.SIG_IGN:  # `nohup clapq up` runs on once the terminal closes
            signal.signal(sig, on_signal)
    try:
        # a session of its own: a Ctrl-C in the terminal reaches `up` alone, which stops it (the migration's own
        # KeyboardInterrupt was a traceback); and it ends with `up`, killed or not
        proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "migrate"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=CODE_ROOT,
                                start_new_session=True, preexec_fn=die_with_parent)

        def forward() -> None:
            for line in proc.stderr:
                line = line.rstrip("\n").removeprefix("clapq: ")
                if not line.startswith("schema already at revision"):
                    print(f"clapq: {where}{line} (clapq's code changed on disk)", file=sys.stderr, flush=True)

        reader = threading.Thread(target=forward, name="migrate-lines", daemon=True)
        reader.start()
        began = time.monotonic()
        say_at = began + MIGRATING_SAY_AFTER_S
        while proc.poll() is None:
            if told:
                ran = time.monotonic() - began
                proc.terminate()
                try:
                    proc.wait(MIGRATING_STOP_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                reader.join(5)
                if proc.returncode == 0:  # it ended by itself first: its line said so
                    return True
                print(f"clapq: {where}told to stop: stopped the new code's migration, which had run for {ran:.0f} s; "
                      "its transaction is rolled back, and the schema stays as it was (the new code migrates it when "
                      "`clapq up` starts again)", file=sys.stderr, flush=True)
                return False
            if time.monotonic() >= say_at:
                say_at += MIGRATING_SAY_EVERY_S
                print(f"clapq: {where}the new code's migration (`clapq migrate`) has run for "
                      f"{time.monotonic() - began:.0f} s; the roles that ended start again once it is done (a large "
                      "library's can take minutes: README, Upgrading). Ctrl-C or SIGTERM stops it with `clapq up`, "
                      "its transaction rolled back",
                      file=sys.stderr, flush=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.2)
        reader.join(5)
        return proc.returncode == 0
    finally:
        for sig, prev in before.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, prev)


def _port_free(host: str, port: int) -> None:
    """Refuse a port something listens on already (another `clapq up`): its /healthz would answer ours."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn: a port in TIME_WAIT is free
            s.bind(addr)
    except OSError as exc:
        # only a port in use is another server's: a --host mistyped (an address not this machine's, a name that
        # does not resolve) was told to stop another server or pass --port (helper-108)
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            why = (f"{host!r} is not an address of this machine: pass --host with one of its addresses (127.0.0.1, "
                   "the default, serves this machine only; 0.0.0.0 serves other machines too)")
        else:
            why = "another `clapq up` or server may be using it; stop it, or pass --port"
        _fail(f"cannot serve on {host_port(host, port)} ({exc.strerror or exc}): {why}")


class _Unfailing:
    """`clapq up`'s stdout or stderr: where the terminal it writes to closes (SIGHUP), every write fails (EIO), the
    one in progress when the signal came too, and a line cut off so was a traceback and exit 1 while everything
    stopped. What cannot be written is dropped; where no one can read it any more (the terminal closed, the pipe's
    reader gone) the stream is pointed at nothing from then on (what its buffer kept would fail again at exit, where
    a stdout that cannot be flushed is exit 120). Another error (a log file's disk full for a while) leaves it where
    it is: pointed at nothing, up's later lines and the roles it started again (which take its stdout and stderr)
    wrote there even once the disk had room again."""

    GONE = (errno.EIO, errno.EPIPE)

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            if exc.errno in self.GONE:
                with contextlib.suppress(OSError, ValueError):
                    null = os.open(os.devnull, os.O_WRONLY)
                    try:
                        os.dup2(null, self._stream.fileno())
                    finally:
                        os.close(null)
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def cmd_up(args) -> None:
    from clapq.embedded import EmbeddedRedis, die_with_parent

    sys.stdout, sys.stderr = _Unfailing(sys.stdout), _Unfailing(sys.stderr)
    settings = Settings.from_env(data_dir=args.data_dir)
    _check_model(settings)
    data_dir = settings.data_dir.expanduser().resolve()
    # a new one is made only once the port and host are taken: refused, it was left behind (empty but for the
    # lock file). One there already is locked first, so that a second `up` on it says which `up` holds it.
    new = not os.path.lexists(data_dir)
    if new:
        _port_free(args.host, args.port)
    _make_data_dir(data_dir, "give `clapq up` a folder, new or its own, with --data-dir")
    lock = _lock_data_dir(data_dir)
    if not new:
        _port_free(args.host, args.port)
    stack: list = [lock.close]  # released last, when everything else has stopped
    db_url = None
    procs: list[subprocess.Popen] = []
    stopping = {"flag": False}

    def _on_signal(signum, frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # `nohup clapq up`: it runs on once the terminal closes
        signal.signal(signal.SIGHUP, _on_signal)  # the terminal closed: stop as for Ctrl-C (Postgres too)
    watch: list = []  # the embedded servers: (name, why it is gone or None, how to start it again or None)
    try:
        db_url = _database_url(settings, data_dir, stack, watch)
        redis_url = settings.redis_url
        if not redis_url:
            redis = EmbeddedRedis(data_dir / "redis")
            redis_url = redis.start()
            stack.append(redis.stop)
            watch.append(("the embedded Redis", redis.gone, redis.start))  # the same port: every process's REDIS_URL stays right
        _migrate_up(db_url, None if settings.database_url else data_dir)
        if not settings.database_url:  # the embedded database is this `up`'s alone, and none of its workers runs yet
            _hand_back_running(db_url)
        key = _default_key(db_url, data_dir)
        # a CLAPQ_BLOB_DIR the user set is taken from where `clapq up` runs; the default lives in the data dir
        blob_dir = settings.blob_dir.expanduser().resolve() if os.environ.get("CLAPQ_BLOB_DIR") else data_dir / "blobs"
        env = dict(os.environ, DATABASE_URL=db_url, REDIS_URL=redis_url, CLAPQ_DATA_DIR=str(data_dir),
                   CLAPQ_BLOB_DIR=str(blob_dir), CLAPQ_MODEL=settings.model, CLAPQ_HOST=args.host,
                   CLAPQ_PORT=str(args.port), CLAPQ_UP="1")
        if not os.environ.get("CLAPQ_LOG_FORMAT") and os.isatty(2):
            # a person reads its roles' lines: in a terminal, each request and each record as a line of text,
            # where JSON (for a log collector, and where the output goes to a file) was a screenful of braces
            env["CLAPQ_LOG_FORMAT"] = "text"
        with contextlib.suppress(OSError):  # where it was removed, the roles stay in CODE_ROOT
            env[START_DIR] = os.getcwd()
        exe = [sys.executable, "-m", "clapq.cli"]

        def start(role: str) -> subprocess.Popen:
            # its own process group, so a terminal Ctrl-C reaches only us and we stop the children in order;
            # it dies with this process (killed, it cannot stop them), and holds the data-directory lock
            # while it runs
            own = env
            if role == "api" and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                # its processes' request counts, in the data directory and fresh for each start: a killed API
                # cannot remove a folder of its own, and would leave one in /tmp at every restart
                counts = data_dir / "api-metrics"
                shutil.rmtree(counts, ignore_errors=True)
                counts.mkdir()
                own = {**env, "PROMETHEUS_MULTIPROC_DIR": str(counts)}
            return subprocess.Popen(exe + [role], env=own, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=die_with_parent, pass_fds=(lock.fileno(),), cwd=CODE_ROOT)

        from worker import code_on_disk

        code = code_on_disk()  # what the roles start on
        procs.extend(start(role) for role in ("worker", "beat", "api"))
        # each role's own: one started again on new code leaves the others on the old, and a worker that stopped on
        # the new code after the API was started again on it was counted a crash
        started_on = [code] * len(procs)
        migrated_on = code  # the code the database was last migrated by (_migrate_on_new_code)
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(args.host, args.host)
        base = f"http://{host_port(host, args.port)}"
        if not _wait_http(base + "/healthz", procs, lambda: stopping["flag"]):
            return  # Ctrl-C during start-up: the finally below stops what has started
        # where the client commands given this data directory find it (clapq.client.connect), as they find its key
        (data_dir / "url").write_text(base + "\n")
        print(f"clapq is up: {base}\nAPI key: {key}\ndata: {data_dir}\nsearch page: {base}/ (give it the key once)\n"
              "Ctrl-C stops everything.", flush=True)
        exits: dict[str, list[float]] = {}

        def again(what: str, how: str) -> None:
            """One that ends (killed for memory, a crash) is started again: the files a worker held go back
            to the queue (heartbeats), and the sweeper re-sends what a restarted Redis lost; one that keeps
            ending has a reason a restart will not fix."""
            now = time.monotonic()
            recent = exits[what] = [t for t in exits.get(what, []) if now - t < RESTART_WINDOW_S] + [now]
            if len(recent) > MAX_RESTARTS:
                raise RuntimeError(f"{what} {how}, its {len(recent)}th end in {RESTART_WINDOW_S // 60} minutes; "
                                   "stopping everything (its log says why)")
            print(f"clapq: {what} {how}; starting it again", file=sys.stderr, flush=True)

        while not stopping["flag"]:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    continue
                how = f"was killed by signal {-p.returncode}" if p.returncode < 0 else f"exited with {p.returncode}"
                if code_on_disk() != started_on[i]:  # clapq upgraded in place: a worker stops on its next task, an API
                    # on `kill -HUP`; each step of an upgrade done in several (edits, pulls) counted as a crash,
                    # and the fourth in 5 minutes stopped everything (helper-104)
                    print(f"clapq: `clapq {p.args[-1]}` {how} after clapq's code changed on disk (not counted as a "
                          "crash)", file=sys.stderr, flush=True)
                else:
                    again(f"`clapq {p.args[-1]}`", how)
                # what it started and left behind goes first (its own process group): a gunicorn worker still
                # serving a request when its master was killed held the port, so every new API failed to bind
                # and `up` stopped everything after four tries in seconds
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                if p.args[-1] == "worker" and not settings.database_url:
                    # the files it held waited CLAPQ_STALE_AFTER_S (2 minutes, the job's ETA growing: helper-88);
                    # no other worker runs on this `up`'s embedded database, and its own are dead now
                    _hand_back_after_worker(db_url)
                started_on[i] = _settled_code(started_on[i], lambda: stopping["flag"])
                if started_on[i] != migrated_on and not stopping["flag"] and \
                        _migrate_on_new_code(env, None if settings.database_url else data_dir):
                    migrated_on = started_on[i]
                if stopping["flag"]:
                    break
                procs[i] = start(p.args[-1])
            for name, gone, restart in watch:
                if why := gone():
                    if restart is None:
                        raise RuntimeError(f"{why}; stopping everything (start `clapq up` again)")
                    again(name, f"has stopped ({why})")
                    restart()
            time.sleep(0.5)
    except RuntimeError as exc:
        print(f"clapq: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        # the worker's task writes what it finished and hands back the rest within seconds (worker.stopping); the
        # grace is for a batch in flight, and claiming later files (on a GPU, at auto). A worker still on a file past
        # it is killed, and that try given back below. Told to stop (not stopping for a role that keeps ending, whose
        # files count)
        grace = 20.0 + claim_window_s(settings.claim_for_s, "cuda")
        ours = stopping["flag"] and db_url is not None and not settings.database_url and any(
            p.args[-1] == "worker" and p.poll() is None for p in procs)
        if ours:
            _stopping_worker(db_url, settings.heartbeat_s, grace)
        _terminate(list(reversed(procs)), grace=grace)
        if ours:
            _hand_back_stopped(db_url, settings.heartbeat_s)
        for stop in reversed(stack):
            stop()
        print("clapq stopped", file=sys.stderr)


def cmd_beat(args) -> None:
    os.environ["CLAPQ_PROCESS"] = "clapq-beat"
    settings = Settings.from_env().require_urls()
    _schema_served(settings)
    from clapq import logs

    logs.configure(settings.log_level)
    from worker.sweeper import STOP, run_forever

    # the first process of a container (compose's `clapq beat`, Kubernetes) has no default action for SIGTERM: the
    # beat ran on through `docker compose stop` until it was killed 10 s later, "Exited (137)" (helper-136); and
    # Ctrl-C in a terminal was a KeyboardInterrupt's traceback. Either now ends it after the step it is in, exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: STOP.set())
    run_forever(settings)


def _kind(path: Path) -> str:
    """"folder", "file", "pipe" (`<(ffmpeg ...)`, `/dev/stdin` at the end of a `|`, a named pipe), "other" (a
    device, a socket) or "none" (as pathlib's exists() says none: a broken link, a loop of links), by one look;
    a path that cannot be looked at (in a folder this user may not enter) is said so, not a traceback."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return "none"
        _fail(f"cannot read {path}: {exc.strerror or exc}")
    return ("folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "pipe" if stat.S_ISFIFO(mode)
            else "other")


def _nothing_at(path: Path) -> str:
    """Why a path names nothing: a broken link (a file moved, a drive not mounted) was said "does not exist",
    of a name `ls` shows."""
    from clapq.client import printable

    if not path.is_symlink():
        return f"{path} does not exist"
    try:
        os.stat(path)
    except OSError as exc:
        # a loop of links, told by the system's error: pathlib's resolve(strict=True) raises RuntimeError for one
        # before Python 3.13, an OSError (ELOOP) from then on, which was said as a broken link
        if exc.errno == errno.ELOOP:
            return f"{path} is a link that leads back to itself (a loop of links)"
    return f"{path} is a broken link: it points to {printable(os.readlink(path))}, which does not exist"


def cmd_upload(args) -> None:
    from clapq.client import apple_double, connect, upload_folder

    settings = Settings.from_env(data_dir=args.data_dir)
    kind = _kind(args.folder)
    if kind == "folder":
        folder, only = args.folder, None
    elif kind == "file":  # one file, as it is named: sent whatever its suffix, unless its bytes are macOS's metadata
        if (what := apple_double(args.folder)) is not None:
            _fail(f"{what}; nothing was uploaded", 1)
        folder, only = args.folder.parent, [args.folder]
    elif kind in ("pipe", "other"):
        _fail(f"{args.folder} is neither a folder nor a file (a pipe or a device)")
    else:
        _fail(_nothing_at(args.folder))
    if args.moved_from is not None and only is not None:
        _fail("--moved-from takes a folder: the folder uploaded, as it was named before it was moved or renamed")
    raise SystemExit(upload_folder(connect(args.url, args.key, settings.data_dir), folder, args.library,
                                   wait=not args.no_wait, only=only, retry_failed=args.retry_failed,
                                   moved_from=args.moved_from, resend=args.resend))


def cmd_search(args) -> None:
    from clapq.client import connect, search

    if args.text is not None and args.like is not None:
        _fail("give either words to search for or --like FILE (a sound), not both")
    if args.like_item is not None and (args.text is not None or args.like is not None):
        _fail("give --like-item ITEM (a file of your libraries) alone, without words or --like FILE")
    if args.text is None and args.like is None and args.like_item is None:
        _fail("give words to search for, or --like FILE to search by a sound, or --like-item ITEM by a file of your "
              "libraries")
    if args.text is not None and not args.text.strip():  # `clapq search ""`, an empty variable
        _fail("the words to search for are empty; give words to search for, or --like FILE to search by a sound")
    kind = None if args.like is None else _kind(args.like)
    if kind == "none":
        _fail(_nothing_at(args.like))
    if kind in ("folder", "other"):  # a pipe is read once (`--like <(ffmpeg ...)`)
        _fail(f"{args.like} is {'a folder' if kind == 'folder' else 'a device or a socket'}, not a sound file")
    settings = Settings.from_env(data_dir=args.data_dir)
    search(connect(args.url, args.key, settings.data_dir), args.library, args.text, args.k, like=args.like,
           as_json=args.json, offset=args.offset, windows=args.windows, item=args.like_item, pipe=kind == "pipe")


def cmd_libraries(args) -> None:
    from clapq.client import connect, list_libraries, rename_library

    settings = Settings.from_env(data_dir=args.data_dir)
    client = connect(args.url, args.key, settings.data_dir)
    if args.libraries_command == "rename":
        rename_library(client, args.library, args.name)
    else:
        list_libraries(client, as_json=args.json)


def cmd_delete(args) -> None:
    from clapq.client import connect, delete, delete_gone

    settings = Settings.from_env(data_dir=args.data_dir)
    client = connect(args.url, args.key, settings.data_dir)
    if args.gone_from is not None:
        if args.items:
            raise SystemExit("clapq: give item ids or --gone-from FOLDER, not both")
        raise SystemExit(delete_gone(client, args.library, args.gone_from, yes=args.yes))
    raise SystemExit(delete(client, args.library, args.items, yes=args.yes))


def cmd_reembed(args) -> None:
    from clapq.client import connect, reembed

    settings = Settings.from_env(data_dir=args.data_dir)
    raise SystemExit(reembed(connect(args.url, args.key, settings.data_dir), args.library, args.into,
                             wait=not args.no_wait))


def cmd_jobs(args) -> None:
    from clapq.client import cancel_job, connect, list_jobs, retry_job, show_job, wait_job

    settings = Settings.from_env(data_dir=args.data_dir)
    client = connect(args.url, args.key, settings.data_dir)
    if args.jobs_command is None:
        list_jobs(client, args.limit, as_json=args.json)
    elif args.jobs_command == "show":
        show_job(client, args.job, everything=args.all, as_json=args.json)
    elif args.jobs_command == "wait":
        raise SystemExit(wait_job(client, args.job))
    else:
        (cancel_job if args.jobs_command == "cancel" else retry_job)(client, args.job)


def _an_id(raw: str, what: str) -> str:
    """An id (in any form a UUID takes), or argparse's usage error, "RAW is not WHAT", before the API is asked."""
    try:
        return str(uuid.UUID(raw.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not {what}") from None


def _job_id(raw: str) -> str:
    return _an_id(raw, "a job id: give one as `clapq jobs` or `clapq upload` prints it (like 0b1c2d3e-...)")


def _utf8(raw: str, what: str) -> str:
    """Text given on the command line, which must be UTF-8: bytes of another encoding (a Latin-1 terminal, a
    folder name pasted in) reached the API as "an unpaired surrogate (not valid Unicode)", and a tenant's name
    the database as a traceback (helper-57)."""
    bad = " ".join(sorted({f"0x{ord(c) - 0xDC00:02x}" for c in raw if "\udc80" <= c <= "\udcff"}))
    if bad:
        raise argparse.ArgumentTypeError(f"bytes that are not UTF-8 in {what} ({bad}): only UTF-8 text is taken (is "
                                         "the terminal set to another encoding?)")
    return raw


def _library_name(raw: str) -> str:
    """--library's value: a name or an id, not empty (said at once, not after a folder is looked through)."""
    if not raw.strip():
        raise argparse.ArgumentTypeError("give a library name or id")
    return _utf8(raw, "the library name")


def _new_library_name(raw: str) -> str:
    """`libraries rename`'s NEW, not empty: it was asked for as "a library name or id", which a new name never is."""
    if not raw.strip():
        raise argparse.ArgumentTypeError("the new name is empty: give the name the library is to have")
    return _utf8(raw, "the new name")


def _client_args(p: argparse.ArgumentParser, library_help: str | None, default=None) -> None:
    """--library (where `library_help` is given), --url, --key and --data-dir; `default`: what each of the last three
    is when not given (argparse.SUPPRESS for a subcommand's, so that the same option given to its parent command,
    `clapq jobs --url U show ID`, is kept, not set back to None)."""
    if library_help is not None:
        p.add_argument("--library", required=True, type=_library_name, help=library_help)
    # the help said http://127.0.0.1:8000 where the address of the data directory's `clapq up` is used (helper-57)
    p.add_argument("--url", default=default, help="API base URL (default $CLAPQ_URL, else the address the data dir's "
                   "`clapq up` serves on, else http://127.0.0.1:8000)")
    p.add_argument("--key", default=default, help="API key (default $CLAPQ_API_KEY or the data dir's owner key)")
    p.add_argument("--data-dir", type=Path, default=default,
                   help="where `clapq up` keeps its data, to read its owner key and address from (default "
                   "$XDG_DATA_HOME/clapq, or ~/.local/share/clapq)")


def _rate(raw: str) -> float:
    """`clapq check --rate`: MB a second, 0 or more, or argparse's usage error naming the option."""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"{raw!r} is not a rate: give MB a second, 0 (no bound) or more")
    return value


def _item_id(raw: str) -> str:
    """`clapq search --like-item`."""
    return _an_id(raw, "an item id: give one as `clapq search` prints it (like 0b1c2d3e-...), not a file (--like "
                       "FILE)")


def _skipped(raw: str) -> int:
    """`clapq search --offset`."""
    return _howmany(raw, "results to leave out", least=0)


def _howmany(raw: str, what: str = "results", least: int = 1) -> int:
    """-k (and `clapq jobs --limit`): a whole number, `least` or more, said before the API is asked."""
    if not raw.isdigit() or int(raw) < least:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of {what}: give a whole number, {least} or more")
    return int(raw)


class _Parser(argparse.ArgumentParser):
    """argparse, with a hint for search words that begin with '-' (`clapq search -hum` said "ignored explicit
    argument"), one for an option given before the command (`clapq --data-dir DIR upload`), one for a file
    named like an option, one for `clapq upload *.wav`, and one for words to search for not in quotes."""

    argv: list[str] = []  # the command line, for the commands' own parsers too, which report its errors
    top: argparse.ArgumentParser | None = None  # `clapq`'s parser, whose commands' options a misspelt one is told by

    def parse_args(self, args=None, namespace=None):
        _Parser.argv = list(sys.argv[1:] if args is None else args)
        _Parser.top = self
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:  # as argparse says it, and where the shell gave `clapq upload` several files, why
            message = "unrecognized arguments: " + " ".join(extra)
            if getattr(parsed, "command", None) == "upload" and all(os.path.lexists(a) for a in extra):
                message += (f" (`clapq upload` takes one folder or one file, and was given {len(extra) + 1}: "
                            "`clapq upload FOLDER` sends every audio file under it)")
            elif getattr(parsed, "command", None) == "search" and parsed.text and not any(
                    a.startswith("-") for a in extra):  # `clapq search rain on a roof`
                words = shlex.quote(" ".join([parsed.text, *extra]))
                message += f" (the words to search for go in quotes, as one: clapq search {words} ...)"
            # with the command's usage, not clapq's list of commands (but for an option given before the command,
            # which clapq's own error says where to put)
            before = _Parser.argv[:1] and _Parser.argv[0].startswith("--")
            (self if before else _command_parser(self, _Parser.argv)[0]).error(message)
        return parsed

    def error(self, message: str):
        if self.prog.endswith(" search") and "argument -h/--help" in message:  # `-hum`, `-high hiss`
            message += " (words that begin with '-' go after '--': clapq search --library L -- '-80 dB hum')"
        argv = _Parser.argv
        # a file named like an option: `clapq upload -take1.wav` said "the following arguments are required:
        # folder|file", of a command given one
        dashed = next((a for a in argv if a.startswith("-") and a not in ("-", "--") and os.path.lexists(a)), None)
        if dashed is not None:
            message += (f" ({dashed} is read as an option: give a file or folder whose name begins with '-' as "
                        f"./{dashed})")
        if self.prog == "clapq" and argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
            # `clapq --data-dir DIR upload ...` said only "invalid choice: 'DIR'" (helper-71)
            option = argv[0].split("=", 1)[0]
            commands = next(a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction))
            at = next((i for i, a in enumerate(argv) if a in commands), None)
            command = "upload" if at is None else argv[at]
            if command == "keys":  # `clapq keys list --data-dir DIR`
                command += " " + next((a for a in argv[at + 1:] if a in ("create", "list", "revoke")), "list")
            message += f" (options go after the command: `clapq {command} {option} ...`)"
        super().error(message + _misspelt(_Parser.top or self, argv))


def _command_parser(top: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the command `argv` gives (`clapq jobs show`'s, down through commands of commands), and the
    words after its name; `top` and all of `argv` where none is given."""
    parser, rest = top, list(argv)
    while (sub := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)) is not None:
        at = next((i for i, a in enumerate(rest) if a in sub.choices), None)
        if at is None:
            break
        parser, rest = sub.choices[rest[at]], rest[at + 1:]
    return parser, rest


def _misspelt(top: argparse.ArgumentParser, argv: list[str]) -> str:
    """" (--libary is not an option of `clapq search`: did you mean --library?)" for the first long option given
    after the command that none of its options begins with (argparse takes a prefix) and that is close to one:
    `clapq search rain --libary field` said only "the following arguments are required: --library", of a command
    given it, and `--no-wiat` only "unrecognized arguments" (helper-108). Empty where there is none."""
    parser, rest = _command_parser(top, argv)
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for arg in rest[:rest.index("--")] if "--" in rest else rest:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2 and not any(o.startswith(name) for o in options):
            if meant := difflib.get_close_matches(name, options, n=1, cutoff=0.75):
                return f" ({name} is not an option of `{parser.prog}`: did you mean {meant[0]}?)"
    return ""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clapq", description="Semantic search for audio libraries.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start everything on this machine (embedded Postgres + Redis, worker, API)")
    up.add_argument("--data-dir", type=Path, default=None, help="where data lives (default $XDG_DATA_HOME/clapq, or ~/.local/share/clapq)")
    up.add_argument("--host", default="127.0.0.1", help="address the API listens on (default 127.0.0.1: this "
                    "machine only; 0.0.0.0 for every interface)")
    up.add_argument("--port", type=_port, default=8000, help="the API's port (default 8000)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("api", help="the HTTP API under gunicorn").set_defaults(func=cmd_api)
    sub.add_parser("worker", help="an embedding worker (Celery)").set_defaults(func=cmd_worker)
    sub.add_parser("beat", help="the maintenance loop (re-enqueues stranded items, removes files no item holds, rebuilds vector indexes after large deletions)").set_defaults(func=cmd_beat)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    for name, func, arg, about, arg_help, where in (
            ("backup", cmd_backup, "DEST", "back up the service's database and stored files into a new folder, while "
             "it runs or not", "a new (or empty) folder for the backup", "backed up"),
            ("restore", cmd_restore, "BACKUP", "restore a backup into a new data directory (or an empty DATABASE_URL "
             "and CLAPQ_BLOB_DIR)", "a folder `clapq backup` made", "restored into, which must hold no clapq data yet")):
        command = sub.add_parser(name, help=about)
        command.add_argument(arg.lower(), type=Path, metavar=arg, help=arg_help)
        command.add_argument("--data-dir", type=Path, default=None, help=f"the data directory {where} (default "
                             "$XDG_DATA_HOME/clapq, or ~/.local/share/clapq), unless DATABASE_URL is set")
        command.set_defaults(func=func)
    check = sub.add_parser("check", help="find stored files that are missing, damaged (--verify) or held by no item; "
                           "exit 1 if any, while the service runs or not")
    check.add_argument("--verify", action="store_true", help="read each stored file an item names and hash it: "
                       "finds files damaged on disk (reads the whole store, at --rate)")
    check.add_argument("--rate", type=_rate, default=100.0, metavar="MB_PER_S", help="with --verify, read at most "
                       "this many MB a second, so the service keeps its disk (default 100; 0: no bound)")
    check.add_argument("--remove-orphans", action="store_true", help="remove the stored files no item holds, as a "
                       "deletion does (no row is changed)")
    check.add_argument("--json", action="store_true", help="print the report as JSON, for scripts")
    check.add_argument("--data-dir", type=Path, default=None, help="the service's data directory (default "
                       "$XDG_DATA_HOME/clapq, or ~/.local/share/clapq), unless DATABASE_URL is set")
    check.set_defaults(func=cmd_check)
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="print a new API key for a tenant (created if new)")
    create.add_argument("--tenant", required=True, type=lambda raw: _utf8(raw, "the tenant name"),
                        help="who the key is for; each tenant sees only its own data")
    data_dir_help = ("the embedded service's data (default $XDG_DATA_HOME/clapq, or ~/.local/share/clapq), "
                     "unless DATABASE_URL is set")
    create.add_argument("--data-dir", type=Path, default=None, help=data_dir_help)
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="every API key by its first characters, its tenant and whether it is revoked")
    revoke = keys.add_parser("revoke", help="revoke an API key at once (a leaked one): give it whole, or its first "
                             "characters as `keys list` shows them")
    revoke.add_argument("key", help="the key, or its first characters as `keys list` shows them (cq_ and 7 more)")
    for command, func in ((listing, cmd_keys_list), (revoke, cmd_keys_revoke)):
        command.add_argument("--data-dir", type=Path, default=None, help=data_dir_help)
        command.set_defaults(func=func)
    upload = sub.add_parser("upload", help="upload every audio file under a folder (or one file) and wait for the job")
    upload.add_argument("folder", type=Path, metavar="folder|file", help="a folder: every audio file under it is "
                        "uploaded (hidden files and folders are left out; files the library holds already are not "
                        "sent again); or one file")
    upload.add_argument("--no-wait", action="store_true", help="return once the files are uploaded, without "
                        "waiting for them to be embedded")
    upload.add_argument("--retry-failed", action="store_true", help="send again the files that failed before for a "
                        "reason in their bytes (not decodable, no audio, too long), which are otherwise left out "
                        "until their bytes change")
    upload.add_argument("--resend", action="store_true", help="send the files the library holds too: their stored "
                        "copies are written anew (mends those `clapq check` finds missing or damaged; their items and "
                        "vectors stay as they are)")
    upload.add_argument("--moved-from", type=Path, metavar="OLD", help="the folder's path before it was itself "
                        "moved or renamed (where `clapq upload` sent its files from): its files in the library become "
                        "this folder's, so that their renames are followed and `clapq delete --gone-from` finds those "
                        "gone")
    _client_args(upload, "library name (created if missing) or id")
    upload.set_defaults(func=cmd_upload)
    search = sub.add_parser("search", help="search a library by words, or by a sound with --like FILE")
    search.add_argument("text", nargs="?", type=lambda raw: _utf8(raw, "the words to search for"),
                        help="what to look for, in words")
    search.add_argument("--like", type=Path, metavar="FILE", help="a sound: find the files that sound most like it")
    search.add_argument("--like-item", type=_item_id, metavar="ITEM", help="a file of your libraries, by the item id "
                        "search prints: find the files that sound most like it (it is left out)")
    # `--k 5` too: argparse took it for the start of --key, and the key was "5" (helper-42)
    search.add_argument("-k", "--k", type=_howmany, default=10, help="how many results (default 10)")
    search.add_argument("--windows", action="store_true", help="every matching 10 s window, best first, several of "
                        "one file where they match (the moments of a long recording), not a file's best alone")
    search.add_argument("--offset", type=_skipped, default=0, metavar="N", help="leave out the first N results: "
                        "the next page of -k K is --offset K (default 0)")
    search.add_argument("--json", action="store_true", help="print the API's answer as JSON (every field of each "
                        "result, its metadata too), for scripts")
    _client_args(search, "library name or id")
    search.set_defaults(func=cmd_search)
    libraries = sub.add_parser("libraries", help="list your libraries: the files each holds, its id and its name; "
                               "`clapq libraries rename LIBRARY NEW` renames one")
    libraries.add_argument("--json", action="store_true", help="print the API's answer as JSON, for scripts")
    _client_args(libraries, None)
    libraries.set_defaults(func=cmd_libraries)
    named = libraries.add_subparsers(dest="libraries_command", metavar="{rename}")
    rename = named.add_parser("rename", help="give a library a new name (its files, jobs and vectors stay)")
    rename.add_argument("library", type=_library_name, metavar="LIBRARY", help="the library: its name or id")
    rename.add_argument("name", type=_new_library_name, metavar="NEW", help="its new name")
    _client_args(rename, None, default=argparse.SUPPRESS)
    rm = sub.add_parser("delete", help="delete files of a library (by item id, or those gone from a folder), or the "
                        "whole library")
    rm.add_argument("items", nargs="*", metavar="ITEM", help="item ids, as `clapq search` prints them; none: the "
                    "whole library")
    rm.add_argument("--gone-from", type=Path, metavar="FOLDER", help="the files `clapq upload FOLDER` sent that "
                    "are no longer in FOLDER (deleted from it, or the earlier version of one changed in place); renamed or "
                    "moved files are not gone")
    rm.add_argument("--yes", action="store_true", help="delete the whole library, or the files --gone-from finds, "
                    "without asking")
    _client_args(rm, "library name or id")
    rm.set_defaults(func=cmd_delete)
    again = sub.add_parser("reembed", help="embed a library's files again with the model this service runs, into a "
                           "new library (after CLAPQ_MODEL changed), and wait for them; the library stays as it is")
    again.add_argument("--into", required=True, type=_library_name, metavar="NEW",
                       help="the new library's name (a name you have no library of)")
    again.add_argument("--no-wait", action="store_true", help="return once its files are queued, without waiting "
                       "for them to be embedded (`clapq jobs wait JOB` waits later)")
    _client_args(again, "the library to embed again: its name or id")
    again.set_defaults(func=cmd_reembed)
    jobs = sub.add_parser("jobs", help="list your latest jobs (each upload request is one), newest first; `clapq jobs "
                          "show|wait|cancel|retry JOB` for one of them")
    jobs.add_argument("--limit", type=lambda raw: _howmany(raw, "jobs"), default=20, help="how many of the latest jobs (default 20)")
    jobs.add_argument("--json", action="store_true", help="print the jobs as the API gives them, as JSON, for scripts")
    _client_args(jobs, None)
    jobs.set_defaults(func=cmd_jobs)
    one = jobs.add_subparsers(dest="jobs_command", metavar="{show,wait,cancel,retry}")
    job_help = "a job id, as `clapq jobs` or `clapq upload` prints it"
    show = one.add_parser("show", help="show a job: its files by state, its progress or why it waits, and its failed "
                          "files with their item ids and why")
    show.add_argument("--all", action="store_true", help="list every failed file (without it, the first 20 and "
                      "how many more: clapq.client.FAILED_SHOWN)")
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print the API's answer as JSON, for scripts (with --all, its errors hold every failed file)")
    wait = one.add_parser("wait", help="follow a job to its end as `clapq upload` does; exit 1 if a file failed or "
                          "was cancelled")
    cancel = one.add_parser("cancel", help="cancel a job: its queued and running files are not embedded")
    retry = one.add_parser("retry", help="queue a job's failed files again (after a cancel, its cancelled ones too)")
    for command in (show, wait, cancel, retry):
        command.add_argument("job", type=_job_id, metavar="JOB", help=job_help)
        _client_args(command, None, default=argparse.SUPPRESS)
    # each command's --help says what it is (`clapq migrate --help` showed a bare usage line, helper-71)
    for action in (sub, keys, one, named):
        for choice in action._choices_actions:
            parser = action.choices[choice.dest]
            parser.description = choice.help[0].upper() + choice.help[1:] + "."
            if choice.dest in ("api", "worker", "beat", "migrate"):
                parser.description += " Configured from the environment (README, Configuration), not by options."
    return p


def main(argv: list[str] | None = None) -> None:
    # a name the terminal's encoding cannot show (an emoji under LANG=C or PYTHONIOENCODING=ascii) is written
    # escaped, as stderr writes it: it was a UnicodeEncodeError traceback in the middle of a search's results
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:  # Ctrl-C where a command has nothing of its own to say (a search, a lookup)
        print("clapq: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # `clapq search ... | head -2`: the reader has what it wanted
        # Python would say so again while it flushes stdout at exit: point stdout at nothing first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # as a shell reports a command ended by SIGPIPE


if __name__ == "__main__":
    if start_dir := os.environ.pop(START_DIR, None):  # a role of `clapq up`, started in CODE_ROOT
        with contextlib.suppress(OSError):  # removed since `up` started: it stays there, as where it was gone at start
            os.chdir(start_dir)
    main()
