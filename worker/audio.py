"""Decode any audio file to mono float32 at the model's rate: soundfile first, PyAV for the rest."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import itertools
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import soxr

from clapq.room import RESERVE_CHECK_BYTES, kept_free

TARGET_RATE = 48_000
BLOCK_FRAMES = 1 << 16


def block_frames(channels: int) -> int:
    """Frames read at a time: BLOCK_FRAMES of mono or stereo, fewer of more channels, so that a block holds at
    most 2 * BLOCK_FRAMES samples (a 1,024-channel WAV's blocks were 256 MB, and the decoder grew to 690 MB)."""
    return max(256, min(BLOCK_FRAMES, 2 * BLOCK_FRAMES // max(1, channels)))

# Full scale is 1.0; float files scaled like int16/int32 (32768, 2**31) still decode. Beyond this a float
# file is garbage, and from about 1e17 the float32 log-mel overflows and the model returns NaN.
MAX_ABS_SAMPLE = 1e10
SF_COUNT_MAX = 2**63 - 1  # libsndfile's frame count for a file whose length it cannot tell
SFE_SYSTEM = 2  # libsndfile's error of a system call that failed (a read's EIO), not of the bytes it read


class DecodeError(ValueError):
    """The file is not audio we can read; the message is shown on the item. `in_file`: the reason is in the file's
    bytes, which would fail the same way again (items.failed_in_file); False where it is the machine's (the stored
    copy could not be read: EACCES, EIO, EMFILE, a directory where the file should be; a decoder killed from
    outside), so the file is worth sending again."""

    def __init__(self, *args, in_file: bool = True) -> None:
        super().__init__(*args)
        self.in_file = in_file


def unreadable(path: Path | str) -> OSError | None:
    """Why the stored copy of a file cannot be read whole as the plain file it should be, None where it can: asked
    of a file whose decoding failed, so that the machine's faults (an I/O error, too many open files, no memory, no
    permission, a directory in its place) are not taken for a reason in its bytes. Non-blocking: a FIFO in its
    place does not hold the caller."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return OSError(errno.EINVAL, "not a regular file")
        while os.read(fd, 1 << 20):
            pass
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    return None


def not_read(why: OSError | str) -> DecodeError:
    """The machine's failure of a file whose stored copy could not be read (`why`: the error, or what is known of
    it): worth sending again, so not marked as in its bytes."""
    if isinstance(why, OSError):
        why = why.strerror or str(why)
    return DecodeError(f"the stored copy of the file could not be read ({why})", in_file=False)


# FFmpeg's demuxers that read other files or addresses named in the file itself: an upload of "ffconcat version
# 1.0 / file <sha256>", its own bytes made to be stored in the same folder, was decoded as the stored file of that
# name, another tenant's (helper-55: whether anyone holds a file was told, and its sound embedded as the
# uploader's). They are never chosen for an uploaded file; every other demuxer is.
REFUSED_DEMUXERS = frozenset({"concat", "hls", "dash", "imf", "sdp", "rtsp", "rtp"})


@functools.cache
def _demuxers() -> str:
    """FFmpeg's `format_whitelist` for uploaded files: every demuxer of this build but REFUSED_DEMUXERS."""
    import av

    names = []
    for name in sorted(av.formats_available):
        try:
            av.ContainerFormat(name, "r")
        except ValueError:  # a muxer only
            continue
        if not set(name.split(",")) & REFUSED_DEMUXERS:
            names.append(name)
    return ",".join(names)


def _av_open(path: Path, format: str | None = None):
    """An uploaded file opened by PyAV, its format found from its bytes among the demuxers allowed (or the
    `format` given, one of FORMAT_HINTS'), and through no protocol but the local file's (no demuxer left may
    then reach an address either)."""
    import av

    return av.open(str(path), format=format, metadata_errors="ignore",
                   container_options={"format_whitelist": _demuxers(), "protocol_whitelist": "file"})


# Raw streams of codec frames, by the upload's extension. FFmpeg finds their format by frame headers within the
# first MiB it reads, so one whose first frame begins later (zeros or junk before it: a file cut out of a capture,
# an ID3 tag of a MiB or more before AAC or AC-3) was "not a readable audio file", where `ffprobe file.mp3`, which
# sees the name, plays it; the workers read the stored bytes, which have no name. The extension's demuxer is
# tried only where finding the format from the bytes failed, and taken only where it finds an audio stream with a
# rate and channels (garbage named .mp3 stays unreadable). These demuxers read the file alone, and any upload
# reaches each already by its bytes: a name reaches no demuxer that they do not (REFUSED_DEMUXERS stay refused).
FORMAT_HINTS = {"mp3": "mp3", "mp2": "mp3", "mpga": "mp3", "aac": "aac", "adts": "aac", "ac3": "ac3",
                "eac3": "eac3", "ec3": "eac3"}


def format_hint(filename: str | None) -> str | None:
    """The FFmpeg demuxer FORMAT_HINTS gives an uploaded file's extension, if any."""
    stem, dot, ext = (filename or "").rpartition(".")
    return FORMAT_HINTS.get(ext.lower()) if dot and stem else None


def _open_as(path: Path, hint: str):
    """The file opened as the demuxer `hint` names, where that finds audio with a rate and channels; else None."""
    try:
        c = _av_open(path, hint)
    except Exception:
        return None
    ctx = c.streams.audio[0].codec_context if c.streams.audio else None
    if ctx is None or not ctx.sample_rate or not ctx.channels:
        c.close()
        return None
    return c


class TooLong(DecodeError):
    """The audio lasts longer than the caller's limit (`max_duration_s`)."""


class ScratchError(OSError):
    """The decoded samples could not be written to the scratch file (the disk is full or the directory
    went away): the machine's fault, not the file's, so the task hands its files back instead of
    failing them."""


class ScratchTooSmall(DecodeError):
    """The file's decoded samples are larger than the scratch filesystem's whole size: no wait makes room for
    them on this worker, so the file fails at once, alone, instead of going back to the queue with the task's
    other files (3 uncounted and 3 counted tries, ~15 minutes at the defaults) to fail in the end."""


@dataclasses.dataclass
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int = 0
    format: str = ""
    # the frames the header gives, where it gives them exactly (uncompressed WAV, AIFF and the like): a file
    # over the length limit fails before it is decoded (it decoded up to the limit: 2.7 GB of scratch)
    stated_frames: int = 0
    # the frames the header says the file holds, exact or estimated, where it says (0: nothing to go by), and what
    # was said of a file that ended well short of it (cut short or damaged: only what was read is embedded)
    header_frames: int = 0
    warning: str = ""

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _to_ffmpeg(f, path: Path) -> bool:
    """Whether a file libsndfile opened is better read by FFmpeg: files that are several streams end to
    end, which libsndfile cut short without an error. Chained Ogg (Icecast recordings, joined files):
    libsndfile reads the first link only, and FFmpeg reads Ogg as fast (Vorbis) or faster (Opus, 27
    against 62 ms per 10 s). MP3s joined with `cat`: libsndfile trusts the first part's Xing header and
    stops there; FFmpeg's decoding costs twice libsndfile's (22 against 11 ms per 10 s), so it takes only
    those whose packets (FFmpeg's demuxer, ~1.3 ms per 10 s) last clearly longer than the header says."""
    if f.format == "OGG":
        return True
    if f.format != "MP3":
        return False
    if f.frames >= SF_COUNT_MAX:
        # no length: a Xing header of fewer frames than its own delay and padding (1, where the file holds
        # 230) made libsndfile's length negative, and it then read nothing at all ("contains no audio samples")
        return True
    stated = f.frames / f.samplerate
    kinds: set[tuple[int, int, bool]] = set()
    found = 0
    try:
        with _av_open(path) as c:
            s = c.streams.audio[0]
            for n, p in enumerate(c.demux(s)):
                found += p.duration or 0
                if n % 8 == 0 and p.size >= 4 and len(kinds) < 2:
                    # the frame header's MPEG version, sample rate and whether it is mono, every 8th frame (a
                    # part of 0.2 s or more): parts of other rates or channels joined without a Xing header,
                    # which libsndfile stopped at or read as noise while its length looked right (helper-40)
                    head = memoryview(p)[1:4]
                    kinds.add((head[0] & 0x18, head[1] & 0x0C, head[2] >> 6 == 3))
            found = float(found * s.time_base)
    except Exception:  # no second opinion: libsndfile's stands
        return False
    return len(kinds) > 1 or found > stated + max(0.5, 0.01 * stated)


def _or_empty(blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """`blocks`, where a file whose header says it holds nothing and that FFmpeg cannot read either fails
    as empty (a recorder stopped at once), not as unreadable; a failure after audio stands as it is."""
    given = False
    try:
        for block in blocks:
            given = True
            yield block
    except DecodeError as exc:
        if given or not exc.in_file:
            raise
        raise DecodeError("the file contains no audio samples") from None


def _soundfile_blocks(path: Path, info: AudioInfo) -> Iterator[np.ndarray] | None:
    import soundfile as sf

    try:
        f = sf.SoundFile(str(path))
    except Exception:  # libsndfile does not know it: let PyAV try
        return None
    if _to_ffmpeg(f, path):
        f.close()
        return None
    if f.frames == 0:
        # a header whose sizes were never filled in (a recorder that was stopped) says 0 frames; FFmpeg
        # reads on to the data that follows
        f.close()
        try:
            blocks = _av_blocks(path, info)  # opens the file now: what it cannot open is empty too
        except DecodeError as exc:
            if not exc.in_file:
                raise
            raise DecodeError("the file contains no audio samples") from None
        return _or_empty(blocks)
    info.sample_rate, info.channels, info.format = f.samplerate, f.channels, f.format.lower()
    info.stated_frames = exact_frames(f)
    info.header_frames = header_frames(f)
    # 16-bit PCM, the commonest kind: read the integers and scale them here. libsndfile's own float
    # conversion multiplies by 2**-15 too, so the values are bit for bit the same, at half the cost
    # (0.8 against 1.9 ms for 10 s of 44.1 kHz stereo); anything else is converted by libsndfile.
    as_int16 = f.subtype == "PCM_16"
    per_read = block_frames(f.channels)

    def gen() -> Iterator[np.ndarray]:
        done = 0
        with f:
            while True:
                try:
                    if as_int16:
                        block = f.read(per_read, dtype="int16", always_2d=True).astype(np.float32)
                        block *= np.float32(1 / 32768)
                    else:
                        block = f.read(per_read, dtype="float32", always_2d=True)
                except Exception as exc:
                    # libsndfile gives up on a whole block when the file is truncated or damaged (a cut
                    # FLAC: "lost sync"); FFmpeg reads up to the damage, so let it go on from frame `done`
                    reason, in_file = f"corrupt {info.format} data ({_short(exc)})", True
                    if isinstance(exc, sf.LibsndfileError) and exc.code == SFE_SYSTEM:
                        # a read of the stored copy failed (EIO: a failing disk, a network mount's hiccup),
                        # and libsndfile ended the data there: the machine's, never a file shortened and
                        # done. Where the file reads whole now, FFmpeg reads on from frame `done`
                        if (why := unreadable(path)) is not None:
                            raise not_read(why) from None
                        reason, in_file = str(not_read(exc.error_string.rstrip("."))), False
                    yield from _av_resume(path, info, done, reason, in_file)
                    return
                if not len(block):
                    if f.format == "MP3" and done + MP3_FRAME < f.frames:
                        # libmpg123 gives up resyncing at damage midway (KBs of garbage: a bad sector, a torn
                        # download) and libsndfile ends the data there, no error: a 10 s MP3 was stored as its
                        # first 3 s. FFmpeg skips the damaged frames and reads on, from frame `done`; a file cut
                        # short (its header says more than it holds) ends there for both
                        yield from _av_resume(path, info, done, f"corrupt mp3 data (libsndfile stopped at "
                                              f"{done / f.samplerate:.1f} s of the {f.frames / f.samplerate:.1f} s "
                                              "its header states, and FFmpeg could not read on)")
                    return
                done += block.shape[0]
                yield block.T  # (channels, frames)

    return gen()


EXACT_LENGTH = ("WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF")
EXACT_SUBTYPES = ("PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW")


def exact_frames(f) -> int:
    """The frames a file libsndfile opened (`f`) holds as its header says, where that is exact: uncompressed samples
    in a container whose data size gives their number (libsndfile counts them from it, never past the file's end);
    0 where the header's count is an estimate or none (MP3, FLAC, Ogg). A file stated longer than a limit is refused
    by it before it is read (here, and by `clapq search --like` before it is sent)."""
    return f.frames if f.format in EXACT_LENGTH and f.subtype in EXACT_SUBTYPES else 0


SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4,
                "DOUBLE": 8}
PLACEHOLDER_BYTES = 0x7F000000  # a data size this large or larger is a streaming writer's "unknown" (0xFFFFFFFF...)


def header_frames(f) -> int:
    """The frames the header of a file libsndfile opened (`f`) says it holds, to tell a file cut short (a copy or
    download that stopped) from a whole one: FLAC's STREAMINFO; an MP3's Xing header, where it has one (else
    libsndfile estimates the length from the file's size and its first frame's bitrate, which a cut file's size
    matches and a VBR file's first frame misleads: 30 s estimated at 42 s); for WAV and AIFF the data size or frame
    count the header gives, which libsndfile reports in its log only (its own count stops at the file's end). 0
    where the header gives nothing to go by (a streaming writer's placeholder size)."""
    if f.format == "FLAC" or f.format == "MP3" and _mp3_counts_its_frames(f.name):
        return f.frames if 0 < f.frames < SF_COUNT_MAX else 0
    if f.format not in EXACT_LENGTH or f.subtype not in SAMPLE_BYTES:
        return 0
    log = f.extra_info
    if f.format in ("WAV", "WAVEX") and (m := re.search(r"^data : (\d+) \(should be \d+\)", log, re.M)):
        stated = int(m.group(1))
        return stated // (SAMPLE_BYTES[f.subtype] * f.channels) if stated < PLACEHOLDER_BYTES else 0
    if f.format == "AIFF" and (m := re.search(r"Frame count read from 'COMM' chunk \((\d+)\)", log)):
        return int(m.group(1))
    return f.frames


def _mp3_counts_its_frames(path) -> bool:
    """Whether an MP3's first frame is a Xing, Info or VBRI header, which counts the file's frames: libsndfile's
    length is then the encoder's count, else its estimate from the file's size and the first frame's bitrate."""
    try:
        with open(path, "rb") as f:
            head = f.read(10)
            skip = 0
            if head[:3] == b"ID3" and len(head) == 10:  # an ID3v2 tag first: its size, 7 bits a byte
                skip = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10])) + (
                    10 if head[5] & 0x10 else 0)
            f.seek(skip)
            data = f.read(65_536)
    except OSError:
        return False
    sync = re.search(rb"\xff[\xe0-\xff]", data)  # the first frame's header
    # the tag sits after the first frame's side information, at most 36 bytes in: within the first 200
    return sync is not None and any(t in data[sync.start() : sync.start() + 200] for t in (b"Xing", b"Info", b"VBRI"))


