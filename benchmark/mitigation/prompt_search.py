"""PRSS (Chen et al., CVPR 2025): semantic prompt search (SS) and prompt re-anchoring (PR), with or without the BE
mask.

Chen et al., "Enhancing Privacy-Utility Trade-offs to Mitigate Memorization in Diffusion Models" (CVPR 2025),
official code ``chenchen-usyd/BE-PRSS``: ``inference_mem.py`` (flags ``--l_target_ss 1 --l_target_pr 3
--mag_thres_pr 5 --optim_target_steps 0``) and ``local_sd_pipeline.py`` (``aug_prompt_ss`` for the search,
``__call__`` with ``m_trigger`` for the re-anchoring).

- **Semantic search** at step ``target_step`` (0: the first): the text-guidance magnitude ``||eps_c - eps_u||``
  (with BE: ``||(eps_c - eps_u) * m|| / mean(m)``, ``embedding.magnitude_loss``) is evaluated for the prompt, then
  for each rephrasing in order; the first at or below ``l_target_ss`` is used (the prompt itself: no memorization
  detected, nothing else changes); when none is, the one of lowest magnitude. The search is "triggered" when the
  prompt itself is above the target.
- **Re-anchoring**, when triggered and ``l_target_pr`` is set, at every step: with the chosen (modified)
  embedding's prediction ``eps_m``, the original prompt's ``eps_o`` and ``g`` the guidance scale, while
  ``||eps_m - eps_u|| > l_target_pr``: ``eps = eps_o + s (eps_m - eps_o) + (g - s)(eps_m - eps_u)`` with
  ``s = min((mag - a) / (mag_thres_pr - a) * g, g)``, ``a = (g * l_target_pr - mag_thres_pr) / (g - 1)`` (s runs
  from 1 at ``l_target_pr``, where the step is plain guidance, to g at ``mag_thres_pr``); otherwise plain guidance
  with ``eps_m``. It costs one more conditional UNet evaluation per step (the official runs a second CFG batch).

The rephrasings come from a registered :data:`benchmark.registry.REPHRASERS` entry. The official search reads 25
per prompt from its data file (``sdv1_500_mem_groundtruth/*_withss.jsonl``, fields ``caption1`` ..
``caption25``), written beforehand by a language model the repository does not name: ``listed`` reads such a
file; the testbed plug-in registers ``testbed``, rephrasings its grammar allows.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import AfterValidator

from benchmark.core.config_types import Count, MaybeName, Name, NonNegative, Positive
from benchmark.mitigation.embedding import magnitude_loss, mask_at_latent_size
from benchmark.mitigation.interface import Intervention
from benchmark.registry import MITIGATIONS, REPHRASERS
from benchmark.sampling.capture import SamplingSetup, ddim_cfg_step, recording_paused, step_generators
from benchmark.store.job_folder import file_fingerprint


def _known_rephraser(name: str) -> str:
    if name not in REPHRASERS:
        raise ValueError(f"not a rephraser ({', '.join(REPHRASERS.names())})")
    return name


Rephraser = Annotated[Name, AfterValidator(_known_rephraser)]  # a registered REPHRASERS entry (a plug-in's too)
OFFICIAL_CANDIDATES = 25  # caption1 .. caption25 per prompt in the official data file


@dataclass(frozen=True)
class PRSSSettings:
    """The official knobs (inference_mem.py). ``l_target_ss``: the search's magnitude target, the strength (LOWER
    is stronger: more prompts are rephrased); ``l_target_pr``: the re-anchoring threshold (None: search only);
    ``mag_thres_pr``: the magnitude at which re-anchoring is full; ``target_step``: the step of the search
    (``--optim_target_steps``); ``rephraser`` / ``count``: where the rephrasings come from and how many."""

    l_target_ss: float = 1.0
    l_target_pr: float | None = 3.0
    mag_thres_pr: float = 5.0
    target_step: int = 0
    rephraser: str = "listed"
    count: int = OFFICIAL_CANDIDATES

    def __post_init__(self):
        if not self.l_target_ss >= 0:
            raise ValueError(f"mitigation prss: l_target_ss must be >= 0, got {self.l_target_ss}")
        if self.l_target_pr is not None and not 0 <= self.l_target_pr < self.mag_thres_pr:
            raise ValueError(f"mitigation prss: needs 0 <= l_target_pr < mag_thres_pr, got l_target_pr="
                             f"{self.l_target_pr}, mag_thres_pr={self.mag_thres_pr}")
        if self.target_step < 0 or self.count < 0:
            raise ValueError(f"mitigation prss: target_step and count must be >= 0, got {self.target_step}, "
                             f"{self.count}")
        if self.rephraser not in REPHRASERS:
            raise ValueError(f"mitigation prss: unknown rephraser {self.rephraser!r} (one of "
                             f"{', '.join(REPHRASERS.names())})")

    @property
    def tag(self) -> str:
        pr = "" if self.l_target_pr is None else f"-pr{self.l_target_pr:g}-{self.mag_thres_pr:g}"
        return f"prss-ss{self.l_target_ss:g}{pr}-s{self.target_step}-{self.rephraser}{self.count}"


@dataclass
class SearchResult:
    chosen: torch.Tensor  # (n,) index of the embedding each image uses: 0 the prompt, j the j-th rephrasing
    triggered: torch.Tensor  # (n,) bool: the prompt itself was above the target (re-anchoring applies)
    magnitudes: torch.Tensor  # (candidates, n) magnitudes evaluated; nan where the search had stopped
    evaluations: int  # conditional UNet evaluations the search took (per image: its candidates evaluated)


def semantic_search(magnitude: Callable[[int, torch.Tensor], torch.Tensor], candidates: int, n: int,
                    target: float) -> SearchResult:
    """The search over ``candidates`` embeddings (0 = the prompt) for ``n`` images at once: ``magnitude(j, rows)``
    gives (len(rows),) magnitudes of candidate j for the images ``rows`` still searching. An image stops at its first
    candidate at or below ``target``; an image for which none is takes its lowest (the first of equal ones, numpy's
    argmin). Source: local_sd_pipeline.py ``aug_prompt_ss``."""
    mags = torch.full((candidates, n), float("nan"))
    chosen = torch.full((n,), -1, dtype=torch.long)
    searching = torch.arange(n)
    evaluations = 0
    for j in range(candidates):
        if len(searching) == 0:
            break
        values = magnitude(j, searching).detach().float().cpu()
        evaluations += int(torch.isfinite(values).sum())  # a candidate an image lacks costs nothing
        mags[j, searching] = values
        done = values <= target
        chosen[searching[done]] = j
        searching = searching[~done]
    if len(searching):
        chosen[searching] = mags[:, searching].nan_to_num(float("inf")).argmin(0)
    return SearchResult(chosen, mags[0] > target, mags, evaluations)


def reanchored_eps(eps_u: torch.Tensor, eps_m: torch.Tensor, eps_o: torch.Tensor, guidance: float,
                   l_target_pr: float, mag_thres_pr: float) -> torch.Tensor:
    """PR's noise prediction (n, c, h, w) from the unconditional, modified-prompt and original-prompt predictions,
    per image (the official norm is over its batch of one prompt's images; one image per prompt in its commands).
    Source: local_sd_pipeline.py ``__call__`` (``m_trigger``, ``lp = 2``). Raises ValueError for guidance <= 1."""
    if guidance <= 1:
        raise ValueError(f"mitigation prss: re-anchoring needs guidance > 1, got {guidance}")
    mag = (eps_m - eps_u).flatten(1).float().norm(dim=1)
    scaler = (guidance * l_target_pr - mag_thres_pr) / (guidance - 1)
    s = ((mag - scaler) / (mag_thres_pr - scaler) * guidance).clamp(max=guidance).to(eps_m.dtype)
    s = s.view(-1, *([1] * (eps_m.dim() - 1)))
    anchored = eps_o + s * (eps_m - eps_o) + (guidance - s) * (eps_m - eps_u)
    plain = eps_u + guidance * (eps_m - eps_u)
    return torch.where((mag > l_target_pr).view_as(s), anchored, plain)


def guidance_magnitude(eps_u: torch.Tensor, eps_c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) the search's magnitude: ``||eps_c - eps_u||`` per image, with the BE mask (n, h, w) ``||(eps_c - eps_u)
    * m|| / mean(m)`` (local_sd_pipeline.py ``aug_prompt_ss``; the same per-image rule as Wen's and BE's loss)."""
    return magnitude_loss((eps_c - eps_u).float(), mask)


@dataclass
class Searched:
    embedding: torch.Tensor  # (n, tokens, dim) the embedding each image is sampled with
    original: torch.Tensor  # (n, tokens, dim) the prompt's own embedding (re-anchoring's anchor)
    prompts: list[str]  # the text each image uses (its prompt, or the chosen rephrasing)
    result: SearchResult


@torch.no_grad()
def search_embeddings(model, prompts: list[str], rephrasings: list[list[str]], latents: torch.Tensor,
                      t: torch.Tensor, settings: PRSSSettings, mask: torch.Tensor | None = None) -> Searched:
    """The semantic search for n images: ``prompts[i]`` and its ``rephrasings[i]``, ``latents`` (n, c, h, w) at the
    search step's timestep ``t`` (the sampler's latents after ``settings.target_step`` plain steps), BE's ``mask``
    (n, h, w) or None. A rephrasing an image lacks (shorter lists) is never chosen. One unconditional evaluation,
    then one conditional evaluation per image and candidate tried."""
    n = len(prompts)
    if len(rephrasings) != n or len(latents) != n:
        raise ValueError(f"mitigation prss: {n} prompts, {len(rephrasings)} rephrasing lists, {len(latents)} latents")
    texts = [[p, *r] for p, r in zip(prompts, rephrasings)]
    depth = max(len(x) for x in texts)
    distinct = {p: model.encode([p]) for p in dict.fromkeys(q for x in texts for q in x)}
    x = model.scheduler.scale_model_input(latents, t)
    eps_u = model.noise_prediction(x, t, model.encode([""]).expand(n, -1, -1))

    def magnitude(j: int, rows: torch.Tensor) -> torch.Tensor:
        has = [i for i in rows.tolist() if j < len(texts[i])]
        out = torch.full((len(rows),), float("inf"))
        if has:
            cond = torch.cat([distinct[texts[i][j]] for i in has])
            eps_c = model.noise_prediction(x[has], t, cond)
            values = guidance_magnitude(eps_u[has], eps_c, None if mask is None else mask[has]).cpu()
            out[[rows.tolist().index(i) for i in has]] = values
        return out

    result = semantic_search(magnitude, depth, n, settings.l_target_ss)
    chosen = [texts[i][j] for i, j in enumerate(result.chosen.tolist())]
    embedding = torch.cat([distinct[p] for p in chosen])
    original = torch.cat([distinct[p] for p in prompts])
    return Searched(embedding, original, chosen, result)


@lru_cache(maxsize=8)
def _listed_file(path: str) -> dict[str, list[str]]:
    out = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "caption" not in row:
            raise ValueError(f"rephraser listed: {path} line {number} has no 'caption'")
        out[row["caption"]] = [row[k] for k in (f"caption{j}" for j in range(1, len(row) + 1)) if k in row]
    return out


@REPHRASERS.register("none", label="no rephrasings: the search keeps the prompt, re-anchoring alone acts")
def no_rephrasings(prompt: str, count: int) -> list[str]:
    """No candidates: SS can only keep the prompt (triggered when it is above the target), so PRSS becomes
    re-anchoring alone, as the official does for a prompt whose data row lists no rephrasings."""
    return []


@REPHRASERS.register("listed", label="rephrasings listed in a JSONL file (the official data's format)")
def listed_rephrasings(prompt: str, count: int, file: str | None = None) -> list[str]:
    """The first ``count`` rephrasings of ``prompt`` in ``file``, a JSONL whose rows hold ``caption`` and
    ``caption1`` .. ``captionK`` (as the official ``*_withss.jsonl``); none for a prompt the file lacks. Raises
    ValueError without a file, FileNotFoundError for a missing one."""
    if file is None:
        raise ValueError("rephraser listed: needs file=<a JSONL of caption, caption1..captionK rows>")
    if not Path(file).is_file():
        raise FileNotFoundError(f"rephraser listed: no file {file}")
    return _listed_file(str(Path(file).resolve())).get(prompt, [])[:count]


def rephraser_knobs(name: str, file: str) -> dict:
    """The keyword arguments PRSS passes to rephraser ``name``: ``file`` to one that reads a file (``listed``).
    Raises ValueError naming the method when such a rephraser gets no file or a missing one."""
    if "file" not in inspect.signature(REPHRASERS[name].fn).parameters:
        return {}
    if not file or not Path(file).is_file():
        raise ValueError(f"rephraser {name} needs rephraser_file=<a JSONL of caption, caption1..captionK rows>, "
                         f"got {file!r}")
    return {"file": file}


def prss_intervention(settings: PRSSSettings, rephraser_file: str = "", with_mask: bool = False) -> Intervention:
    """PRSS for one sampling call. Before the loop (outside capture): each image's search from its initial noise,
    after ``target_step`` plain guided steps (:func:`search_embeddings`, with the call's BE mask when the method
    reads one); the images are then sampled from the same noise with the chosen embeddings. In the loop, when
    ``l_target_pr`` is set, the triggered images' steps are re-anchored (:func:`reanchored_eps`) on the original
    prompt's prediction at the step's latents (the guidance hook's ``latents``), one more conditional UNet
    evaluation per step that capture does not record. ``stats``: ``triggered``, ``chosen`` (0: the prompt itself)
    per image."""
    out = Intervention()
    state: dict = {}

    def check(model) -> None:
        rephraser_knobs(settings.rephraser, rephraser_file)

    def search(setup: SamplingSetup) -> torch.Tensor:
        model = setup.model
        if (setup.mask is None) == with_mask:
            raise ValueError(f"mitigation prss{'_be' if with_mask else ''}: {'needs' if with_mask else 'takes no'} "
                             "BE mask")
        knobs = rephraser_knobs(settings.rephraser, rephraser_file)
        rephrasings = [REPHRASERS[settings.rephraser](p, settings.count, **knobs) for p in setup.prompts]
        if settings.target_step >= len(setup.steps):
            raise ValueError(f"mitigation prss: target_step {settings.target_step} outside the {len(setup.steps)} "
                             "steps")
        latents = setup.latents
        generators = step_generators(setup.settings, setup.seeds, setup.prompt_index)  # fresh: the loop's stay
        for i in range(settings.target_step):
            latents, _ = ddim_cfg_step(model, latents, setup.steps[i], setup.timesteps[i], setup.context,
                                       setup.settings, generators)
        t = setup.timesteps[settings.target_step]
        mask = mask_at_latent_size(setup)
        found = search_embeddings(model, setup.prompts, rephrasings, latents, t, settings, mask)
        state["found"] = found
        out.stats["triggered"] = found.result.triggered.numpy().astype(np.float64)
        out.stats["chosen"] = found.result.chosen.numpy().astype(np.float64)
        return found.embedding

    def guidance(setup: SamplingSetup, step: int, t: int, latents: torch.Tensor, eps_u: torch.Tensor,
                 eps_c: torch.Tensor) -> torch.Tensor:
        g = setup.settings.guidance
        eps = eps_u + g * (eps_c - eps_u)
        found = state["found"]
        rows = found.result.triggered.nonzero().flatten().tolist()
        if settings.l_target_pr is None or not rows:
            return eps
        x = setup.model.scheduler.scale_model_input(latents[rows], t)
        with recording_paused(setup.model.unet):
            eps_o = setup.model.noise_prediction(x, torch.tensor(t, device=x.device),
                                                 found.original[rows].to(x.device, x.dtype))
        eps = eps.clone()
        eps[rows] = reanchored_eps(eps_u[rows], eps_c[rows], eps_o, g, settings.l_target_pr, settings.mag_thres_pr)
        return eps

    out.check = check
    out.embedding = search
    out.guidance = guidance
    return out


def _prss_tag(method: str) -> Callable[[dict], str]:
    def tag(knobs: dict) -> str:
        settings = PRSSSettings(**{k: v for k, v in knobs.items() if k != "rephraser_file"})
        file = knobs["rephraser_file"]
        digest = f"-f{file_fingerprint(file)}" if file and Path(file).is_file() else ""
        return f"{method}{settings.tag.removeprefix('prss')}{digest}"
    return tag


def _prss_factory(method: str, with_mask: bool) -> Callable[..., Intervention]:
    def factory(l_target_ss: NonNegative = 1.0, l_target_pr: NonNegative | None = 3.0, mag_thres_pr: Positive = 5.0,
                target_step: Count = 0, rephraser: Rephraser = "listed", rephraser_file: MaybeName = "",
                count: Count = OFFICIAL_CANDIDATES) -> Intervention:
        """PRSS with the official defaults (inference_mem.py README: --l_target_ss 1 --l_target_pr 3
        --mag_thres_pr 5 --optim_target_steps 0); ``l_target_pr`` None: the search alone."""
        return prss_intervention(PRSSSettings(l_target_ss, l_target_pr, mag_thres_pr, target_step, rephraser, count),
                                 rephraser_file, with_mask)
    factory.__name__ = factory.__qualname__ = method
    return factory


for _method, _label, _mask in (("prss", "PRSS (search + re-anchoring)", False),
                               ("prss_be", "PRSS + BE (masked magnitude)", True)):
    MITIGATIONS.register(_method, label=_label, acts_on="embedding", needs_mask=_mask, strength="l_target_ss",
                         stronger="lower", strengths=(1.0,), requires=("tokenizer", "text_encoder"),
                         tag=_prss_tag(_method))(_prss_factory(_method, _mask))
