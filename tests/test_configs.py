"""Config structure (issue #16): one shared hydra block, model-family presets, the default job unchanged."""
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def config(task, *overrides, hydra=False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(task, overrides=list(overrides), return_hydra_config=hydra)


def preset_layer_sets(name: str) -> dict:
    """The layer sets a layer preset file (conf/layers/<name>.yaml) names."""
    return yaml.safe_load((Path(CONF) / "layers" / f"{name}.yaml").read_text())["sets"]


def test_a_model_alone_brings_its_sampler_layers_and_mitigation_targets(tmp_path):
    cfg = config("detect", "model=sd-v1-4", f"paths.root={tmp_path}")
    assert (cfg.sampler.steps, cfg.sampler.guidance, cfg.sampler.height) == (50, 7.5, 512)
    assert "res64" in cfg.layers.sets
    assert config("mitigate", "model=sd-v1-4").mitigation.target_losses == [1, 2, 3, 4, 5]
    tiny = config("detect", "model=tiny")
    assert tiny.sampler.steps == 5 and set(tiny.layers.sets) == set(preset_layer_sets("tiny"))
    # an explicit choice still wins over the preset's
    assert config("detect", "model=sd-v1-4", "sampler=tiny", "layers=testbed").sampler.steps == 5
    assert "low8" in config("detect", "model=sd-v1-4", "layers=testbed").layers.sets


def test_the_default_detection_job_is_unchanged(tmp_path):
    """`python -m runners.detect` on the testbed: the values every earlier release composed."""
    cfg = OmegaConf.to_container(config("detect", f"paths.root={tmp_path}"), resolve=True)
    assert cfg["sampler"] == {"steps": 30, "guidance": 3.0, "height": 32, "width": 32, "eta": 0.0, "n_images": 4,
                              "seed": 0, "batch_size": 8,
                              # added since: the default seeding and the early-step maps (#14, #18)
                              "seeding": "per_image", "end_map_steps": [0, 4, 9, 19]}
    # the preset's layer sets; those of earlier releases kept as they were (a new set breaks nothing)
    assert cfg["layers"]["sets"] == preset_layer_sets("testbed")
    assert {"all": ["*"], "down16": ["down_blocks.1"], "up16": ["up_blocks.1"],
            "low8": ["down_blocks.2", "mid_block", "up_blocks.0"],
            "ren_E": ["forward:3"]}.items() <= cfg["layers"]["sets"].items()  # ren_E added since (#14)
    assert {k: cfg["model"][k] for k in ("name", "build", "device", "dtype", "token_maps")} == {
        "name": "testbed", "build": "testbed", "device": "cpu", "dtype": "float32", "token_maps": True}
    assert cfg["prompts"]["loader"] == "testbed" and cfg["score"]["T"] == [1, 5, 30]
    assert config("mitigate").mitigation.target_losses == [0.1, 0.2, 0.3]


@pytest.mark.parametrize("task, run_dir", [
    ("detect", "outputs/detect/testbed/testbed/"), ("mitigate", "outputs/mitigate/testbed/testbed/"),
    ("ddpm", "outputs/ddpm/digits-n300-dup10x30-s3000/"), ("train_testbed", "outputs/train_testbed/testbed/")])
def test_every_primary_config_shares_one_hydra_block(task, run_dir):
    hydra = config(task, "paths.root=.", hydra=True).hydra
    assert hydra.run.dir.startswith(f"./{run_dir}") and hydra.sweep.dir == f"./outputs/multirun/{task}/default"
    assert hydra.callbacks.summary._target_ == "runners.callbacks.SweepSummary" and hydra.job.chdir is False
    assert "\nhydra:" not in (Path(CONF) / f"{task}.yaml").read_text()  # only conf/hydra/default.yaml has it
