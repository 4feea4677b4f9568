"""Everything that can be checked is checked before the first image is sampled (issue #15, section 3)."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from runners.common import CONF


def _config(task, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(task, overrides=list(overrides))


def _nothing_sampled(root: Path) -> bool:
    store = root / "artifacts" / "traces"
    return not store.exists() or not any(store.rglob("*.safetensors"))


@pytest.fixture
def one_class_data(tmp_path):
    folder = tmp_path / "data" / "prompts" / "MemAttn"
    folder.mkdir(parents=True)
    (folder / "sd1_mem345.txt").write_text("".join(f"memorized prompt {i}\n" for i in range(5)))
    return tmp_path / "data"


def test_a_one_class_prompt_set_fails_before_sampling(tmp_path, one_class_data):
    """The issue's case: ren_mem345 limited to two prompts sampled every image, then failed in the metric."""
    from runners.detect import run

    cfg = _config("detect", "model=tiny", "prompts=ren_mem345", "prompts.limit=2", f"paths.root={tmp_path}",
                  f"paths.data_dir={one_class_data}", "score.T=[1]", "score.n_boot=0")
    with pytest.raises(ValueError, match=r"prompt set 'ren_mem345' \(2 prompts\) has only memorized prompts: "
                                         "detection needs both positives and negatives"):
        run(cfg, tmp_path / "job")
    assert _nothing_sampled(tmp_path) and not (tmp_path / "job" / "metrics.json").exists()


@pytest.mark.parametrize("override, message", [
    ("score.headline.subset=verbatim", "score.headline.subset 'verbatim' is not among prompt set 'tiny''s subsets"),
    ("score.headline.layers=nowhere", "score.headline.layers='nowhere' is not a layer set"),
    ("score.headline.T=2", r"score.headline.T=2 is not one of score.T=\[1, 5\]"),
    ("score.headline.detector=E", "score.headline.detector='E' is not a detector"),
    ("score.headline.level=image", "score.headline.level='image': input should be 'prompt' or 'generation'"),
    ("localization.rule=top:x", "localization.rule='top:x'"),
    ("sampler.n_images=0", "sampler.n_images=0: input should be greater than or equal to 1"),
])
def test_detection_settings_that_would_fail_after_sampling(tmp_path, override, message):
    from runners.detect import run

    cfg = _config("detect", "debug=default", f"paths.root={tmp_path}", override)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "job")
    assert _nothing_sampled(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("headline.method=magic", r"headline.method='magic' is not among mitigation.methods \['wen', 'be'\]"),
    ("mitigation.n_images=0", "mitigation.n_images=0: input should be greater than or equal to 1"),
])
def test_mitigation_settings_that_would_fail_after_sampling(tmp_path, override, message):
    from runners.mitigate import run

    cfg = _config("mitigate", "debug=default", f"paths.root={tmp_path}", override)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "job")
    assert _nothing_sampled(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("measure.grid=3", "measure.grid=3 does not split 8x8 images into tiles"),
    ("measure.patch=9", "measure.patch=9 is larger than the 8-pixel images"),
    ("sampler.sampler=euler", "sampler.sampler='euler': input should be 'ddim' or 'ddpm'"),
])
def test_ddpm_settings_that_would_fail_after_sampling(tmp_path, override, message):
    """Carlini's tiles that do not split the image failed after every image was sampled."""
    from runners.ddpm import run

    cfg = _config("ddpm", "ddpm_model=tiny", f"paths.root={tmp_path}", "sampler.n_images=2", override)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "job")
    assert _nothing_sampled(tmp_path) and not (tmp_path / "artifacts" / "ddpm").exists()  # nor trained
