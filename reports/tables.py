"""The report's numbers: every table is a DataFrame built from finished jobs (``reports.jobs``) and the published
numbers in ``reports/reference``. Rendering (Markdown, HTML, LaTeX, figures) lives elsewhere.

Cells that compare carry three numbers: ours (with its bootstrap 95% interval where the job has one), the
published value and ``difference`` = ours - published.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.registry import DETECTORS
from reports.jobs import Job
from reports.labels import detector_label, detector_order, reproducing

REFERENCE = Path(__file__).parent / "reference"
KEYS = ["job", "model", "prompt_set", "steps", "n_images", "level", "subset", "detector", "layers", "T"]
METRICS = {"auc": "AUC", "f1": "F1", "tpr_at_1pct_fpr": "TPR@1%FPR"}
PAPER = "Chen et al. ICLR 2025"


def published(name: str) -> pd.DataFrame:
    """One reference CSV (quoted, not ours)."""
    return pd.read_csv(REFERENCE / name)


PUBLISHED_MITIGATION = ("be2025_fig6_fig7_mitigation_digitized.csv",)
"""The reference CSVs of published mitigation results (every row SD v1-4; ``reports/reference/README.md`` lists
what the other mitigation papers publish and why it is not here)."""


def published_mitigation() -> pd.DataFrame:
    """Every published mitigation row, ``source`` first (the paper and figure or table), columns as each CSV
    names them; quoted, never comparable to a testbed job's numbers (another model and prompt set)."""
    return pd.concat([published(name) for name in PUBLISHED_MITIGATION], ignore_index=True)


def fmt(value, digits: int = 3) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def fmt_ci(value, lo, hi, digits: int = 3) -> str:
    """``0.912 [0.850, 0.970]``, or the bare value without an interval."""
    if value is None or pd.isna(value):
        return ""
    if lo is None or pd.isna(lo):
        return fmt(value, digits)
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_diff(value, digits: int = 3) -> str:
    return "" if value is None or pd.isna(value) else f"{value:+.{digits}f}"


# --------------------------------------------------------------------------------------------------- detection

def collect(jobs: list[Job]) -> pd.DataFrame:
    """One row per detection job x metric row (metrics.json), with the job's label and configuration columns,
    in the grouped order (job, level, subset, detector in registry order, layers, T)."""
    frames = []
    for job in jobs:
        if job.task != "detect":
            continue
        frame = pd.DataFrame(job.result.metrics)
        # a detector not defined on the job's model family: one row per (level, subset) saying so, no value
        undefined = job.result.not_defined or {}
        if undefined and not frame.empty:
            cells = frame[["level", "subset"]].drop_duplicates()
            frame = pd.concat([frame.assign(note=""), *(cells.assign(detector=name, layers="", T=0,
                                                                    note=f"not defined: {why}")
                                                       for name, why in undefined.items())], ignore_index=True)
        frame.insert(0, "job", job.label)
        frame.insert(1, "folder", str(job.folder))
        frame.insert(2, "model", job.result.model)
        frame.insert(3, "prompt_set", job.result.prompt_set)
        frame.insert(4, "steps", job.steps)
        frame.insert(5, "n_images", job.n_images)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=KEYS + ["folder", "method"])
    table = pd.concat(frames, ignore_index=True)
    table["layers"] = table["layers"].fillna("")
    table["method"] = table.detector.map(detector_label)
    order = {d: i for i, d in enumerate(detector_order(table.detector.unique()))}
    table = table.assign(_order=table.detector.map(order), _level=table.level != "prompt",
                         _subset=table.subset.map({"all": 0, "global": 1, "local": 2}).fillna(3))
    keys = ["job", "_level", "_subset", "_order", "layers", "T"]
    return table.sort_values(keys, kind="mergesort").drop(columns=["_order", "_level", "_subset"]) \
        .reset_index(drop=True)


