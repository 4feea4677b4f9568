"""The one mitigation interface: every registered method through the one sampling loop, the store keys, the core
operation of each new method by hand, config errors before any sampling, and a plug-in mitigation from a user file."""
import importlib.util

import numpy as np
import pytest
import torch

from benchmark.mitigation import initial_noise as N
from benchmark.mitigation import prompt_text as P
from benchmark.mitigation.interface import Mitigation, method_settings, settings_for
from benchmark.mitigation.tradeoff import counting_unet_rows
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import SamplerSettings, prepare_sampling, sample_with_capture
from benchmark.sampling.missing import sampler_key

SAMPLER = SamplerSettings(steps=3, height=32, width=32)
PROMPT = "Mothers influence on her young hippo"
# knobs that keep the optimising methods to a few UNet calls here
FAST = {"han_per_sample": {"max_iters": 3}, "sail": {"max_rounds": 1, "max_steps": 2, "budget": 2}}
# PRSS without rephrasings, triggered and re-anchored at the tiny model's magnitudes; NeMo on two seeds, a window
# that fits 32 px, every seed looked at and the top neuron of each layer in the first round (its statistics: the
# fixture below)
FAST |= {m: {"rephraser": "none", "l_target_pr": 0.01, "mag_thres_pr": 10.0} for m in ("prss", "prss_be")}
STRENGTHS = {"prss": [0.0], "prss_be": [0.0]}  # a search target below every magnitude: always triggered
FAST["nemo"] = {"samples": 2, "ssim_kernel": 3, "pairwise_threshold": 0.0, "initial_k": 1, "min_theta": 4.75}
NON_MEMORIZED = ["a photo of a cat on a red sofa", "an astronaut riding a horse, oil painting", "a red circle"]


@pytest.fixture(scope="module")
def nemo_statistics(tiny_model, tmp_path_factory):
    from benchmark.mitigation.neurons import activation_statistics

    path = tmp_path_factory.mktemp("nemo") / "statistics.safetensors"
    return str(activation_statistics(tiny_model, NON_MEMORIZED, source="tiny").save(path))


def _one_setting(name, statistics=None):
    entry = MITIGATIONS[name]
    strengths = None if entry.strength is None else STRENGTHS.get(name) or list(entry.strengths) or [0.2]
    knobs = FAST.get(name, {}) | ({"statistics": statistics} if name == "nemo" else {})
    return settings_for(name, strengths, knobs or None)[0]


@pytest.fixture(scope="module")
def baseline(tiny_model):
    return sample_with_capture(tiny_model, PROMPT, [0, 1], SAMPLER)


@pytest.mark.parametrize("name", MITIGATIONS.names())
def test_every_method_runs_in_the_one_traced_loop(tiny_model, baseline, nemo_statistics, name):
    setting = _one_setting(name, nemo_statistics)
    setting.check_model(tiny_model)
    mask = torch.rand(2, 4, 4) + 0.1 if setting.needs_mask else None
    with counting_unet_rows(tiny_model.unet) as rows:
        batch = sample_with_capture(tiny_model, PROMPT, [0, 1], SAMPLER, intervention=setting.intervention(),
                                    mask=mask)
    assert batch.delta_sq.shape == baseline.delta_sq.shape and torch.isfinite(batch.delta_sq).all()
    assert set(batch.end_maps) == set(baseline.end_maps)  # traced as any generation: every detector can score it
    assert rows[0] >= 2 * 2 * SAMPLER.steps  # at least plain sampling's CFG rows
    assert (batch.latents - baseline.latents).abs().max() > 1e-4  # it changed the generation


