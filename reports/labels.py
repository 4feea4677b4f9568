"""Display names of detectors: the one place reports read them from.

A detector the registry (``benchmark.scores.DETECTORS``) gives a ``label`` is shown by that label; until the
registry carries labels, the paper names below stand in; any other name is shown as it is, so a new detector
appears in every report with no edit here.
"""
from __future__ import annotations

# Interim labels, the names the papers use (Table 1 of Chen et al. ICLR 2025 says "Wen (D)" and "BE (LD)").
# Remove once every registered detector has a ``label``.
_INTERIM = {"D": "Wen (D)", "LD": "BE (LD)", "BE_intensity": "BE intensity", "Ren_E": "Ren (E)", "Ren_D": "Ren (D)"}


def _registry() -> dict:
    try:
        from benchmark.scores import DETECTORS
    except ImportError:  # reports also render folders copied to a machine without the library's extras
        return {}
    return DETECTORS


def detector_label(name: str) -> str:
    """The display label of detector ``name`` (registry label, else the paper name, else ``name`` itself)."""
    label = getattr(_registry().get(name), "label", None)
    return label or _INTERIM.get(name, name)


def detector_order(names) -> list[str]:
    """The given detector names in registry order, unknown ones after them, alphabetically."""
    registered = list(_registry())
    names = set(names)
    return [n for n in registered if n in names] + sorted(names - set(registered))
