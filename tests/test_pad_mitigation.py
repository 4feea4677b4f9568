import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.mitigation.interface import settings_for
from benchmark.mitigation.padding import PadMitigation, pad_mitigated_embedding

PROMPTS = ["Mothers influence on her young hippo", "an astronaut riding a horse, oil painting"]
L = 77


def test_pad_mask_zeroes_exactly_the_first_share_of_the_padding(tiny_model):
    plain = tiny_model.encode(PROMPTS)
    end = tiny_model.end_token_index(PROMPTS).tolist()  # first <|endoftext|>
    for fraction in (0.4, 0.7, 1.0):
        out = pad_mitigated_embedding(tiny_model, PROMPTS, PadMitigation("pad_mask", fraction))
        for i, e in enumerate(end):
            k = int((L - e - 1) * fraction)  # the official floor(min(P, r * P))
            zero = torch.zeros(L, dtype=torch.bool)
            zero[e + 1:e + 1 + k] = True
            assert (out[i, zero] == 0).all()
            torch.testing.assert_close(out[i, ~zero], plain[i, ~zero], rtol=0, atol=0)
    # by hand: prompt 0 has 8 token ids (end index 7), so 69 padding rows; r = 0.7 zeroes int(48.3) = 48
    out = pad_mitigated_embedding(tiny_model, PROMPTS[:1], PadMitigation("pad_mask", 0.7))
    assert end[0] == 7 and (out[0].abs().sum(-1) == 0).nonzero().flatten().tolist() == list(range(8, 8 + 48))


def test_mask_end_zeroes_only_the_first_end_token(tiny_model):
    plain = tiny_model.encode(PROMPTS)
    out = pad_mitigated_embedding(tiny_model, PROMPTS, PadMitigation("mask_end"))
    for i, e in enumerate(tiny_model.end_token_index(PROMPTS).tolist()):
        assert (out[i, e] == 0).all() and (plain[i, e] != 0).any()
        keep = torch.arange(L) != e
        torch.testing.assert_close(out[i, keep], plain[i, keep], rtol=0, atol=0)


def test_pad_replace_pads_with_the_token_and_changes_only_the_padding(tiny_model):
    plain = tiny_model.encode(PROMPTS)
    end = tiny_model.end_token_index(PROMPTS).tolist()
    replaced = pad_mitigated_embedding(tiny_model, PROMPTS, PadMitigation("pad_replace"))
    main = pad_mitigated_embedding(tiny_model, PROMPTS, PadMitigation("pad_replace_mask_end"))
    ids = tiny_model.tokenizer(PROMPTS, padding="max_length", max_length=L, return_tensors="pt").input_ids
    for i, e in enumerate(end):
        ids[i, e + 1:] = 0  # "!" is id 0 in CLIP's vocabulary
    with torch.no_grad():
        expected = tiny_model.text_encoder(ids)[0]  # CLIP is run without a mask, as SD does
    torch.testing.assert_close(replaced, expected)
    for i, e in enumerate(end):
        # causal CLIP: the caption and the end token do not see the padding
        torch.testing.assert_close(replaced[i, :e + 1], plain[i, :e + 1], rtol=0, atol=1e-6)
        assert (replaced[i, e + 1:] - plain[i, e + 1:]).norm(dim=-1).min() > 1e-3
        assert (main[i, e] == 0).all()  # the paper's main method: also the end-of-text embedding zeroed
        keep = torch.arange(L) != e
        torch.testing.assert_close(main[i, keep], replaced[i, keep], rtol=0, atol=0)


def test_settings_keys_and_bad_input(tiny_model):
    sweep = settings_for("pad_mask", [0.4, 0.7]) + settings_for("pad_replace_mask_end", None)
    assert [s.tag for s in sweep] == ["padmask-r0.4", "padmask-r0.7", "padreplace-u21-maskend"]
    assert [s.strength for s in sweep] == [0.4, 0.7, None]  # the masked fraction; the replacement has none
    assert PadMitigation("pad_replace", token="?").tag != PadMitigation("pad_replace").tag
    with pytest.raises(ValueError, match="unknown padding mitigation 'pad_zero'"):
        PadMitigation("pad_zero")
    with pytest.raises(ValueError, match="fraction must be in"):
        PadMitigation("pad_mask", 1.5)
    with pytest.raises(ValueError, match="is not a token of tiny"):
        pad_mitigated_embedding(tiny_model, PROMPTS, PadMitigation("pad_replace", token="notatoken!!"))


def test_pad_mitigation_runs_through_the_mitigation_job(tmp_path):
    """The job's code path: settings from the config, sampling with cond=..., store keys, curves."""
    import json

    import pandas as pd
    from hydra import compose, initialize_config_dir

    from benchmark.store.traces import TraceStore
    from runners.common import CONF
    from runners.mitigate import run

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("mitigate", overrides=[f"paths.root={tmp_path}", "debug=default", "sampler.steps=3",
                                             "mitigation.methods=[pad_mask,pad_replace_mask_end]",
                                             "headline.method=pad_mask",
                                             "mitigation.pad_fractions=[0.5,1.0]"])
    run(cfg, tmp_path / "job")
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert result["settings"] == ["padmask-r0.5", "padmask-r1", "padreplace-u21-maskend"]
    assert result["n_prompts"] == 2 and result["sampled_now"] == 2 * (1 + 3)  # 2 prompts x 1 seed x 4
    rows = pd.read_csv(tmp_path / "job" / "mitigation.csv")
    mitigated = rows[rows.method != "none"].fillna({"strength": -1})
    assert sorted(mitigated.groupby(["method", "strength"]).size().index.tolist()) == [
        ("pad_mask", 0.5), ("pad_mask", 1.0), ("pad_replace_mask_end", -1)]
    assert (rows.iterations == 0).all()
    store = TraceStore(tmp_path / "artifacts" / "traces")
    folders = {p.parent for p in store.root.rglob("seed0.safetensors")}
    tags = {f.parent.parent.name.split("+")[-1] for f in folders if "+" in f.parent.parent.name}
    assert tags == {"padmask-r0.5", "padmask-r1", "padreplace-u21-maskend"}  # one store key per setting
    # the mitigated image differs from the baseline image of the same prompt and seed
    images = {f.parent.parent.name: np.asarray(Image.open(f / "seed0.png")) for f in folders
              if f.name.startswith("m0-")}
    base = next(v for k, v in images.items() if "+" not in k)
    assert all(np.abs(v.astype(int) - base).max() > 0 for k, v in images.items() if "+" in k)


def test_on_an_end_padded_testbed_encoder():
    """The testbed with architecture.pad_token=end: [SEP] padding, no mask; `!` replaces it, causally."""
    from benchmark.testbed.train import Architecture, build_untrained

    model = build_untrained(Architecture(block_out_channels=(8, 16, 16), attention_heads=2, pad_token="end"), 32, 0)
    prompts = ["a red circle at the top on a blue background"]
    e = int(model.end_token_index(prompts)[0])
    plain = model.encode(prompts)
    replaced = pad_mitigated_embedding(model, prompts, PadMitigation("pad_replace_mask_end"))
    ids = model.tokenizer(prompts, padding="max_length", max_length=model.max_length, return_tensors="pt").input_ids
    ids[0, e + 1:] = model.tokenizer.convert_tokens_to_ids("!")
    with torch.no_grad():
        expected = model.text_encoder(ids)[0]  # no mask: the tokenizer pads with its end token
    expected[0, e] = 0
    torch.testing.assert_close(replaced, expected)
    torch.testing.assert_close(replaced[0, :e], plain[0, :e], rtol=0, atol=1e-6)
