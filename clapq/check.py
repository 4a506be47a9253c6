"""`clapq check`: where the stored files and the database disagree, found while the service runs.

An item names its stored file by sha256 (ROOT/ab/cd/<sha256>), and nothing else tells when that file was
deleted by hand, lost with a disk or damaged, or when a file is left that no item holds: a search still
returns such an item, and the first anyone learned was a failed download or re-embed. Each finding is
looked at twice: first without a lock, then, for what it found, again under BLOB_LOCK (clapq.blobs), so
that what an upload or a deletion is doing at that moment is never reported. A file an upload has moved
into place before its rows commit is held under the shared lock, and a deletion's removal under the
exclusive one: a missing file is confirmed under the shared lock (no removal runs, and every committed
item's file was in place before its commit), and a file no item holds under the exclusive one (no upload
is between its rename and its commit), as the reclaim path removes one."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from sqlalchemy import text

from clapq.blobs import BLOB_LOCK, BlobStore, chunks, hash_file, scan

PROGRESS_S = 5.0  # how often a --verify of a large store says how far it is
ORPHANS_SHOWN = 20  # the files no item holds named in words (nothing to mend in them; --json names all)


def not_its_store(named: int, missing: int) -> bool:
    """Whether a store that lacks `missing` of the `named` files items hold is likely not their store at all
    (CLAPQ_BLOB_DIR another folder than the service's): none of several there. A one-item service whose one
    file was lost lacks all of them too: one file lost, which is said as such."""
    return missing == named > 1


def _held(conn, shas: list[str]) -> set[str]:
    return set(conn.scalars(text("SELECT DISTINCT sha256 FROM items WHERE sha256 = ANY(CAST(:s AS text[]))"),
                            {"s": shas}))


def _confirm_missing(engine, store: BlobStore, candidates: list[str]) -> list[str]:
    """Those of `candidates` that an item names and whose file is not there, under the shared BLOB_LOCK: no
    removal runs meanwhile, and every committed item's file was in place before its commit."""
    missing = []
    for chunk in chunks(sorted(candidates)):
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": BLOB_LOCK})
            missing.extend(sha for sha in sorted(_held(conn, chunk)) if not store.exists(sha))
    return missing


def _orphans(engine, store: BlobStore, candidates: list[str], remove: bool) -> tuple[list[tuple[str, bool]], int]:
    """Those of `candidates` still in the store that no item holds, as (digest, queued for removal), under
    the exclusive BLOB_LOCK, a chunk at a time (uploads wait no longer): an upload that moved its copy into
    place holds the shared lock until its rows commit, so its file is held by then, or removed by its own
    request. With `remove`, they are unlinked there, as the reclaim path does; returns them, and how many
    were removed."""
    found, removed = [], 0
    for chunk in chunks(sorted(candidates)):
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": BLOB_LOCK})
            held = _held(conn, chunk)
            queued = set(conn.scalars(text("SELECT sha256 FROM blob_reclaims WHERE sha256 = ANY(CAST(:s AS text[]))"),
                                      {"s": chunk}))
            for sha in chunk:
                if sha in held or not store.exists(sha):
                    continue
                found.append((sha, sha in queued))
                if remove:
                    removed += store.remove(sha)
    return found, removed


class _Pace:
    """Reads at no more than `rate` bytes a second (0: as fast as the disk goes), so that a --verify of a large
    store leaves the disk to the service; and says how far it is every PROGRESS_S."""

    def __init__(self, rate: float, total_files: int, total_bytes: int, say) -> None:
        self.rate, self.total_files, self.total_bytes, self.say = rate, total_files, total_bytes, say
        self.start = self.said = time.monotonic()
        self.read = self.files = 0

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        self.read += len(data)
        now = time.monotonic()
        if self.rate and (ahead := self.read / self.rate - (now - self.start)) > 0:
            time.sleep(ahead)
        if now - self.said >= PROGRESS_S:
            self.said = now
            self.say(f"verified {self.files} of {self.total_files} stored files ({self.read / 1e6:,.0f} of "
                     f"{self.total_bytes / 1e6:,.0f} MB)")

    def sha256(self, path: Path) -> str:
        self._hash = hashlib.sha256()
        hash_file(path, self)
        self.files += 1
        return self._hash.hexdigest()


def _damaged(engine, store: BlobStore, named: dict[str, int], rate: float, say) -> list[tuple[str, str]]:
    """The stored files of `named` whose bytes do not hash to their name, as (digest, what they hash to, or
    why they could not be read):
    each read at `rate` bytes a second at most. One found so is read again where an upload replaced it
    meanwhile (sending the same bytes again writes the stored copy anew), and kept only while an item
    still names it."""
    pace, found = _Pace(rate, len(named), sum(named.values()), say), []
    for sha in sorted(named):
        path = store.path_for(sha)
        try:
            before = path.stat()
            got = pace.sha256(path)
            if got != sha and path.stat().st_ino != before.st_ino:
                got = pace.sha256(path)
        except FileNotFoundError:  # deleted, or lost, meanwhile: a missing file is looked for apart
            continue
        except OSError as exc:  # an I/O error of a failing disk, a permission: not readable whole is damaged too
            got = f"not readable ({exc.strerror or exc})"
        if got != sha:
            found.append((sha, got))
    if found:
        with engine.connect() as conn:
            held = _held(conn, [sha for sha, _ in found])
        found = [(sha, got) for sha, got in found if sha in held]
    return found


def _holders(engine, shas: list[str]) -> dict[str, list[dict]]:
    """Each digest's items: id, tenant, library, filename, and its path in the folder `clapq upload` sent it
    from (metadata.path; None where it was not sent so), where a copy to mend it may be."""
    out: dict[str, list[dict]] = {sha: [] for sha in shas}
    if shas:
        with engine.connect() as conn:
            for r in conn.execute(text(
                    "SELECT i.sha256, i.id, i.filename, i.metadata->>'path' AS path, i.status, l.name AS library, t.name AS tenant FROM items i "
                    "JOIN libraries l ON l.id = i.library_id JOIN tenants t ON t.id = i.tenant_id "
                    "WHERE i.sha256 = ANY(CAST(:s AS text[])) ORDER BY t.name, l.name, i.filename, i.id"),
                    {"s": shas}):
                out[r.sha256].append({"id": str(r.id), "tenant": r.tenant, "library": r.library,
                                      "filename": r.filename, "path": r.path, "status": r.status})
    return out


def check(url: str, blob_dir: Path, verify: bool = False, remove_orphans: bool = False, rate: float = 0,
          say=print) -> dict:
    """Compare the database at `url` with the store at `blob_dir`; returns the report (`ok`: they agree).
    `verify`: every stored file an item names is read and hashed, at `rate` bytes a second at most (0: no
    bound). `remove_orphans`: the stored files no item holds are removed. No row is changed."""
    from clapq.db import get_engine

    engine = get_engine(url)
    store = BlobStore(blob_dir)
    stored, other = scan(store.root)
    with engine.connect() as conn:
        named = set(conn.scalars(text("SELECT DISTINCT sha256 FROM items")))
    missing = _confirm_missing(engine, store, sorted(named - set(stored)))
    orphans, removed = _orphans(engine, store, sorted(set(stored) - named), remove_orphans)
    damaged = _damaged(engine, store, {s: n for s, n in stored.items() if s in named}, rate, say) if verify else []
    holders = _holders(engine, missing + [sha for sha, _ in damaged])
    with engine.connect() as conn:  # counted at the end: an upload the lock waited for is in
        items = conn.scalar(text("SELECT count(*) FROM items"))

    def entry(sha: str, **more) -> dict:
        return {"sha256": sha, **more, "items": holders[sha]}

    report = {
        # orphans removed here no longer disagree
        "ok": not (missing or damaged or other) and removed == len(orphans), "verified": verify, "items": items,
        "stored_files": len(stored), "stored_bytes": sum(stored.values()),
        "named_files": len(named),
        "missing": [entry(sha) for sha in missing],
        "damaged": [entry(sha, bytes=stored.get(sha, 0), hashes_to=got) for sha, got in damaged],
        "orphans": [{"sha256": sha, "bytes": stored.get(sha, 0), "queued_for_removal": queued}
                    for sha, queued in orphans],
        "orphan_bytes": sum(stored.get(sha, 0) for sha, _ in orphans),
        "orphans_removed": removed,
        "other_files": [{"path": p, "bytes": n} for p, n in other],
    }
    return report


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB" if n >= 1000 else f"{n} B"


def _files(n: int) -> str:
    return f"{n} stored file{'' if n == 1 else 's'}"


def describe(report: dict, blob_dir: Path, also: str = "") -> list[str]:
    """The report as lines a person reads. also: the --data-dir the check was given, which the commands it
    advises take too (without it they would reach the default data directory's service, or none)."""
    lines = [f"checked {report['items']} items and {_files(report['stored_files'])} ({_mb(report['stored_bytes'])}) "
             f"in {blob_dir}" + ("; each stored file an item names was read and hashed" if report["verified"]
                                 else " (not read: --verify reads each file and hashes it)")]

    def held_by(e: dict) -> list[str]:
        return [f"    item {i['id']}: library {i['library']!r} of tenant {i['tenant']!r}, {i['filename']!r}"
                + (f" (sent from {i['path']!r} in its folder)" if i["path"] and i["path"] != i["filename"] else "")
                + f", {i['status']}" for i in e["items"]]

    if not_its_store(report["named_files"], len(report["missing"])):
        lines.append(f"none of the {report['named_files']} stored files that items hold is in {blob_dir}: is it this "
                     "service's store (CLAPQ_BLOB_DIR, or the data directory's blobs/)? If it is, every file was lost")
    if report["missing"]:
        n = sum(len(e["items"]) for e in report["missing"])
        lines.append(f"missing: {_files(len(report['missing']))} that {n} item{'s hold' if n != 1 else ' holds'} "
                     "(downloads of these fail, and so does embedding them again):")
        for e in report["missing"]:
            lines.append(f"  {e['sha256']}")
            lines.extend(held_by(e))
    if report["damaged"]:
        lines.append(f"damaged: {_files(len(report['damaged']))} whose bytes no longer hash to their name:")
        for e in report["damaged"]:
            got = e["hashes_to"]
            lines.append(f"  {e['sha256']} ({_mb(e['bytes'])}, " + (f"hashes to {got[:16]}...)" if len(got) == 64
                                                                   else f"{got})"))
            lines.extend(held_by(e))
    if report["missing"] or report["damaged"]:
        lines.append("  to mend one, send the same file again into one of its libraries: `clapq upload FILE --library "
                     f"LIBRARY --resend{also}` writes its stored copy anew (its item stays, with its vectors); a "
                     "missing one, `clapq upload` of its folder sends again by itself")
        troubled = report["missing"] + report["damaged"]
        if any(i["status"] == "failed" for e in troubled for i in e["items"]):
            # neither of those sends a file that failed for its bytes (`clapq upload` asks /known, which names it
            # as failed): only a retry does, which writes its stored copy anew as any upload of its bytes
            lines.append("  a failed one, which `clapq upload` leaves out as failed before: `clapq upload FILE "
                         f"--library LIBRARY --retry-failed{also}` sends it again (retried, its stored copy written "
                         f"anew), or `clapq delete ITEM --library LIBRARY{also}` deletes it")
    if report["orphans"]:
        queued = sum(q for o in report["orphans"] if (q := o["queued_for_removal"]))
        done = report["orphans_removed"]
        lines.append(f"no item holds {_files(len(report['orphans']))} ({_mb(report['orphan_bytes'])})"
                     + (f", {queued} of them queued for removal by the maintenance loop" if queued else "")
                     + (", removed now" if done == len(report["orphans"]) else f", {done} of them removed now" if done
                        else f": `clapq check --remove-orphans{also}` removes "
                             f"{'it' if len(report['orphans']) == 1 else 'them'}")
                     + ":")
        lines.extend(f"  {o['sha256']} ({_mb(o['bytes'])})" for o in report["orphans"][:ORPHANS_SHOWN])
        if len(report["orphans"]) > ORPHANS_SHOWN:
            lines.append(f"  and {len(report['orphans']) - ORPHANS_SHOWN} more (--json lists every one)")
    if report["other_files"]:
        n = len(report["other_files"])
        lines.append(f"{n} file{'s' if n != 1 else ''} in the store that clapq did not write there (not named "
                     f"ab/cd/<sha256>: a copy cut short, a stray file), left as {'it is' if n == 1 else 'they are'} for "
                     "you to look at:")
        lines.extend(f"  {o['path']} ({_mb(o['bytes'])})" for o in report["other_files"])
    if report["ok"]:
        lines.append("the database and the stored files agree")
    return lines
