"""One DDIM + classifier-free-guidance pass that records a trace per generated image.

Recorded, per image:
- ``delta_sq[t]``: per-pixel sum over latent channels of ``(eps_cond - eps_uncond)^2`` at every step;
- ``end_maps[layer]``: at the final step, the conditional branch's cross-attention probability on the prompt's first
  end token, mean over heads, at the layer's own resolution (the bright ending);
- ``token_attn[layer][t]``: at every step, the conditional branch's attention over tokens, mean over pixels and heads
  (Ren et al.'s entropy statistics);
- the final latent and image.

Only cross-attention layers get the recording processor, and self-attention keeps diffusers' fused kernel. Cross
attention against 77 tokens is cheap, so computing its probabilities explicitly costs little.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .models import TextToImage

CROSS_SUFFIX = ".transformer_blocks.0.attn2"


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """Cross-attention modules by layer name, e.g. ``down_blocks.0.attentions.0`` (SD v1-4 has 16)."""
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2"):
            layers[name.removesuffix(CROSS_SUFFIX)] = module
    return layers


@dataclass
class _Recording:
    """Shared state of one sampling pass, read and filled by every recording processor."""

    n_cond: int  # conditional images are the second half of the CFG batch
    end_index: torch.Tensor  # (n_cond,) first end token per image
    latent_hw: tuple[int, int]
    n_steps: int
    token_maps: bool = False  # also keep the final-step map of every token (diagnostics; large for SD)
    step: int = 0
    end_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    all_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    token_attn: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class RecordingCrossAttnProcessor:
    """Cross-attention that also records end-token maps (final step) and token-attention vectors (every step)."""

    def __init__(self, layer: str):
        self.layer = layer
        self.recording: _Recording | None = None
        self._fast = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        rec = self.recording
        if rec is None or encoder_hidden_states is None:
            return self._fast(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, pixels, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, pixels, tokens)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        self._record(rec, probs.unflatten(0, (-1, attn.heads)))
        return out

    def _record(self, rec: _Recording, probs: torch.Tensor) -> None:
        cond = probs[-rec.n_cond:].float()  # (n, heads, pixels, tokens)
        rec.token_attn.setdefault(self.layer, []).append(cond.mean(dim=(1, 2)).cpu())
        if rec.step == rec.n_steps - 1:
            pixels = cond.shape[2]
            factor = math.sqrt(rec.latent_hw[0] * rec.latent_hw[1] / pixels)
            h, w = round(rec.latent_hw[0] / factor), round(rec.latent_hw[1] / factor)
            index = rec.end_index.to(cond.device).view(-1, 1, 1, 1).expand(-1, cond.shape[1], pixels, 1)
            end = cond.gather(3, index).squeeze(3).mean(1)  # (n, pixels), mean over heads
            rec.end_maps[self.layer] = end.view(-1, h, w).cpu()
            if rec.token_maps:
                rec.all_maps[self.layer] = cond.mean(1).transpose(1, 2).reshape(len(cond), -1, h, w).cpu()


def install_recorders(unet: torch.nn.Module) -> dict[str, RecordingCrossAttnProcessor]:
    """Put a recording processor on every cross-attention layer (idempotent); other layers keep theirs."""
    recorders = {}
    for layer, module in cross_attention_layers(unet).items():
        if not isinstance(module.processor, RecordingCrossAttnProcessor):
            if module.spatial_norm is not None or module.group_norm is not None or module.norm_cross:
                raise ValueError(f"cross-attention layer {layer} uses a normalisation the recorder does not support")
            module.set_processor(RecordingCrossAttnProcessor(layer))
        recorders[layer] = module.processor
    return recorders


SEEDINGS = ("per_image", "official")


@dataclass
class SamplerSettings:
    steps: int = 50
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    eta: float = 0.0
    # per_image: one generator per image seed (be-bench's default). official: the official scripts' draw, a prompt's
    # whole batch from one generator seeded with prompt index + gen_seed (docs/protocols.md); seeds are then rows.
    seeding: str = "per_image"
    gen_seed: int = 0  # the run's first seed (sampler.seed); for official seeding the scripts' --gen_seed

    def __post_init__(self):
        if self.seeding not in SEEDINGS:
            raise ValueError(f"unknown seeding {self.seeding!r}; choose from {', '.join(SEEDINGS)}")


@dataclass
class CapturedBatch:
    """Traces of the images of one sampling call, as CPU tensors with a leading image axis."""

    delta_sq: torch.Tensor  # (n, steps, h, w)
    end_maps: dict[str, torch.Tensor]  # layer -> (n, h_l, w_l)
    token_attn: dict[str, torch.Tensor]  # layer -> (n, steps, tokens)
    end_index: torch.Tensor  # (n,)
    latents: torch.Tensor  # (n, c, h, w)
    images: torch.Tensor | None  # (n, 3, H, W) in [0, 1]; None when not decoded
    token_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, tokens, h_l, w_l), opt-in


def image_seeds(settings: SamplerSettings, n: int) -> list[int]:
    """The seeds of a prompt's n generations, as the store names them: ``per_image``, gen_seed .. gen_seed + n - 1
    (one generator each); ``official``, the rows 0 .. n - 1 of the prompt's batch (its key carries gen_seed)."""
    return list(range(n)) if settings.seeding == "official" else [settings.gen_seed + k for k in range(n)]


