"""Query vectors for search and tagging: text (cached in Redis), an uploaded clip, or a stored item."""

from __future__ import annotations

import hashlib
import importlib
import sys
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
from flask import current_app, g
from sqlalchemy import select

import worker
from api.db import db
from api.errors import ApiError, bad_request, code_changed, not_found
from api.lookup import owned_item
from api.models_info import serving_checkpoint
from api.uploads import display_name
from clapq.blobs import FULL
from clapq.queue import best_effort
from clapq.models import Embedding, Item
from clapq.threads import one_thread
from worker import CodeChanged
from worker.audio import DecodeError, ScratchTooSmall, TooLong, format_hint
from worker.decoder import get_pool
from worker.windows import pooled, read_window, spans


TEXT_CACHE_TTL_S = 7 * 24 * 3600
# texts a tenant may have cached in each TEXT_CACHE_TTL_S (at most twice this many are held at once, ~2 KB each):
# past it, its new texts are embedded each time until that stretch is out. Unbounded, one tenant's searches and
# classify labels of new texts (200 a request) filled Redis, which is also the queue every tenant's uploads
# wait in, at the text tower's pace, for a week per text (helper-75)
TEXT_CACHE_MOST = 20_000
TEXTS_PER_CALL = 16  # texts embedded in one turn of the model thread (a classify's labels take several)

def on_model_thread(fn, *args):
    """fn(*args) run on this process's one model thread; waits for it and returns (or raises) what it did.

    Each thread that calls torch gets an OpenMP team of its own. gunicorn's request threads each did, so
    a process soon had more OpenMP threads than cores, and libgomp then stops spinning between parallel
    regions: each of the hundreds of small regions of a text query (layer norms, GELUs) waited for a
    wake-up. The full-size text tower took 22-24 ms on a request thread against 14 ms on one thread
    that alone runs torch (bf16, 2 cores; fp32 61-64 against 55: BENCHMARKS.md). Model calls are one at
    a time anyway (LoadedClap's lock), so one thread loses no concurrency."""
    return one_thread("clapq-model").submit(fn, *args).result()


_MIXED: set[str] = set()  # modules imported while the code on disk changed: parts of them may be the new code


def loaded(module: str, what: str):
    """`module`, imported on first use: those that import torch (seconds, and hundreds of MB an API that never
    searches does not pay) are not imported at start-up. Where this process has not imported it yet and the code on
    disk is no longer what the process started with (upgraded in place), a 503 code_changed (api.errors.code_changed)
    saying `what` needed it, not a 500: the new module's calls into the old ones loaded at start (or theirs into it)
    were an ImportError or a TypeError. So too, for good, where the code changed while it was imported (torch takes
    seconds). import_module, not sys.modules: a module another thread is importing is waited for, not taken half
    made."""
    first = module not in sys.modules
    if module in _MIXED or (first and worker.code_on_disk() != worker.CODE):
        raise code_changed(what)
    found = importlib.import_module(module)
    if first and worker.code_on_disk() != worker.CODE:
        _MIXED.add(module)
        raise code_changed(what)
    return found


def _clap(text_only: bool):
    """The API's own model, loaded lazily in this process on first use (never at start-up), so a
    search never waits behind bulk ingest in the workers' queue."""
    get_clap = loaded("clapq.clap", "the model cannot be loaded here").get_clap

    settings = current_app.config["CLAPQ"]
    return get_clap(serving_checkpoint(), settings.device, settings.precision, text_only=text_only,
                    text_int8=text_only and settings.text_int8, attention=settings.attention)


def _text_precision() -> str:
    """The arithmetic of this API's text tower (int8, bf16, fp16, fp32): each kind's vectors are cached
    apart."""
    model_precision = loaded("clapq.precision", "the text cannot be embedded here").model_precision

    settings = current_app.config["CLAPQ"]
    return model_precision(settings.device, settings.precision, settings.text_int8)


def text_cache_key(ckpt, text: str, precision: str, tenant_id) -> str:
    """Where a query's text vector is cached: per model (weights hash), text tower precision, tenant and
    text. Per tenant: a cached text answers in a fraction of the time a new one takes, so a cache that
    tenants shared told one of them what texts another had searched for or classified by (helper-35)."""
    tower = ckpt.weights_sha256[:16] + ("" if precision == "fp32" else f":{precision}")
    return f"clapq:text:{tower}:{tenant_id}:{hashlib.sha256(text.encode()).hexdigest()}"


