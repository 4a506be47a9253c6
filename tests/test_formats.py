"""Every format clapq claims to read decodes to the right 48 kHz mono signal, through both decoders,
and a batch of one file per format embeds end to end through the API and a real worker."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr

import worker.audio as audio
from tests.conftest import auth, wait_job
from tests.make_audio import FORMATS, Unavailable, make, tone_and_chirp

SECONDS = 1.5
FREQ = 440.0
LOSSY_SLACK_S = 0.03  # encoder padding: AAC pads to a 1024-sample frame, Vorbis/PyAV keeps its last granule


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, object]:
    """name -> Path of one file per format, or the reason it cannot be written here."""
    d = tmp_path_factory.mktemp("formats")
    out: dict[str, object] = {}
    for name in FORMATS:
        try:
            out[name] = make(name, d, SECONDS, FREQ)
        except Unavailable as exc:
            out[name] = str(exc)
    return out


def upload(client, key, lib_id, paths):
    """One multipart batch, as in test_e2e."""
    data = {"files": [(io.BytesIO(p.read_bytes()), p.name) for p in paths]}
    return client.post(f"/v1/libraries/{lib_id}/batches", headers=auth(key), data=data,
                       content_type="multipart/form-data")


def blob_copy(path, tmp_path):
    """The worker decodes blobs named by sha256, without an extension: so do these tests."""
    dst = tmp_path / "blob"
    shutil.copyfile(path, dst)
    return dst


def source_at_48k(fmt) -> np.ndarray:
    """What the decoder should give for the generated file: its mono mix, resampled to 48 kHz."""
    mono = tone_and_chirp(SECONDS, fmt.rate, fmt.channels, FREQ).mean(axis=1)
    return soxr.resample(mono, fmt.rate, audio.TARGET_RATE, quality="HQ") if fmt.rate != audio.TARGET_RATE else mono


def best_correlation(x: np.ndarray, ref: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Normalised correlation of x against ref at the best lag in [-max_lag, max_lag] (codec delay)."""
    n = 1 << int(np.ceil(np.log2(len(x) + len(ref))))
    xc = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(ref, n)), n)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    lag = int(lags[np.argmax(xc[lags])])
    a, b = (x[lag:], ref) if lag >= 0 else (x, ref[-lag:])
    m = min(len(a), len(b))
    a, b = a[:m].astype(np.float64), b[:m].astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b))), lag


def expected_rates(fmt) -> set[int]:
    # Opus always decodes at 48 kHz; libsndfile reports the encoder's input rate from the header, FFmpeg 48 kHz
    return {fmt.rate, 48_000} if "opus" in fmt.name else {fmt.rate}


def check_decoded(fmt, samples: np.ndarray, info: audio.AudioInfo) -> None:
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert np.isfinite(samples).all()
    assert info.sample_rate in expected_rates(fmt), info
    assert info.channels == fmt.channels, info
    assert info.format, info
    slack = LOSSY_SLACK_S if fmt.lossy else 1e-6
    assert info.duration_s == pytest.approx(SECONDS, abs=slack), info
    # 48 kHz output: as many samples as the original duration says (soxr rounds)
    assert abs(samples.shape[0] - info.duration_s * audio.TARGET_RATE) <= 2
    assert info.warning == "", info  # a whole file is not said to be cut short

    # the dominant frequency survives (FFT bin = 0.67 Hz for 1.5 s)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    dominant = np.argmax(spectrum) * audio.TARGET_RATE / len(samples)
    assert dominant == pytest.approx(FREQ, abs=2.0), (fmt.name, dominant)

    # the whole waveform (tone + chirp) lines up with the source, after at most 50 ms of codec delay
    ref = source_at_48k(fmt)
    corr, lag = best_correlation(samples, ref, max_lag=audio.TARGET_RATE // 20)
    assert corr >= (0.99 if fmt.lossy else 0.999), (fmt.name, corr, lag)
    if not fmt.lossy:
        assert lag == 0
        # mono is the mean of the channels (not the first one, not the sum)
        rms, ref_rms = np.sqrt(np.mean(samples ** 2)), np.sqrt(np.mean(ref ** 2))
        assert rms == pytest.approx(ref_rms, rel=0.01), (fmt.name, rms, ref_rms)


def get(files, name):
    value = files[name]
    if isinstance(value, str):
        pytest.skip(value)
    return value


@pytest.mark.parametrize("name", list(FORMATS))
def test_decode(files, name, tmp_path):
    fmt = FORMATS[name]
    samples, info = audio.decode(blob_copy(get(files, name), tmp_path))
    check_decoded(fmt, samples, info)

    # the streaming variants the worker uses give the same samples
    raw = tmp_path / "out.f32"
    info2, n = audio.decode_to_file(blob_copy(get(files, name), tmp_path), raw)
    assert info2 == info and n == samples.shape[0]
    np.testing.assert_array_equal(np.fromfile(raw, dtype=np.float32), samples)


@pytest.mark.parametrize("name", list(FORMATS))
def test_decode_with_ffmpeg_only(files, name, tmp_path, monkeypatch):
    """Where libsndfile is older (no MP3/Opus) PyAV decodes those: it must agree on everything."""
    fmt = FORMATS[name]
    monkeypatch.setattr(audio, "_soundfile_blocks", lambda path, info: None)
    samples, info = audio.decode(blob_copy(get(files, name), tmp_path))
    check_decoded(fmt, samples, info)


def test_video_streams_are_ignored(files):
    """The MP4 and MKV files really carry a video stream (and it is not the first stream in MP4)."""
    import av

    for name in ("mp4_aac_video", "mkv_flac_video"):
        with av.open(str(get(files, name))) as c:
            assert [s.type for s in c.streams].count("video") == 1 and len(c.streams.audio) == 1


def test_every_format_in_one_batch(client, new_key, worker, files):
    paths = {name: p for name, p in files.items() if not isinstance(p, str)}
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "formats"}, headers=auth(key)).get_json()
    r = upload(client, key, lib["id"], list(paths.values()))
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert len(body["items"]) == len(paths) and not any("duplicate_of" in i for i in body["items"])
    job = wait_job(client, key, body["job_id"])
    assert job["status"] == "done", job
    ids = {i["filename"]: i["id"] for i in body["items"]}
    for name, path in paths.items():
        fmt = FORMATS[name]
        item = client.get(f"/v1/items/{ids[path.name]}", headers=auth(key)).get_json()
        assert item["status"] == "done" and item["error"] is None, item
        assert item["sample_rate"] in expected_rates(fmt) and item["channels"] == fmt.channels, item
        assert item["duration_s"] == pytest.approx(SECONDS, abs=LOSSY_SLACK_S if fmt.lossy else 1e-3), item
        assert item["format"], item
        # served as what it is (24-bit, float and 5.1 WAVs, which libsndfile calls "wavex", were downloads
        # of application/octet-stream)
        served = client.get(f"/v1/items/{ids[path.name]}/audio", headers=auth(key)).headers["Content-Type"]
        want = {"wav": "audio/wav", "webm": "audio/webm", "avi": "video/x-msvideo"}.get(fmt.ext)
        assert served == want if want else served.startswith("audio/"), (name, item["format"], served)
        vec = np.array(client.get(f"/v1/items/{ids[path.name]}/embedding", headers=auth(key)).get_json()["vector"])
        assert np.isfinite(vec).all() and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("channels", [2, 3, 6])
