"""gunicorn's worker classes, answering the requests gunicorn refuses itself in the API's JSON envelope.

A request gunicorn cannot parse (a malformed request line, a bad Content-Length, a request line or headers over
its limits) never reaches the app: gunicorn answered it with a short HTML page, where every other error of the API
is `{"error": {"code", "message", "status"}}` (api.errors). gunicorn has no setting for that page (its issue 993):
its Worker.handle_error picks the status, logs the request and writes the page through gunicorn.util.write_error,
its only caller. Each worker process replaces that writer with one that writes the envelope, and keeps gunicorn's
status, its logging and its closing of the connection. `clapq api` names these classes (--worker-class).

A download of a damaged stored file (api.items) is cut off by raising DamagedFile from its body, once the app
has logged why in one line: gunicorn logged it again, "Error handling request" and a traceback repeating the
line. The worker drops gunicorn's record of that one exception, and keeps its cut (or its 500, where nothing
was sent yet)."""

from __future__ import annotations

import json
import logging

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker
from gunicorn.workers.sync import SyncWorker

from api.errors import error_body, error_code
from api.items import DamagedFile


def _not_logged_yet(record: logging.LogRecord) -> bool:
    """gunicorn's record of a request that failed, but for a DamagedFile: the app logged that one already."""
    return not (record.exc_info and isinstance(record.exc_info[1], DamagedFile))


class JsonErrors:
    """Mixin for a gunicorn worker class: its own error answers in the envelope."""

    def init_process(self) -> None:
        # in the worker process, after the fork: the master writes no answer
        util.write_error = self.write_error
        self.log.error_log.addFilter(_not_logged_yet)
        super().init_process()

    def write_error(self, sock, status_int: int, reason: str, mesg: str) -> None:
        """gunicorn.util.write_error's part: the answer to a request gunicorn refused (or whose app raised past
        Flask, a 500), closing the connection as gunicorn's page did."""
        code, message = error_code(status_int, reason), self.sentence(status_int, mesg)
        body = json.dumps(error_body(status_int, code, message), separators=(",", ":")).encode()  # as Flask writes it
        head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"X-Content-Type-Options: nosniff\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        util.write_nonblock(sock, head.encode("latin-1") + body)

    def sentence(self, status: int, said: str) -> str:
        """What the client is told: what to change, and gunicorn's own words (which name the header or show the
        line it could not parse: the client's bytes, cut short)."""
        said = said[:300]
        if status == 414:
            return (f"the request line (method, path and query string) is longer than {self.cfg.limit_request_line} "
                    "bytes, and was not read; send long parameters in a POST's JSON body (POST /v1/search takes a "
                    f"search's) ({said})")
        if status == 431:
            return (f"the request has more than {self.cfg.limit_request_fields} header fields, or one over "
                    f"{self.cfg.limit_request_field_size} bytes, and was not read; send fewer, shorter headers ("
                    f"{said})")
        if status == 500:
            return "internal error; the server log has details"
        return f"the request is not valid HTTP, and was not read: {said}" if status == 400 else said


class JsonErrorThreadWorker(JsonErrors, ThreadWorker):
    """gunicorn's gthread worker (what `--threads` above 1 runs)."""


class JsonErrorSyncWorker(JsonErrors, SyncWorker):
    """gunicorn's sync worker (what one thread a process runs)."""
