"""The path a user writes by hand: ClapProcessor + ClapModel.get_audio_features, input at 48 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch


def load_reference(model_dir: Path | str):
    from transformers import ClapModel, ClapProcessor

    return ClapProcessor.from_pretrained(model_dir), ClapModel.from_pretrained(model_dir).eval()


def audio_48k(path: Path | str) -> np.ndarray:
    """Mono mix resampled to 48 kHz with soxr (HQ) in one shot."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    return soxr.resample(mono, rate, 48_000, quality="HQ") if rate != 48_000 else mono


def reference_embed(reference, audio48k: np.ndarray) -> np.ndarray:
    processor, model = reference
    inputs = processor(audio=audio48k, sampling_rate=48_000, truncation="rand_trunc", padding="repeatpad",
                       return_tensors="pt")
    with torch.inference_mode():
        out = model.get_audio_features(**inputs)
    v = getattr(out, "pooler_output", out)[0].numpy()
    return v / np.linalg.norm(v)
