"""Model families beyond SD v1 (issue 28): SDXL and PixArt-alpha, their tiny twins end to end, their folders, and
the detectors and mitigations that are not defined on a family."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from benchmark.detectors import detection
from benchmark.detectors.scores import select_layers
from benchmark.mitigation.embedding import MitigationSettings, optimise_embedding
from benchmark.models.pixart import PIXART_TRANSFORMER, PixArtTextToImage, tiny_pixart
from benchmark.models.sdxl import SDXL_UNET, SDXLTextToImage, tiny_sdxl
from benchmark.models.text_to_image import get_model, save_text_to_image
from benchmark.registry import DETECTORS
from benchmark.sampling.capture import Recording, capture, cross_attention_layers

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPT = "a photo of the Mona Lisa"


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart(seed=0)


def latents_for(model, n=2, size=32):
    return torch.randn(n, *model.latent_shape(size, size), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------- SDXL


def test_sdxl_end_token_is_at_the_same_position_in_both_tokenizers_which_pad_differently(sdxl):
    prompts = [PROMPT, "an old man"]
    first = sdxl.tokenizer(prompts, padding="max_length", max_length=77).input_ids
    second = sdxl.tokenizer_2(prompts, padding="max_length", max_length=77).input_ids
    end = sdxl.end_token_index(prompts).tolist()
    eos, bang = sdxl.tokenizer.eos_token_id, sdxl.tokenizer.convert_tokens_to_ids("!")
    for a, b, e in zip(first, second, end):
        assert a[:e + 1] == b[:e + 1] and a[e] == b[e] == eos  # same tokens up to the first end token
        assert set(a[e + 1:]) == {eos} and set(b[e + 1:]) == {bang}  # CLIP pads with end tokens, OpenCLIP with !


def test_sdxl_context_is_both_penultimate_states_then_the_pooled_row_and_the_empty_prompt_is_zero(sdxl):
    context = sdxl.encode([PROMPT, ""])
    assert context.shape == (2, 78, 16 + 32)
    ids = sdxl.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_2 = sdxl.tokenizer_2([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    h1 = sdxl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out2 = sdxl.text_encoder_2(ids_2, output_hidden_states=True)
    torch.testing.assert_close(context[0, :77], torch.cat([h1, out2.hidden_states[-2]], -1)[0])
    torch.testing.assert_close(context[0, 77, :32], out2.text_embeds[0])
    assert (context[0, 77, 32:] == 0).all()
    assert (context[1] == 0).all()  # force_zeros_for_empty_prompt: SDXL's unconditional branch


def test_sdxl_unet_gets_the_token_states_the_pooled_embedding_and_the_time_ids(sdxl):
    context = sdxl.encode([PROMPT])
    latents = latents_for(sdxl, 1)
    inputs = sdxl.network_inputs(latents, torch.tensor(500), context)
    assert inputs["encoder_hidden_states"].shape == (1, 77, 48)
    torch.testing.assert_close(inputs["added_cond_kwargs"]["text_embeds"], context[:, 77, :32])
    assert inputs["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]  # (H, W, 0, 0, H, W)
    direct = sdxl.unet(latents, torch.tensor(500), **inputs).sample
    torch.testing.assert_close(sdxl.noise_prediction(latents, torch.tensor(500), context), direct)
    # the pooled embedding is a condition: changing it changes epsilon
    other = context.clone()
    other[:, 77] += 1
    assert not torch.allclose(sdxl.noise_prediction(latents, torch.tensor(500), other), direct)


def test_sdxl_recorder_sees_77_tokens_in_every_transformer_block(sdxl):
    layers = cross_attention_layers(sdxl.unet)
    assert "down_blocks.1.attentions.0.transformer_blocks.1" in layers and len(layers) == 14
    context = torch.cat([sdxl.encode([""]), sdxl.encode([PROMPT])])
    latents = latents_for(sdxl, 1).expand(2, -1, -1, -1)
    rec = Recording(1, sdxl.end_token_index([PROMPT]), tuple(latents.shape[-2:]), frozenset({0}), 0)
    rec.start_step(0)
    plain = sdxl.noise_prediction(latents, torch.tensor(900), context)
    with torch.no_grad(), capture(sdxl.unet, rec):
        recorded = sdxl.noise_prediction(latents, torch.tensor(900), context)
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    assert set(rec.token_attn) == set(layers)
    assert all(v[0].shape == (1, 77) for v in rec.token_attn.values())
    assert rec.end_maps[0]["down_blocks.1.attentions.0"].shape == (1, 8, 8)


# -------------------------------------------------------------------------------------------- PixArt


def test_pixart_padding_rows_are_zero_and_the_network_output_is_the_pipelines_with_the_mask(pixart):
    tok = pixart.tokenizer([PROMPT], padding="max_length", max_length=120, return_tensors="pt")
    assert tok.input_ids[0, 0] != pixart.tokenizer.eos_token_id and pixart.tokenizer.bos_token_id is None
    length = int(tok.attention_mask.sum())
    assert tok.input_ids[0, length - 1] == pixart.tokenizer.eos_token_id  # </s> ends the prompt, no start token
    assert pixart.end_token_index([PROMPT]).item() == length - 1
    context = pixart.encode([PROMPT])
    assert context.shape == (1, 120, 32)
    assert (context[0, length:] == 0).all() and (context[0, :length] != 0).any(-1).all()
    latents = latents_for(pixart, 1)
    t = torch.tensor([500])
    # PixArtAlphaPipeline's call: the encoder's own states (padding rows not zeroed) with the tokenizer's mask
    states = pixart.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
    out = pixart.unet(latents, encoder_hidden_states=states, encoder_attention_mask=tok.attention_mask,
                      timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape[1] == 8  # learned sigma: epsilon is the first half
    torch.testing.assert_close(pixart.noise_prediction(latents, t, context), out[:, :4], rtol=1e-5, atol=1e-6)
    # without the mask the padding would be attended: the mask matters
    unmasked = pixart.unet(latents, encoder_hidden_states=states, timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert not torch.allclose(unmasked[:, :4], out[:, :4], atol=1e-4)


def test_pixart_recorder_sees_every_block_and_no_attention_on_the_padding(pixart):
    layers = cross_attention_layers(pixart.unet)
    assert list(layers) == [f"transformer_blocks.{k}" for k in range(4)]
    context = torch.cat([pixart.encode([""]), pixart.encode([PROMPT])])
    latents = latents_for(pixart, 1).expand(2, -1, -1, -1)
    end = pixart.end_token_index([PROMPT])
    rec = Recording(1, end, tuple(latents.shape[-2:]), frozenset({0}), 0)
    rec.start_step(0)
    plain = pixart.noise_prediction(latents, torch.tensor(900), context)
    with torch.no_grad(), capture(pixart.unet, rec):
        recorded = pixart.noise_prediction(latents, torch.tensor(900), context)
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    for attn in rec.token_attn.values():
        assert attn[0].shape == (1, 120)
        assert (attn[0][0, end.item() + 1:] == 0).all() and attn[0][0, :end.item() + 1].sum() == pytest.approx(1)
    assert rec.end_maps[0]["transformer_blocks.0"].shape == (1, 8, 8)


def test_wen_optimisation_holds_no_row_on_pixart_and_never_revives_padding(pixart, tiny_model):
    settings = MitigationSettings("wen", target_loss=0.0, lr=0.1, max_iters=2)
    for model, held in ((pixart, 0), (tiny_model, 1)):
        cond, uncond = model.encode([PROMPT]), model.encode([""])
        model.scheduler.set_timesteps(5)
        opt = optimise_embedding(model, cond, uncond, latents_for(model, 1), model.scheduler.timesteps[0], settings)
        assert model.start_tokens == held
        assert torch.equal(opt.embedding[:, :held], cond[:, :held].float())  # the start token, where there is one
        assert not torch.equal(opt.embedding[:, held], cond[:, held].float())  # the first prompt token moves
        if model is pixart:  # zero rows get zero gradient: the mask read back from the context is unchanged
            end = pixart.end_token_index([PROMPT]).item()
            assert (opt.embedding[0, end + 1:] == 0).all() and (opt.embedding[0, :end + 1] != 0).any(-1).all()


# ------------------------------------------------------------------------------------ real layouts, presets


@pytest.mark.parametrize("network, config, preset, n_layers, headline_layers", [
    (UNet2DConditionModel, SDXL_UNET, "sdxl", 70, 4),
    (PixArtTransformer2DModel, PIXART_TRANSFORMER, "pixart", 28, 2),
])
def test_real_layouts_have_their_cross_attention_layers_and_the_presets_resolve(network, config, preset, n_layers,
                                                                                headline_layers):
    with torch.device("meta"):  # the published configs, without allocating their weights
        layers = list(cross_attention_layers(network(**config)))
    assert len(layers) == n_layers
    sets = yaml.safe_load((CONF / "layers" / f"{preset}.yaml").read_text())
    for name, chosen in sets["sets"].items():
        assert select_layers(layers, chosen), name
    assert len(select_layers(layers, sets["sets"][sets["headline"]])) == headline_layers


# ------------------------------------------------------------------------------------------- folders


@pytest.mark.parametrize("build, config, cls, parts", [
    (tiny_sdxl, "sdxl", SDXLTextToImage, {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
                                          "text_encoder_2": CLIPTextModelWithProjection}),
    (tiny_pixart, "pixart-alpha", PixArtTextToImage, {"unet": PixArtTransformer2DModel,
                                                      "text_encoder": T5EncoderModel}),
])
def test_family_configs_load_a_folder_with_the_real_component_classes(tmp_path, compose, build, config, cls, parts):
    built = build(seed=1)
    folder = save_text_to_image(built, tmp_path / "pipeline")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls.pipeline_class
    cfg = compose("detect", f"model={config}", f"model.source={folder}", "model.device=cpu", "model.dtype=float32")
    m = cfg.model
    model = get_model(m.source, m.device, m.dtype, m.use_safetensors, m.build)
    assert type(model) is cls and model.family == cls.family
    for name, part in parts.items():
        assert type(getattr(model, name)) is part
    if cls is SDXLTextToImage:
        assert model.unet.config.addition_embed_type == "text_time" and model.force_zeros_for_empty_prompt
    assert model.end_token_index([PROMPT]).tolist() == built.end_token_index([PROMPT]).tolist()
    context, latents, t = built.encode([PROMPT]), latents_for(built, 1), torch.tensor(700)
    torch.testing.assert_close(model.encode([PROMPT]), context)
    torch.testing.assert_close(model.noise_prediction(latents, t, context), built.noise_prediction(latents, t, context))
    assert model.scheduler.config.clip_sample is False


def test_a_folder_missing_a_family_component_is_refused_naming_it(tmp_path):
    folder = save_text_to_image(tiny_sdxl(), tmp_path / "pipeline")
    for path in sorted((folder / "text_encoder_2").iterdir()):
        path.unlink()
    (folder / "text_encoder_2").rmdir()
    with pytest.raises(Exception, match="missing text_encoder_2/"):
        get_model(str(folder))


# ------------------------------------------------------------------------------------------ the jobs


def test_premises_mark_ren_not_defined_on_pixart_only(sdxl, pixart, tiny_model):
    assert detection.not_defined(tiny_model) == {} and detection.not_defined(sdxl) == {}
    undefined = detection.not_defined(pixart)
    assert set(undefined) == {"Ren_E", "Ren_D"}
    assert "no start token" in undefined["Ren_E"] and "masked" in undefined["Ren_D"]
    assert set(d.name for d in DETECTORS.entries() if d.needs) == {"Ren_E", "Ren_D"}


@pytest.mark.parametrize("model, undefined", [("tiny-sdxl", set()), ("tiny-pixart", {"Ren_E", "Ren_D"})])
def test_detect_job_on_each_tiny_twin_scores_every_defined_detector_and_marks_the_others(tmp_path, compose, model,
                                                                                         undefined):
    from runners.detect import run

    # every extra pass too: every registered detector is either scored or marked
    run(compose("detect", f"model={model}", "debug=default", "extra.passes=[sail,anisotropy,curvature]",
                "extra.curvature.probes=2"), tmp_path / "job")
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert result["family"] == {"tiny-sdxl": "SDXL, epsilon", "tiny-pixart": "PixArt-alpha, epsilon"}[model]
    assert set(result.get("not_defined", {})) == undefined  # left out where every detector is defined
    detectors = set(pd.DataFrame(result["metrics"]).detector)
    assert detectors == set(DETECTORS.names()) - undefined
    assert {"SAIL", "anisotropy", "curvature", "Ren_E"} <= set(DETECTORS.names())
    layers = set(pd.DataFrame(result["metrics"]).layers)
    assert "be_analogue" in layers  # the family's layer preset, not the tiny SD model's
    report = (tmp_path / "job" / "report.md").read_text()
    assert f"({result['family']})" in report.splitlines()[0]
    assert ("not defined" in report) == bool(undefined)
    # the cross-job leaderboard too: a "not defined" row per (level, subset), no value
    from reports.jobs import finished_jobs
    from reports.tables import collect, leaderboard

    board = leaderboard(collect(finished_jobs([tmp_path])))
    marked = board[board.note.str.startswith("not defined")] if "note" in board else board.iloc[:0]
    assert set(marked.detector) == undefined and marked.auc.isna().all()


def test_mitigation_runs_on_each_twin_and_refuses_padding_methods_on_pixart(tmp_path, compose):
    from runners.mitigate import run

    for model in ("tiny-sdxl", "tiny-pixart"):
        run(compose("mitigate", f"model={model}", "debug=default", "sampler.steps=2", "mitigation.target_losses=[0.1]",
                    "mitigation.max_iters=2", "mitigation.kinds=[global]"), tmp_path / model)
        result = json.loads((tmp_path / model / "metrics.json").read_text())
        assert {"none", "wen", "be"} <= set(pd.DataFrame(result["curves"]).method)
        assert f"Model family: {result['family']}." in (tmp_path / model / "report.md").read_text()
    cfg = compose("mitigate", "model=tiny-pixart", "debug=default", "mitigation.methods=[pad_mask]",
                  "headline.method=pad_mask")
    with pytest.raises(ValueError, match=r"mitigation.methods=\['pad_mask'\] are not defined on model family "
                                         "PixArt-alpha: T5's padding is masked"):
        run(cfg, tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.json").exists()


def test_sdxl_store_key_carries_the_second_encoder_and_the_unconditional_rule(tmp_path, compose):
    from benchmark.jobs.keys import model_key

    folder = save_text_to_image(tiny_sdxl(), tmp_path / "pipeline")
    cfg = compose("detect", "model=sdxl", f"model.source={folder}")
    before = model_key(cfg.model.name, cfg.model.source)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    flipped = model_key(cfg.model.name, cfg.model.source)
    save_text_to_image(tiny_sdxl(seed=3), tmp_path / "other")
    other = next((tmp_path / "other" / "text_encoder_2").glob("*.safetensors"))
    target = next((folder / "text_encoder_2").glob("*.safetensors"))
    target.write_bytes(other.read_bytes())
    assert len({before, flipped, model_key(cfg.model.name, cfg.model.source)}) == 3
