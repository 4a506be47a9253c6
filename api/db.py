"""One database session per request, closed when the request ends."""

from __future__ import annotations

from flask import current_app, g
from sqlalchemy.orm import Session, sessionmaker

from clapq.db import get_engine


def db() -> Session:
    if "db" not in g:
        g.db = sessionmaker(bind=get_engine(current_app.config["CLAPQ"].database_url), expire_on_commit=False)()
    return g.db


def close_db(exc: BaseException | None = None) -> None:
    session = g.pop("db", None)
    if session is not None:
        if exc is not None:
            session.rollback()
        session.close()
