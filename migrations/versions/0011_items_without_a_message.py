"""An index of the queued files that no message holds, which `clapq beat` sends at each pass.

Files the API committed while Redis did not take their tasks, and files left for a worker of their
library's model when none ran, are marked in `items.claimed_by` (clapq.models.NO_MESSAGE); the sweeper
looks for them every CLAPQ_SWEEP_INTERVAL_S. Through `ix_items_pending` that read every queued row, a
whole backlog (CLAPQ_MAX_PENDING, 200,000 by default) each pass (helper-46). This partial index holds
only queued rows with a `claimed_by`: the marked ones and the few a worker handed back.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_items_no_message", "items", ["claimed_by"], unique=False,
                    postgresql_where="status = 'queued' AND claimed_by IS NOT NULL")


def downgrade() -> None:
    op.drop_index("ix_items_no_message", table_name="items")
