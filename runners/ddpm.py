"""DDPM job: train (when asked and missing) or load an unconditional DDPM, sample into the store, and measure
memorization against its training set."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from benchmark.ddpm.models import DDPMSampler, generate_ddpm, load_ddpm, to_rgb
from benchmark.ddpm.train import (
    DDPMArchitecture,
    DDPMData,
    DDPMSpec,
    DDPMTraining,
    load_images,
    read_training_set,
    train_ddpm,
)
from benchmark.jobs.config import check_job
from benchmark.localization import copying
from benchmark.sampling.missing import sampler_key
from benchmark.store import job_folder as jobfolder
from benchmark.store.traces import TraceKey, TraceStore, to_png
from runners.common import CONF, job_device, job_tracker, model_key, run_job, trace_sampler_key


def spec_of(m: DictConfig) -> DDPMSpec:
    raw = OmegaConf.to_container(m, resolve=True)
    arch = dict(raw["architecture"], block_out_channels=tuple(raw["architecture"]["block_out_channels"]))
    return DDPMSpec(DDPMData(**raw["data"]), DDPMArchitecture(**arch), DDPMTraining(**raw["training"]))


def run(cfg: DictConfig, folder: Path, device: str = "cpu") -> float:
    m, s, ms = cfg.ddpm_model, cfg.sampler, cfg.measure
    config = OmegaConf.to_container(cfg, resolve=True)
    check_job(config)  # every setting, before any training or sampling
    jobfolder.write_config(folder, config)
    tracker = job_tracker(cfg, folder)
    try:
        settings = DDPMSampler(s.steps, s.sampler, s.eta)
        if "data" in m:  # before any training too
            check_resolution(int(m.data.resolution), ms)
        if m.train and not (Path(m.source) / "model_index.json").exists():
            train_ddpm(spec_of(m), m.source)
        model = load_ddpm(m.source, m.use_safetensors, device)
        if m.training_data:
            training, duplicated = load_images(m.training_data, model.image_shape[-1]), None
        else:
            training, duplicated = read_training_set(m.source)
        check_training_set(training, model.image_shape[-1], ms)
        key = TraceKey(model_key(m), trace_sampler_key(sampler_key(settings), cfg.store.dtype), "unconditional",
                       "samples", "")
        store = TraceStore(cfg.paths.store_dir, cfg.store.dtype)
        start = time.perf_counter()
        sampled = generate_ddpm(model, key, [s.seed + k for k in range(s.n_images)], settings, store, s.batch_size)
        sampling_s = time.perf_counter() - start
        seeds = [s.seed + k for k in range(s.n_images)]
        images = np.stack([store.read_image(key, seed).transpose(2, 0, 1) for seed in seeds])
        training = to_rgb(training)
        masks = copying.copy_masks(images, training, ms.patch, ms.patch_ratio_below)
        table = copying.memorization_table(images, training, masks, duplicated, ms.grid, ms.carlini_n, ms.copy_below)
        table.insert(0, "seed", seeds)
        data = OmegaConf.to_container(m.data, resolve=True) if "data" in m else {}
        summary = {"task": "ddpm", "model": m.name, "sampler": sampler_key(settings), "n_train": data.get("n_train"),
                   "duplicated": data.get("duplicated"), "copies": data.get("copies"),
                   "n_training_images": len(training), "n_generations": len(table),
                   "sampled_now": sampled, "sampling_seconds": round(sampling_s, 2),
                   "copy_rate": float(table.is_copy.mean()), "nn_ratio_median": float(table.nn_ratio.median()),
                   "carlini_median": float(table.carlini.median()),
                   "copied_fraction_mean": float(table.copied_fraction.mean())}
        if duplicated is not None:
            summary["duplicated_share_of_training"] = float(np.mean(duplicated))
            summary["copies_of_duplicated"] = (float(table[table.is_copy].nearest_duplicated.mean())
                                               if table.is_copy.any() else None)
        summary["headline"] = summary["copy_rate"]
        to_png(copying.copy_gallery(images, training, table, masks).transpose(2, 0, 1)).save(folder / "copies.png")
        table_name = jobfolder.TABLES["ddpm"]
        jobfolder.write_results(folder, "ddpm", config, {**asdict(settings), "seed": s.seed}, s.n_images, summary,
                                {table_name: table})
        tracker.save(folder / "metrics.json", folder / table_name)
        tracker.log({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                    images={"copies": folder / "copies.png"}, generations=table)
        print(json.dumps(summary, indent=1))
        print(f"results in {folder}")
        return summary["headline"]
    finally:
        tracker.finish()


def check_training_set(training, resolution: int, ms: DictConfig) -> None:
    """The copy measures need at least 2 training images, and tiles that split the image (Carlini's grid)."""
    if len(training) < 2:
        raise ValueError(f"the copy measures need at least 2 training images, the training set has {len(training)}")
    check_resolution(resolution, ms)


def check_resolution(resolution: int, ms: DictConfig) -> None:
    if resolution % ms.grid:
        raise ValueError(f"measure.grid={ms.grid} does not split {resolution}x{resolution} images into tiles")
    if ms.patch > resolution:
        raise ValueError(f"measure.patch={ms.patch} is larger than the {resolution}-pixel images")


@hydra.main(version_base="1.3", config_path=CONF, config_name="ddpm")
def main(cfg: DictConfig) -> float:
    return run_job(lambda c, folder: run(c, folder, job_device(c.device)), cfg)


if __name__ == "__main__":
    main()
