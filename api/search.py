"""Search by text, by an uploaded clip or by an existing item; results are items (with the best
segment's time span) or segments, filtered by libraries and metadata, best first."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import unicodedata
import uuid
from types import SimpleNamespace
from typing import NamedTuple
from urllib.parse import parse_qsl

from flask import Blueprint, current_app, g, request
from sqlalchemy import and_, case, cast, func, literal, or_, select, text, tuple_
from sqlalchemy.dialects.postgresql import JSONB

try:
    from sqlalchemy.dialects.postgresql import distinct_on
except ImportError:  # SQLAlchemy 2.0, which Python 3.10 gets (2.1 takes 3.11): its Select.distinct(col) says the same
    distinct_on = None

from api.db import db, time_limit
from api.errors import (ApiError, bad_request, check_text, given_once, integer, json_body, parse_json,
                        not_json, nothing_to_show, refuse_unknown, sent_as_json, small_body, takes_query)
from api.lookup import owned, parse_id
from api.models_info import describe, served_model_for
from api.query import audio_vector, item_vector, text_vectors
from clapq.models import Embedding, Item, Library, Segment
from worker.windows import HOP_S, WINDOW_S, span_json

bp = Blueprint("search", __name__)

MAX_CANDIDATES = 20_000
# rows an index walk may visit before it stops, short or not (pgvector's hnsw.max_scan_tuples, its default)
MAX_SCAN_TUPLES = 20_000
TIE_RUN_MOST = 1000  # rows of one distance read past a page's last (_ties_settled)
MAX_FILTER_KEYS, MAX_FILTER_VALUES = 32, 256  # of a search's metadata filter (GET /v1/limits)


@bp.after_request
def _server_timing(response):
    """Where a search's time went, for clients and operators (https://www.w3.org/TR/server-timing/)."""
    if "server_timing" in g:
        response.headers["Server-Timing"] = g.server_timing
    return response


OPTIONS = ("item_id", "k", "offset", "min_score", "mode", "filter")  # read as given, from any source
FIELDS = ("library_id", "library_ids", "text", "q", *OPTIONS)


def _known(names, where: str, files=()) -> None:
    """Refuse a field search does not take: a misspelt one ("filters", "limit") would otherwise be ignored,
    and the results would quietly be other than asked for."""
    if "audio" in names and where == "the form":  # `curl -F audio=clip.wav` (no @): the name as text, not the clip
        raise bad_request("'audio' came as a text field, not a file: give it a filename (with curl: "
                          "-F audio=@clip.wav)")
    if "audio" in names:  # base64 in JSON, a name in a query string: "came as a text field" named no form
        raise bad_request(f"{where} has 'audio': a clip goes as a file of a multipart form, POST /v1/search (with curl: "
                          "-F audio=@clip.wav)")
    refuse_unknown(names, FIELDS, "search", f"it takes {', '.join(FIELDS)} (and a multipart 'audio' file)", where)
    if other_files := sorted(set(files) - {"audio"}):
        raise bad_request(f"the form has a file {other_files[0]!r}; the clip goes in 'audio'")


def _utf8(raw: bytes, where: str) -> None:
    """Refuse URL-encoded text that is not UTF-8 (`q=%FF`, a surrogate `%ED%A0%80`): werkzeug reads each
    such byte as U+FFFD, so the query searched for was other than sent, and a filter matched nothing
    (helper-52)."""
    try:
        parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise bad_request(f"{where} is not UTF-8 once its %-escapes are decoded ({exc.reason}); send text as "
                          "UTF-8") from None


