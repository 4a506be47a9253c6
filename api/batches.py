"""Upload a batch of files into a library: stream to the blob store, commit rows, then enqueue."""

from __future__ import annotations

import json
import random
import time
import unicodedata
import uuid
from collections import Counter

from flask import Blueprint, current_app, g, request
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert

from api.db import db, lane_room, send_committed
from api.errors import ApiError, bad_request, check_metadata, given_once, not_json, parse_json
from api.lookup import owned
from api.models_info import describe, served_model_for, serving_model_id
from api.query import MAX_CLIP_S
from api.search import MAX_FILTER_KEYS, MAX_FILTER_VALUES
from api.uploads import display_name
from clapq.blobs import BLOB_LOCK, unqueue_reclaim
from clapq.models import WAITING_FOR_MODEL, BlobReclaim, Item, Job, JobDuplicate, Library, requeued
from clapq.queue import in_the_queue

bp = Blueprint("batches", __name__)

# re-uploaded bytes whose item ended in one of these states are embedded again; others are duplicates
RETRIED_ON_REUPLOAD = ("failed", "cancelled")


def _metadata_field(raw_names: list[str]) -> dict:
    """The metadata of each file, by its part's name as sent (those with none left out). A key is the part's
    filename in either Unicode form: "Café.wav" typed (NFC) for a part named as a macOS folder spells it (NFD)
    was refused as naming no file, with a name that looked like the file's (helper-118)."""
    given_once(request.form, "the form")  # 'metadata' twice would be read as the first, silently
    raw = request.form.get("metadata")
    if "metadata" in request.files:  # sent as a file, as `curl -F metadata=@meta.json` sends it
        if raw is not None or len(request.files.getlist("metadata")) > 1:
            raise bad_request("the form gives 'metadata' more than once; give it once")
        raw = _read_text(request.files["metadata"], "'metadata'")
    if raw is None or raw.strip() == "":
        return {}
    try:
        meta = parse_json(raw, "'metadata'")
    except ValueError as exc:
        raise not_json("metadata", raw, exc) from None
    if not isinstance(meta, dict):
        raise bad_request("'metadata' must be a JSON object mapping filename -> object")
    keys: dict[str, str] = {}  # each key in NFC -> the key as sent
    for name, value in meta.items():
        if not isinstance(value, dict):
            raise bad_request(f"'metadata' of {display_name(name)!r} must be an object (of key: value), "
                              f"not {json.dumps(value)[:40]}")
        if (same := unicodedata.normalize("NFC", name)) in keys:
            raise bad_request(f"'metadata' names {same!r} twice (its accents written in two ways); name each file once")
        keys[same] = name
    sent = {unicodedata.normalize("NFC", part): part for part in raw_names}
    unknown = sorted(keys[k] for k in keys if k not in sent)
    if unknown:
        # a part sent with its folders ("sub/b.wav") keyed by the name the API shows for it ("b.wav")
        within = next((part for k in sorted(keys) if k not in sent for nfc, part in sent.items()
                       if nfc.replace("\\", "/").rsplit("/", 1)[-1] == k), None)
        hint = "" if within is None else (f" (the batch has {within!r}: metadata is keyed by each part's filename "
                                          "as sent, its folders included)")
        raise bad_request(f"'metadata' names files not in this batch: {unknown[:5]}{hint}")
    for name, value in meta.items():
        check_metadata(value, f"'metadata' of {display_name(name)!r}")
    return {part: meta[keys[nfc]] for part in raw_names if (nfc := unicodedata.normalize("NFC", part)) in keys}


def _read_text(part, what: str) -> str:
    """A small part sent as a file, as text: at most the size of a form field (MAX_FORM_MEMORY_SIZE)."""
    most = current_app.config["MAX_FORM_MEMORY_SIZE"]
    part.stream.seek(0)
    data = part.stream.read(most + 1)
    if len(data) > most:
        raise ApiError(413, "payload_too_large", f"{what} is over {most} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{what} is not UTF-8 text") from None


