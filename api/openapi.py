"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json."""

from __future__ import annotations

import copy
import functools
import re

from flask import Blueprint, current_app

bp = Blueprint("openapi", __name__)

_ERR = {"$ref": "#/components/responses/Error"}
_ID = {"type": "string", "format": "uuid"}


def _path_id(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


def _ok(desc: str, schema: dict | None = None, code: str = "200") -> dict:
    """A success answer, and the errors any /v1 operation can give: a bad request, no key, not found, the
    rate limit, a database that does not answer (503 database_unavailable)."""
    body = {"description": desc}
    if schema:
        body["content"] = {"application/json": {"schema": schema}}
    return {code: body, "400": _ERR, "401": _ERR, "404": _ERR, "429": _ERR, "503": _ERR}


def _obj(**properties) -> dict:
    return {"type": "object", "properties": properties}


def _list(items: dict) -> dict:
    return {"type": "array", "items": items}


def _page(name: str, items: dict) -> dict:  # api.pages: a page, and the cursor of the next (null: the last)
    return _obj(**{name: _list(items), "next_cursor": {"type": ["string", "null"]}})


_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_WHEN = {"type": ["string", "null"], "format": "date-time"}
_MODEL = {"$ref": "#/components/schemas/Model"}
_SPAN = _obj(start_s=_NUM, end_s=_NUM)
_FOUND = {"item_id": _ID, "library_id": _ID, "filename": _STR}  # an item named in an answer

SEARCH_RESULT = _obj(
    model=_MODEL, mode={"enum": ["items", "segments"]}, k=_INT, offset=_INT,
    plan={"type": "string", "enum": ["exact", "index"],
          "description": "exact: every window the filters leave was compared; index: the HNSW index"},
    results=_list({**_obj(**_FOUND, score=_NUM, metadata={"type": "object"},
                          segment={**_SPAN, "description": "items mode: the item's best window"},
                          start_s=_NUM, end_s=_NUM),
                   "description": "items mode: each item with its best window as `segment`; segments mode: each "
                                  "window, its `start_s` and `end_s`"}))

MAX_LABEL_CHARS = "CLAPQ_MAX_QUERY_CHARS (1000 by default)"
CLASSIFY = {"type": "object", "required": ["labels"], "properties": {
    "labels": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 200,
               "uniqueItems": True, "description": f"each once, of at most {MAX_LABEL_CHARS} characters"},
    "template": {"type": "string", "maxLength": 500, "description": "containing {label}"},
    "top": {"type": "integer", "minimum": 1}}}
TAGS = _list(_obj(label=_STR, score=_NUM))

_K = {"type": "integer", "minimum": 1, "maximum": 1000, "description": "at most CLAPQ_MAX_K (1000 by default)"}
_OFFSET = {"type": "integer", "minimum": 0, "maximum": 10000, "description": "at most 10 x CLAPQ_MAX_K"}
_SCORE = {"type": "number", "minimum": -1, "maximum": 1}
SEARCH_BODY = {"type": "object", "properties": {
    "library_id": _ID, "library_ids": {"type": "array", "items": _ID}, "text": {"type": "string"},
    "q": {"type": "string", "description": "the same as text"}, "item_id": _ID, "k": _K, "offset": _OFFSET,
    "min_score": _SCORE, "mode": {"enum": ["items", "segments"]},
    "filter": {"type": "object", "description": '{"metadata": {key: value | {"in": [...]}}, "duration_s": {"min", '
                                                '"max"}}: at most 32 keys and 256 values'}},
    "additionalProperties": False}

SEARCH_FORM = {  # POST /v1/search's form fields (multipart adds the 'audio' clip)
    "library_id": _ID, "library_ids": {"type": "array", "items": _ID}, "text": {"type": "string"},
    "q": {"type": "string"}, "item_id": _ID, "k": {"type": "integer"}, "offset": {"type": "integer"},
    "min_score": {"type": "number"}, "mode": {"type": "string"}, "filter": {"type": "string"}}

PAGE = [  # api.pages: limit + cursor
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}}]

ITEM_PAGE = [
    {"name": "status", "in": "query", "schema": {"enum": ["queued", "running", "done", "failed", "cancelled"]}},
    *PAGE]

