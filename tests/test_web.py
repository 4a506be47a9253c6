"""The search page at / in a real browser (Debian's Chromium, driven by Playwright) against `clapq api` and the
suite's worker: a key is asked for and kept, a library searched by words, by a sound and by one of its files, a result
played from its window; names are shown as text, never as HTML."""

from __future__ import annotations

import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from clapq.db import session_scope

from tests.audio import write
from tests.test_cli import _wait_job

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium here: `make test` installs Debian's "
                                "(apt-get install chromium) where it runs as root on Debian")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            yield launched
        finally:
            launched.close()


def _loaded(page) -> dict:
    """The page's player once it has read its file's duration (wait_for_function's eval is what the page's CSP
    forbids): its src, error, readyState, currentTime and duration."""
    deadline = time.monotonic() + 30
    while (player := page.eval_on_selector("#player", "p => ({src: p.src, error: p.error, ready: p.readyState, "
                                           "t: p.currentTime, d: p.duration})"))["ready"] < 1:
        assert time.monotonic() < deadline and player["error"] is None, player
        time.sleep(0.1)
    return player


def test_the_search_page_searches_plays_and_shows_names_as_text(start_api, new_key, worker, browser, settings,
                                                                tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)  # the API's first text search loads its text tower, on a busy machine
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "sfx <i>"}, headers=h, timeout=30).json()
    names = ["hum.wav", "<img src=x onerror=alert(1)>.wav", "chirp.wav"]
    paths = [write(tmp_path / f"f{i}.wav", secs, freq=freq, seed=80 + i)
             for i, (secs, freq) in enumerate(((1.0, 110.0), (12.0, 880.0), (0.7, 3000.0)))]
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (n, p.read_bytes(), "audio/wav")) for n, p in zip(names, paths)])
    assert r.status_code == 202, r.text
    assert _wait_job(base, h, r.json()["job_id"])["status"] == "done"

    page = browser.new_page()
    dialogs, heard = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda q: heard.append((q.url, q.headers.get("range"))) if "/audio?" in q.url else None)
    answer = page.goto(base + "/")
    assert answer.status == 200 and answer.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in answer.headers["content-security-policy"], answer.headers
    status = page.locator("#status")
    assert "paste the API key" in status.text_content()
    # a wrong key is said so, and nothing is shown
    page.fill("#key", "cq_" + "x" * 43)
    page.click("text=Use key")
    expect(status).to_have_class("error")  # (the page's policy allows no eval: Playwright's waits by locator)
    assert "does not take this key" in status.text_content() and page.locator("#search-form").is_hidden()

    page.fill("#key", key)
    page.click("text=Use key")
    page.wait_for_selector("#search-form", state="visible")
    assert page.locator("#library option").all_text_contents() == ["sfx <i> (3 files)"]
    rows = page.locator("#results tbody tr")

    def files() -> list[str]:
        return rows.locator("td.file").all_text_contents()

    page.fill("#text", "a low hum")
    page.click("#search-form button[type=submit]")
    # the status is said once the library's counts are read, after the rows are shown (CI of 3685f36 read it between)
    expect(status).to_have_text(re.compile(r"^3 best for “a low hum” in sfx <i>"))
    assert rows.count() == 3 and sorted(files()) == sorted(names), files()
    assert page.locator("#results img").count() == 0 and dialogs == []  # the name shown as text
    windows = dict(zip(files(), rows.locator("td.window").all_text_contents()))
    assert windows["hum.wav"] == "0–1 s" and windows["chirp.wav"] == "0–0.7 s", windows

    # by a sound: the file itself comes first, at a score of about 1
    page.set_input_files("#clip", str(paths[2]))
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text(re.compile(r"^3 best for the sound of f2\.wav in "))
    assert files()[0] == "chirp.wav" and float(rows.locator("td.score").first.text_content()) > 0.99, files()

    # more like one of them: the others, not itself
    rows.filter(has_text="hum.wav").locator("text=More like this").click()
    expect(rows).to_have_count(2)
    assert sorted(files()) == sorted(names[1:])

    # played from the window that matched, streamed by the browser's player through a link to the file (it cannot
    # send the key): it asks for ranges, where the page fetched the whole file with the key before it played
    long_row = rows.filter(has_text=".wav").filter(has_text="onerror")
    start = float(long_row.locator("td.window").text_content().split("–")[0])
    long_row.locator("text=Play").click()
    player = _loaded(page)
    assert re.fullmatch(rf"{re.escape(base)}/v1/items/[0-9a-f-]+/audio\?link=[\w-]+", player["src"]), player
    assert heard and all(url == player["src"] and rng and rng.startswith("bytes=") for url, rng in heard), heard
    assert abs(player["d"] - 12.0) < 0.05 and abs(player["t"] - start) < 0.5, (player, start)
    assert dialogs == []

    # a file of the library not embedded yet is said, as `clapq search` says it (a row with no task, taken out after)
    with session_scope(settings.database_url) as s:
        pending = s.execute(text(
            "WITH j AS (INSERT INTO jobs (id, tenant_id, library_id, kind) SELECT gen_random_uuid(), tenant_id, id, "
            "'upload' FROM libraries WHERE id = :l RETURNING id, tenant_id, library_id) INSERT INTO items (id, "
            "tenant_id, library_id, job_id, sha256, filename, size_bytes, status) SELECT gen_random_uuid(), tenant_id, "
            "library_id, id, :h, 'later.wav', 1, 'queued' FROM j RETURNING id"),
            {"l": lib["id"], "h": uuid.uuid4().hex * 2}).scalar()
    try:
        page.fill("#text", "a low hum")
        page.click("#search-form button[type=submit]")
        expect(status).to_contain_text("in sfx <i> (3 files); 1 file of it still to be embedded")
    finally:
        with session_scope(settings.database_url) as s:
            s.execute(text("UPDATE items SET status = 'cancelled' WHERE id = :i"), {"i": pending})

    # the key is kept: the page opened again needs none
    page.reload()
    page.wait_for_selector("#search-form", state="visible")
    page.click("text=Forget key")
    assert page.locator("#search-form").is_hidden() and status.text_content() == "key forgotten"
    # given in the address, it is used and taken out of the address
    other = browser.new_page()
    other.goto(f"{base}/#key={key}")
    other.wait_for_selector("#search-form", state="visible")
    assert "#" not in other.url and other.evaluate("localStorage.getItem('clapq.key')") == key
    other.close()
    page.close()

    # served under a path by a proxy (/sub/ to the API's /, as nginx's `location /sub/ { proxy_pass .../; }`): the
    # page asks for everything under that path, where it asked for /v1/... and /app.js at the host's root
    sub, asked = browser.new_page(), []
    sub.route(f"{base}/**", lambda route: (asked.append(route.request.url), route.fulfill(
        response=route.fetch(url=route.request.url.replace("/sub/", "/", 1))) if route.request.url.startswith(
            f"{base}/sub/") else route.fulfill(status=404, body="not under /sub/")))
    sub.goto(f"{base}/sub/#key={key}")
    sub.wait_for_selector("#search-form", state="visible")
    sub.fill("#text", "a low hum")
    sub.click("#search-form button[type=submit]")
    expect(sub.locator("#status")).to_have_text(re.compile(r"^3 best for "))
    sub.locator("#results tbody tr").first.locator("text=Play").click()
    player = _loaded(sub)
    assert player["src"].startswith(f"{base}/sub/v1/items/"), player
    assert asked and all(url.startswith(f"{base}/sub/") for url in asked), asked
    sub.unroute_all(behavior="ignoreErrors")  # a fetch of the player's still going: its fulfil failed the next page
    sub.close()