def _params() -> dict:
    """The same parameters from a query string, a JSON body or a form (multipart, or URL-encoded as
    `curl -d` sends it)."""
    if request.method == "POST" and request.args:
        raise bad_request("a POST search takes its fields in the body, not in the query string")
    # a URL-encoded form, unless it is JSON sent as one (`curl -d '{...}'`)
    form = request.mimetype == "multipart/form-data" or (request.mimetype == "application/x-www-form-urlencoded"
                                                         and not sent_as_json())
    if request.method in ("GET", "HEAD") or form:  # HEAD: a GET without its body (it was a 400)
        f = request.args if request.method != "POST" else request.form
        if request.method != "POST":
            _utf8(request.query_string, "the query string")
        elif request.mimetype == "application/x-www-form-urlencoded":
            # fields counted before the form is parsed (twice: _utf8, then werkzeug), as a multipart form's parts
            # are (MAX_FORM_PARTS): 16 MiB of "k&k&..." is 8 million fields, which took an API process from 0.5
            # to 1.26 GB before its 400 (helper-75)
            if (fields := small_body().count(b"&") + 1) > (most := current_app.config["MAX_FORM_PARTS"]):
                raise ApiError(413, "payload_too_large", f"the form has {fields} fields; a search's form may have at "
                               f"most {most} (give many libraries as a JSON body's 'library_ids')")
            _utf8(small_body(), "the form")
        _known(f, "the query string" if request.method != "POST" else "the form",
               request.files if request.method == "POST" else ())
        p = {k: f.get(k) for k in ("q", "text", *OPTIONS)}
        if p["q"] not in (None, "") and p["text"] not in (None, "") and p["q"] != p["text"]:
            raise bad_request("give the query text once: 'text' or 'q'")
        p["q"] = p.pop("text") or p["q"]
        p["library_ids"] = [*f.getlist("library_id"), *f.getlist("library_ids")]
        if request.method == "POST":
            given_once(request.form, "the form")
            given_once(request.files, "the form")
        check_text(p, "the form")
        p["audio"] = request.files.get("audio") if request.method == "POST" else None
        # a form's file input left empty, which a browser's FormData sends as a part of no filename and no bytes, is
        # no clip: beside a text query it was "give exactly one of ...", as if a clip had been chosen
        if p["audio"] is not None and not p["audio"].filename and getattr(p["audio"].stream, "size", None) == 0:
            p["audio"] = None
        return p
    body = json_body()
    if not isinstance(body, dict):
        raise bad_request('send a JSON object like {"library_id": ..., "text": ..., "k": 10}, or a form')
    _known(body, "the JSON body")
    p = {k: body.get(k) for k in OPTIONS}
    # JSON has types: a number sent as a string is a client's bug, refused as classify's 'top' is
    for name in ("k", "offset", "min_score"):
        if isinstance(p[name], str):
            raise bad_request(f"'{name}' must be a JSON number, not a string")
    if p["item_id"] is not None and not isinstance(p["item_id"], str):
        raise bad_request("'item_id' must be an item id (a string)")
    # an empty one is left out, as in a query string or a form (`{"text": "", "q": "rain"}` was "give it once")
    if body.get("q") not in (None, "") and body.get("text") not in (None, "") and body["q"] != body["text"]:
        raise bad_request("give the query text once: 'text' or 'q'")
    p["q"] = body["text"] if body.get("text") not in (None, "") else body.get("q")
    ids = body.get("library_ids", [])
    if body.get("library_id") is not None:
        ids = [body["library_id"], *ids] if isinstance(ids, list) else ids
    p["library_ids"] = ids
    return p


