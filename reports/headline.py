"""The report's first screen: per job group (model x prompt set), the answers a reader comes for, each with its
interval, the published value and the difference, in words as well as numbers.

- detection: each detector registered with a ``baseline`` against it (today LD against Wen's D) on the job's
  headline layer set (``score.headline.layers``, fixed in advance by the layer preset, e.g. BE's own ``be_paper``
  on SD) at the smallest step window (T=1 where the job has it), per memorization kind, prompt-level AUC; and the
  local-global gap of each (Chen et al. ICLR 2025, Table 1). The best of several layer sets is picked on the data
  it is scored on, so it is only ever shown beside, labelled as such;
- localization: the headline layer set's mask of the localizer registered with ``reproduces=("localization_iou",)``
  (the BE mask): IoU and pixel AUROC against the all-ones floor and the never-trained control (published: the
  third-party BE IoU on SD v1-4); the best mask likewise only beside;
- BE intensity (the detector registered with ``reproduces=("fig5",)``): the order of the medians per memorization
  type (Chen et al., Fig. 5);
- mitigation: BE-masked minus Wen's similarity to the training image at equal utility (Chen et al., Fig. 6/7).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from benchmark.registry import DETECTORS, LOCALIZERS
from reports.jobs import Job
from reports.labels import comparisons, detector_label, reproducing
from reports.tables import box, fmt, fmt_ci, fmt_diff, job_generations, published


@dataclass
class Finding:
    """One headline: a sentence, and the numbers in it (``values``: name -> number) for tests and tables."""
    topic: str
    sentence: str
    values: dict[str, float] = field(default_factory=dict)
    job: str = ""             # label of the job the numbers come from
    rows: list[dict[str, str]] = field(default_factory=list)  # figure, ours, paper, difference (formatted)


def _figure(figure: str, ours: str, paper=None, difference=None) -> dict[str, str]:
    return {"figure": figure, "ours": ours, "paper": fmt(paper) if isinstance(paper, float) else (paper or ""),
            "ours - paper": fmt_diff(difference) if difference is not None else ""}


@dataclass
class Group:
    name: str                 # model on prompt set
    job: Job                  # the job the headlines come from (most prompts, then images, then steps)
    others: list[Job]         # the group's other jobs (in the tables below)
    findings: list[Finding]


def _row(metrics: pd.DataFrame, detector: str, subset: str, T: int) -> pd.DataFrame:
    """A detector's prompt-level rows on one subset at window T (its only window, 0, for one without)."""
    windowed = DETECTORS[detector].uses_T if detector in DETECTORS else True
    return metrics[(metrics.detector == detector) & (metrics.subset == subset) & (metrics["T"] == (T if windowed
                                                                                                      else 0))
                   & (metrics.level == "prompt")]


