"""Get the testbed model folder: reuse it, assemble it from the shipped weights, or train it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import UNet2DConditionModel

from benchmark.models.text_to_image import save_text_to_image, weights_fingerprint
from benchmark.testbed.data import Recipe, make_dataset, write_metadata
from benchmark.testbed.train import Architecture, TestbedSpec, Training, build_untrained, train

# The shipped UNets by model builder: attempt 7 (`make testbed-weights`), the default, and attempt 9 at step 4500,
# padded with copies of the end token (`make testbed-weights-endpad`; docs/testbed.md has both).
WEIGHTS = {"testbed": Path(__file__).parent / "weights", "testbed_endpad": Path(__file__).parent / "weights_endpad"}
ASSEMBLED = "assembled_from.txt"  # in a folder assembled from the shipped weights: their fingerprint


def spec_from_dict(raw: dict) -> TestbedSpec:
    arch = dict(raw["architecture"], block_out_channels=tuple(raw["architecture"]["block_out_channels"]))
    return TestbedSpec(Recipe(**raw["recipe"]), Architecture(**arch), Training(**raw["training"]))


def ensure_testbed(folder: str | Path, weights: str = "testbed") -> Path:
    """``folder`` is the pipeline folder: reused, assembled from the shipped UNet ``weights`` (a key of
    :data:`WEIGHTS`), or, for the default testbed without shipped weights, trained (its state lives beside it).
    Raises ValueError for an unknown ``weights``, FileNotFoundError for another testbed whose weights are missing."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown testbed weights {weights!r} (one of {', '.join(WEIGHTS)})")
    folder, source = Path(folder), WEIGHTS[weights]
    shipped = weights_fingerprint(source)
    marker = folder / ASSEMBLED
    if (folder / "model_index.json").exists():
        if not marker.exists() or marker.read_text().strip() == shipped:
            return folder  # a trained folder, or assembled from the weights shipped now
        shutil.rmtree(folder)  # assembled from weights the package no longer ships: reassemble
    if shipped:
        spec = spec_from_dict(json.loads((source / "testbed_spec.json").read_text()))
        model = build_untrained(spec.architecture, spec.recipe.resolution, spec.training.seed)
        model.unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_text_to_image(model, tmp)
        write_metadata(spec.recipe, make_dataset(spec.recipe), tmp)
        shutil.copy(source / "testbed_spec.json", tmp / "testbed_spec.json")
        (tmp / ASSEMBLED).write_text(shipped + "\n")
        tmp.rename(folder)
        return folder
    if weights != "testbed":
        raise FileNotFoundError(f"no shipped weights for {weights!r} in {source}: `make testbed-weights-endpad` "
                                "trains them (docs/testbed.md)")
    return train(TestbedSpec(), folder)
