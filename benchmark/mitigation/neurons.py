"""NeMo (Hintersdorf et al., NeurIPS 2024): memorization neurons in the cross-attention value layers, found from
activation statistics over non-memorized prompts, then deactivated.

"Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion Models", official code
``ml-research/localizing_memorization_in_diffusion_models``:

- **value layers** (``1_compute_activations_statistics.py``, ``utils/activation_detection.py``): the ``to_v``
  projection of the cross-attention in ``down_blocks[0..2].attentions[0..1]`` and ``mid_block.attentions[0]`` of SD
  v1-4, i.e. every cross-attention layer of the down path and the middle block (:func:`value_layers`);
- **activation** of a prompt: ``|to_v(text embedding)|`` averaged over the 77 token positions, one value per neuron
  (``to_v`` reads only the text, so one step gives it; the official records it with a hook at the first step);
- **statistics**: mean and (unbiased) standard deviation of each neuron's activation over non-memorized prompts
  (50,000 LAION prompts for the released ``statistics_additional_laion_prompts_v1_4.pt``); an input, never guessed;
- **initial selection** (``initial_neuron_selection``, ``3_detect_memorized_neurons.py``): the neurons with
  ``|a - mean| / std > theta`` plus the ``k`` of largest ``|a|`` per layer; starting at theta = 5, k = 0, each
  round lowers theta by 0.25 (not below 1) and raises k by 1 until deactivating them makes the early noise
  difference unlike the undisturbed one (max MS-SSIM <= 0.428 over the seeds), or theta reaches 1 / k the widest
  layer;
- **noise difference** (``compute_noise_diff``): the conditional-only prediction at the second DDIM step minus the
  latent there, min-max scaled per image and channel; MS-SSIM with kernel 11 and betas (0.33, 0.33, 0.33); only the
  seeds whose undisturbed difference is like another seed's (max pairwise MS-SSIM > 0.428) are looked at, and a
  prompt with none is not memorized (no neurons);
- **refinement** (``neuron_refinement``): layers (last first), then single neurons (last layer first), are given back
  while the rest still keeps the max MS-SSIM below the threshold;
- **deactivation** (``hooks/block_activations.py``, ``utils/stable_diffusion.py``): the chosen neurons' ``to_v``
  outputs are multiplied by ``scaling_factor`` (0) in both halves of the CFG batch at every step.

be-bench's differences (docs/protocols.md): initial lists hold each neuron once (the official may list a neuron
twice, once as an outlier and once in the top k, which changes nothing deactivated); the round limit is theta
reaching ``min_theta`` or k the widest value layer (the official hard-codes ``theta == 1``, ``k >= 1280``, equal on
SD v1-4 with its defaults); the MS-SSIM kernel is a knob, since latents smaller than 41 pixels (the testbed's 32)
cannot take 3 scales of kernel 11.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import AfterValidator, Field
from safetensors.torch import load_file, save_file

from benchmark.core.config_types import Count, MaybeName, NonNegative, Positive, Seed
from benchmark.mitigation.interface import Intervention
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import (
    SamplerSettings,
    SamplingSetup,
    cross_attention_layers,
    ddim_step,
    initial_noise,
)
from benchmark.store.job_folder import file_fingerprint


def _odd(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"an MS-SSIM window is odd, got {kernel}")
    return kernel


VALUE_BLOCKS = ("down_blocks.", "mid_block.")  # the official value layers: the down path and the middle block
SSIM_BETAS = (0.33, 0.33, 0.33)  # utils/activation_detection.py: three scales, equal weights

Neurons = dict[str, list[int]]  # value layer -> neuron indices


def value_layers(unet: torch.nn.Module, method: str = "nemo") -> dict[str, torch.nn.Linear]:
    """The ``to_v`` projections NeMo reads and deactivates, by cross-attention layer name, in forward order. Raises
    ValueError naming ``method`` for a model without cross-attention in its down path or middle block."""
    layers = {name: attn.to_v for name, attn in cross_attention_layers(unet).items() if name.startswith(VALUE_BLOCKS)}
    if not layers:
        raise ValueError(f"mitigation {method}: the model has no cross-attention value layers in its down path or "
                         "middle block")
    return layers


@torch.no_grad()
def value_activations(model: TextToImage, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per value layer (n, neurons): ``|to_v(e)|`` of each prompt's padded text embedding e, mean over tokens
    (1_compute_activations_statistics.py)."""
    cond = torch.cat([model.encode([p]) for p in prompts])
    return {name: layer(cond).abs().mean(1).float().cpu() for name, layer in value_layers(model.unet).items()}


