"""Identity by construction: a stored trace is a function of what its key names, whatever the batch or the subset.

Two cases (be-bench issue 25): DDIM with eta > 0 drew its step noise from the global generator, batch-wide, so an
image depended on its batch (``eta_batch``); official seeding counted a prompt's position after shard / limit /
select_ids had narrowed the set, so a shard's traces were not the full run's, which then reused them
(``official_shard``).
"""
import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from benchmark.data.prompts import Prompt, PromptSet, load_prompt_set, select_ids, shard, subset, union
from benchmark.ddpm.models import DDPMSampler
from benchmark.detectors import jacobian as jacobian_scores
from benchmark.detectors.detection import generate, plan, sampler_key
from benchmark.early import stopping as early_stop
from benchmark.sampling.capture import SamplerSettings, guided_eps, initial_noise, sample_with_capture, step_generators
from benchmark.store.traces import TraceStore
from runners import detect

PROMPTS = ["Mothers influence on her young hippo", "a photo of a cat on a red sofa",
           "The No Limits Business Woman Podcast", "an astronaut riding a horse, oil painting"]
ETA = SamplerSettings(steps=4, guidance=7.5, height=32, width=32, eta=1.0)
OFFICIAL = SamplerSettings(steps=3, guidance=7.5, height=32, width=32, seeding="official", gen_seed=3)


def _latents(root: Path) -> dict[str, np.ndarray]:
    """Every stored trace's final latent under ``root``, by its path below the sampler key."""
    out = {}
    for path in glob.glob(f"{root}/**/*.safetensors", recursive=True):
        with safe_open(path, "np") as f:
            out[path.split("/traces/")[1].split("/", 2)[-1]] = f.get_tensor("latent").astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------ eta > 0, any batch

def test_case_eta_batch_detect_jobs_with_batch_1_and_4_store_the_same_traces(tmp_path, compose_at,
                                                                            same_up_to_float_order):
    stores = {}
    for b in (1, 4):
        cfg = compose_at(tmp_path / f"b{b}", "detect", "debug=default", "sampler.eta=1.0",
                         f"sampler.batch_size={b}", "store.dtype=float32")
        detect.run(cfg, tmp_path / f"job{b}")
        stores[b] = _latents(tmp_path / f"b{b}")
    assert len(stores[1]) == 8 and stores[1].keys() == stores[4].keys()
    assert all("-imgnoise" in p for p in glob.glob(f"{tmp_path}/b1/**/seed0.safetensors", recursive=True))
    for name in stores[1]:  # before the fix: differences of 5..12 (the latents' scale is ~40)
        tolerance = same_up_to_float_order(stores[4][name], stores[1][name])
    a, b = sorted(stores[1])[:2]  # another seed of the same prompt is far outside the tolerance
    assert np.abs(stores[1][a] - stores[1][b]).max() > 100 * tolerance


def test_same_prompt_and_seed_in_another_batch_gives_the_same_trace_with_eta_1(tiny_model, same_up_to_float_order):
    torch.manual_seed(123)  # what the global generator holds does not matter, and it is left alone
    state = torch.get_rng_state()
    together = sample_with_capture(tiny_model, PROMPTS, [5, 6, 7, 8], ETA)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    alone = sample_with_capture(tiny_model, PROMPTS[2], [7], ETA)
    for name in ("delta_sq", "latents"):
        tolerance = same_up_to_float_order(getattr(together, name)[2:3], getattr(alone, name))
    deterministic = sample_with_capture(tiny_model, PROMPTS[2], [7], SamplerSettings(4, 7.5, 32, 32, eta=0.0))
    assert (deterministic.latents - alone.latents).abs().max() > 100 * tolerance  # eta = 1 does add noise
    # the same seed under another prompt differs too: nothing is shared by position in the batch
    assert (together.latents[0] - alone.latents[0]).abs().max() > 100 * tolerance


def test_eta_0_draws_nothing_and_is_the_deterministic_ddim_update_bit_for_bit(tiny_model):
    settings = SamplerSettings(steps=4, guidance=7.5, height=32, width=32)
    assert step_generators(settings, [0, 1]) is None
    got = sample_with_capture(tiny_model, PROMPTS[:2], [0, 1], settings, record=False)
    # the loop as it was before per-image step noise: scheduler.step(..., eta=0) with nothing else drawn
    context = torch.cat([tiny_model.encode([""]).expand(2, -1, -1), tiny_model.encode([PROMPTS[0]]),
                         tiny_model.encode([PROMPTS[1]])])
    latents = initial_noise(tiny_model, [0, 1], settings)
    scheduler = tiny_model.scheduler
    scheduler.set_timesteps(settings.steps)
    with torch.no_grad():
        for t in scheduler.timesteps.tolist():
            eps_u, eps_c = guided_eps(tiny_model, latents, torch.tensor(t), context)
            latents = scheduler.step(eps_u + 7.5 * (eps_c - eps_u), t, latents, eta=0.0).prev_sample
    assert torch.equal(got, latents)


