"""The typed configuration of every job, checked before any model is loaded or image sampled.

A runner's composed config is plain data (Hydra resolves it to dicts, lists and scalars); :func:`check_job`
validates it against the job's schema: a pydantic model per section, with types, ranges, finiteness, allowed values
and unknown keys refused (also keys added on the command line with ``+``). Data is validated as JSON, strictly: no
string becomes a number, no float an integer, NaN and infinities are refused; lists stand for tuples, as in YAML.

Parts of a config whose fields belong to a registered function are checked against that function's signature: a
prompt set's loader arguments (``benchmark.registry.PROMPT_SOURCES``) and an extra pass's knobs
(``EXTRA_PASSES``), so that a plug-in's options are as checked as a built-in one's. What depends on several
settings (a step window against the number of steps, a headline against the layer sets) is checked after the
sections, by the job's ``check`` method, with the library's own checks where they exist.

Every failure is one :class:`ConfigError` line naming each bad setting and its value.
"""
from __future__ import annotations

import inspect
import json
import math
import typing
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model
from pydantic.fields import FieldInfo

from benchmark.core.config_types import (
    Count,
    Fraction,
    Kind,
    Name,
    NonNegative,
    OpenFraction,
    Positive,
    PositiveInt,
    Rate,
    Seed,
)
from benchmark.registry import EXTRA_PASSES, PROMPT_SOURCES, PluginError, Registry, load_plugins

# JSON-strict: the config is data, so validate it as data (lists for tuples, ints for floats, nothing else coerced).
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """A config that cannot run: one line naming every bad setting (``sampler.steps='five': ...``)."""


class Section(BaseModel):
    """A config section: unknown keys refused, strict types, finite numbers."""

    model_config = STRICT


Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")]


# ------------------------------------------------------------------------------------------- shared sections

class Paths(Section):
    root: Name
    data_dir: Name
    artifacts_dir: Name
    store_dir: Name
    output_dir: Name


class Logger(Section):
    wandb: bool
    project: Name = "be-bench"
    mode: Literal["offline", "online", "disabled"] = "offline"
    group: Name | None = None


class Store(Section):
    # numpy float dtypes the trace store writes (an integer dtype would round every trace to zeros)
    dtype: Literal["float16", "float32", "float64"] = "float16"


class Sampler(Section):
    """DDIM with classifier-free guidance (``benchmark.sampling.capture.SamplerSettings``) and how many images to
    make."""

    steps: PositiveInt
    guidance: NonNegative
    height: PositiveInt
    width: PositiveInt
    eta: Fraction
    n_images: PositiveInt
    seed: Seed
    seeding: Literal["per_image", "official"]
    batch_size: PositiveInt
    end_map_steps: list[Count] = []

    def check_end_map_steps(self) -> None:
        """Only a job that records earlier steps' maps (detection) checks them: the others leave them unused."""
        late = [k for k in self.end_map_steps if k >= self.steps]
        if late:
            raise ConfigError(f"sampler.end_map_steps={self.end_map_steps}: steps {late} are past the last of "
                              f"sampler.steps={self.steps} (0-based)")

    def settings(self, end_maps: bool = True):
        """The :class:`benchmark.sampling.capture.SamplerSettings` of this section, the one place a job builds them;
        ``end_maps=False``: without ``end_map_steps`` (a job that records no earlier steps' maps)."""
        from benchmark.sampling.capture import SamplerSettings

        return SamplerSettings(self.steps, self.guidance, self.height, self.width, self.eta,
                               tuple(self.end_map_steps) if end_maps else (), seeding=self.seeding,
                               gen_seed=self.seed)


