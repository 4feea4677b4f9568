"""Aggregate job folders into one report: the headline answers first, then the paper's tables with the published
numbers beside ours, the explorable leaderboard and the pictures.

    python -m reports.leaderboard outputs/detect/testbed outputs/mitigate/testbed --out outputs/report

Writes ``leaderboard.html`` (one self-contained page, opens offline), ``report.md`` (the same content for a
terminal or a paper draft; pictures left out), and Markdown + CSV per table (+ LaTeX for Tables 1 and 2). Sections
with no job of ours are left out. Two folders with the same configuration are one job (the latest finished run;
``reports.jobs``). Markdown and CSV are byte-identical for the same folders. Published numbers are quoted from
``reports/reference`` and always marked ``paper`` or ``published``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from benchmark.store.job_folder import write_config
from reports import html, plots
from reports.headline import Group, headline_groups
from reports.jobs import Job, OtherJob, finished_jobs, job_folders, link, other_jobs  # noqa: F401  (job_folders: public)
from reports.latex import escape, to_latex
from reports.summary import report_summary
from reports.tables import (
    PAPER,
    ddpm_summary,
    guard_summary,
    intensity_summary,
    job_generations,
    leaderboard,
    localization_board,
    mitigation_points,
    published,
    table1,
    table1_wide,
    table2,
)
from reports.tables import collect as _collect

# every file write_report may produce; those a new report does not produce are removed from --out
OUTPUT_FILES = [f"{stem}.{ext}" for stem in ("leaderboard", "table1", "table2", "localization", "intensity",
                                             "mitigation", "ddpm", "guard", "jobs") for ext in ("md", "csv")] + [
    "table1.tex", "table2.tex", "report.md", "leaderboard.html"]


def collect(paths: list[str | Path]) -> pd.DataFrame:
    """Every detection job's metric rows (one job per distinct configuration) under ``paths``."""
    return _collect(finished_jobs(paths))


def jobs_table(jobs: list[Job], others: list[OtherJob], out: Path) -> pd.DataFrame:
    """One row per job folder: the reported jobs, then the failed, unfinished and superseded folders (``status``),
    with error.txt's first line and the reported job that replaces them, where there is one."""
    rows = [{"job": j.label, "task": j.task, "status": "reported", "folder": j.link(out), "error": "",
             "replaced by": ""} for j in jobs]
    rows += [{"job": "", "task": o.task, "status": o.status, "folder": link(o.folder, out), "error": o.error,
              "replaced by": o.replaced_by} for o in others]
    return pd.DataFrame(rows)


def _lede(jobs: list[Job], others: list[OtherJob]) -> str:
    counts = pd.Series([j.task for j in jobs]).value_counts()
    statuses = pd.Series([o.status for o in others], dtype=object).value_counts()
    left_out = ", ".join(f"{statuses[s]} {s}" for s in ("failed", "unfinished", "superseded") if s in statuses)
    text = (f"{len(jobs)} job(s): " + ", ".join(f"{n} {task}" for task, n in counts.items())
            + (f"; not reported: {left_out} job folder(s), listed in Jobs" if left_out else "")
            + f". Values marked <i>paper</i> or <i>published</i> are quoted from {PAPER} and others "
            "(reports/reference); all else is measured here. Intervals: bootstrap 95%.")
    return text


def _markdown_findings(groups: list[Group]) -> str:
    lines = []
    for group in groups:
        lines.append(f"### {group.name}\n")
        for job in dict.fromkeys(f.job for f in group.findings):
            lines.append(f"From job: {job}\n")
        lines += [f"- {f.sentence}" for f in group.findings]
        figures = [r for f in group.findings for r in f.rows]
        if figures:
            lines += ["", pd.DataFrame(figures).to_markdown(index=False)]
        if group.others:
            lines.append(f"\n{len(group.others)} more job(s) of this group are in the tables below.")
        lines.append("")
    return "\n".join(lines)


