"""Localization and copying, where ground truth is known (the testbed; any set with training images and masks).

- Localization: the BE mask of each generation against the copied region's ground-truth mask, as pixel AUROC
  (threshold-free) and IoU after a stated binarisation, with the all-ones mask as the floor.
- Copying: distance of each generation to its training image (inside the mask where there is one), against the
  nearest training image for never-trained prompts, and how alike a prompt's generations are inside vs outside.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import f1_score, precision_recall_curve

from benchmark.data.prompts import Truth
from benchmark.detectors import scores
from benchmark.measures.metrics import binarize, iou, pixel_auroc
from benchmark.measures.similarity import pixel_LS, pixel_S
from benchmark.registry import LOCALIZERS

__all__ = ["Truth"]  # defined with the prompt sets that carry it; imported from here too


def truth_split(prompt_ids: list[str], truth: dict[str, Truth]):
    """The generations a localization is scored on: ``picked`` (indices of those whose prompt has a ground-truth
    mask) with their ``masks`` (k, H, W), and the never-trained ``unrelated`` ones with ``others``, one planted mask
    each, the distinct masks in turn (the control: every mask used about equally often at a fraction of the cost
    of all pairs). None when no generation has a mask."""
    picked = [i for i, p in enumerate(prompt_ids) if p in truth and truth[p].mask is not None]
    if not picked:
        return None
    masks = np.stack([truth[prompt_ids[i]].mask for i in picked])
    unrelated = [i for i, p in enumerate(prompt_ids) if p not in truth]
    distinct = np.unique(masks, axis=0)
    return picked, masks, unrelated, distinct[np.arange(len(unrelated)) % len(distinct)]


def localization_table(end_maps: dict[str, np.ndarray], prompt_ids: list[str], truth: dict[str, Truth],
                       layer_sets: dict[str, list[str]], rule: str = "otsu",
                       maps: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Mean IoU and pixel AUROC over the generations whose prompt has a ground-truth mask: each end-map localizer
    (:func:`end_map_localizers`: the BE mask) per layer set (``layers`` = the set, ``localizer`` = its name), then
    each other localizer in ``maps`` (name -> (n, h, w), :func:`localizer_maps`; its NaN rows are left out), then
    the all-ones floor. Scored by the same function as :func:`localization_leaderboard` (:func:`_map_scores`).

    ``control_*``: the same scores for the generations of never-trained prompts against the ground-truth masks
    (unrelated to them). A map with a spatial bias (brighter centre, say) scores above 0.5 there: the floor a
    localization has to beat, where the all-ones mask only gives 0.5."""
    split = truth_split(prompt_ids, truth)
    if split is None:
        return pd.DataFrame()
    size = split[1].shape[-2:]
    sources: list[tuple[str, str, Maps]] = [
        (set_name, entry.name, _end_map_maps(entry, end_maps, layers, size))
        for entry in end_map_localizers() for set_name, layers in layer_sets.items()]
    sources += [(name, name, scores.resize_maps(np.asarray(m, dtype=np.float32), tuple(size)))
                for name, m in (maps or {}).items()]
    sources.append(("all-ones (floor)", "floor", np.ones((len(prompt_ids),) + tuple(size))))
    rows = []
    for name, localizer, m in sources:
        (iou_, auroc_, n), (c_iou, c_auroc, n_control) = _map_scores(m, split, len(prompt_ids), rule)
        row = {"layers": name, "localizer": localizer, "binarisation": rule,
               "iou": float(np.mean(iou_)), "iou_sd": float(np.std(iou_)),
               "pixel_auroc": float(np.mean(auroc_)), "n": n}
        if split[2]:  # each never-trained generation against one planted mask (truth_split)
            row |= {"control_iou": float(np.mean(c_iou)), "control_auroc": float(np.mean(c_auroc)),
                    "n_control": n_control}
        rows.append(row)
    return pd.DataFrame(rows)


def _end_map_maps(entry, end_maps: dict[str, np.ndarray], layers: list[str], size) -> Maps:
    """An end-map localizer's maps of the generations asked for, computed for those only (``Maps`` callable)."""
    return lambda rows, targets: entry.fn(end_maps={k: v[rows] for k, v in end_maps.items()}, layers=layers,
                                          size=tuple(size))