def test_old_store_keys_are_unchanged():
    key = sampler_key(SamplerSettings(), "float16")
    cases = [("wen", {"target_loss": 0.2}, "wen-l0.2-lr0.05-it10"),
             ("be", {"target_loss": 0.2, "mask_norm": "batch"}, "be-batchnorm-l0.2-lr0.05-it10"),
             ("be", {"target_loss": 1, "protocol": "official"}, "be-official-l1-lr0.05-it10"),
             ("pad_mask", {"fraction": 0.7}, "padmask-r0.7"), ("pad_replace", {}, "padreplace-u21"),
             ("pad_replace_mask_end", {}, "padreplace-u21-maskend"), ("mask_end", {}, "maskend")]
    for method, knobs, tag in cases:
        assert Mitigation.of(method, **knobs).tag == tag
    assert sampler_key(SamplerSettings(), "float16", Mitigation.of("wen", target_loss=0.2)) == \
        "ddim50-g7.5-512x512-eta0-float16+wen-l0.2-lr0.05-it10"
    assert key + "+be-l0.2-lr0.05-it10-mask" in sampler_key(SamplerSettings(), "float16",
                                                             Mitigation.of("be", target_loss=0.2), ["a", "b"])
    # a new method's tag carries every knob, so another knob value is another store key, and stays short enough
    # for the store's 80-character folder names (a cut key would let two settings share traces)
    assert Mitigation.of("rna", repeats=2).tag == "rna-repeats2"
    assert Mitigation.of("sail", threshold=8.2).tag.startswith("sail-threshold8.2-k")
    for name in MITIGATIONS:
        setting = _one_setting(name)
        assert len(sampler_key(SamplerSettings(), "bfloat16", setting, ["a"])) <= 80, setting.tag
        for knob, value in setting.values.items():
            # + 2 keeps an odd knob odd (NeMo's SSIM kernel)
            if knob != setting.entry.strength and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert Mitigation.of(name, **{**setting.values, knob: value + 2}).tag != setting.tag, (name, knob)


def test_settings_from_the_config_section():
    section = {"methods": ["wen", "pad_mask", "rna", "mask_end"], "target_losses": [0.1, 0.2], "lr": 0.05,
               "max_iters": 10, "mask_norm": "per_image", "protocol": "per_image", "pad_fractions": [0.5],
               "pad_replacement": "!", "strengths": {"rna": [1, 3]}, "knobs": {"wen": {"max_iters": 2}}}
    tags = [s.tag for s in method_settings(section)]
    assert tags == ["wen-l0.1-lr0.05-it2", "wen-l0.2-lr0.05-it2", "padmask-r0.5", "rna-repeats1", "rna-repeats3",
                    "maskend"]
    with pytest.raises(ValueError, match="mitigation mask_end has no strength knob"):
        method_settings({**section, "strengths": {"mask_end": [1]}})
    with pytest.raises(ValueError, match=r"mitigation rna: unknown knob\(s\) \['bogus'\]"):
        method_settings({**section, "knobs": {"rna": {"bogus": 1}}})
    with pytest.raises(ValueError, match="rna: repeats must be >= 1"):
        method_settings({**section, "strengths": {"rna": [0]}})


def test_a_method_the_model_cannot_run_fails_naming_it(tiny_model):
    class NoAttention:
        model_id = "plain-unet"
        unet = torch.nn.Linear(2, 2)
        tokenizer = text_encoder = None

    with pytest.raises(ValueError, match="mitigation rta cannot run on plain-unet: it needs a tokenizer"):
        Mitigation.of("rta", repeats=1).check_model(NoAttention())
    with pytest.raises(ValueError, match=r"mitigation padreplace-notatoken: .*not a token of tiny"):
        Mitigation.of("pad_replace", token="notatoken").check_model(tiny_model)


# --------------------------------------------------------------------------- Somepalli et al.: captions, noise

def test_caption_insertions_by_hand():
    rng = np.random.default_rng(0)
    positions = {P.insert_word("a b c", "X", rng).split(" ").index("X") for _ in range(200)}
    assert positions == {0, 1, 2, 3}  # uniform over the 4 gaps, both ends included
    caption = "red circle top"
    numbers = P.augment(caption, "rna", 4, np.random.default_rng(1)).split(" ")
    assert len(numbers) == 7 and [w for w in numbers if not w.isdigit()] == caption.split(" ")
    assert all(0 <= int(w) < P.NUMBER_RANGE for w in numbers if w.isdigit())
    repeated = P.augment(caption, "cwr", 3, np.random.default_rng(2)).split(" ")
    assert len(repeated) == 6 and set(repeated) <= set(caption.split(" "))
    with pytest.raises(ValueError, match="unknown caption augmentation"):
        P.augment(caption, "swap", 1, rng)


