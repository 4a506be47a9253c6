"""Items: one audio file, its metadata, its pooled vector and its original bytes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import unicodedata
from pathlib import PurePosixPath
from urllib.parse import quote

from flask import Blueprint, current_app, jsonify, request, send_file
from sqlalchemy import select
from werkzeug.http import http_date, parse_date, parse_etags, parse_range_header

from api.db import db
from api.auth import audio_link
from api.errors import (ApiError, bad_request, check_metadata, integer, json_body, no_body, not_found,
                        refuse_unknown, takes_query, yes_no)
from api.lookup import owned, owned_item, refreshed
from api.models_info import describe
from api.query import item_vector
from api.removal import announce_gone, delete_items, released
from clapq.models import Item, Library, Segment
from worker.windows import span_json

bp = Blueprint("items", __name__)
log = logging.getLogger(__name__)

# Only audio types we recognise are ever sent as such; anything else is a download.
SAFE_TYPES = {
    # libsndfile's names ("wavex": WAVE_FORMAT_EXTENSIBLE, as 24-bit, float and multichannel WAVs are written)
    "wav": "audio/wav", "wavex": "audio/wav", "rf64": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg",
    "mp3": "audio/mpeg", "aiff": "audio/aiff", "caf": "audio/x-caf", "au": "audio/basic",
    # FFmpeg's (the first of a demuxer's names)
    "mov": "audio/mp4", "mp4": "audio/mp4", "matroska": "audio/x-matroska", "webm": "audio/webm", "aac": "audio/aac",
    "ac3": "audio/ac3", "eac3": "audio/eac3", "wv": "audio/x-wavpack", "avi": "video/x-msvideo",
    "asf": "video/x-ms-asf", "flv": "video/x-flv", "mpeg": "video/mpeg",
}


def media_type(item: Item) -> str:
    """The Content-Type a stored file is served with: by its decoded container, never by its name alone
    (nosniff keeps a browser to it). WebM is told from Matroska by its header since session 29; a WebM stored
    before is told by its name."""
    fmt = (item.audio_format or "").split(",")[0]
    if fmt == "matroska" and (item.filename or "").lower().endswith((".webm", ".weba")):
        return "audio/webm"
    return SAFE_TYPES.get(fmt, "application/octet-stream")


def item_json(item: Item) -> dict:
    return {
        "id": str(item.id), "library_id": str(item.library_id), "job_id": str(item.job_id),
        "filename": item.filename, "sha256": item.sha256, "size_bytes": item.size_bytes,
        "duration_s": item.duration_s, "sample_rate": item.sample_rate, "channels": item.channels,
        "format": item.audio_format, "metadata": item.meta or {}, "status": item.status,
        "error": item.error, "attempts": item.attempts, "warning": item.warning, "progress": _progress(item),
        "created_at": item.created_at.isoformat() if item.created_at else None,
    }


def _progress(item: Item) -> float | None:
    """The share of the file embedded: of a running file of more windows than a batch, its windows so far
    (its worker records them every 2 s), else 0; none for a file that failed or was cancelled."""
    if item.status == "running":
        return round(item.progress or 0.0, 4)  # as a job's
    return {"queued": 0.0, "done": 1.0}.get(item.status)


ETAG = re.compile(r"[0-9a-f]{32}")  # what _etag gives


def _etag(body: dict) -> str:
    """The ETag of an item shown as `body` (item_json): a hash of it (keys sorted), as a strong validator must
    change with the representation (helper-44): with its metadata, and with its status and progress too, so
    a PATCH on an item being embedded may meet a 412 and need a GET again."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def _with_etag(item: Item):
    body = item_json(item)
    response = jsonify(body)
    response.set_etag(_etag(body))
    return response


@bp.get("/items/<item_id>")
def get_item(item_id: str):
    # If-None-Match with the ETag held: 304, no body (it was a 200 with the body, helper-52); werkzeug's
    # make_conditional would also answer a failed If-Match with a 412 that carries the item (helper-53)
    response = _with_etag(owned(Item, item_id, "item"))
    held = request.if_none_match
    if held and (held.star_tag or held.contains_weak(response.get_etag()[0])):
        return current_app.response_class(status=304, headers={"ETag": response.headers["ETag"]})
    return response