SHORT_BY_S = 0.5  # a file that ends this much (or 1%) short of its header's length is said to be cut short


def cut_short(info: AudioInfo) -> str:
    """What to say of a file read to its end well short of the length its header states, else ''."""
    if not info.header_frames or not info.sample_rate:
        return ""
    if info.header_frames - info.frames <= max(SHORT_BY_S * info.sample_rate, 0.01 * info.header_frames):
        return ""
    return (f"only {info.frames / info.sample_rate:.1f} s of the {info.header_frames / info.sample_rate:.1f} s its "
            "header states could be read (the file is cut short or damaged there); those were embedded")


MP3_FRAME = 1152  # samples of an MPEG-1 Layer III frame: a read ending more short of the stated length stopped


def _av_resume(path: Path, info: AudioInfo, skip: int, reason: str, in_file: bool = True) -> Iterator[np.ndarray]:
    """PyAV's blocks of the same file after its first `skip` frames; `reason` (`in_file`) if it cannot agree, or
    FFmpeg's own where the stored copy could not be read."""
    other = AudioInfo(0, 0)
    try:
        blocks = _av_blocks(path, other)
    except DecodeError as exc:
        if not exc.in_file:
            raise
        raise DecodeError(reason, in_file=in_file) from None
    if (other.sample_rate, other.channels) != (info.sample_rate, info.channels):
        raise DecodeError(reason, in_file=in_file)
    try:
        for block in blocks:
            if skip >= block.shape[1]:
                skip -= block.shape[1]
                continue
            yield block[:, skip:]
            skip = 0
    except DecodeError as exc:
        if not exc.in_file:
            raise
        raise DecodeError(reason, in_file=in_file) from None


