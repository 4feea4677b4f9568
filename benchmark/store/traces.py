"""The trace store: one file per generated image, keyed by model, sampler settings, prompt set, prompt and seed.

Layout: ``root/<model>/<sampler>/<prompt set>/<prompt id>-<prompt hash>/seed<seed>.safetensors`` with the image beside
it as ``seed<seed>.png``. Files are written to a temporary name and renamed, so a killed job leaves either a whole
trace or none; a trace on disk is never sampled again.

Every file carries its format version (``TRACE_VERSION``, in the safetensors metadata). A trace of another version
is refused, by ``read`` and by ``missing_seeds`` (so before any sampling), with a message naming the file: it is
neither mixed into the scores nor silently overwritten. Bump the version when the meaning of a stored array changes;
an added optional array (``end_map@<step>/``) needs no bump, since a reader that does not know it never reads it.

A damaged file (cut short by a copy or sync, its header unreadable, a PNG without its end chunk) is never served:
``missing_seeds`` moves it aside to ``<name>.damaged``, prints one line naming it, and counts its seed as missing,
so it is sampled again. The check reads a trace's header only (safetensors refuses a header that does not cover the
whole file) and a PNG's first and last bytes, so a valid store costs no extra full read. ``read`` and
``read_image`` move aside what they cannot read too, and raise naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

if TYPE_CHECKING:  # a type only: the store sits below sampling
    from benchmark.sampling.capture import CapturedBatch


TRACE_VERSION = "1"
DAMAGED = ".damaged"  # the suffix a damaged store file is moved aside to
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every whole PNG ends with


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
    # the prompt's position in its whole set, where its noise depends on it (official seeding): a reordered set
    # under the same name then never reuses another position's traces
    position: int | None = None

    def folder(self, root: Path) -> Path:
        at = "" if self.position is None else f"-at{self.position}"
        return (root / slug(self.model) / slug(self.sampler) / slug(self.prompt_set)
                / f"{slug(self.prompt_id)}-{prompt_hash(self.prompt)}{at}")


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
        """Seeds without a whole trace and image; a damaged one is moved aside (``set_aside``) and counted missing.
        Raises ValueError on a stored trace of another format version."""
        missing = []
        for seed in seeds:
            path = self.trace_path(key, seed)
            if not (readable(path, lambda meta, p=path: _check_version(p, meta))
                    and png_whole(self.image_path(key, seed))):
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
        """The stored trace; raises ValueError when it has another format version, or when it cannot be read (then
        it is moved aside, ``set_aside``, and the next run samples it again)."""
        path = self.trace_path(key, seed)
        try:
            with safe_open(str(path), framework="np") as f:
                _check_version(path, f.metadata())
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
                meta = f.metadata()
        except SafetensorError as err:
            raise ValueError(set_aside(path, err)) from None

        def pick(prefix: str) -> dict[str, np.ndarray]:
            return {k.removeprefix(prefix): v.astype(np.float32) for k, v in arrays.items() if k.startswith(prefix)}

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
        """(H, W, 3) float32 in [0, 1]. Raises FileNotFoundError when missing, ValueError when it cannot be read
        (then it is moved aside, ``set_aside``, and the next run samples it again)."""
        path = self.image_path(key, seed)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        except FileNotFoundError:
            raise
        except (OSError, SyntaxError) as err:  # PIL: truncated data, unidentified file, broken chunk
            raise ValueError(set_aside(path, err)) from None


def _maps_by_step(arrays: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        if name.startswith("end_map@"):
            step, layer = name.removeprefix("end_map@").split("/", 1)
            out.setdefault(int(step), {})[layer] = array.astype(np.float32)
    return dict(sorted(out.items()))


def set_aside(path: Path, err: Exception, again: str = "resampled") -> str:
    """Move a damaged store file to ``<name>.damaged`` (replacing an earlier one) so that it is never read again and
    its value is made ``again`` (a trace or PNG resampled, an extra-pass sidecar recomputed); return the one line
    that says so."""
    aside = path.with_name(path.name + DAMAGED)
    os.replace(path, aside)
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"damaged store file {path} ({reason}): moved aside to {aside.name}, it will be {again}"


def readable(path: Path, check=None, again: str = "resampled") -> bool:
    """Whether the safetensors file at ``path`` is there and whole: its header parses and covers the whole file
    (only the header is read). A damaged file is moved aside (``set_aside``, one line printed) and counts as
    missing. ``check(metadata)`` then runs on a whole file's metadata (its errors are raised: a file of another
    format version is not damaged, and is not moved)."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata()
    except SafetensorError as err:
        print(set_aside(path, err, again))
        return False
    if check is not None:
        check(metadata)
    return True


def png_whole(path: Path) -> bool:
    """Whether the PNG at ``path`` is there and whole (its signature and end chunk, 20 bytes read). A damaged one
    is moved aside (``set_aside``, one line printed) and counts as missing."""
    if not path.exists():
        return False
    with open(path, "rb") as f:
        head = f.read(len(PNG_SIGNATURE))
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - len(PNG_END)))
        tail = f.read()
    if head == PNG_SIGNATURE and tail == PNG_END and size > len(head) + len(tail):
        return True
    print(set_aside(path, ValueError("not a whole PNG: cut short or overwritten")))
    return False


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
