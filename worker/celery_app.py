"""Worker entry module: `celery -A worker.celery_app worker` (what `clapq worker` runs)."""

from celery.signals import setup_logging, worker_ready, worker_shutdown

from clapq import logs
from clapq.queue import make_celery
from clapq.settings import Settings

settings = Settings.from_env()
app = make_celery(settings)
app.autodiscover_tasks(["worker"], related_name="tasks", force=True)


@setup_logging.connect
def _logging(**_) -> None:
    logs.configure(settings.log_level)


@worker_ready.connect
def _announce(sender=None, **_) -> None:
    from clapq.presence import start

    start(app, sender.hostname if sender is not None else "worker")


@worker_shutdown.connect
def _retire(**_) -> None:
    from clapq.presence import stop

    stop(app)
