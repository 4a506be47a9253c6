"""Real parts for every test: embedded Postgres+pgvector (Alembic-migrated), Redis, a Celery worker
process and a tiny random CLAP saved to disk and loaded through the production loader."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from clapq.db import dispose_engines, get_engine, migrate, session_scope
from clapq.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from clapq.keys import create_key
from clapq.settings import Settings
from tests.tinyclap import build_tiny_clap

ROOT = Path(__file__).resolve().parents[1]


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _ignored(signum, frame):
    pass


def pytest_configure(config):
    # `make test` stops a suite that runs past its limit with SIGTERM (`timeout`), as do CI runners and
    # users: made a KeyboardInterrupt, on which pytest tears the fixtures down, so their finalizers stop
    # every Postgres, Redis, worker and `clapq up` they started instead of leaving them running
    signal.signal(signal.SIGTERM, _interrupted)
    # a suite started with SIGINT or SIGHUP ignored (`nohup make test`, `make test &` from a script) passed that
    # on to every `clapq` it started, which then ran on through the Ctrl-C and the closed terminal its tests
    # send: a handler that does nothing keeps the suite running as asked, and is reset to the default at exec
    for sig in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, _ignored)
    # where `clapq upload` keeps the digests of the files it read (clapq.digests): the suite's own, not the
    # user's ~/.cache
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="clapq-test-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop("XDG_CACHE_HOME", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_clap(tmp_path_factory.mktemp("model") / "tiny-clap")


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """Postgres and Redis for the whole session, stopped in the finalizer."""
    base = tmp_path_factory.mktemp("services")
    os.chmod(base, 0o755)
    pg = EmbeddedPostgres(base / "pg")
    redis = EmbeddedRedis(base / "redis")
    try:
        db_url = pg.start()
        redis_url = redis.start()
        migrate(db_url)
        yield {"database_url": db_url, "redis_url": redis_url, "pg": pg, "redis": redis, "base": base}
    finally:
        dispose_engines()
        redis.stop()
        pg.stop()


def make_env(services, tiny_model, blob_dir: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAPQ_")}
    env.update(DATABASE_URL=services["database_url"], REDIS_URL=services["redis_url"],
               CLAPQ_MODEL=str(tiny_model), CLAPQ_BLOB_DIR=str(blob_dir), CLAPQ_DATA_DIR=str(blob_dir.parent),
               CLAPQ_BATCH_SIZE="4", CLAPQ_ITEMS_PER_TASK="4", CLAPQ_DECODE_TIMEOUT_S="10", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               # on a CPU without bf16, auto would compile the tower at every worker start (~4 s; 30 s the
               # first time): test_engine's compile tests cover it once
               CLAPQ_COMPILE="0",
               PYTHONPATH=str(ROOT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def env(services, tiny_model, tmp_path_factory) -> dict[str, str]:
    blob_dir = tmp_path_factory.mktemp("data") / "blobs"
    return make_env(services, tiny_model, blob_dir)


@pytest.fixture(scope="session")
def settings(env) -> Settings:
    return Settings.from_env(env)


class WorkerProcess:
    """`clapq worker` as a real child process with its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "WorkerProcess":
        self.log = open(self.log_path, "ab")
        start = self.log_path.stat().st_size
        self.proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "worker"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            if b" ready." in self.log_path.read_bytes()[start:]:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        finally:
            try:  # children of a SIGTERMed parent must not outlive the test either
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.log.close()
            self.proc = None


