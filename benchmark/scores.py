"""Detector scores computed from traces, offline: Wen's D, BE's LD and intensity, Ren's attention entropies.

Inputs carry a leading generation axis: ``delta_sq`` (n, steps, h, w), end-token maps (n, h_l, w_l), token
attention (n, steps, tokens). Each detector is registered in :data:`benchmark.registry.DETECTORS` with its label and
whether a higher score means "memorized"; its parameter names say what it reads (``registry.LAYER_INPUTS``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .registry import DETECTORS, LOCALIZERS


@DETECTORS.register("D", label="Wen (D)", higher_is_memorized=True)
def magnitude_D(delta_sq: np.ndarray, T: int) -> np.ndarray:
    """Wen et al.: mean over the first T steps of ||eps_cond - eps_uncond|| (norm over channels and pixels)."""
    return np.sqrt(delta_sq[:, :T].sum(axis=(-2, -1))).mean(axis=1)


@DETECTORS.register("LD", label="BE (LD)", higher_is_memorized=True)
def localized_LD(delta_sq: np.ndarray, mask: np.ndarray, T: int) -> np.ndarray:
    """BE: mean over the first T steps of ||(eps_cond - eps_uncond) * m|| / mean(m), per image.

    The mask is the same on every latent channel, so sum_c (delta_c * m)^2 = m^2 * delta_sq: exact from one pass.
    """
    weighted = (mask[:, None] ** 2 * delta_sq[:, :T]).sum(axis=(-2, -1))
    return np.sqrt(weighted).mean(axis=1) / mask.mean(axis=(-2, -1))


@DETECTORS.register("BE_intensity", label="BE intensity", higher_is_memorized=True)
def be_intensity(mask: np.ndarray) -> np.ndarray:
    """BE intensity: the mean of the end-token mask (brighter for memorized prompts)."""
    return mask.mean(axis=(-2, -1))


def resize_maps(maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(n, h, w) -> (n, *size). Bilinear by default: the maps are smooth and nearest leaves blocks."""
    if maps.shape[-2:] == tuple(size):
        return maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(torch.from_numpy(maps)[:, None], size=size, mode=mode, **kwargs)[:, 0].numpy()


def select_layers(available: list[str], chosen: list[str]) -> list[str]:
    """Resolve layer names or prefixes (``down_blocks.0`` = every cross-attention layer in that block; ``*`` = all)."""
    picked = []
    for name in chosen:
        hits = [layer for layer in available if name in ("*", layer) or layer.startswith(name + ".")]
        if not hits:
            raise ValueError(f"unknown layer {name!r}; cross-attention layers are: {', '.join(available)}")
        picked += [h for h in hits if h not in picked]
    return picked


@LOCALIZERS.register("BE", label="BE mask (end-token attention)")
def be_mask(end_maps: dict[str, np.ndarray], layers: list[str], size: tuple[int, int],
            mode: str = "bilinear") -> np.ndarray:
    """The BE localization mask: mean over the chosen layers of their end-token maps at ``size``."""
    chosen = select_layers(list(end_maps), layers)
    return np.mean([resize_maps(end_maps[layer], size, mode) for layer in chosen], axis=0)


def token_entropy(token_attn: np.ndarray) -> np.ndarray:
    """Entropy over the last axis of attention distributions (natural log)."""
    p = np.clip(token_attn, 1e-12, None)
    return -(token_attn * np.log(p)).sum(axis=-1)


def summary_entropy(token_attn: np.ndarray, end_index: np.ndarray) -> np.ndarray:
    """Ren et al.'s summary-token entropy: the entropy terms of the end token and the padding after it."""
    tokens = np.arange(token_attn.shape[-1])
    keep = tokens[None, :] >= end_index[:, None]  # (n, tokens)
    terms = -token_attn * np.log(np.clip(token_attn, 1e-12, None))
    return (terms * keep[:, None, :]).sum(axis=-1)


@DETECTORS.register("Ren_E", label="Ren (E)", higher_is_memorized=False)
def ren_E(token_attn: dict[str, np.ndarray], layers: list[str]) -> np.ndarray:
    """Ren et al.'s E: attention entropy at the first step, mean over the chosen layers (lower = memorized)."""
    chosen = select_layers(list(token_attn), layers)
    return np.mean([token_entropy(token_attn[layer][:, 0]) for layer in chosen], axis=0)


@DETECTORS.register("Ren_D", label="Ren (D)", higher_is_memorized=False)
def ren_D(token_attn: dict[str, np.ndarray], end_index: np.ndarray, layers: list[str], T: int) -> np.ndarray:
    """Ren et al.'s D over the first T steps: mean entropy of the last T/5 of them plus the change of the
    summary-token entropy from the first step to step T (lower = memorized)."""
    chosen = select_layers(list(token_attn), layers)
    window = max(1, T // 5)
    scores = []
    for layer in chosen:
        attn = token_attn[layer][:, :T]
        late = token_entropy(attn[:, T - window:]).mean(axis=1)
        summary = summary_entropy(attn, end_index)
        scores.append(late + np.abs(summary[:, -1] - summary[:, 0]))
    return np.mean(scores, axis=0)