def _unread(page, duration: float) -> float:
    """A time the page's player has not read: the middle of the longest stretch it has not."""
    read = page.eval_on_selector("#player", "p => Array.from({length: p.buffered.length}, "
                                            "(_, i) => [p.buffered.start(i), p.buffered.end(i)])")
    gaps = [(b - a, (a + b) / 2) for a, b in zip([0] + [e for _, e in read], [s for s, _ in read] + [duration])]
    assert max(gaps)[0] > 60, read
    return max(gaps)[1]


def _playing(page, ready) -> dict:
    """The page's player once `ready(its state)`, as _loaded's, while the page says no error (where the player
    meets one on the way, a link expired, the page goes on)."""
    deadline = time.monotonic() + 60
    while not ready(player := page.eval_on_selector("#player", "p => ({src: p.src, error: p.error, ready: "
                                                    "p.readyState, t: p.currentTime})")):
        status = page.locator("#status")
        assert time.monotonic() < deadline and status.get_attribute("class") != "error", (player, status.text_content())
        time.sleep(0.2)
    return player


def test_the_player_goes_on_where_its_link_expired(start_api, new_key, worker, browser, tmp_path):
    """An audio link lasts an hour: a long file played, or paused, past it was refused at the player's next range
    (a seek, or reading on), and the page said "this browser cannot play its format" of a file it had been
    playing. It asks for a new link then, and plays on from where it was; a link refused for another reason (the
    file deleted meanwhile) is said in the API's words, and a file the browser cannot decode as before."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    lib = requests.post(f"{base}/v1/libraries", json={"name": "long"}, headers=h, timeout=30).json()
    # 10 minutes, 19 MB: more than the player reads ahead of where it plays
    path = write(tmp_path / "long.wav", 600.0, 16_000, freq=500.0, seed=5)
    aiff = write(tmp_path / "short.aiff", 2.0, 16_000, freq=700.0, seed=6)  # a format Chromium does not play
    r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                      files=[("files", (p.name, p.read_bytes(), "audio/wav")) for p in (path, aiff)])
    assert r.status_code == 202, r.text
    assert _wait_job(base, h, r.json()["job_id"])["status"] == "done"
    item = r.json()["items"][0]["id"]

    page, links, heard = browser.new_page(), [], []
    # links that last 5 s, not an hour
    page.route("**/audio-link", lambda route: (links.append(route.request.url), route.continue_(
        url=route.request.url + "?expires_in_s=5")))
    page.on("response", lambda a: heard.append(a.status) if "/audio?" in a.url else None)
    page.goto(f"{base}/#key={key}")
    page.wait_for_selector("#search-form", state="visible")
    page.fill("#text", "a tone")
    page.click("#search-form button[type=submit]")
    status = page.locator("#status")
    expect(status).to_have_text(re.compile(r"^2 best for "))
    rows = page.locator("#results tbody tr")
    rows.filter(has_text="long.wav").locator("text=Play").click()
    _playing(page, lambda p: p["ready"] >= 1 and p["error"] is None)
    time.sleep(6)  # its link has expired
    old, to = page.eval_on_selector("#player", "p => p.src"), _unread(page, 600.0)
    page.eval_on_selector("#player", f"p => {{ p.currentTime = {to}; }}")  # a range asked for with the old link
    player = _playing(page, lambda p: p["src"] != old and p["ready"] >= 1 and p["error"] is None and p["t"] > to - 1)
    assert 401 in heard and len(links) >= 2, (heard, links)
    assert abs(player["t"] - to) < 5, (player, to)

    # a file the browser cannot decode is said so, as before
    rows.filter(has_text="short.aiff").locator("text=Play").click()
    expect(status).to_have_text("short.aiff: this browser cannot play its format (download it with `curl` or the API)")

    # the file deleted: its link is refused, said as the API says it
    rows.filter(has_text="long.wav").locator("text=Play").click()
    _playing(page, lambda p: p["ready"] >= 1 and p["error"] is None)
    assert requests.delete(f"{base}/v1/items/{item}", headers=h, timeout=30).status_code == 200
    page.eval_on_selector("#player", f"p => {{ p.currentTime = {_unread(page, 600.0)}; }}")
    expect(status).to_have_class("error")
    assert status.text_content() == "long.wav: item not found", status.text_content()
    page.close()


def test_a_kept_key_is_forgotten_only_where_the_api_refuses_it(start_api, browser, settings):
    """The page keeps the key in the browser's storage, and forgot it whatever failed as the page opened: a 503
    (its database restarting), a proxy's 502, or an API gone between the page and its first requests, and the
    page opened again once the API was back said "paste the API key". Only a key the API refuses (401) goes."""
    from playwright.sync_api import expect

    from clapq.db import session_scope
    from clapq.keys import create_key, revoke_key

    expect.set_options(timeout=60_000)
    base = start_api()
    with session_scope(settings.database_url) as s:
        key = create_key(s, f"kept-{uuid.uuid4().hex[:8]}")
    page = browser.new_page()
    page.goto(f"{base}/#key={key}")
    page.wait_for_selector("#search-form", state="visible")
    status = page.locator("#status")

    def stored():
        return page.evaluate("localStorage.getItem('clapq.key')")

    # clapq stopped, then starting (its database not up yet): said, and the key kept
    for answer, said in ((lambda route: route.abort(), "the API did not answer"),
                         (lambda route: route.fulfill(status=503, content_type="application/json", body=(
                             '{"error": {"code": "database_unavailable", "message": "the database is not '
                             'answering", "status": 503}}')), "the database is not answering")):
        page.route(f"{base}/v1/**", answer)
        page.reload()
        expect(status).to_have_class("error")
        assert said in status.text_content() and stored() == key, (status.text_content(), stored())
        page.unroute(f"{base}/v1/**")
    # back: the page opened again needs no key
    page.reload()
    page.wait_for_selector("#search-form", state="visible")
    assert stored() == key
    # revoked: refused, and forgotten
    with session_scope(settings.database_url) as s:
        revoke_key(s, key)
    page.reload()
    expect(status).to_have_class("error")
    assert "does not take this key" in status.text_content() and stored() is None, status.text_content()
    page.close()


def _library(base: str, h: dict, name: str, files: list[tuple[str, bytes]]) -> dict:
    """A library of these (name, bytes) files, its job ended."""
    lib = requests.post(f"{base}/v1/libraries", json={"name": name}, headers=h, timeout=30).json()
    if files:
        r = requests.post(f"{base}/v1/libraries/{lib['id']}/batches", headers=h, timeout=60,
                          files=[("files", (n, b, "audio/wav")) for n, b in files])
        assert r.status_code == 202, r.text
        _wait_job(base, h, r.json()["job_id"])
    return lib


def _searched(page, base: str, key: str, library: str, words: str):
    """The page opened with the key, `library` chosen and searched for `words`: its status locator, once said."""
    from playwright.sync_api import expect

    page.goto(f"{base}/#key={key}")
    page.wait_for_selector("#search-form", state="visible")
    page.select_option("#library", label=library)
    page.fill("#text", words)
    page.click("#search-form button[type=submit]")
    status = page.locator("#status")
    expect(status).not_to_have_text(re.compile("^searching"), timeout=90_000)  # the text tower loaded first
    return status


def test_a_library_whose_files_all_failed_says_why_nothing_is_found(start_api, new_key, worker, browser):
    """A library of files that all failed to embed was searched as any other: "nothing found for “rain” in broken (2
    files)", and nothing said that none of its files could be searched. It says so as `clapq search` does: the first
    one's name and why, and the command that lists the rest."""
    from playwright.sync_api import expect

    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    lib = _library(base, h, "broken", [(f"bad{i}.wav", b"RIFF" + bytes([i]) * 60) for i in range(2)])
    _library(base, h, "lone", [("lone.wav", b"")])
    job = requests.get(f"{base}/v1/libraries/{lib['id']}/items", headers=h, timeout=30).json()["items"][0]["job_id"]
    page = browser.new_page()
    status = _searched(page, base, key, "broken (2 files)", "rain")
    said = status.text_content()
    assert said.startswith("nothing found for “rain” in broken (2 files): none of its files could be embedded: 2 "
                           "files failed, such as bad"), said
    assert f"(`clapq jobs show {job} --all` lists its job's" in said, said
    assert status.get_attribute("class") == "error" and page.locator("#results").is_hidden()
    page.select_option("#library", label="lone (1 file)")
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text(re.compile("^nothing found"), timeout=60_000)
    assert status.text_content() == ("nothing found for “rain” in lone (1 file): none of its files could be embedded: "
                                     "1 file failed (lone.wav: the file is empty (0 bytes))"), status.text_content()
    page.close()


