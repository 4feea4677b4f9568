"""One DDIM + classifier-free-guidance pass that records a trace per generated image.

Recorded, per image:
- ``delta_sq[t]``: per-pixel sum over latent channels of ``(eps_cond - eps_uncond)^2`` at every step;
- ``end_maps[layer]``: at the final step, the conditional branch's cross-attention probability on the prompt's first
  end token, mean over heads, at the layer's own resolution (the bright ending); with
  ``SamplerSettings.end_map_steps`` also at earlier steps (``end_maps_by_step``);
- ``token_attn[layer][t]``: at every step, the conditional branch's attention over tokens, mean over pixels and heads
  (Ren et al.'s entropy statistics);
- the final latent and image.

One call samples any mix of prompts (``prompts[i]`` and ``seeds[i]`` make image i, and nothing else does), so a
one-image-per-prompt protocol still fills the device. Everything recorded stays on the device during the loop and
reaches the host in one copy after the last step: a per-layer ``.cpu()`` at every step would stall the GPU's launch
queue 16 x 50 times per batch on SD v1-4.

Only cross-attention layers get the recording processor, and self-attention keeps diffusers' fused kernel. Cross
attention against 77 tokens is cheap, so computing its probabilities explicitly costs little.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from benchmark.models.text_to_image import TextToImage

CROSS_SUFFIX = ".attn2"
FIRST_BLOCK = ".transformer_blocks.0"  # left out of a layer's name: SD's attentions hold one transformer block each
# Processors whose output the recorder reproduces exactly (the same attention, written with explicit probabilities,
# as diffusers' AttnProcessor does); any other processor is called for the output and the probabilities are
# computed beside it.
EXACT_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """Cross-attention modules by layer name: the module path without ``.attn2``, and without the
    ``.transformer_blocks.0`` of a UNet attention's first block, e.g. ``down_blocks.0.attentions.0`` (SD v1-4 has
    16), ``down_blocks.1.attentions.0.transformer_blocks.1`` (SDXL's second block there; SDXL base has 70),
    ``transformer_blocks.3`` (a diffusion transformer's fourth block; PixArt-alpha has 28). A block prefix
    (``down_blocks.1.attentions.0``) then selects every block of that attention (``scores.select_layers``)."""
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith(CROSS_SUFFIX):
            layers[name.removesuffix(CROSS_SUFFIX).removesuffix(FIRST_BLOCK)] = module
    return layers


SEEDINGS = ("per_image", "official")
STEP_NOISE_TAG = 0x5EED_57E9  # mixed into every step-noise seed: its streams are no image's initial noise
# What a sampler key with eta > 0 adds: its step noise is drawn per image (ddim_step). Stores written before drew
# it from the global generator, batch-wide; their traces sit under keys without this part and are never reused.
STEP_NOISE_KEY = "-imgnoise"


@dataclass
class SamplerSettings:
    """DDIM with classifier-free guidance. ``end_map_steps``: 0-based indices of denoising steps (0 = the first,
    ``steps - 1`` = the final one) whose end-token maps are stored besides the final step's, which always is."""

    steps: int = 50
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    eta: float = 0.0
    end_map_steps: tuple[int, ...] = ()
    # per_image: one generator per image seed (be-bench's default). official: the official scripts' draw, a prompt's
    # whole batch from one generator seeded with prompt index + gen_seed (docs/protocols.md); seeds are then rows.
    # The prompt index is the prompt's position in its whole set (prompts.Prompt.position), whatever narrowed it.
    seeding: str = "per_image"
    gen_seed: int = 0  # the run's first seed (sampler.seed); for official seeding the scripts' --gen_seed

    def __post_init__(self):
        if self.seeding not in SEEDINGS:
            raise ValueError(f"unknown seeding {self.seeding!r}; choose from {', '.join(SEEDINGS)}")
        steps = sorted({int(k) for k in self.end_map_steps})
        bad = [k for k in steps if not 0 <= k < self.steps]
        if bad:
            raise ValueError(f"end_map_steps {bad} outside 0..{self.steps - 1} (0-based steps of {self.steps})")
        # the final step is always recorded under end_maps; listing it changes nothing, also not the store key
        self.end_map_steps = tuple(k for k in steps if k != self.steps - 1)


@dataclass
class Recording:
    """Shared state of one sampling pass, read and filled by every recording processor; tensors stay on device."""

    n_cond: int  # conditional images are the second half of the CFG batch
    end_index: torch.Tensor  # (n_cond,) first end token per image, on the model's device
    latent_hw: tuple[int, int]
    map_steps: frozenset[int]  # steps whose end maps are kept (the final one included)
    final_step: int
    token_maps: bool = False  # also keep the final-step map of every token (diagnostics; large for SD)
    step: int = 0
    keep_maps: bool = False  # step in map_steps, set before each UNet call
    end_maps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> layer -> (n, h, w)
    all_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    token_attn: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # layer -> steps x (n, tokens)

    def start_step(self, step: int) -> None:
        self.step, self.keep_maps = step, step in self.map_steps


class RecordingCrossAttnProcessor:
    """Wraps a cross-attention layer's processor: the same output, plus end-token maps and token-attention vectors
    written into the active recording (without one, the wrapped processor runs alone)."""

    def __init__(self, layer: str, original):
        self.layer = layer
        self.original = original
        self.recording: Recording | None = None

    # Under torch.compile the recorder is a graph break: its Python-side state (step, lists) never becomes a guard
    # that would recompile the UNet at every step.
    @torch.compiler.disable
    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        rec = self.recording
        if rec is None or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        batch, tokens, _ = encoder_hidden_states.shape
        mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, pixels, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, mask)  # (B*heads, pixels, tokens)
        if type(self.original) in EXACT_PROCESSORS:  # a subclass may change the output: it is called
            value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
            out = attn.batch_to_head_dim(torch.bmm(probs, value))
            out = attn.to_out[1](attn.to_out[0](out))
        else:
            out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        self._record(rec, probs.unflatten(0, (-1, attn.heads)))
        return out

    def _record(self, rec: Recording, probs: torch.Tensor) -> None:
        cond = probs[-rec.n_cond:].float()  # (n, heads, pixels, tokens)
        rec.token_attn.setdefault(self.layer, []).append(cond.mean(dim=(1, 2)))
        if rec.keep_maps:
            pixels = cond.shape[2]
            factor = math.sqrt(rec.latent_hw[0] * rec.latent_hw[1] / pixels)
            h, w = round(rec.latent_hw[0] / factor), round(rec.latent_hw[1] / factor)
            index = rec.end_index.view(-1, 1, 1, 1).expand(-1, cond.shape[1], pixels, 1)
            end = cond.gather(3, index).squeeze(3).mean(1)  # (n, pixels), mean over heads
            rec.end_maps.setdefault(rec.step, {})[self.layer] = end.view(-1, h, w)
            if rec.token_maps and rec.step == rec.final_step:
                rec.all_maps[self.layer] = cond.mean(1).transpose(1, 2).reshape(len(cond), -1, h, w)


def check_recordable(layer: str, module: Attention) -> None:
    """The recorder computes q, k and the probabilities itself: refuse a layer whose attention adds steps it skips."""
    if hasattr(module.processor, "recording"):  # a RecordingCrossAttnProcessor
        raise RuntimeError(f"cross-attention layer {layer} is already being recorded (nested capture)")
    if (module.spatial_norm is not None or module.group_norm is not None or module.norm_cross
            or module.residual_connection or module.rescale_output_factor != 1.0
            or getattr(module, "norm_q", None) is not None or getattr(module, "norm_k", None) is not None):
        raise ValueError(f"cross-attention layer {layer} uses a normalisation or residual the recorder does not "
                         "support")


@contextmanager
def capture(unet: torch.nn.Module, recording: Recording | None) -> Iterator[dict[str, RecordingCrossAttnProcessor]]:
    """Wrap every cross-attention layer's processor in a recorder writing into ``recording`` (None: the wrapped
    processors run alone); on exit the processors that were there before are put back, the same objects."""
    layers = cross_attention_layers(unet)
    for layer, module in layers.items():
        check_recordable(layer, module)
    originals = {layer: module.processor for layer, module in layers.items()}
    recorders = {}
    try:
        for layer, module in layers.items():
            recorders[layer] = RecordingCrossAttnProcessor(layer, originals[layer])
            recorders[layer].recording = recording
            module.set_processor(recorders[layer])
        yield recorders
    finally:
        for layer, module in layers.items():
            module.set_processor(originals[layer])


@contextmanager
def recording_paused(unet: torch.nn.Module) -> Iterator[None]:
    """Inside a ``capture``, let the recorders record nothing until exit: for a mitigation's own extra UNet
    evaluations within a step (PRSS's original-prompt prediction), which are no part of the generation's trace."""
    recorders = [m.processor for m in cross_attention_layers(unet).values() if hasattr(m.processor, "recording")]
    saved = [r.recording for r in recorders]
    try:
        for r in recorders:
            r.recording = None
        yield
    finally:
        for r, rec in zip(recorders, saved):
            r.recording = rec


@dataclass
class CapturedBatch:
    """Traces of the images of one sampling call, as CPU tensors with a leading image axis."""

    delta_sq: torch.Tensor  # (n, steps, h, w)
    end_maps: dict[str, torch.Tensor]  # layer -> (n, h_l, w_l), final step
    token_attn: dict[str, torch.Tensor]  # layer -> (n, steps, tokens)
    end_index: torch.Tensor  # (n,)
    latents: torch.Tensor  # (n, c, h, w)
    images: torch.Tensor | None  # (n, 3, H, W) in [0, 1]; None when not decoded
    token_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, tokens, h_l, w_l), opt-in
    end_maps_by_step: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # earlier steps, opt-in


