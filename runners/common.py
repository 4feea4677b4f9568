"""What every Hydra runner shares: finished-job skipping, failure capture in sweeps, the job's device."""
from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from benchmark.core.devices import pick_device
from benchmark.jobs.config import ConfigError, check_job
from benchmark.jobs.results import JobResult
from benchmark.store import job_folder as jobfolder
from benchmark.store.tracking import Tracker
from runners.help import help_text

# A sweep job's folder name (conf/hydra/default.yaml): one folder inside the sweep folder whatever the values.
OmegaConf.register_new_resolver("job_folder", jobfolder.folder_name, replace=True)
# --help's page (conf/hydra/help/be_bench.yaml).
OmegaConf.register_new_resolver("help_text", help_text, replace=True)

# A job's output is what its user needs: the libraries' weight-loading progress bars say nothing to act on.
transformers_logging.disable_progress_bar()

ERROR_FILE = jobfolder.ERROR
CONF = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: works from python -m and in-process


def job_device(requested: str) -> str:
    job = HydraConfig.get().job
    return pick_device(requested, int(job.num) if job.get("num") is not None else 0)


def progress_bar(iterable: Iterable, desc: str) -> Iterable:
    """The jobs' ``progress`` (``benchmark.jobs.detection.Progress``): a bar named ``desc`` over ``iterable``, drawn on
    a terminal only (a log gets none), and none over nothing (a bar over an empty iterable would leave an empty
    line: a job that reuses every setting's images would print a blank line per setting)."""
    if hasattr(iterable, "__len__") and not len(iterable):
        return iterable
    return tqdm(iterable, desc=desc, disable=None)


def job_tracker(cfg: DictConfig, folder: Path) -> Tracker:
    """The job's W&B run (a no-op unless ``logger=wandb``)."""
    return Tracker(cfg.logger.wandb, cfg.logger.get("project", "be-bench"), OmegaConf.to_container(cfg, resolve=True),
                   folder, cfg.logger.get("mode", "offline"), cfg.logger.get("group"))


def write_result(result: JobResult, folder: Path, tracker: Tracker) -> None:
    """Write a finished job into its folder (:meth:`benchmark.jobs.results.JobResult.write`) and mirror it to the
    job's W&B run: ``metrics.json``, the table and the pictures beside them attached; the numbers, those
    pictures, the table (``generations``) and the result's ``tracked_tables`` logged."""
    written = result.write(folder)
    attached = [p for p in written if p.parent == folder and p.name not in result.texts]
    tables = {name: pd.DataFrame(getattr(result, name)) for name in result.tracked_tables}
    if result.table is not None:
        tables["generations"] = result.table
    tracker.save(*attached)
    tracker.log(result.scalars(), images={p.stem: p for p in attached if p.suffix == ".png"}, **tables)


def check_config(config: dict) -> None:
    """The job's config checked against its schema (:func:`benchmark.jobs.config.check_job`, which first imports the
    config's ``plugins``) before anything is loaded: a bad one ends the run with one line on stderr naming the
    setting and its value (exit status 2)."""
    try:
        check_job(config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


def check_launch(cfg: DictConfig) -> None:
    """What only the command line gets wrong, checked before the config: a config meant for another runner (an
    experiment's ``task``), or a sweep (an experiment's ``hydra.sweeper.params``) started without ``-m``, which Hydra
    would run as one job of none of the grid's points. Either ends the run with one line on stderr (exit status 2)."""
    hydra_cfg = HydraConfig.get()
    runner, choice = hydra_cfg.job.config_name, hydra_cfg.runtime.choices.get("experiment")
    what = f"experiment={choice}" if choice else "this config"
    if cfg.task != runner:
        print(f"config error: task={cfg.task!r}: {what} is for runners.{cfg.task}, not runners.{runner}",
              file=sys.stderr)
        sys.exit(2)
    grid = hydra_cfg.sweeper.get("params") or {}
    if grid and hydra_cfg.mode != RunMode.MULTIRUN:
        print(f"config error: {what} is a sweep over {', '.join(grid)}: run it with -m", file=sys.stderr)
        sys.exit(2)


def launch_path(path: str) -> str:
    """``path`` as an absolute path, a relative one taken from the directory the command was started in (Hydra's
    ``runtime.cwd``), which ``hydra.job.chdir=true`` makes differ from the working directory; outside a Hydra run
    (a composed config), from the working directory."""
    start = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()
    return os.path.normpath(os.path.join(start, os.path.expanduser(path)))


def launch_paths(cfg: DictConfig) -> DictConfig:
    """With ``hydra.job.chdir=true`` every relative ``paths.*`` value (the store, outputs, artifacts, data) made
    absolute against the launch directory: else each job, started in its own folder, would get a store of its own
    and reuse nothing. Without chdir the values stay as written (they are part of the model source's spelling)."""
    if HydraConfig.get().job.chdir:
        for key in cfg.paths:
            if isinstance(cfg.paths[key], str) and not os.path.isabs(cfg.paths[key]):
                cfg.paths[key] = launch_path(cfg.paths[key])
    return cfg


def run_job(run: Callable[[DictConfig, Path], float], cfg: DictConfig) -> float:
    """Run one job. A finished job is reused only when its identity (resolved config and the fingerprints of the
    files it read, ``benchmark.store.job_folder``) is the one asked for now; a folder holding another job's results, or
    claimed by another running job, is never touched: the job runs into ``<folder>-2`` (then -3, ...).
    In a sweep, a failing job leaves error.txt and returns NaN so the others go on. Paths: ``launch_paths``."""
    hydra_cfg = HydraConfig.get()
    check_launch(cfg)
    cfg = launch_paths(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        check_config(config)
    else:  # one bad job of a sweep: its error.txt says why, the others go on
        try:
            check_job(config)
        except ConfigError as err:
            folder = Path(hydra_cfg.runtime.output_dir)
            jobfolder.write_config(folder, config)  # so the summary and the report list it as failed
            (folder / ERROR_FILE).write_text(f"ConfigError: {err}\n")
            jobfolder.mark_sweep_run(folder, Path(hydra_cfg.sweep.dir))
            print(f"job failed: config error: {err}")
            return math.nan
    folder, finished = jobfolder.open_job(Path(hydra_cfg.runtime.output_dir), config)
    if hydra_cfg.mode == RunMode.MULTIRUN:  # the sweep summary lists this multirun's jobs only
        jobfolder.mark_sweep_run(folder, Path(hydra_cfg.sweep.dir))
    if finished is not None:
        print(f"finished already with the same inputs, skipped: {folder}")
        return finished.metrics.get("headline", math.nan)
    try:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            try:
                return run(cfg, folder)
            except ConfigError as err:  # a check that needs the loaded model (DDIM steps, a mitigation's premises)
                print(f"config error: {err}", file=sys.stderr)
                sys.exit(2)
        try:
            value = run(cfg, folder)
            (folder / ERROR_FILE).unlink(missing_ok=True)
            return value
        except Exception as err:
            line = f"{type(err).__name__}: {err}".splitlines()[0]
            (folder / ERROR_FILE).write_text(line + "\n\n" + traceback.format_exc())
            print(f"job failed: {line}")
            return math.nan
    finally:
        jobfolder.release(folder)