class Model(Section):
    """A text-to-image model preset (conf/model/); ``token_maps``, ``mitigation_targets`` and
    ``anisotropy_gamma_cos`` are the preset's defaults for ``capture.token_maps``, ``mitigation.target_losses`` and
    ``extra.anisotropy.gamma_cos`` (the extra passes it turns on for detection it sets in
    ``conf/model/detect/<name>.yaml``, ``extra.passes``)."""

    name: Name
    source: Name
    build: Name | None = None
    use_safetensors: bool = True
    device: Device = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    token_maps: bool = False
    mitigation_targets: list[NonNegative] = []
    # the preset's default for extra.anisotropy.gamma_cos: the official weight is per model (SD v1: 2, SD 2: 0.1)
    anisotropy_gamma_cos: NonNegative = 2.0

    def check(self) -> None:
        from benchmark.registry import MODEL_BUILDERS

        if self.build is not None:
            entry = MODEL_BUILDERS.get(self.build)
            if entry is None or entry.meta.get("in_process"):
                folders = [n for n in MODEL_BUILDERS if not MODEL_BUILDERS[n].meta.get("in_process")]
                raise ConfigError(f"model.build={self.build!r} is not a model builder ({', '.join(folders)})")


class Layers(Section):
    sets: Annotated[dict[Name, Annotated[list[Name], Field(min_length=1)]], Field(min_length=1)]
    headline: Name | None = None  # the preset's pre-declared headline set (score.headline.layers follows it)


class PromptOptions(Section):
    """What every prompt set takes besides its loader's arguments (docs/prompts.md); applied in this order."""

    name: Name
    loader: Name
    truth_file: Name | None = None
    select_ids: Name | None = None
    limit: PositiveInt | None = None
    shard: Annotated[str, Field(pattern=r"^\d+/\d+$")] | None = None


class InlineEntry(Section):
    """One prompt written out in a config (the ``inline`` loader)."""

    text: Name
    id: Name | int | None = None
    memorized: bool | None = None
    kind: Kind | None = None


# ------------------------------------------------------------------------------------ the jobs' own sections

class Headline(Section):
    detector: Name
    layers: Name
    T: PositiveInt
    subset: Name
    level: Literal["prompt", "generation"]


class Score(Section):
    T: Annotated[list[PositiveInt], Field(min_length=1)]
    n_boot: Count
    headline: Headline
    score_difference_units: Literal["eps", "score"] = "eps"  # benchmark.detectors.detection.SCORE_DIFFERENCE_UNITS


class Capture(Section):
    token_maps: bool = False
    compile: bool = False
    extra: None = None  # renamed extra.passes (RENAMED): present only to be refused by name


class Localization(Section):
    rule: Name


class Signal(Section):
    detector: Name
    layers: Name
    T: PositiveInt | None = None  # LD's window at step k: the first min(T, k + 1) steps; None: every step so far


class Early(Section):
    signal: Signal
    fpr: Annotated[list[Rate], Field(min_length=1)]
    n_boot: Count


