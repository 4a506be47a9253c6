"""Requests per API key (CLAPQ_RATE_LIMIT): one count in Redis for every API process, 429 with Retry-After
over it, and requests still served while Redis cannot count them."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from sqlalchemy import func, select

from api import create_app
from clapq.db import session_scope
from clapq.models import Item, Job, Library
from clapq.settings import Settings
from tests.conftest import ROOT, auth


def test_a_key_over_its_limit_gets_429_counted_across_api_processes(start_api, settings, new_key):
    """Six requests a minute, sent in turn to a gunicorn `clapq api` (its own processes) and to an app in this
    process: the first six pass wherever they land, the rest get 429 `rate_limited` with Retry-After, before an
    upload's body is read (nothing stored). Another key of the same limit is not held back, and
    /v1/limits says the limit."""
    api_process = start_api("6/minute")
    local = create_app(dataclasses.replace(settings, rate_limit="6/minute")).test_client()
    key, other = new_key(), new_key()
    lib = local.post("/v1/libraries", json={"name": "limited"}, headers=auth(key)).get_json()  # 1 of 6

    statuses, refusals = [], []
    for i in range(9):
        if i % 2:
            r = requests.get(f"{api_process}/v1/libraries", headers=auth(key), timeout=10)
            status, body, headers = r.status_code, r.json(), r.headers
        else:
            r = local.get("/v1/libraries", headers=auth(key))
            status, body, headers = r.status_code, r.get_json(), r.headers
        statuses.append(status)
        if status == 429:
            refusals.append((body["error"], headers.get("Retry-After")))
    assert statuses == [200] * 5 + [429] * 4, statuses
    for error, retry_after in refusals:
        assert error["code"] == "rate_limited", error
        assert "this API key has sent more than 6 requests per minute (CLAPQ_RATE_LIMIT)" in error["message"], error
        assert 1 <= int(retry_after) <= 60 and f"try again in {retry_after} s" in error["message"], error

    # an upload over the limit is refused before its body is read: no job, no item
    r = requests.post(f"{api_process}/v1/libraries/{lib['id']}/batches", headers=auth(key), timeout=10,
                      files={"files": ("a.wav", io.BytesIO(b"RIFF" + b"\0" * 5000))})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.library_id == lib["id"])) == 0
        assert s.scalar(select(func.count()).select_from(Item).where(Item.library_id == lib["id"])) == 0
        assert s.scalar(select(func.count()).select_from(Library).where(Library.id == lib["id"])) == 1

    assert requests.get(f"{api_process}/v1/libraries", headers=auth(other), timeout=10).status_code == 200
    limits = local.get("/v1/limits", headers=auth(other)).get_json()
    assert limits["rate_limit"] == "6 requests per minute", limits


def test_the_client_waits_out_the_limit_and_says_so(start_api, new_key, tiny_model):
    """`clapq search` over the key's limit waits as Retry-After says and sends again: at 2 requests per 10
    seconds, the library's creation and the search's look-up pass, its search waits, then succeeds; the
    wait is said once, in words."""
    base, key = start_api("2 per 10 seconds"), new_key()
    assert requests.post(f"{base}/v1/libraries", json={"name": "lim"}, headers=auth(key), timeout=10).ok
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAPQ_")}
    p = subprocess.run([sys.executable, "-m", "clapq.cli", "search", "rain", "--library", "lim", "--url", base,
                        "--key", key], env={**env, "CLAPQ_MODEL": str(tiny_model), "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "no results: library 'lim' has no files" in p.stderr, p.stderr  # the search's answer
    assert ("POST /v1/search: this API key has sent more than 2 requests per 10 seconds (CLAPQ_RATE_LIMIT); "
            "trying again in ") in p.stderr and p.stderr.count("trying again") == 1, p.stderr


def test_requests_pass_while_redis_cannot_count_them(settings, new_key, caplog):
    """A Redis that refuses connections does not take the API down with it: at 1 request a minute both
    requests are served (uncounted), and one warning says why."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    app = create_app(dataclasses.replace(settings, rate_limit="1/minute",
                                         redis_url=f"redis://127.0.0.1:{closed}/0"))
    client, key = app.test_client(), new_key()
    with caplog.at_level(logging.WARNING, logger="clapq.queue"):
        assert client.get("/v1/libraries", headers=auth(key)).status_code == 200
        assert client.get("/v1/libraries", headers=auth(key)).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "clapq.queue"]
    assert len(warnings) == 1 and "Redis failed while counting a request against CLAPQ_RATE_LIMIT" in warnings[0], \
        warnings
    assert client.get("/v1/limits", headers=auth(key)).get_json()["rate_limit"] == "1 request per minute"


