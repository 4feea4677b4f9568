"""Job folders as reports see them: the finished ones, one per distinct configuration, each with a short label;
and the others, listed but not reported (``other_jobs``).

A job folder is finished when it holds ``metrics.json`` (written last by every runner). Two folders with the same
configuration (``make run`` twice), or a folder and its ``<folder>-2``, ``-3``... (a later run with other inputs,
``benchmark.store.job_folder.open_job``), are one job: the latest finished one is reported, the others are listed as
superseded, never summed nor shown twice. A folder with ``config.yaml`` but no ``metrics.json`` is failed (it holds
``error.txt``) or unfinished (killed, or still running). A folder inside another job folder (W&B's copies) or under
a hidden folder (``.hydra``) is not a job.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.jobs.results import JobResult, read_result
from benchmark.store.job_folder import CONFIG, ERROR, METRICS, SWEEP_RUN, read_job

# configuration keys that never change a job's results: where files go, how it is logged, the sweep's name
IGNORED_KEYS = ("paths", "logger", "sweep_name", "hydra")


def read_config(folder: Path) -> dict:
    """The job's resolved configuration, through the job-folder schema (``benchmark.store.job_folder.read_job``), {}
    where the folder has none. The only place reports read a job's configuration."""
    return read_job(folder).config or {}


@dataclass
class Job:
    folder: Path
    result: JobResult                  # metrics.json, read in its type (benchmark.jobs.results.read_result)
    config: dict                       # read_config(folder)
    superseded: list[Path] = field(default_factory=list)  # earlier finished runs of the same configuration
    label: str = ""                    # short and unique among the reported jobs (see label_jobs)

    @property
    def task(self) -> str:
        return self.result.task

    @property
    def group(self) -> str:
        """The job group: model x prompt set (``?`` for a job without one: an unconditional DDPM's)."""
        return f"{self.result.model} on {getattr(self.result, 'prompt_set', '?')}"

    @property
    def steps(self) -> int:
        return int(self.config.get("sampler", {}).get("steps", -1))

    @property
    def n_images(self) -> int:
        """Generations per prompt, as the job recorded it (``benchmark.store.job_folder``'s ``n_images``: a mitigation
        job's resolved ``mitigation.n_images``); folders older than that field fall back to the config."""
        if self.result.n_images is not None:
            return int(self.result.n_images)
        mitigation = self.config.get("mitigation", {})
        value = mitigation.get("n_images") if mitigation.get("n_images") is not None else \
            self.config.get("sampler", {}).get("n_images", -1)
        return int(value)

    def link(self, out: Path) -> str:
        """The folder relative to ``out`` (where the report is written), for links that survive moving both."""
        return link(self.folder, out)


@dataclass
class OtherJob:
    """A job folder that is not reported: ``status`` superseded, failed or unfinished."""

    folder: Path
    task: str
    status: str
    error: str = ""     # failed: error.txt's first line
    replaced_by: str = ""  # the label of the reported job of the same configuration (or folder chain), if any


def link(folder: Path, out: Path) -> str:
    """``folder`` relative to ``out`` (where the report is written), for links that survive moving both."""
    return Path(os.path.relpath(folder.resolve(), out.resolve())).as_posix()


def identity(task: str, config: dict, folder: Path) -> str:
    """What makes two job folders the same job: the task and its configuration less IGNORED_KEYS. A folder
    without a configuration is its own job."""
    if not config:
        return f"{task}|folder={folder.resolve()}"
    kept = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    return task + "|" + json.dumps(kept, sort_keys=True, default=str)


def _folders(paths: list[str | Path], name: str) -> list[Path]:
    """Job folders holding file ``name`` under ``paths`` (none inside another job folder or a hidden folder)."""
    found = set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such folder: {path}")
        for file in path.rglob(name):
            folder = file.parent
            inner = folder.relative_to(path).parts
            above = [folder.parents[i] for i in range(len(inner))]  # up to path itself
            if not any(part.startswith(".") for part in inner) and not any(
                    (p / METRICS).exists() or (p / CONFIG).exists() for p in above):
                found.add(folder)
    return sorted(found)


