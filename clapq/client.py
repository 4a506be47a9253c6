"""`clapq upload` and `clapq search`: a small HTTP client for people with a folder of audio."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import difflib
import errno
import functools
import hashlib
import io
import json
import os
import re
import shlex
import stat
import sys
import time
import unicodedata
import urllib.parse
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

import requests
from requests_toolbelt import MultipartEncoder
from urllib3.exceptions import NewConnectionError

from clapq.blobs import NotAFile, file_sha256, open_file
from clapq.digests import Digests

T = TypeVar("T")

# what libsndfile or FFmpeg (PyAV) decode, by the names files of those formats go by; video files for their
# audio track (not .ts and .mts, as often TypeScript); DSD in DSF and DSDIFF (a folder of them was "no audio
# files", helper-104)
AUDIO_SUFFIXES = {".wav", ".wave", ".bwf", ".rf64", ".flac", ".aif", ".aiff", ".aifc", ".ogg", ".oga", ".opus",
                  ".spx", ".mp3", ".mp2", ".mpga", ".m4a", ".m4b", ".m4r", ".aac", ".alac", ".caf", ".wma", ".ac3",
                  ".eac3", ".dts", ".amr", ".3gp", ".3g2", ".wv", ".ape", ".tta", ".mka", ".mp4", ".mkv", ".webm",
                  ".mov", ".w64", ".au", ".snd", ".voc", ".gsm", ".weba", ".m4v", ".avi", ".mpg", ".mpeg",
                  ".m2ts", ".wmv", ".asf", ".flv", ".mxf", ".ogv", ".vob", ".dv", ".dsf", ".dff",
                  ".shn"}
# folders a system keeps among the user's, left out as hidden ones are (where they were made, they are hidden
# or not shown; over a network share or on a drive moved to another machine, they are plain folders): the
# recycle bins of deleted files of Windows (each beside a record of it named with its extension:
# "$I8K2Z1F.flac"), Synology and QNAP NAS shares and macOS's file sharing (AFP), the snapshots of Synology and
# QNAP shares (an earlier copy of the whole share each, sent as the user's files again under other paths), and
# their own data (Windows's restore points and search index, which a user's account may not read; Synology's
# indexes and thumbnails, a folder named as each file beside every folder; macOS's files being written). Only by
# the names those systems give them, their marks included: a user's own "recycle" or "Snapshots" is sent. Those
# left out at any depth, as a drive's or share's top may be below the folder uploaded (a folder of mounted drives,
# a NAS's folder of shares: "Music/#recycle"), and no user's folder goes by such a name
SYSTEM_FOLDERS = {"$recycle.bin", "system volume information", "#recycle", "@recycle", "@eadir", "#snapshot",
                  "@recently-snapshot"}
# macOS's, at the top of a share (AFP) only, by plain words that a user's own folder may go by too ("Session/Temporary
# Items" was left out, its audio unsent, helper-141): left out only at the top of the folder uploaded
SHARE_TOP_FOLDERS = {"network trash folder", "temporary items"}
# A multiple of the worker's batch (16 windows on a CPU) and of its task size (16 files): a task's last
# batch is padded to full size, so with short files a request of 100 would leave its last batch 3/4
# padding.
BATCH_FILES = 128
BATCH_BYTES = 256 << 20
# what multipart adds to a request: its end, and per file the part's headers and its 'metadata' entry
REQUEST_OVERHEAD, PART_OVERHEAD = 4096, 1024
# descriptors a request leaves to the rest of the process (the interpreter's, the API's connections) beside
# the files it holds open while it streams them
SPARE_FDS = 32
MAX_BUSY_WAIT_S = 300
MAX_REQUEST_BYTES = 2 << 30  # the API's CLAPQ_MAX_REQUEST_BYTES by default, where it does not say its own
MAX_CUTS = 3  # an upload request cut off this many times in a row (a proxy's smaller size limit) stops the command


OUTAGE_WAIT_S = 600  # how long a command keeps trying while the API, or its database, is down
# waiting for jobs: at most this share of each of the key's CLAPQ_RATE_LIMIT, the rest left to the user's other
# requests; asked once a poll's seconds while the jobs move, and as seldom as a fifth of the time nothing has
# moved, up to MAX_POLL_S, while they do not
WAIT_SHARE, MAX_POLL_S = 0.5, 10.0


class Busy(SystemExit):
    """The API cannot take the request now but may soon: 429, its backlog is full or the key is over its rate
    limit (`outage` False), or 502,
    503, 504 or no answer at an address that answered before: it, or its database, is down or restarting
    (`outage` True). `retry_after_s` says when to try again."""

    def __init__(self, message: str, retry_after_s: float, outage: bool = False) -> None:
        super().__init__(message)
        self.retry_after_s, self.outage = retry_after_s, outage


class Stale(SystemExit):
    """412: the item changed since the ETag sent in If-Match was read; read it again."""


class KeyRefused(SystemExit):
    """401: the API takes the key no more (revoked while the command ran) or never did. What a command sent
    before stays its tenant's, which another key of the tenant reaches."""


class Cut(SystemExit):
    """The connection to an API that had answered before was lost while a request that cannot simply be sent
    again (an upload's) was on its way: the API restarted, or refused a body over its size limit. The API may
    or may not have taken it."""


def patiently(attempt: Callable[[], T]) -> T:
    """attempt(), made again while it raises Busy: as long as the API is busy (its backlog drains), and up to
    OUTAGE_WAIT_S into an outage; the reason is said on stderr when it changes."""
    down_since, said = None, None
    while True:
        try:
            return attempt()
        except Busy as busy:
            now = time.monotonic()
            down_since = (down_since or now) if busy.outage else None
            if down_since is not None and now - down_since >= OUTAGE_WAIT_S:
                raise SystemExit(f"{busy.code}; gave up after trying for {OUTAGE_WAIT_S / 60:g} minutes") from None
            if busy.code != said:
                say(f"{busy.code}; trying again in {busy.retry_after_s:.0f} s (Ctrl-C stops)")
                said = busy.code
            time.sleep(busy.retry_after_s)


def say(line: str) -> None:
    """A line on stderr; at a terminal, in the place of the line of progress a wait updates there (written again at
    its next look), where it was written on at its end: "816/2000 files processed (40%)clapq: GET ..." (helper-131)."""
    print(("\r\x1b[K" if sys.stderr.isatty() else "") + line, file=sys.stderr)


def _retry_after(r: requests.Response, default: float) -> float:
    try:
        return min(MAX_BUSY_WAIT_S, max(1.0, float(r.headers.get("Retry-After", default))))
    except ValueError:
        return default


class Client:
    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        if not (key.isascii() and key.isprintable()):  # an HTTP header cannot carry it (a pasted curly quote)
            raise SystemExit("clapq: the API key has characters no key has (outside printable ASCII): copy it "
                             "again as `clapq keys create` printed it (CLAPQ_API_KEY or --key)")
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {key}"
        self.reached = False  # the API has answered once: from then on, no answer is an outage, not a typo
        self.stopped: Path | None = None  # the data directory whose address this is, where its `up` is not running
        self.key_of_stopped = False  # whether the key is that data directory's too (not --key, CLAPQ_API_KEY)
        # the key's CLAPQ_RATE_LIMIT (requests, seconds, as the API says it), once limits() asked; whether pace() said
        # it waits
        self.rates: list[tuple[int, float, str]] = []
        self.paced = False
        self.sent: deque[float] = deque(maxlen=100_000)  # when each request of this command was sent (monotonic)

    def call(self, method: str, path: str, missing_ok: bool = False, **kw) -> dict | None:
        """The JSON answer; any failure is a SystemExit with a sentence. `missing_ok`: a 404 is None. While
        the API is busy or down for now the request is sent again (`patiently`), unless its body is a
        stream that cannot be read twice (data=, files=): then Busy reaches the caller."""
        if "data" in kw or "files" in kw:
            return self._call(method, path, missing_ok, **kw)
        return patiently(lambda: self._call(method, path, missing_ok, **kw))

    def item(self, item_id: str) -> tuple[dict | None, str | None]:
        """An item and its ETag (for If-Match), or (None, None) where it is gone."""
        got = patiently(lambda: self._call("GET", f"/v1/items/{urllib.parse.quote(item_id, safe='')}", True,
                                           etag=True))
        return (None, None) if got is None else got

    def _call(self, method: str, path: str, missing_ok: bool = False, etag: bool = False, repeatable: bool = False,
              **kw):
        """The JSON answer (`etag`: with the answer's ETag header), or None for a 404 with `missing_ok`.
        `repeatable`: a POST that changes nothing when sent twice (a look-up, a search, a conditional
        update), asked again as a GET is when a restart cuts its connection."""
        self.sent.append(time.monotonic())
        try:
            # 10 s to connect (a wrong host fails fast), 10 minutes for an answer (a large upload's)
            r = self.s.request(method, self.url + path, **{"timeout": (10, 600), **kw})
        except requests.ConnectionError as exc:
            if isinstance(exc, requests.exceptions.SSLError):  # https:// to a server of plain HTTP, or a bad certificate
                raise SystemExit(f"clapq: the TLS handshake with {self.url} failed ({_reason(exc)}); `clapq up` and "
                                 "`clapq api` serve plain HTTP: use an http:// URL for them") from None
            # refused, no such host, no answer to the connect: nothing was sent
            if isinstance(exc, requests.ConnectTimeout) or _causes(exc, NewConnectionError):
                if self.reached:
                    raise Busy(f"clapq: the API at {self.url} stopped answering ({_reason(exc)})", 5.0,
                               outage=True) from None
                raise SystemExit(f"clapq: cannot reach the clapq API at {self.url} (is `clapq up` or `clapq "
                                 f"api` running there? set CLAPQ_URL or --url): {_reason(exc)}") from None
            if self.reached and (method == "GET" or repeatable):  # a poll cut off by a restart: asked again
                raise Busy(f"clapq: the connection to {self.url} was lost during {method} {path} ({_reason(exc)})",
                           5.0, outage=True) from None
            raise (Cut if self.reached else SystemExit)(
                f"clapq: the connection to {self.url} was lost during {method} {path} (the API restarted, or "
                f"refused a request over its size limit while it was being sent): {_reason(exc)}") from None
        except requests.Timeout:
            raise SystemExit(f"clapq: {method} {path} got no answer from {self.url} in time") from None
        except requests.RequestException as exc:  # an address requests cannot use, and the like
            raise SystemExit(f"clapq: {method} {path} to {self.url} failed: {_reason(exc)}") from None
        self.reached = True
        if 300 <= r.status_code < 400:  # only where redirects are not followed: an upload's body is spent
            where = r.headers.get("Location")
            raise SystemExit(f"clapq: {method} {path} was redirected ({r.status_code}) to {where}; point --url "
                             "(or CLAPQ_URL) there" if where else f"clapq: {method} {path} got {r.status_code}, a "
                             "redirect without a Location; check --url (or CLAPQ_URL)")
        if r.status_code == 404 and missing_ok:
            return None
        if r.status_code >= 400:
            try:
                error = r.json()["error"]
                code, msg = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):  # not ours: a proxy's page, another server
                code = None
                plain = (r.headers.get("Content-Type") or "").startswith("text/plain") and r.status_code < 500
                msg = r.text[:300] if plain else f"{r.status_code} {r.reason}"
                if r.status_code < 500:  # a 5xx of a proxy in front of the API says the API is down
                    msg += ("; this is not the clapq API's answer: check --url (or CLAPQ_URL), the address "
                            f"`clapq up` printed ({self.url} now)")
            if r.status_code == 429:  # over CLAPQ_RATE_LIMIT (its wait is said once, by patiently) or busy
                why = msg.split("; try again")[0] if code == "rate_limited" else f"the API is busy ({msg})"
                raise Busy(f"clapq: {method} {path}: {why}", _retry_after(r, 60.0))
            # a model the API cannot serve (its checkpoint cannot be loaded, or its weights changed while it ran),
            # or an API whose code changed on disk under it, is not an outage: no wait mends it, so the command
            # stops with the API's sentence
            if r.status_code in (502, 503, 504) and code not in ("model_unavailable", "code_changed"):
                raise Busy(f"clapq: {method} {path}: the API is unavailable for now ({msg})", _retry_after(r, 5.0),
                           outage=True)
            if r.status_code == 404 and msg.startswith("no endpoint "):  # --url http://host:8000/v1
                msg += (f"; check --url (or CLAPQ_URL): the address of the API's root, without /v1 ({self.url} now; "
                        "behind a proxy that serves it under a path, that path, such as https://host/clapq)")
            if r.status_code == 412 and code == "precondition_failed":
                raise Stale(f"clapq: {method} {path}: {msg}")
            if r.status_code == 401 and code == "unauthorized" and self.stopped is not None and not self.key_of_stopped:
                raise SystemExit(f"clapq: {method} {path}: the API at {self.url} does not take this key, and the "
                                 f"`clapq up` of {self.stopped}, whose address it is, is not running: another server "
                                 f"answers there. Start it again (`clapq up --data-dir {self.stopped}` with the --port "
                                 "it had), or pass --url")
            if r.status_code == 401 and code == "unauthorized" and self.stopped is not None:
                # another `clapq up` (of another data directory) serves the port this one's last run did: its key
                # was said to be revoked (helper-88)
                raise SystemExit(f"clapq: {method} {path}: the API at {self.url} does not take the key of "
                                 f"{self.stopped}, whose `clapq up` is not running: another server answers at the "
                                 "address it served last. Start it again (`clapq up --data-dir "
                                 f"{self.stopped}` with the --port it had), or pass --url and --key")
            if r.status_code == 401 and code == "unauthorized":  # the API's words are for HTTP clients
                raise KeyRefused(f"clapq: {method} {path}: the API does not take this key (unknown or revoked): pass "
                                 "the one `clapq up` or `clapq keys create` printed, with --key or CLAPQ_API_KEY")
            raise SystemExit(f"clapq: {method} {path} failed ({r.status_code}): {msg}")
        try:
            body = r.json()
        except ValueError:  # a 200 from a server that is not clapq (a proxy's login page, a file server)
            body = None
        if not isinstance(body, dict):  # every answer of the API is a JSON object
            raise SystemExit(f"clapq: {method} {path}: the answer from {self.url} is not a JSON object, so not the "
                             "clapq API's: check --url (or CLAPQ_URL), the address `clapq up` printed")
        return (body, r.headers.get("ETag")) if etag else body

    def library(self, name: str, create: bool = True) -> dict:
        """The library with this name (or id); created if missing, or else a sentence naming the ones
        there are. Names are compared as the API stores them: without surrounding spaces, in NFC (an
        accent typed, or taken from a macOS folder name, is the same name)."""
        name = unicodedata.normalize("NFC", name.strip())
        lib, libs = self._find(name)
        if lib is not None:
            return lib
        there = ", ".join(repr(lib["name"]) for lib in libs) or "none yet"
        if _as_id(name) is not None:  # the API takes no id as a name, so there is nothing to create
            raise SystemExit(f"clapq: none of your libraries has the id {name} (libraries: {there}); "
                             "give a library's name or the id its creation printed")
        if not create:
            alike = [lib["name"] for lib in libs if lib["name"].casefold() == name.casefold()]
            if alike:  # names are case-sensitive: `walk` for `Walk`
                raise SystemExit(f"clapq: no library named {name!r}; did you mean {alike[0]!r}? (names differ by case)")
            if any(unicodedata.category(c) == "Cf" for c in name):  # the API refuses such a name
                raise SystemExit(f"clapq: no library named {name!r} (libraries: {there}); the name has an "
                                 "invisible formatting character, which no library's name has")
            raise SystemExit(f"clapq: no library named {name!r} (libraries: {there}); "
                             f"`clapq upload DIR --library {name!r}` creates it")
        try:
            made = self.call("POST", "/v1/libraries", json={"name": name})
            # said, since a name typed in other capitals than an existing library's makes a second library, and
            # so does a misspelt one (`--library feild` beside "field"), whose upload sends the whole folder again
            # into a new library (helper-108)
            alike = [lib["name"] for lib in libs if lib["name"].casefold() == name.casefold()]
            close = [] if alike else close_names(name, [lib["name"] for lib in libs])
            one = len(close) == 1
            print(f"created library {name!r}" + (f" (beside {_some([repr(x) for x in alike])}: names differ by case)"
                                                  if alike else
                                                  f" (beside {_some([repr(x) for x in close])}, "
                                                  f"{'a name' if one else 'names'} close to it: if you meant "
                                                  f"{'that library' if one else 'one of those'}, stop with Ctrl-C "
                                                  f"and give its name; `clapq delete --library {shlex.quote(name)} "
                                                  "--yes` removes this new one)"
                                                  if close else ""), file=sys.stderr)
            return {**made, "created": True}  # by this command: no file of it can be in there yet
        except SystemExit as exc:
            # 409: another upload created it since the look above
            lib = self._find(name)[0] if "failed (409)" in str(exc.code) else None
            if lib is None:
                raise
            return lib

    def _find(self, name: str) -> tuple[dict | None, list[dict]]:
        """The library of this name, else the one with this id: a library may be named as another's id, and
        `--library X` then means the one named X (never another, which `delete --yes` would remove)."""
        libs = self.call("GET", "/v1/libraries")["libraries"]
        by_name = next((lib for lib in libs if lib["name"] == name), None) or next(
            (lib for lib in libs if unicodedata.normalize("NFC", lib["name"]) == name), None)  # one made before NFC
        # an id in capitals, braces or without hyphens is the same id
        return by_name or next((lib for lib in libs if lib["id"] == _as_id(name)), None), libs

    def limits(self) -> dict:
        """What the API takes (GET /v1/limits; an older server without it: {}). Its `rate_limits` are kept for
        `pace`."""
        answer = self.call("GET", "/v1/limits", missing_ok=True)
        answer = answer if isinstance(answer, dict) else {}
        self.rates = _rates(answer.get("rate_limits"))
        return answer

    def pace(self, doing: str, share: float = WAIT_SHARE) -> None:
        """Sleep until one more request keeps this command's requests within `share` of each of the key's
        limits, in any stretch of the limit's length (the API's moving window), its own earlier requests (an
        upload's batches) counted. A wait that asked twice a second met 429s at a CLAPQ_RATE_LIMIT under 120 a
        minute, and spent the budget of the user's other scripts of the key (helper-131). A sleep of 5 s or more
        is said, once a command, as what it holds back (`doing`): after an upload's batches, the wait was still
        for as long as half a minute."""
        for amount, period, spoken in self.rates:
            allowed = max(1, int(amount * share))
            while len(self.sent) >= allowed and (late := self.sent[-allowed] + period - time.monotonic()) > 0:
                if late >= 5 and not self.paced:
                    say(f"clapq: waiting {late:.0f} s before {doing}: this command keeps to {allowed} of the {spoken} "
                        "this key may send (CLAPQ_RATE_LIMIT), leaving the rest to its other uses")
                    self.paced = True
                time.sleep(late)


