"""Detector scores computed from traces, offline: Wen's D, BE's LD and intensity, Ren's attention entropies.

Inputs carry a leading generation axis: ``delta_sq`` (n, steps, h, w), end-token maps (n, h_l, w_l), token
attention (n, steps, tokens). Each detector is registered in :data:`benchmark.registry.DETECTORS` with its label and
whether a higher score means "memorized"; its parameter names say what it reads (``registry.LAYER_INPUTS``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.registry import DETECTORS, LOCALIZERS


@DETECTORS.register("D", label="Wen (D)", higher_is_memorized=True, reproduces=("table1",))
def magnitude_D(delta_sq: np.ndarray, T: int) -> np.ndarray:
    """Wen et al.: mean over the first T steps of ||eps_cond - eps_uncond|| (norm over channels and pixels)."""
    return np.sqrt(delta_sq[:, :T].sum(axis=(-2, -1))).mean(axis=1)


# BE is compared with Wen's D in the report's headline (Chen et al. ICLR 2025, Table 1: LD beats D)
@DETECTORS.register("LD", label="BE (LD)", higher_is_memorized=True, reproduces=("table1",), baseline="D")
def localized_LD(delta_sq: np.ndarray, mask: np.ndarray, T: int) -> np.ndarray:
    """BE: mean over the first T steps of ||(eps_cond - eps_uncond) * m|| / mean(m), per image.

    The mask is the same on every latent channel, so sum_c (delta_c * m)^2 = m^2 * delta_sq: exact from one pass.
    """
    weighted = (mask[:, None] ** 2 * delta_sq[:, :T]).sum(axis=(-2, -1))
    return np.sqrt(weighted).mean(axis=1) / mask.mean(axis=(-2, -1))


@DETECTORS.register("BE_intensity", label="BE intensity", higher_is_memorized=True, reproduces=("fig5",))
def be_intensity(mask: np.ndarray) -> np.ndarray:
    """BE intensity: the mean of the end-token mask (brighter for memorized prompts)."""
    return mask.mean(axis=(-2, -1))


def resize_maps(maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(n, h, w) -> (n, *size). Bilinear by default: the maps are smooth and nearest leaves blocks."""
    if maps.shape[-2:] == tuple(size):
        return maps
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(torch.from_numpy(maps)[:, None], size=size, mode=mode, **kwargs)[:, 0].numpy()


BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
FORWARD = "forward:"


def forward_order(layers: list[str]) -> list[str]:
    """Cross-attention layer names in the UNet's forward order: down blocks, mid block, up blocks, then by index.

    Traces and module listings do not keep that order (safetensors sorts keys; diffusers registers ``up_blocks``
    before ``mid_block``), so it is rebuilt from the names."""
    def key(name: str):
        head, *rest = name.split(".")
        return BLOCK_ORDER.get(head, len(BLOCK_ORDER)), head, [int(p) for p in rest if p.isdigit()]
    return sorted(layers, key=key)


def select_layers(available: list[str], chosen: list[str]) -> list[str]:
    """Resolve layer names, prefixes and rules to cross-attention layer names.

    ``down_blocks.0`` = every cross-attention layer in that block; ``*`` = all; ``forward:<k>`` = the layer at
    0-based position k in forward order (``forward:3`` is Ren et al.'s E layer, ``layer_id = 3`` in MemAttn's
    detect.py: ``down_blocks.1.attentions.1`` on SD v1-4). Raises ValueError naming an unknown entry."""
    picked = []
    for name in chosen:
        if name.startswith(FORWARD):
            ordered = forward_order(available)
            k = name.removeprefix(FORWARD)
            if not k.isdigit() or int(k) >= len(ordered):
                raise ValueError(f"layer rule {name!r} needs 0 <= k < {len(ordered)} (cross-attention layers in "
                                 f"forward order: {', '.join(ordered)})")
            hits = [ordered[int(k)]]
        else:
            hits = [layer for layer in available if name in ("*", layer) or layer.startswith(name + ".")]
        if not hits:
            raise ValueError(f"unknown layer {name!r}; cross-attention layers are: {', '.join(available)}")
        picked += [h for h in hits if h not in picked]
    return picked


