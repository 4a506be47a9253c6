"""Celery tasks: ids in, state re-read from Postgres, idempotent writes, acks late."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import time
import uuid

from billiard.process import current_process
from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy.exc import InterfaceError, OperationalError

import worker
from clapq import metrics, presence
from clapq.blobs import BlobStore
from clapq.checkpoint import register_model, resolve
from clapq.db import session_scope
from clapq.queue import EMBED_QUEUE, EMBED_TASK, best_effort, send_or_mark
from clapq.room import disk_reserve
from clapq.settings import Settings, claim_window_s
from worker import CodeChanged, stopping

log = logging.getLogger(__name__)

# only these are worth retrying: the database or the network went away for a moment (a dropped or
# refused connection, a deadlock or serialization failure). Not every DBAPIError: a DataError or an
# IntegrityError comes back on every try, so it takes the unexpected-error path (files handed back,
# attempts bounding the retries) instead of 8 backoffs
TRANSIENT = (OperationalError, InterfaceError, ConnectionError)


class WorkerStopped(Exception):
    """Why a file its worker's stop cut short went back to the queue (worker.stopping)."""

    def __init__(self) -> None:
        super().__init__("the worker stopped before it finished the file; embedded again from its start (not "
                         "counted as a try)")


OTHER_MODEL_REST_S = 5  # how long a worker rests after it was sent only files of another model's library

# Celery's own retry of a task (autoretry_for TRANSIENT) is told from the same message handed back after its
# process died by a mark the failing try leaves in Redis: `request.retries` alone cannot tell them apart, as a
# retried message whose process then dies comes back with the same count, and a file that killed it would have
# been tried for ever with no try counted (helper-44). No mark (Redis away): taken for a death, counted.
RETRY_MARK = "clapq:retrying:{task}:{n}"
RETRY_MARK_TTL_S = 6 * 3600


def _mark_retry(app, task_id: str, n: int) -> None:
    with best_effort(app, "marking a task that Celery retries") as client:
        if client is not None:
            client.set(RETRY_MARK.format(task=task_id, n=n), b"1", ex=RETRY_MARK_TTL_S)


def _marked_retry(app, task_id: str, retries: int) -> bool:
    """Whether this run is Celery's retry that the try before marked (the mark is used once)."""
    if not retries:
        return False
    with best_effort(app, "reading whether a task is Celery's retry") as client:
        if client is not None:
            return bool(client.delete(RETRY_MARK.format(task=task_id, n=retries)))
    return False


def _first_lane_waits(app) -> bool:
    """Whether tasks wait in the queue's first lane (clapq.queue.BULK_PRIORITY); with Redis away, no."""
    with best_effort(app, "reading whether tasks wait in the queue's first lane") as client:
        if client is not None:
            return client.llen(EMBED_QUEUE) > 0
    return False


# After a worker could not write decoded audio to its scratch directory: how long it waits before its next
# task (at most stale_after_s), and how many times a day each file goes back uncounted (then its tries count)
SCRATCH_REST_S = 60
SCRATCH_FREE_TRIES = 3
SCRATCH_MARK = "clapq:scratch-full:{item}"

LOCKED_AGAIN_S = 1.0  # when a task's files another transaction held locked are sent again (an upload's: ms)


def _scratch_free(app, held: set) -> set:
    """Those of these files handed back uncounted after a scratch failure fewer than SCRATCH_FREE_TRIES times
    in the last day (counted in Redis); with Redis away, none."""
    ids = list(held)
    with best_effort(app, "counting files handed back after a scratch failure") as client:
        if client is not None and ids:
            pipe = client.pipeline(transaction=False)
            for i in ids:
                pipe.incr(SCRATCH_MARK.format(item=i))
                pipe.expire(SCRATCH_MARK.format(item=i), 86_400)
            seen = pipe.execute()[0::2]
            return {i for i, n in zip(ids, seen) if n <= SCRATCH_FREE_TRIES}
    return set()


