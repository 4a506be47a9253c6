"""CLAPQ_MODEL as a hub id: the checkpoint is fetched through huggingface_hub from a Hub that this test serves
itself (HF_ENDPOINT), laid out as the real one answers, so no network is needed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "c" * 40


def _hub(repos: dict[str, Path]):
    """A minimal Hub: each repo's revision, its file tree and its files (by `resolve`), from a folder."""

    class Hub(BaseHTTPRequestHandler):
        def _answer(self, head: bool) -> None:
            path = self.path.split("?")[0]
            for repo, folder in repos.items():
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                if path == f"/api/models/{repo}/revision/main":
                    return self._send(json.dumps({"id": repo, "sha": COMMIT,
                                                  "siblings": [{"rfilename": f} for f in files]}).encode(), head)
                if path.startswith(f"/api/models/{repo}/tree/"):
                    return self._send(json.dumps([
                        {"type": "file", "path": f, "size": (folder / f).stat().st_size,
                         "oid": hashlib.sha1((folder / f).read_bytes()).hexdigest()} for f in files]).encode(), head)
                prefix = f"/{repo}/resolve/{COMMIT}/"
                if path.startswith(prefix) and path[len(prefix):] in files:
                    body = (folder / path[len(prefix):]).read_bytes()
                    self.server.fetched.append(path[len(prefix):])  # type: ignore[attr-defined]
                    return self._send(body, head, {"X-Repo-Commit": COMMIT,
                                                   "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send(self, body: bytes, head: bool, headers: dict | None = None) -> None:
            self.send_response(200)
            for k, v in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self._answer(False)

        def do_HEAD(self):  # noqa: N802
            self._answer(True)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.fetched = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


_RESOLVE = """import json, sys
from clapq.checkpoint import resolve
ckpt = resolve(sys.argv[1])
print(json.dumps({"path": str(ckpt.path), "weights_sha256": ckpt.weights_sha256}))
"""


def _resolve(name: str, hf_home: Path, endpoint: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), PYTHONPATH=str(ROOT))
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    else:
        env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, "-c", _RESOLVE, name], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _pytorch_only(tiny_model: Path, into: Path) -> Path:
    """The checkpoint as laion/clap-htsat-unfused's main branch has it: pytorch_model.bin, no safetensors."""
    import torch
    from safetensors.torch import load_file

    into.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, into / f.name)
    torch.save(load_file(str(tiny_model / "model.safetensors")), into / "pytorch_model.bin")
    return into


@pytest.mark.timeout(300)
def test_hub_checkpoint_with_pytorch_weights_only(tiny_model, tmp_path):
    """A hub repo whose weights are pytorch_model.bin alone (laion/clap-htsat-unfused, the default model) is
    downloaded with them: only *.safetensors were fetched, and every start failed with 'no weights'. It is the
    same model as a copy of the repo in a directory (the README's `hf download ... --local-dir DIR`), and
    found again offline, from the cache."""
    repo = _pytorch_only(tiny_model, tmp_path / "repo")
    server = _hub({"laion/clap-test-bin": repo})
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        got = _resolve("laion/clap-test-bin", tmp_path / "hf", endpoint)
        assert (Path(got["path"]) / "pytorch_model.bin").is_file()
        assert got["weights_sha256"] == _resolve(str(repo), tmp_path / "hf", None)["weights_sha256"]
        assert _resolve("laion/clap-test-bin", tmp_path / "hf", None) == got  # offline: the cache

        from transformers import ClapModel

        ClapModel.from_pretrained(got["path"])  # what the workers and the API load
    finally:
        server.shutdown()


@pytest.mark.timeout(300)
def test_hub_checkpoint_with_safetensors_fetches_no_pytorch_copy(tiny_model, tmp_path):
    """Where a repo has safetensors (which transformers loads), its PyTorch copy is not downloaded besides."""
    repo = _pytorch_only(tiny_model, tmp_path / "repo")
    shutil.copy(tiny_model / "model.safetensors", repo / "model.safetensors")
    server = _hub({"laion/clap-test-both": repo})
    try:
        got = _resolve("laion/clap-test-both", tmp_path / "hf", f"http://127.0.0.1:{server.server_address[1]}")
        assert (Path(got["path"]) / "model.safetensors").is_file()
        assert "pytorch_model.bin" not in server.fetched and "model.safetensors" in server.fetched
        assert not (Path(got["path"]) / "pytorch_model.bin").exists()
        # the same model as a copy of the whole repo (`hf download --local-dir`, both formats), whose identity
        # counted the PyTorch copy that transformers does not load: a worker started on it served another model
        assert got["weights_sha256"] == _resolve(str(repo), tmp_path / "hf", None)["weights_sha256"]
    finally:
        server.shutdown()


