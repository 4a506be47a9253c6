"""One JSON error envelope for every error: {"error": {"code", "message", "status"}}."""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from decimal import Decimal

from flask import Flask, current_app, g, has_app_context, jsonify, request
from flask.json.provider import DefaultJSONProvider
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import exc as orm_exc
from werkzeug.exceptions import (HTTPException, MethodNotAllowed, NotFound, RequestedRangeNotSatisfiable,
                                 RequestEntityTooLarge)

from clapq.blobs import StorageFull, StorageUnwritable
from clapq.checkpoint import ModelUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a client can act on."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def not_found(what: str) -> ApiError:
    # other tenants' ids look exactly like unknown ones: 404, never 403
    return ApiError(404, "not_found", f"{what} not found")


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def code_changed(what: str, why: str | None = None) -> ApiError:
    """A 503 no wait mends (the client stops on it): `what` needs code this API process has not loaded, and the code on
    disk is no longer what it started with (clapq upgraded in place: `git pull`, `pip install -U` into its
    environment). Loaded now, the new code would run beside the old, whose calls into each other are a 500 at best (an
    ImportError, a TypeError) and a wrong answer at worst; the process is to be restarted, to run the new throughout."""
    why = why or ("clapq's code changed on disk since the API started (upgraded in place?), and what it would load now "
                  "is other code than the API runs; the API must be restarted")
    # under `clapq up` whoever reads this runs the API: restarting up is what starts it on the new code
    up = has_app_context() and current_app.config["CLAPQ"].under_up
    return ApiError(503, "code_changed", f"{what}: {why} ("
                    + ("restart `clapq up`: Ctrl-C, then start it again" if up else "ask the API's operator") + ")")


MAX_DEPTH = 32  # nesting of JSON a client sends: metadata, filters; deeper is a mistake or an attack


MAX_METADATA_BYTES = 16 << 10  # an item's metadata as JSON: tags, a path, a description; every search result carries it


def refuse_unknown(given, takes, what: str, then: str, where: str = "the body") -> None:
    """A 400 naming the first field of `given` (a JSON object's keys, a form, a query string) that `what` does
    not take: a misspelt one ("filters", "limit") would otherwise be dropped unseen, and the answer quietly
    other than asked for. `then` says what to send instead."""
    if extra := sorted(set(given) - set(takes)):
        raise bad_request(f"{where} has {extra[0]!r}, which {what} does not take; {then}")


def metadata_bytes(meta: dict) -> int:
    """The size an item's metadata is held to: its compact JSON in UTF-8, as Postgres gives it back. Postgres
    keeps a JSON number exactly and writes it out in full, so 1e300 (5 bytes sent) comes back as 301 digits:
    2,300 of them made a 14 KB PATCH an item of 695 KB in every search result and page that held it, whose
    metadata GET gave could not be sent back (helper-52)."""
    return len(json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()) + _written_out(meta)


def _written_out(value) -> int:
    """How many bytes longer the floats in `value` come back than Python's JSON writes them (the shortest
    repr: '1e+300'): Postgres writes a number without an exponent, and one with no fraction then reads back
    as an integer of all its digits (a small one, '0.00000015', reads back as the float it was)."""
    extra, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            written = format(Decimal(repr(v)), "f")
            if "." not in written:
                extra += max(0, len(written) - len(repr(v)))
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return extra


def check_metadata(meta: dict, where: str) -> None:
    """An item's metadata must stay small: each search result carries it, and so does each page of items."""
    size = metadata_bytes(meta)
    if size > MAX_METADATA_BYTES:
        stored = " as stored (numbers written out in full: 1e300 is 301 digits)" if _written_out(meta) > 0 else ""
        raise ApiError(413, "metadata_too_large", f"{where} is {size} bytes of JSON{stored}; an item's metadata "
                       f"may have at most {MAX_METADATA_BYTES}")


