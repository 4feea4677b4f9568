"""`make bench-gpu`'s suite, run on the CPU at a reduced size so that it is known to work before a GPU runs it."""
import re

import pytest
import torch

from benchmark.core.profiling import peak_tflops


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-pixart"])
def test_gpu_suite_runs_on_cpu_at_a_reduced_size(capsys, model):
    """Each family against its own diffusers pipeline (StableDiffusion, StableDiffusionXL, PixArtAlpha)."""
    from runners.bench import main

    main(["--gpu-suite", "--device", "cpu", "--model", model, "--resolution", "32", "--steps", "2",
          "--dtypes", "float32", "--batch", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    figures = dict(re.findall(r"^(\w+): ([0-9.e+-]+)$", out, re.MULTILINE))
    for layout in ("batch16", "n1x16"):
        for name in ("plain_images_per_s", "capture_images_per_s", "capture_ratio", "plain_tflops",
                     "capture_tflops"):
            assert float(figures[f"float32_{layout}_{name}"]) > 0, (layout, name, out)
    assert "float32_batch16_capture_peak_fraction" not in figures  # no peak for a CPU
    assert float(figures["trace_kib_per_image"]) > 0


def test_flops_are_counted_not_typed_in(tiny_model):
    from benchmark.sampling.capture import SamplerSettings
    from runners.bench import unet_flops_per_call

    settings = SamplerSettings(steps=2, height=32, width=32)
    one = unet_flops_per_call(tiny_model, ["a cat"], [0], settings)
    assert one > 0
    assert unet_flops_per_call(tiny_model, ["a cat"] * 2, [0, 1], settings) == pytest.approx(2 * one, rel=1e-6)
    assert unet_flops_per_call(tiny_model, ["a cat"], [0], SamplerSettings(4, height=32, width=32)) == 2 * one


def test_peak_table():
    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_suite_on_cuda_at_a_reduced_size(capsys):
    from runners.bench import main

    main(["--gpu-suite", "--device", "cuda", "--model", "tiny", "--resolution", "64", "--steps", "4",
          "--dtypes", "float16,bfloat16", "--batch", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "bfloat16_n1x16_capture_ratio: " in out and "float16_batch16_capture_tflops: " in out


def test_mitigation_costs_are_measured_for_every_method(tiny_model, tmp_path):
    from benchmark.registry import MITIGATIONS
    from benchmark.sampling.capture import SamplerSettings
    from runners.bench import bench_knobs, mitigation_costs

    settings = SamplerSettings(steps=2, height=32, width=32)
    fast = {"han_per_sample": {"max_iters": 2}, "sail": {"max_rounds": 1, "budget": 2, "max_steps": 1}}
    fast |= bench_knobs(tiny_model, str(tmp_path))
    fast["nemo"] |= {"samples": 2, "pairwise_threshold": 0.0, "initial_k": 1, "min_theta": 4.75}  # two rounds
    costs = mitigation_costs(tiny_model, settings, [0], repeats=1, knobs=fast)
    assert set(costs) == set(MITIGATIONS.names()) and all(ratio > 0 for ratio, _ in costs.values())
    assert costs["rna"][1] == 0 and costs["pad_mask"][1] == 0  # a changed prompt or embedding: no extra call
    assert costs["wen"][1] > 0 and costs["sail"][1] == 4 * 2  # SAIL: two CFG calls on a budget of two candidates
    # attention and guidance rules cost nothing; opposite guidance's probe is a second guided pass; PRSS's search
    # costs an unconditional and a conditional call, re-anchoring one conditional call per step when triggered
    assert costs["ren"][1] == 0 and costs["jain_stp"][1] == 0 and costs["jain_dtp"][1] == 0
    assert costs["jain_dtp_og"][1] == 2 * 2 and costs["prss"][1] in (2, 2 + 2) and costs["nemo"][1] > 0


@pytest.mark.parametrize("builder", ["tiny", "tiny-sd2-v", "tiny-sdxl", "tiny-pixart"])
def test_family_flops_on_the_meta_device_are_those_of_real_tensors(builder):
    """`make bench`'s FLOPs per image of SD v1-4, SD 2.1, SDXL and PixArt-alpha are counted on the meta device: on
    each family's tiny twin the parts equal those counted on real CPU tensors, and their total equals one whole
    counted generation (text encoding, every step) and its decoding."""
    from benchmark.core.profiling import count_flops
    from benchmark.registry import MODEL_BUILDERS
    from benchmark.sampling.capture import SamplerSettings, sample_with_capture
    from runners.bench import PROMPT, countable, family_flops

    steps = 3
    meta, real = family_flops(builder, 32, steps, "meta"), family_flops(builder, 32, steps, "cpu")
    assert meta == real and min(meta.values()) > 0
    model = MODEL_BUILDERS[builder]()
    with countable(model):
        latents = sample_with_capture(model, [PROMPT], [0], SamplerSettings(steps, 7.5, 32, 32), record=False)
        whole = count_flops(lambda: sample_with_capture(model, [PROMPT], [0], SamplerSettings(steps, 7.5, 32, 32),
                                                        record=False))
        whole += count_flops(lambda: model.to_images(latents))
    assert meta["per_image"] == pytest.approx(whole / 1e12, rel=1e-12)