def _filters(raw) -> list:
    """metadata equality / `in` on JSON keys, and a duration range: {"metadata": {...}, "duration_s": {...}}."""
    if raw in (None, ""):
        return []
    if isinstance(raw, str):
        try:
            raw = parse_json(raw, "'filter'")
        except ValueError as exc:
            raise not_json("filter", raw, exc, ", or send the whole search as a JSON body") from None
    if not isinstance(raw, dict) or set(raw) - {"metadata", "duration_s"}:
        raise bad_request("'filter' may have 'metadata' and 'duration_s'")
    conds = []
    metadata = {} if raw.get("metadata") is None else raw["metadata"]  # false, "" or 0 are refused below
    if not isinstance(metadata, dict):
        raise bad_request("'filter.metadata' must be an object of key: value (or key: {\"in\": [values]})")
    # each value is two JSONB containment tests, all in one statement: 10,000 keys ran for minutes and one
    # with 100,000 values held 17 GB of Postgres's memory (helper-52)
    if len(metadata) > MAX_FILTER_KEYS:
        raise bad_request(f"'filter.metadata' has {len(metadata)} keys; a search takes at most {MAX_FILTER_KEYS}")
    values = sum(len(w["in"]) if isinstance(w, dict) and isinstance(w.get("in"), list) else 1
                 for w in metadata.values())
    if values > MAX_FILTER_VALUES:
        raise bad_request(f"'filter.metadata' has {values} values (each 'in' value counts); a search takes at most "
                          f"{MAX_FILTER_VALUES}")
    for key, want in metadata.items():
        if isinstance(want, dict):
            # which way it is not one: "use a value or {"in": [values]}" alone, for {"in": []} or {"in": "a"}, left
            # the caller to guess (helper-118)
            if set(want) != {"in"}:
                keys = ", ".join(map(repr, sorted(want)[:5])) or "none"
                raise bad_request(f"metadata filter on {key!r}: use a value or {{\"in\": [values]}}; an object takes "
                                  f"'in' alone (a value is never an object), not {keys}")
            if not isinstance(want["in"], list):
                raise bad_request(f"metadata filter on {key!r}: 'in' takes a list of values, not "
                                  f"{json.dumps(want['in'])[:40]}")
            if not want["in"]:
                raise bad_request(f"metadata filter on {key!r}: 'in' is an empty list, which no file matches; give it "
                                  "one value or more")
            for v in want["in"]:
                _one_value(key, v)
            conds.append(or_(*[c for v in want["in"] for c in _has(key, v)]))
        else:
            _one_value(key, want)
            conds.append(or_(*_has(key, want)))
    dur = {} if raw.get("duration_s") is None else raw["duration_s"]
    if not isinstance(dur, dict) or set(dur) - {"min", "max"}:
        raise bad_request("'duration_s' filter takes 'min' and/or 'max' seconds")
    for bound, op in (("min", "__ge__"), ("max", "__le__")):
        if bound in dur:
            value = dur[bound]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value) > 1e12:
                raise bad_request(f"duration_s.{bound} must be a number of seconds")
            conds.append(getattr(Item.duration_s, op)(float(value)))
    if "min" in dur and "max" in dur and dur["min"] > dur["max"]:  # would match nothing, and look like no results
        raise bad_request(f"duration_s.min ({dur['min']}) is more than duration_s.max ({dur['max']})")
    return conds


def _one_value(key: str, want) -> None:
    """What a filter's value may be, given alone or in an 'in' list (helper-52: an object in 'in' matched by
    partial containment, where alone it is refused; an empty list matched every list)."""
    for value in (want, *want) if isinstance(want, list) else (want,):  # a list's values as well (helper-53)
        if isinstance(value, dict):
            raise bad_request(f"metadata filter on {key!r}: a value to match is a string, number, true, false, "
                              "null or a list of them, not an object")
        if value == []:
            raise bad_request(f"metadata filter on {key!r}: an empty list would match every list; give the values "
                              "the list must hold")


def _has(key: str, want) -> list:
    """Conditions, any of which matches `key: want`: the value itself, or (for a value that is not a list)
    a list holding it, so {"tags": "foley"} finds {"tags": ["foley", "door"]}. A list `want` matches a list
    holding all of its values (JSONB containment; the GIN index serves each). A string matches in either
    Unicode form: metadata is kept as sent, and "Café" typed (NFC) is "Café" as a macOS path spells it (NFD)."""
    conds = []
    for form in _forms(want):
        conds.append(Item.meta.op("@>")(_jsonb({key: form})))
        if not isinstance(want, list):
            conds.append(Item.meta.op("@>")(_jsonb({key: [form]})))
    return conds


def _forms(want) -> list:
    """`want` as sent, composed (NFC) and decomposed (NFD): one, two or three distinct values."""
    def norm(v, form):
        return unicodedata.normalize(form, v) if isinstance(v, str) else v

    forms = [want] + [[norm(v, f) for v in want] if isinstance(want, list) else norm(want, f) for f in ("NFC", "NFD")]
    return [f for n, f in enumerate(forms) if f not in forms[:n]]


def _jsonb(value: dict):
    return cast(literal(json.dumps(value)), JSONB)