def _md(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4g") + "\n"


def write_report(paths: list[str | Path], out: str | Path, metric: str = "auc") -> dict[str, Path]:
    """Write the report of every finished job under ``paths`` into ``out``, the failed, unfinished and superseded
    job folders counted in the lede and listed in the jobs table; returns {file name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = finished_jobs(paths)
    links = {j.label: j.link(out) for j in jobs}
    ours = _collect(jobs)
    board = leaderboard(ours)
    t1 = table1(ours)
    t2 = table2(jobs)
    loc = localization_board(jobs)
    intensity = intensity_summary(jobs)
    points = mitigation_points(jobs)
    ddpm = ddpm_summary(jobs)
    guarded = guard_summary(jobs)
    groups = headline_groups(jobs)
    detect_jobs = [j for j in jobs if j.task == "detect"]
    others = other_jobs(paths, jobs)
    job_list = jobs_table(jobs, others, out)

    files: dict[str, str] = {"jobs.md": _md(job_list), "jobs.csv": job_list.to_csv(index=False)}
    md = ["# be-bench report", "", _lede(jobs, others).replace("<i>", "*").replace("</i>", "*"), "",
          "## The answer", "", _markdown_findings(groups), "## Jobs", "", _md(job_list)]
    sections = [("answer", "The answer", html.headline_section(groups, links))]
    if not board.empty:
        files |= {"leaderboard.md": _md(board), "leaderboard.csv": board.to_csv(index=False)}
    if not t1.empty:
        files |= {"table1.csv": t1.to_csv(index=False)}
        wide = {job: table1_wide(t1, job) for job in dict.fromkeys(t1.job)}
        files["table1.md"] = "\n".join(f"### {job}\n\n{_md(w)}" for job, w in wide.items())
        files["table1.tex"] = "\n".join(f"% {escape(job)}\n{to_latex(w)}" for job, w in wide.items())
        caption = (f"Each cell: ours [95% CI], then the paper's value (SD v1-4, {PAPER} Table 1) and ours - paper. "
                   "Prompt level; LD with the layer set named in the row.")
        md += ["## Table 1: detection by T and memorization type", "", caption, "", files["table1.md"]]
        sections.append(("table1", "Table 1: detection by T and memorization type",
                         f"<p>{caption}</p>" + "".join(
                             f"<h3>{html.escape(job)}</h3>{html.table1_html(t1, job)}" for job in wide)))
    if not ours.empty:
        figures = "".join(html._img(plots.auc_vs_T_figure(ours, job, metric), f"{metric} vs T",
                                    f"{job}: prompt level, error bars = bootstrap 95% CI; open squares = the paper")
                          for job in dict.fromkeys(ours.job))
        sections.append(("by-T", f"{html.METRICS.get(metric, metric)} vs T per detector", figures))
        sections.append(("leaderboard", "Leaderboard (every detector, layer set, T, subset, level)",
                         "<p>Click a column header to sort (again to reverse); filter and group with the menus. "
                         "Default: prompt level, grouped by job in the order of the tables above.</p>"
                         + html.leaderboard_html(board)))
        md += ["## Leaderboard (prompt level; every level in leaderboard.md / .csv)", "",
               _md(board[board.level == "prompt"])]
    if not t2.empty:
        files |= {"table2.md": _md(t2), "table2.csv": t2.to_csv(index=False), "table2.tex": to_latex(t2)}
        caption = ("F1 of similarity metrics as memorization calls (ours: ground-truth jobs; S, LS on the 0-255 "
                   f"scale), the paper's value ({PAPER} Table 2, SD v1-4) and ours - paper.")
        md += ["## Table 2: similarity metrics as memorization calls", "", caption, "", files["table2.md"]]
        sections.append(("table2", "Table 2: similarity metrics as memorization calls",
                         f"<p>{caption}</p>{html._table(t2)}"))
    if not loc.empty and (~loc.job.str.startswith("published")).any():
        files |= {"localization.md": _md(loc), "localization.csv": loc.to_csv(index=False)}
        caption = ("Every localizer, best IoU first within a job; control = the same maps of never-trained "
                   "generations scored against the planted masks (what a spatial bias alone reaches).")
        galleries = "".join(html._img(plots.gallery_figure(j.folder / "masks.png", j.label), "mask gallery")
                            for j in detect_jobs if (j.folder / "masks.png").exists())
        md += ["## Localization", "", caption, "", files["localization.md"]]
        sections.append(("localization", "Localization: every localizer against the ground truth",
                         f"<p>{caption}</p>{html._table(loc)}<div class='pics'>{galleries}</div>"))
    if not intensity.empty:
        files |= {"intensity.md": _md(intensity), "intensity.csv": intensity.to_csv(index=False)}
        caption = ("BE intensity by memorization type (the paper's Fig. 5): quartiles and Tukey whiskers. "
                   "Each panel has its own scale; the order of the boxes is what compares.")
        md += ["## BE intensity by memorization type (Fig. 5)", "", caption, "", files["intensity.md"]]
        sections.append(("intensity", "BE intensity by memorization type (Fig. 5)",
                         f"<p>{caption}</p>" + html._img(plots.intensity_figure(intensity), "intensity box plots")
                         + html._table(intensity, 5)))
    if not points.empty:
        files |= {"mitigation.md": _md(points), "mitigation.csv": points.to_csv(index=False)}
        md += ["## Mitigation trade-off (Fig. 6/7)", "", files["mitigation.md"]]
        figure = ""
        if points.utility.notna().all() and set(plots._SIMILARITIES) & set(points):
            figure = html._img(plots.tradeoff_figure(points), "trade-off curves",
                               "Similarity to the training image vs utility; ours beside the paper's Fig. 6/7.")
        sections.append(("mitigation", "Mitigation trade-off (Fig. 6/7)", figure + html._table(points, 4)))
    if not ddpm.empty:
        files |= {"ddpm.md": _md(ddpm), "ddpm.csv": ddpm.to_csv(index=False)}
        md += ["## Unconditional DDPMs: copies of training images", "", files["ddpm.md"]]
        pictures = "".join(
            f"<h3>{html.escape(j.label)}</h3>" + html._img(plots_b64(j.folder / "copies.png"),
                                                          "copies: generation | nearest | copied patches")
            for j in jobs if j.task == "ddpm" and (j.folder / "copies.png").exists())
        sections.append(("ddpm", "Unconditional DDPMs: copies of training images", html._table(ddpm, 4) + pictures))
    if not guarded.empty:
        title = "Guarded generation: in-loop early stopping on the early bright ending"
        files |= {"guard.md": _md(guarded), "guard.csv": guarded.to_csv(index=False)}
        md += [f"## {title}", "", files["guard.md"]]
        sections.append(("guard", title, html._table(guarded, 4)))
    if detect_jobs:
        pictures = []
        for job in detect_jobs:
            gens = job_generations(job)
            metrics = pd.DataFrame(job.result["metrics"])
            windows = sorted(t for t in metrics["T"].unique() if t)
            figs = [html._img(plots.heatmap_figure(ours, job.label, "LD", metric), "layer x T heat map")]
            if gens is not None and windows:
                figs.insert(0, html._img(plots.roc_figure(gens, metrics, job.label, windows[0]), "ROC curves"))
            early = plots.early_figure(job.result, job.label)
            if early:
                figs.append(html._img(early, "early-step BE by step k"))
            pictures.append(f"<h3>{html.escape(job.label)}</h3><div class='pics'>{''.join(figs)}</div>")
        sections.append(("pictures", "ROC curves, layer x T heat maps and early-step BE per job", "".join(pictures)))
    sections.append(("jobs", "Jobs", html.jobs_html(job_list)))
    rerun = published("sail2025_detection_rerun.csv")
    sections.append(("reference", "Published third-party re-run of detection (not ours)",
                     f"<details><summary>{len(rerun)} published rows</summary>{html._table(rerun)}</details>"))
    files["report.md"] = "\n".join(md)
    files["leaderboard.html"] = html.page(sections, _lede(jobs, others))
    for name in OUTPUT_FILES:
        if name not in files:
            (out / name).unlink(missing_ok=True)  # a section this report leaves out: no stale file from before
    for name, text in files.items():
        (out / name).write_text(text)
    return {name: out / name for name in files}


def plots_b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode("ascii")


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
    parser.add_argument("--metric", default="auc", choices=["auc", "tpr_at_1pct_fpr", "f1"],
                        help="the metric of the by-T plots and heat maps")
    args = parser.parse_args()
    folders = list(args.folders) + ([fetch_wandb(args.wandb, args.out)] if args.wandb else [])
    if not folders:
        parser.error("give job folders and/or --wandb ENTITY/PROJECT")
    print(report_summary(write_report(folders, args.out, args.metric)))


if __name__ == "__main__":
    main()