def initial_noise(model: TextToImage, seeds: list[int], settings: SamplerSettings,
                  prompt_index: int | None = None) -> torch.Tensor:
    """The initial latents (len(seeds), c, h, w), scaled by the scheduler's initial sigma.

    ``per_image``: one CPU generator per seed, so an image depends on its seed alone, not on its batch.
    ``official``: ``seeds`` are rows of the prompt's batch; see ``official_batch_noise``. Raises ValueError when
    official seeding gets no ``prompt_index`` or a negative row."""
    shape = model.latent_shape(settings.height, settings.width)
    if settings.seeding == "official":
        if prompt_index is None or min(seeds) < 0:
            raise ValueError(f"official seeding needs the prompt index and rows >= 0, got {prompt_index}, {seeds}")
        noise = official_batch_noise(model, prompt_index + settings.gen_seed, max(seeds) + 1, shape)[list(seeds)]
        return noise * model.scheduler.init_noise_sigma
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(model.device, model.dtype) * model.scheduler.init_noise_sigma


def official_batch_noise(model: TextToImage, batch_seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The draw of Wen et al.'s scripts (diffusion_memorization detect_mem.py / inference_mem.py, also BE's):
    ``set_random_seed(prompt index + gen_seed)``, then the pipeline's ``randn`` of the whole (n, c, h, w) batch from
    the global generator of the model's device, in the model's dtype. Their ``set_random_seed(s)`` leaves the CPU
    generator at ``s`` and, calling ``torch.cuda.manual_seed_all(s + 4)`` last, the CUDA one at ``s + 4``; a fresh
    generator with that seed gives the same numbers without touching the global state. Row k is the scripts' image k
    when n is their batch size (num_images_per_prompt), so callers draw a prompt's whole batch at once."""
    device = model.device
    seed = batch_seed + (4 if device.type == "cuda" else 0)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn((n, *shape), generator=generator, device=device, dtype=model.dtype)


@torch.no_grad()
def sample_with_capture(model: TextToImage, prompt: str, seeds: list[int], settings: SamplerSettings,
                        record: bool = True, decode: bool = True, cond: torch.Tensor | None = None,
                        token_maps: bool = False, prompt_index: int | None = None) -> CapturedBatch | torch.Tensor:
    """Sample ``len(seeds)`` images of one prompt; with ``record`` return their traces, else only the latents.

    ``cond`` (n, tokens, dim) replaces the prompt's encoding, e.g. by a mitigated embedding per image;
    ``token_maps`` also records the final-step map of every token, not only the end token's; ``prompt_index`` is
    needed by ``settings.seeding == "official"`` (``initial_noise``)."""
    n = len(seeds)
    cond = model.encode([prompt]).expand(n, -1, -1) if cond is None else cond.to(model.device, model.dtype)
    uncond = model.encode([""]).expand(n, -1, -1)
    context = torch.cat([uncond, cond])  # diffusers' order: unconditional half first
    latents = initial_noise(model, seeds, settings, prompt_index)
    scheduler = model.scheduler
    scheduler.set_timesteps(settings.steps, device=model.device)
    recorders = install_recorders(model.unet)
    rec = _Recording(n, model.end_token_index([prompt]).expand(n).clone(), tuple(latents.shape[-2:]),
                     len(scheduler.timesteps), token_maps) if record else None
    for processor in recorders.values():
        processor.recording = rec
    delta_sq = []
    try:
        for i, t in enumerate(scheduler.timesteps):
            if rec is not None:
                rec.step = i
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps_uncond, eps_cond = model.unet(x, t, encoder_hidden_states=context).sample.chunk(2)
            delta = eps_cond - eps_uncond
            if record:
                delta_sq.append(delta.float().pow(2).sum(1).cpu())
            latents = scheduler.step(eps_uncond + settings.guidance * delta, t, latents, eta=settings.eta).prev_sample
    finally:
        for processor in recorders.values():
            processor.recording = None
    if not record:
        return latents
    return CapturedBatch(
        delta_sq=torch.stack(delta_sq, 1),
        end_maps=rec.end_maps,
        token_attn={k: torch.stack(v, 1) for k, v in rec.token_attn.items()},
        end_index=rec.end_index,
        latents=latents.float().cpu(),
        images=model.to_images(latents) if decode else None,
        token_maps=rec.all_maps,
    )
