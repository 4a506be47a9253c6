"""Libraries: named collections, each bound to one embedding model."""

from __future__ import annotations

import json
import re
import unicodedata
import uuid

from flask import Blueprint, current_app, g
from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from api.batches import RETRIED_ON_REUPLOAD, backpressure
from api.db import db, lane_room, send_committed
from api.errors import (MAX_METADATA_BYTES, ApiError, bad_request, json_body, metadata_bytes, not_found,
                        refuse_unknown, shows_nothing, takes_query, yes_no)
from api.jobs import STATES, items_page, why_waiting
from api.lookup import owned, refreshed
from api.models_info import describe, serving_model_id
from api.removal import announce_gone, delete_items, released
from api.uploads import display_name
from clapq.blobs import BLOB_LOCK
from clapq.models import IN_BULK_LANE, Item, Job, Library
from clapq.queue import first_lane_files

bp = Blueprint("libraries", __name__)

MAX_DIGESTS = 10_000  # per /known request
MAX_MOVES = 10_000  # per /moves request
MAX_DELETIONS = 1_000  # item ids per /deletions request: one transaction (BENCHMARKS.md, "Deleting many files")
MAX_PATH_CHARS = 4096  # a path in a folder (Linux's PATH_MAX)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def library_json(lib: Library, item_count: int | None = None) -> dict:
    out = {"id": str(lib.id), "name": lib.name, "model": describe(lib.model_id),
           "created_at": lib.created_at.isoformat() if lib.created_at else None}
    if item_count is not None:
        out["item_count"] = item_count
    return out


def _library_name(body, what: str, example: str) -> str:
    """The library name `body` gives (a JSON object: its 'name'), as it is stored, or a 400 saying what is wrong
    with the body or the name. `what` takes the body; `example`: such a body."""
    if not isinstance(body, dict):
        raise bad_request(f"send a JSON object like {example}")
    refuse_unknown(body, {"name"}, what, f"it takes 'name' ({example})")
    name = body.get("name")
    if not isinstance(name, str) or len(name) > 200 or not any(
            unicodedata.category(c)[0] in "LNPS" and not shows_nothing(c) for c in name):
        raise bad_request("'name' must be a string of at most 200 characters with something visible in it")
    if any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in name.strip()):  # Unicode's line breaks too
        raise bad_request("'name' must not contain control characters (tabs, line breaks, ...)")
    # "x\u200b" beside "x", or a direction override, is a name that looks like another; the joiners and the
    # tag characters stay, as emoji sequences (a family, the flag of Wales) and some scripts need them
    if any(unicodedata.category(c) == "Cf" and c not in "\u200c\u200d" and not "\U000e0020" <= c <= "\U000e007f"
           for c in name):
        raise bad_request("'name' must not contain invisible formatting characters (zero-width spaces, "
                          "direction overrides, byte-order marks, ...)")
    try:  # a name that is an id: `--library ID` in the CLI would find one library by name and another by id
        uuid.UUID(name.strip())
    except ValueError:
        pass
    else:
        raise bad_request("'name' must not be a library id (a UUID): names and ids are both ways to name a library")
    # stored in NFC: "Café" typed, and "Café" taken from a macOS folder name (e + combining accent), are
    # one name, not two libraries that look the same; one made before this rule is matched the same way
    return unicodedata.normalize("NFC", name.strip())


def _name_free(name: str, but: uuid.UUID | None = None) -> ApiError:
    """The 409 for a name the tenant has a library of (other than `but`), raised where it has one; else returned,
    for the caller to raise where its write finds one made meanwhile (the unique constraint)."""
    exists = ApiError(409, "conflict", f"a library named {name!r} already exists")
    taken = db().scalars(select(Library.name).where(Library.tenant_id == g.tenant_id,
                                                    *([Library.id != but] if but is not None else [])))
    if any(unicodedata.normalize("NFC", other) == name for other in taken):
        raise exists
    return exists


def _new_library(body, what: str, example: str) -> Library:
    """A library of the model this service runs, named by `body` (_library_name), added to the request's session
    and flushed, or a 409 where the tenant has one of that name."""
    name = _library_name(body, what, example)
    exists = _name_free(name)
    session = db()
    lib = Library(tenant_id=g.tenant_id, name=name, model_id=serving_model_id())
    session.add(lib)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise exists from None  # made meanwhile by another request
    return lib