def test_a_request_one_limit_refuses_counts_against_none(settings, new_key):
    """With two limits, a request the tighter one refuses is not counted against the other: after two
    requests pass at "5/minute;2/minute", four refused ones leave the five-a-minute count at 2. The 429 names
    the limit that holds the key back."""
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter

    from clapq.keys import hash_key
    from clapq.queue import make_celery, redis_client

    app = create_app(dataclasses.replace(settings, rate_limit="5/minute;2/minute"))
    client, key = app.test_client(), new_key()
    statuses = [client.get("/v1/libraries", headers=auth(key)) for _ in range(6)]
    assert [r.status_code for r in statuses] == [200, 200, 429, 429, 429, 429]
    assert "more than 2 requests per minute" in statuses[-1].get_json()["error"]["message"]
    pool = redis_client(make_celery(settings), quick=True).connection_pool
    limiter = MovingWindowRateLimiter(RedisStorage("redis://", connection_pool=pool, key_prefix="clapq:rate"))
    five, two = app.extensions["clapq_rate_limit"].items
    assert limiter.get_window_stats(five, hash_key(key)[:32]).remaining == 3
    assert limiter.get_window_stats(two, hash_key(key)[:32]).remaining == 0


@pytest.mark.parametrize("raw, expected", [
    (None, "1200/minute"), ("0", ""), ("20/second;10000/hour", "20/second;10000/hour"),
    ("10 per 5 seconds", "10 per 5 seconds")])
def test_the_rate_limit_setting(raw, expected):
    env = {} if raw is None else {"CLAPQ_RATE_LIMIT": raw}
    assert Settings.from_env(env).rate_limit == expected


@pytest.mark.parametrize("raw", ["lots", "100", "0/minute", "10/fortnight", "-5/second", "10/0 minutes",
                                 "10 per 0 seconds", "3/1000000000000 years", "99999999999999999999/second",
                                 "100001/hour", "5/second;"])
def test_a_rate_limit_that_is_not_one_is_a_sentence_at_start(raw):
    with pytest.raises(SystemExit, match=f"CLAPQ_RATE_LIMIT must be requests per key and period, .*got '{raw}'"):
        Settings.from_env({"CLAPQ_RATE_LIMIT": raw})


def test_no_limit_and_the_default(settings, new_key):
    """CLAPQ_RATE_LIMIT=0: no limit, and /v1/limits says null; the suite itself runs at the default."""
    assert settings.rate_limit == "1200/minute"
    client, key = create_app(dataclasses.replace(settings, rate_limit="")).test_client(), new_key()
    assert client.get("/v1/limits", headers=auth(key)).get_json()["rate_limit"] is None


def test_a_wait_asks_less_while_nothing_moves_and_keeps_within_half_the_limit(start_api, new_key, settings,
                                                                             tiny_model):
    """`clapq jobs wait` (and `clapq upload`, which waits the same way) on a job whose file does not move, its
    requests counted by the API's own rate-limit counter. At 600 a minute it asked once a second (33 requests to
    the end, 15 from its 12th s to its 27th); it now asks as seldom as a fifth of the time nothing has moved
    (20; 5), and still sees the job end within seconds. At 8 a minute it used the key's whole limit within 8 s
    and met a 429 (said on stderr); it now keeps to half of it, leaving the rest to the key's other requests,
    and says so where that holds it back (helper-131)."""
    from limits import parse_many
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter
    from sqlalchemy import text

    from clapq.keys import hash_key
    from clapq.queue import make_celery, redis_client
    from tests.test_jobs import job_rows

    pool = redis_client(make_celery(settings), quick=True).connection_pool
    counter = MovingWindowRateLimiter(RedisStorage("redis://", connection_pool=pool, key_prefix="clapq:rate"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAPQ_") and k not in ("DATABASE_URL",
                                                                                          "REDIS_URL")}
    env.update(CLAPQ_MODEL=str(tiny_model), PYTHONPATH=str(ROOT))

    def waiting(rate_limit: str) -> tuple[subprocess.Popen, str, dict[str, object]]:
        base, key = start_api(rate_limit), new_key()
        lib = requests.post(f"{base}/v1/libraries", json={"name": "still"}, headers=auth(key), timeout=30).json()
        job, ids = job_rows(settings, lib["id"], [("a", 1_000_000, "running")])
        proc = subprocess.Popen([sys.executable, "-m", "clapq.cli", "jobs", "wait", str(job), "--url", base, "--key",
                                 key], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        return proc, key, ids

    def used(rate_limit: str, key: str) -> int:  # the library's creation left out
        limit = parse_many(rate_limit)[0]
        return limit.amount - counter.get_window_stats(limit, hash_key(key)[:32]).remaining - 1

    proc, key, ids = waiting("600/minute")
    time.sleep(12)
    before = used("600/minute", key)
    time.sleep(15)
    asked = used("600/minute", key) - before  # once a second before: 15
    assert asked <= 8, (before, asked)
    with session_scope(settings.database_url) as s:
        s.execute(text("UPDATE items SET status = 'done', finished_at = now() WHERE id = :i"), {"i": ids["a"]})
    try:
        out, err = proc.communicate(timeout=10)  # its poll at most a fifth of the ~27 s still apart
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0 and ": done: 1 done" in out, (out, err)
    assert used("600/minute", key) <= 24, (used("600/minute", key), err)

    proc, key, _ = waiting("8/minute")
    time.sleep(12)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert used("8/minute", key) <= 4 and "trying again" not in err, (used("8/minute", key), err)
    assert err.count("clapq: waiting ") == 1 and " s before asking about the jobs: this command keeps to 4 of the 8 " \
        "requests per minute this key may send (CLAPQ_RATE_LIMIT), leaving the rest to its other uses\n" in err, err
