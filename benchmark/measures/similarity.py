"""How close a generation is to a training image (privacy) and to its prompt (utility).

- ``S`` / ``LS``: the BE paper's pixel similarity and its BE-masked version. The paper does not fix the pixel scale
  or the mask upsampling; here both are negative root-mean-square distances on the 0-255 scale (0 = identical), and
  ``LS`` weights each pixel's squared distance by the BE mask, upsampled bilinearly to the image, normalised by the
  mask's sum: for a binary mask it is exactly ``S`` inside the mask.
- ``SSCD``: cosine of L2-normalised SSCD descriptors, from a TorchScript file the user provides.
- ``CLIPScore``: 100 x cosine of open_clip image and text embeddings, from weights the user provides.
Images are (3, H, W) float arrays in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmark.registry import SIMILARITIES

SCALE = 255.0


def _upsample(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(size):
        return mask
    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


@SIMILARITIES.register("S", label="S (pixel)", needs_mask=False)
def pixel_S(image: np.ndarray, reference: np.ndarray) -> float:
    """Negative RMS pixel distance on the 0-255 scale."""
    return -float(np.sqrt(np.mean((image - reference) ** 2))) * SCALE


@SIMILARITIES.register("LS", label="LS (BE-masked pixel)", needs_mask=True)
def pixel_LS(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """``S`` with every pixel weighted by the (upsampled, non-negative) mask."""
    weights = np.clip(_upsample(mask, image.shape[-2:]), 0, None)
    if weights.sum() <= 0:
        raise ValueError("LS needs a mask with positive weight somewhere")
    sq = ((image - reference) ** 2).mean(axis=0)
    return -float(np.sqrt((weights * sq).sum() / weights.sum())) * SCALE


def _load_file(path: str | Path | None, what: str, hint: str) -> Path:
    if not path:
        raise FileNotFoundError(f"{what}: no file configured ({hint})")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path} ({hint})")
    return path


def _resize_crop(images: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """Shorter side to ``resize`` (antialiased bilinear), then the central ``crop`` square."""
    h, w = images.shape[-2:]
    scale = resize / min(h, w)
    images = F.interpolate(images, size=(round(h * scale), round(w * scale)), mode="bilinear",
                           align_corners=False, antialias=True)
    h, w = images.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[..., top:top + crop, left:left + crop]


class SSCD:
    """SSCD copy-detection descriptors (Pizzi et al. 2022) from a TorchScript file, e.g. sscd_disc_mixup.torchscript.pt.

    Preprocessing as the memorization papers use it: resize 256, centre crop 224, normalise with mean = std = 0.5.
    """

    HINT = "download sscd_disc_mixup.torchscript.pt from facebookresearch/sscd-copy-detection and set its path"

    def __init__(self, path: str | Path | None, device: str = "cpu"):
        self.model = torch.jit.load(str(_load_file(path, "SSCD", self.HINT)), map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, np.float32), device=self.device)
        x = (_resize_crop(x, 256, 224) - 0.5) / 0.5
        return F.normalize(self.model(x).float(), dim=-1)

    def similarity(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        """Per pair (images[i], references[i]): cosine of the descriptors, in [-1, 1]."""
        return (self.embed(images) * self.embed(references)).sum(-1).cpu().numpy()


class CLIPScore:
    """Prompt fidelity: 100 x cosine(image, text) with an open_clip model whose weights the user provides."""

    HINT = "e.g. ViT-H-14 weights from laion/CLIP-ViT-H-14-laion2B-s32B-b79K (open_clip_pytorch_model.bin)"

    def __init__(self, architecture: str, weights: str | Path | None, device: str = "cpu"):
        path = _load_file(weights, "CLIP score", self.HINT)
        try:
            import open_clip
        except ImportError as err:
            raise ImportError(f"CLIP score needs open_clip_torch and torchvision installed ({err})") from None
        self.model = open_clip.create_model(architecture, pretrained=str(path), device=device).eval()
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.size = self.model.visual.image_size
        self.size = self.size[0] if isinstance(self.size, (tuple, list)) else self.size
        self.mean = torch.tensor(self.model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        self.std = torch.tensor(self.model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        self.device = device

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        x = _resize_crop(torch.as_tensor(np.asarray(images, np.float32)), self.size, self.size)
        x = ((x - self.mean) / self.std).to(self.device)
        image = F.normalize(self.model.encode_image(x).float(), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)
        return (100 * (image * text).sum(-1)).cpu().numpy()
