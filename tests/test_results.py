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
    metrics = pd.DataFrame({"level": ["prompt"], "detector": ["D"], "layers": [""], "T": [1], "subset": ["all"],
                            "auc": [0.75]})
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
    assert "localization" not in raw and raw["metrics"] == result.metrics.to_dict(orient="records")
    back = read_result(tmp_path / "job")
    assert isinstance(back, DetectionResult) and back.folder == tmp_path / "job"
    assert back.summary() == result.summary() and back.config == CONFIG
    pd.testing.assert_frame_equal(back.metrics, result.metrics)
    assert back.scalars()["headline"] == 0.75 and "metrics" not in back.scalars()


def test_flattened_and_optional_fields(tmp_path):
    guard = GuardResult(config={"task": "guard"}, n_images=1, n_generations=4, stopped=1, stop_rate=0.25,
                        restarted=0, steps_saved_fraction=0.1, caught={"caught": 0.5, "caught_local": 1.0},
                        model="m", prompt_set="p", calibration="/c", rule={"step": 2}, headline=0.1)
    raw = guard.summary()
    assert raw["caught_local"] == 1.0 and "caught" in raw and "non_memorized_stopped" not in raw
    assert raw["restart"] is None  # a plain None is written, unlike an optional field left out
    guard.write(tmp_path / "g")
    assert read_result(tmp_path / "g").caught == {"caught": 0.5, "caught_local": 1.0}


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
