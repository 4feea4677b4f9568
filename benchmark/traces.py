"""The trace store: one file per generated image, keyed by model, sampler settings, prompt set, prompt and seed.

Layout: ``root/<model>/<sampler>/<prompt set>/<prompt id>-<prompt hash>/seed<seed>.safetensors`` with the image beside
it as ``seed<seed>.png``. Files are written to a temporary name and renamed, so a killed job leaves either a whole
trace or none; a trace on disk is never sampled again.

Every file carries its format version (``TRACE_VERSION``, in the safetensors metadata). A trace of another version
is refused, by ``read`` and by ``missing_seeds`` (so before any sampling), with a message naming the file: it is
neither mixed into the scores nor silently overwritten. Bump the version when the meaning of a stored array changes;
an added optional array (``end_map@<step>/``) needs no bump, since a reader that does not know it never reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file

from .capture import CapturedBatch

TRACE_VERSION = "1"


def slug(text: str) -> str:
    """A file-name-safe rendering of a key part."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", str(text)).strip("_")[:80] or "_"


def prompt_hash(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:10]


@dataclass
class Trace:
    """What one generated image leaves behind for every scorer (arrays as float32 numpy)."""

    delta_sq: np.ndarray  # (steps, h, w)
    end_maps: dict[str, np.ndarray]  # layer -> (h_l, w_l), final step
    token_attn: dict[str, np.ndarray]  # layer -> (steps, tokens)
    end_index: int
    latent: np.ndarray
    meta: dict = field(default_factory=dict)
    token_maps: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> (tokens, h_l, w_l); opt-in
    end_maps_by_step: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # 0-based step -> layer -> map

    @property
    def layers(self) -> list[str]:
        return list(self.end_maps)

    @property
    def steps(self) -> int:
        return self.delta_sq.shape[0]

    @property
    def map_steps(self) -> list[int]:
        """0-based steps whose end-token maps this trace holds (the final step always)."""
        return sorted(self.end_maps_by_step) + [self.steps - 1]

    def end_maps_at(self, step: int) -> dict[str, np.ndarray]:
        """End-token maps (layer -> (h_l, w_l)) at 0-based denoising ``step``; -1 or ``steps - 1`` is the final one.
        Raises KeyError naming the recorded steps when ``step`` was not recorded (``sampler.end_map_steps``)."""
        step = self.steps + step if step < 0 else step
        if step == self.steps - 1:
            return self.end_maps
        if step not in self.end_maps_by_step:
            raise KeyError(f"no end-token maps at step {step}: this trace has them at steps {self.map_steps} "
                           "(record more with sampler.end_map_steps)")
        return self.end_maps_by_step[step]


def traces_from_batch(batch: CapturedBatch, meta: dict | list[dict], seeds: list[int]) -> list[Trace]:
    """One trace per image of ``batch``; ``meta`` is shared or one dict per image (several prompts in one call)."""
    metas = [meta] * len(seeds) if isinstance(meta, dict) else meta
    out = []
    for i, (seed, image_meta) in enumerate(zip(seeds, metas, strict=True)):
        out.append(Trace(
            delta_sq=batch.delta_sq[i].numpy(),
            end_maps={k: v[i].numpy() for k, v in batch.end_maps.items()},
            token_attn={k: v[i].numpy() for k, v in batch.token_attn.items()},
            end_index=int(batch.end_index[i]),
            latent=batch.latents[i].numpy(),
            meta={**image_meta, "seed": int(seed)},
            token_maps={k: v[i].numpy() for k, v in batch.token_maps.items()},
            end_maps_by_step={step: {k: v[i].numpy() for k, v in maps.items()}
                              for step, maps in batch.end_maps_by_step.items()},
        ))
    return out


def to_png(image: torch.Tensor | np.ndarray) -> Image.Image:
    """(3, H, W) in [0, 1] -> an 8-bit RGB image."""
    array = np.asarray(image, dtype=np.float32).transpose(1, 2, 0)
    return Image.fromarray((array * 255).round().clip(0, 255).astype(np.uint8))


