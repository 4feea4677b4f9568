"""A plug-in of one's own methods, kept outside be-bench: a toy detector and a toy localizer.

Load it with ``plugins=[examples/my_methods.py]`` (a file) or, where it is importable, ``plugins=[my_methods]`` (a
module), on any runner: it is imported before the config is checked, and its entries are then scored, reported and
contract-tested exactly like the built-in ones (docs/contributing.md). Neither method is published: they show the
shape of a plug-in, not a recommendation.
"""
from __future__ import annotations

import numpy as np

from benchmark.detectors.scores import be_mask
from benchmark.registry import DETECTORS, LOCALIZERS


@DETECTORS.register("BE_peak", label="peak of the BE mask (example)", higher_is_memorized=True)
def be_peak(mask: np.ndarray) -> np.ndarray:
    """The brightest pixel of the BE mask: (n, h, w) -> (n,). It reads the mask, so it is scored on every layer
    set, at every recorded early step and can be early stopping's signal (``early.signal.detector=BE_peak``)."""
    return mask.max(axis=(-2, -1))


@LOCALIZERS.register("BE_squared", label="squared BE mask (example)")
def be_squared(end_maps: dict[str, np.ndarray], layers: list[str], size: tuple[int, int]) -> np.ndarray:
    """The BE mask squared (sharper, same ranking of pixels): end-token maps (layer -> (n, h_l, w_l)) ->
    (n, *size)."""
    return be_mask(end_maps, layers, size) ** 2
