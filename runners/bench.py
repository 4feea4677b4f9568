"""`make bench`: side-by-side timings on SD v1-4's architecture (random weights) at a reduced resolution.

Prints one ``name: value`` line per figure:
- capture_overhead_ratio: sampling with capture / diffusers' StableDiffusionPipeline, same seeds (goal <= 1.10);
- rescore_ratio: re-scoring a 12-point layer x T grid from stored traces / one sampling pass (goal <= 0.02);
- trace_kib_per_image: trace file + PNG on disk per image;
- bootstrap_batch_ratio_n<N>: 1000 bootstrap replicates of AUC/TPR/F1 on N scores, all rows at once (as
  ``metrics.detection_metrics`` does) / one replicate per Python call, same draws (make run's 140 and 560 scores);
- sail_cost_ratio, anisotropy_cost_ratio, curvature_cost_ratio: the extra pass of SAIL (k=1), the anisotropy score
  and a curvature map (16 probes, last step) / one plain generation of ``--steps`` steps, same seeds
  (``benchmark.jacobian_scores``; per image, as both handle the same batch).
A and B alternate, and the best of ``--repeats`` rounds counts, because these machines are noisy.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from benchmark import detection
from benchmark import jacobian_scores as jacobian
from benchmark.capture import SamplerSettings, sample_with_capture
from benchmark.metrics import _metric_rows
from benchmark.models import sd14_architecture
from benchmark.prompts import inline_prompt_set
from benchmark.traces import TraceStore

PROMPT = "Mothers influence on her young hippo"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bootstrap_ratio(n: int, n_pos: int, replicates: int = 1000, repeats: int = 2) -> float:
    rng = np.random.default_rng(0)
    labels = np.arange(n) < n_pos
    scores = rng.normal(size=n) + labels
    idx = np.concatenate([rng.choice(n_pos, (replicates, n_pos)),
                          rng.choice(np.arange(n_pos, n), (replicates, n - n_pos))], axis=1)
    batched = [timed(lambda: _metric_rows(labels[idx], scores[idx])) for _ in range(repeats)]
    looped = [timed(lambda: [_metric_rows(labels[i][None], scores[i][None]) for i in idx]) for _ in range(repeats)]
    return min(batched) / min(looped)


def _method_ratio(plain, method, repeats: int, sync) -> float:
    """Best time of ``method`` / best time of ``plain``, the two alternating (after one warm-up call each)."""
    plain(), method(), sync()
    plain_s, method_s = [], []
    for _ in range(repeats):
        plain_s.append(timed(lambda: (plain(), sync())))
        method_s.append(timed(lambda: (method(), sync())))
    return min(method_s) / min(plain_s)


def sail_cost_ratio(model, plain, settings: SamplerSettings, seeds: list[int], repeats: int = 2,
                    sync=lambda: None) -> float:
    """SAIL at its official k=1 (one guided pass + one JVP with math attention) / one plain generation."""
    return _method_ratio(plain, lambda: jacobian.sail(model, PROMPT, seeds, settings), repeats, sync)


def anisotropy_cost_ratio(model, plain, settings: SamplerSettings, seeds: list[int], repeats: int = 2,
                          sync=lambda: None) -> float:
    """The anisotropy score (two guided passes on the initial noise) / one plain generation."""
    return _method_ratio(plain, lambda: jacobian.anisotropy(model, PROMPT, seeds, settings), repeats, sync)


def curvature_cost_ratio(model, plain, settings: SamplerSettings, seeds: list[int], repeats: int = 2,
                         sync=lambda: None) -> float:
    """A curvature map at the last step with the official 16 probes (trajectory + one graph + 16 backward
    passes) / one plain generation."""
    return _method_ratio(plain, lambda: jacobian.curvature_map(model, PROMPT, seeds, settings), repeats, sync)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = sd14_architecture().to(args.device, dtype)
    settings = SamplerSettings(args.steps, 7.5, args.resolution, args.resolution)
    seeds = list(range(args.images))
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def plain():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        pipe(PROMPT, height=args.resolution, width=args.resolution, num_inference_steps=args.steps,
             guidance_scale=7.5, num_images_per_prompt=len(seeds), generator=generators, output_type="latent")

    def captured():
        sample_with_capture(model, PROMPT, seeds, settings, decode=False)

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    plain(), captured(), sync()  # warm-up: the first call pays for allocations and kernel selection
    plain_s, capture_s = [], []
    for _ in range(args.repeats):
        plain_s.append(timed(lambda: (plain(), sync())))
        capture_s.append(timed(lambda: (captured(), sync())))

    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(tmp)
        prompts = inline_prompt_set("bench", [{"id": "p", "text": PROMPT, "kind": "global"},
                                              {"id": "q", "text": "a photo of a cat"}])
        plan = detection.plan(prompts, "sd14-architecture", detection.sampler_key(settings, args.dtype), seeds)
        sample_s = timed(lambda: detection.generate(model, plan, settings, store, batch_size=len(seeds)))
        layer_sets = {"all": ["*"], "res64": ["down_blocks.0", "up_blocks.3"],
                      "res32": ["down_blocks.1", "up_blocks.2"], "res16": ["down_blocks.2", "up_blocks.1"]}
        windows = sorted({1, max(1, args.steps // 5), args.steps})
        windows = windows + [w for w in range(2, args.steps) if w not in windows][: 3 - len(windows)]

        def rescore():
            arrays = detection.load(store, plan)
            scores = detection.score_grid(arrays, layer_sets, windows)
            detection.detection_table(scores, n_boot=0)

        rescore_s = min(timed(rescore) for _ in range(args.repeats))
        files = [f for f in Path(tmp).rglob("*") if f.is_file()]
        kib = sum(f.stat().st_size for f in files) / 1024 / (len(plan) * len(seeds))

    print(f"device: {args.device} {args.dtype}, {args.resolution} px, {args.steps} steps, {args.images} images")
    print(f"plain_seconds: {min(plain_s):.3f}")
    print(f"capture_seconds: {min(capture_s):.3f}")
    print(f"capture_overhead_ratio: {min(capture_s) / min(plain_s):.3f}")
    print(f"rescore_grid_points: {len(layer_sets) * len(windows)}")
    print(f"rescore_ratio: {rescore_s / sample_s:.4f}")  # the same images: re-scored vs sampled
    print(f"trace_kib_per_image: {kib:.1f}")
    for n, n_pos in ((140, 20), (560, 80)):
        print(f"bootstrap_batch_ratio_n{n}: {bootstrap_ratio(n, n_pos):.3f}")
    for name, ratio in (("sail", sail_cost_ratio), ("anisotropy", anisotropy_cost_ratio),
                        ("curvature", curvature_cost_ratio)):
        print(f"{name}_cost_ratio: {ratio(model, plain, settings, seeds, args.repeats, sync):.3f}")


if __name__ == "__main__":
    main()
