"""SAIL, anisotropy and curvature maps: exact values on constructed inputs, then shapes/determinism on tiny models."""
import numpy as np
import pytest
import torch

from benchmark.detectors import jacobian
from benchmark.models.text_to_image import tiny_text_to_image
from benchmark.sampling.capture import SamplerSettings, initial_noise

PROMPT = "Mothers influence on her young hippo"


# ------------------------------------------------------------------------------- constructed inputs

def linear_eps(A0, A1, b):
    """eps(x, c) = (A0 + c A1) x + c b on flattened latents; the context is the scalar c per image (0 = uncond)."""
    def eps(x, t, context):
        c = context.reshape(len(x), 1)
        flat = x.flatten(1)
        return (flat @ A0.T + c * (flat @ A1.T) + c * b).view_as(x)
    return eps


def test_sail_step_equals_closed_form_on_a_linear_unet():
    torch.manual_seed(0)
    n, shape = 3, (2, 3, 3)
    d = int(np.prod(shape))
    A0, A1 = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64)
    x = torch.randn(n, *shape, dtype=torch.float64)
    context = torch.cat([torch.zeros(n, 1, 1), torch.ones(n, 1, 1)]).double()
    sigma = 0.7
    values, eps = jacobian.sail_step(linear_eps(A0, A1, b), x, torch.tensor(10), context, sigma)
    # H_c - H_u = -A1 / sigma, s_c - s_u = -(A1 x + b) / sigma
    expected = ((x.flatten(1) @ A1.T + b) @ A1.T).norm(dim=1) / sigma**2
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=0)
    eps_u, eps_c = eps.chunk(2)
    torch.testing.assert_close(eps_u.flatten(1), x.flatten(1) @ A0.T)
    torch.testing.assert_close((eps_c - eps_u).flatten(1), x.flatten(1) @ A1.T + b)


def test_anisotropy_terms_on_constructed_vectors():
    torch.manual_seed(0)
    u = torch.randn(2, 4, 5, 5)
    aligned = torch.cat([u, 3 * u])  # eps_c - eps_u = 2 u: cosine 1 everywhere
    opposed = torch.cat([u, 0.5 * u])  # eps_c - eps_u = -0.5 u: cosine -1
    g = torch.randn(2, 4, 5, 5)
    norm, alignment = jacobian.anisotropy_terms(torch.cat([u, u + g]), aligned)
    torch.testing.assert_close(norm, g.flatten(1).norm(dim=1))  # the norm comes from the first timestep only
    torch.testing.assert_close(alignment, torch.ones(2))
    _, alignment = jacobian.anisotropy_terms(aligned, opposed)
    torch.testing.assert_close(alignment, -torch.ones(2))
    # orthogonal over channels at every pixel: cosine 0
    e0, e1 = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    e0[:, 0], e1[:, 1] = 1.0, 2.0
    _, alignment = jacobian.anisotropy_terms(aligned[:2], torch.cat([e0, e0 + e1]))
    assert alignment.item() == pytest.approx(0.0)
    assert jacobian.anisotropy_score(3.0, 0.5) == pytest.approx(3.0 + 2.0 * 0.5)  # official SD v1 weights 1 and 2


def test_hutchinson_is_exact_for_a_diagonal_jacobian():
    torch.manual_seed(0)
    scale = torch.randn(3, 2, 4, 4)
    x = torch.randn(3, 2, 4, 4)
    probes = jacobian.rademacher_probes([0, 1, 2], 3, (2, 4, 4))
    diag = jacobian.hutchinson_diagonal(lambda y: scale * y + y**2, x, probes)  # J = diag(scale + 2x)
    torch.testing.assert_close(diag, scale + 2 * x)


def test_hutchinson_on_a_dense_jacobian_is_within_its_stated_error():
    torch.manual_seed(0)
    d, k = 32, 64
    M = torch.randn(d, d, dtype=torch.float64)
    x = torch.randn(2, d, dtype=torch.float64)
    probes = jacobian.rademacher_probes([5, 6], k, (d,)).double()
    diag = jacobian.hutchinson_diagonal(lambda y: y @ M.T, x, probes).double()
    sd = ((M**2).sum(0) - M.diag() ** 2).sqrt() / k**0.5  # entry i: sqrt(sum_{j != i} M_ji^2 / k)
    assert ((diag - M.diag()).abs() <= 4 * sd).all()
    many = jacobian.hutchinson_diagonal(lambda y: y @ M.T, x, jacobian.rademacher_probes([5, 6], 4096, (d,)).double())
    assert (many.double() - M.diag()).abs().max() < (diag.double() - M.diag()).abs().max()  # converges with k


