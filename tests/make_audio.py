"""Test audio in every format clapq claims to read, written in Python only (no ffmpeg/sox binaries).

libsndfile (through `soundfile`) writes WAV, FLAC, AIFF and OGG; FFmpeg inside the PyAV wheel writes
MP3, AAC/ALAC in .m4a, Opus in .ogg/.opus and audio tracks in MP4, Matroska and WebM. `make(name, d)`
writes one named format; `FORMATS` says what each one is. A format this machine cannot encode raises
`Unavailable` (the tests turn it into a skip with the reason).
"""

from __future__ import annotations

import dataclasses
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf


class Unavailable(RuntimeError):
    """This build of libsndfile or FFmpeg cannot encode the format."""


@dataclasses.dataclass(frozen=True)
class Format:
    name: str  # also the file's stem
    ext: str
    rate: int
    channels: int
    lossy: bool
    # soundfile: (format, subtype); PyAV: (container format, audio codec, sample format, video codec | None)
    sf: tuple[str, str] | None = None
    av: tuple[str, str, str, str | None] | None = None

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.ext}"


def _sf(name, ext, rate, ch, fmt, subtype, lossy=False):
    return Format(name, ext, rate, ch, lossy, sf=(fmt, subtype))


def _av(name, ext, rate, ch, container, codec, sample_fmt, lossy=True, video=None):
    return Format(name, ext, rate, ch, lossy, av=(container, codec, sample_fmt, video))


# Rates and channel counts vary on purpose, so "original rate/channels recorded" means something.
FORMATS: dict[str, Format] = {f.name: f for f in [
    _sf("wav_u8", "wav", 22_050, 1, "WAV", "PCM_U8"),
    _sf("wav_s16", "wav", 44_100, 2, "WAV", "PCM_16"),
    _sf("wav_s24", "wav", 96_000, 2, "WAV", "PCM_24"),
    _sf("wav_s32", "wav", 32_000, 1, "WAV", "PCM_32"),
    _sf("wav_float", "wav", 48_000, 2, "WAV", "FLOAT"),
    _sf("wav_double", "wav", 16_000, 1, "WAV", "DOUBLE"),
    _sf("wav_51_s16", "wav", 48_000, 6, "WAV", "PCM_16"),  # 5.1 film audio: six channels to mix down
    _sf("wavex_s24", "wav", 48_000, 2, "WAVEX", "PCM_24"),  # WAVE_FORMAT_EXTENSIBLE, as ffmpeg and sox write
    _sf("wav_ulaw", "wav", 8_000, 1, "WAV", "ULAW"),
    _sf("wav_alaw", "wav", 8_000, 1, "WAV", "ALAW"),
    _sf("flac_s16", "flac", 44_100, 2, "FLAC", "PCM_16"),
    _sf("flac_s24", "flac", 88_200, 1, "FLAC", "PCM_24"),
    _sf("aiff_s16", "aiff", 44_100, 2, "AIFF", "PCM_16"),
    _sf("ogg_vorbis", "ogg", 44_100, 2, "OGG", "VORBIS", lossy=True),
    _sf("ogg_opus_sndfile", "opus", 48_000, 2, "OGG", "OPUS", lossy=True),
    _av("mp3", "mp3", 44_100, 2, "mp3", "libmp3lame", "fltp"),
    _av("m4a_aac", "m4a", 44_100, 2, "ipod", "aac", "fltp"),
    _av("m4a_alac", "m4a", 44_100, 2, "ipod", "alac", "s16p", lossy=False),
    _av("ogg_opus", "ogg", 48_000, 2, "ogg", "libopus", "flt"),
    _av("opus", "opus", 24_000, 1, "opus", "libopus", "flt"),
    _av("mp4_aac_video", "mp4", 48_000, 2, "mp4", "aac", "fltp", video="mpeg4"),
    _av("mkv_flac_video", "mkv", 44_100, 2, "matroska", "flac", "s16", lossy=False, video="mjpeg"),
    _av("webm_opus", "webm", 48_000, 2, "webm", "libopus", "flt"),
    _av("avi_pcm_video", "avi", 32_000, 2, "avi", "pcm_s16le", "s16", lossy=False, video="mpeg4"),  # a camera's clip
]}


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    """(frames, channels) float32: the same sine in every channel, a little quieter in each later one."""
    n = max(1, int(round(seconds * rate)))
    t = np.arange(n, dtype=np.float64) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def tone_and_chirp(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """A dominant `freq` Hz tone plus a quieter rising chirp (150 Hz up to 3 kHz or 0.4 x rate): the
    tone says which frequency must survive decoding, the chirp makes the signal line up with its
    decoded self at one lag only (a pure tone correlates with itself every period)."""
    n = max(1, int(round(seconds * rate)))
    t = np.arange(n, dtype=np.float64) / rate
    f0, f1 = 150.0, min(3000.0, 0.4 * rate)
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * max(seconds, 1e-9))))
    x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.15 * chirp
    return np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def make(name: str, directory: Path | str, seconds: float = 1.5, freq: float = 440.0) -> Path:
    """Write the format `name` (a key of FORMATS) as DIRECTORY/<name>.<ext>: `tone_and_chirp`."""
    f = FORMATS[name]
    path = Path(directory) / f.filename
    data = tone_and_chirp(seconds, f.rate, f.channels, freq)
    if f.sf is not None:
        return write_soundfile(path, data, f.rate, *f.sf)
    container, codec, sample_fmt, video = f.av
    return write_av(path, data, f.rate, container, codec, sample_fmt, video=video)


