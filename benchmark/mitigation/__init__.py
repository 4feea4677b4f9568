"""Mitigation: every inference-time mitigation and the privacy-utility trade-off."""

# the modules that register mitigations (benchmark.registry.PACKAGES imports this package)
from benchmark.mitigation import embedding, padding  # noqa: F401
