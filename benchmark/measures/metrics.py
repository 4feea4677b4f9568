"""Detection and localization metrics, each detection metric with a stratified bootstrap 95% interval.

TPR@1%FPR follows Wen et al.'s code: the TPR of the last ROC point whose FPR is strictly below 1%.
"""
from __future__ import annotations

import numpy as np


def _check(labels, scores, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"{what}: {scores.shape} scores for {labels.shape} labels")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"{what}: {bad.size} non-finite values (first at position {bad[0]}: {scores[bad[0]]})")
    if labels.all() or not labels.any():
        raise ValueError(f"{what}: need both positives and negatives, got {labels.sum()} of {labels.size}")
    return labels, scores


def _metric_rows(labels: np.ndarray, scores: np.ndarray, fpr_target: float = 0.01) -> dict[str, np.ndarray]:
    """AUC, TPR@FPR and best F1 for each row of (replicates, n) arrays: one sort serves all three.

    The results equal sklearn's roc_auc_score, roc_curve (drop_intermediate=True, as Wen's code calls it) and
    precision_recall_curve row by row (tests hold them to that). Whole rows at once, not a Python loop over
    replicates, keep a 1000-replicate bootstrap of every sweep cell cheap.
    """
    rows, n = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, 1)
    tps = np.cumsum(np.take_along_axis(labels, order, 1), axis=1)
    fps = np.arange(1, n + 1) - tps
    n_pos, n_neg = tps[:, -1:], fps[:, -1:]
    # A ROC point ends each run of tied scores; prev/next: the neighbouring points' positions (-1: the origin).
    point = np.ones((rows, n), bool)
    point[:, :-1] = ranked[:, 1:] != ranked[:, :-1]
    at = np.arange(n)
    prev = np.c_[np.full(rows, -1), np.maximum.accumulate(np.where(point, at, -1), axis=1)[:, :-1]]
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(point, at, n), 1), axis=1), 1)
    nxt = np.c_[nxt[:, 1:], np.full(rows, n)]

    def value_at(values, where):  # the origin (-1) is 0; past the end (n) only matters for the last point, kept
        return np.where(where < 0, 0, np.take_along_axis(values, np.clip(where, 0, n - 1), 1))

    tp_prev, fp_prev = value_at(tps, prev), value_at(fps, prev)
    # trapezoids between consecutive points; collinear points add nothing, so dropping them would not change it
    auc = np.where(point, (fps - fp_prev) * (tps + tp_prev), 0).sum(1) / (2 * n_pos[:, 0] * n_neg[:, 0])
    # drop_intermediate keeps the first and last points and every corner (a non-zero second difference)
    tp_next, fp_next = value_at(tps, nxt), value_at(fps, nxt)
    corner = (tp_next - 2 * tps + tp_prev != 0) | (fp_next - 2 * fps + fp_prev != 0)
    kept = point & (corner | (prev < 0) | (nxt >= n))
    tpr = np.where(kept & (fps / n_neg < fpr_target), tps, 0).max(1) / n_pos[:, 0]
    f1 = np.where(point, 2 * tps / (tps + fps + n_pos), 0).max(1)
    return {"auc": auc, "tpr_at_1pct_fpr": tpr, "f1": f1}


def _all_metrics(labels: np.ndarray, scores: np.ndarray, fpr_target: float = 0.01) -> dict[str, float]:
    return {name: float(v[0]) for name, v in _metric_rows(labels[None], scores[None], fpr_target).items()}


def roc_auc(labels, scores) -> float:
    return _all_metrics(*_check(labels, scores))["auc"]


def tpr_at_fpr(labels, scores, fpr: float = 0.01) -> float:
    """Wen et al.'s rule: TPR at the last ROC point with FPR strictly below ``fpr``."""
    return _all_metrics(*_check(labels, scores), fpr_target=fpr)["tpr_at_1pct_fpr"]


def best_f1(labels, scores) -> float:
    """F1 at the best threshold."""
    return _all_metrics(*_check(labels, scores))["f1"]


def detection_metrics(labels, scores, n_boot: int = 1000, seed: int = 0, what: str = "scores") -> dict[str, float]:
    """AUC, TPR@1%FPR and F1 with ``<name>_lo`` / ``<name>_hi`` bootstrap 95% bounds.

    The bootstrap resamples positives and negatives separately, so every replicate has both classes.
    """
    labels, scores = _check(labels, scores, what)
    out: dict[str, float] = _all_metrics(labels, scores)
    names = list(out)
    out["n_pos"], out["n_neg"] = int(labels.sum()), int((~labels).sum())
    if n_boot:
        rng = np.random.default_rng(seed)
        pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
        reps: dict[str, list] = {name: [] for name in names}
        chunk = max(1, 2**21 // labels.size)  # replicates per batch: bounds memory for large score sets
        for start in range(0, n_boot, chunk):
            k = min(chunk, n_boot - start)
            idx = np.concatenate([rng.choice(pos, (k, pos.size)), rng.choice(neg, (k, neg.size))], axis=1)
            for name, values in _metric_rows(labels[idx], scores[idx]).items():
                reps[name].append(values)
        for name in names:
            lo, hi = np.percentile(np.concatenate(reps[name]), [2.5, 97.5])
            out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out


# ----------------------------------------------------------------------------------------------- localization

def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a histogram."""
    hist, edges = np.histogram(values.ravel(), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.clip(w0, 1, None)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.clip(w1, 1, None)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][np.argmax(between)])


def binarize(mask: np.ndarray, rule: str = "otsu") -> np.ndarray:
    """Binarise one soft mask: ``otsu`` (per mask), ``mean`` (above the mask's mean) or ``top:<fraction>``."""
    if rule == "otsu":
        return mask > otsu_threshold(mask)
    if rule == "mean":
        return mask > mask.mean()
    if rule.startswith("top:"):
        fraction = float(rule.split(":", 1)[1])
        return mask >= np.quantile(mask, 1 - fraction)
    raise ValueError(f"unknown binarisation rule {rule!r} (otsu, mean, top:<fraction>)")


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    union = (predicted | truth).sum()
    return float((predicted & truth).sum() / union) if union else 1.0


def pixel_auroc(mask: np.ndarray, truth: np.ndarray) -> float:
    """How well the soft mask ranks ground-truth pixels above the rest (0.5 = chance)."""
    return roc_auc(truth.ravel().astype(bool), mask.ravel())