def _auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each replicate row: P(pos > neg) + P(pos = neg) / 2. pos (B, P), neg (B, N)."""
    greater = (pos[:, :, None] > neg[:, None, :]).mean(axis=(1, 2))
    return greater + 0.5 * (pos[:, :, None] == neg[:, None, :]).mean(axis=(1, 2))


def paired_difference_ci(job: Job, metrics: pd.DataFrame, kind: str, T: int, ld_layers: str, n_boot: int = 1000,
                         seed: int = 0, detector: str = "LD", baseline: str = "D",
                         baseline_layers: str = "") -> tuple[float, float] | None:
    """95% percentile interval of AUC(detector) - AUC(baseline) (LD and D unless named) at prompt level on one
    kind (its memorized prompts against every non-memorized one), from a paired stratified bootstrap: positives and
    negatives resampled separately, the same resample for both detectors (the protocol of the job's own intervals,
    docs/design.md); ``ld_layers`` / ``baseline_layers``: their layer sets ("" for none). Each detector's sign is
    the one under which the job's own AUC is reproduced. None without generations.csv."""
    from reports.plots import _direction

    gens = job_generations(job)
    if gens is None:
        return None
    scores = {}
    for name, layers in (("baseline", baseline_layers), ("detector", ld_layers)):
        which = baseline if name == "baseline" else detector
        window = T if which not in DETECTORS or DETECTORS[which].uses_T else 0
        part = gens[(gens.detector == which) & (gens.layers == layers) & (gens["T"] == window)]
        prompt = part.groupby("prompt_id").agg(score=("score", "mean"), memorized=("memorized", "first"),
                                               kind=("kind", "first"))
        if prompt.empty or prompt.memorized.nunique() < 2:
            return None
        prompt["score"] *= _direction(metrics, which, layers, window, prompt)
        scores[name] = prompt
    both = scores["baseline"].join(scores["detector"][["score"]], rsuffix="_detector", how="inner")
    both = both[(both.memorized.astype(bool) & (both.kind == kind)) | ~both.memorized.astype(bool)]
    pos, neg = both[both.memorized.astype(bool)], both[~both.memorized.astype(bool)]
    if pos.empty or neg.empty:
        return None
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(pos), (n_boot, len(pos)))
    j = rng.integers(0, len(neg), (n_boot, len(neg)))
    diff = (_auc(pos.score_detector.to_numpy()[i], neg.score_detector.to_numpy()[j])
            - _auc(pos.score.to_numpy()[i], neg.score.to_numpy()[j]))
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return float(lo), float(hi)


SELECTED = "selected on the evaluation data"  # the label of any best-over-layer-sets figure


def headline_layers(job: Job) -> str:
    """The layer set a job's headline is read on: its ``score.headline.layers`` (fixed before the job ran), ``all``
    for a folder whose config has none."""
    return str(job.config.get("score", {}).get("headline", {}).get("layers") or "all")


def detection_findings(job: Job) -> list[Finding]:
    """The headline's detection findings: each detector registered with a ``baseline`` against it."""
    metrics = pd.DataFrame(job.result.metrics)
    metrics["layers"] = metrics.layers.fillna("")
    return [f for detector, baseline in comparisons() for f in comparison_findings(job, metrics, detector, baseline)]


def _one_layer_set(rows: pd.DataFrame, detector: str, layers: str) -> pd.DataFrame:
    """A detector's rows on the headline layer set (all of them for a detector without layer sets)."""
    return rows[rows.layers == layers] if detector in DETECTORS and DETECTORS[detector].uses_layers else rows