def _mp4_without_index(path: Path) -> bool:
    """Whether the file is an MP4/MOV whose top-level boxes end without a 'moov' (a phone's recording cut off
    before it wrote its index at the end); only the boxes' 8- or 16-byte headers are read."""
    import struct

    size, pos, types = path.stat().st_size, 0, []
    with open(path, "rb") as f:
        while pos + 8 <= size and len(types) < 1000:
            f.seek(pos)
            head = f.read(16)
            n, kind = struct.unpack(">I4s", head[:8])
            if n == 1 and len(head) == 16:
                n = struct.unpack(">Q", head[8:16])[0]
            types.append(kind)
            if n < 8:  # 0: to the end of the file; anything else under a header's size is not MP4
                break
            pos += n
    return bool(types) and types[0] == b"ftyp" and b"moov" not in types


def _is_webm(path: Path) -> bool:
    """Whether a Matroska file says it is WebM: its EBML header's DocType (element 0x4282), near the start.
    FFmpeg reads both with one demuxer, and a .webm renamed .mkv was served as Matroska."""
    with open(path, "rb") as f:
        head = f.read(64)
    at = head.find(b"\x42\x82", 4)
    return at > 0 and head[at + 2:at + 3] == b"\x84" and head[at + 3:at + 7] == b"webm"


