"""NeMo (benchmark/mitigation/neurons.py): selection, search and deactivation by hand; statistics and noise
differences against the official computations (1_compute_activations_statistics.py, compute_noise_diff)
re-expressed on the tiny model."""
import pytest
import torch

from benchmark.mitigation.neurons import (
    ActivationStatistics,
    NeMoSettings,
    activation_statistics,
    deactivated,
    find_neurons,
    max_pairwise_ssim,
    ms_ssim,
    neuron_counts,
    noise_differences,
    outlier_neurons,
    value_activations,
    value_layers,
)
from benchmark.sampling.capture import SamplerSettings, initial_noise

PROMPTS = ["a red circle", "a photo of a cat", "a dog on a mat", "a blue square at the top"]


def test_value_layers(tiny_model):
    # the tiny model's cross-attention: down_blocks.0.attentions.0, mid_block.attentions.0, up_blocks.1.* (not read)
    assert list(value_layers(tiny_model.unet)) == ["down_blocks.0.attentions.0", "mid_block.attentions.0"]
    with pytest.raises(ValueError, match="mitigation nemo: the model has no cross-attention value layers"):
        value_layers(torch.nn.Linear(2, 2))


def stats_of(mean, std):
    return ActivationStatistics({"A": torch.tensor(mean)}, {"A": torch.tensor(std)}, 10, "m")


def test_outliers_by_hand():
    stats = stats_of([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.1, 1.0])
    acts = {"A": torch.tensor([1.5, 7.0, 1.6, 3.0])}  # z = 0.5, 6, 6, 2
    assert outlier_neurons(acts, stats, theta=5, k=0) == {"A": [1, 2]}
    assert outlier_neurons(acts, stats, theta=5, k=2) == {"A": [1, 2, 3]}  # top-2 |a|: 1 (already in), 3
    assert outlier_neurons(acts, stats, theta=float("inf"), k=1) == {"A": [1]}
    assert neuron_counts({"A": [1, 2], "B": []}) == {"A": 2, "B": 0}


@torch.no_grad()
def test_statistics_equal_official(tiny_model, tmp_path):
    stats = activation_statistics(tiny_model, PROMPTS, source="four", batch=3)
    for name, to_v in value_layers(tiny_model.unet).items():
        per_prompt = []
        for p in PROMPTS:  # the official: one prompt at a time, to_v(text_embeddings)[0].abs().mean(dim=0)
            ids = tiny_model.tokenizer([p], padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids
            per_prompt.append(to_v(tiny_model.text_encoder(ids)[0])[0].abs().mean(dim=0).unsqueeze(0))
        acts = torch.cat(per_prompt, dim=0)
        assert torch.allclose(stats.mean[name], acts.mean(dim=0), atol=1e-6)
        assert torch.allclose(stats.std[name], acts.std(dim=0), atol=1e-6)
    back = ActivationStatistics.load(stats.save(tmp_path / "stats.safetensors"))
    assert back.prompts == 4 and back.source == "four" and all(torch.equal(back.std[k], stats.std[k]) for k in
                                                               stats.std)
    back.check(tiny_model)
    with pytest.raises(ValueError, match="mitigation nemo: activation statistics of 'm'"):
        stats_of([1.0], [1.0]).check(tiny_model)
    with pytest.raises(FileNotFoundError, match="mitigation nemo: no activation statistics"):
        ActivationStatistics.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="at least 2 prompts"):
        activation_statistics(tiny_model, PROMPTS[:1])


@torch.no_grad()
def test_deactivation(tiny_model):
    name, to_v = next(iter(value_layers(tiny_model.unet).items()))
    x = torch.randn(2, 5, to_v.in_features)
    plain = to_v(x)
    with deactivated(tiny_model, {name: [0, 3]}):
        off = to_v(x)
    with deactivated(tiny_model, {name: [3]}, factor=0.5):
        half = to_v(x)
    assert torch.equal(off[..., [0, 3]], torch.zeros(2, 5, 2)) and torch.equal(off[..., 1:3], plain[..., 1:3])
    assert torch.allclose(half[..., 3], plain[..., 3] * 0.5)
    assert torch.equal(to_v(x), plain)  # hooks removed
    with pytest.raises(ValueError, match="no value neuron"), deactivated(tiny_model, {name: [to_v.out_features]}):
        pass