@dataclass
class ActivationStatistics:
    """Mean and standard deviation of every value neuron's activation over ``prompts`` non-memorized prompts."""

    mean: dict[str, torch.Tensor]  # layer -> (neurons,)
    std: dict[str, torch.Tensor]
    prompts: int
    model_id: str
    source: str = ""  # what the prompts were (a prompt set's name)

    def check(self, model: TextToImage, method: str = "nemo") -> None:
        """ValueError naming ``method`` unless these statistics cover exactly the model's value layers and widths."""
        layers = value_layers(model.unet, method)
        widths = {k: v.out_features for k, v in layers.items()}
        mine = {k: len(v) for k, v in self.mean.items()}
        if mine != widths:
            raise ValueError(f"mitigation {method}: activation statistics of {self.model_id!r} ({mine}) do not fit "
                             f"{model.model_id!r}'s value layers ({widths})")

    def save(self, path: str | Path) -> Path:
        tensors = {f"mean/{k}": v.contiguous() for k, v in self.mean.items()}
        tensors |= {f"std/{k}": v.contiguous() for k, v in self.std.items()}
        meta = {"prompts": str(self.prompts), "model_id": self.model_id, "source": self.source,
                "layers": json.dumps(list(self.mean))}
        save_file(tensors, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, method: str = "nemo") -> ActivationStatistics:
        """Raises FileNotFoundError naming ``method`` when there is no such file: NeMo cannot run without them."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"mitigation {method}: no activation statistics at {path} (compute them over "
                                    "non-memorized prompts first)")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        layers = json.loads(meta["layers"])
        return cls({k: tensors[f"mean/{k}"] for k in layers}, {k: tensors[f"std/{k}"] for k in layers},
                   int(meta["prompts"]), meta["model_id"], meta.get("source", ""))


def activation_statistics(model: TextToImage, prompts: list[str], source: str = "",
                          batch: int = 64) -> ActivationStatistics:
    """The statistics over ``prompts`` (at least two): per neuron the mean and ``torch.std`` (unbiased) of
    :func:`value_activations`. Raises ValueError for fewer than two prompts."""
    if len(prompts) < 2:
        raise ValueError(f"mitigation nemo: activation statistics need at least 2 prompts, got {len(prompts)}")
    parts = [value_activations(model, prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    acts = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return ActivationStatistics({k: a.mean(0) for k, a in acts.items()}, {k: a.std(0) for k, a in acts.items()},
                                len(prompts), model.model_id, source)


NON_MEMORIZED = "nonmemorized"  # knobs.nemo.statistics: computed over the prompt set's non-memorized prompts


def statistics_file(statistics: str, model: TextToImage, model_key: str, prompts: list[str], folder: str | Path,
                    source: str = "") -> str:
    """The statistics file NeMo reads: ``statistics`` itself (a file of yours, e.g. the official LAION statistics
    converted), or for :data:`NON_MEMORIZED` the statistics over ``prompts`` (the job's non-memorized prompts),
    computed once into ``folder`` under a name of the model and prompts, then reused. Raises ValueError (from
    :func:`activation_statistics`) for fewer than two prompts."""
    if statistics != NON_MEMORIZED:
        return statistics
    digest = hashlib.sha1(json.dumps([model_key, prompts]).encode()).hexdigest()[:16]
    path = Path(folder) / f"{digest}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".partial")
        activation_statistics(model, prompts, source).save(part)
        part.replace(path)  # a killed job leaves no half-written file under the final name
    return str(path)


def outlier_neurons(activations: dict[str, torch.Tensor], stats: ActivationStatistics, theta: float,
                    k: int) -> Neurons:
    """Per layer, the neurons of one prompt's ``activations`` (layer -> (neurons,)) with ``|a - mean| / std > theta``,
    then the ``k`` of largest ``|a|`` not among them (initial_neuron_selection); ``theta = inf`` disables the first
    rule, ``k = 0`` the second."""
    out = {}
    for layer, a in activations.items():
        z = (a - stats.mean[layer]).abs() / stats.std[layer]
        chosen = (z > theta).nonzero().flatten().tolist()
        top = a.abs().topk(min(k, len(a))).indices.tolist()
        out[layer] = list(dict.fromkeys(chosen + top))
    return out


@contextmanager
def deactivated(model: TextToImage, neurons: Neurons, factor: float = 0.0) -> Iterator[None]:
    """Multiply the ``to_v`` outputs of ``neurons`` by ``factor`` (0: deactivated) in every call, for every row of
    the batch, until exit (hooks/block_activations.py). Raises ValueError for a layer that is not a value layer or
    an index outside it, before anything is hooked."""
    layers = value_layers(model.unet)
    for layer, idx in neurons.items():
        if layer not in layers or any(not 0 <= i < layers[layer].out_features for i in idx):
            raise ValueError(f"mitigation nemo: no value neuron {layer}{idx}")
    handles = []

    def hook_for(idx):
        index = torch.tensor(idx, dtype=torch.long)

        def scale(module, args, out):
            out = out.clone()
            out[..., index.to(out.device)] *= factor
            return out
        return scale

    try:
        for layer, idx in neurons.items():
            if idx:
                handles.append(layers[layer].register_forward_hook(hook_for(idx)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def neuron_counts(neurons: Neurons) -> dict[str, int]:
    """How many neurons each layer holds (the per-prompt report: how many, in which layers)."""
    return {layer: len(idx) for layer, idx in neurons.items()}


@torch.no_grad()
def noise_differences(model: TextToImage, prompt: str, seeds: list[int], sampler: SamplerSettings,
                      neurons: Neurons | None = None, factor: float = 0.0, step: int = 1) -> torch.Tensor:
    """(len(seeds), c, h, w) NeMo's early noise difference: DDIM (eta = 0) without guidance (the conditional
    prediction alone, the official ``guidance_scale = 0``) from each seed's initial noise, ``neurons`` deactivated;
    at ``step`` (the official ``early_stopping = 1``: the second step) the prediction minus the latent, min-max
    scaled per image and channel (compute_noise_diff)."""
    latents = initial_noise(model, seeds, sampler)
    cond = model.encode([prompt]).expand(len(seeds), -1, -1)
    scheduler = model.scheduler
    scheduler.set_timesteps(sampler.steps)
    with deactivated(model, neurons or {}, factor):
        for i, t in enumerate(scheduler.timesteps.tolist()):
            eps = model.noise_prediction(scheduler.scale_model_input(latents, t), t, cond)
            if i >= step or i == sampler.steps - 1:
                diff = (eps - latents).float()
                low, high = diff.amin(dim=(2, 3), keepdim=True), diff.amax(dim=(2, 3), keepdim=True)
                return (diff - low) / (high - low)
            latents = ddim_step(scheduler, eps, t, latents, 0.0, None)
    raise ValueError(f"mitigation nemo: no steps to take (sampler.steps={sampler.steps})")


def ms_ssim(a: torch.Tensor, b: torch.Tensor, kernel: int = 11) -> torch.Tensor:
    """(n,) multi-scale SSIM of image pairs (n, c, h, w), torchmetrics' with three scales weighted 0.33 each and a
    Gaussian window of ``kernel`` taps (11, sigma 1.5: the official call). Raises ValueError naming NeMo when the
    images are too small for the kernel at 3 scales."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    need = (kernel - 1) * 2 ** (len(SSIM_BETAS) - 1)
    if min(a.shape[-2:]) <= need:
        raise ValueError(f"mitigation nemo: MS-SSIM with kernel {kernel} at 3 scales needs images larger than "
                         f"{need} px, got {tuple(a.shape[-2:])} (lower nemo's ssim_kernel)")
    # torchmetrics sizes a Gaussian window from sigma alone (kernel_size is then unused): sigma 1.5, the default
    # the official call keeps, gives its 11 taps; other kernels scale sigma alike (0.15 per tap beyond the first)
    return multiscale_structural_similarity_index_measure(a, b, sigma=0.15 * (kernel - 1), kernel_size=kernel,
                                                          betas=SSIM_BETAS, reduction="none")


