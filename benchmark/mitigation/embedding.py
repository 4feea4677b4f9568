"""Inference-time mitigation: Wen et al.'s prompt-embedding optimisation, plain or with the BE mask in the loss.

At the first denoising step the conditional prompt embedding is optimised with AdamW to lower the text-guidance
magnitude ``||eps_cond - eps_uncond||`` (BE: the mask-weighted ``||(eps_cond - eps_uncond) * m|| / mean(m)``), at most
``max_iters`` iterations, stopping once the loss is at or below the target; the BOS token's gradient is zeroed. The
image is then sampled from the same seed with the optimised embedding.

Two protocols (docs/protocols.md):
- ``per_image`` (default): each generation gets its own embedding and its own early stop, so a result depends on its
  seed alone, not on the batch it was computed in; the BOS token is restored after every step.
- ``official``: as Wen et al.'s ``local_sd_pipeline.py`` (``aug_prompt``) and BE's copy of it: ONE embedding shared
  by the prompt's n images (n = 4 by their scripts' default), the loss the norm over the whole batch (the
  root-sum-square of the per-image norms; BE divides by the batch's mask mean), one early stop for the batch; the
  start token's gradient is zeroed but the token is not restored, so AdamW's weight decay shrinks it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.detectors.scores import be_mask
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import CapturedBatch, SamplerSettings, initial_noise, sample_with_capture

MASK_NORMS = ("per_image", "batch")
PROTOCOLS = ("per_image", "official")
OFFICIAL_N_IMAGES = 4  # --num_images_per_prompt default of Wen's inference_mem.py (and BE's)


@dataclass(frozen=True)
class MitigationSettings:
    method: str  # "wen" (plain magnitude) or "be" (BE-masked magnitude)
    target_loss: float
    lr: float = 0.05
    max_iters: int = 10
    # "per_image" divides each image's masked norm by its own mask mean, as BE's detection does; "batch" divides by
    # one mean over the masks optimised together (a prompt's batch), as BE's released mitigation code does, so that
    # a result then depends on its batch.
    mask_norm: str = "per_image"
    # "per_image" (be-bench) or "official" (one shared embedding, batch loss; mask_norm is then the batch's, as BE's)
    protocol: str = "per_image"

    def __post_init__(self):
        optimised = [name for name in MITIGATIONS if MITIGATIONS[name].optimised]
        if self.method not in optimised:
            others = ", ".join(n for n in MITIGATIONS if n not in optimised)
            raise ValueError(f"unknown mitigation method {self.method!r} for embedding optimisation; choose from "
                             f"{', '.join(optimised)} (other mitigations: {others})")
        if self.mask_norm not in MASK_NORMS:
            raise ValueError(f"unknown mask_norm {self.mask_norm!r}; choose from {', '.join(MASK_NORMS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown mitigation protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}")
        if not (self.target_loss >= 0 and self.lr > 0 and self.max_iters >= 0):
            raise ValueError(f"mitigation needs target_loss >= 0, lr > 0, max_iters >= 0: {self}")

    @property
    def tag(self) -> str:
        """The store-key part; the protocol appears when not the default, so existing stores keep their keys."""
        if self.protocol == "official":
            return f"{self.method}-official-l{self.target_loss:g}-lr{self.lr:g}-it{self.max_iters}"
        norm = "" if not MITIGATIONS[self.method].needs_mask or self.mask_norm == "per_image" else "-batchnorm"
        return f"{self.method}{norm}-l{self.target_loss:g}-lr{self.lr:g}-it{self.max_iters}"


@MITIGATIONS.register("be", label="BE (masked magnitude)", needs_mask=True, optimised=True)
# the lower decorator registers first
@MITIGATIONS.register("wen", label="Wen (magnitude)", needs_mask=False, optimised=True)
def magnitude_loss(delta: torch.Tensor, mask: torch.Tensor | None = None, mask_norm: str = "per_image") -> torch.Tensor:
    """Per image (n,): ``||delta||`` or ``||delta * m|| / mean(m)``; delta (n, c, h, w), mask (n, h, w)."""
    if mask is None:
        return delta.flatten(1).norm(dim=1)
    weighted = (delta * mask[:, None]).flatten(1).norm(dim=1)
    mean = mask.flatten(1).mean(1) if mask_norm == "per_image" else mask.mean().expand(len(mask))
    return weighted / mean


def batch_loss(delta: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The official loss, a scalar: ``||delta||`` over the whole batch (Wen: ``torch.norm(noise_pred_text)``), or
    ``||delta * m|| / mean(m)`` with both over the batch (BE's ``local_sd_pipeline.py``); delta (n, c, h, w), mask
    (n, h, w). Without a mask it is the root-sum-square of ``magnitude_loss``'s per-image norms."""
    if mask is None:
        return delta.flatten().norm()
    return (delta * mask[:, None]).flatten().norm() / mask.mean()


@dataclass
class Optimised:
    embedding: torch.Tensor  # (n, tokens, dim)
    losses: torch.Tensor  # (iterations evaluated, n): the loss of each image before each step (official: the batch's)
    iterations: torch.Tensor  # (n,) optimiser steps each image took