def test_random_tokens_come_from_the_tokenizer(tiny_model):
    tokenizer = tiny_model.tokenizer
    words = [P.random_token(tokenizer, np.random.default_rng(k)) for k in range(20)]
    special = {tokenizer.decode([i]).strip() for i in tokenizer.all_special_ids}
    assert len(set(words)) > 5 and not set(words) & special


def test_captions_are_seeded_per_generation(tiny_model):
    hook = Mitigation.of("rta", repeats=2).intervention().prompts
    first = hook(tiny_model, [PROMPT, PROMPT, PROMPT], [0, 1, 0], None)
    assert first[0] == first[2] != first[1]  # the same generation, the same rewrite; another seed, another
    assert hook(tiny_model, [PROMPT], [1], None) == [first[1]]  # whatever else is in the batch
    assert hook(tiny_model, [PROMPT], [1], 5) != [first[1]]  # the prompt index is part of its identity


def test_gaussian_noise_on_both_embeddings(tiny_model):
    setup = prepare_sampling(tiny_model, PROMPT, [0, 1], SAMPLER)
    cond, uncond = setup.cond.clone(), setup.uncond.clone()
    noisy = Mitigation.of("gni", lam=0.1).intervention().embedding(setup)
    noise_c, noise_u = (noisy - cond) / 0.1, (setup.uncond - uncond) / 0.1
    for noise in (noise_c, noise_u):
        assert abs(float(noise.std()) - 1) < 0.1 and abs(float(noise.mean())) < 0.1
    assert (noise_c[0] - noise_c[1]).abs().max() > 0.5  # each generation its own draw
    same = prepare_sampling(tiny_model, PROMPT, [0, 1], SAMPLER)
    torch.testing.assert_close(Mitigation.of("gni", lam=0.0).intervention().embedding(same), cond)


# ------------------------------------------------------------------------------------- SAIL and Han et al.

def test_sail_loss_and_acceptance_by_hand(tiny_model):
    diff = torch.zeros(2, 4, 2, 2)
    diff[0, 0, 0, 0] = 3.0
    latents = torch.ones(2, 4, 2, 2)  # norm 4
    assert N.sail_loss(diff, latents, 0.05).tolist() == pytest.approx([3.2, 0.2])
    setup = prepare_sampling(tiny_model, PROMPT, [7], SAMPLER)
    with torch.enable_grad():
        latent, stats = N.sail_latent(setup, 0, 1e9, 0.05, 3, 4, 0.05, 1)  # every candidate accepted at once
    expected = torch.randn((3, *setup.latents.shape[1:]), generator=N.candidate_generator(7, 0))[0]
    torch.testing.assert_close(latent, expected)
    assert stats["iterations"] == 0 and stats["rounds"] == 1
    with torch.enable_grad():
        latent, stats = N.sail_latent(setup, 0, -1.0, 0.05, 3, 4, 0.05, 2)  # never accepted: the best kept
    assert stats["iterations"] == 8 and stats["rounds"] == 2 and stats["threshold"] == pytest.approx(-0.8)
    assert stats["loss_last"] < stats["loss_first"]  # Adam lowered the proxy


