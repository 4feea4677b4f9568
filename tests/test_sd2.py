"""SD 2.x: its tokenizer's padding facts, its layer layout, its presets, folders loading with its real component
classes, and the tiny twins running detection (every detector) and a mitigation end to end on CPU."""
import json

import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from benchmark.mitigation.padding import PadMitigation, pad_mitigated_embedding
from benchmark.models.text_to_image import (
    SD2_768_UNET,
    SD2_PAD_TOKEN,
    SD2_UNET,
    clip_tokenizer,
    get_model,
    load_text_to_image,
    pads_with_end_token,
    save_text_to_image,
    tiny_sd2,
    tiny_sd2_v,
    tiny_text_to_image,
)
from benchmark.registry import DETECTORS
from benchmark.sampling.capture import cross_attention_layers

BOS, EOS = 49406, 49407
PROMPT = "Mothers influence on her young hippo"  # 6 words: end token at 7


@pytest.fixture(scope="module")
def sd2():
    return tiny_sd2()


# -------------------------------------------------------------------------------------------- the tokenizer

def test_sd2_tokenizer_pads_with_exclamation_mark_not_the_end_token():
    tok = clip_tokenizer(SD2_PAD_TOKEN)
    assert tok.pad_token == "!" and tok.pad_token_id == 0  # "!" is CLIP's first byte token
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    assert not pads_with_end_token(tok) and pads_with_end_token(clip_tokenizer())
    ids = tok([PROMPT], padding="max_length", max_length=77).input_ids[0]
    assert ids[0] == BOS and ids[7] == EOS and ids[8:] == [0] * 69
    assert ids.count(EOS) == 1  # one end token; SD v1's tokenizer repeats it 70 times
    assert clip_tokenizer()([PROMPT], padding="max_length", max_length=77).input_ids[0].count(EOS) == 70
    # the same BPE vocabulary as SD v1's: the words get the same ids
    assert ids[:8] == clip_tokenizer()(PROMPT).input_ids


def test_end_token_and_padding_roles_on_sd2(sd2):
    from benchmark.localization.evaluation import token_roles

    end = sd2.end_token_index([PROMPT, ""]).tolist()
    assert end == [7, 1]  # the first (only) end token, as on SD v1
    roles = token_roles(end[0], 77)
    padded = sd2.tokenizer([PROMPT], padding="max_length", max_length=77).input_ids[0]
    assert [padded[i] for i, r in enumerate(roles) if r == "end"] == [EOS]
    assert {padded[i] for i, r in enumerate(roles) if r == "padding"} == {0}  # padding = "!" states on SD 2
    assert sd2.family == "SD 2.x" and tiny_text_to_image().family == "SD v1"


def test_sd2_encodes_without_a_mask_so_padding_states_see_the_end_token(sd2):
    """As diffusers' SD 2 pipeline (no use_attention_mask in its text encoder config): "!" positions attend
    causally to the whole prompt and its end token, so changing a word changes every padding state."""
    a, b = sd2.encode([PROMPT]), sd2.encode(["Mothers influence on her young horse"])
    assert torch.equal(a[0, :6], b[0, :6]) and (a[0, 6:] - b[0, 6:]).abs().amax(dim=1).min() > 0


# ------------------------------------------------------------------------ Kim & No's padding mitigations

def test_padding_mitigations_on_sd2(sd2):
    """SD 2 already pads with "!": pad_replace is the identity and pad_replace_mask_end is mask_end; pad_mask and
    mask_end zero the same positions as on SD v1, here "!" states and the one end token."""
    plain = sd2.encode([PROMPT])
    replaced = pad_mitigated_embedding(sd2, [PROMPT], PadMitigation("pad_replace"))
    assert torch.equal(replaced, plain)
    both = pad_mitigated_embedding(sd2, [PROMPT], PadMitigation("pad_replace_mask_end"))
    assert torch.equal(both, pad_mitigated_embedding(sd2, [PROMPT], PadMitigation("mask_end")))
    assert both[0, 7].abs().max() == 0 and torch.equal(both[0, 8:], plain[0, 8:])
    masked = pad_mitigated_embedding(sd2, [PROMPT], PadMitigation("pad_mask", fraction=0.4))
    zero = int(0.4 * 69)  # of the 69 "!" states after the end token
    assert masked[0, 8:8 + zero].abs().max() == 0 and torch.equal(masked[0, 8 + zero:], plain[0, 8 + zero:])
    assert torch.equal(masked[0, :8], plain[0, :8])


