"""Mitigations that change the initial noise: SAIL (Jeon et al., ICML 2025) and Han et al. (NeurIPS 2025).

**SAIL** (github.com/Dongjae0324/sharpness_memorization_diffusion, ``local_model/pipe.py`` mitigation block,
``mitigate_mem.py`` defaults, Algorithm 2 of arXiv:2412.04140): a budget of ``budget`` candidate initial latents is
optimised with Adam (lr 0.05, at most ``max_steps`` = 10 steps) on the proxy of the sharpness at x_T

    l(x) = ||eps_tilde(x + d) || + w ||x||,   eps_tilde = eps_c - eps_u at the first timestep,
    d = eps_tilde(x0) / ||eps_tilde(x0)||   (per candidate; x0 = the candidate as drawn this round),

w = 0.05 (SD v1; 0.01 for SD v2's v-prediction); a candidate whose loss is at or below the threshold
(``miti_thres`` 8.2) before a step is accepted; if a round ends without enough, the official code retries the same
candidates twice (identical: a no-op apart from cost) and then raises the threshold by 0.1 and draws new ones. The
direction ``d`` is evaluated at the round's starting candidates, not at the current ones: their pipeline feeds the
UNet a copy made before the loop (``lat_single``), as reproduced here; the gradient flows through it all the same.
be-bench's per-image protocol: each image draws its own ``budget`` candidates (from its own generator: the image's
seed mixed with a tag) and keeps the first one accepted (the lowest index among those accepted at the earliest
step); after ``max_steps`` without one, the threshold rises by 0.1 and new candidates are drawn (``max_rounds``
bounds this; then the lowest-loss candidate is kept). The official code pools one prompt's ``gen_num`` = 4 images in
one budget of 8 drawn from ``torch.manual_seed(gen_seed)``, the same candidates for every prompt.

**Han et al.** (github.com/hygnhan/init_noise_diffusion_memorization, ``local_sd_pipeline.py``,
``generate_images.py`` defaults):
- ``han_per_sample`` (``--per_sample --target_loss 0.9 --lr 0.01``, ``--optim_iters`` 1000): each image's initial
  latent is optimised with AdamW on ``||eps_c - eps_u||`` at the first timestep, stopping once the loss is at or
  below the target (checked before each step); then sampled with plain CFG;
- ``han_batch_wise`` (``--batch_wise --rho 50 --gamma 0.7 --adj_iters 2 --apply_cfg_step 4``): ``adj_iters``
  times, ``x <- x - gamma (eps_tilde(x + rho eps_tilde(x) / ||eps_tilde(x)||) - eps_tilde(x))`` (norms per
  image); then steps 0..apply_cfg_step (0-based, inclusive) use the unconditional prediction alone and the rest
  plain CFG. Despite its name every image is adjusted on its own.
The optimised latents are kept in float32 (master copy) and cast to the model's dtype for the UNet; theirs are in
the pipeline's dtype (bfloat16), the same on a float32 model.
"""
from __future__ import annotations

import numpy as np
import torch

from benchmark.core.config_types import Count, NonNegative, Positive, PositiveInt
from benchmark.mitigation.interface import Intervention
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import SamplingSetup, guided_eps

CANDIDATE_TAG = 0x5A11_CA4D  # mixed into an image's seed for SAIL's candidates: no image's initial noise


def guidance_difference(setup: SamplingSetup, latents: torch.Tensor, t: torch.Tensor, rows: slice | None = None
                        ) -> torch.Tensor:
    """``eps_c - eps_u`` (m, c, h, w) of ``latents`` at timestep ``t`` (one CFG batch through the sampler's UNet
    call), with the text conditioning of the setup's images ``rows`` (None: all; else matching ``latents``), in
    float32; differentiable."""
    rows = rows if rows is not None else slice(None)
    context = torch.cat([setup.uncond[rows], setup.cond[rows]])
    model = setup.model
    x = model.scheduler.scale_model_input(latents.to(model.dtype), t)
    eps_u, eps_c = guided_eps(model, x, t, context)
    return (eps_c - eps_u).float()


def per_image_norm(x: torch.Tensor) -> torch.Tensor:
    """(n,) L2 norm of each image of ``x`` (n, ...)."""
    return x.flatten(1).norm(dim=1)


