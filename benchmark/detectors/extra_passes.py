"""Extra passes: per-generation values a capture pass cannot record (SAIL, the anisotropy score, the curvature map),
computed on request for the traces' own (prompt, seed) pairs and stored beside them; and the detectors and
localizers that read them.

An extra pass is opt-in per job (``extra.passes``, conf/detect.yaml). Each value depends on its (prompt, seed) alone:
the same initial noise as the trace (``capture.initial_noise``, official seeding included), probes seeded by the
image's seed (``jacobian_scores.rademacher_probes``), and no coupling across a batch. So a value is stored per
(trace, pass, settings) in a sidecar file in the trace's folder, ``seed<k>.<pass>-<hash>.safetensors``, written
atomically: re-scoring never recomputes it, and a trace sampled earlier without it gets it added without being
resampled (the trace file is not touched). ``<hash>`` covers the pass name, every knob that changes the value (with
its default filled in: ``k``, ``probes``, ``step``, ``probe_seed``, the baseline model and its weights...) and
:data:`EXTRA_VERSION`; the knob ``n`` (how many of a prompt's images get the pass) only picks seeds and is not in it.

Formulas and official protocols: ``benchmark.detectors.jacobian`` and docs/protocols.md.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from benchmark.core.config_types import Name, NonNegative, PositiveInt, Seed
from benchmark.detectors import jacobian, scores
from benchmark.models.text_to_image import TextToImage, get_model, weights_fingerprint
from benchmark.registry import DETECTORS, EXTRA_PASSES, LOCALIZERS
from benchmark.sampling.capture import SamplerSettings
from benchmark.store.traces import TraceKey, TraceStore, atomic_write, readable, set_aside

EXTRA_VERSION = "1"  # bump when the meaning of a stored extra value changes
PASS_ARGS = ("model", "prompts", "seeds", "settings", "prompt_index")  # every pass's positional inputs; the rest: knobs
SELECTION_KNOBS = ("n",)  # knobs that pick which images get a pass, not what it computes (not in the hash)
# knobs added after a pass's values were first stored, with the value that computes what was stored before them: at
# that value a knob stays out of the hash, so adding it renames (invalidates) no existing sidecar
LATER_KNOBS = {"curvature": {"probe_seeding": "per_image"}, "sail": {"units": "eps"}, "anisotropy": {"units": "eps"}}


# ------------------------------------------------------------------------------------------- the passes

def _check_sail(settings: SamplerSettings, k: int, units: str) -> None:
    if not 1 <= k <= settings.steps:
        raise ValueError(f"extra.sail.k={k} must be in 1..{settings.steps} sampled steps")


def _check_anisotropy(settings: SamplerSettings, gamma_norm: float, gamma_cos: float, low_noise_index: int,
                      units: str) -> None:
    if not -settings.steps <= low_noise_index < settings.steps:
        raise ValueError(f"extra.anisotropy.low_noise_index={low_noise_index} is outside the {settings.steps} steps")


def _check_curvature(settings: SamplerSettings, step: int, probes: int, probe_seed: int,
                     baseline: str | None, probe_seeding: str) -> None:
    if not -settings.steps <= step < settings.steps:
        raise ValueError(f"extra.curvature.step={step} is outside the {settings.steps} steps")
    if probes < 1:
        raise ValueError(f"extra.curvature.probes must be >= 1, got {probes}")
    if probe_seeding not in jacobian.PROBE_SEEDINGS:
        raise ValueError(f"extra.curvature.probe_seeding={probe_seeding!r} is not one of "
                         f"{', '.join(jacobian.PROBE_SEEDINGS)}")
    if probe_seeding == "official" and probe_seed != 0:
        raise ValueError(f"extra.curvature.probe_seed={probe_seed} has no effect with probe_seeding=official (the "
                         "official probes follow the image seed alone); leave it at 0")


@EXTRA_PASSES.register("sail", label="SAIL sharpness (Jeon et al.)", fields={"sail": "scalar"}, check=_check_sail)
def sail_pass(model: TextToImage, prompts: list[str], seeds: list[int], settings: SamplerSettings,
              prompt_index: list[int], k: PositiveInt = jacobian.SAIL_STEPS, units: jacobian.Units = "eps"
              ) -> dict[str, np.ndarray]:
    """SAIL per image over the first ``k`` steps (official k = 1), :func:`jacobian.sail`; ``units``: ``eps``
    (be-bench's, from epsilon) or ``official`` (on a v-prediction model the official SD 2 branch's value)."""
    return {"sail": jacobian.sail(model, prompts, seeds, settings, k, prompt_index=prompt_index, units=units)}


@EXTRA_PASSES.register("anisotropy", label="anisotropy (Asthana & Belagiannis)",
                       fields={"anisotropy": "scalar", "guidance_norm": "scalar", "alignment": "scalar"},
                       check=_check_anisotropy)
def anisotropy_pass(model: TextToImage, prompts: list[str], seeds: list[int], settings: SamplerSettings,
                    prompt_index: list[int], gamma_norm: NonNegative = jacobian.ANISOTROPY_GAMMA_NORM,
                    gamma_cos: NonNegative = jacobian.ANISOTROPY_GAMMA_COS,
                    low_noise_index: int = jacobian.ANISOTROPY_LOW_NOISE_INDEX, units: jacobian.Units = "eps"
                    ) -> dict[str, np.ndarray]:
    """The anisotropy score and its two terms per image (official SD v1 weights 1, 2), :func:`jacobian.anisotropy`;
    ``units`` as SAIL's (``official`` on SD 2.x v: the official SD 2 number, its cosine on v)."""
    return jacobian.anisotropy(model, prompts, seeds, settings, gamma_norm, gamma_cos, low_noise_index, prompt_index,
                               units)