def test_downmix_is_the_channel_mean(channels):
    """The mono mix is the mean of the channels for soundfile's strided blocks and PyAV's planar ones;
    for stereo bit for bit (what earlier versions stored), otherwise to float32 rounding."""
    rng = np.random.default_rng(channels)
    interleaved = rng.standard_normal((70_000, channels)).astype(np.float32)
    for block in (interleaved.T, np.ascontiguousarray(interleaved.T)):
        mono = audio._downmix(block)
        assert mono.dtype == np.float32 and mono.shape == (70_000,)
        expected = block.mean(axis=0, dtype=np.float32)
        if channels == 2:
            np.testing.assert_array_equal(mono, expected)
        else:
            np.testing.assert_allclose(mono, expected, rtol=0, atol=1e-6)
    single = interleaved[:, :1].T
    np.testing.assert_array_equal(audio._downmix(single), single[0])


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.sf and f.sf[1] == "PCM_16"])
def test_16_bit_pcm_blocks_equal_libsndfile_floats(files, name, tmp_path):
    """16-bit PCM is read as integers and scaled by the decoder itself: the blocks must be bit for bit
    what libsndfile's own float conversion gives, extremes included."""
    import soundfile as sf

    path = blob_copy(get(files, name), tmp_path)
    info = audio.AudioInfo(0, 0)
    blocks = audio._soundfile_blocks(path, info)
    ours = np.concatenate([b.T for b in blocks])
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, sf.read(str(path), dtype="float32", always_2d=True)[0])
    extremes = tmp_path / "extremes.wav"
    sf.write(str(extremes), np.array([[-32768], [32767], [0], [1], [-1]], np.int16), 8_000, subtype="PCM_16")
    got = next(audio._soundfile_blocks(extremes, audio.AudioInfo(0, 0)))[0]
    np.testing.assert_array_equal(got, sf.read(str(extremes), dtype="float32")[0])
    np.testing.assert_array_equal(got, np.array([-1.0, 32767 / 32768, 0.0, 2**-15, -(2**-15)], np.float32))


def test_webm_is_told_from_matroska_by_its_header_not_its_name(tmp_path):
    """FFmpeg reads WebM and Matroska with one demuxer, so WebM was told apart by the file's name: a .webm
    renamed .mkv was served as audio/x-matroska. The EBML header's DocType says which it is."""
    from api.items import media_type
    from clapq.models import Item
    from tests.make_audio import write_av

    wave = tone_and_chirp(0.5, 48_000, 1)
    for container, name, fmt, served in (("webm", "renamed.mkv", "webm", "audio/webm"),
                                          ("matroska", "plain.mka", "matroska", "audio/x-matroska")):
        path = write_av(tmp_path / name, wave, 48_000, container, "libopus", "flt")
        info = audio.decode(blob_copy(path, tmp_path))[1]
        assert info.format == fmt, (container, info.format)
        assert media_type(Item(audio_format=info.format, filename=name)) == served
    # a WebM stored before its header was read (format "matroska") is still told by its name (and so is a
    # Matroska file named .webm, which nothing tells from those)
    assert media_type(Item(audio_format="matroska", filename="old.webm")) == "audio/webm"


def test_aac_padding_is_cut_to_the_length_the_file_states(tmp_path):
    """AAC decodes whole 1,024-sample frames, so a 10.0 s clip came out 10.008 s long and got a second
    window; the decoder cuts it to the stream's stated length (441,000 frames), so it is one window."""
    from tests.make_audio import write_av
    from worker.windows import spans

    path = write_av(tmp_path / "ten.m4a", tone_and_chirp(10.0, 44_100, 2), 44_100, "ipod", "aac", "fltp")
    samples, info = audio.decode(blob_copy(path, tmp_path))
    assert info.frames == 441_000 and info.duration_s == 10.0 and samples.shape[0] == 480_000
    assert info.format == "mp4"  # FFmpeg's demuxer is "mov" for both; an M4A's brand says MP4
    mov = write_av(tmp_path / "ten.mov", tone_and_chirp(1.0, 44_100, 1), 44_100, "mov", "aac", "fltp")
    assert audio.decode(blob_copy(mov, tmp_path))[1].format == "mov"  # QuickTime's brand, "qt  "
    assert len(spans(samples.shape[0], 48_000, 480_000, 240_000)) == 1
    # a raw ADTS stream's duration is FFmpeg's guess from the bitrate (439,013 frames for this one):
    # nothing is cut there, or real audio would go
    adts = write_av(tmp_path / "ten.aac", tone_and_chirp(10.0, 44_100, 1), 44_100, "adts", "aac", "fltp")
    _, info = audio.decode(blob_copy(adts, tmp_path))
    assert info.frames >= 441_000, info


