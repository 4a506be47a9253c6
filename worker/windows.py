"""Deterministic windows: short files repeat-padded as LAION does, long files cut with a fixed hop."""

from __future__ import annotations

import dataclasses

import numpy as np

from worker.features import repeat_pad


@dataclasses.dataclass(frozen=True)
class Window:
    index: int
    start_s: float
    end_s: float
    samples: np.ndarray  # exactly window_samples long


def window_starts(n: int, window: int, hop: int) -> list[int]:
    """Start offsets: every hop, and a last window that ends at the file's end."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window + 1, hop))
    if starts[-1] + window < n:
        starts.append(n - window)
    return starts


def cut(samples: np.ndarray, rate: int, window_s: float = 10.0, hop_s: float = 5.0) -> list[Window]:
    """All windows of one file; no randomness, nothing depends on other files."""
    window, hop = int(round(window_s * rate)), int(round(hop_s * rate))
    n = samples.shape[0]
    if n <= window:
        return [Window(0, 0.0, n / rate, repeat_pad(samples, window))]
    return [
        Window(i, s / rate, (s + window) / rate, samples[s : s + window])
        for i, s in enumerate(window_starts(n, window, hop))
    ]
