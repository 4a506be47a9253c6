"""CLAP log-mel front end in torch, matching `transformers.ClapFeatureExtractor` on full-length windows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import ClapFeatureExtractor

MEL_FLOOR = 1e-10  # audio_utils.spectrogram: mel_floor and power_to_db min_value
FUSION_CHANNELS = 4  # fusion checkpoints take [global, front, middle, back]; short clips repeat one mel
CPU_ROWS = 1  # windows per log-mel pass on a CPU (see LogMel.forward)


def _hann(n: int) -> np.ndarray:
    """Periodic Hann window, as `audio_utils.window_function(n, "hann")`."""
    return np.hanning(n + 1)[:-1]


class LogMel(torch.nn.Module):
    """Batched (B, N) waveform -> (B, C, frames, n_mels) dB log-mel, C = 4 for fusion checkpoints else 1."""

    window: torch.Tensor
    mel_filters: torch.Tensor

    def __init__(self, fe: ClapFeatureExtractor, fusion: bool) -> None:
        """Take STFT parameters and the mel filter bank (htk if fusion, else slaney) from `fe`."""
        super().__init__()
        self.n_fft = int(fe.fft_window_size)
        self.hop_length = int(fe.hop_length)
        self.nb_max_samples = int(fe.nb_max_samples)
        self.fusion = bool(fusion)
        filters = np.asarray(fe.mel_filters if fusion else fe.mel_filters_slaney)  # (n_freq, n_mels)
        if filters.shape[0] != self.n_fft // 2 + 1:
            raise ValueError(f"mel filters have {filters.shape[0]} bins, expected {self.n_fft // 2 + 1}")
        self.register_buffer("window", torch.from_numpy(_hann(self.n_fft)).float(), persistent=False)
        self.register_buffer("mel_filters", torch.from_numpy(filters.T.copy()).float(), persistent=False)

    @property
    def channels(self) -> int:
        """Number of mel channels the model expects (4 for fusion, else 1)."""
        return FUSION_CHANNELS if self.fusion else 1

    def num_frames(self, n_samples: int) -> int:
        """Frames produced for `n_samples` with centred STFT (1001 for 10 s at 48 kHz)."""
        return 1 + n_samples // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, N) float waveform -> (B, C, 1 + N // hop, n_mels) float32 log-mel in dB."""
        if wave.ndim != 2:
            raise ValueError(f"expected (B, N) waveforms, got shape {tuple(wave.shape)}")
        # float32 unless the module was cast with .double(); half precision is never used for the STFT
        dtype = torch.float64 if self.window.dtype == torch.float64 else torch.float32
        x = wave.to(device=self.window.device, dtype=dtype)
        if x.device.type != "cpu" or x.shape[0] <= CPU_ROWS:
            return self._logmel(x)
        # On a CPU one window's spectrogram (~4 MB) stays in cache and a batch's (~65 MB for 16) does
        # not: row by row is ~2.8x faster (BENCHMARKS.md), and each row's values are the same either way
        return torch.cat([self._logmel(part) for part in x.split(CPU_ROWS)])

    def _logmel(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            x,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window.to(x.dtype),
            center=True,
            pad_mode="reflect",
            onesided=True,
            return_complex=True,
        )  # (B, n_freq, frames)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.mel_filters.to(x.dtype), power)  # (B, n_mels, frames)
        db = 10.0 * torch.log10(mel.clamp_min(MEL_FLOOR))
        out = db.transpose(1, 2).unsqueeze(1).float()  # (B, 1, frames, n_mels)
        return out.repeat(1, FUSION_CHANNELS, 1, 1) if self.fusion else out.contiguous()
