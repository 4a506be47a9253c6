"""Liveness (/healthz, cheap) and readiness (/readyz: Postgres, Redis, a live worker, model) probes."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as NoAnswer
from typing import Callable

from flask import Blueprint, current_app
from sqlalchemy import select, text

import worker
from api.jobs import NO_WORKER, NO_WORKER_UP
from api.models_info import model_id_of
from clapq.checkpoint import ModelUnavailable, resolve, unchanged
from clapq.db import get_engine, session_scope
from clapq.models import EmbeddingModel
from clapq.presence import TTL_S, beat_alive, beat_failing, live_workers, served_models, serving
from clapq.queue import redis_client
from clapq.settings import Settings

bp = Blueprint("health", __name__)
log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0  # a probe that waits longer than this is itself stuck: the orchestrator's own timeout

# Each check runs in a thread and is waited for CHECK_TIMEOUT_S at most: a server that takes connections
# but never answers (stopped, or across a dead link) makes its check say so instead of hanging the probe.
# A check still waiting is not started again: its thread ends when the server answers or the connection
# fails, and until then the probe reports it as not answering.
# (Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, so
# one stuck on a stopped server would hold up the API process's shutdown.)
_pending: dict[tuple, Future] = {}
_lock = threading.Lock()


def _start(check: Callable[[], object]) -> Future:
    """`check()` in a daemon thread of its own; its answer (or exception) in the Future."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(check())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            fut.set_exception(exc)

    threading.Thread(target=run, name="readyz", daemon=True).start()
    return fut


def running(key: tuple, check: Callable[[], object]) -> Future:
    """The Future of the check under `key`: the one still waiting (on a server that does not answer), or a
    new one started now."""
    with _lock:
        fut = _pending.get(key)
        if fut is None or fut.done():
            fut = _pending[key] = _start(check)
        return fut


def _run(checks: dict[str, Callable[[], str]], where: tuple) -> dict[str, str]:
    """Each check's answer ("ok" or "error: ..."), all started at once and waited for together."""
    futures = {name: running((name, *where), check) for name, check in checks.items()}
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    out = {}
    for name, fut in futures.items():
        try:
            out[name] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except NoAnswer:
            out[name] = f"error: no answer in {CHECK_TIMEOUT_S:.0f} s"
        except Exception as exc:  # report, don't raise: this endpoint's job is to say what is down
            out[name] = f"error: {type(exc).__name__}"
    return out


def _once(ask: Callable[[], object]) -> Callable[[], object]:
    """`ask`, answered once, for the first of the threads that call it; the others wait for that answer (an
    exception is not kept: the next asks again). Two checks of one probe that need the same answer."""
    lock, answer = threading.Lock(), []

    def answered() -> object:
        with lock:
            if not answer:
                answer.append(ask())
            return answer[0]

    return answered


# an absolute path on this machine: a checkpoint's directory, the Hugging Face cache (not a hub id, "laion/..."),
# to a space; and what follows a path known to the server (_known_paths) to a space, but for a sentence's last stop
_PATH = re.compile(r"(?<![\w.~:-])/[^\s'\"`()]+")
_REST = r"[^\s'\"`()]*(?<![.,;:])"
_told: set[str] = set()


def _known_paths(settings: Settings) -> list[str]:
    """The paths this server is configured with, as a sentence may write them (given, with ~ expanded, resolved),
    longest first: each is hidden whole, spaces and all, where the pattern above stops at a space ("/tmp/my
    data/clap" was said as "<path> data/clap")."""
    given = [str(settings.data_dir), str(settings.blob_dir), str(settings.scratch_dir), tempfile.gettempdir(),
             os.path.expanduser("~")]
    given += [os.environ[k] for k in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")
              if os.environ.get(k)]
    if settings.model.startswith(("/", "~", ".")):  # a directory, not a hub id
        given.append(settings.model)
    known = set()
    for path in given:
        for form in (path, os.path.expanduser(path), os.path.realpath(os.path.expanduser(path))):
            # never "/" (or "~" unexpanded: the home of a user with none), nor a bare relative one (CLAPQ_DATA_DIR=data:
            # the word "data" anywhere in a sentence was hidden; its resolved form stands for it)
            if len(form.rstrip("/")) > 1 and form.startswith(("/", "~", ".")):
                known.add(form.rstrip("/"))
    return sorted(known, key=len, reverse=True)


def _unplaced(why: str, known: list[str] = ()) -> str:
    """A check's sentence as /readyz, which takes no key, says it: without the server's paths, which its log
    gives (once a sentence a process, as probes come every few seconds). The model's sentences named its
    checkpoint's directory to whoever asked. `known`: paths hidden whole first (_known_paths)."""
    shown = why
    for path in known:
        shown = re.sub(r"(?<![\w.~:/-])" + re.escape(path) + _REST, "<path>", shown)
    shown = _PATH.sub("<path>", shown)
    if shown != why:
        if why not in _told:
            _told.add(why)
            log.warning("/readyz: %s", why)
        shown += " (the API's log names the paths)"
    return shown


