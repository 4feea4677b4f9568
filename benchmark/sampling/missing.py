"""The one sampling path: every (prompt, seed) without a trace in the store is sampled, in batches, and written;
and the one way to name a sampler in the store.

Detection, mitigated generations and unconditional DDPM samples all go through :func:`sample_missing`; what differs
is only the function that samples one batch.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from benchmark.data.prompts import Prompt
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import STEP_NOISE_KEY, SamplerSettings
from benchmark.store.traces import Trace, TraceKey, TraceStore

# The fields every key has always spelt out; any other field of SamplerSettings enters the key when it differs from
# its default, so that a new setting never makes two different generations share a trace and default keys stay
# the same as before the setting existed.
_KEY_FIELDS = ("steps", "guidance", "height", "width", "eta")


@dataclass
class Generation:
    """Where one prompt's traces live, with its labels (``prompt`` None for an unconditional model)."""

    prompt: Prompt | None
    key: TraceKey
    seeds: list[int]
    index: int = 0  # the prompt's position in its whole prompt set, Prompt.position (official: index + gen_seed)


BatchSampler = Callable[[list[tuple[Generation, int]]], list[tuple[Trace, np.ndarray | torch.Tensor]]]


def sample_missing(store: TraceStore, generations: list[Generation], sample_batch: BatchSampler, batch_size: int,
                   progress: Callable[[Iterable], Iterable] = iter, across_prompts: bool = True,
                   whole_prompt: bool = False) -> int:
    """Sample every (generation, seed) without a trace on disk and write each (trace, image) that ``sample_batch``
    returns, in order; return how many images were sampled.

    Batches hold up to ``batch_size`` images; with ``across_prompts`` they mix generations (one image per prompt
    still fills a batch), else each batch belongs to one generation (for methods whose result depends on the
    batch). ``whole_prompt``: a generation with any seed missing is sampled with all its seeds in one batch (the
    official protocols draw and optimise a prompt's images together) and only the missing traces are written.
    Every stored trace is checked (format version) before anything is sampled."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    todo = [[(gen, seed) for seed in store.missing_seeds(gen.key, gen.seeds)] for gen in generations]
    if whole_prompt:
        missing = {(id(gen), seed) for items in todo for gen, seed in items}
        batches = [[(gen, seed) for seed in gen.seeds] for gen, items in zip(generations, todo) if items]
    elif across_prompts:
        flat = [item for items in todo for item in items]
        batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    else:
        batches = [items[i:i + batch_size] for items in todo for i in range(0, len(items), batch_size)]
    sampled = 0
    for batch in progress(batches):
        results = sample_batch(batch)
        if len(results) != len(batch):
            raise RuntimeError(f"a batch sampler returned {len(results)} results for {len(batch)} images")
        written = [(gen, seed, result) for (gen, seed), result in zip(batch, results)
                   if not whole_prompt or (id(gen), seed) in missing]  # never rewrite a finished trace
        for gen, _, (trace, image) in written:
            store.write(gen.key, trace, image)
        sampled += len(batch)
    return sampled


def sampler_key(settings, dtype: str | None = None, mitigation=None, mask_layers: Sequence[str] | None = None) -> str:
    """The sampler part of a trace key, from every setting that changes a generation.

    - text-to-image (:class:`SamplerSettings`): ``ddim<steps>-g<guidance>-<H>x<W>-eta<eta>-<dtype>``, then
      ``-imgnoise`` when eta > 0 (``capture.STEP_NOISE_KEY``), ``-<field><value>`` for every other
      SamplerSettings field off its default (e.g. ``end_map_steps``), and ``-official<gen_seed>-fullindex``
      under official seeding;
    - mitigated (``mitigation``, a MitigationSettings): ``+<its tag>``, and for the BE-masked method
      ``-mask<hash>`` of ``mask_layers`` (the resolved layer names) unless None (= every cross-attention layer);
    - unconditional DDPM (a DDPMSampler): ``<sampler><steps>-eta<eta>`` (``-imgnoise`` for DDIM with eta > 0).
    """
    if not isinstance(settings, SamplerSettings):
        # other samplers (ddpm.DDPMSampler) name their own key; asked for, not imported: ddpm imports this module
        if not isinstance(getattr(settings, "key", None), str):
            raise TypeError(f"no store key for sampler settings of type {type(settings).__name__}")
        return settings.key
    if dtype is None:
        raise ValueError("a text-to-image sampler key needs the model dtype")
    key = f"ddim{settings.steps}-g{settings.guidance:g}-{settings.height}x{settings.width}-eta{settings.eta:g}-{dtype}"
    if settings.eta > 0:
        key += STEP_NOISE_KEY
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name not in _KEY_FIELDS + ("seeding", "gen_seed") and value != _default(f):
            key += f"-{f.name}{_key_value(value)}"
    if settings.seeding != "per_image":  # rows are drawn from prompt index + gen_seed; per-image seeds name the file
        # -fullindex: the prompt index is the prompt's position in its whole set (Prompt.position); keys without
        # it hold traces of runs that counted positions after shard / limit / select_ids, never reused
        key += f"-{settings.seeding}{settings.gen_seed}-fullindex"
    if mitigation is not None:
        key += mitigation_suffix(mitigation, mask_layers)
    return key


def mitigation_suffix(mitigation, mask_layers: Sequence[str] | None = None) -> str:
    """What a mitigated generation adds to its baseline's sampler key (see :func:`sampler_key`)."""
    suffix = f"+{mitigation.tag}"
    if MITIGATIONS[mitigation.method].needs_mask and mask_layers is not None:
        digest = hashlib.sha1(",".join(sorted(mask_layers)).encode()).hexdigest()[:8]
        suffix += f"-mask{digest}"
    return suffix


def _default(f):
    return f.default_factory() if callable(f.default_factory) else f.default


def _key_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "_".join(_key_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