@bp.route("/search", methods=["GET", "POST"])
@takes_query(None)
def search():
    settings = current_app.config["CLAPQ"]
    time_limit(settings.search_timeout_s)
    p = _params()
    lib_ids = p["library_ids"]
    if not isinstance(lib_ids, list):
        raise bad_request("'library_ids' must be a list of library ids")
    if not lib_ids:
        raise bad_request("'library_id' (or 'library_ids') is required")
    if not all(isinstance(i, str) for i in lib_ids):
        raise bad_request("'library_id' must be one library id (a string); give several as the list 'library_ids'")
    if any("," in i or i.lstrip().startswith("[") for i in lib_ids):  # library_ids=A,B or a JSON list as text
        raise bad_request("one library id per 'library_ids' value: repeat it for several "
                          "(library_ids=A&library_ids=B in a query string or a form; a list in a JSON body)")
    if any(not i.strip() for i in lib_ids):  # `library_id=` (a variable left empty): a 404 said nothing of that
        raise bad_request("a library id given is empty ('library_id=' or an empty 'library_ids' value)")
    # each library once, however often (or however spelt: in capitals, in braces) it is given: 400,000 times
    # one id, in a 16 MiB body, took 18 s of an API process and as long a statement (helper-55)
    unique: dict = {}
    for i in lib_ids:
        unique.setdefault(parse_id(i, "library"), i)
    # which one, of several (helper-52: "library not found" left the caller to try each)
    libs = [owned(Library, i, f"library {i[:64]!r}") for i in unique.values()]
    model_id = served_model_for(*libs)
    k = integer(p.get("k"), "k", 1, settings.max_k, 10)
    offset = integer(p.get("offset"), "offset", 0, 10 * settings.max_k, 0)
    # left out or empty: items; 0 or false is not a mode (`or` read them as left out)
    mode = "items" if p.get("mode") in (None, "") else p.get("mode")
    if mode not in ("items", "segments"):
        raise bad_request("'mode' must be 'items' or 'segments'")
    min_score = p.get("min_score")
    if min_score not in (None, ""):
        if isinstance(min_score, bool):
            raise bad_request("'min_score' must be a number between -1 and 1")
        try:
            min_score = float(min_score)
        except (TypeError, ValueError, OverflowError):
            raise bad_request("'min_score' must be a number between -1 and 1") from None
        if not -1.0 <= min_score <= 1.0:
            raise bad_request("'min_score' must be a number between -1 and 1")
    else:
        min_score = None
    conds = _filters(p.get("filter"))

    q, audio, item_id = p.get("q"), p.get("audio"), p.get("item_id")
    given = [x for x in (q, audio, item_id) if x not in (None, "")]
    if len(given) != 1:
        raise bad_request("give exactly one of: text ('q' or 'text'), an 'audio' clip, or an 'item_id'")
    exclude = None
    t0 = time.perf_counter()
    if audio is not None:
        vec = audio_vector(audio)
    elif item_id not in (None, ""):
        item, vec = item_vector(str(item_id))
        served_model_for(db().get(Library, item.library_id), whose="the item's ")
        exclude = item.id
    else:
        if not isinstance(q, str) or not q.strip():
            raise bad_request("the query text must be a non-empty string")
        if nothing_to_show(q):  # a zero-width space alone: nothing to search for
            raise bad_request("the query text has no visible characters")
        q = unicodedata.normalize("NFC", q)  # as it is embedded (text_vectors): an accent is one character
        if len(q) > settings.max_query_chars:
            raise bad_request(f"the query is {len(q)} characters; the limit is {settings.max_query_chars}")
        vec = text_vectors([q.strip()])[0]

    t1 = time.perf_counter()
    lib_uuids = [lib.id for lib in libs]
    exact = few_windows(lib_uuids, conds, settings.exact_search_max_windows, p.get("filter"))
    if exclude is not None and mode == "items":
        # "more like this": whole item against whole items (pooled vectors), so that the same bytes
        # elsewhere score 1; the span shown is the other item's segment closest to this item
        def find():
            return _nearest_items(vec, lib_uuids, model_id, conds, exclude, offset + k, min_score, exact)
    else:
        def find():
            return _nearest(vec, lib_uuids, model_id, conds, exclude, mode, offset + k, min_score, exact)
    page, items = described_page(lambda: find()[offset : offset + k])
    plan = "exact" if exact or g.get("exact_fallback") else "index"  # the index walk fell short: compared
    g.server_timing = f"query;dur={(t1 - t0) * 1000:.1f}, search;dur={(time.perf_counter() - t1) * 1000:.1f}"
    results = []
    for r in page:
        item = items[r.item_id]
        res = {"item_id": str(r.item_id), "library_id": str(r.library_id), "filename": item.filename,
               "score": round(1.0 - float(r.d), 6), "metadata": item.meta or {}}
        span = span_json(r.start_s, r.end_s)
        results.append({**res, **span} if mode == "segments" else {**res, "segment": span})
    return {"model": describe(model_id), "mode": mode, "k": k, "offset": offset, "plan": plan, "results": results}


