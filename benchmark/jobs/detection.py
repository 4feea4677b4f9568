"""The detection job: sample missing traces, score every detector on the layer x T grid, localize against the
ground truth where the prompt set has it, and score the early steps; one call, one :class:`DetectionResult`."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from benchmark.data.prompts import PromptSet, load_prompt_set
from benchmark.detectors import detection
from benchmark.detectors import extra_passes as extras
from benchmark.early import step_detection as early
from benchmark.jobs.config import DetectJob, check_ddim_steps
from benchmark.jobs.keys import model_key, trace_sampler_key
from benchmark.jobs.results import DetectionResult, sampler_record
from benchmark.localization import evaluation as localization
from benchmark.models.text_to_image import get_model
from benchmark.sampling.capture import image_seeds
from benchmark.store.traces import TraceStore

Progress = Callable[[Iterable, str], Iterable]  # wraps an iteration (batches) with a progress bar named by its text


def no_progress(items: Iterable, desc: str) -> Iterable:
    return items


def run_detection(job: DetectJob, device: str | None = None, progress: Progress = no_progress) -> DetectionResult:
    """The detection job of a checked config (``benchmark.jobs.config.check_job``), on ``device`` (default
    ``model.device``): traces missing from ``paths.store_dir`` are sampled (and the extra passes of
    ``extra.passes`` computed), every registered detector is scored on ``layers.sets`` x ``score.T``, its metrics
    computed (``detection.detection_table``, ``score.n_boot`` bootstrap replicates); with ground-truth masks, the
    localization tables and the mask gallery; with ``sampler.end_map_steps``, early-step detection and simulated
    early stopping (``early.job_results``). Nothing is written but the store: the caller writes the result.

    Raises ValueError before any sampling on a layer name the model lacks, a window outside the steps, a prompt
    set without both labels or without the headline's subset, a headline detector whose extra pass is not asked
    for or that is not defined on the model's family (``detection.not_defined``: never scored there, listed in
    the result's ``not_defined``); ConfigError on DDIM steps past the model's schedule."""
    m, s = job.model, job.sampler
    layer_sets = {k: list(v) for k, v in job.layers.sets.items()}
    model = get_model(m.source, device or m.device, m.dtype, m.use_safetensors, m.build)
    check_ddim_steps(model.scheduler.config, s.steps)
    if job.capture.compile:
        model.unet.compile()
    detection.check_grid(model, layer_sets, list(job.score.T), s.steps)
    undefined = detection.not_defined(model)
    if job.score.headline.detector in undefined:
        raise ValueError(f"score.headline.detector={job.score.headline.detector!r} is not defined on model family "
                         f"{model.family}: {undefined[job.score.headline.detector]}")
    prompt_set = load_prompt_set(job.prompts)
    check_labels(prompt_set, job.score.headline.subset)
    settings = job.sampler.settings()
    extra = job.extra_requests()
    extras.check_detector(job.score.headline.detector, extra)
    store = TraceStore(job.paths.store_dir, job.store.dtype)
    seeds = image_seeds(settings, s.n_images)
    plan = detection.plan(prompt_set, model_key(m.name, m.source),
                          trace_sampler_key(detection.sampler_key(settings, m.dtype), job.store.dtype),
                          seeds, by_position=settings.seeding == "official")
    start = time.perf_counter()
    sampled = detection.generate(model, plan, settings, store, s.batch_size, lambda it: progress(it, "prompts"),
                                 token_maps=job.capture.token_maps)
    extra_start = time.perf_counter()
    extra_now = extras.compute_missing(model, plan, settings, store, extra, s.batch_size,
                                       progress=lambda it: progress(it, "extra passes"))
    sampling_s, extra_s = time.perf_counter() - start, time.perf_counter() - extra_start
    arrays = detection.load(store, plan, extra).score_units(job.score.score_difference_units, model.scheduler,
                                                            s.steps)
    scores = detection.score_grid(arrays, layer_sets, list(job.score.T), skip=undefined)
    metrics = detection.detection_table(scores, job.score.n_boot)
    found: dict = {}
    pictures = {}
    if prompt_set.truth:
        images = [store.read_image(g.key, seed).transpose(2, 0, 1) for g in plan for seed in g.seeds]
        rows = arrays.rows
        tables = localization.evaluate(arrays.end_maps, images, list(rows.prompt_id), list(rows.kind),
                                       prompt_set.truth, layer_sets, job.localization.rule,
                                       localization.localizer_maps(arrays))
        found |= localization.summarise(tables)
        tokens = localization.token_table(arrays.token_maps, arrays.end_index, list(rows.prompt_id),
                                          prompt_set.truth, next(iter(layer_sets.values())))
        found["token_localization"] = tokens.to_dict(orient="records")
        # the headline layer set's masks (the first set where the headline detector reads none)
        shown = layer_sets.get(job.score.headline.layers, next(iter(layer_sets.values())))
        gallery = localization.gallery(arrays.end_maps, list(rows.prompt_id), images, prompt_set.truth, shown)
        if gallery is not None:
            pictures["masks.png"] = gallery.transpose(2, 0, 1)
    found |= early.job_results(store, plan, arrays, list(settings.end_map_steps), s.steps, layer_sets,
                               job.early.signal.model_dump(), list(job.early.fpr), job.early.n_boot,
                               prompt_set.truth, job.localization.rule)
    return DetectionResult(
        config=job.resolved, sampler_settings=sampler_record(settings, s.seed, m.dtype), n_images=s.n_images,
        model=m.name, family=f"{model.family}, {model.prediction_type}", not_defined=undefined or None,
        prompt_set=prompt_set.name, n_prompts=len(prompt_set), n_generations=len(arrays.rows),
        sampled_now=sampled, extra_computed_now=extra_now, extra_seconds=round(extra_s, 2),
        extra={r.name: {**r.knobs, "n": r.n, "hash": r.digest} for r in extra},
        sampling_seconds=round(sampling_s, 2), scoring_seconds=round(time.perf_counter() - start - sampling_s, 2),
        **found, headline=detection.headline(metrics, **job.score.headline.model_dump()),
        metrics=metrics.to_dict(orient="records"), table=scores, pictures=pictures)


def check_labels(prompt_set: PromptSet, headline_subset: str) -> None:
    """Detection metrics need memorized and non-memorized prompts, and the headline's subset among them: checked
    before the first image is sampled, not after. Raises ValueError naming the set."""
    memorized = sum(p.memorized for p in prompt_set)
    if memorized in (0, len(prompt_set)):
        has = "memorized" if memorized else "non-memorized"
        raise ValueError(f"prompt set {prompt_set.name!r} ({len(prompt_set)} prompts) has only {has} prompts: "
                         "detection needs both positives and negatives (add a set, e.g. a union)")
    subsets = detection.subsets(p.kind for p in prompt_set)
    if headline_subset not in subsets:
        raise ValueError(f"score.headline.subset {headline_subset!r} is not among prompt set "
                         f"{prompt_set.name!r}'s subsets: {', '.join(subsets)}")
