"""One engine per process and short-lived sessions; Alembic migrations run from code."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
from psycopg2 import extensions as ext
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

_engines: dict[tuple[int, str], Engine] = {}
_lock = threading.Lock()
CONNECT_TIMEOUT_S = 10


def normalise_url(url: str) -> str:
    """Use the psycopg2 driver whatever scheme the user wrote."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def get_engine(url: str) -> Engine:
    """The engine for this process (a forked child builds its own, never inherits one)."""
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            # the application name lets operators (and the fault tests) tell api, worker and beat apart; a
            # server that takes the connection but never answers (stopped, or behind a dead link) fails the
            # connect in CONNECT_TIMEOUT_S instead of holding a request (libpq waits forever by default),
            # and keepalives end a pooled connection to a host that went away
            engine = create_engine(normalise_url(url), pool_pre_ping=True, pool_size=5, max_overflow=5,
                                   pool_timeout=CONNECT_TIMEOUT_S, connect_args=_connect_args())
            _watch(engine, url)
            _engines[key] = engine
        return engine


# A server that stops answering mid-statement (stopped, frozen, its disk hung) holds a libpq call for ever:
# the kernel still acknowledges what is sent, so neither TCP keepalives nor connect_timeout end it, and
# every request that touches it waits (a search, a job poll, /metrics), until no API thread is left. So
# psycopg2 waits through a callback of ours (psycopg2.extensions.set_wait_callback: libpq is driven
# without blocking, which psycopg2 supports for coroutine libraries; its Python interface is unchanged).
# A statement that has received nothing for STALL_S asks its server whether it answers at all, by opening
# a new connection: a slow statement (a large deletion, a lock wait) goes on waiting, and one whose server
# does not complete that connect within PROBE_S fails with NoAnswer, an OperationalError, which closes its
# connection (the pool then drops it, and the API answers 503). A connect is bounded by CONNECT_TIMEOUT_S
# in all (libpq's connect_timeout applies only to blocking connects; so in a multi-host URL the first host
# that does not answer ends the connect, rather than libpq going on to the next). CLAPQ_DB_STALL_S=0 turns
# the asking off (statements are waited for as libpq would).
def _stall_s() -> float:
    from clapq.settings import _int

    return float(_int(os.environ, "CLAPQ_DB_STALL_S", 5, 0, 3600))


STALL_S = _stall_s()
PROBE_S = 5.0
_probe_urls: dict[str, str] = {}  # a connection's dsn (its password masked) -> the URL to ask its server by
_probes: dict[tuple[int, str], tuple] = {}  # (pid, url) -> (one probe at a time, [when, answered], its connect args)
_local = threading.local()  # .probing: this thread is asking a server whether it answers


def _watch(engine: Engine, url: str) -> None:
    """Have psycopg2 wait through `_wait`, and let it ask `url`'s server about this engine's connections."""
    @event.listens_for(engine, "connect")
    def _connected(dbapi_conn, _record) -> None:
        _probe_urls[dbapi_conn.dsn] = url

    if ext.get_wait_callback() is not _wait:
        ext.set_wait_callback(_wait)


@contextlib.contextmanager
def libpq_waits() -> Iterator[None]:
    """psycopg2 waiting in libpq again, without the deadline above, for what a wait callback cannot do: COPY,
    which the benchmarks' bulk loads use. Process-wide while it lasts (for a script's single thread)."""
    callback = ext.get_wait_callback()
    ext.set_wait_callback(None)
    try:
        yield
    finally:
        ext.set_wait_callback(callback)


class NoAnswer(psycopg2.OperationalError):
    """The database did not answer in time (see STALL_S); the connection it was raised on is closed."""


def _wait(conn) -> None:
    """psycopg2's wait callback: poll the connection until its operation is done, as psycopg2.extras.
    wait_select does, but never for ever (see STALL_S above). An exception here closes the connection."""
    start = time.monotonic()
    probing = getattr(_local, "probing", False)
    url = None if probing else _probe_urls.get(conn.dsn)
    connecting = conn.status == ext.STATUS_SETUP  # (psycopg2 moves to states of its own at the first poll)
    if probing:  # a probe's connect: one deadline in all
        limit, ask = PROBE_S, False
    elif connecting:
        limit, ask = CONNECT_TIMEOUT_S, False
    elif url is not None and STALL_S > 0:  # a statement of an engine of ours: STALL_S without a byte, then ask
        limit, ask = STALL_S, True
    else:  # another statement (an engine made elsewhere, as Alembic's): waited for as libpq would
        limit, ask = None, False
    deadline = None if limit is None else start + limit
    poller, fd = select.poll(), None
    while True:
        try:
            state = conn.poll()
        except psycopg2.OperationalError as exc:
            # libpq's non-blocking connect leaves out which server failed ("connection to server at ... failed:
            # Connection refused" read "Connection refused"): said again as its blocking connect says it
            server = _server(conn) if connecting else None
            if server is None or str(exc).startswith("connection to server"):
                raise
            raise psycopg2.OperationalError(f"connection to server {server} failed: {exc}") from None
        if state == ext.POLL_OK:
            return
        if state not in (ext.POLL_READ, ext.POLL_WRITE):
            raise psycopg2.OperationalError(f"unexpected state from poll(): {state}")
        if fd is not None:
            poller.unregister(fd)
        fd = conn.fileno()
        poller.register(fd, select.POLLIN if state == ext.POLL_READ else select.POLLOUT)
        while not poller.poll(None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000):
            if time.monotonic() < deadline:
                continue
            if not ask:
                what = "a new connection" if connecting else "a statement"
                raise NoAnswer(f"the database did not answer {what} in {limit:g} s")
            if not _answers(url):
                raise NoAnswer(f"the database sent nothing for {time.monotonic() - start:.0f} s, and did not take a "
                               f"new connection in {PROBE_S:g} s: the statement was given up and its connection closed")
            deadline = time.monotonic() + limit
        if ask:  # something came: STALL_S is counted from the last of it (a long result is not a stall)
            start, deadline = time.monotonic(), time.monotonic() + limit


