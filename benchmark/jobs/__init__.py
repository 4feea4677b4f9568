"""Jobs: the config schema (``config``), the pipeline (``detection``, ``guard``, ``ddpm``: one function each), the
typed result (``results``) and the store keys (``keys``) of every job kind."""

# the modules that register the job schemas (benchmark.registry.PACKAGES imports this package)
from benchmark.jobs import config  # noqa: F401