# plan decisions per (tenant, libraries, filter), reused for a short while: counting up to 5,000
# items costs ~2 ms, a quarter of an unfiltered search, and a stale answer only picks the slower of
# two correct plans
PLAN_TTL_S = 30.0
_plans: dict[tuple, tuple[float, bool]] = {}
_plans_lock = threading.Lock()


def few_windows(lib_ids: list[uuid.UUID], conds: list, limit: int, raw_filter) -> bool:
    """Whether the libraries and filters leave at most `limit` windows, counted from the items'
    durations (the engine's windows and hop) over at most `limit + 1` items, so the check stays cheap
    (the GIN index on metadata finds filtered items) however large the library is."""
    if limit <= 0:
        return False
    # the filter by its digest: its text (up to 16 MiB) kept in the key held every distinct filter until 10,000 were
    # (searches of distinct 4 MB filters grew two API processes by ~300 MB every 60, past 3.4 GB)
    shown = json.dumps(raw_filter, sort_keys=True, default=str).encode()
    key = (g.tenant_id, tuple(sorted(lib_ids)), hashlib.sha256(shown).digest(), limit)
    now = time.monotonic()
    with _plans_lock:
        hit = _plans.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    windows = case((Item.duration_s <= WINDOW_S, 1), else_=func.ceil((Item.duration_s - WINDOW_S) / HOP_S) + 1)
    matching = (select(windows.label("w")).where(Item.library_id.in_(lib_ids), Item.tenant_id == g.tenant_id,
                                                 Item.status == "done", *conds)
                .limit(limit + 1).subquery())
    few = db().scalar(select(func.coalesce(func.sum(matching.c.w), 0))) <= limit
    with _plans_lock:
        if len(_plans) > 10_000:
            _plans.clear()
        _plans[key] = (now + PLAN_TTL_S, few)
    return few


def _matches(vectors, distance, lib_ids: list[uuid.UUID], model_id: int, conds: list, exclude, *columns):
    """Rows of `vectors` (Segment or Embedding) of this model in the libraries, whose items are the
    caller's, done and pass the filters (not `exclude`), with their distance as d."""
    where = [vectors.library_id.in_(lib_ids), vectors.model_id == model_id, Item.tenant_id == g.tenant_id,
             Item.status == "done", *conds]
    if exclude is not None:
        where.append(vectors.item_id != exclude)
    # no filename or metadata: a search reads up to MAX_CANDIDATES rows to find a page of items, and each carried
    # its item's metadata (up to 16 KiB), 20,000 of them for k=1000 deep in the results (helper-75); the page's
    # are read once it is known (described)
    return (select(vectors.item_id, vectors.library_id, *columns, distance.label("d"))
            .join(Item, Item.id == vectors.item_id).where(and_(*where)))


def described(item_ids) -> dict:
    """Each item's filename and metadata, by id, for a page of results; an item deleted since the search
    found it is not there."""
    return {r.id: r for r in db().execute(select(Item.id, Item.filename, Item.meta).where(Item.id.in_(set(item_ids))))}


PAGE_TRIES = 3  # finds of a page whose items are deleted between its two statements (described_page)


def described_page(find) -> tuple[list, dict]:
    """A page of results (find(): its rows, best first) without the items deleted since, and its items' filenames
    and metadata by id (`described`). The two are read in two statements, and an item deleted between them (a
    deletion committed meanwhile) was left out of the page, a result short where the libraries still held `k`
    (3 of 112 searches of k=30 while files were deleted two at a time, helper-80): the page is then found again,
    which sees the deletion, up to PAGE_TRIES times in all."""
    tries = 0
    while True:
        page, tries = find(), tries + 1
        names = described(r.item_id for r in page)
        if tries == PAGE_TRIES or all(r.item_id in names for r in page):
            return [r for r in page if r.item_id in names], names


