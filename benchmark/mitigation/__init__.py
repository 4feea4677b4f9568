"""Mitigation: every inference-time mitigation and the privacy-utility trade-off.

``interface`` (the registered factories' ``Intervention`` hooks and a setting's store tag), one module per kind of
method: ``embedding`` (Wen et al., BE), ``padding`` (Kim & No), ``prompt_text`` (Somepalli et al.), ``initial_noise``
(SAIL, Han et al.), ``attention`` (Ren et al.), ``guidance`` (Jain et al.), ``neurons`` (NeMo), ``prompt_search``
(PRSS and its rephrasers); ``tradeoff`` (sampling, measures, curves, equal utility, memorization rate)."""

# The modules that register mitigations and rephrasers (benchmark.registry.PACKAGES imports this package), in the
# order the registry lists them and the reports show them: the embedding optimisations first.
# isort: off
from benchmark.mitigation import embedding, padding, prompt_text, initial_noise  # noqa: F401
from benchmark.mitigation import attention, guidance, neurons, prompt_search  # noqa: F401
# isort: on
