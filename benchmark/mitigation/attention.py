"""Ren et al.'s inference-time mitigation: cross-attention re-weighting (the start token's logits rescaled, the
summary tokens masked).

Ren et al., "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through Cross Attention"
(ECCV 2024), official code ``renjie3/MemAttn``: ``text2img.py`` (flags ``--miti_mem --c1 --cross_attn_mask
--mask_length_minis1``; ``local_cmd_inference_time_mitigation.sh`` runs ``--c1 1.25 --cross_attn_mask --miti_mem``)
and ``refactored_classes/refactored_attention_processor.py`` (``AttnProcessor2_0`` and
``my_simple_scaled_dot_product_attention``). In every cross-attention layer and at every denoising step:

- the attention logits ``q k^T / sqrt(d)`` of every position at or after the prompt length ``L`` (the token count with
  start and end token, unpadded: the padding, the "summary tokens" after the end token) get ``-inf``, in BOTH halves
  of the CFG batch (the official mask is repeated over the batch of two), so those tokens get no attention;
  ``--mask_length_minis1`` masks from ``L - 1`` on, the end token too;
- in the conditional half only, the start token's logit is multiplied by ``c1`` (a factor on the logit itself, not
  on the probability);
- softmax over tokens, then the values as usual.

The official code picks the conditional rows as ``attn_weight[1::2]``, which is the conditional half only for its
batch of one image per prompt; here it is the conditional half of any batch (image i of n: row n + i).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from benchmark.core.config_types import Positive
from benchmark.mitigation.interface import Intervention
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import check_recordable, cross_attention_layers


def require_cross_attention(unet: torch.nn.Module, method: str) -> dict:
    """The model's cross-attention layers by name; ValueError naming ``method`` when it has none (a mitigation that
    acts on cross-attention cannot run there), raised before any sampling."""
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"mitigation {method}: the model has no cross-attention layers to act on")
    return layers


@dataclass(frozen=True)
class RenSettings:
    """The official knobs (text2img.py). ``c1``, the strength: 1 leaves the start token's logit as it is; above 1 it
    draws attention to the start token (1.25 in the official mitigation command), higher is stronger."""

    c1: float = 1.25
    mask_summary: bool = True  # --cross_attn_mask: the tokens after the prompt get no attention
    mask_end: bool = False  # --mask_length_minis1: the end token is masked too

    def __post_init__(self):
        # a factor <= 0 would flip or zero the start token's logit: not a point on the strength axis
        if not (0 < self.c1 < float("inf")):
            raise ValueError(f"mitigation ren: c1 must be a finite number > 0, got {self.c1}")
        if self.mask_end and not self.mask_summary:
            raise ValueError("mitigation ren: mask_end needs mask_summary (the official --mask_length_minis1 only "
                             "shortens --cross_attn_mask's mask)")

    @property
    def tag(self) -> str:
        """Store-key part: every knob that shapes a generation."""
        mask = "-nomask" if not self.mask_summary else "-maskend" if self.mask_end else ""
        return f"ren-c{self.c1:g}{mask}"


def kept_tokens(model: TextToImage, prompts: list[str], settings: RenSettings) -> torch.Tensor | None:
    """(n,) how many leading tokens image i attends to: the official ``prompt_length`` (token ids with start and end
    token, at most the context length) = ``end_token_index + 1``, one fewer with ``mask_end``; None without
    ``mask_summary`` (every token kept)."""
    if not settings.mask_summary:
        return None
    return model.end_token_index(prompts) + 1 - int(settings.mask_end)


def ren_attention_probs(logits: torch.Tensor, kept: torch.Tensor | None, c1: float) -> torch.Tensor:
    """Ren's re-weighted attention probabilities (B, heads, queries, tokens) from the scaled logits ``q k^T / sqrt(d)``
    of a CFG batch (B = 2n: unconditional images first, then the conditional ones).

    ``kept`` (n,): tokens at positions >= kept[i] get probability 0 in row i and row n + i (None: no mask); the
    conditional rows' start-token logit is multiplied by ``c1``. Source: MemAttn
    ``refactored_attention_processor.py`` (``AttnProcessor2_0`` builds the mask, ``my_simple_scaled_dot_product_
    attention`` rescales and takes the softmax). Raises ValueError when B is odd or ``kept`` does not have n rows."""
    batch, tokens = logits.shape[0], logits.shape[-1]
    if batch % 2:
        raise ValueError(f"Ren's attention needs a CFG batch (unconditional and conditional halves), got {batch} rows")
    n = batch // 2
    logits = logits.clone()
    if kept is not None:
        if kept.shape != (n,):
            raise ValueError(f"Ren's attention: {tuple(kept.shape)} kept lengths for {n} images")
        keep = torch.arange(tokens, device=logits.device)[None] < kept.to(logits.device)[:, None]  # (n, tokens)
        keep = torch.cat([keep, keep])[:, None, None, :]
        logits = logits.masked_fill(~keep, float("-inf"))
    logits[n:, ..., 0] = logits[n:, ..., 0] * c1
    return logits.softmax(dim=-1)


class RenAttnProcessor:
    """A cross-attention processor computing the layer's output with :func:`ren_attention_probs`; ``kept`` is set
    per sampling call (its images' kept lengths). Self-attention is never given this processor."""

    def __init__(self, c1: float, kept: torch.Tensor | None):
        self.c1 = c1
        self.kept = kept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("Ren's attention processor is for cross-attention layers only")
        batch, tokens, _ = encoder_hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, pixels, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        logits = torch.bmm(query, key.transpose(1, 2)) * attn.scale
        mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if mask is not None:  # an additive mask a caller passes, as diffusers adds it
            logits = logits + mask
        probs = ren_attention_probs(logits.unflatten(0, (batch, attn.heads)), self.kept, self.c1)
        out = attn.batch_to_head_dim(torch.bmm(probs.flatten(0, 1).to(value.dtype), value))
        return attn.to_out[1](attn.to_out[0](out))


@contextmanager
def ren_attention(model: TextToImage, prompts: list[str], settings: RenSettings) -> Iterator[dict]:
    """Install :class:`RenAttnProcessor` on every cross-attention layer for a sampling call over ``prompts`` (one
    per image), and put the processors that were there back on exit (the same objects). Capture may wrap these
    processors afterwards (it calls them for the output). Raises ValueError, before anything is installed, for a
    model without cross-attention or a layer whose attention adds a normalisation or residual."""
    layers = require_cross_attention(model.unet, "ren")
    for name, module in layers.items():
        check_recordable(name, module)
    kept = kept_tokens(model, prompts, settings)
    kept = None if kept is None else kept.to(model.device)
    originals = {name: module.processor for name, module in layers.items()}
    processors = {}
    try:
        for name, module in layers.items():
            processors[name] = RenAttnProcessor(settings.c1, kept)
            module.set_processor(processors[name])
        yield processors
    finally:
        for name, module in layers.items():
            module.set_processor(originals[name])


@MITIGATIONS.register("ren", label="Ren et al. (attention re-weighting)", acts_on="modules", needs_mask=False,
                      strength="c1", stronger="higher", strengths=(1.25,), requires=("cross_attention", "tokenizer"),
                      tag=lambda k: RenSettings(**k).tag)
def ren(c1: Positive = 1.25, mask_summary: bool = True, mask_end: bool = False) -> Intervention:
    """Ren et al.'s mitigation (``--miti_mem --cross_attn_mask --c1 1.25``): every cross-attention layer re-weighted
    at every step for the sampled prompts (:func:`ren_attention`); no extra UNet evaluation."""
    settings = RenSettings(float(c1), bool(mask_summary), bool(mask_end))
    return Intervention(modules=lambda setup: ren_attention(setup.model, setup.prompts, settings))
