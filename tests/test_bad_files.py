"""A corpus of bad and odd inputs: each one either embeds sanely or fails alone with a reason a person
can read, decided per case below. Checked on `worker.audio.decode` directly (so a failure points at
the decoder) and as one batch through the API and a real worker (so it points at the rest)."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.audio import write
from tests.conftest import auth, wait_job
from tests.make_audio import make, png_bytes, tone, tone_and_chirp, wav_bytes, wav_claiming
from tests.test_formats import upload
from worker.audio import TARGET_RATE, DecodeError, decode, decode_to_file


@dataclasses.dataclass
class Case:
    filename: str
    data: bytes
    # "done": embeds; duration/rate/channels, when given, are what the item must record.
    # "failed": fails with an error containing `reason` (case-insensitive).
    outcome: str
    reason: str = ""
    duration: tuple[float, float] | None = None  # inclusive range, seconds
    rate: int | None = None
    channels: int | None = None
    why: str = ""


def _float_wav(x: np.ndarray, rate: int) -> bytes:
    return wav_bytes(x, rate, subtype="FLOAT")


def _cut(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def _wav_header(tag: int, rate: int, channels: int, bits: int, riff_size: int, data_size: int) -> bytes:
    """A canonical 44-byte WAV header with the sizes and format tag given (not necessarily true)."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
            + b"data" + struct.pack("<I", data_size))


def _headers_only(subtype: str, rate: int) -> bytes:
    """An Ogg file of no samples, as libsndfile writes one: its header pages only."""
    out = io.BytesIO()
    sf.write(out, np.zeros((0, 2), np.float32), rate, format="OGG", subtype=subtype)
    return out.getvalue()


def _zero_frames(fmt: str) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros((0, 1), np.float32), 44_100, format=fmt)
    return out.getvalue()


def _xing_frames(mp3: bytes, frames: int) -> bytes:
    """The MP3 with the frame count of its Xing/Info header (as FFmpeg's muxer writes one) set to `frames`."""
    at = max(mp3.find(b"Xing"), mp3.find(b"Info"))
    assert at > 0 and struct.unpack(">I", mp3[at + 4:at + 8])[0] & 1, "no Xing header with a frame count"
    return mp3[:at + 8] + struct.pack(">I", frames) + mp3[at + 12:]


