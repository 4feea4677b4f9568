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
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.jobs.results import ResultError
from benchmark.store.job_folder import write_config
from reports import html, plots
from reports.headline import Group, headline_groups
from reports.jobs import Job, OtherJob, finished_jobs, job_folders, link, other_jobs  # noqa: F401  (job_folders: public)
from reports.labels import grid_detectors
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
    published_mitigation,
    table1,
    table1_wide,
    table2,
)
from reports.tables import collect as _collect


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


@dataclass
class Section:
    """One part of the report: its title, caption, figures and tables. ``html``: the page's body after the caption;
    ``markdown``: report.md's (None: on the page only); ``files``: extension -> content of the files
    ``<stem>.<ext>`` it writes beside the report (``formats``, declared even when the section is empty, so a
    later report without it removes them); ``shown`` False: nothing of ours, the section and its files left out."""

    anchor: str
    title: str
    caption: str = ""
    html: str = ""
    markdown: str | None = None
    stem: str | None = None
    formats: tuple[str, ...] = ("md", "csv")
    files: dict[str, str] = field(default_factory=dict)
    shown: bool = True

    def file_names(self) -> list[str]:
        return [f"{self.stem}.{ext}" for ext in self.formats] if self.stem else []


@dataclass
class Inputs:
    """What the sections are built from: the reported jobs, the other folders, their detection rows."""

    jobs: list[Job]
    others: list[OtherJob]
    out: Path
    metric: str
    ours: pd.DataFrame = field(init=False)

    def __post_init__(self):
        self.ours = _collect(self.jobs)

    @property
    def detect_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.task == "detect"]


def table_section(anchor: str, title: str, stem: str, table: pd.DataFrame, caption: str = "", figures: str = "",
                  digits: int = 3, after: str = "", latex: bool = False) -> Section:
    """A section of one table: ``<stem>.md`` / ``.csv`` (``.tex`` with ``latex``), the Markdown table in
    report.md; on the page the caption, ``figures``, the table (``digits``) and ``after``. Left out when empty."""
    if table.empty:
        return Section(anchor, title, stem=stem, formats=("md", "csv", "tex") if latex else ("md", "csv"),
                       shown=False)
    files = {"md": _md(table), "csv": table.to_csv(index=False)} | ({"tex": to_latex(table)} if latex else {})
    return Section(anchor, title, caption, figures + html._table(table, digits) + after, files["md"], stem,
                   tuple(files), files)


def answer_section(r: Inputs) -> Section:
    groups = headline_groups(r.jobs)
    return Section("answer", "The answer", html=html.headline_section(groups, {j.label: j.link(r.out) for j in r.jobs}),
                   markdown=_markdown_findings(groups))


def table1_section(r: Inputs) -> Section:
    t1 = table1(r.ours)
    title = "Table 1: detection by T and memorization type"
    if t1.empty:
        return Section("table1", title, stem="table1", formats=("md", "csv", "tex"), shown=False)
    wide = {job: table1_wide(t1, job) for job in dict.fromkeys(t1.job)}
    files = {"csv": t1.to_csv(index=False), "md": "\n".join(f"### {job}\n\n{_md(w)}" for job, w in wide.items()),
             "tex": "\n".join(f"% {escape(job)}\n{to_latex(w)}" for job, w in wide.items())}
    caption = (f"Each cell: ours [95% CI], then the paper's value (SD v1-4, {PAPER} Table 1) and ours - paper. "
               "Prompt level; LD with the layer set named in the row.")
    body = "".join(f"<h3>{html.escape(job)}</h3>{html.table1_html(t1, job)}" for job in wide)
    return Section("table1", title, caption, body, files["md"], "table1", ("md", "csv", "tex"), files)


def by_T_section(r: Inputs) -> Section:
    figures = "".join(html._img(plots.auc_vs_T_figure(r.ours, job, r.metric), f"{r.metric} vs T",
                                f"{job}: prompt level, error bars = bootstrap 95% CI; open squares = the paper")
                      for job in dict.fromkeys(r.ours.job))
    return Section("by-T", f"{html.METRICS.get(r.metric, r.metric)} vs T per detector", html=figures,
                   shown=not r.ours.empty)


