"""An index of each tenant's files waiting, which picks the queue lane of every upload's tasks.

api/db.py send_committed counts the caller's queued and running files, up to FAST_LANE_TASKS tasks'
worth. With only `ix_items_tenant_id` and `ix_items_pending`, the planner read a LIMITed count by a
sequential scan of the whole table, or by every item the tenant ever had, whenever the tenant had fewer
files waiting than the limit (the common case: a tenant uploading a few files): 14 ms at 210,000 items,
260 ms at 2.3 million (helper-49). This partial index holds only waiting rows, and carries `claimed_by`
so that the files parked for a worker of another model are left out of the count without reading the table.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_items_tenant_waiting", "items", ["tenant_id"], unique=False,
                    postgresql_include=["claimed_by"], postgresql_where="status IN ('queued', 'running')")


def downgrade() -> None:
    op.drop_index("ix_items_tenant_waiting", table_name="items")
