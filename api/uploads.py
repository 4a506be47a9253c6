"""Multipart uploads streamed straight into the blob store, hashed while they arrive."""

from __future__ import annotations

import logging
import time
import unicodedata

from flask import Request, current_app, g
from werkzeug.exceptions import BadRequest, RequestTimeout
from werkzeug.wsgi import LimitedStream

from api.errors import ApiError
from api.removal import queue_unnamed, reclaim
from clapq.blobs import BlobStore

log = logging.getLogger(__name__)


class StreamingRequest(Request):
    """Each uploaded file part is written to a BlobWriter instead of memory or a second temp file."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        store: BlobStore = current_app.extensions["clapq_blobs"]
        writer = store.writer()
        self._clapq_writers = getattr(self, "_clapq_writers", [])
        self._clapq_writers.append(writer)
        return writer

    def _get_stream_for_parsing(self):
        stream = super()._get_stream_for_parsing()
        return _FormInMemory(stream, self) if self.mimetype == "multipart/form-data" else stream

    def make_form_data_parser(self):
        parser = super().make_form_data_parser()
        parser.silent = False  # a broken body is said (_load_form_data), not read as a form with nothing in it
        return parser

    def _load_form_data(self) -> None:
        try:
            super()._load_form_data()
        except UnicodeDecodeError as exc:  # a part's headers, its filename most often (curl -F of a Latin-1 name)
            near = bytes(exc.object[max(0, exc.start - 40):exc.end + 20])  # the bytes around the first not UTF-8
            raise BadRequest(f"the form could not be read: a part's headers are not UTF-8 ({near!r}); "
                             "send each file's name (and each field's) as UTF-8") from None
        except ValueError as exc:  # cut short, no boundary: the client's to fix
            raise BadRequest(f"the form could not be read ({exc}): send multipart/form-data as a client library "
                             "writes it, whole, with its boundary in the Content-Type") from None
        if self.mimetype == "multipart/form-data":
            # werkzeug reads each byte of a text field that is not UTF-8 as U+FFFD before clapq sees it: a search's
            # filter matched nothing and an upload's metadata was stored changed, silently (a URL-encoded form's
            # bytes are checked by search, the one endpoint that takes one: api.search._utf8)
            for name, value in self.form.items(multi=True):
                # a part of the names files come in, sent with no filename (requests' `files=[("files", (None,
                # data))]`), is a text field of the file's bytes: its endpoint says it came as one, where this said
                # that its text was not UTF-8
                if "\ufffd" in value and name not in ("files", "audio"):
                    raise BadRequest(f"the form's field {name!r} holds U+FFFD (the replacement character): its text "
                                     "was not UTF-8, or was damaged before it was sent; send text as UTF-8")

    def queue_uploads(self, writers: list) -> list[str]:
        """Write-ahead for a crash: the bytes about to move into the store are queued for removal first, in
        a transaction of their own, and the commit of the rows that name them takes them off the queue
        (`clapq.blobs.unqueue_reclaim`). An API process killed in between (SIGKILL, out of memory, power)
        leaves files the maintenance loop removes once no item holds them, never files nothing names.
        Returns the digests."""
        digests = sorted({w.digest for w in writers})
        queue_unnamed(digests)
        self._clapq_queued = digests
        return digests

    def release_replaced(self) -> None:
        """Once the answer is sent: stored copies this request's parts replaced are freed, by the process's
        closer thread (BlobWriter.release_later)."""
        for w in getattr(self, "_clapq_writers", []):
            w.release_later()

    def keep_uploads(self) -> None:
        """The rows that name the parts committed into the store have committed: their blobs stay."""
        self._clapq_kept = True

    def discard_uploads(self) -> None:
        """At the request's end: remove the temporary files of parts not committed into the store, and
        reclaim the blobs of a request whose rows never committed (a library deleted meanwhile, a full disk
        at the third file, a database error), which only an item may keep."""
        writers = getattr(self, "_clapq_writers", [])
        for w in writers:
            if w.sha256 is None:
                w.discard()
        # every part moved into place was queued first (queue_uploads): their queue rows go, and each
        # stored copy no item holds
        stored = getattr(self, "_clapq_queued", [])
        if not stored or getattr(self, "_clapq_kept", False):
            return
        try:
            if "db" in g:
                g.db.rollback()  # ends its shared hold of BLOB_LOCK, which removal waits for
            reclaim(stored)
        except Exception:  # the database is away: the files stay queued, for the maintenance loop
            log.exception("could not remove a failed upload's files now; they stay queued",
                          extra={"files": len(stored)})


class _FormInMemory:
    """A multipart body as werkzeug's parser reads it, refused (413) once what it has read beside the bytes of
    file parts, which go to disk, passes twice MAX_FORM_MEMORY_SIZE: the form's text fields, held in memory, and
    the parts' headers. Werkzeug bounds each text field (16 MiB) and the number of parts (MAX_FORM_PARTS), not
    their sum: 1,016 fields of 16 MiB, within the request limit of 2 GiB, were all held, and a form of 640 MB of
    fields took an API process to 1.15 GB (helper-75). The largest form asked for, an upload's 'metadata' for
    1,000 files, is 16 MiB."""

    def __init__(self, stream, request: StreamingRequest) -> None:
        self._stream, self._request = stream, request
        self._most = 2 * current_app.config["MAX_FORM_MEMORY_SIZE"]
        self._read = self._in_files = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._read += len(data)
        if self._read - self._in_files > self._most:  # the files' bytes, counted again only now and then
            self._in_files = sum(w.size for w in getattr(self._request, "_clapq_writers", []))
            if self._read - self._in_files > self._most:
                raise ApiError(413, "payload_too_large", f"the form's parts other than files hold more than "
                               f"{self._most} bytes in all (their text and headers); send each file as a part "
                               "named 'files', and their metadata as one part named 'metadata'")
        return data


# the most of a body an answer that did not read it reads and drops (finish_bodies)
DRAIN_MAX_BYTES = 8 * 1024 * 1024
# and the longest it reads for (gunicorn's own drain after an answer waits as long): a client that sends the rest
# slowly, or not at all, is left to gunicorn, which closes the connection
DRAIN_MAX_S = 5.0
# the most of an answer written at once under CLAPQ_CLIENT_TIMEOUT_S, which bounds each write (finish_bodies): a
# client may take that long to read this much, 1 KiB/s at the default 60 s
ANSWER_PIECE_BYTES = 64 * 1024


class _BodyTimedOut(RequestTimeout):
    """A 408: the client stopped sending the body it announced."""


class _PacedBody:
    """The request's body (environ["wsgi.input"]) whose read that waits longer than the client timeout set on
    the connection's socket raises a 408 (`_BodyTimedOut`), instead of the socket's TimeoutError, which
    werkzeug reads as a client that went away."""

    def __init__(self, stream, timeout_s: float) -> None:
        self._stream, self._timeout_s, self.timed_out = stream, timeout_s, False

    def _guarded(self, read, *args):
        try:
            return read(*args)
        except TimeoutError:
            self.timed_out = True
            raise _BodyTimedOut(f"the request's body stopped arriving: nothing of it came for {self._timeout_s:g} s "
                                "(CLAPQ_CLIENT_TIMEOUT_S); send the request again") from None

    def read(self, *args):
        return self._guarded(self._stream.read, *args)

    def readline(self, *args):
        return self._guarded(self._stream.readline, *args)

    def readlines(self, *args):
        return self._guarded(self._stream.readlines, *args)

    def __iter__(self):
        return iter(self.readline, b"")


def _set_timeout(sock, seconds: float | None) -> None:
    try:
        sock.settimeout(seconds)
    except OSError:  # closed meanwhile
        pass


def finish_bodies(wsgi_app, max_request_bytes: int, client_timeout_s: int = 0):
    """WSGI middleware: a request answered before its body was read (a 401, a 404 for an unknown library, a
    429 while the backlog is full) has the rest of its body read and dropped before the answer goes out.
    Gunicorn would answer it "Connection: keep-alive" and then, finding more than 64 KiB unread, close the
    connection; a client that sends its next request on it at once (a `requests` session, any pool) has
    that request cut off without an answer. A body longer than DRAIN_MAX_BYTES, or than the request limit
    (the 413 that must not read it), is left to gunicorn: it closes after the answer, which a client still
    sending reads as its send fails (urllib3 does); so is one whose rest does not arrive within DRAIN_MAX_S.

    Under gunicorn (its connection's socket in the environ), every read of the request's body and every write
    of its answer waits at most `client_timeout_s` (CLAPQ_CLIENT_TIMEOUT_S; 0: for ever) for the client: a
    body that stops arriving is a 408 and the connection is closed, and so is one whose answer is not read.
    Each such client held one of the API's threads (2 processes x 4 by default) for as long as it kept its
    connection open: 8 connections that sent a request's headers and a few bytes of its body, with no key,
    stopped the whole API, its /healthz included, for good (helper-75)."""

    def app(environ, start_response):
        try:
            declared = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return wsgi_app(environ, start_response)
        sock = environ.get("gunicorn.socket")
        timeout_s = client_timeout_s if hasattr(sock, "settimeout") and client_timeout_s > 0 else None
        if declared and not environ.get("wsgi.input_terminated"):
            # a server may give the connection itself as the body (PEP 3333; werkzeug's own server does), and
            # reading past CONTENT_LENGTH there waits for the client's next request, which never comes while
            # it waits for this answer: the body is bounded, as gunicorn's is
            environ["wsgi.input"] = LimitedStream(environ["wsgi.input"], declared)
        body = None
        if timeout_s is not None:
            # gunicorn makes the socket blocking, with no timeout, at each request; the answer is written
            # with this one too
            _set_timeout(sock, timeout_s)
            body = environ["wsgi.input"] = _PacedBody(environ["wsgi.input"], timeout_s)
        result = wsgi_app(environ, start_response)
        # a body of unstated length is readable to its end only where the server says so (gunicorn does)
        if (body is None or not body.timed_out) and (declared or environ.get("wsgi.input_terminated")) \
                and declared <= min(max_request_bytes, DRAIN_MAX_BYTES):
            stream, left, until = environ["wsgi.input"], DRAIN_MAX_BYTES, time.monotonic() + DRAIN_MAX_S
            try:
                while left > 0 and (wait := until - time.monotonic()) > 0:
                    if timeout_s is not None:
                        _set_timeout(sock, min(wait, timeout_s))
                    if not (data := stream.read(min(left, 64 * 1024))):
                        break
                    left -= len(data)
            except Exception:  # the client went away, sent a broken chunk or too slowly: gunicorn closes the connection
                pass
            finally:
                if timeout_s is not None:
                    _set_timeout(sock, timeout_s)
        if timeout_s is not None and not isinstance(result, environ.get("wsgi.file_wrapper") or ()):
            # written a piece at a time: a socket's timeout bounds a whole sendall (Python's, since 3.5), so an
            # answer of megabytes in one write was cut off after CLAPQ_CLIENT_TIMEOUT_S to a client that read it
            # steadily over a slow link; the timeout is now how long a piece may wait. A file (an item's audio)
            # goes by sendfile, which waits that long for each block already
            return _Pieces(result)
        return result

    return app


class _Pieces:
    """An answer's body (a WSGI iterable) in pieces of at most ANSWER_PIECE_BYTES, closed as the iterable is."""

    def __init__(self, result) -> None:
        self._result = result

    def __iter__(self):
        for chunk in self._result:
            if len(chunk) <= ANSWER_PIECE_BYTES:
                yield chunk
                continue
            view = memoryview(chunk)  # bytes, as a WSGI server takes them
            for start in range(0, len(view), ANSWER_PIECE_BYTES):
                yield bytes(view[start : start + ANSWER_PIECE_BYTES])

    def close(self) -> None:
        if hasattr(self._result, "close"):
            self._result.close()


class QuietClientTimeouts(logging.Filter):
    """On gunicorn's error log: an answer's write that ran past CLAPQ_CLIENT_TIMEOUT_S (a client that reads
    nothing of it) is one warning line, not "Socket error processing request." and its traceback at ERROR, which
    any client could have written to the log at will."""

    def __init__(self, timeout_s: int) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg = ("closed the connection of a client that read nothing of its answer for %s s "
                          "(CLAPQ_CLIENT_TIMEOUT_S)")
            record.args = (self.timeout_s,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def display_name(raw: str | None) -> str:
    """A filename for display only: no directories, no control characters, bounded length."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    # control and formatting characters go (a direction override would make "gpj.wav" look like "vaw.jpg"), and
    # so do the line and paragraph separators (U+2028/9: a name shown as two lines), but not the joiners, which
    # are part of an emoji family and of Persian words (helper-42)
    name = "".join(c for c in name
                   if unicodedata.category(c)[0] != "C" and c not in "\u2028\u2029" or c in "\u200c\u200d").strip()
    if name in ("", ".", ".."):
        name = "unnamed"
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 190] + "." + ext[:8]) if dot and len(ext) <= 8 else name[:200]
    return name
