"""`make bench` (CPU) and `make bench-gpu`: side-by-side timings on SD v1-4's architecture (random weights).

`make bench` prints one ``name: value`` line per figure:
- capture_overhead_ratio: sampling with capture / diffusers' StableDiffusionPipeline, same seeds (goal <= 1.10);
- rescore_ratio: re-scoring a 12-point layer x T grid from stored traces / one sampling pass (goal <= 0.02);
- trace_kib_per_image: trace file + PNG on disk per image;
- prompt_batching_ratio: 16 one-image prompts sampled with capture in one call / in 16 calls (lower is better;
  at ``--batching-resolution`` and ``--batching-steps``);
- host_transfers_per_call: host copies (``.cpu/.item/.numpy/.tolist``) in one capture call, whatever its steps
  and layers (the timestep list, the trace, the decoded images);
- bootstrap_batch_ratio_n<N>: 1000 bootstrap replicates of AUC/TPR/F1 on N scores, all rows at once (as
  ``metrics.detection_metrics`` does) / one replicate per Python call, same draws (make run's 140 and 560 scores);
- sail_cost_ratio, anisotropy_cost_ratio, curvature_cost_ratio: the extra pass of SAIL (k=1), the anisotropy score
  and a curvature map (16 probes, last step) / one plain generation of ``--steps`` steps, same seeds
  (``benchmark.detectors.jacobian``; per image, as both handle the same batch);
- early_stop_none_ratio, early_stop_all_ratio: sampling with in-loop early stopping at step ``steps // 3`` (LD
  over the steps so far) / sampling with capture, when no image crosses the threshold (the cost of the check) and
  when every image does (the saving; ideally (k + 1) / steps), ``benchmark.early.stopping``;
- mitigation_<name>_cost_ratio and mitigation_<name>_extra_unet_evals, for every registered mitigation at its
  first registered strength and official knobs (``bench_knobs``: NeMo's statistics, PRSS without a rephrasings
  file), on the tiny model (whatever ``--model``): a mitigated generation
  / a plain one through the same traced loop, and the UNet evaluations per image beyond plain sampling's
  2 x steps (``benchmark.mitigation``; a BE-masked method gets a uniform mask).
A and B alternate, and the best of ``--repeats`` rounds counts, because these machines are noisy.

`make bench-gpu` (``--gpu-suite``): 512 px, 50 steps, float16 and bfloat16, 16 images per call as one prompt x 16
seeds (``batch16``) and as 16 prompts x 1 seed (``n1x16``); per case images/s of the plain pipeline and of
capture, their ratio, the achieved TFLOP/s of the UNet (FLOPs counted by torch's FlopCounterMode on one CFG call,
times the steps) and its fraction of the device's dense peak (``benchmark.core.profiling.PEAK_TFLOPS``), and the trace
size. It stops starting new cases after ``--budget-s`` seconds. ``--model`` any in-process architecture: the plain
reference is its family's own diffusers pipeline (``sdxl-architecture``, ``pixart-architecture`` at 1024 px).

`make bench` also prints (``--flops``) ``flops_<family>_<part>_tflop``: the FLOPs per image of each family's full
architecture at its preset's size and 50 steps, counted by FlopCounterMode on the meta device (no weights, no
memory: seconds on a CPU), split into text encoding, one CFG denoiser step, the VAE decode and their total
(:func:`family_flops`). ``--device cpu --model tiny --resolution 64
--steps 2`` runs it in seconds (tests/test_bench.py does).
"""
from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmark.core.profiling import count_flops, count_host_transfers, peak_tflops
from benchmark.data.prompts import inline_prompt_set
from benchmark.detectors import detection, jacobian
from benchmark.early.stopping import StopRule, sample_with_early_stop
from benchmark.measures.metrics import _metric_rows
from benchmark.models.text_to_image import DTYPES, TextToImage
from benchmark.registry import MODEL_BUILDERS
from benchmark.sampling.capture import SamplerSettings, sample_with_capture
from benchmark.store.traces import TraceStore

PROMPT = "Mothers influence on her young hippo"
SUBJECTS = ["hippo", "cat", "lighthouse", "bicycle", "teapot", "mountain", "violin", "owl", "tram", "cactus",
            "castle", "fox", "sailboat", "lamp", "dragonfly", "bridge"]