@bp.post("/libraries")
def create_library():
    lib = _new_library(json_body(), "a library", '{"name": "my sounds"}')
    db().commit()
    return library_json(refreshed(lib, "library"), 0), 201


@bp.get("/libraries")
def list_libraries():
    counts = (
        select(Item.library_id, func.count().label("n")).where(Item.tenant_id == g.tenant_id)
        .group_by(Item.library_id).subquery()
    )
    rows = db().execute(
        select(Library, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.library_id == Library.id)
        .where(Library.tenant_id == g.tenant_id)
        .order_by(Library.created_at, Library.name)
    ).all()
    return {"libraries": [library_json(lib, n) for lib, n in rows]}


@bp.get("/libraries/<lib_id>")
def get_library(lib_id: str):
    """The library, with its items counted by status: how much of it search can find."""
    return _with_counts(owned(Library, lib_id, "library"))


@bp.patch("/libraries/<lib_id>")
def rename_library(lib_id: str):
    """A new name for the library (as a new library's: 409 where the tenant has one of that name); its files, jobs
    and vectors stay as they are. The answer is the library as GET gives it."""
    lib = owned(Library, lib_id, "library")
    name = _library_name(json_body(), "a library's PATCH", '{"name": "my sounds"}')
    exists = _name_free(name, but=lib.id)
    session = db()
    try:
        # the row's lock is taken by the UPDATE (not FOR UPDATE, which an upload inserting its files would wait on);
        # a deletion committed meanwhile leaves no row, said as a GET then says it
        renamed = session.execute(update(Library).where(Library.id == lib.id).values(name=name)).rowcount
    except IntegrityError:
        session.rollback()
        raise exists from None  # taken meanwhile by another request
    if not renamed:
        session.rollback()
        raise not_found("library")
    session.commit()
    return _with_counts(refreshed(lib, "library"))


def _with_counts(lib: Library) -> dict:
    """The library as GET gives it: with its files counted by status, and why those still to embed do not move."""
    counts = dict.fromkeys(STATES, 0) | dict(db().execute(
        select(Item.status, func.count()).where(Item.library_id == lib.id).group_by(Item.status)).all())
    # why its files still to embed cannot move (api.jobs.why_waiting), null while they can or there are none
    waiting = why_waiting(lib.model_id) if counts["queued"] + counts["running"] else None
    return {**library_json(lib, sum(counts.values())), "counts": counts, "waiting": waiting}


@bp.delete("/libraries/<lib_id>")
@takes_query("if_empty")
def delete_library(lib_id: str):
    """The library, its jobs, items and vectors, at once; the stored files no other item holds, after the answer
    (api.removal.reclaim_later). With
    `?if_empty=1`, only a library that holds no file, told under its row's lock, which waits for an upload
    committing into it: a 409 where it holds any (`clapq upload` removes the library it made for an upload the API
    refused, and another upload into the name may have put files in meanwhile: helper-135's check and delete, two
    requests, would have deleted those)."""
    lib = owned(Library, lib_id, "library")
    # `?if_empty`, written as a flag, is a 400: read as no, it deleted the library with its files
    if_empty = yes_no("if_empty", "use if_empty=1 to delete the library only where it holds no file, or leave it out",
                      bare=None)
    if if_empty:
        db().execute(select(Library.id).where(Library.id == lib.id).with_for_update())
        if held := db().scalar(select(func.count()).select_from(Item).where(Item.library_id == lib.id)):
            db().rollback()
            raise ApiError(409, "library_not_empty", f"library {lib.name!r} holds {held} file"
                           f"{'s' if held != 1 else ''}, so it was not deleted (if_empty=1); without if_empty, "
                           "DELETE deletes it with its files")
    # its items first, then the library: a worker writing vectors locks items before the library (its
    # foreign keys), so taking them in the same order cannot deadlock with it. With if_empty, none, under the lock
    # kept to the end: committed here, it let go, and an upload committing before the pass below had its files
    # deleted with the library
    shas = list(delete_items(db(), Item.library_id == lib.id, commit=not if_empty).values())
    # an upload committing into it meanwhile: the library's row locked, which waits for an upload whose job or
    # items are in and not committed (their foreign keys' lock), then its items deleted again, so that they
    # are counted too: they went by cascade, unsaid ("deleted library 'L': 0 files" while 128 went, helper-91).
    # This second pass takes the library before those items, against the order above: a worker writing vectors
    # of one of them in that moment could deadlock with it, which Postgres ends (503 database_conflict, sent
    # again by the client). An upload after this gets a 404 (api.errors)
    db().execute(select(Library.id).where(Library.id == lib.id).with_for_update())
    shas += delete_items(db(), Item.library_id == lib.id, commit=False).values()
    db().execute(delete(Library).where(Library.id == lib.id))
    db().commit()
    if shas:
        announce_gone()
    # the stored files are unlinked after the answer (api.removal.reclaim_later): 20,000 of them took 9.6 s of
    # the 12 s this answer took, more while uploads held the blob lock. Their queue rows committed above, so
    # a process that stops first leaves them to the maintenance loop; `stored_files` is counted from the rows
    return {"deleted": {"library": str(lib.id), "items": len(shas), "stored_files": released(shas, later=True)}}


