"""Guarded generation: sample a prompt set with in-loop early stopping on the early bright ending."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from benchmark.data.prompts import load_prompt_set
from benchmark.early import step_detection as early
from benchmark.early import stopping as early_stop
from benchmark.jobs.config import check_ddim_steps, check_job
from benchmark.mitigation.padding import PadMitigation, pad_mitigated_embedding
from benchmark.models.text_to_image import get_model
from benchmark.sampling.capture import image_seeds
from benchmark.store import job_folder as jobfolder
from benchmark.store.traces import to_png
from runners.common import CONF, job_device, job_tracker, launch_path, run_job

# what a calibrated threshold depends on: the model and the sampler (not the number of images, nor the first seed)
CALIBRATED_MODEL = ("name", "source", "build", "dtype")
CALIBRATED_SAMPLER = ("steps", "guidance", "height", "width", "eta", "seeding")


def run(cfg: DictConfig, folder: Path, device: str | None = None) -> float:
    m, s, g = cfg.model, cfg.sampler, cfg.guard
    device = device or m.device
    config = OmegaConf.to_container(cfg, resolve=True)
    job = check_job(config)  # every setting, before any model is loaded
    jobfolder.write_config(folder, config)
    tracker = job_tracker(cfg, folder)
    try:
        calibration = jobfolder.read_job(g.calibration)
        rule = early_stop.rule_from_job(calibration, int(g.step), float(g.fpr))
        check_calibration(calibration, config)
        restart = job.guard.restart
        restart = PadMitigation(restart.method, restart.fraction, restart.token) if restart.method else None
        settings = job.sampler.settings(end_maps=False)
        prompt_set = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
        model = get_model(m.source, device, m.dtype, m.use_safetensors, m.build)
        check_ddim_steps(model.scheduler.config, s.steps)
        conditioning = (lambda prompts: pad_mitigated_embedding(model, prompts, restart)) if restart else None
        seeds = image_seeds(settings, s.n_images)
        items = [(p.position, p, seed) for p in prompt_set for seed in seeds]  # official: whole-set positions
        batches = [items[i:i + s.batch_size] for i in range(0, len(items), s.batch_size)]
        rows, start = [], time.perf_counter()
        for batch in tqdm(batches, desc="guarded batches", disable=None):
            out = early_stop.sample_with_early_stop(model, [p.text for _, p, _ in batch], [k for _, _, k in batch],
                                                    settings, rule, [i for i, _, _ in batch],
                                                    decode=bool(g.save_images), restart=conditioning)
            for j, (_, p, seed) in enumerate(batch):
                rows.append({"prompt_id": p.id, "kind": p.kind, "memorized": p.memorized, "seed": seed,
                             "signal": float(out.signal[j]), "stopped": bool(out.stopped[j]),
                             "restarted": bool(out.restarted[j]), "steps_run": int(out.steps_run[j])})
                if out.images is not None and out.images[j] is not None:
                    (folder / "images").mkdir(exist_ok=True)
                    to_png(out.images[j]).save(folder / "images" / f"{p.id}-seed{seed}.png")
        table = pd.DataFrame(rows)
        summary = summarise(table, settings.steps) | {
            "model": m.name, "prompt_set": prompt_set.name, "calibration": str(calibration.folder),
            "rule": {"step": rule.step, "detector": rule.detector, "layers": calibration.config["early"]["signal"][
                "layers"], "T": rule.window, "threshold": rule.threshold, "fpr_target": float(g.fpr)},
            "restart": asdict(restart) if restart else None,
            "sampling_seconds": round(time.perf_counter() - start, 2)}
        stopped_ids = sorted(set(table.prompt_id[table.stopped]))
        (folder / "stopped_ids.txt").write_text("".join(f"{i}\n" for i in stopped_ids))
        summary["headline"] = value = summary["steps_saved_fraction"]
        jobfolder.write_results(folder, "guard", config, {**asdict(settings), "seed": s.seed, "dtype": m.dtype},
                                s.n_images, summary, {jobfolder.TABLES["guard"]: table})
        tracker.save(folder / "metrics.json", folder / jobfolder.TABLES["guard"])
        tracker.log({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        print(f"{summary['stopped']} of {len(table)} generations stopped at step {rule.step} "
              f"({rule.detector}, threshold {rule.threshold:.4g} at {g.fpr:g} FPR); "
              f"{summary['restarted']} restarted; {value:.1%} of an unguarded run's denoising steps saved | "
              f"results in {folder}")
        return value
    finally:
        tracker.finish()


def check_calibration(calibration: jobfolder.Job, config: dict) -> None:
    """The calibrated threshold holds for the model (config and weights) and sampler it was calibrated on: raise
    ValueError naming every setting that differs."""
    mine, theirs = config["model"], calibration.config.get("model", {})
    diff = [f"model.{k}" for k in CALIBRATED_MODEL if mine.get(k) != theirs.get(k)]
    now = jobfolder.fingerprints({"model": {"source": mine.get("source")}})
    diff += [f"{k} (weights)" for k in now if k in calibration.fingerprints and now[k] != calibration.fingerprints[k]]
    sampler = calibration.sampler
    diff += [f"sampler.{k}" for k in CALIBRATED_SAMPLER if config["sampler"].get(k) != sampler.get(k)]
    if diff:
        raise ValueError(f"guard.calibration {calibration.folder} was calibrated with other settings: "
                         f"{', '.join(diff)}")


def summarise(table: pd.DataFrame, n_steps: int) -> dict:
    """Steps saved and who was stopped: ``stopped`` (count), ``stop_rate``, ``steps_saved_fraction`` (of the steps
    an unguarded run computes, restarts counted as extra steps, so negative when they outweigh the stops), and with
    labels ``caught`` (memorized generations stopped; ``caught_<kind>`` per kind) and ``non_memorized_stopped``
    (every non-memorized generation of the set; not the simulation's ``false_stop_rate``, which counts only the
    held-out prompts that did not calibrate the threshold)."""
    memorized = table.memorized.to_numpy(bool)
    stopped = table.stopped.to_numpy(bool)
    out = {"n_generations": len(table), "stopped": int(stopped.sum()), "stop_rate": float(stopped.mean()),
           "restarted": int(table.restarted.sum()),
           "steps_saved_fraction": float(1 - table.steps_run.sum() / (len(table) * n_steps))}
    if memorized.any():
        out |= early.caught(stopped, memorized, table.kind.to_numpy())
    if (~memorized).any():
        out["non_memorized_stopped"] = float(stopped[~memorized].mean())
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


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