def leaderboard_section(r: Inputs) -> Section:
    board = leaderboard(r.ours)
    title = "Leaderboard (every detector, layer set, T, subset, level)"
    if board.empty:
        return Section("leaderboard", title, stem="leaderboard", shown=False)
    body = ("<p>Click a column header to sort (again to reverse); filter and group with the menus. "
            "Default: prompt level, grouped by job in the order of the tables above.</p>"
            + html.leaderboard_html(board))
    markdown = "Prompt level here; every level in leaderboard.md / .csv.\n\n" + _md(board[board.level == "prompt"])
    return Section("leaderboard", title, html=body, markdown=markdown, stem="leaderboard",
                   files={"md": _md(board), "csv": board.to_csv(index=False)})


def table2_section(r: Inputs) -> Section:
    caption = ("F1 of similarity metrics as memorization calls (ours: ground-truth jobs; S, LS on the 0-255 "
               f"scale), the paper's value ({PAPER} Table 2, SD v1-4) and ours - paper.")
    return table_section("table2", "Table 2: similarity metrics as memorization calls", "table2", table2(r.jobs),
                         caption, latex=True)


def localization_section(r: Inputs) -> Section:
    loc = localization_board(r.jobs)
    if not loc.empty and loc.job.str.startswith("published").all():
        loc = loc.iloc[:0]  # the published rows alone: nothing of ours to localize
    caption = ("Every localizer, best IoU first within a job; control = the same maps of never-trained "
               "generations scored against the planted masks (what a spatial bias alone reaches).")
    galleries = "".join(html._img(plots.gallery_figure(j.folder / "masks.png", j.label), "mask gallery")
                        for j in r.detect_jobs if (j.folder / "masks.png").exists())
    return table_section("localization", "Localization: every localizer against the ground truth", "localization",
                         loc, caption, after=f"<div class='pics'>{galleries}</div>")


def intensity_section(r: Inputs) -> Section:
    intensity = intensity_summary(r.jobs)
    caption = ("BE intensity by memorization type (the paper's Fig. 5): quartiles and Tukey whiskers. "
               "Each panel has its own scale; the order of the boxes is what compares.")
    figure = html._img(plots.intensity_figure(intensity), "intensity box plots") if not intensity.empty else ""
    return table_section("intensity", "BE intensity by memorization type (Fig. 5)", "intensity", intensity, caption,
                         figure, digits=5)


def mitigation_section(r: Inputs) -> Section:
    points = mitigation_points(r.jobs)
    figure = ""
    for (model, prompt_set), part in (points.groupby(["model", "prompt_set"], sort=True) if not points.empty else ()):
        # one figure per model and prompt set: their measures and scales are their own
        part = part.dropna(axis=1, how="all")
        # a job without a utility measure (no CLIP weights, no caption renderer) has no curve to draw
        if "utility" in part and part.utility.notna().all() and set(plots._SIMILARITIES) & set(part):
            figure += html._img(plots.tradeoff_figure(part), f"trade-off curves: {model} on {prompt_set}",
                                f"{model} on {prompt_set}: similarity to the training image vs utility, every "
                                "method's curve, the Pareto front ringed; ours beside the paper's Fig. 6/7.")
    quoted = published_mitigation()
    # beside ours, never in ours: the papers' model and prompts are not the testbed's
    after = (f"<details><summary>{len(quoted)} published rows ({', '.join(sorted(quoted.source.unique()))}): "
             "published, SD v1-4, not comparable to testbed numbers</summary>"
             f"{html._table(quoted, 3)}</details>")
    return table_section("mitigation", "Mitigation trade-off (Fig. 6/7)", "mitigation", points, figures=figure,
                         digits=4, after=after)


