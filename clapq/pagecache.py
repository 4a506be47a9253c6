"""A blob leaves the page cache once the worker's decoder has read it.

The API writes each blob once and leaves it cached (it is fsynced, so its pages are clean) for the one
read that matters: the worker's decoder, moments later. After that read nothing needs the bytes soon (a
retry or `/audio` reads the disk again). Left cached, thousands of blobs push out the pages Postgres
wants (its heap and HNSW index), and each new upload takes fresh pages from free memory while those of
blobs already embedded sit unused. Where fresh pages are dear (a VM whose host takes free memory back, as
the project's CPU machine does) that costs ~3 CPU-ms a 10 s WAV; dropped, the next upload reuses the
decoded blob's pages (BENCHMARKS.md, "Blob pages"). The API does not drop its writes: the decoder would
then read every upload from the disk again.

Dropping is advice: where the call does not exist (macOS) or does nothing (tmpfs), nothing changes.
No heavy imports: the decoder children import this.
"""

from __future__ import annotations

import os
from pathlib import Path


def drop_cached(fd: int) -> None:
    """Ask the kernel to drop the clean cached pages of an open file."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # advice only: a filesystem may refuse it
            pass


def drop_cached_path(path: Path | str) -> None:
    """drop_cached() on a file named by its path; a file that is gone is no error. Opened without
    blocking: a named pipe in its place (a test's decoder that hangs) must not hang this."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return
    try:
        drop_cached(fd)
    finally:
        os.close(fd)
