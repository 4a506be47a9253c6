"""The production CLAP loader and text tower (imports torch: load lazily, after fork)."""

from __future__ import annotations

import logging
import threading
import types

import numpy as np
import torch
from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel
from transformers.models.clap.modeling_clap import ClapAudioSelfAttention
from transformers.utils import logging as hf_logging

from clapq.checkpoint import Checkpoint, ModelUnavailable, unchanged
from clapq.precision import PRECISIONS, model_precision, pick_device

log = logging.getLogger(__name__)

# LAION trained the text tower on 77-token captions; longer queries are cut there.
TEXT_MAX_TOKENS = 77


def pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the vector; 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def quantize_text_int8(model: ClapModel) -> None:
    """int8 dynamic quantisation of the text tower's and text projection's Linear layers (CPU only):
    ~3x faster text queries at cosine >= 0.999 to fp32 (BENCHMARKS.md). Query vectors are never
    stored, so turning it on or off changes no stored data."""
    import warnings

    with warnings.catch_warnings():  # torch.ao's eager quantisation API is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantize = torch.ao.quantization.quantize_dynamic
        model.text_model = quantize(model.text_model, {torch.nn.Linear}, dtype=torch.qint8)
        model.text_projection = quantize(model.text_projection, {torch.nn.Linear}, dtype=torch.qint8)