def image_seeds(settings: SamplerSettings, n: int) -> list[int]:
    """The seeds of a prompt's n generations, as the store names them: ``per_image``, gen_seed .. gen_seed + n - 1
    (one generator each); ``official``, the rows 0 .. n - 1 of the prompt's batch (its key carries gen_seed)."""
    return list(range(n)) if settings.seeding == "official" else [settings.gen_seed + k for k in range(n)]


def initial_noise(model: TextToImage, seeds: list[int], settings: SamplerSettings,
                  prompt_index: int | Sequence[int] | None = None) -> torch.Tensor:
    """The initial latents (len(seeds), c, h, w), scaled by the scheduler's initial sigma.

    ``per_image``: one CPU generator per seed, so an image depends on its seed alone, not on its batch.
    ``official``: ``seeds`` are rows of their prompt's batch and ``prompt_index`` the prompt's position in its whole
    set (``Prompt.position``; one for all images, or one per image); see ``official_batch_noise``. A row's noise does
    not depend on the other rows sampled with it. Raises ValueError when official seeding gets no ``prompt_index`` or
    a negative row."""
    shape = model.latent_shape(settings.height, settings.width)
    if settings.seeding == "official":
        if prompt_index is None or min(seeds) < 0:
            raise ValueError(f"official seeding needs the prompt index and rows >= 0, got {prompt_index}, {seeds}")
        indices = [prompt_index] * len(seeds) if isinstance(prompt_index, int) else list(prompt_index)
        # one draw per prompt, of its rows up to the highest asked for (callers ask for a prompt's whole batch)
        draws = {index: official_batch_noise(model, index + settings.gen_seed,
                                             max(r for i, r in zip(indices, seeds) if i == index) + 1, shape)
                 for index in dict.fromkeys(indices)}
        noise = torch.stack([draws[index][row] for index, row in zip(indices, seeds)])
        return noise * model.scheduler.init_noise_sigma
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(model.device, model.dtype) * model.scheduler.init_noise_sigma


