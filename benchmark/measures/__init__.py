"""Measures: detection metrics with bootstrap intervals, copy similarity and prompt fidelity."""

# the modules that register similarity measures (benchmark.registry.PACKAGES imports this package)
from benchmark.measures import similarity  # noqa: F401
