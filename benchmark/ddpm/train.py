"""Train a small unconditional DDPM on a small data set with duplicated images: memorization with known sources.

``source: digits`` uses scikit-learn's handwritten digits (they ship inside the package: trains on 2 CPU cores);
a folder of images (CelebA, Oxford Flowers) runs the same procedure on a GPU. Of ``n_train`` images, the first
``duplicated`` appear ``copies`` times each. The model folder keeps its unique training images and which were
duplicated (``training_set.npz``), so measurement needs nothing else. Deterministic from the seeds; resumable.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from tqdm.auto import tqdm

from benchmark.core.config_types import Channels, Count, Fraction, Name, Positive, PositiveInt, Seed
from benchmark.core.training import Trainer
from benchmark.ddpm.models import DDPM, save_ddpm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class DDPMData:
    source: Name = "digits"  # "digits" or a folder of images
    resolution: PositiveInt = 16
    n_train: PositiveInt = 300  # training-set size (unique images, after a seeded shuffle)
    duplicated: Count = 10  # how many of them are duplicated ...
    copies: PositiveInt = 30  # ... and how many times each appears
    seed: Seed = 0


@dataclass
class DDPMArchitecture:
    block_out_channels: Channels = (32, 64)
    layers_per_block: PositiveInt = 1


@dataclass
class DDPMTraining:
    steps: PositiveInt = 3000
    batch_size: PositiveInt = 64
    lr: Positive = 1e-3
    warmup: Count = 50
    ema_decay: Fraction = 0.995
    checkpoint_every: PositiveInt = 250
    seed: Seed = 0


@dataclass
class DDPMSpec:
    data: DDPMData = field(default_factory=DDPMData)
    architecture: DDPMArchitecture = field(default_factory=DDPMArchitecture)
    training: DDPMTraining = field(default_factory=DDPMTraining)


def load_images(source: str | Path, resolution: int, limit: int | None = None) -> np.ndarray:
    """(n, C, H, W) float32 in [0, 1]: scikit-learn's digits (C = 1), or a folder's images (C = 3; centre square,
    resized), in sorted file order."""
    if str(source) == "digits":
        from sklearn.datasets import load_digits

        x = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]
        return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).numpy()
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {source}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"image folder {source} has no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for path in files:
        try:
            image = Image.open(path).convert("RGB")
        except OSError as err:
            raise ValueError(f"unreadable image {path}: {err}") from None
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        out.append(np.asarray(image, np.float32).transpose(2, 0, 1) / 255)
    return np.stack(out)


def training_set(data: DDPMData) -> tuple[np.ndarray, np.ndarray]:
    """The unique training images and whether each is duplicated."""
    if not data.source:
        raise ValueError("DDPM data: no image folder set (data.source, e.g. the CELEBA_DIR / FLOWERS_DIR variable)")
    if data.duplicated > data.n_train or data.copies < 1:
        raise ValueError(f"DDPM data: duplicated ({data.duplicated}) must be <= n_train ({data.n_train}), copies >= 1")
    images = load_images(data.source, data.resolution)
    if len(images) < data.n_train:
        raise ValueError(f"DDPM data {data.source}: {len(images)} images, fewer than n_train={data.n_train}")
    order = np.random.default_rng(data.seed).permutation(len(images))[:data.n_train]
    return images[order], np.arange(data.n_train) < data.duplicated


def build_unet(channels: int, resolution: int, arch: DDPMArchitecture, seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    n = len(arch.block_out_channels)
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels,
                       layers_per_block=arch.layers_per_block, block_out_channels=arch.block_out_channels,
                       norm_num_groups=min(32, arch.block_out_channels[0]),
                       down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1))


def train_ddpm(spec: DDPMSpec, folder: str | Path, progress: bool = True) -> Path:
    """Train (or resume) the DDPM folder ``folder``; the resumable state lives beside it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cfg = spec.training
    unique, duplicated = training_set(spec.data)
    repeats = np.where(duplicated, spec.data.copies, 1)
    images = torch.from_numpy(np.repeat(unique, repeats, axis=0)) * 2 - 1
    unet = build_unet(images.shape[1], spec.data.resolution, spec.architecture, cfg.seed).train()
    noise_schedule = DDPMScheduler(num_train_timesteps=1000)
    trainer = Trainer(unet, cfg.steps, cfg.lr, cfg.warmup, cfg.ema_decay, cfg.seed,
                      folder.with_name(folder.name + ".checkpoint.pt"), cfg.checkpoint_every)
    generator = trainer.generator
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not progress, desc="DDPM training")
    while not trainer.done:
        x0 = images[torch.randint(len(images), (cfg.batch_size,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(1000, (cfg.batch_size,), generator=generator)
        loss = F.mse_loss(unet(noise_schedule.add_noise(x0, noise, t), t).sample, noise)
        trainer.update(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    unet = trainer.finish()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_ddpm(DDPM("trained", unet, noise_schedule), tmp)
    np.savez_compressed(tmp / "training_set.npz", images=(unique * 255).round().astype(np.uint8),
                        duplicated=duplicated)
    (tmp / "ddpm_spec.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def read_training_set(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The unique training images (float in [0, 1]) and duplicated flags saved in a trained DDPM folder."""
    path = Path(folder) / "training_set.npz"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no training_set.npz: set the training data folder to measure against")
    with np.load(path) as f:
        return f["images"].astype(np.float32) / 255, f["duplicated"]
