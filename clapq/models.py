"""Database tables: tenants, API keys, models, libraries, jobs, items, embeddings, segments, and the
stored files queued for removal."""

from __future__ import annotations

import datetime as dt
import uuid

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Every LAION CLAP checkpoint projects to 512 dimensions; a fixed width lets
# pgvector build HNSW indexes on the column directly.
VECTOR_DIM = 512

ITEM_STATES = ("queued", "running", "done", "failed", "cancelled")


def _uuid() -> uuid.UUID:
    return uuid.uuid4()


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # sha256 of the key; the key itself is shown once and never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class EmbeddingModel(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "weights_sha256"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(500))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Library(Base):
    __tablename__ = "libraries"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_tenant_created", "tenant_id", "created_at"),)
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    library_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("libraries.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="upload")
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # files of this batch whose bytes were already in the library (or twice in it): not embedded again;
    # which item each is a copy of is in job_duplicates (since migration 0004)
    duplicates: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # its last retry: the ETA counts the pace from then on (migration 0009)
    retried_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # the latest end of its files (and copies) since deleted, their deletion where they had not ended: when a job
    # all of whose files went finished (api.removal, migration 0014)
    gone_ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class JobDuplicate(Base):
    """Files of a job's batch that are copies of an item (of an earlier job, or of this one): the job
    reports that item's state for them, so a copy of a file still queued is not 'done'."""

    __tablename__ = "job_duplicates"
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True,
                                               index=True)
    copies: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        # same bytes uploaded twice into one library give one item
        UniqueConstraint("library_id", "sha256"),
        CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="ck_items_status"),
        Index("ix_items_job_status", "job_id", "status"),
        Index("ix_items_pending", "status", "updated_at", postgresql_where="status IN ('queued', 'running')"),
        # queued files that no message holds, which the sweeper sends at each pass (NO_MESSAGE, migration 0011)
        Index("ix_items_no_message", "claimed_by", postgresql_where="status = 'queued' AND claimed_by IS NOT NULL"),
        # a tenant's files waiting, counted (bounded) to pick an upload's queue lane (api/db.py, migration 0012)
        Index("ix_items_tenant_waiting", "tenant_id", postgresql_include=["claimed_by"],
              postgresql_where="status IN ('queued', 'running')"),
        # metadata filters (`@>`) find their items without a table scan
        Index("ix_items_metadata", "metadata", postgresql_using="gin", postgresql_ops={"metadata": "jsonb_path_ops"}),
        # whether any item still holds a blob's bytes, when one is deleted (migration 0006)
        Index("ix_items_sha256", "sha256"),
        # a library's items, paged
        Index("ix_items_library_created", "library_id", "created_at", "id"),
        # a job's files with a warning, listed at each poll of the job (migration 0015)
        Index("ix_items_job_warned", "job_id", "created_at", "id", postgresql_where="warning IS NOT NULL"),
    )
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=_uuid)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    library_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("libraries.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict] = mapped_column("metadata", JSONB, default=dict, server_default="{}")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    # a failed file's `error` is in its bytes (not decodable, no audio, too long, a decoder that hangs or crashes
    # on it): the same bytes would fail again, so `clapq upload` does not send them again unasked. False or NULL:
    # the worker's fault, or not known (workers lost, attempts used up; failures before migration 0013)
    failed_in_file: Mapped[bool | None] = mapped_column(Boolean)
    # of a file embedded as far as it could be read: why (cut short: worker.audio.cut_short; migration 0015)
    warning: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the Celery task that holds the item; a redelivery of that same task may take it back at once
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    duration_s: Mapped[float | None] = mapped_column(Float)
    sample_rate: Mapped[int | None] = mapped_column(Integer)
    channels: Mapped[int | None] = mapped_column(Integer)
    audio_format: Mapped[str | None] = mapped_column(String(32))
    # while running: the share of its windows embedded, as of the worker's last heartbeat (migration 0009)
    progress: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


# claimed_by of a queued file that no message holds, so that the sweeper (`clapq beat`) sends it at its next pass,
# whatever the queue holds, instead of once it has been silent CLAPQ_STALE_AFTER_S with the queue empty (which
# steady uploads may never leave): left for a worker of its library's model when none ran (sent once one serves
# it, clapq.presence), or committed by the API while Redis did not take its task
WAITING_FOR_MODEL = "waiting for a worker of its model"
NOT_SENT = "not sent: Redis did not take its task"
NO_MESSAGE = (WAITING_FOR_MODEL, NOT_SENT)
# claimed_by of a queued file whose task went in the queue's bulk lane (clapq.queue.first_lane_room): while one of a
# tenant's files is so marked, its next files go in the bulk lane too, behind it. A message holds it (not one of
# NO_MESSAGE), and a worker's claim replaces the mark, in the same UPDATE that takes the file
IN_BULK_LANE = "its task went in the bulk lane"


def park(session, ids: list, mark: str) -> None:
    """These queued files have no message (`mark`, one of NO_MESSAGE): the sweeper sends them."""
    from sqlalchemy import update

    session.execute(update(Item).where(Item.id.in_(ids), Item.status == "queued").values(claimed_by=mark))


def requeued(job_id: uuid.UUID) -> dict:
    """An item's columns when a user sends it again, into `job_id` (a job's retry, or an upload of the
    same bytes after it failed): fresh attempts, nothing left of the tries before."""
    return dict(job_id=job_id, status="queued", attempts=0, error=None, failed_in_file=None, warning=None,
                finished_at=None, claimed_by=None, progress=None, updated_at=func.now())


# Denser than pgvector's defaults (16 / 64): recall@10 0.98 instead of 0.956 at 1M segments for
# the same index size and ~1.8x the build time (benchmarks/search_scale.md, migration 0003).
HNSW_OPTIONS = {"m": 24, "ef_construction": 128}


def _hnsw_cosine(name: str, where=None) -> Index:
    """HNSW with the cosine operator class: the same operator search orders by."""
    return Index(name, "vector", postgresql_using="hnsw", postgresql_with=HNSW_OPTIONS,
                 postgresql_ops={"vector": "vector_cosine_ops"}, postgresql_where=where)


class _VectorRow:
    """Columns every stored vector has: its item, library and the model that made it."""

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    item_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    library_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("libraries.id", ondelete="CASCADE"), index=True)
    vector = mapped_column(Vector(VECTOR_DIM), nullable=False)