@bp.post("/libraries/<lib_id>/reembed")
def reembed_library(lib_id: str):
    """A new library, of the model this service runs, holding this library's files, queued to be embedded: how a
    library moves to another model (CLAPQ_MODEL changed, where its vectors are never compared with the new
    model's). The files are the same stored copies (content-addressed: nothing is copied on disk), with their
    names and metadata, in the same order; this library is left as it was, for its owner to delete once the new
    one is embedded. Its cancelled files are left out, and those that failed for a reason in their bytes come
    failed, with their reason, rather than decoded again (`POST /v1/jobs/<id>/retry` tries them)."""
    src = owned(Library, lib_id, "library")
    session = db()
    lib = _new_library(json_body(), "a re-embed", '{"name": "my sounds, new model"}')
    if src.model_id == lib.model_id:
        session.rollback()
        raise ApiError(409, "same_model", f"library {src.name!r} is of the model this service runs "
                       f"({describe(src.model_id)['name']}): embedded again, its files would give the same vectors")
    # as an upload: nothing is queued over the backlog's bounds, the files of `src` waiting for its model aside
    backpressure(current_app.config["CLAPQ"], besides=src.id)
    job = Job(tenant_id=g.tenant_id, library_id=lib.id, kind="reembed")
    session.add(job)
    session.flush()
    # one statement, in Postgres, whatever the number of files: new ids drawn there, sorted, and handed out in the
    # source's order (its n-th file the n-th id), so that listings (created_at, then id) show them in it; its queued
    # files past the first lane's room (n less the failed ones before it) marked as in the bulk lane here (lane_room's
    # `premarked`): a Python list of ids read and sent back as arrays, then marked by a second write of each row,
    # took 34 s of 51 for 200,000 files (benchmarks/reembed.py). A file deleted before it runs is left out
    made = session.execute(text(
        "WITH s AS (SELECT *, row_number() OVER w AS n, count(*) FILTER (WHERE status = 'failed' AND failed_in_file "
        "IS TRUE) OVER w AS failed_before FROM items WHERE library_id = :src AND status <> 'cancelled' "
        "WINDOW w AS (ORDER BY created_at, id ROWS UNBOUNDED PRECEDING)), "
        "k AS (SELECT array_agg(id ORDER BY id) AS ids FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, "
        "(SELECT count(*) FROM items WHERE library_id = :src AND status <> 'cancelled'))) g), "
        "copied AS (INSERT INTO items (id, tenant_id, library_id, job_id, sha256, filename, size_bytes, metadata, "
        "status, error, failed_in_file, finished_at, claimed_by) "
        "SELECT k.ids[s.n], s.tenant_id, :lib, :job, s.sha256, s.filename, s.size_bytes, s.metadata, "
        "CASE WHEN f.failed THEN 'failed' ELSE 'queued' END, CASE WHEN f.failed THEN s.error END, "
        "CASE WHEN f.failed THEN true END, CASE WHEN f.failed THEN now() END, "
        "CASE WHEN NOT f.failed AND s.n - s.failed_before > :lane THEN :bulk END "
        "FROM s CROSS JOIN k "
        "CROSS JOIN LATERAL (SELECT s.status = 'failed' AND s.failed_in_file IS TRUE AS failed) f "
        "RETURNING id, status) "
        "SELECT id, status = 'queued' AS queued FROM copied ORDER BY id"),
        {"src": src.id, "lib": lib.id, "job": job.id, "bulk": IN_BULK_LANE,
         "lane": first_lane_files(current_app.config["CLAPQ"].items_per_task)}).all()
    if not made:
        session.rollback()  # src read again below: deleted meanwhile, it is the 404 "deleted while it ran" (api.errors)
        raise ApiError(409, "conflict", f"library {src.name!r} has no files to re-embed (none, or only cancelled "
                       "ones)")
    queued = [r.id for r in made if r.queued]
    left_out = session.scalar(select(func.count()).where(Item.library_id == src.id, Item.status == "cancelled"))
    # the stored copies stay once this commits: from here to the commit, the shared BLOB_LOCK holds off every
    # removal (clapq.blobs.reclaim, `clapq check --fix`: exclusive), and a removal after it finds the new items.
    # Taken after the copy, not before it: held through the copy (0.6 s for 20,000 files, 8.5 s for 200,000), a
    # removal waiting for it held up every upload and deletion that came after that removal, of any tenant
    session.execute(select(func.pg_advisory_xact_lock_shared(BLOB_LOCK)))
    if _removed_meanwhile(lib.id):
        session.rollback()
        raise ApiError(503, "conflict", f"files of library {src.name!r} were being deleted at the same moment; "
                       "nothing was made; send the re-embed again", {"Retry-After": "1"})
    fast = lane_room(queued, premarked=True)
    session.commit()
    send_committed(queued, fast, job_id=str(job.id))
    return {"job_id": str(job.id), "library": library_json(refreshed(lib, "library"), len(made)),
            "queued": len(queued), "failed": len(made) - len(queued), "cancelled_left_out": left_out}, 202


