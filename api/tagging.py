"""Zero-shot tagging with text labels, and near-duplicate lookup by vector and by sha256."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
from flask import Blueprint, current_app, g, request
from sqlalchemy import select

from api.db import db, time_limit
from api.errors import bad_request, json_body, nothing_to_show, refuse_unknown, takes_query
from api.lookup import owned
from api.models_info import served_model_for
from api.pages import after_cursor, cursor_arg, limit_arg, page_of
from api.query import item_vector, text_vectors
from api.search import described_page, few_windows, nearest_pooled
from clapq.models import Embedding, Item, Library

bp = Blueprint("tagging", __name__)

MAX_LABELS = 200
MAX_TEMPLATE_CHARS = 500
DEFAULT_TEMPLATE = "This is a sound of {label}."


def _labels() -> tuple[list[str], np.ndarray, int]:
    body = json_body()
    if not isinstance(body, dict):
        raise bad_request('send a JSON object like {"labels": ["dog", "rain"], "template": "This is a sound of {label}."}')
    refuse_unknown(body, {"labels", "template", "top"}, "classify",
                   "it takes 'labels', 'template' and 'top' (a library's are paged with ?limit= and ?cursor=)")
    labels = body.get("labels")
    if not isinstance(labels, list) or not labels:
        raise bad_request("'labels' must be a non-empty list of strings")
    # which label, and why: a blank one among 200 was "'labels' must be a non-empty list of strings", and one of
    # characters that show nothing was scored by the arbitrary vector a query of them is refused for (helper-118)
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise bad_request(f"label {i} is {json.dumps(label)[:40]}, not a string")
        if not label.strip():
            raise bad_request(f"label {i} is empty")
        if nothing_to_show(label):
            raise bad_request(f"label {i} has no visible characters")
    if len(labels) > MAX_LABELS:
        raise bad_request(f"{len(labels)} labels; the limit is {MAX_LABELS}")
    most = current_app.config["CLAPQ"].max_query_chars  # a label is embedded as a query is
    if (long := next((i for i, x in enumerate(labels) if len(x) > most), None)) is not None:
        raise bad_request(f"label {long} is {len(labels[long])} characters; the limit is {most} (CLAPQ_MAX_QUERY_CHARS)")
    # the same label twice (but for spaces around it, or its Unicode form) was scored twice, each taking a place
    # of `top` (helper-52)
    seen: set = set()
    for label in labels:
        if (same := unicodedata.normalize("NFC", label.strip())) in seen:
            raise bad_request(f"'labels' has {same!r} more than once; give each label once")
        seen.add(same)
    # null is as if left out, as in a search's body ("k": null is its default): "top": null was a 400
    template = DEFAULT_TEMPLATE if body.get("template") is None else body["template"]
    if not isinstance(template, str) or "{label}" not in template:
        raise bad_request("'template' must be a string containing '{label}'")
    if len(template) > MAX_TEMPLATE_CHARS:  # it was told to contain '{label}', which it did (helper-52)
        raise bad_request(f"'template' is {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}")
    top = 3 if body.get("top") is None else body["top"]
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise bad_request("'top' must be a whole number, 1 or more (over the number of labels gives them all)")
    # the top 3 of 2 labels are both, as when `top` is left out
    return labels, text_vectors([template.replace("{label}", x.strip()) for x in labels]), min(top, len(labels))


def _tags(vec: np.ndarray, labels: list[str], label_vecs: np.ndarray, top: int) -> list[dict]:
    scores = label_vecs @ np.asarray(vec, dtype=np.float32)
    order = np.argsort(-scores, kind="stable")[:top]
    return [{"label": labels[i], "score": round(float(scores[i]), 6)} for i in order]


@bp.post("/libraries/<lib_id>/classify")
@takes_query("limit", "cursor")
def classify_library(lib_id: str):
    lib = owned(Library, lib_id, "library")
    served_model_for(lib)  # labels are embedded by this API's model
    labels, label_vecs, top = _labels()
    limit, cursor = limit_arg(100), cursor_arg()
    rows = db().execute(
        select(Item.id, Item.filename, Item.created_at, Embedding.vector)
        .join(Embedding, Embedding.item_id == Item.id)
        .where(Item.library_id == lib.id, Embedding.model_id == lib.model_id, Item.tenant_id == g.tenant_id,
               after_cursor(Item, cursor))
        .order_by(Item.created_at, Item.id).limit(limit + 1)
    ).all()
    page, nxt = page_of(rows, limit)
    return {
        "items": [{"item_id": str(r.id), "filename": r.filename, "labels": _tags(r.vector, labels, label_vecs, top)}
                  for r in page],
        "next_cursor": nxt,
    }


@bp.post("/items/<item_id>/classify")
def classify_item(item_id: str):
    item, vec = item_vector(item_id)
    served_model_for(db().get(Library, item.library_id), whose="the item's ")
    labels, label_vecs, top = _labels()
    return {"item_id": str(item.id), "labels": _tags(vec, labels, label_vecs, top)}


@bp.get("/items/<item_id>/duplicates")
@takes_query("threshold", "limit")
def duplicates(item_id: str):
    """Exact copies (same sha256) in any of the caller's libraries, and items within `threshold` cosine."""
    try:  # `threshold=` empty is the default, as `limit=` is
        threshold = float(request.args.get("threshold") or 0.95)
    except ValueError:
        raise bad_request("'threshold' must be a number between -1 and 1") from None
    if not -1.0 <= threshold <= 1.0:
        raise bad_request("'threshold' must be a number between -1 and 1")
    limit = limit_arg(50)
    time_limit(current_app.config["CLAPQ"].search_timeout_s)  # a search, as any other
    item, vec = item_vector(item_id)
    # read now: nearest_pooled's rollback expires `item`, and reading it after that loads the row again, a 500
    # where the item was deleted meanwhile
    this, sha256 = item.id, item.sha256
    session = db()
    exact = session.execute(select(Item.id, Item.library_id, Item.filename)
                            .where(Item.tenant_id == g.tenant_id, Item.sha256 == sha256, Item.id != this)
                            .order_by(Item.created_at)).all()
    lib = session.get(Library, item.library_id)
    lib_ids = list(session.scalars(select(Library.id).where(Library.tenant_id == g.tenant_id)))
    few = few_windows(lib_ids, [], current_app.config["CLAPQ"].exact_search_max_windows, None)
    near, names = described_page(lambda: nearest_pooled(vec, lib_ids, lib.model_id, [], this, limit, threshold, few))
    return {
        "item_id": str(this), "sha256": sha256, "threshold": threshold,
        "exact": [{"item_id": str(r.id), "library_id": str(r.library_id), "filename": r.filename} for r in exact],
        "near": [{"item_id": str(r.item_id), "library_id": str(r.library_id), "filename": names[r.item_id].filename,
                  "score": round(1.0 - float(r.d), 6)} for r in near],
    }
