"""Contract tests over every registry entry, and a detector added by one decorated function reaching the tables.

The contracts iterate the registries, so a new detector, localizer, mitigation, similarity, prompt source or model
builder is tested here without an edit to this file (a prompt source needs one example spec in SOURCE_EXAMPLES).
"""
import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.detectors import detection
from benchmark.registry import (
    CAPTION_RENDERERS,
    DETECTORS,
    EXTRA_PASSES,
    LOCALIZERS,
    MITIGATIONS,
    MODEL_BUILDERS,
    PROMPT_SOURCES,
    SIMILARITIES,
    Registry,
)
from benchmark.store import job_folder as jobfolder

LAYERS = ["a.0.attn2", "a.1.attn2", "b.0.attn2"]
LAYER_SETS = {"all": ["*"], "a": ["a"]}
N, STEPS, TOKENS = 12, 6, 10


def fake_arrays(seed: int = 0) -> detection.TraceArrays:
    """Traces of N generations with the shapes capture writes: delta_sq (n, steps, 8, 8), end maps at two sizes,
    token attention normalised over tokens, and every extra pass's fields (a scalar or an 8x8 map per generation).
    Half the prompts are labelled memorized."""
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame({"prompt_id": [f"p{i // 2}" for i in range(N)],
                         "kind": ["global" if i < N // 2 else "none" for i in range(N)],
                         "memorized": [i < N // 2 for i in range(N)], "seed": [i % 2 for i in range(N)]})
    sizes = {"a.0.attn2": 4, "a.1.attn2": 4, "b.0.attn2": 2}
    attn = {k: rng.random((N, STEPS, TOKENS)) + 0.05 for k in LAYERS}
    return detection.TraceArrays(
        rows, rng.random((N, STEPS, 8, 8)) + 0.1,
        {k: rng.random((N, s, s)) + 0.05 for k, s in sizes.items()},
        {k: v / v.sum(-1, keepdims=True) for k, v in attn.items()},
        rng.integers(2, TOKENS - 1, N), {},
        {f: rng.random((N,) if kind == "scalar" else (N, 8, 8)) for e in EXTRA_PASSES.entries()
         for f, kind in e.fields.items()})


def scores_of(arrays, name: str, layers: str = "a", T: int = 2) -> np.ndarray:
    table = detection.score_grid(arrays, LAYER_SETS, [2, STEPS])
    entry = DETECTORS[name]
    part = table[(table.detector == name) & (table.layers == (layers if entry.uses_layers else ""))
                 & (table["T"] == (T if entry.uses_T else 0))]
    assert len(part) == N, f"{name}: {len(part)} rows for one layer set and window"
    return part.score.to_numpy()


@pytest.fixture(scope="module")
def arrays():
    return fake_arrays()


# ---------------------------------------------------------------------------------------------- detectors

@pytest.mark.parametrize("name", DETECTORS.names())
def test_detector_scores_are_finite_one_per_generation_and_labelled(arrays, name):
    entry = DETECTORS[name]
    assert isinstance(entry.higher_is_memorized, bool) and entry.label
    values = scores_of(arrays, name)
    assert values.shape == (N,) and np.isfinite(values).all()


@pytest.mark.parametrize("name", [n for n in DETECTORS.names() if DETECTORS[n].uses_T])
def test_detector_reads_only_the_first_T_steps(arrays, name):
    later = fake_arrays(seed=1)  # every step after T=2 replaced by other values
    changed = detection.TraceArrays(arrays.rows, np.concatenate([arrays.delta_sq[:, :2], later.delta_sq[:, 2:]], 1),
                                    arrays.end_maps,
                                    {k: np.concatenate([v[:, :2], later.token_attn[k][:, 2:]], 1)
                                     for k, v in arrays.token_attn.items()}, arrays.end_index, {})
    np.testing.assert_allclose(scores_of(changed, name, T=2), scores_of(arrays, name, T=2), rtol=1e-6)
    assert not np.allclose(scores_of(changed, name, T=STEPS), scores_of(arrays, name, T=STEPS))


@pytest.mark.parametrize("name", DETECTORS.names())
def test_detector_reads_only_its_layer_set(arrays, name):
    other = fake_arrays(seed=2)
    changed = detection.TraceArrays(arrays.rows, arrays.delta_sq, {**arrays.end_maps, "b.0.attn2": other.end_maps[
        "b.0.attn2"]}, {**arrays.token_attn, "b.0.attn2": other.token_attn["b.0.attn2"]}, arrays.end_index, {},
        arrays.extras)
    np.testing.assert_allclose(scores_of(changed, name, layers="a"), scores_of(arrays, name, layers="a"), rtol=1e-6)


@pytest.mark.parametrize("name", DETECTORS.names())
def test_detection_table_honours_the_detectors_direction(arrays, name):
    """Label as memorized the generations the detector calls memorized (by its direction): AUC 1 at generation
    level, whichever way the detector points."""
    values = scores_of(arrays, name)
    table = detection.score_grid(arrays, LAYER_SETS, [2])
    entry = DETECTORS[name]
    part = table[(table.detector == name) & (table.layers == ("a" if entry.uses_layers else ""))
                 & (table["T"] == (2 if entry.uses_T else 0))].copy()
    ranked = values if entry.higher_is_memorized else -values
    part["memorized"] = ranked > np.median(ranked)
    part["kind"] = np.where(part.memorized, "global", "none")
    metrics = detection.detection_table(part, n_boot=0)
    assert metrics[metrics.level == "generation"].auc.iloc[0] == pytest.approx(1.0)


def test_every_detector_reads_fields_traces_have():
    detection.check_detectors()


def test_registering_checks_metadata():
    axis = Registry("detector", DETECTORS._check)
    with pytest.raises(ValueError, match="'x': say higher_is_memorized"):
        axis.register("x")(lambda delta_sq: delta_sq)
    with pytest.raises(ValueError, match="uses_T=False disagrees"):
        axis.register("y", higher_is_memorized=True, uses_T=False)(lambda delta_sq, T: delta_sq)
    axis.register("z", higher_is_memorized=True)(np.max)
    with pytest.raises(ValueError, match="'z' is registered already"):
        axis.register("z", higher_is_memorized=True)(np.min)
    with pytest.raises(ValueError, match=r"'v': reproduces='table1' must be a tuple"):
        axis.register("v", higher_is_memorized=True, reproduces="table1")(lambda delta_sq: delta_sq)
    with pytest.raises(KeyError, match="unknown detector 'w'"):
        axis["w"]
    assert axis.label("w") == "w"  # an old job's detector that is no longer registered shows by name


# ----------------------------------------------------------------- a new detector: one decorated function

def peak_magnitude(delta_sq: np.ndarray, T: int) -> np.ndarray:
    """A throwaway detector: the largest per-step ||eps_cond - eps_uncond|| over the first T steps."""
    return np.sqrt(delta_sq[:, :T].sum(axis=(-2, -1))).max(axis=1)


@pytest.fixture
def new_detector():
    DETECTORS.register("peak_D", label="peak magnitude (test)", higher_is_memorized=True)(peak_magnitude)
    yield "peak_D"
    DETECTORS.unregister("peak_D")


def test_peak_magnitude_by_hand():
    delta_sq = np.zeros((1, 3, 2, 2))
    delta_sq[0, :, 0, 0] = [9.0, 16.0, 1.0]
    assert peak_magnitude(delta_sq, 1)[0] == 3.0 and peak_magnitude(delta_sq, 3)[0] == 4.0


def test_a_registered_detector_reaches_scores_metrics_and_the_leaderboard(arrays, new_detector, tmp_path):
    from reports.leaderboard import collect, leaderboard

    scores = detection.score_grid(arrays, LAYER_SETS, [2, STEPS])
    assert set(scores[scores.detector == new_detector]["T"]) == {2, STEPS}  # a window, no layer set
    assert set(scores[scores.detector == new_detector].layers) == {""}
    metrics = detection.detection_table(scores, n_boot=0)
    assert len(metrics[metrics.detector == new_detector]) == 2 * 2  # (T) x (prompt, generation level)
    assert detection.headline(metrics, new_detector, "a", 2, "all", "prompt") == pytest.approx(
        metrics[(metrics.detector == new_detector) & (metrics["T"] == 2) & (metrics.level == "prompt")].auc.iloc[0])
    jobfolder.write_results(tmp_path / "job", "detect", {"model": {"name": "m"}}, {"steps": STEPS}, 1,
                            {"model": "m", "prompt_set": "p", "metrics": metrics.to_dict(orient="records")},
                            {jobfolder.TABLES["detect"]: scores})
    board = leaderboard(collect([tmp_path]))
    assert {"peak magnitude (test)", "Wen (D)", "BE (LD)"} <= set(board.method)
    assert len(board) == len(metrics)  # every level and subset, one row each


def peak_of_mask(mask: np.ndarray) -> np.ndarray:
    """A throwaway detector: the brightest pixel of the BE mask, (n, h, w) -> (n,)."""
    return mask.max(axis=(-2, -1))


def test_a_detector_registered_in_the_library_passes_every_contract(arrays):
    """The contracts above, run on a detector registered here (they iterate the registry, so a detector added to
    the library meets them with no edit); it reads the BE mask, so it also runs early and on the step-k view."""
    from benchmark.early import step_detection

    DETECTORS.register("BE_peak_test", label="peak of the BE mask (test)", higher_is_memorized=True)(peak_of_mask)
    try:
        test_detector_scores_are_finite_one_per_generation_and_labelled(arrays, "BE_peak_test")
        test_detector_reads_only_its_layer_set(arrays, "BE_peak_test")
        test_detection_table_honours_the_detectors_direction(arrays, "BE_peak_test")
        test_every_detector_reads_fields_traces_have()
        assert "BE_peak_test" in step_detection.early_detector_names()
        step_maps = {1: {k: v * 2 for k, v in arrays.end_maps.items()}}
        table = step_detection.score_by_step(arrays, step_maps, LAYER_SETS, [STEPS])
        got = table[(table.detector == "BE_peak_test") & (table.layers == "a")].score.to_numpy()
        expected = peak_of_mask(2 * arrays.mask(LAYER_SETS["a"]))  # step 1's maps, not the final ones
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    finally:
        DETECTORS.unregister("BE_peak_test")
    assert "BE_peak_test" not in step_detection.early_detector_names()


# ---------------------------------------------------------------------------------------------- other axes

@pytest.mark.parametrize("name", LOCALIZERS.names())
def test_localizer_returns_a_map_of_the_latents_size(arrays, name):
    size = arrays.delta_sq.shape[-2:]
    entry = LOCALIZERS[name]
    maps = entry(**arrays.inputs(entry, LAYER_SETS["a"], 0, None))
    assert maps.shape == (N, *size) and np.isfinite(maps).all()


@pytest.mark.parametrize("name", [n for n in MITIGATIONS.names() if MITIGATIONS[n].optimised])
def test_mitigation_loss_is_a_non_negative_norm_per_image(name):
    entry = MITIGATIONS[name]
    delta = torch.randn(3, 4, 8, 8)
    mask = torch.rand(3, 8, 8) + 0.1 if entry.needs_mask else None
    loss = entry(delta, mask)
    assert loss.shape == (3,) and torch.isfinite(loss).all() and (loss > 0).all()
    assert torch.allclose(entry(torch.zeros_like(delta), mask), torch.zeros(3))


@pytest.mark.parametrize("name", SIMILARITIES.names())
def test_similarity_is_highest_for_the_image_itself(name):
    rng = np.random.default_rng(0)
    image, other = rng.random((3, 16, 16)), rng.random((3, 16, 16))
    extra = (rng.random((4, 4)) + 0.1,) if SIMILARITIES[name].needs_mask else ()
    same, different = SIMILARITIES[name](image, image, *extra), SIMILARITIES[name](image, other, *extra)
    assert np.isfinite(different) and same > different


@pytest.mark.parametrize("name", CAPTION_RENDERERS.names())
def test_caption_renderer_refuses_what_it_does_not_describe(name):
    with pytest.raises(ValueError):
        CAPTION_RENDERERS[name]("", 16)


@pytest.fixture(scope="module")
def testbed_folder(tmp_path_factory):
    from benchmark.testbed.data import Recipe, make_dataset, write_metadata

    recipe = Recipe(n_unique=10, n_global=2, global_copies=2, n_local=2, local_copies=2, n_heldout=3)
    folder = tmp_path_factory.mktemp("testbed")
    write_metadata(recipe, make_dataset(recipe), folder)
    return folder


def source_examples(tmp_path, testbed_folder) -> dict:
    """A small spec per prompt source; a new source adds its own here."""
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    return {
        "inline": {"entries": [{"text": "a"}, {"text": "b", "kind": "local"}]},
        "file": {"path": str(tmp_path / "p.txt"), "memorized": True},
        "random": {"n": 5},
        "union": {"parts": [{"loader": "inline", "name": "x", "entries": [{"text": "a"}]},
                            {"loader": "inline", "name": "y", "entries": [{"text": "a"}]}]},
        "testbed": {"model_folder": str(testbed_folder)},
        "hf": None,  # online only
    }


@pytest.mark.parametrize("name", PROMPT_SOURCES.names())
def test_prompt_source_yields_unique_ids_and_truth_only_for_its_prompts(name, tmp_path, testbed_folder):
    from benchmark.data.prompts import load_prompt_set

    examples = source_examples(tmp_path, testbed_folder)
    assert name in examples, f"prompt source {name!r}: add an example spec to source_examples"
    if examples[name] is None:
        pytest.skip(f"{name} needs the network")
    prompt_set = load_prompt_set({"loader": name, "name": name, **examples[name]})
    ids = [p.id for p in prompt_set]
    assert len(ids) == len(set(ids)) > 0
    assert set(prompt_set.truth) <= set(ids)
    for truth in prompt_set.truth.values():
        assert truth.image.ndim == 3 and (truth.mask is None or truth.mask.shape == truth.image.shape[1:])


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.endswith("-architecture") else n
                                  for n in MODEL_BUILDERS.names() if MODEL_BUILDERS[n].in_process])
def test_in_process_model_has_cross_attention_layers(name):
    from benchmark.models.text_to_image import get_model
    from benchmark.sampling.capture import cross_attention_layers

    model = get_model(name)
    assert list(cross_attention_layers(model.unet)) and model.end_token_index(["a cat"]).shape == (1,)


def test_unknown_entries_get_one_clear_error():
    from benchmark.data.prompts import load_prompt_set
    from benchmark.models.text_to_image import get_model

    with pytest.raises(ValueError, match="unknown model build 'magic' \\(one of testbed, testbed_endpad\\)"):
        get_model("/nowhere", build="magic")
    with pytest.raises(ValueError, match="unknown prompt loader 'magic'"):
        load_prompt_set({"loader": "magic", "name": "x"})
