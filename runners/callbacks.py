"""Hydra callbacks: the end-of-sweep summary (this multirun's finished, skipped, failed jobs with their error line)."""
from __future__ import annotations

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from benchmark.store import job_folder as jobfolder
from runners.common import ERROR_FILE


def sweep_status(sweep_dir: Path, run: str | None = None) -> dict[str, list]:
    """Job folders of a sweep by state: ``done`` (metrics.json), ``failed`` (error.txt, with its first line); with
    ``run`` (a multirun's id, ``jobfolder.start_sweep_run``) only the folders that multirun ran or reused."""
    status = {"done": [], "failed": []}
    for config in sorted(sweep_dir.glob(f"**/{jobfolder.CONFIG}")):
        job = config.parent
        if run is not None and not jobfolder.in_sweep_run(job, run):
            continue
        if (job / jobfolder.METRICS).exists():
            status["done"].append(str(job.relative_to(sweep_dir)))
        elif (job / ERROR_FILE).exists():
            first = (job / ERROR_FILE).read_text().splitlines()[0]
            status["failed"].append([str(job.relative_to(sweep_dir)), first])
    return status


class SweepSummary(Callback):
    """Writes ``sweep_summary.json`` and prints the jobs of this multirun (not of an earlier grid run into the same
    sweep folder): each job marks its folder with the multirun's id (``runners.common.run_job``)."""

    run: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.run = jobfolder.start_sweep_run(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        status = sweep_status(sweep_dir, self.run)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(status, indent=1) + "\n")
        print(f"sweep {sweep_dir}: {len(status['done'])} jobs finished, {len(status['failed'])} failed")
        for job, line in status["failed"]:
            print(f"  FAILED {job}: {line}")