def mux_mono(out, stream, sound: np.ndarray, rate: int, first_pts: int = 0, fmt: str = "s16") -> None:
    """Encode mono `sound` into `stream` of the open container `out`, in frames of 1,024 from `first_pts`."""
    from fractions import Fraction

    import av

    from tests.make_audio import _to_format

    for start in range(0, sound.shape[0], 1024):
        frame = av.AudioFrame.from_ndarray(_to_format(sound[start:start + 1024], fmt), format=fmt, layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, first_pts + start, Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)


def mux_black_video(out, seconds: float):
    """A black 64x48 video track of `seconds` at 10 frames a second from 0, in the open container `out`."""
    from fractions import Fraction

    import av

    video = out.add_stream("mpeg4", rate=10)
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    for i in range(int(seconds * 10)):
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, 10)
        for packet in video.encode(frame):
            out.mux(packet)
    return video


def test_an_empty_first_audio_track_falls_back_to_one_with_audio(tmp_path):
    """A Matroska file whose first audio track has no packets: the second track is decoded."""
    import av

    path = tmp_path / "two_tracks.mkv"
    sound = tone_and_chirp(4.0, 22_050, 1)
    with av.open(str(path), "w", format="matroska") as out:
        empty = out.add_stream("flac", rate=44_100, layout="mono")
        empty.format = "s16"
        full = out.add_stream("flac", rate=22_050, layout="mono")
        full.format = "s16"
        mux_mono(out, full, sound, 22_050)
        for stream in (full, empty):
            for packet in stream.encode(None):
                out.mux(packet)
    samples, info = audio.decode(blob_copy(path, tmp_path))
    assert (info.sample_rate, info.channels, info.frames) == (22_050, 1, 88_200)
    assert samples.shape[0] == 192_000


@pytest.mark.parametrize("container", ["matroska", "mp4"])
def test_of_several_audio_tracks_the_one_flagged_default_is_decoded(container, tmp_path):
    """A film of two audio tracks whose second is flagged default (the first a commentary or another language,
    not flagged): players (mpv, VLC, a browser) play the second, and the first was embedded. The track flagged
    default is decoded now; the first where none is, or where several are (Matroska's flag is on unless cleared)."""
    import av

    if not hasattr(av.stream, "Disposition"):
        pytest.skip("this PyAV cannot flag a stream default")
    path = tmp_path / "two_tracks"
    with av.open(str(path), "w", format=container) as out:
        commentary = out.add_stream("aac" if container == "mp4" else "flac", rate=44_100, layout="mono")
        main = out.add_stream("aac" if container == "mp4" else "flac", rate=22_050, layout="mono")
        commentary.format, main.format = ("fltp", "fltp") if container == "mp4" else ("s16", "s16")
        commentary.disposition, main.disposition = av.stream.Disposition(0), av.stream.Disposition.default
        mux_mono(out, commentary, sine(4.0, 44_100, 440.0)[:, :1], 44_100, fmt=commentary.format.name)
        mux_mono(out, main, sine(3.0, 22_050, 1000.0)[:, :1], 22_050, fmt=main.format.name)
        for stream in (commentary, main):
            for packet in stream.encode(None):
                out.mux(packet)
    with av.open(str(path)) as c:  # as written: the second flagged default, the first not
        assert [bool(s.disposition & av.stream.Disposition.default) for s in c.streams.audio] == [False, True]
    samples, info = audio.decode(path)
    assert (info.sample_rate, info.channels) == (22_050, 1), info
    assert info.duration_s == pytest.approx(3.0, abs=0.03), info
    assert dominant_hz(samples) == pytest.approx(1000.0, abs=3)