def test_han_per_sample_lowers_the_guidance_norm_per_image(tiny_model):
    setup = prepare_sampling(tiny_model, PROMPT, [0, 1], SAMPLER)
    with torch.enable_grad():
        untouched, stats = N.han_per_sample_latents(setup, 1e9, 0.01, 5)
        moved, moved_stats = N.han_per_sample_latents(setup, 0.0, 0.05, 4)
        alone, _ = N.han_per_sample_latents(prepare_sampling(tiny_model, PROMPT, [1], SAMPLER), 0.0, 0.05, 4)
    torch.testing.assert_close(untouched, setup.latents.float())
    assert (stats["iterations"] == 0).all() and (moved_stats["iterations"] == 4).all()
    assert (moved_stats["loss_last"] < moved_stats["loss_first"]).all()
    torch.testing.assert_close(moved[1:], alone, rtol=1e-4, atol=1e-5)  # an image's result is its own


def test_han_batch_wise_update_and_delayed_guidance_by_hand(tiny_model, monkeypatch):
    A = torch.tensor(2.0)
    monkeypatch.setattr(N, "guidance_difference", lambda setup, x, t, rows=None: A * x)  # eps_tilde(x) = 2x
    setup = prepare_sampling(tiny_model, PROMPT, [0], SAMPLER)
    x = setup.latents.float()
    out = N.han_batch_wise_latents(setup, rho=3.0, gamma=0.5, adj_iters=1)
    # x - gamma (A(x + rho Ax/||Ax||) - Ax) = x - gamma rho A^2 x / ||Ax||
    torch.testing.assert_close(out, x - 0.5 * 3.0 * 4 * x / (2 * x.norm()))
    guide = Mitigation.of("han_batch_wise", gamma=0.7, apply_cfg_step=1).intervention().guidance
    u, c = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    assert [float(guide(setup, step, 0, setup.latents, u, c).mean()) for step in range(3)] == [0, 0, SAMPLER.guidance]


@torch.no_grad()
def test_the_guidance_hook_gets_each_steps_latents(tiny_model):
    from benchmark.mitigation.interface import Intervention
    from benchmark.sampling.capture import ddim_step

    seen = []

    @MITIGATIONS.register("toy_guide", label="toy (plain guidance, latents kept)", acts_on="guidance",
                          needs_mask=False)
    def toy_guide() -> Intervention:
        def guidance(setup, step, t, latents, eps_uncond, eps_cond):
            eps = eps_uncond + setup.settings.guidance * (eps_cond - eps_uncond)
            seen.append((step, t, latents.clone(), eps))
            return eps
        return Intervention(guidance=guidance)

    try:
        got = sample_with_capture(tiny_model, PROMPT, [0, 1], SAMPLER, record=False,
                                  intervention=Mitigation.of("toy_guide").intervention())
    finally:
        MITIGATIONS.unregister("toy_guide")
    setup = prepare_sampling(tiny_model, PROMPT, [0, 1], SAMPLER)
    assert [(step, t) for step, t, _, _ in seen] == list(enumerate(setup.steps))
    x = setup.latents
    for _, t, latents, eps in seen:  # step i's latents: the initial noise, then each DDIM update in turn
        assert torch.equal(latents, x)
        x = ddim_step(tiny_model.scheduler, eps, t, x, SAMPLER.eta, None)
    assert torch.equal(got, x)
    assert torch.equal(got, sample_with_capture(tiny_model, PROMPT, [0, 1], SAMPLER, record=False))


def test_a_guidance_hook_without_the_latents_is_refused_naming_the_method():
    from benchmark.mitigation.interface import Intervention

    @MITIGATIONS.register("toy_old_guide", label="toy (the signature before the latents)", acts_on="guidance",
                          needs_mask=False)
    def toy_old_guide() -> Intervention:
        return Intervention(guidance=lambda setup, step, t, eps_uncond, eps_cond: eps_uncond)

    try:
        with pytest.raises(ValueError, match=r"mitigation toy_old_guide: its guidance hook must take \(setup, step, "
                                             r"t, latents, eps_uncond, eps_cond\), got \(setup, step, t, eps_uncond"):
            Mitigation.of("toy_old_guide")
    finally:
        MITIGATIONS.unregister("toy_old_guide")


# -------------------------------------------------------------------------------------- job and plug-ins

