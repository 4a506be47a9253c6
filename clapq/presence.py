"""Live-worker keys in Redis (with a TTL), so /readyz can tell that someone will do the work."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from redis.exceptions import RedisError

from clapq.queue import redis_client

log = logging.getLogger(__name__)

PREFIX = "clapq:workers:"
TTL_S = 30
_stop = threading.Event()
_state: dict = {}


def _key(hostname: str) -> str:
    return f"{PREFIX}{hostname}:{os.getpid()}"


def _keep(step, interval_s: float, name: str, stop: threading.Event, meaning: str) -> None:
    """Run `step` now and every `interval_s` in a daemon thread, until `stop` is set; a Redis that is away
    lets the key expire, which is what it then says. Its failing is said once, in a line, and its answering again
    once: each failed step was a warning with a traceback, "presence update failed" and "serving update failed",
    two every 10 s for each worker process for as long as Redis was down, which said neither what failed nor what
    it meant (helper-136: a 30 s Redis outage, 6 tracebacks a worker among Celery's own reconnection lines)."""
    def loop() -> None:
        failing = False
        while True:
            try:
                step()
                if failing:
                    failing = False
                    log.info(f"Redis answers again: this worker process tells it {name} again")
            except RedisError as exc:
                if not failing:
                    failing = True
                    log.warning(f"this worker process cannot tell Redis {name} ({type(exc).__name__}: "
                                f"{str(exc).strip() or 'no detail'}): {meaning}; tried again every {interval_s:g} s, "
                                "said again once it answers")
            except Exception:  # not Redis's: a fault of this code, each one with its traceback
                log.warning("%s update failed", name, exc_info=True)
            if stop.wait(interval_s):
                return

    threading.Thread(target=loop, name=name, daemon=True).start()


def start(app, hostname: str, interval_s: float = 10.0) -> None:
    _state["key"] = _key(hostname)
    info = json.dumps({"hostname": hostname, "pid": os.getpid(), "started": time.time()})
    _keep(lambda: redis_client(app).set(_state["key"], info, ex=TTL_S), interval_s, "that it is alive", _stop,
          "until it does, /readyz and clapq_workers_live do not count it (its tasks still run)")


# Which models the live workers embed: a sorted set per model, each worker process (the pool child that loaded
# the model) a member whose score is when it stops counting. A file of a library whose model no live worker
# serves stays queued where it is, instead of going round the queue for ever: sent back at once by each worker
# that met it (resting 5 s each time), it kept the queue from ever being empty, so the sweeper never sent the
# files dead workers had left, whatever their model (the test of a SIGKILLed worker hung in CI).
SERVING = "clapq:serving:{model}"


def _now(client) -> float:
    """Redis's clock: the workers' and the readers' hosts may disagree by more than TTL_S."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def serve(app, model_id: int, interval_s: float = 10.0) -> None:
    """Say, until this process ends, that it embeds with `model_id` (once per process and model)."""
    key, pid = SERVING.format(model=model_id), os.getpid()
    mine = _state.get("serving")
    if mine and (mine["key"], mine["pid"]) == (key, pid):  # a forked child is another member
        return
    # a token besides host and pid: containers of one hostname often share pids, and one's unserve would
    # remove the other's member; and an event of this process's own: one inherited across a fork may have
    # been copied with its lock held
    mine = _state["serving"] = {"key": key, "pid": pid, "stop": threading.Event(),
                                "member": f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"}
    member = mine["member"]

    def step() -> None:
        now = _now(redis_client(app))
        pipe = redis_client(app).pipeline(transaction=False)
        pipe.zadd(key, {member: now + TTL_S})
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.expire(key, TTL_S)
        pipe.execute()

    _keep(step, interval_s, f"that it serves model {model_id}", mine["stop"],
          "past 30 s the maintenance loop takes no worker to serve it, and sends none of its files that a dead "
          "worker left or that wait for a worker")


def serving(client, models) -> set[int]:
    """Those of `models` that some live worker serves."""
    models, now = sorted(set(models)), _now(client)
    pipe = client.pipeline(transaction=False)
    for m in models:
        pipe.zcount(SERVING.format(model=m), now, "+inf")
    return {m for m, n in zip(models, pipe.execute()) if n}


def served_models(client) -> dict[int, int]:
    """Every model some live worker serves, with how many processes serve it: /readyz says which a service's
    live workers serve where none serves its own."""
    now, keys = _now(client), sorted(client.scan_iter(match=SERVING.format(model="*"), count=100))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.zcount(k, now, "+inf")
    models = {}
    for k, n in zip(keys, pipe.execute()):
        tail = (k.decode() if isinstance(k, bytes) else k).rsplit(":", 1)[1]
        if n and tail.isdigit():
            models[int(tail)] = n
    return models


def stop(app) -> None:
    _stop.set()
    if "key" in _state:
        try:
            redis_client(app).delete(_state["key"])
        except Exception:  # noqa: S110 - it expires anyway
            pass


def unserve(app) -> None:
    """The model process ends: it serves no more (its member would otherwise count for TTL_S)."""
    mine = _state.get("serving")
    if mine and mine["pid"] == os.getpid():  # not a parent's, across a fork
        del _state["serving"]
        mine["stop"].set()
        try:
            redis_client(app).zrem(mine["key"], mine["member"])
        except Exception:  # noqa: S110 - it stops counting anyway
            pass


# the maintenance loop (`clapq beat`) sets this after each pass: without it, files a dead worker left are
# never sent again, and nothing said so (helper-41)
BEAT_KEY = "clapq:beat"


# ... and this after a pass that failed (Postgres away): while its passes fail it runs, and /readyz said to start it
# (helper-119)
BEAT_FAILING_KEY = "clapq:beat-failing"


def _beat_ttl(interval_s: float) -> int:
    """How long a pass's mark (done or failed) stands: three intervals and half a minute more."""
    return int(3 * interval_s + 30)


def beat_done(app, interval_s: float) -> None:
    """Said by the maintenance loop after a pass: alive for three intervals (and half a minute more)."""
    pipe = redis_client(app).pipeline(transaction=False)
    pipe.set(BEAT_KEY, str(time.time()), ex=_beat_ttl(interval_s))
    pipe.delete(BEAT_FAILING_KEY)
    pipe.execute()


def beat_failed(app, interval_s: float, why: str) -> None:
    """Said by the maintenance loop after a pass that failed (`why`, in words that name no server): when its passes
    began to fail (Redis's clock), kept as long as beat_done's mark would be."""
    client = redis_client(app)
    ttl = _beat_ttl(interval_s)
    pipe = client.pipeline(transaction=False)
    pipe.set(BEAT_FAILING_KEY, json.dumps({"since": _now(client), "why": why}), nx=True, ex=ttl)
    pipe.expire(BEAT_FAILING_KEY, ttl)
    pipe.execute()


def beat_alive(app, client=None) -> bool:
    return bool((client or redis_client(app)).exists(BEAT_KEY))


def beat_failing(client) -> tuple[float, str] | None:
    """(for how many seconds, why) a maintenance loop that runs has had its passes fail; None where none said so."""
    raw = client.get(BEAT_FAILING_KEY)
    if raw is None:
        return None
    said = json.loads(raw)
    return max(0.0, _now(client) - said["since"]), said["why"]


def live_workers(app, client=None) -> int:
    return sum(1 for _ in (client or redis_client(app)).scan_iter(match=PREFIX + "*", count=100))
