"""Mitigation: every inference-time mitigation and the privacy-utility trade-off.

``interface`` (the registered factories' ``Intervention`` hooks and a setting's store tag), one module per kind of
method: ``embedding`` (Wen et al., BE), ``padding`` (Kim & No), ``prompt_text`` (Somepalli et al.), ``initial_noise``
(SAIL, Han et al.); ``tradeoff`` (sampling, measures, curves, equal utility, memorization rate)."""

# the modules that register mitigations (benchmark.registry.PACKAGES imports this package)
from benchmark.mitigation import embedding, initial_noise, padding, prompt_text  # noqa: F401
