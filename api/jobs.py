"""Jobs: one upload batch; status, counts, progress and ETA are derived from its items in Postgres."""

from __future__ import annotations

from flask import Blueprint, current_app, g, request
from sqlalchemy import and_, case, delete, func, or_, select, update

from api.batches import backpressure
from api.db import db, lane_room, send_committed
from api.errors import ApiError, bad_request, no_body, takes_query
from api.items import item_json
from api.lookup import owned
from api.pages import after_cursor, cursor_arg, limit_arg, page_of
from api.models_info import describe, served_model_for
from api.removal import announce_gone
from clapq.models import NO_MESSAGE, Item, Job, JobDuplicate, Library, lock_in_id_order, requeued, update_locked
from clapq.presence import beat_alive, live_workers, serving
from clapq.queue import best_effort

bp = Blueprint("jobs", __name__)

MAX_ERRORS_SHOWN = 100
STATES = ("queued", "running", "done", "failed", "cancelled")


def job_status(counts: dict, cancelled: bool) -> str:
    pending = counts["queued"] + counts["running"]
    if pending:
        return "queued" if counts["running"] == 0 and counts["done"] + counts["failed"] == 0 else "running"
    # a cancel whose files all finished anyway (the batch in flight is written whole) is not a cancelled job:
    # it stayed "cancelled" with every file done, and `clapq upload` exited 1 (helper-54)
    if (cancelled and (counts["cancelled"] or not counts["total"])) or (counts["cancelled"] and not counts["done"]):
        return "cancelled"
    if counts["total"] and counts["failed"] == counts["total"]:
        return "failed"
    return "done_with_errors" if counts["failed"] else "done"


REDIS_AWAY = "Redis does not answer: no file is handed to a worker until it does"
NO_WORKER = "no live worker (start `clapq worker`): the files wait queued until one runs"
# under `clapq up`, which starts its worker (and again where it ends): told to start one, a user would run a
# second beside it. A worker that stopped answering (hung, or stopped with SIGSTOP) looks the same once its
# heartbeats have expired (30 s): said too, as "yet" alone read as one that would start by itself (helper-115)
NO_WORKER_UP = ("no live worker: `clapq up`'s worker is starting, or was started again after it ended (its log says "
                "why), or has stopped answering (hung: see its log, and run `clapq up` again); the files wait queued "
                "until it runs")


def why_waiting(model_id: int) -> str | None:
    """Why files of a library of `model_id` still to embed cannot move, or None where a live worker serves that
    model: no worker at all, none of that model (CLAPQ_MODEL changed, still loading it, or hung), or a Redis that does
    not answer. Without it such a job read as slow progress, `eta_s` growing (304 s) while nothing could embed
    its files (helper-69)."""
    seen = _presence(model_id)
    if seen is None:
        return REDIS_AWAY
    served, live, _ = seen
    if served:
        return None
    if not live:
        return NO_WORKER_UP if current_app.config["CLAPQ"].under_up else NO_WORKER
    model = describe(model_id)
    # a hung worker (stopped, or stuck in a call) was told as "another model, or still loading it" (helper-71)
    return (f"no live worker serves this library's model (model {model_id}, {model['name']}): workers whose "
            "CLAPQ_MODEL is another, one still loading it, or one that hangs; the files wait queued until one does")


def _presence(model_id: int) -> tuple[bool, bool, bool] | None:
    """Whether a live worker serves `model_id`, whether any worker is live, and whether the maintenance loop made
    a pass lately (clapq.presence); None while Redis does not answer. Asked once per request and model."""
    seen = g.setdefault("presence", {})
    if model_id not in seen:
        seen[model_id] = None
        celery = current_app.extensions["clapq_celery"]
        with best_effort(celery, "asking which models the live workers serve") as client:
            if client is not None:
                served = bool(serving(client, {model_id}))
                seen[model_id] = (served, served or bool(live_workers(celery, client)), beat_alive(celery, client))
    return seen[model_id]


# how long a job's files must have stood still (none ended, its first queued waiting) before it is said to be behind
# others': two tenants' jobs take turns task by task, and each was "behind" the other for the moment of the
# other's task, its eta_s null, flipping every few tenths of a second while both moved (helper-70)
BEHIND_AFTER_S = 30.0


