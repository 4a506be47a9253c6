"""Reader -> mapper -> writer for one chunk of items: decode ahead, embed full batches, upsert."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import fcntl
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

import numpy as np

from clapq.blobs import BlobStore
from worker.audio import AudioInfo, DecodeError, TooLong, format_hint
from worker.decoder import Abandoned, DecoderPool
from worker.embedder import AudioEmbedder
from worker.windows import HOP_S, WINDOW_S, read_window, spans

log = logging.getLogger(__name__)

# scratch that files decoded ahead of the model may hold before a further decode waits (`_Ahead`): 2 GiB is
# 256 files of 10 s (what a GPU reads ahead), or about 3 hours of audio
AHEAD_BYTES = 2 << 30


@dataclasses.dataclass
class Decoded:
    item: object
    info: AudioInfo | None = None
    raw_path: Path | None = None  # 48 kHz mono float32, written by the decoder child
    n: int = 0
    windows: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    error: str | None = None
    # the error is in the file's bytes (it cannot be decoded, holds no audio, is too long, hangs its decoder or
    # crashes it twice, makes the model's values non-finite): the same bytes would fail again
    # (items.failed_in_file); not where its stored copy could not be read, nor its decoder was killed from outside
    in_file: bool = False
    gone: bool = False  # dropped (deleted, or its job cancelled) before or while it decoded

    @property
    def spans(self) -> list[tuple[float, float]]:
        return [(s, e) for _, s, e in self.windows]

    def cleanup(self) -> None:
        if self.raw_path is not None:
            self.raw_path.unlink(missing_ok=True)


@dataclasses.dataclass
class Options:
    batch_size: int = 16
    decode_timeout_s: float = 600.0  # on the clock: past it a file fails, not at fault (DecoderProcess._wait)
    decode_cpu_s: float | None = 300.0  # of the decoder's CPU time: past it a file fails at fault; None: no limit
    max_duration_s: float | None = None
    scratch_dir: Path = Path(tempfile.gettempdir())
    scratch_reserve: int = 0  # bytes of the scratch disk its files leave free (clapq.room.disk_reserve)
    window_s: float = WINDOW_S
    hop_s: float = HOP_S
    # files decoding ahead of the model: on a GPU a full batch, so the decoders (child processes) work
    # on the next batch while the GPU runs this one; on a CPU the model already uses every core, and
    # deep read-ahead only steals from it (measured: BENCHMARKS.md)
    read_ahead: int = 0


_held: list = []  # this process's scratch lock, open (and so held) for its lifetime


def own_scratch(root: Path) -> Path:
    """A scratch directory under `root` for this process alone, locked (flock) while it lives; first the
    directories whose lock nobody holds are removed: their process ended, perhaps killed mid-task (the
    OOM killer, SIGKILL), which leaves decoded files behind (1.4 GB for a 2-hour file). A lock, not a
    pid, says who is alive: it holds across containers that share the volume (one kernel)."""
    root.mkdir(parents=True, exist_ok=True)
    stale = time.time() - 24 * 3600
    for d in [*root.glob("worker-*"), *root.glob(".new-*")]:
        try:
            # "r+", never creating the lock: a directory without one is being made right now, is of a
            # version before locks, or lost its lock to a tmp cleaner while its worker lives
            with open(d / ".lock", "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: its owner is gone
                shutil.rmtree(d, ignore_errors=True)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if d.stat().st_mtime < stale:  # untouched for a day: no worker writes there
                    shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue  # alive (locked), another user's, or removed by another process meanwhile
    for f in root.glob("decoded-*.f32"):  # loose files of versions before per-process directories
        with contextlib.suppress(OSError):
            if f.stat().st_mtime < stale:
                f.unlink()
    # locked before it is renamed into view, so no cleaner ever sees it unlocked
    new = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
    lock = open(new / ".lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    mine = root / f"worker-{os.getpid()}-{new.name[len('.new-'):]}"
    new.rename(mine)
    _held.append(lock)
    return mine


def _read(pool: DecoderPool, blobs: BlobStore, item, rate: int, opts: Options,
          dropped: Collection[uuid.UUID] = (), ahead: _Ahead | None = None) -> Decoded:
    """Decode one file into a scratch file; with `ahead`, only once a decoder is free and there is room."""
    def gone() -> bool:
        return item.id in dropped

    if gone():  # while it waited for a decoder
        return Decoded(item, gone=True)
    path = blobs.path_for(item.sha256)
    if not path.exists():
        return Decoded(item, error="the uploaded file is missing from the blob store")
    fd, raw = tempfile.mkstemp(prefix="decoded-", suffix=".f32", dir=opts.scratch_dir)
    os.close(fd)
    d = Decoded(item, raw_path=Path(raw))
    try:
        while True:
            with pool.checkout() as decoder:
                # room is looked at with a decoder in hand, so that files waiting for a decoder are not all
                # let in while nothing has been decoded yet; the wait for room is without it
                if ahead is None or ahead.room(item):
                    d.info, d.n = decoder.decode(path, d.raw_path, opts.decode_timeout_s, opts.max_duration_s,
                                                 {"item_id": str(item.id), "job_id": str(item.job_id)}, stop=gone,
                                                 hint=format_hint(item.filename), cpu_s=opts.decode_cpu_s,
                                                 reserve=opts.scratch_reserve)
                    if ahead is not None:  # counted before the decoder is free for the next file to look
                        ahead.decoded(d)
                    break
            if not ahead.wait(item):
                raise Abandoned()
    except Abandoned:
        d.cleanup()
        d.gone = True
        return d
    except DecodeError as exc:
        d.cleanup()
        d.error = f"{exc} (CLAPQ_MAX_DURATION_S)" if isinstance(exc, TooLong) else str(exc)
        d.in_file = exc.in_file
        return d
    except BaseException:  # ScratchError (a full disk): the task's, not this file's; no file left behind
        d.cleanup()
        raise
    d.windows = spans(d.n, rate, int(round(opts.window_s * rate)), int(round(opts.hop_s * rate)))
    return d


class _Ahead:
    """The scratch bytes of files decoded ahead of the model (not handed out yet), and the wait of a decode
    for room: while they hold `AHEAD_BYTES` or more, a decode starts only for the file the model takes next.
    A GPU reads a batch ahead (256 files), and 256 recordings of hours each (a 2.4 MB FLAC of 5 hours of
    silence decodes to 2.76 GB) would have filled the scratch disk, and a full disk hands back every file
    of the task, other tenants' too (helper-56)."""

    def __init__(self, dropped: Collection[uuid.UUID]) -> None:
        self.cv = threading.Condition()
        self.held = 0
        self.order: list[uuid.UUID] = []  # the items not handed out yet, in the order they are handed out
        self.closed = False
        self.dropped = dropped

    def room(self, item) -> bool:
        """Whether `item` may be decoded now: there is room, or the model takes it next (and the task has not
        stopped: a file given a decoder after that decoded whole for nothing, helper-61)."""
        with self.cv:
            return not self.closed and (self.held < AHEAD_BYTES or self.order[:1] == [item.id])

    def wait(self, item) -> bool:
        """Wait until there may be room for `item`; False when it is no longer wanted (dropped, or the task
        ended)."""
        with self.cv:
            while not (self.held < AHEAD_BYTES or self.order[:1] == [item.id]):
                if self.closed or item.id in self.dropped:
                    return False
                self.cv.wait(1.0)  # `dropped` is filled by the heartbeat, which does not notify
            return not self.closed

    def decoded(self, d: Decoded) -> None:
        with self.cv:
            self.held += 4 * d.n

    def handed(self, d: Decoded) -> None:
        with self.cv:
            self.held -= 4 * d.n if d.info is not None else 0  # as counted by decoded()
            self.order.remove(d.item.id)
            self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()