@pytest.fixture(scope="session")
def worker(env, tmp_path_factory):
    w = WorkerProcess(env, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        yield w.start()
    finally:
        w.stop()


@pytest.fixture(scope="session")
def serving_worker(worker, app):
    """The worker, once its model process says it serves the API's model (clapq.presence.serve): it loads the
    model after it is ready. Until then a job of that model waits, with no ETA (api.jobs.why_waiting)."""
    from clapq.presence import serving
    from clapq.queue import redis_client

    with app.app_context():
        from api.models_info import serving_model_id

        model = serving_model_id()
    deadline = time.monotonic() + 90
    while not serving(redis_client(app.extensions["clapq_celery"]), {model}):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not say it serves model {model}:\n{worker.output()[-3000:]}")
        time.sleep(0.2)
    return worker


@pytest.fixture(scope="session")
def app(settings):
    from api import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def new_key(settings):
    """A factory for fresh tenants: every test owns its rows, so tests never see each other's data."""

    def make(name: str | None = None) -> str:
        with session_scope(settings.database_url) as s:
            return create_key(s, name or f"tenant-{uuid.uuid4().hex[:12]}")

    return make


@pytest.fixture()
def start_api(env, tmp_path):
    """`clapq api` (gunicorn, two processes) on the suite's Postgres and Redis, at the rate limit given (and
    with any other settings given as environment variables); its URL."""
    procs = []

    def start(rate_limit: str = "0", open_files: int | None = None, **extra: str) -> str:
        """`open_files`: the soft limit of open files (`ulimit -n`) it starts with."""
        port = free_port()
        log = tmp_path / f"api{len(procs)}.log"

        def limit() -> None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        with open(log, "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "clapq.cli", "api"], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=limit if open_files else None,
                env={**env, "CLAPQ_HOST": "127.0.0.1", "CLAPQ_PORT": str(port), "CLAPQ_API_WORKERS": "2",
                     "CLAPQ_PRELOAD_TEXT": "0", "CLAPQ_RATE_LIMIT": rate_limit, **extra}))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert procs[-1].poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    return base
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow to answer on a busy machine
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def eio_library(tmp_path_factory) -> Path:
    """The LD_PRELOAD library that makes reads of chosen files fail with EIO (tests/eio.py)."""
    from tests import eio

    try:
        return eio.build(tmp_path_factory.mktemp("eio"))
    except eio.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root may mount one; elsewhere the test is skipped), unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_job(client, key: str, job_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).get_json()
        if job["status"] in ("done", "done_with_errors", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@contextlib.contextmanager
def just_before(database_url: str, matches: Callable[[str], bool], then: Callable[[], None]) -> Iterator[list]:
    """Within: `then()` once, just before the first statement this process sends to `database_url` whose text
    `matches` (another request committing at that very moment); yields the list that then holds that
    statement (empty: none was met). Marked first: `then`'s own statements pass through here too."""
    from sqlalchemy import event

    engine, met = get_engine(database_url), []

    def before(conn, cursor, statement, params, context, executemany):
        if not met and matches(statement):
            met.append(statement)
            then()

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield met
    finally:
        event.remove(engine, "before_cursor_execute", before)


def wait_for_a_lock_wait(engine, why: object = "no statement waited on a lock", timeout: float = 30.0,
                         waiting: int = 1) -> None:
    """Until a connection of this database waits on a lock (`waiting`: that many; the statement's text shows late).
    Each look is a transaction of its own: pg_stat_activity is read once a transaction, so a wait begun later went
    unseen."""
    from sqlalchemy import text

    deadline = time.monotonic() + timeout
    with engine.connect() as look:
        while look.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                               "AND datname = current_database()")) < waiting:
            assert time.monotonic() < deadline, why
            look.rollback()
            time.sleep(0.05)


def row_lockable(engine, item_id, mode: str = "UPDATE", table: str = "items") -> bool:
    """Whether another connection could lock the item's row (or the `table` row's of that id) in `mode` now
    (tried without waiting)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    with engine.connect() as probe:
        try:
            probe.execute(text(f"SELECT 1 FROM {table} WHERE id = :i FOR {mode} NOWAIT"), {"i": item_id})
            return True
        except OperationalError as exc:
            assert "could not obtain lock" in str(exc)
            return False
        finally:
            probe.rollback()


def job_of_own(s, model_name: str) -> tuple:
    """A tenant, a model of its own (512-d), a library of it and a job, made in session `s`, for tests that
    write rows as a worker does."""
    from clapq.models import EmbeddingModel, Job, Library, Tenant

    tenant = Tenant(name=f"{model_name}-{uuid.uuid4()}")
    model = EmbeddingModel(name=model_name, weights_sha256=uuid.uuid4().hex * 2, dim=512)
    s.add_all([tenant, model])
    s.flush()
    lib = Library(tenant_id=tenant.id, name="l", model_id=model.id)
    s.add(lib)
    s.flush()
    job = Job(tenant_id=tenant.id, library_id=lib.id)
    s.add(job)
    s.flush()
    return tenant, model, lib, job


def retire(database_url: str, lib_id: str) -> int:
    """As if library `lib_id` had been embedded by a model this service no longer runs (CLAPQ_MODEL changed): a
    model row of its own (named 'retired') holds the library and its vectors. Returns the model's id."""
    from sqlalchemy import text

    with session_scope(database_url) as s:
        other = s.execute(text("INSERT INTO models (name, weights_sha256, dim) VALUES ('retired', :w, 512) "
                               "RETURNING id"), {"w": uuid.uuid4().hex * 2}).scalar()
        for table in ("libraries", "embeddings", "segments"):
            col = "id" if table == "libraries" else "library_id"
            s.execute(text(f"UPDATE {table} SET model_id = :m WHERE {col} = :l"), {"m": other, "l": lib_id})
    return other


def queued_of_an_unserved_model(database_url: str, n: int) -> list:
    """`n` queued files, long silent, of a library bound to a model no worker runs (what a service whose
    CLAPQ_MODEL changed keeps of the old one); their blobs are never read."""
    from sqlalchemy import text

    from clapq.models import Item

    with session_scope(database_url) as s:
        tenant, _, lib, j = job_of_own(s, f"gone-{uuid.uuid4()}")
        items = [Item(tenant_id=tenant.id, library_id=lib.id, job_id=j.id, sha256=uuid.uuid4().hex * 2,
                      filename=f"old{i}.wav", size_bytes=1) for i in range(n)]
        s.add_all(items)
        s.flush()
        s.execute(text("UPDATE items SET updated_at = now() - interval '1 hour' WHERE job_id = :j"), {"j": j.id})
        return [i.id for i in items]
