"""In-loop early stopping: a generation whose bright ending shows at step k is stopped there (or restarted under a
mitigation), and the rest of its denoising steps are never computed.

``early.early_stopping`` simulates the decision from stored traces and calibrates its threshold; this module takes
that threshold into the sampling loop. At the rule's 0-based step k the sampler computes each image's signal from
what it has so far, by the detector's registered function on the step-k view of the traces, as the simulation does
(``step_detection.step_view``): e.g. BE intensity, the mean of the BE mask made from step k's end-token maps (Chen
et al., ICLR 2025, Sec. 4), or LD, Wen's magnitude over the first min(T, k + 1) steps weighted by that mask. Images
whose signal crosses the threshold (``> threshold`` for a detector where higher = memorized) leave the batch; the
others go on to the last step. Images never affect each other (an image's initial noise depends on its seed, and
under official seeding its prompt index, alone; each prompt is encoded alone), so the decisions are those of the
simulation on the same (prompt, seed) pairs; ``early.calibrate`` puts the threshold halfway between calibration
scores, so the float noise of recomputing a score in another batch or precision (about 1e-6 relative; 1e-3 for a
float16 store) does not move a calibration generation across it.

The decision needs one device-to-host copy at step k (the maps and the magnitudes so far); nothing else leaves the
device before the last step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from benchmark.detectors import scores
from benchmark.early.step_detection import early_detector_names, step_signal, step_view
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import DETECTORS, load_plugins
from benchmark.sampling.capture import (
    Recording,
    SamplerSettings,
    capture,
    cross_attention_layers,
    ddim_cfg_step,
    prepare_sampling,
    prompts_per_image,
    sample_with_capture,
    to_host,
)
from benchmark.store.job_folder import Job


@dataclass(frozen=True)
class StopRule:
    """Stop at 0-based step ``step`` every image whose ``detector`` score (one of the early detectors,
    ``step_detection.early_detectors``: e.g. BE_intensity, or LD over the first min(T, step + 1) steps, both on the
    BE mask of ``layers``) crosses ``threshold``, in the detector's own units (a detection job's ``early_stopping``
    table holds it, :func:`rule_from_job`). Raises ValueError for another detector or a bad step, T or layers."""

    step: int
    detector: str
    layers: tuple[str, ...]
    T: int
    threshold: float

    def __post_init__(self):
        if self.detector not in early_detector_names():
            raise ValueError(f"stopping signal {self.detector!r} is not one of {', '.join(early_detector_names())}")
        if self.step < 0 or self.T < 1 or not self.layers:
            raise ValueError(f"stop rule needs step >= 0, T >= 1 and layers (got step={self.step}, T={self.T}, "
                             f"layers={list(self.layers)})")

    @property
    def window(self) -> int:
        """The detector's window at the stop step (0 for one without a window): only steps 0..k exist there."""
        return min(self.T, self.step + 1) if DETECTORS[self.detector].uses_T else 0

    def signal(self, delta_sq: np.ndarray, end_maps: dict[str, np.ndarray]) -> np.ndarray:
        """(n,) scores from ``delta_sq`` (n, >= step + 1 steps, h, w) and step k's end-token maps (layer -> (n, h_l,
        w_l)), by the detector's registered function on the step-k view, as ``early.score_by_step`` scores it."""
        return step_signal(self.detector, step_view(delta_sq, end_maps, self.step), list(self.layers), self.window)

    def stops(self, signal: np.ndarray) -> np.ndarray:
        """(n,) bool: the scores that cross the threshold toward "memorized"."""
        signal = np.asarray(signal, dtype=float)
        return signal > self.threshold if DETECTORS[self.detector].higher_is_memorized else signal < self.threshold


def rule_from_job(job: Job, step: int, fpr: float) -> StopRule:
    """The stop rule a finished detection job calibrated: its ``early.signal`` (detector, layer set, T), the layer
    set's layers, and the threshold of its ``early_stopping`` row at (``step``, ``fpr``).

    The calibration job's ``plugins`` are imported, so a plug-in's detector can be its signal. Raises ValueError
    naming what is missing: not a finished detection job, no early stopping there (its sampler recorded no
    ``end_map_steps``), no row at that step or target FPR (the error lists those it has), or a plug-in that cannot
    be imported."""
    if job.task != "detect" or not job.finished:
        raise ValueError(f"{job.folder} is not a finished detection job (task {job.task!r})")
    rows = job.metrics.get("early_stopping")
    if not rows:
        raise ValueError(f"detection job {job.folder} has no early_stopping table: run it with "
                         "sampler.end_map_steps set (conf/sampler/testbed.yaml)")
    match = [r for r in rows if int(r["step"]) == step and np.isclose(float(r["fpr_target"]), fpr)]
    if not match:
        have = sorted({(int(r["step"]), float(r["fpr_target"])) for r in rows})
        raise ValueError(f"detection job {job.folder} calibrated no threshold at step {step}, FPR {fpr:g}; it has "
                         f"(step, FPR) {have}")
    signal = job.config["early"]["signal"]
    layers = job.config["layers"]["sets"][signal["layers"]]
    load_plugins(job.config.get("plugins") or [])  # a plug-in's detector as the signal: the calibration job's own
    # T None (every step so far) is the whole run's steps: min(T, k + 1) is then k + 1 at every step k
    T = job.config["sampler"]["steps"] if signal.get("T") is None else int(signal["T"])
    return StopRule(step, signal["detector"], tuple(layers), T, float(match[0]["threshold"]))


