"""Jacobian-based memorization scores: SAIL's sharpness, the anisotropy score, and coordinate-wise curvature maps.

A capture pass keeps no Jacobian, so each of these needs an extra pass over the model (only the score-difference
map, the curvature map's cheap surrogate, is read from a trace's ``delta_sq``). Conventions as in ``capture``:
DDIM with classifier-free guidance, ``eps`` from ``TextToImage.noise_prediction`` (a v-prediction network's
output converted with ``x_t`` and alpha-bar, differentiably), the score ``s = -eps / sigma_t`` with
``sigma_t = sqrt(1 - alpha_bar_t)``, one noise generator per seed (``capture.initial_noise``), the UNet batch
``[unconditional; conditional]``.

- **SAIL** (Jeon et al., ICML 2025, Sec. 4 and Table 1; official ``local_model/pipe.py``, detection branch, SD v1):
  at each of the first ``k`` steps of the guided trajectory, ``||(H_c - H_u) (s_c - s_u)||_2`` per image, with
  ``H = ds/dx_t`` applied by one forward-mode JVP through the UNet; mean over the ``k`` steps (``detect_eval.py``);
  prompt level = mean over the images. Official defaults: ``k = 1`` (``--hvp_sampling_num``), n = 1 or 4 images
  (``--gen_num``), 50 DDIM steps, guidance 7.5.
- **Anisotropy** (Asthana & Belagiannis, ICLR 2026; official ``local_model/pipe.py`` detection branch and
  ``detect_eval.py``, SD v1, ``--mode "x,c|x"``, normalisation off): on the initial noise ``x_T`` and without any
  denoising step, ``gamma_norm * ||eps_c - eps_u||_2`` at the first timestep plus ``gamma_cos *`` the mean over
  pixels of the cosine, over latent channels, between ``eps_u`` and ``eps_c - eps_u`` at the third-to-last timestep
  (``timesteps[-3]``, low noise). Official weights for SD v1: ``gamma_norm = 1``, ``gamma_cos = 2`` (SD v2: 1, 0.1).
- **Curvature map** (Kim & Lee, ICML 2026; official ``utils/metric_utils.py``, ``compute_diag_h_diff_only`` and
  ``..._with_bad_model``): at one step of the guided trajectory (official: index 49 of 50, the last), Hutchinson's
  estimate over ``k`` Rademacher probes (official 16) of the diagonal of ``d(eps_c - eps_b)/dx_t``, ``eps_b`` the
  unconditional branch or the conditional branch of a less-trained model, summed over channels and clipped at zero:
  ``relu(-sigma_t * sum_c diag d(s_c - s_b)/dx_t)``. The official drops the ``1/sigma_t`` (a constant per step), so
  the map is in eps units. As a detector: the map's mean.
- **Score-difference map** (same paper, the ``score_diff`` baseline, ``compute_score_diffs_only``):
  ``sum_c (s_c - s_u)^2`` at the chosen step = ``delta_sq / (1 - alpha_bar_t)``, from the trace.

Forward-mode AD through attention needs PyTorch's math attention kernel (the fused CPU flash and CUDA
flash/memory-efficient kernels have no forward-mode derivative), so JVPs run under ``sdpa_kernel(MATH)``, as the
official code disables the fused CUDA kernels. The math kernel materialises every attention matrix: for SD v1-4 at
512 px the 64x64 self-attention holds 2 x 8 x 4096^2 values per layer for the UNet batch of 2 (1 GiB in float32),
and the JVP carries a tangent of each. Hutchinson's probes use reverse mode, as the official does, which the fused
kernels support.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmark.models.text_to_image import TextToImage
from benchmark.sampling.capture import SamplerSettings, ddim_step, encode_prompts, prepare_sampling, prompts_per_image

# official defaults, named where they come from
SAIL_STEPS = 1  # sharpness_memorization_diffusion/detect_mem.py --hvp_sampling_num
ANISOTROPY_GAMMA_NORM = 1.0  # memorization-anisotropy/detect_eval.py, sd_ver 1
ANISOTROPY_GAMMA_COS = 2.0  # idem (SD v2: 0.1)
ANISOTROPY_LOW_NOISE_INDEX = -3  # memorization-anisotropy/local_model/pipe.py: t_cosine = timesteps[-3]
# "eps": every quantity from epsilon (v converted), be-bench's definition; "official": what the official code's branch
# for the model's prediction computes (epsilon: its SD v1 branch, the same numbers; v: its SD 2 branch, docs/protocols)
Units = Literal["eps", "official"]
UNITS = get_args(Units)
CURVATURE_PROBES = 16  # mem-curv-diff/generate_metric_maps.py --hutchinson_k
CURVATURE_STEP = -1  # idem --target_timestep 49 of --num_inference_steps 50: the last step
# idem utils/optim_utils.py set_random_seed(seed): torch.manual_seed(seed), then cuda.manual_seed(seed + 1),
# cuda.manual_seed_all(seed + 2) and (seed + 4): the generator a device's global draws come from is left at this
PROBE_SEED_OFFSET = {"cpu": 0, "cuda": 4}
PROBE_SEEDINGS = ("per_image", "official")

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def eps_predictor(model: TextToImage) -> EpsFn:
    """The model as ``eps(x (m, c, h, w), t, context (m, tokens, dim)) -> (m, c, h, w)``: its
    ``noise_prediction``, so a v-prediction network is differentiated through its epsilon."""
    return model.noise_prediction


@contextmanager
def forward_mode_attention():
    """Route every ``scaled_dot_product_attention`` to the math kernel, the one with a forward-mode derivative.

    Attention processors that bypass it (xformers) are not covered; ``_check_model`` refuses them."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _units(model: TextToImage, units: str) -> bool:
    """Whether the official SD 2 (v-prediction) branch applies; ValueError for an unknown ``units``."""
    if units not in UNITS:
        raise ValueError(f"units={units!r}: one of {', '.join(UNITS)}")
    return units == "official" and model.prediction_type == "v_prediction"


