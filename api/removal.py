"""Deleting items and libraries: their rows and vectors at once, their stored files once no item holds them."""

from __future__ import annotations

import logging

from flask import current_app
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from clapq.blobs import BLOB_LOCK, BlobStore
from clapq.db import get_engine
from clapq.models import Item, Job, JobDuplicate

log = logging.getLogger(__name__)

RECLAIM_CHUNK = 1000  # blobs checked and unlinked per hold of the exclusive lock: uploads wait no longer

_HELD = text("SELECT DISTINCT sha256 FROM items WHERE sha256 = ANY(CAST(:shas AS text[]))")


def delete_items(session: Session, where) -> list[str]:
    """Delete the items `where` selects (their segments, pooled vectors and copies go with them, by
    cascade) and commit; returns the digests of their bytes, for `reclaim`. A copy another job recorded
    of a deleted item stops counting in that job. A worker embedding one of them at this moment writes
    nothing for it (worker.store locks the items it writes)."""
    # one statement: the copies are counted from the rows this DELETE removed, so two requests deleting
    # the same item at once uncount its copies once (the second one's DELETE finds nothing to remove)
    gone = delete(Item).where(where).returning(Item.id, Item.sha256).cte("gone")
    copies = (select(JobDuplicate.job_id, func.sum(JobDuplicate.copies).label("n"))
              .join(gone, JobDuplicate.item_id == gone.c.id).group_by(JobDuplicate.job_id).subquery("copies"))
    uncount = (update(Job).where(Job.id == copies.c.job_id).values(duplicates=Job.duplicates - copies.c.n)
               .returning(Job.id).cte("uncount"))
    shas = list(session.scalars(select(gone.c.sha256).add_cte(uncount)))
    session.commit()
    return shas


def reclaim(shas: list[str]) -> int:
    """Unlink the blobs of these digests that no item holds any more; returns how many were removed.

    Runs after the deleting transaction committed, under the exclusive BLOB_LOCK (clapq.blobs). A crash
    between the commit and the unlink leaves a file no row names: disk space, never a row without its
    file."""
    if not shas:
        return 0
    settings = current_app.config["CLAPQ"]
    store = BlobStore(settings.blob_dir)
    removed = 0
    unique = sorted(set(shas))
    with get_engine(settings.database_url).connect() as conn:
        for start in range(0, len(unique), RECLAIM_CHUNK):
            chunk = unique[start:start + RECLAIM_CHUNK]
            conn.execute(select(func.pg_advisory_lock(BLOB_LOCK)))
            try:
                held = set(conn.scalars(_HELD, {"shas": chunk}))
                for sha in chunk:
                    if sha not in held:
                        try:
                            removed += store.remove(sha)
                        except OSError:  # the rows are gone either way: a file left over is only space
                            log.exception("could not remove a deleted file's blob", extra={"sha256": sha})
            finally:
                conn.execute(select(func.pg_advisory_unlock(BLOB_LOCK)))
                conn.commit()
    return removed
