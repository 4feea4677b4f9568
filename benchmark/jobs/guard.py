"""The guarded-generation job: sample a prompt set with in-loop early stopping on the early bright ending, the stop
rule calibrated by a finished detection job; one call, one :class:`GuardResult`."""
from __future__ import annotations

import time
from dataclasses import asdict

import pandas as pd

from benchmark.data.prompts import load_prompt_set
from benchmark.early import step_detection as early
from benchmark.early import stopping as early_stop
from benchmark.jobs.config import GuardJob, check_ddim_steps
from benchmark.jobs.detection import Progress, no_progress
from benchmark.jobs.results import GuardResult, sampler_record
from benchmark.mitigation.padding import PadMitigation, pad_mitigated_embedding
from benchmark.models.text_to_image import get_model
from benchmark.sampling.capture import image_seeds
from benchmark.store import job_folder as jobfolder

# what a calibrated threshold depends on: the model and the sampler (not the number of images, nor the first seed)
CALIBRATED_MODEL = ("name", "source", "build", "dtype")
CALIBRATED_SAMPLER = ("steps", "guidance", "height", "width", "eta", "seeding")


def run_guarded(job: GuardJob, device: str | None = None, progress: Progress = no_progress) -> GuardResult:
    """The guarded generation of a checked config on ``device`` (default ``model.device``): every (prompt, seed)
    sampled in batches of ``sampler.batch_size`` with the stop rule of ``guard.calibration`` at ``guard.step``
    and ``guard.fpr`` (``early_stop.rule_from_job``), a stopped image restarted under ``guard.restart``'s
    mitigation where one is set; with ``guard.save_images`` the finished images are the result's pictures
    (``images/<prompt id>-seed<k>.png``). Nothing is written: the caller writes the result.

    Raises ValueError before any sampling when the calibration folder is not a finished detection job with that
    row, or was calibrated on another model or sampler (:func:`check_calibration`)."""
    m, s, g = job.model, job.sampler, job.guard
    config = job.resolved
    calibration = jobfolder.read_job(g.calibration)
    rule = early_stop.rule_from_job(calibration, g.step, g.fpr)
    check_calibration(calibration, config)
    restart = g.restart
    restart = PadMitigation(restart.method, restart.fraction, restart.token) if restart.method else None
    settings = job.sampler.settings(end_maps=False)
    prompt_set = load_prompt_set(job.prompts)
    model = get_model(m.source, device or m.device, m.dtype, m.use_safetensors, m.build)
    check_ddim_steps(model.scheduler.config, s.steps)
    conditioning = (lambda prompts: pad_mitigated_embedding(model, prompts, restart)) if restart else None
    seeds = image_seeds(settings, s.n_images)
    items = [(p.position, p, seed) for p in prompt_set for seed in seeds]  # official: whole-set positions
    batches = [items[i:i + s.batch_size] for i in range(0, len(items), s.batch_size)]
    rows, pictures, start = [], {}, time.perf_counter()
    for batch in progress(batches, "guarded batches"):
        out = early_stop.sample_with_early_stop(model, [p.text for _, p, _ in batch], [k for _, _, k in batch],
                                                settings, rule, [i for i, _, _ in batch], decode=g.save_images,
                                                restart=conditioning)
        for j, (_, p, seed) in enumerate(batch):
            rows.append({"prompt_id": p.id, "kind": p.kind, "memorized": p.memorized, "seed": seed,
                         "signal": float(out.signal[j]), "stopped": bool(out.stopped[j]),
                         "restarted": bool(out.restarted[j]), "steps_run": int(out.steps_run[j])})
            if out.images is not None and out.images[j] is not None:
                pictures[f"images/{p.id}-seed{seed}.png"] = out.images[j].float().cpu().numpy()
    table = pd.DataFrame(rows)
    stopped_ids = sorted(set(table.prompt_id[table.stopped]))
    counts = summarise(table, settings.steps)
    return GuardResult(
        config=config, sampler_settings=sampler_record(settings, s.seed, m.dtype), n_images=s.n_images,
        **{k: v for k, v in counts.items() if not k.startswith("caught_")},
        caught_by_kind={k.removeprefix("caught_"): v for k, v in counts.items() if k.startswith("caught_")},
        model=m.name, prompt_set=prompt_set.name, calibration=str(calibration.folder),
        rule={"step": rule.step, "detector": rule.detector, "layers": calibration.config["early"]["signal"]["layers"],
              "T": rule.window, "threshold": rule.threshold, "fpr_target": float(g.fpr)},
        restart=asdict(restart) if restart else None, sampling_seconds=round(time.perf_counter() - start, 2),
        headline=counts["steps_saved_fraction"], table=table, pictures=pictures,
        texts={"stopped_ids.txt": "".join(f"{i}\n" for i in stopped_ids)})


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
