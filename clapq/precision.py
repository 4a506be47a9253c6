"""Which device and arithmetic a model runs in (CLAPQ_DEVICE, CLAPQ_PRECISION). Imports torch but not
transformers, so a start-up check can ask it quickly."""

from __future__ import annotations

import torch

from clapq.settings import PRECISION_NAMES

PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). There a bf16 model runs ~1.9x
    faster than fp32 (BENCHMARKS.md); without them torch emulates bf16 and it runs ~7x slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _gpu_has_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU (Ampere or later); torch's default answer also counts emulation."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no such argument and counts native support only
            return torch.cuda.is_bf16_supported()


def pick_dtype(device: torch.device, precision: str = "auto", *, cpu_bf16: bool | None = None) -> torch.dtype:
    """The model's precision (CLAPQ_PRECISION). auto: half precision on a GPU (bf16 where it is native,
    else fp16); on a CPU bf16 where it multiplies bf16 natively (cpu_has_bf16, or as given), else fp32.
    Raises ValueError, with a sentence, for what this machine cannot run."""
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"CLAPQ_PRECISION must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"CLAPQ_DEVICE={device} but no GPU is visible to torch")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if _gpu_has_bf16(device) else torch.float16
        native = cpu_has_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if device.type == "cpu" and native else torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("CLAPQ_PRECISION=fp16 needs a GPU; on a CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not _gpu_has_bf16(device):
        raise ValueError("this GPU has no native bf16 (it came with Ampere); set CLAPQ_PRECISION to fp16 or fp32")
    return PRECISIONS[precision]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


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


def compile_applies(compile_model: bool | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the worker compiles its audio tower (CLAPQ_COMPILE; None is auto). auto: on a CPU in fp32,
    where torch.compile makes the tower 12-20% and ingest ~7% faster (BENCHMARKS.md) for ~4 s more at each worker start
    (~50 s the first time, until inductor's cache holds the kernels). Not in bf16 on a CPU (+5%, within
    noise), nor on a GPU (unmeasured)."""
    if compile_model is not None:
        return compile_model
    return device.type == "cpu" and dtype == torch.float32