_BASELINES: dict[tuple, TextToImage] = {}


def _baseline(source: str, model: TextToImage) -> TextToImage:
    """The less-trained model of the curvature map's Delta h_theta~, loaded once per (source, device, dtype)."""
    key = (source, str(model.device), str(model.dtype))
    if key not in _BASELINES:
        _BASELINES[key] = get_model(source, str(model.device), str(model.dtype).removeprefix("torch."))
    return _BASELINES[key]


@EXTRA_PASSES.register("curvature", label="curvature difference map (Kim & Lee)", fields={"curvature_map": "map"},
                       check=_check_curvature)
def curvature_pass(model: TextToImage, prompts: list[str], seeds: list[int], settings: SamplerSettings,
                   prompt_index: list[int], step: int = jacobian.CURVATURE_STEP,
                   probes: PositiveInt = jacobian.CURVATURE_PROBES,
                   probe_seed: Seed = 0, baseline: Name | None = None,
                   probe_seeding: Literal["per_image", "official"] = "per_image") -> dict[str, np.ndarray]:
    """The curvature map per image (n, h, w) at ``step`` (official: the last) with ``probes`` Hutchinson probes
    (official 16); ``baseline`` None: against the unconditional branch, else a model source (a less-trained
    snapshot) whose conditional branch is the baseline; ``probe_seeding`` per_image (``probe_seed`` and the image
    seed) or official (the official code's draws, :func:`jacobian_scores.rademacher_probes`).
    :func:`jacobian_scores.curvature_map`."""
    base = _baseline(baseline, model) if baseline is not None else None
    return {"curvature_map": jacobian.curvature_map(model, prompts, seeds, settings, step, probes, probe_seed, base,
                                             prompt_index=prompt_index, probe_seeding=probe_seeding)}


# ------------------------------------------------------------------------------------------- detectors, localizers

@DETECTORS.register("SAIL", label="SAIL (sharpness)", higher_is_memorized=True)
def sail_score(sail: np.ndarray) -> np.ndarray:
    """SAIL's statistic per generation (extra pass ``sail``); the prompt level (mean over images) is the paper's."""
    return sail


@DETECTORS.register("anisotropy", label="anisotropy", higher_is_memorized=True)
def anisotropy_score(anisotropy: np.ndarray) -> np.ndarray:
    """``gamma_norm * ||eps_c - eps_u|| + gamma_cos * alignment`` per generation (extra pass ``anisotropy``)."""
    return anisotropy


@DETECTORS.register("curvature", label="curvature map mean", higher_is_memorized=True)
def curvature_mean(curvature_map: np.ndarray) -> np.ndarray:
    """The curvature difference map's mean over pixels (extra pass ``curvature``); not an official protocol."""
    return jacobian.curvature_score(curvature_map)


@DETECTORS.register("score_difference", label="score difference (last step)", higher_is_memorized=True)
def score_difference(delta_sq: np.ndarray, one_minus_alpha_bar: float = 1.0) -> np.ndarray:
    """The curvature paper's cheap surrogate as a detector, from the trace alone: the mean over pixels of
    ``sum_c (eps_c - eps_u)^2 / one_minus_alpha_bar`` at the last step (its official step). With the trace's
    ``one_minus_alpha_bar`` = 1 (``score.score_difference_units: eps``, the default) in eps units; the official
    ``score_diff`` is in score units, ``sum_c (s_c - s_u)^2`` with ``s = -eps / sqrt(1 - alpha_bar_t)``, i.e.
    ``1 - alpha_bar_t`` of the last step (``score``): a constant factor per step, the same ranking.

    Not a duplicate of Wen's D: D_T averages the first T steps; at the first step this map's mean would be
    ``D_1^2 / (h w)``, the same ranking as D_1, but the official step is the last one."""
    return jacobian.score_difference_map(delta_sq, jacobian.CURVATURE_STEP, one_minus_alpha_bar).mean(axis=(-2, -1))


