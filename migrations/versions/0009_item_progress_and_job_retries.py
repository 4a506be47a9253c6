"""A running item's share of windows embedded, so a long file's job shows progress before it ends;
when a job was last retried, so its ETA counts the retry's pace.

A job's progress counts the bytes of finished files; one 3-hour recording stayed at 0 until its last
window (about two minutes with the full model on a 2-core CPU). The worker's heartbeat now records
each running item's share of windows embedded, and a job counts that share of the item's bytes.
A job retried a day after it ran took its ETA from the whole day; now from the retry on.
Two new nullable columns: no table rewrite, no lock beyond the moment of each ALTER.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("progress", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("retried_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "retried_at")
    op.drop_column("items", "progress")