def test_every_registered_method_runs_through_the_job(tmp_path, compose, nemo_statistics):
    import json

    import pandas as pd

    from runners.mitigate import run

    methods = MITIGATIONS.names()
    cfg = compose("mitigate", "debug=default", "sampler.steps=3", f"mitigation.methods=[{','.join(methods)}]",
                  "mitigation.target_losses=[0.2]", "mitigation.pad_fractions=[0.5]", "mitigation.n_boot=20",
                  "+mitigation.knobs.han_per_sample={max_iters: 3}",
                  "+mitigation.knobs.sail={max_rounds: 1, budget: 2}",
                  *(f"+mitigation.knobs.{m}={{{', '.join(f'{k}: {v}' for k, v in FAST[m].items())}}}"
                    for m in ("prss", "prss_be", "nemo")), f"+mitigation.knobs.nemo.statistics={nemo_statistics}",
                  *(f"+mitigation.strengths.{m}={v}" for m, v in STRENGTHS.items()))
    run(cfg, tmp_path / "job")
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    rows = pd.read_csv(tmp_path / "job" / "mitigation.csv")
    assert set(rows.method) == {"none", *methods}
    assert {m["method"] for m in result["methods"]} == set(methods)
    assert result["equal_utility"] == {} and result["memorization_rate"] == []  # the tiny set has no truth
    cost = pd.DataFrame(result["cost"]).groupby("method").extra_unet_evals.max()
    assert cost["none"] == 0 and cost["rna"] == 0 and cost["wen"] > 0 and cost["sail"] > 0


def _rows():
    """Two kinds x 4 prompts; method a copies less than the reference r at every utility, b only at high ones."""
    import pandas as pd

    rows = []
    for kind in ("global", "local"):
        for p in range(4):
            noise = 0.01 * p
            rows.append({"kind": kind, "method": "none", "strength": np.nan, "prompt_id": f"{kind}{p}",
                         "CLIP": 20 + noise, "SSCD": 0.8 + noise})
            for strength, (u, s) in {0.3: (24, 0.6), 0.1: (28, 0.4)}.items():
                rows.append({"kind": kind, "method": "r", "strength": strength, "prompt_id": f"{kind}{p}",
                             "CLIP": u + noise, "SSCD": s + noise})
                rows.append({"kind": kind, "method": "a", "strength": strength, "prompt_id": f"{kind}{p}",
                             "CLIP": u + noise, "SSCD": s - 0.1 + noise})
            rows.append({"kind": kind, "method": "b", "strength": 1.0, "prompt_id": f"{kind}{p}",
                         "CLIP": 24 + noise, "SSCD": 0.9 + noise})
    return pd.DataFrame(rows).assign(seed=0)


def _at(table, kind, level):
    return table[(table.kind == kind) & np.isclose(table.CLIP, level)].set_index("method")


def test_equal_utility_table_with_paired_bootstrap():
    import pandas as pd

    from benchmark.mitigation.tradeoff import at_equal_utility

    table = at_equal_utility(_rows(), "CLIP", "SSCD", reference="r", n=2, n_boot=50)
    assert set(table.kind) == {"global", "local"}
    # r's curve, prompt means; the baseline's own level (20.015: every difference 0 by construction) left out
    assert sorted(table.CLIP.unique()) == pytest.approx([24.015, 28.015])
    mid = _at(table, "global", 24.015)
    assert mid.loc["r", "difference"] == 0 and mid.loc["a", "difference"] == pytest.approx(-0.1)
    # every prompt shifts every method alike: the paired interval is tight around -0.1
    assert mid.loc["a", "ci_low"] <= -0.1 + 1e-9 <= mid.loc["a", "ci_high"] + 2e-9
    assert mid.loc["a", "ci_high"] - mid.loc["a", "ci_low"] < 0.005
    assert mid.loc["b", "difference"] == pytest.approx(0.3)
    assert np.isnan(_at(table, "global", 28.015).loc["b", "SSCD"])  # b's curve never reaches that utility
    # c's curve ends at 28.01, just short of the level 28.015, which some resamples of its prompts pass: no value
    # there and no interval either (the resamples that reach it describe a curve that is not c's)
    rows = _rows()
    c = rows[(rows.method == "r") & (rows.strength == 0.1)].assign(method="c")
    c["CLIP"] = 28 + 2 * (c.CLIP - 28) - 0.02
    table = at_equal_utility(pd.concat([rows, c]), "CLIP", "SSCD", reference="r", n=2, n_boot=50)
    unreached = _at(table, "global", 28.015).loc["c"]
    assert np.isnan(unreached[["SSCD", "difference", "ci_low", "ci_high"]].astype(float)).all()
    assert at_equal_utility(_rows(), "CLIP", "SSCD", reference="missing").empty


