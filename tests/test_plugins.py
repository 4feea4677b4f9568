"""User plug-ins: a file outside the repo, named by ``plugins=[...]``, is scored and reported like a built-in method
(issue 26's "must show"); a bad plug-in fails with one line before anything is loaded."""
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmark.jobs.config import ConfigError, check_job
from benchmark.registry import DETECTORS, LOCALIZERS
from runners.detect import run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_methods.py"


@pytest.fixture
def plugin_file(tmp_path):
    """docs/contributing.md's example plug-in, copied outside the repository; unregistered afterwards."""
    path = tmp_path / "elsewhere" / "my_methods.py"
    path.parent.mkdir()
    shutil.copy(EXAMPLE, path)
    yield path
    DETECTORS.unregister("BE_peak")
    LOCALIZERS.unregister("BE_squared")
    sys.modules.pop("be_bench_plugin_my_methods", None)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory, tiny_testbed_spec):
    from benchmark.testbed.train import train

    return train(tiny_testbed_spec, tmp_path_factory.mktemp("testbed") / "pipeline", progress=False)


def test_a_plugin_detector_and_localizer_reach_every_table(tmp_path, compose, plugin_file, testbed):
    from benchmark.early.step_detection import early_detector_names
    from reports.leaderboard import write_report

    assert "BE_peak" not in DETECTORS.names()  # nothing imported it yet
    overrides = [f"model.source={testbed}", "model.build=null", "sampler.steps=4", "sampler.n_images=1",
                 "sampler.end_map_steps=[1]", "score.T=[1,4]", "score.n_boot=0", "early.n_boot=0",
                 "early.fpr=[0.5]", "early.signal.T=4",
                 f"plugins=[{plugin_file}]"]
    cfg = compose("detect", *overrides, "early.signal.detector=BE_peak")
    layer_sets = set(cfg.layers.sets)
    run(cfg, tmp_path / "job")
    assert "BE_peak" in early_detector_names()  # early stopping's signal choices
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    detection = pd.DataFrame(result["metrics"])
    assert set(detection[detection.detector == "BE_peak"].layers) == layer_sets  # every layer set, no window
    early = pd.DataFrame(result["early_detection"])
    assert set(early[early.detector == "BE_peak"].step) == {1, 3}  # the recorded step and the last one
    stopping = pd.DataFrame(result["early_stopping"])
    assert set(stopping.step) == {1, 3}  # calibrated and stopped on the plug-in's signal
    board = pd.DataFrame(result["localization_leaderboard"])
    assert {f"BE_squared [{name}]" for name in layer_sets} <= set(board.localizer)
    for table in ("localization", "early_localization"):  # every layer set, and at every step
        rows = pd.DataFrame(result[table])
        assert set(rows[rows.localizer == "BE_squared"].layers) == layer_sets
    assert set(pd.DataFrame(result["early_localization"]).query("localizer == 'BE_squared'").step) == {1, 3}
    # the report imports the plug-ins its jobs ran with (a fresh process would not have them)
    DETECTORS.unregister("BE_peak")
    sys.modules.pop("be_bench_plugin_my_methods")
    files = write_report([tmp_path / "job"], tmp_path / "report")
    leaderboard = pd.read_csv(files["leaderboard.csv"])
    assert "peak of the BE mask (example)" in set(leaderboard.method)
    assert "peak of the BE mask (example)" in files["leaderboard.html"].read_text()
    assert "BE_squared [all]" in pd.read_csv(files["localization.csv"]).localizer.tolist()


def test_a_bad_plugin_is_one_line_before_anything_is_loaded(tmp_path, compose):
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(compose("detect", "debug=default"), resolve=True)
    with pytest.raises(ConfigError, match=r"^plugins: cannot import 'no_such_plugin_module': No module named"):
        check_job({**config, "plugins": ["no_such_plugin_module"]})
    with pytest.raises(ConfigError, match=r"^plugins: no plug-in file '/nowhere/mine\.py'$"):
        check_job({**config, "plugins": ["/nowhere/mine.py"]})
    broken = tmp_path / "broken.py"
    broken.write_text("from benchmark.registry import DETECTORS\n"
                      "DETECTORS.register('D', higher_is_memorized=True)(lambda delta_sq: delta_sq)\n")
    with pytest.raises(ConfigError, match=r"^plugins: importing '.*broken\.py' failed: ValueError: detector 'D' is "
                                          "registered already"):
        check_job({**config, "plugins": [str(broken)]})
    with pytest.raises(ConfigError, match=r"^plugins=3: a list of module names or \.py files$"):
        check_job({**config, "plugins": 3})


def test_installed_packages_announce_plugins_through_the_entry_point_group(monkeypatch, tmp_path):
    import importlib.metadata

    from benchmark import registry

    module = tmp_path / "installed_methods.py"
    module.write_text("from benchmark.registry import DETECTORS\n"
                      "@DETECTORS.register('installed_toy', higher_is_memorized=False)\n"
                      "def toy(delta_sq):\n    return delta_sq.sum(axis=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint("toy", "installed_methods", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [point] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_installed", [])
    try:
        assert "installed_toy" in DETECTORS.names()
        assert registry.load_installed() == ["installed_methods"]
    finally:
        DETECTORS.unregister("installed_toy")
        sys.modules.pop("installed_methods", None)


def test_a_guard_takes_a_plugin_signal_from_its_calibration_job(tmp_path, plugin_file):
    """``runners.guard`` reads the stop rule from a detection job that ran with a plug-in: its plug-ins are imported."""
    from benchmark.early.stopping import rule_from_job
    from benchmark.store import job_folder as jobfolder

    config = {"plugins": [str(plugin_file)], "layers": {"sets": {"all": ["*"]}},
              "early": {"signal": {"detector": "BE_peak", "layers": "all", "T": 3}}}
    jobfolder.write_results(tmp_path / "calibration", "detect", config, {"steps": 5}, 1,
                            {"early_stopping": [{"step": 2, "fpr_target": 0.1, "threshold": 0.5}]}, {})
    assert "BE_peak" not in DETECTORS.names()
    rule = rule_from_job(jobfolder.read_job(tmp_path / "calibration"), 2, 0.1)
    assert (rule.detector, rule.layers, rule.threshold, rule.window) == ("BE_peak", ("*",), 0.5, 0)