def check_text(value, where: str) -> None:
    """Refuse a NUL character or an unpaired surrogate (JSON allows "\\u0000" and "\\ud800") in any string
    of `value`, dict keys included (Postgres stores neither, so they would fail deep inside as a 500),
    and nesting deeper than MAX_DEPTH."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise bad_request(f"{where} is nested more than {MAX_DEPTH} levels deep")
            children = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend((x, depth + 1) for x in children)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{where} has text with an unpaired surrogate (not valid Unicode)") from None
            if "\x00" in v:
                raise bad_request(f"{where} has text with a NUL character (\\u0000 or %00)")


# values a JSON text may hold (its commas and opening brackets counted, those in strings too): 16 MiB of
# `[{},{},...]` is 5.6 million dicts, which took an API process 800 MB to parse (helper-75); a million is ~80 MB.
# The largest asked for: 10,000 moves of ~15 values, an upload's 'metadata' of 1,000 files of ~1,000 values
MAX_JSON_VALUES = 1_000_000


def shows_nothing(c: str) -> bool:
    """Whether `c` is a letter, mark or symbol that shows nothing: those Unicode calls Default_Ignorable beside its
    format characters (a variation selector, U+FE0F alone, an emoji's left without it; a Hangul filler, U+3164,
    pasted as a "blank" name; the combining grapheme joiner; Khmer's inherent vowels), and the braille blank
    (U+2800), the other "invisible character" pasted where a field must not be empty. A query of them alone was
    searched for (its arbitrary vector gave a page of results), and a library of such a name looked nameless."""
    return (c in "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u2800\u3164\uffa0"
            or "\ufe00" <= c <= "\ufe0f" or "\U000e0100" <= c <= "\U000e01ef")


def nothing_to_show(text: str) -> bool:
    """Whether `text` holds only spaces, control and format characters (a zero-width space) and those that show
    nothing: nothing to embed, whose arbitrary vector still scores (a private-use character is something: an icon
    font's). A query or a classify label of them alone is refused."""
    return all((kind := unicodedata.category(c))[0] == "Z" or kind in ("Cc", "Cf", "Cs", "Cn") or shows_nothing(c)
               for c in text)


MAX_INT_DIGITS = 4300  # of an integer in JSON a client sends: Python's int_max_str_digits, which int() keeps to


def _json_values(raw: str | bytes) -> int:
    """An upper bound, cheaply counted, on how many values (objects, arrays and items) JSON text holds."""
    marks = (",", "[", "{") if isinstance(raw, str) else (b",", b"[", b"{")
    return sum(raw.count(m) for m in marks)


def parse_json(raw: str | bytes, where: str):
    """JSON text a client sent, as check_text allows it, of at most MAX_JSON_VALUES values (a 413). NaN and
    Infinity (which Python's parser takes but JSON does not have), numbers a float cannot hold (1e400, 1e-400) and
    nesting too deep for the parser are 400s here instead of 500s later or a value other than the one sent; other
    malformed JSON raises ValueError for the caller to word."""
    def no_constant(name: str):
        raise bad_request(f"{where} has {name}, which is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise bad_request(f"{where} has {text[:40]}, a number larger than a 64-bit float holds (about 1.8e308)")
        if value == 0 and any(c in "123456789" for c in text.lower().partition("e")[0]):
            # 1e-400 was read as 0 and stored so: a number sent is never kept as another
            raise bad_request(f"{where} has {text[:40]}, a number closer to 0 than a 64-bit float holds (about "
                              "5e-324), which would be read as 0; send 0 if 0 is meant")
        return value

    def whole(text: str) -> int:  # past it, Python's ValueError told the client to call sys.set_int_max_str_digits
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            raise bad_request(f"{where} has an integer of {len(text.lstrip('-'))} digits; a number may have at most "
                              f"{MAX_INT_DIGITS}")
        return int(text)

    def once(pairs: list) -> dict:  # a key given twice would be read as its last value, silently
        obj = dict(pairs)
        if len(obj) < len(pairs):  # which one, in one pass (comparing each with the ones before took hours)
            seen: set = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise bad_request(f"{where} gives {twice!r} more than once; give it once")
        return obj

    if _json_values(raw) > MAX_JSON_VALUES:  # before it is parsed: its objects would be built first
        raise ApiError(413, "payload_too_large", f"{where} holds more than {MAX_JSON_VALUES} values (counted by its "
                       "commas and brackets, those in its strings too); send fewer at a time")
    try:
        value = json.loads(raw, parse_constant=no_constant, parse_float=finite, parse_int=whole, object_pairs_hook=once)
    except RecursionError:
        raise bad_request(f"{where} is nested more than {MAX_DEPTH} levels deep") from None
    check_text(value, where)
    return value


def small_body() -> bytes:
    """The request's body, read into memory: at most MAX_FORM_MEMORY_SIZE (16 MiB; the largest JSON body
    asked for, 10,000 digests to /known, is under 1 MB), a 413 over it. The request limit (2 GiB) is for
    uploads, which stream to disk."""
    most = current_app.config["MAX_FORM_MEMORY_SIZE"]
    over = f"a JSON body or a form without files may be at most {most} bytes"
    if (request.content_length or 0) > most:
        raise ApiError(413, "payload_too_large", f"the body is {request.content_length} bytes; {over}")
    # a chunked body has no length to check first: it is read up to one byte over the limit and no further
    # (the request's own limit, 2 GiB for uploads, would let it fill the API's memory)
    request.max_content_length = min(most + 1, request.max_content_length or most + 1)
    try:
        data = request.get_data(cache=True)
    except RequestEntityTooLarge:
        data = None
    if data is None or len(data) > most:
        raise ApiError(413, "payload_too_large", f"the body is over the limit: {over}")
    return data


def sent_as_json() -> bool:
    """Whether a body labelled as a URL-encoded form is JSON, as `curl -d` sends it: an object or array
    (parsing or not: its error is then said), or any other JSON value (`curl -d '"rain"'` was read as a form
    field named '"rain"'). A form's `name=value&...` never parses as JSON."""
    data = small_body().lstrip()
    if data[:1] in (b"{", b"[", b'"'):
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def json_body():
    """The request's JSON body, whatever its Content-Type says (`curl -d '{...}'` sends JSON as a form,
    which get_json ignores: the client was told to send the JSON object it had sent); None when it is not
    JSON (the caller says what to send), and a 400 saying where it fails to parse when it looks like JSON
    (a trailing comma was told "send a JSON object like ..."). Only the Authorization header admits a
    request, which a page's form cannot set."""
    data = small_body()
    try:
        return parse_json(data, "the JSON body")
    except ValueError as exc:  # json's errors, and bytes that are no text (UnicodeDecodeError)
        if data.lstrip()[:1] in (b"{", b"["):
            raise bad_request(f"the JSON body does not parse: {exc}") from None
        return None


class ClientJSON(DefaultJSONProvider):
    """Flask's JSON, with request bodies read by parse_json (what `request.get_json()` returns)."""

    sort_keys = False

    def loads(self, s, **kwargs):
        return parse_json(s, "the JSON body")


# the parameters a request may repeat (search across several libraries); any other given twice would be
# read as its first value, silently
REPEATABLE = frozenset({"library_id", "library_ids"})


# the fields of a form or a query string that hold JSON text (a search's, an upload's)
JSON_FIELDS = ("filter", "metadata")


def _as_keys(name: str) -> str:
    return (f"a dict given as a form field's value, as in requests.post(url, data={{{name!r}: {{...}}}}), is sent as "
            "its keys alone: send json.dumps of it")


def given_once(fields, where: str) -> None:
    """Refuse a field (of a query string or a form: a werkzeug MultiDict) given more than once. A JSON field that
    came as several values none of which is a JSON object is a dict's keys, as `requests` sends a dict given as a
    form field's value: those values are quoted, and what to send said."""
    twice = sorted({k for k in fields if k not in REPEATABLE and len(fields.getlist(k)) > 1})
    if twice:
        values = [v for v in fields.getlist(twice[0]) if isinstance(v, str)]
        if twice[0] in JSON_FIELDS and len(values) > 1 and not any(v.lstrip().startswith("{") for v in values):
            came = ", ".join(repr(v[:40]) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise bad_request(f"{where} gives {twice[0]!r} more than once ({came}); give it once, as JSON text: "
                              + _as_keys(twice[0]))
        raise bad_request(f"{where} gives {twice[0]!r} more than once; give it once")


def not_json(name: str, raw: str, exc: ValueError, instead: str = "") -> ApiError:
    """A 400 for a field of JSON text that does not parse, quoting what came (its first 80 characters): 'filter'
    sent as `requests.post(url, data={'filter': {"metadata": {...}}})` came as "metadata", the dict's key alone,
    and was told only "'filter' is not valid JSON"."""
    came = repr(raw[:80]) + ("..." if len(raw) > 80 else "")
    return bad_request(f"{name!r} is not valid JSON ({exc}): it came as {came}; give it as JSON text "
                       f"({_as_keys(name)}){instead}")


def integer(raw, name: str, lo: int, hi: int, default: int) -> int:
    """`raw` (from a query string, a form or JSON) as an integer from lo to hi; `default` where it is not given."""
    if raw is None or raw == "":
        return default
    if isinstance(raw, bool) or isinstance(raw, float) and raw != int(raw) or \
            isinstance(raw, str) and not raw.strip().lstrip("+-").isdigit():
        raise bad_request(f"'{name}' must be an integer")
    if isinstance(raw, str) and len(raw.strip().lstrip("+-").lstrip("0")) > len(str(hi)):  # int() refuses 4,301
        raise bad_request(f"'{name}' must be between {lo} and {hi}")                        # digits as no integer
    try:
        v = int(raw)
    except (TypeError, ValueError):
        raise bad_request(f"'{name}' must be an integer") from None
    if not lo <= v <= hi:
        raise bad_request(f"'{name}' must be between {lo} and {hi}")
    return v


def yes_no(name: str, use: str, bare: bool | None = False) -> bool:
    """Query parameter `name` as yes (1, true, yes) or no (0, false, no), in any case; no where it is left out.
    `bare` is what an empty value (`?name=`, or `?name` alone) means, None where that is a 400: a flag written
    bare, read as no, would do the opposite of what its sender meant (`?if_empty` deleted a library with its
    files). `use` says what to send instead, in the 400."""
    flag = request.args.get(name)
    if flag is None:
        return False
    flag = flag.strip().lower()
    if not flag and bare is not None:
        return bare
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    raise bad_request(f"'{name}' has no value; {use}" if not flag else f"'{name}' is {flag[:20]!r}; {use}")


def takes_query(*names: str):
    """Decorator: the query parameters a view reads (plain_query refuses others); `None` for a view that
    checks its own (search, which reads the same fields from a query string, a form or JSON)."""
    def mark(view):
        view.query_names = None if names == (None,) else frozenset(names)
        return view

    return mark


def plain_query() -> None:
    """before_request hook: the query string's names and values, as check_text, each name once, and only
    names the view reads: one it does not would be ignored, and the answer quietly other than asked for
    (`GET /v1/jobs?status=failed` listed every job)."""
    check_text(list(request.args.items(multi=True)), "the query string")
    given_once(request.args, "the query string")
    view = current_app.view_functions.get(request.endpoint)
    takes = getattr(view, "query_names", frozenset())
    extra = sorted(set(request.args) - takes) if takes is not None and view is not None else []
    if extra:
        raise bad_request(f"the query string has {extra[0]!r}, which {request.method} {request.url_rule.rule} does "
                          "not take" + (f"; it takes {', '.join(sorted(takes))}" if takes else "; it takes none"))


def _sent_body(peek: bool = False) -> bool:
    """Whether the request comes with a body: told by its length, or by its being chunked (Transfer-Encoding), and
    with `peek`, a chunked one only where a first byte comes (read, where it is not read after: a chunked body
    with no byte in it is none, as some clients send a DELETE's)."""
    return bool(request.content_length or request.headers.get("Transfer-Encoding") and (
        not peek or request.stream.read(1)))


def no_body(instead: str = "send it with none") -> None:
    """Refuse a body sent to an operation that reads none: what it held would be ignored, and the answer quietly
    other than asked for, as a query parameter a view does not read (plain_query): `-d '{"expires_in_s": 5}'` to
    an audio link made one of an hour. Told by its length, unread; an empty one (Content-Length: 0, or chunked with
    no byte in it, as some clients send a DELETE's) is none."""
    if _sent_body(peek=True):
        raise bad_request(f"{request.method} {request.url_rule.rule} reads no body, so what it held would be "
                          f"ignored: {instead}")


def bodiless() -> None:
    """before_request hook for /v1: a body sent with a GET, HEAD or DELETE, which none of them reads, is a 400, as
    no_body refuses one sent to a POST that reads none: `requests.get(url, json={"k": 5})` searched with k 10, and
    a bulk deletion guessed as `DELETE /v1/libraries/<id>` with `{"item_ids": [...]}` deleted the whole library."""
    if request.method not in ("GET", "HEAD", "DELETE") or request.url_rule is None:
        return
    if request.method == "DELETE" and request.url_rule.rule == "/v1/libraries/<lib_id>":
        no_body("it deletes the whole library, every file in it; to delete some of its files, POST their ids to "
                '/v1/libraries/<id>/deletions ({"item_ids": [...]})')
    elif request.url_rule.rule == "/v1/search":
        no_body("give its fields in the query string, or POST the JSON body to /v1/search")
    else:
        no_body("send it with none" if request.method == "DELETE" else "give its parameters in the query string")


def options():
    """before_request hook for every path, ahead of /v1's key check: an OPTIONS request is a 204 with `Allow`, the methods
    its path takes, where Flask answered an empty 200 labelled text/html. A browser's CORS preflight (a page of
    another origin about to send a request with the key) carries no key: it was a 401 "missing or invalid API key",
    of a page that held a right one. The API allows no other origin (it sends no Access-Control-Allow-Origin: a key
    in a page's script is anyone's who opens the page), so a preflight is a 403 that says so, which a browser's
    developer tools show beside its "CORS" error."""
    if request.method != "OPTIONS" or request.url_rule is None:  # no such path: its 404
        return None
    if "Access-Control-Request-Method" in request.headers:
        origin = request.headers.get("Origin", "")[:100]
        raise ApiError(403, "cross_origin_not_allowed", f"a browser asked whether a page of {origin or 'another'!r} "
                       f"may call this API (a CORS preflight): the API allows no other origin; call it from a "
                       f"server of yours, or serve the page from the API's own origin ({request.host_url[:100]}), "
                       "as the API's search page is")
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]  # no body, so no type: not the text/html Flask's was labelled
    response.allow.update(current_app.create_url_adapter(request).allowed_methods())
    return response


def uncompressed_body() -> None:
    """before_request hook for /v1: a body sent compressed (`Content-Encoding: gzip`, as some HTTP clients and
    proxies send one) is a 415. The API reads bodies as they come: gzipped JSON was told "send a JSON object
    like ...", a gzipped upload "the form could not be read", and plain JSON labelled gzip was taken. Only where a
    body is read (POST, PATCH: a GET's or a DELETE's is refused, by bodiless)."""
    codings = [c.strip() for c in request.headers.get("Content-Encoding", "").split(",") if c.strip()]
    if request.method in ("POST", "PATCH") and any(c.lower() != "identity" for c in codings) and _sent_body():
        raise ApiError(415, "unsupported_media_type", f"the body is sent with Content-Encoding: "
                       f"{', '.join(codings)[:80]}; the API takes bodies uncompressed only: send it without "
                       "compressing it (and without that header)", {"Accept-Encoding": "identity"})


def error_body(status: int, code: str, message: str) -> dict:
    """The envelope every error is said in (api.gunicorn_errors writes it for gunicorn's own refusals)."""
    return {"error": {"code": code, "message": message, "status": status}}


def envelope(status: int, code: str, message: str, headers: dict | None = None):
    response = jsonify(error_body(status, code, message))
    response.status_code = status
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
          429: "too_many_requests", 500: "internal_error", 503: "unavailable", 507: "insufficient_storage"}


def error_code(status: int, name: str) -> str:
    """Our short code for a status, else its name in snake case ("Requested Range Not Satisfiable" ->
    "requested_range_not_satisfiable", "URI Too Long" -> "uri_too_long")."""
    return _CODES.get(status) or re.sub(r"[^a-z0-9]+", "_", (name or "error").lower()).strip("_")


def _code(e: HTTPException) -> str:
    """error_code of werkzeug's error."""
    return error_code(e.code or 500, e.name)


def _too_large(app: Flask) -> str:
    """Which limit a 413 from werkzeug hit: the whole body, the number of parts, or one form field (the
    same exception for each; a chunked body has no length to tell them apart)."""
    body = (f"the request body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes "
            "(CLAPQ_MAX_REQUEST_BYTES)")
    form = (f"the form has more than {app.config['MAX_FORM_PARTS']} parts, or a field other than a file is over "
            f"{app.config['MAX_FORM_MEMORY_SIZE'] // 2**20} MiB (each file is a part named 'files'; at most "
            f"{app.config['CLAPQ'].max_files_per_batch} files a batch, CLAPQ_MAX_FILES_PER_BATCH)")
    if request.path == "/v1/search":  # a search's form has no 'files': the batch's words sent its client astray
        form = (f"the form has more than {app.config['MAX_FORM_PARTS']} parts, or a field over "
                f"{app.config['MAX_FORM_MEMORY_SIZE'] // 2**20} MiB; a search's form may have at most "
                f"{app.config['MAX_FORM_PARTS']} (give many libraries as a JSON body's 'library_ids')")
    if request.content_length is None:
        return f"{body}, or {form}"
    return body if request.content_length > app.config["MAX_CONTENT_LENGTH"] else form


DB_RETRY_AFTER_S = 5
# SQLSTATEs that mean "not now": connection exceptions (class 08), the server shutting down or starting
# (57P01-57P03), no connection slots left (53300)
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03", "53300")


def _pgcode(e: Exception) -> str | None:
    """The SQLSTATE Postgres gave for a database error, None where it gave none (no connection)."""
    return getattr(getattr(e, "orig", None), "pgcode", None)


def _first_line(e: Exception) -> str:
    """The first line of what the driver said, for a log line."""
    return (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]


def database_unavailable(e: Exception) -> bool:
    """Whether a database error means Postgres cannot be reached or used for now (a retry may work),
    not that this request's statement failed."""
    if isinstance(e, (sa_exc.TimeoutError, sa_exc.InterfaceError)) or getattr(e, "connection_invalidated", False):
        return True
    code = _pgcode(e)
    return code is None or code.startswith("08") or code in _UNAVAILABLE_STATES


# SQLSTATEs that mean "this transaction lost a race": a deadlock (40P01) or a serialization failure
# (40001). Postgres rolled the transaction back, so nothing of the request was applied, and the same
# request sent again normally succeeds
_CONFLICT_STATES = ("40P01", "40001")
CONFLICT_RETRY_AFTER_S = 1


def _room(folder, reserved: int = 0) -> str:
    """What is left on the disk of `folder` (the stored files'), as the part of a 507's sentence in brackets;
    `reserved`: the bytes of it uploads leave free (StorageFull.reserved), where that is what refused them."""
    try:
        st = os.statvfs(folder if os.path.isdir(folder) else os.path.dirname(folder))
    except OSError:
        return ""
    if st.f_files and not st.f_favail:
        return " (no file can be created there: its disk has no inode left)"
    why = (f"the last {reserved >> 20} MB of which are kept free for the database that shares its disk, "
           "CLAPQ_DISK_RESERVE_MB" if reserved else "too little for this request's files")
    return f" ({st.f_bavail * st.f_frsize / 1e6:.1f} MB free, {why})"


def _routed(app: Flask, path: str) -> bool:
    """Whether `path` is one of the API's, for any method: a path given with a trailing '/', as many web frameworks
    write theirs, was told only "GET /openapi.json lists the API's paths", where the path was right but for it."""
    try:
        app.create_url_adapter(request).match(path, method=request.method)
    except NotFound:
        return False
    except HTTPException:  # another method's path (405), or a redirect werkzeug would make
        return True
    return True


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return envelope(e.status, e.code, e.message, e.headers)

    @app.errorhandler(ModelUnavailable)  # a model loaded on first use (a search by a clip) that cannot be
    def _model_unavailable(e: ModelUnavailable):
        return envelope(503, "model_unavailable", str(e))

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        message = _too_large(app) if e.code == 413 else e.description or e.name
        if isinstance(e, NotFound) and request.url_rule is None:  # no endpoint has this path (werkzeug's words
            # told to check the spelling of a URL typed into a browser)
            message = f"no endpoint {request.path[:200]!r}: GET /openapi.json lists the API's paths"
            if not request.path.startswith("/v1/") or request.path.startswith("/v1/v1/"):  # an address with a path
                # (told of GET /v1/items too, helper-57, where the path is the API's but for its last part)
                message = (f"no endpoint {request.path[:200]!r}: the API's paths begin /v1/ right after its address "
                           "(GET /openapi.json lists them)")
            if (bare := request.path.rstrip("/")) and bare != request.path and _routed(app, bare):
                message = f"no endpoint {request.path[:200]!r}: the path is {bare[:200]!r}, with no '/' at its end"
        takes = ", ".join(sorted(set(getattr(e, "valid_methods", None) or ()) - {"HEAD", "OPTIONS"}))
        if isinstance(e, MethodNotAllowed) and takes:  # werkzeug's words name neither method
            message = f"{request.path[:200]!r} does not take {request.method[:20]}; it takes {takes}"
        if isinstance(e, RequestedRangeNotSatisfiable) and e.length is not None:  # werkzeug's words: "The server
            # cannot provide the requested range.", of a download whose size the client may not know (helper-108)
            within = f" (bytes 0-{e.length - 1}); ask for a range within them, or" if e.length else ";"
            message = (f"the range asked for ({request.headers.get('Range', '')[:100]}) begins past the end of the "
                       f"file, which has {e.length} bytes{within} send no Range for the whole file")
        # what the status needs beside the body: Allow on a 405, Content-Range on a 416, WWW-Authenticate
        headers = {k: v for k, v in e.get_headers() if k.lower() not in ("content-type", "content-length")}
        return envelope(e.code or 500, _code(e), message, headers)

    # Postgres refused, dropped or did not answer the connection, is shutting down or has no connection
    # slot left, or every pooled connection stayed busy (TimeoutError): the same request sent again
    # shortly may work (an upload sent twice is stored once), so a 503 that says when. So may a request
    # that deadlocked with another one. Other errors of the same classes (a full disk, a statement too
    # complex) come back on every try: 500s
    @app.errorhandler(sa_exc.OperationalError)
    @app.errorhandler(sa_exc.InterfaceError)
    @app.errorhandler(sa_exc.TimeoutError)
    def _database(e: Exception):
        why = _first_line(e)
        if _pgcode(e) in _CONFLICT_STATES:
            log.warning("request rolled back by the database: %s", why)
            return envelope(503, "database_conflict", "the request collided with another one changing the same "
                            f"rows and was not applied; send it again (after {CONFLICT_RETRY_AFTER_S} s)",
                            {"Retry-After": str(CONFLICT_RETRY_AFTER_S)})
        if _pgcode(e) == "57014" and g.get("time_limit"):  # QueryCanceled: api.db.time_limit's
            log.warning("a request's statement ran past %s s and was stopped (%s)", g.time_limit, request.path)
            # a 400, not a 503: the same request sent again (clients retry 503s) would run as long
            return envelope(400, "too_slow", f"a statement of the search ran longer than {g.time_limit} s "
                            "(CLAPQ_SEARCH_TIMEOUT_S) and was stopped: search fewer libraries, or with a filter "
                            "of fewer keys and values")
        if not database_unavailable(e):
            return _unexpected(e)
        log.warning("database unavailable: %s", why)
        return envelope(503, "database_unavailable", "the database is not answering (down, restarting or "
                        f"overloaded); try again in {DB_RETRY_AFTER_S} s", {"Retry-After": str(DB_RETRY_AFTER_S)})

    # a row this request refers to was deleted while it ran (an upload into a library being deleted): the
    # only way this service violates a foreign key; nothing was applied
    @app.errorhandler(sa_exc.IntegrityError)
    def _integrity(e: sa_exc.IntegrityError):
        if _pgcode(e) != "23503":
            return _unexpected(e)
        log.warning("request refers to a row deleted meanwhile: %s", _first_line(e))
        return envelope(404, "not_found", "what this request refers to was deleted while it ran; nothing was applied")

    # a row this request read was deleted, and the deletion committed, before the request wrote it (a job's
    # cancel as its library is deleted: its UPDATE of the job matched no row) or read it again after a commit
    # or rollback: a 500 (helper-60)
    @app.errorhandler(orm_exc.StaleDataError)
    @app.errorhandler(orm_exc.ObjectDeletedError)
    def _deleted(e: Exception):
        log.warning("request's row was deleted meanwhile: %s", _first_line(e))
        return envelope(404, "not_found", "what this request refers to was deleted while it ran")

    # gunicorn found the body's chunked framing broken while the request read it: the client's fault
    try:
        from gunicorn.http.errors import ParseException
    except ImportError:  # served by another WSGI server
        ParseException = None
    if ParseException is not None:
        @app.errorhandler(ParseException)
        def _malformed(e: Exception):
            return envelope(400, "bad_request", f"the request body is malformed: {type(e).__name__} ({e})")

    @app.errorhandler(StorageFull)  # a part being received, or committed, found the upload area full
    def _storage_full(e: StorageFull):
        # the operator's to act on: only the access log showed it (helper-41)
        blob_dir = current_app.config["CLAPQ"].blob_dir
        log.warning("an upload was refused: the disk of the stored files is full (%s)", e,
                    extra={"blob_dir": str(blob_dir)})
        # "try again later" alone had a user wait for room no one would make (helper-88: a 173 MB file, a data
        # directory's disk with 20 MB free)
        return envelope(507, "insufficient_storage", f"the upload area is full{_room(blob_dir, e.reserved)}; try "
                        "again once it has room")

    @app.errorhandler(StorageUnwritable)  # a read-only disk, or the folder's permissions changed (helper-59)
    def _storage_unwritable(e: StorageUnwritable):
        log.error("an upload was refused: the folder of the stored files cannot be written (%s)", e,
                  extra={"blob_dir": str(current_app.config["CLAPQ"].blob_dir)})
        return envelope(503, "storage_unavailable", "the upload area cannot be written now; try again later",
                        {"Retry-After": "30"})

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error")
        return envelope(500, "internal_error", "internal error; the server log has details")