def _farthest(min_score: float | None) -> float | None:
    """The largest distance a result may have: scores are shown to 6 decimals, so a score shown as
    min_score is within it."""
    return None if min_score is None else 1.0 - min_score + 5e-7


def _within(matches, distance, max_d: float | None):
    return matches if max_d is None else matches.where(distance <= max_d)


def _nearest(vec, lib_ids: list[uuid.UUID], model_id: int, conds: list, exclude, mode: str, want: int,
             min_score: float | None, exact: bool) -> list:
    """Nearest segments, best first. Where the libraries and filters leave few windows, every one is
    compared (exact: recall 1.0, ~6 us a window); otherwise through the HNSW index, with iterative
    scans so that filtered queries still return rows. The planner is not left to choose between the
    two: its estimates for JSON filters are often 100x off (benchmarks/search_scale.md).
    For items, segments are grouped to each item's best one, widening the candidate set until enough
    distinct items are found or the library is exhausted."""
    session = db()
    distance = Segment.vector.cosine_distance(vec)
    matches = _matches(Segment, distance, lib_ids, model_id, conds, exclude, Segment.start_s, Segment.end_s)
    max_d = _farthest(min_score)
    if mode == "segments":
        rows = _best_first(session, matches, distance, want, exact, max_d).rows
        session.rollback()
        return rows
    # items: without filters, ask for as many windows as the index visits anyway (ef_search, 100 unless set),
    # so one round usually finds `want` distinct items: 40 windows cost the same as 100 but often held
    # too few items and ran again. With filters every row asked for costs more index to walk
    # (iterative scan), so start at 4 windows an item (benchmarks/search_http.py)
    n = min(MAX_CANDIDATES, want * 4 if conds else max(100, want * 4))
    while True:
        got = _best_first(session, matches, distance, n, exact, max_d, complete=False)
        session.rollback()
        if got.short:  # the walk stopped before n windows: every matching one is compared instead
            return _best_per_item(session, _within(matches, distance, max_d), want)
        best: dict = {}
        for r in got.rows:  # rows come best first: the first row of an item is its best segment
            best.setdefault(r.item_id, r)
        if len(best) >= want or not got.more:
            return list(best.values())
        if n >= MAX_CANDIDATES:
            # MAX_CANDIDATES windows held fewer than `want` items (long files, a deep page): the index
            # gives no more (pgvector stops an iterative scan at hnsw.max_scan_tuples, 20,000), so every
            # matching window is compared and grouped by item, as the exact plan would
            return _best_per_item(session, _within(matches, distance, max_d), want)
        n = min(MAX_CANDIDATES, n * 4)


class Found(NamedTuple):
    rows: list
    more: bool  # rows past these may match: n came back, none of them past max_d
    short: bool  # the index walk stopped before n rows while more match (only with complete=False)


