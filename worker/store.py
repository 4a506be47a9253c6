"""Database side of a task: claim items, record failures, write vectors idempotently."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
from sqlalchemy import and_, case, func, or_, select, text, update
from sqlalchemy.orm import Session

from clapq.models import Item, Job, Library, update_locked
from worker.windows import pooled


@dataclasses.dataclass
class Claimed:
    id: uuid.UUID
    sha256: str
    library_id: uuid.UUID
    model_id: int
    job_id: uuid.UUID | None = None
    tenant_id: uuid.UUID | None = None
    attempt: int = 1  # this claim's try (1: the first)
    resumed: bool = False  # it was running under this task id: the message came back after its process died
    filename: str | None = None  # as uploaded: its extension is the decoder's hint (worker.audio.format_hint)


def silent_for(seconds: float):
    """Items whose row (heartbeat, claim or enqueue) has not been touched for `seconds`."""
    return Item.updated_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, seconds)


def claim(session: Session, ids: list[uuid.UUID], model_id: int, max_attempts: int, task_id: str,
          stale_after_s: float, retry: bool = False, left: list | None = None,
          locked: list | None = None) -> list[Claimed]:
    """Mark pending items running (attempts counted here, in Postgres) and return them.

    A running item is taken only by a redelivery of the task that holds it, or once its
    heartbeat is older than `stale_after_s` (its worker is gone). `retry`: Celery's own retry after a passing
    fault (the database away): the files this task still holds are taken on without counting a try (three
    outages during the same files failed them for good, helper-41). `left` gets (id, the library's model id) of
    files left queued for a worker of another model; `locked`, the ids of queued files it skipped, as another
    transaction held them (an upload of the same bytes deciding whether they are a retry), which this task's
    message, once acked, no longer holds."""
    stale = silent_for(stale_after_s)
    rows = session.execute(
        select(Item, Job.cancelled, Library.model_id)
        .join(Job, Job.id == Item.job_id)
        .join(Library, Library.id == Item.library_id)
        .where(Item.id.in_(ids),
               or_(Item.status == "queued", and_(Item.status == "running", or_(Item.claimed_by == task_id, stale))))
        .with_for_update(of=Item, skip_locked=True)
    ).all()
    claimed, mismatched = [], []
    for item, cancelled, lib_model in rows:
        if cancelled:
            item.status, item.finished_at = "cancelled", func.now()
        elif item.attempts >= max_attempts:
            item.status, item.finished_at, item.failed_in_file = "failed", func.now(), False  # not known whose
            item.error = f"gave up after {item.attempts} attempts; last error: {item.error or 'worker lost'}"
        elif lib_model != model_id:
            # a worker started with another checkpoint (CLAPQ_MODEL, or a newer revision downloaded) beside the
            # right ones: the file is not its to fail (507 of 600 failed in seconds, helper-41). It stays
            # queued, saying why, and the task sends it again at once for a worker of the library's model
            item.error = (f"waiting for a worker that serves this library's model (model {lib_model}); a worker "
                          f"serving another (model {model_id}: its CLAPQ_MODEL differs) left it")
            item.updated_at = func.now()
            if item.status == "running":
                # a message that came back to this worker (Celery's retry after the database was away, or a
                # redelivery after the process running it died) finds the files a worker of their model held
                # under this task id: left running, the task sent again for them found them taken, and they
                # waited CLAPQ_STALE_AFTER_S for the sweeper, which counted another try (helper-63). Queued
                # again, as the task would hand them back: a try the outage cut short is given back
                if retry and item.claimed_by == task_id:
                    item.attempts = max(item.attempts - 1, 0)
                item.status, item.progress = "queued", None
            mismatched.append((item.id, lib_model))
        else:
            resumed = item.status == "running" and item.claimed_by == task_id
            item.status, item.claimed_by = "running", task_id
            item.attempts += 0 if resumed and retry else 1
            item.started_at = item.updated_at = func.now()
            item.progress = None  # a try starts over
            claimed.append(Claimed(item.id, item.sha256, item.library_id, lib_model, item.job_id, item.tenant_id,
                                   item.attempts, resumed, item.filename))
    if left is not None:
        left.extend(mismatched)
    if locked is not None and len(rows) < len(ids):
        seen = {item.id for item, _, _ in rows}
        locked.extend(session.scalars(select(Item.id).where(Item.id.in_([i for i in ids if i not in seen]),
                                                            Item.status == "queued")))
    return claimed


def claim_more(session: Session, model_id: int, max_attempts: int, task_id: str, stale_after_s: float,
               limit: int) -> list[Claimed]:
    """Claim up to `limit` more queued items for this model, the oldest first, that no worker has ever
    started (a retried item keeps to its own task, so a file that kills workers takes no other file with
    it; a user's retry resets attempts but not started_at). Their own tasks, when they come, find them
    taken and do nothing."""
    ids = list(session.scalars(
        select(Item.id)
        .join(Job, Job.id == Item.job_id)
        .join(Library, Library.id == Item.library_id)
        .where(Item.status == "queued", Item.attempts == 0, Item.started_at.is_(None), Library.model_id == model_id,
               Job.cancelled.is_(False))
        .order_by(Item.updated_at)
        .limit(limit)
        .with_for_update(of=Item, skip_locked=True)
    ))
    return claim(session, ids, model_id, max_attempts, task_id, stale_after_s) if ids else []


def heartbeat(session: Session, ids: list[uuid.UUID], task_id: str,
              progress: dict[uuid.UUID, float] | None = None) -> set[uuid.UUID]:
    """Tell the sweeper these items are still being worked on, and record `progress` (item id -> share of
    its windows embedded) for those it names; returns those of them this task no longer holds: deleted,
    or taken by another task after missed beats (or just finished here)."""
    values = {"updated_at": func.now()}
    held = set(ids)
    shares = {i: p for i, p in (progress or {}).items() if i in held}
    if shares:
        values["progress"] = case(shares, value=Item.id, else_=Item.progress)
    kept = update_locked(session, and_(Item.id.in_(ids), Item.status == "running", Item.claimed_by == task_id),
                          values)
    return held - set(kept)


# why the files of a task whose process died went back to the queue
LOST = "worker lost (its process died)"
OUTAGE = "handed back after the database was away (not counted as a try)"


def release(session: Session, item_ids: list[uuid.UUID], reason: str, task_id: str,
            charge: bool = True) -> list[uuid.UUID]:
    """Hand back this task's unfinished items after an error (not those done, failed, or taken over by
    another task after a missed heartbeat); returns their ids. Attempts bound the retries; `charge=False`
    gives this try back (a passing fault that was not the files' doing)."""
    return _requeue(session, Item.id.in_(item_ids), reason, task_id, charge)


def release_borrowed(session: Session, own: list[uuid.UUID], task_id: str, retry: bool = False) -> list[uuid.UUID]:
    """Hand back the files this task id took from later tasks (claim_more) and still holds running, beside
    its own `own`: asked when its message comes back after the process running it died, whose borrowed
    files' own tasks found them taken and did nothing. The try that died counts. On Celery's own retry
    (`retry`) the try before failed to hand them back itself (the database was away): not counted. Few rows:
    the running items are found through the partial index of pending ones."""
    return _requeue(session, Item.id.not_in(own), OUTAGE if retry else LOST, task_id, charge=not retry)


def _requeue(session: Session, which, reason: str, task_id: str, charge: bool) -> list[uuid.UUID]:
    """Queue again the items `which` selects that this task holds running; returns their ids."""
    values = dict(status="queued", error=reason[:2000], progress=None)
    if not charge:
        values["attempts"] = func.greatest(Item.attempts - 1, 0)
    return update_locked(session, and_(which, Item.status == "running", Item.claimed_by == task_id), values)


def record_failure(session: Session, item_id: uuid.UUID, reason: str, info=None, in_file: bool = False) -> bool:
    """Whether the failure was recorded: not for a file cancelled or deleted meanwhile. `in_file`: the reason is
    in the file's bytes, which would fail the same way again (items.failed_in_file)."""
    values = dict(status="failed", error=reason[:2000], finished_at=func.now(), failed_in_file=in_file)
    if info is not None and info.sample_rate:
        values.update(sample_rate=info.sample_rate, channels=info.channels, audio_format=info.format[:32])
    return session.execute(update(Item).where(Item.id == item_id, Item.status == "running").values(**values)
                           ).rowcount == 1


# One statement per model batch: every finished item's segments, stale-window clean-up, pooled
# vector and status, as data-modifying CTEs over arrays (one round trip, one plan, whatever the
# batch holds). The sub-statements touch disjoint rows, so one snapshot serves them all.
_WRITE_BATCH = text("""
WITH seg_in AS (
    SELECT * FROM unnest(CAST(:seg_item AS uuid[]), CAST(:seg_index AS int[]), CAST(:seg_start AS float8[]),
                         CAST(:seg_end AS float8[]), CAST(:seg_vector AS text[]))
           AS t(item_id, window_index, start_s, end_s, vector)
), locked AS (
    -- an item deleted while it was embedded is left out (its vectors would break the foreign keys and
    -- fail the whole batch); the lock keeps the rest from being deleted until this commits. Taken in id
    -- order, as a deletion takes its rows (api.removal.delete_items): in any other, the two could deadlock.
    -- Locked apart from the join below, by the primary key's lookups of these ids alone. As `done` below
    -- updates them (not FOR KEY SHARE, which let a job's cancel or /moves lock a later one in id order first,
    -- which `done`, in the batch's order, could then wait on holding an earlier one: a deadlock, helper-60)
    SELECT id FROM items WHERE id = ANY(CAST(:item AS uuid[])) ORDER BY id FOR NO KEY UPDATE
), item_in AS (
    SELECT t.* FROM unnest(CAST(:item AS uuid[]), CAST(:library AS uuid[]), CAST(:windows AS int[]),
                           CAST(:pooled AS text[]), CAST(:duration AS float8[]), CAST(:sample_rate AS int[]),
                           CAST(:channels AS int[]), CAST(:format AS text[]), CAST(:warning AS text[]))
           AS t(item_id, library_id, windows, pooled, duration_s, sample_rate, channels, audio_format, warning)
    JOIN locked ON locked.id = t.item_id
), seg AS (
    INSERT INTO segments (item_id, model_id, library_id, window_index, start_s, end_s, vector)
    SELECT s.item_id, :model, i.library_id, s.window_index, s.start_s, s.end_s, CAST(s.vector AS vector)
    FROM seg_in s JOIN item_in i USING (item_id)
    ON CONFLICT (item_id, model_id, window_index)
    DO UPDATE SET start_s = excluded.start_s, end_s = excluded.end_s, vector = excluded.vector
    RETURNING 1
), stale AS (
    -- a re-run with fewer windows (changed settings) must not leave the old ones behind
    DELETE FROM segments s USING item_in i
    WHERE s.item_id = i.item_id AND s.model_id = :model AND s.window_index >= i.windows
    RETURNING 1
), pooled AS (
    INSERT INTO embeddings (item_id, model_id, library_id, vector, windows)
    SELECT item_id, :model, library_id, CAST(pooled AS vector), windows FROM item_in
    ON CONFLICT (item_id, model_id) DO UPDATE SET vector = excluded.vector, windows = excluded.windows
    RETURNING 1
), done AS (
    UPDATE items SET status = 'done', error = NULL, finished_at = now(), updated_at = now(),
                     duration_s = i.duration_s, sample_rate = i.sample_rate, channels = i.channels,
                     audio_format = i.audio_format, warning = NULLIF(i.warning, '')
    FROM item_in i WHERE items.id = i.item_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM seg) AS segments, (SELECT count(*) FROM done) AS items
""")


def _literal(vector: np.ndarray) -> str:
    """pgvector's text form; Python's shortest float repr reads back to the same float32."""
    return "[" + ",".join(map(repr, vector.tolist())) + "]"


def write_items(session: Session, finished: list[tuple[Claimed, object, list[tuple[float, float]], np.ndarray]]) -> int:
    """Upsert the segments and pooled vectors of finished items and mark them done, in one statement.

    `finished` holds (item, audio info, window spans, window vectors) per item; all items of one
    call share a model (a task serves one). Returns the number of segment rows written."""
    if not finished:
        return 0
    models = {item.model_id for item, *_ in finished}
    if len(models) != 1:
        raise ValueError(f"one batch write serves one model, got {sorted(models)}")
    seg = dict(seg_item=[], seg_index=[], seg_start=[], seg_end=[], seg_vector=[])
    per_item = dict(item=[], library=[], windows=[], pooled=[], duration=[], sample_rate=[], channels=[], format=[],
                    warning=[])
    for item, info, item_spans, vectors in finished:
        for i, ((start, end), vec) in enumerate(zip(item_spans, vectors, strict=True)):
            seg["seg_item"].append(str(item.id))
            seg["seg_index"].append(i)
            seg["seg_start"].append(start)
            seg["seg_end"].append(end)
            seg["seg_vector"].append(_literal(vec))
        per_item["item"].append(str(item.id))
        per_item["library"].append(str(item.library_id))
        per_item["windows"].append(len(item_spans))
        per_item["pooled"].append(_literal(pooled(vectors)))
        per_item["duration"].append(info.duration_s)
        per_item["sample_rate"].append(info.sample_rate)
        per_item["channels"].append(info.channels)
        per_item["format"].append(info.format[:32])
        per_item["warning"].append(info.warning[:2000])
    row = session.execute(_WRITE_BATCH, dict(model=models.pop(), **seg, **per_item)).one()
    return row.segments