def test_pareto_front_and_memorization_rate_by_hand():
    from benchmark.mitigation.tradeoff import curves, memorization_rate, pareto_front

    points = curves(_rows())
    front = points[pareto_front(points, "CLIP", "SSCD")]
    # here utility and privacy do not trade off: a at 0.1 has the most utility and the least copying of all
    assert front.method.tolist() == ["a", "a"] and front.strength.tolist() == [0.1, 0.1]
    no_top = points[~((points.method == "a") & (points.strength == 0.1))]
    assert no_top[pareto_front(no_top, "CLIP", "SSCD")].method.tolist() == ["r", "r"]  # r at 0.1 beats a at 0.3
    rate = memorization_rate(_rows(), {"SSCD": 0.5})
    glob = rate[rate.kind == "global"]
    share = {(m, s): r for m, s, r in zip(glob.method, glob.strength.fillna(-1), glob.rate)}
    # a at 0.3 sits at SSCD 0.5 + 0.01 p: three of its four prompts are above the threshold
    assert share == {("none", -1): 1, ("a", 0.1): 0, ("a", 0.3): 0.75, ("r", 0.1): 0, ("r", 0.3): 1, ("b", 1.0): 1}
    assert set(rate.threshold) == {0.5} and set(rate.measure) == {"SSCD"}
    with pytest.raises(ValueError, match="not copying measures"):
        memorization_rate(_rows(), {"CLIP": 20})


def test_a_mitigation_registered_in_a_user_file_reaches_the_table(tmp_path, compose):
    import json

    import pandas as pd

    from runners.mitigate import run

    plugin = tmp_path / "my_mitigation.py"
    plugin.write_text('''
import torch
from benchmark.mitigation.interface import Intervention
from benchmark.registry import MITIGATIONS


@MITIGATIONS.register("toy_scale", label="toy (scaled embedding)", acts_on="embedding", needs_mask=False,
                      strength="scale", stronger="lower", strengths=(0.5,))
def toy_scale(scale: float) -> Intervention:
    return Intervention(embedding=lambda setup: setup.cond * scale)
''')
    spec = importlib.util.spec_from_file_location("my_mitigation", plugin)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        cfg = compose("mitigate", "debug=default", "sampler.steps=3", "mitigation.methods=[wen,toy_scale]",
                      "headline.method=wen",
                      "mitigation.target_losses=[0.2]", "+mitigation.strengths.toy_scale=[0.5,0.9]",
                      "mitigation.n_boot=10")
        run(cfg, tmp_path / "job")
    finally:
        MITIGATIONS.unregister("toy_scale")
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert "toy_scale-scale0.5" in result["settings"] and "toy_scale-scale0.9" in result["settings"]
    rows = pd.read_csv(tmp_path / "job" / "mitigation.csv")
    assert sorted(rows[rows.method == "toy_scale"].strength.unique()) == [0.5, 0.9]


