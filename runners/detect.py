"""Detection job: sample missing traces, score every detector on the layer x T grid, write the job folder."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from benchmark.data.prompts import PromptSet, load_prompt_set
from benchmark.detectors import detection
from benchmark.detectors import extra_passes as extras
from benchmark.early import step_detection as early
from benchmark.jobs.config import check_ddim_steps, check_job
from benchmark.localization import evaluation as localization
from benchmark.models.text_to_image import get_model
from benchmark.sampling.capture import image_seeds
from benchmark.store import job_folder as jobfolder
from benchmark.store.traces import TraceStore, to_png
from reports.job import write_job_report
from reports.summary import job_summary
from runners.common import CONF, job_device, job_tracker, model_key, progress_bar, run_job, trace_sampler_key


def run(cfg: DictConfig, folder: Path, device: str | None = None) -> float:
    """The job itself, callable with a composed config (tests do)."""
    m, s = cfg.model, cfg.sampler
    device = device or m.device
    config = OmegaConf.to_container(cfg, resolve=True)
    job = check_job(config)
    jobfolder.write_config(folder, config)
    tracker = job_tracker(cfg, folder)
    try:
        layer_sets = {k: list(v) for k, v in cfg.layers.sets.items()}
        model = get_model(m.source, device, m.dtype, m.use_safetensors, m.build)
        check_ddim_steps(model.scheduler.config, s.steps)
        if cfg.capture.get("compile", False):
            model.unet.compile()
        detection.check_grid(model, layer_sets, list(cfg.score.T), s.steps)
        prompt_set = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
        check_labels(prompt_set, cfg.score.headline.subset)
        settings = job.sampler.settings()
        extra = job.extra_requests()
        extras.check_detector(cfg.score.headline.detector, extra)
        store = TraceStore(cfg.paths.store_dir, cfg.store.dtype)
        seeds = image_seeds(settings, s.n_images)
        plan = detection.plan(prompt_set, model_key(m),
                              trace_sampler_key(detection.sampler_key(settings, m.dtype), cfg.store.dtype),
                              seeds, by_position=settings.seeding == "official")
        start = time.perf_counter()
        sampled = detection.generate(model, plan, settings, store, s.batch_size,
                                     progress=progress_bar("prompts"),
                                     token_maps=cfg.capture.token_maps)
        extra_start = time.perf_counter()
        extra_now = extras.compute_missing(model, plan, settings, store, extra, s.batch_size,
                                           progress=progress_bar("extra passes"))
        sampling_s, extra_s = time.perf_counter() - start, time.perf_counter() - extra_start
        arrays = detection.load(store, plan, extra).score_units(cfg.score.score_difference_units, model.scheduler,
                                                                s.steps)
        scores = detection.score_grid(arrays, layer_sets, list(cfg.score.T))
        metrics = detection.detection_table(scores, cfg.score.n_boot)
        summary = {"model": m.name, "prompt_set": prompt_set.name, "n_prompts": len(prompt_set),
                   "n_generations": len(arrays.rows), "sampled_now": sampled, "extra_computed_now": extra_now,
                   "extra_seconds": round(extra_s, 2),  # part of sampling_seconds
                   "extra": {r.name: {**r.knobs, "n": r.n, "hash": r.digest} for r in extra},
                   "sampling_seconds": round(sampling_s, 2), "scoring_seconds": round(time.perf_counter() - start
                                                                                      - sampling_s, 2)}
        if prompt_set.truth:
            images = [store.read_image(g.key, seed).transpose(2, 0, 1) for g in plan for seed in g.seeds]
            rows = arrays.rows
            tables = localization.evaluate(arrays.end_maps, images, list(rows.prompt_id), list(rows.kind),
                                           prompt_set.truth, layer_sets, cfg.localization.rule,
                                           localization.localizer_maps(arrays))
            summary |= localization.summarise(tables)
            tokens = localization.token_table(arrays.token_maps, arrays.end_index, list(rows.prompt_id),
                                              prompt_set.truth, next(iter(layer_sets.values())))
            summary["token_localization"] = tokens.to_dict(orient="records")
            # the headline layer set's masks (the first set where the headline detector reads none)
            shown = layer_sets.get(cfg.score.headline.layers, next(iter(layer_sets.values())))
            gallery = localization.gallery(arrays.end_maps, list(rows.prompt_id), images, prompt_set.truth, shown)
            if gallery is not None:
                to_png(gallery.transpose(2, 0, 1)).save(folder / "masks.png")
        summary |= early.job_results(store, plan, arrays, list(settings.end_map_steps), s.steps, layer_sets,
                                     dict(cfg.early.signal), list(cfg.early.fpr), cfg.early.n_boot, prompt_set.truth,
                                     cfg.localization.rule)
        summary["headline"] = value = detection.headline(metrics, **cfg.score.headline)
        summary["metrics"] = metrics.to_dict(orient="records")
        jobfolder.write_results(folder, "detect", config, {**asdict(settings), "seed": s.seed, "dtype": m.dtype},
                                s.n_images, summary, {jobfolder.TABLES["detect"]: scores})
        write_job_report(folder)
        tracker.save(folder / "metrics.json", folder / "generations.csv", folder / "masks.png")
        tracker.log({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                    images={"masks": folder / "masks.png"}, metrics=metrics, generations=scores)
        print(job_summary(folder))
        return value
    finally:
        tracker.finish()


def check_labels(prompt_set: PromptSet, headline_subset: str) -> None:
    """Detection metrics need memorized and non-memorized prompts, and the headline's subset among them: checked
    before the first image is sampled, not after."""
    memorized = sum(p.memorized for p in prompt_set)
    if memorized in (0, len(prompt_set)):
        has = "memorized" if memorized else "non-memorized"
        raise ValueError(f"prompt set {prompt_set.name!r} ({len(prompt_set)} prompts) has only {has} prompts: "
                         "detection needs both positives and negatives (add a set, e.g. a union)")
    subsets = detection.subsets(p.kind for p in prompt_set)
    if headline_subset not in subsets:
        raise ValueError(f"score.headline.subset {headline_subset!r} is not among prompt set "
                         f"{prompt_set.name!r}'s subsets: {', '.join(subsets)}")


@hydra.main(version_base="1.3", config_path=CONF, config_name="detect")
def main(cfg: DictConfig) -> float:
    return run_job(lambda c, folder: run(c, folder, job_device(c.model.device)), cfg)


if __name__ == "__main__":
    main()
