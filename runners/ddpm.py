"""DDPM job: train (when asked and missing) or load an unconditional DDPM, sample into the store, and measure
memorization against its training set (``benchmark.jobs.ddpm.run_ddpm`` does the job)."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from benchmark.jobs.config import check_job
from benchmark.jobs.ddpm import run_ddpm
from benchmark.store import job_folder as jobfolder
from runners.common import CONF, job_device, job_tracker, run_job, write_result


def run(cfg: DictConfig, folder: Path, device: str = "cpu") -> float:
    """The job itself, callable with a composed config (tests do)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    job = check_job(config)  # every setting, before any training or sampling
    jobfolder.write_config(folder, config)
    tracker = job_tracker(cfg, folder)
    try:
        result = run_ddpm(job, device)
        write_result(result, folder, tracker)
        print(json.dumps(result.summary(), indent=1) + f"\nresults in {folder}")
        return result.headline
    finally:
        tracker.finish()


@hydra.main(version_base="1.3", config_path=CONF, config_name="ddpm")
def main(cfg: DictConfig) -> float:
    return run_job(lambda c, folder: run(c, folder, job_device(c.device)), cfg)


if __name__ == "__main__":
    main()
