"""Jain et al.'s transition-point guidance (benchmark/mitigation/guidance.py): the rules by hand, the probe pass
against an independent re-expression of the official opposite-guidance probe on the tiny model."""
import numpy as np
import pytest
import torch

from benchmark.mitigation.guidance import (
    NO_MINIMUM_STEP,
    OFFICIAL,
    TransitionGuidance,
    dynamic_transition_reached,
    opposite_transition_step,
    probe_transition_steps,
    static_scale,
    transition_scales,
)
from benchmark.sampling.capture import SamplerSettings, encode_prompts, initial_noise


def test_static_rule():
    s = OFFICIAL["static"]
    assert [static_scale(t, s) for t in (999, 501, 500, 0)] == [0.0, 0.0, 7.5, 7.5]
    og = OFFICIAL["static_opposite"]
    assert static_scale(700, og) == -2.0 and static_scale(650, og) == 7.5
    assert transition_scales(s, 3, 600) == 0.0


def test_dynamic_rule_by_hand():
    # image 0: falls, falls, rises at step 3 -> transition at step 3; image 1: falls steadily, never
    d = torch.tensor([[5.0, 5.0], [4.0, 4.0], [3.0, 3.0], [3.5, 2.0], [1.0, 1.0]])
    reached = [dynamic_transition_reached(d[:k + 1]).tolist() for k in range(len(d))]
    assert reached == [[False, False], [False, False], [False, False], [True, False], [True, False]]
    scales = transition_scales(OFFICIAL["dynamic"], 3, 0, magnitudes=d[:4])
    assert scales.tolist() == [7.5, 1.0]
    # equal neighbours are no minimum (strict comparisons, as the official)
    assert not dynamic_transition_reached(torch.tensor([[2.0], [1.0], [1.0]])).item()
    with pytest.raises(ValueError, match="magnitudes of steps 0..3"):
        transition_scales(OFFICIAL["dynamic"], 3, 0, magnitudes=d[:3])


def test_opposite_rule_by_hand():
    assert opposite_transition_step([3, 2, 4, 1, 5]) == 1 + 2  # first minimum at 1, a second at 3: the second
    assert opposite_transition_step([3, 2, 4, 5]) == 1  # the first is 1 but there is no second
    assert opposite_transition_step([5, 4, 3, 1, 2, 0.5, 1]) == 3
    assert opposite_transition_step([1, 2, 3]) == NO_MINIMUM_STEP
    scales = transition_scales(OFFICIAL["opposite_dynamic"], 3, 0, transition_steps=torch.tensor([3, 4]))
    assert scales.tolist() == [7.5, -7.5]


def test_bad_settings():
    with pytest.raises(ValueError, match="jain: unknown transition rule"):
        TransitionGuidance(rule="sometimes")
    with pytest.raises(ValueError, match="transition_t must be in"):
        TransitionGuidance(transition_t=1000)
    with pytest.raises(ValueError, match="opposite_dynamic.*before"):
        TransitionGuidance("opposite_dynamic", before=1.0)
    with pytest.raises(ValueError, match="finite"):
        TransitionGuidance(after=float("inf"))


