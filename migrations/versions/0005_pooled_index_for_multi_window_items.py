"""Index an item's pooled vector only where it differs from its one segment.

A clip of up to one window (10 s) has one segment, and its pooled vector is that segment's vector.
Both went into an HNSW index, and each HNSW insert costs Postgres 1.5-4.5 CPU-ms at 1k-40k clips
(pgvector re-links up to 2m neighbours): storing a 10 s clip cost 4.1-8.2 CPU-ms, half of it the
second index (benchmarks/write_path.py, BENCHMARKS.md). `embeddings.windows` now records the segment
count; the pooled-vector index holds items of two or more windows, and item-to-item searches find
one-window items through the segment index.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

HNSW = dict(postgresql_using="hnsw", postgresql_with={"m": 24, "ef_construction": 128},
            postgresql_ops={"vector": "vector_cosine_ops"})


def upgrade() -> None:
    op.add_column("embeddings", sa.Column("windows", sa.Integer(), server_default="1", nullable=False))
    op.execute("""
        UPDATE embeddings e SET windows = s.n
        FROM (SELECT item_id, model_id, count(*) AS n FROM segments GROUP BY item_id, model_id) s
        WHERE s.item_id = e.item_id AND s.model_id = e.model_id AND s.n > 1
    """)
    op.alter_column("embeddings", "windows", server_default=None)
    op.drop_index("ix_embeddings_vector_hnsw", table_name="embeddings")
    op.create_index("ix_embeddings_vector_hnsw", "embeddings", ["vector"], postgresql_where=sa.text("windows > 1"),
                    **HNSW)
    op.create_index("ix_embeddings_one_window", "embeddings", ["library_id", "model_id"],
                    postgresql_where=sa.text("windows = 1"))


def downgrade() -> None:
    op.drop_index("ix_embeddings_one_window", table_name="embeddings")
    op.drop_index("ix_embeddings_vector_hnsw", table_name="embeddings")
    op.create_index("ix_embeddings_vector_hnsw", "embeddings", ["vector"], **HNSW)
    op.drop_column("embeddings", "windows")
