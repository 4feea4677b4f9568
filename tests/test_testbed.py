import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel

from benchmark.models.text_to_image import load_text_to_image
from benchmark.registry import MODEL_BUILDERS
from benchmark.testbed.data import Recipe, evaluation_prompts, make_dataset, training_items
from benchmark.testbed.plugin import testbed_prompt_set as load_testbed_prompts
from benchmark.testbed.train import TestbedSpec, train

ROOT = Path(__file__).resolve().parents[1]

def test_default_config_is_the_code_default():
    default = yaml.safe_load((ROOT / "conf/testbed/default.yaml").read_text())
    spec = asdict(TestbedSpec())
    spec["architecture"]["block_out_channels"] = list(spec["architecture"]["block_out_channels"])
    assert default == spec


def test_recipe_plants_what_it_says():
    recipe = Recipe(n_unique=10, n_global=2, global_copies=3, n_local=2, local_copies=5, n_heldout=4, seed=3)
    items = make_dataset(recipe)
    assert [sum(i.category == c for i in items) for c in ("unique", "global", "local", "heldout")] == [10, 6, 10, 4]
    local = [i for i in items if i.category == "local"]
    first = [i for i in local if i.caption == local[0].caption]
    mask = first[0].mask
    assert mask.mean() == pytest.approx(0.25)  # patch side 0.5 of the image side
    for other in first[1:]:
        np.testing.assert_array_equal(other.mask, mask)
        np.testing.assert_array_equal(other.image[:, mask], first[0].image[:, mask])  # the planted patch
    assert any(np.abs(o.image[:, ~mask] - first[0].image[:, ~mask]).max() > 0.1 for o in first[1:])  # the rest varies
    glob = [i for i in items if i.category == "global"]
    assert all(np.array_equal(g.image, glob[0].image) for g in glob if g.caption == glob[0].caption)
    heldout = {i.caption for i in items if i.category == "heldout"}
    assert not heldout & {i.caption for i in training_items(items)}
    assert len({p["caption"] for p in evaluation_prompts(items)}) == 2 + 2 + 4
    again = make_dataset(recipe)
    assert [i.caption for i in again] == [i.caption for i in items]  # deterministic