def comparison_findings(job: Job, metrics: pd.DataFrame, detector: str, baseline: str) -> list[Finding]:
    """``detector`` against ``baseline`` per memorization kind and in the local-global gap (for LD and D:
    Chen et al. ICLR 2025, Table 1); the values are named ``<kind>_<detector>_auc`` etc."""
    windowed = [d for d in (baseline, detector) if d not in DETECTORS or DETECTORS[d].uses_T]
    windows = sorted(t for t in metrics[metrics.detector.isin(windowed or [baseline])]["T"].unique() if t)
    if not windows and windowed:
        return []
    T = (1 if 1 in windows else windows[0]) if windows else 0
    ref = published("be2025_table1_detection.csv")
    ref = ref[ref["T"] == 1].set_index(["detector", "memorization_type"]).auc
    d_name, ld_name = detector_label(baseline), detector_label(detector)
    layers = headline_layers(job)
    out, gap = [], {}
    for kind in ("local", "global"):
        d, sets = _one_layer_set(_row(metrics, baseline, kind, T), baseline, layers), _row(metrics, detector, kind, T)
        ld = _one_layer_set(sets, detector, layers)
        if d.empty or ld.empty:
            continue
        d, ld = d.iloc[0], ld.iloc[0]
        # ties: the first in the job's layer-set order
        best = sets.sort_values("auc", ascending=False, kind="stable").iloc[0]
        shown_best = sets.layers.nunique() > 1 and best.layers != layers
        p_d, p_ld = ref.get((baseline, kind)), ref.get((detector, kind))
        lead, p_lead = ld.auc - d.auc, (p_ld - p_d) if p_d is not None and p_ld is not None else None
        gap[kind] = (d.auc, ld.auc, p_d, p_ld)
        verdict = "beats" if lead > 0 else "ties" if lead == 0 else "trails"
        paper = (f"; paper (SD v1-4, T=1): {ld_name} {fmt(p_ld)} vs {d_name} {fmt(p_d)}, {p_lead:+.3f}, "
                 f"ours - paper: {lead - p_lead:+.3f}") if p_lead is not None else ""
        interval = paired_difference_ci(job, metrics, kind, T, ld.layers, detector=detector, baseline=baseline,
                                        baseline_layers=d.layers)
        lead_text = f"{lead:+.3f}" + (f" [{interval[0]:+.3f}, {interval[1]:+.3f}] (paired bootstrap)"
                                      if interval else "")
        ld_ci = fmt_ci(ld.auc, ld.get("auc_lo"), ld.get("auc_hi"))
        d_ci = fmt_ci(d.auc, d.get("auc_lo"), d.get("auc_hi"))
        best_text = (f"; the best of {sets.layers.nunique()} layer sets, {SELECTED}: {ld_name} [{best.layers}] "
                     f"{fmt(best.auc)}") if shown_best else ""
        rows = [_figure(f"{kind}: {d_name} AUC, T={T}", d_ci, p_d, None if p_d is None else d.auc - p_d),
                _figure(f"{kind}: {ld_name} [{ld.layers}] AUC, T={T}", ld_ci, p_ld,
                        None if p_ld is None else ld.auc - p_ld),
                _figure(f"{kind}: {ld_name} - {d_name}", lead_text.replace(" (paired bootstrap)", ""),
                        fmt_diff(p_lead),
                        None if p_lead is None else lead - p_lead)]
        if shown_best:
            rows.append(_figure(f"{kind}: {ld_name} best layer set [{best.layers}] AUC, T={T} ({SELECTED})",
                                fmt(best.auc)))
        out.append(Finding("detection", (
            f"On {kind} memorization at T={T}, {ld_name} [{ld.layers}, the headline layer set] {verdict} {d_name}: "
            f"AUC {ld_ci} vs {d_ci}, {lead_text}{paper}{best_text}."),
            {f"{kind}_{baseline}_auc": d.auc, f"{kind}_{detector}_auc": ld.auc,
             f"{kind}_{detector}_minus_{baseline}": lead,
             **({f"{kind}_{detector}_best_auc": best.auc} if shown_best else {}),
             **({f"{kind}_{detector}_minus_{baseline}_published": p_lead} if p_lead is not None else {})}, rows=rows))
    if {"local", "global"} <= set(gap):
        (dl, ldl, pdl, pldl), (dg, ldg, pdg, pldg) = gap["local"], gap["global"]
        ours_d, ours_ld = dg - dl, ldg - ldl
        verb = "narrows" if ours_ld < ours_d else "widens" if ours_ld > ours_d else "keeps"
        sentence = (f"{ld_name} {verb} the local-global AUC gap from {ours_d:.3f} ({d_name}) to {ours_ld:.3f} "
                    f"({ld_name})")
        values = {f"gap_{baseline}": ours_d, f"gap_{detector}": ours_ld}
        rows = [_figure(f"global - local AUC, {d_name}", f"{ours_d:.3f}"),
                _figure(f"global - local AUC, {ld_name}", f"{ours_ld:.3f}")]
        if None not in (pdl, pldl, pdg, pldg):
            sentence += f"; the paper's narrows it from {pdg - pdl:.3f} to {pldg - pldl:.3f}"
            values |= {f"gap_{baseline}_published": pdg - pdl, f"gap_{detector}_published": pldg - pldl}
            rows = [_figure(rows[0]["figure"], rows[0]["ours"], pdg - pdl, ours_d - (pdg - pdl)),
                    _figure(rows[1]["figure"], rows[1]["ours"], pldg - pldl, ours_ld - (pldg - pldl))]
        out.append(Finding("detection", sentence + ".", values, rows=rows))
    return out