def write_soundfile(path: Path, data: np.ndarray, rate: int, fmt: str, subtype: str) -> Path:
    if subtype not in sf.available_subtypes(fmt):
        raise Unavailable(f"libsndfile {sf.__libsndfile_version__} cannot write {fmt}/{subtype}")
    sf.write(str(path), data, rate, format=fmt, subtype=subtype)
    return path


def write_av(path: Path, data: np.ndarray, rate: int, container: str, codec: str, sample_fmt: str, *,
             video: str | None = None, bit_rate: int | None = None, options: dict | None = None) -> Path:
    """Encode (frames, channels) float samples with FFmpeg's `codec` into `container`, plus an
    optional tiny (16x16, 5 fps) video stream so the audio is not the file's only stream; `options`: the muxer's
    (`{"movflags": "faststart"}`: an MP4's index before its audio)."""
    import av

    for c in (codec, video):
        if c is not None and c not in av.codecs_available:
            raise Unavailable(f"this PyAV/FFmpeg build has no {c} encoder")
    frames, channels = data.shape
    layout = {1: "mono", 2: "stereo"}[channels]
    with av.open(str(path), "w", format=container, options=options or {}) as out:
        a = out.add_stream(codec, rate=rate, layout=layout)
        a.format = sample_fmt
        if bit_rate:
            a.bit_rate = bit_rate
        v = None
        if video is not None:
            v = out.add_stream(video, rate=5)
            v.width = v.height = 16
            v.pix_fmt = "yuvj420p" if video == "mjpeg" else "yuv420p"
        # audio in frames of 1024 samples, as the encoder's sample format wants them
        block, n_video = 1024, 0
        a_time_base = Fraction(1, rate)
        for start in range(0, frames, block):
            chunk = data[start:start + block]
            frame = av.AudioFrame.from_ndarray(_to_format(chunk, sample_fmt), format=sample_fmt, layout=layout)
            frame.sample_rate = rate
            frame.pts, frame.time_base = start, a_time_base
            for pkt in a.encode(frame):
                out.mux(pkt)
            # video frames keep up with the audio (the muxer interleaves by time)
            while v is not None and n_video * rate < min(start + block, frames) * 5:
                img = np.full((16, 16, 3), (n_video * 40) % 256, np.uint8)
                vf = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=v.pix_fmt)
                vf.pts = n_video
                n_video += 1
                for pkt in v.encode(vf):
                    out.mux(pkt)
        for pkt in a.encode(None):
            out.mux(pkt)
        if v is not None:
            for pkt in v.encode(None):
                out.mux(pkt)
    return path


def _to_format(chunk: np.ndarray, sample_fmt: str) -> np.ndarray:
    """(frames, channels) float -> the ndarray AudioFrame.from_ndarray expects for `sample_fmt`."""
    planar = sample_fmt.endswith("p")
    kind = sample_fmt.rstrip("p")
    if kind == "flt":
        x = chunk.astype(np.float32)
    elif kind == "s16":
        x = np.clip(np.round(chunk * 32767), -32768, 32767).astype(np.int16)
    elif kind == "s32":
        x = np.clip(np.round(chunk.astype(np.float64) * 2147483647), -2**31, 2**31 - 1).astype(np.int32)
    else:
        raise ValueError(sample_fmt)
    # planar: one row per channel; packed: one row, channels interleaved
    return np.ascontiguousarray(x.T) if planar else np.ascontiguousarray(x.reshape(1, -1))


# --- bad inputs -------------------------------------------------------------------------------------