def max_pairwise_ssim(diffs: torch.Tensor, kernel: int = 11) -> torch.Tensor:
    """(n,) for each image the largest MS-SSIM against any other of the n (calculate_max_pairwise_ssim)."""
    pairs = torch.combinations(torch.arange(len(diffs)), r=2)
    ssim = ms_ssim(diffs[pairs[:, 0]], diffs[pairs[:, 1]], kernel)
    return torch.stack([ssim[(pairs == i).any(1)].max() for i in range(len(diffs))])


@dataclass(frozen=True)
class NeMoSettings:
    """The official knobs (3_detect_memorized_neurons.py defaults). ``factor``, the strength of the deactivation:
    the deactivated neurons' outputs are multiplied by it (0 = off; LOWER is stronger)."""

    samples: int = 10  # --samples_per_prompt
    seed: int = 1  # --seed
    pairwise_threshold: float = 0.428  # --pairwise_ssim_threshold: mean + 1 std of unmemorized prompts' SSIM
    initial_threshold: float = 0.428  # --ssim_threshold_initial_selection
    refinement_threshold: float = 0.428  # --ssim_threshold_refinement
    initial_theta: float = 5.0
    theta_step: float = 0.25  # --theta_reduction_per_step
    min_theta: float = 1.0
    initial_k: int = 0
    factor: float = 0.0  # --scaling_factor
    ssim_kernel: int = 11

    def __post_init__(self):
        if self.samples < 2 or self.ssim_kernel < 3 or self.ssim_kernel % 2 == 0 or self.theta_step <= 0:
            raise ValueError(f"mitigation nemo: needs samples >= 2, an odd ssim_kernel >= 3 and theta_step > 0: "
                             f"{self}")
        if not 0 <= self.factor < 1:
            raise ValueError(f"mitigation nemo: factor must be in [0, 1) (1 deactivates nothing), got {self.factor}")