def localization_findings(job: Job) -> list[Finding]:
    rows = pd.DataFrame(job.result.localization or [])
    if rows.empty:
        return []
    floor = rows[rows.layers.str.startswith("all-ones")]
    layers = headline_layers(job)
    sets = job.config.get("layers", {}).get("sets") or {layers: None}  # BE masks: the job's layer sets
    masks = rows[rows.layers.isin(list(sets))]
    # the localizer compared with the published IoU, named as in the published table (BE)
    method = next(iter(reproducing("localization_iou", LOCALIZERS)), None)
    if "localizer" in masks:  # a folder without the column has BE's rows only
        masks = masks[masks.localizer == method]
    head = masks[masks.layers == layers]
    if head.empty:
        return []
    best, masks = head.iloc[0], masks.sort_values("iou", ascending=False, kind="stable")  # ties: layer-set order
    ref = published("localization_iou_thirdparty.csv")
    ref = ref[ref.subset == "all"].set_index("method").iou
    sentence = f"The BE mask [{best.layers}, the headline layer set] localizes the planted copy with IoU {best.iou:.3f}"
    values = {"iou": best.iou, "pixel_auroc": best.pixel_auroc}
    if not floor.empty:
        sentence += f" against {floor.iou.iloc[0]:.3f} for the all-ones mask"
        values["iou_floor"] = floor.iou.iloc[0]
    sentence += f" (over {int(best.n)} generations), pixel AUROC {best.pixel_auroc:.3f}"
    if pd.notna(best.get("control_auroc")):
        sentence += f" against {best.control_auroc:.3f} on never-trained generations (the control)"
        values["control_auroc"] = best.control_auroc
    if method in ref and "all-ones mask" in ref:
        sentence += (f"; published on SD v1-4 (third party): IoU {ref[method]:.3f} vs {ref['all-ones mask']:.3f}, "
                     f"ours - published: {best.iou - ref[method]:+.3f}")
        values["iou_published"] = ref[method]
    top = masks.iloc[0]
    if masks.layers.nunique() > 1 and top.layers != best.layers:
        sentence += (f"; the best of {masks.layers.nunique()} layer sets, {SELECTED}: [{top.layers}] "
                     f"IoU {top.iou:.3f}")
        values["iou_best"] = top.iou
    rows = [_figure(f"BE mask [{best.layers}] IoU", f"{best.iou:.3f}", ref.get(method),
                    None if method not in ref else best.iou - ref[method])]
    if not floor.empty:
        rows.append(_figure("all-ones mask IoU (floor)", f"{floor.iou.iloc[0]:.3f}", ref.get("all-ones mask"),
                            None if "all-ones mask" not in ref else floor.iou.iloc[0] - ref["all-ones mask"]))
    rows.append(_figure("pixel AUROC (never-trained control)", f"{best.pixel_auroc:.3f}" + (
        f" ({best.control_auroc:.3f})" if pd.notna(best.get("control_auroc")) else "")))
    return [Finding("localization", sentence + ".", values, rows=rows)]


def intensity_findings(job: Job, layers: str = "all") -> list[Finding]:
    """The order of the median BE intensity (the detector registered with ``reproduces=("fig5",)``) per kind."""
    gens = job_generations(job)
    shown = reproducing("fig5")[:1]
    if gens is None or gens[gens.detector.isin(shown)].empty:
        return []
    part = gens[gens.detector.isin(shown)]
    chosen = layers if layers in set(part.layers) else min(set(part.layers))
    medians = {("non-memorized" if k == "none" else k): box(v)["median"]
               for k, v in part[part.layers == chosen].groupby("kind")["score"]}
    ref = published("be2025_fig5_be_intensity_box.csv").set_index("memorization_type")["median"]
    ours_order = sorted(medians, key=medians.get, reverse=True)
    paper_order = [k for k in sorted(ref.index, key=ref.get, reverse=True) if k in medians]
    same = ours_order == paper_order
    sentence = (f"Median BE intensity [{chosen}] orders " + " > ".join(f"{k} {medians[k]:.3g}" for k in ours_order)
                + "; the paper's Fig. 5: " + " > ".join(f"{k} {ref[k]:.3g}" for k in paper_order)
                + (" (same order)." if same else " (a different order).")
                + " Scales differ by model: compare the order.")
    return [Finding("intensity", sentence, {f"median_{k}": v for k, v in medians.items()},
                    rows=[_figure("BE intensity order (medians)", " > ".join(ours_order), " > ".join(paper_order),
                                  None)])]