def sine(seconds: float, rate: int, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.repeat((0.5 * np.sin(2 * np.pi * freq * t))[:, None], 2, axis=1).astype(np.float32)


def dominant_hz(x: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * audio.TARGET_RATE / len(x))


@pytest.mark.parametrize("kind", ["mp3", "mp3_two_rates", "ogg_vorbis", "ogg_opus", "ogg_vorbis_two_rates",
                                  "ogg_vorbis_mono_then_stereo", "ogg_opus_mono_then_stereo"])
def test_files_joined_end_to_end_decode_whole(kind, tmp_path):
    """Two files joined with `cat` (6 s at 440 Hz, then 4 s at 1 kHz): an MP3 whose first part's Xing header
    says 6 s, chained Ogg (Vorbis, Opus) of which libsndfile read the first link only, and chained Ogg whose
    second link has another rate or channel count, where FFmpeg stops reading without an error. All 10 s
    decode (the Ogg links each exactly), the second part at its pitch (a part at another rate is converted,
    not played at the wrong speed)."""
    from tests.make_audio import write_av, write_soundfile

    rate2 = 22_050 if kind.endswith("two_rates") else 48_000 if "opus" in kind else 44_100
    rate1 = 48_000 if "opus" in kind else 44_100
    channels1 = 1 if kind.endswith("mono_then_stereo") else 2
    parts = []
    for i, (seconds, rate, freq, channels) in enumerate([(6.0, rate1, 440.0, channels1), (4.0, rate2, 1000.0, 2)]):
        path = tmp_path / f"part{i}"
        wave = sine(seconds, rate, freq)[:, :channels]
        try:
            if kind.startswith("mp3"):
                write_av(path, wave, rate, "mp3", "libmp3lame", "fltp")
            else:
                write_soundfile(path, wave, rate, "OGG", kind.split("_")[1].upper())
        except Unavailable as exc:
            pytest.skip(str(exc))
        parts.append(path.read_bytes())
    joined = tmp_path / "joined"
    joined.write_bytes(b"".join(parts))
    samples, info = audio.decode(joined)
    tolerance = 0.15 if kind.startswith("mp3") else 0.001
    assert samples.shape[0] / audio.TARGET_RATE == pytest.approx(10.0, abs=tolerance), info
    assert info.duration_s == pytest.approx(10.0, abs=tolerance), info
    assert (info.sample_rate, info.channels) == (rate1, channels1), info
    assert dominant_hz(samples[: 5 * audio.TARGET_RATE]) == pytest.approx(440.0, abs=3)
    assert dominant_hz(samples[-3 * audio.TARGET_RATE:]) == pytest.approx(1000.0, abs=3)



def test_a_chained_ogg_of_links_of_many_rates_decodes_in_bounded_memory(tmp_path):
    """A chained Ogg of 600 short Vorbis links, each at a rate of its own (1.7 MB): each part is converted to
    the first one's rate, by at most MAX_CONVERTERS converters kept at once. One kept per rate grew the decoder
    by ~0.4 MB each (270 MB here; ~4 GB at MAX_OGG_LINKS links)."""
    import subprocess
    import sys

    path = tmp_path / "rates.ogg"
    with open(path, "wb") as f:
        for i in range(600):
            rate = 8_000 + 7 * i
            buf = io.BytesIO()
            sf.write(buf, sine(0.05, rate, 440.0)[:, :1], rate, format="OGG", subtype="VORBIS")
            f.write(buf.getvalue())
    # VmHWM, not ru_maxrss: that one keeps the high-water mark of the process before exec (pytest's, with torch)
    script = ("import re, sys; from worker.audio import decode_to_file; "
              "info, n = decode_to_file(sys.argv[1], sys.argv[2]); "
              "print(info.sample_rate, n, re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1])")
    r = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "raw.f32")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rate, n, maxrss_kb = map(int, r.stdout.split())
    assert rate == 8_000 and n >= 600 * 0.05 * audio.TARGET_RATE, r.stdout  # every link's audio
    assert maxrss_kb < 200 * 1024, f"peak RSS {maxrss_kb // 1024} MB"


@pytest.mark.parametrize("links", [2_000, 20])
def test_a_chained_ogg_of_empty_links_decodes_its_audio(links, tmp_path, monkeypatch):
    """An Ogg file whose 6 s of audio are followed by many empty links (a begin page and an end page, no
    data, as a crafted upload could be): the audio decodes, without a container opened for each of
    millions of links. Past MAX_OGG_LINKS (here cut to 10) the file is read whole, as before chained
    links were read one by one."""
    import struct

    from tests.make_audio import write_soundfile

    if links == 20:
        monkeypatch.setattr(audio, "MAX_OGG_LINKS", 10)
    path = write_soundfile(tmp_path / "a.ogg", sine(6.0, 44_100, 440.0), 44_100, "OGG", "VORBIS")

    def page(flag: int, serial: int, seq: int) -> bytes:
        return b"OggS" + bytes([0, flag]) + struct.pack("<qIII", 0, serial, seq, 0) + bytes([0])

    with open(path, "ab") as f:
        f.write(b"".join(page(2, 1000 + i, 0) + page(4, 1000 + i, 1) for i in range(links)))
    assert len(audio._ogg_links(path)) == (links + 1 if links == 2_000 else 0)
    samples, info = audio.decode(path)
    assert info.duration_s == pytest.approx(6.0, abs=0.001), info
    assert dominant_hz(samples) == pytest.approx(440.0, abs=3)

@pytest.mark.parametrize("fmt,subtype,rate", [("OGG", "VORBIS", 44_100), ("OGG", "OPUS", 48_000), ("FLAC", "PCM_16", 44_100)])
def test_audio_lost_to_damage_is_silence_so_later_times_stay_true(fmt, subtype, rate, tmp_path):
    """A file damaged in the middle (a fifteenth of its bytes zeroed): the audio there is lost, and was
    dropped, so everything after it came earlier than it is (a segment found at 40-50 s was at 45-55 s) and
    the file was short. The gap the timestamps show is silence now: a tone per 5 s is where it was."""
    tones = [300, 500, 700, 900, 1100, 1300]
    path = tmp_path / f"damaged.{subtype.lower()}"
    sf.write(str(path), np.concatenate([sine(5.0, rate, f) for f in tones]), rate, format=fmt, subtype=subtype)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + len(data) // 15] = bytes(len(data) // 15)
    path.write_bytes(data)
    samples, info = audio.decode(blob_copy(path, tmp_path))
    r = audio.TARGET_RATE
    # FLAC: libsndfile decodes a little of the damage before FFmpeg takes over, ~0.3 s
    assert abs(samples.shape[0] / r - 30.0) <= 0.35, samples.shape[0] / r
    for i, f in enumerate(tones):  # the last 1.6 s of each tone's 5: a shift of a second would show
        assert dominant_hz(samples[int((i * 5 + 3.2) * r): int((i * 5 + 4.8) * r)]) == pytest.approx(f, abs=15), i


@pytest.mark.parametrize("container,codec,fmt,rate,offset_s", [("matroska", "flac", "s16", 22_050, 3.0),
                                                               ("mp4", "aac", "fltp", 8_000, 0.4),
                                                               ("matroska", "flac", "s16", 8_000, 75.0)])