def test_rademacher_probes_depend_on_their_seed_alone():
    a = jacobian.rademacher_probes([3, 7], 4, (2, 3))
    b = jacobian.rademacher_probes([7], 4, (2, 3))
    assert a.shape == (4, 2, 2, 3)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a[:, 1], b[:, 0])
    assert not torch.equal(a, jacobian.rademacher_probes([3, 7], 4, (2, 3), probe_seed=1))
    with pytest.raises(ValueError, match="probes"):
        jacobian.rademacher_probes([0], 0, (2,))


def _official_probes(seed: int, k: int, shape: tuple[int, ...], device: str) -> torch.Tensor:
    """The official draw, line for line (mem-curv-diff @ 42a30d4): utils/optim_utils.py ``set_random_seed(seed)``,
    then ``compute_diag_h_diff_only``'s latents (own generator, fp16) and k times ``rademacher_like(latents)``."""
    torch.manual_seed(seed + 0)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed + 1)
        torch.cuda.manual_seed_all(seed + 2)
        torch.cuda.manual_seed_all(seed + 4)
    latents = torch.randn((1, *shape), device=device, dtype=torch.float16,
                          generator=torch.Generator(device=device).manual_seed(seed))
    return torch.stack([torch.empty_like(latents).bernoulli_(0.5).mul_(2).sub_(1)[0] for _ in range(k)]).float()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the official CUDA draw needs a GPU"))])
def test_official_probe_seeding_reproduces_the_official_draws(device):
    state = torch.random.get_rng_state()
    try:
        expected = [_official_probes(seed, 3, (4, 8, 8), device) for seed in (0, 42)]
    finally:
        torch.random.set_rng_state(state)
    got = jacobian.rademacher_probes([0, 42], 3, (4, 8, 8), seeding="official", device=device)
    assert got.shape == (3, 2, 4, 8, 8) and got.device.type == device
    for i, probes in enumerate(expected):
        assert torch.equal(got[:, i], probes)
    assert torch.equal(got[:, 1], jacobian.rademacher_probes([42], 3, (4, 8, 8), seeding="official",
                                                             device=device)[:, 0])
    assert not torch.equal(got, jacobian.rademacher_probes([0, 42], 3, (4, 8, 8), device=device))  # not the default's
    with pytest.raises(ValueError, match="probe seeding 'global' is not one of per_image, official"):
        jacobian.rademacher_probes([0], 1, (2,), seeding="global")


def test_curvature_from_diagonal_negates_the_score_curvature_and_clips():
    diag = torch.tensor([[[[1.0, -3.0]], [[2.0, 1.0]]]])  # (1, 2 channels, 1, 2): channel sums 3, -2
    assert jacobian.curvature_from_diagonal(diag).tolist() == [[[3.0, 0.0]]]


def test_score_difference_map_reads_one_step_of_delta_sq():
    delta_sq = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(jacobian.score_difference_map(delta_sq), delta_sq[:, 2])
    np.testing.assert_array_equal(jacobian.score_difference_map(delta_sq, 0, 0.5), delta_sq[:, 0] * 2)
    with pytest.raises(ValueError, match="outside"):
        jacobian.score_difference_map(delta_sq, 3)
    with pytest.raises(ValueError, match="delta_sq"):
        jacobian.score_difference_map(delta_sq[0])


# ------------------------------------------------------------------------------------- tiny models

SETTINGS = SamplerSettings(steps=4, guidance=7.5, height=16, width=16)


@pytest.fixture(scope="module")
def tiny64():
    return tiny_text_to_image(seed=0).to("cpu", torch.float64)


def test_sail_matches_finite_differences_on_the_tiny_model(tiny64):
    """The JVP through diffusers' UNet (math attention) against a central difference, in float64."""
    value = jacobian.sail(tiny64, PROMPT, [3], SETTINGS, k=1)
    m, sched = tiny64, tiny64.scheduler
    sched.set_timesteps(SETTINGS.steps)
    t = sched.timesteps[0]
    sigma = jacobian.sigma_at(sched, t)
    context = torch.cat([m.encode([""]), m.encode([PROMPT])])
    x = initial_noise(m, [3], SETTINGS)

    def score(y):
        return -m.unet(torch.cat([y, y]), t, encoder_hidden_states=context).sample / sigma

    with torch.no_grad():
        s_u, s_c = score(x).chunk(2)
        h = 1e-5
        fd_u, fd_c = ((score(x + h * (s_c - s_u)) - score(x - h * (s_c - s_u))) / (2 * h)).chunk(2)
    expected = (fd_c - fd_u).flatten(1).norm(dim=1)
    np.testing.assert_allclose(value, expected.numpy(), rtol=1e-5)