def _server(conn) -> str | None:
    """The server a connection is to, as libpq's errors name it: at "host", port 5432; on socket "/run/.s.PGSQL.5432"."""
    try:
        host, port = conn.info.host, conn.info.port
    except psycopg2.Error:
        return None
    if not host:
        return None
    return f'on socket "{host}/.s.PGSQL.{port}"' if host.startswith("/") else f'at "{host}", port {port}'


def _answers(url: str) -> bool:
    """Whether `url`'s server completes a new connection within PROBE_S (startup and authentication: a
    process of the server answered; a statement on it is not asked for, as a pooler in front of Postgres
    queues statements while its server connections are busy). One thread of a process asks at a time;
    those that waited for it meanwhile take its answer."""
    key = (os.getpid(), url)
    with _lock:
        if key not in _probes:
            engine = create_engine(normalise_url(url), poolclass=NullPool)
            cargs, cparams = engine.dialect.create_connect_args(engine.url)
            _probes[key] = (threading.Lock(), [0.0, True], (cargs, {**cparams, **_connect_args()}))
        lock, last, (cargs, cparams) = _probes[key]
    asked_at = time.monotonic()
    with lock:
        if last[0] >= asked_at:  # asked by another thread while this one waited
            return bool(last[1])
        _local.probing = True
        try:
            psycopg2.connect(*cargs, **cparams).close()
            answered = True
        except psycopg2.Error as exc:  # an error the server sent (a refusal, too many clients) is an answer. Only
            # a database error: one a signal handler raised in the probe's wait (Celery's soft time limit, a
            # SIGTERM handler) is the caller's, not an answer (helper-48: it was swallowed, the statement waited on)
            answered = not isinstance(exc, NoAnswer)
        finally:
            _local.probing = False
        last[:] = [time.monotonic(), answered]
        return answered