def _removed_meanwhile(lib_id) -> bool:
    """Whether the stored copy of a file that the new library `lib_id`'s items name (not committed) was removed
    after the copy read the item it came from: that item deleted, and the removal run, before this transaction took
    the shared BLOB_LOCK. Those another item holds stay (their removal waits for the lock, then finds the new
    items); the others must be on disk now, and stay so while the lock is held (normally none: each is its source
    item's)."""
    alone = db().scalars(text("SELECT DISTINCT n.sha256 FROM items n WHERE n.library_id = :l AND NOT EXISTS "
                              "(SELECT 1 FROM items i WHERE i.sha256 = n.sha256 AND i.library_id <> :l)"),
                         {"l": lib_id}).all()
    store = current_app.extensions["clapq_blobs"]
    return not all(store.exists(sha) for sha in alone)


@bp.get("/libraries/<lib_id>/items")
@takes_query("limit", "cursor", "status")
def library_items(lib_id: str):
    """The library's items, oldest first: `?status=` narrows, `limit` + `cursor` page."""
    return items_page(Item.library_id == owned(Library, lib_id, "library").id)


@bp.post("/libraries/<lib_id>/known")
def known_files(lib_id: str):
    """Which of these sha256 digests (of whole files' bytes) the library holds already, queued, running
    or embedded (`pending`: those of them not embedded yet, with the job each is in, `pending_jobs`, and
    its item, `pending_items`; every known one's item, `items`, and its metadata.path and .folder,
    `sent_from`, which also has those of the `failed` ones): a client uploading a folder again sends only the rest, can wait for the files an earlier
    run left being embedded, and can update the paths of files renamed since. Failed and cancelled files
    are not listed, because sending them again retries them; those failed for a reason in their bytes
    (items.failed_in_file: they would fail the same way again) are in `failed`, with the item and its error, so
    that a client uploading a folder every night need not send, decode and report them again at each run
    (helper-74)."""
    lib = owned(Library, lib_id, "library")
    body = json_body()  # at most 16 MiB, as any JSON body: 10,000 digests however they are laid out
    if isinstance(body, dict):
        refuse_unknown(body, {"sha256"}, "/known", 'send {"sha256": [...]}', "the JSON body")
    digests = body.get("sha256") if isinstance(body, dict) else None
    if isinstance(digests, list) and len(digests) > MAX_DIGESTS:
        raise bad_request(f"{len(digests)} digests in one request; the limit is {MAX_DIGESTS}")
    if not isinstance(digests, list) or not all(isinstance(d, str) and SHA256_HEX.fullmatch(d) for d in digests):
        raise bad_request('send {"sha256": [...]}: a list of sha256 digests of files\' bytes, in lowercase hex')
    rows = db().execute(select(Item.sha256, Item.status, Item.job_id, Item.id, Item.error,
                               Item.meta["path"].label("path"), Item.meta["folder"].label("folder")).where(
        Item.library_id == lib.id, Item.sha256.in_(set(digests)),
        or_(Item.status.not_in(RETRIED_ON_REUPLOAD), and_(Item.status == "failed", Item.failed_in_file.is_(True))))
    ).all()
    failed = [r for r in rows if r.status == "failed"]
    rows = [r for r in rows if r.status != "failed"]
    # held, but its stored file gone from the disk (removed by hand, a lost disk: `clapq check` says so): sent
    # again, it is written anew, and its item goes on as it was (a stat a digest, ~10 ms for 10,000)
    store = current_app.extensions["clapq_blobs"]
    missing = sorted({r.sha256 for r in rows if not store.exists(r.sha256)})
    # `pending`: the known ones not embedded yet (queued or running), e.g. after an upload cut short
    pending = [r for r in rows if r.status in ("queued", "running")]
    return {"known": sorted({r.sha256 for r in rows}), "pending": sorted(r.sha256 for r in pending),
            "pending_jobs": {r.sha256: str(r.job_id) for r in pending},
            "pending_items": {r.sha256: str(r.id) for r in pending},
            # each known file's item, and where it was uploaded from (`clapq upload` keeps its path in the folder
            # and the folder as metadata.path and metadata.folder): a folder uploaded again after files were
            # renamed or moved within it can say so, and update them
            "items": {r.sha256: str(r.id) for r in rows},
            # and of each failed one, whose renames are followed as well: a broken file moved within its folder
            # stayed at its old path, which --gone-from took for a rename not told yet, at every run (helper-77)
            "sent_from": {r.sha256: {"path": r.path, **({"folder": r.folder} if isinstance(r.folder, str) else {})}
                          for r in rows + failed if isinstance(r.path, str)},
            "failed": {r.sha256: {"item_id": str(r.id), "error": r.error} for r in failed},
            "missing": missing}


