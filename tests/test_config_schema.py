"""The typed config schema (benchmark/jobs/config.py), walked over every runner's composed config: for every setting a
wrong type, an out-of-range value and, in every section, an unknown key are refused with one line naming the
setting, before anything is loaded (issue 25's cases config_types, plus_typo, limit_zero, store_int8, inline_empty,
mit_empty_targets, ddim1000 are instances)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmark.jobs.config import ConfigError, check_job

ROOT = Path(__file__).resolve().parents[1]

# (runner, overrides) whose composed configs are walked: each runner's default and its debug variant, the other
# model families' presets and the experiments, so every config file's settings are visited at least once.
CONFIGS = [
    ("detect", []), ("detect", ["debug=default"]), ("detect", ["model=sd-v1-4"]), ("detect", ["model=sd-2-1"]),
    ("detect", ["model=tiny-sd2-v", "debug=default"]), ("detect", ["model=sdxl"]), ("detect", ["model=pixart-alpha"]),
    ("detect", ["model=tiny-sdxl", "debug=default"]), ("mitigate", ["model=tiny-pixart", "debug=default"]),
    ("detect", ["model=testbed_endpad", "prompts=coco2014"]),
    ("detect", ["debug=default", "sampler.end_map_steps=[1]"]),
    ("mitigate", []), ("mitigate", ["debug=default"]),
    ("guard", ["guard.calibration=some/folder"]), ("guard", ["debug=default", "guard.calibration=x", "guard.step=2"]),
    ("ddpm", []), ("ddpm", ["ddpm_model=tiny"]), ("train_testbed", []),
] + [(yaml.safe_load(p.read_text())["task"], [f"experiment={p.stem}"])
      for p in sorted((ROOT / "conf" / "experiment").glob("*.yaml"))]

# Settings that may take the probe value: each with why (anything else accepting it is a missing check).
MAY_BE_NEGATIVE = {
    "extra.anisotropy.low_noise_index": "a Python index into the timesteps (official -3)",
    "extra.curvature.step": "a Python index into the steps (official -1, the last)",
    "mitigation.copy_thresholds.SSCD": "a cosine, in [-1, 1]",
    "mitigation.copy_thresholds.S": "-RMS on the 0-255 scale, <= 0",
}
MAY_BE_EMPTY_LIST = {
    "sampler.end_map_steps": "no earlier steps' maps recorded",
    "extra.passes": "no extra pass",
    "mitigation.pad_fractions": "needed only by pad_mask, checked when it is asked for",
    "model.mitigation_targets": "the preset's default for mitigation.target_losses, checked where used",
    "plugins": "no plug-in module of the user's",
}
MAY_BE_EMPTY_STRING = {"local_alternative": "no offline alternative named"}


def _configs():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for task, overrides in CONFIGS:
            yield f"{task} {' '.join(overrides)}".strip(), OmegaConf.to_container(
                compose(task, overrides=["paths.root=/tmp/be-schema", *overrides]), resolve=True)


CONFIG_LIST = list(_configs())


def _leaves(node, path=()):
    """(path, value) of every setting; a non-empty list's elements are settings too, and so is the list."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node and not all(isinstance(v, dict) for v in node):
        yield path, node
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    elif isinstance(node, list) and node:
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    else:
        yield path, node


