"""The Alembic-migrated schema is what the models declare, with pgvector's cosine HNSW indexes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

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
    # migration 0011: the sweeper's files with no message, without reading the whole backlog
    with engine.connect() as conn:
        marked = conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_items_no_message'"))
    assert marked.endswith("WHERE (((status)::text = 'queued'::text) AND (claimed_by IS NOT NULL))"), marked
    # migration 0012: a tenant's files waiting, counted to pick an upload's queue lane, without a table scan
    with engine.connect() as conn:
        lane = conn.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_items_tenant_waiting'"))
    assert "(tenant_id) INCLUDE (claimed_by) WHERE" in lane and "'queued'" in lane and "'running'" in lane, lane


@pytest.fixture()
def scratch(services):
    """A database of its own in the tests' Postgres, dropped after: (url, Alembic config, engine)."""
    import uuid

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
        yield url.render_as_string(hide_password=False), cfg, engine
    finally:
        engine.dispose()
        get_engine(url.render_as_string(hide_password=False)).dispose()  # clapq.db.migrate's pooled connections
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def test_migration_0005_counts_the_windows_of_stored_vectors(scratch):
    """Upgrading a database that already holds vectors records each pooled vector's window count (the
    segments it pools), so one-window items leave the pooled-vector index; downgrading puts them back."""
    import uuid

    from alembic import command

    _, cfg, engine = scratch
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