class CopyThresholds(Section):
    """Where a generation counts as a copy (``tradeoff.memorization_rate``): SSCD above (a cosine, in [-1, 1]), S /
    LS above (-RMS on 0-255, <= 0), train_rmse below (on [0, 1]); None = not counted on that measure."""

    SSCD: Annotated[float, Field(ge=-1, le=1)] | None = None
    S: Annotated[float, Field(le=0)] | None = None
    LS: Annotated[float, Field(le=0)] | None = None
    train_rmse: Annotated[float, Field(ge=0, le=1)] | None = None

    def values(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Mitigation(Section):
    """Which registered mitigations run, at which strengths and knobs (``benchmark.jobs.mitigation.method_settings``).
    ``target_losses``, ``lr``, ``max_iters``, ``mask_norm``, ``protocol``: Wen's / BE's strengths and knobs;
    ``pad_fractions`` / ``pad_replacement``: Kim & No's; ``strengths.<method>`` / ``knobs.<method>``: any method's
    (typed by its factory's signature). ``copy_thresholds``: a generation still copies when its measure is past the
    threshold (``tradeoff.memorization_rate``); ``reference``: the method the equal-utility table compares every
    other against (None: Wen's when it runs, else the first method, ``tradeoff.reference_method``), with ``n_boot``
    bootstrap replicates."""

    methods: Annotated[list[Name], Field(min_length=1)]
    target_losses: list[NonNegative]
    lr: Positive
    max_iters: Count
    pad_fractions: list[Fraction]
    pad_replacement: Name
    mask_norm: Literal["per_image", "batch"]
    protocol: Literal["per_image", "official"]
    mask_layers: Name
    kinds: Annotated[list[Literal["global", "local", "memorized"]], Field(min_length=1)] | None = None
    n_images: PositiveInt | None = None
    strengths: dict[Name, Annotated[list[Any], Field(min_length=1)]] = {}
    knobs: dict[Name, dict[str, Any]] = {}
    copy_thresholds: CopyThresholds = CopyThresholds()
    reference: Name | None = None
    n_boot: Count = 1000


class Similarity(Section):
    sscd: Name | None = None
    clip_architecture: Name
    clip_weights: Name | None = None


class MitigationHeadline(Section):
    method: Name
    measure: Literal["S", "LS", "SSCD", "train_rmse", "CLIP", "caption_rmse"]


class Restart(Section):
    method: Name | None = None
    fraction: Fraction = 1.0
    token: Name = "!"


class Guard(Section):
    calibration: Name | None = None
    step: Count
    fpr: Rate
    restart: Restart
    save_images: bool = True


# --------------------------------------------------------------------------------------------------- jobs

class Job(Section):
    """What every runner's config holds."""

    task: Name
    run_name: Name
    sweep_name: Name
    paths: Paths
    plugins: list[Name] = []  # imported by check_job before anything is validated (benchmark.registry.load_plugins)

    # sections whose fields come from a registered function, validated by :func:`check_job` (name -> how)
    dynamic: ClassVar[tuple[str, ...]] = ()
    _resolved: dict = PrivateAttr(default_factory=dict)

    @property
    def resolved(self) -> dict:
        """The resolved config this job was checked from (:func:`check_job`): what its results record as the
        job's identity, unchanged (no defaults filled in). Raises ValueError on a job not made by check_job."""
        if not self._resolved:
            raise ValueError(f"{type(self).__name__} was not made by check_job: it has no resolved config to record")
        return self._resolved

    def check(self) -> None:
        """Settings that depend on each other; raises ConfigError."""

    @staticmethod
    def library_check(check, *args) -> None:
        """Run one of the library's own checks (which raise ValueError) as a config check."""
        try:
            check(*args)
        except ValueError as err:
            raise ConfigError(str(err).splitlines()[0]) from None


class TextToImageJob(Job):
    logger: Logger
    sampler: Sampler
    layers: Layers
    model: Model
    prompts: dict[str, Any]
    store: Store = Store()
    dynamic: ClassVar[tuple[str, ...]] = ("prompts",)

    def check(self) -> None:
        self.model.check()
        if self.layers.headline is not None:
            self.layer_set("layers.headline", self.layers.headline)
        scheduler = model_scheduler_config(self.model.source)
        if scheduler is not None:
            check_ddim_steps(scheduler, self.sampler.steps)

    def layer_set(self, setting: str, name: str) -> None:
        if name not in self.layers.sets:
            raise ConfigError(f"{setting}={name!r} is not a layer set (layers.sets: {', '.join(self.layers.sets)})")


JOBS = Registry("job")
"""The schema of each runner's config, by task (``config.task``): a :class:`Job` subclass."""


@JOBS.register("detect", label="detection")
class DetectJob(TextToImageJob):
    score: Score
    capture: Capture
    # passes: the extra passes to run (names in EXTRA_PASSES); <pass>: that pass's knobs (checked by check_extra)
    extra: dict[Name, Any] = {}
    localization: Localization
    early: Early
    dynamic: ClassVar[tuple[str, ...]] = ("prompts", "extra")

    def check(self) -> None:
        super().check()
        self.sampler.check_end_map_steps()
        from benchmark.detectors import extra_passes as extras
        from benchmark.detectors.detection import check_windows
        from benchmark.early import step_detection as early
        from benchmark.measures.metrics import binarize
        from benchmark.registry import DETECTORS

        steps, score, head = self.sampler.steps, self.score, self.score.headline
        self.library_check(check_windows, score.T, steps)
        if head.detector not in DETECTORS:
            raise ConfigError(f"score.headline.detector={head.detector!r} is not a detector "
                              f"({', '.join(DETECTORS)})")
        if DETECTORS[head.detector].uses_layers:
            self.layer_set("score.headline.layers", head.layers)
        if DETECTORS[head.detector].uses_T and head.T not in score.T:
            raise ConfigError(f"score.headline.T={head.T} is not one of score.T={score.T}")
        if self.sampler.end_map_steps:  # the stopping signal is used only where earlier steps are recorded
            self.library_check(early.check_signal, self.early.signal.model_dump(), self.layers.sets, self.early.fpr)
        try:
            binarize(np.arange(4.0), self.localization.rule)
        except ValueError as err:
            raise ConfigError(f"localization.rule={self.localization.rule!r}: {err}") from None
        # every configured pass's knobs, asked for or not (a knob set now is meant for a later run)
        knobs = self.pass_knobs()
        self.library_check(extras.requests, list(knobs), knobs, self.sampler.settings())
        self.library_check(lambda: extras.check_detector(head.detector, self.extra_requests()))

    def pass_knobs(self) -> dict[str, dict]:
        """``extra.<pass>``: each configured pass's knobs, by pass name."""
        return {name: knobs for name, knobs in self.extra.items() if name != "passes"}

    def extra_requests(self) -> list:
        """The extra passes asked for (``extra.passes``) with their knobs resolved
        (:func:`benchmark.detectors.extra_passes.requests`); raises ValueError on an unknown or repeated pass."""
        from benchmark.detectors import extra_passes as extras

        return extras.requests(self.extra.get("passes", []), self.pass_knobs(), self.sampler.settings())


@JOBS.register("mitigate", label="mitigation")
class MitigateJob(TextToImageJob):
    mitigation: Mitigation
    similarity: Similarity
    headline: MitigationHeadline

    def check(self) -> None:
        super().check()
        from benchmark.mitigation.interface import method_settings
        from benchmark.registry import MITIGATIONS

        mit = self.mitigation
        unknown = [m for m in mit.methods if m not in MITIGATIONS]
        if unknown:
            raise ConfigError(f"mitigation.methods: {unknown[0]!r} is not a mitigation ({', '.join(MITIGATIONS)})")
        twice = sorted({m for m in mit.methods if mit.methods.count(m) > 1})
        if twice:
            raise ConfigError(f"mitigation.methods names {twice[0]!r} twice")
        for where, table in (("strengths", mit.strengths), ("knobs", mit.knobs)):
            stray = [m for m in table if m not in mit.methods]
            if stray:
                raise ConfigError(f"mitigation.{where}.{stray[0]}: {stray[0]!r} is not among mitigation.methods "
                                  f"{mit.methods}")
        if mit.reference is not None and mit.reference not in mit.methods:  # else an empty equal-utility table
            raise ConfigError(f"mitigation.reference={mit.reference!r} is not among mitigation.methods {mit.methods}")
        errors = []
        for method in mit.methods:  # knob and strength types from the method's factory signature
            entry = MITIGATIONS[method]
            if entry.strength is None and mit.strengths.get(method):
                raise ConfigError(f"mitigation.strengths.{method}={mit.strengths[method]}: {method} has no strength "
                                  f"knob (it is one setting): give it no strengths")
            knobs = tuple(entry.knobs)
            strength = () if entry.strength is None else (entry.strength,)
            errors += _errors(argument_model(entry.fn, strength), mit.knobs.get(method, {}),
                              f"mitigation.knobs.{method}")
            for i, value in enumerate(mit.strengths.get(method, [])):
                only = argument_model(entry.fn, tuple(k for k in knobs if k not in strength))
                errors += _errors(only, {entry.strength or "strength": value}, f"mitigation.strengths.{method}.{i}")
        if errors:
            raise ConfigError(errors[0])
        self.library_check(method_settings, mit.model_dump())
        self.layer_set("mitigation.mask_layers", mit.mask_layers)
        if self.headline.method not in mit.methods:
            raise ConfigError(f"headline.method={self.headline.method!r} is not among mitigation.methods "
                              f"{mit.methods}")


@JOBS.register("guard", label="guarded generation")
class GuardJob(TextToImageJob):
    guard: Guard

    def check(self) -> None:
        super().check()
        from benchmark.registry import MITIGATIONS

        g = self.guard
        if not g.calibration:
            raise ConfigError("guard.calibration is required: a finished detection job folder (run with "
                              "sampler.end_map_steps) whose early_stopping table gives the threshold")
        if not g.step < self.sampler.steps - 1:
            raise ConfigError(f"guard.step={g.step} must be before the last of sampler.steps={self.sampler.steps} "
                              "steps (a stop at the last step saves nothing)")
        method = g.restart.method
        if method is not None:
            if method not in MITIGATIONS:
                raise ConfigError(f"guard.restart.method={method!r} is not a mitigation ({', '.join(MITIGATIONS)})")
            from benchmark.mitigation.padding import PAD_METHODS

            if method not in PAD_METHODS:  # the guard's restart re-encodes the prompt only (runners/guard.py)
                raise ConfigError(f"guard.restart.method={method!r} is not an inference-time padding mitigation "
                                  f"({', '.join(PAD_METHODS)}); for any other run runners.mitigate "
                                  "prompts.select_ids=<this job's stopped_ids.txt>")


class DDPMSampler(Section):
    steps: PositiveInt
    sampler: Literal["ddim", "ddpm"]
    eta: Fraction
    n_images: PositiveInt
    seed: Seed
    batch_size: PositiveInt


class CopyMeasures(Section):
    grid: PositiveInt
    carlini_n: PositiveInt
    copy_below: Positive
    patch: PositiveInt
    patch_ratio_below: OpenFraction


def _ddpm_model_section():
    from benchmark.ddpm.train import DDPMArchitecture, DDPMData, DDPMTraining

    class DDPMModel(Section):
        name: Name
        source: Name
        train: bool = False
        training_data: Name | None = None
        use_safetensors: bool = True
        data: DDPMData | None = None
        architecture: DDPMArchitecture | None = None
        training: DDPMTraining | None = None

    return DDPMModel


@JOBS.register("ddpm", label="unconditional DDPM")
class DDPMJob(Job):
    logger: Logger
    device: Device
    sampler: DDPMSampler
    measure: CopyMeasures
    store: Store = Store()
    ddpm_model: _ddpm_model_section()


# ---------------------------------------------------------------------------------------------- checking

# Settings that were renamed: (section, key) -> the setting that replaced it. A config still holding one is refused
# with one line naming the new key (before the schema's "unknown setting", which would not say where it went).
RENAMED = {("capture", "extra"): "extra.passes", ("model", "extra"): "extra.passes"}


def check_job(config: dict) -> Job:
    """The job schema of ``config['task']`` (:data:`JOBS`) applied to a resolved config: the validated sections
    (``job.sampler.settings()`` etc.). Raises ConfigError (one line) naming every bad setting and its value."""
    load_config_plugins(config)
    task = config.get("task")
    schema = JOBS.get(task) if isinstance(task, str) else None
    if schema is None:
        raise ConfigError(f"task={task!r} is not a job ({', '.join(JOBS)})")
    for (section, key), new in RENAMED.items():
        if isinstance(config.get(section), dict) and config[section].get(key) is not None:
            value = config[section][key]
            shown = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else value
            raise ConfigError(f"{section}.{key} is now {new}: set {new}={shown} instead")
    job = validate(schema.fn, config)
    job._resolved = config
    errors = []
    for section in schema.fn.dynamic:
        errors += DYNAMIC[section](config.get(section) or {}, section)
    if errors:
        raise ConfigError("; ".join(errors))
    job.check()
    return job


def load_config_plugins(config: dict) -> list[str]:
    """Import the installed plug-ins and the config's ``plugins`` (module names or ``.py`` files), so that their
    detectors, localizers, mitigations, prompt sources, model builders and jobs are registered before the config is
    checked against them. Raises ConfigError (one line) naming a plug-in that cannot be imported."""
    plugins = config.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p for p in plugins):
        raise ConfigError(f"plugins={plugins!r}: a list of module names or .py files")
    try:
        return load_plugins(plugins)
    except PluginError as err:
        raise ConfigError(str(err)) from None