def test_another_library_chosen_takes_the_results_of_the_last_away(start_api, new_key, worker, browser, tmp_path):
    """The results of a search stayed under the library chosen after it, with the status still naming the library
    searched: the rows looked like the new library's, and "More like this" on one searched the new library by a file
    of the old (seen: "nothing found for sounds like rain_040.wav in allbad"). Choosing another library takes them
    away and says which is chosen, as does using another key (another tenant's libraries), and a search answered
    after either is not shown; nor was the status of one answered after, which named the library chosen since."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    tones = [(f"tone{i}.wav", write(tmp_path / f"t{i}.wav", 1.0, freq=300.0 * (i + 1), seed=i).read_bytes())
             for i in range(2)]
    _library(base, h, "tones", tones)
    _library(base, h, "empty", [])
    page = browser.new_page()
    status = _searched(page, base, key, "tones (2 files)", "a tone")
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(2)
    page.select_option("#library", label="empty (0 files)")
    expect(page.locator("#results")).to_be_hidden()
    assert rows.count() == 0 and status.text_content() == "empty (0 files): search it by words or by a sound", \
        status.text_content()
    # a search answered after another library was chosen: its results are not shown under it
    held = []
    page.route("**/v1/search", lambda route: held.append(route))
    page.select_option("#library", label="tones (2 files)")
    page.click("#search-form button[type=submit]")
    while not held:
        page.wait_for_timeout(100)
    page.select_option("#library", label="empty (0 files)")
    with page.expect_response("**/v1/search"):
        held[0].continue_()
    page.unroute("**/v1/search")
    page.wait_for_timeout(1000)  # its answer read, and the library's asked for, where it was shown
    assert rows.count() == 0 and status.text_content() == "empty (0 files): search it by words or by a sound", \
        status.text_content()
    # back, searched again; then another tenant's key: its libraries, none of the results
    page.select_option("#library", label="tones (2 files)")
    page.click("#search-form button[type=submit]")
    expect(rows).to_have_count(2)
    page.fill("#key", new_key())
    page.click("text=Use key")
    expect(status).to_have_text("no libraries yet: `clapq upload FOLDER --library NAME` makes one")
    assert page.locator("#results").is_hidden() and rows.count() == 0
    page.close()


def test_a_phone_sized_page_shows_each_file_name_whole_on_its_lines(start_api, new_key, worker, browser, tmp_path):
    """On a phone's width (375 px) the table's file column got what the score, the window and the two buttons
    (kept on one line) left it, 42 px: a name such as "rain/session 1/rain_040.wav" came three letters a line,
    eight lines of a row. There, a result is two lines: its name across the page, then its score, window and
    buttons."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    name = "dawn chorus at the fen, take 2.wav"
    _library(base, h, "field", [(name, write(tmp_path / "d.wav", 1.0, freq=2000.0, seed=3).read_bytes())])
    page = browser.new_page(viewport={"width": 375, "height": 740})
    _searched(page, base, key, "field (1 file)", "birds")
    cell = page.locator("#results td.file")
    expect(cell).to_have_text(name)
    table, box = page.locator("#results").bounding_box(), cell.bounding_box()
    line = float(cell.evaluate("c => parseFloat(getComputedStyle(c).lineHeight)"))
    assert box["width"] > 0.8 * table["width"] and box["height"] < 2.5 * line, (box, table, line)
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    for button in ("Play", "More like this"):  # still there, on the page
        b = page.locator("#results").get_by_role("button", name=button).bounding_box()
        assert b and b["x"] >= 0 and b["x"] + b["width"] <= 375, (button, b)
    page.close()


