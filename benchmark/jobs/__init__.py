"""Jobs: the config schema of every job kind."""

# the modules that register the job schemas (benchmark.registry.PACKAGES imports this package)
from benchmark.jobs import config  # noqa: F401
