"""Find a CLAP checkpoint on disk (local directory or HF hub cache) and fingerprint it, without torch."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

from clapq.blobs import hash_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelUnavailable(RuntimeError):
    """No checkpoint could be found or fetched; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path
    weights_sha256: str  # of the weights files transformers loads (_weights_hash)
    dim: int
    # where a directory holds both formats: what versions before this one made the identity (every weights file of
    # the directory), under which a models row may exist already (register_model finds that one first)
    earlier_sha256: str | None = None


_cache: dict[str, Checkpoint] = {}
_lock = threading.Lock()


def _how_to_fix(name: str) -> str:
    return (
        f"cannot load the CLAP model {name!r}. Point CLAPQ_MODEL at a local directory holding a "
        "HF-format CLAP checkpoint (config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json or "
        "processor_config.json, and the "
        "tokenizer files), e.g. one saved with `ClapModel.save_pretrained()` or copied from a machine "
        "with network access (`hf download laion/clap-htsat-unfused --local-dir DIR`)."
    )


def _fetch(name: str) -> Path:
    """A hub id: use the local HF cache, downloading only if the network allows."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - installed with transformers
        raise ModelUnavailable(_how_to_fix(name)) from exc
    patterns = ["*.json", "*.txt", "*.safetensors", "*.model"]
    last: Exception | None = None
    for local_only in (True, False):
        try:
            path = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=local_only))
            if (path / "config.json").is_file() and not _weight_files(path):
                # weights in PyTorch's format only, as on laion/clap-htsat-unfused's main branch
                # (pytorch_model.bin; its safetensors are in an unmerged pull request): the default model
                # downloaded no weights and every start failed. Fetched only where there are no safetensors,
                # which transformers would load instead (and which would be downloaded twice over)
                path = Path(snapshot_download(name, allow_patterns=[*patterns, "*.bin"], local_files_only=local_only))
        except Exception as exc:  # offline, unknown repo, no cache: all mean "not available"
            last = exc
            continue
        if (path / "config.json").is_file() and _weight_files(path):
            return path
        # a cached snapshot without weights (a start before pytorch_model.bin was fetched; huggingface_hub
        # before 2.x hands back a partial snapshot offline as it is): asked of the Hub, not taken as it stands,
        # which failed every start with 'no weights' until the cache was deleted by hand
        last = ModelUnavailable(f"no weights (*.safetensors or *.bin) in {path}")
    raise ModelUnavailable(f"{_how_to_fix(name)} ({type(last).__name__}: {last})")


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        hash_file(f, h)
    return h.hexdigest()


def _weights_hash(path: Path) -> tuple[str, str | None]:
    """The identity of the weights: the sha256 of the files transformers loads, the safetensors where there are
    any (it loads model.safetensors before pytorch_model.bin), else the PyTorch ones; and, where the directory
    holds both formats, the identity versions before this one gave it (every weights file, both formats). A Hub
    fetch takes the safetensors alone, and a copy of the same repo made with `hf download --local-dir`, or a Hub
    cache another tool completed, holds both: one model had two identities, and a PyTorch copy added beside
    safetensors (a checkpoint converted) locked its libraries out of their model (409 model_mismatch)."""
    files = _weight_files(path)
    if not files:
        raise ModelUnavailable(f"no weights (*.safetensors or *.bin) in {path}. " + _how_to_fix(str(path)))
    loaded = [f for f in files if f.suffix == ".safetensors"] or files
    return _hash_files(loaded), (_hash_files(files) if loaded != files else None)


def resolve(name: str) -> Checkpoint:
    """The checkpoint named by CLAPQ_MODEL, fingerprinted once per process."""
    with _lock:
        if name in _cache:
            return _cache[name]
        local = Path(os.path.expanduser(name))
        if local.is_dir():
            path = local.resolve()
            if not (path / "config.json").is_file():
                raise ModelUnavailable(f"{path} has no config.json. " + _how_to_fix(name))
        elif name.startswith((".", "/", "~")):
            raise ModelUnavailable(f"directory {name} does not exist. " + _how_to_fix(name))
        else:
            path = _fetch(name)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"unreadable config.json in {path}: {exc}") from exc
        if config.get("model_type") != "clap":
            raise ModelUnavailable(f"{name} is not a CLAP checkpoint (model_type={config.get('model_type')!r})")
        dim = int(config.get("projection_dim", 512))
        from clapq.models import VECTOR_DIM

        if dim != VECTOR_DIM:
            # the vector columns are vector(512): such a model made a service that said it was ready, made
            # libraries and took uploads, and failed every write of its vectors, each file retried (helper-63)
            raise ModelUnavailable(f"{name} makes {dim}-dimensional vectors (its config.json's projection_dim), "
                                   f"and clapq stores {VECTOR_DIM}-dimensional ones, as LAION's CLAP checkpoints "
                                   "make (laion/clap-htsat-unfused, laion/larger_clap_general): point CLAPQ_MODEL "
                                   "at one of those")
        seen = _signature(path)  # before the hash: a change while it reads is a change
        sha, earlier = _weights_hash(path)
        ckpt = Checkpoint(name=name, path=path, weights_sha256=sha, dim=dim, earlier_sha256=earlier)
        _cache[name] = ckpt
        _hashed[path] = (seen, sha)
        return ckpt


# each checkpoint directory's weights files (name, size, modification time and inode of each) as they were when this
# process last hashed them, and that hash
_hashed: dict[Path, tuple[tuple, str | None]] = {}


def _signature(path: Path) -> tuple:
    try:
        return tuple((f.name, st.st_size, st.st_mtime_ns, st.st_ino) for f in _weight_files(path) for st in [f.stat()])
    except OSError:
        return ()


def unchanged(ckpt: Checkpoint) -> None:
    """Raise ModelUnavailable where the weights in the checkpoint's directory are no longer those this process took
    for its identity (resolve): asked once weights are loaded from it, which can be long after (a forked process
    inherits its parent's identity; the API loads its audio tower at the first search by a clip). Files replaced
    in place while clapq ran (another checkpoint copied over, `hf download --local-dir` of a newer revision) were
    loaded under the old identity, so their vectors were stored, or searched, as the old model's (helper-85). The
    files are hashed again only where their sizes, times or inodes moved (a file only touched is taken again)."""
    with _lock:
        now = _signature(ckpt.path)
        seen, sha = _hashed.get(ckpt.path, ((), None))
        if not now or now != seen:
            try:
                sha = _weights_hash(ckpt.path)[0]
            except ModelUnavailable:
                sha = None
            _hashed[ckpt.path] = (now, sha)
    if sha != ckpt.weights_sha256:
        raise ModelUnavailable(
            f"the weights in {ckpt.path} changed while clapq ran: this process took them for the model of weights "
            f"sha256 {ckpt.weights_sha256[:16]}..., and they are now " + (f"{sha[:16]}..." if sha else "gone")
            + "; restart every clapq process (API, workers) so that each serves the checkpoint now there, as one "
            "model (vectors of two models are never compared)")


def register_model(session, ckpt: Checkpoint) -> int:
    """The models row for these weights, created on first use; every vector references it. The weights
    are the identity, not how CLAPQ_MODEL spells their place: `./clap`, `/srv/clap` and `~/clap` (an API
    and a worker started from different directories) are one model, so libraries keep working and a
    worker never fails files as "bound to a different model". A row made under another name is reused, and so
    is one made under the identity earlier versions gave a directory of both formats (Checkpoint.earlier_sha256),
    before one of the weights loaded: the libraries of every existing row keep their model."""
    from sqlalchemy import func, select, text
    from sqlalchemy.dialects.postgresql import insert

    from clapq.models import EmbeddingModel

    def row(sha: str) -> int | None:
        return session.scalar(select(func.min(EmbeddingModel.id)).where(EmbeddingModel.weights_sha256 == sha,
                                                                         EmbeddingModel.dim == ckpt.dim))

    # one registration at a time (until this transaction ends): two processes starting together under two
    # spellings must not make two rows and each keep its own
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext('clapq.register_model'))"))
    for sha in filter(None, (ckpt.earlier_sha256, ckpt.weights_sha256)):
        if (found := row(sha)) is not None:
            return found
    session.execute(
        insert(EmbeddingModel)
        .values(name=ckpt.name, weights_sha256=ckpt.weights_sha256, dim=ckpt.dim)
        .on_conflict_do_nothing(index_elements=["name", "weights_sha256"])
    )
    return row(ckpt.weights_sha256)
