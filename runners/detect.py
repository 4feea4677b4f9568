"""Detection job: sample missing traces, score every detector on the layer x T grid, write the job folder."""
from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from benchmark import detection, localization
from benchmark.capture import SamplerSettings
from benchmark.models import get_model
from benchmark.prompts import load_prompt_set
from benchmark.traces import TraceStore, to_png
from reports.job import write_job_report
from runners.common import CONF, job_device, job_tracker, model_key, run_job


def run(cfg: DictConfig, folder: Path, device: str | None = None) -> float:
    """The job itself, callable with a composed config (tests do)."""
    m, s = cfg.model, cfg.sampler
    device = device or m.device
    folder.mkdir(parents=True, exist_ok=True)
    tracker = job_tracker(cfg, folder)
    try:
        model = get_model(m.source, device, m.dtype, m.use_safetensors, m.build)
        if cfg.capture.get("compile", False):
            model.unet.compile()
        layer_sets = {k: list(v) for k, v in cfg.layers.sets.items()}
        detection.check_grid(model, layer_sets, list(cfg.score.T), s.steps)
        prompt_set = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
        settings = SamplerSettings(s.steps, s.guidance, s.height, s.width, s.eta, tuple(s.get("end_map_steps", ())))
        store = TraceStore(cfg.paths.store_dir, cfg.store.dtype)
        seeds = [s.seed + k for k in range(s.n_images)]
        plan = detection.plan(prompt_set, model_key(m), detection.sampler_key(settings, m.dtype), seeds)
        start = time.perf_counter()
        sampled = detection.generate(model, plan, settings, store, s.batch_size,
                                     progress=lambda it: tqdm(it, desc="prompts", disable=None),
                                     token_maps=cfg.capture.token_maps)
        sampling_s = time.perf_counter() - start
        arrays = detection.load(store, plan)
        scores = detection.score_grid(arrays, layer_sets, list(cfg.score.T))
        metrics = detection.detection_table(scores, cfg.score.n_boot)
        summary = {"model": m.name, "prompt_set": prompt_set.name, "n_prompts": len(prompt_set),
                   "n_generations": len(arrays.rows), "sampled_now": sampled,
                   "sampling_seconds": round(sampling_s, 2), "scoring_seconds": round(time.perf_counter() - start
                                                                                      - sampling_s, 2)}
        if prompt_set.truth:
            images = [store.read_image(g.key, seed).transpose(2, 0, 1) for g in plan for seed in g.seeds]
            rows = arrays.rows
            tables = localization.evaluate(arrays.end_maps, images, list(rows.prompt_id), list(rows.kind),
                                           prompt_set.truth, layer_sets, cfg.localization.rule)
            summary |= localization.summarise(tables)
            tokens = localization.token_table(arrays.token_maps, arrays.end_index, list(rows.prompt_id),
                                              prompt_set.truth, next(iter(layer_sets.values())))
            summary["token_localization"] = tokens.to_dict(orient="records")
            gallery = localization.gallery(arrays.end_maps, list(rows.prompt_id), images, prompt_set.truth,
                                           next(iter(layer_sets.values())))
            if gallery is not None:
                to_png(gallery.transpose(2, 0, 1)).save(folder / "masks.png")
        summary["headline"] = value = detection.headline(metrics, **cfg.score.headline)
        detection.write_results(folder, summary, metrics, scores)
        report = write_job_report(folder)
        tracker.save(folder / "metrics.json", folder / "generations.csv", folder / "masks.png")
        tracker.log({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                    images={"masks": folder / "masks.png"}, metrics=metrics, generations=scores)
        print(report.read_text())
        print(f"{cfg.score.headline.detector} AUC ({cfg.score.headline.subset}, {cfg.score.headline.level}): "
              f"{value:.3f} | {sampled} images sampled now, results in {folder}")
        return value
    finally:
        tracker.finish()


@hydra.main(version_base="1.3", config_path=CONF, config_name="detect")
def main(cfg: DictConfig) -> float:
    return run_job(lambda c, folder: run(c, folder, job_device(c.model.device)), cfg)


if __name__ == "__main__":
    main()
