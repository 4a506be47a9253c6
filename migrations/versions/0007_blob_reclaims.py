"""Stored files queued for removal, filled by a trigger on every deletion of items.

Until 0006 the API removed a deleted item's stored file right after its rows committed. A crash in
between, a library deleted while an upload committed into it (its items went by cascade), a tenant
deleted, or an upload whose rows never committed left files on disk that nothing would ever remove.
Now the digests of every deleted item are queued in `blob_reclaims` by a statement trigger, in the
deleting transaction itself, and `clapq.blobs.reclaim` (the API after a deletion, the maintenance loop
for what is left) removes each file once no item holds its bytes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("blob_reclaims",
                    sa.Column("sha256", sa.String(64), primary_key=True),
                    sa.Column("queued_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False))
    op.execute("""
        CREATE FUNCTION clapq_queue_blob_reclaims() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- clapq.blobs.BLOB_LOCK, shared until the deletion commits (as an upload holds it): a blob's
            -- removal (exclusive) never runs between this statement and its commit, so it never finds
            -- a queued digest held only by an item that is being deleted and drops it from the queue
            PERFORM pg_advisory_xact_lock_shared(7164208242806123618);
            INSERT INTO blob_reclaims (sha256) SELECT DISTINCT sha256 FROM gone ON CONFLICT DO NOTHING;
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER items_queue_blob_reclaims AFTER DELETE ON items REFERENCING OLD TABLE AS gone
        FOR EACH STATEMENT EXECUTE FUNCTION clapq_queue_blob_reclaims()""")


def downgrade() -> None:
    op.execute("DROP TRIGGER items_queue_blob_reclaims ON items")
    op.execute("DROP FUNCTION clapq_queue_blob_reclaims()")
    op.drop_table("blob_reclaims")