@LOCALIZERS.register("BE", label="BE mask (end-token attention)", reproduces=("localization_iou",))
def be_mask(end_maps: dict[str, np.ndarray], layers: list[str], size: tuple[int, int],
            mode: str = "bilinear") -> np.ndarray:
    """The BE localization mask: mean over the chosen layers of their end-token maps at ``size``."""
    chosen = select_layers(list(end_maps), layers)
    return np.mean([resize_maps(end_maps[layer], size, mode) for layer in chosen], axis=0)


def token_entropy(token_attn: np.ndarray) -> np.ndarray:
    """Entropy over the last axis of attention distributions (natural log; 0 log 0 = 0)."""
    p = np.clip(token_attn, 1e-12, None)
    return -(token_attn * np.log(p)).sum(axis=-1)


def summary_entropy(token_attn: np.ndarray, end_index: np.ndarray) -> np.ndarray:
    """Ren et al.'s summary-token entropy: the entropy terms of the end token and the padding after it.

    token_attn (n, steps, tokens), end_index (n,) -> (n, steps). Terms of the unrenormalised distribution, as
    MemAttn's detect.py sums them over ``attn[length - 1:]`` (length = token ids incl. start and end)."""
    tokens = np.arange(token_attn.shape[-1])
    keep = tokens[None, :] >= end_index[:, None]  # (n, tokens)
    terms = -token_attn * np.log(np.clip(token_attn, 1e-12, None))
    return (terms * keep[:, None, :]).sum(axis=-1)


def layer_mean_attention(token_attn: dict[str, np.ndarray], layers: list[str]) -> np.ndarray:
    """The attention distribution over tokens averaged over the chosen layers: (n, steps, tokens).

    Each stored vector is already the mean over heads and pixels of its layer, so this is MemAttn's average over
    layers and heads of per-layer pixel means (detect.py averages before it takes any entropy)."""
    chosen = select_layers(list(token_attn), layers)
    return np.mean([token_attn[layer] for layer in chosen], axis=0)


# memorized prompts spread attention off the start token: higher entropy (MemAttn detect.py's ROC)
@DETECTORS.register("Ren_E", label="Ren (E)", higher_is_memorized=True)
def ren_E(token_attn: dict[str, np.ndarray], layers: list[str]) -> np.ndarray:
    """Ren et al.'s E (ECCV 2024; MemAttn ``detect.py --mode E``): the entropy, at the first step, of the
    attention over tokens averaged over the chosen layers (and heads, pixels). Higher = memorized.

    Official: one layer, the fourth cross-attention layer in forward order (layer set ``ren_E`` = ``forward:3``).
    token_attn: layer -> (n, steps, tokens); returns (n,)."""
    return token_entropy(layer_mean_attention(token_attn, layers)[:, 0])


def ren_window(T: int) -> int:
    """Steps in Ren's D window: the last fifth of the first T steps, at least one (official: 10 of 50)."""
    return max(1, T // 5)


@DETECTORS.register("Ren_D", label="Ren (D)", higher_is_memorized=True)
def ren_D(token_attn: dict[str, np.ndarray], end_index: np.ndarray, layers: list[str], T: int) -> np.ndarray:
    """Ren et al.'s D (ECCV 2024; MemAttn ``detect.py --mode D``) over the first T steps. Higher = memorized.

    With ``a`` the attention over tokens averaged over the chosen layers (official: all) and W the last
    ``ren_window(T)`` of the first T steps (official: T = 50, W = steps 40..49):
    D = mean_{t in W} H(a_t) + mean_{t in W} H_summary(a_t) - H_summary(a_0), signed. token_attn: layer ->
    (n, steps, tokens), end_index (n,); returns (n,). Raises ValueError when T exceeds the recorded steps."""
    attn = layer_mean_attention(token_attn, layers)
    if not 1 <= T <= attn.shape[1]:
        raise ValueError(f"Ren D window T={T} outside 1..{attn.shape[1]} recorded steps")
    window = slice(T - ren_window(T), T)
    summary = summary_entropy(attn, end_index)
    return token_entropy(attn[:, window]).mean(axis=1) + summary[:, window].mean(axis=1) - summary[:, 0]