@dataclass
class NeuronSearch:
    initial: Neurons
    refined: Neurons
    initial_ssim: float
    refined_ssim: float
    looked_at: torch.Tensor  # (samples,) bool: seeds whose undisturbed difference was like another's
    evaluations: int = 0  # noise-difference computations (each: 2 UNet steps per seed looked at)
    rounds: list[tuple[float, int, float]] = field(default_factory=list)  # (theta, k, max MS-SSIM) per round


def find_neurons(difference: Callable[[Neurons | None], torch.Tensor], activations: dict[str, torch.Tensor],
                 stats: ActivationStatistics, settings: NeMoSettings) -> NeuronSearch:
    """NeMo's search for one prompt. ``difference(neurons)`` gives the noise differences (samples, c, h, w) of the
    prompt's seeds with ``neurons`` deactivated (None: none); ``activations`` its value activations (layer ->
    (neurons,)). Returns empty lists when no seed's difference is like another's (not memorized). Source:
    3_detect_memorized_neurons.py and utils/activation_detection.py."""
    count = [0]

    def diff(neurons):
        count[0] += 1
        return difference(neurons)

    def max_ssim(a, b):
        return float(ms_ssim(a, b, settings.ssim_kernel).max())

    unblocked = diff(None)
    looked_at = max_pairwise_ssim(unblocked, settings.ssim_kernel) > settings.pairwise_threshold
    empty = {layer: [] for layer in activations}
    if not looked_at.any():
        return NeuronSearch(empty, empty, 0.0, 0.0, looked_at, count[0])
    vanilla = unblocked[looked_at]
    widest = max(len(a) for a in activations.values())
    theta, k, ssim = settings.initial_theta, settings.initial_k, 1.0
    threshold = settings.refinement_threshold
    rounds = []
    while ssim > settings.initial_threshold:
        blocked = outlier_neurons(activations, stats, theta, k)
        ssim = max_ssim(vanilla, diff(blocked)[looked_at])
        rounds.append((theta, k, ssim))
        if ssim > settings.initial_threshold:
            if theta > settings.min_theta:
                theta -= settings.theta_step
            k += 1
        if theta == settings.min_theta or k >= widest:
            threshold = ssim  # the official: refine against what the last round reached
            break
    refined = {layer: list(idx) for layer, idx in blocked.items()}
    for layer in reversed(list(refined)):  # whole layers first
        if refined[layer]:
            trial = {**refined, layer: []}
            if max_ssim(vanilla, diff(trial)[looked_at]) < threshold:
                refined[layer] = []
    for layer in reversed(list(refined)):  # then single neurons
        for neuron in list(refined[layer]):
            trial = {**refined, layer: [i for i in refined[layer] if i != neuron]}
            if max_ssim(vanilla, diff(trial)[looked_at]) < threshold:
                refined[layer] = trial[layer]
    refined_ssim = max_ssim(vanilla, diff(refined)[looked_at])
    return NeuronSearch(blocked, refined, ssim, refined_ssim, looked_at, count[0], rounds)


