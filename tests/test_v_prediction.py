"""v-prediction (SD 2.1 at 768 px): the network call returns epsilon, so every epsilon-defined score is unchanged.

By hand: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t on known numbers. Equality: an epsilon model and the same
network re-expressed as v (a UNet returning v computed from its own eps) give the same traces and scores."""
import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from benchmark.detectors import jacobian as J
from benchmark.detectors import scores as S
from benchmark.mitigation.embedding import MitigationSettings, mitigate
from benchmark.models.text_to_image import SD14_SCHEDULER, TextToImage, tiny_text_to_image
from benchmark.sampling.capture import SamplerSettings, sample_with_capture

PROMPT = "a photograph of an astronaut riding a horse"
SETTINGS = SamplerSettings(steps=4, guidance=7.5, height=32, width=32)
REL = 1e-5


class VPredictionUNet(UNet2DConditionModel):
    """An epsilon UNet re-expressed as v: ``v = (eps - sqrt(1 - abar_t) x_t) / sqrt(abar_t)`` (the inverse of
    the conversion under test), with ``abar`` from the schedule it was trained on."""

    alphas_cumprod: torch.Tensor

    def forward(self, sample, timestep, *args, **kwargs):
        eps = super().forward(sample, timestep, *args, **kwargs).sample
        abar = self.alphas_cumprod[torch.as_tensor(timestep).long().cpu()].reshape(-1, 1, 1, 1).to(eps)
        return UNet2DConditionOutput(sample=(eps - (1 - abar).sqrt() * sample) / abar.sqrt())


def as_v_model(model: TextToImage) -> TextToImage:
    unet = VPredictionUNet.from_config(model.unet.config)
    unet.load_state_dict(model.unet.state_dict())
    scheduler = DDIMScheduler(**SD14_SCHEDULER, prediction_type="v_prediction")
    unet.alphas_cumprod = scheduler.alphas_cumprod.double()
    return TextToImage(model.model_id + "-v", unet.eval(), model.text_encoder, model.tokenizer, scheduler,
                       copy.deepcopy(model.vae))


@pytest.fixture(scope="module")
def pair():
    eps_model = tiny_text_to_image(seed=0)
    return eps_model, as_v_model(eps_model)


def close(actual, expected, rel=REL):
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape
    worst, scale = np.abs(a - e).max(), np.abs(e).max()
    assert worst <= rel * scale, f"largest difference {worst:.3g} > {rel:g} x {scale:.3g}"


def test_epsilon_from_v_by_hand():
    """abar_t at t = 999 and t = 1 of SD's scaled-linear schedule; x_t = 2, v = 3 (and a second pixel -1, 0.5)."""
    model = tiny_text_to_image(seed=0)
    v_model = TextToImage("v", model.unet, model.text_encoder, model.tokenizer,
                          DDIMScheduler(**SD14_SCHEDULER, prediction_type="v_prediction"))
    assert v_model.prediction_type == "v_prediction"
    assert v_model.scheduler.config.prediction_type == "epsilon"  # the sampler steps on what noise_prediction gives
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    abar = np.cumprod(1 - betas)
    x = torch.tensor([2.0, -1.0]).reshape(1, 2, 1, 1)
    v = torch.tensor([3.0, 0.5]).reshape(1, 2, 1, 1)
    for t in (999, 1):
        expected = np.sqrt(abar[t]) * np.array([3.0, 0.5]) + np.sqrt(1 - abar[t]) * np.array([2.0, -1.0])
        got = v_model.epsilon_from_output(v, x, torch.tensor(t)).flatten().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # t = 999: abar = 0.00466, eps = 0.0683 * 3 + 0.9977 * 2 = 2.2002: the by-hand value itself
    assert v_model.epsilon_from_output(v, x, 999)[0, 0, 0, 0].item() == pytest.approx(2.2002, abs=1e-4)
    # one timestep per row
    two = v_model.epsilon_from_output(torch.cat([v, v]), torch.cat([x, x]), torch.tensor([999, 1]))
    assert two[0, 0].item() == pytest.approx(2.2002, abs=1e-4) and two[1, 0].item() != two[0, 0].item()
    # an epsilon model passes its output through
    assert model.epsilon_from_output(v, x, 999) is v