def optimise_embedding(model: TextToImage, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor,
                       t: torch.Tensor, settings: MitigationSettings, mask: torch.Tensor | None = None) -> Optimised:
    """Wen's loop on a batch of independent images; ``cond``/``uncond`` (n, tokens, dim), ``latents`` at step ``t``."""
    x = model.scheduler.scale_model_input(latents, t)
    with torch.no_grad():
        eps_uncond = model.noise_prediction(x, t, uncond)
    bos = cond[:, :1].detach().float()
    emb = cond.detach().float().clone().requires_grad_(True)  # a float32 master copy: fp16 loses AdamW steps
    optimizer = torch.optim.AdamW([emb], lr=settings.lr)
    final = emb.detach().clone()
    active = torch.ones(len(emb), dtype=torch.bool, device=emb.device)
    steps = torch.zeros(len(emb), dtype=torch.long)
    history = []
    for _ in range(settings.max_iters):
        eps_cond = model.noise_prediction(x, t, emb.to(model.dtype))
        losses = magnitude_loss((eps_cond - eps_uncond).float(), mask, settings.mask_norm)
        history.append(losses.detach().float().cpu())
        stop = active & (losses.detach() <= settings.target_loss)
        final[stop] = emb.detach()[stop]  # an image that reached its target keeps this embedding
        active &= ~stop
        if not active.any():
            break
        (grad,) = torch.autograd.grad(losses[active].sum(), emb)  # images are independent: the sum splits
        grad[:, 0] = 0  # the BOS token stays as it is (Wen)
        emb.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            emb[:, :1] = bos  # AdamW's weight decay would still shrink it
        steps[active.cpu()] += 1
    final[active] = emb.detach()[active]
    return Optimised(final, torch.stack(history) if history else torch.empty(0, len(emb)), steps)


def optimise_shared_embedding(model: TextToImage, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor,
                              t: torch.Tensor, settings: MitigationSettings,
                              mask: torch.Tensor | None = None) -> Optimised:
    """The official loop (Wen's ``aug_prompt``): one embedding, ``cond[:1]``, shared by the n latents at step ``t``.

    Before each AdamW step the batch loss is evaluated and the loop stops once it is at or below the target; the
    start token's gradient is zeroed and the token is left to weight decay. The embedding is optimised in the
    model's dtype, as theirs (the pipeline's); the loss is taken in float32. Returns the embedding repeated n times.
    """
    n = len(latents)
    x = model.scheduler.scale_model_input(latents, t)
    with torch.no_grad():
        eps_uncond = model.noise_prediction(x, t, uncond)
    emb = cond[:1].detach().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([emb], lr=settings.lr)
    history, steps = [], 0
    for _ in range(settings.max_iters):
        eps_cond = model.noise_prediction(x, t, emb.expand(n, -1, -1))
        loss = batch_loss((eps_cond - eps_uncond).float(), mask)
        history.append(float(loss.detach()))
        if history[-1] <= settings.target_loss:
            break
        (grad,) = torch.autograd.grad(loss, emb)
        grad[:, 0] = 0  # zeroed, not restored: AdamW's weight decay still moves the start token (as theirs)
        emb.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    losses = torch.tensor(history, dtype=torch.float32)[:, None].expand(-1, n).clone()
    return Optimised(emb.detach().expand(n, -1, -1), losses, torch.full((n,), steps, dtype=torch.long))


def latent_mask(end_maps: dict[str, np.ndarray], layers: list[str], size: tuple[int, int]) -> torch.Tensor:
    """The BE mask (n, h, w) at the latent resolution, from stored final-step end-token maps."""
    return torch.from_numpy(be_mask(end_maps, layers, size)).float()


def mitigate(model: TextToImage, prompt: str, seeds: list[int], sampler: SamplerSettings,
             settings: MitigationSettings, mask: torch.Tensor | None = None,
             prompt_index: int | None = None) -> tuple[CapturedBatch, Optimised]:
    """Optimise the embedding at the first step (per image, or one shared by ``seeds`` under the official protocol),
    then sample (with traces) from the same initial noise. ``mask`` (n, h, w) is BE's; ``prompt_index`` is needed
    by the sampler's official seeding. Raises ValueError when the mask does not match the method."""
    if (mask is None) == MITIGATIONS[settings.method].needs_mask:
        raise ValueError(f"method {settings.method!r} {'needs' if mask is None else 'takes no'} BE mask")
    n = len(seeds)
    cond = model.encode([prompt]).expand(n, -1, -1)
    uncond = model.encode([""]).expand(n, -1, -1)
    latents = initial_noise(model, seeds, sampler, prompt_index)
    model.scheduler.set_timesteps(sampler.steps, device=model.device)
    t0 = model.scheduler.timesteps[0]
    if mask is not None:
        size = tuple(latents.shape[-2:])
        if tuple(mask.shape[-2:]) != size:
            mask = F.interpolate(mask[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        mask = mask.to(model.device, torch.float32)
    optimise = optimise_shared_embedding if settings.protocol == "official" else optimise_embedding
    with torch.enable_grad():
        opt = optimise(model, cond, uncond, latents, t0, settings, mask)
    return sample_with_capture(model, prompt, seeds, sampler, cond=opt.embedding, prompt_index=prompt_index), opt
