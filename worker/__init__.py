"""The clapq embedding worker (Celery). Nothing here imports torch at import time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import clapq


def code_on_disk() -> str:
    """The sha256 of clapq's source as it is on disk now: every .py file of the `clapq` and `worker` packages, and of
    the `api` package installed beside them (the API holds itself to this too: api.query.loaded, api.wsgi), by name
    and bytes (an unreadable one, or one added or removed, changes it too). All of them, not only what a decoder
    child imports: a list of those would fall behind the imports, and a worker whose other code changed is not the
    one it started as either."""
    h = hashlib.sha256()
    for pkg in (Path(clapq.__file__).parent, Path(__file__).parent, Path(__file__).parent.parent / "api"):
        for f in sorted(pkg.glob("*.py")):
            h.update(f"{pkg.name}/{f.name}\0".encode())
            try:
                h.update(hashlib.sha256(f.read_bytes()).digest())
            except OSError as exc:
                h.update(f"unreadable: {exc.errno}".encode())
    return h.hexdigest()


# the code this process runs, taken when it first imports a module of the worker (Celery's main process, as it
# starts: its pool children inherit it; the API's gunicorn master as it starts, clapq.cli.cmd_api: the processes it
# forks inherit it): a decoder child, a fresh interpreter that reads the code on disk when it starts, is held to it
# (worker.decoder), and so is what an API process imports after it started (api.query.loaded, api.wsgi)
CODE = code_on_disk()


class CodeChanged(Exception):
    """A decoder child, a fresh interpreter, would run other code than its parent, and the messages between them
    may not mean the same (a good file could fail with a wrong reason, or crash the task): `upgraded`, the code on
    disk is no longer what this process started with (clapq upgraded in place: `git pull`, `pip install -U` into
    its environment), and the process is to be restarted, to run the new code throughout; else the child found
    another copy of clapq than its parent's (`python -m` looks in the working directory first). Not the file's
    fault either way. Here, not in worker.decoder, so that a worker that cannot import that can still tell."""

    def __init__(self, upgraded: bool = True) -> None:
        self.upgraded = upgraded
        if upgraded:
            why = ("clapq's code changed on disk since this process started (upgraded in place?): a decoder started "
                   "now would run other code than this process; restart it")
        else:
            here = Path(__file__).parent.parent
            why = (f"a decoder child ran other code than this process, whose own ({here}) is unchanged on disk: "
                   "`python -m worker.decoder`, started in that folder, found another copy of clapq first (its "
                   "`clapq` package from another place than its `worker`; the decoder's message says where); "
                   "install clapq's packages together")
        super().__init__(why)
