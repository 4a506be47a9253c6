"""Database side of a task: claim items, record failures, write vectors idempotently."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from clapq.models import Embedding, Item, Job, Library, Segment


@dataclasses.dataclass
class Claimed:
    id: uuid.UUID
    sha256: str
    library_id: uuid.UUID
    model_id: int
    job_id: uuid.UUID | None = None
    tenant_id: uuid.UUID | None = None


def silent_for(seconds: float):
    """Items whose row (heartbeat, claim or enqueue) has not been touched for `seconds`."""
    return Item.updated_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, seconds)


def claim(session: Session, ids: list[uuid.UUID], model_id: int, max_attempts: int, task_id: str,
          stale_after_s: float) -> list[Claimed]:
    """Mark pending items running (attempts counted here, in Postgres) and return them.

    A running item is taken only by a redelivery of the task that holds it, or once its
    heartbeat is older than `stale_after_s` (its worker is gone)."""
    stale = silent_for(stale_after_s)
    rows = session.execute(
        select(Item, Job.cancelled, Library.model_id)
        .join(Job, Job.id == Item.job_id)
        .join(Library, Library.id == Item.library_id)
        .where(Item.id.in_(ids),
               or_(Item.status == "queued", and_(Item.status == "running", or_(Item.claimed_by == task_id, stale))))
        .with_for_update(of=Item, skip_locked=True)
    ).all()
    claimed = []
    for item, cancelled, lib_model in rows:
        if cancelled:
            item.status, item.finished_at = "cancelled", func.now()
        elif item.attempts >= max_attempts:
            item.status, item.finished_at = "failed", func.now()
            item.error = f"gave up after {item.attempts} attempts; last error: {item.error or 'worker lost'}"
        elif lib_model != model_id:
            item.status, item.finished_at = "failed", func.now()
            item.error = "the library is bound to a different model than this worker serves"
        else:
            item.status, item.attempts, item.claimed_by = "running", item.attempts + 1, task_id
            item.started_at = item.updated_at = func.now()
            claimed.append(Claimed(item.id, item.sha256, item.library_id, lib_model, item.job_id, item.tenant_id))
    return claimed


def heartbeat(session: Session, ids: list[uuid.UUID], task_id: str) -> None:
    """Tell the sweeper these items are still being worked on."""
    session.execute(update(Item).where(Item.id.in_(ids), Item.status == "running", Item.claimed_by == task_id)
                    .values(updated_at=func.now()))


def release(session: Session, item_ids: list[uuid.UUID], reason: str) -> None:
    """Hand unfinished items back after an unexpected error; the sweeper retries them (attempts bound it)."""
    session.execute(update(Item).where(Item.id.in_(item_ids), Item.status == "running")
                    .values(status="queued", error=reason[:2000]))


def record_failure(session: Session, item_id: uuid.UUID, reason: str, info=None) -> None:
    values = dict(status="failed", error=reason[:2000], finished_at=func.now())
    if info is not None and info.sample_rate:
        values.update(sample_rate=info.sample_rate, channels=info.channels, audio_format=info.format[:32])
    session.execute(update(Item).where(Item.id == item_id, Item.status == "running").values(**values))


def write_item(session: Session, item: Claimed, info, spans: list[tuple[float, float]], vectors: np.ndarray) -> None:
    """Upsert all segments and the pooled vector of one item, then mark it done."""
    seg_rows = [
        dict(item_id=item.id, model_id=item.model_id, library_id=item.library_id,
             window_index=i, start_s=s, end_s=e, vector=vectors[i])
        for i, (s, e) in enumerate(spans)
    ]
    stmt = insert(Segment).values(seg_rows)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["item_id", "model_id", "window_index"],
            set_={"start_s": stmt.excluded.start_s, "end_s": stmt.excluded.end_s, "vector": stmt.excluded.vector},
        )
    )
    # a re-run with fewer windows (changed settings) must not leave stale ones
    session.execute(
        Segment.__table__.delete().where(
            Segment.item_id == item.id, Segment.model_id == item.model_id, Segment.window_index >= len(spans)
        )
    )
    mean = vectors.mean(axis=0)
    mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
    emb = insert(Embedding).values(item_id=item.id, model_id=item.model_id, library_id=item.library_id, vector=mean)
    session.execute(
        emb.on_conflict_do_update(index_elements=["item_id", "model_id"], set_={"vector": emb.excluded.vector})
    )
    session.execute(
        update(Item)
        .where(Item.id == item.id)
        .values(
            status="done", error=None, finished_at=func.now(), duration_s=info.duration_s,
            sample_rate=info.sample_rate, channels=info.channels, audio_format=info.format[:32],
        )
    )
