import numpy as np
import pytest

from benchmark import scores as S


def test_magnitude_D_by_hand():
    # one image, 2 steps, 1x2 pixels: step norms sqrt(1+3)=2 and sqrt(9+16)=5
    delta_sq = np.array([[[[1.0, 3.0]], [[9.0, 16.0]]]])
    assert S.magnitude_D(delta_sq, 1)[0] == pytest.approx(2.0)
    assert S.magnitude_D(delta_sq, 2)[0] == pytest.approx(3.5)


def test_localized_LD_by_hand():
    delta_sq = np.array([[[[4.0, 100.0]], [[16.0, 0.0]]]])
    mask = np.array([[[1.0, 0.0]]])  # keeps the first pixel only; mean(m) = 0.5
    # step norms: sqrt(1*4)=2, sqrt(16)=4 -> mean 3 over T=2, / 0.5
    assert S.localized_LD(delta_sq, mask, 2)[0] == pytest.approx(6.0)
    assert S.localized_LD(delta_sq, mask, 1)[0] == pytest.approx(4.0)
    # an all-ones mask gives back Wen's D
    ones = np.ones((1, 1, 2))
    assert S.localized_LD(delta_sq, ones, 2) == pytest.approx(S.magnitude_D(delta_sq, 2))


def test_be_mask_and_intensity():
    maps = {"down_blocks.0.attentions.0": np.full((1, 2, 2), 0.2), "up_blocks.3.attentions.0": np.full((1, 4, 4), 0.4)}
    mask = S.be_mask(maps, ["*"], (4, 4))
    assert mask.shape == (1, 4, 4)
    assert S.be_intensity(mask)[0] == pytest.approx(0.3)
    assert S.be_mask(maps, ["down_blocks"], (4, 4)).mean() == pytest.approx(0.2)


def test_unknown_layer_is_named():
    with pytest.raises(ValueError, match="unknown layer 'down_blocks.9'"):
        S.select_layers(["down_blocks.0.attentions.0"], ["down_blocks.9"])
    # a prefix must stop at a dot: down_blocks.1 does not match down_blocks.10
    with pytest.raises(ValueError):
        S.select_layers(["down_blocks.10.attentions.0"], ["down_blocks.1"])


def test_ren_entropies_by_hand():
    uniform4 = np.full(4, 0.25)
    peaked = np.array([1.0, 0.0, 0.0, 0.0])
    # one image, 5 steps: entropy log(4) for the first 4 steps, 0 at the last
    attn = {"l": np.stack([uniform4] * 4 + [peaked])[None]}
    assert S.ren_E(attn, ["l"])[0] == pytest.approx(np.log(4))
    end = np.array([2])  # tokens 2 and 3 are the end token and padding
    # D over T=5: window 1 (the last step, entropy 0) + |summary(last) - summary(first)| = |0 - 2*0.25*log 4|
    assert S.ren_D(attn, end, ["l"], 5)[0] == pytest.approx(0.5 * np.log(4))
    # T=4: window = 1 step (step 4, entropy log 4), summary unchanged
    assert S.ren_D(attn, end, ["l"], 4)[0] == pytest.approx(np.log(4))
