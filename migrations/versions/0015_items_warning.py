"""`items.warning`: what was said of a file embedded as far as it could be read.

A copy or download that stopped halfway keeps its header, which states the whole length: the decoder reads what
is there (FFmpeg up to the cut) and the file was embedded, `done`, its `duration_s` the only trace of the missing
part (helper-115: a 12 s FLAC stored as 5.9 s). The worker now records why here ("only 5.9 s of the 12.0 s its
header states could be read ..."), and a job lists its files with one (`warnings`), as it lists its failed ones;
NULL for every other file, and for files embedded before this migration. A nullable column without a default:
instant. The partial index finds a job's few such files without reading its others, at each poll of the job.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("warning", sa.Text(), nullable=True))
    op.create_index("ix_items_job_warned", "items", ["job_id", "created_at", "id"],
                    postgresql_where=sa.text("warning IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_items_job_warned", table_name="items")
    op.drop_column("items", "warning")