def sigma_at(scheduler, t) -> float:
    """``sqrt(1 - alpha_bar_t)``: the noise level that turns eps into the score, ``s = -eps / sigma``."""
    return float((1 - scheduler.alphas_cumprod[int(t)]) ** 0.5)


# ------------------------------------------------------------------------------------------- core maths

def sail_step(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
              sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SAIL's statistic at one step: ``||(H_c - H_u)(s_c - s_u)||_2`` per image, ``H = ds/dx``, ``s = -eps/sigma``.

    ``x`` (n, c, h, w) latents, ``context`` (2n, tokens, dim) unconditional half first. One forward pass gives the
    score difference, one forward-mode JVP (math attention) applies both Jacobians to it. Returns the values (n,)
    float32 and the forward pass's eps (2n, c, h, w), which the sampler reuses for its step.
    Source: official ``local_model/pipe.py`` (``hvp_comb`` on ``diff_score``, then ``torch.norm`` per image)."""
    def score(y):
        return -eps_fn(torch.cat([y, y]), t, context) / sigma

    s = score(x)
    s_u, s_c = s.chunk(2)
    with forward_mode_attention():
        _, hv = jvp(score, (x,), (s_c - s_u,))
    hv_u, hv_c = hv.chunk(2)
    return (hv_c - hv_u).flatten(1).float().norm(dim=1), -s * sigma


def anisotropy_terms(eps_first: torch.Tensor, eps_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the anisotropy score, per image, from eps on the same noise at two timesteps.

    ``eps_first`` and ``eps_low``: (2n, c, h, w), unconditional half first, at the first (high-noise) and the
    low-noise timestep. Returns ``guidance_norm`` = ``||eps_c - eps_u||_2`` over all entries at the first timestep
    and ``alignment`` = mean over pixels of ``cos(eps_u, eps_c - eps_u)`` over channels at the low-noise one, both
    (n,) float32. Source: official ``local_model/pipe.py`` (``comb_hvp = eps_diff``; ``cosine_similarity(...,
    dim=1)`` then the mean of each image's map)."""
    u0, c0 = eps_first.float().chunk(2)
    u1, c1 = eps_low.float().chunk(2)
    norm = (c0 - u0).flatten(1).norm(dim=1)
    alignment = F.cosine_similarity(u1, c1 - u1, dim=1).flatten(1).mean(dim=1)
    return norm, alignment


def anisotropy_score(guidance_norm, alignment, gamma_norm: float = ANISOTROPY_GAMMA_NORM,
                     gamma_cos: float = ANISOTROPY_GAMMA_COS):
    """``gamma_norm * guidance_norm + gamma_cos * alignment`` (higher = memorized); official ``detect_eval.py``."""
    return gamma_norm * guidance_norm + gamma_cos * alignment


def rademacher_probes(seeds: list[int], k: int, shape: tuple[int, ...], probe_seed: int = 0,
                      seeding: str = "per_image", device: str | torch.device = "cpu") -> torch.Tensor:
    """(k, n, *shape) float32 of +-1 on ``device``: image i's k probes, drawn from its seed ``seeds[i]`` alone.

    ``seeding="per_image"`` (default): from a CPU generator seeded by ``(probe_seed, seeds[i])`` (SeedSequence).
    ``"official"``: the draws of the official ``compute_diag_h_diff_only`` (mem-curv-diff @ 42a30d4), which calls
    ``set_random_seed(seed)`` and then draws each probe from the global generator of the latents' device as
    ``torch.empty_like(latents).bernoulli_(0.5) * 2 - 1``, latents (1, c, h, w) float16, k draws in turn, nothing
    else drawn from that generator in between (its noise has its own generator, DDIM with eta 0 draws nothing):
    here a generator of ``device`` seeded ``seeds[i] + PROBE_SEED_OFFSET[device type]`` (CUDA: + 4, CPU: + 0),
    the same k float16 draws. ``probe_seed`` has no part in it (the official has no probe seed by default).
    Raises ValueError for k < 1, an unknown seeding, or official seeding on a device other than CPU or CUDA."""
    if k < 1:
        raise ValueError(f"number of probes must be >= 1, got {k}")
    if seeding not in PROBE_SEEDINGS:
        raise ValueError(f"probe seeding {seeding!r} is not one of {', '.join(PROBE_SEEDINGS)}")
    device = torch.device(device)
    probes = []
    for s in seeds:
        if seeding == "official":
            if device.type not in PROBE_SEED_OFFSET:
                raise ValueError(f"official probe seeding is defined on {' and '.join(PROBE_SEED_OFFSET)}, "
                                 f"not on {device.type}")
            gen = torch.Generator(device).manual_seed(int(s) + PROBE_SEED_OFFSET[device.type])
            draws = [torch.empty((1, *shape), dtype=torch.float16, device=device).bernoulli_(0.5, generator=gen)[0]
                     for _ in range(k)]
            probes.append(torch.stack(draws).float() * 2 - 1)
            continue
        state = int(np.random.SeedSequence([int(probe_seed), int(s)]).generate_state(1)[0])
        bits = torch.randint(0, 2, (k, *shape), generator=torch.Generator().manual_seed(state))
        probes.append((bits.float() * 2 - 1).to(device))
    return torch.stack(probes, 1)


def hutchinson_diagonal(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimate of diag(dfn/dx) per image: ``mean_k v_k * (J^T v_k)`` (float32, the shape of ``x``).

    ``fn`` maps (n, ...) to (n, ...) image by image (no coupling across the batch, as a UNet in eval mode), so one
    backward pass gives every image's ``J_i^T v_i``. Reverse mode as the official (``hutchinson_diag_from_output``):
    one forward pass with its graph, then one backward pass per probe. Unbiased since E[v v^T] = I and
    diag(J^T) = diag(J); exact for a diagonal J (v * v = 1); entry i's error has standard deviation
    ``sqrt(sum_{j != i} J_ji^2 / k)``."""
    if probes.shape[1:] != x.shape:
        raise ValueError(f"probes have shape {tuple(probes.shape)}, expected (k, {', '.join(map(str, x.shape))})")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        diag = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j, v in enumerate(probes):
            v = v.to(y.device, y.dtype)
            (g,) = torch.autograd.grad(y, x, grad_outputs=v, retain_graph=j < len(probes) - 1)
            diag += (v * g).float()
    return diag / len(probes)


def curvature_from_diagonal(diag: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) diagonal of ``d(eps_c - eps_b)/dx`` -> (n, h, w) map ``relu(sum_c diag)``.

    Equals ``relu(-sigma * sum_c diag d(s_c - s_b)/dx)``: the negated, clipped curvature difference (the official
    negates the channel sum of the diagonal for ``s = -eps`` and applies ``relu``)."""
    return diag.sum(1).clamp(min=0)


# ------------------------------------------------------------------------------------------ on a model

def _check_model(model: TextToImage, seeds: list[int], settings: SamplerSettings) -> None:
    if not seeds:
        raise ValueError("no seeds given")
    for name, module in model.unet.attn_processors.items():
        if "XFormers" in type(module).__name__:
            raise ValueError(f"attention processor {name} ({type(module).__name__}) has no forward-mode derivative")
    if settings.steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {settings.steps}")


def _guided_step(model: TextToImage, eps: torch.Tensor, t, latents: torch.Tensor, settings: SamplerSettings,
                 generators: list[torch.Generator] | None) -> torch.Tensor:
    eps_u, eps_c = eps.chunk(2)
    return ddim_step(model.scheduler, eps_u + settings.guidance * (eps_c - eps_u), t, latents, settings.eta,
                     generators)


def _step_index(step: int, n_steps: int, what: str) -> int:
    if not -n_steps <= step < n_steps:
        raise ValueError(f"{what} {step} is outside the sampler's {n_steps} steps")
    return step % n_steps


@torch.no_grad()
def sail(model: TextToImage, prompt: str | Sequence[str], seeds: list[int], settings: SamplerSettings,
         k: int = SAIL_STEPS, prompt_index: int | Sequence[int] | None = None, units: str = "eps") -> np.ndarray:
    """SAIL's sharpness score per image (n,), float32: the mean over the first ``k`` sampling steps of
    ``||(H_c - H_u)(s_c - s_u)||_2`` (see :func:`sail_step`); higher = memorized. Prompt level (the paper's):
    the mean over a prompt's images. Costs per step one guided UNet pass and one JVP (about three passes).
    ``prompt``: one for every image, or one per image (images of several prompts in one call; each value depends
    on its own prompt and seed alone). ``prompt_index``: the prompt's position in its set (one, or one per image),
    needed by official seeding (``capture.initial_noise``). ``units="official"`` on a v-prediction model: the
    official SD 2 branch's value, whose score is ``(sqrt(abar) v - x_t) / (1 - abar)`` (``local_model/pipe.py``,
    ``sd_ver == 2``): its score and Jacobian differences are ours times ``-1 / sigma_t``, so each step's value is
    ours divided by ``1 - abar_t``. Raises ValueError for an empty seed list, ``k`` outside 1..steps or unknown
    ``units``."""
    _check_model(model, seeds, settings)
    official_v = _units(model, units)
    if not 1 <= k <= settings.steps:
        raise ValueError(f"SAIL steps k={k} must be in 1..{settings.steps}")
    setup = prepare_sampling(model, prompt, seeds, settings, prompt_index=prompt_index)
    context, latents, generators = setup.context, setup.latents, setup.generators
    scheduler = model.scheduler
    eps_fn = eps_predictor(model)
    total = torch.zeros(len(seeds))
    for i, t in enumerate(setup.timesteps[:k]):
        x = scheduler.scale_model_input(latents, t)
        values, eps = sail_step(eps_fn, x, t, context, sigma_at(scheduler, t))
        total += values.cpu() / (sigma_at(scheduler, t) ** 2 if official_v else 1.0)  # / (1 - abar_t)
        if i + 1 < k:
            latents = _guided_step(model, eps, t, latents, settings, generators)
    return (total / k).numpy()


@torch.no_grad()
def anisotropy(model: TextToImage, prompt: str | Sequence[str], seeds: list[int], settings: SamplerSettings,
               gamma_norm: float = ANISOTROPY_GAMMA_NORM, gamma_cos: float = ANISOTROPY_GAMMA_COS,
               low_noise_index: int = ANISOTROPY_LOW_NOISE_INDEX, prompt_index: int | Sequence[int] | None = None,
               units: str = "eps") -> dict[str, np.ndarray]:
    """The anisotropy score on pure noise, per image: ``{"anisotropy", "guidance_norm", "alignment"}``, each (n,)
    float32 (see :func:`anisotropy_terms`); higher = memorized. Two guided UNet passes on ``x_T``, at
    ``timesteps[0]`` and ``timesteps[low_noise_index]`` of the sampler's schedule; no denoising step.
    ``prompt_index``: as in :func:`sail`. ``units="official"`` on a v-prediction model: the official SD 2 branch
    (``local_model/pipe.py``, ``sd_ver == 2``, mode ``x,c|x``): the norm of the score difference
    ``||eps_c - eps_u|| / (1 - abar_t0)`` and the cosine on the raw network output, ``cos(v_u, v_c - v_u)``, with
    ``v = (eps - sqrt(1 - abar) x_t) / sqrt(abar)`` at the low-noise timestep.
    Raises ValueError for an empty seed list, a timestep index outside the schedule or unknown ``units``."""
    _check_model(model, seeds, settings)
    official_v = _units(model, units)
    _step_index(low_noise_index, settings.steps, "low-noise timestep index")  # before any encoding
    setup = prepare_sampling(model, prompt, seeds, settings, prompt_index=prompt_index)
    scheduler, timesteps = model.scheduler, setup.timesteps
    low = timesteps[_step_index(low_noise_index, len(timesteps), "low-noise timestep index")]
    context, latents = setup.context, setup.latents
    eps_fn = eps_predictor(model)
    pair = torch.cat([latents, latents])
    first = timesteps[0]
    eps_first = eps_fn(scheduler.scale_model_input(pair, first), first, context)
    eps_low = eps_fn(scheduler.scale_model_input(pair, low), low, context)
    if official_v:
        sigma_low = sigma_at(scheduler, low)
        x_low = scheduler.scale_model_input(pair, low)
        v_low = (eps_low - sigma_low * x_low) / (1 - sigma_low ** 2) ** 0.5  # the network's own output
        norm, alignment = anisotropy_terms(eps_first, v_low)
        norm = norm / sigma_at(scheduler, first) ** 2  # / (1 - abar_t0)
    else:
        norm, alignment = anisotropy_terms(eps_first, eps_low)
    norm, alignment = norm.cpu().numpy(), alignment.cpu().numpy()
    return {"anisotropy": anisotropy_score(norm, alignment, gamma_norm, gamma_cos),
            "guidance_norm": norm, "alignment": alignment}


def curvature_map(model: TextToImage, prompt: str | Sequence[str], seeds: list[int], settings: SamplerSettings,
                  step: int = CURVATURE_STEP, probes: int = CURVATURE_PROBES, probe_seed: int = 0,
                  baseline: TextToImage | None = None, prompt_index: int | Sequence[int] | None = None,
                  probe_seeding: str = "per_image") -> np.ndarray:
    """Coordinate-wise curvature difference map per image, (n, h, w) float32 at the latent resolution, >= 0.

    The guided trajectory of ``model`` runs to step index ``step`` (negative counts from the end; official: the
    last of 50); there, Hutchinson's estimate over ``probes`` Rademacher probes (seeded by ``probe_seed`` and the
    image's seed alone, or as the official draws them, ``probe_seeding``: :func:`rademacher_probes`) of diag
    ``d(eps_c - eps_b)/dx_t`` gives ``relu(sum_c diag)`` (see
    :func:`curvature_from_diagonal`). ``baseline`` None: ``eps_b`` is the model's unconditional branch (the paper's
    Delta h_emptyset); a model (e.g. a less-trained snapshot with the same latent space): ``eps_b`` is its
    conditional branch on its own encoding of the prompt (Delta h_theta~). Costs the trajectory (``step`` guided
    passes), one forward pass with its graph and one backward pass per probe. ``prompt_index``: as in :func:`sail`.
    Raises ValueError for an empty seed list, a step outside the schedule, probes < 1 or an unknown probe seeding."""
    _check_model(model, seeds, settings)
    index = _step_index(step, settings.steps, "curvature step")
    shape = model.latent_shape(settings.height, settings.width)
    v = rademacher_probes(seeds, probes, shape, probe_seed, probe_seeding, model.device)
    n = len(seeds)
    scheduler = model.scheduler
    eps_fn = eps_predictor(model)
    with torch.no_grad():
        setup = prepare_sampling(model, prompt, seeds, settings, prompt_index=prompt_index)
        context, latents, generators = setup.context, setup.latents, setup.generators
        for t in setup.timesteps[:index]:
            eps = eps_fn(scheduler.scale_model_input(torch.cat([latents, latents]), t), t, context)
            latents = _guided_step(model, eps, t, latents, settings, generators)
    t = setup.timesteps[index]
    if baseline is None:
        def difference(y):
            eps_u, eps_c = eps_fn(scheduler.scale_model_input(torch.cat([y, y]), t), t, context).chunk(2)
            return eps_c - eps_u
    else:
        cond, base_cond = context[n:], encode_prompts(baseline, prompts_per_image(prompt, n)).to(baseline.device)
        base_fn = eps_predictor(baseline)

        def difference(y):
            y = scheduler.scale_model_input(y, t)
            return eps_fn(y, t, cond) - base_fn(y.to(baseline.device, baseline.dtype), t, base_cond).to(y)
    diag = hutchinson_diagonal(difference, latents, v)
    return curvature_from_diagonal(diag).cpu().numpy()


def curvature_score(maps: np.ndarray) -> np.ndarray:
    """The curvature map as a detector: its mean over pixels, (n, h, w) -> (n,); higher = memorized."""
    return maps.mean(axis=(-2, -1))


def score_difference_map(delta_sq: np.ndarray, step: int = CURVATURE_STEP,
                         one_minus_alpha_bar: float = 1.0) -> np.ndarray:
    """``sum_c (s_c - s_u)^2`` at one step from a trace: ``delta_sq[:, step] / (1 - alpha_bar_t)``, (n, h, w).

    ``delta_sq`` (n, steps, h, w) is the trace's per-pixel channel sum of ``(eps_c - eps_u)^2``; with the default
    ``one_minus_alpha_bar = 1`` the map stays in eps units (a constant per step: rankings within a step do not
    change). The curvature paper's cheap baseline (official ``compute_score_diffs_only``, steps 49..50 of 50)."""
    if delta_sq.ndim != 4:
        raise ValueError(f"delta_sq must be (n, steps, h, w), got shape {delta_sq.shape}")
    index = _step_index(step, delta_sq.shape[1], "score-difference step")
    if not one_minus_alpha_bar > 0:
        raise ValueError(f"1 - alpha_bar must be > 0, got {one_minus_alpha_bar}")
    return delta_sq[:, index] / one_minus_alpha_bar


def one_minus_alpha_bar(scheduler, steps: int, step: int = CURVATURE_STEP) -> float:
    """``1 - alpha_bar_t`` at a step index of a ``steps``-step schedule (for :func:`score_difference_map`)."""
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[_step_index(step, len(scheduler.timesteps), "step")]
    return sigma_at(scheduler, t) ** 2
