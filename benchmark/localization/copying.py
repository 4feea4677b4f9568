"""Memorization measured against the training set, for models without text (DDPMs) or any model with its data.

- ``nn_ratio``: distance to the nearest training image over the distance to the second nearest (a copy is far
  closer to its source than to anything else: ratio near 0; a novel image: near 1).
- ``carlini``: Carlini et al. 2023's tiled L2 (images cut into a grid of tiles, the largest tile RMS distance:
  a copy must match everywhere), divided by the mean tiled distance to the ``n`` nearest training images.
- ``copy_map``: the local, patch-level variant: for every patch place, the distance to the same place in the
  nearest training image over the second nearest; low = a copied region. Its thresholded map is ground truth for
  localization on unconditional models.
Images are (n, C, H, W) arrays in [0, 1]; distances are RMS over channels and pixels.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


def pairwise_rms(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(n_a, n_b) RMS distances, computed in chunks through ||x||^2 + ||y||^2 - 2 x.y."""
    x = torch.from_numpy(np.asarray(a, np.float64).reshape(len(a), -1))
    y = torch.from_numpy(np.asarray(b, np.float64).reshape(len(b), -1))
    yy = (y * y).sum(1)
    out = [((xs * xs).sum(1)[:, None] + yy[None] - 2 * xs @ y.T).clamp(min=0) for xs in x.split(chunk)]
    return torch.sqrt(torch.cat(out) / x.shape[1]).numpy()


def tiles(images: np.ndarray, grid: int) -> np.ndarray:
    """(n, C, H, W) -> (grid*grid, n, C * H/grid * W/grid): the images cut into a grid of tiles."""
    n, c, h, w = images.shape
    if h % grid or w % grid:
        raise ValueError(f"images of {h}x{w} do not split into a {grid}x{grid} grid of tiles")
    t = images.reshape(n, c, grid, h // grid, grid, w // grid).transpose(2, 4, 0, 1, 3, 5)
    return t.reshape(grid * grid, n, -1)


def tiled_distances(a: np.ndarray, b: np.ndarray, grid: int = 4) -> np.ndarray:
    """Carlini's tiled distance: the largest tile RMS distance, (n_a, n_b)."""
    ta, tb = tiles(a, grid), tiles(b, grid)
    return np.max([pairwise_rms(x, y) for x, y in zip(ta, tb)], axis=0)


def nn_ratio(dist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per generation: nearest index, nearest distance, and nearest / second-nearest distance; among equally
    near training images the first in the training set's order is the nearest."""
    if dist.shape[1] < 2:
        raise ValueError("a distance ratio needs at least 2 training images")
    order = np.argsort(dist, axis=1, kind="stable")[:, :2]
    d1 = np.take_along_axis(dist, order[:, :1], 1)[:, 0]
    d2 = np.take_along_axis(dist, order[:, 1:2], 1)[:, 0]
    return order[:, 0], d1, d1 / np.maximum(d2, 1e-12)


def carlini_score(tiled: np.ndarray, n: int = 50) -> np.ndarray:
    """Nearest tiled distance over the mean tiled distance to the ``n`` nearest (Carlini et al.: < 1/3 = copy)."""
    n = min(n, tiled.shape[1])
    nearest = np.sort(tiled, axis=1)[:, :n]
    return nearest[:, 0] / np.maximum(nearest.mean(1), 1e-12)


def copy_map(image: np.ndarray, training: np.ndarray, patch: int = 4, stride: int | None = None) -> np.ndarray:
    """Per patch place (rows, cols): nearest over second-nearest RMS distance of the generation's patch to the
    training images' patch at the same place. Needs >= 2 training images."""
    if len(training) < 2:
        raise ValueError("a copy map needs at least 2 training images")
    stride = stride or patch
    x = torch.from_numpy(np.asarray(image, np.float32))[None]
    y = torch.from_numpy(np.asarray(training, np.float32))
    px = F.unfold(x, patch, stride=stride)  # (1, C*p*p, L)
    py = F.unfold(y, patch, stride=stride)  # (n, C*p*p, L)
    d = ((py - px) ** 2).mean(1).sqrt()  # (n, L)
    two = d.topk(2, dim=0, largest=False).values
    ratio = two[0] / two[1].clamp(min=1e-12)
    rows = (image.shape[-2] - patch) // stride + 1
    return ratio.view(rows, -1).numpy()


def copied_region(ratio_map: np.ndarray, size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """The copy map as a pixel mask: patches whose ratio is below ``threshold``, upsampled to ``size``."""
    low = torch.from_numpy((ratio_map < threshold).astype(np.float32))[None, None]
    return F.interpolate(low, size=size, mode="nearest")[0, 0].numpy() > 0.5


def copy_masks(images: np.ndarray, training: np.ndarray, patch: int = 4, below: float = 0.5) -> list[np.ndarray]:
    """Per generation, the pixels of its copied patches (the thresholded copy map)."""
    return [copied_region(copy_map(x, training, patch), x.shape[-2:], below) for x in images]


def memorization_table(images: np.ndarray, training: np.ndarray, masks: list[np.ndarray],
                       duplicated: np.ndarray | None = None, grid: int = 4, carlini_n: int = 50,
                       copy_below: float = 1 / 3) -> pd.DataFrame:
    """One row per generation: its nearest training image, both global scores, the copy call, and the fraction of
    its pixels its copy mask covers."""
    _, d1, ratio = nn_ratio(pairwise_rms(images, training))
    tiled = tiled_distances(images, training, grid)
    nearest = tiled.argmin(1)
    carlini = carlini_score(tiled, carlini_n)
    table = pd.DataFrame({"nearest": nearest, "nn_distance": d1, "nn_ratio": ratio, "carlini": carlini,
                          "is_copy": carlini < copy_below, "copied_fraction": [m.mean() for m in masks]})
    if duplicated is not None:
        table["nearest_duplicated"] = np.asarray(duplicated, bool)[nearest]
    return table


def copy_gallery(images: np.ndarray, training: np.ndarray, table: pd.DataFrame, masks: list[np.ndarray],
                 n: int = 8, scale: int = 4) -> np.ndarray:
    """Rows of (generation | its nearest training image | copied patches in red), most copied first
    (lowest Carlini score; equal scores in the generations' order); (H, W, 3)."""
    rows = []
    for i in table.sort_values("carlini", kind="stable").index[:n]:
        gen, ref = images[i].transpose(1, 2, 0), training[table.nearest[i]].transpose(1, 2, 0)
        red = 0.5 * gen + 0.5 * np.stack([masks[i], 0 * masks[i], 0 * masks[i]], -1)
        rows.append(np.concatenate([gen, ref, red], 1))
    return np.concatenate(rows, 0).repeat(scale, 0).repeat(scale, 1)
