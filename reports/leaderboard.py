"""Aggregate job folders into paper-style tables with the published numbers beside ours.

    python -m reports.leaderboard outputs/multirun/detect/table1 [more folders] --out reports/out

Writes Markdown + CSV (+ LaTeX for the paper tables) of: the leaderboard, Table 1 and Table 2 layouts, localization,
BE intensity by type, mitigation trade-off points, unconditional-DDPM copies; and one self-contained ``leaderboard.html`` (ROC curves, layer x T
heat maps, mask galleries, trade-off curves beside the paper's). Markdown and CSV are byte-identical for the same
folders. Rows marked ``published`` are quoted from ``reports/reference``; all others are ours.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.jobfolder import read_job, write_config

from benchmark.registry import DETECTORS, LOCALIZERS

REFERENCE = Path(__file__).parent / "reference"
method_name = DETECTORS.label  # a detector's display label; an unregistered name shows as itself
KEYS = ["model", "prompt_set", "steps", "n_images", "level", "detector", "layers", "T", "subset"]


def job_folders(paths: list[str | Path]) -> list[Path]:
    """Every finished job folder (one with metrics.json) under the given folders, in a stable order."""
    found = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such folder: {path}")
        found |= {p.parent for p in path.rglob("metrics.json")}
    if not found:
        raise ValueError(f"no finished job (metrics.json) under {', '.join(map(str, paths))}")
    return sorted(found)


def results(paths: list[str | Path], task: str) -> list[tuple[Path, dict]]:
    """(folder, metrics.json) of every finished job of one task (``detect``, ``mitigate``, ``ddpm``)."""
    out = []
    for folder in job_folders(paths):
        result = json.loads((folder / "metrics.json").read_text())
        if result.get("task", "detect") == task:
            out.append((folder, result))
    return out


def collect(paths: list[str | Path]) -> pd.DataFrame:
    """One row per detection job x metric row, with the job's configuration columns (empty without such jobs)."""
    frames = []
    for folder, result in results(paths, "detect"):
        job = read_job(folder)
        frame = pd.DataFrame(result["metrics"])
        frame.insert(0, "job", str(folder))
        frame.insert(1, "model", result["model"])
        frame.insert(2, "prompt_set", result["prompt_set"])
        frame.insert(3, "steps", job.sampler.get("steps", -1))
        frame.insert(4, "n_images", job.n_images if job.n_images is not None else -1)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=KEYS + ["job"])
    table = pd.concat(frames, ignore_index=True)
    table["layers"] = table["layers"].fillna("")
    return table.sort_values(KEYS + ["job"], kind="mergesort").reset_index(drop=True)


def _cell(row: pd.Series, name: str) -> str:
    if pd.isna(row.get(name)):
        return ""
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if lo is None or pd.isna(lo):
        return f"{row[name]:.3f}"
    return f"{row[name]:.3f} [{lo:.3f}, {hi:.3f}]"


def table1(ours: pd.DataFrame, layers: str = "all", level: str = "prompt") -> pd.DataFrame:
    """The seed paper's Table 1 layout: method x memorization type x T -> AUC, F1, TPR@1%FPR, ours and published."""
    rows = ours[(ours.level == level) & ours.detector.isin(["D", "LD"]) & (ours.subset != "all")
                & ((ours.layers == "") | (ours.layers == layers))] if not ours.empty else ours
    out = pd.DataFrame(columns=["source", "method", "memorization_type", "T", "auc", "f1", "tpr_at_1pct_fpr"]) \
        if rows.empty else pd.DataFrame({
        "source": "ours: " + rows.model + " / " + rows.prompt_set + " (" + rows.steps.astype(str) + " steps, "
                  + rows.n_images.astype(str) + " images)",
        "method": rows.detector.map(method_name), "memorization_type": rows.subset, "T": rows["T"],
        "auc": [_cell(r, "auc") for _, r in rows.iterrows()],
        "f1": [_cell(r, "f1") for _, r in rows.iterrows()],
        "tpr_at_1pct_fpr": [_cell(r, "tpr_at_1pct_fpr") for _, r in rows.iterrows()]})
    published = pd.read_csv(REFERENCE / "be2025_table1_detection.csv")
    published = published.assign(source="published: " + published.source + ", " + published.model)
    for name in ("auc", "f1", "tpr_at_1pct_fpr"):
        published[name] = published[name].map(lambda v: f"{v:.3f}")
    both = pd.concat([out, published[out.columns]], ignore_index=True)
    return both.sort_values(["memorization_type", "method", "T", "source"], kind="mergesort").reset_index(drop=True)