def test_tiny_training_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_testbed_spec):
    spec = tiny_testbed_spec
    straight = train(spec, tmp_path / "a" / "pipeline", progress=False)
    # kill after the step-2 checkpoint, then start again
    from diffusers.training_utils import EMAModel
    calls = {"n": 0}
    original = EMAModel.step

    def dying_step(self, params):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, params)

    monkeypatch.setattr(EMAModel, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "b" / "pipeline", progress=False)
    monkeypatch.setattr(EMAModel, "step", original)
    resumed = train(spec, tmp_path / "b" / "pipeline", progress=False)
    a, b = load_text_to_image(str(straight)), load_text_to_image(str(resumed))
    for (name, p), q in zip(a.unet.named_parameters(), b.unet.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    # the folder is a testbed: labelled prompts with ground truth
    prompts = load_testbed_prompts(resumed)
    assert {p.kind for p in prompts} == {"global", "local", "none"}
    assert {pid for pid in prompts.truth} == {p.id for p in prompts if p.memorized}
    assert all(t.mask is not None for pid, t in prompts.truth.items() if pid.startswith("local"))


def test_the_training_command_short_version_works(tmp_path):
    out = tmp_path / "pipeline"
    done = subprocess.run([sys.executable, "-m", "runners.train_testbed", "testbed=tiny", f"out={out}",
                           f"paths.root={tmp_path}", "progress=false"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    spec = json.loads((out / "testbed_spec.json").read_text())
    assert spec["training"]["steps"] == 4 and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("weights, pad_token", [("testbed", "pad"), ("testbed_endpad", "end")])
def test_make_run_assembles_the_testbed_from_the_shipped_weights(tmp_path, weights, pad_token):
    from benchmark.testbed.build import ASSEMBLED, WEIGHTS, ensure_testbed, spec_from_dict

    SHIPPED = WEIGHTS[weights]  # noqa: N806
    assert (SHIPPED / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 20 * 2**20
    folder = MODEL_BUILDERS[weights](tmp_path / "testbed" / "pipeline")  # the model config's build: <weights>
    spec = spec_from_dict(json.loads((folder / "testbed_spec.json").read_text()))
    assert spec.architecture.pad_token == pad_token
    model = load_text_to_image(str(folder))
    shipped = UNet2DConditionModel.from_pretrained(SHIPPED, subfolder="unet")
    for p, q in zip(model.unet.parameters(), shipped.parameters()):
        torch.testing.assert_close(p, q)
    prompts = load_testbed_prompts(folder)
    assert len(prompts) == 8 + 12 + 120 and sum(p.memorized for p in prompts) == 20
    assert ensure_testbed(folder, weights) == folder  # reused, not rebuilt
    (folder / "unet" / "stale").write_text("x")
    (folder / ASSEMBLED).write_text("weights-shipped-before\n")  # the package now ships other weights
    assert ensure_testbed(folder, weights) == folder and not (folder / "unet" / "stale").exists()  # reassembled
    (folder / ASSEMBLED).unlink()  # a folder someone trained: never replaced
    (folder / "unet" / "stale").write_text("x")
    assert ensure_testbed(folder, weights) == folder and (folder / "unet" / "stale").exists()
    with pytest.raises(ValueError, match="unknown testbed weights 'nope'"):
        ensure_testbed(folder, "nope")


def test_flat_patch_and_caption_parsing():
    from benchmark.testbed.data import describe, parse_caption

    items = make_dataset(Recipe(n_unique=2, n_global=1, global_copies=1, n_local=1, local_copies=2, n_heldout=1,
                                patch="flat"))
    local = next(i for i in items if i.category == "local")
    patch = local.image[:, local.mask]
    assert np.ptp(patch, axis=1).max() == 0  # one colour
    with pytest.raises(ValueError, match="unknown patch kind 'noise'"):
        make_dataset(Recipe(patch="noise"))
    rng = np.random.default_rng(0)
    for _ in range(50):
        caption, objects, background = describe(rng)
        assert parse_caption(caption) == (objects, background)
    with pytest.raises(ValueError, match="not a testbed caption: 'a cat'"):
        parse_caption("a cat")


def test_snapshots_and_training_time_mitigation(tmp_path, tiny_testbed_spec):
    from dataclasses import replace

    spec = tiny_testbed_spec
    spec = replace(spec, training=replace(spec.training, snapshot_every=2, mitigation_threshold=1e-6))
    folder = train(spec, tmp_path / "pipeline", progress=False)
    snapshot = tmp_path / "pipeline-step2"
    assert json.loads((snapshot / "training.json").read_text())["steps"] == 2
    load_text_to_image(str(snapshot))
    log = json.loads((folder / "training.json").read_text())
    # a threshold below every magnitude drops every captioned sample (not the caption-dropped ones)
    assert log["steps"] == 4 and 0 < log["dropped_samples"] <= 4 * spec.training.batch_size
    spec = replace(spec, training=replace(spec.training, snapshot_every=0, mitigation_threshold=1e9))
    assert json.loads((train(spec, tmp_path / "p2", progress=False) / "training.json").read_text())[
        "dropped_samples"] == 0


def test_causal_text_encoder_survives_the_folder_round_trip(tmp_path, tiny_testbed_spec):
    from dataclasses import replace

    spec = tiny_testbed_spec
    spec = replace(spec, architecture=replace(spec.architecture, text_encoder="minilm-causal"))
    model = load_text_to_image(str(train(spec, tmp_path / "pipeline", progress=False)))
    states = model.encode(["a red circle at the top", "a red circle at the left"])
    torch.testing.assert_close(states[0, :5], states[1, :5])  # a shared prefix: the same states, as in CLIP
    assert (states[0, 6] - states[1, 6]).norm() > 1
    with pytest.raises(ValueError, match="unknown text encoder 'gpt'"):
        train(replace(spec, architecture=replace(spec.architecture, text_encoder="gpt")), tmp_path / "x")


def test_end_token_padding_survives_the_folder_round_trip(tmp_path, tiny_testbed_spec):
    """pad_token=end: the saved tokenizer pads with [SEP], the end index still points at the first [SEP], and the
    causal encoder runs without a mask, so each padding copy is a real token state, as SD v1-4 pads with CLIP."""
    from dataclasses import replace

    from benchmark.localization.evaluation import token_roles
    from benchmark.models.text_to_image import pads_with_end_token
    from benchmark.testbed.train import build_untrained

    spec = tiny_testbed_spec
    end_spec = replace(spec, architecture=replace(spec.architecture, pad_token="end"))
    model = load_text_to_image(str(train(end_spec, tmp_path / "pipeline", progress=False)))
    tok = model.tokenizer
    assert tok.pad_token_id == tok.sep_token_id == 102 and pads_with_end_token(tok)
    prompts = ["a red circle at the top on a blue background", "a green cross at the left and a red ring at the top"]
    ids = tok(prompts, padding="max_length", max_length=model.max_length).input_ids
    end = model.end_token_index(prompts)
    for row, e in zip(ids, end.tolist()):
        assert row[e] == tok.sep_token_id and tok.sep_token_id not in row[:e]  # the FIRST [SEP]
        assert row[e + 1:] == [tok.sep_token_id] * (model.max_length - e - 1)  # the padding: copies of [SEP]
        roles = token_roles(e, len(row))
        assert roles[e] == "end" and set(roles[e + 1:]) == {"padding"} and "padding" not in roles[:e + 1]

    calls = []
    forward = model.text_encoder.forward
    model.text_encoder.forward = lambda *a, **kw: calls.append(kw) or forward(*a, **kw)
    states = model.encode(prompts)
    assert "attention_mask" not in calls[0]  # no mask: decided from the tokenizer, not from the testbed
    torch.testing.assert_close(states, model.text_encoder(torch.tensor(ids))[0])
    e = int(end[0])
    assert (states[0, e + 1] - states[0, e + 2]).norm() > 1e-3  # causal: each copy sees the copies before it

    # the same untrained encoder with [PAD]: a mask, and the same states up to the end token (causal), other padding
    pad_model = build_untrained(spec.architecture, spec.recipe.resolution, spec.training.seed)
    end_model = build_untrained(end_spec.architecture, spec.recipe.resolution, spec.training.seed)
    assert not pads_with_end_token(pad_model.tokenizer)
    a, b = pad_model.encode(prompts), end_model.encode(prompts)
    torch.testing.assert_close(a[0, :e + 1], b[0, :e + 1])
    assert (a[0, e + 1:] - b[0, e + 1:]).norm() > 1e-3
    with pytest.raises(ValueError, match="unknown pad_token 'eos'"):
        build_untrained(replace(spec.architecture, pad_token="eos"), 32, 0)
