"use strict";
// clapq's search page (served at / by api.web): a client of the HTTP API like any other, with the key in the
// Authorization header. Every name it shows is set as text (textContent), never parsed as HTML.

const $ = (id) => document.getElementById(id);
// the API's root is where this page is served: `/`, or the path a proxy serves clapq under (`/clapq/`)
const ROOT = new URL(".", location.href);
const at = (path) => new URL(path.replace(/^\//, ""), ROOT).href;
const KEY = "clapq.key";
const LIBRARY = "clapq.library";
let key = "";
let maxK = 1000; // the most results a search gives (GET /v1/limits' max_k), and its offset 10 times that

// the status line: an error in its alert (a screen reader says it at once), anything else in its polite part, the
// other emptied, so that the line shows the one said last
function say(text, error = false) {
  $("said").textContent = error ? "" : text;
  $("alarm").textContent = error ? text : "";
  $("status").className = error ? "error" : "";
}

// the page without a key: asked for one, nothing of the last key's left on it (its results, its file playing), nor
// to come (a search's answer or a file's link on its way filled the table or played after, and the search's next
// request, sent with no key, said in red that the API refused it). The keyboard's place, where it was on what goes
// (Forget key itself, a result's button, the search's box) or lost already, goes to the key's box: it fell to the
// page's end, and the next Tab left the page, with nothing of it to go to but the key's box above
function forget() {
  const lost = document.activeElement === document.body || ["forget", "search-form", "results", "pages", "player"]
    .some((id) => $(id).contains(document.activeElement));
  localStorage.removeItem(KEY);
  key = "";
  $("key").placeholder = "cq_...";
  $("forget").hidden = true;
  $("search-form").hidden = true;
  cleared();
  asked = null;
  playing = null;
  $("player").pause();
  $("player").hidden = true;
  if (lost) $("key").focus();
}

function failed(error) {
  // the key in use refused (revoked meanwhile): forgotten, as at the page's start, where it stayed in the browser's
  // storage and the page went on sending it
  if (error.status === 401) forget();
  say(error.message, true);
}

async function answer(r) {
  if (r.status === 401) {
    const refused = new Error("the API does not take this key (unknown or revoked): paste the one `clapq up` or "
                              + "`clapq keys create` printed");
    refused.status = 401;
    throw refused;
  }
  if (r.ok) return r;
  let message = `${r.status} ${r.statusText}`;
  try {
    message = (await r.json()).error.message || message;
  } catch (e) { /* not the API's envelope */ }
  throw new Error(message);
}

// a request with the key in use (or `as`, a key pasted and not taken yet), answered (`answer`) or said as the API
// not answering
async function send(path, init, as = key) {
  let r;
  try {
    r = await fetch(at(path), { ...init, headers: { Authorization: `Bearer ${as}`, ...(init.headers || {}) } });
  } catch (e) {
    throw new Error(`the API did not answer (${e.message}): is clapq still running?`);
  }
  return answer(r);
}

async function call(method, path, body, as = key) {
  const headers = {};
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  return (await send(path, { method, headers, body: payload }, as)).json();
}

function files(n) {
  return `${n.toLocaleString("en")} ${n === 1 ? "file" : "files"}`;
}

function seconds(s) {
  return Number(s).toFixed(1).replace(/\.0$/, "");
}

// a time in a file past its first minute as a clock, m:ss or h:mm:ss to the tenth (1:02:05, 2:59:50.5), where
// "3725–3735 s" in a long recording was to be worked out before a player could be sent there
function clock(s, hours) {
  const tenths = Math.round(Number(s) * 10);
  const h = Math.floor(tenths / 36000);
  const m = Math.floor((hours ? tenths % 36000 : tenths) / 600); // 0:59:59.96 an hour, 60:00 without one
  const secs = String(Math.floor((tenths % 600) / 10)).padStart(2, "0") + (tenths % 10 ? `.${tenths % 10}` : "");
  return hours ? `${h}:${String(m).padStart(2, "0")}:${secs}` : `${m}:${secs}`;
}

// a result's window as `clapq search` says it: seconds within a file's first minute (15–25 s), past it a clock, one
// form for both ends (0:59:55–1:00:05)
function spanned(start, end) {
  if (Number(end) <= 60) return `${seconds(start)}–${seconds(end)} s`;
  const hours = Math.round(Number(end) * 10) >= 36000;
  return `${clock(start, hours)}–${clock(end, hours)}`;
}

// the time a window starts at, as the window says it (spanned)
function moment(start, end) {
  return spanned(start, end).split("–")[0] + (Number(end) <= 60 ? " s" : "");
}

// words searched for, as the status line says them: their first 80 characters (the whole stay in their box), where a
// query of 1,000 filled eight lines of it above the results
const QUOTED_MOST = 80;

function quoted(text) {
  const chars = [...text]; // by characters, never half a pair of UTF-16 surrogates
  return `“${chars.length > QUOTED_MOST ? `${chars.slice(0, QUOTED_MOST - 1).join("").trimEnd()}…` : text}”`;
}

// a file as `clapq search` names it: its path in the folder it was uploaded from, where it has one
function shown(item) {
  return typeof (item.metadata || {}).path === "string" ? item.metadata.path : item.filename;
}

// the search whose results the table may show: one begun later, another library chosen or another key used take
// the place of one still waiting for its answer
let searching = 0;
// the search the table shows, for its pages ({query, what, k, offset}); null where it shows none
let paged = null;

function cleared() {
  searching += 1;
  $("results").tBodies[0].replaceChildren();
  $("results").hidden = true;
  $("pages").hidden = true;
  paged = null;
}

// the numbers of results a page offers, none over what the service gives (max_k), where each search was refused with
// max_k set under the 20 chosen
function sizes() {
  const select = $("k");
  const was = Number(select.value) || 20;
  const offered = [...new Set([10, 20, 50, 100].map((n) => Math.min(n, maxK)))];
  select.replaceChildren(...offered.map((n) => new Option(String(n), String(n))));
  const fit = offered.filter((n) => n <= was);
  select.value = String(fit.length ? fit[fit.length - 1] : offered[0]);
}

async function useKey(given) {
  let listed, limits;
  try {
    // the key in use until the API takes this one: a search or a file played meanwhile sent the key pasted, and
    // where that was refused, its 401 forgot the key in use
    [listed, limits] = await Promise.all([call("GET", "/v1/libraries", undefined, given),
                                          call("GET", "/v1/limits", undefined, given)]);
  } catch (error) {
    if (!key) throw error;
    // a key pasted over one in use and not taken: that one goes on, where the page sent the new one from then on
    if (error.status === 401) throw new Error("the API does not take the key pasted (unknown or revoked): the one "
                                              + "in use stays");
    throw error;
  }
  key = given;
  localStorage.setItem(KEY, key);
  $("key").value = "";
  $("key").placeholder = `${key.slice(0, 10)}…`;
  $("forget").hidden = false;
  maxK = limits.max_k || maxK;
  sizes();
  const served = limits.model ? limits.model.id : null;
  const select = $("library");
  select.replaceChildren();
  for (const lib of listed.libraries) {
    const option = document.createElement("option");
    option.value = lib.id;
    const other = served !== null && lib.model && lib.model.id !== served;
    option.textContent = `${lib.name} (${files(lib.item_count)})`
      + (other ? ": of another model than this service runs (`clapq reembed` it)" : "");
    option.disabled = other;
    select.append(option);
  }
  const last = localStorage.getItem(LIBRARY);
  if (last && [...select.options].some((o) => o.value === last && !o.disabled)) select.value = last;
  cleared(); // another key's results were left beside its own libraries
  $("search-form").hidden = false;
  if (!listed.libraries.length) {
    say("no libraries yet: `clapq upload FOLDER --library NAME` makes one");
  } else {
    say(`${listed.libraries.length === 1 ? "1 library" : `${listed.libraries.length} libraries`}; `
        + "search one by words or by a sound");
  }
}

function row(result) {
  const tr = document.createElement("tr");
  const span = result.segment || result;
  const name = shown(result);
  const when = spanned(span.start_s, span.end_s);
  const cells = [result.score.toFixed(4), name, when];
  for (const [i, text] of cells.entries()) {
    const td = document.createElement("td");
    td.className = ["score", "file", "window"][i];
    td.textContent = text;
    tr.append(td);
  }
  const actions = document.createElement("td");
  actions.className = "actions";
  const playButton = document.createElement("button");
  playButton.type = "button";
  playButton.textContent = "Play";
  // named by its file and window, as a screen reader says a button alone ("Play", twenty times in a table), the
  // words shown first
  playButton.setAttribute("aria-label", `Play ${name}, ${when}`);
  playButton.addEventListener("click", () => play(result.item_id, name, span).catch(failed));
  const likeButton = document.createElement("button");
  likeButton.type = "button";
  likeButton.textContent = "More like this";
  likeButton.setAttribute("aria-label", `More like this: ${name}`);
  likeButton.addEventListener("click", () => kept(likeButton, search({ item_id: result.item_id },
                                                                    `sounds like ${name}`)));
  actions.append(playButton, " ", likeButton);
  tr.append(actions);
  return tr;
}

// why a library none of whose files could be embedded (all failed or cancelled) has nothing to find, as `clapq
// search` says it; "" where some are embedded or still on their way
async function noneEmbedded(libraryId, counts) {
  if (counts.done || counts.queued || counts.running || !(counts.failed || counts.cancelled)) return "";
  const why = [];
  if (counts.failed) {
    const path = `/v1/libraries/${encodeURIComponent(libraryId)}/items?status=failed&limit=1`;
    const [first] = (await call("GET", path)).items;
    if (!first) {
      why.push(`${files(counts.failed)} failed`);
    } else {
      const said = `${shown(first)}: ${first.error || "no reason given"}`;
      why.push(counts.failed === 1 ? `1 file failed (${said})` : `${files(counts.failed)} failed, such as ${said} `
        + `(\`clapq jobs show ${first.job_id} --all\` lists its job's; \`clapq jobs\` the others)`);
    }
  }
  if (counts.cancelled) why.push(`${files(counts.cancelled)} cancelled (upload them again to embed them)`);
  return `none of its files could be embedded: ${why.join(" and ")}`;
}

// a page of `k` results from `offset`, where a search showed its first `k` (100 at most) and none past them, in a
// library of hundreds of files; `mode` "segments": every matching window, several of one file (the API's mode), where
// each file's best window alone left a long recording's other moments unseen
async function search(query, what, offset = 0, k = Number($("k").value), mode = $("mode").value, how = "push") {
  const library_id = $("library").value;
  if (!library_id) throw new Error("no library to search: `clapq upload FOLDER --library NAME` makes one");
  localStorage.setItem(LIBRARY, library_id);
  const library = $("library").selectedOptions[0].textContent;
  const mine = ++searching;
  say(`searching for ${what}…`);
  // one result past the page, where the API gives that many, says whether there is a next page
  const fields = { library_id, k: Math.min(k + 1, maxK), offset, ...(mode === "segments" ? { mode } : {}) };
  let found;
  try {
    if (query.clip) {
      const form = new FormData();
      for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
      form.append("audio", query.clip);
      found = await call("POST", "/v1/search", form);
    } else {
      found = await call("POST", "/v1/search", { ...fields, ...query });
    }
  } catch (error) {
    // one begun since (or another library, another key) is what the page shows: this one's error is not said
    if (mine !== searching) return;
    // refused (a sound that is not audio, a 503): the last search's results were left under its error, as if its own
    cleared();
    throw error;
  }
  if (mine !== searching) return;
  const results = found.results.slice(0, k);
  const body = $("results").tBodies[0];
  body.replaceChildren(...results.map(row));
  $("found").textContent = `${mode === "segments" ? "Windows" : "Results"} ${offset + 1}–${offset + results.length}`;
  $("results").hidden = !results.length;
  // a next page where the API gave more (or a whole page, asked for max_k) and takes its offset (10 × max_k at most)
  const more = (found.results.length > k || (fields.k === k && results.length === k)) && offset + k <= 10 * maxK;
  paged = { query, what, k, offset, mode };
  remember(entry(paged, library_id), how);
  $("previous").disabled = offset === 0;
  $("next").disabled = !more;
  $("pages").hidden = !offset && !more;
  // files not embedded yet are not found: said, with why they do not move where the service knows (as `clapq search`)
  const { counts, waiting } = await call("GET", `/v1/libraries/${encodeURIComponent(library_id)}`);
  const none = found.results.length || offset ? "" : await noneEmbedded(library_id, counts);
  if (mine !== searching) return;
  const left = counts.queued + counts.running;
  const still = left ? `; ${files(left)} of it still to be embedded${waiting ? ` (${waiting})` : ""}` : "";
  const windows = mode !== "segments" ? "" : results.length === 1 ? " window" : " windows";
  let said = `${results.length} best${windows} for ${what} in ${library}`;
  if (!results.length) {
    said = `nothing found for ${what} in ${library}${offset ? ` past the first ${offset}` : ""}`;
  } else if (offset) {
    said = `${windows ? "windows" : "results"} ${offset + 1}–${offset + results.length} for ${what} in ${library}`;
  }
  say(said + (none ? `: ${none}` : still), Boolean(none));
  return true;
}

// a search begun from a button it takes away (a result's "More like this", its row replaced; Next or Previous,
// disabled on the first or last page): the keyboard's place fell to the page's top, and a screen reader's next Tab
// began again at the key's box. It goes to the results' heading (Tab from there is the first result's), or to the
// status where none are shown (nothing found, the search refused), unless it was put elsewhere meanwhile
function kept(button, searched) {
  const here = () => [button, document.body, null].includes(document.activeElement);
  searched.then((shown) => {
    if (!shown || !here()) return;
    $("status").scrollIntoView({ block: "nearest" });
    ($("results").hidden ? $("status") : $("found")).focus();
  }, (error) => {
    const was = here();
    failed(error);
    if (was && here()) $("status").focus(); // not where the key refused (a 401) put it on the key's box
  });
}

// the page before or after the one shown, of as many results, said from its top
function turn(by) {
  if (!paged) return;
  const { query, what, k, offset, mode } = paged;
  kept($(by < 0 ? "previous" : "next"), search(query, what, Math.max(0, offset + by * k), k, mode));
}

// each search shown is an entry of the page's history, in its address: Back and Forward show the one before and
// after, where Back left the page and its results. The address holds the library, the words or the file searched by,
// the page and what is shown (`#library=ID&text=rain&k=20&offset=20&mode=segments`), never the key; a sound chosen,
// which an address cannot hold, is held by the page (`clip=TOKEN`) until it is closed or opened again.
const clips = new Map();
const PAGE = Math.random().toString(36).slice(2, 10); // a token of another page's (opened again) is none of these
let chosen = 0;

function entry({ query, what, k, offset, mode }, library) {
  const e = { library, k, offset, mode, what };
  if (query.clip) {
    if (!query.token) clips.set(query.token = `${PAGE}-${++chosen}`, query.clip);
    e.clip = query.token;
  } else if (query.item_id) {
    e.item = query.item_id;
  } else {
    e.text = query.text;
  }
  return e;
}

function remember(e, how) {
  const p = new URLSearchParams({ library: e.library });
  for (const name of ["text", "item", "clip"]) if (e[name] !== undefined) p.set(name, e[name]);
  p.set("k", String(e.k));
  if (e.offset) p.set("offset", String(e.offset));
  if (e.mode === "segments") p.set("mode", e.mode);
  const url = `#${p}`;
  if (how === "push" && url !== location.hash) history.pushState({ search: e }, "", url);
  else if (how) history.replaceState({ search: e }, "", url);
}

// an entry of no search (another library chosen, another key): Back shows the search before it
function unremembered(how = "push") {
  const bare = location.pathname + location.search;
  if (how === "push" && history.state && history.state.search) history.pushState(null, "", bare);
  else if (how !== "push" && location.hash) history.replaceState(null, "", bare);
}

// the search of the address, as given there (a link, the page opened again)
function addressed() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (!p.get("library") || !["text", "item", "clip"].some((name) => p.get(name))) return null;
  const e = { library: p.get("library"), k: Number(p.get("k")), offset: Number(p.get("offset")), mode: p.get("mode") };
  for (const name of ["text", "item", "clip"]) if (p.get(name)) e[name] = p.get(name);
  return e;
}

// the search of the history's entry shown again (Back, Forward, the page opened again); an entry of none: the page
// as before it
async function restore() {
  const e = (history.state && history.state.search) || addressed();
  const option = e && [...$("library").options].find((o) => o.value === e.library && !o.disabled);
  if (!option) {
    // a library of another key's (a link of another's), or none: the page as a key leaves it
    if (e) unremembered("replace");
    if (paged) {
      cleared();
      say(`${$("library").selectedOptions[0].textContent}: search it by words or by a sound`);
    }
    return;
  }
  $("library").value = e.library;
  const mode = e.mode === "segments" ? "segments" : "items";
  $("mode").value = mode;
  const k = Math.min(Math.max(1, Math.floor(e.k) || Number($("k").value)), maxK);
  if ([...$("k").options].some((o) => Number(o.value) === k)) $("k").value = String(k);
  const offset = Math.min(Math.max(0, Math.floor(e.offset) || 0), 10 * maxK);
  if (e.text) {
    $("text").value = e.text;
    $("clip").value = "";
  }
  let query;
  let what = e.what;
  if (e.clip) {
    const clip = clips.get(e.clip);
    if (!clip) {
      cleared();
      say(`${what || "the sound searched for"}: the page holds a sound chosen only until it is opened again; choose `
          + "it again", true);
      return;
    }
    query = { clip, token: e.clip };
  } else if (e.item) {
    query = { item_id: e.item };
    if (!what) {
      try {
        what = `sounds like ${shown(await call("GET", `/v1/items/${encodeURIComponent(e.item)}`))}`;
      } catch (error) {
        if (error.status === 401) throw error;
        what = "sounds like a file"; // the search says why, where the item is none of this key's
      }
    }
  } else {
    query = { text: e.text };
  }
  await search(query, what || quoted(e.text), offset, k, mode, "replace");
}

// what the player plays ({itemId, name, at: the time it plays from once it has read the file's duration}), and the
// file whose link was asked for last (a click on another while one is asked for plays the other)
let playing = null;
let asked = null;

// a link to the item's audio that the player streams (range requests: it reads what it plays, and seeks), as it
// cannot send the key; it expires in an hour
async function link(itemId) {
  return at((await call("POST", `/v1/items/${encodeURIComponent(itemId)}/audio-link`)).url);
}

async function play(itemId, name, { start_s: startS, end_s: endS }) {
  say(`loading ${name}…`);
  const now = { itemId, name, at: Number(startS) };
  asked = now;
  const src = await link(itemId);
  if (asked !== now) return;
  playing = now;
  const player = $("player");
  player.hidden = false;
  player.dataset.item = itemId;
  player.setAttribute("aria-label", `${name}, ${spanned(startS, endS)}`); // what a screen reader says it holds
  player.src = src;
  say(`${name}, from ${moment(startS, endS)}`);
}

function started() {
  const player = $("player");
  if (!playing) return;
  player.currentTime = playing.at;
  playing.renewed = false;
  player.play().catch(() => {}); // a browser may refuse to start sound on its own: its controls can
}

// the player could not read or play its file: where the API refuses its link because it expired (a file played
// or paused past its hour), a new link, and on from where it was; where it refuses it for another reason (the
// file deleted meanwhile), the API's words; where it does not answer, that; else the file's format
async function unplayable() {
  const player = $("player");
  const now = playing;
  if (!now) return;
  let r = null;
  try {
    r = await fetch(player.src, { headers: { Range: "bytes=0-0" } });
  } catch (e) { /* said below */ }
  if (playing !== now) return;
  if (r && r.status === 401 && !now.renewed) {
    now.renewed = true; // until the new link plays: one refused again is said
    now.at = player.currentTime;
    try {
      const src = await link(now.itemId);
      if (playing === now) player.src = src;
    } catch (e) {
      if (playing !== now) return;
      // said by failed(), which forgets a key the API refuses (revoked meanwhile), as any 401 of the page's
      e.message = `${now.name}: ${e.message}`;
      failed(e);
    }
    return;
  }
  let why = "this browser cannot play its format (download it with `curl` or the API)";
  if (!r) {
    why = "the API did not answer: is clapq still running?";
  } else if (!r.ok) {
    try {
      why = (await r.json()).error.message;
    } catch (e) {
      why = `${r.status} ${r.statusText}`;
    }
  }
  if (playing === now) say(`${now.name}: ${why}`, true);
}

function start() {
  $("player").addEventListener("loadedmetadata", started);
  $("player").addEventListener("error", () => unplayable().catch(failed));
  $("previous").addEventListener("click", () => turn(-1));
  $("next").addEventListener("click", () => turn(1));
  window.addEventListener("popstate", () => {
    if (key) restore().catch(failed);
  });
  // the search shown, again from its first page, as the choice made shows it
  $("mode").addEventListener("change", () => {
    if (paged) search(paged.query, paged.what).catch(failed);
  });
  $("library").addEventListener("change", () => {
    cleared();
    unremembered();
    say(`${$("library").selectedOptions[0].textContent}: search it by words or by a sound`);
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const given = $("key").value.trim();
    if (!given) {
      say("paste the API key `clapq up` printed (API key: cq_...)", true);
      return;
    }
    useKey(given).then(restore).catch(failed);
  });
  $("forget").addEventListener("click", () => {
    forget();
    unremembered("replace");
    say("key forgotten");
  });
  // words or a sound, whichever was given last: a file chosen after words were typed was searched and the words
  // left aside unsaid, and words typed while a sound's search ran searched that sound again
  $("clip").addEventListener("change", () => { if ($("clip").files.length) $("text").value = ""; });
  $("text").addEventListener("input", () => { $("clip").value = ""; });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const clip = $("clip").files[0];
    const text = $("text").value.trim();
    if (clip) {
      $("clip").value = "";
      search({ clip }, `the sound of ${clip.name}`).catch(failed);
    } else if (text) {
      search({ text }, quoted(text)).catch(failed);
    } else {
      say("type words to search for, or choose a sound file", true);
    }
  });
  // a key given in the address (http://host:8000/#key=cq_...) is used and taken out of it at once
  const given = new URLSearchParams(location.hash.slice(1)).get("key");
  if (given) history.replaceState(null, "", location.pathname);
  const stored = given || localStorage.getItem(KEY);
  if (stored) {
    // forgotten only where the API refuses it (failed): not where it did not answer (clapq stopped) or answered 503
    useKey(stored).then(restore).catch(failed);
  } else {
    say("paste the API key `clapq up` printed (API key: cq_...)");
  }
}

start();