def test_v_conversion_is_differentiable_in_latents():
    model = TextToImage("v", *[getattr(tiny_text_to_image(seed=0), k) for k in ("unet", "text_encoder",
                                                                                "tokenizer")],
                        DDIMScheduler(**SD14_SCHEDULER, prediction_type="v_prediction"))
    x = torch.ones(1, 1, 1, 1, requires_grad=True)
    v = 3 * x
    (model.epsilon_from_output(v, x, 500).sum()).backward()
    abar = model.scheduler.alphas_cumprod[500].item()
    assert x.grad.item() == pytest.approx(3 * abar ** 0.5 + (1 - abar) ** 0.5, rel=1e-6)


def test_other_prediction_types_are_refused():
    model = tiny_text_to_image(seed=0)
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
        TextToImage("x", model.unet, model.text_encoder, model.tokenizer,
                    DDIMScheduler(**SD14_SCHEDULER, prediction_type="sample"))


def test_added_conditions_are_refused_by_sd_families(pair):
    eps_model, _ = pair
    x = torch.zeros(1, 4, 16, 16)
    with pytest.raises(TypeError, match="takes no added conditions, got text_embeds"):
        eps_model.noise_prediction(x, 999, eps_model.encode([""]), text_embeds=torch.zeros(1, 8))


def test_noise_prediction_of_the_v_model_is_the_epsilon_models(pair):
    eps_model, v_model = pair
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.cat([eps_model.encode([""]), eps_model.encode([PROMPT])])
    with torch.no_grad():
        for t in (981, 500, 21):
            raw = v_model.unet(x, t, encoder_hidden_states=context).sample
            eps = eps_model.noise_prediction(x, t, context)
            assert (raw - eps).abs().max() > 0.1  # the wrapper really outputs something else
            close(v_model.noise_prediction(x, t, context), eps)


def test_traces_and_trace_scores_are_equal(pair):
    eps_model, v_model = pair
    a = sample_with_capture(eps_model, PROMPT, [0, 1], SETTINGS)
    b = sample_with_capture(v_model, PROMPT, [0, 1], SETTINGS)
    close(b.delta_sq, a.delta_sq)
    close(b.latents, a.latents)
    for layer in a.end_maps:
        close(b.end_maps[layer], a.end_maps[layer])
        close(b.token_attn[layer], a.token_attn[layer])
    maps_a = {k: v.numpy() for k, v in a.end_maps.items()}
    maps_b = {k: v.numpy() for k, v in b.end_maps.items()}
    mask_a, mask_b = (S.be_mask(m, ["*"], (16, 16)) for m in (maps_a, maps_b))
    for T in (1, 4):
        close(S.magnitude_D(b.delta_sq.numpy(), T), S.magnitude_D(a.delta_sq.numpy(), T))
        close(S.localized_LD(b.delta_sq.numpy(), mask_b, T), S.localized_LD(a.delta_sq.numpy(), mask_a, T))
    ta = {k: v.numpy() for k, v in a.token_attn.items()}
    tb = {k: v.numpy() for k, v in b.token_attn.items()}
    close(S.ren_D(tb, b.end_index.numpy(), list(tb), 4), S.ren_D(ta, a.end_index.numpy(), list(ta), 4))


def test_jacobian_scores_are_equal(pair):
    eps_model, v_model = pair
    for fn in (lambda m: J.sail(m, PROMPT, [0, 1], SETTINGS, k=2),
               lambda m: J.anisotropy(m, PROMPT, [0], SETTINGS, gamma_cos=0.1)["anisotropy"],
               lambda m: J.curvature_map(m, PROMPT, [0], SETTINGS, probes=2)):
        close(fn(v_model), fn(eps_model), rel=1e-4)  # second-order terms through two conversions


@pytest.mark.parametrize("method, protocol", [("wen", "per_image"), ("wen", "official"), ("be", "per_image")])
def test_mitigation_losses_are_equal(pair, method, protocol):
    settings = MitigationSettings(method, target_loss=0.0, lr=0.05, max_iters=2, protocol=protocol)
    mask = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) if method == "be" else None
    (batch_a, opt_a), (batch_b, opt_b) = (mitigate(m, PROMPT, [0, 1], SETTINGS, settings, mask) for m in pair)
    close(opt_b.losses, opt_a.losses)
    # AdamW divides by the root of the squared gradients: float32 rounding of small gradients grows in its steps
    close(opt_b.embedding, opt_a.embedding, rel=1e-4)
    close(batch_b.latents, batch_a.latents, rel=1e-4)
    assert (opt_a.iterations == 2).all() and torch.equal(opt_b.iterations, opt_a.iterations)  # both optimised


