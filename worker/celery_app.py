"""Worker entry module: `celery -A worker.celery_app worker` (what `clapq worker` runs)."""

import logging

from celery.signals import setup_logging, worker_ready, worker_shutdown, worker_shutting_down

from clapq import logs
from clapq.queue import make_celery
from clapq.settings import Settings
from worker import stopping

settings = Settings.from_env()
app = make_celery(settings)
app.autodiscover_tasks(["worker"], related_name="tasks", force=True)


@setup_logging.connect
def _logging(**_) -> None:
    from celery.utils.log import get_multiprocessing_logger

    logs.configure(settings.log_level)
    # billiard's logger (a pool process that died: "Process 'ForkPoolWorker-1' pid:N exited with 'signal 9'") has
    # no handler of its own once this receiver replaces Celery's set-up, and wrote through Python's last resort, a
    # loose line among the JSON: through the root's handler it is a record like the rest. Its errors only, as
    # Celery's own set-up keeps (its info is each child's start)
    mp = get_multiprocessing_logger()
    if mp is not None:
        mp.propagate = True
        mp.setLevel(logging.ERROR)


@worker_ready.connect
def _announce(sender=None, **_) -> None:
    from clapq.presence import start

    start(app, sender.hostname if sender is not None else "worker")


@worker_shutting_down.connect
def _stop_tasks(how=None, **_) -> None:
    """A warm shutdown's start (SIGTERM, Ctrl-C): the pool children's tasks hand back what they have not finished
    within seconds, where a long recording's ran on past the supervisor's grace and was killed (worker.stopping).
    Also a cold one's (SIGQUIT, a second Ctrl-C): a pool child sent the same SIGTERM as this process (systemd's
    default KillMode) leaves it to a warm shutdown, not to a cold one (worker.stopping.defer_group_stop)."""
    stopping.tell(warm=how == "Warm")


@worker_shutdown.connect
def _retire(**_) -> None:
    from clapq.presence import stop

    stop(app)
