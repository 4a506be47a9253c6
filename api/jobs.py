"""Jobs: one upload batch; status and counts are derived from its items' states in Postgres."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import func, select

from api.db import db
from api.lookup import owned
from clapq.models import Item, Job

bp = Blueprint("jobs", __name__)

MAX_ERRORS_SHOWN = 100


def job_status(counts: dict, cancelled: bool) -> str:
    pending = counts["queued"] + counts["running"]
    if cancelled and pending == 0:
        return "cancelled"
    if pending:
        return "queued" if counts["running"] == 0 and counts["done"] + counts["failed"] == 0 else "running"
    if counts["total"] and counts["failed"] == counts["total"]:
        return "failed"
    if counts["failed"]:
        return "done_with_errors"
    if counts["cancelled"]:
        return "cancelled"
    return "done"


def job_json(job: Job) -> dict:
    session = db()
    counts = {s: 0 for s in ("queued", "running", "done", "failed", "cancelled")}
    for status, n in session.execute(
        select(Item.status, func.count()).where(Item.job_id == job.id).group_by(Item.status)
    ):
        counts[status] = n
    counts["total"] = sum(counts.values())
    finished = counts["done"] + counts["failed"] + counts["cancelled"]
    errors = session.execute(
        select(Item.id, Item.filename, Item.error)
        .where(Item.job_id == job.id, Item.status == "failed")
        .order_by(Item.created_at, Item.id).limit(MAX_ERRORS_SHOWN)
    ).all()
    return {
        "id": str(job.id),
        "library_id": str(job.library_id),
        "status": job_status(counts, job.cancelled),
        "counts": counts,
        "progress": round(finished / counts["total"], 4) if counts["total"] else 1.0,
        "errors": [{"item_id": str(i), "filename": f, "error": e} for i, f, e in errors],
        "created_at": job.created_at.isoformat() if job.created_at else None,
    }


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    return job_json(owned(Job, job_id, "job"))
