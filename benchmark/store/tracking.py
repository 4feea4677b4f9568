"""Weights & Biases as a mirror of the files on disk: any failure warns and the job goes on."""
from __future__ import annotations

import os
import warnings
from pathlib import Path


class Tracker:
    """One W&B run per job; ``enabled=False`` (or any W&B failure) turns every call into a no-op."""

    def __init__(self, enabled: bool, project: str, config: dict, folder: str | Path, mode: str = "offline",
                 group: str | None = None, name: str | None = None):
        self.run = None
        if not enabled:
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=project, config=config, dir=str(folder), mode=mode, group=group,
                                  name=name, reinit="finish_previous")
        except Exception as err:  # an outage or a missing login must never fail a benchmark job
            warnings.warn(f"W&B disabled for this job: {type(err).__name__}: {err}", stacklevel=2)

    def log(self, values: dict, images: dict | None = None, **tables) -> None:
        """Scalars (also into the summary), pictures by name -> PNG path, and DataFrames as tables."""
        if self.run is None:
            return
        try:
            import wandb

            media = {k: wandb.Table(dataframe=v) for k, v in tables.items()}
            media |= {k: wandb.Image(str(v)) for k, v in (images or {}).items() if Path(v).exists()}
            self.run.log({**values, **media})
            self.run.summary.update(values)
        except Exception as err:
            warnings.warn(f"W&B logging failed: {type(err).__name__}: {err}", stacklevel=2)

    def save(self, *paths: str | Path) -> None:
        """Attach job files to the run (metrics.json, the per-generation table): the report can rebuild the job
        folder from W&B alone (``reports.leaderboard --wandb entity/project``)."""
        if self.run is None:
            return
        try:
            for path in paths:
                if Path(path).exists():
                    self.run.save(str(path), base_path=str(Path(path).parent), policy="now")
        except Exception as err:
            warnings.warn(f"W&B file upload failed: {type(err).__name__}: {err}", stacklevel=2)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as err:
                warnings.warn(f"W&B finish failed: {type(err).__name__}: {err}", stacklevel=2)
            self.run = None