def test_a_video_whose_sound_begins_later_keeps_the_videos_times(container, codec, fmt, rate, offset_s, tmp_path):
    """A video whose audio track begins later than its picture: its segments' times were counted from the
    audio's start, so a match at 0-10 s played 3-13 s in a player. The time before the sound is silence now.
    At 8 kHz that silence (0.4 s) made an AAC track's decoded length run past its stated length by less than
    AAC's padding allowance, and the end of the real audio was cut as padding: the stated length counts it.
    A sound that begins more than a minute in (the most a jump of timestamps is taken for lost audio) was
    timed from 0 (helper-40): within the video's length it is the video's time."""
    import av

    path = tmp_path / f"late_sound.{container}"
    with av.open(str(path), "w", format=container) as out:
        track = out.add_stream(codec, rate=rate, layout="mono")
        track.format = fmt
        video = mux_black_video(out, offset_s + 2.0)
        mux_mono(out, track, sine(2.0, rate, 440.0)[:, :1], rate, first_pts=int(offset_s * rate), fmt=fmt)
        for stream in (video, track):
            for packet in stream.encode(None):
                out.mux(packet)
    samples, info = audio.decode(blob_copy(path, tmp_path))
    r = audio.TARGET_RATE
    assert samples.shape[0] / r == pytest.approx(offset_s + 2.0, abs=0.02), samples.shape[0] / r
    assert np.abs(samples[: int((offset_s - 0.05) * r)]).max() < 0.02  # silence until the sound (AAC rings in)
    assert np.abs(samples[-int(0.1 * r):]).max() > 0.1  # the tone's end, not cut


def surround(seconds: float, rate: int, channels: int) -> np.ndarray:
    """(frames, channels): a 440 Hz tone in every channel but the last, a 1 kHz tone there."""
    wave = sine(seconds, rate, 440.0)[:, :1].repeat(channels, axis=1)
    wave[:, -1] = sine(seconds, rate, 1000.0)[:, 0]
    return wave


@pytest.mark.parametrize("kind", ["vorbis_8ch.ogg", "aac_7.1.m4a", "flac_8ch.mkv"])
def test_eight_channels_through_ffmpeg_decode_to_their_mix(kind, tmp_path):
    """Audio of 8 channels that FFmpeg decodes (7.1 AAC, 8-channel Vorbis and FLAC in Matroska): the decoder
    died (SIGSEGV) on every one, as PyAV's to_ndarray of a planar frame of 8 or more channels reads past the
    end of its table of planes (helper-40); 6 and 7 channels were fine. Decoded in the decoder's child
    process, as the worker does, so that the old crash fails this test instead of killing it."""
    import av
    from fractions import Fraction

    from worker.decoder import DecoderProcess

    rate, seconds = 48_000, 3.0
    wave = surround(seconds, rate, 8)
    path = tmp_path / kind
    if kind.endswith(".ogg"):
        sf.write(str(path), wave, rate, format="OGG", subtype="VORBIS")
    else:
        codec, fmt = ("aac", "fltp") if kind.endswith(".m4a") else ("flac", "s16")
        with av.open(str(path), "w", format="mp4" if kind.endswith(".m4a") else "matroska") as out:
            track = out.add_stream(codec, rate=rate, layout="7.1")
            track.format = fmt
            # packed frames, converted by FFmpeg: PyAV's from_ndarray of planar 8 channels fails as its
            # to_ndarray did
            convert = av.AudioResampler(format=fmt, layout="7.1", rate=rate)
            for start in range(0, wave.shape[0], 1024):
                frame = av.AudioFrame.from_ndarray(wave[start:start + 1024].reshape(1, -1).astype(np.float32),
                                                   format="flt", layout="7.1")
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                for converted in convert.resample(frame):
                    for packet in track.encode(converted):
                        out.mux(packet)
            for packet in track.encode(None):
                out.mux(packet)
    d = DecoderProcess()
    try:
        info, n = d.decode(blob_copy(path, tmp_path), tmp_path / "out.f32", timeout_s=60, max_duration_s=None)
    finally:
        d.close()
    samples = np.fromfile(tmp_path / "out.f32", np.float32)
    assert info.channels == 8 and n == samples.shape[0], info
    assert n / audio.TARGET_RATE == pytest.approx(seconds, abs=0.05), info
    # the mix: 7/8 of the 440 Hz tone and 1/8 of the 1 kHz one
    spectrum = np.abs(np.fft.rfft(samples[: 2 * audio.TARGET_RATE]))
    hz = np.fft.rfftfreq(2 * audio.TARGET_RATE, 1 / audio.TARGET_RATE)
    near = lambda f: spectrum[(hz > f - 5) & (hz < f + 5)].max()  # noqa: E731
    assert 4 < near(440.0) / near(1000.0) < 12, (near(440.0), near(1000.0))


