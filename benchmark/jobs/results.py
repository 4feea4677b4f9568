"""Typed, versioned job results: what each job function returns, what ``metrics.json`` holds, what reports read.

One dataclass per job kind (:data:`RESULTS`, by task): its fields are the task's entries of ``metrics.json``, in
the order written, as JSON values; a table of rows (the detection metrics, the mitigation curves) is a list of
records (:data:`Records`, ``DataFrame.to_dict(orient="records")``; ``pd.DataFrame(records)`` reads it).
:meth:`JobResult.write` writes a finished job folder through ``benchmark.store.job_folder``
(per-generation table, pictures, then ``metrics.json`` with the folder schema's fields: ``schema``, ``task``,
``config``, ``sampler_settings``, ``n_images``, ``fingerprints``); :func:`read_result` reads one back into its
type. A folder of another schema version (or of none: written before results were versioned) is refused with one
line naming the folder and what to do, never half-read; so is a ``metrics.json`` with a field its type lacks.

Adding a field: give it a default (so folders written before it still read) and keep :data:`SCHEMA`; renaming or
removing one: bump :data:`benchmark.store.job_folder.SCHEMA`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from benchmark.store import job_folder as jobfolder
from benchmark.store.traces import atomic_write, to_png

SCHEMA = jobfolder.SCHEMA
Records = list[dict[str, Any]]  # a table, one dict per row
RESULTS: dict[str, type[JobResult]] = {}
"""The result type of each task (``metrics.json``'s ``task``), filled by subclassing :class:`JobResult`."""

# field metadata: "stored" False = not in metrics.json; "optional" = left out of it when None (computed only for
# some jobs, e.g. localization where ground truth exists); "flatten": a prefix: a dict whose items are top-level
# entries named prefix + key (``caught_by_kind`` {"global": 0.5} is ``caught_global``)
_NOT_STORED = {"stored": False}
_OPTIONAL = {"optional": True}  # a field written only when computed (not None)


class ResultError(ValueError):
    """A job folder's ``metrics.json`` that its result type cannot read: one line naming the folder and why."""


def sampler_record(settings, seed: int, dtype: str | None = None) -> dict:
    """``metrics.json``'s ``sampler_settings``: the sampler's fields (a ``SamplerSettings`` or ``DDPMSampler``
    dataclass), the first seed and, for a text-to-image model, its dtype."""
    return {**dataclasses.asdict(settings), "seed": seed} | ({"dtype": dtype} if dtype is not None else {})


@dataclass(kw_only=True)
class JobResult:
    """What every job leaves: its results (subclass fields) and its identity, which :meth:`write` records.

    ``config``: the resolved config the job ran (its identity, with ``fingerprints`` of the files it names,
    computed when written); ``sampler_settings``: :func:`sampler_record`; ``n_images``: generations per prompt.
    Not stored in ``metrics.json``: ``table`` (the per-generation table, ``job_folder.TABLES[task]``),
    ``pictures`` (file name -> (3, H, W) image in [0, 1], written as PNG), ``texts`` (file name -> text) and
    ``folder`` (where the result was written or read)."""

    task: ClassVar[str] = ""
    tracked_tables: ClassVar[tuple[str, ...]] = ()  # record fields a tracker logs as tables (runners.common)
    config: dict = field(default_factory=dict, metadata={"identity": True})
    sampler_settings: dict = field(default_factory=dict, metadata={"identity": True})
    n_images: int | None = field(default=None, metadata={"identity": True})
    fingerprints: dict = field(default_factory=dict, metadata={"identity": True})
    table: pd.DataFrame | None = field(default=None, repr=False, metadata=_NOT_STORED)
    pictures: dict[str, np.ndarray] = field(default_factory=dict, repr=False, metadata=_NOT_STORED)
    texts: dict[str, str] = field(default_factory=dict, repr=False, metadata=_NOT_STORED)
    folder: Path | None = field(default=None, metadata=_NOT_STORED)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.task:
            RESULTS[cls.task] = cls

    # ---------------------------------------------------------------------------------------------- writing

    @classmethod
    def _stored(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("stored", True)
                and not f.metadata.get("identity")]

    def summary(self) -> dict:
        """The task's entries of ``metrics.json`` (no identity fields), as plain JSON values in field order."""
        out: dict[str, Any] = {}
        for f in self._stored():
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            if f.metadata.get("flatten"):
                out |= {f.metadata["flatten"] + k: v for k, v in value.items()}
            else:
                out[f.name] = value
        return out

    def scalars(self) -> dict[str, float]:
        """The summary's numbers (what a tracker logs)."""
        return {k: v for k, v in self.summary().items() if isinstance(v, (int, float))}

    def write(self, folder: str | Path) -> list[Path]:
        """Write the finished job into ``folder``: pictures and texts, the table, ``config.yaml``, then
        ``metrics.json`` (last: its presence means finished). Returns the files written, ``metrics.json`` first.
        Raises ValueError when ``n_images`` is unset."""
        folder = Path(folder)
        if self.n_images is None:
            raise ValueError(f"{type(self).__name__}.n_images is unset: the job's generations per prompt")
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, image in self.pictures.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / name, lambda tmp, im=image: to_png(im).save(tmp, format="PNG"))
            written.append(folder / name)
        for name, text in self.texts.items():
            atomic_write(folder / name, lambda tmp, t=text: tmp.write_text(t))
            written.append(folder / name)
        tables = {jobfolder.TABLES[self.task]: self.table} if self.table is not None else {}
        metrics = jobfolder.write_results(folder, self.task, self.config, self.sampler_settings, self.n_images,
                                          self.summary(), tables)
        self.fingerprints = jobfolder.read_job(folder).fingerprints
        self.folder = folder
        return [metrics, *(folder / name for name in tables), *written]

    # ---------------------------------------------------------------------------------------------- reading

    @classmethod
    def from_metrics(cls, metrics: dict, folder: Path | None = None) -> JobResult:
        """This type from a ``metrics.json``'s content. Raises :class:`ResultError` on a missing field without a
        default, or an entry this type does not know."""
        where = f"{folder / jobfolder.METRICS}" if folder is not None else jobfolder.METRICS
        kwargs, used = {}, {"schema", "task"}
        for f in dataclasses.fields(cls):
            if not f.metadata.get("stored", True):
                continue
            if f.metadata.get("flatten"):
                prefix = f.metadata["flatten"]
                kwargs[f.name] = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
                used |= {prefix + k for k in kwargs[f.name]}
                continue
            if f.name not in metrics:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ResultError(f"{where}: no {f.name!r}, which every {cls.task} result has")
                continue
            used.add(f.name)
            kwargs[f.name] = metrics[f.name]
        unknown = sorted(set(metrics) - used)
        if unknown:
            raise ResultError(f"{where}: entries {', '.join(unknown)} are not fields of a {cls.task} result "
                              f"(schema {SCHEMA}; written by another be-bench?)")
        return cls(**kwargs, folder=folder)


