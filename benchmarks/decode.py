"""What decoding one 10 s clip costs, per format: the decoder child's work for each uploaded file.

    python benchmarks/decode.py --rounds 7 [--code DIR] [--tag NAME] [--skip ogg_8ch]

Writes one 10 s stereo clip at 44.1 kHz per format (16-bit WAV, FLAC, MP3, Ogg Vorbis, AAC in M4A, and an
8-channel Ogg Vorbis, which goes through FFmpeg's packed samples), then decodes each with
`worker.audio.decode` (to 48 kHz mono, soxr HQ, as the worker does) ten times a round and keeps each
round's CPU ms per decode. `--code DIR` decodes with the `worker/audio.py` of another checkout (a
worktree of an older commit), so two versions are timed on the same files in the same hour. Prints the
median and range of the rounds, and writes JSON to benchmarks/results/decode<tag>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import MACHINE, save, spread_ms, spread_text  # noqa: E402
from tests.make_audio import write_av  # noqa: E402


def clips(where: Path) -> dict[str, Path]:
    rate, n = 44_100, 441_000
    t = np.arange(n) / rate
    stereo = (0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], 1)).astype(np.float32)
    out = {"wav": where / "c.wav", "flac": where / "c.flac", "ogg": where / "c.ogg"}
    sf.write(out["wav"], stereo, rate, subtype="PCM_16")
    sf.write(out["flac"], stereo, rate)
    sf.write(out["ogg"], stereo, rate, format="OGG", subtype="VORBIS")
    out["mp3"] = write_av(where / "c.mp3", stereo, rate, "mp3", "libmp3lame", "fltp")
    out["m4a"] = write_av(where / "c.m4a", stereo, rate, "mp4", "aac", "fltp")
    eight = np.repeat(stereo[:, :1], 8, axis=1)
    out["ogg_8ch"] = where / "c8.ogg"
    sf.write(out["ogg_8ch"], eight, rate, format="OGG", subtype="VORBIS")
    return out


def load_audio(code: Path | None):
    """worker.audio of this checkout, or of `code` (its `worker` package found first)."""
    if code is not None:
        sys.path.insert(0, str(code.resolve()))
    from worker import audio

    assert Path(audio.__file__).resolve().is_relative_to((code or ROOT).resolve()), audio.__file__
    return audio


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--code", type=Path, default=None, help="a checkout whose worker/audio.py decodes")
    p.add_argument("--tag", default="")
    p.add_argument("--skip", default="", help="formats left out, comma-separated (ogg_8ch for a decoder it kills)")
    args = p.parse_args()
    audio = load_audio(args.code)
    got: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, path in clips(Path(d)).items():
            if name in args.skip.split(","):
                continue
            try:
                audio.decode(path)  # warm-up (imports, codec set-up)
            except Exception as exc:  # an older decoder that cannot read it (8 channels crashed it)
                got[name] = []
                print(f"{name:8} fails: {type(exc).__name__}: {exc}")
                continue
            per = []
            for _ in range(args.rounds):
                t0 = time.process_time()
                for _ in range(10):
                    audio.decode(path)
                per.append((time.process_time() - t0) * 100)  # ms per decode
            got[name] = per
    res = {"rounds": args.rounds, "code": str(args.code or ROOT), "machine": MACHINE,
           **{k: (spread_ms(v) if v else None) for k, v in got.items()}}
    print(f"CPU ms per 10 s clip decoded, {args.rounds} rounds of 10: median (min-max)")
    for k, v in got.items():
        if v:
            print(f"{k:8} {spread_text(res[k], 7)}")
    save(f"decode{args.tag}.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
