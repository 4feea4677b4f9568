"""Registries of the benchmark's extension axes: detectors, localizers, mitigations, rephrasers, similarity
measures, caption renderers, prompt sources, model builders and model families.

Metadata sits on the function it describes, as in lm-evaluation-harness's ``register_metric``: a decorator names
the entry and says how to use it, and the scorer, the reports and the contract tests iterate the registry. A new
detector is one decorated function; nothing else names it.

Where entries come from, all imported before a registry answers:

- the library: each stage package's ``__init__`` imports its modules that register entries, and a registry imports
  the stage packages of its axis (:data:`PACKAGES`);
- the shipped plug-in (the planted-memorization testbed), which no generic module imports: :data:`PLUGINS` names
  its module by entry (plain strings), imported when that entry is asked for or the registry is iterated;
- installed packages that announce modules in the entry-point group :data:`ENTRY_POINT_GROUP` (as pytest's
  ``pytest11``), imported at the first look-up of any registry;
- the user's own modules or files, named by a runner config's ``plugins`` (:func:`load_plugins`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The stage packages whose modules register entries of each axis (each package's __init__ imports those modules):
# imported before any look-up, so a registry is complete whatever the caller imported.
PACKAGES: dict[str, tuple[str, ...]] = {
    "detector": ("benchmark.detectors",),
    "localizer": ("benchmark.detectors",),
    "extra pass": ("benchmark.detectors",),
    "mitigation": ("benchmark.mitigation",),
    "similarity measure": ("benchmark.measures",),
    "prompt source": ("benchmark.data",),
    "model builder": ("benchmark.models",),
    "model family": ("benchmark.models",),
    "job": ("benchmark.jobs",),
    "rephraser": ("benchmark.mitigation",),
}
# Plug-ins: axis -> entry name -> the module that registers it, imported when that name is asked for or the registry
# is iterated.
PLUGINS: dict[str, dict[str, str]] = {
    "caption renderer": {"testbed": "benchmark.testbed.plugin"},
    "prompt source": {"testbed": "benchmark.testbed.plugin"},
    "model builder": {"testbed": "benchmark.testbed.plugin"},
    "job": {"train_testbed": "benchmark.testbed.job"},
    "rephraser": {"testbed": "benchmark.testbed.plugin"},
}
ENTRY_POINT_GROUP = "be_bench.plugins"
"""The entry-point group of installed plug-in packages: each entry point's value is a module that registers entries
(``[project.entry-points."be_bench.plugins"] my_methods = "my_pkg.my_methods"``)."""
_installed: list[str] = []  # the entry-point modules imported so far (loaded once per process)


class PluginError(ValueError):
    """A plug-in module that cannot be imported: one line naming it and why."""


def load_plugin(spec: str) -> str:
    """Import one plug-in: a module name (``my_pkg.my_methods``, importable from ``sys.path``) or the path of a
    ``.py`` file (imported as a module named by its stem, once per path). Returns the module's name.

    Raises PluginError naming the plug-in: no such module or file, or an error while importing it (a detector
    registered twice under one name, a syntax error)."""
    path = Path(spec).expanduser()
    try:
        if spec.endswith(".py"):
            if not path.is_file():
                raise PluginError(f"plugins: no plug-in file {spec!r}")
            name = f"be_bench_plugin_{path.stem}"
            loaded = sys.modules.get(name)
            if loaded is not None and Path(loaded.__file__).resolve() == path.resolve():
                return name
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return name
        importlib.import_module(spec)
        return spec
    except PluginError:
        raise
    except ModuleNotFoundError as err:
        raise PluginError(f"plugins: cannot import {spec!r}: {err}") from None
    except Exception as err:  # noqa: BLE001  (whatever a plug-in raises on import: one line naming it)
        line = f"{type(err).__name__}: {err}".splitlines()[0]
        raise PluginError(f"plugins: importing {spec!r} failed: {line}") from None


def load_plugins(specs: Iterable[str] = ()) -> list[str]:
    """Import the installed plug-ins (:data:`ENTRY_POINT_GROUP`) and then ``specs`` (a runner config's ``plugins``,
    in order; see :func:`load_plugin`), so that their entries are registered before a config is checked. Returns
    the modules' names. Raises PluginError (one line) for the first one that cannot be imported."""
    return load_installed() + [load_plugin(spec) for spec in specs]


