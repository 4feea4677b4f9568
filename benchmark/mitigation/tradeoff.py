"""Privacy vs utility of mitigation: regenerate prompts under each method and target loss, and measure.

Every generation (unmitigated baseline included) is a stored trace + image, keyed by a sampler name that carries
the mitigation setting, so a rerun samples nothing twice. Measures per generation:
- similarity to the prompt's training image, where known: ``S``, ``LS`` (with the generation's own BE mask),
  ``train_rmse`` (RMSE on [0, 1], inside the planted region for local memorization), ``SSCD`` when configured;
- utility: ``CLIP`` score when configured; ``caption_rmse``: RMSE to the scene the caption names, where a registered
  caption renderer can draw it (the testbed's data recipe; lower = more faithful), which needs no downloaded network.
Methods: Wen's and BE's optimisation (benchmark/mitigation/embedding.py; strength = target loss, lower is stronger)
and Kim & No's padding mitigations (benchmark/mitigation/padding.py; strength = masked fraction, higher is stronger),
both in the ``target_loss`` column.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from benchmark.detectors import scores
from benchmark.detectors.detection import Generation, generate
from benchmark.localization.evaluation import Truth, rmse
from benchmark.measures.similarity import SSCD, CLIPScore, pixel_LS, pixel_S
from benchmark.mitigation.embedding import MitigationSettings, latent_mask, mitigate
from benchmark.mitigation.padding import PadMitigation, pad_mitigated_embedding, replacement_id
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import CAPTION_RENDERERS, MITIGATIONS
from benchmark.sampling.capture import SamplerSettings, cross_attention_layers, sample_with_capture
from benchmark.sampling.missing import mitigation_suffix, sample_missing
from benchmark.store.traces import TraceKey, TraceStore, traces_from_batch

BASELINE = "none"


@dataclass
class Measures:
    mask_layers: list[str]  # the layer set of BE masks (mitigation loss and LS)
    sscd: SSCD | None = None
    clip: CLIPScore | None = None


def mitigated_key(key: TraceKey, settings: MitigationSettings | PadMitigation,
                  mask_layers: list[str] | None = None) -> TraceKey:
    """The baseline key with the mitigation setting added to its sampler (``sampling.sampler_key``'s format);
    ``mask_layers`` None = every cross-attention layer (the default keeps the keys of earlier stores)."""
    return replace(key, sampler=key.sampler + mitigation_suffix(settings, mask_layers))


def run_mitigation(model: TextToImage, baseline: list[Generation], sampler: SamplerSettings, store: TraceStore,
                   settings: list[MitigationSettings | PadMitigation], layers: list[str], batch_size: int = 8,
                   progress: Callable[[Iterable], Iterable] = iter) -> int:
    """Sample every missing baseline and mitigated generation; return how many images were sampled now.

    Mitigated generations are sampled one prompt per batch: with ``mask_norm="batch"`` a result depends on the
    images optimised together, and those stay the seeds of one prompt, as before."""
    for mit in settings:  # a replacement token the model lacks fails before any sampling
        if isinstance(mit, PadMitigation) and mit.replaces_pad:
            replacement_id(model, mit.token)
    sampled = generate(model, baseline, sampler, store, batch_size, progress)
    mask_layers = mask_key_layers(model, layers)
    for mit in settings:
        mitigated = [replace(gen, key=mitigated_key(gen.key, mit, mask_layers)) for gen in baseline]
        base_key = {m.key: gen.key for m, gen in zip(mitigated, baseline)}

        def sample_batch(items, mit=mit, base_key=base_key):
            gen, seeds = items[0][0], [seed for _, seed in items]
            mask = None
            if MITIGATIONS[mit.method].needs_mask:  # the unmitigated generation's mask, same seed: no extra pass
                traces = [store.read(base_key[gen.key], s) for s in seeds]
                maps = {k: np.stack([t.end_maps[k] for t in traces]) for k in traces[0].end_maps}
                mask = latent_mask(maps, layers, traces[0].delta_sq.shape[-2:])
            if isinstance(mit, PadMitigation):  # Kim & No: a changed embedding, nothing optimised
                cond = pad_mitigated_embedding(model, [gen.prompt.text], mit).expand(len(seeds), -1, -1)
                batch, opt = sample_with_capture(model, gen.prompt.text, seeds, sampler, cond=cond,
                                                 prompt_index=gen.index), None
            else:
                batch, opt = mitigate(model, gen.prompt.text, seeds, sampler, mit, mask, gen.index)
            meta = {"prompt_id": gen.prompt.id, "prompt": gen.prompt.text, "model": gen.key.model,
                    "sampler": asdict(sampler), "prompt_set": gen.key.prompt_set, "mitigation": asdict(mit),
                    "mask_layers": list(layers) if MITIGATIONS[mit.method].needs_mask else None}
            traces = traces_from_batch(batch, meta, seeds)
            for i, trace in enumerate(traces):
                losses = opt.losses[:, i] if opt else []
                trace.meta |= {"loss_first": float(losses[0]) if len(losses) else None,
                               "loss_last": float(losses[-1]) if len(losses) else None,
                               "iterations": int(opt.iterations[i]) if opt else 0}
            return list(zip(traces, batch.images))

        # the official protocol shares one embedding by the prompt's whole batch: it is mitigated at once
        sampled += sample_missing(store, mitigated, sample_batch, batch_size, progress, across_prompts=False,
                                  whole_prompt=getattr(mit, "protocol", None) == "official")
    return sampled


def mask_key_layers(model: TextToImage, layers: list[str]) -> list[str] | None:
    """The BE-mask layers as the store key needs them: None when they are every cross-attention layer."""
    return None if sorted(layers) == sorted(cross_attention_layers(model.unet)) else list(layers)


def measure(image: np.ndarray, prompt: str, end_maps: dict[str, np.ndarray], truth: Truth | None,
            measures: Measures) -> dict:
    """Every available measure of one generation ((3, H, W) in [0, 1])."""
    out = {}
    if truth is not None:
        mask = scores.be_mask({k: v[None] for k, v in end_maps.items()}, measures.mask_layers, image.shape[-2:])[0]
        out |= {"S": pixel_S(image, truth.image), "LS": pixel_LS(image, truth.image, mask),
                "train_rmse": rmse(image, truth.image, truth.mask)}
        if measures.sscd is not None:
            out["SSCD"] = float(measures.sscd.similarity(image[None], truth.image[None])[0])
    if measures.clip is not None:
        out["CLIP"] = float(measures.clip.score(image[None], [prompt])[0])
    for renderer in CAPTION_RENDERERS.entries():
        try:
            out["caption_rmse"] = rmse(image, renderer(prompt, image.shape[-1]))
            break
        except ValueError:
            pass  # a caption this renderer does not describe
    return out


def measure_all(store: TraceStore, baseline: list[Generation], settings: list[MitigationSettings | PadMitigation],
                truth: dict[str, Truth], measures: Measures, mask_layers: list[str] | None = None) -> pd.DataFrame:
    """One row per (method, target loss, prompt, seed), the unmitigated baseline as method ``none``;
    ``mask_layers`` as in :func:`mitigated_key` (``mask_key_layers``)."""
    rows = []
    for mit in [None] + list(settings):
        for gen in baseline:
            key = gen.key if mit is None else mitigated_key(gen.key, mit, mask_layers)
            for seed in gen.seeds:
                trace = store.read(key, seed)
                image = store.read_image(key, seed).transpose(2, 0, 1)
                rows.append({
                    "method": BASELINE if mit is None else mit.method,
                    "target_loss": np.nan if mit is None else mit.target_loss,
                    "prompt_id": gen.prompt.id, "kind": gen.prompt.kind, "seed": seed,
                    "D1": float(np.sqrt(trace.delta_sq[0].sum())),
                    "iterations": trace.meta.get("iterations", 0),
                    **measure(image, gen.prompt.text, trace.end_maps, truth.get(gen.prompt.id), measures)})
    return pd.DataFrame(rows)


def curves(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean of every measure per (kind, method, target loss): the points of the trade-off curves."""
    measures = [c for c in rows.columns if c not in ("method", "target_loss", "prompt_id", "kind", "seed")]
    table = rows.assign(target_loss=rows.target_loss.fillna(-1))
    out = table.groupby(["kind", "method", "target_loss"])[measures].mean().reset_index()
    out["n"] = table.groupby(["kind", "method", "target_loss"]).size().to_numpy()
    out["target_loss"] = out.target_loss.where(out.target_loss >= 0)
    return out


def at_equal_utility(points: pd.DataFrame, utility: str, similarity: str, methods: tuple[str, str] = ("wen", "be"),
                     n: int = 5) -> pd.DataFrame:
    """Each method's similarity at ``n`` utility levels both curves reach, interpolated linearly along each curve
    (baseline point included, sorted by utility); ``difference`` = second method minus first."""
    rows = []
    for kind, group in points.groupby("kind"):
        base = group[group.method == BASELINE]
        lines = {}
        for m in methods:
            curve = pd.concat([base, group[group.method == m]]).dropna(subset=[utility, similarity])
            if len(curve) < 2:
                break
            curve = curve.sort_values(utility, kind="stable")  # equal utilities: in the points' order
            lines[m] = (curve[utility].to_numpy(), curve[similarity].to_numpy())
        if len(lines) < 2:
            continue
        lo = max(x.min() for x, _ in lines.values())
        hi = min(x.max() for x, _ in lines.values())
        if lo >= hi:
            continue
        for u in np.linspace(lo, hi, n):
            row = {"kind": kind, utility: u}
            for m, (x, y) in lines.items():
                row[m] = float(np.interp(u, x, y))
            row["difference"] = row[methods[1]] - row[methods[0]]
            rows.append(row)
    return pd.DataFrame(rows)