def test_a_migration_waiting_for_a_table_lets_its_queries_run(scratch, capfd):
    """A migration's ALTER TABLE waits for every open transaction on its table (a long query, a backup's pg_dump),
    and every query on that table queued behind it meanwhile: run beside a serving API (compose's `migrate`), it
    held uploads and job pages for as long (helper-105). clapq's migrate now waits for a lock a few seconds at a
    time and tries again, so a query on the table runs while it waits; it ends once the table is let go."""
    import threading

    from alembic import command

    from clapq.db import migrate

    url, cfg, engine = scratch
    command.upgrade(cfg, "0013")  # 0014 alters jobs
    blocker = engine.connect()
    blocker.execute(text("SELECT 1 FROM jobs LIMIT 1"))  # an open transaction holding jobs (ACCESS SHARE)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            migrate(url)
        except BaseException as exc:  # noqa: BLE001 - said by the test
            failed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        with engine.connect() as look:  # the migration waits for jobs' lock
            for _ in range(600):
                if look.scalar(text("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                                    "WHERE c.relname = 'jobs' AND NOT l.granted")):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"the migration never waited for jobs: {failed}")
        with engine.connect() as query:  # a query of the service's, meanwhile: before, it queued behind the ALTER
            query.execute(text("SET statement_timeout = '60s'"))
            assert query.scalar(text("SELECT count(*) FROM jobs")) == 0
        assert t.is_alive() and not failed, failed  # still waiting: the blocker holds jobs
    finally:
        blocker.rollback()
        blocker.close()
    t.join(120)
    assert not t.is_alive() and not failed, failed
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == HEAD
    assert "waits for other sessions to let go of a table" in capfd.readouterr().err


def test_a_database_whose_0009_lacked_job_retries_is_repaired(scratch):
    """Migration 0009 first landed with items.progress alone (28dba5c) and was changed minutes later to add
    jobs.retried_at under the same revision: a database that ran the first version stood at 0009 without
    the column, and every job endpoint and upload answered 500 (helper-34). 0010 adds it."""
    from alembic import command

    from clapq.db import migrate

    url, cfg, engine = scratch
    command.upgrade(cfg, "0009")
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN retried_at"))
    migrate(url)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == HEAD
        conn.execute(text("SELECT retried_at, progress FROM jobs, items LIMIT 0"))


def test_clapq_migrate_needs_only_the_database(scratch):
    """`clapq migrate` touches Postgres alone: run by hand (README, Upgrading) with DATABASE_URL set, it was
    refused for want of a REDIS_URL it never used (helper-63)."""
    import subprocess
    import sys

    url, _, engine = scratch
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    r = subprocess.run([sys.executable, "-m", "clapq.cli", "migrate"], env={**env, "DATABASE_URL": url},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip().endswith(f"schema created, at revision {HEAD}"), r.stderr[-3000:]
    with engine.begin() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == HEAD


def test_clapq_migrate_says_the_revisions_before_and_after(scratch):
    """`clapq migrate` said "migrations applied" on a database at the newest revision as on one two behind it: a
    deploy script's log told nothing of what it did (helper-119). It says the revision before and after."""
    import subprocess
    import sys

    from alembic import command

    url, cfg, engine = scratch
    env = {**os.environ, "DATABASE_URL": url}

    def clapq_migrate() -> str:
        r = subprocess.run([sys.executable, "-m", "clapq.cli", "migrate"], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout == "", r.stderr[-3000:]
        return r.stderr

    command.upgrade(cfg, "0013")
    assert clapq_migrate() == f"schema migrated from revision 0013 to {HEAD}\n"
    assert clapq_migrate() == f"schema already at revision {HEAD}, this clapq's newest: nothing to apply\n"
    with engine.begin() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == HEAD


def test_a_schema_this_version_cannot_read_is_a_sentence_and_is_left_as_it_is(scratch):
    """A database a newer clapq migrated, and one whose schema lacks a column this version reads though its
    revision is the newest (a migration changed after it ran): `clapq migrate` (and so `clapq up`) stops
    with a sentence, where a newer revision was a 74-line Alembic traceback and a missing column a 500 on
    every request that read it (helper-34), and changes nothing."""
    import subprocess
    import sys

    from clapq.db import migrate

    url, _, engine = scratch
    migrate(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": "redis://127.0.0.1:1/0"}
    r = subprocess.run([sys.executable, "-m", "clapq.cli", "migrate"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"clapq: the database was migrated by a newer clapq (schema revision 0099; this version knows up to {HEAD}); "
        f"nothing was changed: run that newer version, or first downgrade the schema with it (alembic downgrade "
        f"{HEAD})"), r.stderr
    with engine.begin() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == "0099"
        conn.execute(text(f"UPDATE alembic_version SET version_num = '{HEAD}'"))
        conn.execute(text("ALTER TABLE items DROP COLUMN progress"))
    with pytest.raises(RuntimeError, match=r"^the database's schema is not the one this clapq reads \(.*progress"):
        migrate(url)


def test_the_services_processes_stop_on_a_schema_older_than_theirs(scratch, env):
    """`clapq api`, `worker` and `beat` started on a database one migration behind them (the new code started
    before `clapq migrate`: by hand after an upgrade in place, a machine of a rolling upgrade brought up first)
    ran: the API answered 500 to every job's page and the workers' tasks failed on the column they lacked, while
    /readyz said ready (helper-117). Each stops at once with a sentence saying to migrate, and so on a database
    with no clapq tables. A newer clapq's schema is served (an earlier version's workers during a rolling
    upgrade), and so is a database that does not answer (the process waits for it, as before)."""
    import subprocess
    import sys

    from alembic import command

    from clapq.db import _migrations, not_migrated
    from clapq.embedded import free_port

    url, cfg, engine = scratch
    # a Redis database no test's worker reads: a worker started here took no other test's task
    run_env = {**env, "DATABASE_URL": url, "REDIS_URL": env["REDIS_URL"].rsplit("/", 1)[0] + "/13",
               "CLAPQ_PORT": str(free_port())}

    def refusals() -> list:
        out = []
        for role in ("api", "worker", "beat"):
            r = subprocess.run([sys.executable, "-m", "clapq.cli", role], env=run_env, capture_output=True,
                               text=True, timeout=60)
            out.append((role, r.returncode, r.stderr.strip()))
        return out

    assert refusals() == [(role, 1, "clapq: the database holds no clapq tables: it is not the service's database "
                           "(DATABASE_URL), or no `clapq migrate` has run on it") for role in ("api", "worker", "beat")]
    before = _migrations()[1].get_revision(HEAD).down_revision
    command.upgrade(cfg, before)
    assert refusals() == [(role, 1, f"clapq: the database's schema is at revision {before}, older than this clapq's "
                           f"({HEAD}): run `clapq migrate` with this version first (README, Upgrading)")
                          for role in ("api", "worker", "beat")]
    with engine.begin() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == before  # nothing changed
    command.upgrade(cfg, "head")
    assert not_migrated(url) is None
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    assert not_migrated(url) is None
    assert not_migrated("postgresql://clapq@127.0.0.1:1/clapq") is None


def test_keys_on_an_older_schema_stop_or_say_they_migrated(scratch, env, tmp_path):
    """`clapq keys list` (create, revoke) migrated the database it was given, unsaid: run with a new version's
    CLI against DATABASE_URL, it moved the schema under the services of the older one (a migration may block writes
    for minutes), where `clapq api` stops and says to run `clapq migrate` (helper-119). On DATABASE_URL a key's
    command now stops as the API does and changes nothing; a newer clapq's schema is served (an earlier version's
    CLI during a rolling upgrade). A data directory's embedded database, which no `clapq migrate` reaches, is
    migrated as `clapq up` would at its start, and that is said."""
    import subprocess
    import sys

    from alembic import command
    from alembic.config import Config

    import migrations
    from clapq.db import _migrations, normalise_url
    from clapq.embedded import EmbeddedPostgres

    url, cfg, engine = scratch
    run_env = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "CLAPQ_DATA_DIR")}

    def keys(*cmd, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clapq.cli", "keys", *cmd], env={**run_env, **extra},
                              capture_output=True, text=True, timeout=120)

    def revision() -> str:
        with engine.connect() as conn:
            return conn.scalar(text("SELECT version_num FROM alembic_version"))

    before = _migrations()[1].get_revision(HEAD).down_revision
    blank = keys("create", "--tenant", "t", DATABASE_URL=url)
    assert blank.returncode == 1 and blank.stdout == "" and "holds no clapq tables" in blank.stderr, blank.stderr
    command.upgrade(cfg, before)
    for cmd in (("list",), ("create", "--tenant", "t"), ("revoke", "cq_abcdefgh")):
        out = keys(*cmd, DATABASE_URL=url)
        assert (out.returncode, out.stdout, out.stderr) == (
            1, "", f"clapq: the database's schema is at revision {before}, older than this clapq's ({HEAD}): run "
                   "`clapq migrate` with this version first (README, Upgrading)\n"), cmd
        assert revision() == before
    command.upgrade(cfg, "head")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    out = keys("create", "--tenant", "t", DATABASE_URL=url)
    # stderr says the tenant (clapq.keys.create_key_said), and nothing of the schema
    assert out.returncode == 0 and out.stdout.startswith("cq_") and out.stderr.startswith("clapq: new tenant 't'") \
        and "schema" not in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert revision() == "0099"

    data = tmp_path / "data"
    data.mkdir()
    os.chmod(tmp_path, 0o755)
    pg = EmbeddedPostgres(data / "pg")
    try:
        old = Config()
        old.set_main_option("script_location", str(Path(migrations.__file__).parent))
        old.set_main_option("sqlalchemy.url", normalise_url(pg.start()).replace("%", "%%"))
        command.upgrade(old, before)
    finally:
        pg.stop()
    out = keys("create", "--tenant", "t", "--data-dir", str(data))
    assert out.returncode == 0 and out.stdout.startswith("cq_"), out.stderr
    assert out.stderr.startswith(f"clapq: the database of {data}: schema migrated from revision {before} to {HEAD} "
                                 "(as `clapq up` does at its start)\nclapq: new tenant 't'"), out.stderr
    out = keys("list", "--data-dir", str(data))
    assert out.returncode == 0 and out.stderr == "" and out.stdout.count("active") == 1, out


# Every migration on main, by the start of its file's sha256. Once a migration has landed, databases have
# run it, and a change to it never reaches them (0009 was changed minutes after it landed: helper-34). A
# fix is a new migration; a new one is added here as it lands.
LANDED = {
    "0001_initial_schema.py": "7882134b819b92ba",
    "0002_job_duplicates_and_claims.py": "c41dc210b4588930",
    "0003_denser_hnsw_and_metadata_gin.py": "89c5e68232ea5c88",
    "0004_job_duplicate_items.py": "6956e2961573a5c5",
    "0005_pooled_index_for_multi_window_items.py": "c23c738cdb7ae8d5",
    "0006_item_listing_and_blob_references.py": "7d3be8bf5b4e5e8f",
    "0007_blob_reclaims.py": "a516255d50b51410",
    "0008_blob_reclaims_in_digest_order.py": "69330c370e1b587c",
    "0009_item_progress_and_job_retries.py": "096052bb3fc84595",
    "0010_repair_job_retries.py": "6df2aba096fe4ade",
    "0011_items_without_a_message.py": "bcb3623eab3c8b63",
    "0012_tenant_waiting_index.py": "fc83a84af1df56f3",
    "0013_items_failed_in_file.py": "1d65bfda867aa9f6",
    "0014_jobs_gone_ended_at.py": "70701017b587ae7f",
    "0015_items_warning.py": "eb848585021ea396",
}
HEAD = "0015"


def test_landed_migrations_are_never_changed():
    import hashlib

    import migrations

    files = sorted((Path(migrations.__file__).parent / "versions").glob("[0-9]*.py"))
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files} == LANDED
    assert max(LANDED).startswith(HEAD)


def test_migrations_started_together_on_a_new_database_all_succeed(scratch):
    """Three `clapq migrate` at once on an empty database (compose's `migrate` beside `clapq keys create`,
    two machines started together): one failed with a duplicate key in pg_type in 3 runs of 4, and stopped
    the services waiting on it (helper-41). They take turns now, and each ends at the head."""
    import subprocess
    import sys

    url, _, engine = scratch
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; from clapq.db import migrate; migrate(sys.argv[1])",
                               url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0, 0], results
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == HEAD


def test_migrate_against_a_server_that_never_answers_gives_up():
    """A Postgres address that takes connections and never answers (a stopped server, a dead link): the
    lock's own connection waited forever, where migrate gave up within the connect timeout, and so did
    the services waiting on it (helper-44)."""
    import socket
    import threading

    from sqlalchemy.exc import OperationalError

    from clapq.db import CONNECT_TIMEOUT_S, migrate

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    out: list = []

    def run() -> None:
        try:
            migrate(f"postgresql://clapq@127.0.0.1:{silent.getsockname()[1]}/clapq")
        except Exception as exc:
            out.append(exc)

    try:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(CONNECT_TIMEOUT_S * 3)
        assert out and isinstance(out[0], OperationalError), out or "migrate still waits"
    finally:
        silent.close()