def _leave_for_their_workers(app, database_url: str, model_id: int, left: list, rest: bool) -> None:
    """Files of libraries bound to another model (id, model), left queued by claim(). Those whose model a live
    worker serves are sent again at once, and this worker rests a moment (unless it has files of its own) so
    that one of theirs takes them: left to the sweeper, they came back after CLAPQ_STALE_AFTER_S, and only
    once the queue was empty (64 files took a minute instead of 4 s, helper-44). Those of a model no worker
    serves wait, queued (clapq.models.WAITING_FOR_MODEL), for the sweeper to send them once one does: sent
    round, they kept the queue from ever being empty, and the sweeper from sending the files dead workers left."""
    from clapq.models import WAITING_FOR_MODEL, park

    with best_effort(app, "reading which models the live workers serve") as client:
        served = presence.serving(client, {m for _, m in left}) if client is not None else None
    # Redis away (served None): all sent again, as before anything was known of who serves what
    again = [i for i, m in left if served is None or m in served]
    waiting = sorted({m for _, m in left if served is not None and m not in served})
    if waiting:
        try:  # best effort: unmarked, the sweeper finds them later (CLAPQ_STALE_AFTER_S and an empty queue)
            with session_scope(database_url) as s:
                park(s, [i for i, m in left if m in waiting], WAITING_FOR_MODEL)
        except Exception:
            log.warning("could not mark the files left for a worker of their model", exc_info=True)
        log.error("this worker serves model %d, and %d files it was sent are of libraries bound to model(s) %s, "
                  "which no running worker serves: they stay queued until a worker of their model starts",
                  model_id, len(left) - len(again), ", ".join(map(str, waiting)),
                  extra={"item_ids": [str(i) for i, m in left if m in waiting][:10]})
    if again:
        log.error("this worker serves model %d, and %d files it was sent are of libraries bound to another model: "
                  "sent again for a worker of theirs (is this worker's CLAPQ_MODEL the service's?)", model_id,
                  len(again), extra={"item_ids": [str(i) for i in again[:10]]})
        metrics.record_resent(app, "other_model", send_or_mark(app, database_url, again, len(again)))
        if rest:
            time.sleep(OTHER_MODEL_REST_S)


def _model_row(settings: Settings) -> int:
    """The id of the models row of this worker's checkpoint (made on first use: register_model)."""
    with session_scope(settings.database_url) as s:
        return register_model(s, resolve(settings.model))


@functools.lru_cache(maxsize=1)
def _runtime():
    """Settings, model, embedder and decoder pool for this process, built on first use (after the fork)."""
    from clapq.malloc import keep_freed_memory, torch_huge_pages

    # before torch's first buffer (nothing here has imported torch yet): every batch reuses the model's
    # buffers, on huge pages (clapq.malloc)
    kept, huge = keep_freed_memory(), torch_huge_pages()
    from clapq.clap import get_clap
    from clapq.precision import compile_applies
    from worker.embedder import THREADS, AudioEmbedder, batch_for, lanes_for

    configured = Settings.from_env()
    ckpt = resolve(configured.model)
    clap = get_clap(ckpt, configured.device, configured.precision, attention=configured.attention)
    compiled = compile_applies(configured.compile_model, clap.device, clap.dtype)

    def embedder_for(compiled: bool) -> tuple[AudioEmbedder, Settings]:
        """The embedder, and the settings with this process's batch (CLAPQ_BATCH_SIZE resolved)."""
        batch = batch_for(configured.batch_size, clap.device, compiled, configured.lanes, THREADS)
        lanes = lanes_for(configured.lanes, clap.device, compiled, batch, THREADS)
        return AudioEmbedder(clap, compile_model=compiled, lanes=lanes), dataclasses.replace(configured, batch_size=batch)

    embedder, settings = embedder_for(compiled)
    model_id = _model_row(settings)
    import numpy as np

    from worker.decoder import get_pool, pool_size

    # warm-up: the first forward pass builds kernels and buffers (and compiles); do it before the first
    # real batch. A compile that fails (no C++ compiler in the image, an inductor bug) costs speed, not
    # the worker: the tower then runs eager.
    warm = np.zeros((settings.batch_size, embedder.window_samples), np.float32)
    try:
        embedder.embed(warm)
    except Exception:
        if not compiled:
            raise
        log.warning("torch.compile failed; the audio tower runs eager", exc_info=True)
        embedder.close()
        compiled, (embedder, settings) = False, embedder_for(False)
        embedder.embed(np.zeros((settings.batch_size, embedder.window_samples), np.float32))
    if settings.redis_url:  # deletions and cancels wake running tasks' heartbeats (worker.heartbeat)
        from worker.heartbeat import listening

        listening(settings.redis_url)
    decoders = get_pool(pool_size(settings.decoders, embedder.clap.device.type, settings.worker_concurrency))
    decoders.warm()
    log.info("model loaded", extra={"model": ckpt.name, "model_id": model_id, "device": str(embedder.clap.device),
                                    "precision": embedder.clap.precision, "attention": embedder.clap.attention, "compiled": compiled,
                                    "lanes": embedder.lanes, "torch_threads": embedder.threads_per_lane, "batch": settings.batch_size,
                                    "keeps_freed_memory": kept, "huge_pages": huge})
    return settings, embedder, model_id, decoders


