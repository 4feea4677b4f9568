"""Early-step BE: the bright ending read before the generation ends, and early stopping on it.

The BE paper (Chen et al., ICLR 2025, Sec. 4) reads the end-token map of the *final* denoising step. With
``sampler.end_map_steps`` the capture pass also stores it at earlier 0-based steps k; here every registered detector
that reads those maps (:func:`early_detectors`: today ``BE_intensity`` and ``LD``) is scored again, by its own
registered function, on the step-k view of the traces (:func:`step_view`): step k's end-token maps (and the BE mask
made from them) and the first k + 1 steps of ``delta_sq``, the only steps a generation stopped at k has computed,
so a step window ``T`` is capped at k + 1. Localization of step k's mask against the planted mask follows
(``localization.localization_table``).

Early stopping (simulated from the stored traces, not inside the sampling loop): at step k, a generation whose
signal exceeds a threshold stops, saving ``steps - (k + 1)`` denoising steps. The threshold is calibrated on held-out
non-memorized prompts at a target false-positive rate; the non-memorized prompts are split in two by prompt (sorted
ids, alternately), so the false stops are counted on prompts that did not set the threshold. Generations do not
affect each other, so the decisions are exactly those an in-loop stop at step k would take.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from benchmark.data.prompts import Truth
from benchmark.detectors.detection import TraceArrays, detection_table, score_grid
from benchmark.localization import evaluation
from benchmark.registry import DETECTORS, Entry
from benchmark.sampling.missing import Generation
from benchmark.store.traces import TraceStore

# What the step-k view of the traces holds (besides the layer set, its BE mask and T): the first k + 1 steps of
# delta_sq and step k's end-token maps. A later step's attention, the final token maps and an extra pass's fields
# do not exist yet at step k (nor inside the sampling loop at that step: benchmark.early.stopping).
STEP_FIELDS = ("delta_sq", "end_maps")


def early_detectors() -> list[Entry]:
    """The registered detectors that can be scored at a step k before the last, derived from what they read: step
    k's end-token maps (a ``mask`` parameter, the BE mask of a layer set, or ``end_maps``), so their score changes
    with k, and no trace field the step-k view lacks (:data:`STEP_FIELDS`). Registry order."""
    return [e for e in DETECTORS.entries()
            if ("mask" in e.inputs or "end_maps" in e.trace_fields) and set(e.trace_fields) <= set(STEP_FIELDS)]


def early_detector_names() -> list[str]:
    """The names of :func:`early_detectors`: the choices of ``early.signal.detector`` and of a stop rule."""
    return [e.name for e in early_detectors()]


def step_view(delta_sq: np.ndarray, end_maps: dict[str, np.ndarray], step: int,
              rows: pd.DataFrame | None = None) -> TraceArrays:
    """The traces as they are at 0-based step ``step``: ``delta_sq`` (n, >= step + 1, h, w) cut to its first
    ``step + 1`` steps, ``end_maps`` (layer -> (n, h_l, w_l)) the maps of that step; ``rows`` the generations'
    labels (None: unlabelled, for a decision inside the sampling loop). Fields outside :data:`STEP_FIELDS` are
    empty. Raises ValueError when fewer than step + 1 steps are given."""
    if delta_sq.shape[1] < step + 1:
        raise ValueError(f"step {step} needs {step + 1} steps of delta_sq, got {delta_sq.shape[1]}")
    n = len(delta_sq)
    return TraceArrays(pd.DataFrame(index=range(n)) if rows is None else rows, delta_sq[:, :step + 1], end_maps, {},
                       np.zeros(0, dtype=int), {})


def step_signal(detector: str, view: TraceArrays, layers: list[str], T: int) -> np.ndarray:
    """One early detector's scores (n,) on a step view (:func:`step_view`), by its registered function, with its
    window ``T`` (ignored by a detector without one). Raises ValueError for a detector that cannot run early."""
    entry = DETECTORS[detector]
    if entry.name not in early_detector_names():
        raise ValueError(f"detector {detector!r} cannot run before the last step (early detectors: "
                         f"{', '.join(early_detector_names())})")
    mask = view.mask(layers) if "mask" in entry.inputs else None
    return np.asarray(entry.fn(**view.inputs(entry, layers, T if entry.uses_T else 0, mask)))


def load_step_maps(store: TraceStore, generations: list[Generation],
                   steps: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """End-token maps at each 0-based step of ``steps``, stacked over the generations in ``detection.load``'s
    order: step -> layer -> (n, h_l, w_l). Raises KeyError naming the step a trace did not record."""
    stacked: dict[int, dict[str, list]] = {k: {} for k in steps}
    for gen in generations:
        for seed in gen.seeds:
            trace = store.read(gen.key, seed)
            for k in steps:
                for layer, m in trace.end_maps_at(k).items():
                    stacked[k].setdefault(layer, []).append(m)
    return {k: {layer: np.stack(v) for layer, v in maps.items()} for k, maps in stacked.items()}


def windows_at(step: int, windows: list[int]) -> list[int]:
    """LD's step windows at step k: 1 (the first step's D, Wen's and BE's best window) and each T of ``windows``
    capped at k + 1 (a T past step k is "every step so far"), without repeats."""
    return sorted({1} | {min(T, step + 1) for T in windows})


def score_by_step(arrays: TraceArrays, step_maps: dict[int, dict[str, np.ndarray]],
                  layer_sets: dict[str, list[str]], windows: list[int]) -> pd.DataFrame:
    """Every early detector (:func:`early_detectors`) on each step's view of the traces (:func:`step_view`), per
    generation, in long format: ``detection.score_grid`` of that view.

    Columns: ``arrays.rows``' (prompt_id, kind, memorized, seed), step, detector, layers, T (0 for a detector
    without a window), score. ``step`` is 0-based; the T values are :func:`windows_at` of that step."""
    parts = []
    detectors = early_detectors()
    for step, maps in sorted(step_maps.items()):
        table = score_grid(step_view(arrays.delta_sq, maps, step, arrays.rows), layer_sets,
                           windows_at(step, windows), detectors)
        table.insert(len(arrays.rows.columns), "step", step)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def detection_by_step(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """``detection.detection_table`` (AUC, TPR@1%FPR, F1 with intervals) for each step of :func:`score_by_step`."""
    return pd.concat([detection_table(part.drop(columns="step"), n_boot, seed).assign(step=step)
                      for step, part in scores.groupby("step", sort=True)], ignore_index=True)


def localization_by_step(step_maps: dict[int, dict[str, np.ndarray]], prompt_ids: list[str], truth: dict[str, Truth],
                         layer_sets: dict[str, list[str]], rule: str = "otsu") -> pd.DataFrame:
    """``localization.localization_table`` of each step's BE masks (IoU, pixel AUROC, unrelated-mask control)."""
    parts = [evaluation.localization_table(maps, prompt_ids, truth, layer_sets, rule).assign(step=step)
             for step, maps in sorted(step_maps.items())]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return table if table.empty else table[~table.layers.str.startswith("all-ones")].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- early stopping

