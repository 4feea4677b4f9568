"""Mitigation job: baseline and mitigated generations of memorized prompts, their similarity and utility."""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from benchmark.data.prompts import load_prompt_set, subset
from benchmark.detectors import detection
from benchmark.detectors.scores import select_layers
from benchmark.jobs.config import check_ddim_steps, check_job
from benchmark.measures.similarity import SSCD, CLIPScore
from benchmark.mitigation import tradeoff
from benchmark.mitigation.embedding import OFFICIAL_N_IMAGES, MitigationSettings
from benchmark.mitigation.padding import pad_settings
from benchmark.models.text_to_image import get_model
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import cross_attention_layers, image_seeds
from benchmark.store import job_folder as jobfolder
from benchmark.store.traces import TraceStore
from reports.job import write_job_report
from reports.summary import job_summary
from runners.common import CONF, job_device, job_tracker, model_key, progress_bar, run_job, trace_sampler_key


def run(cfg: DictConfig, folder: Path, device: str | None = None) -> float:
    m, s, mit = cfg.model, cfg.sampler, cfg.mitigation
    device = device or m.device
    config = OmegaConf.to_container(cfg, resolve=True)
    job = check_job(config)  # every setting, before any model is loaded
    jobfolder.write_config(folder, config)
    tracker = job_tracker(cfg, folder)
    try:
        # the registry says which methods optimise the embedding (a target loss each) and which change it directly
        direct = [m for m in mit.methods if m in MITIGATIONS and not MITIGATIONS[m].optimised]
        settings = [MitigationSettings(method, float(target), mit.lr, mit.max_iters, mit.mask_norm, mit.protocol)
                    for method in mit.methods if method not in direct for target in mit.target_losses]
        settings += pad_settings(direct, mit.pad_fractions, mit.pad_replacement)
        # n_images null: 1 per prompt for be-bench's protocol, the official scripts' 4 for theirs
        n_images = mit.n_images if mit.n_images is not None else OFFICIAL_N_IMAGES if mit.protocol == "official" else 1
        model = get_model(m.source, device, m.dtype, m.use_safetensors, m.build)
        check_ddim_steps(model.scheduler.config, s.steps)
        layers = select_layers(list(cross_attention_layers(model.unet)), list(cfg.layers.sets[mit.mask_layers]))
        sim = cfg.similarity
        measures = tradeoff.Measures(layers, SSCD(sim.sscd, device) if sim.sscd else None,
                                     CLIPScore(sim.clip_architecture, sim.clip_weights, device)
                                     if sim.clip_weights else None)
        full = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
        kinds = set(mit.kinds) if mit.kinds else {p.kind for p in full if p.memorized}
        chosen = [p for p in full if p.memorized and p.kind in kinds]
        if not chosen:
            raise ValueError(f"prompt set {full.name}: no memorized prompts of kind {sorted(kinds)} to mitigate")
        prompt_set = subset(full, chosen)
        sampler = job.sampler.settings(end_maps=False)
        store = TraceStore(cfg.paths.store_dir, cfg.store.dtype)
        seeds = image_seeds(sampler, n_images)
        baseline = detection.plan(prompt_set, model_key(m),
                                  trace_sampler_key(detection.sampler_key(sampler, m.dtype), cfg.store.dtype),
                                  seeds, by_position=sampler.seeding == "official")
        start = time.perf_counter()
        sampled = tradeoff.run_mitigation(model, baseline, sampler, store, settings, layers, s.batch_size,
                                          progress=lambda it: progress_bar(it, "prompts"))
        sampling_s = time.perf_counter() - start
        rows = tradeoff.measure_all(store, baseline, settings, full.truth, measures,
                                    tradeoff.mask_key_layers(model, layers))
        points = tradeoff.curves(rows)
        utility = "CLIP" if "CLIP" in rows else "caption_rmse" if "caption_rmse" in rows else None
        equal = {sim_name: tradeoff.at_equal_utility(points, utility, sim_name).to_dict(orient="records")
                 for sim_name in ("SSCD", "S", "LS", "train_rmse") if utility and sim_name in rows}
        value = headline(points, **cfg.headline)
        summary = {"task": "mitigate", "model": m.name, "prompt_set": full.name, "n_prompts": len(prompt_set),
                   "n_generations": len(rows), "sampled_now": sampled, "sampling_seconds": round(sampling_s, 2),
                   "utility": utility, "headline": value, "settings": [setting.tag for setting in settings],
                   "curves": points.to_dict(orient="records"), "equal_utility": equal}
        jobfolder.write_results(folder, "mitigate", config, {**asdict(sampler), "seed": s.seed, "dtype": m.dtype},
                                n_images, summary, {jobfolder.TABLES["mitigate"]: rows})
        write_job_report(folder)
        tracker.save(folder / "metrics.json", folder / "mitigation.csv")
        tracker.log({k: v for k, v in summary.items() if isinstance(v, (int, float))}, generations=rows)
        print(job_summary(folder))
        return value
    finally:
        tracker.finish()


def headline(points, method: str, measure: str) -> float:
    """The mean ``measure`` of ``method`` at its strongest setting, over every kind: the lowest target loss of an
    optimised mitigation, the highest masked fraction of a padding one (``target_loss`` column)."""
    part = points[points.method == method]
    if part.empty or measure not in part:
        return math.nan
    strongest = part.target_loss.min() if MITIGATIONS[method].optimised else part.target_loss.max()
    return float(part[part.target_loss == strongest][measure].mean())


@hydra.main(version_base="1.3", config_path=CONF, config_name="mitigate")
def main(cfg: DictConfig) -> float:
    return run_job(lambda c, folder: run(c, folder, job_device(c.model.device)), cfg)


if __name__ == "__main__":
    main()