def validate(schema: type[BaseModel], data: dict):
    """``schema`` applied to ``data`` as strict JSON (validated once); raises ConfigError listing every error."""
    try:
        return schema.model_validate_json(_json(data))
    except ValidationError as err:
        raise ConfigError("; ".join(_line(e, "", schema) for e in err.errors())) from None


def _json(data) -> str:
    return json.dumps(data, allow_nan=True, default=str)


def _errors(schema: type[BaseModel], data: dict, where: str = "") -> list[str]:
    try:
        schema.model_validate_json(_json(data))
    except ValidationError as err:
        return [_line(e, where, schema) for e in err.errors()]
    return []


def _line(error: dict, where: str, schema: type[BaseModel]) -> str:
    loc = ".".join(map(str, (where, *error["loc"]) if where else error["loc"]))
    value = error.get("input")
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        known = _known_keys(schema, error["loc"][:-1])
        return f"unknown setting {loc}={value!r}" + (f" (known here: {', '.join(known)})" if known else "")
    if error["type"] == "missing":
        return f"{loc} is missing"
    if value is None:
        return f"{loc} is null: it needs a value ({error['msg'][0].lower() + error['msg'][1:]})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{loc}={value!r}: must be a finite number"
    message = error["msg"][0].lower() + error["msg"][1:]
    shown = value if not isinstance(value, (dict, list)) or len(str(value)) < 80 else type(value).__name__
    return f"{loc}={shown!r}: {message}"


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The fields at ``loc`` of ``schema`` (for the unknown-key message), where they can be told."""
    node: Any = schema
    for part in loc:
        fields = _fields(node)
        if fields is None or part not in fields:
            return []
        node = _inner(fields[part].annotation)
    fields = _fields(node)
    return list(fields) if fields else []


def _fields(node) -> dict[str, FieldInfo] | None:
    if isinstance(node, type) and issubclass(node, BaseModel):
        return node.model_fields
    fields = getattr(node, "__pydantic_fields__", None)
    return fields if isinstance(fields, dict) else None


def _inner(annotation):
    """A section's model inside ``X | None`` or ``Annotated[X, ...]``."""
    for arg in typing.get_args(annotation) or (annotation,):
        if _fields(arg) is not None:
            return arg
    return annotation