def wav_bytes(data: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, data, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def wav_claiming(data: np.ndarray, rate: int, data_bytes: int = 0xFFFFFFF0) -> bytes:
    """A 16-bit PCM WAV whose RIFF and data chunk sizes claim `data_bytes` (default ~4 GB) of samples
    but which holds only `data`."""
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2").tobytes()
    ch = data.shape[1]
    fmt = struct.pack("<HHIIHH", 1, ch, rate, rate * ch * 2, ch * 2, 16)
    riff_size = min(0xFFFFFFFF, 4 + 8 + len(fmt) + 8 + data_bytes)
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", data_bytes) + pcm)


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    """A valid little RGB PNG, written by hand (zlib + crc32)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + b"".join(bytes((x * 30 % 256, y * 30 % 256, 128)) for x in range(width))
                    for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def dsd_bytes(container: str, seconds: float = 0.2, freq: float = 440.0) -> bytes:
    """A mono DSD64 tone (2.8224 MHz, one bit a sample, from a first-order sigma-delta modulator) in a DSF
    ("dsf") or DSDIFF ("dff") file, written by hand: FFmpeg reads both, and writes neither."""
    rate = 2_822_400
    x = 0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)
    bits, acc, y = np.empty(len(x), dtype=np.uint8), 0.0, 0.0
    for i, v in enumerate(x.tolist()):
        acc += v - y
        bits[i], y = (1, 1.0) if acc >= 0 else (0, -1.0)
    if container == "dsf":  # little-endian chunks; the bits of each byte least significant first, in 4096-byte blocks
        data = np.packbits(bits, bitorder="little").tobytes()
        data += bytes(-len(data) % 4096)
        fmt = b"fmt " + struct.pack("<QIIIIIIQII", 52, 1, 0, 1, 1, rate, 1, len(bits), 4096, 0)
        body = fmt + b"data" + struct.pack("<Q", 12 + len(data)) + data
        return b"DSD " + struct.pack("<QQQ", 28, 28 + len(body), 0) + body

    def chunk(kind: bytes, body: bytes) -> bytes:  # big-endian, padded to an even size
        return kind + struct.pack(">Q", len(body)) + body + bytes(len(body) % 2)

    prop = (b"SND " + chunk(b"FS  ", struct.pack(">I", rate)) + chunk(b"CHNL", struct.pack(">H", 1) + b"C   ")
            + chunk(b"CMPR", b"DSD " + bytes([14]) + b"not compressed" + b"\0"))
    body = (b"DSD " + chunk(b"FVER", struct.pack(">I", 0x01050000)) + chunk(b"PROP", prop)
            + chunk(b"DSD ", np.packbits(bits, bitorder="big").tobytes()))
    return b"FRM8" + struct.pack(">Q", len(body)) + body


def shn_bytes(seconds: float = 0.5, rate: int = 22_050, freq: float = 440.0) -> bytes:
    """A mono 16-bit tone in Shorten (.shn, version 2), written by hand: FFmpeg reads it, and writes it not. Its
    stream is Rice codes, most significant bit first: a WAV header kept verbatim (where the decoder finds the
    rate), then blocks of 256 samples coded as they are (DIFF0: no prediction), and QUIT."""
    x = np.round(tone(seconds, rate, freq=freq)[:, 0] * 32767).astype(np.int64)
    x = np.concatenate([x, np.zeros(-len(x) % 256, dtype=np.int64)])
    bits: list[str] = []

    def rice(v: int, k: int) -> None:  # unsigned: the quotient in zeros ended by a one, then k bits
        bits.append("0" * (v >> k) + "1" + (format(v & ((1 << k) - 1), f"0{k}b") if k else ""))

    def uint(v: int) -> None:  # a header's number: its own width first
        k = v.bit_length()
        rice(k, 2)
        rice(v, k)

    for v in (5, 1, 256, 0, 0, 0):  # signed 16-bit little-endian, channels, block size, max LPC order, means, skip
        uint(v)
    header = wav_bytes(np.zeros((0, 1), dtype=np.float32), rate)[:44]
    rice(9, 2)  # VERBATIM
    rice(len(header), 5)
    for b in header:
        rice(b, 8)
    for block in x.reshape(-1, 256).tolist():
        rice(0, 2)  # DIFF0
        rice(15, 3)  # the residuals' Rice parameter, less one (signed: its sign in the low bit)
        for v in block:
            rice(2 * v if v >= 0 else -2 * v - 1, 16)
    rice(4, 2)  # QUIT
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return b"ajkg\x02" + int(stream, 2).to_bytes(len(stream) // 8, "big")