def _named(models: dict[int, int], url: str) -> str:
    """Models as "model 3 (laion/clap-htsat-unfused), model 5 (my-clap)": with their names where Postgres answers."""
    try:
        with session_scope(url) as s:
            names = dict(s.execute(select(EmbeddingModel.id, EmbeddingModel.name)
                                   .where(EmbeddingModel.id.in_(models))).all())
    except Exception:  # noqa: BLE001 - the ids say enough; the postgres check says why
        names = {}

    def shown(name: str) -> str:  # a checkpoint's directory by its last part: /readyz takes no key
        return os.path.basename(name.rstrip("/")) if name.startswith(("/", "~", ".")) else name

    return ", ".join(f"model {m}" + (f" ({shown(names[m])})" if m in names else "") for m in sorted(models))


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    settings = current_app.config["CLAPQ"]
    celery = current_app.extensions["clapq_celery"]

    def postgres() -> str:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"

    def redis() -> str:
        redis_client(celery).ping()
        return "ok"

    @_once
    def served() -> tuple[int, object, bool]:  # asked by workers and embedding: one look a probe
        model_id, client = model_id_of(settings), redis_client(celery)
        return model_id, client, serving(client, {model_id})

    def workers() -> str:  # a warning, as embedding's is: search and uploads go on without one (a stopped
        # worker took the API out of service, while a stopped model process left it ready, helper-54)
        # Ready to have uploads embedded is a live worker of this API's model: it said ok where the only one alive
        # served another (another CLAPQ_MODEL), and every upload waited queued (helper-142)
        model_id, client, ok = served()
        if ok:
            return "ok"
        if not (live := live_workers(celery, client)):
            return "warning: " + (NO_WORKER_UP if settings.under_up else NO_WORKER).replace("the files", "uploads")
        one = live == 1
        alive = ("the only live worker does not serve" if one else f"none of the {live} live workers serves") + \
            f" this service's model (model {model_id})"
        if others := served_models(client):
            return (f"warning: {alive}: {'it serves' if one else 'they serve'} {_named(others, settings.database_url)}"
                    f"{'' if one else ' only'} (a CLAPQ_MODEL not the API's){'' if one else ', or still load theirs'}; "
                    f"uploads wait queued until a worker of model {model_id} runs")
        return (f"warning: {alive} yet: {'it is' if one else 'they are'} still loading a model, hung, or of another "
                "CLAPQ_MODEL (see the worker's log); uploads wait queued until one serves it")

    def model() -> str:
        try:
            unchanged(resolve(settings.model))
        except ModelUnavailable as exc:
            return f"error: {_unplaced(str(exc), _known_paths(settings))}"
        return "ok"

    def maintenance() -> str:
        client = redis_client(celery)
        if beat_alive(celery, client):
            return "ok"
        if failing := beat_failing(client):  # it runs: "start `clapq beat`" sent the operator to start another
            return (f"warning: the maintenance loop (`clapq beat`) runs, but its passes have failed for "
                    f"{failing[0]:.0f} s ({failing[1]}): files a dead worker left, or whose task Redis did not take, "
                    "are not sent again until one goes through")
        return "warning: the maintenance loop made no pass lately (start `clapq beat`)"

    def embedding() -> str:  # workers of another CLAPQ_MODEL than the API's leave every upload queued
        model_id, _, ok = served()
        if ok:
            return "ok"
        return (f"warning: no process holding this service's model (model {model_id}) has said so for "
                f"{TTL_S} s: a worker still loading it, one that hangs, or workers whose CLAPQ_MODEL is not the "
                "API's; uploads wait queued until one does")

    def code() -> str:  # upgraded in place under it: it runs the old code, and loads none of the new
        if worker.code_on_disk() == worker.CODE:
            return "ok"
        return ("warning: clapq's code changed on disk since this API process started (upgraded in place?): it runs "
                "the old code, and a request that needs what it has not loaded yet (a search clip's decoder, a model "
                "not loaded yet) answers 503 code_changed; restart it")

    checks = _run({"postgres": postgres, "redis": redis, "workers": workers, "model": model,
                   "maintenance": maintenance, "embedding": embedding, "code": code},
                  (settings.database_url, settings.redis_url, str(settings.model)))
    # these are said, but not a reason to take the API out of service: it searches without them
    # (nor is old code: it loads none of the new, so it answers every request as before or a clear 503 code_changed;
    # an upgrade in place changes the disk under every API process of a machine at once, and a load balancer told
    # not_ready would drain them all, each still serving, until restarted)
    ready = all(v == "ok" for k, v in checks.items() if k not in ("workers", "maintenance", "embedding", "code"))
    return {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503
