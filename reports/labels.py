"""Display names of detectors: the one place reports read them from.

A detector is shown by the label it was registered with (``benchmark.registry.DETECTORS``); a name the registry
does not know (a folder made by another version) is shown as it is, so a new detector appears in every report with
no edit here.
"""
from __future__ import annotations

from benchmark.registry import DETECTORS


def detector_label(name: str) -> str:
    """The display label of detector ``name`` (its registered label, else ``name`` itself)."""
    return DETECTORS.label(name)


def detector_order(names) -> list[str]:
    """The given detector names in registry order, unknown ones after them, alphabetically."""
    registered = list(DETECTORS)
    names = set(names)
    return [n for n in registered if n in names] + sorted(names - set(registered))