# files of the batch were being deleted, or their stored copies removed, at the moment it committed: the
# whole batch again is always right (`clapq upload` sends it again after a 503's Retry-After)
def _raced() -> ApiError:
    return ApiError(503, "conflict", "files of this batch were being deleted at the same moment; nothing was "
                    "stored; send the batch again", {"Retry-After": "1"})


def _uncovered(session, digests: list[str]) -> set[str]:
    """The digests that a crash from here on would leave as files nothing names: neither queued for
    removal (a deletion's removal, or another upload's commit, may have taken the rows this upload queued,
    between its two transactions) nor named by a committed item (whose deletion would queue them)."""
    left = set(digests) - set(session.scalars(select(BlobReclaim.sha256).where(BlobReclaim.sha256.in_(digests))))
    if left:
        left -= set(session.scalars(select(Item.sha256).where(Item.sha256.in_(left))))
    return left


def backpressure(settings, besides=None) -> None:
    """Refuse new work while the backlog is over its bound, rather than let the queue grow without limit,
    and while the caller's own files waiting are over a tenant's share of it: one tenant's uploads filled
    the whole backlog, and every other tenant's got 429s until it drained (helper-35). The backlog's size
    is not said: it counts every tenant's files. The caller's own are counted only where the whole
    backlog reaches a tenant's share: at 200,000 waiting, the whole count reads the index of waiting rows
    (4–7 ms), a tenant's own 0.7 ms (a light one) to 11 ms (one holding most), index-only, and 10,000 files
    parked for another model 0.45 ms (benchmarks/backpressure.py, session 38). `besides`: the id of a library
    of the caller's whose files waiting are not counted (a re-embed's: of a model the service no longer runs,
    they wait for no worker of it, and the re-embed is their way out; counted, a library of a tenant's share
    of them could never be re-embedded)."""
    waiting = Item.status.in_(("queued", "running"))
    left_out = 0 if besides is None else db().scalar(
        select(func.count()).where(waiting, in_the_queue(), Item.library_id == besides))
    total = db().scalar(select(func.count()).where(waiting)) - left_out
    if total >= min(settings.max_pending, settings.max_pending_per_tenant):
        # files parked for a worker of another model hold no place in the queue (ix_items_no_message): counted,
        # a tenant whose CLAPQ_MODEL changed with a share of files queued could upload nothing more
        total -= db().scalar(select(func.count()).where(Item.status == "queued", Item.claimed_by == WAITING_FOR_MODEL))
    if total >= settings.max_pending_per_tenant:
        own = db().scalar(select(func.count()).where(waiting, in_the_queue(), Item.tenant_id == g.tenant_id)) - left_out
        if own >= settings.max_pending_per_tenant:
            raise ApiError(429, "busy", f"{own} of your files {'is' if own == 1 else 'are'} waiting to be embedded "
                           f"(at most {settings.max_pending_per_tenant} a tenant, CLAPQ_MAX_PENDING_PER_TENANT); "
                           "retry later", {"Retry-After": "60"})
    if total >= settings.max_pending:
        raise ApiError(429, "busy", f"the service has {settings.max_pending} files or more waiting to be embedded "
                       "(CLAPQ_MAX_PENDING); retry later", {"Retry-After": "60"})


@bp.get("/limits")
def limits():
    """What this service takes, so a client can fit its requests to it (`clapq upload` sizes its batches
    by these and leaves out files over the per-file limit) instead of learning each from a refusal."""
    from api.libraries import MAX_DELETIONS  # that module imports this one

    s = current_app.config["CLAPQ"]
    return {"max_file_bytes": s.max_file_bytes, "max_files_per_batch": s.max_files_per_batch,
            "max_request_bytes": s.max_request_bytes, "max_duration_s": s.max_duration_s, "max_clip_s": MAX_CLIP_S,
            "max_query_chars": s.max_query_chars, "max_k": s.max_k, "max_filter_keys": MAX_FILTER_KEYS,
            "max_filter_values": MAX_FILTER_VALUES, "search_timeout_s": s.search_timeout_s or None,
            "max_deletions": MAX_DELETIONS, "client_timeout_s": s.client_timeout_s or None,
            "rate_limit": current_app.extensions["clapq_rate_limit"].describe(),
            "rate_limits": current_app.extensions["clapq_rate_limit"].windows(),
            # the model it runs: a library bound to another answers 409 model_mismatch, and its files not embedded
            # yet wait for a worker of their model (`clapq upload` says so rather than wait, helper-63)
            "model": describe(serving_model_id())}


