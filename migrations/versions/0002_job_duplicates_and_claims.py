"""Jobs count re-uploaded files; items record which task claimed them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("duplicates", sa.Integer(), server_default="0", nullable=False))
    op.add_column("items", sa.Column("claimed_by", sa.String(length=64), nullable=True))
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_created", table_name="jobs")
    op.drop_column("items", "claimed_by")
    op.drop_column("jobs", "duplicates")
