import numpy as np
import pytest

from benchmark.capture import SamplerSettings
from benchmark.detection import generate, plan
from benchmark.prompts import inline_prompt_set
from benchmark.traces import TraceStore

SETTINGS = SamplerSettings(steps=3, guidance=7.5, height=32, width=32)


@pytest.fixture
def prompt_set():
    return inline_prompt_set("t", [{"id": "a", "text": "a red ring", "kind": "local"}, {"id": "b", "text": "a cat"}])


def test_round_trip_and_never_resample(tiny_model, prompt_set, tmp_path):
    store = TraceStore(tmp_path, dtype="float32")
    gens = plan(prompt_set, "tiny", "s", [0, 1])
    assert generate(tiny_model, gens, SETTINGS, store) == 4
    assert generate(tiny_model, gens, SETTINGS, store) == 0  # all stored: nothing sampled again
    trace = store.read(gens[0].key, 1)
    assert trace.meta["seed"] == 1 and trace.meta["prompt"] == "a red ring"
    assert trace.delta_sq.shape == (3, 16, 16) and trace.end_index == 4
    assert set(trace.token_attn) == set(trace.end_maps) and len(trace.end_maps) == 4
    assert store.read_image(gens[0].key, 1).shape == (32, 32, 3)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files
    # one more seed samples just that seed
    assert generate(tiny_model, plan(prompt_set, "tiny", "s", [0, 1, 2]), SETTINGS, store) == 2


def test_keys_separate_models_samplers_and_prompt_texts(prompt_set, tmp_path):
    a, b = plan(prompt_set, "tiny", "s", [0])[0].key, plan(prompt_set, "tiny", "s2", [0])[0].key
    assert a.folder(tmp_path) != b.folder(tmp_path)
    edited = inline_prompt_set("t", [{"id": "a", "text": "a blue ring"}])
    assert plan(edited, "tiny", "s", [0])[0].key.folder(tmp_path) != a.folder(tmp_path)


def test_float16_store_is_close(tiny_model, prompt_set, tmp_path):
    store16, store32 = TraceStore(tmp_path / "16"), TraceStore(tmp_path / "32", dtype="float32")
    gens = plan(prompt_set, "tiny", "s", [0])
    generate(tiny_model, gens, SETTINGS, store16)
    generate(tiny_model, gens, SETTINGS, store32)
    a, b = store16.read(gens[0].key, 0), store32.read(gens[0].key, 0)
    np.testing.assert_allclose(a.delta_sq, b.delta_sq, rtol=2e-3, atol=1e-6)


def test_overflow_is_refused_not_stored(tiny_model, prompt_set, tmp_path):
    store = TraceStore(tmp_path)
    gens = plan(prompt_set, "tiny", "s", [0])
    from benchmark.traces import Trace
    bad = Trace(np.full((1, 2, 2), 1e6, np.float32), {}, {}, 1, np.zeros((1,), np.float32), {"seed": 0})
    with pytest.raises(ValueError, match="non-finite values in delta_sq"):
        store.write(gens[0].key, bad, np.zeros((3, 4, 4)))
    assert store.missing_seeds(gens[0].key, [0]) == [0]
