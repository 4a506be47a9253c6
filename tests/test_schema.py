"""The Alembic-migrated schema is what the models declare, with pgvector's cosine HNSW indexes."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from clapq.db import get_engine
from clapq.models import Base


def test_migrations_match_models_and_index_vectors(services):
    engine = get_engine(services["database_url"])
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.scalar(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'"))
        defs = dict(conn.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE '%vector_hnsw'")).all())
    assert set(defs) == {"ix_embeddings_vector_hnsw", "ix_segments_vector_hnsw"}
    assert all("USING hnsw" in d and "vector_cosine_ops" in d for d in defs.values())
    # migration 0003's denser graphs (recall 0.98 instead of 0.956 at 1M: benchmarks/search_scale.md)
    assert all("m='24'" in d and "ef_construction='128'" in d for d in defs.values()), defs
    with engine.connect() as conn:
        gin = conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_items_metadata'"))
    assert "USING gin" in gin and "jsonb_path_ops" in gin