@contextmanager
def deactivated_per_image(model: TextToImage, neurons: list[Neurons], factor: float = 0.0) -> Iterator[None]:
    """As :func:`deactivated` for a CFG batch of n images (2n rows, unconditional half first) where image i has its
    own ``neurons[i]`` (rows i and n + i), as the official deactivates a prompt's neurons in both halves. Raises
    ValueError when a call's batch is not 2n rows."""
    layers = value_layers(model.unet)
    n = len(neurons)
    multipliers = {}
    for layer, to_v in layers.items():
        m = torch.ones(2 * n, to_v.out_features)
        for i, chosen in enumerate(neurons):
            idx = chosen.get(layer, [])
            if any(not 0 <= j < to_v.out_features for j in idx):
                raise ValueError(f"mitigation nemo: no value neuron {layer}{idx}")
            m[[i, n + i]] = m[[i, n + i]].index_fill(1, torch.tensor(idx, dtype=torch.long), factor)
        if (m != 1).any():
            multipliers[layer] = m

    def hook_for(m):
        def scale(module, args, out):
            if out.shape[0] != len(m):
                raise ValueError(f"mitigation nemo: deactivation set for {n} images met a batch of {out.shape[0]} rows")
            return out * m.to(out.device, out.dtype)[:, None, :]
        return scale

    handles = [layers[layer].register_forward_hook(hook_for(m)) for layer, m in multipliers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def statistics_digest(path: str) -> str:
    """The statistics file's content fingerprint (its store-key part: other statistics, other neurons); "none"
    without a file."""
    return file_fingerprint(path) if path and Path(path).is_file() else "none"


def _nemo_tag(knobs: dict) -> str:
    settings = NeMoSettings(**{k: v for k, v in knobs.items() if k != "statistics"})
    default = NeMoSettings()
    changed = [(f.name, getattr(settings, f.name)) for f in fields(NeMoSettings)
               if f.name != "factor" and getattr(settings, f.name) != getattr(default, f.name)]
    # knobs off their official defaults enter as one hash: spelt out they could pass the store's 80-character key
    # part (traces.slug) and two settings would share a folder
    suffix = f"-k{hashlib.sha1(repr(changed).encode()).hexdigest()[:8]}" if changed else ""
    return f"nemo-f{settings.factor:g}-stats{statistics_digest(knobs['statistics'])}{suffix}"


def nemo_intervention(statistics: str, settings: NeMoSettings) -> Intervention:
    """NeMo for one sampling call: before the loop (outside capture), the neurons of each distinct prompt are
    searched (:func:`find_neurons`, on ``settings.samples`` seeds from ``settings.seed`` and the call's step count);
    during it they are deactivated in their images' rows (:func:`deactivated_per_image`). ``stats``: ``neurons`` (the
    count per image) and ``neurons/<layer>``; the search's UNet evaluations count as the method's cost."""
    out = Intervention()
    found: dict[str, Neurons] = {}

    def load(model: TextToImage) -> ActivationStatistics:
        if not statistics:
            raise ValueError("needs activation statistics over non-memorized prompts (knobs.nemo.statistics=<file> "
                             "written by benchmark.mitigation.neurons.activation_statistics, or nonmemorized: "
                             "computed over the prompt set's non-memorized prompts)")
        try:
            stats = ActivationStatistics.load(statistics)
        except FileNotFoundError as err:
            raise ValueError(str(err).removeprefix("mitigation nemo: ")) from None
        stats.check(model)
        return stats

    def check(model: TextToImage) -> None:
        load(model)

    def search(setup: SamplingSetup) -> torch.Tensor:
        model = setup.model
        stats = load(model)
        sampler = replace(setup.settings, seeding="per_image", eta=0.0, end_map_steps=())
        seeds = list(range(settings.seed, settings.seed + settings.samples))
        for prompt in dict.fromkeys(setup.prompts):
            acts = {k: v[0] for k, v in value_activations(model, [prompt]).items()}
            result = find_neurons(lambda neurons, p=prompt: noise_differences(model, p, seeds, sampler, neurons,
                                                                               settings.factor),
                                  acts, stats, settings)
            found[prompt] = result.refined
        per_image = [found[p] for p in setup.prompts]
        out.stats["neurons"] = np.array([sum(neuron_counts(x).values()) for x in per_image], dtype=np.float64)
        for layer in value_layers(model.unet):
            out.stats[f"neurons/{layer}"] = np.array([len(x.get(layer, [])) for x in per_image], dtype=np.float64)
        return setup.latents

    out.check = check
    out.latents = search
    out.modules = lambda setup: deactivated_per_image(setup.model, [found[p] for p in setup.prompts],
                                                      settings.factor)
    return out


@MITIGATIONS.register("nemo", label="NeMo (memorization neurons deactivated)", acts_on="modules", needs_mask=False,
                      strength="factor", stronger="lower", strengths=(0.0,),
                      requires=("cross_attention", "text_encoder"), tag=_nemo_tag)
def nemo(factor: Annotated[float, Field(ge=0, lt=1)] = 0.0, statistics: MaybeName = "",
         samples: Annotated[int, Field(ge=2)] = 10, seed: Seed = 1, pairwise_threshold: float = 0.428,
         initial_threshold: float = 0.428, refinement_threshold: float = 0.428, initial_theta: Positive = 5.0,
         theta_step: Positive = 0.25, min_theta: NonNegative = 1.0, initial_k: Count = 0,
         ssim_kernel: Annotated[int, Field(ge=3), AfterValidator(_odd)] = 11) -> Intervention:
    """NeMo with the official defaults (3_detect_memorized_neurons.py, 4_generate_images.py --refined_neurons);
    ``statistics``: a file of :class:`ActivationStatistics` for this model, or ``nonmemorized`` (the job computes
    them over its prompt set's non-memorized prompts, :func:`statistics_file`); no default: the method fails
    before sampling without one."""
    settings = NeMoSettings(samples=samples, seed=seed, pairwise_threshold=pairwise_threshold,
                            initial_threshold=initial_threshold, refinement_threshold=refinement_threshold,
                            initial_theta=initial_theta, theta_step=theta_step, min_theta=min_theta,
                            initial_k=initial_k, factor=factor, ssim_kernel=ssim_kernel)
    return nemo_intervention(statistics, settings)