def official_probe(model, latents, context, steps, g):
    """generate_test_dataset-opposite_guidance.py's find_min_max_points, one image at a time, numpy for the cosine
    and the minima (the official runs DPM-Solver; DDIM here, be-bench's sampler)."""
    out = []
    for i in range(len(latents)):
        model.scheduler.set_timesteps(steps)
        x = latents[i:i + 1]
        ctx = context[[i, len(latents) + i]]
        diffs = []
        for t in model.scheduler.timesteps:
            noise = model.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
            u, c = noise.chunk(2)
            prev, x = x, model.scheduler.step(u - g * (c - u), t, x).prev_sample
            a, b = x.flatten().double().numpy(), prev.flatten().double().numpy()
            diffs.append(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        minima = [k for k in range(1, len(diffs) - 1) if diffs[k] < diffs[k - 1] and diffs[k] < diffs[k + 1]]
        out.append(NO_MINIMUM_STEP if not minima else minima[1] if minima[0] == 1 and len(minima) > 1 else minima[0])
    return out


@torch.no_grad()
def test_probe_equals_official(tiny_model):
    settings = SamplerSettings(steps=12, height=8, width=8)
    prompts = ["a red circle", "a photo of a cat"]
    latents = initial_noise(tiny_model, [0, 1], settings)
    context = torch.cat([tiny_model.encode([""]).expand(2, -1, -1), encode_prompts(tiny_model, prompts)])
    got = probe_transition_steps(tiny_model, latents, context, settings.steps, 7.5)
    assert got.tolist() == official_probe(tiny_model, latents, context, settings.steps, 7.5)


def official_loop(model, prompt, latents, steps, scale_of):
    """The official scripts' loop re-expressed for one image: CFG batch, the scale chosen from the step, the
    timestep and the magnitudes so far (DDIM instead of their DPM-Solver)."""
    model.scheduler.set_timesteps(steps)
    ctx = torch.cat([model.encode([""]), model.encode([prompt])])
    diffs = []
    for j, t in enumerate(model.scheduler.timesteps):
        u, c = model.unet(torch.cat([latents, latents]), t, encoder_hidden_states=ctx).sample.chunk(2)
        diffs.append(torch.norm(u - c).item())
        g = scale_of(j, int(t), diffs)
        latents = model.scheduler.step(u + g * (c - u), t, latents).prev_sample
    return latents


def dtp_scale(j, t, d):
    hit = any(d[k] > d[k - 1] and d[k - 2] > d[k - 1] for k in range(2, len(d)))
    return 7.5 if hit else 1.0


@torch.no_grad()
def test_registered_rules_equal_official_loops(tiny_model, same_up_to_float_order):
    from benchmark.mitigation.interface import Mitigation
    from benchmark.sampling.capture import sample_with_capture

    settings = SamplerSettings(steps=10, height=8, width=8)
    prompts = ["a red circle", "a photo of a cat"]
    latents = initial_noise(tiny_model, [0, 1], settings)
    cases = {
        "jain_stp": lambda j, t, d: 0.0 if t > 500 else 7.5,
        "jain_stp_og": lambda j, t, d: -2.0 if t > 650 else 7.5,
        "jain_dtp": dtp_scale,
    }
    for method, rule in cases.items():
        setting = Mitigation.of(method)
        got = sample_with_capture(tiny_model, prompts, [0, 1], settings, intervention=setting.intervention())
        for i, p in enumerate(prompts):
            want = official_loop(tiny_model, p, latents[i:i + 1], settings.steps, rule)
            same_up_to_float_order(got.latents[i:i + 1], want, rel=1e-6)
    # opposite + dynamic: the probe's step, then -7.5 before it and 7.5 from it on
    intervention = Mitigation.of("jain_dtp_og").intervention()
    got = sample_with_capture(tiny_model, prompts, [0, 1], settings, intervention=intervention)
    context = torch.cat([tiny_model.encode([""]).expand(2, -1, -1), encode_prompts(tiny_model, prompts)])
    tp = official_probe(tiny_model, latents, context, settings.steps, 7.5)
    assert intervention.stats["transition_step"].tolist() == tp
    for i, p in enumerate(prompts):
        want = official_loop(tiny_model, p, latents[i:i + 1], settings.steps,
                             lambda j, t, d, i=i: 7.5 if j >= tp[i] else -7.5)
        same_up_to_float_order(got.latents[i:i + 1], want, rel=1e-6)
    plain = sample_with_capture(tiny_model, prompts, [0, 1], settings, record=False)
    assert (got.latents - plain).abs().max() > 1e-2 * plain.abs().max()  # the rules change the images
    assert Mitigation.of("jain_stp").tag == "jain-stp500-b0-a7.5" and Mitigation.of("jain_stp").strength == 500
    with pytest.raises(ValueError, match="transition_t must be in"):
        Mitigation.of("jain_stp", transition_t=2000)


@pytest.mark.parametrize("overrides, message", [
    (["mitigation.methods=[wen,jain_stp]", "+mitigation.strengths.jain_stp=[1000]"],
     "mitigation.strengths.jain_stp.0.transition_t=1000: input should be less than 1000"),
    (["mitigation.methods=[wen,ren]", "+mitigation.strengths.ren=[nan]"],
     "mitigation.strengths.ren.0.c1=nan: must be a finite"),
])
def test_the_job_refuses_bad_strengths_before_sampling(tmp_path, compose, overrides, message):
    from runners.mitigate import run

    cfg = compose("mitigate", "debug=default", "headline.method=wen", *overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "job")
    assert not (tmp_path / "artifacts").exists()