# heartbeats a running file may miss (CLAPQ_HEARTBEAT_S each) before its job says it is not heard from: a busy
# machine or database delays one, never three
SILENT_BEATS = 3


def _job_waiting(job: Job, counts: dict, unsent: int, oldest_queued, last_end, now,
                 last_beat=None) -> str | None:
    """Why a job's files still to embed do not move (`counts` by status; `unsent`: its queued files no task
    holds, clapq.models.NO_MESSAGE; `oldest_queued`: when the first of its queued files was queued, its
    updated_at; `last_end`: when the last of its files ended; `now`: Postgres's), or None while they can.
    Beyond why_waiting: files only the maintenance loop sends, where it made no pass lately, and files queued
    behind other jobs' while none of its own is being embedded, where the pace so far says nothing of when they
    start (after a job's first files, the rest wait in the bulk lane behind another tenant's 10,000, and its ETA
    promised a minute, growing at every poll); and, where all it has left is running, files none of whose
    heartbeats came lately (`last_beat`: the latest, updated_at): their worker killed, they wait for
    CLAPQ_STALE_AFTER_S, and the ETA grew meanwhile (helper-88: "about 12 min left", then 24, for two files the
    maintenance loop queued again two minutes later)."""
    model_id = db().get(Library, job.library_id).model_id
    if why := why_waiting(model_id):
        return why
    settings = current_app.config["CLAPQ"]
    if counts["running"] and not counts["queued"] and last_beat is not None and now is not None:
        silent = (now - last_beat).total_seconds()
        if silent >= SILENT_BEATS * settings.heartbeat_s:
            n = counts["running"]
            if silent >= settings.stale_after_s:
                # the next pass takes them; `clapq up` dates a dead worker's files back to 2000 so that it does,
                # which was said "not been heard from for 849,000,000 s ..., in about 0 s"
                whose, it = (("its running file's worker", "it") if n == 1
                             else (f"its {n} running files' workers", "them"))
                return (f"{whose} stopped (no heartbeat for CLAPQ_STALE_AFTER_S or more, or `clapq up` handed {it} "
                        f"back): the maintenance loop queues {it} again at its next pass, every "
                        f"{settings.sweep_interval_s} s (CLAPQ_SWEEP_INTERVAL_S)")
            what, it = ("its running file has", "it") if n == 1 else (f"its {n} running files have", "them")
            return (f"{what} not been heard from for {silent:.0f} s (a worker stopped?): the maintenance loop queues "
                    f"{it} again once {settings.stale_after_s} s have passed (CLAPQ_STALE_AFTER_S), in about "
                    f"{settings.stale_after_s - silent:.0f} s")
    if unsent and not _presence(model_id)[2]:
        return (f"{unsent} of its files have no task in the queue (Redis did not take it, or they waited for a "
                "worker of their model), and the maintenance loop that sends them made no pass lately "
                "(start `clapq beat`)")

    # workers busy with other files (where none is, its files are not behind any: a message on its way, or one
    # lost, which the maintenance loop sends again), and files queued before its own waiting for them (by when they
    # were queued, updated_at), or none: its own are the first queued, and wait for the files the workers took
    # before them. A long recording holds its worker until it is embedded whole (minutes on a CPU), and a few
    # clips uploaded behind it stood queued at 0% with no reason, "no progress for 2 min", where the service knew
    if counts["queued"] and not counts["running"] and oldest_queued is not None and now is not None and (
            now - max(filter(None, (last_end, oldest_queued)))).total_seconds() >= BEHIND_AFTER_S:
        running, first = _ahead(model_id)
        if running - {job.id} and first is not None:
            if first[0] != job.id and first[1] < oldest_queued:
                # the tenant's own files queued before (its other jobs', which a tenant's files follow in the order
                # sent): a team member's few files behind a colleague's backlog, or one's own, were told only "files
                # queued before them", read as another tenant's, for the backlog's whole length (helper-127)
                own = sum(n for j, queued, n in _own_queued(model_id) if j != job.id and queued < oldest_queued)
                return ("none of its files is being embedded: the workers are on files queued before them"
                        + (f", {own:,} of them this tenant's own, of its other jobs (a tenant's files are embedded in "
                           "the order they were sent: `clapq jobs` lists them)" if own else "")
                        + " (the queue's order: README, Operations)")
            if first[0] == job.id:
                return BEHIND_RUNNING
    return None


