"""Guarded generation: sample a prompt set with in-loop early stopping on the early bright ending
(``benchmark.jobs.guard.run_guarded`` does the job)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from benchmark.jobs.config import check_job
from benchmark.jobs.guard import run_guarded
from benchmark.store import job_folder as jobfolder
from runners.common import CONF, job_device, job_tracker, launch_path, progress_bar, run_job, write_result


def run(cfg: DictConfig, folder: Path, device: str | None = None) -> float:
    """The job itself, callable with a composed config (tests do)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    job = check_job(config)  # every setting, before any model is loaded
    jobfolder.write_config(folder, config)
    tracker = job_tracker(cfg, folder)
    try:
        result = run_guarded(job, device, progress=progress_bar)
        write_result(result, folder, tracker)
        rule, g = result.rule, job.guard
        print(f"{result.stopped} of {result.n_generations} generations stopped at step {rule['step']} "
              f"({rule['detector']}, threshold {rule['threshold']:.4g} at {g.fpr:g} FPR); "
              f"{result.restarted} restarted; {result.headline:.1%} of an unguarded run's denoising steps saved | "
              f"results in {folder}")
        return result.headline
    finally:
        tracker.finish()


def same_calibration_spelling(cfg: DictConfig) -> DictConfig:
    """``guard.calibration`` as an absolute path, so that one calibration folder written relative, absolute or with a
    trailing slash makes one job (its identity holds the path); relative to the launch directory, also under
    ``hydra.job.chdir=true``."""
    if cfg.guard.calibration:
        cfg.guard.calibration = str(Path(launch_path(cfg.guard.calibration)).resolve())
    return cfg


@hydra.main(version_base="1.3", config_path=CONF, config_name="guard")
def main(cfg: DictConfig) -> float:
    return run_job(lambda c, folder: run(c, folder, job_device(c.model.device)), same_calibration_spelling(cfg))


if __name__ == "__main__":
    main()