def test_pad_replace_does_change_sd_v1s_embedding():
    """The contrast that makes the identity above a fact of SD 2's tokenizer, not of the code."""
    sd1 = tiny_text_to_image()
    plain = sd1.encode([PROMPT])
    replaced = pad_mitigated_embedding(sd1, [PROMPT], PadMitigation("pad_replace"))
    assert torch.equal(replaced[0, :8], plain[0, :8]) and (replaced[0, 8:] - plain[0, 8:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ layout and presets

@pytest.mark.parametrize("config, heads, upcast", [(SD2_UNET, (5, 10, 20), False), (SD2_768_UNET, (5, 10, 20), True)])
def test_sd2_unet_layout_heads_and_projections(config, heads, upcast):
    with torch.device("meta"):  # the full architecture's modules, no weights
        unet = UNet2DConditionModel(**config)
    layers = cross_attention_layers(unet)
    assert len(layers) == 16 and "down_blocks.0.attentions.1" in layers and "up_blocks.3.attentions.2" in layers
    by_block = {name.split(".attentions")[0]: (m.heads, m.to_q.out_features // m.heads, m.upcast_attention)
                for name, m in layers.items()}
    assert by_block == {"down_blocks.0": (heads[0], 64, upcast), "down_blocks.1": (heads[1], 64, upcast),
                        "down_blocks.2": (heads[2], 64, upcast), "mid_block": (heads[2], 64, upcast),
                        "up_blocks.1": (heads[2], 64, upcast), "up_blocks.2": (heads[1], 64, upcast),
                        "up_blocks.3": (heads[0], 64, upcast)}
    assert {m.to_k.in_features for m in layers.values()} == {1024}  # OpenCLIP ViT-H's states
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)


def test_twins_have_sd2s_layer_names_and_per_block_heads(sd2):
    layers = cross_attention_layers(sd2.unet)
    with torch.device("meta"):
        full = cross_attention_layers(UNet2DConditionModel(**SD2_UNET))
    assert list(layers) == list(full)
    assert [layers[k].heads for k in layers] == [{5: 2, 10: 4, 20: 8}[full[k].heads] for k in full]
    assert isinstance(sd2.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert (sd2.prediction_type, tiny_sd2_v().prediction_type) == ("epsilon", "v_prediction")


@pytest.mark.parametrize("option, size, v", [("sd-2-base", 512, False), ("sd-2-1", 768, True)])
def test_sd2_presets(compose, option, size, v):
    from benchmark.detectors.scores import select_layers

    cfg = compose("detect", f"model={option}")
    assert cfg.sampler.height == cfg.sampler.width == size and cfg.sampler.steps == 50
    assert cfg.extra.anisotropy.gamma_cos == 0.1 and cfg.extra.anisotropy.gamma_norm == 1.0  # official, SD 2
    with torch.device("meta"):
        available = list(cross_attention_layers(UNet2DConditionModel(**(SD2_768_UNET if v else SD2_UNET))))
    for name, layers in cfg.layers.sets.items():
        assert select_layers(available, list(layers)), name
    assert select_layers(available, list(cfg.layers.sets.be_paper)) == ["down_blocks.0.attentions.0",
                                                                       "down_blocks.0.attentions.1"]
    assert select_layers(available, list(cfg.layers.sets.ren_E)) == ["down_blocks.1.attentions.1"]
    assert cfg.layers.headline == "be_paper"
    assert compose("detect", "model=sd-v1-4").extra.anisotropy.gamma_cos == 2.0  # SD v1's stays


# ------------------------------------------------------------------------------------------------ folders

@pytest.mark.parametrize("builder", [tiny_sd2, tiny_sd2_v])
def test_sd2_folder_loads_with_the_real_component_classes(tmp_path, compose, builder):
    """save -> load through the SD 2 presets' loading path (model.source = the folder)."""
    built = builder()
    folder = save_text_to_image(built, tmp_path / "sd2")
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == built.prediction_type  # the network's own, not the sampler's epsilon
    cfg = compose("detect", "model=sd-2-1" if built.prediction_type == "v_prediction" else "model=sd-2-base",
                  f"model.source={folder}", "model.device=cpu", "model.dtype=float32")
    m = cfg.model
    loaded = get_model(m.source, m.device, m.dtype, m.use_safetensors, m.build)
    assert isinstance(loaded.unet, UNet2DConditionModel) and isinstance(loaded.text_encoder, CLIPTextModel)
    assert isinstance(loaded.scheduler, DDIMScheduler) and loaded.scheduler.config.prediction_type == "epsilon"
    assert loaded.prediction_type == built.prediction_type and loaded.family == "SD 2.x"
    assert loaded.tokenizer.pad_token == "!" and loaded.tokenizer.pad_token_id == 0
    assert loaded.end_token_index([PROMPT]).tolist() == [7]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.cat([built.encode([""]), built.encode([PROMPT])])
    with torch.no_grad():
        assert torch.allclose(loaded.encode([PROMPT]), built.encode([PROMPT]))
        assert torch.allclose(loaded.noise_prediction(x, 500, context), built.noise_prediction(x, 500, context),
                              atol=1e-6)


@pytest.mark.slow
def test_full_sd21_architecture_folder_round_trip(tmp_path):
    """SD 2.1 (768, v) with random weights at full size, written and read back (about 4 GiB on disk, no VAE)."""
    from benchmark.models.text_to_image import sd2_architecture

    built = sd2_architecture(with_vae=False)
    folder = save_text_to_image(built, tmp_path / "sd21")
    loaded = load_text_to_image(str(folder))
    def as_json(config):  # tuples and lists alike, without diffusers' bookkeeping keys
        return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}

    assert as_json(loaded.unet.config) == as_json(built.unet.config)
    assert torch.equal(loaded.unet.conv_in.weight, built.unet.conv_in.weight)
    assert loaded.text_encoder.config.num_hidden_layers == 23 and loaded.text_encoder.config.hidden_size == 1024
    assert loaded.prediction_type == "v_prediction" and loaded.tokenizer.pad_token == "!"
    assert {m.heads for m in cross_attention_layers(loaded.unet).values()} == {5, 10, 20}


# ------------------------------------------------------------------------------------------- end to end

def test_detect_on_the_v_twin_scores_every_detector(tmp_path, compose):
    from runners.detect import run

    cfg = compose("detect", "model=tiny-sd2-v", "debug=default", "extra.passes=[sail,anisotropy,curvature]",
                  "extra.curvature.probes=2")
    assert cfg.model.name == "tiny-sd2-v" and cfg.extra.anisotropy.gamma_cos == 0.1
    run(cfg, tmp_path / "job")
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert result["sampled_now"] == result["n_generations"] == 8
    assert set(pd.DataFrame(result["metrics"]).detector) == set(DETECTORS)
    assert result["family"] == "SD 2.x, v_prediction"
    assert (tmp_path / "job" / "report.md").read_text().startswith("# tiny-sd2-v (SD 2.x, v_prediction) on tiny")


def test_short_mitigation_on_the_v_twin(tmp_path, compose):
    from runners.mitigate import run

    cfg = compose("mitigate", "model=tiny-sd2-v", "debug=default", "mitigation.methods=[wen,be,pad_replace_mask_end]",
                  "mitigation.target_losses=[0.1]", "mitigation.max_iters=2")
    run(cfg, tmp_path / "job")
    rows = pd.read_csv(tmp_path / "job" / "mitigation.csv")
    assert {"none", "wen", "be", "pad_replace_mask_end"} <= set(rows.method)
    assert rows.D1.notna().all()


def test_ren_sd2_set_is_wired_to_the_sd2_experiment(compose, shared_data):
    from omegaconf import OmegaConf

    from benchmark.data.prompts import load_prompt_set

    cfg = compose("detect", "experiment=sd2", f"paths.data_dir={shared_data}")
    assert cfg.model.name == "sd-2-1" and cfg.sampler.height == 768 and cfg.layers.headline == "be_paper"
    assert cfg.extra.anisotropy.gamma_cos == 0.1
    prompts = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
    assert len(prompts) == 719 and sum(p.memorized for p in prompts) == 219


def test_a_folders_prediction_type_is_part_of_its_store_key(tmp_path):
    """The same UNet files with another declared prediction type mean another output: another model key."""
    import shutil

    from benchmark.jobs.keys import model_key

    eps = save_text_to_image(tiny_sd2(), tmp_path / "eps")
    v = tmp_path / "v"
    shutil.copytree(eps, v)
    config = json.loads((v / "scheduler" / "scheduler_config.json").read_text())
    (v / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    keys = [model_key("sd-2-1", str(f)) for f in (eps, v)]
    assert keys[0] != keys[1] and keys[0].split("+")[0] == keys[1].split("+")[0]  # the UNet part is the same


def test_sail_sd2_set_reads_the_users_copies(compose, tmp_path):
    from omegaconf import OmegaConf

    from benchmark.data.prompts import load_prompt_set

    folder = tmp_path / "data" / "prompts" / "sharpness_memorization_diffusion"
    folder.mkdir(parents=True)
    (folder / "sd2_mem.txt").write_text("a memorized caption\nanother memorized caption\n")
    (folder / "sd2_nmem.txt").write_text("a dog on a car\na small kitchen\na red bus\n")
    cfg = compose("detect", "prompts=sail_sd2", f"paths.data_dir={tmp_path / 'data'}")
    prompts = load_prompt_set(OmegaConf.to_container(cfg.prompts, resolve=True))
    assert [p.memorized for p in prompts] == [True, True, False, False, False]
    assert [p.text for p in prompts][:1] == ["a memorized caption"]


@pytest.mark.slow
def test_capture_on_the_full_sd21_architecture_at_768px():
    """One step on SD 2.1's real architecture (random weights, v): per-block heads 5/10/20, maps at 96..12."""
    from benchmark.models.text_to_image import sd2_architecture
    from benchmark.sampling.capture import SamplerSettings, sample_with_capture

    model = sd2_architecture(with_vae=False)  # without a VAE the sampler works on the 96x96 latent directly
    settings = SamplerSettings(steps=1, guidance=7.5, height=96, width=96)
    batch = sample_with_capture(model, PROMPT, [0], settings, decode=False)
    assert batch.end_maps["down_blocks.0.attentions.0"].shape == (1, 96, 96)
    assert batch.end_maps["down_blocks.2.attentions.1"].shape == (1, 24, 24)
    assert batch.end_maps["mid_block.attentions.0"].shape == (1, 12, 12)
    assert all(v.shape == (1, 1, 77) for v in batch.token_attn.values()) and len(batch.token_attn) == 16
    assert all(torch.isfinite(v).all() for v in batch.end_maps.values())
    assert batch.end_index.tolist() == [7]