@functools.lru_cache(maxsize=1)
def _own_scratch(root):
    from worker.pipeline import own_scratch

    return own_scratch(root)


def _scratch(root):
    """This worker process's scratch directory, made (removing those of ended processes) on first use, and
    again if it has gone (a tmp cleaner removed it while the worker was idle)."""
    if not _own_scratch(root).is_dir():
        _own_scratch.cache_clear()
    return _own_scratch(root)


def _cannot_run(exc: BaseException) -> None:
    """This process cannot load its model (corrupt weights, GPU out of memory), or its code changed on disk since
    it started (worker.CodeChanged): stop the whole worker, so that its supervisor (`clapq up`, Docker's
    restart policy) shows it, or starts it again on the code now there, instead of a worker that takes message
    after message and drops them while the files wait as `queued` with no error. Celery's warm shutdown puts
    back the messages it holds."""
    if isinstance(exc, CodeChanged) and not exc.upgraded:
        log.critical("%s; stopping this worker", exc)
    elif isinstance(exc, CodeChanged):
        log.critical("the worker's code changed on disk since it started (clapq upgraded in place?), and its "
                     "decoders would run the new code beside its old: stopping it, so that it is restarted and "
                     "runs the new code throughout; no file is failed or counted for it")
    else:
        log.critical("this worker cannot load its model (%s: %s); stopping it", type(exc).__name__, exc)
    if current_process().name.startswith("ForkPoolWorker"):  # not a task run in-process (tests, eager)
        os.kill(os.getppid(), signal.SIGTERM)  # the Celery main process of this pool child


@worker_process_init.connect
def _warm_up(**_) -> None:
    """Load the model in each pool child as it starts (after the fork), not on the first task, and say from
    then on which model it serves (clapq.presence.serve)."""
    try:
        presence.serve(embed_items.app, _runtime()[2])
    except TRANSIENT:  # Postgres not there yet: the first task tries again (and retries)
        log.exception("model warm-up failed")
        _serve_once_registered(embed_items.app)
    except Exception as exc:
        _cannot_run(exc)


def _serve_once_registered(app, every_s: float = 5.0) -> None:
    """After a warm-up that met no database: say which model this process serves as soon as the model's row
    can be read, not at its first task. The sweeper sends files only where a live worker serves their model,
    and those a dead worker left would otherwise wait for an upload to wake this one."""
    def loop() -> None:
        while True:
            time.sleep(every_s)
            try:
                model_id = _model_row(Settings.from_env())
            except TRANSIENT:
                continue
            except Exception:  # the model cannot load: the first task says so (_cannot_run)
                return
            presence.serve(app, model_id)
            return

    threading.Thread(target=loop, name="serve-once-registered", daemon=True).start()


