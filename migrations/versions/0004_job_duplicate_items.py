"""Which item each re-uploaded file of a job is a copy of, so the job reports that item's state.

Before, a job counted its copies as done at once: a copy of a file another job still had queued made
its job 'done' while the file was not searchable, and kept it 'done' if that file then failed or was
cancelled. Jobs made before this migration keep counting their copies as done.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_duplicates",
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("item_id", sa.Uuid(), sa.ForeignKey("items.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("copies", sa.Integer(), server_default="1", nullable=False),
    )
    op.create_index("ix_job_duplicates_item_id", "job_duplicates", ["item_id"])


def downgrade() -> None:
    op.drop_index("ix_job_duplicates_item_id", table_name="job_duplicates")
    op.drop_table("job_duplicates")