def test_weights_in_both_formats_are_the_model_of_those_loaded_and_old_rows_keep_theirs(tiny_model, settings,
                                                                                      tmp_path):
    """A directory of safetensors with a PyTorch copy beside them (a checkpoint converted, a Hub cache another
    tool completed) is the model of the safetensors, which transformers loads: its identity counted the copy
    too, so adding one locked the libraries out of their model (409 model_mismatch). A row an earlier version
    made under that identity is still found first, so no library changes model."""
    import torch
    from safetensors.torch import load_file, save_file

    from clapq.checkpoint import _hash_files, register_model, resolve
    from clapq.db import session_scope
    from clapq.models import EmbeddingModel

    both = tmp_path / "both"
    shutil.copytree(tiny_model, both)
    torch.save(load_file(str(tiny_model / "model.safetensors")), both / "pytorch_model.bin")
    alone, with_copy = resolve(str(tiny_model)), resolve(str(both))
    assert with_copy.weights_sha256 == alone.weights_sha256 and alone.earlier_sha256 is None
    assert with_copy.earlier_sha256 == _hash_files([both / "model.safetensors", both / "pytorch_model.bin"])
    with session_scope(settings.database_url) as s:
        assert register_model(s, with_copy) == register_model(s, alone)
    # other weights, of both formats, registered by an earlier version (under the hash of both files), and
    # also as the safetensors alone (a Hub fetch): the earlier row stays this directory's model
    older = tmp_path / "older"
    shutil.copytree(tiny_model, older)
    weights = {k: v + 1 if v.is_floating_point() else v
               for k, v in load_file(str(tiny_model / "model.safetensors")).items()}
    save_file(weights, older / "model.safetensors", metadata={"format": "pt"})
    torch.save(weights, older / "pytorch_model.bin")
    ckpt = resolve(str(older))
    with session_scope(settings.database_url) as s:
        rows = []
        for sha in (ckpt.weights_sha256, ckpt.earlier_sha256):
            row = EmbeddingModel(name=f"{older}-{len(rows)}", weights_sha256=sha, dim=ckpt.dim)
            s.add(row)
            s.flush()
            rows.append(row.id)
        assert register_model(s, ckpt) == rows[1]
        s.rollback()  # the rows made here stay out of the session's database


@pytest.mark.timeout(300)
def test_a_cached_snapshot_without_weights_is_fetched_again(tiny_model, tmp_path):
    """A cache that holds the repo's files but no weights (what a start before pytorch_model.bin was fetched
    left behind: every `make up` of the default model failed with 'no weights', helper-58) is completed from
    the Hub when it can be reached: the cache alone was taken, as it had a config.json, and the start failed
    with 'no weights' again, whatever the network, until the cache was deleted by hand (huggingface_hub
    before 2.x, or a cache it wrote, returns a snapshot folder offline without asking whether it is whole)."""
    repo = _pytorch_only(tiny_model, tmp_path / "repo")
    server = _hub({"laion/clap-test-stale": repo})
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint)
        old = ("import sys; from huggingface_hub import snapshot_download; "
               "snapshot_download(sys.argv[1], allow_patterns=['*.json', '*.txt', '*.safetensors', '*.model'])")
        r = subprocess.run([sys.executable, "-c", old, "laion/clap-test-stale"], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "pytorch_model.bin" not in server.fetched, r.stderr[-2000:]
        # as huggingface_hub before 2.x leaves it (pyproject takes >=0.24): no cached file listing, by which
        # newer ones tell a partial snapshot from a whole one
        for trees in (tmp_path / "hf").rglob("trees"):
            shutil.rmtree(trees)
        got = _resolve("laion/clap-test-stale", tmp_path / "hf", endpoint)
        assert (Path(got["path"]) / "pytorch_model.bin").is_file()
        assert _resolve("laion/clap-test-stale", tmp_path / "hf", None) == got  # offline: the cache
    finally:
        server.shutdown()


def _replace_weights(ckpt_dir: Path) -> None:
    """Other weights written over the checkpoint's, in place (another checkpoint copied over it), as a file of its
    own: the audio projection drawn anew, so that its vectors are another model's."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(ckpt_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    for k, v in weights.items():
        if k.startswith("audio_projection") and v.is_floating_point():
            weights[k] = torch.randn(v.shape, generator=g)
    (ckpt_dir / "model.safetensors").unlink()
    save_file(weights, str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})


def test_weights_replaced_while_the_api_runs_are_never_searched_as_the_old_model(tiny_model, env, new_key,
                                                                                 tmp_path, caplog):
    """The API takes its model's identity at its first request and loads its audio tower at the first search by a
    clip, from the checkpoint's directory. Weights replaced there in between were loaded under the old identity, so
    a clip was embedded by one model and compared with the vectors of another, each score meaningless, and
    /readyz said the model was ok. Now the clip search is a 503 model_unavailable saying the weights changed, and
    so is /readyz (without the directory's path: it takes no key), until the API is restarted; a file only touched
    (the same bytes) changes nothing."""
    from api import create_app
    from clapq.settings import Settings
    from tests.audio import write
    from tests.conftest import auth

    ckpt_dir = tmp_path / "clap"
    shutil.copytree(tiny_model, ckpt_dir)
    client = create_app(Settings.from_env({**env, "CLAPQ_MODEL": str(ckpt_dir)})).test_client()
    h = auth(new_key())
    lib = client.post("/v1/libraries", json={"name": "replaced"}, headers=h).get_json()["id"]
    clip = write(tmp_path / "q.wav", 2.0, 48_000)

    def by_clip():
        return client.post("/v1/search", data={"library_id": lib, "audio": (open(clip, "rb"), "q.wav")}, headers=h,
                           content_type="multipart/form-data")

    os.utime(ckpt_dir / "model.safetensors", ns=(1, 1))  # touched: the same bytes, the same model
    assert client.get("/readyz").get_json()["checks"]["model"] == "ok"
    _replace_weights(ckpt_dir)
    with caplog.at_level(logging.WARNING, logger="api.health"):
        ready = client.get("/readyz")
    said = ready.get_json()["checks"]["model"]
    assert ready.status_code == 503 and "changed while clapq ran" in said, ready.get_json()
    # /readyz takes no key: the checkpoint's directory is the log's to say, not whoever asks (it named it)
    assert str(ckpt_dir) not in said and "the weights in <path> changed" in said, said
    assert any(str(ckpt_dir) in r.getMessage() for r in caplog.records), caplog.records
    r = by_clip()
    assert r.status_code == 503, r.get_json()
    assert r.get_json()["error"]["code"] == "model_unavailable"
    assert "changed while clapq ran" in r.get_json()["error"]["message"] and str(ckpt_dir) in r.get_json()["error"]["message"]
