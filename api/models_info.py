"""The model this deployment serves, fingerprinted without torch and registered once per process."""

from __future__ import annotations

import functools
import shlex

from flask import current_app

from api.db import db
from api.errors import ApiError
from clapq.checkpoint import Checkpoint, ModelUnavailable, register_model, resolve
from clapq.db import session_scope
from clapq.models import EmbeddingModel
from clapq.settings import Settings


def serving_checkpoint() -> Checkpoint:
    try:
        return resolve(current_app.config["CLAPQ"].model)
    except ModelUnavailable as exc:
        raise ApiError(503, "model_unavailable", str(exc)) from None


@functools.lru_cache(maxsize=8)
def registered_model_id(name: str, weights_sha256: str, url: str) -> int:
    with session_scope(url) as s:
        return register_model(s, resolve(name))


def model_id_of(settings: Settings, ckpt: Checkpoint | None = None) -> int:
    """The id of the model `settings` name (CLAPQ_MODEL; `ckpt`: its checkpoint, resolved already), registered
    once a process; ModelUnavailable where it is not there. Needs no request: /readyz's checks ask it in threads
    of their own."""
    ckpt = ckpt or resolve(settings.model)
    return registered_model_id(ckpt.name, ckpt.weights_sha256, settings.database_url)


def serving_model_id() -> int:
    """The id of the model this API serves; a 503 model_unavailable where its checkpoint is not there."""
    return model_id_of(current_app.config["CLAPQ"], serving_checkpoint())


def served_model_for(*libs, whose: str = "") -> int:
    """The id of the model this API serves, refusing (409) libraries bound to another: their vectors are
    never compared with this model's, and files uploaded into them could not be embedded. The refusal names the
    library and both models: "the library" left a search of several libraries, or by an item of another library
    than those searched (`whose`: "the item's "), to guess which one."""
    model_id = serving_model_id()
    if other := next((lib for lib in libs if lib.model_id != model_id), None):
        raise ApiError(409, "model_mismatch", f"{whose}library {other.name!r} ({other.id}) was embedded with "
                       f"another model ({describe(other.model_id)['name']}) than this service runs "
                       f"({describe(model_id)['name']}, CLAPQ_MODEL); vectors of two models are never compared: "
                       "run the library's model, or re-embed its files into a new library of this one "
                       f"(POST /v1/libraries/{other.id}/reembed; `clapq reembed --library {shlex.quote(other.name)} "
                       "--into NEW`)")
    return model_id


def describe(model_id: int) -> dict:
    """A model row as the API shows it (rows never change, so each process reads one once)."""
    return dict(_describe(model_id, current_app.config["CLAPQ"].database_url))


@functools.lru_cache(maxsize=64)
def _describe(model_id: int, url: str) -> tuple:
    m = db().get(EmbeddingModel, model_id)
    return tuple({"id": m.id, "name": m.name, "weights_sha256": m.weights_sha256, "dim": m.dim}.items())