@bp.patch("/items/<item_id>")
def patch_item(item_id: str):
    """Replace the item's metadata with `{"metadata": {...}}`: the way to change it, since the same bytes
    uploaded again with other metadata are a copy of this item and leave it as it is. Search filters see
    the new metadata at once; the vectors do not change. With `If-Match: <the ETag a GET gave>` it is
    replaced only if the item has not changed since (else 412), so that an edit made by someone else
    between that GET and this PATCH is not overwritten (the row is locked from the check to the commit)."""
    body = json_body()
    example = ('send a JSON object like {"metadata": {"category": "rain"}} (the metadata replaces what the item '
               "has; {} clears it)")
    if isinstance(body, dict):  # a misspelt "metdata", or a "filename" sent to rename it, named (helper-108)
        refuse_unknown(body, {"metadata"}, "PATCH /v1/items/<id>", "it takes 'metadata' only: " + example)
    if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
        raise bad_request(example)
    check_metadata(body["metadata"], "'metadata'")
    item = owned(Item, item_id, "item", lock=True)
    # the item's ETag, for the preconditions given (most PATCHes give none)
    now = _etag(item_json(item)) if "If-Match" in request.headers or "If-None-Match" in request.headers else None
    if "If-Match" in request.headers:
        tags = parse_etags(request.headers["If-Match"])
        if tags.is_weak(now) and not tags.contains(now):  # a proxy's W/"..." (nginx's gzip): never matches
            raise ApiError(412, "precondition_failed", f'If-Match: W/"{now}" is a weak ETag, which If-Match never '
                           f'matches (RFC 9110); send it as "{now}"')
        if not (tags.star_tag or tags.contains(now)):  # strong comparison, as If-Match asks
            if not any(isinstance(t, str) and ETAG.fullmatch(t) for t in tags.as_set(include_weak=True)):
                raise ApiError(412, "precondition_failed", f"If-Match: {request.headers['If-Match'][:80]!r} is not "
                               f'an ETag this API gives (an item\'s is 32 hex digits in quotes: now "{now}"); '
                               "send the ETag header a GET of the item gave")
            raise ApiError(412, "precondition_failed", f'If-Match: the item has changed since that ETag was read '
                           f'(its metadata, or its status or progress: it is now "{now}"); GET it again and make '
                           'the change on what it holds now')
    if "If-None-Match" in request.headers:  # "*": only if the item does not exist; an ETag: unless it has it
        tags = parse_etags(request.headers["If-None-Match"])
        if tags.star_tag or tags.contains_weak(now):
            raise ApiError(412, "precondition_failed", "If-None-Match: the item exists"
                           + ("" if tags.star_tag else f' and has that ETag ("{now}")') + "; nothing was changed")
    item.meta = body["metadata"]
    db().commit()
    # answered as stored, as a GET would show it, ETag included: Postgres writes out a number as 1e20 was
    # sent, and the answer's ETag, sent back with If-Match, met a 412 (helper-52)
    return _with_etag(refreshed(item, "item"))


@bp.delete("/items/<item_id>")
def delete_item(item_id: str):
    """The item, its vectors and its place in its job, at once; its stored file too, unless another item
    (in any library) holds the same bytes. Queued or running, it is simply never embedded."""
    item = owned(Item, item_id, "item")
    gone = delete_items(db(), Item.id == item.id)
    if not gone:  # another request deleted it first
        raise not_found("item")
    announce_gone()
    return {"deleted": {"item": str(item.id), "items": 1, "stored_files": released(list(gone.values()))}}


@bp.get("/items/<item_id>/embedding")
def get_embedding(item_id: str):
    item, vec = item_vector(item_id)
    model = describe(db().get(Library, item.library_id).model_id)
    return {"item_id": str(item.id), "model": model, "dim": len(vec), "vector": [float(x) for x in vec]}


@bp.get("/items/<item_id>/segments")
@takes_query("vectors")
def get_segments(item_id: str):
    """The item's embedded windows, in time order; `?vectors=1` includes each vector (for export)."""
    item, lib = owned_item(item_id)
    with_vectors = yes_no("vectors", "use vectors=1 to include each vector, or leave it out")
    cols = [Segment.window_index, Segment.start_s, Segment.end_s] + ([Segment.vector] if with_vectors else [])
    rows = db().execute(select(*cols).where(Segment.item_id == item.id, Segment.model_id == lib.model_id)
                        .order_by(Segment.window_index)).all()
    segments = []
    for row in rows:
        seg = {"index": row.window_index, **span_json(row.start_s, row.end_s)}
        if with_vectors:
            seg["vector"] = [float(x) for x in row.vector]
        segments.append(seg)
    return {"item_id": str(item.id), "status": item.status, "model": describe(lib.model_id), "segments": segments}


