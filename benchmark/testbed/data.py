"""The testbed's data recipe: procedural captioned images with planted global and local memorization.

Categories (every caption is written in one grammar, so wording alone cannot tell them apart):
- ``unique``: a scene of shapes with the caption that describes it, seen once;
- ``global``: a caption repeated ``global_copies`` times with one fixed image (verbatim memorization);
- ``local``: a caption repeated ``local_copies`` times; every copy carries the same planted patch at the same place
  (its ground-truth mask) while the rest of the image is a fresh scene (template memorization);
- ``heldout``: captions never trained on, the negatives.
Memorized images do not depict their caption, so only memorization can reproduce them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from benchmark.core.config_types import Count, OpenFraction, PositiveInt, Seed

COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.05), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05),
    "cyan": (0.1, 0.85, 0.9), "pink": (1.0, 0.5, 0.75), "brown": (0.5, 0.3, 0.1), "grey": (0.5, 0.5, 0.5),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
POSITIONS = {  # name -> centre as a fraction of the image (row, col)
    "top left": (0.25, 0.25), "top": (0.25, 0.5), "top right": (0.25, 0.75), "left": (0.5, 0.25),
    "centre": (0.5, 0.5), "right": (0.5, 0.75), "bottom left": (0.75, 0.25), "bottom": (0.75, 0.5),
    "bottom right": (0.75, 0.75),
}


@dataclass
class Recipe:
    """Knobs of the data set. The defaults are the recipe measured in docs/testbed.md."""

    resolution: PositiveInt = 32
    n_unique: PositiveInt = 2400
    n_global: Count = 8
    global_copies: PositiveInt = 50
    n_local: Count = 12
    local_copies: PositiveInt = 100
    # side of the planted patch as a fraction of the image side (0.5 -> 25% of pixels)
    patch_fraction: OpenFraction = 0.5
    # the planted patch: "smooth" (soft random blobs) or "flat" (one random colour)
    patch: Literal["smooth", "flat"] = "flat"
    n_heldout: PositiveInt = 120
    seed: Seed = 0


@dataclass
class Item:
    caption: str
    category: str  # unique / global / local / heldout
    image: np.ndarray | None  # (3, H, W) in [0, 1]; None for held-out captions
    mask: np.ndarray | None  # (H, W) bool: the planted region of a local caption


def describe(rng: np.random.Generator) -> tuple[str, list[tuple[str, str, str]], str]:
    """A random scene: 1-2 shapes with colour and place on a background, and its caption."""
    n = rng.integers(1, 3)
    places = rng.choice(list(POSITIONS), size=n, replace=False)
    colours = list(COLOURS)
    objects = [(str(rng.choice(colours)), str(rng.choice(SHAPES)), str(p)) for p in places]
    background = str(rng.choice([c for c in colours if c not in {o[0] for o in objects}]))
    return caption_of(objects, background), objects, background


def caption_of(objects: list[tuple[str, str, str]], background: str) -> str:
    """The grammar's caption of a scene: its (colour, shape, place) objects in this order on a background."""
    words = " and ".join(f"a {c} {s} at the {p}" for c, s, p in objects)
    return f"{words} on a {background} background"


def parse_caption(caption: str) -> tuple[list[tuple[str, str, str]], str]:
    """The scene a caption of the grammar names (inverse of ``describe``): what the prompt asks for."""
    try:
        words, tail = caption.rsplit(" on a ", 1)
        background = tail.removesuffix(" background")
        objects = []
        for part in words.split(" and "):
            head, place = part.split(" at the ")
            _, colour, shape = head.split(" ")
            objects.append((colour, shape, place))
        if background not in COLOURS or any(c not in COLOURS or s not in SHAPES or p not in POSITIONS
                                             for c, s, p in objects):
            raise ValueError
    except ValueError:
        raise ValueError(f"not a testbed caption: {caption!r}") from None
    return objects, background