def build_cases(tmp: Path) -> list[Case]:
    full_wav = wav_bytes(tone_and_chirp(2.0, 44_100, 2), 44_100)  # 44-byte header, 4 bytes a frame
    full_flac = make("flac_s16", tmp, seconds=2.0).read_bytes()
    full_mp3 = make("mp3", tmp, seconds=2.0).read_bytes()
    nan = tone(1.0, 48_000, 1)
    nan[1000] = np.nan
    inf = tone(1.0, 48_000, 2)
    inf[2000, 1] = np.inf
    huge = tone(1.0, 48_000, 1) * np.float32(1e30)  # finite: a float file of garbage
    half_wav_frames = (len(full_wav) // 2 - 44) // 4
    pcm16k = np.clip(np.round(tone_and_chirp(3.0, 16_000, 1) * 32767), -32768, 32767).astype("<i2").tobytes()
    huge_doubles = tmp / "huge_doubles.wav"
    sf.write(str(huge_doubles), tone(1.0, 48_000, 1).astype(np.float64) * 1e200, 48_000, subtype="DOUBLE")
    return [
        Case("empty.wav", b"", "failed", "empty", why="nothing to decode"),
        Case("truncated.wav", _cut(full_wav), "done", rate=44_100, channels=2,
             duration=(half_wav_frames / 44_100 - 1e-6, half_wav_frames / 44_100 + 1e-6),
             why="a cut download: the first half is good audio"),
        Case("truncated.flac", _cut(full_flac), "done", rate=44_100, channels=2, duration=(0.5, 1.5),
             why="libsndfile loses sync at the cut; FFmpeg reads up to it"),
        Case("truncated.mp3", _cut(full_mp3), "done", rate=44_100, channels=2, duration=(0.8, 1.05),
             why="MP3 is a run of frames: every whole one decodes"),
        Case("xing_one_frame.mp3", _xing_frames(full_mp3, 1), "done", rate=44_100, channels=2, duration=(1.95, 2.05),
             why="a bogus Xing header of 1 frame: libsndfile's length went negative and it read nothing"),
        Case("text.wav", b"this is a shopping list, not audio\n" * 30, "failed", "not a readable audio file"),
        Case("text.mp3", b"Lorem ipsum dolor sit amet, not audio either\n" * 30, "failed",
             "not a readable audio file"),
        Case("image.wav", png_bytes(8, 8), "failed", "no audio stream", why="FFmpeg sees a PNG image"),
        Case("image.mp3", png_bytes(9, 9), "failed", "no audio stream"),
        Case("claims_4gb.wav", wav_claiming(tone(1.0, 16_000, 1), 16_000), "done", rate=16_000, channels=1,
             duration=(1.0, 1.0), why="the header lies; the data that is there is 1 s of good audio"),
        Case("nan.wav", _float_wav(nan, 48_000), "failed", "NaN"),
        Case("inf.wav", _float_wav(inf, 48_000), "failed", "NaN or infinite"),
        Case("huge_floats.wav", _float_wav(huge, 48_000), "failed", "outside the normal range",
             why="finite, but the log-mel would overflow and the model would return NaN"),
        Case("silence.wav", wav_bytes(np.zeros((96_000, 1), np.float32), 48_000), "done", rate=48_000,
             channels=1, duration=(2.0, 2.0), why="silence is a sound a library can hold"),
        Case("one_sample.wav", wav_bytes(np.full((1, 1), 0.25, np.float32), 48_000), "done", rate=48_000,
             channels=1, duration=(1 / 48_000, 1 / 48_000), why="repeat-padded to a window like any short clip"),
        Case("one_sample_44k.wav", wav_bytes(np.full((1, 1), 0.25, np.float32), 44_100), "done", rate=44_100,
             channels=1, duration=(1 / 44_100, 1 / 44_100), why="one sample through the resampler"),
        Case("eight_channels.wav", wav_bytes(tone(1.0, 48_000, 8), 48_000), "done", rate=48_000, channels=8,
             duration=(1.0, 1.0)),
        Case("rate_8k.wav", wav_bytes(tone(1.0, 8_000, 1), 8_000), "done", rate=8_000, channels=1,
             duration=(1.0, 1.0)),
        Case("rate_192k.wav", wav_bytes(tone(1.0, 192_000, 2), 192_000, "PCM_24"), "done", rate=192_000,
             channels=2, duration=(1.0, 1.0)),
        Case("sizes_never_written.wav", _wav_header(1, 16_000, 1, 16, 0, 0) + pcm16k, "done", rate=16_000,
             channels=1, duration=(3.0, 3.0),
             why="a recorder stopped before it wrote the sizes: libsndfile says 0 frames, FFmpeg reads the data"),
        # a recorder started and stopped at once: said to be empty, as an empty WAV is, not unreadable
        Case("headers_only.opus", _headers_only("OPUS", 48_000), "failed", "contains no audio samples",
             why="Ogg Opus headers and no audio: FFmpeg finds the end of the file before a packet"),
        Case("sizes_zero_no_data.wav", _wav_header(1, 16_000, 1, 16, 36, 0), "failed", "contains no audio samples",
             why="libsndfile says 0 frames and FFmpeg finds no data either"),
        Case("zero_frames.au", _zero_frames("AU"), "failed", "contains no audio samples",
             why="a header of 0 frames that FFmpeg cannot open either"),
        Case("random.ogg", np.random.default_rng(5).bytes(3000), "failed", "not a readable audio file",
             why="no Ogg page anywhere: unreadable, not empty"),
        Case("unknown_codec.wav", _wav_header(0x1234, 44_100, 1, 16, 1036, 1000) + bytes(1000), "failed",
             "audio codec is not supported", why="a format tag FFmpeg has no decoder for"),
        Case("huge_doubles.wav", huge_doubles.read_bytes(), "failed", "too large for 32-bit float",
             why="finite doubles that overflow float32"),
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[Case], dict[str, Path], list[Path]]:
    d = tmp_path_factory.mktemp("bad")
    cases = build_cases(tmp_path_factory.mktemp("sources"))
    paths = {}
    for c in cases:
        paths[c.filename] = d / c.filename
        paths[c.filename].write_bytes(c.data)
    good = [write(d / "good_a.wav", 3.0, 44_100, 2, freq=330.0), write(d / "good_b.flac", 2.0, 22_050, 1, freq=660.0)]
    return cases, paths, good


# the cases by name, for parametrize (test_case_list_is_complete keeps it in step with build_cases)
CASE_NAMES = [
    "empty.wav", "truncated.wav", "truncated.flac", "truncated.mp3", "xing_one_frame.mp3", "text.wav", "text.mp3",
    "image.wav", "image.mp3", "claims_4gb.wav", "nan.wav", "inf.wav", "huge_floats.wav", "silence.wav",
    "one_sample.wav", "one_sample_44k.wav", "eight_channels.wav", "rate_8k.wav", "rate_192k.wav",
    "sizes_never_written.wav", "headers_only.opus", "sizes_zero_no_data.wav", "zero_frames.au", "random.ogg",
    "unknown_codec.wav", "huge_doubles.wav",
]


def test_case_list_is_complete(corpus):
    assert [c.filename for c in corpus[0]] == CASE_NAMES
    assert len({c.data for c in corpus[0]}) == len(CASE_NAMES)  # no two share bytes: none is a duplicate


@pytest.mark.parametrize("filename", CASE_NAMES)
def test_decode_directly(corpus, filename, tmp_path):
    cases, paths, _ = corpus
    case = next(c for c in cases if c.filename == filename)
    path = tmp_path / "blob"  # as the worker sees it: no extension
    path.write_bytes(case.data)
    if case.outcome == "failed":
        for run in (lambda: decode(path), lambda: decode_to_file(path, tmp_path / "raw.f32")):
            with pytest.raises(DecodeError) as err:  # and nothing else: the worker only catches DecodeError
                run()
            message = str(err.value)
            assert case.reason.lower() in message.lower(), message
            assert str(tmp_path) not in message and "\n" not in message  # no server paths, one line
        return
    tracemalloc.start()
    try:
        samples, info = decode(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size >= 1
    assert np.isfinite(samples).all()
    assert info.sample_rate == case.rate and info.channels == case.channels, info
    lo, hi = case.duration
    assert lo - 1e-9 <= info.duration_s <= hi + 1e-9, info
    assert abs(samples.shape[0] - info.duration_s * TARGET_RATE) <= 2
    # bounded by the data, whatever the header claims (4 GB here would be 8 GB of float32 at 48 kHz)
    assert peak < 64 * 2**20, peak


def test_truncated_keeps_what_precedes_the_cut(corpus, tmp_path):
    """The readable part of a truncated file is the start of the original, sample for sample."""
    cases, paths, _ = corpus
    for name in ("truncated.wav", "truncated.flac"):
        cut, _ = decode(paths[name])
        full = tmp_path / name
        sf.write(str(full), tone_and_chirp(2.0, 44_100, 2), 44_100, subtype="PCM_16")
        whole, _ = decode(full)
        n = cut.shape[0] - 200  # the resampler's last few outputs see the cut
        np.testing.assert_allclose(cut[:n], whole[:n], atol=1e-4)


def test_bad_batch_through_the_api(client, new_key, worker, corpus):
    cases, paths, good = corpus
    responses = []

    def call(method, url, **kw):
        r = getattr(client, method)(url, **kw)
        responses.append((method, url, r.status_code))
        return r

    key = new_key()
    lib = call("post", "/v1/libraries", json={"name": "bad files"}, headers=auth(key)).get_json()
    files = [paths[c.filename] for c in cases] + good
    r = upload(client, key, lib["id"], files)
    responses.append(("post", "batches", r.status_code))
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert [i["filename"] for i in body["items"]] == [p.name for p in files]
    assert not any("duplicate_of" in i for i in body["items"])
    ids = {i["filename"]: i["id"] for i in body["items"]}

    job = wait_job(client, key, body["job_id"])
    expected_failed = sorted(c.filename for c in cases if c.outcome == "failed")
    assert job["status"] == "done_with_errors", job
    assert job["counts"]["failed"] == len(expected_failed), job
    assert job["counts"]["done"] == len(files) - len(expected_failed), job
    assert sorted(e["filename"] for e in job["errors"]) == expected_failed
    assert all(e["error"] and e["error"].strip() for e in job["errors"])

    outcome = {c.filename: c for c in cases}
    outcome.update({p.name: Case(p.name, b"", "done") for p in good})
    for filename, case in outcome.items():
        item = call("get", f"/v1/items/{ids[filename]}", headers=auth(key)).get_json()
        emb = call("get", f"/v1/items/{ids[filename]}/embedding", headers=auth(key))
        call("get", f"/v1/items/{ids[filename]}/audio", headers=auth(key))
        assert item["status"] == case.outcome, (filename, item)
        if case.outcome == "failed":
            assert case.reason.lower() in (item["error"] or "").lower(), (filename, item)
            assert emb.status_code == 409
            continue
        assert item["error"] is None, item
        vec = np.array(emb.get_json()["vector"], dtype=np.float64)
        assert np.isfinite(vec).all() and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-4), filename
        if case.rate is not None:
            assert item["sample_rate"] == case.rate and item["channels"] == case.channels, item
            lo, hi = case.duration
            assert lo - 1e-6 <= item["duration_s"] <= hi + 1e-6, item

    assert call("get", "/readyz").status_code == 200
    assert all(code < 500 for *_, code in responses), [r for r in responses if r[2] >= 500]


def test_a_low_sample_rate_does_not_multiply_memory(tmp_path):
    """Resampling 25 Hz to 48 kHz makes 1,920 samples of each one: read in whole 65,536-frame blocks, a
    131 kB file took a 500 MB buffer (and a 5 Hz file gigabytes). The output now comes in bounded pieces,
    and is the same stream of samples."""
    from worker.audio import AudioInfo, stream

    path = tmp_path / "rate25.wav"
    sf.write(str(path), (0.1 * np.sin(np.arange(65_536) * 0.3)).astype(np.float32)[:, None], 25, subtype="PCM_16")
    info = AudioInfo(0, 0)
    tracemalloc.start()
    sizes = [block.shape[0] for block in stream(path, info)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.sample_rate == 25 and info.frames == 65_536
    assert sum(sizes) == 65_536 * 1_920 and max(sizes) < 4 << 20, max(sizes)
    assert peak < 64 << 20, peak  # was ~1 GB (the block and its float32 copy)


def test_a_stored_copy_that_cannot_be_read_is_not_the_files_fault(corpus, tmp_path):
    """Through the decoder child, as the worker decodes: a stored copy that cannot be read (a directory or a socket
    in its place; a file of no permission where the tests do not run as root) fails with in_file false, the
    machine's fault, where every failure was the file's (a directory: "decoder error: IsADirectoryError"), and
    `clapq upload` left it out for good. What the container or codec refuses is still the file's."""
    import socket

    from worker.decoder import DecoderProcess

    cases, paths, _ = corpus
    folder = tmp_path / "folder"
    folder.mkdir()
    unreadable = [folder]
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    unreadable.append(tmp_path / "sock")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.write_bytes(paths["truncated.wav"].read_bytes())
        locked.chmod(0)
        unreadable.append(locked)
    d = DecoderProcess()
    try:
        for path in unreadable:
            with pytest.raises(DecodeError) as err:
                d.decode(path, tmp_path / "out.f32", timeout_s=60, max_duration_s=None)
            assert not err.value.in_file, (path, str(err.value))
            assert str(err.value).startswith("the stored copy of the file could not be read ("), str(err.value)
        for name in ("text.wav", "text.mp3", "empty.wav", "image.mp3", "random.ogg", "unknown_codec.wav", "nan.wav"):
            blob = tmp_path / "blob"  # as the worker sees it: no extension
            blob.write_bytes(paths[name].read_bytes())
            with pytest.raises(DecodeError) as err:
                d.decode(blob, tmp_path / "out.f32", timeout_s=60, max_duration_s=None)
            assert err.value.in_file, (name, str(err.value))
        with pytest.raises(DecodeError) as err:
            d.decode(paths["truncated.wav"], tmp_path / "out.f32", timeout_s=60, max_duration_s=0.1)
        assert err.value.in_file  # longer than the limit
    finally:
        d.close()
        sock.close()


def _long_files(directory: Path) -> dict[str, Path]:
    """20 s of each kind whose reading an I/O error may cut short: libsndfile's (WAV, FLAC) and FFmpeg's (MP3,
    WebM, WavPack, whose demuxer says "invalid data" both where a read fails and where the file ends)."""
    from tests.make_audio import Unavailable, write_av, write_soundfile

    data = tone_and_chirp(20.0, 44_100, 2)
    out = {"wav": write_soundfile(directory / "long.wav", data, 44_100, "WAV", "PCM_16"),
           "flac": write_soundfile(directory / "long.flac", data, 44_100, "FLAC", "PCM_16")}
    for ext, container, codec, fmt, rate in (("mp3", "mp3", "libmp3lame", "fltp", 44_100),
                                             ("webm", "webm", "libopus", "flt", 48_000),
                                             ("wv", "wv", "wavpack", "fltp", 44_100)):
        try:
            out[ext] = write_av(directory / f"long.{ext}", tone_and_chirp(20.0, rate, 2), rate, container, codec, fmt)
        except Unavailable as exc:
            pytest.skip(str(exc))
    return out


def test_an_io_error_partway_through_a_stored_copy_is_not_a_shorter_file(tmp_path, eio_library, monkeypatch):
    """A read of the stored copy that fails with EIO halfway (a failing disk, a network mount's hiccup: real
    read errors, from an LD_PRELOAD library) fails the file as the machine's fault, through the decoder child as
    the worker decodes: FFmpeg's demuxer stopping was taken for the end of a cut file, and libsndfile's failed
    read went on in FFmpeg to the same end, so each was stored done with half its audio, for good (`clapq upload`
    sends the same bytes never again). The same bytes cut off there (a file that ends) still decode up to there."""
    from tests import eio
    from worker.decoder import DecoderProcess

    blobs, cut = {}, {}
    for ext, path in _long_files(tmp_path).items():
        data = path.read_bytes()
        blobs[ext] = tmp_path / f"blob-{ext}"  # as the worker sees it: no extension
        blobs[ext].write_bytes(data)
        cut[ext] = tmp_path / f"cut-{ext}"
        cut[ext].write_bytes(data[: len(data) // 2])
    for name, value in eio.env(eio_library, list(blobs.values()), at="50%").items():
        monkeypatch.setenv(name, value)  # the decoder child's, read as it starts
    d = DecoderProcess()
    try:
        for ext, blob in blobs.items():
            with pytest.raises(DecodeError) as err:
                info, n = d.decode(blob, tmp_path / "out.f32", timeout_s=120, max_duration_s=None)
                pytest.fail(f"{ext}: decoded {n / TARGET_RATE:.1f} s of 20 s as a whole file")
            assert str(err.value) == "the stored copy of the file could not be read (Input/output error)", ext
            assert not err.value.in_file, ext
            info, n = d.decode(cut[ext], tmp_path / "out.f32", timeout_s=120, max_duration_s=None)
            assert 3 * TARGET_RATE < n < 17 * TARGET_RATE, (ext, n / TARGET_RATE)
    finally:
        d.close()


def test_a_read_error_that_passes_is_read_past_or_fails_unmarked(tmp_path, eio_library, monkeypatch):
    """A read error that passes (one read fails, the next ones do not): libsndfile's failed block (WAV, FLAC) is
    read on by FFmpeg from where it stopped, the whole file; where FFmpeg's demuxer stopped, a second demuxing
    that goes on past that point shows a read that failed, the machine's fault (not the end of a cut file), and
    the file fails unmarked, to be sent again."""
    from tests import eio
    from worker.decoder import DecoderProcess

    files = _long_files(tmp_path)
    for ext, want in (("wav", None), ("flac", None), ("webm", "(Input/output error)"),
                      ("wv", "(a read failed, then succeeded)")):  # WavPack's demuxer gives no errno
        for name, value in eio.env(eio_library, [files[ext]], at="50%", times=1).items():
            monkeypatch.setenv(name, value)
        d = DecoderProcess()
        try:
            if want is None:
                info, n = d.decode(files[ext], tmp_path / "out.f32", timeout_s=120, max_duration_s=None)
                assert n == 20 * TARGET_RATE, (ext, n)
            else:
                want = f"the stored copy of the file could not be read {want}"
                with pytest.raises(DecodeError, match=re.escape(want)) as err:
                    d.decode(files[ext], tmp_path / "out.f32", timeout_s=120, max_duration_s=None)
                assert not err.value.in_file
        finally:
            d.close()


def test_a_stream_that_begins_partway_does_not_fail_the_file(tmp_path):
    """An FLV whose header announces its sound alone and whose video begins later (as a stream recording may): the
    demuxer adds the video's stream as it meets it, and PyAV's demuxing ended in an IndexError ("decoder error:
    IndexError: list index out of range", not the file's, so `clapq upload` sent it again at every run to fail
    again) once it had read the whole file. The sound decodes, all of it, through the decoder child as well."""
    from tests.make_audio import Unavailable, write_av
    from worker.decoder import DecoderProcess

    try:
        flv = write_av(tmp_path / "a.flv", tone_and_chirp(10.0, 44_100, 2), 44_100, "flv", "aac", "fltp")
    except Unavailable as exc:
        pytest.skip(str(exc))
    body = bytes([0x12]) + bytes(64)  # a Sorenson H.263 key frame's tag body
    video = bytes([9]) + len(body).to_bytes(3, "big") + (9000).to_bytes(3, "big") + bytes(4) + body
    late = tmp_path / "late.flv"
    late.write_bytes(flv.read_bytes() + video + struct.pack(">I", len(video)))
    samples, info = decode(late)
    assert info.format == "flv" and abs(len(samples) / TARGET_RATE - 10.0) < 0.1, len(samples) / TARGET_RATE
    d = DecoderProcess()
    try:
        info, n = d.decode(late, tmp_path / "out.f32", timeout_s=60, max_duration_s=None)
        assert n == len(samples)
    finally:
        d.close()
