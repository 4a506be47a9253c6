"""One database session per request, closed when the request ends; sending committed files' tasks."""

from __future__ import annotations

import logging

from flask import current_app, g
from sqlalchemy.orm import Session, sessionmaker

from clapq.db import get_engine, session_scope
from clapq.models import NOT_SENT, park
from clapq.queue import enqueue_committed

log = logging.getLogger(__name__)


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
    """Send the tasks of these committed, queued files. Where Redis does not take them, they are marked as
    having no message (clapq.models.NOT_SENT), and the sweeper sends them at its next pass, whatever the queue
    holds; unmarked, they waited CLAPQ_STALE_AFTER_S and an empty queue. A failed mark leaves them to that."""
    settings = current_app.config["CLAPQ"]
    unsent = enqueue_committed(current_app.extensions["clapq_celery"], item_ids, settings.items_per_task, **log_extra)
    if not unsent:
        return
    try:
        with session_scope(settings.database_url) as s:
            park(s, unsent, NOT_SENT)
    except Exception:
        log.warning("could not mark the files whose tasks were not sent; the sweeper finds them later",
                    exc_info=True, extra=log_extra)