def test_sail_on_the_tiny_model_is_finite_per_image_and_seed_determined(tiny_model):
    both = jacobian.sail(tiny_model, PROMPT, [0, 1], SETTINGS, k=2)
    assert both.shape == (2,) and np.isfinite(both).all() and (both > 0).all()
    np.testing.assert_allclose(jacobian.sail(tiny_model, PROMPT, [1], SETTINGS, k=2), both[1:], rtol=1e-4)
    assert not np.allclose(jacobian.sail(tiny_model, PROMPT, [0], SETTINGS, k=1), both[:1])  # k changes the mean
    with pytest.raises(ValueError, match="k=5"):
        jacobian.sail(tiny_model, PROMPT, [0], SETTINGS, k=5)
    with pytest.raises(ValueError, match="no seeds"):
        jacobian.sail(tiny_model, PROMPT, [], SETTINGS)


def test_anisotropy_on_the_tiny_model(tiny_model):
    out = jacobian.anisotropy(tiny_model, PROMPT, [0, 1], SETTINGS)
    assert set(out) == {"anisotropy", "guidance_norm", "alignment"}
    assert all(v.shape == (2,) and np.isfinite(v).all() for v in out.values())
    assert (np.abs(out["alignment"]) <= 1).all() and (out["guidance_norm"] > 0).all()
    np.testing.assert_allclose(out["anisotropy"], out["guidance_norm"] + 2 * out["alignment"], rtol=1e-6)
    one = jacobian.anisotropy(tiny_model, PROMPT, [1], SETTINGS, gamma_norm=0.0, gamma_cos=1.0)
    np.testing.assert_allclose(one["anisotropy"], out["alignment"][1:], rtol=1e-4)
    with pytest.raises(ValueError, match="low-noise"):
        jacobian.anisotropy(tiny_model, PROMPT, [0], SETTINGS, low_noise_index=4)


def test_curvature_map_on_the_tiny_model(tiny_model):
    maps = jacobian.curvature_map(tiny_model, PROMPT, [0, 1], SETTINGS, probes=4)
    assert maps.shape == (2, *tiny_model.latent_shape(16, 16)[1:])  # (2, 8, 8)
    assert np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0
    again = jacobian.curvature_map(tiny_model, PROMPT, [1], SETTINGS, probes=4)
    np.testing.assert_allclose(again, maps[1:], rtol=1e-4, atol=1e-7)
    assert not np.allclose(jacobian.curvature_map(tiny_model, PROMPT, [1], SETTINGS, probes=4, probe_seed=9), again)
    assert jacobian.curvature_score(maps).shape == (2,)
    # against itself as the baseline the conditional difference vanishes: the map is exactly zero
    assert (jacobian.curvature_map(tiny_model, PROMPT, [0], SETTINGS, probes=2, baseline=tiny_model) == 0).all()
    other = tiny_text_to_image(seed=1)
    assert jacobian.curvature_map(tiny_model, PROMPT, [0], SETTINGS, probes=2, baseline=other).max() > 0
    with pytest.raises(ValueError, match="curvature step"):
        jacobian.curvature_map(tiny_model, PROMPT, [0], SETTINGS, step=4)


@pytest.mark.slow
def test_sail_and_anisotropy_on_sd14_architecture_at_512px():
    """SD v1-4's UNet (random weights) at 512 px, one image: the JVP runs through all 32 attention layers."""
    import time

    from benchmark.models.text_to_image import sd14_architecture

    model = sd14_architecture()  # with its VAE: without one the model counts as pixel space (a 512x512 latent)
    assert model.latent_shape(512, 512) == (4, 64, 64)
    settings = SamplerSettings(steps=50, guidance=7.5, height=512, width=512)
    start = time.perf_counter()
    sharp = jacobian.sail(model, PROMPT, [0], settings, k=1)
    mid = time.perf_counter()
    aniso = jacobian.anisotropy(model, PROMPT, [0], settings)
    end = time.perf_counter()
    print(f"SD v1-4 architecture, 512 px, CPU: SAIL k=1 {mid - start:.1f} s, anisotropy {end - mid:.1f} s")
    assert sharp.shape == (1,) and np.isfinite(sharp).all()
    assert all(v.shape == (1,) and np.isfinite(v).all() for v in aniso.values())


def test_cost_ratio_harness_and_the_bench_functions(tiny_model):
    import time

    from benchmark.sampling.capture import sample_with_capture
    from runners.bench import alternate, anisotropy_cost_ratio

    fast, slow = alternate([lambda: time.sleep(0.02), lambda: time.sleep(0.04)], 3, lambda: None)
    assert 1.3 < slow / fast < 3.0
    settings = SamplerSettings(steps=3, guidance=7.5, height=16, width=16)
    ratio = anisotropy_cost_ratio(tiny_model, lambda: sample_with_capture(tiny_model, PROMPT, [0], settings,
                                                                          record=False), settings, [0], repeats=1)
    assert np.isfinite(ratio) and ratio > 0
