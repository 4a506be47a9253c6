"""Batched audio embedding: log-mel on the model's device, then CLAP's audio tower."""

from __future__ import annotations

import numpy as np
import torch

from clapq.clap import LoadedClap
from worker.features import LogMel


class AudioEmbedder:
    """Turns a batch of fixed-length 48 kHz windows into L2-normalised vectors."""

    def __init__(self, clap: LoadedClap, compile_model: bool = False) -> None:
        self.clap = clap
        self.window_samples = int(clap.feature_extractor.nb_max_samples)
        self.rate = int(clap.feature_extractor.sampling_rate)
        self.logmel = LogMel(clap.feature_extractor, clap.fusion).to(clap.device)
        # torch.compile of the audio tower: on our 2-core CPU +15% in fp32, +5% in bf16, vectors the same to
        # cosine 1.00000 (BENCHMARKS.md); when, is clapq.precision.compile_applies's rule
        self.audio_model = torch.compile(clap.model.audio_model) if compile_model else clap.model.audio_model

    @torch.inference_mode()
    def features(self, waves: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(waves, dtype=np.float32))
        if self.clap.device.type == "cuda":
            x = x.pin_memory().to(self.clap.device, non_blocking=True)
        return self.logmel(x)

    @torch.inference_mode()
    def embed_features(self, mel: torch.Tensor) -> np.ndarray:
        is_longer = torch.zeros((mel.shape[0], 1), dtype=torch.bool, device=mel.device)
        # ClapModel.get_audio_features: audio tower -> projection -> L2 normalisation
        hidden = self.audio_model(input_features=mel.to(self.clap.dtype), is_longer=is_longer).pooler_output
        out = torch.nn.functional.normalize(self.clap.model.audio_projection(hidden).float(), dim=-1)
        return out.cpu().numpy().astype(np.float32)

    def embed(self, waves: np.ndarray) -> np.ndarray:
        """(B, window_samples) float32 -> (B, dim) float32, unit length."""
        if waves.ndim != 2 or waves.shape[1] != self.window_samples:
            raise ValueError(f"expected (B, {self.window_samples}) windows, got {waves.shape}")
        return self.embed_features(self.features(waves))