def read_ahead(pool: DecoderPool, blobs: BlobStore, items: Iterable, rate: int, opts: Options,
               dropped: Collection[uuid.UUID] = ()) -> Iterator[Decoded]:
    """Decode files in child processes, a bounded number ahead of the model, in input order (`items` is
    advanced only as far as the read-ahead reaches), and while those decoded ahead hold less than
    AHEAD_BYTES of scratch (`_Ahead`). A file whose id appears in `dropped` before or while it decodes is
    not decoded on (`Decoded.gone`)."""
    depth = max(1, pool.size, opts.read_ahead)
    ahead = _Ahead(dropped)

    def submit(item) -> cf.Future:
        with ahead.cv:
            ahead.order.append(item.id)
        return threads.submit(_read, pool, blobs, item, rate, opts, dropped, ahead)

    with cf.ThreadPoolExecutor(max_workers=depth, thread_name_prefix="decode") as threads:
        it = iter(items)  # advancing it may claim files (Postgres), so it may raise: always inside the try
        pending: list[cf.Future] = []
        try:
            for item in itertools.islice(it, depth):
                pending.append(submit(item))
            while pending:
                pending[0].result()  # stays in `pending` until handed out
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                d = pending.pop(0).result()
                ahead.handed(d)
                yield d
        finally:  # the task stopped early (an error): files decoded ahead leave no scratch file behind
            ahead.close()
            for f in pending:
                if not f.cancel():
                    with contextlib.suppress(Exception):
                        f.result().cleanup()


