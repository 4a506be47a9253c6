"""Worker entry module: `celery -A worker.celery_app worker` (what `clapq worker` runs)."""

from clapq.queue import make_celery
from clapq.settings import Settings

app = make_celery(Settings.from_env())
app.autodiscover_tasks(["worker"], related_name="tasks", force=True)
