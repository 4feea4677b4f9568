"""The store keys of a job's generations: the model part and the sampler part (``benchmark.store.traces.TraceKey``)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from benchmark.models.text_to_image import weights_fingerprint
from benchmark.store.job_folder import path_fingerprint

COMPONENTS = ("text_encoder", "tokenizer", "scheduler", "vae")  # a pipeline folder's parts besides the UNet


def model_key(name: str, source: str) -> str:
    """The model's name in the trace store: its config name, plus for a local folder the fingerprints of what makes
    an image there: the UNet (config, weight sizes, first MiB) and every other component folder (text encoder,
    tokenizer, scheduler, VAE; content hashes), so that retrained or swapped parts never reuse another model's
    traces. Call after the model is loaded (or built)."""
    fingerprint = weights_fingerprint(source)
    if not fingerprint:
        return name
    folder = Path(source).expanduser()
    parts = [f"{c}={path_fingerprint(folder / c)}" for c in COMPONENTS if (folder / c).is_dir()]
    rest = hashlib.sha1(";".join(parts).encode()).hexdigest()[:8] if parts else ""
    return f"{name}@{fingerprint}" + (f"+{rest}" if rest else "")


def trace_sampler_key(sampler_key: str, store_dtype: str) -> str:
    """A sampler's store key with the storage precision of its traces, where it is not the default float16: the
    same sampling stored at another precision is another result."""
    return sampler_key if store_dtype == "float16" else f"{sampler_key}-store{store_dtype}"