def embed_in_turns(clap, texts: list[str], per_call: int = TEXTS_PER_CALL) -> np.ndarray:
    """Text vectors computed TEXTS_PER_CALL at a time on the model thread, each turn handed in after the
    last returns, so that a search of another request waits behind one turn, not behind all of a classify's
    200 new labels (3-6 s on a busy 2-core machine for the full-size text tower:
    benchmarks/classify_contention.py)."""
    return np.concatenate([on_model_thread(clap.embed_text, texts[i : i + per_call])
                           for i in range(0, len(texts), per_call)])


def text_vectors(texts: list[str]) -> np.ndarray:
    """One unit vector per text; each is computed once per model and then served from Redis. A text is taken
    in Unicode NFC: "café" typed with a combining accent (as macOS writes file names) is "café", one query."""
    texts = [unicodedata.normalize("NFC", t) for t in texts]
    ckpt = serving_checkpoint()
    precision = _text_precision()
    keys = [text_cache_key(ckpt, t, precision, g.tenant_id) for t in texts]
    found: list[bytes | None] = [None] * len(texts)
    celery = current_app.extensions["clapq_celery"]
    with best_effort(celery, "reading the text cache") as cache:  # an optimisation: Redis away means compute
        if cache is not None:
            found = cache.mget(keys)
    missing = [i for i, v in enumerate(found) if v is None]
    out = np.zeros((len(texts), ckpt.dim), np.float32)
    for i, v in enumerate(found):
        if v is not None:
            out[i] = np.frombuffer(v, np.float32)
    if missing:
        vecs = embed_in_turns(_clap(text_only=True), [texts[i] for i in missing])
        for i, v in zip(missing, vecs):
            out[i] = v
        with best_effort(celery, "writing the text cache") as cache:
            if cache is not None:
                counted = f"clapq:text-cached:{g.tenant_id}"  # the tenant's texts cached in this stretch
                pipe = cache.pipeline(transaction=False)
                pipe.set(counted, 0, ex=TEXT_CACHE_TTL_S, nx=True)
                pipe.incrby(counted, len(missing))
                if pipe.execute()[1] <= TEXT_CACHE_MOST:
                    pipe = cache.pipeline(transaction=False)
                    for i in missing:
                        pipe.set(keys[i], out[i].tobytes(), ex=TEXT_CACHE_TTL_S)
                    pipe.execute()
    return out


MAX_CLIP_S = 600  # seconds of a clip sent to search (GET /v1/limits)
DECODE_RETRY_AFTER_S = 5  # a clip whose decoding failed for no reason in its bytes: sent again after this


def _clip(upload) -> str:
    """The clip as an error names it: by its file's name where the client sent one (`clapq search --like`, the
    search page), as a user who sent several clips one after the other, or a script, knows which was refused."""
    name = display_name(upload.filename) if upload.filename else ""
    return f"the 'audio' clip {name!r}" if name else "the 'audio' clip"


def audio_vector(upload) -> np.ndarray:
    """Embed an uploaded clip like a stored item: decoded in a killable child, windows, normalised mean. Where the
    API's temporary folder cannot hold the clip or its samples, a 507 (full) or 503, not a 500."""
    try:
        return _clip_vector(upload)
    except OSError as exc:  # the API's temporary folder (TMPDIR) full or not writable, the clip's copy unreadable
        full = exc.errno in FULL
        raise ApiError(507 if full else 503, "insufficient_storage" if full else "unavailable",
                       f"{_clip(upload)} could not be kept while it is searched: the API's temporary folder "
                       f"(TMPDIR, {tempfile.gettempdir()}) {'is full' if full else 'failed'} "
                       f"({exc.strerror or exc}); try again later", {"Retry-After": str(DECODE_RETRY_AFTER_S)}) from None


