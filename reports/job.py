"""A Markdown summary of one job folder: detection (with localization / copying where known) or mitigation.

    python -m reports.job outputs/detect/testbed/testbed/<time>
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from benchmark.jobs.results import DetectionResult, MitigationResult, read_result
from reports.labels import detector_label, detector_order


def _fmt(row: pd.Series, name: str) -> str:
    if f"{name}_lo" in row and pd.notna(row.get(f"{name}_lo")):
        return f"{row[name]:.3f} [{row[f'{name}_lo']:.2f}, {row[f'{name}_hi']:.2f}]"
    return f"{row[name]:.3f}"


def detection_markdown(metrics: pd.DataFrame, level: str = "prompt", metric: str = "auc") -> str:
    """Detector x (layers, T) rows, one column per subset, each cell ``value [95% CI]``."""
    table = metrics[metrics.level == level].copy()
    order = {name: i for i, name in enumerate(detector_order(table.detector.unique()))}
    table = table.sort_values(["detector", "layers", "T"], key=lambda c: c.map(order) if c.name == "detector" else c,
                              kind="mergesort")
    table["cell"] = table.apply(lambda r: _fmt(r, metric), axis=1)
    table["method"] = table.apply(lambda r: detector_label(r.detector) + (f" [{r.layers}]" if r.layers else "")
                                  + (f" T={r['T']}" if r["T"] else ""), axis=1)
    wide = table.pivot_table(index="method", columns="subset", values="cell", aggfunc="first", sort=False)
    return wide.to_markdown()


def mitigation_markdown(result: MitigationResult) -> str:
    points = pd.DataFrame(result.curves)
    points["target_loss"] = points.target_loss.map(lambda v: "-" if pd.isna(v) else f"{v:g}")
    parts = [f"# Mitigation: {result.model} on {result.prompt_set}",
             (f"{result.n_prompts} memorized prompts, {result.n_generations} generations "
              f"({result.sampled_now} sampled in this job, {result.sampling_seconds} s). Method `none` = "
              "unmitigated; `wen` = Wen et al.'s embedding optimisation; `be` = the same with the BE-masked loss."),
             "", "## Trade-off points: mean per kind, method and target loss", "",
             points.round(4).to_markdown(index=False)]
    for similarity, rows in result.equal_utility.items():
        if rows:
            parts += ["", f"## {similarity} at equal utility ({result.utility}), interpolated along each curve", "",
                      pd.DataFrame(rows).round(4).to_markdown(index=False)]
    return "\n".join(str(p) for p in parts) + "\n"


def early_signals(det: pd.DataFrame) -> pd.DataFrame:
    """By-step detection rows labelled ``<detector> [<layers>] <window>``; LD's window T = k + 1 (every step so far)
    is labelled ``T=k+1`` (and also ``T=1`` at k = 0, where both are the first step)."""
    det = det.copy()
    base = det.detector + " [" + det.layers + "]"
    det["signal"] = base + det["T"].map(lambda t: f" T={t}" if t else "")
    so_far = det[(det["T"] > 0) & (det["T"] == det.step + 1)].assign(signal=lambda d: d.signal.str.replace(
        r" T=\d+$", " T=k+1", regex=True))
    return pd.concat([det[(det["T"] <= 1) | (det["T"] != det.step + 1)], so_far], ignore_index=True)


def early_markdown(result: DetectionResult) -> list[str]:
    """Localization leaderboard, early-step BE by step k and early stopping (benchmark/early/step_detection.py), where
    present."""
    parts = []
    if result.localization_leaderboard:
        board = pd.DataFrame(result.localization_leaderboard)
        for name in ("iou", "pixel_auroc"):
            board[name] = board.apply(lambda r, n=name: _fmt(r, n), axis=1)
        cols = [c for c in ("localizer", "iou", "pixel_auroc", "n", "control_iou", "control_auroc") if c in board]
        parts += ["", "## Localization leaderboard: every localizer on the same local generations [bootstrap 95% CI]",
                  "", board[cols].round(3).to_markdown(index=False)]
    if result.early_detection:
        det = pd.DataFrame(result.early_detection)
        det = early_signals(det[(det.level == "prompt") & (det.subset == "all")])
        wide = det.pivot_table(index="signal", columns="step", values="auc", sort=False)
        parts += ["", "## Early-step BE: detection AUC (prompt level, all) by 0-based step k of the end-token maps", "",
                  wide.round(3).to_markdown()]
    if result.early_localization:
        loc = pd.DataFrame(result.early_localization)
        parts += ["", "## Early-step BE: localization by step k", "",
                  loc.pivot_table(index="layers", columns="step", values=["iou", "pixel_auroc"], sort=False)
                  .round(3).to_markdown()]
    if result.early_stopping:
        stop = pd.DataFrame(result.early_stopping)
        stop["threshold"] = stop.threshold.map(lambda v: f"{v:.4g}")
        signal = result.config.get("early", {}).get("signal", {})
        title = (f"## Early stopping (simulated from the traces; signal {signal}): threshold FPR vs steps saved "
                 "vs memorized generations caught")
        parts += ["", title, "", stop.round(3).to_markdown(index=False)]
    return parts


def job_markdown(folder: str | Path) -> str:
    folder = Path(folder)
    result = read_result(folder)
    if isinstance(result, MitigationResult):
        return mitigation_markdown(result)
    if not isinstance(result, DetectionResult):
        raise TypeError(f"{folder}: a {result.task} job has no Markdown report (detection and mitigation do)")
    metrics = pd.DataFrame(result.metrics)
    family = f" ({result.family})" if result.family else ""  # job folders written before: no family
    parts = [f"# {result.model}{family} on {result.prompt_set}",
             (f"{result.n_prompts} prompts, {result.n_generations} generations "
              f"({result.sampled_now} sampled in this job, {result.sampling_seconds} s)."),
             "", "## Detection: ROC AUC at prompt level [bootstrap 95% CI]", "",
             detection_markdown(metrics, "prompt", "auc"),
             "", "## Detection: TPR@1%FPR at prompt level", "",
             detection_markdown(metrics, "prompt", "tpr_at_1pct_fpr")]
    if result.localization:
        parts += ["", "## Localization: BE mask vs ground-truth mask (local memorization)", "",
                  pd.DataFrame(result.localization).round(3).to_markdown(index=False)]
    if result.token_localization:
        parts += ["", "## Which tokens' final-step maps localize the copied region (pixel AUROC, first layer set)", "",
                  pd.DataFrame(result.token_localization).round(3).to_markdown(index=False)]
    parts += early_markdown(result)
    if result.similarity_f1:
        parts += ["", "## Similarity metrics as memorization calls (BE Table 2 layout; S, LS on the 0-255 scale)", "",
                  pd.DataFrame(result.similarity_f1).round(3).to_markdown(index=False)]
    if result.copy_distance_median:
        parts += ["", "## Copying: median RMSE to the training image (inside the planted region for local)", ""]
        parts += [f"- {k}: {v}" for k, v in result.copy_distance_median.items()]
    if result.local_diversity_mean:
        d = result.local_diversity_mean
        parts += ["", (f"Local prompts, mean pairwise RMSE among a prompt's generations: inside the region "
                       f"{d['inside']}, outside {d['outside']}.")]
    return "\n".join(str(p) for p in parts) + "\n"


def write_job_report(folder: str | Path) -> Path:
    path = Path(folder) / "report.md"
    path.write_text(job_markdown(folder))
    return path


if __name__ == "__main__":
    print(job_markdown(sys.argv[1]))
