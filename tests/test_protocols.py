"""The options that reproduce the official scripts: sampler.seeding=official, mitigation.protocol=official."""
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from benchmark.data.prompts import Prompt, PromptSet
from benchmark.detectors.detection import generate, plan, sampler_key
from benchmark.mitigation.embedding import (
    MitigationSettings,
    batch_loss,
    magnitude_loss,
    mitigate,
    optimise_shared_embedding,
)
from benchmark.sampling.capture import SamplerSettings, image_seeds, initial_noise, sample_with_capture
from benchmark.store.traces import TraceStore

PROMPT = "Mothers influence on her young hippo"
OFFICIAL = SamplerSettings(steps=3, guidance=7.5, height=32, width=32, seeding="official", gen_seed=3)


def _wen_set_random_seed(seed):
    """The torch part of Wen's optim_utils.set_random_seed (their scripts call it with prompt index + gen_seed)."""
    torch.manual_seed(seed + 0)
    torch.cuda.manual_seed(seed + 1)
    torch.cuda.manual_seed_all(seed + 2)
    torch.cuda.manual_seed_all(seed + 4)


def test_official_seeding_is_the_scripts_global_generator_draw(tiny_model):
    shape = (4, *tiny_model.latent_shape(32, 32))
    sigma = tiny_model.scheduler.init_noise_sigma
    with torch.random.fork_rng():
        _wen_set_random_seed(5 + 3)  # prompt index 5, --gen_seed 3
        # what the pipeline's prepare_latents does with generator=None, num_images_per_prompt=4
        expected = randn_tensor(shape, generator=None, device=tiny_model.device, dtype=tiny_model.dtype) * sigma
    state = torch.get_rng_state()
    assert torch.equal(initial_noise(tiny_model, [0, 1, 2, 3], OFFICIAL, prompt_index=5), expected)
    assert torch.equal(initial_noise(tiny_model, [2, 3], OFFICIAL, prompt_index=5), expected[2:])
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert not torch.equal(initial_noise(tiny_model, [0], OFFICIAL, prompt_index=6), expected[:1])
    with pytest.raises(ValueError, match="prompt index"):
        initial_noise(tiny_model, [0], OFFICIAL)
    # the default is unchanged: a CPU generator per image seed
    per_image = initial_noise(tiny_model, [7], SamplerSettings(height=32, width=32))
    assert torch.equal(per_image[0], torch.randn(shape[1:], generator=torch.Generator().manual_seed(7)) * sigma)


def test_seeding_settings_and_store_keys():
    default = SamplerSettings(steps=50, guidance=7.5, height=512, width=512)
    assert sampler_key(default, "float16") == "ddim50-g7.5-512x512-eta0-float16"  # existing stores stay valid
    official = SamplerSettings(steps=50, guidance=7.5, height=512, width=512, seeding="official", gen_seed=0)
    assert sampler_key(official, "float16") == "ddim50-g7.5-512x512-eta0-float16-official0-fullindex"
    assert image_seeds(SamplerSettings(gen_seed=10), 3) == [10, 11, 12]
    assert image_seeds(SamplerSettings(seeding="official", gen_seed=10), 3) == [0, 1, 2]  # rows of the batch
    with pytest.raises(ValueError, match="seeding 'global'"):
        SamplerSettings(seeding="global")


def test_generate_uses_each_prompts_index(tiny_model, tmp_path):
    prompts = PromptSet("p", [Prompt("a", "a red ball", True), Prompt("b", PROMPT, False)])
    store = TraceStore(tmp_path)
    gens = plan(prompts, "tiny", sampler_key(OFFICIAL, "float32"), [0, 1])
    assert [g.index for g in gens] == [0, 1]
    assert generate(tiny_model, gens, OFFICIAL, store, batch_size=1) == 4
    direct = sample_with_capture(tiny_model, PROMPT, [0, 1], OFFICIAL, prompt_index=1)
    torch.testing.assert_close(torch.from_numpy(store.read(gens[1].key, 1).latent), direct.latents[1],
                               atol=1e-3, rtol=1e-3)  # float16 storage


def _first_step(model, n, settings=OFFICIAL):
    cond = model.encode([PROMPT]).expand(n, -1, -1)
    uncond = model.encode([""]).expand(n, -1, -1)
    model.scheduler.set_timesteps(settings.steps)
    return cond, uncond, initial_noise(model, list(range(n)), settings, 0), model.scheduler.timesteps[0]


