"""The report's figures, each a base64 PNG for the self-contained page, titled with the job it comes from.

Every value drawn is read from the job folder (metrics.json, generations.csv, masks.png) or a reference CSV.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.jobs.results import DetectionResult
from reports.job import early_signals
from reports.labels import detector_label, detector_order
from reports.tables import METRICS, published


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """The figure as base64 PNG (no timestamp in it, so reruns give the same bytes); closes it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def auc_vs_T_figure(ours: pd.DataFrame, job: str, metric: str = "auc", layers: str = "all") -> str:
    """``metric`` vs T at prompt level, one panel per subset, one line per detector with its 95% interval as
    error bars; detectors without a step window as horizontal lines (their interval shaded); the paper's Table 1
    values (SD v1-4, 50 steps) as open markers on the local and global panels."""
    plt = _pyplot()
    rows = ours[(ours.job == job) & (ours.level == "prompt")]
    chosen = layers if layers in set(rows.layers) else next((s for s in sorted(set(rows.layers)) if s), "")
    rows = rows[(rows.layers == chosen) | (rows.layers == "")]
    subsets = [s for s in ("all", "global", "local") if s in set(rows.subset)] + \
        sorted(set(rows.subset) - {"all", "global", "local"})
    ref = published("be2025_table1_detection.csv")
    fig, axes = plt.subplots(1, len(subsets), figsize=(4.6 * len(subsets), 3.8), sharey=True, squeeze=False)
    colors = dict(zip(detector_order(rows.detector.unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for ax, subset in zip(axes[0], subsets):
        part = rows[rows.subset == subset]
        for detector in detector_order(part.detector.unique()):
            line = part[part.detector == detector].sort_values("T")
            label = detector_label(detector) + (f" [{chosen}]" if line.layers.iloc[0] else "")
            lo, hi = line.get(f"{metric}_lo"), line.get(f"{metric}_hi")
            if (line["T"] > 0).any():
                err = None if lo is None or lo.isna().all() else [line[metric] - lo, hi - line[metric]]
                ax.errorbar(line["T"], line[metric], yerr=err, marker="o", capsize=3, label=label,
                            color=colors[detector])
            else:
                ax.axhline(line[metric].iloc[0], ls="--", lw=1, label=f"{label} (no T)", color=colors[detector])
                if lo is not None and not lo.isna().all():
                    ax.axhspan(lo.iloc[0], hi.iloc[0], alpha=0.08, color=colors[detector])
        paper = ref[ref.memorization_type == subset]
        for detector, points in paper.groupby("detector"):
            ax.plot(points["T"], points[metric], ls="none", marker="s", mfc="none", ms=7,
                    color=colors.get(detector, "black"), label=f"paper {detector_label(detector)} (SD v1-4)")
        ax.set_xscale("log")
        ax.set(title=f"{subset}", xlabel="T (first denoising steps, log scale)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{METRICS.get(metric, metric)} (prompt level, 95% CI)")
    seen = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=min(4, len(seen)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.035 * ((len(seen) - 1) // 4)))
    fig.suptitle(_wrap(f"{METRICS.get(metric, metric)} vs T — {job}", 110), fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.035 * ((len(seen) - 1) // 4), 1, 1))
    return png(fig)


def _direction(metrics: pd.DataFrame, detector: str, layers: str, T: int, prompt: pd.DataFrame) -> float:
    """+1 if higher scores mean memorized for this detector in this job, else -1: read from the job itself (the
    sign under which the job's own prompt-level AUC is reproduced), so no direction is assumed here."""
    from sklearn.metrics import roc_auc_score

    row = metrics[(metrics.detector == detector) & (metrics.layers == layers) & (metrics["T"] == T)
                  & (metrics.subset == "all") & (metrics.level == "prompt")]
    plus = roc_auc_score(prompt.memorized.astype(bool), prompt.score)
    if row.empty:
        return 1.0 if plus >= 0.5 else -1.0
    return 1.0 if abs(plus - row.auc.iloc[0]) <= abs(1 - plus - row.auc.iloc[0]) else -1.0


def roc_figure(gens: pd.DataFrame, metrics: pd.DataFrame, job: str, T: int, layers: str = "all") -> str:
    """Prompt-level ROC curves of every detector of one job (all memorized vs not), T and layer set as given
    (detectors without them at their only setting)."""
    plt = _pyplot()
    from sklearn.metrics import roc_curve

    metrics = metrics.assign(layers=metrics.layers.fillna(""))
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for detector in detector_order(gens.detector.unique()):
        part = gens[gens.detector == detector]
        sets = set(part.layers)
        use_layers = "" if sets == {""} else layers if layers in sets else min(sets)
        use_T = T if (part["T"] == T).any() else int(part["T"].min())
        rows = part[(part.layers == use_layers) & (part["T"] == use_T)]
        prompt = rows.groupby("prompt_id").agg(score=("score", "mean"), memorized=("memorized", "first"))
        if prompt.memorized.nunique() < 2:
            continue
        sign = _direction(metrics, detector, use_layers, use_T, prompt)
        fpr, tpr, _ = roc_curve(prompt.memorized.astype(bool), sign * prompt.score)
        ax.plot(fpr, tpr, label=detector_label(detector) + (f" [{use_layers}]" if use_layers else "")
                + (f" T={use_T}" if use_T else ""))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
    ax.set_title(_wrap(f"ROC, prompt level, all memorized vs not — {job}", 60), fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return png(fig)


def heatmap_figure(ours: pd.DataFrame, job: str, detector: str = "LD", metric: str = "auc") -> str | None:
    """Layer set x T -> metric for one job (prompt level, all); None without such rows."""
    plt = _pyplot()
    rows = ours[(ours.job == job) & (ours.detector == detector) & (ours.level == "prompt") & (ours.subset == "all")]
    if rows.empty:
        return None
    grid = rows.pivot_table(index="layers", columns="T", values=metric)
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * grid.shape[1], 1.4 + 0.4 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                fontsize=8)
    ax.set(xlabel="T (first steps)", ylabel="layer set")
    ax.set_title(_wrap(f"{detector_label(detector)} {METRICS.get(metric, metric)} — {job}", 50), fontsize=9)
    fig.colorbar(image, ax=ax)
    return png(fig)


def intensity_figure(table: pd.DataFrame) -> str:
    """The paper's Fig. 5 as box plots: ours (one panel per job) beside the published quartiles (own panel,
    own scale: the values are model-specific, the order is what compares)."""
    plt = _pyplot()
    order = ["non-memorized", "local", "global"]
    sources = list(dict.fromkeys(table.source))
    fig, axes = plt.subplots(1, len(sources), figsize=(4 * len(sources), 3.6), squeeze=False)
    for ax, source in zip(axes[0], sources):
        part = table[table.source == source].set_index("memorization_type")
        kinds = [k for k in order if k in part.index]
        stats = [{"label": k, "whislo": part.lower_whisker[k], "q1": part.q1[k], "med": part["median"][k],
                  "q3": part.q3[k], "whishi": part.upper_whisker[k], "fliers": []} for k in kinds]
        ax.bxp(stats, showfliers=False)
        ax.set_title(_wrap(source, 45), fontsize=9)
        ax.set_ylabel("BE intensity")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.tight_layout()
    return png(fig)


_SIMILARITIES = ("SSCD", "train_rmse", "S")


def tradeoff_figure(points: pd.DataFrame) -> str:
    """Similarity to the training image vs utility per memorization kind (rows): ours (left; one curve per job
    and method, the Pareto front ringed where the job marked it: ``tradeoff.pareto_front``) and the paper's
    digitized Fig. 6/7 (right; SSCD vs CLIP score on SD v1-4). Drawn once per model and prompt set
    (``reports.leaderboard``). Each column shares its
    axes across kinds; where ours measure SSCD and CLIP score too, the paper's curves are drawn on our axes."""
    plt = _pyplot()
    ref = published("be2025_fig6_fig7_mitigation_digitized.csv")
    ref = ref[ref.y_metric == "SSCD"]
    similarity = next(m for m in _SIMILARITIES if m in points)
    utility = points.utility.iloc[0]
    same_axes = similarity == "SSCD" and utility == "CLIP"
    kinds = sorted(points.kind.unique())
    fig, axes = plt.subplots(len(kinds), 1 if same_axes else 2, figsize=(6.5 if same_axes else 13, 3.8 * len(kinds)),
                             squeeze=False, sharex="col", sharey="col")
    # one colour and marker per (job, method), the same in every row: twenty-odd methods stay told apart
    curves = sorted(points.groupby(["job", "method"]).groups)
    colours = plt.get_cmap("tab20").colors
    style = {c: (colours[i % len(colours)], "os^vDPX<>h"[i // 2 % 10]) for i, c in enumerate(curves)}
    for row, kind in zip(axes, kinds):
        part = points[points.kind == kind]
        for (job, method), curve in part.groupby(["job", "method"], sort=True):
            curve = curve.sort_values("strength", na_position="last")
            label = f"ours {method}" + (f" ({job})" if part.job.nunique() > 1 else "")
            colour, marker = style[job, method]
            row[0].plot(curve[utility], curve[similarity], "*" if method == "none" else marker + "-",
                        color="k" if method == "none" else colour, ms=9 if method == "none" else 4, lw=1,
                        label=label)
        if "pareto" in part and part.pareto.fillna(False).astype(bool).any():
            # the front of the job's points (less copying, more utility), ringed and joined
            front = part[part.pareto.fillna(False).astype(bool)].sort_values(utility)
            row[0].plot(front[utility], front[similarity], "k--", lw=0.8, alpha=0.6)
            row[0].plot(front[utility], front[similarity], "o", ms=11, mfc="none", mec="k", label="Pareto front")
        # distances (train_rmse, caption_rmse) are drawn on inverted axes: up = more similar to the training
        # image, right = more faithful to the prompt, as SSCD and CLIP score are in the paper's figures
        row[0].set(xlabel=utility + (" (axis inverted)" if utility == "caption_rmse" else ""),
                   ylabel=similarity + (" to the training image (axis inverted)" if similarity == "train_rmse"
                                        else " to the training image"))
        row[0].set_title(_wrap(f"ours: {kind} — " + "; ".join(sorted(part.job.unique())), 60), fontsize=9)
        if kind == kinds[0]:
            if utility == "caption_rmse":
                row[0].invert_xaxis()
            if similarity == "train_rmse":
                row[0].invert_yaxis()
        target = row[0] if same_axes else row[1]
        for method, curve in ref[ref.mem_type == kind].groupby("method", sort=True):
            target.plot(curve.clip_score, curve.similarity, "s--" if len(curve) > 1 else "P", mfc="none",
                        label=f"paper {method}")
        if not same_axes:
            target.set(xlabel="CLIP score", ylabel="SSCD")
            target.set_title(f"published (Chen et al. Fig. {6 if kind == 'local' else 7}, digitized): {kind}",
                             fontsize=9)
            target.legend(fontsize=8)
        row[0].legend(fontsize=6 if len(curves) > 8 else 8, ncol=2 if len(curves) > 12 else 1)
        for ax in row:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return png(fig)


def gallery_figure(masks_png: Path, job: str) -> str | None:
    """The job's mask gallery (masks.png: rows of generation | BE mask over it | ground truth over it, written by
    benchmark.localization.evaluation.mask_gallery) redrawn as generation | BE mask over it with the ground-truth
    region's outline. The region is recovered from the third panel (there truth t gives 0.5 * image + 0.5 * (t, t, 0)).
    None where the picture does not have that layout (square panels, three columns)."""
    from PIL import Image

    plt = _pyplot()
    picture = np.asarray(Image.open(masks_png).convert("RGB"), dtype=float) / 255
    height, width, _ = picture.shape
    side = width // 3
    if width % 3 or height % side:
        return None
    n = height // side
    fig, axes = plt.subplots(n, 2, figsize=(4.4, 2.2 * n), squeeze=False)
    for i, (left, right) in enumerate(axes):
        rows = picture[i * side:(i + 1) * side]
        image, be, truth_panel = rows[:, :side], rows[:, side:2 * side], rows[:, 2 * side:]
        truth = (2 * truth_panel[..., 0] - image[..., 0]) > 0.5
        left.imshow(image)
        right.imshow(be)
        if truth.any() and not truth.all():
            right.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=1.5)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("generation", fontsize=9)
    axes[0][1].set_title("BE mask (red = bright)\n+ ground truth (green outline)", fontsize=9)
    fig.suptitle(_wrap(f"Local memorization — {job}", 45), fontsize=9)
    fig.tight_layout()
    return png(fig)


def early_figure(result: DetectionResult, job: str) -> str | None:
    """Early-step BE of one job: detection AUC (prompt level, all; the first layer set) and localization IoU and
    pixel AUROC (per layer set) against the 0-based step k of the end-token maps. None without early results."""
    if not result.early_detection:
        return None
    plt = _pyplot()
    det = pd.DataFrame(result.early_detection)
    first = det.layers.iloc[0]  # the first layer set; every set is in the job's report.md
    det = early_signals(det[(det.level == "prompt") & (det.subset == "all") & (det.layers == first)])
    det = det[det.signal.str.endswith(("]", "T=1", "T=k+1"))]
    loc = pd.DataFrame(result.early_localization or [])
    fig, axes = plt.subplots(1, 3 if not loc.empty else 1, figsize=(12 if not loc.empty else 4.2, 3.6), squeeze=False)
    for signal, part in det.groupby("signal", sort=False):
        axes[0, 0].plot(part.step, part.auc, "o-", label=signal)
    axes[0, 0].set(xlabel="step k (0-based)", ylabel="detection AUC", title="detection by step")
    axes[0, 0].legend(fontsize=7)
    for ax, metric in zip(axes[0, 1:], ("iou", "pixel_auroc")):
        for layers, part in loc.groupby("layers", sort=False):
            ax.plot(part.step, part[metric], "o-", label=layers)
        ax.set(xlabel="step k (0-based)", ylabel=metric, title=f"localization {metric} by step")
        ax.legend(fontsize=7)
    fig.suptitle(_wrap(f"early-step BE: {job}"), fontsize=9)
    fig.tight_layout()
    return png(fig)
