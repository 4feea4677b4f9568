"""What the reports read from the registries: display names, and which methods take which published row.

A detector is shown by the label it was registered with (``benchmark.registry.DETECTORS``); a name the registry
does not know (a folder made by another version) is shown as it is, so a new detector appears in every report with
no edit here. Which paper table or figure a method has a row in, and what the headline compares, are the entries'
metadata (``reproduces``, ``baseline``), never a list of names in a report.
"""
from __future__ import annotations

from benchmark.registry import DETECTORS, Registry


def detector_label(name: str) -> str:
    """The display label of detector ``name`` (its registered label, else ``name`` itself)."""
    return DETECTORS.label(name)


def detector_order(names) -> list[str]:
    """The given detector names in registry order, unknown ones after them, alphabetically."""
    registered = list(DETECTORS)
    names = set(names)
    return [n for n in registered if n in names] + sorted(names - set(registered))


def reproducing(item: str, registry: Registry = DETECTORS) -> list[str]:
    """The entries of ``registry`` with a row in the published table or figure ``item`` (their ``reproduces``
    metadata: ``table1``, ``fig5``, ``localization_iou``), in registry order."""
    return [e.name for e in registry.entries() if item in e.meta.get("reproduces", ())]


def comparisons() -> list[tuple[str, str]]:
    """(detector, baseline) for every detector registered with a ``baseline``: what the headline compares."""
    return [(e.name, e.meta["baseline"]) for e in DETECTORS.entries() if e.meta.get("baseline")]


def grid_detectors(names) -> list[str]:
    """Of ``names``, the detectors scored on a layer set x step window grid (``uses_layers`` and ``uses_T``): those
    with a layer x T heat map. Registry order; names the registry does not know are left out."""
    return [n for n in detector_order(names) if n in DETECTORS and DETECTORS[n].uses_layers and DETECTORS[n].uses_T]