# said where the workers' files are a backlog's as well as a long recording's (helper-127 saw it while they ended the
# tenant's own backlog, where "one long recording keeps a worker" was the example it gave)
BEHIND_RUNNING = ("none of its files is being embedded: the workers are still on files of other jobs, taken before "
                  "its own (a worker ends the files it took before it takes more; a long recording, once it is "
                  "embedded whole; the queue's order: README, Operations)")


def _ahead(model_id: int) -> tuple[set, tuple | None]:
    """Of the files of `model_id`: the jobs of those being embedded (two at most: whether one is another job's
    than a given one's), and the job and time queued (updated_at) of the first queued with a task (not
    NO_MESSAGE). Asked once per request and model: another job's file is queued before a job's first iff that
    first file is another job's and queued before it (where the first is its own, none is). Asked per job, the
    jobs' listing (up to 500) scanned the items for each, seconds on a table of 500,000 (helper-70)."""
    seen = g.setdefault("ahead", {})
    if model_id not in seen:
        of_model = (select(Item.job_id).join(Library, Library.id == Item.library_id)
                    .where(Library.model_id == model_id))
        running = set(db().scalars(of_model.where(Item.status == "running").distinct().limit(2)))
        first = db().execute(
            of_model.add_columns(Item.updated_at)
            .where(Item.status == "queued", or_(Item.claimed_by.is_(None), Item.claimed_by.not_in(NO_MESSAGE)))
            .order_by(Item.updated_at).limit(1)).first() if running else None
        seen[model_id] = (running, first and tuple(first))
    return seen[model_id]


def _own_queued(model_id: int) -> list:
    """Of the caller's tenant's queued files of `model_id` with a task: by job and when they were queued
    (updated_at: a batch's files at once, those queued again later apart, which a job's first alone counted as
    before another's), how many. Asked once per request and model, through ix_items_tenant_waiting (a tenant has
    at most CLAPQ_MAX_PENDING_PER_TENANT and a batch waiting), as _ahead is."""
    seen = g.setdefault("own_queued", {})
    if model_id not in seen:
        seen[model_id] = db().execute(
            select(Item.job_id, Item.updated_at, func.count())
            .join(Library, Library.id == Item.library_id)
            .where(Item.tenant_id == g.tenant_id, Item.status == "queued", Library.model_id == model_id,
                   or_(Item.claimed_by.is_(None), Item.claimed_by.not_in(NO_MESSAGE)))
            .group_by(Item.job_id, Item.updated_at)).all()
    return seen[model_id]


def _copied(job: Job) -> list:
    """The items a job's copies (re-uploaded bytes) point at: at most a batch's worth."""
    return list(db().scalars(select(JobDuplicate.item_id).where(JobDuplicate.job_id == job.id)))


def _of_job(job: Job, copied: list):
    """Items a job sent: its own, and those its copies point at. The ids are fetched first: an IN
    (subquery) under OR cannot use an index, and every poll of the job would scan all items."""
    return or_(Item.job_id == job.id, Item.id.in_(copied)) if copied else Item.job_id == job.id


def _seen_status(job: Job):
    """An item's status as `job` sees it (SQL). A copy the job holds, of a file another job uploaded first
    and then cancelled, is not embedded: for this job it failed (and this job's retry queues it again)."""
    return case((and_(Item.job_id != job.id, Item.status == "cancelled"), "failed"), else_=Item.status)


def _stopped_copy(item, job: Job) -> str | None:
    """Why `item` counts as failed for `job` when another job's cancel stopped it (see _seen_status)."""
    if item.job_id != job.id and item.status == "cancelled":
        return f"cancelled with job {item.job_id}, which uploaded it first; retry this job to embed it"
    return None


