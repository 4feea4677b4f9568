"""PRSS (benchmark/mitigation/prompt_search.py): the search and the re-anchoring by hand, and against the official
aug_prompt_ss / __call__ (BE-PRSS local_sd_pipeline.py) re-expressed on the tiny model; the rephrasers."""
import json

import pytest
import torch

from benchmark.mitigation.prompt_search import (
    PRSSSettings,
    listed_rephrasings,
    reanchored_eps,
    search_embeddings,
    semantic_search,
)
from benchmark.registry import REPHRASERS
from benchmark.sampling.capture import SamplerSettings, initial_noise


def test_search_by_hand():
    table = torch.tensor([[3.0, 0.5, 2.0], [0.8, 4.0, 1.5], [2.0, 5.0, 1.2]])  # candidate j x image i
    calls = []

    def magnitude(j, rows):
        calls.append((j, rows.tolist()))
        return table[j, rows]

    res = semantic_search(magnitude, 3, 3, target=1.0)
    # image 0 stops at candidate 1, image 1 at 0 (not triggered), image 2 never: its lowest (candidate 2)
    assert res.chosen.tolist() == [1, 0, 2]
    assert res.triggered.tolist() == [True, False, True]
    assert calls == [(0, [0, 1, 2]), (1, [0, 2]), (2, [2])] and res.evaluations == 6
    assert torch.isnan(res.magnitudes[2, 0])


def official_pr(u, m, o, g, l_pr, thres):
    """local_sd_pipeline.py __call__ with m_trigger, one image, python floats for the schedule."""
    mag = (m - u).norm(p=2).item()
    if mag > l_pr:
        scaler = (g * l_pr - thres) / (g - 1)
        s_pr = min((mag - scaler) / (thres - scaler) * g, g)
        return o + s_pr * (m - o) + (g - s_pr) * (m - u)
    return u + g * (m - u)


def test_reanchoring_equals_official():
    torch.manual_seed(0)
    u, o = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    m = u + torch.tensor([0.1, 0.5, 1.0, 3.0]).view(4, 1, 1, 1) * torch.randn(4, 2, 3, 3)
    got = reanchored_eps(u, m, o, 7.5, 3.0, 5.0)
    for i in range(4):
        assert torch.allclose(got[i], official_pr(u[i], m[i], o[i], 7.5, 3.0, 5.0), atol=1e-6)
    mags = (m - u).flatten(1).norm(dim=1)
    assert (mags > 3).any() and (mags <= 3).any()  # both branches are exercised
    # at the threshold the schedule's s is 1: re-anchoring meets plain guidance (continuous)
    d = torch.randn(1, 2, 3, 3)
    d = d / d.norm() * 3.0001
    near = reanchored_eps(u[:1], u[:1] + d, o[:1], 7.5, 3.0, 5.0)
    assert torch.allclose(near, u[:1] + 7.5 * d, atol=1e-3)
    with pytest.raises(ValueError, match="guidance > 1"):
        reanchored_eps(u, m, o, 1.0, 3.0, 5.0)


def test_bad_settings():
    with pytest.raises(ValueError, match="prss: needs 0 <= l_target_pr < mag_thres_pr"):
        PRSSSettings(l_target_pr=6.0)
    with pytest.raises(ValueError, match="prss: unknown rephraser 'gpt'"):
        PRSSSettings(rephraser="gpt")
    with pytest.raises(ValueError, match="l_target_ss"):
        PRSSSettings(l_target_ss=-1)