def ddpm_section(r: Inputs) -> Section:
    pictures = "".join(f"<h3>{html.escape(j.label)}</h3>" + html._img(plots_b64(j.folder / "copies.png"),
                                                                     "copies: generation | nearest | copied patches")
                       for j in r.jobs if j.task == "ddpm" and (j.folder / "copies.png").exists())
    return table_section("ddpm", "Unconditional DDPMs: copies of training images", "ddpm", ddpm_summary(r.jobs),
                         digits=4, after=pictures)


def guard_section(r: Inputs) -> Section:
    return table_section("guard", "Guarded generation: in-loop early stopping on the early bright ending", "guard",
                         guard_summary(r.jobs), digits=4)


def pictures_section(r: Inputs) -> Section:
    pictures = []
    for job in r.detect_jobs:
        gens = job_generations(job)
        metrics = pd.DataFrame(job.result.metrics)
        windows = sorted(t for t in metrics["T"].unique() if t)
        figs = [html._img(plots.heatmap_figure(r.ours, job.label, detector, r.metric), "layer x T heat map")
                for detector in grid_detectors(metrics.detector.unique())]
        if gens is not None and windows:
            figs.insert(0, html._img(plots.roc_figure(gens, metrics, job.label, windows[0]), "ROC curves"))
        early = plots.early_figure(job.result, job.label)
        if early:
            figs.append(html._img(early, "early-step BE by step k"))
        pictures.append(f"<h3>{html.escape(job.label)}</h3><div class='pics'>{''.join(figs)}</div>")
    return Section("pictures", "ROC curves, layer x T heat maps and early-step BE per job", html="".join(pictures),
                   shown=bool(r.detect_jobs))


def jobs_section(r: Inputs) -> Section:
    job_list = jobs_table(r.jobs, r.others, r.out)
    return Section("jobs", "Jobs", html=html.jobs_html(job_list), markdown=_md(job_list), stem="jobs",
                   files={"md": _md(job_list), "csv": job_list.to_csv(index=False)})


def reference_section(r: Inputs) -> Section:
    rerun = published("sail2025_detection_rerun.csv")
    return Section("reference", "Published third-party re-run of detection (not ours)",
                   html=f"<details><summary>{len(rerun)} published rows</summary>{html._table(rerun)}</details>")


SECTIONS = (answer_section, table1_section, by_T_section, leaderboard_section, table2_section, localization_section,
            intensity_section, mitigation_section, ddpm_section, guard_section, pictures_section, jobs_section,
            reference_section)
"""The report's sections in their order, on the page and in report.md; each builds one :class:`Section`."""
REPORT_FILES = ("report.md", "leaderboard.html")


def write_report(paths: list[str | Path], out: str | Path, metric: str = "auc") -> dict[str, Path]:
    """Write the report of every finished job under ``paths`` into ``out``, the failed, unfinished and superseded
    job folders counted in the lede and listed in the jobs table; returns {file name: path}. Files of a section
    this report leaves out are removed from ``out`` (no stale table from an earlier report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = finished_jobs(paths)
    inputs = Inputs(jobs, other_jobs(paths, jobs), out, metric)
    sections = [build(inputs) for build in SECTIONS]
    lede = _lede(jobs, inputs.others)
    md = ["# be-bench report", "", lede.replace("<i>", "*").replace("</i>", "*"), ""]
    files: dict[str, str] = {}
    for section in sections:
        if not section.shown:
            continue
        files |= {f"{section.stem}.{ext}": text for ext, text in section.files.items()}
        if section.markdown is not None:
            md += [f"## {section.title}", ""] + ([section.caption, ""] if section.caption else []) + [section.markdown]
    files["report.md"] = "\n".join(md)
    files["leaderboard.html"] = html.page([(s.anchor, s.title, (f"<p>{s.caption}</p>" if s.caption else "") + s.html)
                                           for s in sections if s.shown], lede)
    for name in [n for s in sections for n in s.file_names()]:
        if name not in files:
            (out / name).unlink(missing_ok=True)
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
    try:
        written = write_report(folders, args.out, args.metric)
    except ResultError as err:  # a folder of another schema version: its one line, not a traceback
        parser.exit(2, f"report error: {err}\n")
    print(report_summary(written))


if __name__ == "__main__":
    main()