@worker_process_shutdown.connect
def _retire(**_) -> None:
    presence.unserve(embed_items.app)


@shared_task(
    name=EMBED_TASK,
    bind=True,
    acks_late=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=120,
    max_retries=8,
    # in the queue's first lane, as other overdue work is: Celery sends a retry at its message's priority, so
    # a bulk task's waited in the bulk lane, its files claimed and no longer beating, until the sweeper took
    # them for a dead worker's and counted a try
    retry_kwargs={"priority": 0},
)
def embed_items(self, item_ids: list[str]) -> dict:
    """Embed a chunk of items; safe to run twice (unique keys + upserts)."""
    task_id = self.request.id or "local"
    if current_process().name.startswith("ForkPoolWorker"):  # not a task run in-process (tests, eager)
        stopping.defer_group_stop()
    try:
        settings, embedder, model_id, decoders = _runtime()
        presence.serve(self.app, model_id)  # where the warm-up failed (tasks run in-process do none)
        # upgraded in place since it started: it stops before it takes files, not once a decoder child would run the
        # new code, nor with modules this task imports (the pipeline) newer than those it runs
        if worker.code_on_disk() != worker.CODE:
            raise CodeChanged()
    except TRANSIENT:
        _still_retrying(self, task_id, _marked_retry(self.app, task_id, self.request.retries))
        raise
    except Exception as exc:  # nothing was claimed: the message goes back for a worker that can run it
        _cannot_run(exc)
        raise Reject(f"cannot run here: {exc}", requeue=True) from exc
    if stopping.told():
        # begun once its worker's warm shutdown had (a message handed to the pool child as the stop came): it
        # claimed its files, a try counted, and took later tasks' until its heartbeat heard of the stop. Its message
        # goes back untouched, for the next worker
        raise Reject("the worker is stopping", requeue=True)
    ids = [uuid.UUID(i) for i in item_ids]
    retry = _marked_retry(self.app, task_id, self.request.retries)
    try:
        claimed, split, alone, other_model, locked = _claim(ids, task_id, settings, model_id, retry)
    except TRANSIENT:
        _still_retrying(self, task_id, retry)
        raise
    try:
        if alone:
            metrics.record_resent(self.app, "database_away" if retry else "process_died",
                                  send_or_mark(self.app, settings.database_url, alone, 1))
            if retry:  # the try before could not hand back the files it had taken from later tasks
                log.info("files this task had taken from later tasks go on one per task", extra={"count": len(alone)})
            else:
                log.warning("files of a task whose process died go on one per task", extra={"count": len(alone)})
        if locked:
            # skipped while another transaction held them (a second upload of the same files deciding whether
            # they are a retry): acked with this message, they waited as orphans for CLAPQ_STALE_AFTER_S and an
            # empty queue. Sent again, a moment later, when that transaction has ended
            metrics.record_resent(self.app, "locked", send_or_mark(self.app, settings.database_url, locked,
                                                                   settings.items_per_task, countdown=LOCKED_AGAIN_S))
            log.info("files of this task another transaction held locked are sent again", extra={"count": len(locked)})
        if other_model:  # after those: this may rest a moment
            _leave_for_their_workers(self.app, settings.database_url, model_id, other_model, rest=not claimed)
    except TRANSIENT:  # its claim stands: the files it holds, it holds through a passing fault
        _still_retrying(self, task_id, True)
        raise
    if split:
        return {"claimed": 0, "split": len(alone)}
    if not claimed:
        return {"claimed": 0, **({"locked": len(locked)} if locked else {})}
    return _embed(self, ids, task_id, settings, embedder, model_id, decoders, claimed)


