"""Mitigation job: baseline and mitigated generations of memorized prompts, their copying, utility and cost.

The job itself is the library's (``benchmark.jobs.mitigation.run_mitigation_job``); this runner composes the config,
builds the spec, calls it and writes the result, the report and the tracker's copy."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from benchmark.jobs.config import check_job
from benchmark.jobs.mitigation import MitigationSpec, run_mitigation_job
from benchmark.store import job_folder as jobfolder
from reports.job import write_job_report
from reports.summary import job_summary
from runners.common import CONF, job_device, job_tracker, progress_bar, run_job, write_result


def run(cfg: DictConfig, folder: Path, device: str | None = None) -> float:
    config = OmegaConf.to_container(cfg, resolve=True)
    job = check_job(config)  # every setting, before any model is loaded
    jobfolder.write_config(folder, config)
    tracker = job_tracker(cfg, folder)
    try:
        spec = MitigationSpec(job, config, device or cfg.model.device, progress=lambda it: progress_bar(it, "prompts"))
        result = run_mitigation_job(spec)
        write_result(result, folder, tracker)
        write_job_report(folder)
        print(job_summary(folder))
        return result.headline
    finally:
        tracker.finish()


@hydra.main(version_base="1.3", config_path=CONF, config_name="mitigate")
def main(cfg: DictConfig) -> float:
    return run_job(lambda c, folder: run(c, folder, job_device(c.model.device)), cfg)


if __name__ == "__main__":
    main()