def _first_audible(container) -> int:
    """Which audio stream to decode: the one a player plays, the first flagged default where only some are (a
    film's main track after a commentary or another language; Matroska's flag is on unless cleared, MP4's is a
    track enabled), else the first; passed over where it has no data and another has (a video's empty first
    track). Files with one audio stream are not read ahead."""
    streams = container.streams.audio
    if len(streams) == 1:
        return 0
    # AV_DISPOSITION_DEFAULT; an older PyAV without Stream.disposition prefers none
    order = sorted(range(len(streams)), key=lambda i: not int(getattr(streams[i], "disposition", 0)) & 1)
    with_data: set[int] = set()
    for n, packet in enumerate(container.demux(*streams)):
        if packet.size:
            with_data.add(packet.stream.index)
            if streams[order[0]].index in with_data or n > 5000:
                break
    return next((i for i in order if streams[i].index in with_data), order[0])


def _unopened(path: Path, exc: Exception) -> DecodeError:
    """Why FFmpeg could not open the file, for the user."""
    if isinstance(exc, EOFError):  # av.error.EOFError
        with open(path, "rb") as f:
            if f.read(4) == b"OggS":  # an Ogg file of its headers only (a recording stopped at once)
                return DecodeError("the file contains no audio samples (it ends where its audio would begin)")
    elif _mp4_without_index(path):
        return DecodeError("an MP4/M4A file without its index (no 'moov' box): the recording or the copy stopped "
                           "before the end, where the index is written")
    return DecodeError(f"not a readable audio file ({_short(exc)})")