def read_result(folder: str | Path) -> JobResult:
    """A finished job folder's results in their type (:data:`RESULTS` of its task). Raises FileNotFoundError
    without ``metrics.json``, :class:`ResultError` (one line) for another schema version or unknown task."""
    folder = Path(folder)
    path = folder / jobfolder.METRICS
    if not path.exists():
        raise FileNotFoundError(f"not a finished job folder (no {jobfolder.METRICS}): {folder}")
    metrics = jobfolder.read_job(folder).metrics
    version = metrics.get("schema")
    if version is None:
        raise ResultError(f"{path} has no schema version (written before be-bench versioned its results): run "
                          "the job again, or move the folder out of the report's folders")
    if version != SCHEMA:
        raise ResultError(f"{path} has schema {version!r}; this be-bench reads schema {SCHEMA}: run the job again "
                          "with this version")
    task = metrics.get("task")
    if task not in RESULTS:
        raise ResultError(f"{path}: task {task!r} is not a job kind ({', '.join(RESULTS)})")
    return RESULTS[task].from_metrics(metrics, folder)


# -------------------------------------------------------------------------------------------- the job kinds

@dataclass(kw_only=True)
class DetectionResult(JobResult):
    """A detection job (``benchmark.jobs.detection.run_detection``): every detector on the layer x T grid.

    ``metrics``: ``benchmark.detectors.detection.detection_table`` (level, detector, layers, T, subset, metrics
    with 95% intervals); ``headline``: ``detection.headline`` of ``score.headline``; times in seconds
    (``extra_seconds`` is part of ``sampling_seconds``); ``extra``: each extra pass's knobs, ``n`` and settings
    hash. With ground-truth masks: ``localization``, ``similarity_f1``, ``copy_distance_median``,
    ``local_diversity_mean`` (``benchmark.localization.evaluation.summarise``), ``token_localization`` and the
    ``localization_leaderboard``; with ``sampler.end_map_steps``: ``early_detection``, ``early_stopping`` and
    (with masks) ``early_localization`` (``benchmark.early.step_detection.job_results``). The table: every
    generation's score per detector, layer set and T (``generations.csv``); the picture ``masks.png``: the mask
    gallery."""

    task: ClassVar[str] = "detect"
    tracked_tables: ClassVar[tuple[str, ...]] = ("metrics",)
    model: str
    family: str | None = field(default=None, metadata=_OPTIONAL)  # "SD 2.x, v_prediction"; None: written before
    prompt_set: str
    n_prompts: int | None = None
    n_generations: int | None = None
    sampled_now: int = 0
    extra_computed_now: int = 0
    extra_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    sampling_seconds: float = 0.0
    scoring_seconds: float = 0.0
    localization: Records | None = field(default=None, metadata=_OPTIONAL)
    similarity_f1: Records | None = field(default=None, metadata=_OPTIONAL)
    copy_distance_median: dict | None = field(default=None, metadata=_OPTIONAL)
    local_diversity_mean: dict | None = field(default=None, metadata=_OPTIONAL)
    token_localization: Records | None = field(default=None, metadata=_OPTIONAL)
    early_detection: Records | None = field(default=None, metadata=_OPTIONAL)
    early_stopping: Records | None = field(default=None, metadata=_OPTIONAL)
    early_localization: Records | None = field(default=None, metadata=_OPTIONAL)
    localization_leaderboard: Records | None = field(default=None, metadata=_OPTIONAL)
    headline: float = math.nan
    metrics: Records