def job_json(job: Job, with_errors: bool = True) -> dict:
    session = db()
    counts = {s: 0 for s in STATES}
    size = {s: 0 for s in STATES}  # bytes of the files in each state: progress and ETA weigh files by size
    # of the running files' bytes, the share embedded (a long file's windows so far, as of its last heartbeat)
    part = Item.size_bytes * func.coalesce(Item.progress, 0.0)
    # the ETA's pace: bytes finished since the job's last retry (a day after it first ran), or all of them
    paced = (func.sum(Item.size_bytes).filter(Item.finished_at >= job.retried_at) if job.retried_at is not None
             else func.sum(Item.size_bytes))
    first_start = last_finish = now = None
    embedded = own_finished = 0.0
    # its queued files no task holds, which the maintenance loop sends (clapq.models.NO_MESSAGE), and when the
    # first of its queued files was queued: why it waits (_job_waiting)
    unsent, oldest_queued, last_beat = 0, None, None
    # Postgres's now(), not this host's clock: the times it is measured against are Postgres's
    for status, n, nbytes, nembedded, npaced, started, finished, now, parked, created, touched in session.execute(
        select(Item.status, func.count(), func.sum(Item.size_bytes), func.sum(part), paced,
               func.min(Item.started_at), func.max(Item.finished_at), func.now(),
               func.count().filter(Item.claimed_by.in_(NO_MESSAGE)), func.min(Item.updated_at),
               func.max(Item.updated_at))
        .where(Item.job_id == job.id).group_by(Item.status)
    ):
        counts[status], size[status] = n, int(nbytes or 0)
        if status == "queued":
            unsent, oldest_queued = parked, created
        if status == "running":
            embedded += float(nembedded or 0)
            last_beat = touched
        elif status != "queued":
            own_finished += float(npaced or 0)  # this job's own work, for the ETA
        first_start = min(filter(None, (first_start, started)), default=None)
        last_finish = max(filter(None, (last_finish, finished)), default=None)
    own_finished += embedded
    # copies count as the items they are copies of stand, as this job sees them (a copy of a file still
    # queued is queued; _seen_status)
    recorded = 0
    seen = _seen_status(job).label("seen")
    for status, n, nbytes, nembedded, finished in session.execute(
        select(seen, func.sum(JobDuplicate.copies), func.sum(JobDuplicate.copies * Item.size_bytes),
               func.sum(JobDuplicate.copies * part), func.max(Item.finished_at))
        .join(Item, Item.id == JobDuplicate.item_id).where(JobDuplicate.job_id == job.id).group_by(seen)
    ) if job.duplicates else ():  # most jobs have no copies: one query for them, not two
        counts[status] += int(n)
        size[status] += int(nbytes or 0)
        embedded += float(nembedded or 0) if status == "running" else 0.0
        recorded += int(n)
        if finished is not None:  # a copy of a file embedded long ago ends no earlier than this job began
            last_finish = max(filter(None, (last_finish, finished, job.created_at)))
    counts["done"] += job.duplicates - recorded  # copies made before migration 0004: embedded then
    counts["total"] = sum(counts[s] for s in STATES)
    counts["duplicates"] = job.duplicates
    remaining = counts["queued"] + counts["running"]
    # by bytes, not files: a job of a hundred short clips and one long recording is not 99% done once the
    # clips are (bytes follow duration within a format; across formats, only roughly)
    # a cancelled file is not work done: a cancelled job's progress stays where the cancel stopped it
    total_bytes, left = sum(size.values()), size["queued"] + size["running"] + size["cancelled"] - embedded
    if not counts["total"]:
        progress = 1.0
    elif total_bytes:
        progress = round(1 - left / total_bytes, 4)
    else:  # only empty files (or copies recorded before migration 0004)
        progress = round(1 - (remaining + counts["cancelled"]) / counts["total"], 4)
    if remaining:  # files of 0 bytes still to go are not nothing
        progress = min(progress, 0.9999)
    waiting = _job_waiting(job, counts, unsent, oldest_queued, last_finish, now, last_beat) if remaining else None
    eta = None
    if remaining and own_finished and first_start is not None and waiting is None:
        elapsed = (now - max(filter(None, (first_start, job.retried_at)))).total_seconds()
        eta = round(left * max(elapsed, 0.0) / own_finished, 1)
    finished = last_finish
    if job.gone_ended_at is not None:  # files of it deleted since: their ends count, no earlier than the job began
        finished = max(filter(None, (last_finish, job.gone_ended_at, job.created_at)))
    out = {
        "id": str(job.id),
        "library_id": str(job.library_id),
        "status": job_status(counts, job.cancelled),
        "counts": counts,
        "progress": progress,
        "eta_s": eta,
        "waiting": waiting,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "finished_at": finished.isoformat() if finished is not None and not remaining else None,
    }
    if with_errors:
        copied = _copied(job) if recorded else []
        failed = and_(Item.job_id == job.id, Item.status == "failed")
        errors = session.execute(
            select(Item.id, Item.filename, Item.error, Item.status, Item.job_id)
            .where(or_(failed, and_(Item.id.in_(copied), _seen_status(job) == "failed")) if copied else failed)
            .order_by(Item.created_at, Item.id).limit(MAX_ERRORS_SHOWN)
        ).all()
        out["errors"] = [{"item_id": str(r.id), "filename": r.filename, "error": _stopped_copy(r, job) or r.error}
                         for r in errors]
        # its files embedded as far as they could be read (cut short): few, found by their own index
        warned = session.execute(
            select(Item.id, Item.filename, Item.warning).where(Item.job_id == job.id, Item.warning.is_not(None))
            .order_by(Item.created_at, Item.id).limit(MAX_ERRORS_SHOWN))
        out["warnings"] = [{"item_id": str(r.id), "filename": r.filename, "warning": r.warning} for r in warned]
    return out