def _best_first(session, matches, distance, n: int, exact: bool, max_d: float | None = None,
                complete: bool = True) -> Found:
    """The n best rows of `matches` at most `max_d` away, in this transaction (fewer only where fewer
    match).

    exact: every distance is computed (a materialised CTE, which no index can order). Otherwise the
    HNSW index orders them, with iterative scans (filtered queries keep fetching until they have rows).
    ef_search is one value whatever n is (CLAPQ_HNSW_EF_SEARCH): the index's first rows then do not
    depend on how many are asked for, so k=1 is the first row of k=10, a page is a slice of one scan,
    and a wider round of _nearest extends the rows of the last one. It used to follow n (100 to 200),
    and with a library of long files pages repeated and skipped windows (helper-31;
    benchmarks/search_consistency.py). The planner still chooses between the index and the library's
    rows sorted: forcing the index (sorting off) emptied searches of a library that is a small share of
    the one graph every library shares, since pgvector stops a filtered walk at hnsw.max_scan_tuples
    (helper-32). Above ef_search 200 it starts choosing exact scans of large libraries (48 ms instead of
    2.5 ms at 100k, benchmarks/search_scale.md). The settings go in one round trip.

    On the index plan `max_d` (min_score) is applied to the rows the walk gives, not in SQL, so that a
    walk that stops short is told from a search that found all there are. Where the walk stops short of
    n rows (hnsw.max_scan_tuples, a library that is a small share of the index) and more rows match
    (counted up to n, without distances), every matching row is compared instead (helper-32, helper-33),
    or with `complete=False` the caller is told (`short`). Either way the search says plan "exact". That
    holds when the short walk also gave rows past max_d: it had not reached every row within it (a
    library's best rows unreached in a walk as long as the graph, its rows 15 of 18: tests/test_search.py
    at 3,000 to 30,000 tuples), though its rows come best first."""
    if exact:
        every = _within(matches, distance, max_d).cte("matches").prefix_with("MATERIALIZED")
        # equal distances (silent files, one recording in two formats) in one order whatever `k` and
        # `offset` are, so that pages neither repeat nor skip them
        ties = [every.c.item_id, *([every.c.start_s] if "start_s" in every.c else [])]
        rows = session.execute(select(every).order_by(every.c.d, *ties).limit(n)).all()
        return Found(rows, len(rows) == n, False)
    session.execute(text("SELECT set_config('hnsw.iterative_scan', 'strict_order', true), "
                         "set_config('hnsw.ef_search', :ef, true), set_config('hnsw.max_scan_tuples', :scan, true)"),
                    {"ef": str(current_app.config["CLAPQ"].hnsw_ef_search), "scan": str(MAX_SCAN_TUPLES)})
    # The index gives equal distances in an order of its walk, which depends on how many rows are asked for:
    # pages repeated one copy and never showed the other (helper-52). They are put in the exact plan's order,
    # and where they run past the n-th row, the rest of them are looked up first
    rows = session.execute(matches.order_by(distance).limit(n + 1)).all()
    if len(rows) <= n or rows[n].d != rows[n - 1].d:
        rows = sorted(rows[:n], key=_tie_order)
    else:  # in the walk's order where the run of equal distances is too long to read
        rows = _ties_settled(session, matches, distance, rows[:n]) or rows[:n]
    kept = rows if max_d is None else [r for r in rows if r.d <= max_d]
    if len(rows) < n and session.scalar(select(func.count()).select_from(matches.limit(n).subquery())) > len(rows):
        g.exact_fallback = True
        if complete:
            return _best_first(session, matches, distance, n, True, max_d)
        return Found(kept, False, True)
    return Found(kept, len(rows) == n and len(kept) == len(rows), False)


def _tie_order(row) -> tuple:
    """The exact plan's order: by distance, then item, then window."""
    return row.d, row.item_id, getattr(row, "start_s", 0.0)


def _ties_settled(session, matches, distance, rows: list) -> list | None:
    """`rows` (the index's first n, best first) where the n-th ties with rows past it: the n best in the exact
    plan's order. The run of that distance is read through the index as (item, window, distance) alone, and
    only the rows that make the cut and were not among `rows` are fetched whole. At most TIE_RUN_MOST rows past
    the n-th are read, in one statement; a longer run (a long recording's silence is thousands of equal
    windows) is left in the walk's order, None: reading 12,000 such windows whole, metadata and all, took 1.3 s
    and 600 MB (helper-53), and in the exact plan's order they are grouped by item, so a search for items
    widened its walk round after round to find 10 distinct ones (710 ms where it took 7 ms,
    benchmarks/search_consistency.py --spread 0)."""
    edge = rows[-1].d
    cols = matches.selected_columns
    keys = [cols.item_id, *([cols.start_s] if "start_s" in cols else [])]
    narrow = matches.with_only_columns(*keys, cols.d).order_by(distance)
    most = min(MAX_CANDIDATES, len(rows) + TIE_RUN_MOST)
    run = session.execute(narrow.limit(most)).all()
    if len(run) == most and run[-1].d == edge:
        return None
    before = [r for r in rows if r.d < edge]
    tied = [tuple(r[:-1]) for r in sorted((r for r in run if r.d == edge), key=_tie_order)][:len(rows) - len(before)]

    def key(row) -> tuple:
        return tuple(getattr(row, c.name) for c in keys)

    have = {key(r): r for r in rows}
    missing = [k for k in tied if k not in have]
    fetched = {key(r): r for r in session.execute(matches.where(tuple_(*keys).in_(missing)))} if missing else {}
    return sorted(before, key=_tie_order) + [have.get(k) or fetched[k] for k in tied if k in have or k in fetched]


