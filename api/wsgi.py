"""WSGI entry for gunicorn: `gunicorn api.wsgi:app` (what `clapq api` runs)."""

import logging
import threading

from api import create_app
from clapq import logs
from clapq.settings import Settings

logs.configure(Settings.from_env().log_level)
app = create_app()


def _load_text_tower() -> None:
    """Load (and run once) the text tower in the background as this API process starts, so that the
    first search it serves does not pay seconds of loading; a search arriving earlier waits for the
    same load (get_clap's lock), never loads twice."""
    try:
        with app.app_context():
            from api.query import _clap

            _clap(text_only=True).embed_text(["warm-up"])
    except Exception:  # the first search reports the same error to its caller
        logging.getLogger(__name__).warning("text tower preload failed", exc_info=True)


if app.config["CLAPQ"].preload_text:
    threading.Thread(target=_load_text_tower, name="text-preload", daemon=True).start()