def _still_retrying(task, task_id: str, retry: bool) -> None:
    """Before Celery runs the task again after a passing fault: where the fault came before its claim
    committed, nothing of this try changed Postgres, and the next is Celery's retry where this one was.
    Unmarked, a retry whose claim met the database still away was followed by one that took its own files,
    still running under its id, for a dead process's: each sent on alone, a second try counted (helper-51:
    every file of a task, at a 40 s outage)."""
    if retry:
        _mark_retry(task.app, task_id, task.request.retries + 1)


def _claim(ids: list, task_id: str, settings, model_id: int,
           retry: bool) -> tuple[list, bool, list, list, list]:
    """The task's files, claimed; whether they were split (each sent on alone); those sent on alone; those
    left for a worker of another model; those queued that another transaction held locked (store.claim)."""
    from worker import store

    with session_scope(settings.database_url) as s:
        other_model: list = []
        locked: list = []
        claimed = store.claim(s, ids, model_id, settings.max_attempts, task_id, settings.stale_after_s, retry=retry,
                              left=other_model, locked=locked)
        # Files this task id was still running: the process that had them died (a native crash, the OOM
        # killer) and Celery handed the message back. One of them may be what kills it, so each goes on
        # alone, as the sweeper sends a dead worker's files: the one that kills runs out of attempts by
        # itself. The try that died counts; this claim does not. (Celery's own retry after a passing fault,
        # which the try before marked, finds its files running too: they stay together, no try counted.)
        split = len(claimed) > 1 and not retry and any(c.resumed for c in claimed)
        alone = store.release(s, [c.id for c in claimed], store.LOST, task_id,
                              charge=False) if split else []
        # The files it had taken from later tasks go the same way, whether or not its own were still
        # running: their tasks found them taken and ended, so they would wait for the sweeper
        # (CLAPQ_STALE_AFTER_S) with every worker idle. On a retry of Celery's own as well: the try before
        # handed back what it had borrowed (queued again, so not taken here) unless its process died.
        alone += store.release_borrowed(s, ids, task_id, retry=retry)
    return claimed, split, alone, other_model, locked