def step_generators(settings: SamplerSettings, seeds: list[int], prompt_index: int | Sequence[int] | None = None
                    ) -> list[torch.Generator] | None:
    """One CPU generator per image for DDIM's variance noise (``ddim_step``), or None when ``settings.eta == 0``
    (DDIM then draws nothing, and nothing is created).

    Image i's generator is seeded from that image's identity alone: ``per_image``, its seed; ``official``, its
    prompt's batch seed (prompt index + gen_seed) and its row. The seed is mixed by numpy's SeedSequence with a
    tag of its own, so the stream is not the initial noise of any image. An image's step noise thus does not
    depend on its batch, nor on what was sampled before it; under official seeding it is be-bench's own (the
    scripts would continue the global generator, batch-wide). Raises ValueError as ``initial_noise`` does."""
    if settings.eta == 0:
        return None
    if settings.seeding == "official":
        if prompt_index is None or min(seeds) < 0:
            raise ValueError(f"official seeding needs the prompt index and rows >= 0, got {prompt_index}, {seeds}")
        indices = [prompt_index] * len(seeds) if isinstance(prompt_index, int) else list(prompt_index)
        identities = [(1, index + settings.gen_seed, row) for index, row in zip(indices, seeds, strict=True)]
    else:
        identities = [(0, seed) for seed in seeds]
    # SeedSequence takes non-negative entries: a negative seed wraps to its 64-bit two's complement
    return [torch.Generator().manual_seed(int(np.random.SeedSequence(
        [STEP_NOISE_TAG, *(int(x) % 2**64 for x in ident)]).generate_state(1, np.uint64)[0])) for ident in identities]


