"""gunicorn's logger for `clapq api`: its access log without the secret a request line can carry, and in JSON
where clapq's logs are.

An audio link (POST /v1/items/<id>/audio-link) is a URL whose `link` parameter opens that item's audio without a
key until it expires (an hour, at most 7 days): gunicorn's access log wrote each request line whole, the token with
it, so whoever reads the API's logs (a log shipper, its store, a support desk) could play a tenant's files (helper-117:
in `clapq api`'s output, a line for each range the search page's player asks for). The token is written as `***`;
`clapq api` names this class (--logger-class).

Where clapq's logs are JSON (CLAPQ_LOG_FORMAT, the default), gunicorn's are too: its own lines ("Listening at",
"Booting worker", a worker timed out) and one record for each request with its parts as fields (`method`, `path`,
`status`, `bytes`, `duration_ms`, ...). They were loose text among the JSON lines of the rest of the service, which
a log shipper that parses JSON drops or stores unparsed."""

from __future__ import annotations

import re

from gunicorn.glogging import Logger

from clapq import logs

_LINK = re.compile(r"((?:^|[?&])link=)[^&#\s]*")


class HiddenLinkLogger(Logger):
    json = False

    def setup(self, cfg) -> None:
        super().setup(cfg)
        self.json = logs.log_format() == "json"
        if self.json:  # gunicorn's own handlers: those of an operator's log config keep their format
            for handler in self.error_log.handlers + self.access_log.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.setFormatter(logs.JsonFormatter())

    def atoms(self, resp, req, environ, request_time) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        for name in ("r", "q", "f"):  # the request line, its query string, and the Referer (a page opened by a link)
            if isinstance(atoms.get(name), str):
                atoms[name] = _LINK.sub(r"\1***", atoms[name])
        return atoms

    def access(self, resp, req, environ, request_time) -> None:
        if not (self.json and self.access_log_enabled):
            return super().access(resp, req, environ, request_time)
        a = self.atoms(resp, req, environ, request_time)
        status = int(a["s"]) if str(a["s"]).isdigit() else a["s"]
        fields = {"remote_addr": a["h"], "method": a["m"], "path": a["U"], "query": a["q"] or None,
                  "protocol": a["H"], "status": status, "bytes": a["B"], "duration_ms": round(a["D"] / 1000, 3),
                  "referer": None if a["f"] == "-" else a["f"], "user_agent": None if a["a"] == "-" else a["a"]}
        self.access_log.info("%s %s", a["r"], status, extra=fields)
