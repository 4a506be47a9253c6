"""Structured JSON logs carrying tenant, job, item and task ids, for every clapq process."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys

# attributes every LogRecord has; anything else on a record came from `extra=` and is logged
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    """Adds the Celery task id and the HTTP request's tenant when there is one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            from celery import current_task

            if current_task and current_task.request.id and not hasattr(record, "task_id"):
                record.task_id = current_task.request.id
        except Exception:  # noqa: S110 - logging must never fail the caller
            pass
        try:
            from flask import g, has_request_context

            if has_request_context() and "tenant_id" in g and not hasattr(record, "tenant_id"):
                record.tenant_id = str(g.tenant_id)
        except Exception:  # noqa: S110
            pass
        return True


def _extras(record: logging.LogRecord) -> dict:
    """What the caller passed in `extra=` (and the ContextFilter added), as JSON-safe values."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
            for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "process": os.environ.get("CLAPQ_PROCESS", "clapq"),
            "pid": record.process,
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One line for a terminal: time, level, logger, message, then the extras as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line + "".join(f" {k}={_plain(v)}" for k, v in _extras(record).items())


def _plain(value) -> str:
    """A value as one token: quoted (JSON) when it is empty or holds spaces, quotes, '=' or newlines."""
    text = str(value)
    if text and not any(c.isspace() or c in '"=' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def log_format(fmt: str | None = None) -> str:
    """"json" (the default) or "text", from `fmt` or CLAPQ_LOG_FORMAT; anything else stops the process."""
    fmt = (fmt or os.environ.get("CLAPQ_LOG_FORMAT") or "json").strip().lower()
    if fmt not in ("json", "text"):
        raise SystemExit(f"clapq: CLAPQ_LOG_FORMAT must be json or text, got {fmt!r}")
    return fmt


def configure(level: str = "INFO", fmt: str | None = None) -> None:
    """JSON to stderr by default; CLAPQ_LOG_FORMAT=text for people reading a terminal. Python's warnings (a
    library's deprecation, Celery's warning about running as root) go through it too, each one record, where
    they were loose lines among the JSON ones."""
    fmt = log_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