class Embedding(_VectorRow, Base):
    """The item's pooled vector: the L2-normalised mean of its segments.

    An item of one window has one segment with the same vector, which the segment index already
    holds: only items of more windows are in this table's index, and each HNSW insert saved is
    1.5-4.5 CPU-ms of Postgres (migration 0005). Item-to-item search (`api.search.nearest_pooled`)
    reads both indexes."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("item_id", "model_id"),
                      _hnsw_cosine("ix_embeddings_vector_hnsw", where=text("windows > 1")),
                      Index("ix_embeddings_one_window", "library_id", "model_id", postgresql_where=text("windows = 1")))
    windows: Mapped[int] = mapped_column(Integer)  # segments the vector pools


class Segment(_VectorRow, Base):
    """One embedded window of an item."""

    __tablename__ = "segments"
    # a re-run overwrites rather than duplicates
    __table_args__ = (UniqueConstraint("item_id", "model_id", "window_index"),
                      _hnsw_cosine("ix_segments_vector_hnsw"))
    window_index: Mapped[int] = mapped_column(Integer)
    start_s: Mapped[float] = mapped_column(Float)
    end_s: Mapped[float] = mapped_column(Float)


class BlobReclaim(Base):
    """Bytes whose item was deleted: their stored file goes once no item holds them (clapq.blobs.reclaim).

    A trigger on items (migration 0007) adds the digests of every deleted item, in the deleting
    statement's transaction, whatever deleted it: the API, a library's or tenant's cascade, SQL by hand.
    An upload adds its blobs before it moves them into place, and the commit of its rows removes them
    again, so an upload whose rows never commit (its API process killed meanwhile) leaves them here. So a crash or a race
    between a deletion's commit and its unlink leaves a row here, which the maintenance loop finishes,
    never a file that nothing will ever remove."""

    __tablename__ = "blob_reclaims"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    queued_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


def lock_in_id_order(session, where) -> list[uuid.UUID]:
    """Lock the items `where` selects in id order (FOR NO KEY UPDATE, as an UPDATE takes, not FOR UPDATE) and
    return their ids, to which the caller's UPDATE keeps. Every writer of many items locks them so: a deletion
    (api.removal), a job's cancel and retry, a worker's vector write, heartbeat and hand-back. An UPDATE alone
    took them in its scan's order, and two writers could each hold a row the other waited on: a deadlock, a
    503 or a retried task (helper-60, helper-61)."""
    return list(session.scalars(select(Item.id).where(where).order_by(Item.id).with_for_update(key_share=True)))


def update_locked(session, where, values: dict) -> list[uuid.UUID]:
    """UPDATE the items `where` selects, their rows locked first (lock_in_id_order): only the rows locked are
    changed, as one that came to match between the lock and the UPDATE would be taken unlocked, out of id order
    (helper-60). Returns their ids."""
    locked = lock_in_id_order(session, where)
    if not locked:
        return []
    return list(session.scalars(update(Item).where(Item.id.in_(locked), where).values(**values).returning(Item.id)))
