"""The production CLAP loader and text tower (imports torch: load lazily, after fork)."""

from __future__ import annotations

import threading

import numpy as np
import torch
from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel
from transformers.utils import logging as hf_logging

from clapq.checkpoint import Checkpoint, ModelUnavailable

# LAION trained the text tower on 77-token captions; longer queries are cut there.
TEXT_MAX_TOKENS = 77


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). There a bf16 model runs ~1.9x
    faster than fp32 (BENCHMARKS.md); without them torch emulates bf16 and it runs ~7x slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_dtype(device: torch.device, precision: str = "auto", *, cpu_bf16: bool | None = None) -> torch.dtype:
    """The model's precision (CLAPQ_PRECISION). auto: half precision on a GPU (bf16 where supported);
    on a CPU bf16 where it multiplies bf16 natively (cpu_has_bf16, or as given), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native = cpu_has_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if device.type == "cpu" and native else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"CLAPQ_PRECISION must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("CLAPQ_PRECISION=fp16 needs a GPU; on a CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16; set CLAPQ_PRECISION to fp16 or fp32")
    return PRECISIONS[precision]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the vector; 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def text_int8_applies(text_int8: bool, device: str) -> bool:
    """Whether an int8 text tower was asked for and can run: int8 kernels exist for the CPU only (on a
    GPU the tower runs in half precision anyway)."""
    return text_int8 and pick_device(device).type == "cpu"


def model_precision(device: str, precision: str, text_int8: bool = False) -> str:
    """A loaded model's arithmetic, "int8" (text tower only), "bf16", "fp16" or "fp32": the one rule
    for the loader and for the API's cache of query vectors, which keeps each kind's vectors apart."""
    if text_int8_applies(text_int8, device):
        return "int8"  # quantised from the fp32 tower
    return dtype_name(pick_dtype(pick_device(device), precision))


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
