"""One thread per process for a kind of work, whichever thread hands it over."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_threads: dict[tuple[int, str], ThreadPoolExecutor] = {}
_lock = threading.Lock()


def one_thread(name: str) -> ThreadPoolExecutor:
    """This process's one thread named `name`, started on first use: work submitted to it runs there, one
    piece at a time, in order. A forked child starts its own (the parent's thread does not run in it)."""
    key = (os.getpid(), name)
    with _lock:
        pool = _threads.get(key)
        if pool is None:
            pool = _threads[key] = ThreadPoolExecutor(1, thread_name_prefix=name)
        return pool