def test_mp3_parts_of_other_rates_or_channels_joined_without_a_xing_header_decode_whole(tmp_path):
    """MP3s joined with `cat` where the parts have no Xing header and differ in rate or channels: libsndfile
    said the whole length and gave only the first part (mono 6 s + stereo 4 s came out 6.03 s), or the second
    part as noise. The frame headers' rate and channel mode now send such a file to FFmpeg (helper-40)."""
    import av

    if "libmp3lame" not in av.codecs_available:
        pytest.skip("this PyAV/FFmpeg build has no MP3 encoder")
    for (rate1, ch1), (rate2, ch2) in (((44_100, 1), (44_100, 2)), ((44_100, 2), (44_100, 1)),
                                       ((22_050, 2), (44_100, 2))):
        parts = []
        for i, (seconds, rate, freq, channels) in enumerate([(6.0, rate1, 440.0, ch1), (4.0, rate2, 1000.0, ch2)]):
            path = tmp_path / f"part{i}.mp3"
            layout = {1: "mono", 2: "stereo"}[channels]
            with av.open(str(path), "w", format="mp3", options={"write_xing": "0"}) as out:
                a = out.add_stream("libmp3lame", rate=rate, layout=layout)
                a.format = "fltp"
                from tests.make_audio import _to_format
                from fractions import Fraction

                wave = sine(seconds, rate, freq)[:, :channels]
                for start in range(0, wave.shape[0], 1152):
                    frame = av.AudioFrame.from_ndarray(_to_format(wave[start:start + 1152], "fltp"), format="fltp",
                                                       layout=layout)
                    frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                    for p in a.encode(frame):
                        out.mux(p)
                for p in a.encode(None):
                    out.mux(p)
            parts.append(path.read_bytes())
        joined = tmp_path / "joined"
        joined.write_bytes(b"".join(parts))
        samples, info = audio.decode(joined)
        assert samples.shape[0] / audio.TARGET_RATE == pytest.approx(10.0, abs=0.15), (rate1, ch1, rate2, ch2, info)
        assert dominant_hz(samples[: 5 * audio.TARGET_RATE]) == pytest.approx(440.0, abs=3)
        assert dominant_hz(samples[-3 * audio.TARGET_RATE:]) == pytest.approx(1000.0, abs=3), (rate1, ch1, rate2, ch2)