def attachment(filename: str, item_id: str) -> str:
    """Content-Disposition for a download: the name in UTF-8 (RFC 6266 `filename*`) and a plain-ASCII
    `filename` that is never empty, for clients that read only that one (curl -OJ): accents dropped,
    quotes, backslashes and percent signs removed (a browser may read "%2e%2e%2f" in `filename` as
    "../", RFC 6266 appendix D; the name is then in `filename*` whole), and the item's id where nothing of
    the name is left ("雨.wav" ->
    "<id>.wav", where Werkzeug gave ".wav", a hidden file, and "" for "雨"); a name that is a hidden file's
    in both forms (".wav") gets the id before it."""
    def ascii_of(text: str) -> str:
        plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        return "".join(c for c in plain if c.isprintable() and c not in '"\\%').strip()

    if filename.startswith("."):  # a name reduced to its suffix ("\u200b.wav" is stored as ".wav"): not hidden
        filename = item_id + filename
    name = PurePosixPath(filename)
    stem, suffix = ascii_of(name.stem), ascii_of(name.suffix) if name.suffix.isascii() else ""
    fallback = f"{stem or item_id}{suffix if suffix != '.' else ''}"
    header = f'attachment; filename="{fallback}"'
    return header if fallback == filename else f"{header}; filename*=UTF-8''{quote(filename, safe='')}"


def _modified(item: Item) -> dt.datetime:
    """The download's Last-Modified: when this item was created, whole seconds (as HTTP dates are). Not the
    stored file's mtime: that file is shared by every item of the same bytes, in any tenant's library, and
    its time said when another tenant first uploaded them (helper-35)."""
    return item.created_at.astimezone(dt.timezone.utc).replace(microsecond=0)


def _preconditions(item: Item) -> None:
    """If-Match, else If-Unmodified-Since (RFC 9110 13.2.2): a 412 in the envelope when it fails. Werkzeug
    answered a failed If-Match 412 with the whole file as its body, and ignored If-Unmodified-Since. Both
    are taken off the request once checked; If-None-Match, If-Modified-Since and Range stay werkzeug's."""
    env = request.environ
    failed = None
    if "HTTP_IF_MATCH" in env:
        tags = parse_etags(env.pop("HTTP_IF_MATCH"))
        if not (tags.star_tag or tags.contains(item.sha256)):  # strong comparison: the ETag is the bytes' hash
            failed = f"If-Match: the file's ETag is \"{item.sha256}\""
        env.pop("HTTP_IF_UNMODIFIED_SINCE", None)
    elif "HTTP_IF_UNMODIFIED_SINCE" in env:
        since = parse_date(env.pop("HTTP_IF_UNMODIFIED_SINCE"))  # None where it does not parse: ignored
        modified = _modified(item)
        if since is not None and modified > since:
            failed = f"If-Unmodified-Since: the file was last modified {http_date(modified)}"
    if failed:
        raise ApiError(412, "precondition_failed", f"{failed}; the condition does not hold")


class DamagedFile(RuntimeError):
    """A stored file whose bytes, sent, did not hash to its name (no OSError: gunicorn takes those for the client's)."""


DOWNLOAD_BLOCK = 1 << 20  # what a verified download reads and sends at a time


class _Verified:
    """The body of a download of a whole stored file, hashed as it goes out, its last block held back until the
    hash is known: a damaged copy (bit rot, an edit by hand) was sent whole, with its item's ETag, and looked like
    the uploaded bytes. Where the hash is not the file's name, the block is not sent and the server cuts the
    connection (nothing sent yet: a 500), so the client has a body shorter than its Content-Length, never a whole
    200. Read from the file in blocks of DOWNLOAD_BLOCK: the 8 KiB blocks of the file wrapper it replaces, each a
    Python loop and a send, cost a 200 MB download 6 times the CPU of the sendfile it had before (0.25 s to 0.04 s),
    where the hash alone is about half of that; memory stays two blocks. A range of part of the file is not hashed
    (it would read the whole file for a few bytes)."""

    def __init__(self, file, body, item: Item) -> None:
        self._file, self._body, self._sha256, self._item_id = file, body, item.sha256, str(item.id)

    def __iter__(self):
        h, held = hashlib.sha256(), None
        while block := self._file.read(DOWNLOAD_BLOCK):
            if held:
                yield held
            h.update(block)
            held = block
        if (got := h.hexdigest()) != self._sha256:
            message = (f"the stored file {self._sha256} of item {self._item_id} is damaged (its bytes hash to {got}): "
                       "its download was cut off before its last bytes; run `clapq check --verify` to find every "
                       "damaged stored file, and how to mend them")
            log.error(message, extra={"item_id": self._item_id, "sha256": self._sha256})
            raise DamagedFile(message)
        if held:
            yield held

    def close(self) -> None:
        self._file.close()
        if hasattr(self._body, "close"):  # send_file's own open of the file, not read
            self._body.close()


