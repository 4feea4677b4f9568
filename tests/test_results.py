"""Typed job results (benchmark/jobs/results.py): written and read back through one type, versions refused."""
import json

import numpy as np
import pandas as pd
import pytest

from benchmark.jobs.results import (
    RESULTS,
    SCHEMA,
    DetectionResult,
    GuardResult,
    ResultError,
    read_result,
)
from benchmark.store import job_folder as jobfolder

CONFIG = {"task": "detect", "model": {"name": "m"}, "sampler": {"steps": 3}}


def _detection(**fields) -> DetectionResult:
    metrics = [{"level": "prompt", "detector": "D", "layers": "", "T": 1, "subset": "all", "auc": 0.75}]
    return DetectionResult(config=CONFIG, sampler_settings={"steps": 3, "seed": 0}, n_images=2, model="m",
                           prompt_set="p", n_prompts=4, n_generations=8, headline=0.75, metrics=metrics,
                           table=pd.DataFrame({"prompt_id": ["a"], "score": [1.0]}), **fields)


def test_every_task_has_a_result_type():
    assert set(RESULTS) == set(jobfolder.TABLES)


def test_a_result_round_trips_through_its_folder(tmp_path):
    result = _detection(pictures={"masks.png": np.full((3, 4, 4), 0.5)})
    written = result.write(tmp_path / "job")
    assert [p.name for p in written] == ["metrics.json", "generations.csv", "masks.png"]
    raw = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert raw["schema"] == SCHEMA and raw["task"] == "detect" and raw["n_images"] == 2
    assert "localization" not in raw and raw["metrics"] == result.metrics
    back = read_result(tmp_path / "job")
    assert isinstance(back, DetectionResult) and back.folder == tmp_path / "job"
    assert back.summary() == result.summary() and back.config == CONFIG and back.metrics == result.metrics
    assert back.scalars()["headline"] == 0.75 and "metrics" not in back.scalars()


def test_flattened_and_optional_fields(tmp_path):
    guard = GuardResult(config={"task": "guard"}, n_images=1, n_generations=4, stopped=1, stop_rate=0.25,
                        restarted=0, steps_saved_fraction=0.1, caught=0.5, caught_by_kind={"local": 1.0},
                        model="m", prompt_set="p", calibration="/c", rule={"step": 2}, headline=0.1)
    raw = guard.summary()
    assert raw["caught_local"] == 1.0 and raw["caught"] == 0.5 and "non_memorized_stopped" not in raw
    assert raw["restart"] is None  # a plain None is written, unlike an optional field left out
    guard.write(tmp_path / "g")
    back = read_result(tmp_path / "g")
    assert back.caught == 0.5 and back.caught_by_kind == {"local": 1.0} and back.summary() == raw


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("schema"), "has no schema version"),
    (lambda m: m.update(schema=SCHEMA + 1), f"has schema {SCHEMA + 1}"),
    (lambda m: m.update(task="nope"), "task 'nope' is not a job kind"),
    (lambda m: m.update(surprise=1), "entries surprise are not fields of a detect result"),
    (lambda m: m.pop("metrics"), "no 'metrics'"),
])
def test_unreadable_folders_are_refused_in_one_line(tmp_path, edit, message):
    _detection().write(tmp_path / "job")
    path = tmp_path / "job" / "metrics.json"
    metrics = json.loads(path.read_text())
    edit(metrics)
    path.write_text(json.dumps(metrics))
    with pytest.raises(ResultError, match=message) as err:
        read_result(tmp_path / "job")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def _plain(value):
    """JSON values as metrics.json holds them (NaN equal to NaN once written)."""
    return json.dumps(value, sort_keys=True, default=str)


def test_the_detection_job_writes_what_the_library_computes(tmp_path, compose):
    from omegaconf import OmegaConf

    from benchmark.detectors.detection import detection_table
    from benchmark.jobs.config import check_job
    from benchmark.jobs.detection import run_detection
    from runners.detect import run

    cfg = compose("detect", "debug=default", "sampler.end_map_steps=[0,2]", "early.fpr=[0.0,0.5]")
    run(cfg, tmp_path / "job")
    raw = json.loads((tmp_path / "job" / "metrics.json").read_text())
    read = {"schema", "task", "config", "sampler_settings", "n_images", "fingerprints", "model", "prompt_set",
            "n_prompts", "n_generations", "sampled_now", "sampling_seconds", "headline", "metrics", "early_detection",
            "early_stopping"}  # what the reports and job reuse read
    assert read <= set(raw) and raw["sampled_now"] == 8
    again = run_detection(check_job(OmegaConf.to_container(cfg, resolve=True)))  # from the stored traces
    assert again.sampled_now == 0
    timing = ("sampled_now", "sampling_seconds", "scoring_seconds", "extra_seconds")
    written = {k: v for k, v in read_result(tmp_path / "job").summary().items() if k not in timing}
    assert _plain(written) == _plain({k: v for k, v in again.summary().items() if k not in timing})
    # the metrics are those of the per-generation table beside them
    scores = pd.read_csv(tmp_path / "job" / "generations.csv", keep_default_na=False, dtype={"prompt_id": str})
    assert _plain(raw["metrics"]) == _plain(detection_table(scores, cfg.score.n_boot).to_dict(orient="records"))
    assert raw["headline"] == again.headline


def test_the_report_refuses_an_unversioned_folder_in_one_line(tmp_path):
    import subprocess
    import sys

    _detection().write(tmp_path / "jobs" / "old")
    path = tmp_path / "jobs" / "old" / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["schema"]
    path.write_text(json.dumps(metrics))
    out = subprocess.run([sys.executable, "-m", "reports.leaderboard", str(tmp_path / "jobs"), "--out",
                          str(tmp_path / "report")], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith(f"report error: {path} has no schema version")
