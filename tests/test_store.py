import numpy as np
import pytest

from benchmark.data.prompts import inline_prompt_set
from benchmark.detectors.detection import generate, plan
from benchmark.sampling.capture import SamplerSettings
from benchmark.store.traces import TraceStore

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
    from benchmark.store.traces import Trace
    bad = Trace(np.full((1, 2, 2), 1e6, np.float32), {}, {}, 1, np.zeros((1,), np.float32), {"seed": 0})
    with pytest.raises(ValueError, match="non-finite values in delta_sq"):
        store.write(gens[0].key, bad, np.zeros((3, 4, 4)))
    assert store.missing_seeds(gens[0].key, [0]) == [0]


def test_generate_packs_prompts_into_batches_of_images(tiny_model, prompt_set, tmp_path, monkeypatch):
    from benchmark.detectors import detection

    calls = []
    real = detection.sample_with_capture
    monkeypatch.setattr(detection, "sample_with_capture",
                        lambda model, prompts, seeds, *a, **k: calls.append((list(prompts), list(seeds)))
                        or real(model, prompts, seeds, *a, **k))
    store = TraceStore(tmp_path, dtype="float32")
    gens = plan(prompt_set, "tiny", "s", [0, 1, 2])
    generate(tiny_model, gens[:1], SETTINGS, store, batch_size=4)  # prompt a, seeds 0-2 stored
    calls.clear()
    assert generate(tiny_model, gens, SETTINGS, store, batch_size=2) == 3
    assert calls == [(["a cat", "a cat"], [0, 1]), (["a cat"], [2])]
    calls.clear()
    more = plan(prompt_set, "tiny", "s", [3])
    assert generate(tiny_model, more, SETTINGS, store, batch_size=4) == 2
    assert calls == [(["a red ring", "a cat"], [3, 3])]  # one image per prompt, one call
    for gen in more:
        assert store.read(gen.key, 3).meta["prompt"] == gen.prompt.text


def test_another_trace_version_is_refused_before_sampling(tiny_model, prompt_set, tmp_path, monkeypatch):
    from benchmark.store import traces

    store = TraceStore(tmp_path, dtype="float32")
    gens = plan(prompt_set, "tiny", "s", [0])
    monkeypatch.setattr(traces, "TRACE_VERSION", "0")
    generate(tiny_model, gens[:1], SETTINGS, store)
    monkeypatch.undo()
    path = store.trace_path(gens[0].key, 0)
    with pytest.raises(ValueError, match=r"has format version '0', this code reads version '1'"):
        store.read(gens[0].key, 0)
    with pytest.raises(ValueError, match="format version '0'"):
        generate(tiny_model, gens, SETTINGS, store)  # refused before prompt b is sampled
    assert store.missing_seeds(gens[1].key, [0]) == [0] and path.exists()  # nothing sampled, nothing overwritten


def test_one_sampler_key_keeps_the_existing_keys():
    from benchmark.ddpm.models import DDPMSampler
    from benchmark.mitigation.embedding import MitigationSettings
    from benchmark.sampling.missing import sampler_key

    sd = SamplerSettings(50, 7.5, 512, 512)
    assert sampler_key(sd, "float16") == "ddim50-g7.5-512x512-eta0-float16"  # the stores written so far
    assert sampler_key(SamplerSettings(50, 7.5, 512, 512, end_map_steps=[49]), "float16") == sampler_key(sd, "float16")
    assert sampler_key(SamplerSettings(50, end_map_steps=[0, 9]), "float16").endswith("-end_map_steps0_9")
    wen, be = MitigationSettings("wen", 0.1), MitigationSettings("be", 0.1)
    assert sampler_key(sd, "float16", wen) == "ddim50-g7.5-512x512-eta0-float16+wen-l0.1-lr0.05-it10"
    assert sampler_key(sd, "float16", be).endswith("+be-l0.1-lr0.05-it10")  # mask of every layer: as before
    some = sampler_key(sd, "float16", be, ["down_blocks.1.attentions.0"])
    assert some.startswith(sampler_key(sd, "float16", be) + "-mask")
    assert some != sampler_key(sd, "float16", be, ["up_blocks.1.attentions.0"])
    assert sampler_key(sd, "float16", wen, ["down_blocks.1.attentions.0"]) == sampler_key(sd, "float16", wen)
    assert sampler_key(DDPMSampler(100, "ddim", 0.0)) == DDPMSampler().key == "ddim100-eta0"
    with pytest.raises(ValueError, match="dtype"):
        sampler_key(sd)


def test_a_damaged_file_is_moved_aside_and_sampled_again(tiny_model, prompt_set, tmp_path, capsys):
    store = TraceStore(tmp_path, dtype="float32")
    gens = plan(prompt_set, "tiny", "s", [0, 1])
    generate(tiny_model, gens, SETTINGS, store)
    good = store.read(gens[0].key, 0)
    cut, empty = store.trace_path(gens[0].key, 0), store.trace_path(gens[1].key, 0)
    png = store.image_path(gens[0].key, 1)
    with open(cut, "r+b") as f:  # a copy cut short
        f.truncate(2000)
    empty.write_bytes(b"")
    png.write_bytes(png.read_bytes()[:-30])
    capsys.readouterr()
    assert store.missing_seeds(gens[0].key, [0, 1]) == [0, 1] and store.missing_seeds(gens[1].key, [0, 1]) == [0]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # one line per damaged file, naming it
    for path, line in zip((cut, png, empty), lines):
        assert str(path) in line and f"moved aside to {path.name}.damaged" in line and "resampled" in line
        assert path.with_name(path.name + ".damaged").exists() and not path.exists()
    # "is it in the store" and read agree: those three are sampled again, and read back as before
    assert generate(tiny_model, gens, SETTINGS, store) == 3
    np.testing.assert_array_equal(store.read(gens[0].key, 0).delta_sq, good.delta_sq)
    assert store.read_image(gens[0].key, 1).shape == (32, 32, 3)
    assert generate(tiny_model, gens, SETTINGS, store) == 0 and capsys.readouterr().out == ""
    # a file damaged after planning is refused by read with the same line, never served
    with open(cut, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=rf"damaged store file .*{cut.name}.*moved aside to {cut.name}.damaged"):
        store.read(gens[0].key, 0)
    png.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=rf"damaged store file .*{png.name}"):
        store.read_image(gens[0].key, 1)
    assert store.missing_seeds(gens[0].key, [0, 1]) == [0, 1]
