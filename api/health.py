"""Liveness (/healthz, cheap) and readiness (/readyz: Postgres, Redis, a live worker, model) probes."""

from __future__ import annotations

from flask import Blueprint, current_app
from sqlalchemy import text

from api.db import db
from clapq.checkpoint import ModelUnavailable, resolve
from clapq.presence import live_workers
from clapq.queue import redis_client

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    settings = current_app.config["CLAPQ"]
    checks: dict[str, str] = {}
    try:
        db().execute(text("SELECT 1"))
        checks["postgres"] = "ok"
    except Exception as exc:  # report, don't raise: this endpoint's job is to say what is down
        checks["postgres"] = f"error: {type(exc).__name__}"
    try:
        redis_client(current_app.extensions["clapq_celery"]).ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        n = live_workers(current_app.extensions["clapq_celery"])
        checks["workers"] = "ok" if n else "error: no live worker (start `clapq worker`)"
    except Exception as exc:
        checks["workers"] = f"error: {type(exc).__name__}"
    try:
        resolve(settings.model)
        checks["model"] = "ok"
    except ModelUnavailable as exc:
        checks["model"] = f"error: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503