def load_installed() -> list[str]:
    """Import every module announced in the entry-point group :data:`ENTRY_POINT_GROUP` (once per process)."""
    from importlib.metadata import entry_points

    if not _installed:
        _installed.append("")  # marks the group as read, also while its modules import (they use registries)
        for point in entry_points(group=ENTRY_POINT_GROUP):
            _installed.append(load_plugin(point.value))
    return _installed[1:]


@dataclass(frozen=True)
class Entry:
    """One registered function with its metadata (``meta``: whatever the registry's axis records)."""

    name: str
    fn: Callable
    label: str
    meta: dict = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        # entry.higher_is_memorized etc.: the axis' metadata read as attributes. Only reached for names that are not
        # fields, so during unpickling (empty __dict__) every look-up must fail as an AttributeError.
        meta = self.__dict__.get("meta", {})
        if key.startswith("__") or key not in meta:
            raise AttributeError(f"{self.__dict__.get('name', 'entry')!r} has no {key!r}")
        return meta[key]

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class Registry:
    """Named entries of one axis, in registration order; ``register`` is the decorator.

    ``check``, when given, validates (and may complete) an entry's metadata at registration, so a malformed entry
    fails at import with its name in the message rather than later inside a scorer.
    """

    def __init__(self, axis: str, check: Callable[[str, Callable, dict], dict] | None = None):
        self.axis = axis
        self._entries: dict[str, Entry] = {}
        self._check = check

    def register(self, name: str, label: str | None = None, **meta) -> Callable[[Callable], Callable]:
        """Decorator: ``@DETECTORS.register("D", label="Wen (D)", higher_is_memorized=True)``. Returns the
        function unchanged. Registering a taken name raises, unless it is the same function again (a reload)."""
        def decorate(fn: Callable) -> Callable:
            old = self._entries.get(name)
            if old is not None and old.fn.__qualname__ != fn.__qualname__:
                raise ValueError(f"{self.axis} {name!r} is registered already ({old.fn.__module__}."
                                 f"{old.fn.__qualname__})")
            full = self._check(name, fn, dict(meta)) if self._check else dict(meta)
            self._entries[name] = Entry(name, fn, label or name, full)
            return fn
        return decorate

    def _load(self, name: str | None = None) -> None:
        """Import the axis' stage packages and installed plug-ins, then the shipped plug-in of ``name`` (None: every
        shipped plug-in of the axis)."""
        plugins = PLUGINS.get(self.axis, {})
        wanted = [plugins[name]] if name in plugins else [] if name else sorted(set(plugins.values()))
        for module in PACKAGES.get(self.axis, ()) + tuple(wanted):
            importlib.import_module(module)  # a no-op once imported
        load_installed()

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            self._load(name)
        if name not in self._entries:
            raise KeyError(f"unknown {self.axis} {name!r} (one of {', '.join(self.names())})")
        return self._entries[name]

    def get(self, name: str, default: Entry | None = None) -> Entry | None:
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __len__(self) -> int:
        return len(self.names())

    def label(self, name: str) -> str:
        """The display label, or the name itself for an entry this registry does not know (old job folders)."""
        entry = self.get(name)
        return entry.label if entry else name

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a throwaway entry clean up with it)."""
        self._entries.pop(name, None)


# ------------------------------------------------------------------------------------------- detectors

# What a detector's parameters may be named, and where score_grid takes each from. ``layers``: the layer set's
# layer names; ``mask``: the BE mask of that layer set at delta_sq's size; ``T``: the step window. Any other
# parameter is a trace field (``delta_sq``, ``end_maps``, ``token_attn``, ``end_index``, ``token_maps``, or a field a
# new capture pass adds), read from the stacked traces by name.
LAYER_INPUTS = ("layers", "mask")
WINDOW_INPUT = "T"


def _check_detector(name: str, fn: Callable, meta: dict) -> dict:
    import inspect

    if "higher_is_memorized" not in meta:
        raise ValueError(f"detector {name!r}: say higher_is_memorized=True/False")
    params = list(inspect.signature(fn).parameters)
    derived = {"uses_layers": any(p in LAYER_INPUTS for p in params), "uses_T": WINDOW_INPUT in params,
               "trace_fields": tuple(p for p in params if p not in LAYER_INPUTS + (WINDOW_INPUT,))}
    for key, value in derived.items():
        if key in meta and (tuple(meta[key]) if key == "trace_fields" else meta[key]) != value:
            raise ValueError(f"detector {name!r}: {key}={meta[key]!r} disagrees with its parameters {params}")
    if "baseline" in meta and not isinstance(meta["baseline"], str):
        raise ValueError(f"detector {name!r}: baseline={meta['baseline']!r} must be a detector's name")
    return {**_check_needs(name, fn, meta), **derived, "inputs": tuple(params),
            **_reproduces(name, "detector", meta)}


def _check_needs(name: str, fn: Callable, meta: dict) -> dict:
    """``needs``: the premises (:data:`PREMISES`) an entry's definition rests on; () when it names none."""
    needs = tuple(meta.get("needs", ()))
    unknown = [n for n in needs if n not in PREMISES]
    if unknown:
        raise ValueError(f"{name!r}: needs={unknown} are not premises ({', '.join(PREMISES)})")
    return {**meta, "needs": needs}


