"""Reader -> mapper -> writer for one chunk of items: decode ahead, embed full batches, upsert."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import uuid
from collections.abc import Callable, Iterator

import numpy as np

from clapq.blobs import BlobStore
from worker.audio import AudioInfo, DecodeError, decode
from worker.embedder import AudioEmbedder
from worker.windows import cut

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Decoded:
    item: object
    info: AudioInfo | None = None
    spans: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    waves: list[np.ndarray] = dataclasses.field(default_factory=list)
    error: str | None = None


def _read(blobs: BlobStore, item, rate: int, max_duration_s: float | None) -> Decoded:
    try:
        path = blobs.path_for(item.sha256)
        if not path.is_file():
            return Decoded(item, error="the uploaded file is missing from the blob store")
        samples, info = decode(path, max_duration_s=max_duration_s)
        windows = cut(samples, rate)
        return Decoded(item, info, [(w.start_s, w.end_s) for w in windows], [w.samples for w in windows])
    except DecodeError as exc:
        return Decoded(item, error=str(exc))
    except MemoryError:
        return Decoded(item, error="the file is too large to decode in memory")


def read_ahead(blobs: BlobStore, items: list, rate: int, depth: int = 2,
               max_duration_s: float | None = None) -> Iterator[Decoded]:
    """Decode files on threads, at most `depth` ahead of the consumer, in input order."""
    with cf.ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="decode") as pool:
        pending: list[cf.Future] = []
        it = iter(items)
        for item in it:
            pending.append(pool.submit(_read, blobs, item, rate, max_duration_s))
            if len(pending) >= depth:
                break
        while pending:
            done = pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_read, blobs, nxt, rate, max_duration_s))
            yield done


def run(
    items: list,
    blobs: BlobStore,
    embedder: AudioEmbedder,
    batch_size: int,
    on_done: Callable[[list[tuple[Decoded, np.ndarray]]], None],
    on_failed: Callable[[Decoded], None],
    max_duration_s: float | None = None,
) -> None:
    """Pack windows from many files into full batches; hand finished items to the writer."""
    queue: list[tuple[Decoded, int]] = []  # (file, window index) waiting for the model
    results: dict[uuid.UUID, list] = {}
    remaining: dict[uuid.UUID, int] = {}

    def flush() -> None:
        batch, rest = queue[:batch_size], queue[batch_size:]
        queue[:] = rest
        vectors = embedder.embed(np.stack([d.waves[i] for d, i in batch]))
        finished = []
        for (d, i), vec in zip(batch, vectors):
            results[d.item.id][i] = vec
            remaining[d.item.id] -= 1
            if remaining[d.item.id] == 0:
                finished.append((d, np.stack(results.pop(d.item.id))))
                d.waves.clear()  # free the audio as soon as its vectors exist
        if finished:
            on_done(finished)

    for d in read_ahead(blobs, items, embedder.rate, max_duration_s=max_duration_s):
        if d.error:
            on_failed(d)
            continue
        results[d.item.id] = [None] * len(d.waves)
        remaining[d.item.id] = len(d.waves)
        queue.extend((d, i) for i in range(len(d.waves)))
        while len(queue) >= batch_size:
            flush()
    while queue:
        flush()