def test_words_or_a_sound_whichever_given_last_and_a_key_refused_midway(start_api, new_key, worker, browser,
                                                                       settings, tmp_path):
    """Three things the page got wrong (helper-121): a sound file chosen after words were typed was searched and the
    words left aside unsaid, and words typed while a sound's search ran searched that sound again (the file stayed
    chosen until its answer came); a key pasted wrong over the one in use was sent from then on, each search refused;
    and the key in use, revoked meanwhile, stayed in the browser's storage (README: a 401 forgets it) with the page
    going on sending it. Whichever of words and a sound was given last is searched; a key pasted wrong leaves the one
    in use; a key refused midway is forgotten, the page asking for one, its player stopped."""
    from playwright.sync_api import expect

    from clapq.keys import revoke_key

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    clip = write(tmp_path / "knock.wav", 1.0, freq=500.0, seed=3)
    _library(base, h, "sounds", [("knock.wav", clip.read_bytes())])
    page = browser.new_page()
    status = _searched(page, base, key, "sounds (1 file)", "a knock")
    assert status.text_content().startswith("1 best for “a knock” in sounds"), status.text_content()
    # a file chosen after words: the words go; words typed after a file: the file goes
    page.fill("#text", "wood")
    page.set_input_files("#clip", str(clip))
    assert page.input_value("#text") == ""
    page.fill("#text", "metal")
    assert page.eval_on_selector("#clip", "c => c.files.length") == 0
    page.set_input_files("#clip", str(clip))
    page.click("#search-form button[type=submit]")
    assert page.eval_on_selector("#clip", "c => c.files.length") == 0  # taken as its search begins
    expect(status).to_have_text(re.compile("^1 best for the sound of knock.wav in sounds"))
    page.fill("#text", "metal")
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text(re.compile("^1 best for “metal” in sounds"))
    # a wrong key pasted over the one in use: refused, and the one in use goes on
    page.fill("#key", "cq_not-a-key")
    page.click("text=Use key")
    expect(status).to_have_text("the API does not take the key pasted (unknown or revoked): the one in use stays")
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text(re.compile("^1 best for “metal” in sounds"))
    assert page.evaluate("localStorage.getItem('clapq.key')") == key
    # the key in use revoked: the next search is refused, and the key forgotten
    with session_scope(settings.database_url) as s:
        revoke_key(s, key)
    page.click("#search-form button[type=submit]")
    expect(status).to_have_class("error")
    assert "does not take this key" in status.text_content(), status.text_content()
    assert page.evaluate("localStorage.getItem('clapq.key')") is None
    assert page.locator("#search-form").is_hidden() and page.locator("#forget").is_hidden()
    page.close()



def _sounds(start_api, new_key, browser, tmp_path):
    """A page of a new key's, its library of one file searched: (page, status, key)."""
    base, key = start_api(), new_key()
    clip = write(tmp_path / "knock.wav", 1.0, freq=500.0, seed=3)
    _library(base, {"Authorization": f"Bearer {key}"}, "sounds", [("knock.wav", clip.read_bytes())])
    page = browser.new_page()
    status = _searched(page, base, key, "sounds (1 file)", "a knock")
    assert status.text_content().startswith("1 best for “a knock” in sounds"), status.text_content()
    return page, status, key


def test_a_key_pasted_is_not_sent_before_the_api_takes_it(start_api, new_key, worker, browser, tmp_path):
    """A key pasted over the one in use was the page's from the moment "Use key" was clicked: a search (or a file
    played) while the API was asked about it sent the pasted key, and where the API refused it, that 401 forgot the
    key in use (README: a key pasted wrong leaves it in use). Until the API takes it, the key in use is sent."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    page, status, key = _sounds(start_api, new_key, browser, tmp_path)
    held = []  # the API's answers about the key pasted, held while a search goes
    for path in ("**/v1/libraries", "**/v1/limits"):
        page.route(path, lambda route: held.append(route))
    page.fill("#key", "cq_not-a-key")
    page.click("text=Use key")
    while len(held) < 2:
        page.wait_for_timeout(100)
    page.fill("#text", "metal")
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text(re.compile("^1 best for “metal” in sounds"))
    for route in held:
        route.continue_()
    expect(status).to_have_text("the API does not take the key pasted (unknown or revoked): the one in use stays")
    assert page.evaluate("localStorage.getItem('clapq.key')") == key
    assert page.locator("#search-form").is_visible() and page.locator("#forget").is_visible()
    page.close()


def test_a_key_forgotten_midway_takes_the_answers_on_their_way_away(start_api, new_key, worker, browser, tmp_path):
    """"Forget key" while a search's answer and a file's link were on their way: the answers came after, the search's
    filled the table of the key forgotten (and, the page asking for the library's counts with no key, the status said
    in red that the API refused the key), and the link played its file. Neither is shown now, nor played."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    page, status, _ = _sounds(start_api, new_key, browser, tmp_path)
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(1)
    held = []
    page.route("**/audio-link", lambda route: held.append(route))
    page.route("**/v1/search", lambda route: held.append(route))
    page.locator("#results").get_by_role("button", name="Play").click()
    page.click("#search-form button[type=submit]")
    while len(held) < 2:
        page.wait_for_timeout(100)
    page.click("#forget")
    expect(status).to_have_text("key forgotten")
    for route in held:
        with page.expect_response(route.request.url):
            route.continue_()
    page.wait_for_timeout(1000)  # the answers read, and the library's counts asked for, where the search went on
    assert status.text_content() == "key forgotten" and status.get_attribute("class") == "", status.text_content()
    assert rows.count() == 0 and page.locator("#results").is_hidden() and page.locator("#player").is_hidden()
    assert page.eval_on_selector("#player", "p => p.getAttribute('src')") is None
    page.close()