def leaderboard(ours: pd.DataFrame, metric: str = "auc", subset: str = "all", level: str = "prompt") -> pd.DataFrame:
    """Every (job, detector, layers, T) on one subset, best first."""
    columns = ["model", "prompt_set", "steps", "n_images", "method", "T", metric, f"{metric}_ci", "n_pos", "n_neg"]
    if ours.empty:
        return pd.DataFrame(columns=columns)
    rows = ours[(ours.level == level) & (ours.subset == subset)].copy()
    rows["method"] = rows.detector.map(method_name) + rows.layers.map(lambda l: f" [{l}]" if l else "")
    rows[f"{metric}_ci"] = [_cell(r, metric) for _, r in rows.iterrows()]
    rows[metric] = rows[metric].round(4)
    return rows.sort_values([metric, "model", "method", "T"], ascending=[False, True, True, True],
                            kind="mergesort")[columns].reset_index(drop=True)


def _published(name: str) -> pd.DataFrame:
    table = pd.read_csv(REFERENCE / name)
    return table.assign(source="published: " + table.source)


def table2(paths: list[str | Path]) -> pd.DataFrame:
    """The seed paper's Table 2: F1 of similarity metrics as memorization calls, ours (ground-truth jobs) and
    published."""
    rows = []
    for folder, result in results(paths, "detect"):
        if not result.get("similarity_f1"):
            continue
        for (metric, threshold), part in pd.DataFrame(result["similarity_f1"]).groupby(["metric", "threshold"]):
            f1 = part.set_index("kind")
            rows.append({"source": f"ours: {result['model']} / {result['prompt_set']}", "metric": metric,
                         "threshold": f">{threshold:g}",
                         **{f"f1_{k}": f"{f1.f1[k]:.3f} (best {f1.best_f1[k]:.3f})" if k in f1.index else ""
                            for k in ("local", "global")}})
    published = _published("be2025_table2_similarity_f1.csv")
    for k in ("local", "global"):
        published[f"f1_{k}"] = published[f"f1_{k}"].map(lambda v: f"{v:.3f}")
    return pd.concat([pd.DataFrame(rows), published[["source", "metric", "threshold", "f1_local", "f1_global"]]],
                     ignore_index=True)


def localization_summary(paths: list[str | Path]) -> pd.DataFrame:
    """Mask IoU (and pixel AUROC, ours only, with its unrelated-mask control) per layer set, with the third-party
    BE IoU on SD v1-4 beside it."""
    rows = [{"source": f"ours: {result['model']} / {result['prompt_set']}", "subset": "local (planted)",
             "method": "all-ones mask" if r["layers"].startswith("all-ones") else f"BE [{r['layers']}]"
             if r.get("localizer", "BE") == "BE" else LOCALIZERS.label(r["localizer"]),  # an extra pass's map
             "iou": f"{r['iou']:.3f}", "pixel_auroc": f"{r['pixel_auroc']:.3f}",
             "control_auroc": f"{r['control_auroc']:.3f}" if "control_auroc" in r else ""}
            for _, result in results(paths, "detect") for r in result.get("localization", [])]
    published = _published("localization_iou_thirdparty.csv")
    published["iou"] = published.iou.map(lambda v: f"{v:.3f}")
    published["pixel_auroc"] = published["control_auroc"] = ""
    return pd.concat([pd.DataFrame(rows), published[["source", "subset", "method", "iou", "pixel_auroc",
                                                     "control_auroc"]]],
                     ignore_index=True)


def intensity_summary(paths: list[str | Path], layers: str = "all") -> pd.DataFrame:
    """BE intensity quartiles per memorization type (the paper's Fig. 5 box plot as numbers), ours and published.
    Our scale is the testbed's, not SD's: compare the ordering, not the values."""
    rows = []
    for folder, result in results(paths, "detect"):
        gens = pd.read_csv(folder / "generations.csv", keep_default_na=False)
        part = gens[(gens.detector == "BE_intensity") & (gens.layers == layers)]
        for kind, values in part.groupby("kind")["score"]:
            q1, median, q3 = values.quantile([0.25, 0.5, 0.75]).to_numpy()
            reach = 1.5 * (q3 - q1)  # Tukey's whiskers, as box plots draw them
            rows.append({"source": f"ours: {result['model']} / {result['prompt_set']}",
                         "memorization_type": "non-memorized" if kind == "none" else kind,
                         "lower_whisker": values[values >= q1 - reach].min(), "q1": q1, "median": median, "q3": q3,
                         "upper_whisker": values[values <= q3 + reach].max()})
    published = _published("be2025_fig5_be_intensity_box.csv")
    return pd.concat([pd.DataFrame(rows), published], ignore_index=True).round(5)


