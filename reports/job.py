"""A Markdown summary of one job folder: detection (with localization / copying where known) or mitigation.

    python -m reports.job outputs/detect/testbed/testbed/<time>
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from benchmark.jobs.results import DetectionResult, MitigationResult, read_result
from benchmark.mitigation.tradeoff import reference_method
from reports.labels import detector_label, detector_order


def _fmt(row: pd.Series, name: str) -> str:
    if f"{name}_lo" in row and pd.notna(row.get(f"{name}_lo")):
        return f"{row[name]:.3f} [{row[f'{name}_lo']:.2f}, {row[f'{name}_hi']:.2f}]"
    return f"{row[name]:.3f}"


def detection_markdown(metrics: pd.DataFrame, level: str = "prompt", metric: str = "auc",
                       not_defined: dict[str, str] | None = None) -> str:
    """Detector x (layers, T) rows, one column per subset, each cell ``value [95% CI]``; a detector in
    ``not_defined`` (not defined on the job's model family) gets one row reading "not defined" in every column."""
    table = metrics[metrics.level == level].copy()
    order = {name: i for i, name in enumerate(detector_order(table.detector.unique()))}
    table = table.sort_values(["detector", "layers", "T"], key=lambda c: c.map(order) if c.name == "detector" else c,
                              kind="mergesort")
    table["cell"] = table.apply(lambda r: _fmt(r, metric), axis=1)
    table["method"] = table.apply(lambda r: detector_label(r.detector) + (f" [{r.layers}]" if r.layers else "")
                                  + (f" T={r['T']}" if r["T"] else ""), axis=1)
    wide = table.pivot_table(index="method", columns="subset", values="cell", aggfunc="first", sort=False)
    for name in detector_order(list(not_defined or {})):
        wide.loc[detector_label(name)] = "not defined"
    return wide.to_markdown()


def mitigation_markdown(result: MitigationResult) -> str:
    """The mitigation job's report: its methods (what each acts on, its strength and direction), the trade-off
    points (Pareto front marked), the memorization rate after mitigation, the equal-utility table of every method
    against the reference with bootstrap intervals, and the cost in extra UNet evaluations per image."""
    points = pd.DataFrame(result.curves).rename(columns={"target_loss": "strength"})  # older folders
    points["strength"] = points.strength.map(lambda v: "-" if pd.isna(v) else f"{v:g}")
    parts = [f"# Mitigation: {result.model} on {result.prompt_set}",
             (f"{result.n_prompts} memorized prompts, {result.n_generations} generations "
              f"({result.sampled_now} sampled in this job, {result.sampling_seconds} s). Method `none` = "
              "unmitigated." + (f" Model family: {result.family}." if result.family else ""))]
    methods = result.methods or []
    if methods:
        table = pd.DataFrame(methods).assign(
            strength=lambda t: [f"{s} ({d} = stronger)" if isinstance(s, str) else "-"
                                for s, d in zip(t.strength, t.stronger)],
            knobs=lambda t: [", ".join(f"{k}={v}" for k, v in knobs.items()) or "-" for knobs in t.knobs])
        parts += ["", "## Methods", "", table[["method", "label", "acts_on", "strength", "knobs"]]
                  .to_markdown(index=False)]
    stats = [c for c in points if c.startswith("stat/")]
    parts += ["", "## Trade-off points: mean per kind, method and strength"
              + (" (`pareto`: on the front of copying vs utility)" if "pareto" in points else ""), "",
              points.drop(columns=stats).round(4).to_markdown(index=False)]
    reported = method_statistics(points, stats)
    if not reported.empty:
        parts += ["", "## What the methods report per image (mean per kind, method and strength; every image's value "
                  "in the table's `stat/` columns)", "", reported.to_markdown(index=False)]
    rate = pd.DataFrame(result.memorization_rate or [])
    if not rate.empty:
        rules = ", ".join(f"{m} {'<' if m == 'train_rmse' else '>'} {t:g}"
                          for m, t in rate[["measure", "threshold"]].drop_duplicates().itertuples(index=False))
        rate["strength"] = rate.strength.map(lambda v: "-" if pd.isna(v) else f"{v:g}")
        wide = rate.pivot_table(index=["kind", "method", "strength"], columns="measure", values="rate",
                                sort=False).reset_index()
        title = (f"## Memorization rate after mitigation: share of generations still copying ({rules}; "
                 "mitigation.copy_thresholds)")
        parts += ["", title, "", wide.round(3).to_markdown(index=False)]
    for similarity, rows in result.equal_utility.items():
        if rows:
            table = pd.DataFrame(rows).dropna(subset=[similarity])  # a method read only where its curve reaches
            if "ci_low" in table:
                table["difference [95% CI]"] = [f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" if pd.notna(d) else "-"
                                                for d, lo, hi in zip(table.difference, table.ci_low, table.ci_high)]
                table = table.drop(columns=["difference", "ci_low", "ci_high"])
            section = result.config.get("mitigation") or {}
            reference = reference_method(section.get("methods") or ["wen"], section.get("reference"))
            title = (f"## {similarity} at equal utility ({result.utility}), every method minus `{reference}`, "
                     "interpolated along each curve (prompts resampled, paired)")
            parts += ["", title, "", table.round(4).to_markdown(index=False)]
    cost = pd.DataFrame(result.cost or [])
    if not cost.empty:
        cost["strength"] = cost.strength.map(lambda v: "-" if pd.isna(v) else f"{v:g}")
        parts += ["", "## Cost: extra UNet evaluations per image (plain sampling: 2 x steps)", "",
                  cost.round(2).to_markdown(index=False)]
    return "\n".join(str(p) for p in parts) + "\n"


def method_statistics(points: pd.DataFrame, stats: list[str]) -> pd.DataFrame:
    """The ``stat/`` columns of the trade-off points where a method reports them: one column per statistic, and a
    statistic per layer (NeMo's ``stat/neurons/<layer>``) as one ``<layer>: mean`` list of the layers it touched."""
    per_layer = {c for c in stats if c.count("/") > 1}
    rows = []
    for _, point in points.iterrows():
        values = {c.removeprefix("stat/"): round(float(point[c]), 3) for c in stats
                  if c not in per_layer and pd.notna(point[c])}
        layers = {c.split("/", 2)[2]: float(point[c]) for c in per_layer if pd.notna(point[c]) and point[c] > 0}
        if values or layers:
            by_layer = {f"{c.split('/')[1]} per layer": ", ".join(f"{k}: {v:.2g}" for k, v in layers.items()) or "-"
                        for c in list(per_layer)[:1]}
            rows.append({"kind": point.kind, "method": point.method, "strength": point.strength, **values,
                         **by_layer})
    return pd.DataFrame(rows)


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
    undefined = result.not_defined or {}
    family = f" ({result.family})" if result.family else ""  # job folders written before: no family
    parts = [f"# {result.model}{family} on {result.prompt_set}",
             (f"{result.n_prompts} prompts, {result.n_generations} generations "
              f"({result.sampled_now} sampled in this job, {result.sampling_seconds} s)."),
             "", "## Detection: ROC AUC at prompt level [bootstrap 95% CI]", "",
             detection_markdown(metrics, "prompt", "auc", undefined),
             "", "## Detection: TPR@1%FPR at prompt level", "",
             detection_markdown(metrics, "prompt", "tpr_at_1pct_fpr", undefined)]
    if undefined:
        parts += ["", "Not defined on this model family (docs/models.md):", ""]
        parts += [f"- {detector_label(name)}: {why}" for name, why in undefined.items()]
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
