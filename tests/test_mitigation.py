import pytest
import torch

from benchmark.mitigation.embedding import MitigationSettings, magnitude_loss, mitigate, optimise_embedding
from benchmark.sampling.capture import SamplerSettings, initial_noise, sample_with_capture

SAMPLER = SamplerSettings(steps=4, guidance=7.5, height=32, width=32)
PROMPT = "Mothers influence on her young hippo"


def _first_step(model, seeds):
    n = len(seeds)
    cond = model.encode([PROMPT]).expand(n, -1, -1)
    uncond = model.encode([""]).expand(n, -1, -1)
    model.scheduler.set_timesteps(SAMPLER.steps)
    return cond, uncond, initial_noise(model, seeds, SAMPLER), model.scheduler.timesteps[0]


def test_magnitude_loss_by_hand():
    delta = torch.zeros(2, 4, 2, 2)
    delta[0, :, 0, 0] = 1.0  # one bright pixel, norm 2 over 4 channels
    delta[1] = 0.5  # everywhere: norm sqrt(16 * 0.25) = 2
    assert magnitude_loss(delta).tolist() == pytest.approx([2.0, 2.0])
    mask = torch.zeros(2, 2, 2)
    mask[:, 0, 0] = 1.0  # mean 1/4
    assert magnitude_loss(delta, mask).tolist() == pytest.approx([8.0, 4.0])  # ||d*m|| / mean(m)
    mask[1] = 1.0  # batch mean (1/4 + 1) / 2 = 0.625 for both images
    assert magnitude_loss(delta, mask, "batch").tolist() == pytest.approx([2 / 0.625, 2 / 0.625])


def test_optimisation_lowers_the_loss_and_keeps_bos(tiny_model):
    cond, uncond, latents, t = _first_step(tiny_model, [0, 1])
    with torch.enable_grad():
        out = optimise_embedding(tiny_model, cond, uncond, latents, t, MitigationSettings("wen", 0.0, max_iters=5))
    assert out.losses.shape == (5, 2) and (out.iterations == 5).all()
    assert (out.losses[-1] < out.losses[0]).all()
    torch.testing.assert_close(out.embedding[:, 0], cond[:, 0], rtol=0, atol=0)  # BOS untouched
    assert (out.embedding[:, 1:] - cond[:, 1:]).abs().max() > 0


def test_bos_gradient_is_zeroed_before_the_step(tiny_model, monkeypatch):
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["params"][0].grad[:, 0].abs().max().item())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cond, uncond, latents, t = _first_step(tiny_model, [0])
    with torch.enable_grad():
        optimise_embedding(tiny_model, cond, uncond, latents, t, MitigationSettings("wen", 0.0, max_iters=3))
    assert seen == [0.0, 0.0, 0.0]


def test_early_stop_per_image(tiny_model):
    cond, uncond, latents, t = _first_step(tiny_model, [0, 1])
    with torch.enable_grad():
        first = optimise_embedding(tiny_model, cond, uncond, latents, t, MitigationSettings("wen", 0.0, max_iters=1))
        l0 = first.losses[0]
        # a target between the two images' first losses: one stops at once, with its embedding unchanged
        target = float(l0.mean())
        out = optimise_embedding(tiny_model, cond, uncond, latents, t, MitigationSettings("wen", target, max_iters=4))
    low = int(l0.argmin())
    assert out.iterations[low] == 0
    torch.testing.assert_close(out.embedding[low], cond[low], rtol=0, atol=0)
    assert out.iterations[1 - low] >= 1
    # a target above every loss: nothing is optimised
    with torch.enable_grad():
        none = optimise_embedding(tiny_model, cond, uncond, latents, t, MitigationSettings("wen", 1e9))
    assert none.losses.shape == (1, 2) and (none.iterations == 0).all()


def test_mitigated_sampling_changes_the_image_and_depends_on_the_seed_alone(tiny_model, same_up_to_float_order):
    plain = sample_with_capture(tiny_model, PROMPT, [0], SAMPLER)
    settings = MitigationSettings("wen", 0.0, max_iters=3)
    batch, _ = mitigate(tiny_model, PROMPT, [0, 1], SAMPLER, settings)
    alone, _ = mitigate(tiny_model, PROMPT, [0], SAMPLER, settings)
    assert (batch.images[0] - plain.images[0]).abs().max() > 1e-3
    tolerance = same_up_to_float_order(batch.latents[:1], alone.latents)
    assert (batch.latents[1] - alone.latents[0]).abs().max() > 100 * tolerance  # another seed is far outside it


def test_be_mitigation_uses_the_mask_and_checks_its_arguments(tiny_model):
    plain = sample_with_capture(tiny_model, PROMPT, [0], SAMPLER)
    mask = plain.end_maps["down_blocks.0.attentions.0"]  # 16x16 = the latent size here
    settings = MitigationSettings("be", 0.0, max_iters=2)
    masked, opt_masked = mitigate(tiny_model, PROMPT, [0], SAMPLER, settings, mask)
    _, opt_plain = mitigate(tiny_model, PROMPT, [0], SAMPLER, MitigationSettings("wen", 0.0, max_iters=2))
    assert not torch.allclose(opt_masked.losses, opt_plain.losses)
    with pytest.raises(ValueError, match="needs BE mask"):
        mitigate(tiny_model, PROMPT, [0], SAMPLER, settings)
    with pytest.raises(ValueError, match="unknown mitigation method 'magic'"):
        MitigationSettings("magic", 1.0)


def test_mitigation_job_on_the_testbed_lowers_similarity_and_reruns_from_the_store(tmp_path, compose):
    import json

    import pandas as pd

    from runners.mitigate import run

    cfg = compose("mitigate", "sampler.steps=8", "mitigation.n_images=1", "mitigation.target_losses=[0.1,0.3]")
    run(cfg, tmp_path / "job")
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert result["n_prompts"] == 20 and result["sampled_now"] == 20 * 5 and result["utility"] == "caption_rmse"
    rows = pd.read_csv(tmp_path / "job" / "mitigation.csv")
    assert {"S", "LS", "train_rmse", "caption_rmse", "D1"} <= set(rows.columns)
    mean = rows.groupby(["method", "strength"], dropna=False)[["D1", "train_rmse"]].mean()
    base = rows[rows.method == "none"][["D1", "train_rmse"]].mean()
    for method in ("wen", "be"):
        strongest = mean.loc[(method, 0.1)]
        assert strongest.D1 < base.D1 and strongest.train_rmse > base.train_rmse  # further from the training image
    assert (tmp_path / "job" / "report.md").read_text().startswith("# Mitigation: testbed on testbed")
    run(cfg, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["sampled_now"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "mitigation.csv"), rows)


@pytest.mark.parametrize("override, message", [
    ("mitigation.methods=[wen,magic]", "mitigation.methods: 'magic' is not a mitigation"),
    ("mitigation.mask_layers=nowhere", "mitigation.mask_layers='nowhere' is not a layer set"),
    ("mitigation.kinds=[verbatim]",
     "mitigation.kinds.0='verbatim': input should be 'global', 'local' or 'memorized'"),
])
def test_mitigation_bad_input_is_one_clear_error(tmp_path, compose, override, message):
    from runners.mitigate import run

    cfg = compose("mitigate", "debug=default", override)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(cfg, tmp_path / "job")
    assert not (tmp_path / "job" / "metrics.json").exists()
