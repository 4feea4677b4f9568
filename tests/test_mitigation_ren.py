"""Ren et al.'s cross-attention re-weighting (benchmark/mitigation/attention.py) against hand values and against the
official formula re-expressed on diffusers' attention layout (MemAttn refactored_attention_processor.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.mitigation.attention import (
    RenSettings,
    kept_tokens,
    ren_attention,
    ren_attention_probs,
    require_cross_attention,
)
from benchmark.sampling.capture import SamplerSettings, cross_attention_layers, sample_with_capture

SETTINGS = SamplerSettings(steps=3, height=8, width=8)
PROMPTS = ["a red circle", "a photo of a cat on a mat"]


def test_probs_by_hand():
    # one image: row 0 unconditional, row 1 conditional; 1 head, 1 query, 4 tokens; keep the first 2
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]).view(2, 1, 1, 4)
    probs = ren_attention_probs(logits, torch.tensor([2]), c1=2.0)
    e = math.exp
    assert probs[0, 0, 0].tolist() == pytest.approx([e(1) / (e(1) + e(2)), e(2) / (e(1) + e(2)), 0, 0])
    # conditional: the start token's logit 1 becomes 2, the masked tokens stay at zero
    assert probs[1, 0, 0].tolist() == pytest.approx([0.5, 0.5, 0, 0])
    # no mask, c1 = 1: the plain softmax
    assert torch.allclose(ren_attention_probs(logits, None, 1.0), logits.softmax(-1))


def test_bad_inputs():
    with pytest.raises(ValueError, match="CFG batch"):
        ren_attention_probs(torch.zeros(3, 1, 1, 4), None, 1.0)
    with pytest.raises(ValueError, match="kept lengths"):
        ren_attention_probs(torch.zeros(4, 1, 1, 4), torch.tensor([1]), 1.0)
    with pytest.raises(ValueError, match="ren: c1"):
        RenSettings(c1=float("nan"))
    with pytest.raises(ValueError, match="mitigation ren.*no cross-attention"):
        require_cross_attention(torch.nn.Linear(2, 2), "ren")


def test_kept_tokens(tiny_model):
    ids = tiny_model.tokenizer(PROMPTS).input_ids
    assert kept_tokens(tiny_model, PROMPTS, RenSettings()).tolist() == [len(x) for x in ids]
    assert kept_tokens(tiny_model, PROMPTS, RenSettings(mask_end=True)).tolist() == [len(x) - 1 for x in ids]
    assert kept_tokens(tiny_model, PROMPTS, RenSettings(mask_summary=False)) is None


def official_attention(attn, hidden, context, prompt_length, c1):
    """MemAttn's AttnProcessor2_0 + my_simple_scaled_dot_product_attention, re-expressed in (B, heads, L, d): a
    boolean mask of the first prompt_length tokens for every row, the odd rows' (conditional, for one image per
    call) start-token logit times c1."""
    b = hidden.shape[0]
    q = attn.to_q(hidden).view(b, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
    k = attn.to_k(context).view(b, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
    v = attn.to_v(context).view(b, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
    mask = torch.zeros(context.shape[1], dtype=torch.bool)
    mask[:prompt_length] = True
    bias = torch.zeros(q.shape[2], k.shape[2]).masked_fill(~mask, float("-inf"))
    w = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias
    w[1::2, :, :, 0] = w[1::2, :, :, 0] * c1
    out = (w.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, attn.inner_dim)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None, None])
    return attn.to_out[1](attn.to_out[0](out)), sdpa


@torch.no_grad()
def test_processor_equals_official_formula(tiny_model):
    attn = next(iter(cross_attention_layers(tiny_model.unet).values()))
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    prompt = PROMPTS[1]
    context = torch.cat([tiny_model.encode([""]), tiny_model.encode([prompt])])
    length = len(tiny_model.tokenizer(prompt).input_ids)
    for settings in (RenSettings(c1=1.25), RenSettings(c1=1.0), RenSettings(c1=0.5)):
        expected, sdpa = official_attention(attn, hidden, context, length, settings.c1)
        with ren_attention(tiny_model, [prompt], settings):
            got = attn(hidden, encoder_hidden_states=context)
        assert torch.allclose(got, expected, atol=1e-6), settings
    # c1 = 1 is the official non-mitigated path: torch's attention with the boolean mask
    with ren_attention(tiny_model, [prompt], RenSettings(c1=1.0)):
        probs_path = attn(hidden, encoder_hidden_states=context)
    b = hidden.shape[0]
    sdpa = attn.to_out[0](sdpa.transpose(1, 2).reshape(b, -1, attn.inner_dim))
    assert torch.allclose(probs_path, sdpa, atol=1e-6)


@torch.no_grad()
def test_sampling_under_ren(tiny_model, same_up_to_float_order):
    originals = {k: m.processor for k, m in cross_attention_layers(tiny_model.unet).items()}
    plain = sample_with_capture(tiny_model, PROMPTS, [0, 1], SETTINGS, record=False)
    # no mask and c1 = 1 reproduce diffusers' attention: the same latents
    with ren_attention(tiny_model, PROMPTS, RenSettings(c1=1.0, mask_summary=False)):
        same = sample_with_capture(tiny_model, PROMPTS, [0, 1], SETTINGS, record=False)
    # up to float order (the processor's matmul-softmax vs SDPA differ by ~2e-6 of the latents' scale on some CPUs)
    same_up_to_float_order(same, plain)
    with ren_attention(tiny_model, PROMPTS, RenSettings()):
        mitigated = sample_with_capture(tiny_model, PROMPTS, [0, 1], SETTINGS)  # capture wraps Ren's processors
    assert (mitigated.latents - plain.cpu()).abs().max() > 1e-3
    # an image depends on its own prompt's lengths only, not on its batch
    with ren_attention(tiny_model, PROMPTS[1:], RenSettings()):
        alone = sample_with_capture(tiny_model, PROMPTS[1:], [1], SETTINGS, record=False)
    assert torch.allclose(alone.cpu(), mitigated.latents[1:], atol=1e-5)
    assert {k: m.processor for k, m in cross_attention_layers(tiny_model.unet).items()} == originals


@torch.no_grad()
def test_registered_on_the_interface(tiny_model):
    from benchmark.mitigation.interface import Mitigation, settings_for
    from benchmark.registry import MITIGATIONS

    entry = MITIGATIONS["ren"]
    assert (entry.acts_on, entry.strength, entry.stronger) == ("modules", "c1", "higher")
    setting = Mitigation.of("ren")
    assert setting.tag == "ren-c1.25" and setting.strength == 1.25
    assert [s.tag for s in settings_for("ren", [1.0, 1.5])] == ["ren-c1", "ren-c1.5"]
    for bad in (float("inf"), 0.0, -1.25):  # a factor <= 0 flips or zeroes the start token's logit
        with pytest.raises(ValueError, match="ren: c1 must be a finite number > 0"):
            Mitigation.of("ren", c1=bad)
    # through the one sampling loop: the same latents as the processor installed by hand
    with ren_attention(tiny_model, PROMPTS, RenSettings()):
        by_hand = sample_with_capture(tiny_model, PROMPTS, [0, 1], SETTINGS, record=False)
    batch = sample_with_capture(tiny_model, PROMPTS, [0, 1], SETTINGS, intervention=setting.intervention())
    assert torch.allclose(batch.latents, by_hand.cpu(), atol=1e-6)
    assert batch.token_attn and batch.delta_sq.shape[1] == SETTINGS.steps
