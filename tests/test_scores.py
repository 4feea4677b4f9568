import numpy as np
import pytest

from benchmark.detectors import scores


def test_magnitude_D_by_hand():
    # one image, 2 steps, 1x2 pixels: step norms sqrt(1+3)=2 and sqrt(9+16)=5
    delta_sq = np.array([[[[1.0, 3.0]], [[9.0, 16.0]]]])
    assert scores.magnitude_D(delta_sq, 1)[0] == pytest.approx(2.0)
    assert scores.magnitude_D(delta_sq, 2)[0] == pytest.approx(3.5)


def test_localized_LD_by_hand():
    delta_sq = np.array([[[[4.0, 100.0]], [[16.0, 0.0]]]])
    mask = np.array([[[1.0, 0.0]]])  # keeps the first pixel only; mean(m) = 0.5
    # step norms: sqrt(1*4)=2, sqrt(16)=4 -> mean 3 over T=2, / 0.5
    assert scores.localized_LD(delta_sq, mask, 2)[0] == pytest.approx(6.0)
    assert scores.localized_LD(delta_sq, mask, 1)[0] == pytest.approx(4.0)
    # an all-ones mask gives back Wen's D
    ones = np.ones((1, 1, 2))
    assert scores.localized_LD(delta_sq, ones, 2) == pytest.approx(scores.magnitude_D(delta_sq, 2))


def test_be_mask_and_intensity():
    maps = {"down_blocks.0.attentions.0": np.full((1, 2, 2), 0.2), "up_blocks.3.attentions.0": np.full((1, 4, 4), 0.4)}
    mask = scores.be_mask(maps, ["*"], (4, 4))
    assert mask.shape == (1, 4, 4)
    assert scores.be_intensity(mask)[0] == pytest.approx(0.3)
    assert scores.be_mask(maps, ["down_blocks"], (4, 4)).mean() == pytest.approx(0.2)


def test_unknown_layer_is_named():
    with pytest.raises(ValueError, match="unknown layer 'down_blocks.9'"):
        scores.select_layers(["down_blocks.0.attentions.0"], ["down_blocks.9"])
    # a prefix must stop at a dot: down_blocks.1 does not match down_blocks.10
    with pytest.raises(ValueError):
        scores.select_layers(["down_blocks.10.attentions.0"], ["down_blocks.1"])


LOG2 = np.log(2)
PEAK = [1.0, 0.0, 0.0, 0.0]  # all attention on the start token: entropy 0, summary entropy 0


def test_ren_E_averages_layers_before_the_entropy():
    # two layers whose first-step attention is peaked on different tokens: each has entropy 0, their average
    # [0.5, 0.5, 0, 0] has entropy log 2 (MemAttn averages layers and heads first)
    attn = {"a": np.array([[PEAK, PEAK]]), "b": np.array([[[0.0, 1.0, 0.0, 0.0], PEAK]])}
    assert scores.ren_E(attn, ["*"])[0] == pytest.approx(LOG2)
    assert scores.ren_E(attn, ["a"])[0] == pytest.approx(0.0)


def test_ren_E_layer_is_the_fourth_in_forward_order():
    # keys sorted as a safetensors trace returns them: alphabetical order puts mid_block and up_blocks wrongly
    names = ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.1.attentions.0",
             "down_blocks.1.attentions.1", "down_blocks.2.attentions.0", "mid_block.attentions.0",
             "up_blocks.1.attentions.0", "up_blocks.2.attentions.0", "up_blocks.10.attentions.0"]
    assert scores.forward_order(sorted(names)) == names
    attn = {name: np.array([[PEAK]]) for name in sorted(names)}
    attn["down_blocks.1.attentions.1"] = np.full((1, 1, 4), 0.25)
    assert scores.select_layers(sorted(names), ["forward:3"]) == ["down_blocks.1.attentions.1"]
    assert scores.ren_E(attn, ["forward:3"])[0] == pytest.approx(2 * LOG2)
    assert scores.select_layers(sorted(names), ["forward:5"]) == ["mid_block.attentions.0"]
    with pytest.raises(ValueError, match="forward:9"):
        scores.select_layers(names, ["forward:9"])


def test_ren_D_window_and_signed_summary_term():
    # T = 10 steps, 4 tokens, end token at index 2 (tokens 2, 3 are the summary tokens); window = steps 8, 9
    steps = [[0.0, 0.0, 0.5, 0.5]] + [PEAK] * 7 + [[0.25] * 4, [0.5, 0.0, 0.5, 0.0]]
    attn = {"l": np.array([steps])}
    end = np.array([2])
    # H: step 8 log 4, step 9 log 2 -> mean 1.5 log 2. Summary: step 0 log 2; step 8 2 * 0.25 log 4 = log 2,
    # step 9 0.5 log 2 -> window mean 0.75 log 2, minus step 0: -0.25 log 2 (signed, not absolute)
    assert scores.ren_window(10) == 2
    assert scores.ren_D(attn, end, ["l"], 10)[0] == pytest.approx(1.25 * LOG2)
    # T = 5: window = step 4 alone (entropy 0, summary 0): D = 0 + 0 - log 2
    assert scores.ren_D(attn, end, ["l"], 5)[0] == pytest.approx(-LOG2)
    with pytest.raises(ValueError, match="T=11"):
        scores.ren_D(attn, end, ["l"], 11)


def test_ren_D_at_50_steps_is_the_official_window_over_averaged_layers():
    # steps 40..49 (MemAttn's window at 50 steps): two layers peaked on tokens 2 and 3, whose average [0, 0, .5, .5]
    # has entropy log 2 and summary entropy log 2; every other step is peaked on the start token
    a, b = np.tile(PEAK, (1, 50, 1)), np.tile(PEAK, (1, 50, 1))
    a[0, 40:], b[0, 40:] = [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]
    a[0, 39] = b[0, 39] = 0.25  # just outside the window: ignored
    attn, end = {"a": a, "b": b}, np.array([2])
    assert scores.ren_window(50) == 10
    assert scores.ren_D(attn, end, ["*"], 50)[0] == pytest.approx(2 * LOG2)
    # per-layer entropies would all be 0: the average comes first
    assert scores.ren_D(attn, end, ["a"], 50)[0] == pytest.approx(0.0)


def test_ren_ranks_high_entropy_as_memorized():
    import pandas as pd

    from benchmark.detectors.detection import detection_table

    memorized = np.full((1, 5, 4), 0.25)  # attention spread over the tokens: high entropy
    plain = np.tile(PEAK, (1, 5, 1))  # attention on the start token: low entropy
    end = np.array([2])
    rows = []
    for pid, attn, label in (("m", memorized, True), ("n", plain, False)):
        e = scores.ren_E({"l": attn}, ["*"])[0]
        d = scores.ren_D({"l": attn}, end, ["*"], 5)[0]
        rows += [{"prompt_id": pid, "kind": "global" if label else "none", "memorized": label, "seed": 0,
                  "detector": det, "layers": "all", "T": T, "score": v} for det, T, v in (("Ren_E", 0, e),
                                                                                        ("Ren_D", 5, d))]
    table = detection_table(pd.DataFrame(rows), n_boot=0)
    assert set(table.auc) == {1.0}
