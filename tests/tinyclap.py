"""Build a tiny, randomly initialised but deterministic CLAP checkpoint for tests (no network, no weights)."""

from __future__ import annotations

import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapProcessor,
    ClapTextConfig,
    RobertaTokenizerFast,
)

PROJECTION_DIM = 512  # must match the vector(512) DB column
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa order
_WORDS = (
    "dog cat bird rain thunder wind car engine siren bell piano guitar drum violin voice speech "
    "music noise water river ocean wave fire crackle door knock footsteps clap laugh cry baby "
    "crowd applause train horn whistle alarm clock tick phone ring keyboard typing glass break "
    "the a of and with in on loud quiet soft distant close fast slow high low deep bright sound"
).split()


def _corpus(n_lines: int = 300) -> list[str]:
    """Deterministic pseudo-sentences from a fixed word list."""
    lines = []
    for i in range(n_lines):
        k = 3 + i % 6
        lines.append(" ".join(_WORDS[(i * 7 + j * 13 + (i * j) % 5) % len(_WORDS)] for j in range(k)))
    return lines


def _tokenizer(vocab_size: int = 1000) -> RobertaTokenizerFast:
    """Byte-level BPE trained in memory, wrapped as a RoBERTa tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(tokenizer_object=tok, model_max_length=512)


def tiny_config(*, fusion: bool = False, vocab_size: int = 1000, depths=(1, 1, 1, 1),
                heads=(1, 1, 1, 1)) -> ClapConfig:
    """Smallest CLAP config that keeps the real input shapes and a 512-d projection. With a stage of two
    layers or more (`depths`), its second layer attends within shifted windows, under a mask, as every
    stage of the full-size model does; `heads`: each stage's attention heads (the full-size model's 4 to 32)."""
    patch_hidden = 16
    text = ClapTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514,
    )
    audio = ClapAudioConfig(
        spec_size=256,
        num_mel_bins=64,
        window_size=8,
        patch_embeds_hidden_size=patch_hidden,
        hidden_size=patch_hidden * 8,  # HTSAT: patch_embeds_hidden_size * 2 ** (len(depths) - 1)
        depths=list(depths),
        num_attention_heads=list(heads),
        mlp_ratio=2.0,
        enable_fusion=fusion,
        fusion_type="aff_2d" if fusion else None,
    )
    return ClapConfig(
        text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=PROJECTION_DIM
    )


def build_tiny_clap(path: str | pathlib.Path, *, fusion: bool = False, depths=(1, 1, 1, 1), heads=(1, 1, 1, 1),
                    position_bias: bool = False) -> pathlib.Path:
    """Save a deterministic tiny ClapModel + ClapProcessor checkpoint to `path` and return it. A new model's
    relative position bias tables are zeros; with `position_bias` they are random, not zeros, as a trained one's."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = ClapModel(tiny_config(fusion=fusion, vocab_size=len(tokenizer), depths=depths, heads=heads)).eval()
    if position_bias:
        with torch.no_grad():
            for name, param in model.audio_model.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    param.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    fe = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=48_000,
        hop_length=480,
        fft_window_size=1024,
        max_length_s=10,
        truncation="fusion" if fusion else "rand_trunc",
        padding="repeatpad",
    )
    ClapProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(path)
    return path