def _moves(body) -> list[tuple]:
    """/moves' body as (item id, from path, from folder, to path, to folder), or a 400 saying what to send."""
    example = ('send {"moves": [{"item_id": ..., "from": {"path": "a.wav", "folder": "<id>" or null}, "to": '
               '{"path": "b.wav", "folder": "<id>"}}, ...]}')
    moves = body.get("moves") if isinstance(body, dict) else None
    if isinstance(body, dict):
        refuse_unknown(body, {"moves"}, "/moves", example, "the JSON body")
    if not isinstance(moves, list):
        raise bad_request(example)
    if len(moves) > MAX_MOVES:
        raise bad_request(f"{len(moves)} moves in one request; the limit is {MAX_MOVES}")
    out = []
    for n, m in enumerate(moves):
        ends = [m.get(k) if isinstance(m, dict) else None for k in ("from", "to")]
        # `from` names what the item holds now, whatever that is (a folder of any text, or none: null); `to`
        # what `clapq upload` records
        if not (isinstance(m, dict) and set(m) == {"item_id", "from", "to"} and isinstance(m["item_id"], str)
                and all(isinstance(e, dict) and set(e) == {"path", "folder"} and isinstance(e["path"], str)
                        and (e["folder"] is None or isinstance(e["folder"], str)) for e in ends)
                and 0 < len(ends[1]["path"]) <= MAX_PATH_CHARS and isinstance(ends[1]["folder"], str)
                and 0 < len(ends[1]["folder"]) <= 64):
            raise bad_request(f"move {n} is not one: {example} (a new path of 1 to {MAX_PATH_CHARS} characters, "
                              "a new folder of 1 to 64)")
        try:
            item = uuid.UUID(m["item_id"])
        except ValueError:
            raise bad_request(f"move {n}: {m['item_id'][:40]!r} is not an item id") from None
        out.append((item, ends[0]["path"], ends[0]["folder"], ends[1]["path"], ends[1]["folder"]))
    return out