@bp.get("/jobs")
@takes_query("limit", "cursor")
def list_jobs():
    limit, cursor = limit_arg(20), cursor_arg()
    rows = db().scalars(
        select(Job).where(Job.tenant_id == g.tenant_id, after_cursor(Job, cursor, newest_first=True))
        .order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    ).all()
    page, nxt = page_of(rows, limit)
    return {"jobs": [job_json(j, with_errors=False) for j in page], "next_cursor": nxt}


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    return job_json(owned(Job, job_id, "job"))


def items_page(where, job: Job | None = None) -> dict:
    """The items `where` selects, oldest first, paged by `limit` + `cursor` and narrowed by `?status=`. In a
    `job`'s listing each item stands as the job's counts take it: a copy of a file another job uploaded
    first and then cancelled is failed here (with why), as this job's retry would queue it again."""
    status = request.args.get("status") or None  # `status=` empty narrows nothing, as `limit=` takes the default
    if status is not None and status not in STATES:
        raise bad_request(f"'status' must be one of {', '.join(STATES)}")
    limit, cursor = limit_arg(100), cursor_arg()
    seen = Item.status if job is None else _seen_status(job)
    q = select(Item).where(where, after_cursor(Item, cursor))
    if status:
        q = q.where(seen == status)
    rows = db().scalars(q.order_by(Item.created_at, Item.id).limit(limit + 1)).all()
    page, nxt = page_of(rows, limit)
    out = [item_json(i) for i in page]
    if job is not None:
        for i, row in zip(page, out):
            if why := _stopped_copy(i, job):
                row.update(status="failed", error=why)
    return {"items": out, "next_cursor": nxt}