def prompts_for(n: int) -> list[str]:
    return [f"a photo of a {SUBJECTS[i % len(SUBJECTS)]}, variant {i}" for i in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def config_check_seconds(repeats: int = 20) -> float:
    """One job's config check (``benchmark.jobs.config.check_job`` on the composed default detection config), in
    seconds: what every runner adds before loading a model."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from benchmark.jobs.config import check_job
    from runners.common import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        config = OmegaConf.to_container(compose("detect"), resolve=True)
    check_job(config)  # imports and caches outside the timing
    return timed(lambda: [check_job(config) for _ in range(repeats)]) / repeats


def bootstrap_ratio(n: int, n_pos: int, replicates: int = 1000, repeats: int = 2) -> float:
    rng = np.random.default_rng(0)
    labels = np.arange(n) < n_pos
    scores = rng.normal(size=n) + labels
    idx = np.concatenate([rng.choice(n_pos, (replicates, n_pos)),
                          rng.choice(np.arange(n_pos, n), (replicates, n - n_pos))], axis=1)
    batched = [timed(lambda: _metric_rows(labels[idx], scores[idx])) for _ in range(repeats)]
    looped = [timed(lambda: [_metric_rows(labels[i][None], scores[i][None]) for i in idx]) for _ in range(repeats)]
    return min(batched) / min(looped)


def pipeline(model: TextToImage) -> DiffusionPipeline:
    """diffusers' own pipeline of the model's family (``model.pipeline_class``: StableDiffusionPipeline,
    StableDiffusionXLPipeline, PixArtAlphaPipeline) on the same components: the no-capture reference. Its scheduler
    reads the network's own prediction type (v on SD 2.1 at 768 px); the model's is kept at epsilon for
    ``noise_prediction``'s output."""
    cls = getattr(diffusers, model.pipeline_class)
    scheduler = type(model.scheduler).from_config(model.scheduler.config, prediction_type=model.prediction_type)
    parts = {"safety_checker": None, "feature_extractor": None, "image_encoder": None,
             "requires_safety_checker": False, **model.components(), "scheduler": scheduler,
             **model.pipeline_config()}
    accepted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in parts.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_call(pipe, prompts: list[str], seeds: list[int], settings: SamplerSettings):
    """The pipeline on one image per (prompt, seed), latents out (no decoding, like capture with decode=False)."""
    # PixArt's pipeline: the size as asked (no binning to its aspect-ratio table) and the prompt as given, as capture
    family = {"use_resolution_binning": False, "clean_caption": False}
    accepted = inspect.signature(type(pipe).__call__).parameters
    return lambda: pipe(prompts, height=settings.height, width=settings.width, num_inference_steps=settings.steps,
                        guidance_scale=settings.guidance, num_images_per_prompt=1,
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent",
                        **{k: v for k, v in family.items() if k in accepted})


def capture_call(model: TextToImage, prompts: list[str], seeds: list[int], settings: SamplerSettings):
    return lambda: sample_with_capture(model, prompts, seeds, settings, decode=False)


def alternate(fns: list, repeats: int, sync) -> list[float]:
    """Best wall time of each function over ``repeats`` rounds, the functions alternating (after one warm-up)."""
    for fn in fns:
        fn(), sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            out.append(timed(lambda fn=fn: (fn(), sync())))
    return [min(t) for t in times]


def sail_cost_ratio(model, plain, settings: SamplerSettings, seeds: list[int], repeats: int = 2,
                    sync=lambda: None) -> float:
    """SAIL at its official k=1 (one guided pass + one JVP with math attention) / one plain generation."""
    plain_s, method_s = alternate([plain, lambda: jacobian.sail(model, PROMPT, seeds, settings)], repeats, sync)
    return method_s / plain_s


def anisotropy_cost_ratio(model, plain, settings: SamplerSettings, seeds: list[int], repeats: int = 2,
                          sync=lambda: None) -> float:
    """The anisotropy score (two guided passes on the initial noise) / one plain generation."""
    plain_s, method_s = alternate([plain, lambda: jacobian.anisotropy(model, PROMPT, seeds, settings)], repeats,
                                  sync)
    return method_s / plain_s


def curvature_cost_ratio(model, plain, settings: SamplerSettings, seeds: list[int], repeats: int = 2,
                         sync=lambda: None) -> float:
    """A curvature map at the last step with the official 16 probes (trajectory + one graph + 16 backward
    passes) / one plain generation."""
    plain_s, method_s = alternate([plain, lambda: jacobian.curvature_map(model, PROMPT, seeds, settings)], repeats,
                                  sync)
    return method_s / plain_s


def early_stop_ratios(model, settings: SamplerSettings, seeds: list[int], repeats: int = 2,
                      sync=lambda: None) -> tuple[float, float]:
    """Guarded sampling (stop at step steps // 3) with no image stopped, and with every image stopped / capture."""
    def guarded(threshold: float):
        rule = StopRule(settings.steps // 3, "LD", ("*",), settings.steps, threshold)
        return lambda: sample_with_early_stop(model, PROMPT, seeds, settings, rule, decode=False)

    capture_s, none_s, all_s = alternate([capture_call(model, [PROMPT] * len(seeds), seeds, settings),
                                          guarded(np.inf), guarded(-np.inf)], repeats, sync)
    return none_s / capture_s, all_s / capture_s


def mitigation_costs(model: TextToImage, settings: SamplerSettings, seeds: list[int], repeats: int = 2,
                     sync=lambda: None, knobs: dict | None = None) -> dict[str, tuple[float, float]]:
    """Per registered mitigation: (wall time of a mitigated generation / a plain one with capture, extra UNet
    evaluations per image), each method at its first registered strength (0.2 for one without) with its official
    knobs, or ``knobs[name]``."""
    from benchmark.mitigation.interface import settings_for
    from benchmark.mitigation.tradeoff import counting_unet_rows
    from benchmark.registry import MITIGATIONS

    plain = capture_call(model, [PROMPT] * len(seeds), seeds, settings)
    shape = model.latent_shape(settings.height, settings.width)[-2:]
    out = {}
    for name in MITIGATIONS:
        entry = MITIGATIONS[name]
        strengths = None if entry.strength is None else list(entry.strengths)[:1] or [0.2]
        setting = settings_for(name, strengths, (knobs or {}).get(name))[0]
        mask = torch.ones(len(seeds), *shape) if setting.needs_mask else None

        def mitigated(setting=setting, mask=mask):
            return sample_with_capture(model, PROMPT, seeds, settings, decode=False,
                                       intervention=setting.intervention(), mask=mask)

        with counting_unet_rows(model.unet) as rows:
            mitigated()
        plain_s, method_s = alternate([plain, mitigated], repeats, sync)
        out[name] = (method_s / plain_s, rows[0] / len(seeds) - 2 * settings.steps)
    return out


def bench_knobs(model: TextToImage, folder: str) -> dict[str, dict]:
    """Knobs for the methods that cannot run on their defaults alone: NeMo's activation statistics (over a few
    prompts, written under ``folder``) and a window that fits the tiny model's 16 px latents; PRSS without a
    rephrasings file (re-anchoring alone)."""
    from benchmark.mitigation.neurons import activation_statistics

    prompts = ["a photo of a cat on a red sofa", "an astronaut riding a horse, oil painting", "a red circle"]
    statistics = activation_statistics(model, prompts).save(Path(folder) / "nemo_statistics.safetensors")
    return {"nemo": {"statistics": str(statistics), "ssim_kernel": 3},
            "prss": {"rephraser": "none"}, "prss_be": {"rephraser": "none"}}


def sampling_flops(model: TextToImage, prompts: list[str], seeds: list[int], settings: SamplerSettings,
                   steps: int) -> int:
    """FLOPs of one plain sampling call of ``steps`` steps (text encoding included, decoding not), as torch's
    FlopCounterMode counts them; runs on a model built on the meta device too (:func:`family_flops`)."""
    call = replace(settings, steps=steps)
    with torch.no_grad(), countable(model):
        return count_flops(lambda: sample_with_capture(model, prompts, seeds, call, record=False, decode=False))


def denoiser_flops_per_step(model: TextToImage, prompts: list[str], seeds: list[int],
                            settings: SamplerSettings) -> int:
    """FLOPs of the denoiser (UNet or transformer) in one CFG step of a call: a 2-step call less a 1-step call, so
    every family's own conditions (SDXL's added embeddings, PixArt's mask) are in and the text encoding cancels."""
    return sampling_flops(model, prompts, seeds, settings, 2) - sampling_flops(model, prompts, seeds, settings, 1)


def unet_flops_per_call(model: TextToImage, prompts: list[str], seeds: list[int], settings: SamplerSettings) -> int:
    """FLOPs of the denoiser over one sampling call: one CFG step's (:func:`denoiser_flops_per_step`) times the
    steps."""
    return denoiser_flops_per_step(model, prompts, seeds, settings) * settings.steps


@contextmanager
def countable(model: TextToImage):
    """Where FlopCounterMode counts every FLOP of ``model``'s calls. On the CPU, torch's fused attention kernel is not
    in its table (it would count 0 for every attention): the math kernel runs instead, whose matmuls it counts (the
    meta device and CUDA's fused kernels are counted as they are). transformers asks a T5 padding mask whether it
    may be dropped (``mask.all()``, a data-dependent question a meta tensor cannot answer): answered "keep it",
    which changes no FLOPs, only the kernel called."""
    import transformers.masking_utils as masking

    with ExitStack() as stack:
        if model.device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if hasattr(masking, "_ignore_bidirectional_mask_sdpa"):
            stack.enter_context(mock.patch.object(masking, "_ignore_bidirectional_mask_sdpa", return_value=False))
        yield


# Each family's full architecture (random weights) at its preset's size and steps (conf/model, conf/sampler).
FAMILIES = (("sd-v1-4", "sd14-architecture", 512), ("sd-2-1", "sd2-architecture", 768),
            ("sdxl", "sdxl-architecture", 1024), ("pixart-alpha", "pixart-architecture", 1024))


def family_flops(builder: str, resolution: int, steps: int = 50, device: str = "meta") -> dict[str, float]:
    """FLOPs per image of a family's generation, in TFLOP: ``text`` (the prompt's and the empty prompt's
    encoding), ``denoiser_step`` (one CFG step: both halves), ``decode`` (the VAE), ``per_image`` (text + steps x
    denoiser_step + decode). On ``device="meta"`` the architecture is built without memory or weights and only the
    shapes are computed (seconds even for T5-XXL), which FlopCounterMode counts as it counts real tensors."""
    with torch.device(device):
        model = MODEL_BUILDERS[builder]()
    settings = SamplerSettings(steps, 7.5, resolution, resolution)
    one, two = (sampling_flops(model, [PROMPT], [0], settings, s) for s in (1, 2))
    step = two - one  # as denoiser_flops_per_step, the 1-step call kept for the text encoding
    text = one - step
    latents = torch.zeros((1, *model.latent_shape(resolution, resolution)), device=model.device, dtype=model.dtype)
    with torch.no_grad(), countable(model):
        decode = 0 if model.vae is None else count_flops(lambda: model.vae.decode(latents))
    out = {"text": text, "denoiser_step": step, "decode": decode, "per_image": text + steps * step + decode}
    return {k: v / 1e12 for k, v in out.items()}


def print_family_flops(steps: int = 50) -> None:
    for family, builder, resolution in FAMILIES:
        figures = family_flops(builder, resolution, steps)
        for part, tflop in figures.items():
            print(f"flops_{family.replace('-', '_')}_{part}_tflop: {tflop:.4g} ({resolution} px, {steps} steps)")


def trace_kib_per_image(batch) -> float:
    """Arrays of one image's trace at the store's float16 (PNG not counted)."""
    parts = [batch.delta_sq, batch.latents, *batch.end_maps.values(), *batch.token_attn.values()]
    return sum(p.numel() for p in parts) * 2 / len(batch.latents) / 1024


def gpu_suite(args) -> dict[str, float]:
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    peak = peak_tflops(name)
    print(f"device: {name} (dense fp16/bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'not in the table'}), "
          f"{args.model}, {args.resolution} px, {args.steps} steps, {args.batch} images per call")
    settings = SamplerSettings(args.steps, 7.5, args.resolution, args.resolution)
    seeds = list(range(args.batch))
    start, figures = time.perf_counter(), {}
    for dtype in args.dtypes:
        model = MODEL_BUILDERS[args.model]().to(device, DTYPES[dtype])
        if args.compile:
            model.unet.compile()
        pipe = pipeline(model)
        for layout, prompts in (("batch16", [PROMPT] * args.batch), ("n1x16", prompts_for(args.batch))):
            if time.perf_counter() - start > args.budget_s:
                print(f"{dtype} {layout}: skipped, past the {args.budget_s} s budget")
                continue
            flops = unet_flops_per_call(model, prompts, seeds, settings)
            plain_s, capture_s = alternate([plain_call(pipe, prompts, seeds, settings),
                                            capture_call(model, prompts, seeds, settings)], args.repeats, sync)
            tag = f"{dtype}_{layout}"
            figures |= {f"{tag}_plain_images_per_s": args.batch / plain_s,
                        f"{tag}_capture_images_per_s": args.batch / capture_s,
                        f"{tag}_capture_ratio": capture_s / plain_s,
                        f"{tag}_plain_tflops": flops / plain_s / 1e12,
                        f"{tag}_capture_tflops": flops / capture_s / 1e12}
            if peak:
                figures[f"{tag}_capture_peak_fraction"] = flops / capture_s / 1e12 / peak
            for key in [k for k in figures if k.startswith(tag)]:
                print(f"{key}: {figures[key]:.4g}")
        if "trace_kib_per_image" not in figures:
            figures["trace_kib_per_image"] = trace_kib_per_image(
                sample_with_capture(model, PROMPT, seeds[:1], settings, decode=False))
            print(f"trace_kib_per_image: {figures['trace_kib_per_image']:.1f}")
        model = pipe = None  # free the device before the next dtype's copy
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"suite_seconds: {time.perf_counter() - start:.1f}")
    return figures


def cpu_bench(args) -> None:
    dtype = DTYPES[args.dtype]
    model = MODEL_BUILDERS[args.model]().to(args.device, dtype)
    settings = SamplerSettings(args.steps, 7.5, args.resolution, args.resolution)
    seeds = list(range(args.images))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    plain = plain_call(pipeline(model), [PROMPT] * len(seeds), seeds, settings)
    plain_s, capture_s = alternate([plain, capture_call(model, [PROMPT] * len(seeds), seeds, settings)],
                                   args.repeats, sync)

    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(tmp)
        prompts = inline_prompt_set("bench", [{"id": "p", "text": PROMPT, "kind": "global"},
                                              {"id": "q", "text": "a photo of a cat"}])
        plan = detection.plan(prompts, args.model, detection.sampler_key(settings, args.dtype), seeds)
        sample_s = timed(lambda: detection.generate(model, plan, settings, store, batch_size=len(seeds)))
        layer_sets = {"all": ["*"], "res64": ["down_blocks.0", "up_blocks.3"],
                      "res32": ["down_blocks.1", "up_blocks.2"], "res16": ["down_blocks.2", "up_blocks.1"]}
        if args.model == "tiny":
            layer_sets = {"all": ["*"], "down": ["down_blocks.0"], "up": ["up_blocks.1"], "mid": ["mid_block"]}
        windows = sorted({1, max(1, args.steps // 5), args.steps})
        windows = windows + [w for w in range(2, args.steps) if w not in windows][: 3 - len(windows)]

        def rescore():
            arrays = detection.load(store, plan)
            scores = detection.score_grid(arrays, layer_sets, windows)
            detection.detection_table(scores, n_boot=0)

        rescore_s = min(timed(rescore) for _ in range(args.repeats))
        files = [f for f in Path(tmp).rglob("*") if f.is_file()]
        kib = sum(f.stat().st_size for f in files) / 1024 / (len(plan) * len(seeds))

    batching = SamplerSettings(args.batching_steps, 7.5, args.batching_resolution, args.batching_resolution)
    many = prompts_for(args.batching_prompts)
    one_call, many_calls = alternate([
        lambda: sample_with_capture(model, many, [0] * len(many), batching, decode=False),
        lambda: [sample_with_capture(model, p, [0], batching, decode=False) for p in many]], args.repeats, sync)
    with count_host_transfers() as transfers:
        sample_with_capture(model, PROMPT, seeds, settings)

    print(f"device: {args.device} {args.dtype}, {args.model}, {args.resolution} px, {args.steps} steps, "
          f"{args.images} images")
    print(f"plain_seconds: {plain_s:.3f}")
    print(f"capture_seconds: {capture_s:.3f}")
    print(f"capture_overhead_ratio: {capture_s / plain_s:.3f}")
    print(f"config_check_ratio: {config_check_seconds() / plain_s:.5f} (one job's config check / one plain call)")
    print(f"rescore_grid_points: {len(layer_sets) * len(windows)}")
    print(f"rescore_ratio: {rescore_s / sample_s:.4f}")  # the same images: re-scored vs sampled
    print(f"trace_kib_per_image: {kib:.1f}")
    print(f"prompt_batching: {len(many)} prompts x 1 image, {args.batching_resolution} px, {args.batching_steps} "
          f"steps: {one_call:.3f} s in one call, {many_calls:.3f} s in {len(many)} calls")
    print(f"prompt_batching_ratio: {one_call / many_calls:.3f}")
    print(f"host_transfers_per_call: {sum(transfers.values())} ({dict(transfers)}; {args.steps} steps, "
          f"decoded)")
    for n, n_pos in ((140, 20), (560, 80)):
        print(f"bootstrap_batch_ratio_n{n}: {bootstrap_ratio(n, n_pos):.3f}")
    for name, ratio in (("sail", sail_cost_ratio), ("anisotropy", anisotropy_cost_ratio),
                        ("curvature", curvature_cost_ratio)):
        print(f"{name}_cost_ratio: {ratio(model, plain, settings, seeds, args.repeats, sync):.3f}")
    none, every = early_stop_ratios(model, settings, seeds, args.repeats, sync)
    print(f"early_stop_none_ratio: {none:.3f}")
    print(f"early_stop_all_ratio: {every:.3f} (stop at step {settings.steps // 3} of {settings.steps})")
    tiny = MODEL_BUILDERS["tiny"]().to(args.device, dtype)
    tiny_settings = SamplerSettings(args.steps, 7.5, 32, 32)
    with tempfile.TemporaryDirectory() as folder:
        costs = mitigation_costs(tiny, tiny_settings, seeds, args.repeats, sync, knobs=bench_knobs(tiny, folder))
    for name, (ratio, extra) in costs.items():
        print(f"mitigation_{name}_cost_ratio: {ratio:.3f}")
        print(f"mitigation_{name}_extra_unet_evals: {extra:.1f} (per image; tiny model, {args.steps} steps)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--gpu-suite", action="store_true", help="the make bench-gpu suite")
    parser.add_argument("--flops", action="store_true",
                        help="FLOPs per image of every family's architecture, counted on the meta device")
    parser.add_argument("--model", default="sd14-architecture",
                        choices=sorted(n for n in MODEL_BUILDERS if MODEL_BUILDERS[n].in_process))
    parser.add_argument("--resolution", type=int, help="default 256 (bench), 512 (suite)")
    parser.add_argument("--steps", type=int, help="default 10 (bench), 50 (suite)")
    parser.add_argument("--images", type=int, default=2, help="bench: images per capture call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="float16" if cuda else "float32", help="bench's dtype")
    parser.add_argument("--batching-prompts", type=int, default=16)
    parser.add_argument("--batching-resolution", type=int, default=128)
    parser.add_argument("--batching-steps", type=int, default=2)
    parser.add_argument("--dtypes", default="float16,bfloat16", help="suite: comma-separated dtypes")
    parser.add_argument("--batch", type=int, default=16, help="suite: images per call")
    parser.add_argument("--budget-s", type=float, default=420.0, help="suite: no new case after this many seconds")
    parser.add_argument("--compile", action="store_true", help="suite: torch.compile the UNet (docs/performance.md)")
    args = parser.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for d in args.dtypes + [args.dtype]:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r} (one of {', '.join(DTYPES)})")
    args.resolution = args.resolution or (512 if args.gpu_suite else 256)
    args.steps = args.steps or (50 if args.gpu_suite or args.flops else 10)
    if args.flops:
        print_family_flops(args.steps)
    elif args.gpu_suite:
        gpu_suite(args)
    else:
        cpu_bench(args)


if __name__ == "__main__":
    main()