def test_official_rows_with_eta_do_not_depend_on_the_rows_sampled_with_them(tiny_model, same_up_to_float_order):
    settings = SamplerSettings(steps=3, guidance=7.5, height=32, width=32, eta=1.0, seeding="official")
    whole = sample_with_capture(tiny_model, PROMPTS[0], [0, 1, 2, 3], settings, record=False, prompt_index=5)
    part = sample_with_capture(tiny_model, PROMPTS[0], [2], settings, record=False, prompt_index=5)
    tolerance = same_up_to_float_order(whole[2:3], part)
    other = sample_with_capture(tiny_model, PROMPTS[0], [2], settings, record=False, prompt_index=6)
    assert (other - part).abs().max() > 100 * tolerance  # the prompt index seeds the step noise too
    with pytest.raises(ValueError, match="prompt index"):
        step_generators(settings, [0])


def test_early_stop_and_sail_follow_the_same_step_noise(tiny_model, same_up_to_float_order):
    settings = SamplerSettings(steps=5, guidance=7.5, height=32, width=32, eta=1.0, end_map_steps=(2,))
    full = sample_with_capture(tiny_model, PROMPTS, [0, 1, 2, 3], settings)
    rule = early_stop.StopRule(2, "LD", ("down_blocks.0",), 30, np.inf)
    signal = early_stop.sample_with_early_stop(tiny_model, PROMPTS, [0, 1, 2, 3], settings, rule, decode=False).signal
    rule = early_stop.StopRule(2, "LD", ("down_blocks.0",), 30, float(np.median(signal)))
    out = early_stop.sample_with_early_stop(tiny_model, PROMPTS, [0, 1, 2, 3], settings, rule, decode=False)
    assert out.stopped.sum() == 2
    go = ~out.stopped  # images that go on keep their own noise when others leave the batch
    same_up_to_float_order(out.latents[go], full.latents[go])
    # SAIL re-walks the trajectory: with its own step noise, one image alone gives the batch's value
    together = jacobian_scores.sail(tiny_model, PROMPTS[:2], [0, 1], settings, k=3)
    alone = jacobian_scores.sail(tiny_model, PROMPTS[1], [1], settings, k=3)
    same_up_to_float_order(together[1:], alone)


def test_passes_that_rewalk_the_trajectory_walk_the_samplers_with_eta_1(tiny_model, monkeypatch,
                                                                       same_up_to_float_order):
    walked = {"sampler": [], "sail": []}

    def spy(where, step):
        def record(*args):
            walked[where].append(step(*args))
            return walked[where][-1]
        return record

    from benchmark.sampling import capture
    monkeypatch.setattr(capture, "ddim_step", spy("sampler", capture.ddim_step))
    monkeypatch.setattr(jacobian_scores, "ddim_step", spy("sail", jacobian_scores.ddim_step))
    sample_with_capture(tiny_model, PROMPTS[:2], [3, 4], ETA, record=False)
    jacobian_scores.sail(tiny_model, PROMPTS[:2], [3, 4], ETA, k=3)
    assert len(walked["sail"]) == 2
    for ours, theirs in zip(walked["sail"], walked["sampler"]):
        same_up_to_float_order(ours, theirs)


def test_eta_above_0_gets_its_own_store_key():
    assert sampler_key(SamplerSettings(steps=50, height=512, width=512), "float16") == \
        "ddim50-g7.5-512x512-eta0-float16"  # existing stores stay valid
    assert sampler_key(SamplerSettings(steps=50, height=512, width=512, eta=0.5), "float16") == \
        "ddim50-g7.5-512x512-eta0.5-float16-imgnoise"  # traces of the global-generator noise are not reused
    assert DDPMSampler(steps=100).key == "ddim100-eta0"
    assert DDPMSampler(steps=100, eta=1.0).key == "ddim100-eta1-imgnoise"
    assert DDPMSampler(steps=1000, sampler="ddpm").key == "ddpm1000-eta0"  # ancestral: per-image noise already


# ------------------------------------------------------------------------- official seeding, any narrowed set

def test_case_official_shard_a_shards_traces_are_the_full_runs(tmp_path, compose_at, same_up_to_float_order):
    runs = [("shared", ["prompts.shard=1/2"]), ("shared", []), ("fresh", [])]
    sampled = []
    for i, (root, options) in enumerate(runs):
        cfg = compose_at(tmp_path / root, "detect", "debug=default", "sampler.seeding=official",
                         "store.dtype=float32", *options)
        detect.run(cfg, tmp_path / f"job{i}")
        sampled.append(json.loads((tmp_path / f"job{i}" / "metrics.json").read_text())["sampled_now"])
    assert sampled == [4, 4, 8]  # the full run in the shared store reuses the shard's traces
    shared, fresh = _latents(tmp_path / "shared"), _latents(tmp_path / "fresh")
    assert len(fresh) == 8 and shared.keys() == fresh.keys()
    for name in fresh:  # before the fix: the shard's prompts were seeded 0 and 1 instead of 1 and 3
        same_up_to_float_order(shared[name], fresh[name])


