"""Configs compose, the detection job runs on the tiny model, re-scoring reuses the stored traces."""
import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from benchmark.models.text_to_image import ModelLoadError
from runners.detect import run

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "prompts", "sampler", "layers", "logger", "experiment", "debug"])
def test_every_config_composes(group, compose):
    for option in options(group):
        cfg = compose("detect", f"{group}={option}")
        OmegaConf.to_container(cfg, resolve=True)


def test_detect_job_writes_results_and_rescoring_samples_nothing(tmp_path, compose):
    cfg = compose("detect", "debug=default")
    value = run(cfg, tmp_path / "job1")
    result = json.loads((tmp_path / "job1" / "metrics.json").read_text())
    assert result["sampled_now"] == 8 and result["n_generations"] == 8
    table = pd.DataFrame(result["metrics"])
    # every registered detector but those reading an extra pass's fields (none asked for)
    from benchmark.registry import DETECTORS, EXTRA_PASSES

    extra_fields = {f for entry in EXTRA_PASSES.entries() for f in entry.fields}
    assert set(table.detector) == {d.name for d in DETECTORS.entries() if not extra_fields & set(d.trace_fields)}
    assert {"D", "LD", "BE_intensity"} <= set(table.detector)
    assert set(table.subset) == {"all", "global", "local"} and set(table.level) == {"prompt", "generation"}
    gens = pd.read_csv(tmp_path / "job1" / "generations.csv")
    assert len(gens[(gens.detector == "D") & (gens["T"] == 1)]) == 8
    # the headline value is the table's own row
    row = table[(table.detector == "LD") & (table.layers == "all") & (table["T"] == 1) & (table.subset == "all")
                & (table.level == "prompt")]
    assert value == pytest.approx(row.auc.iloc[0])
    # another layer set and window: scored from the store, nothing sampled
    cfg2 = compose("detect", "debug=default", "+layers.sets.mid=[mid_block]", "score.T=[2,5]", "score.headline.T=2")
    run(cfg2, tmp_path / "job2")
    result2 = json.loads((tmp_path / "job2" / "metrics.json").read_text())
    assert result2["sampled_now"] == 0
    assert {"mid"} <= set(pd.DataFrame(result2["metrics"]).layers)


def test_score_difference_units_divide_by_one_minus_alpha_bar_of_the_last_step(tmp_path, compose):
    from benchmark.detectors.jacobian import one_minus_alpha_bar
    from benchmark.models.text_to_image import tiny_text_to_image

    tables = {}
    for units in ("eps", "score"):
        run(compose("detect", "debug=default", f"score.score_difference_units={units}"), tmp_path / units)
        gens = pd.read_csv(tmp_path / units / "generations.csv")
        tables[units] = gens[gens.detector == "score_difference"].score.to_numpy()
    assert json.loads((tmp_path / "score" / "metrics.json").read_text())["sampled_now"] == 0
    factor = one_minus_alpha_bar(tiny_text_to_image(seed=0).scheduler, 5)  # debug: 5 steps
    assert 0 < factor < 1
    assert tables["score"] == pytest.approx(tables["eps"] / factor, rel=1e-6)


@pytest.mark.parametrize("overrides, error, message", [
    (["+layers.sets.bad=[down_blocks.7]"], ValueError, "unknown layer 'down_blocks.7'"),
    (["model.source=/nonexistent/sd", "model.name=x"], ModelLoadError, "model folder not found: /nonexistent/sd"),
    (["prompts.entries=[]"], ValueError, "prompts.entries=[]: needs at least one prompt"),
    (["score.T=[9]"], ValueError, "score.T=[9]: windows [9] are not within 1..sampler.steps=5"),
    (["score.score_difference_units=Score"], ValueError,
     "score.score_difference_units='Score': input should be 'eps' or 'score'"),
])
def test_bad_input_gets_one_clear_error(tmp_path, compose, overrides, error, message):
    cfg = compose("detect", "debug=default", *overrides)
    with pytest.raises(error, match=message.replace(".", r"\.").replace("[", r"\[")):
        run(cfg, tmp_path / "job")
    assert not (tmp_path / "job" / "metrics.json").exists()


@pytest.mark.parametrize("task, group", [("ddpm", "ddpm_model"), ("mitigate", "model")])
def test_other_jobs_compose(task, group, compose):
    for option in options(group):
        cfg = compose(task, f"{group}={option}")
        OmegaConf.to_container(cfg, resolve=True)
