"""The unconditional DDPM job: train (when asked and missing) or load a DDPM, sample into the store, measure
memorization against its training set; one call, one :class:`DDPMResult`."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

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
from benchmark.jobs.config import CopyMeasures, DDPMJob
from benchmark.jobs.keys import model_key, trace_sampler_key
from benchmark.jobs.results import DDPMResult, sampler_record
from benchmark.localization import copying
from benchmark.sampling.missing import sampler_key
from benchmark.store.traces import TraceKey, TraceStore


def recipe(ddpm_model: dict) -> DDPMSpec:
    """The training recipe of a resolved ``ddpm_model`` config (its ``data``, ``architecture``, ``training``)."""
    arch = dict(ddpm_model["architecture"], block_out_channels=tuple(ddpm_model["architecture"]["block_out_channels"]))
    return DDPMSpec(DDPMData(**ddpm_model["data"]), DDPMArchitecture(**arch), DDPMTraining(**ddpm_model["training"]))


def run_ddpm(job: DDPMJob, device: str = "cpu") -> DDPMResult:
    """The DDPM job of a checked config on ``device``: ``ddpm_model.train`` trains the recipe into
    ``ddpm_model.source`` when no model is there; ``sampler.n_images`` images (seeds ``sampler.seed`` + k) missing
    from the store are sampled; each is compared with the training set (``ddpm_model.training_data``, else the
    model folder's own) by ``copying.memorization_table`` with ``measure``'s settings. Nothing is written but the
    store (and a trained model): the caller writes the result.

    Raises ValueError before any training when the images are not split by ``measure.grid`` or are smaller than
    ``measure.patch``, and before sampling when the training set has fewer than 2 images."""
    m, s, ms = job.ddpm_model, job.sampler, job.measure
    raw = job.resolved["ddpm_model"]
    settings = DDPMSampler(s.steps, s.sampler, s.eta)
    if m.data is not None:  # before any training too
        check_resolution(int(m.data.resolution), ms)
    if m.train and not (Path(m.source) / "model_index.json").exists():
        train_ddpm(recipe(raw), m.source)
    model = load_ddpm(m.source, m.use_safetensors, device)
    if m.training_data:
        training, duplicated = load_images(m.training_data, model.image_shape[-1]), None
    else:
        training, duplicated = read_training_set(m.source)
    check_training_set(training, model.image_shape[-1], ms)
    key = TraceKey(model_key(m.name, m.source), trace_sampler_key(sampler_key(settings), job.store.dtype),
                   "unconditional", "samples", "")
    store = TraceStore(job.paths.store_dir, job.store.dtype)
    seeds = [s.seed + k for k in range(s.n_images)]
    start = time.perf_counter()
    sampled = generate_ddpm(model, key, seeds, settings, store, s.batch_size)
    sampling_s = time.perf_counter() - start
    images = np.stack([store.read_image(key, seed).transpose(2, 0, 1) for seed in seeds])
    training = to_rgb(training)
    masks = copying.copy_masks(images, training, ms.patch, ms.patch_ratio_below)
    table = copying.memorization_table(images, training, masks, duplicated, ms.grid, ms.carlini_n, ms.copy_below)
    table.insert(0, "seed", seeds)
    data = raw.get("data") or {}
    labelled = {}
    if duplicated is not None:
        labelled = {"duplicated_share_of_training": float(np.mean(duplicated)),
                    "copies_of_duplicated": (float(table[table.is_copy].nearest_duplicated.mean())
                                             if table.is_copy.any() else None)}
    copy_rate = float(table.is_copy.mean())
    return DDPMResult(
        config=job.resolved, sampler_settings=sampler_record(settings, s.seed), n_images=s.n_images,
        model=m.name, sampler=sampler_key(settings), n_train=data.get("n_train"), duplicated=data.get("duplicated"),
        copies=data.get("copies"), n_training_images=len(training), n_generations=len(table), sampled_now=sampled,
        sampling_seconds=round(sampling_s, 2), copy_rate=copy_rate, nn_ratio_median=float(table.nn_ratio.median()),
        carlini_median=float(table.carlini.median()), copied_fraction_mean=float(table.copied_fraction.mean()),
        **labelled, headline=copy_rate, table=table,
        pictures={"copies.png": copying.copy_gallery(images, training, table, masks).transpose(2, 0, 1)})


def check_training_set(training, resolution: int, ms: CopyMeasures) -> None:
    """The copy measures need at least 2 training images, and tiles that split the image (Carlini's grid)."""
    if len(training) < 2:
        raise ValueError(f"the copy measures need at least 2 training images, the training set has {len(training)}")
    check_resolution(resolution, ms)


def check_resolution(resolution: int, ms: CopyMeasures) -> None:
    """Raise ValueError when ``measure.grid`` does not split ``resolution`` or ``measure.patch`` exceeds it."""
    if resolution % ms.grid:
        raise ValueError(f"measure.grid={ms.grid} does not split {resolution}x{resolution} images into tiles")
    if ms.patch > resolution:
        raise ValueError(f"measure.patch={ms.patch} is larger than the {resolution}-pixel images")