@dataclass(frozen=True)
class TraceKey:
    """Identifies one prompt's generations under one model and sampler."""

    model: str
    sampler: str
    prompt_set: str
    prompt_id: str
    prompt: str

    def folder(self, root: Path) -> Path:
        return (root / slug(self.model) / slug(self.sampler) / slug(self.prompt_set)
                / f"{slug(self.prompt_id)}-{prompt_hash(self.prompt)}")


class TraceStore:
    """Traces on disk; ``dtype`` is the storage precision of the float arrays (float16 keeps SD traces small)."""

    def __init__(self, root: str | Path, dtype: str = "float16"):
        self.root = Path(root)
        self.dtype = np.dtype(dtype)

    def trace_path(self, key: TraceKey, seed: int) -> Path:
        return key.folder(self.root) / f"seed{int(seed)}.safetensors"

    def image_path(self, key: TraceKey, seed: int) -> Path:
        return key.folder(self.root) / f"seed{int(seed)}.png"

    def missing_seeds(self, key: TraceKey, seeds: list[int]) -> list[int]:
        """Seeds without a trace; raises ValueError on a stored trace of another format version."""
        missing = []
        for seed in seeds:
            path = self.trace_path(key, seed)
            if path.exists():
                check_version(path)
            else:
                missing.append(seed)
        return missing

    def write(self, key: TraceKey, trace: Trace, image: torch.Tensor | np.ndarray) -> Path:
        seed = trace.meta["seed"]
        path = self.trace_path(key, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The image goes first: a trace on disk promises its image is there too.
        atomic_write(self.image_path(key, seed), lambda tmp: to_png(image).save(tmp, format="PNG"))
        arrays = {"delta_sq": trace.delta_sq, "latent": trace.latent}
        arrays |= {f"end_map/{k}": v for k, v in trace.end_maps.items()}
        arrays |= {f"token_attn/{k}": v for k, v in trace.token_attn.items()}
        arrays |= {f"token_map/{k}": v for k, v in trace.token_maps.items()}
        arrays |= {f"end_map@{step}/{k}": v for step, maps in trace.end_maps_by_step.items() for k, v in maps.items()}
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            arrays = {k: np.ascontiguousarray(v, dtype=self.dtype) for k, v in arrays.items()}
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                raise ValueError(f"trace {path}: non-finite values in {name} (overflow at {self.dtype}?)")
        meta = {"version": TRACE_VERSION, "end_index": str(trace.end_index), "meta": json.dumps(trace.meta)}
        atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=meta))
        return path

    def read(self, key: TraceKey, seed: int) -> Trace:
        """The stored trace; raises ValueError when it has another format version."""
        path = self.trace_path(key, seed)
        with safe_open(str(path), framework="np") as f:
            _check_version(path, f.metadata())
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            meta = f.metadata()
        pick = lambda prefix: {k.removeprefix(prefix): v.astype(np.float32)
                               for k, v in arrays.items() if k.startswith(prefix)}
        return Trace(
            delta_sq=arrays["delta_sq"].astype(np.float32),
            end_maps=pick("end_map/"),
            token_attn=pick("token_attn/"),
            end_index=int(meta["end_index"]),
            latent=arrays["latent"].astype(np.float32),
            meta=json.loads(meta["meta"]),
            token_maps=pick("token_map/"),
            end_maps_by_step=_maps_by_step(arrays),
        )

    def read_image(self, key: TraceKey, seed: int) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1]."""
        return np.asarray(Image.open(self.image_path(key, seed)).convert("RGB"), dtype=np.float32) / 255


def _maps_by_step(arrays: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        if name.startswith("end_map@"):
            step, layer = name.removeprefix("end_map@").split("/", 1)
            out.setdefault(int(step), {})[layer] = array.astype(np.float32)
    return dict(sorted(out.items()))


def check_version(path: Path) -> None:
    """Raise ValueError when the trace file at ``path`` is not of this code's format version."""
    with safe_open(str(path), framework="np") as f:
        _check_version(path, f.metadata())


def _check_version(path: Path, metadata: dict | None) -> None:
    version = (metadata or {}).get("version")
    if version != TRACE_VERSION:
        raise ValueError(f"trace {path} has format version {version!r}, this code reads version {TRACE_VERSION!r}: "
                         f"use another store (paths.store_dir) or delete {path.parent} to sample it again")


def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
