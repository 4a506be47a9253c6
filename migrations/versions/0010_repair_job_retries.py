"""Databases whose 0009 ran before it held `jobs.retried_at` get the column.

Migration 0009 first landed with `items.progress` alone (28dba5c), and minutes later was changed to add
`jobs.retried_at` too, under the same revision. A database that ran the first version stood at 0009
without the column, so Alembic had nothing to do, and every job endpoint and upload answered 500
(helper-34). This adds the column where it is missing and does nothing elsewhere; a migration that has
landed is never changed again (tests/test_schema.py keeps their hashes).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    for table, column, kind in (("items", "progress", "double precision"),
                                ("jobs", "retried_at", "timestamp with time zone")):
        # looked up first: ADD COLUMN IF NOT EXISTS locks the table even where the column is there, and
        # waits behind every query running on it (helper-37)
        there = conn.execute(sa.text("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                                     "AND table_name = :t AND column_name = :c"), {"t": table, "c": column}).first()
        if there is None:
            op.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def downgrade() -> None:
    pass  # the columns are 0009's: its downgrade drops them