@LOCALIZERS.register("curvature", label="curvature map (Kim & Lee)")
def curvature_localizer(curvature_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The curvature difference map (extra pass ``curvature``) at ``size``: (n, h, w) -> (n, *size)."""
    return scores.resize_maps(np.asarray(curvature_map, dtype=np.float32), size)


@LOCALIZERS.register("score_difference", label="score-difference map (last step)")
def score_difference_localizer(delta_sq: np.ndarray, size: tuple[int, int], one_minus_alpha_bar: float) -> np.ndarray:
    """``sum_c (eps_c - eps_u)^2 / one_minus_alpha_bar`` at the last step, from the trace, at ``size``:
    (n, steps, h, w) -> (n, *size); units as :func:`score_difference`."""
    return scores.resize_maps(np.asarray(jacobian.score_difference_map(delta_sq, jacobian.CURVATURE_STEP,
                                                                       one_minus_alpha_bar),
                                    dtype=np.float32), size)


# ------------------------------------------------------------------------------------------- requests and the store

@dataclass(frozen=True)
class ExtraRequest:
    """One extra pass with its resolved knobs (defaults filled in) and ``n``: the first n seeds of each prompt
    get it (None: all)."""

    name: str
    knobs: dict = field(hash=False)
    n: int | None = None

    @cached_property
    def digest(self) -> str:
        """Hash of everything that changes the stored values: name, knobs, format version (and the baseline
        model's weights, where a knob names a local folder); a knob of :data:`LATER_KNOBS` at its old value is left
        out."""
        later = LATER_KNOBS.get(self.name, {})
        knobs = {k: v for k, v in self.knobs.items() if not (k in later and v == later[k])}
        if knobs.get("baseline"):
            knobs["baseline_weights"] = weights_fingerprint(knobs["baseline"])
        text = json.dumps({"pass": self.name, "knobs": knobs, "version": EXTRA_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    @property
    def fields(self) -> dict[str, str]:
        return EXTRA_PASSES[self.name].fields

    def seeds(self, seeds: list[int]) -> list[int]:
        return list(seeds) if self.n is None else list(seeds)[:self.n]

    def path(self, store: TraceStore, key: TraceKey, seed: int) -> Path:
        return key.folder(store.root) / f"seed{int(seed)}.{self.name}-{self.digest}.safetensors"


def knob_defaults(name: str) -> dict:
    """A pass's knobs with their (official) defaults, from its signature."""
    params = inspect.signature(EXTRA_PASSES[name].fn).parameters
    return {k: p.default for k, p in params.items() if k not in PASS_ARGS}


def requests(names: Iterable[str], knobs: dict[str, dict] | None, settings: SamplerSettings) -> list[ExtraRequest]:
    """Resolve ``extra.passes`` (pass names) and ``extra.<name>`` (knobs) into requests; raises ValueError on an
    unknown or repeated pass, an unknown knob or a bad value, before anything is sampled."""
    names, knobs = list(names), dict(knobs or {})
    out = []
    for name in names:
        if name not in EXTRA_PASSES:
            raise ValueError(f"extra.passes: unknown extra pass {name!r} (one of {', '.join(EXTRA_PASSES)})")
        if names.count(name) > 1:
            raise ValueError(f"extra.passes names {name!r} twice")
        given = dict(knobs.get(name) or {})
        n = given.pop("n", None)
        defaults = knob_defaults(name)
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"extra.{name}: unknown knob(s) {', '.join(unknown)} (knobs: "
                             f"{', '.join(list(defaults) + list(SELECTION_KNOBS))})")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"extra.{name}.n must be a positive number of images per prompt or null, got {n!r}")
        resolved = {**defaults, **given}
        EXTRA_PASSES[name].check(settings, **resolved)
        out.append(ExtraRequest(name, resolved, n))
    return out


def check_detector(name: str, extra: list[ExtraRequest]) -> None:
    """Raise ValueError when detector ``name`` reads an extra pass's field that none of ``extra`` provides (e.g. a
    headline on SAIL without ``sail`` in ``extra.passes``): before anything is sampled."""
    provided = {f for request in extra for f in request.fields}
    for entry in EXTRA_PASSES.entries():
        needed = set(entry.fields) & set(DETECTORS[name].trace_fields) - provided
        if needed:
            raise ValueError(f"detector {name!r} reads {', '.join(sorted(needed))} of the extra pass {entry.name!r}: "
                             f"add it to extra.passes")