def _av_blocks(path: Path, info: AudioInfo, hint: str | None = None) -> Iterator[np.ndarray]:
    import av

    links: list[tuple[int, int]] = []

    def open_container():
        try:
            if links:  # the first link of a chained Ogg, as a file of its own
                return av.open(_OggLink(path, *links[0]), format="ogg", metadata_errors="ignore")
            return _av_open(path)
        except Exception as exc:
            if hint is not None and not links and (c := _open_as(path, hint)) is not None:
                return c
            raise _unopened(path, exc) from exc

    container = open_container()
    if "ogg" in (container.format.name or "").split(",") and len(found := _ogg_links(path)) > 1:
        links[:] = found
        container.close()
        container = open_container()
    if not container.streams.audio:
        # an MP4/M4A of no tracks at all is a recording stopped at once (FFmpeg lists no stream for a track of
        # no samples); a video's, or an image's, has no sound. Asked before closing it, which empties the list
        # of streams (every video-only MP4 was told "contains no audio samples", helper-40)
        empty = not container.streams and "mov" in (container.format.name or "").split(",")
        container.close()
        raise DecodeError("the file contains no audio samples" if empty else "the file has no audio stream")
    which = 0
    if len(container.streams.audio) > 1:
        try:
            which = _first_audible(container)
        except av.error.FFmpegError:
            pass
        container.close()
        container = open_container()  # from the start again, for the stream chosen
    stream = container.streams.audio[which]
    if stream.codec_context is None:  # FFmpeg has no decoder for this codec
        container.close()
        raise DecodeError("the audio codec is not supported (FFmpeg has no decoder for it)")
    info.sample_rate = stream.codec_context.sample_rate or stream.rate or 0
    info.channels = stream.codec_context.channels or 0
    info.format = (container.format.name or "").split(",")[0]
    if info.format == "mov":  # FFmpeg's one demuxer for QuickTime and MP4 (M4A): told apart by the brand
        brand = (container.metadata.get("major_brand") or "").strip().lower()
        info.format = "mov" if brand in ("", "qt") else "mp4"
    elif info.format == "matroska" and _is_webm(path):
        info.format = "webm"
    if not info.sample_rate or not info.channels:
        container.close()
        raise DecodeError("the audio stream has no sample rate or channel count")
    # what the container says the stream holds, which tells a file cut short (cut_short); AAC's last frame is
    # decoded whole, up to 1,024 frames of padding past it (a 10.0 s clip would last 10.008 s and get two
    # windows), which is cut to this. Only MP4/MOV state it exactly (sample tables, edit lists); a raw ADTS
    # .aac's duration is a bitrate guess
    if ({"mov", "mp4"} & set((container.format.name or "").split(",")) and stream.duration is not None
            and stream.time_base is not None):
        info.header_frames = int(round(float(stream.duration * stream.time_base) * info.sample_rate))
    stated = info.header_frames if stream.codec_context.name in AAC_CODECS else None

    filled = [0]  # frames of silence decoded() put in gaps: beside the stated length, not padding to cut

    def gen() -> Iterator[np.ndarray]:
        yield from _cut_padding(_coalesce(decoded(), block_frames(info.channels)),
                                lambda: stated and stated + filled[0], PADDING_FRAMES)

    def later_links() -> Iterator[tuple]:
        """The open container and audio stream of each link of a chained Ogg after the first. A link
        without audio (a video's) is passed over, and so is one FFmpeg cannot open (junk between links,
        which reading the file whole skipped as well)."""
        for start, end in links[1:]:
            def reopen(start=start, end=end):
                return av.open(_OggLink(path, start, end), format="ogg", metadata_errors="ignore")

            try:
                c = reopen()
            except Exception:
                continue
            s = next((s for s in c.streams.audio if s.codec_context is not None), None)
            if s is None:
                c.close()
            else:
                yield c, s, reopen

    def decoded() -> Iterator[np.ndarray]:
        # packet by packet, like the ffmpeg CLI: a damaged packet (the cut end of a truncated file) is
        # skipped, not the end of the file; only a file that is mostly damage fails
        good = bad = 0
        error: Exception | None = None
        # a part at another rate or channel layout (joined MP3s of two rates, a broadcast capture, a chained
        # Ogg whose links differ): converted to the first part's, not played at the wrong speed. At most
        # MAX_CONVERTERS kept, the one used least recently emptied and dropped for a new one: each is ~0.4 MB
        # (a chained Ogg of 2,000 links of as many rates, 6.6 MB, took the decoder to 880 MB)
        converters: dict[tuple, av.AudioResampler] = {}  # the one used last, last
        first: tuple | None = None
        width = 0  # the channels of what is yielded (the first part's layout)
        for c, s, reopen in itertools.chain([(container, stream, open_container)], later_links()):
            # where the next frame should begin, in seconds of this container's timestamps: the file's start
            # for its first part (a video whose sound begins later), then each frame's end (a frame that
            # begins later follows audio lost to damage); the gap is silence, so later times stay true
            expected = c.start_time / av.time_base if c is container and c.start_time is not None else None
            # the sound of a video may begin any time within it (the jump of a broadcast capture's timestamps
            # is at most GAP_MAX_S after audio has begun): a track that begins 61 s in was timed from 0
            lead = max(GAP_MAX_S, c.duration / av.time_base) if c is container and c.duration else GAP_MAX_S
            tick = float(s.time_base) if s.time_base else None  # a decoded frame's time base is its stream's
            # a packet the codec could not decode since the last frame: the gap its loss leaves is silence
            # whatever its length. A damaged AAC packet in an MP4 leaves 21 ms, under GAP_MIN_S, and each one
            # moved every later time earlier (helper-40: 64 of 2,585 packets, 1.5 s by the end)
            lost = False
            try:
                for packet in _demux(c, s, path, reopen):
                    try:
                        frames = packet.decode()
                    except av.error.FFmpegError as exc:
                        if isinstance(exc, MemoryError):
                            raise
                        bad, error, lost = bad + 1, exc, True
                        continue
                    good += packet.size > 0
                    for frame in frames:
                        kind = (frame.sample_rate, frame.layout.name)
                        if first is None:
                            first, width = kind, frame.layout.nb_channels
                            # any sample format -> float, same rate and layout
                            resampler = av.AudioResampler(format=_float_format(width))
                        if frame.pts is not None and tick is not None:  # floats: not a Fraction made for every frame
                            at = frame.pts * tick
                            least = LOST_MIN_S if lost else GAP_MIN_S
                            if expected is not None and least < at - expected <= lead:
                                gap = int(round((at - expected) * first[0]))
                                if not lost:  # a lost packet's time is in the stated length already
                                    filled[0] += gap
                                yield from _silence(gap, width)
                            expected = at + frame.samples / frame.sample_rate
                            lead, lost = GAP_MAX_S, False
                        elif expected is not None:  # a frame the demuxer gave no time: it follows the last
                            expected += frame.samples / frame.sample_rate
                        if kind == first:
                            outs = resampler.resample(frame)
                        else:
                            conv = converters.pop(kind, None)
                            if conv is None:
                                if len(converters) == MAX_CONVERTERS:
                                    for out in converters.pop(next(iter(converters))).resample(None):
                                        yield _planes(out)
                                conv = av.AudioResampler(format=_float_format(width), layout=first[1], rate=first[0])
                            converters[kind] = conv
                            outs = conv.resample(frame)
                        for out in outs:
                            yield _planes(out)
            except av.error.FFmpegError as exc:  # the demuxer stopped (a cut container): the end of the data
                if isinstance(exc, MemoryError):
                    raise
                bad, error = bad + 1, exc
            finally:
                c.close()
        for conv in converters.values():  # what their filters still hold
            for out in conv.resample(None):
                yield _planes(out)
        if bad > good:
            raise DecodeError(f"corrupt {info.format} data ({_short(error)})")

    return gen()


