"""Kim & No's padding mitigations: change the end-of-text / padding embeddings, no optimisation, no detection.

Kim & No, "Memorization in Stable Diffusion Is Unexpectedly Driven by CLIP Embeddings" (CVPR 2026 Findings,
arXiv:2605.02908): SD v1-4 pads every prompt to 77 tokens with copies of the end-of-text token, whose states
duplicate the end-of-text state and drive memorization. Their inference-time mitigations, as the official code
runs them (github.com/quasar529/sd-clip-mem, experiments.py, Section 4 flags), each on the conditional embedding
(n, tokens, dim) only:

- ``pad_replace`` (``--pad_token_fix``): pad with ``!`` instead of the end token and encode again;
- ``pad_replace_mask_end`` (``--pad_token_fix_and_eot_masked``, the paper's main method): the same, then the
  end-of-text embedding (the first end token) is set to zero;
- ``pad_mask`` (``--pad_masked_by_ratio r``, r = 0.7 and 0.4 in run_mitigation.sh): of the P padding embeddings
  after the end token, the first ``floor(min(P, r * P))`` are set to zero;
- ``mask_end`` (``--eot_masked``, a Section 3.2 ablation): only the end-of-text embedding is set to zero.

"Masked" is zero, as in the official code. One difference from the official script: there the tokenizer's pad
token stays ``!`` while the pipeline encodes the empty prompt, so the replacing variants also pad the unconditional
embedding with ``!``; here the unconditional embedding is always the model's own (sample_with_capture encodes it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmark.core.config_types import Name, OpenFraction
from benchmark.mitigation.interface import Intervention
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import MITIGATIONS

PAD_METHODS = ("pad_mask", "pad_replace", "pad_replace_mask_end", "mask_end")


@dataclass(frozen=True)
class PadMitigation:
    method: str  # one of PAD_METHODS
    fraction: float = 1.0  # pad_mask: the share r of padding embeddings set to zero; 1.0 for the other methods
    token: str = "!"  # pad_replace*: the padding token put in place of the end token

    def __post_init__(self):
        if self.method not in PAD_METHODS:
            raise ValueError(f"unknown padding mitigation {self.method!r}; choose from {', '.join(PAD_METHODS)}")
        if not 0 < self.fraction <= 1 or (self.method != "pad_mask" and self.fraction != 1):
            raise ValueError(f"padding mitigation {self.method}: fraction must be in (0, 1] for pad_mask and 1 "
                             f"otherwise, got {self.fraction}")
        if self.replaces_pad and not self.token:
            raise ValueError(f"padding mitigation {self.method} needs a replacement token")

    @property
    def replaces_pad(self) -> bool:
        return self.method.startswith("pad_replace")

    @property
    def masks_end(self) -> bool:
        return self.method in ("pad_replace_mask_end", "mask_end")

    @property
    def tag(self) -> str:
        """Store-key part: the method, its strength and, when it pads with another token, that token (each
        character outside [A-Za-z0-9] spelled as u<hex>, so that keys stay file-name safe and distinct)."""
        if self.method == "pad_mask":
            return f"padmask-r{self.fraction:g}"
        token = "".join(c if c.isascii() and c.isalnum() else f"u{ord(c):x}" for c in self.token)
        return {"pad_replace": f"padreplace-{token}", "pad_replace_mask_end": f"padreplace-{token}-maskend",
                "mask_end": "maskend"}[self.method]


def replacement_id(model: TextToImage, token: str) -> int:
    """The vocabulary id of ``token``; ValueError when the tokenizer does not know it as one token."""
    tok = model.tokenizer
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tok.unk_token_id and token != tok.unk_token):
        raise ValueError(f"padding mitigation: {token!r} is not a token of {model.model_id}'s tokenizer")
    return int(token_id)


@torch.no_grad()
def pad_mitigated_embedding(model: TextToImage, prompts: list[str], settings: PadMitigation) -> torch.Tensor:
    """The conditional embedding (n, tokens, dim) of ``prompts`` under ``settings``.

    Positions: e = ``model.end_token_index`` (the first end token), padding = e+1 .. tokens-1 (P of them). Only
    those positions change: e is zeroed (``*mask_end``), the first floor(min(P, r*P)) padding rows are zeroed
    (``pad_mask``), the padding ids become ``settings.token`` before encoding (``pad_replace*``; with a causal
    encoder such as CLIP's, rows up to e are then unchanged). Raises ValueError for a token the model lacks."""
    pad_id = replacement_id(model, settings.token) if settings.replaces_pad else None
    cond = model.encode(prompts, pad_token_id=pad_id).clone()
    tokens = cond.shape[1]
    for i, end in enumerate(model.end_token_index(prompts).tolist()):
        if settings.masks_end:
            cond[i, end] = 0
        if settings.method == "pad_mask":
            padding = tokens - (end + 1)
            cond[i, end + 1:end + 1 + int(min(padding, padding * settings.fraction))] = 0
    return cond


def padding_intervention(settings: PadMitigation) -> Intervention:
    """The intervention of one padding setting: the conditional embedding of the setup's prompts replaced by
    :func:`pad_mitigated_embedding` (nothing optimised, no extra UNet evaluation)."""
    check = (lambda model: replacement_id(model, settings.token)) if settings.replaces_pad else None
    return Intervention(embedding=lambda setup: pad_mitigated_embedding(setup.model, setup.prompts, settings),
                        check=check)


_PAD = {"acts_on": "embedding", "needs_mask": False, "requires": ("tokenizer", "text_encoder")}


@MITIGATIONS.register("pad_mask", label="Kim & No (pad masked)", strength="fraction", stronger="higher",
                      strengths_key="pad_fractions", tag=lambda k: PadMitigation("pad_mask", k["fraction"]).tag, **_PAD)
def pad_mask(fraction: OpenFraction) -> Intervention:
    """``--pad_masked_by_ratio r``: the first floor(r * P) padding embeddings set to zero (r = 0.7, 0.4 in the
    official run_mitigation.sh)."""
    return padding_intervention(PadMitigation("pad_mask", float(fraction)))


@MITIGATIONS.register("pad_replace", label="Kim & No (pad !)", config_knobs={"token": "pad_replacement"},
                      tag=lambda k: PadMitigation("pad_replace", token=k["token"]).tag, **_PAD)
def pad_replace(token: Name = "!") -> Intervention:
    """``--pad_token_fix``: padding with ``token`` instead of the end token."""
    return padding_intervention(PadMitigation("pad_replace", token=token))


@MITIGATIONS.register("pad_replace_mask_end", label="Kim & No (pad !, end masked)",
                      config_knobs={"token": "pad_replacement"},
                      tag=lambda k: PadMitigation("pad_replace_mask_end", token=k["token"]).tag, **_PAD)
def pad_replace_mask_end(token: Name = "!") -> Intervention:
    """``--pad_token_fix_and_eot_masked`` (the paper's main method): padding with ``token``, end token zeroed."""
    return padding_intervention(PadMitigation("pad_replace_mask_end", token=token))


@MITIGATIONS.register("mask_end", label="Kim & No (end masked)", tag=lambda k: PadMitigation("mask_end").tag, **_PAD)
def mask_end() -> Intervention:
    """``--eot_masked`` (a Section 3.2 ablation): only the end-of-text embedding zeroed."""
    return padding_intervention(PadMitigation("mask_end"))