def mitigation_points(paths: list[str | Path]) -> pd.DataFrame:
    """Every mitigation job's trade-off points (kind x method x target loss)."""
    frames = [pd.DataFrame(result["curves"]).assign(model=result["model"], prompt_set=result["prompt_set"],
                                                    utility=result["utility"], job=str(folder))
              for folder, result in results(paths, "mitigate")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


DDPM_COLUMNS = ["model", "sampler", "n_train", "duplicated", "copies", "n_generations", "copy_rate",
                "copies_of_duplicated", "nn_ratio_median", "carlini_median", "copied_fraction_mean"]


def ddpm_summary(paths: list[str | Path]) -> pd.DataFrame:
    """One row per unconditional-DDPM job: its training-set knobs, sampler and memorization measures."""
    rows = [{k: result.get(k) for k in DDPM_COLUMNS} for _, result in results(paths, "ddpm")]
    table = pd.DataFrame(rows, columns=DDPM_COLUMNS)
    return table.sort_values(["model", "sampler"], kind="mergesort").reset_index(drop=True).round(4)


# --------------------------------------------------------------------------------------------------- pictures

def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def roc_figure(job: Path, T: int, layers: str = "all") -> str:
    """ROC curves of every detector for one job, prompt level, all memorized vs not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    gens = pd.read_csv(job / "generations.csv", keep_default_na=False, dtype={"prompt_id": str})
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for detector in DETECTORS:
        entry = DETECTORS[detector]
        rows = gens[(gens.detector == detector) & (gens.layers == (layers if entry.uses_layers else ""))
                    & (gens["T"] == (T if entry.uses_T else 0))]
        if rows.empty:
            continue
        prompt = rows.groupby("prompt_id").agg(score=("score", "mean"), memorized=("memorized", "first"))
        sign = 1 if DETECTORS[detector].higher_is_memorized else -1
        fpr, tpr, _ = roc_curve(prompt.memorized.astype(bool), sign * prompt.score)
        ax.plot(fpr, tpr, label=method_name(detector))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"T={T}, layers={layers}")
    ax.legend(fontsize=8)
    return _png(fig)


def heatmap_figure(ours: pd.DataFrame, job: str, detector: str = "LD", metric: str = "auc") -> str:
    """Layer set x T -> metric for one job (prompt level, all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ours[(ours.job == job) & (ours.detector == detector) & (ours.level == "prompt") & (ours.subset == "all")]
    grid = rows.pivot_table(index="layers", columns="T", values=metric)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * grid.shape[1], 0.9 + 0.35 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                fontsize=8)
    ax.set(xlabel="T (first steps)", title=f"{method_name(detector)} {metric}")
    fig.colorbar(image, ax=ax)
    return _png(fig)


def tradeoff_figure(points: pd.DataFrame) -> str:
    """Similarity vs utility per memorization kind: our mitigation curves (left) and the paper's digitized Fig. 6/7
    (right; SSCD vs CLIP score on SD v1-4). Ours use the similarity and utility measures the job had."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    published = pd.read_csv(REFERENCE / "be2025_fig6_fig7_mitigation_digitized.csv")
    # distances (train_rmse, caption_rmse) are drawn on inverted axes, so that up = more similar to the training
    # image and right = more faithful to the prompt, as SSCD and CLIP score are in the paper's figures
    similarity = next((m for m in ("SSCD", "train_rmse", "S") if m in points), None)
    kinds = sorted(points.kind.unique())
    fig, axes = plt.subplots(len(kinds), 2, figsize=(9, 3.4 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        part = points[points.kind == kind]
        for (job, method), curve in part.groupby(["job", "method"], sort=True):
            curve = curve.sort_values("target_loss", na_position="last")
            style = "*" if method == "none" else "o-"
            row[0].plot(curve[curve.utility.iloc[0]], curve[similarity], style, label=f"{method}")
        utility = part.utility.iloc[0]
        row[0].set(xlabel=utility + (" (axis inverted)" if utility == "caption_rmse" else ""),
                   ylabel=similarity + (" to the training image (axis inverted)" if similarity == "train_rmse" else ""),
                   title=f"ours: {kind}")
        if utility == "caption_rmse":
            row[0].invert_xaxis()
        if similarity == "train_rmse":
            row[0].invert_yaxis()
        row[0].legend(fontsize=8)
        ref = published[(published.mem_type == kind) & (published.y_metric == "SSCD")]
        for method, curve in ref.groupby("method", sort=True):
            row[1].plot(curve.clip_score, curve.similarity, "o-" if len(curve) > 1 else "*", label=method)
        row[1].set(xlabel="CLIP score", ylabel="SSCD", title=f"published (BE Fig. 6/7, digitized): {kind}")
        row[1].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def html_page(ours: pd.DataFrame, board: pd.DataFrame, t1: pd.DataFrame, extra: dict[str, pd.DataFrame],
              points: pd.DataFrame, ddpm_jobs: list[tuple[Path, dict]]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>be-bench leaderboard</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{margin:6px}</style></head><body>",
             "<h1>be-bench leaderboard</h1>",
             "<p>Rows marked <b>published</b> are quoted from the papers (reports/reference); all others are ours.</p>",
             "<h2>Leaderboard (prompt level, all memorized vs not)</h2>", board.to_html(index=False),
             "<h2>Table 1 layout</h2>", t1.to_html(index=False)]
    for title, table in extra.items():
        parts += [f"<h2>{title}</h2>", table.to_html(index=False)]
    if not points.empty and points.utility.notna().all() and {"SSCD", "train_rmse", "S"} & set(points):
        parts += ["<h2>Mitigation trade-off</h2>",
                  f"<img alt='trade-off curves' src='data:image/png;base64,{tradeoff_figure(points)}'>"]
    for folder, _ in ddpm_jobs:
        encoded = base64.b64encode((folder / "copies.png").read_bytes()).decode("ascii")
        parts.append(f"<h3>{folder}</h3><img alt='copies: generation | nearest | copied patches' "
                     f"src='data:image/png;base64,{encoded}'>")
    parts.append("<h2>Pictures</h2>")
    for job in sorted(ours.job.unique()):
        windows = sorted(t for t in ours[ours.job == job]["T"].unique() if t)
        parts.append(f"<h3>{job}</h3>")
        parts.append(f"<img alt='ROC' src='data:image/png;base64,{roc_figure(Path(job), windows[0])}'>")
        parts.append(f"<img alt='heat map' src='data:image/png;base64,{heatmap_figure(ours, job)}'>")
        gallery = Path(job) / "masks.png"
        if gallery.exists():  # testbed jobs: generation | BE mask | ground-truth region
            encoded = base64.b64encode(gallery.read_bytes()).decode("ascii")
            parts.append(f"<img alt='BE masks and ground truth' src='data:image/png;base64,{encoded}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(paths: list[str | Path], out: str | Path, metric: str = "auc") -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ours = collect(paths)
    board, t1 = leaderboard(ours, metric), table1(ours)
    extra = {"Table 2 layout: similarity metrics as memorization calls (F1)": table2(paths),
             "Localization: BE mask vs ground truth": localization_summary(paths),
             "BE intensity by memorization type (Fig. 5 as numbers)": intensity_summary(paths),
             "Unconditional DDPMs: copies of training images": ddpm_summary(paths),
             "Published third-party re-run of detection (not ours)": _published("sail2025_detection_rerun.csv")}
    points = mitigation_points(paths)
    files = {"leaderboard.md": board.to_markdown(index=False) + "\n", "leaderboard.csv": board.to_csv(index=False),
             "table1.md": t1.to_markdown(index=False) + "\n", "table1.csv": t1.to_csv(index=False),
             "table1.tex": t1.to_latex(index=False)}
    for stem, table in zip(("table2", "localization", "intensity", "ddpm"), extra.values()):
        files |= {f"{stem}.md": table.to_markdown(index=False) + "\n", f"{stem}.csv": table.to_csv(index=False)}
    files["table2.tex"] = extra["Table 2 layout: similarity metrics as memorization calls (F1)"].to_latex(index=False)
    if not points.empty:
        files |= {"mitigation.md": points.round(4).to_markdown(index=False) + "\n",
                  "mitigation.csv": points.to_csv(index=False)}
    ddpm_jobs = [(f, r) for f, r in results(paths, "ddpm") if (f / "copies.png").exists()]
    files["leaderboard.html"] = html_page(ours, board, t1, extra, points, ddpm_jobs)
    for name, text in files.items():
        (out / name).write_text(text)
    return {name: out / name for name in files}


JOB_FILES = ("metrics.json", "generations.csv", "mitigation.csv", "masks.png")


def fetch_wandb(project: str, out: str | Path, api=None) -> Path:
    """Rebuild job folders from the W&B runs of ``entity/project`` (the files each job attached to its run), so
    the report reads them like any other folder. Needs network access and a login; ``api`` is for tests."""
    if api is None:
        import wandb

        api = wandb.Api()
    root = Path(out) / "wandb"
    for run in api.runs(project):
        names = {f.name for f in run.files()}
        if "metrics.json" not in names:
            continue  # a run without the job files (e.g. still running)
        folder = root / run.id
        for name in JOB_FILES:
            if name in names:
                run.file(name).download(root=str(folder), replace=True)
        write_config(folder, dict(run.config))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs of a W&B project")
    parser.add_argument("--out", default="outputs/report")
    parser.add_argument("--metric", default="auc", choices=["auc", "tpr_at_1pct_fpr", "f1"])
    args = parser.parse_args()
    folders = list(args.folders) + ([fetch_wandb(args.wandb, args.out)] if args.wandb else [])
    if not folders:
        parser.error("give job folders and/or --wandb ENTITY/PROJECT")
    for name, path in write_report(folders, args.out, args.metric).items():
        print(path)


if __name__ == "__main__":
    main()
