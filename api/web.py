"""The search page: a page of static HTML, CSS and JavaScript (and its icon) at / that searches through the HTTP API
like any other client (the API key in the Authorization header, which the page asks for and keeps in the browser's
storage). The files are read once; no key is needed for them, as they hold nothing of any tenant's."""

from __future__ import annotations

import functools
from pathlib import Path

from flask import Blueprint, Response

bp = Blueprint("web", __name__)

FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/app.css": ("app.css", "text/css; charset=utf-8"),
         "/icon.svg": ("icon.svg", "image/svg+xml")}  # path: (file in api/web, its type)
# the page runs its own script and style only, talks to this origin only, plays its audio links (api.items), and is
# shown in no frame of another site
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; media-src 'self'; "
          "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.lru_cache(maxsize=None)
def _body(name: str) -> bytes:
    return (Path(__file__).parent / "web" / name).read_bytes()


def _serve(path: str) -> Response:
    name, mimetype = FILES[path]
    response = Response(_body(name), content_type=mimetype)
    response.headers.update({"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff",
                             "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})
    return response


for _path, (_name, _) in FILES.items():
    bp.add_url_rule(_path, _name.replace(".", "_"), functools.partial(_serve, _path), methods=["GET"])