def _best_per_item(session, matches, want: int) -> list:
    """Each item's best window among every row of `matches`, the `want` best items first (no index)."""
    g.exact_fallback = True
    every = matches.cte("matches").prefix_with("MATERIALIZED")
    one = select(every).ext(distinct_on(every.c.item_id)) if distinct_on else select(every).distinct(every.c.item_id)
    per_item = one.order_by(every.c.item_id, every.c.d).subquery()
    rows = session.execute(select(per_item).order_by(per_item.c.d, per_item.c.item_id).limit(want)).all()
    session.rollback()
    return rows


def nearest_pooled(vec, lib_ids: list[uuid.UUID], model_id: int, conds: list, exclude, want: int,
                   min_score: float | None, exact: bool) -> list:
    """Items nearest to `vec` by their pooled vectors, best first (item_id, library_id, filename, meta, d).

    Items of two or more windows are found through the pooled-vector index. An item of one window is
    not in that index (migration 0005): its one segment has its pooled vector, so it is found through
    the segment index. Each kind is asked for `want` rows and the two lists are merged. The one-window
    side is compared exactly where the libraries hold few such items (counted on their own index, at
    most exact_search_max_windows + 1), and skipped where they hold none, so a library of long files
    never walks the segment index for one-window items it lacks."""
    session = db()
    limit = current_app.config["CLAPQ"].exact_search_max_windows
    by_pool = Embedding.vector.cosine_distance(vec)
    max_d = _farthest(min_score)
    pooled = _matches(Embedding, by_pool, lib_ids, model_id, conds, exclude
                      ).where(text("embeddings.windows > 1"))  # the partial index's predicate, verbatim
    rows = list(_best_first(session, pooled, by_pool, want, exact, max_d).rows)
    one_window = (select(Embedding.item_id).where(Embedding.library_id.in_(lib_ids), Embedding.model_id == model_id,
                                                  text("embeddings.windows = 1")).limit(limit + 1).subquery())
    few = session.scalar(select(func.count()).select_from(one_window))
    if few:
        by_window = Segment.vector.cosine_distance(vec)
        single = (_matches(Segment, by_window, lib_ids, model_id, conds, exclude)
                  .join(Embedding, and_(Embedding.item_id == Segment.item_id, Embedding.model_id == Segment.model_id))
                  .where(text("embeddings.windows = 1")))
        rows += _best_first(session, single, by_window, want, exact or few <= limit, max_d).rows
    session.rollback()
    return sorted(rows, key=lambda r: (r.d, r.item_id))[:want]


def _nearest_items(vec, lib_ids, model_id: int, conds: list, exclude, want: int, min_score: float | None,
                   exact: bool) -> list:
    session = db()
    hits = nearest_pooled(vec, lib_ids, model_id, conds, exclude, want, min_score, exact)
    # each item's closest window, picked here: ordered by distance in SQL, with no LIMIT, Postgres may walk the HNSW
    # index for it (sorting off), which met few of the items' windows, and the items it did not meet were dropped
    # (helper-66). Equal distances: the earliest window, as the exact plan orders them
    spans: dict = {}
    for r in session.execute(select(Segment.item_id, Segment.start_s, Segment.end_s,
                                    Segment.vector.cosine_distance(vec).label("d"))
                             .where(Segment.item_id.in_([h.item_id for h in hits]), Segment.model_id == model_id)):
        if r.item_id not in spans or (r.d, r.start_s) < (spans[r.item_id].d, spans[r.item_id].start_s):
            spans[r.item_id] = r
    session.rollback()
    return [SimpleNamespace(**h._asdict(), start_s=spans[h.item_id].start_s, end_s=spans[h.item_id].end_s)
            for h in hits if h.item_id in spans]
