"""WSGI entry for gunicorn: `gunicorn api.wsgi:app` (what `clapq api` runs)."""

from api import create_app
from clapq import logs
from clapq.settings import Settings

logs.configure(Settings.from_env().log_level)
app = create_app()