def _own_buffers(model: torch.nn.Module) -> None:
    """Copy the integer buffers (position indices, counters) that a cast to bf16 leaves as views of the
    checkpoint's memory map: while one view lives, the whole map stays mapped, and after the cast has
    read every fp32 weight that is the size of the checkpoint again in the process's RSS (measured: a
    bf16 worker at 1.2 GB instead of 0.6 GB)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_floating_point():
                setattr(module, name, buf.clone())


def _fused_window_attention(self, hidden_states, attention_mask=None, *more, **named):
    """ClapAudioSelfAttention.forward with the scores, their scaling, the relative position bias, the shifted
    windows' mask, the softmax and the product with the values in one call of torch's
    scaled_dot_product_attention, which never writes the (windows, heads, 64, 64) scores out four times as
    transformers' version does: on our 2-core CPU the audio tower runs 1.23x as fast in bf16 and 1.45x in
    fp32, at cosine >= 0.99999 to it (BENCHMARKS.md). Bound to each attention module of the loaded model
    only (`use_fused_attention`), so a ClapModel loaded elsewhere, such as the tests' reference, is untouched.
    Transformers 5 calls it as (hidden_states, attention_mask, output_attentions), 4.45-4.57 as
    (hidden_states, attention_mask, head_mask, output_attentions): whatever comes after the mask, where it
    asks for anything (attention probabilities, a head mask), is run by transformers' own forward."""
    if any(arg is not None and arg is not False for arg in (*more, *named.values())) or \
            (attention_mask is not None and not attention_mask.is_floating_point()):
        # and a mask of another kind than the additive one it adds (a boolean one, applied by masked_fill in
        # some other release), which the check at load, with its own additive mask, would not see
        return type(self).forward(self, hidden_states, attention_mask, *more, **named)
    windows, tokens, _ = hidden_states.shape
    shape = (windows, tokens, -1, self.attention_head_size)
    q, k, v = (layer(hidden_states).view(shape).transpose(1, 2) for layer in (self.query, self.key, self.value))
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    bias = bias.view(tokens, tokens, -1).permute(2, 0, 1)  # (heads, tokens, tokens)
    if attention_mask is None:
        mask = bias.unsqueeze(0).expand(windows, -1, -1, -1)
    else:  # one mask per window position, (positions, tokens, tokens); the batch's windows cycle through them
        mask = (bias.unsqueeze(0) + attention_mask.unsqueeze(1).to(bias.dtype))
        mask = mask.repeat(windows // attention_mask.shape[0], 1, 1, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           scale=self.attention_head_size ** -0.5)
    return (out.transpose(1, 2).reshape(windows, tokens, self.all_head_size),)


def _same_attention(caller: torch.nn.Module) -> bool:
    """Whether the fused attention gives transformers' answer on the attention module `caller` holds (`self`),
    with and without a shifted windows' mask (random input, in the module's dtype), called by `caller` (a
    ClapAudioAttention) as the tower calls it: a transformers release whose attention module changed shape
    or meaning, or is called with other arguments, is caught at load, and the tower stays on its own code."""
    module = caller.self
    tokens = module.relative_position_index.shape[0]
    param = module.query.weight
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((4, tokens, module.all_head_size), generator=gen).to(param.device, param.dtype)
    mask = torch.where(torch.rand((2, tokens, tokens), generator=gen) < 0.3, -100.0, 0.0).to(param.device, param.dtype)
    tolerance = 1e-4 if param.dtype == torch.float32 else 2e-2  # a half precision's rounding, in both
    with torch.inference_mode():
        for m in (None, mask):
            want = caller(x, m)[0].float().flatten()
            module.forward = types.MethodType(_fused_window_attention, module)
            try:
                got = caller(x, m)[0].float().flatten()
            finally:
                del module.forward
            if got.shape != want.shape or (got - want).norm() > tolerance * want.norm():
                return False
    return True


def use_fused_attention(audio_model: torch.nn.Module) -> bool:
    """Run the audio tower's window attention through torch's fused kernel (`_fused_window_attention`);
    False, with a warning, where this transformers' attention is not the one it replaces."""
    modules = [m for m in audio_model.modules() if isinstance(m, ClapAudioSelfAttention)]
    callers = [m for m in audio_model.modules() if isinstance(getattr(m, "self", None), ClapAudioSelfAttention)]
    try:
        same = bool(modules) and bool(callers) and _same_attention(callers[0])
    except Exception:  # noqa: BLE001 (attributes renamed or reshaped in another transformers release)
        log.debug("fused attention check failed", exc_info=True)
        same = False
    if not same:
        log.warning("the audio tower's attention is not the one clapq fuses (another transformers release?): "
                    "it runs transformers' own, slower code")
        return False
    for m in modules:
        m.forward = types.MethodType(_fused_window_attention, m)
    return True


class LoadedClap:
    """A CLAP checkpoint loaded once per process: model, tokenizer and feature-extractor settings."""

    def __init__(self, ckpt: Checkpoint, device: str = "auto", precision: str = "auto", *,
                 text_only: bool = False, text_int8: bool = False, attention: str = "sdpa") -> None:
        self.ckpt = ckpt
        self.device = pick_device(device)
        self.precision = model_precision(device, precision, text_int8)
        self.text_int8 = self.precision == "int8"
        self.dtype = torch.float32 if self.text_int8 else PRECISIONS[self.precision]
        hf_logging.disable_progress_bar()
        try:
            model = ClapModel.from_pretrained(ckpt.path)
            self.tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
            self.feature_extractor = ClapFeatureExtractor.from_pretrained(ckpt.path)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot load CLAP checkpoint from {ckpt.path}: {exc}") from exc
        unchanged(ckpt)  # what was loaded is the model `ckpt` names, whose id its vectors are stored and searched by
        if text_only:
            # the API embeds queries only; drop the audio tower to halve its memory
            model.audio_model = None
            model.audio_projection = None
        model.eval()
        self.model = model.to(self.device, dtype=self.dtype)
        _own_buffers(self.model)
        self.attention = "eager"
        if not text_only and attention == "sdpa" and use_fused_attention(self.model.audio_model):
            self.attention = "sdpa"
        if self.text_int8:
            quantize_text_int8(self.model)
        self.fusion = bool(getattr(model.config.audio_config, "enable_fusion", False))
        self._lock = threading.Lock()

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text vectors, float32, one row per text."""
        if self.text_int8 and len(texts) > 1:
            # dynamic int8 scales each activation by its batch's range: one text at a time, so a text's
            # vector never depends on the texts it was asked with
            return np.concatenate([self._embed_text([t]) for t in texts])
        return self._embed_text(texts)

    @torch.inference_mode()
    def _embed_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=TEXT_MAX_TOKENS, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        with self._lock:
            out = pooled(self.model.get_text_features(**tokens))
        out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy().astype(np.float32)


_loaded: dict[tuple, LoadedClap] = {}
_load_lock = threading.Lock()


def get_clap(ckpt: Checkpoint, device: str = "auto", precision: str = "auto", *, text_only: bool = False,
             text_int8: bool = False, attention: str = "sdpa") -> LoadedClap:
    """The process-wide model for this checkpoint, loaded on first use."""
    key = (ckpt.path, ckpt.weights_sha256, device, precision, text_only, text_int8, attention)
    with _load_lock:
        if key not in _loaded:
            _loaded[key] = LoadedClap(ckpt, device, precision, text_only=text_only, text_int8=text_int8,
                                      attention=attention)
        return _loaded[key]