@dataclass
class EarlyStopBatch:
    """What a guarded sampling call returns, one row per image.

    ``signal`` (n,) the rule's score at its step; ``stopped`` (n,) bool; ``restarted`` (n,) bool: stopped and then
    sampled again from the same initial noise under the replacement conditioning; ``steps_run`` (n,) denoising
    steps computed (k + 1 for a stopped image, k + 1 + steps for a restarted one); ``latents`` (n, c, h, w): the
    final latents, and for a stopped image that was not restarted those after step k; ``images``: per image
    (3, H, W) in [0, 1] when decoded, None for a stopped image that was not restarted."""

    signal: np.ndarray
    stopped: np.ndarray
    restarted: np.ndarray
    steps_run: np.ndarray
    latents: torch.Tensor
    images: list[torch.Tensor | None] | None


@torch.no_grad()
def sample_with_early_stop(model: TextToImage, prompt: str | Sequence[str], seeds: list[int], settings: SamplerSettings,
                           rule: StopRule, prompt_index: int | Sequence[int] | None = None, decode: bool = True,
                           restart: Callable[[list[str]], torch.Tensor] | None = None) -> EarlyStopBatch:
    """Sample ``len(seeds)`` images (``prompt``: one for all, or one per seed; ``prompt_index`` as in
    ``capture.initial_noise``), stopping at ``rule.step`` those whose signal crosses the threshold.

    ``restart``: maps the stopped images' prompts to a conditioning (m, tokens, dim), e.g. a padding mitigation's
    embedding (``pad_mitigation.pad_mitigated_embedding``); those images are then sampled again from their own
    initial noise with it, to the last step and without a stop rule. Raises ValueError when the prompts do not
    match the seeds, the rule's step is not before the last step, or its layers are not the model's."""
    n = len(seeds)
    prompts = prompts_per_image(prompt, n)
    if not 0 <= rule.step < settings.steps - 1:
        raise ValueError(f"stop step {rule.step} must be before the last of {settings.steps} steps (0-based)")
    scores.select_layers(list(cross_attention_layers(model.unet)), list(rule.layers))  # raises on an unknown layer
    device = model.device
    setup = prepare_sampling(model, prompts, seeds, settings, prompt_index=prompt_index)
    cond, uncond, latents, generators = setup.cond, setup.uncond, setup.latents, setup.generators
    steps, timesteps = setup.steps, setup.timesteps
    rec = Recording(n, setup.end_index.to(device), tuple(latents.shape[-2:]), frozenset({rule.step}), rule.step)
    context = setup.context
    delta_sq = []
    with capture(model.unet, rec):
        for i in range(rule.step + 1):
            rec.start_step(i)
            latents, delta = ddim_cfg_step(model, latents, steps[i], timesteps[i], context, settings,
                                           generators)
            delta_sq.append(delta.float().pow(2).sum(1))
    maps = rec.end_maps[rule.step]
    host = to_host([torch.stack(delta_sq, 1), *maps.values()])  # the one copy the decision needs
    signal = rule.signal(host[0].numpy(), {layer: m.numpy() for layer, m in zip(maps, host[1:])})
    stopped = rule.stops(signal)
    go = torch.from_numpy(np.flatnonzero(~stopped)).to(device)
    if len(go):
        part, part_context = latents[go], torch.cat([uncond[go], cond[go]])
        # each image keeps its own step-noise generator: leaving the batch changes no other image's noise
        part_generators = None if generators is None else [generators[j] for j in go.tolist()]
        for i in range(rule.step + 1, len(steps)):
            part, _ = ddim_cfg_step(model, part, steps[i], timesteps[i], part_context, settings, part_generators)
        latents[go] = part
    steps_run = np.where(stopped, rule.step + 1, len(steps))
    restarted = np.zeros(n, dtype=bool)
    if restart is not None and stopped.any():
        again = np.flatnonzero(stopped)
        replacement = restart([prompts[i] for i in again])
        indices = None if prompt_index is None or isinstance(prompt_index, int) else [prompt_index[i] for i in again]
        latents[torch.from_numpy(again).to(device)] = sample_with_capture(
            model, [prompts[i] for i in again], [seeds[i] for i in again], settings, record=False, cond=replacement,
            prompt_index=prompt_index if indices is None else indices)
        restarted[again] = True
        steps_run[again] += len(steps)
    images = None
    if decode:
        done = np.flatnonzero(~stopped | restarted)
        decoded = model.to_images(latents[torch.from_numpy(done).to(device)]) if len(done) else []
        images = [None] * n
        for row, image in zip(done, decoded):
            images[row] = image
    return EarlyStopBatch(signal, stopped, restarted, steps_run, latents.cpu(), images)