def test_listed_rephrasings(tmp_path):
    path = tmp_path / "withss.jsonl"
    rows = [{"caption": "a cat", "caption1": "one cat", "caption2": "a feline", "index": 3}, {"caption": "a dog"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert listed_rephrasings("a cat", 25, file=str(path)) == ["one cat", "a feline"]
    assert REPHRASERS["listed"]("a cat", 1, file=str(path)) == ["one cat"]
    assert listed_rephrasings("a dog", 25, file=str(path)) == []
    assert listed_rephrasings("a bird", 25, file=str(path)) == []
    with pytest.raises(ValueError, match="needs file"):
        listed_rephrasings("a cat", 3)
    with pytest.raises(FileNotFoundError, match="rephraser listed"):
        listed_rephrasings("a cat", 3, file=str(tmp_path / "none.jsonl"))


def test_testbed_rephrasings():
    two = "a red circle at the top and a blue square at the left on a green background"
    assert REPHRASERS["testbed"](two, 25) == [
        "a blue square at the left and a red circle at the top on a green background"]
    assert REPHRASERS["testbed"]("a red circle at the top on a green background", 25) == []
    with pytest.raises(ValueError):
        REPHRASERS["testbed"]("a photo of a cat", 25)


def official_search(model, prompt, candidates, latents, t, target):
    """aug_prompt_ss for one image: [prompt, *candidates] in order, stop at the first at or below the target, else
    numpy's argmin over all; returns (index, magnitudes)."""
    uncond = model.encode([""])
    mags = []
    for j, text in enumerate([prompt, *candidates]):
        noise = model.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond,
                                                                                              model.encode([text])]))
        u, c = noise.sample.chunk(2)
        loss = torch.norm(c - u, p=2).mean().item()
        if loss <= target:
            return j, mags + [loss]
        mags.append(loss)
    return int(torch.tensor(mags).argmin()), mags


@torch.no_grad()
def test_search_equals_official(tiny_model):
    sampler = SamplerSettings(steps=3, height=8, width=8)
    prompts = ["a red circle", "a photo of a cat", "a dog"]
    rephrasings = [["one red circle", "a circle, red"], ["a cat photo"], []]
    latents = initial_noise(tiny_model, [0, 1, 2], sampler)
    tiny_model.scheduler.set_timesteps(sampler.steps)
    t = tiny_model.scheduler.timesteps[0]
    expected = [official_search(tiny_model, p, r, latents[i:i + 1], t, 0.0) for i, (p, r) in
                enumerate(zip(prompts, rephrasings))]
    # the target between the magnitudes, so that the search stops at some candidates and not at others
    target = sorted(m for _, mags in expected for m in mags)[2]
    expected = [official_search(tiny_model, p, r, latents[i:i + 1], t, target) for i, (p, r) in
                enumerate(zip(prompts, rephrasings))]
    got = search_embeddings(tiny_model, prompts, rephrasings, latents, t, PRSSSettings(l_target_ss=target))
    assert got.result.chosen.tolist() == [j for j, _ in expected]
    for i, (_, mags) in enumerate(expected):
        assert got.result.magnitudes[:len(mags), i].tolist() == pytest.approx(mags, abs=1e-6)
    assert got.prompts == [[p, *r][j] for (p, r), (j, _) in zip(zip(prompts, rephrasings), expected)]
    assert torch.equal(got.original[1], tiny_model.encode([prompts[1]])[0])


def official_generation(model, chosen_text, prompt, latents, steps, g, triggered, l_pr, thres):
    """inference_mem.py: pipe(prompt_embeds=searched, original_prompt_embeds=prompt's, m_trigger, l_target_pr,
    mag_thres_pr) for one image, from the same initial noise."""
    uncond = model.encode([""])
    mod = torch.cat([uncond, model.encode([chosen_text])])
    orig = torch.cat([uncond, model.encode([prompt])])
    model.scheduler.set_timesteps(steps)
    for t in model.scheduler.timesteps:
        u, m = model.unet(torch.cat([latents, latents]), t, encoder_hidden_states=mod).sample.chunk(2)
        if triggered:
            _, o = model.unet(torch.cat([latents, latents]), t, encoder_hidden_states=orig).sample.chunk(2)
            eps = official_pr(u, m, o, g, l_pr, thres)
        else:
            eps = u + g * (m - u)
        latents = model.scheduler.step(eps, t, latents).prev_sample
    return latents