def _map_scores(m: Maps, split, n: int, rule: str):
    """One localizer's per-generation scores, the core of every localization table: ``((ious, aurocs, k),
    (control_ious, control_aurocs, k_control))`` on the ground-truth generations its map covers (non-NaN rows;
    :func:`_mask_scores` against their masks) and on the never-trained ones against the planted masks in turn
    (``split`` = :func:`truth_split`); empty lists where it covers none."""
    picked, masks, unrelated, others = split
    covered = _computed(m, n)

    def scored(index: list[int], targets: np.ndarray):
        mine = [k for k, i in enumerate(index) if covered[i]]
        if not mine:
            return [], [], 0
        rows = [index[k] for k in mine]
        soft = m(rows, targets[mine]) if callable(m) else np.asarray(m)[rows]
        return (*_mask_scores(soft, targets[mine], rule), len(rows))
    return scored(picked, masks), scored(unrelated, others)


def localizer_maps(arrays) -> dict[str, np.ndarray]:
    """The maps (n, h, w) of every registered localizer without a layer set whose trace fields ``arrays`` (a
    ``detection.TraceArrays``) has, by localizer name: e.g. ``score_difference`` always, ``curvature`` when its
    extra pass ran (NaN rows where it did not)."""
    return {e.name: e(**arrays.inputs(e, None, 0, None)) for e in LOCALIZERS.entries()
            if not e.uses_layers and all(arrays.has(f) for f in e.trace_fields)}


def _computed(source, n: int) -> np.ndarray:
    """(n,) bool: the generations a map source covers (a map array's non-NaN rows; layer sets cover all)."""
    if isinstance(source, np.ndarray):
        return np.isfinite(source.reshape(len(source), -1)).all(axis=1)
    return np.ones(n, bool)


def _mask_scores(soft: np.ndarray, truths: np.ndarray, rule: str) -> tuple[list[float], list[float]]:
    """Per pair: IoU after binarisation (a constant map counts as all-ones) and pixel AUROC (0.5 if constant)."""
    ious = [iou(binarize(m, rule) if m.std() > 0 else np.ones(m.shape, bool), t) for m, t in zip(soft, truths)]
    return ious, list(pixel_aurocs(soft, truths))


