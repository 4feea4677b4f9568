"""Privacy vs utility of mitigation: regenerate prompts under each mitigation setting, and measure.

Every generation (unmitigated baseline included) is a stored trace + image, keyed by a sampler name that carries
the mitigation setting (``interface.Mitigation.tag``), so a rerun samples nothing twice. Measures per generation:
- similarity to the prompt's training image, where known: ``S``, ``LS`` (with the generation's own BE mask),
  ``train_rmse`` (RMSE on [0, 1], inside the planted region for local memorization), ``SSCD`` when configured;
- utility: ``CLIP`` score when configured; ``caption_rmse``: RMSE to the scene the caption names, where a registered
  caption renderer can draw it (the testbed's data recipe; lower = more faithful), which needs no downloaded network;
- cost: ``extra_unet_evals``, the UNet evaluations per image beyond plain sampling's 2 x steps (one CFG batch row
  counts one);
- what the method reports per image, as ``stat/<name>`` columns (NeMo's ``stat/neurons`` and
  ``stat/neurons/<layer>``, PRSS's ``stat/triggered`` and ``stat/chosen``, Jain et al.'s ``stat/transition_step``).
Every registered method runs through the one interface (``benchmark.mitigation.interface``); its strength sits in
the ``strength`` column, named and directed per method by its registration (``strength``, ``stronger``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch

from benchmark.detectors import scores
from benchmark.detectors.detection import Generation, generate
from benchmark.localization.evaluation import Truth, rmse
from benchmark.measures.similarity import SSCD, CLIPScore, pixel_LS, pixel_S
from benchmark.mitigation.interface import Mitigation
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import CAPTION_RENDERERS
from benchmark.sampling.capture import SamplerSettings, cross_attention_layers, sample_with_capture
from benchmark.sampling.missing import mitigation_suffix, sample_missing
from benchmark.store.traces import TraceKey, TraceStore, traces_from_batch

BASELINE = "none"


@dataclass
class Measures:
    mask_layers: list[str]  # the layer set of BE masks (mitigation loss and LS)
    sscd: SSCD | None = None
    clip: CLIPScore | None = None


def reference_method(methods: list[str], reference: str | None = None) -> str:
    """The method the equal-utility table compares every other against: ``reference`` when given, else Wen's when it
    runs (the field's common baseline), else the first of ``methods``."""
    return reference or ("wen" if "wen" in methods else methods[0])


def mitigated_key(key: TraceKey, settings: Mitigation, mask_layers: list[str] | None = None) -> TraceKey:
    """The baseline key with the mitigation setting added to its sampler (``sampling.sampler_key``'s format);
    ``mask_layers`` None = every cross-attention layer (the default keeps the keys of earlier stores)."""
    return replace(key, sampler=key.sampler + mitigation_suffix(settings, mask_layers))


@contextmanager
def counting_unet_rows(unet: torch.nn.Module) -> Iterator[list[int]]:
    """Count the batch rows of every UNet forward pass inside the block (``count[0]``): one CFG step of n images is
    2n rows, an optimisation step on n images n rows."""
    count = [0]

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        count[0] += int(sample.shape[0])

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def run_mitigation(model: TextToImage, baseline: list[Generation], sampler: SamplerSettings, store: TraceStore,
                   settings: list[Mitigation], layers: list[str], batch_size: int = 8,
                   progress: Callable[[Iterable], Iterable] = iter) -> int:
    """Sample every missing baseline and mitigated generation; return how many images were sampled now.

    Every setting is checked on the model first (``Mitigation.check_model``: what it requires, a token the
    tokenizer lacks), so a method that cannot run fails before any sampling. Mitigated generations are sampled one
    prompt per batch: with BE's ``mask_norm="batch"`` a result depends on the images optimised together, and those
    stay the seeds of one prompt, as before. A method that reads the BE mask gets the unmitigated generation's
    (same seed, read from its stored trace: no extra pass)."""
    for mit in settings:
        mit.check_model(model)
    sampled = generate(model, baseline, sampler, store, batch_size, progress)
    mask_layers = mask_key_layers(model, layers)
    for mit in settings:
        mitigated = [replace(gen, key=mitigated_key(gen.key, mit, mask_layers)) for gen in baseline]
        base_key = {m.key: gen.key for m, gen in zip(mitigated, baseline)}

        def sample_batch(items, mit=mit, base_key=base_key):
            gen, seeds = items[0][0], [seed for _, seed in items]
            mask = None
            if mit.needs_mask:
                traces = [store.read(base_key[gen.key], s) for s in seeds]
                maps = {k: np.stack([t.end_maps[k] for t in traces]) for k in traces[0].end_maps}
                mask = latent_mask(maps, layers, traces[0].delta_sq.shape[-2:])
            intervention = mit.intervention()
            with counting_unet_rows(model.unet) as rows:
                batch = sample_with_capture(model, gen.prompt.text, seeds, sampler, prompt_index=gen.index,
                                            intervention=intervention, mask=mask)
            meta = {"prompt_id": gen.prompt.id, "prompt": gen.prompt.text, "model": gen.key.model,
                    "sampler": asdict(sampler), "prompt_set": gen.key.prompt_set,
                    "mitigation": {"method": mit.method, **mit.values},
                    "mask_layers": list(layers) if mit.needs_mask else None}
            traces = traces_from_batch(batch, meta, seeds)
            stats = intervention.stats
            extra = rows[0] / len(seeds) - 2 * sampler.steps
            for i, trace in enumerate(traces):
                # every per-image value the method reports (NeMo's neurons per layer, PRSS's trigger...), kept
                # under one key so that the table can carry them as columns
                trace.meta["method_stats"] = {name: _stat(stats, name, i) for name in stats}
                trace.meta |= {"loss_first": _stat(stats, "loss_first", i), "loss_last": _stat(stats, "loss_last", i),
                               "iterations": int(_stat(stats, "iterations", i) or 0), "extra_unet_evals": extra}
            return list(zip(traces, batch.images))

        # Wen's/BE's official protocol shares one embedding by a prompt's whole batch: it is mitigated at once
        sampled += sample_missing(store, mitigated, sample_batch, batch_size, progress, across_prompts=False,
                                  whole_prompt=mit.values.get("protocol") == "official")
    return sampled


_LOSS_STATS = ("loss_first", "loss_last", "iterations")  # columns of their own (loss_*: in the trace only)


def _stat(stats: dict, name: str, i: int) -> float | None:
    value = stats.get(name)
    return None if value is None or not np.isfinite(value[i]) else float(value[i])


def latent_mask(end_maps: dict[str, np.ndarray], layers: list[str], size: tuple[int, int]) -> torch.Tensor:
    """The BE mask (n, h, w) at the latent resolution, from stored final-step end-token maps."""
    return torch.from_numpy(scores.be_mask(end_maps, layers, size)).float()


def mask_key_layers(model: TextToImage, layers: list[str]) -> list[str] | None:
    """The BE-mask layers as the store key needs them: None when they are every cross-attention layer."""
    return None if sorted(layers) == sorted(cross_attention_layers(model.unet)) else list(layers)


def measure(image: np.ndarray, prompt: str, end_maps: dict[str, np.ndarray], truth: Truth | None,
            measures: Measures) -> dict:
    """Every available measure of one generation ((3, H, W) in [0, 1])."""
    out = {}
    if truth is not None:
        mask = scores.be_mask({k: v[None] for k, v in end_maps.items()}, measures.mask_layers, image.shape[-2:])[0]
        out |= {"S": pixel_S(image, truth.image), "LS": pixel_LS(image, truth.image, mask),
                "train_rmse": rmse(image, truth.image, truth.mask)}
        if measures.sscd is not None:
            out["SSCD"] = float(measures.sscd.similarity(image[None], truth.image[None])[0])
    if measures.clip is not None:
        out["CLIP"] = float(measures.clip.score(image[None], [prompt])[0])
    for renderer in CAPTION_RENDERERS.entries():
        try:
            out["caption_rmse"] = rmse(image, renderer(prompt, image.shape[-1]))
            break
        except ValueError:
            pass  # a caption this renderer does not describe
    return out


def measure_all(store: TraceStore, baseline: list[Generation], settings: list[Mitigation],
                truth: dict[str, Truth], measures: Measures, mask_layers: list[str] | None = None) -> pd.DataFrame:
    """One row per (setting, prompt, seed), the unmitigated baseline as method ``none`` (strength NaN);
    ``mask_layers`` as in :func:`mitigated_key` (``mask_key_layers``)."""
    rows = []
    for mit in [None] + list(settings):
        for gen in baseline:
            key = gen.key if mit is None else mitigated_key(gen.key, mit, mask_layers)
            for seed in gen.seeds:
                trace = store.read(key, seed)
                image = store.read_image(key, seed).transpose(2, 0, 1)
                strength = None if mit is None else mit.strength
                rows.append({
                    "method": BASELINE if mit is None else mit.method,
                    "strength": np.nan if strength is None else strength,
                    "prompt_id": gen.prompt.id, "kind": gen.prompt.kind, "seed": seed,
                    "D1": float(np.sqrt(trace.delta_sq[0].sum())),
                    "iterations": trace.meta.get("iterations", 0),
                    # a baseline costs nothing extra by definition; a mitigated trace stored before the cost was
                    # recorded has an unknown cost (NaN), not zero
                    "extra_unet_evals": float(trace.meta.get("extra_unet_evals", 0.0 if mit is None else np.nan)),
                    **measure(image, gen.prompt.text, trace.end_maps, truth.get(gen.prompt.id), measures),
                    **{f"stat/{k}": np.nan if v is None else v
                       for k, v in trace.meta.get("method_stats", {}).items() if k not in _LOSS_STATS}})
    return pd.DataFrame(rows)


KEYS = ("kind", "method", "strength")
# Which way each measure points: similarities to the training image (higher = more copying) and distances to it
# (lower = more copying); utilities (higher = better) and distances to the caption's scene (lower = better).
COPYING = {"SSCD": "higher", "S": "higher", "LS": "higher", "train_rmse": "lower"}
UTILITY = {"CLIP": "higher", "caption_rmse": "lower"}


def curves(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean of every measure per (kind, method, strength): the points of the trade-off curves; ``n`` generations."""
    measures = [c for c in rows.columns if c not in KEYS + ("prompt_id", "seed")]
    groups = rows.groupby(list(KEYS), dropna=False, sort=True)
    out = groups[measures].mean().reset_index()
    out["n"] = groups.size().to_numpy()
    return out


def pareto_front(points: pd.DataFrame, utility: str, copying: str) -> pd.Series:
    """Per kind, whether each point is on the Pareto front of (less copying, more utility): no other point of the
    same kind is at least as good on both and better on one. Directions: :data:`COPYING`, :data:`UTILITY`."""
    sign_c = -1.0 if COPYING[copying] == "higher" else 1.0  # larger = less copying
    sign_u = 1.0 if UTILITY[utility] == "higher" else -1.0  # larger = more utility
    front = pd.Series(False, index=points.index)
    for _, part in points.dropna(subset=[utility, copying]).groupby("kind"):
        c, u = sign_c * part[copying].to_numpy(), sign_u * part[utility].to_numpy()
        for i, index in enumerate(part.index):
            dominated = ((c >= c[i]) & (u >= u[i]) & ((c > c[i]) | (u > u[i]))).any()
            front[index] = not dominated
    return front


def memorization_rate(rows: pd.DataFrame, thresholds: dict[str, float]) -> pd.DataFrame:
    """Per (kind, method, strength) and measure of ``thresholds``: the share of generations still copying, i.e.
    above the threshold for a similarity (SSCD, S, LS), below it for a distance (train_rmse). Columns ``measure``,
    ``threshold``, ``rate``, ``n``. Measures the rows lack are skipped; an unknown measure raises ValueError."""
    unknown = [m for m in thresholds if m not in COPYING]
    if unknown:
        raise ValueError(f"copy thresholds for {unknown}: not copying measures ({', '.join(COPYING)})")
    out = []
    for measure, threshold in thresholds.items():
        if measure not in rows:
            continue
        values = rows.dropna(subset=[measure])
        copies = values[measure] > threshold if COPYING[measure] == "higher" else values[measure] < threshold
        groups = values.assign(copies=copies).groupby(list(KEYS), dropna=False, sort=True).copies
        table = groups.agg(rate="mean", n="size").reset_index()
        out.append(table.assign(measure=measure, threshold=float(threshold)))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def at_equal_utility(rows: pd.DataFrame, utility: str, similarity: str, reference: str, n: int = 5,
                     n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every method's ``similarity`` at ``n`` utility levels along the ``reference`` method's curve, with a
    paired bootstrap 95% interval of its difference to the reference.

    A curve = the baseline point plus the method's points (means over generations), sorted by utility and
    interpolated linearly; the levels span the utility range the reference's curve reaches; a method is read only
    at levels inside its own curve's range (else NaN, its interval too). ``difference`` = method minus reference;
    its interval resamples prompts with replacement (every method ran on the same prompts and seeds, so the
    resample is shared: paired), recomputing every curve, ``n_boot`` times (seeded; percentile interval).
    Columns: ``kind``, the utility, ``method``, the similarity, ``difference``, ``ci_low``, ``ci_high``. Empty
    when the reference did not run or the measures are missing. The level of the baseline itself is left out
    (:func:`utility_levels`)."""
    if utility not in rows or similarity not in rows or reference not in set(rows.method):
        return pd.DataFrame()
    rng = np.random.default_rng(seed)
    out = []
    for kind, part in rows.dropna(subset=[utility, similarity]).groupby("kind", sort=True):
        prompts = sorted(part.prompt_id.unique())
        per_prompt = part.groupby(["method", "strength", "prompt_id"], dropna=False)[[utility, similarity]].mean()
        points = {}  # (method, strength) -> (prompts, 2) array of per-prompt means
        for (method, strength), group in per_prompt.groupby(level=[0, 1], dropna=False):
            table = group.droplevel([0, 1]).reindex(prompts)
            if table.isna().any().any():
                continue  # a setting with some prompts unmeasured is left out of the paired comparison
            points[(method, strength)] = table.to_numpy()
        methods = [m for m in dict.fromkeys(k[0] for k in points) if m != BASELINE]
        if reference not in methods or not any(m == BASELINE for m, _ in points):
            continue
        draws = [np.arange(len(prompts))] + [rng.integers(0, len(prompts), len(prompts)) for _ in range(n_boot)]
        curves_by_draw = [{m: _curve(points, m, idx) for m in methods} for idx in draws]
        lo, hi = curves_by_draw[0][reference][0].min(), curves_by_draw[0][reference][0].max()
        if not lo < hi:
            continue
        for level in utility_levels(lo, hi, n, points_of(points, BASELINE)[:, 0].mean()):
            values = np.array([[_read(c[m], level) for m in methods] for c in curves_by_draw])  # (draws, methods)
            ref = values[:, methods.index(reference)]
            for j, method in enumerate(methods):
                diff = values[:, j] - ref
                boot = diff[1:][np.isfinite(diff[1:])]
                # no interval where the curve does not reach the level (its resamples might, but describe nothing)
                reached = np.isfinite(diff[0]) and len(boot)
                low, high = np.percentile(boot, [2.5, 97.5]) if reached else (np.nan, np.nan)
                out.append({"kind": kind, utility: float(level), "method": method, similarity: values[0, j],
                            "difference": diff[0], "ci_low": float(low), "ci_high": float(high)})
    return pd.DataFrame(out)


def utility_levels(lo: float, hi: float, n: int, baseline: float) -> np.ndarray:
    """``n`` evenly spaced levels over [lo, hi], the end at the unmitigated ``baseline``'s utility left out: every
    curve starts there, so the difference is 0 by construction and a bootstrap interval of it is meaningless."""
    if np.isclose(lo, baseline) or np.isclose(hi, baseline):
        levels = np.linspace(lo, hi, n + 1)
        return levels[1:] if np.isclose(lo, baseline) else levels[:-1]
    return np.linspace(lo, hi, n)


def points_of(points: dict, method: str) -> np.ndarray:
    """The (prompts, 2) per-prompt means of ``method``'s first setting (the baseline has one)."""
    return next(v for (m, _), v in points.items() if m == method)


def _curve(points: dict, method: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    chosen = [v for (m, s), v in points.items() if m in (method, BASELINE)]
    means = np.array([v[idx].mean(0) for v in chosen])  # (points, 2): utility, similarity
    order = np.argsort(means[:, 0], kind="stable")
    return means[order, 0], means[order, 1]


def _read(curve: tuple[np.ndarray, np.ndarray], level: float) -> float:
    x, y = curve
    if not x.min() <= level <= x.max():
        return np.nan
    return float(np.interp(level, x, y))