def test_a_key_revoked_while_a_file_plays_is_forgotten(start_api, new_key, worker, browser, settings, tmp_path):
    """The key revoked while a file played: its link refused, the page asked for another, and that 401 was said (in
    red, "paste the one `clapq up` ... printed") with the key left in the browser's storage and sent on, where README
    has every 401 forget it, as the page opens or later. It is forgotten, as a search refused is."""
    from playwright.sync_api import expect

    from clapq.keys import revoke_key

    expect.set_options(timeout=90_000)
    page, status, key = _sounds(start_api, new_key, browser, tmp_path)
    page.locator("#results").get_by_role("button", name="Play").click()
    _loaded(page)
    with session_scope(settings.database_url) as s:
        revoke_key(s, key)
    # the file read again, as a player does past its hour or in a long file (routed: not from the browser's cache),
    # its link refused with the key, and a new one asked for
    page.route("**/audio?*", lambda route: route.continue_())
    page.eval_on_selector("#player", "p => p.load()")
    expect(status).to_have_class("error")
    assert status.text_content().startswith("knock.wav: the API does not take this key"), status.text_content()
    assert page.evaluate("localStorage.getItem('clapq.key')") is None
    assert page.locator("#search-form").is_hidden() and page.locator("#player").is_hidden()
    page.close()


def test_a_search_refused_takes_the_last_ones_results_away(start_api, new_key, worker, browser, tmp_path):
    """A search by a file that is not audio was refused, said in red, and the last search's results stayed under that
    error, as if they were this search's. A refused search takes them away."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    page, status, _ = _sounds(start_api, new_key, browser, tmp_path)
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(1)
    (broken := tmp_path / "broken.wav").write_bytes(b"this is not audio at all " * 40)
    page.set_input_files("#clip", str(broken))
    page.click("#search-form button[type=submit]")
    expect(status).to_have_class("error")
    assert status.text_content().startswith("the 'audio' clip 'broken.wav' could not be decoded"), \
        status.text_content()
    assert rows.count() == 0 and page.locator("#results").is_hidden()
    page.close()


def test_a_long_query_is_said_short_and_breaks_no_line(start_api, new_key, worker, browser, tmp_path):
    """The status line said the whole query searched for: 1,000 letters of one word made the page 8,900 px wide (at
    1,000), and 200 words filled eight lines of it above the results. It says the first 80 characters, and a word
    longer than its line breaks, on a phone's width too. A query longer than the service takes is the API's to refuse,
    where the box cut it short."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    page, status, _ = _sounds(start_api, new_key, browser, tmp_path)
    line = float(status.evaluate("s => parseFloat(getComputedStyle(s).lineHeight)"))
    for width in (1000, 375):
        page.set_viewport_size({"width": width, "height": 740})
        for words, said in (("x" * 1000, "“" + "x" * 79 + "…”"), ("rain " * 200, "“" + "rain " * 15 + "rain…”")):
            page.fill("#text", words)
            page.click("#search-form button[type=submit]")
            expect(status).to_have_text(f"1 best for {said} in sounds (1 file)")
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth"), \
                (width, page.evaluate("document.documentElement.scrollWidth"))
            assert status.bounding_box()["height"] < (2.5 if width == 1000 else 4.5) * line, (width, said)
            assert page.input_value("#text") == words  # the whole query stays in its box
    # past the service's max_query_chars the API says so: the box cut a paste at 1,000 characters, whatever the
    # service's limit, and the words cut short were searched for unsaid
    page.fill("#text", "rain " * 240)
    page.click("#search-form button[type=submit]")
    expect(status).to_contain_text("the query is 1199 characters; the limit is 1000")
    assert page.input_value("#text") == "rain " * 240 and page.locator("#results").is_hidden()
    page.close()


def _tones(base: str, key: str, tmp_path: Path, count: int) -> list[str]:
    """A library "tones" of `count` half-second tones, each of its own pitch, embedded: their names."""
    names = [f"tone{i:02d}.wav" for i in range(count)]
    _library(base, {"Authorization": f"Bearer {key}"}, "tones", [
        (n, write(tmp_path / n, 0.5, 16_000, freq=200.0 + 90 * i, seed=i).read_bytes()) for i, n in enumerate(names)])
    return names