@bp.post("/libraries/<lib_id>/batches")
def upload_batch(lib_id: str):
    lib = owned(Library, lib_id, "library")  # before the body is read
    served_model_for(lib)  # files for a library of another model could never be embedded here
    # kept: the rollback below expires `lib`, and reading it again would fail as a 500 if the library is
    # deleted while the body arrives; its id makes that the foreign-key 404 "deleted while it ran"
    library = lib.id
    settings = current_app.config["CLAPQ"]
    backpressure(settings)
    # the checks are done: end their transaction before the body streams in (minutes for a large upload
    # on a slow link), so no connection sits "idle in transaction" holding locks that block migrations
    db().rollback()
    if request.mimetype != "multipart/form-data":  # lowercased: a media type's name has no case
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with one or more 'files' parts")
    files = request.files.getlist("files")  # a full upload area raises StorageFull: a 507 (api.errors)
    # a part under another name would be dropped unseen ('file' for 'files', a 'tags' field)
    other = sorted(k or "" for k in (set(request.files) | set(request.form)) - {"files", "metadata"})
    if request.form.getlist("files"):  # `curl -F files=x.wav` (no @): the name as text, not the file; a part with
        # no filename (requests' `files=[("files", (None, data))]`): the file's bytes as text
        raise bad_request("a 'files' part came as a text field, not a file: give it a filename (with curl: "
                          "-F files=@path)")
    if other:
        which = f"a part {other[0]!r}" if other[0] else "a part with no name"
        raise bad_request(f"the form has {which}, which an upload does not take: send each file as a part named "
                          "'files', and their metadata as one part named 'metadata'")
    if not files:
        raise bad_request("no files: send each file as a multipart part named 'files'")
    if len(files) > settings.max_files_per_batch:
        raise ApiError(413, "too_many_files", f"{len(files)} files in one batch; the limit is "
                       f"{settings.max_files_per_batch} (CLAPQ_MAX_FILES_PER_BATCH)")
    raw_names = [f.filename or "" for f in files]
    meta = _metadata_field(raw_names)
    too_big = [n for f, n in zip(files, raw_names) if f.stream.size > settings.max_file_bytes]
    if too_big:
        raise ApiError(413, "file_too_large", f"{display_name(too_big[0])!r} is larger than the per-file limit "
                       f"of {settings.max_file_bytes} bytes (CLAPQ_MAX_FILE_BYTES)")
    session = db()
    for attempt in range(3):
        digests = request.queue_uploads([f.stream for f in files])  # off the queue again with the rows' commit
        job = Job(tenant_id=g.tenant_id, library_id=library, kind="upload")
        session.add(job)
        session.flush()
        # a deletion's removal of these bytes' blob waits for this transaction (clapq.blobs.BLOB_LOCK)
        session.execute(select(func.pg_advisory_xact_lock_shared(BLOB_LOCK)))
        if not _uncovered(session, digests):
            break
        # queue them again, this transaction ended (had it waited on a second connection, that one could
        # wait on a deletion that waits on this transaction), after a pause that parts racing requests
        session.rollback()
        time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
    else:
        raise _raced()
    shas = [f.stream.commit() for f in files]
    names = [display_name(raw) for raw in raw_names]
    # one row per distinct bytes (the first file that has them), all in one statement
    rows: dict[str, dict] = {}
    for f, raw, name, sha in zip(files, raw_names, names, shas):
        rows.setdefault(sha, dict(tenant_id=g.tenant_id, library_id=library, job_id=job.id, sha256=sha,
                                  filename=name, size_bytes=f.stream.size, meta=meta.get(raw, {})))
    # ids that sort in the order the files were sent (random ids, sorted): listings, which go by (created_at,
    # id), show a batch's files in that order, as its rows share created_at
    for row, item_id in zip(rows.values(), sorted(uuid.uuid4() for _ in rows)):
        row["id"] = item_id
    # rows in sha256 order: two uploads inserting the same files wait for each other in the same order (no deadlock)
    created = dict(session.execute(
        insert(Item).values([rows[sha] for sha in sorted(rows)])
        .on_conflict_do_nothing(index_elements=["library_id", "sha256"]).returning(Item.sha256, Item.id)
    ).all())
    # the rest were already in this library: one item per bytes
    missing = [sha for sha in rows if sha not in created]
    # locked, so that whether a file is retried here is decided on its latest state: an upload of the same
    # failed file at the same moment, or a job retry, that committed first has made it queued (a copy here).
    # In id order, as a deletion, a job's cancel and retry and a worker's vector write lock items (committed
    # rows: the inserts above no longer wait for anything); in digest order, a library's deletion at the same
    # moment could be a deadlock, rolled back as a 503 (helper-60)
    existing = {r.sha256: r for r in session.execute(
        select(Item.sha256, Item.id, Item.status, Item.meta).where(Item.library_id == library, Item.sha256.in_(missing))
        .order_by(Item.id).with_for_update()
    )} if missing else {}
    if len(existing) < len(missing):  # deleted, and committed, between the insert and this look
        raise _raced()
    retried = {r.id for r in existing.values() if r.status in RETRIED_ON_REUPLOAD}
    if retried:
        # they failed (or were cancelled) before: uploading them again is a retry, tracked by this
        # job, so the job reports their new outcome instead of counting them done unseen
        session.execute(update(Item).where(Item.id.in_(retried)).values(**requeued(job.id)))
        for sha, r in existing.items():  # metadata sent with a retried file replaces what it had
            if r.id in retried and rows[sha]["meta"]:
                session.execute(update(Item).where(Item.id == r.id).values(meta=rows[sha]["meta"]))
    out, new_ids, seen, copies = [], [], set(), Counter()
    for raw, name, sha in zip(raw_names, names, shas):
        old = existing.get(sha)
        item_id = created[sha] if old is None else old.id
        # its bytes' sha256: `clapq upload` keeps it for the file it sent, where it hashed each file as it sent it
        entry = {"id": str(item_id), "filename": name, "sha256": sha}
        # what the item's metadata is now: this batch's for a new or retried file, if it sent any
        kept = rows[sha]["meta"] if old is None or (old.id in retried and rows[sha]["meta"]) else (old.meta or {})
        if sha in seen:  # the same bytes twice in this batch
            entry.update(status="queued" if old is None or old.id in retried else old.status,
                         duplicate_of=str(item_id))
            copies[item_id] += 1
        elif old is None:
            entry["status"] = "queued"
            new_ids.append(item_id)
        elif old.id in retried:
            entry.update(status="queued", retry_of=old.status)
            new_ids.append(item_id)
        else:
            entry.update(status=old.status, duplicate_of=str(item_id))
            copies[item_id] += 1
        if "duplicate_of" in entry and meta.get(raw) and meta[raw] != kept:
            # a copy's metadata is not stored: say so, rather than drop it unseen (PATCH /v1/items/<id>)
            entry["metadata_ignored"] = True
        seen.add(sha)
        out.append(entry)
    if copies:  # the job reports each copy as the item it is a copy of stands, not as done
        job.duplicates = sum(copies.values())
        session.execute(insert(JobDuplicate).values(
            [{"job_id": job.id, "item_id": i, "copies": n} for i, n in copies.items()]))
    unqueue_reclaim(session, digests)  # held now, by this upload's items or the ones already there
    fast = lane_room(new_ids)
    session.commit()
    request.keep_uploads()
    send_committed(new_ids, fast, job_id=str(job.id))
    return {"job_id": str(job.id), "items": out}, 202