# ------------------------------------------------------------ sections whose fields a registered function has

@cache
def argument_model(fn, skip: tuple[str, ...], base: type[BaseModel] = Section) -> type[BaseModel]:
    """A schema for the keyword arguments of ``fn`` (a registered loader or pass), from its signature: each
    parameter's annotation and default, ``skip`` left out (what the caller supplies), ``**kwargs`` never open."""
    hints = typing.get_type_hints(fn, include_extras=True)
    fields = {}
    for name, param in inspect.signature(fn).parameters.items():
        if name in skip or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = ... if param.default is param.empty else param.default
        fields[name] = (hints.get(name, Any), default)
    return create_model(f"{fn.__name__}_arguments", __base__=base, **fields)


def check_prompts(spec: dict, where: str = "prompts") -> list[str]:
    """Errors of a prompt-set config: the common options (:class:`PromptOptions`) and its loader's arguments
    (typed by the loader's signature); a union's parts and an inline set's entries are checked one by one."""
    errors = _errors(PromptOptions, {k: v for k, v in spec.items() if k in PromptOptions.model_fields}, where)
    loader = spec.get("loader")
    source = PROMPT_SOURCES.get(loader) if isinstance(loader, str) else None
    if source is None:
        unknown = f"{where}.loader={loader!r}: not a prompt source ({', '.join(PROMPT_SOURCES)})"
        return errors or [unknown]
    arguments = {k: v for k, v in spec.items() if k not in PromptOptions.model_fields}
    model = argument_model(source.fn, ("name",))
    if loader == "union":
        parts = spec.get("parts") or {}
        items = parts.items() if isinstance(parts, dict) else enumerate(parts)
        errors += [e for key, part in items for e in (check_prompts(part, f"{where}.parts.{key}")
                                                        if isinstance(part, dict) else
                                                        [f"{where}.parts.{key}={part!r}: not a prompt set"])]
        arguments.pop("parts", None)
        model = argument_model(source.fn, ("name", "parts"))
    if loader == "inline":
        entries = arguments.pop("entries", None)
        if not isinstance(entries, list) or not entries:
            errors.append(f"{where}.entries={entries!r}: needs at least one prompt")
        else:
            for i, entry in enumerate(entries):
                errors += _errors(InlineEntry, entry, f"{where}.entries.{i}")
        model = argument_model(source.fn, ("name", "entries"))
    return errors + _errors(model, arguments, where)