def missing_seeds(store: TraceStore, key: TraceKey, seeds: list[int], request: ExtraRequest) -> list[int]:
    """The seeds among ``request.seeds(seeds)`` without a whole sidecar of the request (a damaged one is moved aside
    and counted missing, ``traces.readable``); raises ValueError on a sidecar of another format version or pass."""
    missing = []
    for seed in request.seeds(seeds):
        path = request.path(store, key, seed)
        if not readable(path, lambda meta, p=path: _check_meta(p, meta, request), "recomputed"):
            missing.append(seed)
    return missing


def write(path: Path, values: dict[str, np.ndarray], request: ExtraRequest, seed: int) -> None:
    """One image's values (field -> array), float32, atomically."""
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(np.shape(v) or (1,)))
              for k, v in values.items()}
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise ValueError(f"extra {path}: non-finite values in {name}")
    meta = {"version": EXTRA_VERSION, "pass": request.name, "knobs": json.dumps(request.knobs, sort_keys=True),
            "seed": str(int(seed))}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=meta))


def read(path: Path, request: ExtraRequest) -> dict[str, np.ndarray]:
    """One image's stored values: field -> () for a scalar, (h, w) for a map. Raises ValueError on another format
    version or pass, or when the file cannot be read (then it is moved aside, ``traces.set_aside``, and the next
    run computes it again)."""
    try:
        with safe_open(str(path), framework="np") as f:
            _check_meta(path, f.metadata(), request)
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except SafetensorError as err:
        raise ValueError(set_aside(path, err, "recomputed")) from None
    return {k: v.reshape(()) if request.fields[k] == "scalar" else v for k, v in arrays.items()}


def _check_meta(path: Path, meta: dict, request: ExtraRequest) -> None:
    if meta.get("version") != EXTRA_VERSION or meta.get("pass") != request.name:
        raise ValueError(f"extra file {path} holds pass {meta.get('pass')!r} version {meta.get('version')!r}, "
                         f"expected {request.name!r} version {EXTRA_VERSION!r}: move it away to recompute")


def compute_missing(model: TextToImage, generations: list, settings: SamplerSettings, store: TraceStore,
                    extra: list[ExtraRequest], batch_size: int = 8,
                    progress: Callable[[Iterable], Iterable] = iter) -> int:
    """Run every requested pass on the (generation, seed) pairs without its sidecar and write one sidecar per
    image; return how many (pass, image) values were computed. ``generations``: ``sampling.Generation`` (prompt,
    key, seeds, index). Batches hold up to ``batch_size`` seeds of one prompt (a pass takes one prompt); every
    stored sidecar is checked before anything runs. Raises ValueError when a pass returns other fields or shapes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    jobs = []
    for request in extra:
        for gen in generations:
            todo = missing_seeds(store, gen.key, gen.seeds, request)
            jobs += [(request, gen, todo[i:i + batch_size]) for i in range(0, len(todo), batch_size)]
    computed = 0
    for request, gen, seeds in progress(jobs):
        values = EXTRA_PASSES[request.name].fn(model, gen.prompt.text, seeds, settings, gen.index, **request.knobs)
        if set(values) != set(request.fields):
            raise ValueError(f"extra pass {request.name!r} returned fields {sorted(values)}, "
                             f"expected {sorted(request.fields)}")
        for i, seed in enumerate(seeds):
            image = {k: np.asarray(v)[i] for k, v in values.items()}
            write(request.path(store, gen.key, seed), image, request, seed)
        computed += len(seeds)
    return computed


def load_fields(store: TraceStore, rows: list[tuple[TraceKey, list[int], int]],
                extra: list[ExtraRequest]) -> dict[str, np.ndarray]:
    """Stacked fields of the requested passes, one row per (key, seed) in order: ``rows`` lists (key, seeds of
    the prompt, seed). A generation outside a request's first ``n`` seeds gets NaN (not computed, by choice);
    a missing sidecar of a seed inside them raises FileNotFoundError naming it."""
    out: dict[str, np.ndarray] = {}
    for request in extra:
        per_row = []
        for key, seeds, seed in rows:
            if seed not in request.seeds(seeds):
                per_row.append(None)
                continue
            path = request.path(store, key, seed)
            if not path.exists():
                raise FileNotFoundError(f"extra pass {request.name!r} missing for seed {seed}: {path} (run the "
                                        "detection job with it in extra.passes)")
            per_row.append(read(path, request))
        for name in request.fields:
            shape = next(v[name].shape for v in per_row if v is not None)
            out[name] = np.stack([v[name] if v is not None else np.full(shape, np.nan, np.float32)
                                  for v in per_row]).astype(np.float32)
    return out