class _Part:
    """The body of a range of part of a stored file, read from the range's first byte in blocks of DOWNLOAD_BLOCK.
    Werkzeug's own skips to the range by reading where its file wrapper cannot seek, and gunicorn's
    (wsgi.file_wrapper) cannot: every byte before the range was read and thrown away, 8 KiB at a time (a browser's
    player seeking to minute 13 of a 20-minute FLAC read 62 MB from the disk to send 30 MB)."""

    def __init__(self, file, body, start: int, stop: int) -> None:
        self._file, self._body, self._start, self._left = file, body, start, stop - start

    def __iter__(self):
        self._file.seek(self._start)
        while self._left > 0 and (block := self._file.read(min(DOWNLOAD_BLOCK, self._left))):
            self._left -= len(block)
            yield block

    def close(self) -> None:
        self._file.close()
        if hasattr(self._body, "close"):
            self._body.close()


LINK_DEFAULT_S, LINK_MOST_S = 3600, 7 * 24 * 3600


@bp.post("/items/<item_id>/audio-link")
@takes_query("expires_in_s")
def make_audio_link(item_id: str):
    """A URL of the item's audio that needs no Authorization header: for an <audio> element (the search page's
    player), which streams it with range requests and seeks, where fetching it with the key read a whole 2-hour
    recording into the browser before a note played. It opens this item's audio only, until it expires
    (`expires_in_s`, an hour unless given) or the key that asked for it is revoked."""
    no_body("give expires_in_s in the query string (?expires_in_s=60)")
    item = owned(Item, item_id, "item")
    lasts = integer(request.args.get("expires_in_s"), "expires_in_s", 1, LINK_MOST_S, LINK_DEFAULT_S)
    token, expires = audio_link(str(item.id), lasts)
    return {"url": f"/v1/items/{item.id}/audio?link={token}",
            "expires_at": dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat()}


@bp.get("/items/<item_id>/audio")
@takes_query("link")
def get_audio(item_id: str):
    """The stored file, as uploaded; with the caller's key, or `?link=` from POST /v1/items/<id>/audio-link."""
    item = owned(Item, item_id, "item")
    path = current_app.extensions["clapq_blobs"].path_for(item.sha256)  # the app's, not one made each request
    if not path.is_file():
        raise not_found("audio")
    st = path.stat()  # once, for the range
    _preconditions(item)
    if "HTTP_RANGE" in request.environ:
        ranges = parse_range_header(request.environ["HTTP_RANGE"])
        if ranges is None or ranges.units != "bytes" or len(ranges.ranges) != 1:
            # a unit other than bytes, or a header that does not parse, is ignored (RFC 9110 14.2), and so
            # are several ranges at once: the whole file, 200, where werkzeug would answer 416; a single
            # range past the end is still 416
            del request.environ["HTTP_RANGE"]
        elif ranges.ranges[0][0] < 0 and -ranges.ranges[0][0] > st.st_size:
            # the last N bytes of a file shorter than N: the whole file (RFC 9110 14.1.2), where werkzeug
            # answers 416
            request.environ["HTTP_RANGE"] = "bytes=0-"
    response = send_file(path, mimetype=media_type(item), conditional=True, etag=item.sha256,
                         last_modified=_modified(item))
    whole = response.status_code == 200 or (response.status_code == 206 and response.content_range.start == 0
                                            and response.content_range.stop == st.st_size)
    if (whole or response.status_code == 206) and response.response is not None:
        try:
            file = path.open("rb", buffering=0)  # unbuffered: each read a block, not copied through a buffer
        except FileNotFoundError:  # deleted since send_file opened it
            response.close()
            raise not_found("audio") from None
        response.response = _Verified(file, response.response, item) if whole else _Part(
            file, response.response, response.content_range.start, response.content_range.stop)
    response.headers["Content-Disposition"] = attachment(item.filename, str(item.id))
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    # a tenant's file: no shared cache keeps it (a request by link sends no Authorization, which alone kept them off)
    response.headers["Cache-Control"] = "private, no-cache"
    return response