@dataclass(kw_only=True)
class MitigationResult(JobResult):
    """A mitigation job: baseline and mitigated generations of memorized prompts.

    ``curves``: ``benchmark.mitigation.tradeoff.curves`` (mean per kind, method and target loss);
    ``equal_utility``: similarity name -> records of ``tradeoff.at_equal_utility``; ``utility``: the utility
    measure the curves compare at (CLIP, caption_rmse or None); ``settings``: each mitigation setting's tag. The
    table: every generation's measures (``mitigation.csv``)."""

    task: ClassVar[str] = "mitigate"
    model: str
    prompt_set: str
    n_prompts: int | None = None
    n_generations: int | None = None
    sampled_now: int = 0
    sampling_seconds: float = 0.0
    utility: str | None = None
    headline: float = math.nan
    settings: list[str] = field(default_factory=list)
    curves: Records
    equal_utility: dict[str, Records] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"task": self.task, **super().summary()}  # the mitigation job has always written its task here


@dataclass(kw_only=True)
class GuardResult(JobResult):
    """A guarded generation (``benchmark.jobs.guard.run_guarded``): in-loop early stopping on the early BE.

    ``stopped``, ``stop_rate``, ``restarted``, ``steps_saved_fraction`` (of an unguarded run's denoising steps;
    the headline), ``caught`` (memorized generations stopped; ``caught_by_kind``: per memorization kind, written as
    ``caught_<kind>``) and ``non_memorized_stopped``: ``benchmark.jobs.guard.summarise``; ``rule``: the stop rule
    (step, detector, layers, T, threshold, fpr_target) of the ``calibration`` detection job; ``restart``: the
    restart mitigation or None. The table: every generation's signal, stop and steps (``guarded.csv``); a text,
    ``stopped_ids.txt``."""

    task: ClassVar[str] = "guard"
    n_generations: int
    stopped: int
    stop_rate: float
    restarted: int
    steps_saved_fraction: float
    caught: float | None = field(default=None, metadata=_OPTIONAL)
    caught_by_kind: dict[str, float] = field(default_factory=dict, metadata={"flatten": "caught_"})
    non_memorized_stopped: float | None = field(default=None, metadata=_OPTIONAL)
    model: str
    prompt_set: str
    calibration: str
    rule: dict
    restart: dict | None = None
    sampling_seconds: float = 0.0
    headline: float = math.nan


@dataclass(kw_only=True)
class DDPMResult(JobResult):
    """An unconditional DDPM job (``benchmark.jobs.ddpm.run_ddpm``): copies of training images.

    ``sampler``: the store's sampler key; ``n_train``, ``duplicated``, ``copies``: the training recipe's data
    settings (None for a model without one); ``copy_rate`` (the headline), medians of the nearest-neighbour ratio
    and Carlini's distance, the mean copied fraction (``benchmark.localization.copying.memorization_table``);
    with duplicate labels ``duplicated_share_of_training`` and ``copies_of_duplicated``. The table: every
    generation's measures (``copies.csv``); the picture ``copies.png``."""

    task: ClassVar[str] = "ddpm"
    model: str
    sampler: str
    n_train: int | None = None
    duplicated: int | float | None = None
    copies: int | None = None
    n_training_images: int
    n_generations: int
    sampled_now: int = 0
    sampling_seconds: float = 0.0
    copy_rate: float
    nn_ratio_median: float
    carlini_median: float
    copied_fraction_mean: float
    duplicated_share_of_training: float | None = field(default=None, metadata=_OPTIONAL)
    copies_of_duplicated: float | None = None
    headline: float = math.nan

    def summary(self) -> dict:
        out = {"task": self.task, **super().summary()}
        if self.duplicated_share_of_training is None:  # both are written only where duplicates are labelled
            out.pop("copies_of_duplicated")
        return out