def _embed(self, ids: list, task_id: str, settings, embedder, model_id: int, decoders, claimed: list) -> dict:
    """Embed the claimed files (and those claimed on the way), writing each batch's vectors."""
    from worker import pipeline, store
    from worker.audio import ScratchError
    from worker.heartbeat import beating

    blobs = BlobStore(settings.blob_dir)
    opts = pipeline.Options(batch_size=settings.batch_size,
                            decode_timeout_s=settings.decode_timeout_s, decode_cpu_s=settings.decode_cpu_s,
                            max_duration_s=settings.max_duration_s,
                            scratch_dir=_scratch(settings.scratch_dir),
                            scratch_reserve=disk_reserve(settings.scratch_dir, settings.data_dir,
                                                         settings.disk_reserve_mb))
    counts = {"claimed": len(claimed), "done": 0, "failed": 0}
    # unfinished items, those claimed on the way included: heartbeats and release cover them (the
    # heartbeat thread copies the set with list(), which the GIL keeps whole while this thread edits it)
    held = {c.id for c in claimed}
    # A first try goes on claiming queued files of later tasks, a batch's worth at a time as the
    # read-ahead reaches them, for CLAPQ_CLAIM_FOR_S, then may fill its last batch (at most a batch's
    # worth). A retry keeps to its own items, so a file that kills workers drags no other into its attempts.
    first_try = all(c.attempt == 1 for c in claimed)
    claim_until = time.monotonic() + claim_window_s(settings.claim_for_s, embedder.clap.device.type)
    spare = settings.batch_size if first_try else 0

    def claim_more(rows: int) -> list:
        # the worker is stopping: it takes no more files. Asked of the flag itself, not of the files on_stop found
        # held: told while it held none unfinished (a claim on its way), it claimed on for the whole window
        if stopping.told():
            return []
        try:
            with session_scope(settings.database_url) as s:
                got = store.claim_more(s, model_id, settings.max_attempts, task_id, settings.stale_after_s, rows)
        except Exception:  # optional work: a failed claim ends the stream, not the task
            log.warning("claiming queued files of later tasks failed; this task goes on with its own",
                        exc_info=True)
            return []
        held.update(c.id for c in got)
        counts["claimed"] += len(got)
        return got

    def hand_back(item_ids: set, exc: BaseException, charge: bool, reason: str, wait: bool = True,
                  per_task: int = 1, retried: bool = False) -> None:
        """Put these files back in the queue and send each off again alone (or `per_task` together), after the
        sweeper's usual wait (CLAPQ_STALE_AFTER_S) unless not `wait`: a machine-wide fault (a full disk) does not
        use up every file's attempts in seconds; counted in /metrics under `reason` (clapq.metrics.RESENT_REASONS).
        Best effort: where Postgres is what failed, Celery's retry of this task hands them back (`retried`), or else
        the sweeper finds them; tasks Redis does not take are marked for the sweeper's next pass (send_or_mark)."""
        if not item_ids:
            return
        try:
            with session_scope(settings.database_url) as s:
                why = str(exc) if isinstance(exc, WorkerStopped) else f"worker error: {type(exc).__name__}: {exc}"
                released = store.release(s, list(item_ids), why, task_id, charge=charge)
        except TRANSIENT as fault:
            # Postgres away (a restart): expected, and mended. One line: a full traceback at each task that held
            # borrowed files, among Celery's own retry lines, read as a fault of clapq's (helper-142)
            said = str(getattr(fault, "orig", None) or fault).strip().splitlines()
            mended = ("Celery's retry of this task hands them back" if retried else "the maintenance loop sends them "
                      f"again once they have been silent {settings.stale_after_s} s (CLAPQ_STALE_AFTER_S)")
            log.warning(f"handing {len(item_ids)} file{'s' if len(item_ids) > 1 else ''} back failed, the database "
                        f"did not answer ({type(fault).__name__}: {said[0] if said else 'no detail'}): {mended}",
                        extra={"count": len(item_ids), "task_id": task_id})
            return
        except Exception:  # not a passing fault: a fault of this code, with its traceback
            log.exception("handing files back failed; the sweeper will find them", extra={"count": len(item_ids)})
            return
        sent = send_or_mark(self.app, settings.database_url, released, per_task,
                            countdown=settings.stale_after_s if wait else None)
        metrics.record_resent(self.app, reason, sent)

    def more() -> list:
        # not while tasks wait in the queue's first lane: claiming ahead takes the oldest files, a bulk
        # backlog's, and another tenant's few files waited for a claim window of them (helper-49: 65 of 72
        # bulk files went before 3 first-lane ones with CLAPQ_CLAIM_FOR_S=10, a GPU's default)
        if not first_try or time.monotonic() >= claim_until or _first_lane_waits(self.app):
            return []
        return claim_more(settings.batch_size)

    def top_up(rows: int) -> list:
        nonlocal spare
        got = claim_more(min(rows, spare)) if spare > 0 else []
        spare -= len(got)
        return got

    def on_done(finished) -> None:
        # one statement per model batch: all finished items' rows together
        with session_scope(settings.database_url) as s:
            store.write_items(s, [(d.item, d.info, d.spans, vectors) for d, vectors in finished])
        held.difference_update(d.item.id for d, _ in finished)
        counts["done"] += len(finished)
        metrics.record_items(self.app, done=len(finished))

    def on_failed(d) -> None:
        with session_scope(settings.database_url) as s:
            recorded = store.record_failure(s, d.item.id, d.error, d.info, in_file=d.in_file)
        held.discard(d.item.id)
        if not recorded:  # cancelled or deleted meanwhile: not a failure (clapq_items_failed_total counted
            return  # it, helper-54)
        counts["failed"] += 1
        metrics.record_items(self.app, failed=1)
        log.info("item failed", extra={"item_id": str(d.item.id), "job_id": str(d.item.job_id),
                                       "tenant_id": str(d.item.tenant_id), "error": d.error})

    # files the heartbeat finds gone (deleted meanwhile, or taken by another task): their windows not yet
    # run are dropped and a decoding in progress is stopped, so deleting or cancelling a long file stops
    # its embedding within about a second and the batch in flight (the API's announcement wakes the
    # heartbeat) or, if that is lost, a beat
    dropped: set = set()

    def on_gone(ids: set) -> None:
        dropped.update(ids)
        held.difference_update(ids)

    # the worker told to stop (worker.stopping): every file not finished is dropped as a gone one is, within
    # about a second, and handed back below, where a long recording's task ran on past the stop's grace
    def on_stop() -> None:
        dropped.update(list(held))

    # a long file's share of windows embedded, which the heartbeat records every 2 s: its job's progress
    # moves before the file ends (GET /v1/jobs/<id>)
    progress: dict = {}
    try:
        with beating(settings.database_url, held, task_id, settings.heartbeat_s, on_gone=on_gone,
                     redis_url=settings.redis_url, progress=progress, on_stop=on_stop):
            pipeline.run(claimed, blobs, decoders, embedder, opts, on_done, on_failed,
                         on_batch=lambda n, secs: metrics.record_batch(self.app, n, secs), top_up=top_up, more=more,
                         dropped=dropped, progress=progress)
    except TRANSIENT as exc:
        # Celery runs this task again with its own files (the writes are idempotent); the files it took
        # from later tasks, whose messages are spent, go back now, this try not counted against them
        hand_back(held - set(ids), exc, charge=False, reason="database_away", retried=True)
        _mark_retry(self.app, task_id, self.request.retries + 1)
        raise
    except CodeChanged as exc:
        # a decoder child would run other code than this worker (clapq upgraded in place under it, or another copy
        # found first): not the files' fault. They go back with this try not
        # counted, at once (another worker, or this one restarted, takes them), and the worker stops, so that
        # its supervisor starts it again on the new code (its task messages go back to the queue)
        _cannot_run(exc)
        hand_back(held, exc, charge=False, reason="code_changed", wait=False)
        return {**counts, "handed_back": len(held)}
    except ScratchError as exc:
        # this machine's disk, not the files: they go back with this try not counted (they used up their
        # attempts and failed for good, helper-41), a few times each, and after that counted, so a file whose
        # decoded audio never fits the disk fails in the end (it went round for ever, helper-44); and this
        # worker rests before its next task, which would meet the same disk (it took task after task, faster
        # than the healthy workers)
        free = _scratch_free(self.app, held)
        hand_back(free, exc, charge=False, reason="scratch_full")
        hand_back(held - free, exc, charge=True, reason="scratch_full")
        rest = min(SCRATCH_REST_S, settings.stale_after_s)
        log.error("cannot write decoded audio to the scratch directory (%s): the task's files go back to the "
                  "queue (%d with this try not counted, %d that went back so %d times already with it counted), "
                  "and this worker waits %g s before its next task", exc, len(free), len(held - free),
                  SCRATCH_FREE_TRIES, rest, extra={"scratch_dir": str(settings.scratch_dir), "count": len(held)})
        time.sleep(rest)
        return {**counts, "handed_back": len(held)}
    except Exception as exc:
        # every file it held goes back, this try counted (attempts bound the retries); this message is
        # acked as failed and the borrowed files' own found nothing to do
        hand_back(held, exc, charge=True, reason="worker_error")
        raise
    if held and stopping.told():
        # files left unfinished by a run that ended are those the stop dropped (a gone one leaves `held`). Not the
        # files' doing: this try is not counted, and they go back at once, together as they were sent
        hand_back(held, WorkerStopped(), charge=False, reason="worker_stopped", wait=False,
                  per_task=settings.items_per_task)
        log.info("the worker is stopping: files not finished go back to the queue, this try not counted",
                 extra={"count": len(held), "task_id": task_id})
        return {**counts, "handed_back": len(held)}
    return counts