def run(items: list, blobs: BlobStore, pool: DecoderPool, embedder: AudioEmbedder, opts: Options,
        on_done: Callable[[list[tuple[Decoded, np.ndarray]]], None],
        on_failed: Callable[[Decoded], None],
        on_batch: Callable[[int, float], None] | None = None,
        top_up: Callable[[int], list] | None = None,
        more: Callable[[], list] | None = None,
        dropped: Collection[uuid.UUID] = (),
        progress: dict[uuid.UUID, float] | None = None) -> None:
    """Pack windows from many files into full batches; hand finished items to the writer.

    `more()`, asked when the read-ahead has taken the last item, returns the next items to decode (the
    worker claims queued files of later tasks), [] ends the stream: the decoders go on with them while
    the model runs the batches already read, instead of idling from the end of one task to the start
    of the next (on a GPU with a task of one batch they would otherwise take turns with the model).
    When the items are read and the last batch would be padded, `top_up(rows)` may return up to `rows`
    more items to fill it: a GPU batch of 256 is not run three-quarters empty because a task brought 64
    files. Padding stays for the very end. Items whose ids appear in `dropped` (the heartbeat adds
    those deleted meanwhile) are dropped with their windows not yet run, or their decoding stopped, and
    reach neither `on_done` nor `on_failed`. `progress`, if given, holds each file of more windows than a
    batch part-way through the model: its share of windows embedded, until it is done or dropped."""
    window = embedder.window_samples
    if opts.read_ahead == 0 and embedder.clap.device.type == "cuda":
        opts = dataclasses.replace(opts, read_ahead=opts.batch_size)
    queue: list[tuple[Decoded, int]] = []  # (file, window index) waiting for the model
    progress = {} if progress is None else progress
    results: dict[uuid.UUID, list] = {}
    seen: list[Decoded] = []

    def settle(d: Decoded) -> list:
        """A file leaves the pipeline (done, failed or dropped): its vectors so far, its share and its
        scratch file go."""
        progress.pop(d.item.id, None)
        d.cleanup()
        return results.pop(d.item.id)

    def flush() -> None:
        batch, queue[:] = queue[:opts.batch_size], queue[opts.batch_size:]
        # windows of a file that already failed (its scratch file is gone) are dropped, not read
        batch = [(d, i) for d, i in batch if d.item.id in results]
        if not batch:
            return
        waves = np.zeros((opts.batch_size, window), np.float32)
        for row, (d, i) in enumerate(batch):
            waves[row] = read_window(d.raw_path, d.n, d.windows[i][0], window)
        # always a full batch (zero rows pad the last one): the same shapes every time, so a
        # file's vectors never depend on what else was in its batch; a lane of padding alone is not run
        t0 = time.perf_counter()
        vectors = embedder.embed(waves, wanted=len(batch))[: len(batch)]
        if on_batch is not None:
            on_batch(len(batch), time.perf_counter() - t0)
        finished = []
        for (d, i), vec in zip(batch, vectors):
            slots = results.get(d.item.id)
            if slots is None:  # the item failed on another window of this batch
                continue
            if not np.isfinite(vec).all():
                # Postgres would reject the vector and with it the whole batch's transaction: fail this file alone
                settle(d)
                d.error, d.in_file = "the model produced non-finite values for this audio", True
                on_failed(d)
                continue
            slots[i] = vec
            filled = sum(v is not None for v in slots)
            if filled == len(slots):
                finished.append((d, np.stack(settle(d))))
            elif len(slots) > opts.batch_size:  # a file of a batch or less ends within two: no news
                progress[d.item.id] = filled / len(slots)
        if finished:
            on_done(finished)

    def drop_gone() -> None:
        gone = {i for i in list(dropped) if i in results}  # list(): one step, while the heartbeat adds
        if not gone:
            return
        for d in seen:
            if d.item.id in gone:
                settle(d)
        queue[:] = [(d, i) for d, i in queue if d.item.id not in gone]

    def stream() -> Iterator:
        yield from items
        while more is not None:
            nxt = more()
            if not nxt:
                return
            yield from nxt

    try:
        todo: Iterator | list = stream()
        while todo:
            for d in read_ahead(pool, blobs, todo, embedder.rate, opts, dropped):
                if d.gone:
                    continue
                if d.error:
                    on_failed(d)
                    continue
                seen.append(d)
                results[d.item.id] = [None] * len(d.windows)
                queue.extend((d, i) for i in range(len(d.windows)))
                drop_gone()
                while len(queue) >= opts.batch_size:
                    flush()
                    drop_gone()
            short = -len(queue) % opts.batch_size  # rows the last batch would pad
            todo = list(top_up(short)) if top_up is not None and short else []
        drop_gone()
        while queue:
            flush()
            drop_gone()
    finally:  # scratch files never outlive the task, whatever happened
        for d in seen:
            d.cleanup()
