"""Generated test audio: tones, noise and sweeps of any length, rate and channel count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def signal(seconds: float, rate: int, channels: int = 1, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A tone plus a little noise; each channel slightly different."""
    n = max(1, int(round(seconds * rate)))
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    cols = [0.4 * np.sin(2 * np.pi * freq * (1 + 0.1 * c) * t) + 0.05 * rng.standard_normal(n)
            for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def write(path: Path, seconds: float, rate: int = 48_000, channels: int = 1, freq: float = 440.0,
          seed: int = 0, subtype: str | None = None) -> Path:
    """Written 10 s at a time: libsndfile's Vorbis encoder crashes (SIGSEGV) on one write of minutes of audio
    (a 180 s OGG at 44.1 kHz did); other formats' bytes come out as from one write."""
    path = Path(path)
    samples = signal(seconds, rate, channels, freq, seed)
    with sf.SoundFile(str(path), "w", rate, channels, subtype=subtype) as f:
        for start in range(0, len(samples), rate * 10):
            f.write(samples[start:start + rate * 10])
    return path


def long_silence(path: Path, minutes: int, rate: int = 192_000) -> Path:
    """A legal FLAC of `minutes` of silence at `rate` Hz, ~37 KB a minute: few bytes whose decoding (and resampling
    to 48 kHz) works for long, as a decoder that spins on a file's bytes would. Written 10 s at a time."""
    path = Path(path)
    block = np.zeros(rate * 10, dtype=np.int16)
    with sf.SoundFile(str(path), "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(minutes * 6):
            f.write(block)
    return path