def pixel_aurocs(soft: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """``metrics.pixel_auroc`` of many (mask, truth) pairs at once: (n, H, W) x (n, H, W) -> (n,).

    The Mann-Whitney form with mid-ranks for ties, which equals the trapezoidal ROC AUC (0.5 for a constant mask);
    one vectorised rank per mask instead of a ROC per pair keeps leaderboards over hundreds of generations cheap.
    Raises ValueError for a truth mask that is all one class."""
    soft = np.asarray(soft, dtype=np.float64).reshape(len(soft), -1)
    truths = np.asarray(truths, dtype=bool).reshape(len(truths), -1)
    n_pos = truths.sum(axis=1)
    n_neg = truths.shape[1] - n_pos
    if ((n_pos == 0) | (n_neg == 0)).any():
        raise ValueError(f"pixel AUROC: truth mask {int(np.argmax((n_pos == 0) | (n_neg == 0)))} is all one class")
    ranks = rankdata(soft, axis=1)  # average ranks of ties
    return ((ranks * truths).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def token_roles(end_index: int, n_tokens: int) -> list[str]:
    return ["start" if i == 0 else "word" if i < end_index else "end" if i == end_index else "padding"
            for i in range(n_tokens)]


def token_table(token_maps: dict[str, np.ndarray], end_index: np.ndarray, prompt_ids: list[str],
                truth: dict[str, Truth], layers: list[str]) -> pd.DataFrame:
    """Which tokens' final-step maps localize the copied region: pixel AUROC against the planted mask, per token
    role (start, word, end, padding; mean over a role's tokens) and for the best word, mean over generations."""
    picked = [i for i, p in enumerate(prompt_ids) if p in truth and truth[p].mask is not None]
    if not picked or not token_maps:
        return pd.DataFrame()
    size = truth[prompt_ids[picked[0]]].mask.shape
    chosen = scores.select_layers(list(token_maps), layers)
    rows = []
    for i in picked:
        maps = np.mean([scores.resize_maps(token_maps[layer][i], size) for layer in chosen], axis=0)  # (tokens, H, W)
        target = truth[prompt_ids[i]].mask
        aurocs = np.array([pixel_auroc(m, target) if m.std() > 0 else 0.5 for m in maps])
        roles = np.array(token_roles(int(end_index[i]), len(maps)))
        for role in ("start", "word", "end", "padding"):
            if (roles == role).any():
                rows.append({"role": role, "pixel_auroc": float(aurocs[roles == role].mean())})
        rows.append({"role": "best word", "pixel_auroc": float(aurocs[roles == "word"].max())})
    table = pd.DataFrame(rows).groupby("role", sort=False).pixel_auroc.agg(["mean", "std", "size"]).reset_index()
    return table.rename(columns={"mean": "pixel_auroc", "std": "sd", "size": "n"})


def rmse(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    diff = (a - b) ** 2
    if where is not None:
        diff = diff[:, where]
    return float(np.sqrt(diff.mean()))


def copy_table(images: list[np.ndarray], prompt_ids: list[str], kinds: list[str],
               truth: dict[str, Truth]) -> pd.DataFrame:
    """Per generation: distance to its own training image (in its region), or for a prompt without ground
    truth, to the nearest one of every kind (its chance level)."""
    rows = []
    for image, pid, kind in zip(images, prompt_ids, kinds):
        if pid in truth:
            t = truth[pid]
            rows.append({"prompt_id": pid, "kind": kind, "distance": rmse(image, t.image, t.mask)})
            continue
        for ref_kind in sorted({"global" if t.mask is None else "local" for t in truth.values()}):
            nearest = min(rmse(image, t.image, t.mask) for t in truth.values()
                          if (t.mask is None) == (ref_kind == "global"))
            rows.append({"prompt_id": pid, "kind": f"none vs {ref_kind}", "distance": nearest})
    return pd.DataFrame(rows)


def diversity_table(images: list[np.ndarray], prompt_ids: list[str], truth: dict[str, Truth]) -> pd.DataFrame:
    """Mean pairwise RMSE among a local prompt's generations inside and outside its region: a planted region
    that is copied while the rest is not shows low inside and high outside."""
    rows = []
    for pid in sorted(set(prompt_ids)):
        t = truth.get(pid)
        if t is None or t.mask is None:
            continue
        gens = [img for img, p in zip(images, prompt_ids) if p == pid]
        pairs = list(itertools.combinations(gens, 2))
        if pairs:
            rows.append({"prompt_id": pid, "inside": np.mean([rmse(a, b, t.mask) for a, b in pairs]),
                         "outside": np.mean([rmse(a, b, ~t.mask) for a, b in pairs])})
    return pd.DataFrame(rows)


def similarity_table(images: list[np.ndarray], end_maps: dict[str, np.ndarray], prompt_ids: list[str],
                     kinds: list[str], truth: dict[str, Truth], layers: list[str]) -> pd.DataFrame:
    """Per generation, the BE paper's S and LS (``benchmark.measures.similarity``; LS with the generation's own BE mask)
    to its training image; a prompt without one is compared with every training image of each memorization kind
    and keeps the closest, so it is a negative for each kind."""
    size = images[0].shape[-2:]
    masks = scores.be_mask(end_maps, layers, size)
    by_kind = {k: [t.image for t in truth.values() if (t.mask is None) == (k == "global")] for k in ("global", "local")}
    rows = []
    for image, mask, pid, kind in zip(images, masks, prompt_ids, kinds):
        if pid in truth:
            rows.append({"prompt_id": pid, "kind": kind, "memorized": True, "S": pixel_S(image, truth[pid].image),
                         "LS": pixel_LS(image, truth[pid].image, mask)})
            continue
        for ref_kind, refs in by_kind.items():
            if refs:
                rows.append({"prompt_id": pid, "kind": f"none vs {ref_kind}", "memorized": False,
                             "S": max(pixel_S(image, r) for r in refs),
                             "LS": max(pixel_LS(image, r, mask) for r in refs)})
    return pd.DataFrame(rows)


def similarity_f1(table: pd.DataFrame, threshold: float = -50.0) -> pd.DataFrame:
    """Table 2 of the BE paper on ground truth: F1 of "similarity > threshold" as the memorization call, per
    kind (its generations vs the negatives compared with its training images), and the best F1 over thresholds."""
    rows = []
    for kind in ("global", "local"):
        part = table[(table.kind == kind) | (table.kind == f"none vs {kind}")]
        if part.empty or part.memorized.all() or not part.memorized.any():
            continue
        for metric in ("S", "LS"):
            precision, recall, _ = precision_recall_curve(part.memorized, part[metric])
            best = np.nanmax(2 * precision * recall / np.maximum(precision + recall, 1e-12))
            rows.append({"metric": metric, "kind": kind, "threshold": threshold,
                         "f1": f1_score(part.memorized, part[metric] > threshold), "best_f1": float(best),
                         "n_pos": int(part.memorized.sum()), "n_neg": int((~part.memorized).sum())})
    return pd.DataFrame(rows)


def evaluate(end_maps: dict[str, np.ndarray], images: list[np.ndarray], prompt_ids: list[str], kinds: list[str],
             truth: dict[str, Truth], layer_sets: dict[str, list[str]], rule: str = "otsu",
             maps: dict[str, np.ndarray] | None = None) -> dict[str, pd.DataFrame]:
    """Every ground-truth table of one job (``maps``: other localizers' maps, :func:`localization_table`)."""
    similarity = similarity_table(images, end_maps, prompt_ids, kinds, truth, next(iter(layer_sets.values())))
    return {"localization": localization_table(end_maps, prompt_ids, truth, layer_sets, rule, maps),
            "copying": copy_table(images, prompt_ids, kinds, truth),
            "diversity": diversity_table(images, prompt_ids, truth),
            "similarity_f1": similarity_f1(similarity)}


def summarise(tables: dict[str, pd.DataFrame]) -> dict:
    """The ground-truth tables as plain values for metrics.json."""
    out = {"localization": tables["localization"].to_dict(orient="records"),
           "similarity_f1": tables["similarity_f1"].to_dict(orient="records")}
    copies = tables["copying"]
    if not copies.empty:
        out["copy_distance_median"] = copies.groupby("kind")["distance"].median().round(4).to_dict()
    diversity = tables["diversity"]
    if not diversity.empty:
        out["local_diversity_mean"] = diversity[["inside", "outside"]].mean().round(4).to_dict()
    return out


def mask_gallery(images: list[np.ndarray], soft_masks: np.ndarray, truths: list[np.ndarray],
                 scale: int = 4) -> np.ndarray:
    """Rows of (generated image | BE mask over it | ground-truth region over it), (H, W, 3) in [0, 1]."""
    rows = []
    for image, soft, truth in zip(images, soft_masks, truths):
        rgb = image.transpose(1, 2, 0)
        heat = (soft - soft.min()) / max(float(np.ptp(soft)), 1e-12)
        be = 0.4 * rgb + 0.6 * np.stack([heat, heat * 0.6, 1 - heat], -1)
        gt = 0.5 * rgb + 0.5 * np.stack([truth, truth, truth * 0], -1).astype(float)
        rows.append(np.concatenate([rgb, be, gt], 1))
    grid = np.concatenate(rows, 0)
    return grid.repeat(scale, 0).repeat(scale, 1)


def gallery(end_maps: dict[str, np.ndarray], prompt_ids: list[str], images: list[np.ndarray],
            truth: dict[str, Truth], layers: list[str], n: int = 6) -> np.ndarray | None:
    """The mask gallery of up to n local-memorization generations (every 4th, to span several prompts)."""
    picked = [i for i, p in enumerate(prompt_ids) if p in truth and truth[p].mask is not None][::4][:n]
    if not picked:
        return None
    size = truth[prompt_ids[picked[0]]].mask.shape
    soft = scores.be_mask({k: v[picked] for k, v in end_maps.items()}, layers, size)
    return mask_gallery([images[i] for i in picked], soft, [truth[prompt_ids[i]].mask for i in picked])


# ------------------------------------------------------------------------------- localization leaderboard

Maps = np.ndarray | Callable[[list[int], np.ndarray], np.ndarray]
"""Soft masks of every generation, (n, H, W) at the ground-truth size, or a function ``(rows, targets) -> (len(rows),
H, W)`` for a localizer that chooses its map knowing the target mask (the oracle best word)."""


def leaderboard_maps(end_maps: dict[str, np.ndarray], layer_sets: dict[str, list[str]], size: tuple[int, int],
                     extra: dict[str, Maps] | None = None) -> dict[str, Maps]:
    """The leaderboard's localizers: every registered localizer that reads only ``end_maps`` / ``layers`` / ``size``
    (``BE``), per layer set as ``<name> [<set>]``; then ``extra`` (maps a job computed elsewhere: early-step BE, a
    registered localizer reading other traces); then the all-ones floor."""
    out: dict[str, Maps] = {}
    for entry in end_map_localizers():
        for set_name, layers in layer_sets.items():
            out[f"{entry.name} [{set_name}]"] = entry.fn(end_maps=end_maps, layers=layers, size=size)
    out |= extra or {}
    n = len(next(iter(end_maps.values())))
    out["all-ones (floor)"] = np.ones((n,) + tuple(size))
    return out


def end_map_localizers() -> list:
    """The registered localizers that read a layer set's end-token maps and nothing else (``BE``, a plug-in's
    variant of it): those scored per layer set, also on an earlier step's maps. Registry order."""
    return [e for e in LOCALIZERS.entries() if e.uses_layers and set(e.trace_fields) <= {"end_maps"}]


def job_leaderboard(arrays, truth: dict[str, Truth], layer_sets: dict[str, list[str]], rule: str = "otsu",
                    n_boot: int = 1000, extra: dict[str, Maps] | None = None) -> pd.DataFrame:
    """A job's localization leaderboard (:func:`localization_leaderboard`) over every registered localizer:
    those of :func:`end_map_localizers` per layer set, then ``extra`` (maps only the job has: an earlier step's BE
    mask, the oracle best word), then each layer-set-free localizer whose trace fields ``arrays`` (a
    ``detection.TraceArrays``) has (NaN rows where an extra pass did not run), then the all-ones floor; all at the
    ground-truth masks' size. The unrelated-mask control row is that of the first end-map localizer on the first
    layer set. Empty without a ground-truth mask."""
    masked = [t.mask for t in truth.values() if t.mask is not None]
    if not masked:
        return pd.DataFrame()
    size = masked[0].shape
    others = {name: scores.resize_maps(maps.astype(np.float32), size) for name, maps in localizer_maps(arrays).items()}
    maps = leaderboard_maps(arrays.end_maps, layer_sets, size, {**(extra or {}), **others})
    first = next(iter(layer_sets))
    control = next((f"{e.name} [{first}]" for e in end_map_localizers()), None)
    return localization_leaderboard(maps, list(arrays.rows.prompt_id), truth, rule, n_boot, control_of=control)


def oracle_word_maps(token_maps: dict[str, np.ndarray], end_index: np.ndarray, layers: list[str],
                     size: tuple[int, int]) -> Maps:
    """The upper reference: per generation, the final-step map of the word token (between start and end tokens)
    with the highest pixel AUROC against the target mask, mean over ``layers``. It reads the answer to choose, so
    no detector can reach it; it shows how much of the copy some token's attention finds."""
    chosen = scores.select_layers(list(token_maps), layers)

    def pick(rows: list[int], targets: np.ndarray) -> np.ndarray:
        out = []
        for i, target in zip(rows, targets):
            maps = np.mean([scores.resize_maps(token_maps[layer][i], size) for layer in chosen], axis=0)
            words = maps[1:int(end_index[i])]
            if len(words) == 0:
                raise ValueError(f"generation {i} has no word token (end index {end_index[i]})")
            out.append(words[int(np.argmax(pixel_aurocs(words, np.broadcast_to(target, words.shape))))])
        return np.stack(out)
    return pick


def _interval(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile 95% interval of the mean over generations, resampling generations (as ``metrics``' bootstrap)."""
    if not n_boot or len(values) < 2:
        return float("nan"), float("nan")
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def localization_leaderboard(maps: dict[str, Maps], prompt_ids: list[str], truth: dict[str, Truth],
                             rule: str = "otsu", n_boot: int = 1000, seed: int = 0,
                             control_of: str | None = None) -> pd.DataFrame:
    """Every localizer on the same generations: mean IoU (after ``rule``) and pixel AUROC with bootstrap 95%
    intervals, over the generations whose prompt has a ground-truth mask (a map array with NaN rows, e.g. an extra
    pass run on each prompt's first image, on the generations it covers: its ``n`` says how many; a localizer
    covering none of them has no row); ``control_iou`` / ``control_auroc``: the
    same on never-trained generations against the planted masks in turn (as :func:`localization_table`). The row
    ``unrelated-mask control: <control_of>`` repeats that control, with intervals, as a row of its own.

    Returns an empty table when no generation has a mask."""
    split = truth_split(prompt_ids, truth)
    if split is None:
        return pd.DataFrame()
    rng = np.random.default_rng(seed)
    rows = []

    def row(name: str, ious: list[float], aurocs: list[float], n: int) -> dict:
        (ilo, ihi), (alo, ahi) = _interval(np.array(ious), n_boot, rng), _interval(np.array(aurocs), n_boot, rng)
        return {"localizer": name, "binarisation": rule, "iou": float(np.mean(ious)), "iou_lo": ilo, "iou_hi": ihi,
                "pixel_auroc": float(np.mean(aurocs)), "pixel_auroc_lo": alo, "pixel_auroc_hi": ahi, "n": n}

    control = None
    for name, m in maps.items():
        (ious, aurocs, n), (c_iou, c_auroc, n_control) = _map_scores(m, split, len(prompt_ids), rule)
        if not n:
            continue
        r = row(name, ious, aurocs, n)
        if n_control:
            r |= {"control_iou": float(np.mean(c_iou)), "control_auroc": float(np.mean(c_auroc)),
                  "n_control": n_control}
            if name == control_of:
                control = row(f"unrelated-mask control: {name}", c_iou, c_auroc, n_control)
        rows.append(r)
    if control is not None:
        rows.append(control)
    return pd.DataFrame(rows)
