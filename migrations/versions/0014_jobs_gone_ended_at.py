"""`jobs.gone_ended_at`: when the last of a job's files since deleted ended.

A job whose files were all deleted was listed `done` with counts of 0 and `finished_at` null, as if it had never
ended: its finish time was its files' `finished_at`, and they went with them (a queued file deleted never had one,
and its deletion ended the job). A deletion now records on each job it takes files (or copies) from the latest
of their ends, the time of the deletion for one not ended yet; NULL for deletions before this migration. A
nullable column without a default: instant.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("gone_ended_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "gone_ended_at")
