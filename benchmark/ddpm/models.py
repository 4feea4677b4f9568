"""Unconditional DDPMs (CIFAR-10, CelebA, Oxford Flowers, the digits testbed): load, build, sample into the store.

Without text there is no cross-attention and no bright ending; what these models offer is the memorization
measurement side (``benchmark.localization.copying``). A DDPM folder has the layout of ``google/ddpm-cifar10-32``:
``unet/`` (a ``UNet2DModel``) and ``scheduler/``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from benchmark.models.text_to_image import check_pipeline_folder, load_error
from benchmark.sampling.capture import STEP_NOISE_KEY, ddim_step
from benchmark.sampling.missing import Generation, sample_missing
from benchmark.store.traces import Trace, TraceKey, TraceStore


@dataclass
class DDPM:
    model_id: str
    unet: UNet2DModel
    scheduler: DDPMScheduler

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)


def load_ddpm(source: str, use_safetensors: bool = True, device: str = "cpu") -> DDPM:
    """A DDPM pipeline folder (local path or hub id), with one-line errors naming the culprit."""
    check_pipeline_folder(source, ("unet", "scheduler"), use_safetensors, "DDPM")
    try:
        unet = UNet2DModel.from_pretrained(source, subfolder="unet", use_safetensors=use_safetensors)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise load_error("DDPM", source, err) from err
    return DDPM(source, unet.eval().to(device), scheduler)


def tiny_ddpm(channels: int = 3, size: int = 16, seed: int = 0) -> DDPM:
    """A seconds-fast random DDPM with the CIFAR-10 model's block types."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return DDPM("tiny-ddpm", unet.eval(), DDPMScheduler(num_train_timesteps=1000))


def save_ddpm(model: DDPM, folder: str | Path) -> Path:
    folder = Path(folder)
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    model.scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], '
                                             '"scheduler": ["diffusers", "DDPMScheduler"]}\n')
    return folder


@dataclass
class DDPMSampler:
    steps: int = 100  # fewer than the training steps: DDIM; equal with sampler="ddpm": ancestral sampling
    sampler: str = "ddim"
    eta: float = 0.0

    @property
    def key(self) -> str:
        """The store's sampler key, ``<sampler><steps>-eta<eta>`` (``sampling.sampler_key`` returns it), with
        ``-imgnoise`` for DDIM with eta > 0 (its step noise per image; earlier stores drew it batch-wide)."""
        noise = STEP_NOISE_KEY if self.sampler == "ddim" and self.eta > 0 else ""
        return f"{self.sampler}{self.steps}-eta{self.eta:g}{noise}"


@torch.no_grad()
def sample_ddpm(model: DDPM, seeds: list[int], settings: DDPMSampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, C, H, W) in [0, 1], one generator per seed, and the per-step noise-prediction energy
    (n, steps, H, W): the sum over channels of eps^2, the unconditional model's analogue of a trace."""
    if settings.sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown DDPM sampler {settings.sampler!r} (ddim or ddpm)")
    scheduler = (DDIMScheduler if settings.sampler == "ddim" else DDPMScheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(settings.steps, device=model.device)
    x = torch.stack([torch.randn(model.image_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x = x.to(model.device, model.unet.dtype)
    # one generator per image also for the ancestral noise and DDIM's eta > 0 noise, so an image depends on its
    # seed alone
    noise_gens = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]
    energy = []
    for t in scheduler.timesteps:
        eps = model.unet(x, t).sample
        energy.append(eps.float().pow(2).sum(1).cpu())
        if settings.sampler == "ddim":
            x = ddim_step(scheduler, eps, t, x, settings.eta, noise_gens)
        else:
            out = [scheduler.step(eps[i:i + 1], t, x[i:i + 1], generator=g).prev_sample
                   for i, g in enumerate(noise_gens)]
            x = torch.cat(out)
    return (x.float().cpu() / 2 + 0.5).clamp(0, 1), torch.stack(energy, 1)


def generate_ddpm(model: DDPM, key: TraceKey, seeds: list[int], settings: DDPMSampler, store: TraceStore,
                  batch_size: int) -> int:
    """Sample every seed without a trace under ``key`` into the store (``sampling.sample_missing``); return how
    many images were sampled."""

    def sample_batch(items):
        batch_seeds = [seed for _, seed in items]
        images, energy = sample_ddpm(model, batch_seeds, settings)
        return [(trace_of(e, image, {"model": key.model, "sampler": asdict(settings), "seed": int(seed)}),
                 to_rgb(image[None].numpy())[0]) for seed, image, e in zip(batch_seeds, images, energy)]

    return sample_missing(store, [Generation(None, key, list(seeds))], sample_batch, batch_size)


def trace_of(energy: torch.Tensor, image: torch.Tensor, meta: dict) -> Trace:
    """A store trace of one unconditional generation: no attention, the eps energy in place of delta_sq."""
    return Trace(delta_sq=energy.numpy(), end_maps={}, token_attn={}, end_index=-1, latent=image.numpy(), meta=meta)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """(n, 1, H, W) grey -> (n, 3, H, W), so PNGs and similarity code see three channels."""
    return np.repeat(images, 3, axis=1) if images.shape[1] == 1 else images