def _demux(c, s, path: Path, reopen: Callable) -> Iterator:
    """The packets of stream `s` of container `c`; where the demuxer stops with an error, the stored copy's reading
    is asked about first (_read_fault), which raises the machine's DecodeError where that is what failed."""
    import av

    packets, n = c.demux(s), 0
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except IndexError:
            # PyAV's demux ends with an empty packet for each stream, and one the demuxer added while reading (FLV,
            # MPEG-PS and -TS may: a video that begins after the sound) is past PyAV's list of them. That of `s`
            # came before (streams are added after): the end of the data, not a failed file
            return
        except av.error.FFmpegError as exc:
            if not isinstance(exc, MemoryError):
                _read_fault(path, exc, reopen, s.index, n)
            raise
        n += 1
        yield packet


def _read_fault(path: Path, exc: Exception, reopen: Callable, index: int, count: int) -> None:
    """Raise the machine's DecodeError (not_read) where FFmpeg's error `exc`, which stopped the demuxing of stream
    `index` after `count` packets, came of a read of the stored copy failing (EIO: a failing disk, a network
    mount's hiccup), so that a file is never stored shortened, as done, for good: the file cannot be read whole
    now, or it can and a second demuxing goes past where the first stopped (a read that failed once). The
    error alone does not tell: most demuxers answer a failed read with EIO, but some say EIO at a plain end of
    file too (D-Cinema audio, AIFF's chunks), and WavPack's says "invalid data" for both. A demuxing that stops
    again at the same packet with the same error is the end of the data (a cut file), as before. Asked only
    where the demuxing stopped with an error, never of a file read to its end: each answer reads it once more."""
    import av

    if (why := unreadable(path)) is not None:
        raise not_read(why) from None
    n = 0
    try:
        with reopen() as again:
            for _ in again.demux(again.streams[index]):
                n += 1
                if n > count:
                    break
    except av.error.FFmpegError as second:
        if type(second) is type(exc) and n == count:
            return
    except Exception:  # not opened again: the machine's as well
        pass
    if isinstance(exc, OSError):
        raise not_read(exc) from None
    raise not_read("a read failed, then succeeded") from None


# A frame that begins later than the one before it ends, by more than a codec's own timestamp jitter (a
# Vorbis block's, ~10 ms) and at most a minute: audio lost to damage, filled with silence. A longer jump is a
# timestamp discontinuity (a broadcast capture's), not a gap; the audio runs on without one.
GAP_MIN_S, GAP_MAX_S = 0.25, 60.0
# converters to the first part's rate and layout kept at once: a file that switches between two kinds frame by
# frame (joined MP3 frames) must not make one per frame (10x slower than keeping them)
MAX_CONVERTERS = 4
# after a packet that did not decode, a gap of more than this is the audio it held (a codec's jitter is under it)
LOST_MIN_S = 0.002


def _float_format(channels: int) -> str:
    """What FFmpeg converts frames of this many channels to: planar float, whose planes are the (channels,
    frames) array as it is, but packed from 8 channels on. PyAV's to_ndarray of a planar frame of 8 or more
    channels reads past the end of FFmpeg's table of planes, and the decoder died (SIGSEGV) on every 7.1 AAC,
    8-channel Opus or Vorbis (helper-40); a packed frame has one plane. Packed costs a third more for stereo
    (strided blocks after), so it is kept to where it is needed."""
    return "flt" if channels >= 8 else "fltp"


def _planes(frame) -> np.ndarray:
    """A float frame (planar, or packed: `_float_format`) as (channels, frames) float32."""
    samples = frame.to_ndarray()
    return samples if frame.format.is_planar else samples.reshape(-1, frame.layout.nb_channels).T


def _silence(frames: int, channels: int) -> Iterator[np.ndarray]:
    step = block_frames(channels)
    for start in range(0, frames, step):
        yield np.zeros((channels, min(step, frames - start)), np.float32)


def _ogg_links(path: Path) -> list[tuple[int, int]]:
    """The byte ranges of an Ogg file's links: streams joined end to end (Icecast recordings, `cat`), each
    beginning with its beginning-of-stream pages. FFmpeg reads on across links of the same kind, but stops
    without an error at one whose rate or channel count differs ("patches welcome"), so the rest of the
    file would be lost; each link is then decoded as a file of its own. Only the 27-byte page headers and
    their segment tables are read. [] where the pages do not parse from the start (the caller reads the
    file whole, as before), and also past MAX_OGG_LINKS links (a file made of page headers alone would
    otherwise have a container opened for each); a last page cut short ends the last link."""
    size = path.stat().st_size
    starts: list[int] = []
    pos, in_bos = 0, False
    with open(path, "rb", buffering=1 << 16) as f:
        while pos < size:
            f.seek(pos)
            head = f.read(27)
            if len(head) < 27:
                break
            if head[:4] != b"OggS":
                return []
            table = f.read(head[26])
            if len(table) < head[26]:
                break
            bos = bool(head[5] & 2)
            if bos and not in_bos:  # a link's first page (a link of several streams has several in a row)
                if len(starts) == MAX_OGG_LINKS:
                    return []
                starts.append(pos)
            in_bos = bos
            pos += 27 + len(table) + sum(table)
    if not starts or starts[0] != 0:
        return []
    return list(zip(starts, starts[1:] + [size]))


MAX_OGG_LINKS = 10_000  # a day of Icecast recording at a link per 3-minute song is ~500


