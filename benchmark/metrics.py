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


def _ranked(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives above each distinct threshold, highest first (sklearn's binary curve)."""
    order = np.argsort(-scores, kind="mergesort")
    ranked = scores[order]
    cut = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    tps = np.cumsum(labels[order])[cut]
    return tps, cut + 1 - tps


def _all_metrics(labels: np.ndarray, scores: np.ndarray, fpr_target: float = 0.01) -> dict[str, float]:
    # One sort serves all three metrics, which makes a 1000-replicate bootstrap affordable. The results equal
    # sklearn's roc_auc_score, roc_curve (drop_intermediate=True, as Wen's code calls it) and
    # precision_recall_curve; tests hold them to that.
    tps, fps = _ranked(labels, scores)
    n_pos, n_neg = tps[-1], fps[-1]
    keep = (np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True] if len(tps) > 2
            else np.ones(len(tps), bool))  # one or two distinct scores: every point is a corner
    tpr, fpr = np.r_[0, tps[keep]] / n_pos, np.r_[0, fps[keep]] / n_neg
    auc = float(np.trapezoid(tpr, fpr))
    f1 = 2 * tps / (tps + fps + n_pos)  # = 2PR/(P+R) with P = tps/(tps+fps), R = tps/n_pos
    return {"auc": auc, "tpr_at_1pct_fpr": float(tpr[np.flatnonzero(fpr < fpr_target)[-1]]), "f1": float(f1.max())}


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
        reps = []
        for _ in range(n_boot):
            idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
            reps.append(_all_metrics(labels[idx], scores[idx]))
        for name in names:
            lo, hi = np.percentile([r[name] for r in reps], [2.5, 97.5])
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
