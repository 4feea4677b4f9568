"""The mitigation job as a library call: ``run_mitigation_job(spec) -> MitigationResult``.

Baseline and mitigated generations of a prompt set's memorized prompts, under every setting of every method in
``mitigation.methods`` (``method_settings``), measured for copying and utility (``benchmark.mitigation.tradeoff``);
the result holds the trade-off points with their Pareto front, the memorization rate after mitigation, the
equal-utility table of every method against the reference with bootstrap intervals, and each method's cost. The
runner (``runners/mitigate.py``) only composes the config, builds the spec, calls this and writes the result.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchmark.data.prompts import load_prompt_set, subset
from benchmark.detectors import detection
from benchmark.detectors.scores import select_layers
from benchmark.jobs.config import ConfigError, MitigateJob, check_ddim_steps
from benchmark.jobs.keys import model_key, trace_sampler_key
from benchmark.jobs.results import MitigationResult, sampler_record
from benchmark.measures.similarity import SSCD, CLIPScore
from benchmark.mitigation import neurons, tradeoff
from benchmark.mitigation.embedding import OFFICIAL_N_IMAGES
from benchmark.mitigation.interface import Mitigation, method_settings
from benchmark.models.text_to_image import get_model
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import cross_attention_layers, image_seeds
from benchmark.store.traces import TraceStore


def n_images_of(mitigation: dict) -> int:
    """Generations per prompt: ``n_images``, or when null 1 (be-bench's per-image protocol) / the official
    scripts' 4 (``protocol=official``)."""
    if mitigation.get("n_images") is not None:
        return int(mitigation["n_images"])
    return OFFICIAL_N_IMAGES if mitigation.get("protocol") == "official" else 1


@dataclass
class MitigationSpec:
    """What one mitigation job needs: the checked config (``job``) and the resolved one it came from (``config``,
    its identity), the device, and a progress wrapper for the sampling loop."""

    job: MitigateJob
    config: dict
    device: str
    progress: Callable[[Iterable], Iterable] = iter


def run_mitigation_job(spec: MitigationSpec) -> MitigationResult:
    """Run the job: every setting checked (config and model, before any sampling), the baseline and every missing
    mitigated generation sampled into the store, every generation measured. Raises ConfigError (a ValueError)
    naming the method when a setting cannot run on the model."""
    job, config = spec.job, spec.config
    m, mit = job.model, job.mitigation
    section = mit.model_dump()
    n_images = n_images_of(section)
    model = get_model(m.source, spec.device, m.dtype, m.use_safetensors, m.build)
    full = load_prompt_set(config["prompts"])
    check_ddim_steps(model.scheduler.config, job.sampler.steps)
    layers = select_layers(list(cross_attention_layers(model.unet)), list(job.layers.sets[mit.mask_layers]))
    try:  # what needs the loaded model, all before anything is sampled: a refusal is a config error (one line)
        # a method resting on a premise the family lacks is refused first (the config check knows every method)
        undefined = detection.not_defined(model, [MITIGATIONS[name] for name in mit.methods])
        if undefined:
            raise ValueError(f"mitigation.methods={sorted(undefined)} are not defined on model family "
                             f"{model.family}: " + "; ".join(sorted(set(undefined.values()))))
        if "nemo" in mit.methods and "statistics" in section["knobs"].get("nemo", {}):
            knobs = section["knobs"]["nemo"]
            knobs["statistics"] = neurons.statistics_file(
                knobs["statistics"], model, model_key(m.name, m.source), [p.text for p in full if not p.memorized],
                Path(job.paths.store_dir) / "nemo_statistics", f"{full.name}: non-memorized prompts")
        settings = method_settings(section)
        for setting in settings:  # what each setting requires of this model
            setting.check_model(model)
    except ValueError as err:  # a ConfigError too: its one line is kept
        raise ConfigError(str(err).splitlines()[0]) from None
    sim = job.similarity
    measures = tradeoff.Measures(layers, SSCD(sim.sscd, spec.device) if sim.sscd else None,
                                 CLIPScore(sim.clip_architecture, sim.clip_weights, spec.device)
                                 if sim.clip_weights else None)
    kinds = set(mit.kinds) if mit.kinds else {p.kind for p in full if p.memorized}
    chosen = [p for p in full if p.memorized and p.kind in kinds]
    if not chosen:
        raise ValueError(f"prompt set {full.name}: no memorized prompts of kind {sorted(kinds)} to mitigate")
    prompt_set = subset(full, chosen)
    sampler = job.sampler.settings(end_maps=False)
    store = TraceStore(job.paths.store_dir, job.store.dtype)
    seeds = image_seeds(sampler, n_images)
    baseline = detection.plan(prompt_set, model_key(m.name, m.source),
                              trace_sampler_key(detection.sampler_key(sampler, m.dtype), job.store.dtype), seeds,
                              by_position=sampler.seeding == "official")
    start = time.perf_counter()
    sampled = tradeoff.run_mitigation(model, baseline, sampler, store, settings, layers, job.sampler.batch_size,
                                      progress=spec.progress)
    sampling_s = time.perf_counter() - start
    rows = tradeoff.measure_all(store, baseline, settings, full.truth, measures,
                                tradeoff.mask_key_layers(model, layers))
    points = tradeoff.curves(rows)
    utility = next((u for u in tradeoff.UTILITY if u in rows), None)
    copying = [c for c in tradeoff.COPYING if c in rows]
    if utility and copying:
        points["pareto"] = tradeoff.pareto_front(points, utility, copying[0])
    reference = tradeoff.reference_method(mit.methods, mit.reference)
    equal = {name: tradeoff.at_equal_utility(rows, utility, name, reference, n_boot=mit.n_boot)
             .to_dict(orient="records") for name in copying if utility}
    rate = tradeoff.memorization_rate(rows, mit.copy_thresholds.values())
    return MitigationResult(
        config=config, sampler_settings=sampler_record(sampler, job.sampler.seed, m.dtype), n_images=n_images,
        model=m.name, family=model.family, prompt_set=full.name, n_prompts=len(prompt_set), n_generations=len(rows),
        sampled_now=sampled, sampling_seconds=round(sampling_s, 2), utility=utility,
        headline=headline(points, job.headline.method, job.headline.measure),
        settings=[s.tag for s in settings], curves=points.to_dict(orient="records"), equal_utility=equal,
        memorization_rate=rate.to_dict(orient="records"), methods=method_table(settings),
        cost=cost_table(rows), table=rows)


def method_table(settings: list[Mitigation]) -> list[dict]:
    """One record per method of the job: label, what it acts on, its strength knob and direction, its knobs."""
    out = {}
    for s in settings:
        entry = s.entry
        out.setdefault(s.method, {"method": s.method, "label": entry.label, "acts_on": entry.acts_on,
                                  "strength": entry.strength, "stronger": entry.stronger,
                                  "knobs": {k: v for k, v in s.values.items() if k != entry.strength}})
    return list(out.values())


def cost_table(rows: pd.DataFrame) -> list[dict]:
    """Per method and strength: the mean extra UNet evaluations per image beyond plain sampling's 2 x steps."""
    table = rows.groupby(["method", "strength"], dropna=False, sort=True).extra_unet_evals.mean().reset_index()
    return table.to_dict(orient="records")


def headline(points: pd.DataFrame, method: str, measure: str) -> float:
    """The mean ``measure`` of ``method`` at its strongest setting, over every kind: the lowest strength where
    lower is stronger (Wen's target loss), the highest where higher is (a masked fraction); a method without a
    strength: its one setting."""
    part = points[points.method == method]
    if part.empty or measure not in part:
        return math.nan
    stronger = MITIGATIONS[method].stronger if method in MITIGATIONS else None
    if stronger is not None and part.strength.notna().any():
        strongest = part.strength.min() if stronger == "lower" else part.strength.max()
        part = part[part.strength == strongest]
    return float(part[measure].mean())