@torch.no_grad()
def test_noise_differences_equal_official(tiny_model):
    sampler = SamplerSettings(steps=5, height=32, width=32)
    name = next(iter(value_layers(tiny_model.unet)))
    got = noise_differences(tiny_model, PROMPTS[1], [0, 1, 2], sampler, {name: [1, 2]})
    # compute_noise_diff with guidance_scale 0, early_stopping 1, RescaleLinearActivations hooks (factor 0)
    to_v = value_layers(tiny_model.unet)[name]

    def hook(module, args, out):
        out[:, :, [1, 2]] *= 0.0
        return out
    handle = to_v.register_forward_hook(hook)
    latents = initial_noise(tiny_model, [0, 1, 2], sampler)
    emb = tiny_model.encode([PROMPTS[1]]).repeat(3, 1, 1)
    tiny_model.scheduler.set_timesteps(5)
    for i, t in enumerate(tiny_model.scheduler.timesteps):
        noise_pred = tiny_model.unet(latents, t, encoder_hidden_states=emb).sample
        if i >= 1:
            d = noise_pred - latents
            lo, hi = d.amin(dim=[2, 3]), d.amax(dim=[2, 3])
            expected = (d - lo[..., None, None]) / (hi - lo)[..., None, None]
            break
        latents = tiny_model.scheduler.step(noise_pred, t, latents).prev_sample
    handle.remove()
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, noise_differences(tiny_model, PROMPTS[1], [0, 1, 2], sampler), atol=1e-4)
    assert max_pairwise_ssim(got, kernel=3).shape == (3,)
    with pytest.raises(ValueError, match="nemo: MS-SSIM with kernel 11"):
        ms_ssim(got, got)


def test_search_by_hand():
    """A prompt memorized through neuron A[3] alone: A[5] and layer B's outlier are found first, then refined away."""
    torch.manual_seed(0)
    base = torch.rand(1, 1, 16, 16)
    memorized = base + 0.01 * torch.rand(4, 1, 16, 16)  # every seed alike: the prompt is memorized
    scattered = torch.rand(4, 1, 16, 16)  # unlike the undisturbed differences

    def difference(neurons):
        return scattered if neurons and 3 in neurons.get("A", []) else memorized

    stats = ActivationStatistics({"A": torch.zeros(8), "B": torch.zeros(4)},
                                 {"A": torch.ones(8), "B": torch.ones(4)}, 100, "m")
    acts = {"A": torch.tensor([0, 0, 0, 10.0, 0, 6.0, 0, 0]), "B": torch.tensor([0, 7.0, 0, 0])}
    found = find_neurons(difference, acts, stats, NeMoSettings(ssim_kernel=3, samples=4))
    assert found.looked_at.all()
    assert found.initial == {"A": [3, 5], "B": [1]}
    assert found.refined == {"A": [3], "B": []}
    assert found.rounds[0][:2] == (5.0, 0) and found.refined_ssim <= 0.428
    # no neuron helps: k reaches the widest layer (8) first, after 8 rounds
    stuck = find_neurons(lambda n: memorized, acts, stats, NeMoSettings(ssim_kernel=3, samples=4))
    assert stuck.rounds[-1][:2] == (3.25, 7) and len(stuck.rounds) == 8
    # ... or theta reaches 1 first (16 rounds of 0.25) when the layers are wider
    wide = ActivationStatistics({"A": torch.zeros(20)}, {"A": torch.ones(20)}, 100, "m")
    stuck = find_neurons(lambda n: memorized, {"A": torch.zeros(20)}, wide, NeMoSettings(ssim_kernel=3, samples=4))
    assert stuck.rounds[-1][:2] == (1.25, 15) and len(stuck.rounds) == 16
    # not memorized: no seed is like another, no neurons
    free = find_neurons(lambda n: scattered, acts, stats, NeMoSettings(ssim_kernel=3, samples=4))
    assert free.refined == {"A": [], "B": []} and free.evaluations == 1