def test_a_search_shows_its_results_page_by_page(start_api, new_key, worker, browser, tmp_path):
    """A search showed the first 10 to 100 results, and no more: in a library of hundreds of files, those past them
    could not be seen (the API takes an offset). Next and Previous show the pages after and before, of as many, by
    words and by a sound, Next offered while there are more. The numbers of results offered are none over the
    service's max_k, where each search was refused with max_k set under the 20 chosen."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(CLAPQ_MAX_K="15"), new_key()
    names = _tones(base, key, tmp_path, 25)
    page = browser.new_page()
    status = _searched(page, base, key, "tones (25 files)", "a tone")
    assert page.locator("#k option").all_text_contents() == ["10", "15"] and page.input_value("#k") == "15"
    rows = page.locator("#results tbody tr")
    previous, following = page.locator("#previous"), page.locator("#next")
    for query, what in ((None, "“a tone”"), (tmp_path / names[3], "the sound of tone03.wav")):
        if query:
            page.set_input_files("#clip", str(query))
            page.click("#search-form button[type=submit]")
        expect(status).to_have_text(f"15 best for {what} in tones (25 files)")
        first = rows.locator("td.file").all_text_contents()
        assert len(first) == 15 and previous.is_disabled() and following.is_enabled()
        following.click()
        expect(status).to_have_text(f"results 16–25 for {what} in tones (25 files)")
        second = rows.locator("td.file").all_text_contents()
        assert sorted(first + second) == names, (first, second)
        assert following.is_disabled() and previous.is_enabled()
        previous.click()
        expect(status).to_have_text(f"15 best for {what} in tones (25 files)")
        assert rows.locator("td.file").all_text_contents() == first
    # another library chosen: no pages of the last one's
    page.select_option("#library", label="tones (25 files)")
    page.dispatch_event("#library", "change")
    assert page.locator("#pages").is_hidden()
    page.close()


def test_every_matching_window_of_a_long_recording_is_offered(start_api, new_key, worker, browser, tmp_path):
    """The page showed each file's best window alone (the API's items mode): in a library of long recordings, their
    other moments could not be seen, where `clapq search --windows` and the API's segments mode list every matching
    window, several of one file. "Show: every matching window" lists them, as the API gives them, page by page;
    chosen with results shown, it shows that search's again."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    lib = _library(base, h, "field", [
        ("rec.wav", write(tmp_path / "rec.wav", 75.0, 16_000, freq=400.0, seed=1).read_bytes()),
        ("chirp.wav", write(tmp_path / "chirp.wav", 30.0, 16_000, freq=2500.0, seed=2).read_bytes())])
    page = browser.new_page()
    status = _searched(page, base, key, "field (2 files)", "a hum")
    rows = page.locator("#results tbody tr")
    expect(status).to_have_text(re.compile("^2 best for “a hum” in field"))
    assert sorted(rows.locator("td.file").all_text_contents()) == ["chirp.wav", "rec.wav"]

    page.select_option("#k", "10")
    page.select_option("#mode", label="every matching window")  # the search shown, again
    expect(status).to_have_text(re.compile("^10 best windows for “a hum” in field"))
    api = requests.post(f"{base}/v1/search", headers=h, timeout=60, json={
        "library_id": lib["id"], "text": "a hum", "k": 20, "mode": "segments"}).json()["results"]
    assert len(api) == 19 and sum(r["filename"] == "rec.wav" for r in api) == 14, api  # 10 s windows, 5 s apart

    def shown() -> list[tuple[str, str]]:
        return list(zip(rows.locator("td.file").all_text_contents(), rows.locator("td.window").all_text_contents()))

    def said(results) -> list[tuple[str, str]]:
        return [(r["filename"], _window(r)) for r in results]

    assert shown() == said(api[:10]), (shown(), api)
    page.click("#next")
    expect(status).to_have_text(re.compile("^windows 11–19 for “a hum” in field"))
    assert shown() == said(api[10:20]), (shown(), api)
    # a new search, and "More like this", list windows too
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text(re.compile("^10 best windows for “a hum” in field"))
    rows.filter(has_text="rec.wav").first.locator("text=More like this").click()
    expect(status).to_have_text(re.compile("^5 best windows for sounds like rec.wav in field"))
    assert rows.locator("td.file").all_text_contents() == ["chirp.wav"] * 5
    # and back to each file's best
    page.select_option("#mode", label="each file's best window")
    expect(status).to_have_text(re.compile("^1 best for sounds like rec.wav in field"))
    assert rows.locator("td.file").all_text_contents() == ["chirp.wav"]
    page.close()


def _window(r: dict) -> str:
    """A result's window as the page shows it (of whole seconds): seconds within a file's first minute, past it a
    clock."""
    def clock(t: float, hours: bool) -> str:
        h, rest = divmod(round(t), 3600)
        return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"

    a, b = r["start_s"], r["end_s"]
    return f"{a:g}–{b:g} s" if b <= 60 else f"{clock(a, b >= 3600)}–{clock(b, b >= 3600)}"


