"""One database session per request, closed when the request ends; sending committed files' tasks."""

from __future__ import annotations

from flask import current_app, g
from sqlalchemy.orm import Session, sessionmaker

from clapq.db import get_engine
from clapq.queue import send_or_mark


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


def send_committed(item_ids: list, **log_extra) -> None:
    """Send the tasks of files this request committed (clapq.queue.send_or_mark)."""
    settings = current_app.config["CLAPQ"]
    send_or_mark(current_app.extensions["clapq_celery"], settings.database_url, item_ids, settings.items_per_task,
                 **log_extra)