@pytest.mark.parametrize("override, message", [
    ("mitigation.methods=[wen,magic]", "mitigation.methods: 'magic' is not a mitigation"),
    ("+mitigation.strengths.sail=[x]", "mitigation.strengths.sail.0"),
    ("+mitigation.strengths.rna=[1]", "mitigation.strengths.rna: 'rna' is not among mitigation.methods"),
    ("+mitigation.knobs.wen.lr=-1", "mitigation.knobs.wen.lr=-1"),
    ("+mitigation.knobs.wen.bogus=1", "mitigation.knobs.wen.bogus"),
])
def test_bad_mitigation_settings_fail_before_sampling(tmp_path, compose, override, message):
    from runners.mitigate import run

    cfg = compose("mitigate", "debug=default", "mitigation.methods=[wen,be,sail]", override)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(cfg, tmp_path / "job")
    assert not (tmp_path / "artifacts").exists()  # nothing sampled



def test_nemo_statistics_from_the_prompt_sets_non_memorized_prompts(tmp_path, compose, tiny_model):
    """knobs.nemo.statistics=nonmemorized: the job computes the statistics over its prompt set's non-memorized
    prompts once (a file under the store, reused by a rerun), and NeMo's neurons per image reach the table."""
    import pandas as pd
    from omegaconf import OmegaConf

    from benchmark.data.prompts import load_prompt_set
    from benchmark.mitigation.neurons import ActivationStatistics, activation_statistics
    from runners.mitigate import run

    knobs = ", ".join(f"{k}: {v}" for k, v in FAST["nemo"].items())
    cfg = compose("mitigate", "debug=default", "sampler.steps=3", "mitigation.methods=[nemo]", "headline.method=nemo",
                  "mitigation.n_boot=5",
                  f"+mitigation.knobs.nemo={{{knobs}, statistics: nonmemorized}}")
    run(cfg, tmp_path / "job")
    files = list((tmp_path / "artifacts" / "traces" / "nemo_statistics").glob("*.safetensors"))
    assert len(files) == 1
    prompts = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
    expected = activation_statistics(tiny_model, [p.text for p in prompts if not p.memorized])
    stats = ActivationStatistics.load(files[0])
    assert stats.prompts == expected.prompts
    assert all(torch.allclose(stats.mean[k], expected.mean[k]) for k in stats.mean)
    rows = pd.read_csv(tmp_path / "job" / "mitigation.csv")
    assert rows.loc[rows.method == "nemo", "stat/neurons"].notna().all()
    assert "What the methods report" in (tmp_path / "job" / "report.md").read_text()
    stamp = files[0].stat().st_mtime_ns
    run(cfg, tmp_path / "job2")
    assert files[0].stat().st_mtime_ns == stamp  # reused, not recomputed


@pytest.mark.parametrize("overrides, line", [
    (["mitigation.methods=[wen,be,nemo]"], "config error: mitigation nemo-f0-statsnone: needs activation statistics"),
    (["mitigation.methods=[wen,be,pad_replace]", "mitigation.pad_replacement=qqqzzzxx"],
     "config error: mitigation padreplace-qqqzzzxx: padding mitigation: 'qqqzzzxx' is not a token"),
    (["mitigation.reference=rna"], "config error: mitigation.reference='rna' is not among mitigation.methods"),
    (["mitigation.methods=[wen,be,jain_dtp]", "+mitigation.strengths.jain_dtp=[1]"],
     "config error: mitigation.strengths.jain_dtp=[1]: jain_dtp has no strength knob"),
])
def test_a_setting_the_model_refuses_ends_the_runner_with_one_line(tmp_path, overrides, line):
    """What only the loaded model can refuse (statistics NeMo needs, a token the tokenizer lacks) ends the runner as
    a config error does: exit status 2 and one line on stderr naming the method, nothing sampled."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-m", "runners.mitigate", "debug=default", *overrides,
                          f"paths.root={tmp_path}"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(line), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("*.png"))


def test_the_equal_utility_reference_is_wen_when_it_runs_else_the_first_method():
    from benchmark.mitigation.tradeoff import reference_method

    assert reference_method(["be", "wen", "rna"]) == "wen" and reference_method(["be", "rna"]) == "be"
    assert reference_method(["be", "rna"], "rna") == "rna"
