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

A SIGTERM sent to every process of the worker at once (systemd's default KillMode, control-group; `kill -TERM
-PGID`) reached the pool child too, whose SIGTERM billiard ends it at: it died mid-file, "worker lost", its try
counted and the file embedded again from its start, whatever the main process's warm shutdown would have done.
A pool child now leaves a SIGTERM that comes with its main process's warm shutdown to that shutdown
(defer_group_stop): the shared memory also says whether the main process's shutdown is warm or cold.
"""

from __future__ import annotations

import mmap
import signal
import threading
import time

# anonymous and shared (MAP_SHARED), for the main process and its forks: told, a warm shutdown, a cold one
_told = mmap.mmap(-1, 3)
TOLD, WARM, COLD = range(3)

# how long a pool child's SIGTERM waits for its main process to say it heard a warm shutdown's signal too (it
# does within milliseconds). A SIGTERM the main process sends a child of its own (the hard time limit's kill, with
# a SIGKILL 0.1 s after; a cold shutdown's cancelling of its task, SIGQUIT) ends it as before, once this passed
GROUP_S = 1.0


def tell(warm: bool = True) -> None:
    """Said by the main process as its shutdown begins, warm or cold (Celery says it at each signal)."""
    _told[TOLD] = 1
    _told[WARM if warm else COLD] = 1


def told() -> bool:
    return _told[TOLD] == 1


_deferring = False


def defer_group_stop() -> None:
    """In a pool child (its main thread, as a task begins: billiard sets the child's SIGTERM handler after
    worker_process_init, so not there), a SIGTERM that comes with, or after, its main process's warm shutdown is
    left to that shutdown: the task hands back what it has not finished within seconds (told), and the child ends
    as the pool closes. Any other SIGTERM, or one after a cold shutdown was said, goes on to the handler billiard
    set, which ends the child as before."""
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        return
    ends = signal.getsignal(signal.SIGTERM)
    if not callable(ends):
        return
    _deferring = True

    def on_term(signum, frame) -> None:
        deadline = time.monotonic() + GROUP_S
        while not _told[COLD] and time.monotonic() < deadline:  # the main process hears it within a moment
            if _told[WARM]:
                return
            time.sleep(0.01)
        ends(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
