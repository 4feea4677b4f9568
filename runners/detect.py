"""Detection job: sample missing traces, score every detector on the layer x T grid, write the job folder
(``benchmark.jobs.detection.run_detection`` does the job)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from benchmark.jobs.config import check_job
from benchmark.jobs.detection import run_detection
from benchmark.store import job_folder as jobfolder
from reports.job import write_job_report
from reports.summary import job_summary
from runners.common import CONF, job_device, job_tracker, progress_bar, run_job, write_result


def run(cfg: DictConfig, folder: Path, device: str | None = None) -> float:
    """The job itself, callable with a composed config (tests do)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    job = check_job(config)
    jobfolder.write_config(folder, config)
    tracker = job_tracker(cfg, folder)
    try:
        result = run_detection(job, device, progress=progress_bar)
        write_result(result, folder, tracker)
        write_job_report(folder)
        print(job_summary(folder))
        return result.headline
    finally:
        tracker.finish()


@hydra.main(version_base="1.3", config_path=CONF, config_name="detect")
def main(cfg: DictConfig) -> float:
    return run_job(lambda c, folder: run(c, folder, job_device(c.model.device)), cfg)


if __name__ == "__main__":
    main()