def _sections(node, path=()):
    if isinstance(node, dict):
        yield path
        for key, value in node.items():
            yield from _sections(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _sections(value, (*path, i))


def _with(config: dict, path: tuple, value) -> dict:
    changed = copy.deepcopy(config)
    node = changed
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return changed


def _refused(config: dict, path: tuple) -> str | None:
    """The error line if the config is refused (asserting it is one line naming the setting), else None."""
    try:
        check_job(config)
    except ConfigError as err:
        line = str(err)
        assert "\n" not in line
        return line
    return None


def _names(line: str, path: tuple) -> bool:
    dotted = ".".join(map(str, path))
    parent = ".".join(map(str, path[:-1]))
    return dotted in line or (isinstance(path[-1], int) and parent in line)


def _key(path: tuple) -> str:
    # a prompt set's parts (prompts.parts.<name>...) count as the set's own settings for the exceptions
    parts = [str(p) for p in path if not isinstance(p, int)]
    if len(parts) > 2 and parts[0] == "prompts" and "parts" in parts:
        parts = ["prompts", *parts[parts.index("parts") + 2:]]
    return ".".join(parts)


@pytest.mark.parametrize("name, config", CONFIG_LIST, ids=[n for n, _ in CONFIG_LIST])
def test_every_runner_config_is_valid_as_composed(name, config):
    if config["task"] == "ddpm" and config["ddpm_model"].get("data", {}).get("source") is None:
        pytest.skip("a data set folder from the environment")
    check_job(config)


@pytest.mark.parametrize("name, config", CONFIG_LIST, ids=[n for n, _ in CONFIG_LIST])
def test_every_setting_refuses_a_wrong_type_and_an_out_of_range_value(name, config):
    check_job(config)
    missed = []
    for path, value in _leaves({k: v for k, v in config.items() if k not in ("task",)}):
        key = _key(path)
        wrong = {bool: "x", int: "x", float: "x", str: 3.5, list: "x", type(None): {"wrong": "type"}}[type(value)]
        probes = [("wrong type", wrong)]
        if isinstance(value, bool):
            pass
        elif isinstance(value, (int, float)) and key not in MAY_BE_NEGATIVE:
            probes.append(("out of range", -1 if isinstance(value, int) else -1.0))
        elif isinstance(value, (int, float)):
            probes.append(("out of range", 10**6))
        elif isinstance(value, str) and path[-1] not in MAY_BE_EMPTY_STRING:
            probes.append(("out of range", "   "))
        elif isinstance(value, list) and key not in MAY_BE_EMPTY_LIST:
            probes.append(("out of range", []))
        for kind, probe in probes:
            if path in (("run_name",), ("sweep_name",)) and kind == "wrong type":
                continue  # interpolated into folder names only; a number is a fine name
            line = _refused(_with(config, path, probe), path)
            if line is None:
                missed.append(f"{'.'.join(map(str, path))}={probe!r} ({kind}) accepted")
            elif not _names(line, path):
                missed.append(f"{'.'.join(map(str, path))}={probe!r}: the error does not name it: {line}")
    assert not missed, "\n".join(missed)


@pytest.mark.parametrize("name, config", CONFIG_LIST, ids=[n for n, _ in CONFIG_LIST])
def test_every_section_refuses_an_unknown_key(name, config):
    missed = []
    for path in _sections(config):
        if path and path[0] == "extra" and len(path) == 1:
            continue  # extra.<name> is a pass's name: an unknown one is refused as a pass (below)
        node = config
        for part in path:
            node = node[part]
        changed = _with(config, (*path, "bogus_key"), 1) if path else {**config, "bogus_key": 1}
        line = _refused(changed, (*path, "bogus_key"))
        if line is None or "bogus_key" not in line:
            missed.append(f"{'.'.join(map(str, path)) or '<top>'}.bogus_key: {line}")
    assert not missed, "\n".join(missed)


def test_an_unknown_extra_pass_and_prompt_loader_are_refused():
    config = dict(CONFIG_LIST[1][1])
    assert "extra.nope" in _refused(_with(config, ("extra", "nope"), {}), ("extra", "nope"))
    assert "prompts.loader='nope'" in _refused(_with(config, ("prompts", "loader"), "nope"), ("prompts", "loader"))


@pytest.mark.parametrize("override, message", [
    ("sampler.steps=five", "sampler.steps='five': input should be a valid integer"),
    ("sampler.guidance=abc", "sampler.guidance='abc': input should be a valid number"),
    ("sampler.n_images=2.5", "sampler.n_images=2.5: input should be a valid integer"),
    ("+sampler.n_imagez=5", "unknown setting sampler.n_imagez=5"),
    ("prompts.limit=0", "prompts.limit=0: input should be greater than or equal to 1"),
    ("store.dtype=int8", "store.dtype='int8': input should be 'float16', 'float32' or 'float64'"),
    ("prompts.entries.2.text=''", "prompts.entries.2.text='': string should have at least 1 character"),
    ("sampler.steps=1000", "sampler.steps=1000: this model's DDIM schedule"),
])
def test_the_reported_cases_end_before_anything_is_loaded(tmp_path, override, message):
    """config_types, plus_typo, limit_zero, store_int8, inline_empty, ddim1000: the runner exits with status 2 and
    one line on stderr, having written no trace, image or result (Hydra's own run folder aside)."""
    out = subprocess.run([sys.executable, "-m", "runners.detect", "debug=default", override, f"paths.root={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"config error: {message}" or message in out.stderr
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("*.png"))
    assert not any(tmp_path.rglob("metrics.json")) and not (tmp_path / "artifacts").exists()


def test_mitigation_without_target_losses_is_refused(tmp_path):
    """mit_empty_targets: wen and be need a target loss each; [] used to exit 0 with a NaN headline."""
    out = subprocess.run([sys.executable, "-m", "runners.mitigate", "debug=default", "mitigation.target_losses=[]",
                          f"paths.root={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "config error: mitigation.target_losses=[]: wen, be need at least one target loss" in out.stderr


def test_a_sweep_job_with_a_bad_setting_fails_alone(tmp_path):
    """In a sweep the bad job writes its error line to error.txt; the others run."""
    out = subprocess.run([sys.executable, "-m", "runners.detect", "-m", "debug=default", "prompts.limit=0,4",
                          f"paths.root={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    errors = list((tmp_path / "outputs").rglob("error.txt"))
    assert len(errors) == 1 and "prompts.limit=0" in errors[0].read_text()
    assert len(list((tmp_path / "outputs").rglob("metrics.json"))) == 1
    assert "1 jobs finished, 1 failed" in out.stdout


def test_blank_prompts_are_refused_by_the_loaders_of_written_prompts(tmp_path):
    """inline_empty, the kind: an empty or blank prompt a user wrote (sampled as the unconditional one) is refused
    by the inline loader, as by the file loader, also when called without the config schema."""
    from benchmark.data.prompt_files import PromptFileError, file_prompt_set
    from benchmark.data.prompts import inline_prompt_set

    with pytest.raises(ValueError, match=r"entry 1 has no text \('  '\)"):
        inline_prompt_set("x", [{"text": "a cat"}, {"text": "  "}])
    (tmp_path / "p.txt").write_text("a cat\n\nan astronaut\n")
    with pytest.raises(PromptFileError, match="empty prompt"):
        file_prompt_set("y", str(tmp_path / "p.txt"))