def _late_tone(path: Path, silent_s: float, tone_s: float, rate: int = 8_000) -> Path:
    """A FLAC of `silent_s` of silence, then `tone_s` of a 500 Hz tone: an hour of it is a few KB."""
    import numpy as np
    import soundfile as sf

    from tests.audio import signal

    with sf.SoundFile(str(path), "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(silent_s // 10)):
            f.write(np.zeros(rate * 10, dtype=np.float32))
        f.write(signal(tone_s, rate, freq=500.0, seed=7)[:, 0])
    return path


def test_a_window_past_a_files_first_minute_is_shown_as_a_clock(start_api, new_key, worker, browser, tmp_path):
    """A window of a long recording was shown in seconds, "3605–3615 s", to be worked out before one could find it in
    a player. Past a file's first minute it is a clock, m:ss or h:mm:ss (1:00:05–1:00:15), as `clapq search` prints
    it, and so is the time a result is played from; within the first minute, seconds as before."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    lib = _library(base, h, "long", [("hour.flac", _late_tone(tmp_path / "hour.flac", 3600, 30).read_bytes()),
                                     ("minute.flac", _late_tone(tmp_path / "minute.flac", 60, 30).read_bytes())])
    clip = write(tmp_path / "tone.wav", 8.0, 8_000, freq=500.0, seed=8)
    page = browser.new_page()
    status = _searched(page, base, key, "long (2 files)", "a tone")
    page.select_option("#mode", label="every matching window")
    page.set_input_files("#clip", str(clip))
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text(re.compile("^20 best windows for the sound of tone.wav in long"))
    rows = page.locator("#results tbody tr")
    with clip.open("rb") as f:
        api = requests.post(f"{base}/v1/search", headers=h, timeout=60, files={"audio": ("tone.wav", f)},
                            data={"library_id": lib["id"], "k": "20", "mode": "segments"}).json()["results"]

    shown = list(zip(rows.locator("td.file").all_text_contents(), rows.locator("td.window").all_text_contents()))
    # the first 14, of the tone and next to it (the windows of silence after them score the same, in any order)
    assert len(shown) == 20 and shown[:14] == [(r["filename"], _window(r)) for r in api[:14]], (shown, api)
    for form in ("1:00:05–1:00:15", "0:59:55–1:00:05", "1:05–1:15", "0:55–1:05", "50–60 s"):  # each, both ends
        assert form in [w for _, w in shown[:14]], shown
    # played from its window, said as a clock
    row = rows.filter(has_text="hour.flac").filter(has_text="1:00:05–1:00:15")
    row.locator("text=Play").click()
    expect(status).to_have_text("hour.flac, from 1:00:05")
    assert abs(_loaded(page)["t"] - 3605) < 0.5
    page.close()


def test_back_and_forward_show_the_searches_before_and_after(start_api, new_key, worker, browser, tmp_path):
    """A search did not change the page's address: Back after a search, or after "More like this", left the page and
    its results. Each search shown is an entry of the page's history, in its address (never the key): Back and
    Forward show the searches before and after, by words, by a file of the library and by a sound, a page turned,
    and the page before its first search; the address, opened with a key, shows its search."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    h = {"Authorization": f"Bearer {key}"}
    tones = [(f"tone{i}.wav", write(tmp_path / f"t{i}.wav", 1.0, freq=300.0 * (i + 1), seed=i).read_bytes())
             for i in range(12)]
    lib = _library(base, h, "tones", tones)
    page = browser.new_page()
    page.goto("about:blank")
    status = _searched(page, base, key, "tones (12 files)", "a tone")
    rows = page.locator("#results tbody tr")
    expect(status).to_have_text("12 best for “a tone” in tones (12 files)")
    assert "text=a+tone" in page.url, page.url
    assert key not in page.url
    words = rows.locator("td.file").all_text_contents()
    rows.filter(has_text="tone3.wav").locator("text=More like this").click()
    expect(status).to_have_text("11 best for sounds like tone3.wav in tones (12 files)")
    like = rows.locator("td.file").all_text_contents()
    page.select_option("#k", "10")
    page.set_input_files("#clip", str(tmp_path / "t5.wav"))
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text("10 best for the sound of t5.wav in tones (12 files)")
    page.click("#next")
    expect(status).to_have_text("results 11–12 for the sound of t5.wav in tones (12 files)")

    for said in ("10 best for the sound of t5.wav", "11 best for sounds like tone3.wav", "12 best for “a tone”"):
        page.go_back()
        expect(status).to_have_text(f"{said} in tones (12 files)")
    assert rows.locator("td.file").all_text_contents() == words and page.input_value("#text") == "a tone"
    page.go_back()  # the page before its first search: on the page, with no results
    expect(page.locator("#results")).to_be_hidden()
    assert page.url == f"{base}/" and status.text_content() == "tones (12 files): search it by words or by a sound"
    page.go_forward()
    expect(status).to_have_text("12 best for “a tone” in tones (12 files)")
    page.go_forward()
    expect(status).to_have_text("11 best for sounds like tone3.wav in tones (12 files)")
    assert rows.locator("td.file").all_text_contents() == like
    page.go_forward()
    expect(status).to_have_text("10 best for the sound of t5.wav in tones (12 files)")
    # the page opened again holds no sound chosen: said so
    page.go_forward()
    expect(status).to_have_text("results 11–12 for the sound of t5.wav in tones (12 files)")
    page.reload()
    expect(status).to_have_class("error")
    assert status.text_content().startswith("the sound of t5.wav: the page holds a sound chosen only until"), \
        status.text_content()
    page.go_back()
    page.go_back()
    expect(status).to_have_text("11 best for sounds like tone3.wav in tones (12 files)")
    address = page.url
    page.close()

    # the address opened elsewhere, the key pasted: its search, the file named from the API
    other = browser.new_page()
    other.goto(address)
    other.fill("#key", key)
    other.click("text=Use key")
    expect(other.locator("#status")).to_have_text("11 best for sounds like tone3.wav in tones (12 files)")
    assert f"library={lib['id']}" in other.url and key not in other.url
    other.close()


def _focused(page) -> str:
    """Where the keyboard is: the focused element's tag, id and text."""
    return page.evaluate("(e => `${e.tagName}#${e.id} ${e.textContent.trim().slice(0, 60)}`)(document.activeElement)")


def test_the_keyboard_keeps_its_place_after_more_like_this_and_a_page_turned(start_api, new_key, worker, browser,
                                                                              tmp_path):
    """"More like this", Next and Previous, pressed with the keyboard, sent its focus to the page's top: the button
    pressed was taken away with its row, or disabled on the last page (seen with clapq up, tiny model: after More
    like this, and after Next to the last page, the focus was on <body>), and a screen reader's next Tab began again
    at the key's box. Focus goes to the results' heading, which says the results shown; Tab from there is the first
    result's. Nothing found, focus goes to the status that says so."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(CLAPQ_MAX_K="15"), new_key()
    _tones(base, key, tmp_path, 20)
    page = browser.new_page()
    status = _searched(page, base, key, "tones (20 files)", "a tone")
    expect(status).to_have_text("15 best for “a tone” in tones (20 files)")
    rows = page.locator("#results tbody tr")
    heading = page.locator("#found")
    rows.nth(3).locator("text=More like this").focus()
    page.keyboard.press("Enter")
    expect(status).to_have_text(re.compile("^15 best for sounds like tone"))
    expect(heading).to_be_focused()
    assert heading.text_content() == "Results 1–15" and page.locator("#results").get_attribute(
        "aria-labelledby") == "found", heading.text_content()
    page.keyboard.press("Tab")
    assert _focused(page).startswith("BUTTON# Play"), _focused(page)
    page.locator("#next").focus()
    page.keyboard.press("Enter")  # the last page: Next disabled
    expect(status).to_have_text(re.compile("^results 16–19 for sounds like tone"))
    expect(heading).to_be_focused()
    assert heading.text_content() == "Results 16–19"
    page.keyboard.press("Tab")
    assert _focused(page).startswith("BUTTON# Play"), _focused(page)
    page.locator("#previous").focus()
    page.keyboard.press("Space")
    expect(status).to_have_text(re.compile("^15 best for sounds like tone"))
    expect(heading).to_be_focused()
    # the search refused: the status that says why has the focus
    page.route("**/v1/search", lambda route: route.fulfill(status=503, content_type="application/json", body=(
        '{"error": {"code": "database_unavailable", "message": "the database is not answering", "status": 503}}')))
    rows.first.locator("text=More like this").focus()
    page.keyboard.press("Enter")
    expect(status).to_have_text("the database is not answering")
    expect(status).to_be_focused()
    page.close()


def test_the_page_says_no_error_in_the_console(start_api, new_key, worker, browser, tmp_path):
    """Each time it was opened the page put an error in the browser's console, 'Failed to load resource: the server
    responded with a status of 404' (the browser's ask for /favicon.ico, which the page named no icon for), where a
    screen reader's user or anyone looking for what went wrong read it as the page's. It names its own icon, served
    under the policy's img-src 'self' (a data: icon breaks it, said in the console too); opened, searched and a
    result played, the console holds no error."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    clip = write(tmp_path / "knock.wav", 1.0, freq=500.0, seed=3)
    _library(base, {"Authorization": f"Bearer {key}"}, "sounds", [("knock.wav", clip.read_bytes())])
    page, said = browser.new_page(), []
    page.on("console", lambda m: said.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: said.append(str(e)))
    status = _searched(page, base, key, "sounds (1 file)", "a knock")
    expect(status).to_have_text(re.compile("^1 best for “a knock” in sounds"))
    page.locator("#results").get_by_role("button", name="Play").click()
    _loaded(page)
    page.wait_for_timeout(1000)  # the browser asks for its icon once the page has loaded
    assert said == [], said
    icon = page.eval_on_selector("link[rel=icon]", "l => l.href")
    r = requests.get(icon, timeout=30)
    assert icon == f"{base}/icon.svg" and r.status_code == 200 and r.headers["content-type"] == "image/svg+xml", r
    assert r.headers["content-security-policy"] and r.content.startswith(b"<svg"), r.headers
    page.close()