DELETED = _obj(deleted=_obj(item=_ID, library=_ID, items=_INT, stored_files=_INT))
_WAITING = {"type": ["string", "null"], "description": "why its files still to embed do not move: no live worker, "
            "none serving the library's model (CLAPQ_MODEL changed, a worker still loading it, or one that hangs), or Redis not "
            "answering; of a job also files with no task in the queue while the maintenance loop made no pass "
            "lately, none of its files being embedded while the workers are on files queued before them (saying how "
            "many of those are the tenant's own, of its other jobs) or on other jobs' files taken before its own, or "
            "all it "
            "has left running with no heartbeat lately (a worker stopped mid-file); null "
            "while they move, or when none is left"}
_ITEM, _JOB, _LIBRARY = ({"$ref": f"#/components/schemas/{n}"} for n in ("Item", "Job", "Library"))

SPEC = {
    "openapi": "3.1.0",
    "info": {"title": "clapq", "version": "0.1.0",
             "description": "Self-hosted semantic search for audio libraries (LAION-CLAP + pgvector)."},
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"}}}}},
            "Model": {"type": "object", "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"},
                "weights_sha256": {"type": "string"}, "dim": {"type": "integer"}}},
            "Library": {"type": "object", "properties": {
                "id": _ID, "name": {"type": "string", "maxLength": 200}, "model": _MODEL, "created_at": _WHEN,
                "item_count": {"type": "integer"},
                "counts": {"type": "object", "description": "its items by status (queued, running, done, failed, "
                                                            "cancelled); in GET /v1/libraries/{library_id} only"},
                "waiting": {**_WAITING, "description": "in GET /v1/libraries/{library_id} only: " + _WAITING["description"]}}},
            "Job": {"type": "object", "properties": {
                "id": _ID, "library_id": _ID,
                "status": {"enum": ["queued", "running", "done", "done_with_errors", "failed", "cancelled"]},
                "counts": {"type": "object", "description": "its files by status, their total and the copies "
                                                            "among them (duplicates)"},
                "progress": {"type": "number"},
                "eta_s": {"type": ["number", "null"], "description": "seconds left at the pace so far; null before "
                                                                     "there is a pace, at the end, and while `waiting`"},
                "waiting": _WAITING, "created_at": _WHEN,
                "finished_at": {**_WHEN, "description": "when its last file ended (one deleted before it ended: at "
                                                        "its deletion); null while any is queued or running"},
                "errors": {**_list(_obj(item_id=_ID, filename=_STR, error={"type": ["string", "null"]})),
                           "description": "the first 100 failed files (one job's answer: its GET, cancel and retry; "
                                          "not in GET /v1/jobs)"},
                "warnings": {**_list(_obj(item_id=_ID, filename=_STR, warning=_STR)),
                             "description": "the first 100 of its files embedded as far as they could be read, each "
                                            "with the item's `warning` (where `errors` is given)"},
                "requeued": {"type": "integer", "description": "a retry's answer: the files queued again"}}},
            "Item": {"type": "object", "properties": {
                "id": _ID, "library_id": _ID, "job_id": _ID, "filename": {"type": "string"},
                "sha256": {"type": "string"}, "size_bytes": {"type": "integer"},
                "duration_s": {"type": ["number", "null"]}, "sample_rate": {"type": ["integer", "null"]},
                "channels": {"type": ["integer", "null"]}, "format": {"type": ["string", "null"]},
                "metadata": {"type": "object"},
                "status": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
                "error": {"type": ["string", "null"]}, "attempts": {"type": "integer"},
                "warning": {"type": ["string", "null"], "description": "of a file embedded as far as it could be "
                                                                       "read: why (cut short, as its header says)"},
                "progress": {"type": ["number", "null"]}, "created_at": _WHEN}},
        },
        "responses": {
            "Error": {"description": "error envelope", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "Allowed": {"description": "the methods the path takes, in Allow; no body", "headers": {"Allow": {
                "schema": {"type": "string"}, "description": "such as 'GET, HEAD, OPTIONS, POST'"}}},
            "CrossOrigin": {"description": "a browser's CORS preflight (Access-Control-Request-Method sent): "
                            "cross_origin_not_allowed, as the API allows no other origin (it sends no "
                            "Access-Control-Allow-Origin)", "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
    },
    "paths": {
        "/healthz": {"get": {"security": [], "responses": {"200": {"description": "alive", "content": {
            "application/json": {"schema": _obj(status={"enum": ["ok"]})}}}}}},
        "/readyz": {"get": {"security": [], "responses": {
            code: {"description": what, "content": {"application/json": {"schema": _obj(
                status={"enum": ["ready", "not_ready"]},
                checks={"type": "object", "description": "postgres, redis, workers, model, maintenance, "
                        "embedding, code: 'ok', or what is wrong"})}}}
            for code, what in (("200", "ready"), ("503", "not ready"))}}},
        "/metrics": {"get": {"security": [], "responses": {"200": {
            "description": "Prometheus metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "401": {"description": "CLAPQ_METRICS_TOKEN is set, and the request did not send it as "
                    "'Authorization: Bearer <token>'", "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/Error"}}}}}}},
        "/openapi.json": {"get": {"security": [], "responses": {"200": {
            "description": "this description", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/v1/libraries": {
            "get": {"responses": _ok("the tenant's libraries", _obj(libraries=_list(_LIBRARY)))},
            "post": {"requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["name"], "properties": {"name": {"type": "string", "maxLength": 200}}}}}},
                "responses": {**_ok("created", _LIBRARY, "201"), "409": _ERR}},
        },
        "/v1/libraries/{library_id}": {
            "get": {"parameters": [_path_id("library_id")],
                    "responses": _ok("the library", _LIBRARY)},
            "patch": {"parameters": [_path_id("library_id")],
                      "requestBody": {"required": True, "content": {"application/json": {"schema": {
                          "type": "object", "required": ["name"], "additionalProperties": False,
                          "properties": {"name": {"type": "string", "maxLength": 200}}}}}},
                      "responses": {**_ok("renamed: the library as GET gives it", _LIBRARY), "409": _ERR}},
            "delete": {"parameters": [_path_id("library_id"), {
                           "name": "if_empty", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]},
                           "description": "1: only where it holds no file (a 409 library_not_empty where it does)"}],
                       "responses": {**_ok("deleted: the library, its jobs, items and vectors; stored_files: "
                                           "its files whose bytes none of your other items holds", DELETED),
                                     "409": _ERR}}},
        "/v1/libraries/{library_id}/items": {"get": {"parameters": [_path_id("library_id"), *ITEM_PAGE],
                                                     "responses": _ok("a page of the library's items, oldest first",
                                                                      _page("items", _ITEM))}},
        "/v1/libraries/{library_id}/batches": {"post": {
            "parameters": [_path_id("library_id")],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["files"], "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "metadata": {"type": "string", "description": "JSON object: filename -> object (at most "
                                 "16 KiB of JSON a file)"}}}}}},
            "responses": {**_ok("accepted: the job, and each file's item", _obj(job_id=_ID, items=_list(_obj(
                id=_ID, filename=_STR, sha256={"type": "string", "description": "of the bytes received"},
                status={"enum": ["queued", "running", "done", "failed", "cancelled"]},
                duplicate_of={**_ID, "description": "the item holding the same bytes (this one)"},
                retry_of={"type": "string", "description": "a failed or cancelled file sent again: its status "
                                                           "before"},
                metadata_ignored={"type": "boolean", "description": "a copy's metadata, not stored"}))), "202"),
                          "409": _ERR, "413": _ERR, "415": _ERR, "507": _ERR}}},
        "/v1/libraries/{library_id}/reembed": {"post": {
            "description": "a new library, of the model this service runs, holding this library's files (the same "
                           "stored copies, names, metadata and order), queued to be embedded; this library is left as "
                           "it was. Its cancelled files are left out, and those failed for a reason in their bytes "
                           "come failed, with their reason",
            "parameters": [_path_id("library_id")],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "maxLength": 200,
                                        "description": "the new library's"}}}}}},
            "responses": {**_ok("accepted: the job embedding them, the new library, and its files queued, failed "
                                "(for a reason in their bytes) and left out (cancelled)", _obj(
                                    job_id=_ID, library=_LIBRARY, queued=_INT, failed=_INT, cancelled_left_out=_INT),
                                "202"),
                          "409": _ERR, "429": _ERR}}},
        "/v1/libraries/{library_id}/known": {"post": {
            "parameters": [_path_id("library_id")],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["sha256"], "properties": {"sha256": {
                    "type": "array", "maxItems": 10000,
                    "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}}}}},
            "responses": _ok("known: the digests the library holds already (not failed or cancelled); pending: "
                             "those of them not embedded yet (pending_jobs, pending_items: the job and item of "
                             "each); items: each known one's item; sent_from: its metadata.path and metadata.folder, "
                             "where it has a path (and each failed one's); failed: those of the rest that failed for a reason in their "
                             "bytes, each with its item_id and error (sending them again retries them); missing: "
                             "those known whose stored file is gone from the server's disk (sending them again "
                             "writes it anew)", _obj(
                                 known=_list(_STR), pending=_list(_STR), pending_jobs={"type": "object"},
                                 pending_items={"type": "object"}, items={"type": "object"},
                                 sent_from={"type": "object"}, failed={"type": "object"}, missing=_list(_STR)))}},
        "/v1/libraries/{library_id}/moves": {"post": {
            "parameters": [_path_id("library_id")],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["moves"], "additionalProperties": False, "properties": {"moves": {
                    "type": "array", "maxItems": 10000, "items": {
                        "type": "object", "required": ["item_id", "from", "to"], "additionalProperties": False,
                        "properties": {"item_id": _ID, "from": {
                            "type": "object", "required": ["path", "folder"], "additionalProperties": False,
                            "properties": {"path": {"type": "string"}, "folder": {"type": ["string", "null"]}}},
                            "to": {
                            "type": "object", "required": ["path", "folder"], "additionalProperties": False,
                            "properties": {"path": {"type": "string", "minLength": 1, "maxLength": 4096},
                                           "folder": {"type": "string", "minLength": 1, "maxLength": 64}}}}}}}}}}},
            "responses": {**_ok("moved: the ids whose metadata.path and .folder were set (those still at their "
                                "'from'), and their filename to the new path's name; too_large: those left, as "
                                "their metadata would grow past 16 KiB", _obj(moved=_list(_ID), too_large=_list(_ID))),
                          "413": _ERR}}},
        "/v1/libraries/{library_id}/deletions": {"post": {
            "parameters": [_path_id("library_id")],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["item_ids"], "additionalProperties": False, "properties": {
                    "item_ids": {"type": "array", "minItems": 1, "maxItems": 1000, "uniqueItems": True,
                                 "items": _ID, "description": "items of the library, each once"}}}}}},
            "responses": _ok("deleted: the items and their vectors, at once (items: how many; stored_files: those "
                             "whose bytes none of your other items holds; files: each one deleted, its filename "
                             "and metadata.path, in the order sent); not_found: the ids that named no item of the "
                             "library (unknown, deleted already, or another library's or tenant's)", _obj(
                                 deleted=_obj(items=_INT, stored_files=_INT, files=_list(_obj(
                                     id=_ID, filename=_STR, path={"type": ["string", "null"]}))),
                                 not_found=_list(_ID)))}},
        "/v1/limits": {"get": {"responses": _ok("what the service takes", {"type": "object", "properties": {
            **{k: {"type": "integer"} for k in ("max_file_bytes", "max_files_per_batch", "max_request_bytes",
                                                "max_duration_s", "max_clip_s", "max_query_chars", "max_k",
                                                "max_filter_keys", "max_filter_values", "max_deletions")},
            "search_timeout_s": {"type": ["integer", "null"]},
            "client_timeout_s": {"type": ["integer", "null"], "description": "seconds the API waits for a client "
                                 "that sends nothing more of a body (a 408) or reads nothing of an answer "
                                 "(CLAPQ_CLIENT_TIMEOUT_S); null: for ever"},
            "rate_limit": {"type": ["string", "null"], "description": "requests per API key (CLAPQ_RATE_LIMIT), "
                           "such as '1200 requests per minute'; over it, 429 with Retry-After; null: no limit"},
            "rate_limits": {"type": "array", "description": "the same limits as numbers, [] where there is none: "
                            "at most `requests` in any `seconds` (`said`: its words in `rate_limit`)",
                            "items": {"type": "object", "properties": {"requests": {"type": "integer"},
                                                                      "seconds": {"type": "integer"},
                                                                      "said": {"type": "string"}}}},
            "model": {**_MODEL, "description": "the model this service runs (CLAPQ_MODEL): a library bound to "
                      "another answers 409 model_mismatch"}}})}},
        "/v1/jobs": {"get": {"parameters": PAGE, "responses": _ok("the tenant's jobs, newest first (without their "
                                                                  "errors)", _page("jobs", _JOB))}},
        "/v1/jobs/{job_id}/items": {"get": {"parameters": [_path_id("job_id"), *ITEM_PAGE],
                                            "responses": _ok("a page of the job's items", _page("items", _ITEM))}},
        "/v1/jobs/{job_id}/cancel": {"post": {"parameters": [_path_id("job_id")],
                                              "responses": {**_ok("cancelled: the job", _JOB), "409": _ERR}}},
        "/v1/jobs/{job_id}/retry": {"post": {"parameters": [_path_id("job_id")],
                                             "responses": {**_ok("failed items re-queued: the job", _JOB, "202"),
                                                           "409": _ERR}}},
        "/v1/libraries/{library_id}/classify": {"post": {"parameters": [_path_id("library_id"), *PAGE],
                                                         "requestBody": {"required": True, "content": {
                                                             "application/json": {"schema": CLASSIFY}}},
                                                         "responses": {**_ok("top labels per embedded item", _page(
                                                             "items", _obj(item_id=_ID, filename=_STR, labels=TAGS))),
                                                             "409": _ERR}}},
        "/v1/items/{item_id}/classify": {"post": {"parameters": [_path_id("item_id")],
                                                  "requestBody": {"required": True, "content": {
                                                      "application/json": {"schema": CLASSIFY}}},
                                                  "responses": {**_ok("top labels", _obj(item_id=_ID, labels=TAGS)),
                                                                "409": _ERR}}},
        "/v1/items/{item_id}/duplicates": {"get": {"parameters": [
            _path_id("item_id"), {"name": "threshold", "in": "query", "schema": _SCORE},
            {**PAGE[0], "description": "the most near duplicates listed (default 50); exact copies are all listed"}],
            "responses": {**_ok("exact and near duplicates", _obj(
                item_id=_ID, sha256=_STR, threshold=_NUM, exact=_list(_obj(**_FOUND)),
                near=_list(_obj(**_FOUND, score=_NUM)))), "409": _ERR}}},
        "/v1/jobs/{job_id}": {"get": {"parameters": [_path_id("job_id")], "responses": _ok("the job", _JOB)}},
        "/v1/items/{item_id}": {
            "get": {"parameters": [_path_id("item_id"), {
                        "name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "the ETag held: 304 while the item is unchanged"}],
                    "responses": {**_ok("the item", _ITEM), "304": {"description": "not modified"}}},
            "patch": {"parameters": [_path_id("item_id"), {
                          "name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"},
                          "description": "the ETag a GET of the item gave: the metadata is replaced only if the "
                                         "item has not changed since (else 412)"}, {
                          "name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
                          "description": "'*' or an ETag: 412 as the item exists (or has that ETag)"}],
                      "requestBody": {"required": True, "content": {"application/json": {"schema": {
                          "type": "object", "required": ["metadata"], "additionalProperties": False,
                          "properties": {"metadata": {"type": "object"}}}}}},
                      "responses": {**_ok("the item as stored, its metadata replaced", _ITEM), "412": _ERR,
                                    "413": _ERR}},
            "delete": {"parameters": [_path_id("item_id")],
                       "responses": _ok("deleted: the item and its vectors; stored_files: 1 if none of your "
                                        "other items holds its bytes", DELETED)}},
        "/v1/items/{item_id}/embedding": {"get": {"parameters": [_path_id("item_id")],
                                                  "responses": {**_ok("the pooled vector", _obj(
                                                      item_id=_ID, model=_MODEL, dim=_INT, vector=_list(_NUM))),
                                                      "409": _ERR}}},
        "/v1/items/{item_id}/segments": {"get": {"parameters": [
            _path_id("item_id"), {"name": "vectors", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}}],
            "responses": _ok("the item's windows: index, start_s, end_s (and vector)", _obj(
                item_id=_ID, status=_STR, model=_MODEL,
                segments=_list(_obj(index=_INT, start_s=_NUM, end_s=_NUM, vector=_list(_NUM)))))}},
        "/v1/items/{item_id}/audio-link": {"post": {"parameters": [
            _path_id("item_id"),
            {"name": "expires_in_s", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 604800},
             "description": "how long the link works (3600 unless given)"}],
            "responses": _ok("a URL of the item's audio that needs no key (for an <audio> element), relative to the "
                             "API's root, and when it expires; it stops working too when the key is revoked",
                             _obj(url=_STR, expires_at=_STR))}},
        "/v1/items/{item_id}/audio": {"get": {"parameters": [
            _path_id("item_id"),
            {"name": "link", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "instead of the Authorization header: a link's, from POST /v1/items/{item_id}/audio-link"},
            {"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
             "description": "one range, `bytes=first-last`; another unit or several ranges are ignored"},
            *({"name": h, "in": "header", "required": False, "schema": {"type": "string"}}
              for h in ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since"))],
            "responses": {**_ok("the original file"), "206": {"description": "the range asked for"},
                          "304": {"description": "not modified (If-None-Match, If-Modified-Since)"},
                          "412": _ERR, "416": _ERR}}},
        "/v1/search": {
            "get": {"description": "the parameters of POST as a query string (library_id and library_ids may "
                                   "repeat; filter is JSON text); a query text longer than fits a URL goes by POST",
                    "parameters": [
                {"name": "library_id", "in": "query", "schema": _ID},
                {"name": "library_ids", "in": "query", "schema": {"type": "array", "items": _ID}},
                {"name": "q", "in": "query", "schema": {"type": "string"}},
                {"name": "text", "in": "query", "schema": {"type": "string"}},
                {"name": "item_id", "in": "query", "schema": _ID},
                {"name": "k", "in": "query", "schema": _K},
                {"name": "offset", "in": "query", "schema": _OFFSET},
                {"name": "min_score", "in": "query", "schema": _SCORE},
                {"name": "mode", "in": "query", "schema": {"enum": ["items", "segments"]}},
                {"name": "filter", "in": "query", "schema": {"type": "string"}}],
                "responses": {**_ok("results, best first", SEARCH_RESULT), "409": _ERR}},
            "post": {"requestBody": {"required": True, "content": {
                "application/json": {"schema": SEARCH_BODY},
                "multipart/form-data": {"schema": {"type": "object", "additionalProperties": False, "properties": {
                    "audio": {"type": "string", "format": "binary"}, **SEARCH_FORM}}},
                "application/x-www-form-urlencoded": {"schema": {
                    "type": "object", "additionalProperties": False, "properties": SEARCH_FORM}}}},
                # 507: a clip the API's temporary folder has no room for (api.query.audio_vector)
                "responses": {**_ok("results, best first", SEARCH_RESULT), "409": _ERR, "507": _ERR}},
        },
    },
}

