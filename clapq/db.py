"""One engine per process and short-lived sessions; Alembic migrations run from code."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

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
                                   pool_timeout=CONNECT_TIMEOUT_S,
                                   connect_args={"application_name": os.environ.get("CLAPQ_PROCESS", "clapq"),
                                                 "connect_timeout": CONNECT_TIMEOUT_S, "keepalives": 1,
                                                 "keepalives_idle": 30, "keepalives_interval": 10,
                                                 "keepalives_count": 3})
            _engines[key] = engine
        return engine


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
    """Bring the schema to the newest migration (idempotent)."""
    from alembic import command
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    command.upgrade(cfg, "head")