def _paper_mitigation_difference(kind: str) -> float | None:
    """Mean SSCD of the paper's BE curve minus its Wen curve at 5 CLIP scores both reach (digitized Fig. 6/7)."""
    ref = published("be2025_fig6_fig7_mitigation_digitized.csv")
    ref = ref[(ref.mem_type == kind) & (ref.y_metric == "SSCD")]
    curves = {}
    for method in ("Baseline(D)", "Ours(LD)"):
        curve = ref[ref.method == method].sort_values("clip_score")
        if len(curve) < 2:
            return None
        curves[method] = (curve.clip_score.to_numpy(), curve.similarity.to_numpy())
    lo = max(x.min() for x, _ in curves.values())
    hi = min(x.max() for x, _ in curves.values())
    if lo >= hi:
        return None
    grid = np.linspace(lo, hi, 5)
    return float(np.mean(np.interp(grid, *curves["Ours(LD)"]) - np.interp(grid, *curves["Baseline(D)"])))


def mitigation_findings(job: Job) -> list[Finding]:
    equal = job.result.equal_utility
    similarity = next((m for m in ("SSCD", "S", "train_rmse") if equal.get(m)), None)
    if similarity is None:
        return []
    rows = pd.DataFrame(equal[similarity])
    out = []
    for kind, part in rows.groupby("kind", sort=True):
        diff = float(part.difference.mean())
        # SSCD and S are similarities (lower = better privacy), train_rmse a distance (higher = better)
        better = diff < 0 if similarity != "train_rmse" else diff > 0
        sentence = (f"Mitigation, {kind}: at equal {job.result.utility}, BE-masked minus Wen's {similarity} to "
                    f"the training image averages {diff:+.4f} over {len(part)} utility levels "
                    f"({'BE mitigates more' if better else 'BE mitigates less'})")
        values = {f"mitigation_{kind}_{similarity}_difference": diff}
        paper = _paper_mitigation_difference(kind)
        if paper is not None:
            sentence += f"; the paper's Fig. {6 if kind == 'local' else 7} (SSCD at equal CLIP score): {paper:+.4f}"
            values[f"mitigation_{kind}_SSCD_difference_published"] = paper
        out.append(Finding("mitigation", sentence + ".", values, rows=[_figure(
            f"{kind}: BE - Wen, {similarity} at equal utility", f"{diff:+.4f}",
            f"{paper:+.4f} (SSCD)" if paper is not None else "", None)]))
    return out


def _size(job: Job) -> tuple:
    return (getattr(job.result, "n_prompts", None) or 0, job.n_images, job.steps, str(job.folder))


def headline_groups(jobs: list[Job]) -> list[Group]:
    """One Group per model x prompt set with detection jobs (mitigation findings joined from the same group)."""
    groups = []
    for name in dict.fromkeys(j.group for j in jobs):
        members = [j for j in jobs if j.group == name]
        detect = sorted((j for j in members if j.task == "detect"), key=_size, reverse=True)
        mitigate = sorted((j for j in members if j.task == "mitigate"), key=_size, reverse=True)
        main = (detect or mitigate or [None])[0]
        if main is None:
            continue
        findings = []
        if detect:
            findings += detection_findings(main) + localization_findings(main) + intensity_findings(main)
        for finding in findings:
            finding.job = main.label
        if mitigate:
            for finding in mitigation_findings(mitigate[0]):
                finding.job = mitigate[0].label
                findings.append(finding)
        groups.append(Group(name, main, [j for j in members if j is not main], findings))
    return groups


