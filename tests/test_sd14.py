"""Capture on SD v1-4's real architecture (random weights): 16 cross-attention layers, 8 heads, 64x64 at 512 px."""
import pytest
import torch

from benchmark.models.text_to_image import sd14_architecture
from benchmark.sampling.capture import SamplerSettings, cross_attention_layers, sample_with_capture


@pytest.fixture(scope="module")
def sd14():
    return sd14_architecture(with_vae=False)


def test_sd14_layer_names_and_heads(sd14):
    layers = cross_attention_layers(sd14.unet)
    assert len(layers) == 16
    assert {m.heads for m in layers.values()} == {8}
    assert "down_blocks.0.attentions.0" in layers and "up_blocks.3.attentions.2" in layers


@pytest.mark.slow
def test_sd14_capture_at_512px_keeps_only_the_recorded_maps(sd14):
    settings = SamplerSettings(steps=2, guidance=7.5, height=512, width=512)
    batch = sample_with_capture(sd14, "Mothers influence on her young hippo", [0], settings, decode=False)
    assert batch.delta_sq.shape == (1, 2, 64, 64)
    assert batch.end_maps["down_blocks.0.attentions.0"].shape == (1, 64, 64)
    assert batch.end_maps["down_blocks.2.attentions.1"].shape == (1, 16, 16)
    assert batch.end_maps["mid_block.attentions.0"].shape == (1, 8, 8)
    assert all(v.shape == (1, 2, 77) for v in batch.token_attn.values())
    # what the pass keeps is exactly the trace: maps per layer, token vectors per step, delta per step
    kept = sum(t.numel() for t in [batch.delta_sq, batch.latents, *batch.end_maps.values(), *batch.token_attn.values()])
    expected = 2 * 64 * 64 + 4 * 64 * 64 + (2 * 64**2 + 2 * 32**2 + 2 * 16**2 + 8**2 + 3 * 16**2 + 3 * 32**2
                                              + 3 * 64**2) + 16 * 2 * 77
    assert kept == expected
    fp16_kib = (kept - 4 * 64 * 64) * 2 / 1024  # float16 storage, without the latent
    print(f"trace per image at 512 px, 2 steps: {fp16_kib:.0f} KiB (+ {4 * 64 * 64 * 2 / 1024:.0f} KiB latent);"
          f" each extra step adds {(64 * 64 + 16 * 77) * 2 / 1024:.1f} KiB")
    assert all(torch.isfinite(v).all() for v in batch.end_maps.values())


@pytest.mark.parametrize("option", ["sd", "sd_each"])
def test_sd_layer_configs_name_real_layers(sd14, option):
    from pathlib import Path

    import yaml

    from benchmark.detectors.scores import select_layers

    sets = yaml.safe_load((Path(__file__).resolve().parents[1] / f"conf/layers/{option}.yaml").read_text())["sets"]
    available = list(cross_attention_layers(sd14.unet))
    for name, layers in sets.items():
        assert select_layers(available, layers), name


def test_paper_layer_sets_on_sd14(sd14):
    """BE's own set is exactly the two 64x64 down-block layers; Ren's E rule lands on down_blocks.1.attentions.1."""
    from pathlib import Path

    import yaml

    from benchmark.detectors.scores import select_layers

    root = Path(__file__).resolve().parents[1]
    sets = yaml.safe_load((root / "conf/layers/sd.yaml").read_text())["sets"]
    available = list(cross_attention_layers(sd14.unet))
    assert select_layers(available, sets["be_paper"]) == ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1"]
    assert select_layers(available, sets["ren_E"]) == ["down_blocks.1.attentions.1"]
    # the SD presets' BE headline is that set
    table1 = yaml.safe_load((root / "conf/experiment/table1.yaml").read_text())
    assert table1["score"]["headline"]["layers"] == "be_paper"


def test_nemo_value_layers_are_the_official_seven(sd14):
    """NeMo's value layers on SD v1-4: down_blocks[0..2].attentions[0..1] and mid_block.attentions[0], widths 320,
    640, 1280 (1_compute_activations_statistics.py); the widest, 1280, is the official k limit."""
    from benchmark.mitigation.neurons import value_layers

    layers = value_layers(sd14.unet)
    assert list(layers) == [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)] + [
        "mid_block.attentions.0"]
    assert [m.out_features for m in layers.values()] == [320, 320, 640, 640, 1280, 1280, 1280]