# an operation that reads a body answers 408 where the body stops arriving for CLAPQ_CLIENT_TIMEOUT_S
# (api.uploads.finish_bodies), and 413 for one past a limit of size (api.errors.small_body, MAX_JSON_VALUES; a
# form's fields, api.uploads._FormInMemory; CLAPQ_MAX_REQUEST_BYTES for an upload): POST /v1/libraries, /known,
# /search and both classify did not list it; and a POST or PATCH answers 415 for a body sent compressed
# (api.errors.uncompressed_body)
for _ops in SPEC["paths"].values():
    for _method, _op in _ops.items():
        if "requestBody" in _op:
            _op["responses"].update({"408": _ERR, "413": _ERR})
        if _method in ("post", "patch"):
            _op["responses"]["415"] = _ERR

# OPTIONS of any path is answered ahead of the key's check (api.errors.options), whatever its ids name: a 204 with
# the path's methods in Allow, key or none, and a browser's CORS preflight a 403; none of it was described, so a
# client or a proxy's rules written from this description did not know either answer
for _path, _ops in SPEC["paths"].items():
    _ops["options"] = {"security": [], "parameters": [
        *(_path_id(name) for name in re.findall(r"\{(\w+)\}", _path)),
        {"name": "Access-Control-Request-Method", "in": "header", "required": False, "schema": _STR,
         "description": "sent by a browser asking whether a page of another origin may call the API: a 403"}],
        "responses": {"204": {"$ref": "#/components/responses/Allowed"},
                      "403": {"$ref": "#/components/responses/CrossOrigin"}}}


@functools.lru_cache(maxsize=4)
def _spec_for(max_k: int) -> dict:
    """SPEC with the bounds of `k` and `offset` this service takes (CLAPQ_MAX_K): it said 1000 and 10,000 whatever
    they were, so a client that checks its requests by the schema refused a k the API takes, or sent one it
    refuses. deepcopy's memo puts the bounded copies wherever _K and _OFFSET are."""
    memo = {id(_K): {**_K, "maximum": max_k}, id(_OFFSET): {**_OFFSET, "maximum": 10 * max_k}}
    return copy.deepcopy(SPEC, memo)


@bp.get("/openapi.json")
def openapi():
    return _spec_for(current_app.config["CLAPQ"].max_k)
