"""The clapq HTTP API: a Flask app factory that does no work at import (and never imports torch)."""

from __future__ import annotations

from flask import Blueprint, Flask, request

from clapq.blobs import BlobStore
from clapq.room import disk_reserve
from clapq.queue import make_celery
from clapq.settings import Settings

# what an API process forked on other code than its master's says as it stops (api.wsgi), and its master on a
# `kill -HUP` then (clapq.cli)
CODE_CHANGED = ("clapq: the code on disk changed since this API started (clapq upgraded in place?): a process it starts "
                "now would run the new API on the old code; stopping, to be started again on the new")


def create_app(settings: Settings | None = None) -> Flask:
    from api import (auth, batches, db, errors, health, items, jobs, libraries, metrics, openapi, ratelimit, search,
                     tagging, web)
    from api.uploads import StreamingRequest, finish_bodies

    settings = (settings or Settings.from_env()).require_urls()
    app = Flask(__name__, static_folder=None)  # no files to serve: a /static/ route answered in werkzeug's words
    app.request_class = StreamingRequest
    app.wsgi_app = finish_bodies(app.wsgi_app, settings.max_request_bytes, settings.client_timeout_s)
    # a path with an empty id (`/v1/items//segments`) is a 404 in the JSON envelope, not a redirect page
    app.url_map.merge_slashes = False
    app.json = errors.ClientJSON(app)  # bodies as api.errors.parse_json reads them
    app.config.update(
        CLAPQ=settings,
        # 413 before the body is read when Content-Length says too much; chunked bodies stop at the limit
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        MAX_FORM_MEMORY_SIZE=16 * 1024 * 1024,
        MAX_FORM_PARTS=settings.max_files_per_batch + 16,
    )
    app.extensions["clapq_blobs"] = BlobStore(settings.blob_dir, disk_reserve(settings.blob_dir, settings.data_dir,
                                                                              settings.disk_reserve_mb))
    app.extensions["clapq_celery"] = make_celery(settings, sender=True)
    ratelimit.install(app, settings.rate_limit)
    errors.register(app)
    app.teardown_appcontext(db.close_db)
    # a file part that no handler committed into the store (a search's `audio` clip, a refused batch)
    # leaves no temporary file behind
    app.teardown_request(lambda exc: request.discard_uploads())
    app.after_request(_release_replaced_after_sending)
    # OPTIONS of any path, ahead of /v1's key check (a browser's CORS preflight carries no key): /healthz's was
    # Flask's empty 200 labelled text/html, where /v1's was a 204 (helper-143)
    app.before_request(errors.options)

    v1 = Blueprint("v1", __name__, url_prefix="/v1")
    v1.before_request(auth.require_tenant)
    v1.before_request(ratelimit.check_request)  # before any handler reads a body
    v1.before_request(errors.plain_query)
    v1.before_request(errors.uncompressed_body)  # before any handler reads a body
    v1.before_request(errors.bodiless)
    for module in (libraries, batches, jobs, items, search, tagging):
        v1.register_blueprint(module.bp)
    app.register_blueprint(v1)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(web.bp)
    metrics.register(app)
    return app


def _release_replaced_after_sending(response):
    """Stored copies an upload replaced are freed once its answer has gone out, not before (see
    clapq.blobs.BlobWriter.release): the answer's time does not depend on whether the bytes were stored."""
    if getattr(request, "_clapq_writers", None):
        response.call_on_close(request._get_current_object().release_replaced)
    return response