@torch.no_grad()
def test_registered_on_the_interface(tiny_model, tmp_path, same_up_to_float_order):
    from benchmark.mitigation.interface import Mitigation
    from benchmark.sampling.capture import sample_with_capture

    with pytest.raises(ValueError, match="mitigation nemo-f0-statsnone: needs activation statistics"):
        Mitigation.of("nemo").check_model(tiny_model)
    with pytest.raises(ValueError, match="mitigation nemo.*no activation statistics at"):
        Mitigation.of("nemo", statistics=str(tmp_path / "none.safetensors")).check_model(tiny_model)
    path = activation_statistics(tiny_model, PROMPTS, source="four").save(tmp_path / "stats.safetensors")
    # every seed looked at, two rounds (theta 5, 4.75) and a target the random model's neurons never reach: the
    # refinement then keeps what changes the differences at all
    knobs = {"statistics": str(path), "samples": 2, "ssim_kernel": 3, "pairwise_threshold": 0.0,
             "initial_threshold": 0.99, "refinement_threshold": 0.99, "min_theta": 4.75, "initial_k": 1}
    setting = Mitigation.of("nemo", **knobs)
    setting.check_model(tiny_model)
    assert setting.tag.startswith("nemo-f0-stats") and setting.strength == 0.0
    assert Mitigation.of("nemo", **{**knobs, "samples": 3}).tag != setting.tag  # every knob is in the key
    sampler = SamplerSettings(steps=2, height=32, width=32)
    stats = ActivationStatistics.load(path)
    settings = NeMoSettings(**{k: v for k, v in knobs.items() if k != "statistics"})
    p = PROMPTS[1]
    intervention = setting.intervention()
    got = sample_with_capture(tiny_model, p, [0, 1], sampler, intervention=intervention)
    counts = intervention.stats["neurons"]
    assert counts.shape == (2,) and counts.min() > 0 and counts[0] == counts[1]
    assert sum(intervention.stats[f"neurons/{k}"] for k in value_layers(tiny_model.unet)).tolist() == counts.tolist()
    # the official: the search, then its neurons' to_v outputs zeroed in place for the whole CFG batch
    acts = {k: v[0] for k, v in value_activations(tiny_model, [p]).items()}
    found = find_neurons(lambda n: noise_differences(tiny_model, p, [1, 2], sampler, n), acts, stats, settings)
    assert sum(map(len, found.refined.values())) == counts[0]
    handles = []
    for layer, idx in found.refined.items():
        def hook(module, args, out, idx=idx):
            out[:, :, idx] *= 0.0
            return out
        handles.append(value_layers(tiny_model.unet)[layer].register_forward_hook(hook))
    want = sample_with_capture(tiny_model, p, [0, 1], sampler).latents  # recorded too: the same attention kernel
    for h in handles:
        h.remove()
    same_up_to_float_order(got.latents, want, rel=1e-6)
    plain = sample_with_capture(tiny_model, p, [0, 1], sampler).latents
    assert (got.latents - plain).abs().max() > 1e-3


def test_the_job_without_statistics_fails_before_sampling(tmp_path, compose):
    from runners.mitigate import run

    cfg = compose("mitigate", "debug=default", "mitigation.methods=[wen,nemo]", "headline.method=wen")
    with pytest.raises(ValueError, match="mitigation nemo-f0-statsnone: needs activation statistics"):
        run(cfg, tmp_path / "job")
    assert not (tmp_path / "artifacts").exists()  # nothing sampled