def check_signal(signal: dict, layer_sets: dict[str, list[str]], fprs: list[float]) -> None:
    """The early-stopping settings, checked before any sampling: one clear error naming the bad one."""
    choices = early_detector_names()
    if signal["detector"] not in choices:
        raise ValueError(f"early.signal.detector {signal['detector']!r} is not one of {', '.join(choices)} (the "
                         "detectors that read the BE mask)")
    if signal["layers"] not in layer_sets:
        raise ValueError(f"early.signal.layers {signal['layers']!r} is not a layer set: {', '.join(layer_sets)}")
    if signal.get("T") is not None and int(signal["T"]) < 1:
        raise ValueError(f"early.signal.T={signal.get('T')} must be >= 1")
    bad = [f for f in fprs if not 0 <= f < 1]
    if bad:
        raise ValueError(f"early.fpr {bad} outside [0, 1)")


def calibration_split(prompt_ids: pd.Series, memorized: pd.Series) -> np.ndarray:
    """True for the generations of the non-memorized prompts that calibrate thresholds: every other one of the
    sorted non-memorized prompt ids (the first, third, ...). The other half counts the false stops."""
    negatives = sorted(set(prompt_ids[~memorized.astype(bool)]))
    if len(negatives) < 2:
        raise ValueError(f"early stopping needs at least 2 non-memorized prompts to calibrate and evaluate on, got "
                         f"{len(negatives)}")
    return prompt_ids.isin(negatives[::2]).to_numpy()


def calibrate(negatives: np.ndarray, fpr: float) -> float:
    """The threshold t that stops (``score > t``) at most a fraction ``fpr`` of the calibration negatives, placed
    halfway between the scores it separates, so that no calibration score sits on it (a score recomputed in another
    precision or batch, as the in-loop sampler does, then falls on the same side). With the negatives sorted
    descending and m = floor(fpr * n): t = (s[m] + s[m-1]) / 2, the midpoint between the largest score kept and the
    smallest one stopped; for m = 0, s[0] + (s[0] - s[1]) / 2 (the same margin above the largest); s[0] alone when
    there is one negative. Tied scores at the boundary are all kept (t = s[m]), so at most m are stopped. Scores are
    oriented so that higher = memorized."""
    s = np.sort(np.asarray(negatives, dtype=float))[::-1]
    if s.size == 0 or not 0 <= fpr < 1:
        raise ValueError(f"calibrate: need negatives and 0 <= fpr < 1 (got {s.size} scores, fpr={fpr})")
    m = int(np.floor(fpr * s.size))
    kept = s[m]
    if m > 0:
        return float((kept + s[m - 1]) / 2)
    return float(kept + (kept - s[1]) / 2) if s.size > 1 else float(kept)