def ddim_step(scheduler, eps: torch.Tensor, t, latents: torch.Tensor, eta: float,
              generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """The scheduler's DDIM update of ``latents`` (n, c, h, w) with noise prediction ``eps`` (same shape) at
    timestep ``t``; the one place a sampling loop takes a step. With ``eta > 0`` the variance noise of row i is
    drawn from ``generators[i]`` (``step_generators``; float32 on the CPU, then moved), never from the global
    generator nor batch-wide. ``eta == 0`` draws nothing: the update is the deterministic one. Raises ValueError
    when eta > 0 comes without one generator per row."""
    noise = None
    if eta > 0:
        if generators is None or len(generators) != len(latents):
            raise ValueError(f"DDIM with eta={eta:g} needs one step-noise generator per image: "
                             f"{0 if generators is None else len(generators)} for {len(latents)}")
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
        noise = noise.to(latents.device, latents.dtype)
    return scheduler.step(eps, t, latents, eta=eta, variance_noise=noise).prev_sample


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

def prompts_per_image(prompt: str | Sequence[str], n: int) -> list[str]:
    """One prompt per image: ``prompt`` for all ``n``, or ``prompt[i]`` for image i. Raises ValueError when there
    are no images or the number of prompts is not ``n``."""
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n or n == 0:
        raise ValueError(f"sampling needs one prompt per seed and at least one seed: {len(prompts)} prompts, "
                         f"{n} seeds")
    return prompts


def encode_prompts(model: TextToImage, prompts: list[str]) -> torch.Tensor:
    """(n, tokens, dim): each distinct prompt encoded on its own, so an encoding never depends on its batch."""
    distinct = {p: model.encode([p]) for p in dict.fromkeys(prompts)}
    return torch.cat([distinct[p] for p in prompts])


def guided_eps(model: TextToImage, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **conditions
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One CFG batch through ``model.noise_prediction`` (epsilon whatever the network predicts): ``latents``
    (n, c, h, w), ``context`` (2n, tokens, dim) and any added ``conditions`` unconditional half first (diffusers'
    order); returns (eps_u, eps_c), each (n, c, h, w)."""
    eps_uncond, eps_cond = model.noise_prediction(torch.cat([latents, latents]), t, context, **conditions).chunk(2)
    return eps_uncond, eps_cond


def ddim_cfg_step(model: TextToImage, latents: torch.Tensor, t: int, t_device: torch.Tensor, context: torch.Tensor,
                  settings: SamplerSettings, generators: Sequence[torch.Generator] | None = None,
                  guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, **conditions
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step with classifier-free guidance: (the next latents, ``eps_cond - eps_uncond``), both (n, c, h, w).
    ``t``: the timestep as a host int (the scheduler's table lookup), ``t_device`` the same on the device (the
    UNet's input); ``generators``: one per row, for the variance noise when eta > 0 (``ddim_step``); ``guidance``:
    ``(eps_uncond, eps_cond) -> eps`` in place of ``eps_uncond + settings.guidance * (eps_cond - eps_uncond)`` (a
    mitigation that guides per step); ``conditions``: the family's added conditions, batched like ``context``
    (``guided_eps``)."""
    eps_uncond, eps_cond = guided_eps(model, latents, t_device, context, **conditions)
    delta = eps_cond - eps_uncond
    eps = eps_uncond + settings.guidance * delta if guidance is None else guidance(eps_uncond, eps_cond)
    return ddim_step(model.scheduler, eps, t, latents, settings.eta, generators), delta


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 CPU copies of device tensors in a single transfer (one flat buffer), shapes kept."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@dataclass
class SamplingSetup:
    """Everything one sampling loop starts from (``prepare_sampling``), one row per image.

    ``cond``/``uncond`` (n, tokens, dim) on the model's device in its dtype; ``latents`` (n, c, h, w) the initial
    noise; ``steps`` the DDIM timesteps as host ints (the scheduler's table lookups), ``timesteps`` the same on the
    device (the UNet's input); ``generators`` one per image for DDIM's variance noise (None when eta == 0);
    ``end_index`` (n,) the first end token per image; ``mask`` (n, h, w) a BE mask at the latent size for a
    mitigation that reads one (``benchmark.mitigation.interface``), else None."""

    model: TextToImage
    prompts: list[str]
    seeds: list[int]
    settings: SamplerSettings
    prompt_index: int | Sequence[int] | None
    cond: torch.Tensor
    uncond: torch.Tensor
    latents: torch.Tensor
    generators: list[torch.Generator] | None
    steps: list[int]
    timesteps: torch.Tensor
    end_index: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def context(self) -> torch.Tensor:
        """The CFG batch's text conditioning (2n, tokens, dim), diffusers' order: unconditional half first."""
        return torch.cat([self.uncond, self.cond])


def prepare_sampling(model: TextToImage, prompt: str | Sequence[str], seeds: list[int], settings: SamplerSettings,
                     cond: torch.Tensor | None = None, prompt_index: int | Sequence[int] | None = None
                     ) -> SamplingSetup:
    """The one sampling set-up: prompts per image, their encodings (each distinct prompt alone), the initial noise
    and step-noise generators (``initial_noise``, ``step_generators``), the DDIM timesteps and the end-token
    indices. ``cond`` (n, tokens, dim) replaces the prompts' encoding. Raises ValueError as ``prompts_per_image``
    and ``initial_noise`` do."""
    n = len(seeds)
    prompts = prompts_per_image(prompt, n)
    device = model.device
    cond = encode_prompts(model, prompts) if cond is None else cond.to(device, model.dtype)
    uncond = model.encode([""]).expand(n, -1, -1)
    latents = initial_noise(model, seeds, settings, prompt_index)
    generators = step_generators(settings, seeds, prompt_index)
    scheduler = model.scheduler
    # Timesteps on the host: DDIM's update then reads its alpha table with a Python int and never waits for the
    # device; the UNet gets the same values from a device copy made once.
    scheduler.set_timesteps(settings.steps)
    steps = scheduler.timesteps.tolist()
    timesteps = scheduler.timesteps.to(device)
    return SamplingSetup(model, prompts, list(seeds), settings, prompt_index, cond, uncond, latents, generators,
                         steps, timesteps, model.end_token_index(prompts))


@torch.no_grad()
def sample_with_capture(model: TextToImage, prompt: str | Sequence[str], seeds: list[int], settings: SamplerSettings,
                        record: bool = True, decode: bool = True, cond: torch.Tensor | None = None,
                        token_maps: bool = False, prompt_index: int | Sequence[int] | None = None,
                        intervention=None, mask: torch.Tensor | None = None) -> CapturedBatch | torch.Tensor:
    """Sample ``len(seeds)`` images; with ``record`` return their traces, else only the latents (on the device).

    ``prompt``: one prompt for every image, or one per image (``prompt[i]`` with ``seeds[i]``). ``cond`` (n, tokens,
    dim) replaces the prompts' encoding, e.g. by a mitigated embedding per image; ``token_maps`` also records the
    final-step map of every token, not only the end token's; ``prompt_index`` (one, or one per image) is needed by
    ``settings.seeding == "official"`` (``initial_noise``). ``intervention``: a mitigation's hooks
    (``benchmark.mitigation.interface.Intervention``), applied in this one loop, so a mitigated generation is traced
    as any other; ``mask`` (n, h, w) the BE mask it reads, if any. Raises ValueError when the prompts do not match
    the seeds."""
    n = len(seeds)
    prompts = prompts_per_image(prompt, n)
    if intervention is not None and intervention.prompts is not None:
        prompts = intervention.prompts(model, prompts, list(seeds), prompt_index)
    setup = prepare_sampling(model, prompts, seeds, settings, cond, prompt_index)
    setup.mask = mask
    if intervention is not None:
        intervention.prepare(setup)
    latents, steps, timesteps = setup.latents, setup.steps, setup.timesteps
    context = setup.context
    rec = Recording(n, setup.end_index.to(model.device), tuple(latents.shape[-2:]),
                    frozenset(settings.end_map_steps) | {len(steps) - 1}, len(steps) - 1, token_maps
                    ) if record else None
    guide = None if intervention is None else intervention.guidance_for(setup)
    delta_sq = []
    # a mitigation's modules first: capture's recorders then wrap the processors it installed
    with (nullcontext() if intervention is None else intervention.installed(setup)), capture(model.unet, rec):
        for i, t in enumerate(steps):
            if rec is not None:
                rec.start_step(i)
            latents, delta = ddim_cfg_step(model, latents, t, timesteps[i], context, settings, setup.generators,
                                           None if guide is None else
                                           lambda u, c, i=i, t=t, x=latents: guide(i, t, x, u, c))
            if record:
                delta_sq.append(delta.float().pow(2).sum(1))
    if not record:
        return latents
    end_index = setup.end_index
    final = rec.end_maps.pop(len(steps) - 1)
    layers = list(final)
    parts = [torch.stack(delta_sq, 1), latents, *final.values(), *(torch.stack(rec.token_attn[k], 1) for k in layers),
             *rec.all_maps.values(), *(m for maps in rec.end_maps.values() for m in maps.values())]
    host = iter(to_host(parts))
    delta_host, latents_host = next(host), next(host)
    end_maps = {k: next(host) for k in layers}
    token_attn = {k: next(host) for k in layers}
    all_maps = {k: next(host) for k in rec.all_maps}
    by_step = {step: {k: next(host) for k in maps} for step, maps in rec.end_maps.items()}
    return CapturedBatch(
        delta_sq=delta_host,
        end_maps=end_maps,
        token_attn=token_attn,
        end_index=end_index,
        latents=latents_host,
        images=model.to_images(latents) if decode else None,
        token_maps=all_maps,
        end_maps_by_step=by_step,
    )
