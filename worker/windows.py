"""Deterministic windows: short files repeat-padded as LAION does, long files cut with a fixed hop.

Numpy only (no torch), so the API and the database layer can use it before any fork."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WINDOW_S = 10.0
HOP_S = 5.0


def repeat_pad(wave: np.ndarray, max_length: int) -> np.ndarray:
    """Reference "repeatpad": tile int(max_length / len) times, then zero-pad the tail to max_length."""
    if wave.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {wave.shape}")
    n = int(wave.shape[0])
    if n == 0:
        raise ValueError("cannot pad an empty waveform")
    if n > max_length:
        raise ValueError(f"waveform has {n} samples, more than max_length={max_length}")
    if n == max_length:
        return wave
    tiled = np.tile(wave, int(max_length / n))
    return np.pad(tiled, (0, max_length - tiled.shape[0]), mode="constant", constant_values=0)


def window_starts(n: int, window: int, hop: int) -> list[int]:
    """Start offsets: every hop, and a last window that ends at the file's end."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window + 1, hop))
    if starts[-1] + window < n:
        starts.append(n - window)
    return starts


def spans(n: int, rate: int, window: int, hop: int) -> list[tuple[int, float, float]]:
    """(start sample, start_s, end_s) of every window of an n-sample file."""
    if n <= window:
        return [(0, 0.0, n / rate)]
    return [(s, s / rate, (s + window) / rate) for s in window_starts(n, window, hop)]


def span_json(start_s: float, end_s: float) -> dict[str, float]:
    """A window's times as the API gives them, in a search result and in GET /v1/items/<id>/segments alike: to
    the microsecond, which tells every sample start at 48 kHz (20.8 us) apart. Search gave milliseconds, so the
    last window of most files matched none of the export by its times (helper-85)."""
    return {"start_s": round(start_s, 6), "end_s": round(end_s, 6)}


def read_window(raw_path: Path, n: int, start: int, window: int) -> np.ndarray:
    """One model input, read from a raw float32 file without loading the rest of it: the window at
    `start`, or the whole short file repeat-padded."""
    count = min(n, window)
    data = np.fromfile(raw_path, dtype=np.float32, count=count, offset=4 * start)
    if data.shape[0] != count:
        raise OSError(f"short read from {raw_path}")
    return repeat_pad(data, window) if n <= window else data


def pooled(vectors: np.ndarray) -> np.ndarray:
    """A file's vector: the L2-normalised mean of its windows' vectors."""
    mean = vectors.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