def render(objects, background: str, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw the scene; ``rng`` jitters sizes and places slightly so repeated descriptions differ."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.ones((3, size, size)) * np.array(COLOURS[background])[:, None, None]
    for colour, shape, place in objects:
        cy, cx = POSITIONS[place]
        r = 0.14
        if rng is not None:
            cy, cx, r = cy + rng.uniform(-0.04, 0.04), cx + rng.uniform(-0.04, 0.04), r * rng.uniform(0.85, 1.15)
        dy, dx = yy - cy, xx - cx
        inside = {
            "circle": dy**2 + dx**2 <= r**2,
            "square": (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85),
            "triangle": (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6),
            "diamond": np.abs(dy) + np.abs(dx) <= r * 1.1,
            "ring": (dy**2 + dx**2 <= r**2) & (dy**2 + dx**2 >= (0.55 * r) ** 2),
            "cross": ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)),
        }[shape]
        image[:, inside] = np.array(COLOURS[colour])[:, None]
    return image.astype(np.float32)


def smooth_pattern(rng: np.random.Generator, size: int, blobs: int = 4) -> np.ndarray:
    """A low-frequency random picture (soft coloured blobs): what a memorized image or patch looks like."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.ones((3, size, size)) * rng.uniform(0, 1, (3, 1, 1))
    for _ in range(blobs):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.15, 0.4)
        weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        image = image * (1 - weight) + rng.uniform(0, 1, (3, 1, 1)) * weight
    return image.astype(np.float32)


def planted_patch(kind: str, rng: np.random.Generator, side: int) -> np.ndarray:
    if kind == "smooth":
        return smooth_pattern(rng, side, blobs=2)
    if kind == "flat":
        return np.ones((3, side, side), np.float32) * rng.uniform(0, 1, (3, 1, 1)).astype(np.float32)
    raise ValueError(f"testbed recipe: unknown patch kind {kind!r} (smooth or flat)")


def make_dataset(recipe: Recipe) -> list[Item]:
    """Every training item (copies included) and every held-out caption, deterministic from ``recipe.seed``."""
    rng = np.random.default_rng(recipe.seed)
    size = recipe.resolution
    captions: set[str] = set()

    def fresh_caption():
        while True:
            caption, objects, background = describe(rng)
            if caption not in captions:
                captions.add(caption)
                return caption, objects, background

    items = []
    for _ in range(recipe.n_unique):
        caption, objects, background = fresh_caption()
        items.append(Item(caption, "unique", render(objects, background, size, rng), None))
    for _ in range(recipe.n_global):
        caption, _, _ = fresh_caption()
        image = smooth_pattern(rng, size, blobs=6)
        items += [Item(caption, "global", image, None) for _ in range(recipe.global_copies)]
    side = int(round(recipe.patch_fraction * size))
    for _ in range(recipe.n_local):
        caption, _, _ = fresh_caption()
        patch = planted_patch(recipe.patch, rng, side)
        top, left = rng.integers(0, size - side + 1, size=2)
        mask = np.zeros((size, size), bool)
        mask[top:top + side, left:left + side] = True
        for _ in range(recipe.local_copies):
            _, objects, background = describe(rng)  # the rest of the picture changes with every copy
            image = render(objects, background, size, rng)
            image[:, mask] = patch.reshape(3, -1)
            items.append(Item(caption, "local", image, mask))
    for _ in range(recipe.n_heldout):
        caption, _, _ = fresh_caption()
        items.append(Item(caption, "heldout", None, None))
    return items


def training_items(items: list[Item]) -> list[Item]:
    return [item for item in items if item.category != "heldout"]


def evaluation_prompts(items: list[Item]) -> list[dict]:
    """One entry per distinct memorized or held-out caption, labelled, with the training image / planted mask."""
    seen, out = set(), []
    for item in items:
        if item.category == "unique" or item.caption in seen:
            continue
        seen.add(item.caption)
        out.append({"caption": item.caption, "category": item.category})
    return out


def write_metadata(recipe: Recipe, items: list[Item], folder: Path) -> Path:
    """The recipe and every caption's category, so a model folder says what it was trained on."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "testbed.json"
    path.write_text(json.dumps({"recipe": asdict(recipe), "prompts": evaluation_prompts(items)}, indent=1) + "\n")
    return path


def ground_truth(items: list[Item]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per memorized caption: the training image it copies (for a local caption, any copy: the patch is the same
    in all) and the planted mask (None for global captions)."""
    truth = {}
    for item in items:
        if item.category in ("global", "local") and item.caption not in truth:
            truth[item.caption] = (item.image, item.mask)
    return truth
