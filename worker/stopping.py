"""The worker's main process tells its pool children that it is stopping.

Celery's warm shutdown (SIGTERM or Ctrl-C: `clapq up` stopping, `docker compose stop`) lets each pool child end
the task it is on, and its supervisor kills it past a grace (30 s under `clapq up`, `stop_grace_period` under
Compose). A long recording's task outlasts that: it was killed mid-file, the file embedded again from its start
by the next worker, and the try counted, so a recording stopped on three times failed for good. Told here, a
task stops within seconds (its heartbeat looks every 2 s: worker.heartbeat): the files it finished are written,
and those it had not are handed back to the queue, this try not counted.

The flag is a byte of shared memory, mapped as the main process imports this module (worker.celery_app does,
before its pool forks), so every pool child sees it set; Celery resets or ignores in its children the signals
the main process could send them.
"""

from __future__ import annotations

import mmap

_told = mmap.mmap(-1, 1)  # anonymous and shared (MAP_SHARED): one byte for the main process and its forks


def tell() -> None:
    """Said once, by the main process as its warm shutdown begins."""
    _told[0] = 1


def told() -> bool:
    return _told[0] == 1
