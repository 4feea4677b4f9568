"""The one mitigation interface: a registered factory per method, returning the hooks it applies to a sampling pass.

Mitigations act on different things (``registry.MITIGATION_ACTS_ON``): the prompt text (Somepalli et al.'s
RTA/RNA, PRSS), the conditional embedding (Wen et al., BE, Kim & No), the initial noise (SAIL, Han et al.), the
guidance per step (Jain et al.), or the UNet's modules (Ren et al.'s attention re-weighting, NeMo's neurons).
Each method is one factory registered in ``benchmark.registry.MITIGATIONS``::

    @MITIGATIONS.register("rna", label="RNA (random numbers)", acts_on="prompt", strength="repeats",
                          stronger="higher", needs_mask=False, requires=("tokenizer",))
    def random_numbers(repeats: PositiveInt = 4) -> Intervention: ...

Its keyword parameters are its knobs (all with the official defaults; their annotations type the config's
``mitigation.knobs.<name>``, as an extra pass's signature does), ``strength`` names the knob that moves it along its
trade-off curve and ``stronger`` says which way is stronger; ``requires`` names what the model must have
(:data:`REQUIREMENTS`), checked before any sampling. The factory returns an :class:`Intervention`, whose hooks
``capture.sample_with_capture`` applies inside its one loop, so a mitigated generation is traced and scored by every
detector as any other.

A setting of a method is a :class:`Mitigation` (method + every knob); its ``tag`` is the store-key part, so a
result is never reused for other knobs. Methods that had store keys before this interface keep them (``tag`` given at
registration).
"""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from benchmark.models.text_to_image import TextToImage
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import SamplingSetup, cross_attention_layers

REQUIREMENTS: dict[str, tuple[Callable[[TextToImage], bool], str]] = {
    "cross_attention": (lambda model: bool(cross_attention_layers(model.unet)), "cross-attention layers"),
    "tokenizer": (lambda model: getattr(model, "tokenizer", None) is not None, "a tokenizer"),
    "text_encoder": (lambda model: getattr(model, "text_encoder", None) is not None, "a text encoder"),
}
"""What a method may require of a model (``registry.MITIGATION_REQUIRES``): name -> (test, what errors call it)."""

