"""The Alembic-migrated schema is what the models declare, with pgvector's cosine HNSW indexes."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from clapq.blobs import BLOB_LOCK
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
    # migration 0005: a one-window item's pooled vector is its segment's, which the segment index holds
    assert defs["ix_embeddings_vector_hnsw"].endswith("WHERE (windows > 1)"), defs
    assert "WHERE" not in defs["ix_segments_vector_hnsw"]
    with engine.connect() as conn:
        gin = conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_items_metadata'"))
    assert "USING gin" in gin and "jsonb_path_ops" in gin
    # migration 0007: the trigger that queues deleted items' bytes holds the blob lock the code uses
    with engine.connect() as conn:
        body = conn.scalar(text("SELECT pg_get_functiondef('clapq_queue_blob_reclaims'::regproc)"))
    assert f"pg_advisory_xact_lock_shared({BLOB_LOCK})" in body
    # migration 0008: in digest order, as uploads queue and unqueue them (no deadlock between the two)
    assert "FROM gone ORDER BY sha256" in body, body


def test_migration_0005_counts_the_windows_of_stored_vectors(services):
    """Upgrading a database that already holds vectors records each pooled vector's window count (the
    segments it pools), so one-window items leave the pooled-vector index; downgrading puts them back."""
    import uuid

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    import migrations
    from clapq.db import normalise_url

    admin = create_engine(normalise_url(services["database_url"]), isolation_level="AUTOCOMMIT")
    name = f"mig_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(normalise_url(services["database_url"])).set(database=name)
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    try:
        command.upgrade(cfg, "0004")
        vec = "[" + ",".join(["0.5"] * 4 + ["0"] * 508) + "]"
        with engine.begin() as conn:
            tenant, lib, job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
            conn.execute(text("INSERT INTO tenants (id, name) VALUES (:t, 't')"), {"t": tenant})
            model = conn.scalar(text("INSERT INTO models (name, weights_sha256, dim) VALUES ('m', :h, 512) RETURNING id"),
                                {"h": "0" * 64})
            conn.execute(text("INSERT INTO libraries (id, tenant_id, name, model_id) VALUES (:l, :t, 'l', :m)"),
                         {"l": lib, "t": tenant, "m": model})
            conn.execute(text("INSERT INTO jobs (id, tenant_id, library_id, kind) VALUES (:j, :t, :l, 'upload')"),
                         {"j": job, "t": tenant, "l": lib})
            items = {uuid.uuid4(): n for n in (1, 3)}
            for item, n in items.items():
                conn.execute(text("INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, "
                                  "status) VALUES (:i, :t, :l, :j, :h, 'f', 1, 'done')"),
                             {"i": item, "t": tenant, "l": lib, "j": job, "h": item.hex * 2})
                conn.execute(text("INSERT INTO embeddings (item_id, model_id, library_id, vector) "
                                  "VALUES (:i, :m, :l, CAST(:v AS vector))"), {"i": item, "m": model, "l": lib, "v": vec})
                for w in range(n):
                    conn.execute(text("INSERT INTO segments (item_id, model_id, library_id, window_index, start_s, "
                                      "end_s, vector) VALUES (:i, :m, :l, :w, 0, 10, CAST(:v AS vector))"),
                                 {"i": item, "m": model, "l": lib, "w": w, "v": vec})
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            got = dict(conn.execute(text("SELECT item_id, windows FROM embeddings")).all())
            assert got == items
            assert "WHERE (windows > 1)" in conn.scalar(text(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_embeddings_vector_hnsw'"))
        command.downgrade(cfg, "0004")
        with engine.connect() as conn:
            assert "WHERE" not in conn.scalar(text(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_embeddings_vector_hnsw'"))
            assert conn.scalar(text("SELECT count(*) FROM embeddings")) == 2
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