def test_a_screen_reader_hears_which_file_each_button_and_the_player_is_of(start_api, new_key, worker, browser,
                                                                           tmp_path):
    """Each result's buttons were named "Play" and "More like this" alone, and the player nothing (Chromium's
    accessibility tree: an Audio of no name): a screen reader tabbing through 20 results heard "Play, button" 20
    times, not which file or window, and on the player, not what it held. Each button names its file (Play, its
    window too: several windows of one file are several rows), the visible words first; the player, the file and
    window it plays."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    base, key = start_api(), new_key()
    _library(base, {"Authorization": f"Bearer {key}"}, "field", [
        ("rec.wav", write(tmp_path / "rec.wav", 30.0, 16_000, freq=400.0, seed=1).read_bytes())])
    page = browser.new_page()
    status = _searched(page, base, key, "field (1 file)", "a hum")
    page.select_option("#mode", label="every matching window")
    expect(status).to_have_text(re.compile("^5 best windows for “a hum” in field"))
    rows = page.locator("#results tbody tr")
    windows = rows.locator("td.window").all_text_contents()
    assert len(set(windows)) == 5, windows
    for i, window in enumerate(windows):
        row = rows.nth(i)
        expect(row.get_by_role("button", name=f"Play rec.wav, {window}", exact=True)).to_have_count(1)
        expect(row.get_by_role("button", name="More like this: rec.wav", exact=True)).to_have_count(1)
    rows.nth(1).get_by_role("button", name="Play").press("Enter")
    _loaded(page)
    tree = page.context.new_cdp_session(page).send("Accessibility.getFullAXTree")["nodes"]
    players = [n.get("name", {}).get("value") for n in tree if n.get("role", {}).get("value") == "Audio"]
    assert players == [f"rec.wav, {windows[1]}"], players
    page.close()


def _named(page, role: str) -> list[str]:
    """The names of the page's nodes of this role in Chromium's accessibility tree, as a screen reader reads them."""
    tree = page.context.new_cdp_session(page).send("Accessibility.getFullAXTree")["nodes"]
    return [n.get("name", {}).get("value", "") for n in tree if n.get("role", {}).get("value") == role]


def test_a_screen_reader_hears_every_column_of_the_results(start_api, new_key, worker, browser, tmp_path):
    """The results' last column (its buttons') had an empty header: a screen reader said an unnamed column (axe-core
    4.14, run on the page: empty-table-header, the one thing it flagged). It has a name, heard and not shown."""
    page, _, _ = _sounds(start_api, new_key, browser, tmp_path)
    assert _named(page, "columnheader") == ["score", "file", "window", "actions"], _named(page, "columnheader")
    assert page.locator("#results th .unseen").bounding_box()["width"] <= 1
    page.close()


def test_an_error_is_said_at_once_and_the_rest_politely(start_api, new_key, worker, browser, tmp_path):
    """The status line, role=status, said everything politely, errors too: a search refused, a 429, the API not
    answering were heard by a screen reader after whatever it was reading, or not at all. An error is said in an
    alert (role=alert), at once; what the page does or found politely, as before, on the same line."""
    from playwright.sync_api import expect

    expect.set_options(timeout=90_000)
    page, status, _ = _sounds(start_api, new_key, browser, tmp_path)
    polite, alert = page.get_by_role("status"), page.get_by_role("alert")
    expect(polite).to_have_text(re.compile("^1 best for “a knock” in sounds"))
    expect(alert).to_have_text("")
    refusals = (
        (lambda route: route.fulfill(status=429, content_type="application/json", headers={"Retry-After": "3"}, body=(
            '{"error": {"code": "rate_limited", "message": "too many requests: retry in 3 s", "status": 429}}')),
         "too many requests: retry in 3 s"),
        (lambda route: route.fulfill(status=503, content_type="application/json", body=(
            '{"error": {"code": "database_unavailable", "message": "the database is not answering", "status": '
            '503}}')), "the database is not answering"),
        (lambda route: route.abort(), "the API did not answer"))
    for answer, said in refusals:
        page.route("**/v1/search", answer)
        page.click("#search-form button[type=submit]")
        expect(alert).to_contain_text(said)
        expect(polite).to_have_text("")  # the line shows the error alone
        assert status.get_attribute("class") == "error" and said in status.text_content(), status.text_content()
        page.unroute("**/v1/search")
    page.fill("#text", "")
    page.click("#search-form button[type=submit]")
    expect(alert).to_have_text("type words to search for, or choose a sound file")
    page.fill("#text", "metal")
    page.click("#search-form button[type=submit]")
    expect(polite).to_have_text(re.compile("^1 best for “metal” in sounds"))
    expect(alert).to_have_text("")
    assert status.get_attribute("class") == "", status.text_content()
    page.close()


def test_a_key_forgotten_leaves_the_keyboard_on_the_keys_box(start_api, new_key, worker, browser, settings, tmp_path):
    """Forget key pressed with the keyboard hid itself with the search, and the focus fell to the page's end: the
    next Tab left the page (walked in Chromium: Tab after Forget key focused <body> again), and the key's box, all
    there was left to go to, was above. A key refused midway ("More like this" with the key revoked) left it on the
    status, from which Tab left the page too. Either way the focus goes to the key's box."""
    from playwright.sync_api import expect

    from clapq.keys import revoke_key

    expect.set_options(timeout=90_000)
    page, status, key = _sounds(start_api, new_key, browser, tmp_path)
    page.locator("#forget").focus()
    page.keyboard.press("Enter")
    expect(status).to_have_text("key forgotten")
    expect(page.locator("#key")).to_be_focused()
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#search-form", state="visible")
    page.click("#search-form button[type=submit]")
    expect(status).to_have_text(re.compile("^1 best for “a knock” in sounds"))
    with session_scope(settings.database_url) as s:
        revoke_key(s, key)
    page.locator("#results").get_by_role("button", name="More like this").press("Enter")
    expect(status).to_contain_text("does not take this key")
    expect(page.locator("#key")).to_be_focused()
    page.keyboard.press("Tab")
    assert _focused(page) == "BUTTON# Use key", _focused(page)
    page.close()