def leaderboard(ours: pd.DataFrame) -> pd.DataFrame:
    """The full leaderboard: every (job, level, subset, detector, layers, T) with every metric and its interval,
    grouped by job (collect's order)."""
    columns = ["job", "model", "prompt_set", "steps", "n_images", "level", "subset", "detector", "method", "layers",
               "T"]
    metric_columns = [c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi") if c in ours]
    counts = [c for c in ("n_pos", "n_neg", "note") if c in ours]
    return ours[columns + metric_columns + counts].round(4).reset_index(drop=True)


def _t1_layers(ours_job: pd.DataFrame, layers: str, layered: list[str]) -> str:
    """The layer set Table 1 shows for its layer-set detectors (``layered``, e.g. LD): ``layers`` if the job has
    it, else its first."""
    sets = [s for s in ours_job[ours_job.detector.isin(layered)].layers.unique() if s]
    return layers if layers in sets or not sets else sets[0]


def table1(ours: pd.DataFrame, layers: str = "all", level: str = "prompt") -> pd.DataFrame:
    """The seed paper's Table 1 (AUC, F1, TPR@1%FPR by T and memorization type of the detectors registered with
    ``reproduces=("table1",)``: D and LD), long form: one row per (job, method, T, memorization type, metric) with
    ours, its interval, the published value (SD v1-4, Chen et al. ICLR 2025 Table 1) and the difference. T values
    only one side has keep the other side empty."""
    ref = published("be2025_table1_detection.csv")
    ref = ref.melt(id_vars=["detector", "memorization_type", "T"], value_vars=list(METRICS), var_name="metric",
                   value_name="published")
    methods = reproducing("table1")
    layered = [d for d in methods if DETECTORS[d].uses_layers]
    ref = ref[ref.detector.isin(methods)]
    rows = []
    for job, part in ours.groupby("job", sort=False):
        chosen = _t1_layers(part, layers, layered)
        part = part[(part.level == level) & part.subset.isin(["local", "global"]) & part.detector.isin(methods)
                    & (~part.detector.isin(layered) | (part.layers == chosen))]
        for _, r in part.iterrows():
            for metric in METRICS:
                if metric in r and pd.notna(r[metric]):
                    rows.append({"job": job, "detector": r.detector, "layers": r.layers, "memorization_type": r.subset,
                                 "T": int(r["T"]), "metric": metric, "ours": r[metric],
                                 "ours_lo": r.get(f"{metric}_lo"), "ours_hi": r.get(f"{metric}_hi")})
        if part.empty:
            continue
        mine = pd.DataFrame([x for x in rows if x["job"] == job])
        only_published = ref.merge(mine[["detector", "memorization_type", "T", "metric"]], how="left",
                                   indicator=True).query("_merge == 'left_only'")
        rows += [{"job": job, "detector": p.detector, "layers": chosen if p.detector in layered else "",
                  "memorization_type": p.memorization_type, "T": int(p.T), "metric": p.metric}
                 for p in only_published.itertuples()]
    columns = ["job", "method", "detector", "layers", "memorization_type", "T", "metric", "ours", "ours_lo",
               "ours_hi", "published", "difference"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows).merge(ref, how="left", on=["detector", "memorization_type", "T", "metric"])
    table["difference"] = table.ours - table.published
    table["method"] = table.detector.map(detector_label)
    table["_kind"] = table.memorization_type.map({"local": 0, "global": 1})
    table["_metric"] = table.metric.map({m: i for i, m in enumerate(METRICS)})
    table["_job"] = table.job.map({j: i for i, j in enumerate(dict.fromkeys(table.job))})
    table = table.sort_values(["_job", "detector", "T", "_kind", "_metric"], kind="mergesort")
    return table[columns].round(4).reset_index(drop=True)


def table1_wide(long: pd.DataFrame, job: str, digits: int = 3) -> pd.DataFrame:
    """One job's Table 1 in the paper's shape: rows method x T, columns memorization type x metric, each cell
    ``ours [interval]; paper p (difference)``."""
    part = long[long.job == job]

    def cell(r) -> str:
        mine = fmt_ci(r.ours, r.ours_lo, r.ours_hi, digits) or "-"
        if pd.isna(r.published):
            return mine
        return f"{mine}; paper {r.published:.{digits}f}" + (f" ({r.difference:+.{digits}f})"
                                                              if pd.notna(r.difference) else "")

    part = part.assign(cell=[cell(r) for r in part.itertuples()],
                       row=part.method + part.layers.map(lambda s: f" [{s}]" if s else "") + ", T=" + part["T"]
                       .astype(str),
                       column=part.memorization_type + " " + part.metric.map(METRICS))
    columns = [f"{k} {METRICS[m]}" for k in ("local", "global") for m in METRICS]
    wide = part.pivot_table(index="row", columns="column", values="cell", aggfunc="first", sort=False)
    return wide.reindex(columns=[c for c in columns if c in wide.columns]).fillna("").reset_index() \
        .rename(columns={"row": "method, T"})


# --------------------------------------------------------------------------------------------------- ground truth

def table2(jobs: list[Job]) -> pd.DataFrame:
    """The seed paper's Table 2: F1 of similarity metrics as memorization calls per kind, ours beside the
    published value (SD v1-4; metrics matched by name: SSCD, S, LS)."""
    ref = published("be2025_table2_similarity_f1.csv")
    ref = ref.assign(key=ref.metric.str.split(" ").str[0]).set_index("key")
    rows = []
    for job in jobs:
        if job.task != "detect" or not job.result.similarity_f1:
            continue
        for (metric, threshold), part in pd.DataFrame(job.result.similarity_f1).groupby(["metric", "threshold"]):
            f1 = part.set_index("kind")
            row = {"job": job.label, "metric": metric, "threshold": f">{threshold:g}",
                   "published_threshold": ref.threshold.get(metric, "")}
            for kind in ("local", "global"):
                ours = f1.f1.get(kind)
                paper = ref[f"f1_{kind}"].get(metric)
                row |= {f"f1_{kind}": ours, f"best_f1_{kind}": f1.best_f1.get(kind), f"published_f1_{kind}": paper,
                        f"difference_{kind}": None if ours is None or paper is None else ours - paper}
            rows.append(row)
    return pd.DataFrame(rows).round(4)


def localization_board(jobs: list[Job]) -> pd.DataFrame:
    """Every localizer of every job, best IoU first within a job: the BE mask of each layer set, the all-ones
    floor (with IoU and pixel AUROC of the same maps on never-trained generations as the control), and each
    token role's final-step map (pixel AUROC only); the third-party BE IoU on SD v1-4 follows as published."""
    rows = []
    for job in jobs:
        if job.task != "detect":
            continue
        if job.result.localization_leaderboard:  # every localizer, with bootstrap intervals
            rows += [{"job": job.label, **{k: r.get(k) for k in ("localizer", "iou", "iou_lo", "iou_hi", "pixel_auroc",
                                                                 "pixel_auroc_lo", "pixel_auroc_hi", "control_iou",
                                                                 "control_auroc", "n")}}
                     for r in job.result.localization_leaderboard]
            continue
        for r in job.result.localization or []:
            floor = r["layers"].startswith("all-ones")
            localizer = "all-ones mask (floor)" if floor else f"BE mask [{r['layers']}]"
            rows.append({"job": job.label, "localizer": localizer,
                         "iou": r["iou"], "pixel_auroc": r["pixel_auroc"], "control_iou": r.get("control_iou"),
                         "control_auroc": r.get("control_auroc"), "n": r.get("n")})
        for r in job.result.token_localization or []:
            rows.append({"job": job.label, "localizer": f"token map: {r['role']}", "iou": None,
                         "pixel_auroc": r["pixel_auroc"], "control_iou": None, "control_auroc": None, "n": r.get("n")})
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    table["_job"] = table.job.map({j: i for i, j in enumerate(dict.fromkeys(table.job))})
    table = table.sort_values(["_job", "iou", "pixel_auroc"], ascending=[True, False, False], kind="mergesort",
                              na_position="last").drop(columns="_job")
    ref = published("localization_iou_thirdparty.csv")
    ref = pd.DataFrame({"job": "published: " + ref.source + ", " + ref.model + " (" + ref.subset + ")",
                        "localizer": ref.method.map(lambda m: "all-ones mask (floor)" if m.startswith("all-ones")
                                                    else "BE mask"), "iou": ref.iou})
    table = pd.concat([table, ref], ignore_index=True).round(4)
    return table.assign(n=table.n.astype("Int64"))  # generations scored; none for the published rows


def intensity_summary(jobs: list[Job], layers: str = "all") -> pd.DataFrame:
    """BE intensity quartiles and Tukey whiskers per memorization type (the paper's Fig. 5 box plot as numbers),
    ours (every generation of the job, layer set ``layers`` or the job's first) and published. The detector is the
    one registered with ``reproduces=("fig5",)``."""
    rows = []
    shown = reproducing("fig5")[:1]
    for job in jobs:
        gens = job_generations(job)
        if gens is None:
            continue
        part = gens[gens.detector.isin(shown)]
        if part.empty:
            continue
        chosen = layers if layers in set(part.layers) else min(set(part.layers))
        for kind, values in part[part.layers == chosen].groupby("kind")["score"]:
            rows.append({"source": job.label, "layers": chosen,
                         "memorization_type": "non-memorized" if kind == "none" else kind, **box(values)})
    if not rows:
        return pd.DataFrame()
    ref = published("be2025_fig5_be_intensity_box.csv").assign(source=lambda t: "published: " + t.source)
    table = pd.concat([pd.DataFrame(rows), ref], ignore_index=True).round(6)
    return table.assign(n=table.n.astype("Int64"))  # generations per box; none for the published boxes


def box(values: pd.Series) -> dict:
    """Quartiles and Tukey's whiskers (the most extreme values within 1.5 IQR), as box plots draw them."""
    q1, median, q3 = values.quantile([0.25, 0.5, 0.75]).to_numpy()
    reach = 1.5 * (q3 - q1)
    return {"lower_whisker": values[values >= q1 - reach].min(), "q1": q1, "median": median, "q3": q3,
            "upper_whisker": values[values <= q3 + reach].max(), "n": len(values)}


def job_generations(job: Job) -> pd.DataFrame | None:
    """A detection job's per-generation scores (generations.csv), None for other tasks or without the file."""
    path = job.folder / "generations.csv"
    if job.task != "detect" or not path.exists():
        return None
    gens = pd.read_csv(path, keep_default_na=False, dtype={"prompt_id": str})
    gens["layers"] = gens.layers.astype(str)
    return gens


# --------------------------------------------------------------------------------------------------- mitigation, DDPM

def mitigation_points(jobs: list[Job]) -> pd.DataFrame:
    """Every mitigation job's trade-off points (kind x method x strength), labelled by job."""
    # folders written before the strength axis had its own name call it target_loss
    frames = [pd.DataFrame(job.result.curves).rename(columns={"target_loss": "strength"}).assign(
                  job=job.label, model=job.result.model, prompt_set=job.result.prompt_set,
                  utility=job.result.utility)
              for job in jobs if job.task == "mitigate"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


DDPM_COLUMNS = ["model", "sampler", "n_train", "duplicated", "copies", "n_generations", "copy_rate",
                "copies_of_duplicated", "nn_ratio_median", "carlini_median", "copied_fraction_mean"]


def ddpm_summary(jobs: list[Job]) -> pd.DataFrame:
    """One row per unconditional-DDPM job (empty without one)."""
    rows = [{"job": job.label, **{k: getattr(job.result, k) for k in DDPM_COLUMNS}} for job in jobs
            if job.task == "ddpm"]
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values(["model", "sampler"], kind="mergesort").reset_index(drop=True).round(4)


GUARD_COLUMNS = ["model", "prompt_set", "n_generations", "stopped", "restarted", "steps_saved_fraction", "caught",
                 "non_memorized_stopped"]


def guard_summary(jobs: list[Job]) -> pd.DataFrame:
    """One row per guarded-generation job (runners.guard; empty without one): its stop rule and what it saved,
    caught and stopped by mistake."""
    rows = [{"job": job.label, **{k: getattr(job.result, k) for k in GUARD_COLUMNS},
             **{f"rule {k}": v for k, v in job.result.rule.items()},
             "restart": (job.result.restart or {}).get("method", "stop")}
            for job in jobs if job.task == "guard"]
    return pd.DataFrame(rows).round(4) if rows else pd.DataFrame()
