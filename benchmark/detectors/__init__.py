"""Detection: the detectors (one registered function each), extra passes, scoring a job's traces."""

# the modules that register detectors, localizers and extra passes (benchmark.registry.PACKAGES imports this package)
from benchmark.detectors import extra_passes, scores  # noqa: F401
