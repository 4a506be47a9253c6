"""worker.features (torch log-mel, repeat_pad) against transformers' ClapFeatureExtractor, on a tiny CLAP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel, ClapProcessor

from tests.tinyclap import build_tiny_clap
from worker.features import LogMel
from worker.windows import repeat_pad

SR = 48_000
N = 480_000  # nb_max_samples: 10 s at 48 kHz
FRAMES = 1001
TOL_DB = 1e-3  # float32 torch vs float64 numpy, where the bin is not near the float32 noise floor


def _noise(seconds: float, seed: int, scale: float = 0.1) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def _sweep(seconds: float = 10.0, f0: float = 20.0, f1: float = 12_000.0) -> np.ndarray:
    """Exponential sine sweep, kept below the 14 kHz mel ceiling."""
    t = np.arange(int(seconds * SR)) / SR
    k = np.log(f1 / f0) / seconds
    return (0.5 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)).astype(np.float32)


def _reference(fe: ClapFeatureExtractor, waves: list[np.ndarray], fusion: bool) -> np.ndarray:
    trunc = "fusion" if fusion else "rand_trunc"
    out = fe(waves, truncation=trunc, padding="repeatpad", sampling_rate=SR, return_tensors="np")
    return out["input_features"]


def _reliable(ref: np.ndarray) -> np.ndarray:
    """Bins above -80 dB and within 60 dB of their frame's loudest mel bin (float32 FFT noise is ~-140 dB)."""
    return (ref > -80.0) & (ref > ref.max(axis=-1, keepdims=True) - 60.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    out = {}
    for fusion in (False, True):
        path = build_tiny_clap(tmp_path_factory.mktemp(f"tinyclap_{int(fusion)}"), fusion=fusion)
        out[fusion] = {
            "path": path,
            "model": ClapModel.from_pretrained(path).eval(),
            "processor": ClapProcessor.from_pretrained(path),
        }
    return out


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    short = _noise(3.3, seed=2)
    return np.stack([_noise(10, seed=1), _sweep(), repeat_pad(short, N), _noise(10, seed=3, scale=1e-3)])


def test_tiny_checkpoint_loads_and_embeds(tiny) -> None:
    for fusion, t in tiny.items():
        fe = ClapFeatureExtractor.from_pretrained(t["path"])
        assert fe.truncation == ("fusion" if fusion else "rand_trunc") and fe.padding == "repeatpad"
        assert fe.nb_max_samples == N and fe.feature_size == 64
        tok = AutoTokenizer.from_pretrained(t["path"])
        assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
        text = t["processor"](text=["a dog barks", "rain on a tin roof"], padding=True, return_tensors="pt")
        with torch.inference_mode():
            emb = t["model"].get_text_features(**text).pooler_output
        assert emb.shape == (2, 512)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("seconds", [3.3, 1 / SR, 10.0])
def test_repeat_pad_matches_feature_extractor(tiny, seconds: float) -> None:
    fe = tiny[False]["processor"].feature_extractor
    clip = _noise(seconds, seed=7)
    padded = repeat_pad(clip, N)
    assert padded.shape == (N,) and padded.dtype == clip.dtype
    reps = N // len(clip)
    np.testing.assert_array_equal(padded[: reps * len(clip)], np.tile(clip, reps))
    assert not padded[reps * len(clip) :].any()
    np.testing.assert_array_equal(_reference(fe, [clip], False), _reference(fe, [padded], False))
    if len(clip) == N:
        assert padded is clip


def test_repeat_pad_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        repeat_pad(np.zeros(0, np.float32), N)
    with pytest.raises(ValueError):
        repeat_pad(np.zeros(N + 1, np.float32), N)
    with pytest.raises(ValueError):
        repeat_pad(np.zeros((2, 10), np.float32), N)


@pytest.mark.parametrize("fusion", [False, True])
def test_logmel_matches_feature_extractor(tiny, batch, fusion: bool) -> None:
    fe = tiny[fusion]["processor"].feature_extractor
    ref = _reference(fe, list(batch), fusion)
    out = LogMel(fe, fusion)(torch.from_numpy(batch))
    assert out.dtype == torch.float32
    assert out.shape == ref.shape == (len(batch), 4 if fusion else 1, FRAMES, 64)
    err = np.abs(out.numpy() - ref)
    assert err[0].max() < TOL_DB  # white noise: every bin
    mask = _reliable(ref)
    assert err[mask].max() < TOL_DB, f"max abs error {err[mask].max():.2e} dB on reliable bins"
    # bins >100 dB below a loud peak sit at the float32 FFT noise floor (worst seen 0.15 dB, htk/fusion)
    assert err[ref > -80.0].max() < 0.25


@pytest.mark.parametrize("fusion", [False, True])
def test_logmel_row_by_row_equals_one_pass(tiny, batch, fusion: bool, monkeypatch) -> None:
    """On a CPU the log-mel runs one window at a time (cache-sized): the values are exactly those of
    one pass over the whole batch, so neither the batch nor its size changes a window's features."""
    import worker.features as features

    lm = LogMel(tiny[fusion]["processor"].feature_extractor, fusion)
    x = torch.from_numpy(batch)
    rows = lm(x)
    monkeypatch.setattr(features, "CPU_ROWS", len(batch))
    whole = lm(x)
    assert torch.equal(rows, whole)
    assert torch.equal(lm(x[2:3]), whole[2:3])


def test_logmel_short_clip_end_to_end(tiny) -> None:
    fe = tiny[False]["processor"].feature_extractor
    clip = _noise(3.3, seed=5)
    ref = _reference(fe, [clip], False)
    out = LogMel(fe, False)(torch.from_numpy(repeat_pad(clip, N))[None]).numpy()
    mask = _reliable(ref)
    assert np.abs(out - ref)[mask].max() < TOL_DB


@pytest.mark.parametrize("fusion", [False, True])
def test_embedding_matches_processor_path(tiny, batch, fusion: bool) -> None:
    model, processor = tiny[fusion]["model"], tiny[fusion]["processor"]
    inputs = processor(audio=list(batch), sampling_rate=SR, return_tensors="pt")
    is_longer = inputs["is_longer"]  # fusion: the extractor flags one random clip when none is longer than 10 s
    mel = LogMel(processor.feature_extractor, fusion)(torch.from_numpy(batch))
    with torch.inference_mode():
        ref = model.get_audio_features(**inputs).pooler_output
        got = model.get_audio_features(input_features=mel, is_longer=is_longer).pooler_output
    assert got.shape == ref.shape == (len(batch), 512)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() >= 0.9999, cos