class _OggLink(io.RawIOBase):
    """Bytes [start, end) of a file, read as a file of their own: one link of a chained Ogg, for PyAV."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        super().__init__()
        self._f = open(path, "rb")
        self._start, self._end = start, end
        self._f.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._end - self._f.tell())
        return self._f.readinto(memoryview(b)[:n]) if n > 0 else 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: self._start, io.SEEK_CUR: self._f.tell(), io.SEEK_END: self._end}[whence]
        return self._f.seek(min(max(base + offset, self._start), self._end)) - self._start

    def tell(self) -> int:
        return self._f.tell() - self._start

    def close(self) -> None:
        self._f.close()
        super().close()


AAC_CODECS = ("aac", "aac_fixed", "aac_latm")
PADDING_FRAMES = 4096  # the most decoded beyond the stated length that is taken for padding (HE-AAC: 2,048)


def _coalesce(blocks: Iterator[np.ndarray], frames: int) -> Iterator[np.ndarray]:
    """Codec frames (MP3's 1,152, AAC's 1,024) joined into blocks of at least `frames`: the resampler and
    the downmix then run ~60 times per minute of audio instead of ~2,500 (an MP3 through FFmpeg decoded in
    22 ms per 10 s instead of 28)."""
    held: list[np.ndarray] = []
    n = 0
    for b in blocks:
        held.append(b)
        n += b.shape[1]
        if n >= frames:
            yield held[0] if len(held) == 1 else np.concatenate(held, axis=1)
            held, n = [], 0
    if held:
        yield held[0] if len(held) == 1 else np.concatenate(held, axis=1)


def _cut_padding(blocks: Iterator[np.ndarray], stated: Callable[[], int | None], slack: int) -> Iterator[np.ndarray]:
    """`blocks`, ending at `stated()` frames (asked once they are all read) where they run past it by at most
    `slack` (a codec's padding); more than that, and the stated length is what is wrong: nothing is cut.
    Holds back `slack` frames."""
    held: list[np.ndarray] = []
    held_n = total = 0
    for b in blocks:
        held.append(b)
        held_n += b.shape[1]
        total += b.shape[1]
        while held and held_n - held[0].shape[1] >= slack:
            held_n -= held[0].shape[1]
            yield held.pop(0)
    length = stated()
    excess = total - length if length else 0
    if 0 < excess <= slack:
        while excess and held:
            cut = min(excess, held[-1].shape[1])
            held[-1] = held[-1][:, : held[-1].shape[1] - cut]
            excess -= cut
            if not held[-1].shape[1]:
                held.pop()
    yield from held


def _short(exc: Exception) -> str:
    """One line for the user; FFmpeg errors without the errno and the server-side path."""
    import av

    text = exc.strerror if isinstance(exc, av.error.FFmpegError) and exc.strerror else str(exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _downmix(block: np.ndarray) -> np.ndarray:
    """(channels, frames) -> (frames,) float32, the channels' mean.

    A matrix-vector product with 1/channels weights: numpy's `mean(axis=0)` over the strided
    (channels, frames) view soundfile gives costs ~1 ms per 64k-frame block, the product ~25 us. For
    stereo the two agree bit for bit (halving is exact)."""
    channels = block.shape[0]
    if channels == 1:
        return block[0]
    return np.full(channels, 1.0 / channels, np.float32) @ block


def stream(path: Path | str, info: AudioInfo, *, max_duration_s: float | None = None,
           hint: str | None = None) -> Iterator[np.ndarray]:
    """Mono float32 blocks at 48 kHz, filling `info` as it goes; memory bounded by the block size. `hint`: the
    demuxer the upload's name gives (`format_hint`), tried where FFmpeg finds no format from the bytes."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DecodeError("the file is empty (0 bytes)")
    blocks = _soundfile_blocks(path, info) or _av_blocks(path, info, hint)
    if not 1 <= info.sample_rate <= 1_000_000:
        raise DecodeError(f"unsupported sample rate {info.sample_rate}")
    if max_duration_s is not None and info.stated_frames > max_duration_s * info.sample_rate:
        raise TooLong(f"the audio is longer than the limit of {max_duration_s:g} s")  # as its header says
    resampler = None
    if info.sample_rate != TARGET_RATE:
        resampler = soxr.ResampleStream(info.sample_rate, TARGET_RATE, 1, dtype="float32", quality="HQ")
    produced = 0
    # input frames resampled at a time: a low rate multiplies a block (65,536 frames at 25 Hz would come
    # out as 126 M samples, 500 MB); at most 4 blocks' worth come out of each piece
    piece = max(1, 4 * BLOCK_FRAMES * info.sample_rate // TARGET_RATE)
    for block in blocks:
        if not np.isfinite(block).all():
            raise DecodeError("the audio contains NaN or infinite samples (or values too large for 32-bit float)")
        peak = float(np.abs(block).max(initial=0.0))
        if peak > MAX_ABS_SAMPLE:  # float garbage: finite, but the log-mel would overflow to NaN vectors
            raise DecodeError(f"the audio has samples far outside the normal range (peak {peak:.3g}); "
                              "the file is probably corrupt")
        mono = _downmix(block)
        info.frames += mono.shape[0]
        if max_duration_s is not None and info.frames > max_duration_s * info.sample_rate:
            raise TooLong(f"the audio is longer than the limit of {max_duration_s:g} s")
        for start in range(0, mono.shape[0], piece):
            part = mono[start : start + piece]
            out = resampler.resample_chunk(part) if resampler else np.ascontiguousarray(part, dtype=np.float32)
            produced += out.shape[0]
            if out.size:
                yield out
    if resampler is not None:
        tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        produced += tail.shape[0]
        if tail.size:
            yield tail
    if info.frames == 0 or produced == 0:
        raise DecodeError("the file contains no audio samples")
    info.warning = cut_short(info)


def decode(path: Path | str, *, max_duration_s: float | None = None,
           hint: str | None = None) -> tuple[np.ndarray, AudioInfo]:
    """The whole file as mono float32 at 48 kHz, and what the file was; raises DecodeError with a reason."""
    info = AudioInfo(0, 0)
    samples = np.concatenate(list(stream(path, info, max_duration_s=max_duration_s, hint=hint)))
    return samples, info


def _scratch_error(what: str, out_path, exc: OSError) -> ScratchError:
    return ScratchError(exc.errno, f"cannot {what} the scratch file {out_path}: {exc.strerror}")


def _disk(out_path, reserve: int = 0) -> tuple[int, int] | None:
    """The whole size of the filesystem that holds `out_path`, used or not, and the bytes free on it now, both but
    the `reserve` kept free for a database on it (clapq.room.disk_reserve); None where it does not say."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(out_path)))
    except OSError:
        return None
    return (st.f_blocks * st.f_frsize - reserve, st.f_bavail * st.f_frsize - reserve) if st.f_blocks else None


ROOM_WAIT_S = 5.0  # how long a file that met a full scratch disk waits for its room before its task is handed back


def _room(out_path, need: int, reserve: int = 0) -> bool:
    """Whether `need` bytes are free on the scratch disk (but its `reserve`), now or within ROOM_WAIT_S."""
    deadline = time.monotonic() + ROOM_WAIT_S
    while (disk := _disk(out_path, reserve)) is not None and disk[1] < need:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return disk is not None


def _too_large(disk: int) -> ScratchTooSmall:
    return ScratchTooSmall(f"the decoded audio (48 kHz float32, ~690 MB an hour) is larger than the whole scratch disk "
                           f"it is decoded to ({disk / 1e6:,.1f} MB: a worker's CLAPQ_SCRATCH_DIR)")


def _write_decoded(path, fd: int, out_path, max_duration_s: float | None,
                   hint: str | None, reserve: int = 0) -> tuple[AudioInfo, int, int, OSError | None]:
    """One pass of decode_to_file from the file's start: the info, the samples, the bytes they need, and the
    ENOSPC that stopped the writing, if one did. A disk out of room is full for now, or too small for this file
    whatever else it holds: the decoding goes on without writing, counting, until the file is seen to need more
    than the whole disk (ScratchTooSmall, this file's) or ends within it. `reserve`: the bytes of the disk kept free
    for a database on it (clapq.room.disk_reserve), as if the disk had them not: asked every RESERVE_CHECK_BYTES;
    past it the disk is full for now, whatever the file's size within the whole disk."""
    info = AudioInfo(0, 0)
    n = written = 0
    full, disk = None, None
    checked = -RESERVE_CHECK_BYTES  # `written` when the disk's room was last asked
    os.lseek(fd, 0, os.SEEK_SET)
    for block in stream(path, info, max_duration_s=max_duration_s, hint=hint):
        data = memoryview(block.tobytes())
        written += len(data)
        n += block.shape[0]
        if full is None:
            try:
                if reserve and written - checked >= RESERVE_CHECK_BYTES:
                    checked = written
                    if (room := _disk(out_path, reserve)) is not None and room[1] < len(data):
                        raise kept_free(reserve)
                while data:
                    data = data[os.write(fd, data):]
            except OSError as exc:
                # the whole disk, its reserve included: a file that fits it only without the reserve is not the
                # file's fault (a reserve of most of the disk, or all of it, failed every file "larger than the
                # whole scratch disk (-1.0 MB)"); it waits for room as at a full disk
                if exc.errno != errno.ENOSPC or (disk := _disk(out_path)) is None:
                    raise _scratch_error("write to", out_path, exc) from exc
                full = exc
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # its room goes back to the other files' decoders meanwhile
        if full is not None and written > disk[0]:
            raise _too_large(disk[0]) from None
    return info, n, written, full


def decode_to_file(path: Path | str, out_path: Path | str, *, max_duration_s: float | None = None,
                   hint: str | None = None, reserve: int = 0) -> tuple[AudioInfo, int]:
    """Stream the decoded 48 kHz mono samples to a raw float32 file; returns the info and sample count. `reserve`:
    the bytes of its disk it leaves free, for a database on it (clapq.room.disk_reserve)."""
    # Not "wb": the worker made the file (empty) already, and on ext4 opening a file with O_TRUNC makes
    # its close start writing the data to disk (auto_da_alloc, for programs that replace a file in
    # place): per 10 s clip 2.3 ms of the decoder's time, 1-1.3 ms of the machine's CPU and a disk write,
    # for a file deleted a moment later (benchmarks/scratch_write.py). What an earlier try left past
    # this one's end is cut instead.
    # Errors of the scratch file (ENOSPC, a removed directory) are ScratchError; the source's are DecodeError
    # or the codec's own, raised by stream() between the writes.
    try:
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _scratch_error("open", out_path, exc) from exc
    try:
        for last in (False, True):
            info, n, written, full = _write_decoded(path, fd, out_path, max_duration_s, hint, reserve)
            if full is None:
                break
            # full for now (a ScratchError: the task's files wait for room), unless the room is there again
            # once the file has been read, or a moment later: another file's scratch removed meanwhile (one larger
            # than the whole disk gives its room back once it is seen to be, and a decoder beside it that hit
            # the full disk in that moment may have read its own file sooner)
            if last or not _room(out_path, written, reserve):
                raise _scratch_error("write to", out_path, full) from full
        try:
            if os.fstat(fd).st_size > written:
                os.ftruncate(fd, written)
        except OSError as exc:
            raise _scratch_error("cut", out_path, exc) from exc
    finally:
        os.close(fd)
    return info, n
