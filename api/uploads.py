"""Multipart uploads streamed straight into the blob store, hashed while they arrive."""

from __future__ import annotations

import logging
import unicodedata

from flask import Request, current_app, g

from api.removal import queue_unnamed, reclaim
from clapq.blobs import BlobStore

log = logging.getLogger(__name__)


class StreamingRequest(Request):
    """Each uploaded file part is written to a BlobWriter instead of memory or a second temp file."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        store: BlobStore = current_app.extensions["clapq_blobs"]
        writer = store.writer()
        self._clapq_writers = getattr(self, "_clapq_writers", [])
        self._clapq_writers.append(writer)
        return writer

    def queue_uploads(self, writers: list) -> list[str]:
        """Write-ahead for a crash: the bytes about to move into the store are queued for removal first, in
        a transaction of their own, and the commit of the rows that name them takes them off the queue
        (`clapq.blobs.unqueue_reclaim`). An API process killed in between (SIGKILL, out of memory, power)
        leaves files the maintenance loop removes once no item holds them, never files nothing names.
        Returns the digests."""
        digests = sorted({w.digest for w in writers})
        queue_unnamed(digests)
        self._clapq_queued = digests
        return digests

    def keep_uploads(self) -> None:
        """The rows that name the parts committed into the store have committed: their blobs stay."""
        self._clapq_kept = True

    def discard_uploads(self) -> None:
        """At the request's end: remove the temporary files of parts not committed into the store, and
        reclaim the blobs of a request whose rows never committed (a library deleted meanwhile, a full disk
        at the third file, a database error), which only an item may keep."""
        writers = getattr(self, "_clapq_writers", [])
        for w in writers:
            if w.sha256 is None:
                w.discard()
        # every part moved into place was queued first (queue_uploads): their queue rows go, and each
        # stored copy no item holds
        stored = getattr(self, "_clapq_queued", [])
        if not stored or getattr(self, "_clapq_kept", False):
            return
        try:
            if "db" in g:
                g.db.rollback()  # ends its shared hold of BLOB_LOCK, which removal waits for
            reclaim(stored)
        except Exception:  # the database is away: the files stay queued, for the maintenance loop
            log.exception("could not remove a failed upload's files now; they stay queued",
                          extra={"files": len(stored)})


def display_name(raw: str | None) -> str:
    """A filename for display only: no directories, no control characters, bounded length."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    if name in ("", ".", ".."):
        name = "unnamed"
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 190] + "." + ext[:8]) if dot and len(ext) <= 8 else name[:200]
    return name
