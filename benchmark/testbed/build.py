"""Get the testbed model folder: reuse it, assemble it from the shipped weights, or train it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel

from ..models import save_text_to_image, weights_fingerprint
from .data import Recipe, make_dataset, write_metadata
from .train import Architecture, TestbedSpec, Training, build_untrained, train

SHIPPED = Path(__file__).parent / "weights"  # made by `make testbed-weights` (see docs/testbed.md)
ASSEMBLED = "assembled_from.txt"  # in a folder assembled from the shipped weights: their fingerprint


def spec_from_dict(raw: dict) -> TestbedSpec:
    arch = dict(raw["architecture"], block_out_channels=tuple(raw["architecture"]["block_out_channels"]))
    return TestbedSpec(Recipe(**raw["recipe"]), Architecture(**arch), Training(**raw["training"]))


def ensure_testbed(folder: str | Path) -> Path:
    """``folder`` is the pipeline folder; training state, when training is needed, lives beside it."""
    folder = Path(folder)
    shipped = weights_fingerprint(SHIPPED)
    marker = folder / ASSEMBLED
    if (folder / "model_index.json").exists():
        if not marker.exists() or marker.read_text().strip() == shipped:
            return folder  # a trained folder, or assembled from the weights shipped now
        shutil.rmtree(folder)  # assembled from weights the package no longer ships: reassemble
    if shipped:
        spec = spec_from_dict(json.loads((SHIPPED / "testbed_spec.json").read_text()))
        model = build_untrained(spec.architecture, spec.recipe.resolution, spec.training.seed)
        model.unet = UNet2DConditionModel.from_pretrained(SHIPPED, subfolder="unet", use_safetensors=True)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_text_to_image(model, tmp)
        write_metadata(spec.recipe, make_dataset(spec.recipe), tmp)
        shutil.copy(SHIPPED / "testbed_spec.json", tmp / "testbed_spec.json")
        (tmp / ASSEMBLED).write_text(shipped + "\n")
        tmp.rename(folder)
        return folder
    return train(TestbedSpec(), folder)