def _reproduces(name: str, axis: str, meta: dict) -> dict:
    """``reproduces`` as a tuple of names (a bare string would match its substrings)."""
    value = meta.get("reproduces", ())
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{axis} {name!r}: reproduces={value!r} must be a tuple of table or figure names, e.g. "
                         "('table1',)")
    return {"reproduces": tuple(value)}


DETECTORS = Registry("detector", _check_detector)
"""Detection scores, one per generation. Metadata: ``higher_is_memorized``, ``needs`` (premises a model family
may lack, :data:`PREMISES`); optional, read by the reports:
``reproduces`` (the published tables and figures the detector has a row in: ``table1``, Chen et al.'s Table 1;
``fig5``, their BE intensity box plot) and ``baseline`` (a detector the headline compares it with, with a paired
interval); derived from the parameters: ``uses_layers``, ``uses_T``, ``trace_fields`` (see :data:`LAYER_INPUTS`)."""

LOCALIZER_INPUTS = ("layers", "size")


def _check_localizer(name: str, fn: Callable, meta: dict) -> dict:
    import inspect

    # parameters without a default are inputs: ``layers`` (a layer set), ``size`` (the map size asked for), any
    # other a trace field, as for detectors
    params = [p.name for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
    return {**meta, "inputs": tuple(params), "uses_layers": "layers" in params,
            "trace_fields": tuple(p for p in params if p not in LOCALIZER_INPUTS),
            **_reproduces(name, "localizer", meta)}


LOCALIZERS = Registry("localizer", _check_localizer)
"""Soft masks (n, h, w) of where a generation copies, from traces: ``fn(<trace fields>[, layers], size) ->
(n, *size)``, e.g. ``be_mask(end_maps, layers, size)``. Optional metadata: ``reproduces`` (``localization_iou``:
the published IoU the headline compares it with). Derived: ``inputs``, ``uses_layers``, ``trace_fields`` (a
layer-set-free localizer reads only trace fields, e.g. an extra pass's map)."""

EXTRA_PASSES = Registry("extra pass")
"""Per-generation values that need their own pass over the model (a capture trace cannot hold them): ``fn(model,
prompts, seeds, settings, prompt_index, **knobs) -> {field: (len(seeds), ...)}`` (image i: ``prompts[i]``,
``seeds[i]``, ``prompt_index[i]``), each value a function of its own (prompt, seed) alone. Metadata: ``fields``
(field name -> "scalar" | "map"), ``check`` (``check(settings, **knobs)`` raises ValueError on bad knobs, before any
pass runs). Stored beside the traces by ``benchmark.detectors.extra_passes``."""

# What a mitigation acts on, which way its strength knob is stronger, and what it may require of a model (the tests
# of each requirement: benchmark.mitigation.interface.REQUIREMENTS).
MITIGATION_ACTS_ON = ("prompt", "embedding", "latents", "guidance", "modules")
MITIGATION_STRONGER = ("higher", "lower")
MITIGATION_REQUIRES = ("cross_attention", "tokenizer", "text_encoder")


def _check_mitigation(name: str, fn: Callable, meta: dict) -> dict:
    import inspect

    meta = _check_needs(name, fn, meta)
    acts_on = meta.get("acts_on")
    if acts_on not in MITIGATION_ACTS_ON:
        raise ValueError(f"mitigation {name!r}: acts_on={acts_on!r} is not one of {', '.join(MITIGATION_ACTS_ON)}")
    if "needs_mask" not in meta:
        raise ValueError(f"mitigation {name!r}: say needs_mask=True/False (whether it reads the BE mask)")
    params = {p: v for p, v in inspect.signature(fn).parameters.items()
              if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    strength = meta.get("strength")
    # every knob has its official default; the strength may lack one (Wen's scripts give no default target loss)
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p != strength]
    if missing:
        raise ValueError(f"mitigation {name!r}: knob(s) {missing} need a default (the official one)")
    if strength is not None and strength not in params:
        raise ValueError(f"mitigation {name!r}: strength={strength!r} is not a knob of {fn.__name__}{list(params)}")
    if strength is not None and meta.get("stronger") not in MITIGATION_STRONGER:
        raise ValueError(f"mitigation {name!r}: say stronger='higher' or 'lower' for its strength {strength!r}")
    unknown = [r for r in meta.get("requires", ()) if r not in MITIGATION_REQUIRES]
    if unknown:
        raise ValueError(f"mitigation {name!r}: unknown requirement(s) {unknown} (known: "
                         f"{', '.join(MITIGATION_REQUIRES)})")
    return {"strength": None, "stronger": None, "requires": (), "tag": None, "strengths": (), "config_knobs": {},
            "strengths_key": None, **meta, "knobs": {p: None if v.default is inspect.Parameter.empty else v.default
                                                      for p, v in params.items()}}


MITIGATIONS = Registry("mitigation", _check_mitigation)
"""Inference-time mitigations: ``fn(**knobs) -> benchmark.mitigation.interface.Intervention``, a factory whose
keyword parameters are the method's knobs, each defaulting to the official value. Metadata: ``acts_on`` (one of
:data:`MITIGATION_ACTS_ON`), ``needs`` (premises a model family may lack, :data:`PREMISES`), ``needs_mask``
(whether it reads the generation's BE mask), ``strength`` (the knob that moves it along its trade-off curve, or
None) and ``stronger`` ("higher" | "lower"), ``strengths`` (default
values of the strength), ``requires`` (of :data:`MITIGATION_REQUIRES`, checked on the model before sampling),
``tag`` (``tag(knobs) -> str``, the store-key part, for methods keyed before the interface), ``strengths_key`` and
``config_knobs`` (the mitigation config's older keys that hold its strengths and knobs: ``target_losses``, ``lr``...).
Derived: ``knobs`` (knob -> default). See ``benchmark.mitigation.interface``."""

REPHRASERS = Registry("rephraser")
"""Prompt rephrasers for PRSS's semantic search (``benchmark.mitigation.prompt_search``): ``fn(prompt, count,
**knobs) -> list[str]``, at most ``count`` rephrasings of ``prompt`` (the prompt itself not among them), the same
list for the same arguments (deterministic). The official search reads rephrasings an LLM wrote beforehand
(docs/protocols.md)."""

SIMILARITIES = Registry("similarity measure")
"""Image-to-training-image similarity: ``fn(image, reference[, mask]) -> float``. Metadata: ``needs_mask``."""

CAPTION_RENDERERS = Registry("caption renderer")
"""The scene a caption names, where a prompt source can draw it: ``fn(caption, size) -> (3, size, size)`` in [0, 1];
raises ValueError for a caption it does not describe. Gives the utility measure ``caption_rmse``."""

PROMPT_SOURCES = Registry("prompt source")
"""Prompt-set loaders, named by a prompt config's ``loader``: ``fn(name=..., **spec) -> PromptSet``."""

MODEL_BUILDERS = Registry("model builder")
"""Model builders, named by a model config's ``build``: ``fn(source) -> path of a pipeline folder`` (built or
trained when missing), or with ``in_process=True``: ``fn() -> TextToImage`` named by ``source``."""

MODEL_FAMILIES = Registry("model family")
"""Pipeline loaders by model family (SD, SDXL, PixArt-alpha): ``fn(source, use_safetensors) -> TextToImage`` for a
pipeline folder or hub id. Metadata: ``pipelines``, the diffusers pipeline class names (``model_index.json``'s
``_class_name``) the family loads; ``load_text_to_image`` picks the family by them.

A detector or mitigation whose definition rests on a premise some family lacks says so with ``needs`` in its
metadata (:data:`PREMISES`); ``TextToImage.not_defined(needs)`` says why it is not defined on a family."""

PREMISES = {
    "start_token": "the prompt's token states begin with a start token (CLIP's <|startoftext|>) that takes most "
                   "of the attention of non-memorized prompts",
    "attended_padding": "the prompt is padded to the full context with tokens the network attends to (SD's CLIP "
                        "pads with copies of the end token)",
}
"""What a ``needs`` entry may name, and what it means."""
