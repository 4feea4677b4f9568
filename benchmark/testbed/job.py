"""The schema of the testbed's training job (``runners.train_testbed``), registered in ``benchmark.jobs.config.JOBS``
as the plug-in's own: the library's generic modules never import the testbed (``registry.PLUGINS`` names it)."""
from __future__ import annotations

from benchmark.core.config_types import Name
from benchmark.jobs.config import JOBS, ConfigError, Job, Section
from benchmark.testbed.build import WEIGHTS
from benchmark.testbed.data import Recipe
from benchmark.testbed.train import Architecture, Training


class Testbed(Section):
    recipe: Recipe
    architecture: Architecture
    training: Training


@JOBS.register("train_testbed", label="testbed training")
class TrainTestbedJob(Job):
    testbed: Testbed
    out: Name
    ship: bool
    weights: Name
    progress: bool

    def check(self) -> None:
        if self.ship and self.weights not in WEIGHTS:  # before hours of training, not after
            raise ConfigError(f"weights={self.weights!r} is not a shipped testbed ({', '.join(WEIGHTS)})")