def _set() -> PromptSet:
    return PromptSet("p", [Prompt(f"q{i}", text, i % 2 == 0) for i, text in enumerate(PROMPTS)])


def test_positions_survive_shard_limit_select_ids_and_subsets(tmp_path):
    full = _set()
    assert [p.position for p in full] == [0, 1, 2, 3]
    assert [p.position for p in shard(full, "1/2")] == [1, 3]
    ids = tmp_path / "ids.txt"
    ids.write_text("q3\nq2\n")
    assert [p.position for p in select_ids(full, ids)] == [2, 3]
    narrowed = load_prompt_set({"loader": "inline", "name": "p", "entries": [{"id": f"q{i}", "text": t}
                                                                         for i, t in enumerate(PROMPTS)],
                                "select_ids": str(ids), "limit": 1, "shard": "0/1"})
    assert [(p.id, p.position) for p in narrowed] == [("q2", 2)]
    assert [p.position for p in subset(full, full.prompts[::-1])] == [3, 2, 1, 0]
    assert [g.index for g in plan(shard(full, "1/2"), "tiny", "s", [0])] == [1, 3]
    # a union is a new whole set, numbered in its own order; parts keep nothing of theirs
    both = union("u", [shard(full, "1/2"), PromptSet("b", [Prompt("x", "a red ball", False)])])
    assert [(p.id, p.position) for p in both] == [("p/q1", 0), ("p/q3", 1), ("b/x", 2)]
    with pytest.raises(ValueError, match="1 prompts without a position"):
        PromptSet("mixed", [full.prompts[0], Prompt("y", "a dog", False)])


@pytest.mark.parametrize("narrow", ["shard", "limit", "select_ids", "order"])
def test_official_seeding_gives_a_prompt_the_full_sets_trace_in_any_narrowed_set(tiny_model, tmp_path, narrow):
    full = _set()
    ids = tmp_path / "ids.txt"
    ids.write_text("q1\nq3\n")
    part = {"shard": lambda: shard(full, "1/2"), "limit": lambda: subset(full, full.prompts[:2]),
            "select_ids": lambda: select_ids(full, ids), "order": lambda: subset(full, full.prompts[::-1])}[narrow]()
    key = sampler_key(OFFICIAL, "float32")
    assert key.endswith("-official3-fullindex") and key != sampler_key(SamplerSettings(3, 7.5, 32, 32), "float32")
    stores = {}
    for name, prompt_set in (("full", full), ("part", part)):
        stores[name] = TraceStore(tmp_path / name, "float32")
        generate(tiny_model, plan(prompt_set, "tiny", key, [0, 1]), OFFICIAL, stores[name], batch_size=4)
    for gen in plan(part, "tiny", key, [0, 1]):
        for row in (0, 1):
            a, b = stores["part"].read(gen.key, row), stores["full"].read(gen.key, row)
            assert np.array_equal(a.latent, b.latent) and np.array_equal(a.delta_sq, b.delta_sq)
    # the position is what seeds it: another index gives another image
    gen = plan(part, "tiny", key, [0])[0]
    own = sample_with_capture(tiny_model, gen.prompt.text, [0], OFFICIAL, prompt_index=0 if gen.index else 1)
    assert np.abs(own.latents[0].numpy() - stores["part"].read(gen.key, 0).latent).max() > 1e-2


def test_official_seeding_keys_a_trace_by_its_position_so_a_reordered_set_reuses_nothing_wrong(tmp_path):
    """Official noise depends on the prompt's position in its whole set: the same prompt at another position of a
    set of the same name (a reordered file) is another trace; per-image seeding does not depend on it."""
    from benchmark.data.prompts import Prompt, PromptSet
    from benchmark.detectors.detection import plan

    a, b = Prompt("a", "a cat", False), Prompt("b", "a dog", True)
    first, reordered = PromptSet("s", [a, b]), PromptSet("s", [b, a])
    key = {p: [g.key.folder(tmp_path) for g in plan(s, "tiny", "k", [0], by_position=True)]
           for p, s in (("first", first), ("reordered", reordered))}
    assert key["first"][0] != key["reordered"][1]  # prompt a at position 0, then 1
    plain = {p: [g.key.folder(tmp_path) for g in plan(s, "tiny", "k", [0])]
             for p, s in (("1", first), ("2", reordered))}
    assert plain["1"][0] == plain["2"][1]
