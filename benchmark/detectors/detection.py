"""Detection end to end: sample missing traces into the store, score every detector on a grid, compute metrics."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.data.prompts import Prompt, PromptSet
from benchmark.detectors import extra_passes, jacobian, scores
from benchmark.measures.metrics import detection_metrics
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import DETECTORS, EXTRA_PASSES, Entry
from benchmark.sampling.capture import SamplerSettings, cross_attention_layers, sample_with_capture
from benchmark.sampling.missing import Generation, sample_missing, sampler_key
from benchmark.store.traces import Trace, TraceKey, TraceStore, traces_from_batch

SCORE_DIFFERENCE_UNITS = ("eps", "score")  # score.score_difference_units

__all__ = ["Generation", "detection_table", "generate", "load", "plan", "prone_ids", "sampler_key", "score_grid"]


def plan(prompt_set: PromptSet, model_key: str, sampler: str, seeds: list[int],
         by_position: bool = False) -> list[Generation]:
    """One generation per prompt, keyed by ``sampler`` (``sampler_key``) and ``seeds``; its ``index`` is the
    prompt's position in its whole set (``Prompt.position``, kept by shard / limit / select_ids / subsets), so
    official seeding gives a prompt the same noise in a narrowed run as in the full one. ``by_position``
    (official seeding, whose noise depends on that position): the position is in the key too."""
    return [Generation(p, TraceKey(model_key, sampler, prompt_set.name, p.id, p.text,
                                   p.position if by_position else None), list(seeds), p.position)
            for p in prompt_set]


def check_grid(model: TextToImage, layer_sets: dict[str, list[str]], windows: list[int], n_steps: int) -> None:
    """Fail on an unknown layer name or an impossible step window before any sampling, not after it."""
    available = list(cross_attention_layers(model.unet))
    for layers in layer_sets.values():
        scores.select_layers(available, list(layers))
    check_windows(windows, n_steps)
    check_detectors()


def not_defined(model: TextToImage, entries: Iterable[Entry] | None = None) -> dict[str, str]:
    """The detectors (or other registry ``entries``) not defined on ``model``'s family, each with why: those whose
    ``needs`` name a premise the family lacks (``TextToImage.lacks``; Ren's entropies on PixArt-alpha, which has no
    start token and no attended padding). They are never scored there (``score_grid``'s ``skip``); the report
    marks them."""
    entries = DETECTORS.entries() if entries is None else entries
    return {e.name: why for e in entries if (why := model.not_defined(e.needs))}


def check_detectors() -> None:
    """Every registered detector reads only trace fields that :class:`TraceArrays` has or an extra pass adds."""
    known = (set(TraceArrays.__dataclass_fields__) - {"rows", "extras"}
             | {f for entry in EXTRA_PASSES.entries() for f in entry.fields})
    for entry in DETECTORS.entries():
        missing = [f for f in entry.trace_fields if f not in known]
        if missing:
            raise ValueError(f"detector {entry.name!r} reads trace fields {missing} that traces do not have "
                             f"(they have {', '.join(sorted(known))})")


def check_windows(windows: list[int], n_steps: int) -> None:
    """Raise ValueError unless every step window T (``score.T``) is within 1..``n_steps`` sampled steps: the one
    window check, run on the config (``DetectJob.check``), before sampling and before scoring."""
    bad = [T for T in windows if not 1 <= T <= n_steps]
    if bad:
        raise ValueError(f"score.T={list(windows)}: windows {bad} are not within 1..sampler.steps={n_steps}")


def generate(model: TextToImage, generations: list[Generation], settings: SamplerSettings, store: TraceStore,
             batch_size: int = 8, progress: Callable[[Iterable], Iterable] = iter, token_maps: bool = False) -> int:
    """Sample every (prompt, seed) without a trace on disk; return how many images were sampled.

    Missing (prompt, seed) pairs are packed across prompts into calls of ``batch_size`` images (an image depends on
    its prompt and seed alone, so packing changes no image). ``token_maps`` also stores every token's final-step map
    (a diagnostic; only traces sampled now get them). ``progress`` wraps the iteration over batches. Official
    seeding draws a prompt's whole batch at once, as the official scripts do."""

    def sample_batch(items: list[tuple[Generation, int]]):
        seeds = [seed for _, seed in items]
        batch = sample_with_capture(model, [gen.prompt.text for gen, _ in items], seeds, settings,
                                    token_maps=token_maps, prompt_index=[gen.index for gen, _ in items])
        metas = [{"prompt_id": gen.prompt.id, "prompt": gen.prompt.text, "model": gen.key.model,
                  "sampler": asdict(settings), "prompt_set": gen.key.prompt_set} for gen, _ in items]
        return list(zip(traces_from_batch(batch, metas, seeds), batch.images))

    return sample_missing(store, generations, sample_batch, batch_size, progress,
                          whole_prompt=settings.seeding == "official")


@dataclass
class TraceArrays:
    """Traces of many generations stacked along a first axis, with one row of labels per generation."""

    rows: pd.DataFrame  # prompt_id, kind, memorized, seed
    delta_sq: np.ndarray
    end_maps: dict[str, np.ndarray]
    token_attn: dict[str, np.ndarray]
    end_index: np.ndarray
    token_maps: dict[str, np.ndarray]  # layer -> (n, tokens, h, w); empty unless every trace has them
    # fields of the extra passes asked for (``benchmark.detectors.extra_passes``): name -> (n,) or (n, h, w); NaN rows
    # for the generations a pass was not run on (its ``n``: a prompt's first images only)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # 1 - alpha_bar_t at the last step, the divisor that puts the score-difference map in score units; 1 = eps
    # units (``score_units``)
    one_minus_alpha_bar: float = 1.0

    def score_units(self, units: str, scheduler, steps: int) -> TraceArrays:
        """These arrays with the score-difference detector and localizer in ``units``: ``eps`` (sum_c (eps_c -
        eps_u)^2, the default) or ``score`` (sum_c (s_c - s_u)^2, the curvature paper's official ``score_diff``,
        divided by 1 - alpha_bar_t of the last of ``steps`` steps of ``scheduler``). Raises ValueError otherwise."""
        if units not in SCORE_DIFFERENCE_UNITS:
            raise ValueError(f"score.score_difference_units {units!r} is not one of "
                             f"{', '.join(SCORE_DIFFERENCE_UNITS)}")
        scale = 1.0 if units == "eps" else jacobian.one_minus_alpha_bar(scheduler, steps, jacobian.CURVATURE_STEP)
        return replace(self, one_minus_alpha_bar=scale)

    @classmethod
    def stack(cls, traces: list[Trace], labels: list[Prompt],
              extras: dict[str, np.ndarray] | None = None) -> TraceArrays:
        rows = pd.DataFrame({"prompt_id": [p.id for p in labels], "kind": [p.kind for p in labels],
                             "memorized": [p.memorized for p in labels],
                             "seed": [t.meta["seed"] for t in traces]})
        layers = traces[0].layers
        return cls(rows, np.stack([t.delta_sq for t in traces]),
                   {k: np.stack([t.end_maps[k] for t in traces]) for k in layers},
                   {k: np.stack([t.token_attn[k] for t in traces]) for k in layers},
                   np.array([t.end_index for t in traces]),
                   {k: np.stack([t.token_maps[k] for t in traces]) for k in layers}
                   if all(t.token_maps for t in traces) else {}, dict(extras or {}))

    @property
    def layers(self) -> list[str]:
        return list(self.end_maps)

    def mask(self, layers: list[str]) -> np.ndarray:
        return scores.be_mask(self.end_maps, layers, self.delta_sq.shape[-2:])

    def has(self, name: str) -> bool:
        """Whether the trace field ``name`` is here: a capture field always, an extra pass's when it was asked for."""
        return name in self.extras or (name in self.__dataclass_fields__ and name not in ("rows", "extras"))

    def get(self, name: str):
        if name in self.extras:
            return self.extras[name]
        if not self.has(name):
            raise KeyError(f"no trace field {name!r} here (extra pass not asked for? extra.passes)")
        return getattr(self, name)

    def computed(self, fields: Iterable[str]) -> np.ndarray:
        """(n,) bool: the generations whose extra fields among ``fields`` are all computed (finite)."""
        keep = np.ones(len(self.rows), bool)
        for name in fields:
            if name in self.extras:
                keep &= np.isfinite(self.extras[name].reshape(len(self.rows), -1)).all(axis=1)
        return keep

    def inputs(self, detector: Entry, layers: list[str] | None, T: int, mask: np.ndarray | None) -> dict:
        """A detector's (or localizer's) keyword arguments, by its parameter names (``registry.LAYER_INPUTS``;
        ``size``: the latents' spatial size)."""
        derived = {"layers": layers, "mask": mask, "T": T, "size": self.delta_sq.shape[-2:]}
        return {name: derived[name] if name in derived else self.get(name) for name in detector.inputs}


def load(store: TraceStore, generations: list[Generation],
         extra: list[extra_passes.ExtraRequest] = ()) -> TraceArrays:
    """The stored traces of ``generations``, stacked, with the fields of the ``extra`` passes
    (``benchmark.detectors.extra_passes``: their sidecars must be computed, ``extras.compute_missing``)."""
    traces, labels = [], []
    for gen in generations:
        for seed in gen.seeds:
            traces.append(store.read(gen.key, seed))
            labels.append(gen.prompt)
    if not traces:
        raise ValueError("no traces to score")
    rows = [(gen.key, gen.seeds, seed) for gen in generations for seed in gen.seeds]
    return TraceArrays.stack(traces, labels, extra_passes.load_fields(store, rows, list(extra)) if extra else None)


def score_grid(arrays: TraceArrays, layer_sets: dict[str, list[str]], steps: list[int],
               detectors: list[Entry] | None = None, skip: Iterable[str] = ()) -> pd.DataFrame:
    """Every detector (or those of ``detectors``) on every layer set and step window, per generation, in long format.

    Columns: prompt_id, kind, memorized, seed, detector, layers, T, score (T = 0 where a detector has no window).
    A detector that reads a field these traces lack (an extra pass not asked for, ``extra.passes``) is skipped;
    one whose extra pass ran on some generations only (its ``n``) has rows for those only. ``skip``: detectors
    not to score (those :func:`not_defined` on the traces' model family). Raises ValueError for a window past the
    recorded steps or a detector that does not return one score per generation.
    """
    check_windows(steps, arrays.delta_sq.shape[1])
    parts = []
    skip = set(skip)
    detectors = [d for d in (DETECTORS.entries() if detectors is None else detectors)
                 if all(arrays.has(f) for f in d.trace_fields) and d.name not in skip]

    def add(detector: Entry, name: str, layers: list[str] | None, T: int, mask: np.ndarray | None = None):
        values = np.asarray(detector.fn(**arrays.inputs(detector, layers, T, mask)))
        if values.shape != (len(arrays.rows),):
            raise ValueError(f"detector {detector.name!r} returned shape {values.shape}, expected "
                             f"({len(arrays.rows)},): one score per generation")
        keep = arrays.computed(detector.trace_fields)
        parts.append(arrays.rows.assign(detector=detector.name, layers=name, T=T, score=values)[keep])

    # the order of the rows: detectors without a layer set, then per layer set those without a window, then per T
    for d in detectors:
        if not d.uses_layers and not d.uses_T:
            add(d, "", None, 0)
    for T in steps:
        for d in detectors:
            if not d.uses_layers and d.uses_T:
                add(d, "", None, T)
    for name, layers in layer_sets.items():
        mask = arrays.mask(layers)  # once per layer set, shared by the detectors that read it
        for d in detectors:
            if d.uses_layers and not d.uses_T:
                add(d, name, layers, 0, mask)
        for T in steps:
            for d in detectors:
                if d.uses_layers and d.uses_T:
                    add(d, name, layers, T, mask)
    return pd.concat(parts, ignore_index=True)


def subsets(kinds: Iterable[str]) -> list[str]:
    """``all`` memorized vs not, and each memorization kind vs not."""
    memorized_kinds = sorted(set(kinds) - {"none"})
    return ["all"] + (memorized_kinds if len(memorized_kinds) > 1 else [])


def detection_table(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Metrics per detector x layers x T x subset, at prompt level (mean over seeds) and generation level."""
    rows = []
    by_prompt = (scores.groupby(["detector", "layers", "T", "prompt_id", "kind", "memorized"], sort=False)["score"]
                 .mean().reset_index())
    for level, table in (("prompt", by_prompt), ("generation", scores)):
        for (detector, layers, T), group in table.groupby(["detector", "layers", "T"], sort=False):
            sign = 1.0 if DETECTORS[detector].higher_is_memorized else -1.0
            for subset in subsets(group["kind"]):
                part = group if subset == "all" else group[(group["kind"] == subset) | ~group["memorized"]]
                what = f"{detector}[{layers}] T={T} {subset}"
                m = detection_metrics(part["memorized"].to_numpy(), sign * part["score"].to_numpy(), n_boot,
                                      seed, what)
                rows.append({"level": level, "detector": detector, "layers": layers, "T": T, "subset": subset,
                             **m})
    return pd.DataFrame(rows)


def headline(metrics: pd.DataFrame, detector: str, layers: str, T: int, subset: str, level: str,
             metric: str = "auc") -> float:
    """One number from the metrics table (what a sweeper optimises)."""
    entry = DETECTORS[detector]
    row = metrics[(metrics.detector == detector) & (metrics.layers == (layers if entry.uses_layers else ""))
                  & (metrics["T"] == (T if entry.uses_T else 0)) & (metrics.subset == subset)
                  & (metrics.level == level)]
    if row.empty:
        raise ValueError(f"no metric row for {detector}[{layers}] T={T} {subset} {level}")
    return float(row[metric].iloc[0])


def prone_ids(generations_csv: str | Path, k: int, detector: str = "D", T: int = 1, layers: str = "") -> list[str]:
    """The memorization-prone rule (the seed paper gives none): the ids of the k memorized prompts with the highest
    prompt-level score (mean over generations) of ``detector[layers]`` at window ``T`` in a finished detection
    job's ``generations.csv``, best first; tied scores (e.g. duplicate captions) keep the set's order, which is the
    order the job wrote its prompts in. Raises ValueError when the table has no memorized row for that detector."""
    table = pd.read_csv(generations_csv, keep_default_na=False, dtype={"prompt_id": str})
    rows = table[(table.detector == detector) & (table["T"] == T) & (table.layers == layers) & table.memorized]
    if rows.empty:
        raise ValueError(f"{generations_csv}: no memorized rows for {detector}[{layers}] T={T}")
    # sort=False keeps the ids in the file's (the set's) order, and a stable sort keeps it among equal scores;
    # groupby's default would order them as strings ("10" before "9")
    ranked = rows.groupby("prompt_id", sort=False)["score"].mean().sort_values(ascending=False, kind="stable")
    return list(ranked.index[:k])