@pytest.mark.parametrize("xing", [True, False])
def test_an_mp3_damaged_midway_decodes_past_the_damage(xing, tmp_path):
    """An MP3 of 10 s (5 s at 440 Hz, then 880 Hz) with 8 KB of garbage 3 s in (a bad sector, a torn download):
    libmpg123 gives up resyncing there and libsndfile ends the data without an error, so the item was stored as
    its first 3 s, done, the rest never searched. FFmpeg skips the damaged frames and reads on (as the ffmpeg
    CLI plays it); the decoder now goes on with it where libsndfile stops short of the length it states."""
    from fractions import Fraction

    import av

    from tests.make_audio import _to_format

    if "libmp3lame" not in av.codecs_available:
        pytest.skip("this PyAV/FFmpeg build has no MP3 encoder")
    src = tmp_path / "song.mp3"
    wave = np.concatenate([sine(5.0, 44_100, 440.0), sine(5.0, 44_100, 880.0)])
    with av.open(str(src), "w", format="mp3", options={"write_xing": "1" if xing else "0"}) as out:
        a = out.add_stream("libmp3lame", rate=44_100, layout="stereo")
        a.format, a.bit_rate = "fltp", 128_000
        for start in range(0, wave.shape[0], 1152):
            frame = av.AudioFrame.from_ndarray(_to_format(wave[start:start + 1152], "fltp"), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 44_100, start, Fraction(1, 44_100)
            for p in a.encode(frame):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    data = bytearray(src.read_bytes())
    at = len(data) * 3 // 10
    data[at:at + 8192] = np.random.default_rng(3).integers(0, 256, 8192, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged"
    damaged.write_bytes(bytes(data))
    samples, info = audio.decode(damaged)
    r = audio.TARGET_RATE
    # 8 KB of 128 kbit/s are 0.5 s, which FFmpeg leaves out (an MP3's frames carry no times)
    assert samples.shape[0] / r == pytest.approx(9.5, abs=0.2), info
    assert info.duration_s == pytest.approx(samples.shape[0] / r, abs=0.001)
    assert dominant_hz(samples[int(1.0 * r): int(2.5 * r)]) == pytest.approx(440.0, abs=5)
    assert dominant_hz(samples[-3 * r:]) == pytest.approx(880.0, abs=5)


def test_aac_packets_that_do_not_decode_leave_their_time_as_silence(tmp_path):
    """An MP4 of 20 s (10 s at 440 Hz, then 880 Hz) with every 40th AAC packet damaged: each lost packet
    left a 21 ms hole, under the gap taken as lost audio, so every later time came earlier (helper-40: 1.5 s
    by the end of a minute). Its time is silence now: the length stays 20 s and the change at 10 s."""
    import av

    src = tmp_path / "clean.m4a"
    wave = np.concatenate([sine(10.0, 44_100, 440.0), sine(10.0, 44_100, 880.0)])
    from tests.make_audio import write_av

    write_av(src, wave, 44_100, "mp4", "aac", "fltp")
    damaged = tmp_path / "damaged.m4a"
    rng = np.random.default_rng(7)
    with av.open(str(src)) as inp, av.open(str(damaged), "w", format="mp4") as out:
        s = inp.streams.audio[0]
        o = out.add_stream_from_template(s)
        for i, packet in enumerate(inp.demux(s)):
            if packet.size == 0:
                continue
            if i % 40 == 20 and packet.size > 8:
                data = bytes(packet)[:4] + rng.integers(0, 256, packet.size - 4, dtype=np.uint8).tobytes()
                new = av.Packet(data)
                new.pts, new.dts, new.time_base, new.duration = packet.pts, packet.dts, packet.time_base, packet.duration
                packet = new
            packet.stream = o
            out.mux(packet)
    samples, info = audio.decode(blob_copy(damaged, tmp_path))
    r = audio.TARGET_RATE
    assert samples.shape[0] / r == pytest.approx(20.0, abs=0.05), samples.shape[0] / r
    assert dominant_hz(samples[int(9.2 * r): int(9.9 * r)]) == pytest.approx(440.0, abs=15)
    assert dominant_hz(samples[int(10.1 * r): int(10.8 * r)]) == pytest.approx(880.0, abs=15)
    assert dominant_hz(samples[int(19.2 * r): int(19.9 * r)]) == pytest.approx(880.0, abs=15)


def test_a_video_without_sound_is_said_to_have_no_audio_stream(tmp_path):
    """A video-only MP4 (a muted camera clip, a screen recording) was told "contains no audio samples": the
    check for an MP4 of no tracks at all looked at the streams after closing the file, when none are left."""
    import av

    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        video = mux_black_video(out, 2.0)
        for packet in video.encode(None):
            out.mux(packet)
    with pytest.raises(audio.DecodeError, match="^the file has no audio stream$"):
        audio.decode(blob_copy(path, tmp_path))


def test_blocks_of_many_channels_hold_no_more_samples_than_stereo(tmp_path):
    """A block of a 256-channel file is as many samples as a stereo block, not 128 times as many (a 1,024-
    channel WAV's blocks were 256 MB each, and a decoder grew to 690 MB, helper-40); it still mixes right."""
    wave = surround(1.0, 16_000, 256)
    path = tmp_path / "many.wav"
    sf.write(str(path), wave, 16_000, subtype="PCM_16")
    info = audio.AudioInfo(0, 0)
    blocks = list(audio._soundfile_blocks(path, info))
    assert max(b.size for b in blocks) <= 2 * audio.BLOCK_FRAMES and sum(b.shape[1] for b in blocks) == 16_000
    samples, info = audio.decode(path)
    assert info.channels == 256 and samples.shape[0] == audio.TARGET_RATE


def test_a_file_whose_header_gives_a_length_over_the_limit_fails_before_decoding(tmp_path):
    """A WAV whose header says 5 hours (at 100 Hz: 3.6 MB) against a 1-hour limit: it decoded the first hour
    into the scratch file (at 48 kHz, 690 MB; 2.7 GB at the default limit) before failing. It fails at once,
    the scratch file empty."""
    path = tmp_path / "long.wav"
    sf.write(str(path), np.zeros(5 * 3600 * 100, np.int16), 100, subtype="PCM_16")
    out = tmp_path / "out.f32"
    with pytest.raises(audio.TooLong, match="^the audio is longer than the limit of 3600 s$"):
        audio.decode_to_file(path, out, max_duration_s=3600)
    assert out.stat().st_size == 0
    info = audio.AudioInfo(0, 0)  # within the limit it decodes (its first block: whole, it is 3.5 GB at 48 kHz)
    assert next(audio.stream(path, info, max_duration_s=18_000)).size and info.stated_frames == 5 * 3600 * 100


def test_an_mp4_cut_before_its_index_says_so(tmp_path):
    """An M4A whose index (the 'moov' box, written last) is missing: a phone's recording or a copy cut off.
    It was told "not a readable audio file (Invalid data found when processing input)" (helper-40)."""
    from tests.make_audio import write_av

    path = write_av(tmp_path / "full.m4a", sine(3.0, 44_100, 440.0), 44_100, "mp4", "aac", "fltp")
    data = path.read_bytes()
    assert data.find(b"mdat") < data.find(b"moov"), "the index is written after the audio"
    cut = tmp_path / "cut"
    cut.write_bytes(data[: data.find(b"moov") - 4])
    with pytest.raises(audio.DecodeError, match=r"^an MP4/M4A file without its index \(no 'moov' box\)"):
        audio.decode(cut)
    assert audio.decode(blob_copy(path, tmp_path))[1].duration_s == pytest.approx(3.0, abs=0.01)


CUT_SHORT = ["wav_s16", "wav_s24", "wavex_s24", "wav_ulaw", "flac_s16", "aiff_s16", "mp3", "m4a_aac", "m4a_alac",
             "mp4_aac_video"]


@pytest.mark.parametrize("name", CUT_SHORT)
def test_a_file_cut_short_is_read_to_the_cut_and_said_so(name, tmp_path):
    """A copy or download that stopped halfway: its header still states the whole length. What is there is read
    (and embedded), and the file is said to be cut short, where it was done without a word, its duration_s the
    only trace (helper-115: a FLAC of 12 s stored as 5.9 s, an MP3 of 6 s as 1.9 s). Formats whose header states
    no length (Ogg) have nothing to go by; an MP4/M4A is cut after its index ('moov' first, as phones write it)."""
    from tests.make_audio import write_av

    fmt = FORMATS[name]
    if fmt.av is not None and fmt.av[0] in ("ipod", "mp4"):
        container, codec, sample_fmt, video = fmt.av
        path = write_av(tmp_path / f"whole.{fmt.ext}", tone_and_chirp(12.0, fmt.rate, fmt.channels), fmt.rate,
                        container, codec, sample_fmt, video=video, options={"movflags": "faststart"})
    else:
        path = make(name, tmp_path, 12.0)
    whole = audio.decode(blob_copy(path, tmp_path))[1]
    assert whole.warning == "" and whole.duration_s == pytest.approx(12.0, abs=LOSSY_SLACK_S), whole
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    samples, info = audio.decode(tmp_path / "cut")
    assert 4.0 < info.duration_s < 8.0 and abs(samples.shape[0] - info.duration_s * audio.TARGET_RATE) <= 2, info
    assert info.warning == (f"only {info.duration_s:.1f} s of the 12.0 s its header states could be read (the file "
                            "is cut short or damaged there); those were embedded"), info
    streamed, _ = audio.decode_to_file(tmp_path / "cut", tmp_path / "out.f32")
    assert streamed.warning == info.warning  # as the worker's decoder gives it


def test_an_mp3_is_said_cut_short_only_by_the_frames_its_xing_header_counts(tmp_path):
    """An MP3's length is its Xing (Info, VBRI) header's frame count where it has one, else libsndfile's estimate
    from the file's size and its first frame's bitrate: a VBR file of 30 s without the header (quiet first, so its
    first frame is of a low rate) was estimated at 42 s, and said to be cut short. Without the header nothing is
    said, cut or not; with it, behind an ID3 tag, a cut file is said to be cut."""
    rate = 44_100
    x = np.concatenate([np.zeros((10 * rate, 2), np.float32),
                        np.random.default_rng(3).normal(0, 0.3, (20 * rate, 2)).astype(np.float32)])
    sf.write(tmp_path / "vbr.mp3", x, rate, format="MP3", subtype="MPEG_LAYER_III", bitrate_mode="VARIABLE",
             compression_level=0.0)
    data = (tmp_path / "vbr.mp3").read_bytes()
    at = data.find(b"Xing")
    assert 0 < at < 200, at
    bare = data[:at] + bytes(4) + data[at + 4:]  # the header's tag gone: a frame like any other
    tagged = _id3(3000) + data
    for name, body, said in [("bare", bare, False), ("bare_cut", bare[: len(bare) * 2 // 3], False),
                             ("tagged", tagged, False), ("tagged_cut", tagged[: len(tagged) * 2 // 3], True)]:
        (tmp_path / name).write_bytes(body)
        _, info = audio.decode(tmp_path / name)
        assert info.warning.startswith("only ") is said and info.duration_s > 15, (name, info)


@pytest.mark.parametrize("claimed", [0xFFFFFFFF, 0x7FFFF000, 0])
def test_a_wav_whose_sizes_a_streaming_writer_left_unknown_is_not_said_to_be_cut_short(claimed, tmp_path):
    """A WAV written to a pipe or by a recorder that could not go back to its header (sizes 0xFFFFFFFF, sox's
    0x7FFFF000, or 0) holds what it holds: nothing was cut."""
    from tests.make_audio import wav_claiming

    (tmp_path / "streamed").write_bytes(wav_claiming(tone_and_chirp(2.0, 16_000, 1), 16_000, claimed))
    _, info = audio.decode(tmp_path / "streamed")
    assert info.duration_s == pytest.approx(2.0, abs=1e-3) and info.warning == "", info


def test_an_ogg_cut_short_is_read_to_the_cut_without_a_word(tmp_path):
    """Ogg states no length in a header (only its last page's position): a cut one is read as what it holds, and
    nothing says it was cut (README says so)."""
    path = make("ogg_vorbis", tmp_path, 12.0)
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    _, info = audio.decode(tmp_path / "cut")
    assert 4.0 < info.duration_s < 8.0 and info.warning == "", info


def _id3(size: int) -> bytes:
    """An ID3v2.3 tag of `size` bytes of padding (its size field is synchsafe: 7 bits a byte)."""
    return b"ID3\x03\x00\x00" + bytes((size >> s) & 0x7F for s in (21, 14, 7, 0)) + bytes(size)


def test_raw_frames_after_a_mib_of_anything_decode_by_the_uploads_extension(client, new_key, worker, tmp_path):
    """FFmpeg finds a raw stream's format by its frame headers within the first MiB, and the workers read the
    stored bytes, which have no name: an MP3 after 1 MiB of zeros, and an ADTS AAC after an ID3 tag of 1.2 MiB,
    were "not a readable audio file" where `ffprobe file.mp3` plays them, as it sees the name. The upload's
    extension names the demuxer to try where the bytes name none (worker.audio.FORMAT_HINTS), through the
    service too, and a search clip's. Only where probing failed, and only where that demuxer finds audio: garbage named .mp3 is as
    unreadable as before, and an extension outside the list (.m3u8, .ffconcat) names nothing."""
    from tests.make_audio import Unavailable, write_av

    try:
        mp3 = write_av(tmp_path / "m.mp3", tone_and_chirp(3.0, 44_100, 1), 44_100, "mp3", "libmp3lame", "fltp")
        adts = write_av(tmp_path / "a.aac", tone_and_chirp(3.0, 44_100, 1), 44_100, "adts", "aac", "fltp")
    except Unavailable as exc:
        pytest.skip(str(exc))
    padded = tmp_path / "padded.mp3"
    padded.write_bytes(bytes(1 << 20) + mp3.read_bytes())
    tagged = tmp_path / "tagged.aac"
    tagged.write_bytes(_id3(1_200_000) + adts.read_bytes())
    for path, hint in ((padded, "mp3"), (tagged, "aac")):
        blob = blob_copy(path, tmp_path)
        with pytest.raises(audio.DecodeError, match="not a readable audio file"):
            audio.decode(blob)
        assert audio.format_hint(path.name) == hint
        samples, info = audio.decode(blob, hint=hint)
        assert info.format == hint and 2.95 <= info.duration_s <= 3.1, info
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    with pytest.raises(audio.DecodeError, match="not a readable audio file"):
        audio.decode(blob_copy(garbage, tmp_path), hint="mp3")
    assert [audio.format_hint(n) for n in ("A.MP3", "x.m3u8", "list.ffconcat", "x.wav", "mp3", ".mp3", None)] == \
        ["mp3", None, None, None, None, None, None]
    key = new_key()
    lib = client.post("/v1/libraries", json={"name": "hinted"}, headers=auth(key)).get_json()
    r = upload(client, key, lib["id"], [padded, tagged])
    assert r.status_code == 202, r.get_json()
    job = wait_job(client, key, r.get_json()["job_id"])
    assert job["status"] == "done" and job["counts"]["done"] == 2, job
    # and as a clip to search by, which the API decodes itself
    r = client.post("/v1/search", headers=auth(key), content_type="multipart/form-data",
                    data={"library_id": lib["id"], "audio": (io.BytesIO(padded.read_bytes()), "padded.mp3")})
    assert r.status_code == 200 and len(r.get_json()["results"]) == 2, r.get_json()
