"""Decode any audio file to mono float32 at the model's rate: soundfile first, PyAV for the rest."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soxr

TARGET_RATE = 48_000
BLOCK_FRAMES = 1 << 16


class DecodeError(ValueError):
    """The file is not audio we can read; the message is shown on the item."""


@dataclasses.dataclass
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int = 0
    format: str = ""

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _soundfile_blocks(path: Path, info: AudioInfo) -> Iterator[np.ndarray] | None:
    import soundfile as sf

    try:
        f = sf.SoundFile(str(path))
    except Exception:  # libsndfile does not know it: let PyAV try
        return None
    info.sample_rate, info.channels, info.format = f.samplerate, f.channels, f.format.lower()

    def gen() -> Iterator[np.ndarray]:
        with f:
            while True:
                try:
                    block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                except Exception as exc:
                    raise DecodeError(f"corrupt {info.format} data: {exc}") from exc
                if not len(block):
                    return
                yield block.T  # (channels, frames)

    return gen()


def _av_blocks(path: Path, info: AudioInfo) -> Iterator[np.ndarray]:
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except Exception as exc:
        raise DecodeError(f"not a readable audio file ({_short(exc)})") from exc
    if not container.streams.audio:
        container.close()
        raise DecodeError("the file has no audio stream")
    stream = container.streams.audio[0]
    info.sample_rate = stream.codec_context.sample_rate or stream.rate or 0
    info.channels = stream.codec_context.channels or 0
    info.format = (container.format.name or "").split(",")[0]
    if not info.sample_rate or not info.channels:
        container.close()
        raise DecodeError("the audio stream has no sample rate or channel count")
    resampler = av.AudioResampler(format="fltp")  # any sample format -> float planar, same rate/layout

    def gen() -> Iterator[np.ndarray]:
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    yield out.to_ndarray().astype(np.float32, copy=False)
        except av.error.FFmpegError as exc:
            raise DecodeError(f"corrupt {info.format} data ({_short(exc)})") from exc
        finally:
            container.close()

    return gen()


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def decode(path: Path | str, *, max_duration_s: float | None = None) -> tuple[np.ndarray, AudioInfo]:
    """Mono float32 samples at 48 kHz and what the file was; raises DecodeError with a reason."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise DecodeError("the file is empty (0 bytes)")
    info = AudioInfo(0, 0)
    blocks = _soundfile_blocks(path, info) or _av_blocks(path, info)
    if not 1 <= info.sample_rate <= 1_000_000:
        raise DecodeError(f"unsupported sample rate {info.sample_rate}")
    resampler = None
    if info.sample_rate != TARGET_RATE:
        resampler = soxr.ResampleStream(info.sample_rate, TARGET_RATE, 1, dtype="float32", quality="HQ")
    out: list[np.ndarray] = []
    for block in blocks:
        mono = block.mean(axis=0, dtype=np.float32) if block.shape[0] > 1 else block[0]
        if not np.isfinite(mono).all():
            raise DecodeError("the audio contains NaN or infinite samples")
        info.frames += mono.shape[0]
        if max_duration_s is not None and info.frames > max_duration_s * info.sample_rate:
            raise DecodeError(f"the audio is longer than the limit of {max_duration_s:g} s")
        out.append(resampler.resample_chunk(mono) if resampler else np.ascontiguousarray(mono))
    if resampler is not None:
        out.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    samples = np.concatenate(out) if out else np.zeros(0, np.float32)
    if info.frames == 0 or samples.size == 0:
        raise DecodeError("the file contains no audio samples")
    return samples.astype(np.float32, copy=False), info