def test_batch_loss_is_the_root_sum_square_of_per_image_losses():
    delta = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(batch_loss(delta)) == pytest.approx(float(magnitude_loss(delta).pow(2).sum().sqrt()))
    mask = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
    weighted = magnitude_loss(delta, mask, "batch")  # per image ||d m|| / batch mean(m)
    assert float(batch_loss(delta, mask)) == pytest.approx(float(weighted.pow(2).sum().sqrt()))


def test_official_protocol_shares_one_embedding(tiny_model):
    cond, uncond, latents, t = _first_step(tiny_model, 4)
    settings = MitigationSettings("wen", 0.0, max_iters=3, protocol="official")
    with torch.no_grad():
        eps_u = tiny_model.unet(latents, t, encoder_hidden_states=uncond).sample
        eps_c = tiny_model.unet(latents, t, encoder_hidden_states=cond).sample
    per_image = magnitude_loss(eps_c - eps_u)
    with torch.enable_grad():
        out = optimise_shared_embedding(tiny_model, cond, uncond, latents, t, settings)
    # its first loss is the root-sum-square of the per-image losses of the unmitigated embedding
    assert float(out.losses[0, 0]) == pytest.approx(float(per_image.pow(2).sum().sqrt()), rel=1e-5)
    assert out.losses.shape == (3, 4) and (out.iterations == 3).all()
    assert all(torch.equal(e, out.embedding[0]) for e in out.embedding)  # one embedding for the batch
    # the start token's gradient is zeroed, but AdamW's weight decay (0.01 * lr per step) still shrinks it
    start, start0 = out.embedding[0, 0], cond[0, 0]
    assert not torch.equal(start, start0)
    torch.testing.assert_close(start, start0 * (1 - 0.05 * 0.01) ** 3)


def test_official_protocol_stops_once_for_the_batch_and_keys_apart(tiny_model):
    cond, uncond, latents, t = _first_step(tiny_model, 2)
    with torch.enable_grad():
        out = optimise_shared_embedding(tiny_model, cond, uncond, latents, t,
                                        MitigationSettings("wen", 1e9, protocol="official"))
    assert out.losses.shape == (1, 2) and (out.iterations == 0).all()
    assert torch.equal(out.embedding, cond)  # stopped before any step
    official = MitigationSettings("be", 0.2, protocol="official")
    assert official.tag == "be-official-l0.2-lr0.05-it10"
    assert MitigationSettings("be", 0.2).tag == "be-l0.2-lr0.05-it10"  # the default's keys are unchanged
    with pytest.raises(ValueError, match="protocol 'shared'"):
        MitigationSettings("wen", 0.2, protocol="shared")


def test_official_mitigation_samples_from_the_official_noise(tiny_model):
    settings = MitigationSettings("wen", 0.0, max_iters=2, protocol="official")
    batch, opt = mitigate(tiny_model, PROMPT, [0, 1], OFFICIAL, settings, prompt_index=2)
    again = sample_with_capture(tiny_model, PROMPT, [0, 1], OFFICIAL, cond=opt.embedding, prompt_index=2)
    torch.testing.assert_close(batch.latents, again.latents)


def test_official_mitigation_runs_a_prompts_batch_at_once_and_reruns_from_the_store(tiny_model, tmp_path):
    from benchmark.mitigation.interface import Mitigation
    from benchmark.mitigation.tradeoff import mitigated_key, run_mitigation

    prompts = PromptSet("p", [Prompt("a", PROMPT, True, "global")])
    store = TraceStore(tmp_path)
    gens = plan(prompts, "tiny", sampler_key(OFFICIAL, "float32"), [0, 1, 2])
    settings = [Mitigation.of("wen", target_loss=0.0, max_iters=1, protocol="official")]
    # batch_size 1 is ignored by the official protocol: the three images share one embedding and one loss
    assert run_mitigation(tiny_model, gens, OFFICIAL, store, settings, ["*"], batch_size=1) == 6
    traces = [store.read(mitigated_key(gens[0].key, settings[0]), s) for s in (0, 1, 2)]
    assert len({t.meta["loss_first"] for t in traces}) == 1
    assert run_mitigation(tiny_model, gens, OFFICIAL, store, settings, ["*"], batch_size=1) == 0
