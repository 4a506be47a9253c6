"""Deleting items and libraries: their rows and vectors at once, their stored files once no item holds them."""

from __future__ import annotations

import logging

from flask import current_app, g
from sqlalchemy import Text, any_, case, cast, delete, func, literal_column, select, union, union_all, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from api.db import db
from clapq import blobs
from clapq.db import get_engine
from clapq.models import Item, Job, JobDuplicate
from clapq.queue import announce_items_gone
from clapq.threads import one_thread

log = logging.getLogger(__name__)


def delete_items(session: Session, where, commit: bool = True) -> dict:
    """Delete the items `where` selects (their segments, pooled vectors and copies go with them, by
    cascade) and commit; returns the digest of each one's bytes by its id (those this statement removed: not
    those another request deleted first), the digests for `reclaim` (the trigger of migration 0007 queued them
    in the same transaction; not committed where `commit` is false). A copy another job recorded of a deleted item stops
    counting in that job. Each job they (or copies of them) were in keeps when they ended, or now for those that had
    not (Job.gone_ended_at): one all of whose files went has finished then. A worker embedding one of them at this
    moment writes nothing for it (worker.store locks the items it writes); the caller then calls announce_gone, so
    that it stops soon."""
    # the rows locked first, in id order, the order a worker's vector write locks its items in
    # (worker.store): a library's DELETE alone took them in its scan's order, and a write holding a later
    # one while it waited on an earlier one was a deadlock, rolled back as a 503 for the deletion
    session.execute(select(func.count()).select_from(
        select(Item.id).where(where).order_by(Item.id).with_for_update().subquery()))
    # then the rows of the jobs it updates, in id order (FOR NO KEY UPDATE, as its UPDATE takes): the UPDATE
    # alone took them in its plan's order (the scan of jobs, or the hash of its per-job sums, sized by the
    # deletion's estimate), so a few files' deletion beside a library's or a bulk one of the same jobs could each
    # hold a job the other waited on: a deadlock, a 503 for one (helper-107). Items first, as a job's cancel and
    # retry lock theirs before the job's row; its items locked, which jobs they and their copies are in is settled
    held = select(Item.id).where(where)
    session.execute(select(func.count()).select_from(
        select(Job.id).where(Job.id.in_(union(select(Item.job_id).where(where),
                                              select(JobDuplicate.job_id).where(JobDuplicate.item_id.in_(held)))))
        .order_by(Job.id).with_for_update(key_share=True).subquery()))
    # one statement: the copies are counted from the rows this DELETE removed, so two requests deleting
    # the same item at once uncount its copies once (the second one's DELETE finds nothing to remove)
    ended = case((Item.status.in_(("queued", "running")), func.now()),
                 else_=func.coalesce(Item.finished_at, func.now()))
    gone = delete(Item).where(where).returning(Item.id, Item.sha256, Item.job_id, ended.label("ended")).cte("gone")
    # each job once (a row updated twice in one statement takes one of the two): its own items, and its copies
    touched = union_all(select(gone.c.job_id, literal_column("0").label("n"), gone.c.ended),
                        select(JobDuplicate.job_id, JobDuplicate.copies, gone.c.ended)
                        .join(gone, JobDuplicate.item_id == gone.c.id)).subquery("touched")
    per_job = (select(touched.c.job_id, func.sum(touched.c.n).label("n"), func.max(touched.c.ended).label("ended"))
            .group_by(touched.c.job_id).subquery("per_job"))
    uncount = (update(Job).where(Job.id == per_job.c.job_id)
               .values(duplicates=Job.duplicates - per_job.c.n,
                       gone_ended_at=func.greatest(Job.gone_ended_at, per_job.c.ended))
               .returning(Job.id).cte("uncount"))
    shas = dict(session.execute(select(gone.c.id, gone.c.sha256).add_cte(uncount)).all())
    if commit:
        session.commit()
    return shas


def announce_gone() -> None:
    """After a deletion or a cancel commits: wake the heartbeats of the workers' running tasks, so one
    embedding such a file stops within about a second (clapq.queue.announce_items_gone)."""
    announce_items_gone(current_app.extensions["clapq_celery"])


def reclaim(shas: list[str]) -> int:
    """Unlink the blobs of these digests that no item holds any more (clapq.blobs.reclaim), after the
    deleting transaction committed; returns how many files were removed (for the log: see `released`)."""
    return blobs.reclaim(_engine(), current_app.extensions["clapq_blobs"], shas)


def released(shas: list[str], later: bool = False) -> int:
    """After a deletion: its stored files removed (`reclaim`, counted in the log; with `later`, after the
    answer: `reclaim_later`), and how many of the digests no item of the caller's tenant holds any more, the
    `stored_files` a deletion answers: the caller's files whose bytes left its libraries. Not how many files
    left the disk: a file is shared by every item of its bytes, in any tenant's library, and that count told a
    tenant whether another one holds a file (helper-35). With `later`, those to be removed: the count does not
    wait for an upload (or re-embed) of the same bytes committing at that moment, which keeps them on disk, as
    the removal in the request did (it waited for such an upload's blob lock)."""
    if not later:
        removed = reclaim(shas)
        if removed:
            log.info("stored files removed", extra={"files": removed})
    held = set(db().scalars(select(Item.sha256).where(Item.tenant_id == g.tenant_id,
                                                      Item.sha256 == any_(cast(sorted(set(shas)), ARRAY(Text))))))
    if later:  # counted first: what the tenant's committed items hold now, not after uploads the removal waits for
        reclaim_later(shas)
    return len(set(shas) - held)


def reclaim_later(shas: list[str]) -> None:
    """`reclaim` these digests on this process's removal thread, after the answer: a library of 20,000 small
    files spent 9.6 s of its 12 s DELETE unlinking them one at a time, each thousand after the uploads holding
    BLOB_LOCK at that moment (BENCHMARKS.md, "Deleting a library of small files"). Their queue rows
    (blob_reclaims) committed with the deletion, by the trigger of migration 0007: a process killed before the
    thread is done leaves them queued (one that exits goes on with them first), and the maintenance loop's pass
    (worker.sweeper.collect_blobs) removes what is queued a minute, once no item holds it, as after any crash."""
    shas = sorted(set(shas))
    if shas:
        one_thread(RECLAIM_THREAD).submit(_reclaim_logged, _engine(), current_app.extensions["clapq_blobs"], shas)


RECLAIM_THREAD = "clapq-blob-reclaim"


def reclaimed(timeout: float | None = None) -> None:
    """Once the removals handed to this process's thread so far are done (a process that exits waits for them
    too: concurrent.futures joins its threads)."""
    one_thread(RECLAIM_THREAD).submit(lambda: None).result(timeout)


def _reclaim_logged(engine, store, shas: list[str]) -> int:
    try:
        removed = blobs.reclaim(engine, store, shas)
    except Exception:  # the database away: the rest stays queued, for the maintenance loop
        log.exception("could not remove a deletion's stored files now; they stay queued, and the maintenance loop "
                      "(clapq beat) removes them", extra={"files": len(shas)})
        return 0
    if removed:
        log.info("stored files removed", extra={"files": removed})
    return removed


def queue_unnamed(shas: list[str]) -> None:
    """Queue the blobs an upload is about to move into place, before it does (clapq.blobs.queue_reclaim):
    its rows' commit takes them off again; if they never commit, `reclaim` at the request's end, or the
    maintenance loop after a crash, removes those no item holds."""
    blobs.queue_reclaim(_engine(), shas)


def _engine():
    return get_engine(current_app.config["CLAPQ"].database_url)