def _clip_vector(upload) -> np.ndarray:
    settings = current_app.config["CLAPQ"]
    with tempfile.TemporaryDirectory(prefix="clapq-query-") as tmp:
        src, raw = Path(tmp) / "clip", Path(tmp) / "clip.f32"
        upload.save(src)
        try:
            with get_pool(1).checkout() as decoder:
                wall = min(60, settings.decode_timeout_s)  # as an uploaded file's, within the time of a request
                _, n = decoder.decode(src, raw, wall, MAX_CLIP_S, hint=format_hint(upload.filename),
                                      cpu_s=min(settings.decode_cpu_s, max(1, wall // 2)))
        except CodeChanged as exc:  # no wait mends it: the operator's to restart (the client stops on it)
            why = ("clapq's code changed on disk since the API started (upgraded in place?), and a decoder started "
                   "now would run other code than the API's; the API must be restarted" if exc.upgraded else exc)
            raise code_changed(f"{_clip(upload)} cannot be decoded here", str(why)) from None
        except TooLong:
            raise bad_request(f"{_clip(upload)} lasts longer than {MAX_CLIP_S} s, the limit for a search clip; "
                              "send a part of it") from None
        except ScratchTooSmall:  # the worker's words name its scratch disk; here it is the API's temporary folder
            raise ApiError(507, "insufficient_storage", f"{_clip(upload)}'s decoded samples are larger than the "
                           f"whole of the API's temporary folder (TMPDIR, {tempfile.gettempdir()}); send a shorter "
                           "clip, or ask the operator for a larger folder") from None
        except DecodeError as exc:
            if not exc.in_file:  # the machine's (a decoder given no time, or killed from outside): the clip may do
                raise ApiError(503, "decoder_unavailable", f"{_clip(upload)} could not be decoded now ({exc}); "
                               f"send it again in {DECODE_RETRY_AFTER_S} s",
                               {"Retry-After": str(DECODE_RETRY_AFTER_S)}) from None
            raise bad_request(f"{_clip(upload)} could not be decoded: {exc}") from None
        emb = current_app.extensions.setdefault("clapq_audio_embedder", {})
        if "e" not in emb:
            embedder = loaded("worker.embedder", "the 'audio' clip cannot be embedded here").AudioEmbedder
            emb["e"] = on_model_thread(embedder, _clap(text_only=False))
        e = emb["e"]
        starts = [s for s, _, _ in spans(n, e.rate, e.window_samples, e.window_samples // 2)]
        # read 16 windows at a time, as they are embedded: a 600 s clip is 119 windows of 10 s that overlap by
        # half, 228 MB read at once, which an API process kept (helper-75)
        vecs = np.concatenate([
            on_model_thread(e.embed, np.stack([read_window(raw, n, s, e.window_samples) for s in starts[i : i + 16]]))
            for i in range(0, len(starts), 16)])
    return pooled(vecs)


def item_vector(raw_id: str) -> tuple[Item, np.ndarray]:
    """A stored item's pooled vector ("more like this"); the item must be the caller's and embedded."""
    item, lib = owned_item(raw_id)
    vec = db().scalar(select(Embedding.vector).where(Embedding.item_id == item.id,
                                                     Embedding.model_id == lib.model_id))
    if vec is None:
        # a deletion (of the item, or of its library) committed between the two reads took the vectors first: the
        # item's 404, as a moment later, not a 409 "no embedding yet (status 'done')" (seen while a library was
        # deleted under searches by its items)
        if db().scalar(select(Item.id).where(Item.id == item.id)) is None:
            raise not_found("item")
        if item.status == "failed":  # it never will unless it is sent again
            why = f": {item.error}" if item.error else ""
            raise ApiError(409, "not_embedded", f"item {item.id} has no embedding: it failed{why}; "
                           "upload the file again once it plays (retrying its job helps only where the "
                           "failure was not the file's own, as a missing stored copy or lost workers)")
        if item.status == "cancelled":
            raise ApiError(409, "not_embedded", f"item {item.id} has no embedding: its embedding was cancelled; "
                           "retry its job (POST /v1/jobs/<id>/retry) or upload the file again")
        raise ApiError(409, "not_embedded", f"item {item.id} has no embedding yet (status {item.status!r}); "
                       "it can be used once its job has embedded it")
    return item, np.asarray(vec, dtype=np.float32)
