"""The production CLAP loader and text tower (imports torch: load lazily, after fork)."""

from __future__ import annotations

import threading

import numpy as np
import torch
from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel
from transformers.utils import logging as hf_logging

from clapq.checkpoint import Checkpoint, ModelUnavailable
from clapq.precision import PRECISIONS, model_precision, pick_device

# LAION trained the text tower on 77-token captions; longer queries are cut there.
TEXT_MAX_TOKENS = 77


def pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the vector; 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def quantize_text_int8(model: ClapModel) -> None:
    """int8 dynamic quantisation of the text tower's and text projection's Linear layers (CPU only):
    ~3x faster text queries at cosine >= 0.999 to fp32 (BENCHMARKS.md). Query vectors are never
    stored, so turning it on or off changes no stored data."""
    import warnings

    with warnings.catch_warnings():  # torch.ao's eager quantisation API is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantize = torch.ao.quantization.quantize_dynamic
        model.text_model = quantize(model.text_model, {torch.nn.Linear}, dtype=torch.qint8)
        model.text_projection = quantize(model.text_projection, {torch.nn.Linear}, dtype=torch.qint8)


def _own_buffers(model: torch.nn.Module) -> None:
    """Copy the integer buffers (position indices, counters) that a cast to bf16 leaves as views of the
    checkpoint's memory map: while one view lives, the whole map stays mapped, and after the cast has
    read every fp32 weight that is the size of the checkpoint again in the process's RSS (measured: a
    bf16 worker at 1.2 GB instead of 0.6 GB)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_floating_point():
                setattr(module, name, buf.clone())


class LoadedClap:
    """A CLAP checkpoint loaded once per process: model, tokenizer and feature-extractor settings."""

    def __init__(self, ckpt: Checkpoint, device: str = "auto", precision: str = "auto", *,
                 text_only: bool = False, text_int8: bool = False) -> None:
        self.ckpt = ckpt
        self.device = pick_device(device)
        self.precision = model_precision(device, precision, text_int8)
        self.text_int8 = self.precision == "int8"
        self.dtype = torch.float32 if self.text_int8 else PRECISIONS[self.precision]
        hf_logging.disable_progress_bar()
        try:
            model = ClapModel.from_pretrained(ckpt.path)
            self.tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
            self.feature_extractor = ClapFeatureExtractor.from_pretrained(ckpt.path)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot load CLAP checkpoint from {ckpt.path}: {exc}") from exc
        if text_only:
            # the API embeds queries only; drop the audio tower to halve its memory
            model.audio_model = None
            model.audio_projection = None
        model.eval()
        self.model = model.to(self.device, dtype=self.dtype)
        _own_buffers(self.model)
        if self.text_int8:
            quantize_text_int8(self.model)
        self.fusion = bool(getattr(model.config.audio_config, "enable_fusion", False))
        self._lock = threading.Lock()

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text vectors, float32, one row per text."""
        if self.text_int8 and len(texts) > 1:
            # dynamic int8 scales each activation by its batch's range: one text at a time, so a text's
            # vector never depends on the texts it was asked with
            return np.concatenate([self._embed_text([t]) for t in texts])
        return self._embed_text(texts)

    @torch.inference_mode()
    def _embed_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=TEXT_MAX_TOKENS, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with self._lock:
            out = pooled(self.model.get_text_features(**tokens))
        out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy().astype(np.float32)


_loaded: dict[tuple, LoadedClap] = {}
_load_lock = threading.Lock()


def get_clap(ckpt: Checkpoint, device: str = "auto", precision: str = "auto", *, text_only: bool = False,
             text_int8: bool = False) -> LoadedClap:
    """The process-wide model for this checkpoint, loaded on first use."""
    key = (ckpt.path, ckpt.weights_sha256, device, precision, text_only, text_int8)
    with _load_lock:
        if key not in _loaded:
            _loaded[key] = LoadedClap(ckpt, device, precision, text_only=text_only, text_int8=text_int8)
        return _loaded[key]