PromptHook = Callable[[TextToImage, list[str], list[int], "int | Sequence[int] | None"], list[str]]
TensorHook = Callable[[SamplingSetup], torch.Tensor]
GuidanceHook = Callable[[SamplingSetup, int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
GUIDANCE_HOOK_ARGUMENTS = ("setup", "step", "t", "latents", "eps_uncond", "eps_cond")
ModulesHook = Callable[[SamplingSetup], AbstractContextManager]


@dataclass
class Intervention:
    """The hooks of one mitigation setting; each optional, applied in this order by ``sample_with_capture``:

    - ``prompts(model, prompts, seeds, prompt_index) -> prompts``: the text of image i rewritten (before
      encoding; the trace's end token is then the rewritten prompt's); seeded per generation by the hook itself;
    - ``embedding(setup) -> cond`` (n, tokens, dim): the conditional embedding replaced (a hook that perturbs the
      unconditional one too sets ``setup.uncond``);
    - ``latents(setup) -> latents`` (n, c, h, w): the initial noise replaced (``setup.cond`` is already the hook
      above's);
    - ``guidance(setup, step, t, latents, eps_uncond, eps_cond) -> eps`` (n, c, h, w): the guided noise prediction
      of 0-based step ``step`` (timestep ``t``, a host int) in place of ``eps_u + w (eps_c - eps_u)``; ``latents``
      (n, c, h, w) are the step's input x_t, the UNet's input in both halves of the CFG batch (read only: the DDIM
      update uses them next), for a hook that evaluates the network once more (PRSS's re-anchoring); the trace
      still records ``eps_c - eps_u``. A hook of the older signature without ``latents`` is refused when its
      setting is made (:meth:`Mitigation.intervention`), never called with shifted arguments;
    - ``modules(setup)``: a context manager installing module hooks or attention processors for the whole loop;
      it is entered before capture's recorders, which then wrap the processors it installed (a processor that is
      not diffusers' plain one is called for the output; the recorded maps are computed beside it, unweighted);
    - ``check(model)``: raises ValueError (naming the method) when these knobs cannot run on ``model``, called by
      the mitigation job before any sampling (e.g. a replacement token the tokenizer lacks).

    ``stats``: per-image values (name -> (n,) array) a hook reports, e.g. ``loss_first``, ``loss_last``,
    ``iterations``; written into each trace's metadata by the mitigation job."""

    prompts: PromptHook | None = None
    embedding: TensorHook | None = None
    latents: TensorHook | None = None
    guidance: GuidanceHook | None = None
    modules: ModulesHook | None = None
    check: Callable[[TextToImage], None] | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    def prepare(self, setup: SamplingSetup) -> None:
        """Apply the embedding and initial-noise hooks to ``setup`` (in place)."""
        if self.embedding is not None:
            setup.cond = self.embedding(setup).to(setup.model.device, setup.model.dtype)
        if self.latents is not None:
            setup.latents = self.latents(setup).to(setup.model.device, setup.model.dtype)

    def guidance_for(self, setup: SamplingSetup
                     ) -> Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The guidance hook bound to ``setup``: ``(step, t, latents, eps_uncond, eps_cond) -> eps``; None without
        one."""
        if self.guidance is None:
            return None
        return lambda step, t, latents, eps_uncond, eps_cond: self.guidance(setup, step, t, latents, eps_uncond,
                                                                            eps_cond)

    def installed(self, setup: SamplingSetup) -> AbstractContextManager:
        return nullcontext() if self.modules is None else self.modules(setup)


@dataclass(frozen=True)
class Mitigation:
    """One setting of a registered method: ``method`` and every knob's value (the factory's defaults filled in).

    ``strength``: the value of the method's strength knob (None for a method without one); ``tag`` the store-key
    part: the method's own ``tag(knobs)`` where it registered one (methods keyed before this interface), else
    ``<method>-<strength knob><value>-k<hash of the other knobs' values>`` (short: the store cuts key parts at
    80 characters)."""

    method: str
    knobs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, method: str, **knobs) -> Mitigation:
        """The setting ``method`` with ``knobs`` over its defaults. Raises ValueError for an unknown method or knob,
        or a knob value its factory refuses (the factory is called once to check)."""
        entry = _entry(method)
        unknown = [k for k in knobs if k not in entry.knobs]
        if unknown:
            raise ValueError(f"mitigation {method}: unknown knob(s) {unknown} (knobs: {', '.join(entry.knobs)})")
        full = {**entry.knobs, **knobs}
        setting = cls(method, tuple(full.items()))
        setting.intervention()  # bad values fail here, before any sampling
        return setting

    @property
    def entry(self):
        return _entry(self.method)

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.knobs)

    @property
    def strength(self) -> float | None:
        name = self.entry.strength
        return None if name is None else float(self.values[name])

    @property
    def needs_mask(self) -> bool:
        return bool(self.entry.needs_mask)

    @property
    def tag(self) -> str:
        if self.entry.tag is not None:
            return self.entry.tag(self.values)
        # the store cuts each key part at 80 characters (traces.slug): spelling every knob out could make two
        # settings share a folder, so the knobs besides the strength enter as one hash (their values are in each
        # trace's metadata and the job's methods table)
        strength = self.entry.strength
        parts = [self.method] + ([f"{strength}{_key_value(self.values[strength])}"] if strength else [])
        others = [(k, v) for k, v in self.knobs if k != strength]
        if others:
            parts.append("k" + hashlib.sha1(repr(others).encode()).hexdigest()[:8])
        return "-".join(parts)

    def intervention(self) -> Intervention:
        """A fresh :class:`Intervention` of this setting (its ``stats`` are the next batch's). Raises TypeError when
        the factory returns no Intervention, ValueError when its guidance hook cannot take
        :data:`GUIDANCE_HOOK_ARGUMENTS` (a plug-in written before the hook got the step's latents)."""
        out = self.entry.fn(**self.values)
        if not isinstance(out, Intervention):
            raise TypeError(f"mitigation {self.method}: its factory returned {type(out).__name__}, not an "
                            "Intervention")
        if out.guidance is not None:
            check_guidance_hook(self.method, out.guidance)
        return out

    def check_model(self, model: TextToImage) -> None:
        """Raise ValueError, naming the method, when ``model`` lacks what it requires or the intervention's own
        ``check`` refuses these knobs on it."""
        for requirement in self.entry.requires:
            test, what = REQUIREMENTS[requirement]
            if not test(model):
                raise ValueError(f"mitigation {self.method} cannot run on {model.model_id}: it needs {what}")
        intervention = self.intervention()
        if intervention.check is not None:
            try:
                intervention.check(model)
            except ValueError as err:
                raise ValueError(f"mitigation {self.tag}: {err}") from None


def check_guidance_hook(method: str, hook: GuidanceHook) -> None:
    """Raise ValueError, naming ``method``, when ``hook`` cannot be called with the six positional arguments
    :data:`GUIDANCE_HOOK_ARGUMENTS`: an older hook ``(setup, step, t, eps_uncond, eps_cond)`` would otherwise fail
    at its first step, after the set-up's work."""
    try:
        inspect.signature(hook).bind(*GUIDANCE_HOOK_ARGUMENTS)
    except TypeError:
        raise ValueError(f"mitigation {method}: its guidance hook must take ({', '.join(GUIDANCE_HOOK_ARGUMENTS)}), "
                         f"got {inspect.signature(hook)} (the step's latents come after t)") from None


def _entry(method: str):
    try:
        return MITIGATIONS[method]
    except KeyError:
        raise ValueError(f"unknown mitigation {method!r} (one of {', '.join(MITIGATIONS)})") from None


def _key_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "_".join(_key_value(v) for v in value)
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    # file-name safe and distinct: every character outside [A-Za-z0-9._] spelled as u<hex>
    return "".join(c if c.isascii() and (c.isalnum() or c in "._") else f"u{ord(c):x}" for c in text)


def settings_for(method: str, strengths: Sequence[float] | None, knobs: dict | None = None) -> list[Mitigation]:
    """The settings of one method's curve: one per strength (a method without a strength knob: one setting, and
    ``strengths`` must be empty or None). Raises ValueError naming the method for a bad knob or strength."""
    entry = _entry(method)
    knobs = dict(knobs or {})
    if entry.strength is None:
        if strengths:
            raise ValueError(f"mitigation {method} has no strength knob: give it no strengths (got {list(strengths)})")
        return [Mitigation.of(method, **knobs)]
    if entry.strength in knobs:
        raise ValueError(f"mitigation {method}: set its strength {entry.strength!r} through its strengths, not knobs")
    values = list(strengths) if strengths else list(entry.strengths)
    if not values:
        raise ValueError(f"mitigation {method}: no strengths ({entry.strength}) given and none registered")
    return [Mitigation.of(method, **knobs, **{entry.strength: value}) for value in values]


def method_settings(mitigation: dict) -> list[Mitigation]:
    """Every setting of the ``mitigation`` config section (a dict as ``config.Mitigation`` validates it), in the
    order of ``methods``: per method its strengths (``strengths.<method>``, else the older key its registration
    names, ``strengths_key``: ``target_losses`` for wen/be, ``pad_fractions`` for pad_mask; else its registered
    defaults) and its knobs (the older keys of ``config_knobs``, then ``knobs.<method>``). Raises ValueError naming
    the method for an unknown method, knob or a bad strength."""
    methods = mitigation["methods"]
    unknown = [m for m in methods if m not in MITIGATIONS]
    if unknown:
        raise ValueError(f"mitigation.methods: {unknown[0]!r} is not a mitigation ({', '.join(MITIGATIONS)})")
    given = mitigation.get("strengths") or {}
    by_key: dict[str, list[str]] = {}
    for method in methods:
        key = MITIGATIONS[method].strengths_key
        if key is not None and method not in given and not mitigation[key]:
            by_key.setdefault(key, []).append(method)
    for key, empty in by_key.items():
        what = MITIGATIONS[empty[0]].strength.replace("_", " ")
        raise ValueError(f"mitigation.{key}=[]: {', '.join(empty)} need{'s' if len(empty) == 1 else ''} at least "
                         f"one {what}")
    out = []
    for method in methods:
        entry = MITIGATIONS[method]
        knobs = {knob: mitigation[key] for knob, key in entry.config_knobs.items()}
        knobs |= (mitigation.get("knobs") or {}).get(method) or {}
        strengths = given.get(method)
        if strengths is None and entry.strengths_key is not None:
            strengths = mitigation[entry.strengths_key]
        out += settings_for(method, strengths, knobs)
    return out