@bp.post("/libraries/<lib_id>/moves")
def move_files(lib_id: str):
    """Give items of the library a new `metadata.path` and `metadata.folder`, each only where it still has
    the path and folder of its `from` (a folder that is not text counts as none: `"folder": null`), the rest
    of its metadata kept: files renamed or moved within the folder they were uploaded from, as `clapq upload`
    finds them. The items are locked from the look to the write, so an edit made meanwhile is never
    overwritten, and thousands of renames are one request where a GET and a PATCH a file met the per-key rate
    limit (helper-42). Answers the ids changed, `moved`, and those whose metadata would grow past
    MAX_METADATA_BYTES, `too_large`; an item gone, of another library, or whose path or folder is no longer
    the one given is left as it is."""
    lib = owned(Library, lib_id, "library")
    moves = _moves(json_body())
    session = db()
    held = dict(session.execute(
        select(Item.id, Item.meta).where(Item.id.in_({m[0] for m in moves}), Item.library_id == lib.id,
                                         Item.tenant_id == g.tenant_id)
        .order_by(Item.id).with_for_update(key_share=True)).all())  # FOR NO KEY UPDATE, as an UPDATE takes, not
    # FOR UPDATE (helper-44); in id order, as a deletion and a worker's vector write lock items (helper-60)
    new: dict = {}
    too_large = set()
    for item, from_path, from_folder, to_path, to_folder in moves:
        if item not in held:
            continue
        meta = new.get(item, held[item] or {})
        folder = meta.get("folder") if isinstance(meta.get("folder"), str) else None
        if meta.get("path") != from_path or folder != from_folder:
            continue
        moved = {**meta, "path": to_path, "folder": to_folder}
        if metadata_bytes(moved) > MAX_METADATA_BYTES:
            too_large.add(item)
            continue
        new[item] = moved
    if new:  # the item's name follows its file, as its path does: a download, classify and duplicates gave the
        # name it was first uploaded under (helper-51)
        session.execute(text("""
            UPDATE items SET metadata = m.meta, filename = m.name
            FROM unnest(CAST(:ids AS uuid[]), CAST(:metas AS jsonb[]), CAST(:names AS text[])) AS m(id, meta, name)
            WHERE items.id = m.id"""),
            {"ids": [str(i) for i in new], "metas": [json.dumps(m) for m in new.values()],
             "names": [display_name(m["path"]) for m in new.values()]})
    session.commit()
    return {"moved": sorted(str(i) for i in new), "too_large": sorted(str(i) for i in too_large - set(new))}


def _item_ids(body) -> list[uuid.UUID]:
    """/deletions' body as item ids, in the order sent, or a 400 saying what to send."""
    example = f'send {{"item_ids": [...]}}: the ids of 1 to {MAX_DELETIONS} items of the library, each once'
    if isinstance(body, dict):
        refuse_unknown(body, {"item_ids"}, "/deletions", example, "the JSON body")
    ids = body.get("item_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not ids:
        raise bad_request(example)
    if len(ids) > MAX_DELETIONS:
        raise bad_request(f"{len(ids)} item ids in one request; the limit is {MAX_DELETIONS} (send the rest in "
                          "further requests)")
    out: dict[uuid.UUID, int] = {}
    for n, raw in enumerate(ids):
        try:
            item = uuid.UUID(raw) if isinstance(raw, str) else None
        except ValueError:
            item = None
        if item is None:
            raise bad_request(f"item_ids[{n}] is {json.dumps(raw)[:60]}, not an item id; {example}")
        if item in out:  # in any form: capitals, braces, without hyphens
            raise bad_request(f"item_ids[{n}] is item_ids[{out[item]}] again ({item}); {example}")
        out[item] = n
    return list(out)


@bp.post("/libraries/<lib_id>/deletions")
def delete_files(lib_id: str):
    """Delete up to MAX_DELETIONS items of the library in one transaction, as DELETE /v1/items/<id> deletes
    one (its rows locked in id order: api.removal.delete_items): `clapq delete` sent a request a file, and 500
    files deleted from a folder took 53 s (helper-73). Answers the files deleted, with their name and
    metadata.path, in the order their ids were sent, and the ids that named no item of this library
    (unknown, deleted already or meanwhile, of another library or of another tenant: alike), and
    `stored_files` as one item's DELETE does."""
    lib = owned(Library, lib_id, "library")
    ids = _item_ids(json_body())
    session = db()
    where = (Item.id.in_(ids), Item.library_id == lib.id, Item.tenant_id == g.tenant_id)
    # the names said in the answer, read before the rows go (a rename meanwhile is of a file being deleted)
    names = {r.id: r for r in session.execute(select(Item.id, Item.filename, Item.meta["path"].label("path"))
                                              .where(*where))}
    gone = delete_items(session, and_(*where))
    if gone:
        announce_gone()
    stored = released(list(gone.values())) if gone else 0
    return {"deleted": {"items": len(gone), "stored_files": stored, "files": [
                {"id": str(i), "filename": names[i].filename,
                 "path": names[i].path if isinstance(names[i].path, str) else None}
                for i in ids if i in gone and i in names]},
            "not_found": [str(i) for i in ids if i not in gone]}
