"""One JSON error envelope for every error: {"error": {"code", "message", "status"}}."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

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


def check_text(value, where: str) -> None:
    """Refuse a NUL character or an unpaired surrogate (JSON allows "\\u0000" and "\\ud800") in any string
    of `value`, dict keys included: Postgres stores neither, so they would fail deep inside as a 500."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{where} has text with an unpaired surrogate (not valid Unicode)") from None
            if "\x00" in v:
                raise bad_request(f"{where} has text with a NUL character (\\u0000 or %00)")


def plain_query() -> None:
    """before_request hook: the query string's names and values, as check_text."""
    check_text(list(request.args.items(multi=True)), "the query string")


def envelope(status: int, code: str, message: str, headers: dict | None = None):
    response = jsonify({"error": {"code": code, "message": message, "status": status}})
    response.status_code = status
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
          429: "too_many_requests", 503: "unavailable", 507: "insufficient_storage"}


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return envelope(e.status, e.code, e.message, e.headers)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        message = e.description or e.name
        if e.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"the request body is larger than the limit of {limit} bytes (CLAPQ_MAX_REQUEST_BYTES)"
        return envelope(e.code or 500, _CODES.get(e.code or 500, "error"), message)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error")
        return envelope(500, "internal_error", "internal error; the server log has details")