def _connect_args() -> dict:
    return {"application_name": os.environ.get("CLAPQ_PROCESS", "clapq"), "connect_timeout": CONNECT_TIMEOUT_S,
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def dispose_engines() -> None:
    """Drop pooled connections (after fork, and at shutdown)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()


@contextlib.contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = sessionmaker(bind=get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        try:
            session.rollback()
        except Exception:  # noqa: BLE001 - the connection went with the error (closed by the wait callback when
            # a signal handler raised in it, as Celery's soft time limit): the error stands, not "connection
            # already closed" from this rollback (helper-48: a soft limit became a retry, its try not counted)
            pass
        raise
    finally:
        session.close()


class NewerSchema(RuntimeError):
    """A database a newer clapq migrated (`revision`, which this one's migrations do not know; `head`, the newest
    they do): nothing in it was changed."""

    def __init__(self, revision: str, head: str) -> None:
        super().__init__(f"the database was migrated by a newer clapq (schema revision {revision}; this version knows "
                         f"up to {head}); nothing was changed: run that newer version, or first downgrade the schema "
                         f"with it (alembic downgrade {head})")
        self.revision, self.head = revision, head


def migrate(url: str, starting: Callable[[str, str], None] | None = None) -> tuple[str | None, str]:
    """Bring the schema to the newest migration (idempotent), then check that every table and column the
    models map is there; returns the schema's revision before (None: a database with no clapq tables) and after,
    which `clapq migrate` says (it said "migrations applied" whether it applied any or none). `starting(before,
    head)` is called before migrations are applied to a database that has clapq's tables. A database a newer
    clapq migrated (NewerSchema), or whose schema lacks what this version reads (a migration changed after it ran,
    as 0009 was: helper-34), is a RuntimeError with a sentence, before any process serves a request, not a 500 on
    every request that touches it."""
    from alembic import command
    from alembic.migration import MigrationContext
    from sqlalchemy import select
    from sqlalchemy.exc import ProgrammingError

    from clapq.models import Base

    cfg, scripts = _migrations(url)
    engine = get_engine(url)
    # one migration at a time: two at once on a new database (compose's `migrate` beside a `clapq keys create`,
    # two machines started together) raced, and one failed with a duplicate key in pg_type, which stopped the
    # services that wait for it (helper-41). The lock is a session's, on a connection of its own (not pooled:
    # closing it lets go, whatever happened).
    with create_engine(normalise_url(url), poolclass=NullPool, connect_args=_connect_args()).connect() as lock:
        lock.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATE_LOCK})
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_heads()
        unknown = [rev for rev in current if not _known_revision(scripts, rev)]
        if unknown:
            raise NewerSchema(unknown[0], scripts.get_current_head())
        if starting is not None and current and set(current) != set(scripts.get_heads()):
            starting(", ".join(sorted(current)), ", ".join(sorted(scripts.get_heads())))
        _upgrade_between_queries(cfg, command)
    with engine.connect() as conn:
        after = MigrationContext.configure(conn).get_current_heads()
        for table in Base.metadata.sorted_tables:
            try:
                conn.execute(select(*table.c).limit(0))
            except ProgrammingError as exc:
                why = str(exc.orig).strip().splitlines()[0]
                raise RuntimeError(f"the database's schema is not the one this clapq reads ({why}), though its "
                                   f"migrations stand at {scripts.get_current_head()}: it was made by a development "
                                   "version whose migrations changed after they ran") from None
    return (", ".join(sorted(current)) or None), ", ".join(sorted(after))


MIGRATE_LOCK = 0x636C617071  # "clapq": the advisory lock `migrate` holds
MIGRATE_LOCK_WAIT_MS = 5000  # how long a migration waits for a table's lock before it lets go and tries again
MIGRATE_SAY_EVERY_S = 30.0


def _upgrade_between_queries(cfg, command) -> None:
    """Alembic's upgrade to head, waiting MIGRATE_LOCK_WAIT_MS at most for each lock it takes, and tried again
    (the whole of it: one transaction) until it gets them. A migration's ALTER TABLE waits for every query on its
    table to end (a long one, a backup's pg_dump of all of them), and meanwhile every other query on that table
    queued behind it: a migration run beside a serving API (compose's one-shot `migrate`) held uploads and job pages
    for as long (helper-105). Now they run between its tries."""
    from sqlalchemy.exc import OperationalError

    cfg.attributes["lock_timeout_ms"] = MIGRATE_LOCK_WAIT_MS
    said = None
    while True:
        try:
            command.upgrade(cfg, "head")
            return
        except OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) != "55P03":  # lock_not_available
                raise
            if said is None or time.monotonic() - said >= MIGRATE_SAY_EVERY_S:
                said = time.monotonic()
                print("clapq: migrating the schema waits for other sessions to let go of a table it changes (a long "
                      f"query, a backup's pg_dump): it takes its locks {MIGRATE_LOCK_WAIT_MS / 1000:g} s at most at "
                      "a time, so queries run between its tries; trying again", file=sys.stderr, flush=True)
            time.sleep(1.0)


def newer_revision(revisions) -> tuple[str | None, str]:
    """The first of these schema revisions (a backup's) that this clapq's migrations do not know, a newer clapq's,
    or None; and the newest this one knows."""
    _, scripts = _migrations()
    return next((r for r in revisions if not _known_revision(scripts, r)), None), scripts.get_current_head()


def not_migrated(url: str) -> str | None:
    """Why this clapq cannot serve the database at `url`: its schema is older than this version's migrations (the
    new code started before `clapq migrate`), or it has none; else None, and None where the database does not
    answer (the process starts and waits for it, as before). Started on a schema one migration behind, the API
    answered 500 to every job's page and the workers' tasks failed on the column it lacked, while /readyz said
    ready (helper-117). A newer clapq's schema is served: an earlier version's workers run on it while a rolling
    upgrade goes on."""
    from alembic.migration import MigrationContext
    from sqlalchemy.exc import SQLAlchemyError

    _, scripts = _migrations()
    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()  # a process that forks next (gunicorn, Celery) hands its children no open connection
    heads = set(scripts.get_heads())
    if current == heads or any(not _known_revision(scripts, rev) for rev in current):
        return None
    if not current:
        return ("the database holds no clapq tables: it is not the service's database (DATABASE_URL), or no "
                "`clapq migrate` has run on it")
    return (f"the database's schema is at revision {', '.join(sorted(current))}, older than this clapq's "
            f"({', '.join(sorted(heads))}): run `clapq migrate` with this version first (README, Upgrading)")


def _migrations(url: str | None = None):
    """Alembic's config of clapq's migrations (on the database at `url`, where given) and their scripts."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg, ScriptDirectory.from_config(cfg)


def _known_revision(scripts, rev: str) -> bool:
    from alembic.util import CommandError

    try:
        return scripts.get_revision(rev) is not None
    except CommandError:  # ResolutionError too
        return False
