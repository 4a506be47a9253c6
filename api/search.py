"""Search a library by text: embed the query with the library's model, order by cosine distance."""

from __future__ import annotations

from flask import Blueprint, current_app, g, request
from sqlalchemy import select, text

from api.db import db
from api.errors import ApiError, bad_request
from api.lookup import owned
from api.models_info import describe, serving_checkpoint, serving_model_id
from clapq.models import Embedding, Item, Library

bp = Blueprint("search", __name__)


def embed_query(q: str):
    """The API's own text tower, loaded lazily on the first search (never at start-up)."""
    from clapq.clap import get_clap

    settings = current_app.config["CLAPQ"]
    return get_clap(serving_checkpoint(), settings.device, text_only=True).embed_text([q])[0]


def _params() -> tuple[str | None, str | None, object]:
    if request.method == "GET":
        return request.args.get("library_id"), request.args.get("q"), request.args.get("k", 10)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise bad_request("send a JSON object like {\"library_id\": ..., \"text\": ..., \"k\": 10}")
    return body.get("library_id"), body.get("text", body.get("q")), body.get("k", 10)


@bp.route("/search", methods=["GET", "POST"])
def search():
    settings = current_app.config["CLAPQ"]
    lib_id, q, k_raw = _params()
    if not lib_id:
        raise bad_request("'library_id' is required")
    lib = owned(Library, lib_id, "library")
    if not isinstance(q, str) or not q.strip():
        raise bad_request("the query text ('q' or 'text') is required")
    if len(q) > settings.max_query_chars:
        raise bad_request(f"the query is {len(q)} characters; the limit is {settings.max_query_chars}")
    try:
        k = int(k_raw)
        if isinstance(k_raw, bool) or isinstance(k_raw, float) and k_raw != k:
            raise ValueError
    except (TypeError, ValueError):
        raise bad_request("'k' must be an integer") from None
    if not 1 <= k <= settings.max_k:
        raise bad_request(f"'k' must be between 1 and {settings.max_k}")
    if lib.model_id != serving_model_id():
        raise ApiError(409, "model_mismatch", "this library was embedded with another model than the API serves")
    vec = embed_query(q.strip())
    session = db()
    # Iterative scans keep the HNSW index returning rows until k pass the library filter.
    session.execute(text("SET LOCAL hnsw.iterative_scan = strict_order"))
    session.execute(text(f"SET LOCAL hnsw.ef_search = {min(1000, max(100, 2 * k))}"))
    distance = Embedding.vector.cosine_distance(vec)
    rows = session.execute(
        select(Item.id, Item.filename, Item.meta, distance.label("d"))
        .join(Item, Item.id == Embedding.item_id)
        .where(Embedding.library_id == lib.id, Embedding.model_id == lib.model_id, Item.tenant_id == g.tenant_id)
        .order_by(distance).limit(k)
    ).all()
    session.rollback()
    return {
        "model": describe(lib.model_id),
        "results": [{"item_id": str(i), "filename": f, "score": round(1.0 - float(d), 6), "metadata": m or {}}
                    for i, f, m, d in rows],
    }