def job_folders(paths: list[str | Path]) -> list[Path]:
    """Every finished job folder (one with metrics.json) under the given folders, in a stable order. Raises
    ValueError when there is none (counting the failed and unfinished ones there are)."""
    found = _folders(paths, METRICS)
    if not found:
        others = [f for f in _folders(paths, CONFIG) if not (f / METRICS).exists()]
        failed = sum((f / ERROR).exists() for f in others)
        raise ValueError(f"no finished job (metrics.json) under {', '.join(map(str, paths))}"
                         + (f" ({failed} failed, {len(others) - failed} unfinished)" if others else ""))
    return found


def _chain(folder: Path) -> Path:
    """The first folder of ``folder``'s chain ``X``, ``X-2``, ``X-3``... (``jobfolder.candidates``): ``X`` where it
    is a job folder, else ``folder`` itself."""
    match = re.fullmatch(r"(.+)-(\d+)", folder.name)
    if match and int(match[2]) >= 2:
        first = folder.with_name(match[1])
        if (first / METRICS).exists() or (first / CONFIG).exists():
            return first
    return folder


def _keep_latest(latest: dict, key, job: Job) -> None:
    if key in latest:
        old = latest[key]
        new, gone = (job, old) if _finished_at(job) >= _finished_at(old) else (old, job)
        new.superseded = sorted(old.superseded + job.superseded + [gone.folder])
        latest[key] = new
    else:
        latest[key] = job


def finished_jobs(paths: list[str | Path]) -> list[Job]:
    """One Job per distinct configuration, and per folder chain (``X``, ``X-2``...), under ``paths``: the latest
    finished run (finished or last reused by a sweep, then folder name), earlier runs kept in its ``superseded``.
    Labelled, in a stable order."""
    chains: dict[Path, Job] = {}
    for folder in job_folders(paths):
        _keep_latest(chains, _chain(folder), Job(folder, read_result(folder), read_config(folder)))
    latest: dict[str, Job] = {}
    for job in chains.values():
        _keep_latest(latest, identity(job.task, job.config, job.folder), job)
    jobs = sorted(latest.values(), key=lambda j: (j.task, j.group, j.steps, j.n_images, str(j.folder)))
    label_jobs(jobs)
    load_job_plugins(jobs)
    return jobs


def load_job_plugins(jobs: list[Job], log=print) -> None:
    """Import the ``plugins`` the jobs ran with (their configs), so that a plug-in's methods are reported by their
    registered labels and metadata, as built-in ones are. One that cannot be imported here (moved, another
    machine) is named in one line and its methods are shown by their names: the scores are in the folders."""
    from benchmark.registry import PluginError, load_plugin

    for spec in dict.fromkeys(p for job in jobs for p in job.config.get("plugins") or []):
        try:
            load_plugin(spec)
        except PluginError as err:
            log(f"report: {err}; its methods are shown by name")


def _finished_at(job: Job) -> tuple[float, str]:
    # a sweep that reused a finished job marks it (jobfolder.mark_sweep_run): that is its latest run too
    times = [(job.folder / name).stat().st_mtime for name in (METRICS, SWEEP_RUN) if (job.folder / name).exists()]
    return max(times), job.folder.name


def other_jobs(paths: list[str | Path], jobs: list[Job]) -> list[OtherJob]:
    """The job folders under ``paths`` that ``jobs`` (``finished_jobs(paths)``) do not report: their superseded
    runs, then the failed (with error.txt's first line) and the unfinished folders, each with the label of the
    reported job of the same configuration where there is one; in a stable order."""
    by_identity = {identity(j.task, j.config, j.folder): j.label for j in jobs}
    out = [OtherJob(folder, j.task, "superseded", replaced_by=j.label) for j in jobs for folder in j.superseded]
    for folder in _folders(paths, CONFIG):
        if (folder / METRICS).exists():
            continue
        job, failed = read_job(folder), (folder / ERROR).exists()
        error = next(iter((folder / ERROR).read_text().splitlines()), "") if failed else ""
        out.append(OtherJob(folder, job.task, "failed" if failed else "unfinished", error,
                            by_identity.get(identity(job.task, job.config, folder), "")))
    order = {"failed": 0, "unfinished": 1, "superseded": 2}
    return sorted(out, key=lambda o: (order[o.status], str(o.folder)))


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
        n_prompts = getattr(r, "n_prompts", None)
        parts = [r.model, f"{getattr(r, 'prompt_set', '?')}" + (f" ({n_prompts} prompts)" if n_prompts is not None
                                                                 else "")]
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
