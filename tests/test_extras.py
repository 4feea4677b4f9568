"""Extra passes (SAIL, anisotropy, curvature) in the pipeline: the sidecar store, score_grid, localization, the job."""
import json

import numpy as np
import pandas as pd
import pytest

from benchmark.data.prompts import Prompt, PromptSet, Truth
from benchmark.detectors import detection, jacobian, scores
from benchmark.detectors import extra_passes as extras
from benchmark.localization.evaluation import localization_table, localizer_maps
from benchmark.sampling.capture import SamplerSettings
from benchmark.store.traces import TraceStore

SETTINGS = SamplerSettings(steps=4, guidance=7.5, height=32, width=32)
PROMPTS = PromptSet("t", [Prompt("m0", "Mothers influence on her young hippo", True, "global"),
                          Prompt("n0", "a photo of a cat on a red sofa", False)])


class UNetCalls:
    """Counts UNet forward passes (a JVP or a backward pass goes through forward once too)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.unet.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


@pytest.fixture
def sampled(tiny_model, tmp_path):
    """Traces of 2 prompts x 2 seeds, sampled without any extra pass."""
    store = TraceStore(tmp_path / "store")
    plan = detection.plan(PROMPTS, "tiny", "s", [0, 1])
    assert detection.generate(tiny_model, plan, SETTINGS, store, batch_size=4) == 4
    return store, plan


def trace_files(store, plan):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for g in plan for s in g.seeds
            for p in (store.trace_path(g.key, s), store.image_path(g.key, s))}


def test_extras_are_added_to_earlier_traces_once_and_keyed_by_their_settings(tiny_model, sampled):
    store, plan = sampled
    before = trace_files(store, plan)
    wanted = extras.requests(["sail", "anisotropy"], {}, SETTINGS)
    with UNetCalls(tiny_model) as calls:
        assert extras.compute_missing(tiny_model, plan, SETTINGS, store, wanted, batch_size=2) == 2 * 4
        assert calls.n > 0
        first = calls.n
        # computed once: nothing runs again, and the traces were never resampled nor rewritten
        assert extras.compute_missing(tiny_model, plan, SETTINGS, store, wanted, batch_size=2) == 0
        assert calls.n == first
    assert trace_files(store, plan) == before
    folder = plan[0].key.folder(store.root)
    names = sorted(p.name for p in folder.glob("seed0.*.safetensors"))
    assert names == sorted([f"seed0.sail-{wanted[0].digest}.safetensors",
                            f"seed0.anisotropy-{wanted[1].digest}.safetensors"])
    # the defaults spelt out are the same request; another value of a knob is another file, computed anew
    assert extras.requests(["sail"], {"sail": {"k": 1, "n": None}}, SETTINGS)[0].digest == wanted[0].digest
    k2 = extras.requests(["sail"], {"sail": {"k": 2}}, SETTINGS)
    assert k2[0].digest != wanted[0].digest
    assert extras.compute_missing(tiny_model, plan, SETTINGS, store, k2) == 4
    # n: only a prompt's first images get the pass, and the rest stays missing-free
    one = extras.requests(["curvature"], {"curvature": {"probes": 2, "n": 1}}, SETTINGS)
    assert extras.compute_missing(tiny_model, plan, SETTINGS, store, one) == 2
    assert extras.missing_seeds(store, plan[0].key, plan[0].seeds, one[0]) == []


def test_a_damaged_sidecar_is_moved_aside_and_computed_again(tiny_model, sampled, capsys):
    store, plan = sampled
    wanted = extras.requests(["sail"], {}, SETTINGS)
    extras.compute_missing(tiny_model, plan, SETTINGS, store, wanted)
    path = wanted[0].path(store, plan[0].key, 1)
    good = extras.read(path, wanted[0])
    path.write_bytes(path.read_bytes()[:-3])
    capsys.readouterr()
    assert extras.compute_missing(tiny_model, plan, SETTINGS, store, wanted) == 1
    line, = capsys.readouterr().out.splitlines()
    assert str(path) in line and f"moved aside to {path.name}.damaged" in line and "recomputed" in line
    np.testing.assert_allclose(extras.read(path, wanted[0])["sail"], good["sail"], rtol=1e-5)
    path.write_bytes(b"x" * 9)  # damaged after planning: read refuses it with the same line
    with pytest.raises(ValueError, match=rf"damaged store file .*{path.name}.*recomputed"):
        extras.load_fields(store, [(plan[0].key, plan[0].seeds, 1)], wanted)
    assert not path.exists()


def test_extras_use_the_traces_noise_and_depend_on_their_seed_alone(tiny_model, sampled, same_up_to_float_order):
    store, plan = sampled
    wanted = extras.requests(["sail", "anisotropy"], {}, SETTINGS)
    extras.compute_missing(tiny_model, plan, SETTINGS, store, wanted, batch_size=4)  # both prompts in one call
    arrays = detection.load(store, plan, wanted)
    # the anisotropy's norm term is ||eps_c - eps_u|| at the first step on the same noise: Wen's D_1 from the trace
    # (stored in float16, hence the tolerance)
    d1 = scores.magnitude_D(arrays.delta_sq, 1)
    same_up_to_float_order(arrays.extras["guidance_norm"], d1, rel=2e-3)
    # the second prompt's seed 1 alone gives the value it got in a batch with other prompts and seeds
    alone = jacobian.sail(tiny_model, PROMPTS.prompts[1].text, [1], SETTINGS)
    same_up_to_float_order(arrays.extras["sail"][3:], alone)
    assert not np.allclose(arrays.extras["sail"][2], arrays.extras["sail"][3])


def test_score_grid_scores_extra_detectors_when_present_and_skips_them_when_absent(tiny_model, sampled):
    store, plan = sampled
    layer_sets = {"all": ["*"]}
    plain = detection.score_grid(detection.load(store, plan), layer_sets, [1])
    assert not {"SAIL", "anisotropy", "curvature"} & set(plain.detector)
    assert "score_difference" in set(plain.detector)  # from the trace alone
    wanted = extras.requests(["sail", "anisotropy"], {"sail": {"n": 1}}, SETTINGS)
    extras.compute_missing(tiny_model, plan, SETTINGS, store, wanted)
    table = detection.score_grid(detection.load(store, plan, wanted), layer_sets, [1])
    assert len(table[table.detector == "anisotropy"]) == 4
    sail = table[table.detector == "SAIL"]
    assert list(sail.seed) == [0, 0] and np.isfinite(sail.score).all()  # n = 1: each prompt's first seed only
    metrics = detection.detection_table(table, n_boot=0)
    assert {"SAIL", "anisotropy"} <= set(metrics.detector)
    # asked for but not computed: one clear error naming the file
    curvature = extras.requests(["curvature"], {}, SETTINGS)
    with pytest.raises(FileNotFoundError, match="extra pass 'curvature' missing for seed 0"):
        detection.load(store, plan, curvature)


def test_bad_extra_settings_get_one_clear_error():
    with pytest.raises(ValueError, match="unknown extra pass 'sial'"):
        extras.requests(["sial"], {}, SETTINGS)
    with pytest.raises(ValueError, match="extra.sail: unknown knob.s. probes"):
        extras.requests(["sail"], {"sail": {"probes": 3}}, SETTINGS)
    with pytest.raises(ValueError, match="extra.sail.k=9 must be in 1..4"):
        extras.requests(["sail"], {"sail": {"k": 9}}, SETTINGS)
    with pytest.raises(ValueError, match="extra.curvature.step=4 is outside"):
        extras.requests(["curvature"], {"curvature": {"step": 4}}, SETTINGS)
    # eta > 0 is no error: a pass re-walking the trajectory draws each image's own step noise, as the sampler did
    extras.requests(["curvature", "sail"], {"sail": {"k": 3}},
                    SamplerSettings(steps=4, guidance=7.5, height=32, width=32, eta=1.0))
    with pytest.raises(ValueError, match="n must be a positive"):
        extras.requests(["anisotropy"], {"anisotropy": {"n": 0}}, SETTINGS)
    with pytest.raises(ValueError, match="detector 'SAIL' reads sail of the extra pass 'sail': add it"):
        extras.check_detector("SAIL", extras.requests(["anisotropy"], {}, SETTINGS))
    extras.check_detector("D", [])


def test_a_later_knob_at_its_old_value_keeps_existing_sidecar_names():
    # the digests of curvature sidecars stored before probe_seeding existed (EXTRA_VERSION 1)
    assert extras.requests(["curvature"], {}, SETTINGS)[0].digest == "695ccd16"
    assert extras.requests(["curvature"], {"curvature": {"probes": 2}}, SETTINGS)[0].digest == "d3bb7af7"
    assert extras.requests(["curvature"], {"curvature": {"probe_seeding": "per_image"}}, SETTINGS)[0].digest \
        == "695ccd16"
    official = extras.requests(["curvature"], {"curvature": {"probe_seeding": "official"}}, SETTINGS)[0]
    assert official.digest != "695ccd16" and official.knobs["probe_seeding"] == "official"
    with pytest.raises(ValueError, match="extra.curvature.probe_seeding='cuda' is not one of per_image, official"):
        extras.requests(["curvature"], {"curvature": {"probe_seeding": "cuda"}}, SETTINGS)
    with pytest.raises(ValueError, match="extra.curvature.probe_seed=3 has no effect with probe_seeding=official"):
        extras.requests(["curvature"], {"curvature": {"probe_seeding": "official", "probe_seed": 3}}, SETTINGS)


def test_official_probe_seeding_reaches_the_curvature_map(tiny_model):
    settings = SamplerSettings(steps=3, guidance=7.5, height=32, width=32)
    maps = {s: jacobian.curvature_map(tiny_model, "a cat", [0, 1], settings, probes=2, probe_seeding=s)
            for s in ("per_image", "official")}
    again = jacobian.curvature_map(tiny_model, "a cat", [1], settings, probes=2, probe_seeding="official")
    np.testing.assert_allclose(again[0], maps["official"][1], rtol=1e-4, atol=1e-6)
    assert not np.allclose(maps["official"], maps["per_image"])


def test_score_difference_ranks_as_D_only_at_the_first_step():
    rng = np.random.default_rng(0)
    delta_sq = rng.random((20, 5, 4, 4)) * rng.random((20, 5, 1, 1))
    first = jacobian.score_difference_map(delta_sq, 0).mean(axis=(-2, -1))
    d1 = scores.magnitude_D(delta_sq, 1)
    assert (np.argsort(first) == np.argsort(d1)).all()  # mean of delta_sq at step 0 = D_1^2 / (h w)
    last = extras.score_difference(delta_sq)
    assert not (np.argsort(last) == np.argsort(d1)).all()  # the registered one, at the official last step


def test_localization_table_scores_other_localizers_on_their_computed_generations():
    rng = np.random.default_rng(0)
    n = 4
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    truth = {"m": Truth(rng.random((3, 8, 8)), mask)}
    arrays = detection.TraceArrays(
        pd.DataFrame({"prompt_id": ["m", "m", "x", "x"], "kind": ["local", "local", "none", "none"],
                      "memorized": [True, True, False, False], "seed": [0, 1, 0, 1]}),
        rng.random((n, 3, 8, 8)), {"l": rng.random((n, 4, 4))}, {"l": rng.random((n, 3, 5))}, np.full(n, 2), {},
        {"curvature_map": np.stack([mask * 1.0 + 0.1 * rng.random((8, 8)), np.full((8, 8), np.nan),
                                    rng.random((8, 8)), np.full((8, 8), np.nan)])})
    maps = localizer_maps(arrays)
    assert set(maps) == {"curvature", "score_difference"}
    table = localization_table(arrays.end_maps, list(arrays.rows.prompt_id), truth, {"all": ["*"]}, maps=maps)
    row = table[table.layers == "curvature"].iloc[0]
    assert row.n == 1 and row.n_control == 1 and row.localizer == "curvature"  # NaN rows (not computed) left out
    assert row.iou == pytest.approx(1.0) and row.pixel_auroc == pytest.approx(1.0)
    assert table[table.layers == "score_difference"].iloc[0].n == 2
    del arrays.extras["curvature_map"]
    assert set(localizer_maps(arrays)) == {"score_difference"}


def test_detect_job_with_sail_and_anisotropy(tmp_path, compose):
    from runners.detect import run

    cfg = compose("detect", "debug=default", "extra.passes=[sail,anisotropy]")
    run(cfg, tmp_path / "job1")
    result = json.loads((tmp_path / "job1" / "metrics.json").read_text())
    assert result["extra_computed_now"] == 4 + 4  # n = 1 image of each of the 4 prompts, per pass
    assert set(result["extra"]) == {"sail", "anisotropy"} and result["extra"]["sail"]["k"] == 1
    table = pd.DataFrame(result["metrics"])
    for name in ("SAIL", "anisotropy"):
        rows = table[(table.detector == name) & (table.subset == "all")]
        assert set(rows.level) == {"prompt", "generation"} and rows.auc.between(0, 1).all()
    # the same job again in another folder: nothing sampled, nothing recomputed
    run(compose("detect", "debug=default", "extra.passes=[sail,anisotropy]"), tmp_path / "job2")
    again = json.loads((tmp_path / "job2" / "metrics.json").read_text())
    assert again["sampled_now"] == 0 and again["extra_computed_now"] == 0


def test_extras_follow_official_seeding(tiny_model, tmp_path, same_up_to_float_order):
    settings = SamplerSettings(steps=3, guidance=7.5, height=32, width=32, seeding="official", gen_seed=3)
    store = TraceStore(tmp_path / "store")
    plan = detection.plan(PROMPTS, "tiny", "official", [0, 1])
    detection.generate(tiny_model, plan, settings, store, batch_size=4)
    wanted = extras.requests(["anisotropy"], {"anisotropy": {"n": 1}}, settings)
    assert extras.compute_missing(tiny_model, plan, settings, store, wanted) == 2  # row 0 of each prompt
    arrays = detection.load(store, plan, wanted)
    first = arrays.rows.seed.to_numpy() == 0
    same_up_to_float_order(arrays.extras["guidance_norm"][first], scores.magnitude_D(arrays.delta_sq, 1)[first],
                           rel=2e-3)
    assert np.isnan(arrays.extras["guidance_norm"][~first]).all()


def test_score_difference_in_score_units_is_the_official_score_diff_by_hand():
    from diffusers import DDIMScheduler

    from benchmark.models.text_to_image import SD14_SCHEDULER

    scheduler = DDIMScheduler(**SD14_SCHEDULER)
    steps = 50
    rng = np.random.default_rng(1)
    eps_u, eps_c = rng.standard_normal((2, 3, 4, 2, 2))  # (n=3, c=4, h=2, w=2) each
    scheduler.set_timesteps(steps)
    t = int(scheduler.timesteps[-1])  # the last step (official index 49 of 50)
    one_minus = 1 - float(scheduler.alphas_cumprod[t])
    # official compute_score_diffs_only: s = -eps / sqrt(1 - alpha_bar_t), map = sum_c (s_c - s_u)^2
    official = (((-eps_c / one_minus ** 0.5) - (-eps_u / one_minus ** 0.5)) ** 2).sum(1)
    delta_sq = np.zeros((3, steps, 2, 2))
    delta_sq[:, -1] = ((eps_c - eps_u) ** 2).sum(1)  # what a trace stores
    rows = pd.DataFrame({"prompt_id": ["a", "b", "c"], "kind": "none", "memorized": False, "seed": 0})
    arrays = detection.TraceArrays(rows, delta_sq, {}, {}, np.zeros(3, int), {})
    eps_units = arrays.score_units("eps", scheduler, steps)
    score_units = arrays.score_units("score", scheduler, steps)
    assert eps_units.one_minus_alpha_bar == 1.0 and score_units.one_minus_alpha_bar == pytest.approx(one_minus)
    entry = extras.DETECTORS["score_difference"]
    np.testing.assert_allclose(entry.fn(**score_units.inputs(entry, None, 0, None)), official.mean(axis=(1, 2)))
    np.testing.assert_allclose(entry.fn(**eps_units.inputs(entry, None, 0, None)), delta_sq[:, -1].mean(axis=(1, 2)))
    local = extras.LOCALIZERS["score_difference"]
    np.testing.assert_allclose(local.fn(**score_units.inputs(local, None, 0, None)), official, rtol=1e-6)
    with pytest.raises(ValueError, match="score.score_difference_units 'Score' is not one of eps, score"):
        arrays.score_units("Score", scheduler, steps)