@bp.get("/jobs/<job_id>/items")
@takes_query("limit", "cursor", "status")
def job_items(job_id: str):
    job = owned(Job, job_id, "job")
    return items_page(_of_job(job, _copied(job)), job)


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Queued and running items are cancelled now. A worker embedding one hears of it within about a
    second (api.removal.announce_gone; at its next heartbeat if that message is lost) and, once the
    batch it is running ends, runs no more of its windows; a file whose vectors it
    writes before that ends done (whole, never half-written)."""
    no_body()
    job = owned(Job, job_id, "job")
    session = db()
    stopping = and_(Item.job_id == job.id, Item.status.in_(("queued", "running")))
    if not session.scalar(select(func.count()).select_from(Item).where(stopping)):
        # files it sent that the library held already are embedded by the jobs that sent them first
        copied = _copied(job) if job.duplicates else []
        others = sorted(map(str, session.scalars(
            select(Item.job_id).where(Item.id.in_(copied), Item.status.in_(("queued", "running"))).distinct()
        ))) if copied else []
        if others:
            raise ApiError(409, "conflict", "this job's files still to embed are copies of files another upload "
                           f"sent first, and that job embeds them: cancel job {others[0]}"
                           + (f" (and {len(others) - 1} more)" if len(others) > 1 else "") + " to stop them")
        raise ApiError(409, "conflict", "nothing of this job's is queued or running; nothing to cancel")
    # the files, locked in id order, before the job's row: a deletion uncounting copies updates it after them
    update_locked(session, stopping, dict(status="cancelled", finished_at=func.now()))
    job.cancelled = True
    session.commit()
    announce_gone()
    return job_json(job)


@bp.post("/jobs/<job_id>/retry")
def retry_job(job_id: str):
    """Re-queue only the failed items (and, after a cancel, the cancelled ones), with fresh attempts; a 409
    if there are none. A
    copy this job holds of a file another job uploaded first, where that file failed or that job's cancel
    stopped it, is retried too: the item moves to this job, as uploading the file again would move it,
    so this job reports how it ends (and the other job's cancel no longer stops it)."""
    no_body()
    job = owned(Job, job_id, "job")
    session = db()
    # a library bound to another model than this service runs: its files would fail again, each for that
    served_model_for(session.get(Library, job.library_id))
    # it queues files as an upload does: a full backlog, or the tenant's full share of it, refuses it
    # (helper-37: cancelling and retrying went past the tenant's share)
    backpressure(current_app.config["CLAPQ"])
    states = ("failed", "cancelled") if job.cancelled else ("failed",)
    copied = _copied(job)
    own = and_(Item.job_id == job.id, Item.status.in_(states))
    others = and_(Item.id.in_(copied), Item.job_id != job.id, Item.status.in_(("failed", "cancelled")))
    # every file it may queue again is locked first, its copies' too: whether a copy moves is decided on its
    # latest state (an upload of the same file, or the other job's retry, that committed first queued it)
    held = lock_in_id_order(session, or_(own, others) if copied else own)
    moved = list(session.scalars(select(Item.id).where(Item.id.in_(held), others))) if copied else []
    ids = list(session.scalars(
        update(Item).where(Item.id.in_(held), or_(own, Item.id.in_(moved)) if moved else own)
        .values(**requeued(job.id))
        .returning(Item.id)
    ))
    if not ids:  # and the job stays as it stands: a cancelled one is not turned into a done one
        jid = job.id  # read before the rollback expires `job` (reading it then would load a row maybe deleted)
        session.rollback()
        if not copied and session.scalar(select(Item.id).where(Item.job_id == jid).limit(1)) is None:
            # a cancelled job whose files were all sent again (they moved to that upload's job) said "nothing
            # failed or was cancelled", against its own status (helper-36)
            raise ApiError(409, "conflict", "this job holds no files any more (they were deleted, or sent again "
                           "and moved to the job of that upload); nothing to retry")
        raise ApiError(409, "conflict", "nothing of this job's failed or was cancelled; nothing to retry")
    if moved:  # each moved item is now one of this job's own files, no longer one of its copies
        session.execute(update(JobDuplicate).where(JobDuplicate.job_id == job.id, JobDuplicate.item_id.in_(moved))
                        .values(copies=JobDuplicate.copies - 1))
        session.execute(delete(JobDuplicate).where(JobDuplicate.job_id == job.id, JobDuplicate.copies <= 0))
        # in SQL, not from the count read at the start: a deletion of another of its copies committed since
        # (api.removal, which uncounts it in SQL) was undone by writing back the old count less these
        job.duplicates = Job.duplicates - len(moved)
    job.cancelled, job.retried_at = False, func.now()
    fast = lane_room(ids)
    session.commit()
    send_committed(ids, fast, job_id=str(job.id))
    return {**job_json(job), "requeued": len(ids)}, 202
