"""One engine per process and short-lived sessions; Alembic migrations run from code."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text
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
            _engines[key] = engine
        return engine


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
        session.rollback()
        raise
    finally:
        session.close()


def migrate(url: str) -> None:
    """Bring the schema to the newest migration (idempotent), then check that every table and column the
    models map is there. A database a newer clapq migrated, or whose schema lacks what this version reads
    (a migration changed after it ran, as 0009 was: helper-34), is a RuntimeError with a sentence, before
    any process serves a request, not a 500 on every request that touches it."""
    from alembic import command
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import select
    from sqlalchemy.exc import ProgrammingError

    import migrations
    from clapq.models import Base

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    scripts = ScriptDirectory.from_config(cfg)
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
            raise RuntimeError(f"the database was migrated by a newer clapq (schema revision {unknown[0]}; this "
                               f"version knows up to {scripts.get_current_head()}); nothing was changed: run that "
                               "newer version, or first downgrade the schema with it (alembic downgrade "
                               f"{scripts.get_current_head()})")
        command.upgrade(cfg, "head")
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            try:
                conn.execute(select(*table.c).limit(0))
            except ProgrammingError as exc:
                why = str(exc.orig).strip().splitlines()[0]
                raise RuntimeError(f"the database's schema is not the one this clapq reads ({why}), though its "
                                   f"migrations stand at {scripts.get_current_head()}: it was made by a development "
                                   "version whose migrations changed after they ran") from None


MIGRATE_LOCK = 0x636C617071  # "clapq": the advisory lock `migrate` holds


def _known_revision(scripts, rev: str) -> bool:
    from alembic.util import CommandError

    try:
        return scripts.get_revision(rev) is not None
    except CommandError:  # ResolutionError too
        return False
