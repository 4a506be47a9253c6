"""gunicorn's logger for `clapq api`: its access log without the secret a request line can carry.

An audio link (POST /v1/items/<id>/audio-link) is a URL whose `link` parameter opens that item's audio without a
key until it expires (an hour, at most 7 days): gunicorn's access log wrote each request line whole, the token with
it, so whoever reads the API's logs (a log shipper, its store, a support desk) could play a tenant's files (helper-117:
in `clapq api`'s output, a line for each range the search page's player asks for). The token is written as `***`;
`clapq api` names this class (--logger-class)."""

from __future__ import annotations

import re

from gunicorn.glogging import Logger

_LINK = re.compile(r"((?:^|[?&])link=)[^&#\s]*")


class HiddenLinkLogger(Logger):
    def atoms(self, resp, req, environ, request_time) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        for name in ("r", "q", "f"):  # the request line, its query string, and the Referer (a page opened by a link)
            if isinstance(atoms.get(name), str):
                atoms[name] = _LINK.sub(r"\1***", atoms[name])
        return atoms