def caught(stopped: np.ndarray, memorized: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """``caught``: the fraction of memorized generations stopped, and ``caught_<kind>`` for each memorization kind
    (all (n,) arrays over the same generations; at least one memorized)."""
    out = {"caught": float(stopped[memorized].mean())}
    return out | {f"caught_{kind}": float(stopped[memorized & (kinds == kind)].mean())
                  for kind in sorted(set(kinds[memorized]))}


def early_stopping(scores: pd.DataFrame, detector: str, layers: str, T: int, fprs: list[float],
                   n_steps: int) -> pd.DataFrame:
    """For each recorded step k and target FPR: calibrate the threshold, stop the generations above it.

    ``scores``: :func:`score_by_step`'s table; the signal is ``detector`` on ``layers`` with window min(T, k + 1)
    (T ignored for a detector without a window, e.g. BE intensity). Per row: step (0-based), fpr_target,
    threshold, calibration_fpr (in-sample),
    false_stop_rate (evaluation negatives stopped), caught (memorized generations stopped; also ``caught_<kind>``
    per memorization kind), steps_saved_mean (per generation, over memorized + evaluation negatives) and
    steps_saved_fraction (of all their steps), n_memorized, n_eval_negatives, n_calibration."""
    if detector not in early_detector_names():
        raise ValueError(f"early stopping signal {detector!r} is not one of {', '.join(early_detector_names())}")
    sign = 1.0 if DETECTORS[detector].higher_is_memorized else -1.0
    windowed = DETECTORS[detector].uses_T
    rows = []
    for step, part in scores[(scores.detector == detector) & (scores.layers == layers)].groupby("step", sort=True):
        window = min(T, step + 1) if windowed else 0
        part = part[part["T"] == window].reset_index(drop=True)
        if part.empty:
            raise ValueError(f"no {detector}[{layers}] T={window} scores at step {step}")
        value = sign * part.score.to_numpy()
        calib = calibration_split(part.prompt_id, part.memorized)
        memorized = part.memorized.to_numpy(bool)
        evaluated = ~calib
        for fpr in fprs:
            threshold = calibrate(value[calib], fpr)
            stop = value > threshold
            saved = np.where(stop, n_steps - (step + 1), 0)[evaluated]
            row = {"step": step, "fpr_target": fpr, "threshold": sign * threshold,
                   "calibration_fpr": float(stop[calib].mean()),
                   "false_stop_rate": float(stop[evaluated & ~memorized].mean()),
                   **caught(stop, memorized, part.kind.to_numpy())}
            row |= {"steps_saved_mean": float(saved.mean()), "steps_saved_fraction": float(saved.sum()
                                                                                          / (saved.size * n_steps)),
                    "n_memorized": int(memorized.sum()), "n_eval_negatives": int((evaluated & ~memorized).sum()),
                    "n_calibration": int(calib.sum())}
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ one job

def job_results(store: TraceStore, generations: list[Generation], arrays: TraceArrays, recorded: list[int],
                n_steps: int, layer_sets: dict[str, list[str]], signal: dict, fprs: list[float],
                n_boot: int = 1000, truth: dict[str, Truth] | None = None, rule: str = "otsu") -> dict:
    """What the detection job adds to metrics.json: ``early_detection`` (:func:`detection_by_step` of every early
    detector per layer set, a windowed one, e.g. LD, with T = 1, T = k + 1 (every step so far) and the signal's T),
    ``early_stopping`` (:func:`early_stopping` with ``signal`` = {detector, layers, T; T None: every step so far}),
    and where ground-truth masks exist ``early_localization`` (:func:`localization_by_step`) and
    ``localization_leaderboard`` (``localization.job_leaderboard``: every registered localizer, with each end-map
    localizer's earlier-step masks on the first layer set and the oracle best word where token maps were stored).
    ``recorded``: the steps of ``sampler.end_map_steps``; the final step is always added. Without earlier steps only
    the leaderboard (where masks exist)."""
    steps = sorted(set(recorded) - {n_steps - 1})
    window = n_steps if signal.get("T") is None else int(signal["T"])  # T None: every step so far
    out: dict = {}
    step_maps = (load_step_maps(store, generations, steps) if steps else {}) | {n_steps - 1: arrays.end_maps}
    if steps:
        scores = score_by_step(arrays, step_maps, layer_sets, [window, n_steps])
        out["early_detection"] = detection_by_step(scores, n_boot).to_dict(orient="records")
        out["early_stopping"] = early_stopping(scores, signal["detector"], signal["layers"], window, fprs,
                                               n_steps).to_dict(orient="records")
    masked = [t.mask for t in (truth or {}).values() if t.mask is not None]
    if masked:
        ids = list(arrays.rows.prompt_id)
        if steps:
            out["early_localization"] = localization_by_step(step_maps, ids, truth, layer_sets, rule).to_dict("records")
        first, first_layers = next(iter(layer_sets.items()))
        size = masked[0].shape
        extra = {f"{localizer.name} [{first}] @ step {k}": localizer.fn(end_maps=step_maps[k], layers=first_layers,
                                                                          size=size)
                 for localizer in evaluation.end_map_localizers() for k in steps}
        if arrays.token_maps:
            extra["oracle best word"] = evaluation.oracle_word_maps(arrays.token_maps, arrays.end_index, first_layers,
                                                                    size)
        board = evaluation.job_leaderboard(arrays, truth, layer_sets, rule, n_boot, extra)
        out["localization_leaderboard"] = board.to_dict(orient="records")
    return out