def test_the_conversion_adds_no_host_transfer_per_step():
    from benchmark.core.profiling import count_host_transfers
    from benchmark.models.text_to_image import tiny_sd2_v

    v_model = tiny_sd2_v()  # a v network itself (the wrapper above reads its timestep on the host)
    counts = {}
    for steps in (2, 5):
        with count_host_transfers() as seen:
            sample_with_capture(v_model, PROMPT, [0], SamplerSettings(steps=steps, height=32, width=32),
                                decode=False)
        counts[steps] = sum(seen.values())
    assert counts[2] == counts[5], counts


def _official_sd2(model: TextToImage, seeds: list[int], low_index: int = -3) -> dict[str, np.ndarray]:
    """The official SD 2 branch, written from memorization-anisotropy and sharpness_memorization_diffusion's
    ``local_model/pipe.py`` (``sd_ver == 2``) on the raw network output v: score ``(sqrt(abar) v - x) / (1 - abar)``;
    anisotropy's norm of the score difference at the first step and ``cos(v_u, v_c - v_u)`` (dim 1, mean per
    image) at ``timesteps[-3]``; SAIL's ``||(H_c - H_u)(s_c - s_u)||`` at the first step (k = 1)."""
    from torch.func import jvp

    from benchmark.sampling.capture import prepare_sampling

    setup = prepare_sampling(model, PROMPT, seeds, SETTINGS)
    x, context, steps = setup.latents, setup.context, setup.timesteps
    abar = model.scheduler.alphas_cumprod

    def v_of(y, t):
        return model.unet(torch.cat([y, y]), t, encoder_hidden_states=context).sample

    def score(y, t=steps[0]):
        return (abar[t].sqrt() * v_of(y, t) - torch.cat([y, y])) / (1 - abar[t])

    s_u, s_c = score(x).chunk(2)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _, hv = jvp(score, (x,), (s_c - s_u,))
    hv_u, hv_c = hv.chunk(2)
    v_u, v_c = v_of(x, steps[low_index]).chunk(2)
    cosine = torch.nn.functional.cosine_similarity(v_u, v_c - v_u, dim=1)
    return {"guidance_norm": (s_c - s_u).flatten(1).norm(dim=1).numpy(),
            "alignment": cosine.flatten(1).mean(1).numpy(), "sail": (hv_c - hv_u).flatten(1).norm(dim=1).numpy()}


def test_official_units_reproduce_the_official_sd2_branch_on_v(pair):
    """units=official on the v model: anisotropy's two terms and SAIL equal the official SD 2 formulas on its raw
    output; units=eps gives different numbers there (the norm by 1 / (1 - abar_t0), the cosine on v, not eps);
    on the epsilon model official and eps are one number (the official SD v1 branch is ours)."""
    eps_model, v_model = pair
    seeds = [0, 1]
    with torch.no_grad():
        want = _official_sd2(v_model, seeds)
    got = J.anisotropy(v_model, PROMPT, seeds, SETTINGS, units="official")
    close(got["guidance_norm"], want["guidance_norm"])
    close(got["alignment"], want["alignment"], rel=1e-4)
    close(J.sail(v_model, PROMPT, seeds, SETTINGS, units="official"), want["sail"], rel=1e-4)
    ours = J.anisotropy(v_model, PROMPT, seeds, SETTINGS)
    assert np.abs(ours["alignment"] - got["alignment"]).max() > 1e-3
    assert np.abs(ours["guidance_norm"] - got["guidance_norm"]).max() > 1e-4 * np.abs(ours["guidance_norm"]).max()
    official, ours = (J.anisotropy(eps_model, PROMPT, seeds, SETTINGS, units=u) for u in ("official", "eps"))
    assert all(np.array_equal(official[k], ours[k]) for k in ours)
    assert np.array_equal(J.sail(eps_model, PROMPT, seeds, SETTINGS, units="official"),
                          J.sail(eps_model, PROMPT, seeds, SETTINGS))
    with pytest.raises(ValueError, match="units='v': one of eps, official"):
        J.sail(v_model, PROMPT, seeds, SETTINGS, units="v")
