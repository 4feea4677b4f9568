"""What a job prints when it ends, and what the report step prints: the answers in a few lines, and where the
folders and the report are. The tables stay in each job's ``report.md`` and the leaderboard page; the terminal gets
the report's first-screen findings (``reports.headline``: detection D vs LD with intervals, localization, BE
intensity order, mitigation at equal utility), one line per figure, so that ``make run`` fits one screen.
"""
from __future__ import annotations

import math
from pathlib import Path

from benchmark.jobs.results import read_result
from reports.headline import (
    Finding,
    detection_findings,
    intensity_findings,
    localization_findings,
    mitigation_findings,
)
from reports.jobs import Job, read_config

FINDINGS = {
    "detect": (detection_findings, localization_findings, intensity_findings),
    "mitigate": (mitigation_findings,),
}
"""The findings each job kind's summary shows (the report's first screen, per job)."""
FIGURE_WIDTH, OURS_WIDTH = 46, 31  # what a figure is, and ours with its interval: "0.733 [0.507, 0.933]"


def figure_lines(findings: list[Finding], indent: str = "  ") -> list[str]:
    """One aligned line per figure of ``findings``: what, ours (with its interval), the paper's, ours - paper."""
    rows = [row for finding in findings for row in finding.rows]
    if not rows:
        return []
    # columns capped so that a line fits 120 characters; a longer figure name gets a line of its own
    width = min(max(len(r["figure"]) for r in rows), FIGURE_WIDTH)
    ours = min(max(len(r["ours"]) for r in rows), OURS_WIDTH)
    lines = []
    for r in rows:
        paper = f"  paper {r['paper']}" if r["paper"] else ""
        diff = f"  ours - paper {r['ours - paper']}" if r["ours - paper"] else ""
        figure = r["figure"]
        if len(figure) > width:
            lines.append(f"{indent}{figure}")
            figure = ""
        lines.append(f"{indent}{figure:<{width}}  {r['ours']:<{ours}}{paper}{diff}".rstrip())
    return lines


def job_summary(folder: str | Path) -> str:
    """A finished job folder in a few lines: what ran, its findings' figures, where its folder and report are."""
    folder = Path(folder)
    job = Job(folder, read_result(folder), read_config(folder))
    what = {name: getattr(job.result, name, None) for name in ("model", "prompt_set", "n_prompts", "n_generations",
                                                               "sampled_now", "headline")}
    head = (f"{job.task}: {what['model'] or '?'} on {what['prompt_set'] or '?'}, {what['n_prompts'] or '?'} prompts, "
            f"{what['n_generations'] or '?'} generations ({what['sampled_now'] or 0} sampled now)")
    findings = [f for make in FINDINGS.get(job.task, ()) for f in make(job)]
    lines = [head, *figure_lines(findings)]
    if what["headline"] is not None and not math.isnan(what["headline"]):
        lines.append(f"  headline, what the job returns: {_headline_name(job)} = {what['headline']:.4g}")
    lines.append(f"  folder: {folder} (tables: report.md)")
    return "\n".join(lines)


def _headline_name(job: Job) -> str:
    """What a job's ``headline`` value is, from its config (``score.headline``, or a mitigation's ``headline``)."""
    if job.task == "detect" and "score" in job.config:
        h = job.config["score"]["headline"]
        return f"{h['detector']} [{h['layers']}] T={h['T']} AUC ({h['subset']}, {h['level']} level)"
    if job.task == "mitigate" and "headline" in job.config:
        h = job.config["headline"]
        return f"{h['method']}'s mean {h['measure']} at its strongest setting"
    return "headline"


def report_summary(files: dict[str, Path]) -> str:
    """Where the report step wrote its files (``reports.leaderboard.write_report``'s name -> path), in two lines."""
    page = files.get("leaderboard.html")
    folders = sorted({str(path.parent) for path in files.values()})
    kinds = sorted({path.suffix.lstrip(".") for path in files.values()})
    return (f"report: {page or files.get('report.md')} (one offline page; also report.md)\n"
            f"  {len(files)} files ({', '.join(kinds)}) in {', '.join(folders)}")
