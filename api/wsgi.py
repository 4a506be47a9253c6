"""WSGI entry for gunicorn: `gunicorn api.wsgi:app` (what `clapq api` runs)."""

import logging
import threading

import worker

# gunicorn forks this process from its master as it starts, and again after one died (a crash, the OOM killer), and
# the new one imports the app here; the master took worker.CODE as it started (clapq.cli.cmd_api), and holds modules
# of clapq it imported then. Where the code on disk changed since (clapq upgraded in place), this one would run the
# new API on that old code (an AttributeError, a TypeError in any request): refused, which stops the master (gunicorn
# halts on an app that cannot load), so that `clapq up` or the supervisor starts the API again, on the new code
if worker.code_on_disk() != worker.CODE:
    from gunicorn.errors import AppImportError

    from api import CODE_CHANGED

    raise AppImportError(CODE_CHANGED)

from api import create_app
from api.uploads import QuietClientTimeouts
from clapq import logs
from clapq.settings import Settings

logs.configure(Settings.from_env().log_level)
app = create_app()
# a client that read nothing of an answer for CLAPQ_CLIENT_TIMEOUT_S: a warning, not a traceback (api.uploads)
logging.getLogger("gunicorn.error").addFilter(QuietClientTimeouts(app.config["CLAPQ"].client_timeout_s))


def _load_text_tower() -> None:
    """Load (and run once) the text tower in the background as this API process starts, so that the
    first search it serves does not pay seconds of loading; a search arriving earlier waits for the
    same load (get_clap's lock), never loads twice."""
    try:
        with app.app_context():
            from api.query import _clap, on_model_thread

            on_model_thread(_clap(text_only=True).embed_text, ["warm-up"])
    except Exception as exc:
        # one line: the first text search reports the same error (with its traceback) if it is real; a
        # process stopped while still importing torch fails here too, and that is no error at all
        logging.getLogger(__name__).warning("text tower preload failed (%s: %s); the first text search loads it",
                                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


if app.config["CLAPQ"].preload_text:
    threading.Thread(target=_load_text_tower, name="text-preload", daemon=True).start()
