"""The clapq embedding worker (Celery). Nothing here imports torch at import time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import clapq


def code_on_disk() -> str:
    """The sha256 of the worker's source as it is on disk now: every .py file of the `clapq` and `worker` packages,
    by name and bytes (an unreadable one, or one added or removed, changes it too). All of them, not only what a
    decoder child imports: a list of those would fall behind the imports, and a worker whose other code changed
    is not the one it started as either."""
    h = hashlib.sha256()
    for pkg in (Path(clapq.__file__).parent, Path(__file__).parent):
        for f in sorted(pkg.glob("*.py")):
            h.update(f"{pkg.name}/{f.name}\0".encode())
            try:
                h.update(hashlib.sha256(f.read_bytes()).digest())
            except OSError as exc:
                h.update(f"unreadable: {exc.errno}".encode())
    return h.hexdigest()


# the code this process runs, taken when it first imports a module of the worker (Celery's main process, as it
# starts: its pool children inherit it; the API as it starts too, through api.search): a decoder child, a fresh
# interpreter that reads the code on disk when it starts, is held to it (worker.decoder)
CODE = code_on_disk()
