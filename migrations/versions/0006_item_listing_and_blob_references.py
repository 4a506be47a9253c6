"""Indexes for deleting items and listing a library's items.

Deleting an item (or a library) removes its file from the blob store only when no other item, in any
library of any tenant, holds the same bytes: that check looks items up by sha256 alone, which the
(library_id, sha256) unique index cannot serve. Listing a library's items pages them by
(created_at, id) within the library.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_items_sha256", "items", ["sha256"])
    op.create_index("ix_items_library_created", "items", ["library_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_items_library_created", table_name="items")
    op.drop_index("ix_items_sha256", table_name="items")
