"""`items.failed_in_file`: whether a failed file failed for a reason in its bytes.

A file that cannot be decoded (not audio, no audio in it, over the length limit, a decoder that hangs or
crashes on it) fails the same way each time its bytes are sent, and `clapq upload` of a folder run nightly sent
every such file again at every run: its bytes over HTTP, a decode (for a file that hangs its decoder, a worker's
decoder held CLAPQ_DECODE_TIMEOUT_S), and a failure told as new, exit 1 (helper-74). Its `error` text alone
does not tell it from a failure that was not the file's (a worker lost on it, attempts used up), which is worth
sending again. The worker records which it was here; NULL for failures before this migration, and for files
not failed (a retry clears it). A nullable column without a default: instant.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("failed_in_file", sa.Boolean(), nullable=True))


def downgrade() -> None:
    op.drop_column("items", "failed_in_file")
