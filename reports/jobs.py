"""Finished job folders as reports see them: one per distinct configuration, each with a short label.

A job folder is finished when it holds ``metrics.json`` (written last by every runner). Two folders with the same
configuration (``make run`` twice) are one job: the latest finished one is reported, the others are listed as
superseded, never summed nor shown twice.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.jobfolder import read_job

# configuration keys that never change a job's results: where files go, how it is logged, the sweep's name
IGNORED_KEYS = ("paths", "logger", "sweep_name", "hydra")


def read_config(folder: Path) -> dict:
    """The job's resolved configuration, through the job-folder schema (``benchmark.jobfolder.read_job``), {} where
    the folder has none. The only place reports read a job's configuration."""
    return read_job(folder).config or {}


@dataclass
class Job:
    folder: Path
    result: dict                       # metrics.json
    config: dict                       # read_config(folder)
    superseded: list[Path] = field(default_factory=list)  # earlier finished runs of the same configuration
    label: str = ""                    # short and unique among the reported jobs (see label_jobs)

    @property
    def task(self) -> str:
        return self.result.get("task", "detect")

    @property
    def group(self) -> str:
        """The job group: model x prompt set."""
        return f"{self.result.get('model', '?')} on {self.result.get('prompt_set', '?')}"

    @property
    def steps(self) -> int:
        return int(self.config.get("sampler", {}).get("steps", -1))

    @property
    def n_images(self) -> int:
        """Generations per prompt, as the job recorded it (``benchmark.jobfolder``'s ``n_images``: a mitigation job's
        resolved ``mitigation.n_images``); folders older than that field fall back to the config."""
        if self.result.get("n_images") is not None:
            return int(self.result["n_images"])
        mitigation = self.config.get("mitigation", {})
        value = mitigation.get("n_images") if mitigation.get("n_images") is not None else \
            self.config.get("sampler", {}).get("n_images", -1)
        return int(value)

    def link(self, out: Path) -> str:
        """The folder relative to ``out`` (where the report is written), for links that survive moving both."""
        return Path(os.path.relpath(self.folder.resolve(), out.resolve())).as_posix()


def identity(task: str, config: dict, folder: Path) -> str:
    """What makes two job folders the same job: the task and its configuration less IGNORED_KEYS. A folder
    without a configuration is its own job."""
    if not config:
        return f"{task}|folder={folder.resolve()}"
    kept = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    return task + "|" + json.dumps(kept, sort_keys=True, default=str)


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


def finished_jobs(paths: list[str | Path]) -> list[Job]:
    """One Job per distinct configuration under ``paths``: the latest finished run (metrics.json's modification
    time, then folder name), earlier runs kept in its ``superseded``. Labelled, in a stable order."""
    latest: dict[str, Job] = {}
    for folder in job_folders(paths):
        result = json.loads((folder / "metrics.json").read_text())
        job = Job(folder, result, read_config(folder))
        key = identity(job.task, job.config, folder)
        if key in latest:
            old = latest[key]
            new, gone = (job, old) if _finished_at(job) >= _finished_at(old) else (old, job)
            new.superseded = sorted(old.superseded + job.superseded + [gone.folder])
            latest[key] = new
        else:
            latest[key] = job
    jobs = sorted(latest.values(), key=lambda j: (j.task, j.group, j.steps, j.n_images, str(j.folder)))
    label_jobs(jobs)
    return jobs


def _finished_at(job: Job) -> tuple[float, str]:
    return (job.folder / "metrics.json").stat().st_mtime, job.folder.name


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        elif key not in IGNORED_KEYS:
            out[f"{prefix}{key}"] = json.dumps(value, default=str) if isinstance(value, list) else str(value)
    return out


def label_jobs(jobs: list[Job]) -> None:
    """Give every job a short label: model, prompt set (n prompts), sampler steps, images per prompt; where two
    jobs would share one, the configuration keys in which they differ are appended (``score.T=[1, 5]``)."""
    for job in jobs:
        r = job.result
        parts = [r.get("model", "?"), f"{r.get('prompt_set', '?')}"
                 + (f" ({r['n_prompts']} prompts)" if "n_prompts" in r else "")]
        if job.steps > 0:
            parts.append(f"{job.steps} steps")
        if job.n_images > 0:
            parts.append(f"n={job.n_images}/prompt")
        job.label = " · ".join(parts) if job.task == "detect" else f"{job.task}: " + " · ".join(parts)
    by_label: dict[str, list[Job]] = {}
    for job in jobs:
        by_label.setdefault(job.label, []).append(job)
    for same in by_label.values():
        if len(same) < 2:
            continue
        flats = [_flat({k: v for k, v in j.config.items() if k not in IGNORED_KEYS}) for j in same]
        keys = sorted(set().union(*flats))
        differing = [k for k in keys if len({f.get(k) for f in flats}) > 1]
        for job, flat in zip(same, flats):
            extra = ", ".join(f"{k}={flat.get(k, '-')}" for k in differing)
            job.label += f" · {extra}" if extra else f" · {job.folder.name}"