@torch.no_grad()
def test_registered_equals_official(tiny_model, tmp_path, same_up_to_float_order):
    from benchmark.mitigation.interface import Mitigation
    from benchmark.sampling.capture import sample_with_capture

    with pytest.raises(ValueError, match="mitigation prss-.*rephraser listed needs rephraser_file"):
        Mitigation.of("prss").check_model(tiny_model)
    prompts = ["a red circle", "a photo of a cat"]
    rows = [{"caption": "a red circle", "caption1": "one red circle", "caption2": "a circle, red"},
            {"caption": "a photo of a cat", "caption1": "a cat photo"}]
    path = tmp_path / "withss.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    sampler = SamplerSettings(steps=4, height=8, width=8)
    latents = initial_noise(tiny_model, [0, 1], sampler)
    tiny_model.scheduler.set_timesteps(sampler.steps)
    t = tiny_model.scheduler.timesteps[0]
    cands = [[r[k] for k in r if k != "caption"] for r in rows]
    mags = [official_search(tiny_model, p, [], latents[i:i + 1], t, 0.0)[1][0] for i, p in enumerate(prompts)]
    # image 0 above the search target (triggered), image 1 below; re-anchoring thresholds within the magnitudes
    target = (mags[0] + mags[1]) / 2 if mags[0] > mags[1] else None
    if target is None:
        prompts, rows, cands, latents = prompts[::-1], rows[::-1], cands[::-1], latents.flip(0)
        mags, target = mags[::-1], (mags[0] + mags[1]) / 2
    knobs = {"l_target_ss": target, "l_target_pr": 0.5 * min(mags), "mag_thres_pr": 2.0 * max(mags),
             "rephraser_file": str(path)}
    setting = Mitigation.of("prss", **knobs)
    assert setting.tag.startswith("prss-ss") and "-f" in setting.tag
    seeds = [0, 1] if prompts[0] == "a red circle" else [1, 0]
    triggered = []
    for i, p in enumerate(prompts):  # one prompt per call, as the mitigation job samples
        intervention = setting.intervention()
        got = sample_with_capture(tiny_model, p, seeds[i:i + 1], sampler, record=False, intervention=intervention)
        triggered += intervention.stats["triggered"].tolist()
        j, _ = official_search(tiny_model, p, cands[i], latents[i:i + 1], t, target)
        want = official_generation(tiny_model, [p, *cands[i]][j], p, latents[i:i + 1], sampler.steps, sampler.guidance,
                                   i == 0, knobs["l_target_pr"], knobs["mag_thres_pr"])
        same_up_to_float_order(got, want, rel=1e-6)
    assert triggered == [1.0, 0.0]
    # traced: the re-anchoring's extra evaluations are not recorded
    intervention = setting.intervention()
    traced = sample_with_capture(tiny_model, prompts, seeds, sampler, intervention=intervention)
    assert all(v.shape[1] == sampler.steps for v in traced.token_attn.values())
    assert intervention.stats["triggered"].tolist() == [1.0, 0.0]
    plain = sample_with_capture(tiny_model, prompts, seeds, sampler)
    assert (traced.latents[0] - plain.latents[0]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (["mitigation.methods=[wen,prss]"], "rephraser listed needs rephraser_file"),
    (["mitigation.methods=[wen,prss]", "+mitigation.knobs.prss.rephraser=gpt"],
     "mitigation.knobs.prss.rephraser='gpt': value error, not a rephraser"),
    (["mitigation.methods=[wen,prss_be]", "+mitigation.knobs.prss_be.l_target_pr=9"], "l_target_pr < mag_thres_pr"),
])
def test_the_job_refuses_bad_settings_before_sampling(tmp_path, compose, overrides, message):
    from runners.mitigate import run

    cfg = compose("mitigate", "debug=default", "headline.method=wen", *overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "job")
    assert not (tmp_path / "artifacts").exists()