def check_extra(section: dict, where: str = "extra") -> list[str]:
    """Errors of the ``extra`` section: ``passes`` a list of names (which passes run), and each pass's knobs typed by
    its function's signature, plus ``n``."""
    errors = []
    passes = section.get("passes", [])
    if not isinstance(passes, list) or not all(isinstance(name, str) for name in passes):
        errors.append(f"{where}.passes={passes!r}: a list of extra passes ({', '.join(EXTRA_PASSES)})")
    for name, given in section.items():
        if name == "passes":
            continue
        entry = EXTRA_PASSES.get(name)
        if entry is None:
            errors.append(f"unknown setting {where}.{name} (extra passes: {', '.join(EXTRA_PASSES)})")
            continue
        model = argument_model(entry.fn, ("model", "prompts", "seeds", "settings", "prompt_index"), _PassKnobs)
        errors += _errors(model, given or {}, f"{where}.{name}")
    return errors


class _PassKnobs(Section):
    n: PositiveInt | None = None  # how many of a prompt's images get the pass; None: all


DYNAMIC = {"prompts": check_prompts, "extra": check_extra}


# --------------------------------------------------------------------------------------- sampler vs model

def check_ddim_steps(scheduler_config: dict, steps: int) -> None:
    """Raise ConfigError when ``steps`` DDIM steps of a scheduler (its diffusers config) reach a timestep it was not
    trained on (e.g. 1000 steps with SD's ``steps_offset=1``: timesteps 1000..1, and 1000 is past the table, where
    diffusers fails with a raw IndexError mid-sampling). Jobs call it before loading where the model's scheduler
    config can be read (:func:`model_scheduler_config`), and on the loaded scheduler otherwise."""
    from diffusers import DDIMScheduler

    def last_timestep(n: int) -> int:
        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(n)
        return int(scheduler.timesteps.max())

    trained = int(scheduler_config.get("num_train_timesteps", 1000))
    if last_timestep(steps) < trained:
        return
    fits = next((n for n in range(min(steps, trained), 0, -1) if last_timestep(n) < trained), 0)
    raise ConfigError(f"sampler.steps={steps}: this model's DDIM schedule (num_train_timesteps={trained}, "
                      f"steps_offset={scheduler_config.get('steps_offset', 0)}) then reaches timestep "
                      f"{last_timestep(steps)}, past the last trained one ({trained - 1}); use at most {fits} steps")


def model_scheduler_config(source: str) -> dict | None:
    """A model's scheduler config, read without loading it: an in-process builder's ``scheduler`` metadata or a
    folder's scheduler_config.json; None where it cannot be read yet (a hub id, a folder still to build)."""
    from pathlib import Path

    from benchmark.registry import MODEL_BUILDERS

    builder = MODEL_BUILDERS.get(source)
    if builder is not None and builder.meta.get("in_process"):
        return builder.meta.get("scheduler")
    path = Path(source).expanduser() / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
