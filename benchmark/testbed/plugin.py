"""The testbed as a plug-in: its model builder, its prompt source (with ground truth), its caption renderer and its
rephraser.

Nothing in the generic library imports this module; :data:`benchmark.registry.PLUGINS` names it, so asking a
registry for ``testbed`` (``build: testbed``, ``loader: testbed``) or iterating one imports it.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from benchmark.core.config_types import Name
from benchmark.data.prompts import Prompt, PromptSet, Truth
from benchmark.registry import CAPTION_RENDERERS, MODEL_BUILDERS, PROMPT_SOURCES, REPHRASERS
from benchmark.testbed.data import Recipe, caption_of, ground_truth, make_dataset, parse_caption, render


@MODEL_BUILDERS.register("testbed", label="planted-memorization testbed", in_process=False)
def testbed_folder(source: str | Path) -> Path:
    """The testbed pipeline folder at ``source``: reused, assembled from the shipped weights, or trained."""
    from benchmark.testbed.build import ensure_testbed  # diffusers and the trainer: only when a model is wanted

    return ensure_testbed(source)


@MODEL_BUILDERS.register("testbed_endpad", label="planted-memorization testbed, padded with the end token",
                         in_process=False)
def testbed_endpad_folder(source: str | Path) -> Path:
    """The end-padded testbed (attempt 9, docs/testbed.md) at ``source``: reused or assembled from its weights."""
    from benchmark.testbed.build import ensure_testbed

    return ensure_testbed(source, "testbed_endpad")


@PROMPT_SOURCES.register("testbed", label="the testbed's captions, with ground truth")
def testbed_prompt_set(model_folder: Name, name: str = "testbed", **_) -> PromptSet:
    """The testbed's memorized (global / local) and held-out captions, from the model folder's testbed.json, with
    each memorized caption's training image and planted region as ground truth."""
    path = Path(model_folder) / "testbed.json"
    if not path.exists():
        raise FileNotFoundError(f"not a testbed model folder (no testbed.json): {model_folder}")
    meta = json.loads(path.read_text())
    truth_by_caption = ground_truth(make_dataset(Recipe(**meta["recipe"])))
    counts: dict[str, int] = {}
    prompts, truth = [], {}
    for entry in meta["prompts"]:
        category = entry["category"]
        counts[category] = counts.get(category, 0) + 1
        kind = "none" if category == "heldout" else category
        prompt = Prompt(f"{category}-{counts[category] - 1:03d}", entry["caption"], kind != "none", kind, name)
        prompts.append(prompt)
        if entry["caption"] in truth_by_caption:
            truth[prompt.id] = Truth(*truth_by_caption[entry["caption"]])
    return PromptSet(name, prompts, truth)


@CAPTION_RENDERERS.register("testbed", label="the scene a testbed caption names")
def render_caption(caption: str, size: int) -> np.ndarray:
    """(3, size, size) in [0, 1]; ValueError for a caption outside the testbed's grammar."""
    objects, background = parse_caption(caption)
    return render(objects, background, size)


@REPHRASERS.register("testbed", label="the testbed grammar's rephrasings: the same objects in another order")
def testbed_rephrasings(prompt: str, count: int) -> list[str]:
    """Up to ``count`` captions naming the same scene as ``prompt`` in other words: the grammar's only freedom is
    the order of the objects, so a caption of k objects has k! - 1 rephrasings (none for one object), in
    ``itertools.permutations`` order. ValueError for a caption outside the grammar."""
    objects, background = parse_caption(prompt)
    others = [caption_of(list(order), background) for order in itertools.permutations(objects)]
    return [c for c in dict.fromkeys(others) if c != prompt][:count]