# ------------------------------------------------------------------------------------------------- SAIL

def sail_loss(difference_at_perturbed: torch.Tensor, latents: torch.Tensor, weight: float) -> torch.Tensor:
    """SAIL's Algorithm 2 proxy per candidate (n,): ``||eps_tilde(x + d)|| + weight * ||x||``."""
    return per_image_norm(difference_at_perturbed) + weight * per_image_norm(latents.float())


def candidate_generator(seed: int, round_: int) -> torch.Generator:
    """The CPU generator of an image's SAIL candidates in round ``round_``: its seed mixed with a tag (numpy
    SeedSequence), so candidates are never the image's own initial noise."""
    state = np.random.SeedSequence([CANDIDATE_TAG, int(seed) % 2**64, round_]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def sail_latent(setup: SamplingSetup, row: int, threshold: float, lr: float, budget: int, max_steps: int,
                weight: float, max_rounds: int) -> tuple[torch.Tensor, dict]:
    """The SAIL-initialised latent (c, h, w) of image ``row`` and its stats (loss of the accepted candidate at
    acceptance, the first round's first loss, optimiser steps over all rounds, rounds, final threshold)."""
    t = setup.timesteps[0]
    shape = setup.latents.shape[1:]
    rows = slice(row, row + 1)
    one = SamplingSetup(setup.model, setup.prompts[rows], setup.seeds[rows], setup.settings, None,
                        setup.cond[rows].expand(budget, -1, -1), setup.uncond[rows].expand(budget, -1, -1),
                        setup.latents[rows], None, setup.steps, setup.timesteps, setup.end_index[rows])
    steps_total, first_loss, best = 0, None, (np.inf, None)
    for round_ in range(max_rounds):
        lat = torch.randn((budget, *shape), generator=candidate_generator(setup.seeds[row], round_))
        lat = lat.to(setup.model.device).requires_grad_(True)
        start = lat.detach().clone()
        optimizer = torch.optim.Adam([lat], lr=lr)
        for _ in range(max_steps):
            # the direction at the round's starting candidates, the gradient through them (as the official code)
            direction = guidance_difference(one, start + (lat - lat.detach()), t)
            direction = direction / per_image_norm(direction)[:, None, None, None]
            loss = sail_loss(guidance_difference(one, lat + direction, t), lat, weight)
            first_loss = float(loss[0].detach()) if first_loss is None else first_loss
            values = loss.detach()
            if float(values.min()) < best[0]:
                best = (float(values.min()), lat.detach()[int(values.argmin())].clone())
            accepted = torch.nonzero(values <= threshold).flatten()
            if len(accepted):
                return lat.detach()[int(accepted[0])].clone(), {
                    "loss_first": first_loss, "loss_last": float(values[int(accepted[0])]),
                    "iterations": steps_total, "rounds": round_ + 1, "threshold": threshold}
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            steps_total += 1
        threshold += 0.1  # the official rise (after its two identical retries, skipped here)
    return best[1], {"loss_first": first_loss, "loss_last": best[0], "iterations": steps_total,
                     "rounds": max_rounds, "threshold": threshold}


@MITIGATIONS.register("sail", label="SAIL (sharpness-aware initial noise)", acts_on="latents", needs_mask=False,
                      strength="threshold", stronger="lower", strengths=(8.2,))
def sail(threshold: Positive, lr: Positive = 0.05, budget: PositiveInt = 8, max_steps: PositiveInt = 10,
         gaussianity: NonNegative = 0.05, max_rounds: PositiveInt = 30) -> Intervention:
    """SAIL's mitigation: each image's initial latent replaced by its first accepted candidate (module docstring).
    ``threshold``: SAIL's l_thres (``--miti_thres``, 8.2 on SD v1-4; the scale is the model's), lower = stronger;
    ``gaussianity``: the weight of ``||x||`` (0.05 on SD v1, 0.01 on SD v2)."""
    intervention = Intervention()

    def latents(setup: SamplingSetup) -> torch.Tensor:
        out, stats = [], []
        with torch.enable_grad():
            for row in range(setup.n):
                latent, info = sail_latent(setup, row, threshold, lr, budget, max_steps, gaussianity, max_rounds)
                out.append(latent)
                stats.append(info)
        intervention.stats = {k: np.array([s[k] for s in stats], dtype=float) for k in stats[0]}
        return torch.stack(out) * setup.model.scheduler.init_noise_sigma

    intervention.latents = latents
    return intervention


# ----------------------------------------------------------------------------------------------- Han et al.

def han_per_sample_latents(setup: SamplingSetup, target_loss: float, lr: float, max_iters: int
                           ) -> tuple[torch.Tensor, dict]:
    """Han et al.'s per-sample adjustment of every image's initial latent (n, c, h, w); each image optimised on
    its own (AdamW on ``||eps_c - eps_u||`` at the first timestep, stop at or below ``target_loss``)."""
    t = setup.timesteps[0]
    out, stats = [], {"loss_first": [], "loss_last": [], "iterations": []}
    for row in range(setup.n):
        lat = setup.latents[row:row + 1].detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([lat], lr=lr)
        losses, steps = [], 0
        for _ in range(max_iters):
            loss = per_image_norm(guidance_difference(setup, lat, t, slice(row, row + 1)))[0]
            losses.append(float(loss.detach()))
            if losses[-1] <= target_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        out.append(lat.detach()[0])
        stats["loss_first"].append(losses[0] if losses else np.nan)
        stats["loss_last"].append(losses[-1] if losses else np.nan)
        stats["iterations"].append(steps)
    return torch.stack(out), {k: np.array(v, dtype=float) for k, v in stats.items()}


@MITIGATIONS.register("han_per_sample", label="Han et al. (per-sample noise)", acts_on="latents",
                      needs_mask=False, strength="target_loss", stronger="lower", strengths=(0.9,))
def han_per_sample(target_loss: NonNegative, lr: Positive = 0.01, max_iters: Count = 1000) -> Intervention:
    """Han et al.'s per-sample mitigation (``--target_loss`` 0.9 on SD v1-4: the scale is the model's)."""
    intervention = Intervention()

    def latents(setup: SamplingSetup) -> torch.Tensor:
        with torch.enable_grad():
            out, intervention.stats = han_per_sample_latents(setup, target_loss, lr, max_iters)
        return out

    intervention.latents = latents
    return intervention


def han_batch_wise_latents(setup: SamplingSetup, rho: float, gamma: float, adj_iters: int) -> torch.Tensor:
    """Han et al.'s batch-wise adjustment (n, c, h, w): ``adj_iters`` sharpness steps of size ``gamma`` with
    perturbation radius ``rho``, every image on its own."""
    t = setup.timesteps[0]
    lat = setup.latents.float()
    for _ in range(adj_iters):
        eps = guidance_difference(setup, lat, t)
        perturbed = guidance_difference(setup, lat + rho * eps / per_image_norm(eps)[:, None, None, None], t)
        lat = lat - gamma * (perturbed - eps)
    return lat


@MITIGATIONS.register("han_batch_wise", label="Han et al. (batch-wise noise, delayed CFG)", acts_on="latents",
                      needs_mask=False, strength="gamma", stronger="higher", strengths=(0.7,))
def han_batch_wise(gamma: NonNegative, rho: NonNegative = 50.0, adj_iters: Count = 2,
                   apply_cfg_step: int = 4) -> Intervention:
    """Han et al.'s batch-wise mitigation: the initial latents adjusted, then guidance from step
    ``apply_cfg_step + 1`` on (0-based; -1 = from the first step). ``gamma``: the adjustment's step size (0.7),
    our choice of strength axis (the paper fixes it)."""
    if apply_cfg_step < -1:
        raise ValueError(f"han_batch_wise: apply_cfg_step must be >= -1, got {apply_cfg_step}")

    def latents(setup: SamplingSetup) -> torch.Tensor:
        return han_batch_wise_latents(setup, rho, gamma, adj_iters)

    def guidance(setup: SamplingSetup, step: int, t, latents, eps_uncond: torch.Tensor, eps_cond: torch.Tensor):
        if step <= apply_cfg_step:
            return eps_uncond
        return eps_uncond + setup.settings.guidance * (eps_cond - eps_uncond)

    return Intervention(latents=latents, guidance=guidance)
