"""The trigger of 0007 queues a deletion's digests in digest order.

Every upload now queues its digests in `blob_reclaims` (sorted) before it moves its files into
place. A deletion's trigger inserted them in whatever order `SELECT DISTINCT` produced (a hash), so an
upload and a deletion of items holding two of the same files could each wait for a row the other had
inserted: a deadlock, which Postgres ends after a second by failing one of them. In one order, one waits
for the other instead.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_FUNCTION = """
    CREATE OR REPLACE FUNCTION clapq_queue_blob_reclaims() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        -- clapq.blobs.BLOB_LOCK, shared until the deletion commits (as an upload holds it): a blob's
        -- removal (exclusive) never runs between this statement and its commit, so it never finds
        -- a queued digest held only by an item that is being deleted and drops it from the queue
        PERFORM pg_advisory_xact_lock_shared(7164208242806123618);
        INSERT INTO blob_reclaims (sha256) SELECT DISTINCT sha256 FROM gone {order} ON CONFLICT DO NOTHING;
        RETURN NULL;
    END $$"""


def upgrade() -> None:
    op.execute(_FUNCTION.format(order="ORDER BY sha256"))


def downgrade() -> None:
    op.execute(_FUNCTION.format(order=""))
