"""Multipart uploads streamed straight into the blob store, hashed while they arrive."""

from __future__ import annotations

import unicodedata

from flask import Request, current_app

from clapq.blobs import BlobStore


class StreamingRequest(Request):
    """Each uploaded file part is written to a BlobWriter instead of memory or a second temp file."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        store: BlobStore = current_app.extensions["clapq_blobs"]
        writer = store.writer()
        self._clapq_writers = getattr(self, "_clapq_writers", [])
        self._clapq_writers.append(writer)
        return writer

    def discard_uploads(self) -> None:
        """Remove temporary files of parts that were not committed into the store."""
        for w in getattr(self, "_clapq_writers", []):
            if w.sha256 is None:
                w.discard()


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
