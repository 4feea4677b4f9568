"""Cost ratios of the Jacobian-based methods on the tiny model: 50 DDIM steps, 2 images, 16 px, one CPU thread.

    OMP_NUM_THREADS=1 python -m runners.bench_jacobian_tiny

Same ``*_cost_ratio`` functions as ``make bench`` (``runners/bench.py``), whose SD v1-4 architecture needs a GPU.
"""
import torch
from diffusers import StableDiffusionPipeline

from benchmark.capture import SamplerSettings
from benchmark.models import tiny_text_to_image
from runners.bench import PROMPT, anisotropy_cost_ratio, curvature_cost_ratio, sail_cost_ratio


def main(steps: int = 50, seeds: tuple[int, ...] = (0, 1), repeats: int = 3) -> None:
    torch.set_num_threads(1)
    model = tiny_text_to_image()
    settings = SamplerSettings(steps, 7.5, 16, 16)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def plain():
        pipe(PROMPT, height=16, width=16, num_inference_steps=steps, guidance_scale=7.5,
             num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
             output_type="latent")

    for name, ratio in (("sail", sail_cost_ratio), ("anisotropy", anisotropy_cost_ratio),
                        ("curvature", curvature_cost_ratio)):
        print(f"{name}_cost_ratio: {ratio(model, plain, settings, list(seeds), repeats):.3f}", flush=True)


if __name__ == "__main__":
    main()
