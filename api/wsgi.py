"""WSGI entry for gunicorn: `gunicorn api.wsgi:app` (what `clapq api` runs)."""

from api import create_app

app = create_app()
