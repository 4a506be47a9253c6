"""A blob leaves the page cache once the worker's decoder has read it.

The API writes each blob once and leaves it cached (it is fsynced, so its pages are clean) for the one
read that matters: the worker's decoder, moments later. After that read nothing needs the bytes soon (a
retry or `/audio` reads the disk again). Left cached, thousands of blobs push out the pages Postgres
wants (its heap and HNSW index), and each new upload takes fresh pages from free memory while those of
blobs already embedded sit unused. Where fresh pages are dear (a VM whose host takes free memory back, as
the project's CPU machine does) that costs 1.5-2.5 CPU-ms a 10 s WAV; dropped, the next upload reuses
the decoded blob's pages (BENCHMARKS.md, "Session 17": `benchmarks/blob_pages.py`). The API does not
drop its writes: the decoder would then read every upload from the disk again.

Dropping is advice: where the call does not exist (macOS) or does nothing (tmpfs), nothing changes.
No heavy imports: the decoder children import this.
"""

from __future__ import annotations

import os
from pathlib import Path


def drop_cached(path: Path | str) -> None:
    """Ask the kernel to drop a file's clean cached pages; a file that is gone is no error. Opened without
    blocking: a named pipe in its place (a test's decoder that hangs) must not hang this."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:  # advice only: a filesystem may refuse it
        pass
    finally:
        os.close(fd)