def _rates(limits: object) -> list[tuple[int, float, str]]:
    """/v1/limits' `rate_limits` as (requests, seconds, words); [] where there is none, or from a server before the
    field (which only said its limit in words, `rate_limit`)."""
    return [(int(r["requests"]), float(r["seconds"]), str(r.get("said") or f"{r['requests']} requests"))
            for r in limits or () if isinstance(r, dict) and r.get("requests") and r.get("seconds")]


def close_names(name: str, names: list[str]) -> list[str]:
    """Those of `names`, in their order, that a typo or other capitals of `name` would be: compared casefolded and
    without surrounding spaces, the forms among difflib's three closest to it (0.75 or more alike), and each name
    of such a form (names that differ by case or spaces alone are each named). A new library's (`clapq upload
    --library`) and a new tenant's (`clapq keys create`)."""
    folded = sorted({n.strip().casefold() for n in names})
    near = set(difflib.get_close_matches(name.strip().casefold(), folded, 3, 0.75))
    return [n for n in names if n.strip().casefold() in near]


def _as_id(name: str) -> str | None:
    """The library id this text is (in any form a UUID takes, as the API refuses all of them as names)."""
    try:
        return str(uuid.UUID(name))
    except ValueError:
        return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """A requests error and what it wraps: urllib3's errors hold their cause in args, not __cause__."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            inner = next((a for a in reversed(getattr(exc, "args", ())) if isinstance(a, BaseException)), None)
        exc = inner


def _causes(exc: BaseException, kind: type) -> bool:
    return any(isinstance(e, kind) for e in _chain(exc))


def _reason(exc: BaseException) -> str:
    """The innermost cause, in one line (not urllib3's retry wrapper)."""
    inner = list(_chain(exc))[-1]
    return (str(inner).splitlines() or [""])[0][:200] or type(inner).__name__


class _Body:
    """A MultipartEncoder read in large blocks. Each of its read() calls costs Python bookkeeping, and
    urllib3 reads a body 16 KiB at a time: 2-4 ms of client CPU for a 1.7 MB file, as much as the API
    spends receiving it. Reading 256 KiB at a time and handing out slices costs ~0.8 ms (BENCHMARKS.md)."""

    BLOCK = 256 * 1024

    def __init__(self, encoder: MultipartEncoder) -> None:
        self.encoder, self.content_type = encoder, encoder.content_type
        self._buf, self._pos = b"", 0
        self.parts: list[_Sized] = []  # the files it sends

    def __len__(self) -> int:  # requests sends it as Content-Length
        return self.encoder.len

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:  # the rest of the body
            out, self._buf, self._pos = self._buf[self._pos :] + self.encoder.read(), b"", 0
        else:
            if self._pos >= len(self._buf) and size:
                self._buf, self._pos = self.encoder.read(max(size, self.BLOCK)), 0
            out = self._buf[self._pos : self._pos + size]
            self._pos += len(out)
        return out


class Changed(Exception):
    """A file of an upload request stopped being what it was when the request was made: gone, unreadable,
    or of another size (a file still being written). Not an OSError: it passes through requests as it is,
    and the connection it was sent on is closed (the API drops the request)."""

    def __init__(self, path: Path, why: str, unopened: bool = False) -> None:
        super().__init__(f"{path}: {why}")
        self.path, self.why, self.unopened = path, why, unopened  # unopened: gone, or not readable


class _Sized:
    """A file sent as the size it had when its request was made, which the request's Content-Length counts
    on: one that shrinks while it is sent would leave the API waiting for bytes that never come (and the
    command for its answer, up to 10 minutes), and one that grows would send a body the API cannot parse.
    Either raises Changed. `len` is what is left to send, as requests_toolbelt reads it."""

    def __init__(self, path: Path, f) -> None:
        self.path, self.f, self.opened_ns = path, f, time.time_ns()
        self.opened = os.fstat(f.fileno())
        self.size = self.len = self.opened.st_size

    def read(self, n: int | None = -1) -> bytes:
        n = self.len if n is None or n < 0 else min(n, self.len)
        data = self.f.read(n) if n else b""
        self.len -= len(data)
        if len(data) < n:
            raise Changed(self.path, f"it shrank while it was being sent (from {self.size:,} bytes)")
        if not self.len and n and os.fstat(self.f.fileno()).st_size != self.size:
            raise Changed(self.path, f"it grew while it was being sent (from {self.size:,} bytes)")
        return data

    def kept(self, item) -> None:
        """Keep the digest of the file, sent whole, in the cache of digests (clapq.digests) as a read of it would
        be: an upload into a new library asks nothing and read no digest, so the run after read the whole folder
        again, and could not tell the files changed in place since (helper-120). The digest is the API's, of the
        bytes it received (`item`: the batch's answer for this file), where hashing them here as they were sent
        cost the machine sending them ~1 ms of CPU a 1.76 MB file; a server that gives none keeps none."""
        digest = item.get("sha256") if isinstance(item, dict) else None
        if not self.len and isinstance(digest, str):
            _cache().sent(self.path, digest, self.opened, self.opened_ns)


def _size(p: Path) -> int:
    """A file's size, 0 for one gone since it was listed (its request then leaves it out, saying why)."""
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _unread(exc: OSError) -> str:
    """Why a file listed to send is not sent: one removed or moved meanwhile said "cannot be read (No such file
    or directory)", as if its permissions were to blame."""
    if isinstance(exc, FileNotFoundError):
        return "gone since the upload began (removed or moved meanwhile)"
    if isinstance(exc, NotAFile):
        return exc.strerror
    return f"cannot be read ({exc.strerror or exc})"


def wire_name(name: str) -> str:
    """The name a file goes by in a request: one the API reads back exactly as sent, so that 'metadata'
    finds its file. A name that is not UTF-8 (bytes of another encoding) shows U+FFFD where they were; a
    backslash (werkzeug reads it as an escape), a control character (a line break goes as "%0A" and is
    not read back) and the text "%22" (read back as a quote) become "_"."""
    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    name = "".join("_" if c == "\\" or unicodedata.category(c) == "Cc" else c for c in name)
    return name.replace("%22", "_")


@contextlib.contextmanager
def multipart_body(folder: Path, batch: list[Path]) -> Iterator[_Body]:
    """One upload request, streamed from the files as it is sent: the folder layout as 'metadata' (the
    stored filename is the base name only: each file's path in the folder, and an id of the folder), then
    each file as a 'files' part. The files are closed on leaving."""
    rel = [p.relative_to(folder).as_posix() for p in batch]
    names: list[str] = []
    taken: set[str] = set()  # as the API reads a name, in NFC: "Café" of a Mac's folder (NFD) is Linux's "Café"
    for r in rel:  # two names that become one (café/cafè not in UTF-8, "a\\b" and "a_b"): the second is "a~2.wav"
        name, n = wire_name(r), 1
        while unicodedata.normalize("NFC", name) in taken:
            n += 1
            stem, dot, ext = wire_name(r).rpartition(".")
            name = f"{stem}~{n}.{ext}" if dot else f"{ext}~{n}"
        names.append(name)
        taken.add(unicodedata.normalize("NFC", name))
    root = folder_id(folder)  # which folder the paths are in: a rename is told within it only
    meta = json.dumps({n: {"path": stored_path(r), "folder": root} for n, r in zip(names, rel)})
    def opened(p: Path) -> _Sized:
        try:
            return _Sized(p, files.enter_context(open_file(p)))
        except OSError as exc:  # gone, or no longer readable, since it was listed
            raise Changed(p, _unread(exc), unopened=True) from None

    with contextlib.ExitStack() as files:
        parts = [opened(p) for p in batch]
        body = _Body(MultipartEncoder(fields=[("metadata", meta)] + [
            ("files", (n, part, "application/octet-stream")) for n, part in zip(names, parts)]))
        body.parts = parts
        yield body


def n_files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _megabytes(n: int) -> str:
    """A size for people: tiny uploads were "(0.0 MB)", and then 5 bytes "(1 kB)"."""
    if n < 1000:
        return "1 byte" if n == 1 else f"{n} bytes"
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{round(n / 1e3)} kB"


@dataclasses.dataclass
class Listing:
    """What `clapq upload` found under a folder."""

    audio: list[Path]  # regular files (or links to them) named as audio, in path order
    hidden: int = 0  # audio files under names starting with "." (macOS's "._x.wav", trash folders)
    system: list[str] = dataclasses.field(default_factory=list)  # system folders (_system_folder), not looked into
    projects: list[str] = dataclasses.field(default_factory=list)  # Audacity projects' data folders, not looked into
    other: Counter = dataclasses.field(default_factory=Counter)  # other files, by suffix
    unreadable: list[str] = dataclasses.field(default_factory=list)  # named as audio but no file: broken links, pipes
    linked: list[str] = dataclasses.field(default_factory=list)  # links to folders, not followed (a loop, a drive)
    closed: list[str] = dataclasses.field(default_factory=list)  # folders (and files) that cannot be read, with why
    # links to audio files of the folder, which are sent under their own names: "link → file"
    aliases: list[str] = dataclasses.field(default_factory=list)


def audio_files(folder: Path) -> Listing:
    """The audio files under `folder` by suffix, and what was left out, so that each can be said: a folder
    that cannot be read is named (rglob passed over it without a word), and one removed while it is looked
    through is passed over."""
    found = Listing([])

    def unreadable(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):  # gone since its parent was read: nothing to say
            where = Path(exc.filename)
            if where == folder:
                raise SystemExit(f"clapq: cannot read {folder}: {exc.strerror or exc}")
            if where.name == "lost+found" and where.parent.is_mount():  # every ext4 drive's, for root only: a
                return  # drive uploaded whole would fail at every run for it (helper-43)
            if _hidden(where.relative_to(folder)):  # left out whatever it holds: a drive's .Trashes, another
                return  # user's .Trash-1000 failed every run, "any audio in them was not sent" (helper-134)
            found.closed.append(f"{where.relative_to(folder).as_posix()} ({exc.strerror or exc})")

    for top, dirs, files in os.walk(folder, onerror=unreadable):
        base = Path(top)
        # an Audacity 2 project (song.aup) keeps its audio beside it in song_data/e00/d00/*.au, blocks of a few
        # seconds each: they were sent as thousands of sounds of their own (helper-104)
        blocks = {d for d in dirs if d.endswith("_data") and d[: -len("_data")] + ".aup" in files}
        for name in dirs + files:
            p = base / name
            rel = p.relative_to(folder)
            suffix = p.suffix.lower()
            try:
                if _hidden(rel):
                    found.hidden += p.is_file() and suffix in AUDIO_SUFFIXES
                elif name in dirs and _system_folder(rel):  # a Windows drive's recycle bin was sent as the
                    # user's files, and its records of them failed, exit 1 (helper-104)
                    found.system.append(rel.as_posix())
                elif name in blocks and not p.is_symlink():
                    found.projects.append(rel.as_posix())
                elif name in dirs:
                    if p.is_symlink():  # os.walk does not go in
                        found.linked.append(rel.as_posix())
                elif not p.is_file():  # opening a pipe would wait forever; a broken link has nothing to read
                    if suffix in AUDIO_SUFFIXES:
                        found.unreadable.append(rel.as_posix())
                elif suffix in AUDIO_SUFFIXES:
                    found.audio.append(p)
                else:
                    found.other[suffix or "(no suffix)"] += 1
            except OSError as exc:  # in a folder that can be listed but not entered
                if suffix in AUDIO_SUFFIXES and not _hidden(rel):
                    found.closed.append(f"{rel.as_posix()} ({exc.strerror or exc})")
        dirs[:] = [d for d in dirs if not _system_folder((base / d).relative_to(folder)) and d not in blocks]
    # a link to a file of the folder would store the file under the link's name when the link sorts first
    # (and read as the file being a copy of its link): the file is sent under its own name, once
    own = {p.resolve(): p for p in found.audio if not p.is_symlink()}
    found.aliases = [f"{p.relative_to(folder).as_posix()} → {own[p.resolve()].relative_to(folder).as_posix()}"
                     for p in found.audio if p.is_symlink() and p.resolve() in own]
    found.audio = [p for p in found.audio if not p.is_symlink() or p.resolve() not in own]
    for names in (found.audio, found.unreadable, found.linked, found.closed, found.aliases, found.system,
                  found.projects):
        names.sort()
    return found


APPLE_DOUBLE = b"\x00\x05\x16\x07"  # how an AppleDouble file begins


def apple_double(p: Path) -> str | None:
    """What a file given on its own is where it is macOS's metadata of another file, not audio: an AppleDouble
    file, "._x.flac", which a Mac writes beside each file it puts on a drive or share that cannot hold a file's
    Finder information and extended attributes. Sent, it failed as "not a readable audio file (Invalid data found
    when processing input)" (helper-135); a folder's are left out, hidden. Told by its bytes, so a file of that
    name that is audio is sent. None where it is none (or cannot be read: the upload says why)."""
    try:
        with open_file(p) as f:
            if f.read(len(APPLE_DOUBLE)) != APPLE_DOUBLE:
                return None
    except OSError:
        return None
    of = p.with_name(p.name[2:]) if p.name.startswith("._") and len(p.name) > 2 else None
    if of is None:
        return (f"{printable(str(p))} is macOS metadata of a file (an AppleDouble file: its Finder information and "
                "extended attributes, which a Mac writes beside a file it copies to a drive or share), not audio")
    upload = f"upload {printable(str(of))} itself" if of.is_file() else f"{printable(of.name)} is not beside it"
    return (f"{printable(str(p))} is macOS metadata beside {printable(of.name)} (an AppleDouble file: its Finder "
            f"information and extended attributes, which a Mac writes beside each file it copies to a drive or share), "
            f"not audio: {upload}")


def _system_folder(rel: Path) -> bool:
    """Whether a folder, by its path in the folder uploaded, is one a system keeps (SYSTEM_FOLDERS, and
    SHARE_TOP_FOLDERS at the top): left out, named."""
    name = rel.name.casefold()
    return name in SYSTEM_FOLDERS or name in SHARE_TOP_FOLDERS and len(rel.parts) == 1


def _hidden(rel: Path) -> bool:
    """Whether a path in the folder is hidden, or in a hidden folder: `clapq upload` leaves it out."""
    return any(part.startswith(".") for part in rel.parts)


def _system(paths: list[str]) -> str:
    """The system folders found, by path; a name found more than once by its name and count: Synology's @eaDir is
    beside every folder of a share, and a share of 300 folders was named as 10 @eaDir and "290 more"."""
    names = Counter(p.rsplit("/", 1)[-1] for p in paths)
    once = [p for p in paths if names[p.rsplit("/", 1)[-1]] == 1]
    return _some([printable(p) for p in once] + [f"{printable(n)} ×{k}" for n, k in sorted(names.items()) if k > 1])


def _some(names: list[str], most: int = 10) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def files_open_at_once() -> int:
    """How many files one request may hold open: BATCH_FILES, or fewer where the soft limit of open files
    (`ulimit -n`) leaves less room; past it, the files of a request past the limit were not sent ("cannot
    be read (Too many open files)"), at every request (helper-62)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return BATCH_FILES
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return BATCH_FILES if soft == resource.RLIM_INFINITY else max(1, min(BATCH_FILES, soft - SPARE_FDS))


def batches(paths: Iterable[Path], max_files: int = BATCH_FILES, max_bytes: int = BATCH_BYTES) -> Iterator[list[Path]]:
    """Upload requests of at most `max_files` files, split before one would pass `max_bytes` with the
    multipart around the files (a single larger file goes alone)."""
    batch, size = [], REQUEST_OVERHEAD
    for p in paths:
        n = _size(p) + PART_OVERHEAD
        if batch and (len(batch) >= max_files or size + n > max_bytes):
            yield batch
            batch, size = [], REQUEST_OVERHEAD
        batch.append(p)
        size += n
    if batch:
        yield batch


_digests: Digests | None = None


def _cache() -> Digests:
    global _digests
    if _digests is None:
        _digests = Digests()
        atexit.register(_digests.close)
    return _digests


def file_digest(p: Path) -> str:
    """A file's sha256 (OSError where it cannot be read), read from the file only where it changed since a run
    before read it (clapq.digests). A file to read that is no longer a regular file is NotAFile (clapq.blobs'
    open_file, which reads it): a pipe, opened to be read, waited for a writer for ever."""
    if (kept := _cache().kept_digest(p)) is not None:
        return kept
    return _cache()(p)


class Known(NamedTuple):
    """What a library holds of one batch's files (`not_known`)."""
    new: list[Path]  # the files whose bytes it does not hold, nor holds as failed in their bytes: to send
    pending: dict[Path, tuple[str | None, str | None]]  # held, not embedded yet: (job, item), None where not said
    digests: dict[Path, str | None]  # each file's sha256 (None: it could not be read)
    held: dict[Path, tuple[str, dict]]  # held: the item, and where it was sent from ({"path", "folder"} as said)
    failed: dict[Path, str]  # held as failed for a reason in their bytes, not sent again: why each failed
    asked: bool  # whether the server answered (one older than /known holds what it holds, unsaid)
    lost: set  # held, but their stored copies gone from the server's disk: sent, and so written anew
    # changed since a run before read them, whose bytes then the library holds: (that digest, where the item of
    # those bytes was sent from, {"path", "folder"} as said)
    earlier: dict[Path, tuple[str, dict]]


def not_known(client: Client, lib_id: str, batch: list[Path], retry_failed: bool = False, resend: bool = False) -> Known:
    """Which files of `batch` the library holds already, asked by digest (nothing sent). Files it holds as
    failed for a reason in their bytes are not sent again (`failed`) unless `retry_failed`: a folder uploaded
    every night sent its broken files at every run, each decoded again (a file that hangs its decoder held one
    for CLAPQ_DECODE_TIMEOUT_S) and told as a new failure, exit 1 (helper-74). Their bytes changed, they are
    other bytes, and sent. With `resend`, the files the library holds are sent too (their stored copies are
    written anew: what mends one `clapq check` finds missing or damaged); without, those whose stored copies the
    server says are gone from its disk (`missing`): an upload of the folder again mends them."""
    digests: dict[Path, str | None] = {}
    for p in batch:
        try:
            digests[p] = file_digest(p)
        except OSError:  # gone or unreadable since it was listed: its request leaves it out, saying why
            digests[p] = None
    # the digest a run before kept for each file that changed since (clapq.digests), asked about too: a file
    # changed in place is other bytes, sent as a new file, and the library keeps its earlier version (helper-120)
    before = {p: b for p in batch if digests[p] is not None and (b := _cache().earlier(p)) not in (None, digests[p])}
    # a server older than /known answers 404 (a library gone since the lookup fails on the upload itself)
    asked = sorted({d for d in digests.values() if d is not None} | set(before.values()))
    # not followed if redirected, as the upload that follows would not be: said at once, with where to
    answer = client.call("POST", f"/v1/libraries/{lib_id}/known", json={"sha256": asked}, missing_ok=True,
                         allow_redirects=False, repeatable=True)
    answered, answer = answer is not None, answer or {}
    known, pending = set(answer.get("known", ())), set(answer.get("pending", ()))
    jobs, items = answer.get("pending_jobs", {}), answer.get("pending_items", {})
    ids, sent_from = answer.get("items", {}), answer.get("sent_from", {})
    # a server of an earlier version says none: they are sent, and retried, as before
    failed_before = {} if retry_failed else answer.get("failed", {})
    failed = {p: str((failed_before[digests[p]] or {}).get("error") or "") for p in batch
              if digests[p] in failed_before}
    # a file failed in its bytes is held too, so that its renames are followed as any held file's (helper-77)
    ids = {**{d: f.get("item_id") for d, f in answer.get("failed", {}).items() if isinstance(f, dict)}, **ids}
    lost = {p for p in batch if digests[p] in set(answer.get("missing", ())) and p not in failed}
    return Known([p for p in batch if (resend or digests[p] not in known or p in lost) and p not in failed],
                 {p: (jobs.get(digests[p]), items.get(digests[p])) for p in batch if digests[p] in pending}, digests,
                 {p: (ids[digests[p]], sent_from[digests[p]]) for p in batch
                  if isinstance(ids.get(digests[p]), str) and isinstance(sent_from.get(digests[p]), dict)}, failed,
                 answered, lost,
                 {p: (b, sent_from[b]) for p, b in before.items() if b in known and isinstance(sent_from.get(b), dict)})


def stored_path(rel: str) -> str:
    """A folder path as `clapq upload` keeps it in an item's metadata.path: valid UTF-8 (a name that is not
    has its undecodable bytes as U+FFFD)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def folder_id(folder: Path) -> str:
    """An id of the folder files are sent from, kept as metadata.folder: a hash of its absolute path, not the
    path, which would show the uploader's user name to whoever searches the library (helper-38)."""
    return hashlib.sha256(str(folder.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _moved(folder: Path, held: dict[Path, tuple[str, dict]], first: dict[str, str], digests: dict,
           where: Where, elsewhere: set | None = None) -> list[tuple]:
    """The held files sent from this folder whose path in it no longer holds their bytes (renamed or moved
    within it since, or another file now under that name), as (item, old path, new path, this folder), and
    the held files sent before uploads recorded their folder that are at the same path here (any copy of
    those bytes), as (item, path, path, None): they take this folder, so that their later renames are told
    (helper-38). Files sent from another folder are never taken: that folder may be a copy of this one that
    is still there, and the item flipped between the two at each run, losing renames (helper-43); so a
    folder that is itself moved or renamed has its files' renames told no more; `elsewhere` gets such
    files' items (at the same path here), so that the command can say so. Only files sent from this very
    folder (metadata.folder) are renamed: a library filled from two folders holding the same bytes under
    other names, or from a folder and then its parent, has nothing renamed, and its paths flipped at each
    upload (helper-37). The new path is the first in the folder of those bytes, so copies elsewhere in it
    move nothing. Two files that swapped names, and a name given to new bytes after its file was renamed,
    move too: the old path is looked at by the bytes it holds, not only whether something is there
    (helper-42)."""
    root = folder_id(folder)
    moved = []
    for p, (item, sent) in held.items():
        old, rel = sent.get("path"), p.relative_to(folder).as_posix()
        if not isinstance(old, str) or first.get(digests[p]) != rel:
            continue
        if "folder" not in sent and where.has(old, digests[p]):  # whichever copy here is at that path
            moved.append((item, old, old, None))
        elif elsewhere is not None and sent.get("folder") != root and where.has(old, digests[p]):
            elsewhere.add(item)
        elif sent.get("folder") == root and old != stored_path(rel) and not where.holds(old, digests[p]):
            moved.append((item, old, stored_path(rel), root))
    return moved


class Where:
    """The audio files of the folder by the path `clapq upload` stores for them (a name that is not UTF-8 is
    stored with U+FFFD, and so was always taken for gone, helper-42), and the digests known of them."""

    def __init__(self, folder: Path, audio: list[Path]) -> None:
        self.folder = folder
        self.by_path: dict[str, list[Path]] = {}
        for p in audio:
            self.by_path.setdefault(stored_path(p.relative_to(folder).as_posix()), []).append(p)
        self.digests: dict[Path, str] = {}

    def holds(self, path: str, digest: str) -> bool:
        """Whether a file at this stored path holds these bytes (one not listed as audio, or that cannot be
        read or looked at, is taken to: nothing is moved on a guess)."""
        if path not in self.by_path:
            return not _gone(self.folder, path)
        return self.has(path, digest) is not False

    def has(self, path: str, digest: str) -> bool | None:
        """Whether an audio file listed at this stored path holds these bytes (None: one could not be read)."""
        unread = False
        for p in self.by_path.get(path, ()):
            if p not in self.digests:
                try:
                    self.digests[p] = file_digest(p)
                except OSError:
                    unread = True
                    continue
            if self.digests[p] == digest:
                return True
        return None if unread else False


def _gone(folder: Path, rel: str) -> bool:
    """Whether nothing is at this path in the folder (an error other than "no such file" says nothing)."""
    try:
        os.lstat(folder / rel)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except (OSError, ValueError):  # a name too long, a folder that cannot be read, a NUL in the name
        return False
    return False


def _gone_folder(folder: Path, p: Path) -> Path | None:
    """The outermost subfolder of `folder` above the file `p` that is gone (removed, moved or renamed since the
    folder was listed), relative to `folder`; None where every folder above it is there."""
    for sub in reversed(p.relative_to(folder).parents[:-1]):
        if _gone(folder, sub.as_posix()):
            return sub
    return None


def _folder_gone(folder: Path) -> SystemExit:
    # each file left was "not sent", one line each, to the end of a folder of thousands (helper-104)
    return SystemExit(f"clapq: {folder} is gone since the upload began (moved or renamed, or its drive unmounted): no "
                      "more of its files can be sent")


def _present(folder: Path, batch: list[Path], since: int | None) -> tuple[list[Path], list[str], Counter]:
    """The files of a request still there, looked at before it is said to be sent: a request whose files were all
    gone was "uploading 2 files (0 bytes)", just before the command stopped as its folder was gone. A file gone
    is left out, with a sentence, or counted by the subfolder gone with it (`_send`'s `lost`); the folder
    itself gone stops the command."""
    here, left_out, lost = [], [], Counter()
    for p in batch:
        try:
            p.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            if since is not None and _identity(folder) != since:
                raise _folder_gone(folder) from None
            if (sub := _gone_folder(folder, p)) is not None:
                lost[sub.as_posix()] += 1
            else:
                left_out.append(f"{wire_name(p.relative_to(folder).as_posix())}: {_unread(exc)}")
            continue
        except OSError:  # sent, its request says why it is not
            pass
        here.append(p)
    return here, left_out, lost


def _sendable(paths: list[Path], folder: Path, limits: dict) -> tuple[list[Path], dict[Path, str], list[str]]:
    """The files the API can take; those over its per-file or per-request size limit (sent, it would refuse the
    whole request, every time the command runs), each with the sentence that says so; and a sentence for each
    that cannot be read."""
    most = min(limits.get("max_file_bytes") or BATCH_BYTES * 64,
               (limits.get("max_request_bytes") or BATCH_BYTES * 64) - REQUEST_OVERHEAD - PART_OVERHEAD)
    ok, too_big, refused = [], {}, []
    for p in paths:
        name = wire_name(p.relative_to(folder).as_posix())
        try:
            size = p.stat().st_size
            if not os.access(p, os.R_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            refused.append(f"{name}: {_unread(exc)}")
            continue
        if size > most:
            too_big[p] = (f"{name}: {size / 1e6:,.1f} MB, larger than this server takes ({most / 1e6:,.1f} MB; "
                          "CLAPQ_MAX_FILE_BYTES and CLAPQ_MAX_REQUEST_BYTES there)")
        else:
            ok.append(p)
    return ok, too_big, refused


def _identity(folder: Path) -> int | None:
    """Which file system the folder a path names is on (None: no folder is there): a drive unmounted leaves its
    mount point on another. Not its inode, which FUSE file systems (sshfs) may number anew between looks."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev if stat.S_ISDIR(st.st_mode) else None


def _send(client: Client, lib_id: str, folder: Path, batch: list[Path],
          since: int | None = None) -> tuple[dict | None, list[Path], list[str], Counter]:
    """POST one batch; while the API is busy (429: its backlog is full) or down for now (502-504, or not
    answering before the request was sent), wait as it asks and send again. A connection lost while the
    batch was being sent ends the command (an API that refuses a body over its limit also cuts it); run
    again, it sends only what the library does not hold. A file gone, unreadable or changing size since it
    was listed (one still being written) is left out, and the rest sent again without it; where the folder
    itself is gone (no longer the folder `since` names), the command stops; where a subfolder is gone, all its
    files are left out at once. Returns the answer (None if no file was left to send), the files it holds, a
    sentence for each left out, and how many files of each subfolder gone were left out (by its path)."""
    def attempt() -> dict:
        with multipart_body(folder, batch) as body:
            answer = client.call("POST", f"/v1/libraries/{lib_id}/batches", data=body,
                                 headers={"Content-Type": body.content_type}, allow_redirects=False)
            items = answer.get("items") if isinstance(answer, dict) else None
            if isinstance(items, list) and len(items) == len(body.parts):  # one a file, in the order sent
                for part, item in zip(body.parts, items):
                    part.kept(item)
            return answer

    batch, left_out, lost = list(batch), [], Counter()
    while batch:
        try:
            return patiently(attempt), batch, left_out, lost
        except Changed as exc:
            if exc.unopened and since is not None and _identity(folder) != since:
                # moved or renamed, or its drive unmounted or unplugged (where it cannot be looked at: None)
                raise _folder_gone(folder) from None
            if exc.unopened and (sub := _gone_folder(folder, exc.path)) is not None:
                # its files each "not sent" on a line of their own, each after a request sent again without it
                gone = [p for p in batch if p.is_relative_to(folder / sub)]
                batch = [p for p in batch if p not in gone]
                lost[sub.as_posix()] += len(gone)
                continue
            batch.remove(exc.path)
            left_out.append(f"{wire_name(exc.path.relative_to(folder).as_posix())}: {exc.why}")
    return None, batch, left_out, lost


def upload_folder(client: Client, folder: Path, library: str, wait: bool = True, only: list[Path] | None = None,
                  retry_failed: bool = False, moved_from: Path | None = None, resend: bool = False) -> int:
    """Upload the audio files under `folder`, or only the files `only` names (in `folder`), and by default
    wait for their jobs; returns the command's exit code. Files the library holds as failed for a reason in
    their bytes are sent again only with `retry_failed` (not_known). `moved_from`: the folder's path before it
    was moved or renamed, whose files become this folder's (_taken_over). `resend`: the files the library holds
    are sent too (not_known)."""
    listing = Listing(only) if only is not None else audio_files(folder)
    # which folder it is, once listed (an automounted one is mounted by then): one moved away or unmounted
    # meanwhile stops the command
    since = _identity(folder)
    paths, other = listing.audio, listing.other
    if listing.hidden:
        print(f"left out {n_files(listing.hidden)} with hidden names (starting with '.')", file=sys.stderr)
    if listing.system:
        print(f"left out the recycle bins, snapshots and system folders that Windows, macOS and NAS systems keep "
              f"(deleted files, earlier copies of the share, and their own data): {_system(listing.system)}",
              file=sys.stderr)
    if listing.projects:
        print(f"left out the data folders of Audacity projects (their audio in pieces of a few seconds each, not "
              f"sounds of their own: export a project to upload its sound): "
              f"{_some([printable(x) for x in listing.projects])}", file=sys.stderr)
    if other:
        kinds = ", ".join(f"{s} ×{n}" if n > 1 else s for s, n in other.most_common(8))
        print(f"left out {n_files(sum(other.values()))} not named as audio ({kinds}{', …' if len(other) > 8 else ''})",
              file=sys.stderr)
    if listing.unreadable:
        n = len(listing.unreadable)
        print(f"left out {n} {'entry' if n == 1 else 'entries'} with an audio file's name that "
              f"{'is' if n == 1 else 'are'} not a file (a broken link, a pipe, a device): "
              f"{_some([printable(x) for x in listing.unreadable])}", file=sys.stderr)
    if listing.linked:
        n = len(listing.linked)
        links = _some([printable(x) for x in listing.linked])
        print(f"not followed: {n} link{'' if n == 1 else 's'} to a folder ({links}); upload the "
              "folder it points to on its own", file=sys.stderr)
    if listing.aliases:
        n = len(listing.aliases)
        print(f"left out {n} link{'' if n == 1 else 's'} to files of this folder, which are sent under their own "
              f"names: {_some([printable(x) for x in listing.aliases])}", file=sys.stderr)
    if listing.closed:
        print(f"left out, as they cannot be read: {_some([printable(x) for x in listing.closed])}", file=sys.stderr)
    if not paths:  # before the library is looked up: a failed command creates nothing
        raise SystemExit(f"clapq: no audio files under {folder} (looked for "
                         f"{', '.join(sorted(AUDIO_SUFFIXES))}); nothing was uploaded")
    limits = client.limits()
    found = len(paths)
    listed = paths
    paths, too_big, unreadable = _sendable(paths, folder, limits)
    refused: list[str] = []

    gone_folders: Counter = Counter()  # files of subfolders gone since the upload began, by the subfolder's path

    def not_sent(lines) -> None:
        for line in lines:
            print(f"not sent: {line}", file=sys.stderr)
            refused.append(line)

    def tell_lost() -> None:
        """One line a subfolder gone meanwhile, not one a file of it (a folder of thousands moved away)."""
        for sub, n in gone_folders.items():
            print(f"not sent: {printable(sub)}/: gone since the upload began (removed or moved meanwhile), "
                  f"{'its file' if n == 1 else f'its {n} files'}", file=sys.stderr)

    # where nothing can be sent, as above: no library is created for nothing
    not_sent(unreadable + ([] if paths else list(too_big.values())))
    if not paths:
        what = "the file cannot" if found == 1 else f"none of the {found} files can"
        raise SystemExit(f"clapq: {what} be sent (said above); nothing was uploaded")
    lib = client.library(library)
    # a library that holds files already (the same folder again, or an upload cut short), or that this
    # command did not create (another upload may be filling it at the same moment): files whose bytes it
    # holds are not sent again, only the rest. Only one this command just created is known to be empty.
    check = lib.get("item_count", 0) > 0 or not lib.get("created")
    if check:  # a file over the size limit the library holds (sent before the limit was lowered) is not refused,
        # and its renames are followed as any held file's (helper-51: "not sent" and exit 1 at every run)
        sendable = set(paths)
        paths = [p for p in listed if p in too_big or p in sendable]
    else:
        not_sent(too_big.values())
    jobs, sent, skipped, unfinished, in_flight = [], 0, 0, 0, 0
    # files of requests whose connection was cut before their answer came: those the library was then found to
    # hold (the API stored them), and those it could not be asked about (a server before /known)
    cut_stored, cut_unasked = 0, 0
    cut_sent = 0  # of the files counted in `sent`, those stored by requests whose connection was cut
    # files an earlier run left queued or running: their jobs are waited for too (job -> their bytes), and
    # of those jobs only these files' failures are told (`theirs`: a job may hold another folder's files)
    earlier: dict[str, int] = {}
    theirs: set[str] = set()
    job_bytes: list[int] = []  # what each job was sent: its weight in the share shown while waiting
    copies_of: dict[str, list[str]] = {}  # item id -> the paths of the copies sent of its bytes
    sent_items: dict[str, list[tuple[str, str]]] = {}  # job -> (item, path) of each file it was sent, copies too
    where: dict[str, str] = {}  # item id -> the file's path in the folder (the server keeps its base name)
    # copies not sent, since the library holds their bytes: named as the server names the copies it is sent,
    # so that a folder says the same of its copies on every run (digest -> its first path in the folder)
    first: dict[str, str] = {}
    held_copies: list[str] = []
    by_another: list[str] = []  # files whose bytes another upload put into the library while this one sent them
    resent: list[str] = []  # files the library held, sent again with `resend`
    mending: set[Path] = set()  # files the library holds whose stored copies are gone from the server's disk
    mended: list[str] = []  # those of them sent, their stored copies written anew
    unasked = False  # a server older than /known was asked which files its library holds: all were sent
    failed_before: list[str] = []  # files not sent as the library holds them failed for a reason in their bytes
    # held files whose item's path is gone from the folder, or that take this folder: (item, old path, new path,
    # the folder it was sent from)
    moved: list[tuple] = []
    on_disk = Where(folder, listing.audio)
    elsewhere: set = set()  # held files sent from another folder, at the same path here
    versions: dict[Path, tuple[str, dict]] = {}  # files changed since a run before: Known.earlier

    def held_by_jobs(pending: dict[Path, tuple[str | None, str | None]]) -> int:
        """Held files not embedded yet: their jobs are waited for too, and their failures told by these paths.
        Returns how many are not in this run's own jobs: the rest are copies of files it sent in an earlier request,
        said as copies, and were said as "not embedded yet: `clapq search` finds them once they are" too, as if
        the command would not wait for them, while it waits for its jobs (helper-110)."""
        for p, (job, item) in pending.items():
            # a copy of a file this run sent in an earlier request is told as a copy (above), and
            # a failure of that file by the path that was sent
            if job is not None and item is not None and job not in jobs:
                earlier[job] = earlier.get(job, 0) + _size(p)
                where.setdefault(item, p.relative_to(folder).as_posix())
                theirs.add(item)
        return sum(job is None or job not in jobs for job, _ in pending.values())

    def stored_before_cut(stored: list[Path], known: Known) -> None:
        """Files of a request whose connection was cut that the API had stored (the library holds them, asked
        after the cut): this run's, counted as uploaded by it. They were said to be "in the library already",
        their job "of an earlier upload", and counted as `skipped`, as if a run before had sent them. Their job
        (where the server names it: they are not embedded yet) is one of this run's jobs, waited for as the
        others, their failures told by these paths."""
        nonlocal sent, cut_sent
        told: list[str] = []
        for p in stored:
            job, item = known.pending.get(p, (None, None))
            item = item or known.held.get(p, (None,))[0]  # embedded already: the item, with no job said
            rel = p.relative_to(folder).as_posix()
            if job is not None and job not in jobs:
                jobs.append(job)
                job_bytes.append(0)
                told.append(job)
            if job is not None:
                job_bytes[jobs.index(job)] += _size(p)
                sent_items.setdefault(job, []).append((item, rel))
            if item in where:  # the same bytes as a file sent before it: one item for both
                copies_of.setdefault(item, []).append(rel)
            elif item is not None:
                where[item] = rel
        sent, cut_sent = sent + len(stored), cut_sent + len(stored)
        print(f"the API stored {n_files(len(stored))} before the connection was cut"
              f"{f' (job {_some(told)})' if len(told) == 1 else f' (jobs {_some(told)})' if told else ''}: not sent "
              "again", file=sys.stderr)
    cut_at = (min(files_open_at_once(), limits.get("max_files_per_batch") or BATCH_FILES),
              min(BATCH_BYTES, limits.get("max_request_bytes") or BATCH_BYTES))

    def to_send() -> Iterator[Path]:
        """The files to send, in order: of a library that may hold some (`check`), those it does not hold,
        asked about a request's worth at a time, and gathered into full requests. Each request's worth asked
        about was sent on its own, however few of its files the library lacked: a folder of 30,000 files with
        160 broken ones spread through it (tried again at each run) made 115 requests and jobs of one or two
        files at every run, with two lines each (helper-65)."""
        nonlocal skipped, unfinished, unasked
        if not check:
            yield from paths
            return
        for group in batches(paths, *cut_at):
            new, pending, digests, held, failed, answered, lost, prior = not_known(client, lib["id"], group,
                                                                                   retry_failed, resend)
            mending.update(lost)
            unasked = unasked or not answered
            skipped += len(group) - len(new) - len(failed)
            unfinished += held_by_jobs(pending)
            failed_before.extend(printable(p.relative_to(folder).as_posix()) for p in failed)
            sending = set(new)
            for p in group:
                rel, digest = p.relative_to(folder).as_posix(), digests[p]
                if digest is not None and p in failed:  # its renames are followed too (_moved), from its first path
                    first.setdefault(digest, rel)
                if digest is None or p in failed:
                    continue
                if p not in sending and digest in first:
                    held_copies.append(f"{printable(rel)} (= {printable(first[digest])})")
                first.setdefault(digest, rel)
            if only is None:  # one file sent on its own is not its folder's layout: its path stays
                on_disk.digests.update((q, d) for q, d in digests.items() if d is not None)
                moved.extend(_moved(folder, held, first, digests, on_disk, elsewhere))
                versions.update(prior)
            not_sent([too_big[p] for p in new if p in too_big])
            yield from (p for p in new if p not in too_big)

    try:
        for batch in batches(to_send(), *cut_at):
            batch, left_out, gone = _present(folder, batch, since)
            not_sent(left_out)
            gone_folders.update(gone)
            if not batch:
                continue
            # said before the request, which on a slow network takes minutes: the command is not stuck
            print(f"uploading {n_files(len(batch))} ({_megabytes(sum(map(_size, batch)))})", file=sys.stderr)
            in_flight = len(batch)
            for cut in range(MAX_CUTS + 1):
                try:
                    answer, batch, left_out, gone = _send(client, lib["id"], folder, batch, since)
                    break
                except Cut as exc:  # an API restarting (`clapq up` starts a crashed one again) closed it
                    if cut == MAX_CUTS:
                        raise
                    # as a run again would: once the API answers, the files it took before the cut are not sent
                    # again (their job is waited for), only the rest
                    print(f"{exc.code}; asking which of them the library holds, to send the rest", file=sys.stderr)
                    known = not_known(client, lib["id"], batch, retry_failed, resend)
                    new, pending, held_here, failed_here, answered = (known.new, known.pending, known.held,
                                                                      known.failed, known.asked)
                    cut_stored += sum(p in held_here or p not in new for p in batch) if answered else 0
                    cut_unasked += 0 if answered else len(batch)
                    mending.update(known.lost)
                    unasked = unasked or not answered
                    # what the library holds of a request it was not asked about before is what the cut one stored
                    if stored := [p for p in batch if p not in new and p not in failed_here]:
                        stored_before_cut(stored, known)
                    # those held that are sent again (`resend`): waited for as an earlier run's, as before
                    unfinished += held_by_jobs({p: v for p, v in pending.items() if p not in stored})
                    failed_before.extend(printable(p.relative_to(folder).as_posix()) for p in failed_here)
                    answer, batch, left_out, gone = None, new, [], Counter()
                    if not batch:
                        break
                    print(f"uploading {n_files(len(batch))} again ({_megabytes(sum(map(_size, batch)))})",
                          file=sys.stderr)
                    in_flight = len(batch)
            in_flight = 0
            not_sent(left_out)
            gone_folders.update(gone)
            if answer is None:
                continue
            nbytes = sum(map(_size, batch))
            jobs.append(answer["job_id"])
            job_bytes.append(nbytes)
            for it, p in zip(answer["items"], batch):
                rel = p.relative_to(folder).as_posix()
                sent_items.setdefault(jobs[-1], []).append((it.get("duplicate_of") or it["id"], rel))
                if "duplicate_of" in it and it["duplicate_of"] not in where and (resend or p in mending):
                    # held already, sent on purpose: its stored copy written anew
                    where[it["duplicate_of"]] = rel
                    (resent if resend else mended).append(printable(rel))
                elif "duplicate_of" in it and it["duplicate_of"] not in where and not unasked:
                    # bytes the library got after this run asked (or after it created the library): another
                    # upload sent them meanwhile, as two runs of one folder at once do. Told as "had the same
                    # bytes as another (= a file in the library)", every file of the folder (helper-91)
                    where[it["duplicate_of"]] = rel
                    by_another.append(printable(rel))
                elif "duplicate_of" in it:  # the same bytes as a file sent before it: one item for both
                    copies_of.setdefault(it["duplicate_of"], []).append(rel)
                else:
                    where[it["id"]] = rel
            sent += len(batch)
            print(f"uploaded {n_files(len(batch))} (job {jobs[-1]})", file=sys.stderr)
    except (SystemExit, KeyboardInterrupt, OSError) as exc:
        tell_lost()
        ctrl_c = isinstance(exc, KeyboardInterrupt)
        if isinstance(exc, OSError):  # a file went away, or stopped being readable, since the listing
            exc = SystemExit(f"clapq: cannot read {exc.filename}: {exc.strerror or exc}")
        refused_key = isinstance(exc, KeyRefused)
        # a 404 of the upload: its library may have been deleted meanwhile
        was_404 = isinstance(exc, SystemExit) and isinstance(exc.code, str) and "failed (404)" in exc.code
        # the API answered a request with a refusal (a full upload area's 507, a proxy's 413): it is over, and
        # took nothing (not a timeout or a cut connection, whose request may still be stored)
        refused = (isinstance(exc, SystemExit) and not refused_key and not was_404 and isinstance(exc.code, str)
                   and re.search(r" failed \([45]\d\d\)", exc.code) is not None)
        if isinstance(exc, SystemExit) and isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)  # why first, then what is in and how to go on
            exc = SystemExit(1)
        # a request cut off after the API stored its files (its answer was on the way) may hold them too
        maybe = (f"; the {n_files(in_flight)} being sent when it stopped may be stored as well" if ctrl_c and in_flight
                 else "")
        if was_404 and _library_gone(client, lib["id"]):
            # deleted while the files were sent: its jobs and items went with it, so nothing is kept to resume
            print(f"clapq: library {lib['name']!r} was deleted while the upload ran; nothing of this run is kept in "
                  "it", file=sys.stderr)
            raise SystemExit(1) from None
        if refused and sent == cut_sent and lib.get("created"):  # no request of it answered
            _remove_if_empty(client, lib, cut_stored, cut_unasked)
        elif sent:  # say what is already in, and that running the command again resumes
            held = ", ".join([f"jobs {_some(jobs)}"] * bool(jobs) + [f"{skipped} were in the library already"]
                             * bool(skipped))
            # with the key refused (revoked meanwhile), the same command is refused again: it needs another key
            again = (f"; they are being embedded, as the tenant's: {_AGAIN_WITH_A_KEY} for the rest"
                     if refused_key else "; run the same command again for the rest")
            print(f"clapq: {'interrupted; ' if ctrl_c else ''}{sent} of {found} files were uploaded"
                  f"{f' ({held})' if held else ''}{maybe}{again}: files the library holds already are not sent again",
                  file=sys.stderr)
        elif ctrl_c and in_flight:
            print(f"clapq: interrupted while sending {n_files(in_flight)}, which may be stored already; run the same "
                  "command again: files the library holds are not sent again", file=sys.stderr)
        elif ctrl_c:
            print("clapq: interrupted; nothing was uploaded", file=sys.stderr)
        if ctrl_c:
            raise SystemExit(130) from None
        raise exc from None
    tell_lost()
    # an earlier run's jobs still embedding files of this folder (a wait stopped with Ctrl-C, an upload cut
    # short): waited for as well, so that running the command again shows them to the end
    resumed = [j for j in earlier if j not in jobs] if wait else []
    if resumed and not jobs:  # before "waiting for it too"
        _not_for_another_model(lib, limits, unfinished)
    if skipped:
        if not unfinished:
            still = ""
        elif resumed:
            still = (f" ({unfinished} of them still being embedded, in {'job' if len(resumed) == 1 else 'jobs'} "
                     f"{_some(resumed)} of an earlier upload: waiting for {'it' if len(resumed) == 1 else 'them'}"
                     " too)")
        else:
            still = f" ({unfinished} of them not embedded yet: `clapq search` finds them once they are)"
        held = ("the file is" if found == 1 else f"all {found} files are" if skipped == found
                else f"{skipped} of {found} files {'is' if skipped == 1 else 'are'}")
        print(f"{held} in the library already{still}: not sent again", file=sys.stderr)
    served, bound = limits.get("model") or {}, lib.get("model") or {}  # (`theirs` is the earlier jobs' items)
    if not jobs and served.get("id") is not None and bound.get("id") not in (None, served["id"]):
        # nothing to send into a library of another model than the service runs: it ended well and said nothing,
        # and the search that follows answered 409 (helper-108)
        print(f"library {lib['name']!r} is bound to model {bound['id']} ({bound.get('name')}), not the one this "
              f"service runs (model {served['id']}, {served.get('name')}): it is searched only where its model runs "
              "(CLAPQ_MODEL), and here a search of it is refused (409)", file=sys.stderr)
    if failed_before:  # not told as new failures, nor failing the command: each was told when it failed
        n = len(failed_before)
        print(f"{n_files(n)} failed before and {'was' if n == 1 else 'were'} not sent again (`clapq upload "
              f"--retry-failed` sends {'it' if n == 1 else 'them'}, or `clapq jobs retry`): {_some(failed_before)}",
              file=sys.stderr)
    if moved_from is not None:
        elsewhere -= _taken_over(client, lib, folder, moved_from, first, on_disk, {m[0] for m in moved})
    if elsewhere:  # a moved or renamed folder, or a copy of one (helper-44: nothing was said)
        print(f"{n_files(len(elsewhere))} at the same {'path' if len(elsewhere) == 1 else 'paths'} here "
              f"{'was' if len(elsewhere) == 1 else 'were'} sent from another folder (this one before it was moved "
              "or renamed, or a copy of it): their renames here are not followed (`--moved-from OLD` makes the "
              "files sent from OLD this folder's)", file=sys.stderr)
    renamed, adopted = _update_paths(client, lib["id"], folder, moved)
    if adopted:
        print(f"{n_files(adopted)} sent by an earlier version: recorded this folder with "
              f"{'it' if adopted == 1 else 'them'} (once), so that later renames are told", file=sys.stderr)
    if renamed:
        print(f"{n_files(len(renamed))} renamed or moved since {'it was' if len(renamed) == 1 else 'they were'} "
              f"sent: {'its path' if len(renamed) == 1 else 'their paths'} in the library updated: {_some(renamed)}",
              file=sys.stderr)
    changed = _changed_in_place(folder, versions, on_disk)
    if changed:
        n = len(changed)
        command = (f"clapq delete --gone-from {printable(shlex.quote(str(folder)))} --library "
                   f"{printable(shlex.quote(lib['name']))}")
        print(f"{n_files(n)} changed in place since {'it was' if n == 1 else 'they were'} sent (other bytes at the "
              f"same path: re-exported, replaced or fixed): the library still holds {'its' if n == 1 else 'their'} "
              f"earlier {'version' if n == 1 else 'versions'}, which searches find under "
              f"{'that path' if n == 1 else 'those paths'} too, until `{command}` deletes "
              f"{'it' if n == 1 else 'them'}: {_some(changed)}", file=sys.stderr)
    if resent:
        n = len(resent)
        print(f"{n_files(n)} the library held already {'was' if n == 1 else 'were'} sent again (--resend): "
              f"{'its stored copy' if n == 1 else 'their stored copies'} written anew: {_some(resent)}", file=sys.stderr)
    if mended:
        n = len(mended)
        print(f"{n_files(n)} the library held {'was' if n == 1 else 'were'} sent again, as the server had lost "
              f"{'its stored copy' if n == 1 else 'their stored copies'} (gone from its disk; `clapq check` lists "
              f"such files): written anew, {'its item' if n == 1 else 'their items'} kept: {_some(mended)}",
              file=sys.stderr)
    if by_another:
        n = len(by_another)
        print(f"{n_files(n)} {'was' if n == 1 else 'were'} sent by another upload into this library while this one "
              f"ran (their bytes came from it first), and {'is' if n == 1 else 'are'} stored once: "
              f"{_some(by_another)}", file=sys.stderr)
    said = [f"{printable(rel)} (= {printable(where.get(item, 'a file in the library'))})"
            for item, rels in copies_of.items() for rel in rels] + held_copies
    copies = len(said)
    if copies:
        print(f"{n_files(copies)} had the same bytes as another and {'is' if copies == 1 else 'are'} "
              f"stored once: {_some(said)}", file=sys.stderr)
    waited = jobs + resumed
    try:
        failed, cancelled, deleted, in_part = (
            _wait(client, waited, job_bytes + [earlier[j] for j in resumed], where, copies_of,
                  only={j: theirs for j in resumed}, sent=sent_items) if wait and waited else (0, 0, 0, 0))
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # after the progress line
        print(f"clapq: stopped waiting; the uploaded files are still being embedded (jobs {_some(waited)}: "
              "run the same command again to wait for them, or `clapq jobs wait JOB`)", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyRefused as exc:
        # the key revoked while the command waited: the 401's sentence alone left it unsaid whether the files
        # sent were lost; they are the tenant's, embedded whatever became of the key
        if sys.stderr.isatty():
            print(file=sys.stderr)
        print(exc.code, file=sys.stderr)
        print(f"clapq: stopped waiting; the uploaded files are the tenant's and still being embedded (jobs "
              f"{_some(waited)}): `clapq jobs wait JOB` {_ANOTHER_KEY} follows them", file=sys.stderr)
        raise SystemExit(1) from None
    unsent = len(refused) + sum(gone_folders.values())
    if unsent:
        print(f"{n_files(unsent)} not sent (listed above as 'not sent')", file=sys.stderr)
    if listing.closed:  # the audio in them was never looked for: the command did not do all it was asked (helper-42)
        print(f"{len(listing.closed)} {'folder or file' if len(listing.closed) == 1 else 'folders or files'} "
              "could not be read (listed above): any audio in them was not sent", file=sys.stderr)
    print(json.dumps({"library_id": lib["id"], "jobs": jobs, "earlier_jobs": resumed, "files": found, "skipped": skipped,
                      "not_sent": unsent, "unreadable": len(listing.closed), "duplicates": copies,
                      "by_another": len(by_another), "resent": len(resent), "mended": len(mended),
                      "renamed": len(renamed), "changed": len(changed), "failed": failed,
                      "failed_before": len(failed_before), "cancelled": cancelled, "deleted": deleted,
                      "in_part": in_part}))
    return 1 if failed or unsent or cancelled or listing.closed else 0


def _changed_in_place(folder: Path, versions: dict[Path, tuple[str, dict]], where: Where) -> list[str]:
    """The paths of the files changed in place whose earlier version, sent from that very path of this folder, the
    library still holds (`versions`: Known.earlier of each file, `where`: the folder's digests): other bytes at a
    path are sent as a new file, and the earlier version's item stayed, found by searches beside the new one under
    one path, with nothing said; `clapq delete --gone-from` is what deletes it (helper-120). Those earlier bytes
    still in the folder are not: their item went with them (renamed or moved). Known only where a run before kept
    the file's digest (clapq.digests)."""
    root, here = folder_id(folder), set(where.digests.values())
    return sorted(printable(sent["path"]) for p, (old, sent) in versions.items()
                  if old not in here and sent.get("folder") == root
                  and sent.get("path") == stored_path(p.relative_to(folder).as_posix()))


def _taken_over(client: Client, lib: dict, folder: Path, moved_from: Path, first: dict[str, str], where: Where,
                taken: set[str]) -> set[str]:
    """`clapq upload FOLDER --moved-from OLD`: every file of the library sent from OLD (metadata.folder) becomes
    this folder's, at its path where that holds its bytes here, else at the first path of its bytes here, or at
    its path as it was where they are not here (so that `clapq delete --gone-from FOLDER` finds it gone). A folder moved or renamed was another folder for
    good: its renames were not followed, and --gone-from of its new path found none of its files, or (once one
    new file was sent from it) "nothing to delete" while its deleted files stayed in the library (helper-77).
    Only on request, as OLD may be a copy still used (helper-43). Says how many; returns their items."""
    old_root, root = folder_id(moved_from), folder_id(folder)
    if old_root == root:
        return set()
    moves = []
    for item in _items(client, f"/v1/libraries/{lib['id']}/items"):
        meta = item.get("metadata") or {}
        path = meta.get("path")
        if meta.get("folder") == old_root and isinstance(path, str) and item["id"] not in taken:
            rel = None if where.has(path, item.get("sha256")) else first.get(item.get("sha256"))
            moves.append((item["id"], path, stored_path(rel) if rel is not None else path, old_root))
    if not moves:
        print(f"no file of library {lib['name']!r} was sent from {moved_from} (--moved-from takes the folder "
              "`clapq upload` was given, as it was named then)", file=sys.stderr)
        return set()
    renamed, kept = _update_paths(client, lib["id"], folder, moves)
    # each move is made only where the item is as it was seen: another `--moved-from` of this folder at the same
    # moment made them first, and this run said "0 files sent from OLD taken as this folder's" (helper-91)
    ids, before = {m[0] for m in moves}, 0
    try:
        before = len(moves) - len(renamed) - kept and sum(
            (item.get("metadata") or {}).get("folder") == root
            for item in _items(client, f"/v1/libraries/{lib['id']}/items") if item["id"] in ids)
    except SystemExit:  # as the moves' failure, said by _update_paths: the upload goes on, its files are in
        pass
    if renamed or kept or not before:
        print(f"{n_files(len(renamed) + kept)} sent from {moved_from} taken as this folder's"
              + (f" ({len(renamed)} at another path here)" if renamed else ""), file=sys.stderr)
    if before:
        print(f"{n_files(before)} sent from {moved_from} {'was' if before == 1 else 'were'} made this folder's "
              "meanwhile, by another `clapq upload --moved-from` at the same time", file=sys.stderr)
    return ids


def _remove_if_empty(client: Client, lib: dict, stored: int = 0, unasked: int = 0) -> None:
    """Delete the library this upload created, once its first request was refused, where it is still empty: it
    was left behind, listed by `clapq libraries` with 0 files (helper-135). One that holds files is kept: another
    upload into the name (run in another terminal) found it and sent its files meanwhile. The API tells that under
    the library's lock (`?if_empty=1`: a 409 where it holds any), so such an upload's files are never deleted with
    it. Asked once, with no waiting through an outage. `stored`: files of this upload the library was found to hold
    after the connection of their request was cut before its answer came (the API had stored them); `unasked`: such
    files it could not be asked about (a server before /known). Those were said to be another upload's, "another
    upload put files into it", where they were this one's (helper-141): one that holds them is kept, unasked."""
    name, where = lib["name"], f"/v1/libraries/{urllib.parse.quote(lib['id'], safe='')}"
    again = "; run the same command again for the rest: files the library holds already are not sent again"
    if stored:
        print(f"clapq: kept library {name!r}, which this upload created: it holds {n_files(stored)} of this upload, "
              f"which the API stored from a request whose connection was cut before its answer came{again}",
              file=sys.stderr)
        return
    # sent, and not known to be stored or not: they may be what the library holds
    theirs = (f"{n_files(unasked)} this upload sent in a request whose connection was cut before its answer came, "
              "which the API may have stored (this server does not say which files a library holds)")
    try:
        if client._call("DELETE", where + "?if_empty=1", missing_ok=True) is None:
            return  # gone already: deleted meanwhile (`clapq delete`, another terminal), which said so there
    except (SystemExit, Busy) as exc:
        if isinstance(exc.code, str) and " failed (409): " in exc.code:
            print(f"clapq: kept library {name!r}, which this upload created: "
                  + (f"it holds files: the {theirs}, or another upload's{again}" if unasked else
                     "another upload put files into it meanwhile"), file=sys.stderr)
        else:  # unasked whether it holds any: another upload's files, which `clapq delete` would delete too
            print(f"clapq: library {name!r}, which this upload created, was not removed ({exc.code}): "
                  + (f"it may hold the {theirs}, and another upload into the name may have put files into it"
                     f"{again}" if unasked else
                     "nothing of this upload is in it, but another upload into the name may be: where `clapq "
                     "libraries` lists it with 0 files, `clapq delete --library "
                     f"{shlex.quote(name)} --yes` removes it"),
                  file=sys.stderr)
        return
    print(f"clapq: removed library {name!r}, which this upload created: nothing was uploaded into it", file=sys.stderr)


def _library_gone(client: Client, lib_id: str) -> bool:
    """Whether the library is gone, asked once (no waiting through an outage): an upload that was refused
    404 may have lost it. Any other answer, or none, is not taken as gone."""
    try:
        return client._call("GET", f"/v1/libraries/{urllib.parse.quote(lib_id, safe='')}", missing_ok=True) is None
    except (SystemExit, Busy):
        return False


MOVES_PER_REQUEST = 1000


def _update_paths(client: Client, lib_id: str, folder: Path, moved: list[tuple]) -> tuple[list[str], int]:
    """Give each moved file's item its new path and this folder (`_moved`), keeping the rest of its metadata;
    an item deleted, or given another path or folder, since it was looked at is left as it is. Through
    /moves, a thousand a request, each applied only where the item still has the path and folder seen;
    a server without /moves gets a GET and a PATCH a file (If-Match: an edit made in between is not
    overwritten). Returns "old -> new" for each renamed, and how many only took the folder; a failure here
    is said and the upload goes on (its files are in)."""
    root, changed, too_large = folder_id(folder), set(), set()
    try:
        for part in (moved[i : i + MOVES_PER_REQUEST] for i in range(0, len(moved), MOVES_PER_REQUEST)):
            body = {"moves": [{"item_id": item, "from": {"path": old, "folder": was},
                               "to": {"path": new, "folder": root}} for item, old, new, was in part]}
            answer = client.call("POST", f"/v1/libraries/{urllib.parse.quote(lib_id, safe='')}/moves", json=body,
                                 missing_ok=True, allow_redirects=False, repeatable=True)
            if answer is None:  # an older server (or the library deleted meanwhile: each item is then gone too)
                changed.update(_patch_paths(client, root, part))
            else:
                changed.update(answer.get("moved", ()))
                too_large.update(answer.get("too_large", ()))
    except SystemExit as exc:
        print(f"{exc.code}; the paths of files renamed since they were sent are left as they were", file=sys.stderr)
    if too_large:
        print(f"{n_files(len(too_large))} renamed or moved since sent kept {'its' if len(too_large) == 1 else 'their'} "
              f"old path: with the new one, the metadata would be over the API's limit: "
              f"{_some([printable(new) for item, _, new, _ in moved if item in too_large])}", file=sys.stderr)
    renamed = [f"{printable(old)} -> {printable(new)}" for item, old, new, _ in moved if item in changed and new != old]
    return renamed, sum(item in changed and new == old for item, old, new, _ in moved)


def _patch_paths(client: Client, root: str, moved: list[tuple]) -> set[str]:
    """`_update_paths` on a server without /moves: the ids changed."""
    changed = set()
    for item, old, new, was in moved:
        for _ in range(5):
            got, tag = client.item(item)
            meta = got.get("metadata") if isinstance(got, dict) else None
            if not isinstance(meta, dict) or meta.get("path") != old or (
                    meta.get("folder") if isinstance(meta.get("folder"), str) else None) != was:  # as /moves
                break
            try:
                patched = client.call("PATCH", f"/v1/items/{urllib.parse.quote(item, safe='')}",
                                      json={"metadata": {**meta, "path": new, "folder": root}},
                                      headers={"If-Match": tag} if tag else {}, missing_ok=True)
            except Stale:
                continue
            if patched is not None:
                changed.add(item)
            break
    return changed


# what a command whose key was refused midway (revoked) advises: the same command with the key it had is refused
_ANOTHER_KEY = ("with another key of the tenant (--key or CLAPQ_API_KEY; `clapq keys create --tenant NAME` makes "
                "one)")
_AGAIN_WITH_A_KEY = f"run the same command again {_ANOTHER_KEY}"


def watch_jobs(client: Client, jobs: list[str], progress: Callable[[int, int, float], None] | None = None,
               poll_s: float = 1.0, weights: list[float] | None = None,
               why: Callable[[str | None], None] | None = None) -> list[dict]:
    """Wait until every job has ended and return their final states, in order. Each job is asked about
    once, then once a `poll_s` the oldest that has not ended, and one behind it, in turn (when one has ended
    the next is asked at once): a folder of 100 jobs costs the API two requests a second while it waits, not
    100, the counts move as the workers go through the jobs in order, and every job's counts move, whichever
    ends first. While nothing moves (files behind another tenant's backlog, a long recording's), it asks as
    seldom as a fifth of the time since something did (up to MAX_POLL_S), and never past WAIT_SHARE of the
    key's rate limit (`Client.pace`): a wait at a limit of 60 a minute met 429s within 30 s (helper-131).
    `progress(processed, total, share)` after each look: files processed, of all, and the share of the work
    done: the jobs' own `progress` (by bytes, which moves while a long file is embedded), each weighed by
    `weights` (the bytes sent; else its files). `why(reason)` before each `progress`: why the files still to
    embed cannot move (a job's `waiting`: no live worker, none of the library's model, Redis away), or None
    while they can. The oldest is the one made first (its `created_at`), whatever its place in `jobs`: a run
    again lists its own jobs before the earlier run's it waits for too, which the workers end first."""
    def look(job: str) -> dict:
        client.pace("asking about the jobs")
        state = client.call("GET", f"/v1/jobs/{job}", missing_ok=True)
        if state is None:  # deleted with its library while we waited
            raise SystemExit(f"clapq: job {job} is gone: its library was deleted while the upload waited for it; "
                             "nothing more to wait for")
        return state

    states = [look(j) for j in jobs]
    # in the order the jobs were made (where the server says; else as listed): asked in the list's order, a run
    # again's own first job, queued behind the earlier run's, was asked about at each poll and those being
    # embedded one a poll in turn: "3184/15008 files processed (20%)" for minutes while thousands were (helper-138)
    order = sorted(range(len(jobs)), key=lambda i: (states[i].get("created_at") or "", i))
    place = {i: n for n, i in enumerate(order)}
    after, rechecked = 0, set()
    moved = time.monotonic()  # when a look last found a job other than it was
    while True:
        if why is not None:  # the first unfinished job's (a server of an earlier version does not say)
            why(next((states[i].get("waiting") for i in order if states[i]["status"] in ("queued", "running")),
                     None))
        if progress is not None:
            w = weights or [s["counts"]["total"] for s in states]
            progress(sum(s["counts"]["done"] + s["counts"]["failed"] for s in states),
                     sum(s["counts"]["total"] for s in states),
                     # only empty files sent (0 bytes to weigh by): the jobs' own shares, each alike
                     sum(s["progress"] * wi for s, wi in zip(states, w)) / sum(w) if sum(w)
                     else sum(s["progress"] for s in states) / len(states))
        waiting = [i for i in order if states[i]["status"] in ("queued", "running")]
        if not waiting:
            # a job cancelled while others ran may have been retried since (from the API or another
            # terminal), and embedded: asked again once, so that it is not told as cancelled, nor the
            # command failed, for files that are in (helper-36)
            again = [i for i, s in enumerate(states) if s["status"] == "cancelled" and i not in rechecked]
            for i in again:
                states[i] = look(jobs[i])
            rechecked.update(again)
            if not any(states[i]["status"] in ("queued", "running") for i in again):
                return states
            continue
        before = [_moving(s) for s in states]
        time.sleep(min(MAX_POLL_S, max(poll_s, (time.monotonic() - moved) / 5)))
        # the oldest job that has not ended, and the next ones at once while they have: workers take the
        # files in the order they were sent, so that is where the counts move (asked only in turn, each of a
        # folder's 200 jobs was looked at every 200 s: "20%" shown for two minutes while half was done,
        # helper-65)
        for front in waiting:
            states[front] = look(jobs[front])
            if states[front]["status"] in ("queued", "running"):
                break
        # then one of those behind it, in turn from the one after the last asked so: a job of long files that
        # ends last does not keep the counts of the jobs behind it at their first look (114 of 612 shown while
        # 598 were done)
        behind = [i for i in waiting if place[i] > place[front]]
        for i in [i for i in behind if place[i] >= after] + [i for i in behind if place[i] < after]:
            states[i] = look(jobs[i])
            after = place[i] + 1
            if states[i]["status"] in ("queued", "running"):
                break
        if [_moving(s) for s in states] != before:
            moved = time.monotonic()


def _moving(state: dict) -> tuple:
    """What of a job's state tells it moved: not its ETA, nor the seconds a reason to wait counts."""
    return state["status"], state["counts"], state["progress"], _gist(state.get("waiting"))


def _not_for_another_model(lib: dict, limits: dict, unfinished: int) -> None:
    """An upload that only waits for files already in a library bound to another model than the service runs
    (CLAPQ_MODEL changed while they were queued): they wait for a worker of their model, which a service of
    another runs not, and the command waited with no progress for ever (helper-63); it stops as an upload
    into such a library does (409 model_mismatch). A server that does not say its model (older): it waits."""
    ours, theirs = limits.get("model") or {}, lib.get("model") or {}
    if ours.get("id") is None or theirs.get("id") in (None, ours["id"]):
        return
    raise SystemExit(f"clapq: library {lib['name']!r} is bound to model {theirs['id']} ({theirs.get('name')}), and "
                     f"this service runs model {ours['id']} ({ours.get('name')}): its {n_files(unfinished)} not "
                     "embedded yet wait for a worker of the library's model, and it takes no new files; run the "
                     "library's model (CLAPQ_MODEL) to finish them, or embed its files with this one into a new "
                     f"library: `clapq reembed --library {shlex.quote(lib['name'])} --into NEW`")


def time_left(elapsed_s: float, gained: float, left: float, still_s: float = 0.0) -> str:
    """", about 4 min left" at the pace so far (`gained` of the share in `elapsed_s`), once there is a pace to
    go by (10 s of it, and some share gained); "" before that, and at the end. Once nothing has moved for
    `still_s` (a minute or more) longer than that pace gives for the rest, the pace says nothing (it read
    "about 0 s left" for minutes while the last files waited for a worker): how long nothing has moved; so
    too where nothing has moved at all (it said nothing for minutes behind a hung worker, helper-54)."""
    if left > 0 and gained <= 0 and still_s >= 60:
        return f", no progress for {_span(still_s)}"
    if elapsed_s < 10 or gained <= 0 or left <= 0:
        return ""
    s = elapsed_s * left / gained
    if still_s >= 60 and still_s > s:
        return f", no progress for {_span(still_s)}"
    return f", about {_span(s)} left"


def _span(s: float) -> str:
    """A stretch of time as the progress line says it: 45 s, 3 min, 1 h 30 min."""
    return (f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 90 * 60
            else f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min")


def json_line(obj) -> str:
    """What --json prints: UTF-8 text where stdout's encoding takes it, else with JSON's own escapes (\\ud83c\\udf27),
    which every JSON reader reads back. Where the terminal's encoding could not show a name (LANG=C,
    PYTHONIOENCODING=ascii), the escaping of clapq.cli.main wrote Python's \\U0001f327 into it, which no JSON reader
    takes (json.loads: "Invalid \\escape")."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):  # a name not UTF-8 (a surrogate) too
        return json.dumps(obj)
    return text


def printable(name: str) -> str:
    """A path as one line of output: characters that would break or colour the line (a newline or a tab in a
    file name, an escape sequence) as Python writes them in a string, `\\n`. Joiners stay as they are: the
    zero-width joiner of an emoji family or the non-joiner of Persian are part of the name (helper-42)."""
    return name if name.isprintable() else "".join(c if c.isprintable() or c in JOINERS else _escaped(c) for c in name)


def _escaped(c: str) -> str:
    """A character as Python writes it in a string; a byte of a name that is not UTF-8 (Python's surrogate
    escape for it) as that byte, `\\xea`, where it was `\\udcea` (helper-42)."""
    return f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else repr(c)[1:-1]


JOINERS = "\u200c\u200d"  # zero-width non-joiner and joiner


def shown_name(entry: dict) -> str:
    """How a file is named to the user: its path in the folder `clapq upload` sent it from (kept in its
    metadata), where two files of one base name in different folders would otherwise look the same."""
    return printable(_path_of(entry))


def _path_of(entry: dict) -> str:
    """An item's path in the folder it was sent from (its metadata.path), else its filename."""
    path = (entry.get("metadata") or {}).get("path")
    return path if isinstance(path, str) and path else entry["filename"]


def _failures(client: Client, job: str, state: dict, listed: bool = False) -> Iterator[dict]:
    """A job's failed files, with why (`item_id`, `filename`, `error`): its `errors`, which hold the first 100,
    or where it failed more, or where `listed`, all of them from its listing of failed items, page by page, each
    named by its path in the folder it was sent from (the listing has its metadata; `errors` do not)."""
    if not listed and len(state["errors"]) >= state["counts"]["failed"]:  # copies of one file count once in `errors`
        yield from state["errors"]
        return
    for i in _job_items(client, job, "failed"):
        yield {"item_id": i["id"], "filename": _path_of(i), "error": i["error"]}


def failed_line(name: str, item_id: str, error: str | None, also: list[str] = ()) -> str:
    """A failed file as `clapq upload` and `clapq jobs` list it: its name, its item id (what `clapq delete` takes;
    without it, a failed file could be deleted only after looking its id up over HTTP) and why; `also`: the
    paths of copies of its bytes sent beside it."""
    same = f" (and {n_files(len(also))} with the same bytes: {_some([printable(a) for a in also])})" if also else ""
    return f"failed: {printable(name)} (item {item_id}): {printable(error or 'no reason recorded')}{same}"


def in_part_line(name: str, item_id: str, warning: str) -> str:
    """A file embedded as far as it could be read (cut short), as `clapq upload` and `clapq jobs` list it."""
    return f"in part: {printable(name)} (item {item_id}): {printable(warning)}"


def _warned_paths(client: Client, job: str, state: dict, where: dict[str, str], listed: bool) -> dict[str, str]:
    """The paths of the files a job's `warnings` name (embedded in part), by item id, as its failed files are named:
    by `where` (item id -> path), or where `listed`, by the path each item keeps; a job's warnings give its base name
    only, which `clapq jobs show` and `clapq jobs wait` printed ("in part: 01.flac" of which album, helper-134).
    Those items are read from the job's listing of done items, to the last of them, where that takes fewer requests
    than a GET an item (of up to 100: a job's `warnings` hold its first 100), else one by one; each request kept to
    `Client.pace`: a GET an item, unpaced, went over a key's CLAPQ_RATE_LIMIT of 20 a minute with 12 such files, and
    `clapq jobs show` waited out the 429 for most of a minute (helper-141). A file not found is named by its base
    name, as the warning gives it."""
    warned = [w["item_id"] for w in state.get("warnings") or ()]
    paths = {i: where[i] for i in warned if i in where}
    missing = [i for i in warned if i not in paths]
    if not listed or not missing:
        return paths
    doing = "looking up the paths of the files embedded in part"
    if not client.rates:
        client.limits()
    if -(-state["counts"].get("done", 0) // LISTED_PER_PAGE) < len(missing):
        wanted = set(missing)
        for item in _job_items(client, job, "done", pace=doing):
            if item["id"] in wanted:
                paths[item["id"]] = _path_of(item)
                wanted.discard(item["id"])
                if not wanted:
                    break
    for i in (i for i in missing if i not in paths):  # one not in that listing (retried since, or deleted)
        client.pace(doing)
        item, _ = client.item(i)
        if item:
            paths[i] = _path_of(item)
    return paths


def progress_line(done: int, total: int, share: float, left: str = "") -> str:
    """Files processed and the share of the bytes embedded, as `clapq upload` and `clapq jobs` say them; `left`:
    ", about 4 min left" or ", no progress for 3 min" (`time_left`)."""
    return f"{done}/{total} files processed ({int(share * 100 + 1e-6)}%{left})"  # 0.29 is 29, 0.9999 still 99


LISTED_PER_PAGE = 500  # the most items a listing gives a request (api.pages)


def _job_items(client: Client, job: str, status: str, page_size: int = LISTED_PER_PAGE,
               pace: str | None = None) -> Iterator[dict]:
    """A job's items in this state, page by page."""
    return _items(client, f"/v1/jobs/{urllib.parse.quote(job, safe='')}/items", page_size, pace, status=status)


def _items(client: Client, path: str, page_size: int = LISTED_PER_PAGE, pace: str | None = None,
           **params) -> Iterator[dict]:
    """A listing of items (a job's, a library's), page by page (`page_size` items a request, at most 500); `pace`:
    each request kept to `Client.pace`, as what it holds back."""
    cursor = None
    while True:
        if pace is not None:
            client.pace(pace)
        page = client.call("GET", path, params={**params, "limit": page_size, **({"cursor": cursor} if cursor else {})})
        yield from page["items"]
        if not (cursor := page.get("next_cursor")):
            return


LOG_EVERY_S = 30.0  # the most often `clapq upload` writes a line of progress to a log (not a terminal)


def _gist(why: str | None) -> str | None:
    """A job's reason to wait without its figures: "not heard from for 45 s ... in about 75 s" counts its seconds,
    and is the same reason a second later (helper-117: written again at every poll, a line a second)."""
    return why and re.sub(r"\d[\d,.]*", "#", why)


def _wait(client: Client, jobs: list[str], job_bytes: list[int], where: dict[str, str],
          copies_of: dict[str, list[str]], only: dict[str, set] | None = None, listed: bool = False,
          again: str = "run this upload again to send them",
          sent: dict[str, list[tuple[str, str]]] | None = None) -> tuple[int, int, int]:
    """Wait for the jobs (`job_bytes`: what each was sent), showing progress; list the files that failed
    (by their path in the folder, `where`: item id -> path, with the copies of its bytes sent beside it,
    `copies_of`: item id -> paths; of a job in `only`, just the items it names; `listed`: each by the path its
    item keeps, read from the job's listing of failed items), and say which jobs were cancelled meanwhile
    (from elsewhere: the API or another terminal), with `again` (what sends their files again; `{job}`: the
    job's id); and which files of a job in `sent` (job -> (item, path) of each file the job was sent) were
    deleted while it waited (from the API or another terminal): they ended in no state, and were said in none
    (helper-110), and which files were embedded only in part (cut short: the job's `warnings`, its first 100).
    Returns the numbers of files failed, copies included, cancelled, deleted and embedded in part."""
    only = only or {}
    # on a terminal one line that updates in place; in a log, a line each time the tenth of the work done
    # moves (a long file moves the share long before the count), or the count, at most once a LOG_EVERY_S:
    # at each move of the count, a folder of thousands of files wrote a line a second for as long as it
    # was embedded (helper-65)
    # the last line written: (count, tenth), when; and a line not written since, written at the end
    tty, shown, first, unsaid = sys.stderr.isatty(), [None, 0.0], [], [None]
    moved = [time.monotonic(), None]  # when the share last changed, and to what
    # why nothing can move, as the server says (a job's `waiting`): said instead of a pace, which told "about
    # 5 min left" while no worker could embed the files (helper-69)
    # and, on a terminal, the reason last written on a line of its own, and when: one whose figures alone changed
    # (the seconds a dead worker's files have not been heard from) is written again at most once a LOG_EVERY_S
    waiting, said = [None], [None, 0.0]

    def progress(done: int, total: int, share: float) -> None:
        now = time.monotonic()
        # the pace is measured from the first look, or from the last while the files waited (behind another job's
        # long recording, for a worker): files that took a second after 2 minutes behind one were "about 7 min left"
        if not first or waiting[0]:
            first[:] = [now, share]
        if share != moved[1]:
            moved[:] = [now, share]
        left = time_left(now - first[0], share - first[1], 1.0 - share, now - moved[0])
        if waiting[0] and not left.startswith(", no progress"):
            left = ""
        line = progress_line(done, total, share, left)
        if tty:
            # the reason on a line of its own, once: longer than the terminal is wide, the line updated in place
            # wraps, and each update would leave a line behind. Once also where it comes and goes (a job behind
            # another tenant's between its own tasks): it was written again at each return (helper-70)
            if waiting[0] and waiting[0] != said[0] and (_gist(waiting[0]) != _gist(said[0])
                                                         or now - said[1] >= LOG_EVERY_S):
                print(f"\r\x1b[Kwaiting: {waiting[0]}", file=sys.stderr)
                said[:] = [waiting[0], now]
            line += "; waiting (see above)" if waiting[0] else ""
            print(f"\r{line}\x1b[K", end="", file=sys.stderr)  # the rest of a longer line before it cleared
            return
        if waiting[0]:
            line += f"; waiting: {waiting[0]}"
        if shown[0] is None or (done, int(share * 10), waiting[0]) != shown[0] and (
                int(share * 10) != shown[0][1] or _gist(waiting[0]) != _gist(shown[0][2])
                or now - shown[1] >= LOG_EVERY_S):
            print(line, file=sys.stderr)
            shown[:], unsaid[0] = [(done, int(share * 10), waiting[0]), now], None
        elif (done, int(share * 10), waiting[0]) != shown[0]:
            unsaid[0] = line

    states = watch_jobs(client, jobs, progress, weights=job_bytes, why=lambda w: waiting.__setitem__(0, w and printable(w)))
    if tty or unsaid[0]:
        print(unsaid[0] or "", file=sys.stderr)
    failed, named = 0, set()
    for job, s in zip(jobs, states):
        for e in _failures(client, job, s, listed):
            if e["item_id"] in named:  # a copy sent in a later request: its job reports the same item
                continue
            if job in only and e["item_id"] not in only[job]:  # an earlier job's file of another folder
                continue
            named.add(e["item_id"])
            also = copies_of.get(e["item_id"], [])
            name = where.get(e["item_id"])
            if name is None and also:  # an item another upload made (of this folder, at the same moment), of
                name, also = also[0], also[1:]  # which this run sent copies: named by the first of them
            print(failed_line(name or e["filename"], e["item_id"], e["error"], also), file=sys.stderr)
            failed += 1 + len(also)
    in_part = 0
    for job, s in zip(jobs, states):
        if job in only:
            s = {**s, "warnings": [w for w in s.get("warnings") or () if w["item_id"] in only[job]]}
        paths = _warned_paths(client, job, s, where, listed)
        for w in s.get("warnings") or ():  # a server before warnings gives none
            print(in_part_line(paths.get(w["item_id"], w["filename"]), w["item_id"], w["warning"]), file=sys.stderr)
            in_part += 1
    cancelled = 0
    for job, s in zip(jobs, states):
        n = s["counts"].get("cancelled", 0)
        if n and job in only:  # an earlier job: only this folder's files of it
            n = sum(i["id"] in only[job] for i in _job_items(client, job, "cancelled"))
        if n:
            cancelled += n
            print(f"cancelled: {n_files(n)} of job {job} not embedded (the job was "
                  f"cancelled); {again.format(job=job)}", file=sys.stderr)
    deleted = 0
    for job, s in zip(jobs, states):
        if gone := _deleted_meanwhile(client, job, s, (sent or {}).get(job, [])):
            deleted += len(gone)
            print(f"deleted: {n_files(len(gone))} of job {job} deleted from the library while the upload waited (from "
                  f"the API or another terminal): {_some([printable(g) for g in gone])}; a run of this upload again "
                  f"sends {'it' if len(gone) == 1 else 'them'} again", file=sys.stderr)
    return failed, cancelled, deleted, in_part


def _deleted_meanwhile(client: Client, job: str, state: dict, sent: list[tuple[str, str]]) -> list[str]:
    """The paths of the files `sent` to the job (item, path each) whose items were deleted since: the job counts
    fewer files than it was sent. Its listing holds the items it still counts; one that is not there may also have
    moved to another job (a retry elsewhere of a failed file), and is deleted only where it is gone."""
    if not sent or state["counts"]["total"] >= len(sent):
        return []
    kept = {i["id"] for i in _items(client, f"/v1/jobs/{urllib.parse.quote(job, safe='')}/items")}
    gone = {item for item in {item for item, _ in sent} - kept if client.item(item)[0] is None}
    return [rel for item, rel in sent if item in gone]


def list_libraries(client: Client, as_json: bool = False) -> None:
    """`clapq libraries`: the caller's libraries, one a line (files, id, name), oldest first; `as_json`: the API's
    answer. A new user found the names of their libraries only in the error of a wrong `--library` (helper-71)."""
    libs = client.call("GET", "/v1/libraries")["libraries"]
    if as_json:
        print(json_line(libs))
        return
    if not libs:
        print("no libraries yet: `clapq upload FOLDER --library NAME` makes one", file=sys.stderr)
        return
    # a library bound to another model than the service runs (the service restarted on another CLAPQ_MODEL) is
    # marked: its searches and uploads answer 409, which a user otherwise learnt only by trying (helper-85)
    serving = (client.call("GET", "/v1/limits").get("model") or {}).get("id")
    for lib in libs:
        model = lib.get("model") or {}
        other = (f"  (model {model['id']} ({printable(str(model.get('name')))}), not the one this service runs: "
                 "it is searched and takes files only where that model runs; `clapq reembed --library "
                 f"{printable(shlex.quote(lib['name']))} --into NEW` embeds its files with this one)"
                 if serving is not None and model.get("id") not in (None, serving) else "")
        print(f"{lib['item_count']:>8}  {lib['id']}  {printable(lib['name'])}{other}")


def rename_library(client: Client, library: str, name: str) -> None:
    """`clapq libraries rename`: a new name for a library (its files, jobs and vectors stay)."""
    lib = client.library(library, create=False)
    name = unicodedata.normalize("NFC", name.strip())
    if name == unicodedata.normalize("NFC", lib["name"]):  # as the API stores and compares names: it said "renamed"
        print(f"library {printable(lib['name'])!r} ({lib['id']}) has that name already: nothing renamed")
        return
    got = client.call("PATCH", f"/v1/libraries/{urllib.parse.quote(lib['id'], safe='')}", json={"name": name})
    print(f"renamed library {printable(lib['name'])!r} ({lib['id']}) to {printable(got['name'])!r}")


FAILED_SHOWN = 20  # the failed files `clapq jobs show` lists without --all: a screenful, with the counts above it
MAX_JOB_ERRORS = 100  # the failed files a job's `errors` hold (api.jobs.MAX_ERRORS_SHOWN)


def _when(iso: str | None) -> str:
    """A time the API gives (ISO 8601) as `clapq jobs` shows it: to the minute, in UTC."""
    if not iso:
        return "-"
    try:
        t = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M") if t.tzinfo else t.strftime("%Y-%m-%d %H:%M")


def list_jobs(client: Client, limit: int = 20, as_json: bool = False) -> None:
    """`clapq jobs`: the caller's `limit` latest jobs, newest first, one a line (when it was made, its id, state,
    files done/failed/total and its library's name), with why one waits on a line below it; `as_json`: the jobs as
    the API gives them. A job left running by an upload stopped with Ctrl-C, or run from cron, could be looked
    at only over HTTP."""
    jobs: list[dict] = []
    cursor = None
    while len(jobs) < limit:
        page = client.call("GET", "/v1/jobs", params={"limit": min(500, limit - len(jobs)),
                                                       **({"cursor": cursor} if cursor else {})})
        jobs += page["jobs"]
        if not (cursor := page.get("next_cursor")):
            break
    if as_json:
        print(json_line(jobs))
        return
    if not jobs:
        print("no jobs yet: `clapq upload FOLDER --library NAME` makes one", file=sys.stderr)
        return
    names = {lib["id"]: lib["name"] for lib in client.call("GET", "/v1/libraries")["libraries"]}
    rows = [(_when(j.get("created_at")), j["id"], j["status"],
             f"{j['counts']['done']}/{j['counts']['failed']}/{j['counts']['total']}",
             printable(names.get(j["library_id"], j["library_id"])), j.get("waiting")) for j in jobs]
    head = ("created (UTC)", "job", "state", "done/failed/total", "library", None)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        if r[5]:
            print(f"    waiting: {printable(r[5])}")
    if cursor:
        print(f"older jobs: `clapq jobs --limit {limit * 2}` shows more", file=sys.stderr)


def _job(client: Client, job: str, action: str | None = None) -> dict:
    """The caller's job (`action`: the answer of POST /v1/jobs/<id>/cancel or /retry), or a sentence: an unknown id
    and another tenant's are alike (the API's 404 `job not found`, not any 404: a --url with a path is said as the
    other commands say it); where there is nothing to cancel or retry, the API's sentence (409) as it is, in the
    command's terms."""
    path = f"/v1/jobs/{urllib.parse.quote(job, safe='')}" + (f"/{action}" if action else "")
    try:
        return client.call("POST" if action else "GET", path)
    except SystemExit as exc:
        status, _, msg = str(exc.code).partition(" failed (")[2].partition("): ")
        if status == "404" and msg == "job not found":
            raise SystemExit(f"clapq: no job {job} (`clapq jobs` lists yours; a library's jobs are deleted with "
                             "it)") from None
        if status == "409" and action:
            raise SystemExit(f"clapq: cannot {action} job {job}: {msg}") from None
        raise


def _counted(counts: dict) -> str:
    """A job's files by state: "10 done, 2 failed, 28 queued" (copies sent of files held: said)."""
    said = ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "running", "queued", "cancelled")
                     if counts.get(s))
    copies = counts.get("duplicates") or 0
    # said apart from the last count, which it is not part of: "14 done, 2 failed (1 of them copies ...)" read as a
    # failed copy, where the copy was done and the two failed were broken files
    return (said or "no files") + (f"; {copies} of its files {'is a copy' if copies == 1 else 'are copies'} of another "
                                   "file's bytes, stored once" if copies else "")


def show_job(client: Client, job: str, everything: bool = False, as_json: bool = False) -> None:
    """`clapq jobs show`: a job's state and library, its files by state, its progress with the time left or why
    it waits (as `clapq upload` says them), and its failed files, each with its item id and why: the first
    FAILED_SHOWN and how many more, or with `everything` all of them; `as_json`: the API's answer (with
    `everything`, `errors` holds every failed file, not the first 100)."""
    state = _job(client, job)
    if as_json:
        if everything:  # as the API gives `errors`, read from the job's listing of failed items, to its end
            state["errors"] = [{"item_id": i["id"], "filename": i["filename"], "error": i["error"]}
                               for i in _job_items(client, job, "failed")]
        print(json_line(state))
        return
    lib = client.call("GET", f"/v1/libraries/{urllib.parse.quote(state['library_id'], safe='')}", missing_ok=True)
    print(f"job {state['id']}: {state['status']}, library "
          + (f"{printable(lib['name'])!r} ({state['library_id']})" if lib else state["library_id"]))
    ended = f", ended {_when(state['finished_at'])}" if state.get("finished_at") else ""
    print(f"created {_when(state.get('created_at'))}{ended} (UTC)")
    c = state["counts"]
    eta = state.get("eta_s")
    left = f", about {_span(eta)} left" if eta is not None and not state.get("waiting") else ""
    print(f"{progress_line(c['done'] + c['failed'], c['total'], state['progress'], left)}: {_counted(c)}")
    if state.get("waiting"):
        print(f"waiting: {printable(state['waiting'])}")
    if c["failed"]:
        _show_failed(client, job, state, everything)
    paths = _warned_paths(client, state["id"], state, {}, True)
    for w in state.get("warnings") or ():
        print(in_part_line(paths.get(w["item_id"], w["filename"]), w["item_id"], w["warning"]))


def _show_failed(client: Client, job: str, state: dict, everything: bool) -> None:
    """`clapq jobs show`'s failed files: the first FAILED_SHOWN and how many more, or with `everything` all."""
    c = state["counts"]
    # by the listing of failed items, which names each by its path in the folder it was sent from; a page of
    # FAILED_SHOWN + 1 tells whether there are more, without reading 5,000 of them
    failures = _job_items(client, job, "failed", page_size=500 if everything else FAILED_SHOWN + 1)
    shown = 0
    for item in failures:
        if not everything and shown == FAILED_SHOWN:
            # how many more: from the count where the job holds no copies (its copies count in it, each failed
            # item once in the listing), else from `errors` where it holds them all (fewer than its 100); a job
            # with more, and copies, says only that there are more
            more = (c["failed"] if not c.get("duplicates") else
                    len(state["errors"]) if len(state["errors"]) < MAX_JOB_ERRORS else 0) - shown
            said = f"{more} more failed {'file' if more == 1 else 'files'}" if more > 0 else "more failed files"
            print(f"... and {said}: `clapq jobs show {state['id']} --all` lists {'it' if more == 1 else 'them'}")
            break
        print(failed_line(_path_of(item), item["id"], item.get("error")))
        shown += 1


def wait_job(client: Client, job: str) -> int:
    """`clapq jobs wait`: follow a job to its end as `clapq upload` does (progress, time left or why it waits,
    on stderr; its failed files with their item ids and why, and whether it was cancelled); then its state and
    counts on stdout. The exit status is `clapq upload`'s: 1 if a file failed or was cancelled."""
    state = _job(client, job)
    if state["status"] in ("queued", "running"):  # a library of another model than the service runs: no end
        lib = client.call("GET", f"/v1/libraries/{urllib.parse.quote(state['library_id'], safe='')}",
                          missing_ok=True)
        if lib is not None:
            _not_for_another_model(lib, client.limits(), state["counts"]["queued"] + state["counts"]["running"])
    try:
        failed, cancelled, _, _ = _wait(client, [state["id"]], [1], {}, {}, listed=True,
                                  again="`clapq jobs retry {job}` queues them again")
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # after the progress line
        print(f"clapq: stopped waiting; job {state['id']} goes on (`clapq jobs show {state['id']}`)", file=sys.stderr)
        raise SystemExit(130) from None
    state = _job(client, job)
    print(f"job {state['id']}: {state['status']}: {_counted(state['counts'])}")
    return 1 if failed or cancelled else 0


def reembed(client: Client, library: str, into: str, wait: bool = True) -> int:
    """`clapq reembed`: the library's files into a new library `into` of the model the service runs (POST
    /v1/libraries/<id>/reembed), then, with `wait`, its job followed to its end as `clapq jobs wait` does (and its
    exit status, but for the files that came failed); the library re-embedded stays as it was."""
    lib = client.library(library, create=False)
    into = unicodedata.normalize("NFC", into.strip())
    try:
        made = client.call("POST", f"/v1/libraries/{urllib.parse.quote(lib['id'], safe='')}/reembed",
                           json={"name": into})
    except SystemExit as exc:
        if "failed (409): a library named" not in str(exc.code):
            raise
        # run again after a Ctrl-C, whose re-embed goes on: its job is what to follow, not a new library
        raise SystemExit(f"{exc.code}; if an earlier `clapq reembed` made it, its job goes on (`clapq jobs` lists it, "
                         "`clapq jobs wait JOB` follows it); else give --into another name") from None
    new, job = made["library"], made["job_id"]
    print(f"created library {printable(new['name'])!r} ({new['id']}) of model {new['model']['id']} "
          f"({printable(new['model']['name'])}): {n_files(made['queued'])} of {printable(lib['name'])!r} queued to be "
          f"embedded (job {job})", file=sys.stderr)
    if made["failed"]:
        print(f"{n_files(made['failed'])} that failed in {printable(lib['name'])!r} for a reason in their bytes "
              f"{'comes' if made['failed'] == 1 else 'come'} failed, with that reason (`clapq jobs retry {job}` tries "
              f"{'it' if made['failed'] == 1 else 'them'} again)", file=sys.stderr)
    if made["cancelled_left_out"]:
        print(f"left out: {n_files(made['cancelled_left_out'])} cancelled in {printable(lib['name'])!r}",
              file=sys.stderr)
    if not wait:
        print(json_line({"library_id": new["id"], "job_id": job}))
        return 0
    code = wait_job(client, job)
    if code and made["failed"] and not _job(client, job)["counts"]["cancelled"] and not any(
            i["attempts"] for i in _job_items(client, job, "failed")):
        # failed only where the library re-embedded had: said above, they do not fail the command, as `clapq upload`
        # does not fail for the files it does not send again (failed before), so `&& clapq delete` can follow. One
        # a worker tried (a file that came queued, or one retried) counts
        code = 0
    print(f"{printable(lib['name'])!r} is left as it was: `clapq delete --library {shlex.quote(lib['name'])}` "
          "deletes it (the files stay stored for the new library)", file=sys.stderr)
    return code


def cancel_job(client: Client, job: str) -> None:
    """`clapq jobs cancel`: stop a job's queued and running files."""
    state = _job(client, job, "cancel")
    c = state["counts"]
    print(f"cancelled job {state['id']}: {_counted(c)} (a file being embedded as the cancel came may still end "
          f"done); `clapq jobs retry {state['id']}` queues the cancelled ones again")


def retry_job(client: Client, job: str) -> None:
    """`clapq jobs retry`: queue a job's failed files again (and after a cancel its cancelled ones)."""
    state = _job(client, job, "retry")
    print(f"job {state['id']}: {n_files(state.get('requeued', 0))} queued again; `clapq jobs wait {state['id']}` "
          "follows it to its end")


def search(client: Client, library: str, text: str | None, k: int, like: Path | None = None,
           as_json: bool = False, offset: int = 0, windows: bool = False, item: str | None = None,
           pipe: bool = False) -> None:
    """Print the best matches for words, for a sound (`like`) or for a file of the tenant's libraries (`item`, by
    its id: the API's "more like this", which the search page had and the command line not, and the one way to
    search by a recording longer than a clip may be): score, file (by its path in the folder
    it was uploaded from, where it has one), item id and the best-matching window of the file; `as_json`:
    the API's answer as it came, one JSON object (a path with spaces moved the id's column, helper-57).
    `windows`: every matching window, several of one file (the API's segments mode), where a file's best alone
    left the other moments of a long recording unfound; `offset`: the results after the first `offset`, the next
    page (helper-125). Each is sent only where given, as to a server before them. `pipe`: `like` is a pipe, read
    once (`_read_once`), where a file is read again for each try."""
    lib = client.library(library, create=False)  # a misspelt name is an error, not a new empty library
    fields = {"library_id": lib["id"], "k": k, **({"offset": offset} if offset else {}),
              **({"mode": "segments"} if windows else {})}
    if like is not None:
        limits = client.limits()
        said, sent_as = _clip_names(like, pipe)
        clip = _read_once(like, said, limits) if pipe else None
        _short_enough(limits, like, said, clip)

        def attempt() -> dict:
            try:
                f = open(like, "rb") if clip is None else io.BytesIO(clip)
            except OSError as exc:
                raise SystemExit(f"clapq: cannot read {said}: {exc.strerror or exc}") from None
            with f:
                return client.call("POST", "/v1/search", data={n: str(v) for n, v in fields.items()},
                                   repeatable=True, files={"audio": (sent_as, f, "application/octet-stream")})

        res = patiently(attempt)  # a file is read again for each try; a pipe's bytes, read once, sent again
    else:
        res = client.call("POST", "/v1/search", json={**fields, **({"text": text} if item is None else
                                                                     {"item_id": item})}, repeatable=True)
    if as_json:
        print(json_line(res))
    for r in res["results"] if not as_json else ():
        span = r if windows else r.get("segment") or {}  # a window's own times, in segments mode
        at = f"  {_window(span['start_s'], span['end_s'])}" if "start_s" in span else ""
        print(f"{r['score']:7.4f}  {shown_name(r)}  {r['item_id']}{at}")  # 7: a negative score lines up
    if not res["results"] and offset:  # paged past the last: the library's state is no reason
        print(f"no results past the first {offset}: this search has no more", file=sys.stderr)
    elif not res["results"]:
        print(f"no results: {_why_empty(client, lib)}", file=sys.stderr)
    elif pending := _still_to_embed(client, lib):  # results, of the files embedded so far (helper-108)
        print(f"library {lib['name']!r} has {n_files(pending)} still to embed, not searched yet; search again once "
              f"{'it is' if pending == 1 else 'they are'}", file=sys.stderr)


def _clip_names(clip: Path, pipe: bool) -> tuple[str, str]:
    """A --like clip's name in the command's messages and the name it is sent by (which the API's refusals say): a
    file's path, and its base name. A pipe the shell gives as a descriptor (`--like <(ffmpeg ...)`: /dev/fd/63) was
    sent as "63", a number the user never saw, said back as "the 'audio' clip '63' could not be decoded": it is
    "the pipe given to --like", or "standard input" where it is the command's (`... | clapq search --like
    /dev/fd/0`), in both. A named pipe (mkfifo) goes by its own name, as a file."""
    if pipe and (clip.name.isdigit() and clip.parent.name == "fd" or clip.name == "stdin"):
        try:
            stdin = os.path.samestat(os.stat(clip), os.fstat(0))
        except OSError:  # no standard input (closed), or the pipe gone meanwhile: read and said then
            stdin = False
        name = "standard input" if stdin else "the pipe given to --like"
        return name, name
    return printable(str(clip)), wire_name(clip.name)


def _read_once(clip: Path, said: str, limits: dict) -> bytes:
    """A clip given as a pipe (`clapq search --like <(ffmpeg ...)`, `--like /dev/stdin`), read whole, once: it can
    be read only once, and a search sent again (a 503, a connection a restart cut) sent what was left of it,
    nothing (helper-141). At most what the API takes in a request (`max_request_bytes`, else its default), less
    the form around the clip: more is refused before anything is sent. `said`: its name in messages
    (_clip_names)."""
    most = (limits.get("max_request_bytes") or MAX_REQUEST_BYTES) - REQUEST_OVERHEAD - PART_OVERHEAD
    try:
        with open(clip, "rb") as f:
            data = f.read(most + 1)
    except OSError as exc:
        raise SystemExit(f"clapq: cannot read {said}: {exc.strerror or exc}") from None
    if len(data) > most:
        raise SystemExit(f"clapq: {said} gives more than {most / 1e6:,.1f} MB, more than this server "
                         "takes in a search (CLAPQ_MAX_REQUEST_BYTES there): search with a part of it (nothing was "
                         "sent)")
    return data


def _short_enough(limits: dict, clip: Path, said: str, data: bytes | None = None) -> None:
    """Refuse a clip whose header says it lasts longer than the API takes for a search (`max_clip_s`), before it is
    sent: a 15-minute WAV, 317 MB, went whole to the API before its 400 (helper-108). Only where the header's length
    is exact, as the API refuses one by it (worker.audio.exact_frames: WAV, AIFF and the like); other formats, and
    a server without the limit, are left to the API. `said`: its name in messages (_clip_names); `data`: the clip's
    bytes, where they were read (a pipe's)."""
    limit = limits.get("max_clip_s")
    if not limit:
        return
    try:
        import soundfile

        from worker.audio import exact_frames

        # by its bytes: a name that is not UTF-8 (`caf\xe9.wav`), as str, was a UnicodeEncodeError in soundfile
        with _codec_notes_unsaid(), soundfile.SoundFile(os.fsencode(clip) if data is None else io.BytesIO(data)) as f:
            frames, rate = exact_frames(f), f.samplerate
    except (RuntimeError, OSError, TypeError):  # a format libsndfile does not read, or no file: the API's to say
        return
    if rate > 0 and frames > limit * rate:
        raise SystemExit(f"clapq: {said} lasts {frames / rate:.0f} s, longer than {limit} s, the "
                         "limit for a search clip: search with a part of it (nothing was sent)")


@contextlib.contextmanager
def _codec_notes_unsaid() -> Iterator[None]:
    """Nothing on stderr (fd 2) meanwhile: libsndfile's libmpg123 writes there itself as it opens a file named .mp3
    that is not MP3 ("Note: Illegal Audio-MPEG-Header 0x00000000 at offset 2996.", "Note: Trying to resync..."),
    three lines before the API's sentence on the clip (helper-125). The API decodes the clip and says what is wrong
    with it; the length looked at here is only to spare sending a clip it would refuse."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _still_to_embed(client: Client, lib: dict) -> int:
    """How many files of `lib` are queued or running: a search right after `clapq upload --no-wait` found only
    those embedded so far, and said nothing of the rest."""
    # none on a server before counts; no library where it was deleted since the search answered (another terminal's
    # `clapq delete --yes`): its 404 made a search that had printed its results exit 1 (helper-111)
    counts = (client.call("GET", f"/v1/libraries/{lib['id']}", missing_ok=True) or {}).get("counts") or {}
    return counts.get("queued", 0) + counts.get("running", 0)


def _seconds(t: float) -> str:
    """A time (the API gives microseconds) to the millisecond, without trailing zeros: 10790.123, 5, 12.5."""
    return f"{t:.3f}".rstrip("0").rstrip(".")


def _window(start: float, end: float) -> str:
    """A result's window: in seconds within a file's first minute ("15-25 s"); past it as a clock, m:ss or h:mm:ss,
    to the millisecond ("1:02:05-1:02:15", "2:59:50.123-3:00:00"), where "3725-3735 s" in a 2-hour recording was
    to be worked out before a player could be sent there."""
    # by the millisecond each is said to: an end of 3599.9996 s, said 1:00:00, without its hour was "59:50-0:00"
    if round(end * 1000) <= 60_000:
        return f"{_seconds(start)}-{_seconds(end)} s"
    hours = round(end * 1000) >= 3_600_000
    return f"{_clock(start, hours)}-{_clock(end, hours)}"  # one form for both: 0:59:55-1:00:05


def _clock(t: float, hours: bool) -> str:
    h, ms = divmod(round(t * 1000), 3_600_000)
    m, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:06.3f}".rstrip("0").rstrip(".")
    return f"{h}:{m:02d}:{secs}" if hours else f"{m}:{secs}"


def _why_empty(client: Client, lib: dict) -> str:
    """Why a search of `lib` found nothing: no embedded files, as the files are still on their way, or as
    none of them could be embedded (a library of broken files is not one still being filled)."""
    name = repr(lib["name"])
    if not lib.get("item_count", 1):  # as the look-up listed it: no need to ask again
        return f"library {name} has no files"
    counts = client.call("GET", f"/v1/libraries/{lib['id']}").get("counts")
    if not counts:  # a server from before counts: what the look-up knows
        return f"library {name} has no embedded files yet"
    pending = counts.get("queued", 0) + counts.get("running", 0)
    if pending:
        return f"library {name} has {n_files(pending)} still to embed; search again once they are"
    if not sum(counts.values()):
        return f"library {name} has no files"
    if counts.get("done"):  # embedded meanwhile
        return f"library {name} has files embedded since; search again"
    failed, cancelled = counts.get("failed", 0), counts.get("cancelled", 0)
    why = [_failed_said(client, lib, failed)] if failed else []
    why += [f"{n_files(cancelled)} cancelled (upload them again to embed them)"] if cancelled else []
    return f"none of the files of library {name} could be embedded: {' and '.join(why)}"


def _failed_said(client: Client, lib: dict, failed: int) -> str:
    """`failed` files of `lib` said with the first one's path and reason, and the command that lists the rest (it
    was an endpoint of the API to GET, which a user of the command line does not have at hand; helper-115)."""
    first = client.call("GET", f"/v1/libraries/{lib['id']}/items", params={"status": "failed", "limit": 1})["items"]
    if not first:  # retried or deleted meanwhile
        return f"{n_files(failed)} failed"
    said = f"{shown_name(first[0])}: {printable(first[0].get('error') or 'no reason given')}"
    if failed == 1:
        return f"1 file failed ({said})"
    return (f"{n_files(failed)} failed, such as {said} (`clapq jobs show {first[0]['job_id']} --all` lists its job's; "
            "`clapq jobs` the others)")


def _confirmed(question: str, yes: bool, otherwise: str) -> bool:
    """Whether to go ahead: `yes`, or a "y" typed at a terminal (`otherwise`: what to do without one)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise SystemExit(f"clapq: {question} {otherwise}")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:  # Ctrl-D: no answer is no
        print(file=sys.stderr)
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing deleted", file=sys.stderr)
    return False


def delete_gone(client: Client, library: str, folder: Path, yes: bool = False) -> int:
    """Delete the library's files that `clapq upload` sent from `folder` (metadata.folder) and that are no
    longer in it (nothing at their metadata.path, or other bytes there: an earlier version of a file changed
    in place, helper-77; and their bytes nowhere else in it): files deleted from the folder stay in the
    library, and their ids were to be found by hand (helper-57). A file renamed or
    moved within the folder is kept (the next `clapq upload` follows it): the folder's files of a size one of
    those items has are read for their digests, those at paths other items have too (renamed over another).
    Asks first at a terminal; elsewhere needs `yes`."""
    if not folder.is_dir():
        raise SystemExit(f"clapq: {folder} is not a folder (--gone-from takes the folder `clapq upload` was given)")
    lib = client.library(library, create=False)
    listing = audio_files(folder)
    where, root = Where(folder, listing.audio), folder_id(folder)
    gone, sent, changed = [], 0, set()
    # each file read once, though a file changed in place is read to tell (_still_at) and again as one of a gone
    # item's size (below)
    read = functools.cache(file_sha256)
    for item in _items(client, f"/v1/libraries/{lib['id']}/items"):
        meta = item.get("metadata") or {}
        path = meta.get("path")
        sent += meta.get("folder") == root
        if meta.get("folder") != root or not isinstance(path, str):
            continue
        if path not in where.by_path:
            if _gone(folder, path):
                gone.append(item)
        elif not _still_at(where.by_path[path], item, read):
            gone.append(item)
            changed.add(item["id"])
    if not sent:  # a subfolder or the parent of the one uploaded, or a folder renamed since, was told "every
        # file ... is still there" (helper-71)
        raise SystemExit(f"clapq: no file of library {lib['name']!r} was sent from {folder}: --gone-from takes the "
                         "folder `clapq upload` was given (not a folder above or within it; a folder moved or "
                         "renamed since is another folder, until `clapq upload FOLDER --moved-from OLD`)")
    # every file of a gone one's size, at a path an item has too: `mv a.wav b.wav` over a b.wav the library
    # holds leaves a.wav's bytes at b.wav, and `clapq upload` follows that rename (_moved). Read, not taken from
    # the digests `clapq upload` keeps: where the change time follows the modification time (FAT, sshfs),
    # `cp -p a.wav b.wav` of the same size and time leaves b.wav's kept digest its old bytes', and a.wav's item,
    # whose bytes are at b.wav, was deleted
    sizes, here = {i["size_bytes"] for i in gone}, set()
    for p in listing.audio:
        if _size(p) in sizes:
            with contextlib.suppress(OSError):
                here.add(read(p))
    moved = [i for i in gone if i["sha256"] in here]
    gone = [i for i in gone if i["sha256"] not in here]
    if moved:
        print(f"{n_files(len(moved))} renamed or moved within {folder} kept ({_some([shown_name(i) for i in moved])}"
              f"); `clapq upload` updates their paths", file=sys.stderr)
    replaced = [shown_name(i) for i in gone if i["id"] in changed]
    if replaced:  # said, as their paths are still in the folder: what goes is the version the library held
        print(f"{n_files(len(replaced))} changed in place since {'it was' if len(replaced) == 1 else 'they were'} "
              f"sent (other bytes at the same path: re-exported, replaced or fixed): the earlier "
              f"{'version goes' if len(replaced) == 1 else 'versions go'}, not the file: {_some(replaced)}",
              file=sys.stderr)
    if not gone:
        print(f"nothing to delete: every file of library {lib['name']!r} sent from {folder} is still there")
        return 0
    if not listing.audio:  # a drive not mounted, an emptied folder: every file would look gone
        raise SystemExit(f"clapq: {folder} holds no audio files at all (a drive not mounted?); not deleting the "
                         f"{n_files(len(gone))} sent from it. Delete them by id, or the whole library")
    names = _some([shown_name(i) for i in gone])
    if not _confirmed(f"delete {n_files(len(gone))} of library {lib['name']!r} no longer in {folder} ({names})?",
                      yes, "Deleting them needs --yes"):
        return 1
    for item in _delete_items(client, lib, gone):
        print(f"clapq: {shown_name(item)} ({item['id']}) was deleted meanwhile", file=sys.stderr)
    return 0


def _still_at(files: list[Path], item: dict, read: Callable[[Path], str] = file_sha256) -> bool:
    """Whether one of the files listed at an item's path still holds its bytes: a file re-exported, replaced
    or fixed in place left the item of its earlier version at that path, searchable beside the new one, and
    --gone-from kept it as something was there (helper-77). A file of another size holds other bytes; one of
    the same size is taken to hold them where the digest `clapq upload` kept for it, as it is now, says so
    (nothing is deleted on that: a file it is wrong about keeps its item, as before), and is read otherwise,
    so that only files read are found changed (`read`: a file's sha256). One that cannot be read keeps the item."""
    for p in files:
        try:
            if os.stat(p).st_size != item.get("size_bytes"):
                continue
            if _cache().kept_digest(p) == item.get("sha256") or read(p) == item.get("sha256"):
                return True
        except OSError:
            return True
    return False


DELETIONS_PER_REQUEST = 1000  # item ids in one POST /v1/libraries/<id>/deletions: the API's limit
MANY = 10  # files deleted past which a line at the end counts them


def _delete_items(client: Client, lib: dict, items: list[dict], paths: list[str] | None = None) -> list[dict]:
    """Delete these items of the library (each a dict with its "id", as a listing gives them), a thousand
    a request (POST /deletions: a DELETE a file took 53 s for 500 files, helper-73), each deleted one said on
    stdout as before, `deleted NAME (ID)`, and past MANY files how many on stderr at the end. Returns those
    that named no item of the library (deleted meanwhile, another library's, unknown); where a request was sent
    again after its connection was lost, its ids found no more are returned marked "maybe_deleted": the first
    try may have deleted them, its answer lost. A server without /deletions (an older one) gets a GET and a
    DELETE a file, as before. `paths` gets the path in its folder of each file deleted that has one."""
    missing, deleted, kept = [], 0, 0
    for start in range(0, len(items), DELETIONS_PER_REQUEST):
        part = items[start:start + DELETIONS_PER_REQUEST]
        cut = False  # whether a try was lost on the way: the API may have deleted the items before its answer

        def post(ids=[i["id"] for i in part]):
            nonlocal cut
            try:
                return client._call("POST", f"/v1/libraries/{lib['id']}/deletions", True, json={"item_ids": ids},
                                    allow_redirects=False, repeatable=True)
            except Busy as busy:
                cut = cut or busy.outage
                raise

        answer = patiently(post)
        if answer is None:  # an older server (or the library deleted meanwhile: each item is then gone too)
            for item in items[start:]:
                got = _delete_item(client, lib, item, paths)
                if got is None:
                    missing.append(item)
                else:
                    deleted, kept = deleted + 1, kept + 1 - got["stored_files"]
            break
        for f in answer["deleted"]["files"]:
            print(f"deleted {shown_name({'filename': f['filename'], 'metadata': {'path': f['path']}})} ({f['id']})")
            if paths is not None and isinstance(f["path"], str):
                paths.append(printable(f["path"]))
        deleted += answer["deleted"]["items"]
        kept += answer["deleted"]["items"] - answer["deleted"]["stored_files"]
        lost = set(answer["not_found"])
        missing += [{**i, "maybe_deleted": True} if cut else i for i in part if i["id"] in lost]
    if deleted > MANY:  # the lines above scrolled away what was asked
        print(f"deleted {n_files(deleted)} of library {lib['name']!r}"
              + (f" ({n_files(kept)} kept on disk: other libraries hold the same bytes)" if kept > 0 else ""),
              file=sys.stderr)
    return missing


def _delete_item(client: Client, lib: dict, item: dict, paths: list[str] | None = None) -> dict | None:
    """One item of the library deleted through DELETE /v1/items/<id> (a server without /deletions), said on
    stdout; its answer's `deleted`, or None where it is no item of the library (gone, or another's). An id
    alone is looked up first (a DELETE would take another library's item); a listing's item is not."""
    got = item if item.get("library_id") == lib["id"] else client.call(
        "GET", f"/v1/items/{urllib.parse.quote(item['id'], safe='')}", missing_ok=True)
    if not isinstance(got, dict) or got.get("library_id") != lib["id"]:
        return None
    answer = client.call("DELETE", f"/v1/items/{got['id']}", missing_ok=True)
    if answer is None:
        return None
    print(f"deleted {shown_name(got)} ({got['id']})")
    if paths is not None and isinstance((got.get("metadata") or {}).get("path"), str):
        paths.append(printable(got["metadata"]["path"]))
    return answer["deleted"]


SAY_DELETING = 1000  # files of a library from which its deletion is said before it is sent: it may take seconds
# (20,000 files: 1.2 s of SQL; 17-53 s while their stored files were unlinked before the answer)


def delete(client: Client, library: str, items: list[str], yes: bool = False) -> int:
    """Delete these items (ids, as `clapq search` prints them) of the library, or with no items the whole
    library, which needs `yes` (or a "y" typed at a terminal). Returns the exit status: 1 if an id named
    no item of that library."""
    lib = client.library(library, create=False)
    if not items:
        if not _confirmed(f"delete library {lib['name']!r} and its {n_files(lib.get('item_count', 0))}?", yes,
                          "Deleting a whole library needs --yes (or name the files' item ids to delete only those)"):
            return 1
        if (held := lib.get("item_count", 0)) >= SAY_DELETING:  # it may take seconds: said, so it does not look hung
            print(f"deleting library {lib['name']!r} ({n_files(held)})…", file=sys.stderr, flush=True)
        gone = client.call("DELETE", f"/v1/libraries/{lib['id']}")["deleted"]
        kept = gone["items"] - gone["stored_files"]  # bytes other libraries hold too
        print(f"deleted library {lib['name']!r}: {n_files(gone['items'])}"
              + (f" ({n_files(kept)} kept on disk: other libraries hold the same bytes)" if kept > 0 else ""))
        return 0
    # an id given twice is deleted once, in capitals too (the API takes any form of a UUID); text that is no
    # id names no item, and is not sent
    given = list(dict.fromkeys(_as_id(i) or i for i in items))
    missing = [i for i in given if _as_id(i) is None]
    sent: list[str] = []  # the deleted files `clapq upload` sent from a folder (metadata.path)
    for item in _delete_items(client, lib, [{"id": i} for i in given if _as_id(i)], sent):
        if item.get("maybe_deleted"):  # gone now, whichever: not an id to correct, so not a failure
            print(f"clapq: {item['id']} is no item of library {lib['name']!r} now: the connection was lost while "
                  "it was being deleted, and the try whose answer was lost may have deleted it (or it was not "
                  "there)", file=sys.stderr)
        else:
            missing.append(item["id"])
    order = {raw: n for n, raw in enumerate(given)}
    for raw in sorted(missing, key=order.__getitem__):
        item = client.call("GET", f"/v1/items/{urllib.parse.quote(raw, safe='')}", missing_ok=True) \
            if _as_id(raw) else None
        elsewhere = ""
        if isinstance(item, dict):  # yours, in another library: which one
            other = client.call("GET", f"/v1/libraries/{item.get('library_id')}", missing_ok=True)
            elsewhere = f"; it is in library {other['name']!r}" if isinstance(other, dict) else ""
        print(f"clapq: no item {raw!r} in library {lib['name']!r} (give item ids as `clapq search` prints "
              f"them){elsewhere}", file=sys.stderr)
    if sent:  # a take deleted as junk came back with the next nightly upload, with nothing said (helper-120)
        it, one = ("it", True) if len(sent) == 1 else ("them", False)
        print(f"{'1 file deleted was' if one else f'{len(sent)} files deleted were'} sent by `clapq upload` from a "
              f"folder: the next upload of that folder sends {it} again where {'it is' if one else 'they are'} still "
              f"there (delete or move {it} out of the folder too, to keep {it} out of the library): {_some(sent)}",
              file=sys.stderr)
    return 1 if missing else 0


def _up_stopped(data_dir: Path) -> bool:
    """Whether no `clapq up` runs on `data_dir`: the lock it and its children hold while they run
    (clapq.cli._lock_data_dir) is free. Taken shared and let go at once."""
    import fcntl

    try:
        with open(data_dir / "clapq-up.lock") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held (BlockingIOError), or no lock file: nothing to say
        return False
    return True


def connect(url: str | None, key: str | None, data_dir: Path) -> Client:
    saved = data_dir / "url"  # where `clapq up` with this data directory listens
    from_dir = not url and not os.environ.get("CLAPQ_URL") and saved.is_file()
    url = url or os.environ.get("CLAPQ_URL") or (saved.read_text().strip() if saved.is_file() else "http://127.0.0.1:8000")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError when out of range)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        usable = False
    if not usable:
        raise SystemExit(f"clapq: {url!r} is not an API address like http://127.0.0.1:8000 (--url or CLAPQ_URL)")
    key = key or os.environ.get("CLAPQ_API_KEY")
    dir_key = not key and (data_dir / "api_key").is_file()
    if dir_key:
        key = (data_dir / "api_key").read_text().strip()
    if not key:
        raise SystemExit(f"clapq: no API key: pass --key, set CLAPQ_API_KEY, or pass --data-dir, the directory `clapq up` "
                         f"uses, whose key it reads ({data_dir} has none); `clapq keys create` makes more keys")
    client = Client(url, key)
    if from_dir and _up_stopped(data_dir):
        client.stopped, client.key_of_stopped = data_dir, dir_key
    return client
