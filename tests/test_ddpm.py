import json

import numpy as np
import pytest
import torch

from benchmark.ddpm.models import DDPMSampler, load_ddpm, sample_ddpm, save_ddpm, tiny_ddpm
from benchmark.ddpm.train import DDPMData, training_set
from benchmark.localization import copying
from benchmark.models.text_to_image import ModelLoadError


def test_distances_by_hand():
    a = np.zeros((1, 1, 4, 4))
    b = np.stack([np.zeros((1, 4, 4)), np.full((1, 4, 4), 0.5), np.zeros((1, 4, 4))])
    b[2, :, :2, :2] = 1.0  # one tile of four differs by 1
    np.testing.assert_allclose(copying.pairwise_rms(a, b), [[0.0, 0.5, 0.5]])
    np.testing.assert_allclose(copying.tiled_distances(a, b, grid=2), [[0.0, 0.5, 1.0]])  # the worst tile
    nearest, d1, ratio = copying.nn_ratio(np.array([[0.1, 0.4, 0.2], [0.3, 0.3, 0.9]]))
    assert nearest.tolist() == [0, 0] and d1.tolist() == [0.1, 0.3] and ratio.tolist() == pytest.approx([0.5, 1.0])
    assert copying.carlini_score(np.array([[0.1, 0.4, 0.7]]), n=3) == pytest.approx(0.1 / 0.4)
    with pytest.raises(ValueError, match="do not split into a 3x3 grid"):
        copying.tiled_distances(a, b, grid=3)


def test_copy_map_finds_a_pasted_region():
    rng = np.random.default_rng(0)
    training = rng.uniform(size=(10, 3, 16, 16))
    image = rng.uniform(size=(3, 16, 16))
    image[:, 4:12, 8:16] = training[3][:, 4:12, 8:16]  # a copied 8x8 region
    ratio = copying.copy_map(image, training, patch=4)
    assert ratio.shape == (4, 4)
    mask = copying.copied_region(ratio, (16, 16), 0.5)
    truth = np.zeros((16, 16), bool)
    truth[4:12, 8:16] = True
    np.testing.assert_array_equal(mask, truth)
    table = copying.memorization_table(np.stack([image, training[5]]), training, [mask, mask], np.arange(10) < 6,
                                       grid=4, carlini_n=5)
    assert table.nearest.tolist()[1] == 5 and table.is_copy.tolist() == [False, True]
    assert table.nearest_duplicated.tolist()[1] and table.copied_fraction.tolist() == [0.25, 0.25]


def test_ddpm_folder_round_trip_and_errors(tmp_path):
    model = tiny_ddpm()
    folder = save_ddpm(model, tmp_path / "ddpm")
    loaded = load_ddpm(str(folder))
    for p, q in zip(model.unet.parameters(), loaded.unet.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ModelLoadError, match="DDPM folder not found: /nonexistent"):
        load_ddpm("/nonexistent")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="incomplete: missing scheduler/"):
        load_ddpm(str(tmp_path / "half"))
    (tmp_path / "half" / "scheduler").mkdir()
    with pytest.raises(ModelLoadError, match="no unet/\\*.safetensors"):
        load_ddpm(str(tmp_path / "half"))
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"^cannot load DDPM {folder}: "):
        load_ddpm(str(folder))


def test_sampling_depends_on_the_seed_alone(same_up_to_float_order):
    model = tiny_ddpm()
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)):  # DDIM's eta > 0 noise per image too
        settings = DDPMSampler(steps=4, sampler=sampler, eta=eta)
        together, energy = sample_ddpm(model, [1, 2], settings)
        torch.manual_seed(sampler == "ddim")  # the global generator has no part in it
        alone, _ = sample_ddpm(model, [2], settings)
        tolerance = same_up_to_float_order(together[1:], alone)
        assert (together[0] - alone[0]).abs().max() > 100 * tolerance  # another seed is far outside it
        assert together.shape == (2, 3, 16, 16) and energy.shape == (2, 4, 16, 16)
        assert 0 <= together.min() and together.max() <= 1
    with pytest.raises(ValueError, match="unknown DDPM sampler 'euler'"):
        sample_ddpm(model, [0], DDPMSampler(sampler="euler"))


def test_training_set_duplicates_and_bad_data(tmp_path):
    images, duplicated = training_set(DDPMData(n_train=30, duplicated=5, resolution=8))
    assert images.shape == (30, 1, 8, 8) and duplicated.sum() == 5 and duplicated[:5].all()
    with pytest.raises(ValueError, match="duplicated \\(40\\) must be <= n_train \\(30\\)"):
        training_set(DDPMData(n_train=30, duplicated=40))
    with pytest.raises(FileNotFoundError, match="image folder not found: /nowhere"):
        training_set(DDPMData(source="/nowhere"))
    with pytest.raises(ValueError, match="no image folder set"):
        training_set(DDPMData(source=None))


def test_ddpm_job_trains_samples_measures_and_reruns(tmp_path, compose):
    from runners.ddpm import run

    cfg = compose("ddpm", "ddpm_model=tiny", "sampler.n_images=6", "sampler.steps=4")
    run(cfg, tmp_path / "job")
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert result["n_generations"] == 6 and result["sampled_now"] == 6 and result["n_training_images"] == 20
    assert 0 <= result["copy_rate"] <= 1 and (tmp_path / "job" / "copies.png").exists()
    assert (tmp_path / "artifacts" / "ddpm" / cfg.ddpm_model.name / "training_set.npz").exists()
    run(cfg, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["sampled_now"] == 0 and again["nn_ratio_median"] == result["nn_ratio_median"]
