"""In-loop early stopping: the sampler's decisions are the simulation's, and a stopped image costs k + 1 steps."""
import json

import numpy as np
import pandas as pd
import pytest

from benchmark.early import step_detection as early
from benchmark.early.stopping import StopRule, rule_from_job, sample_with_early_stop
from benchmark.mitigation.padding import PadMitigation, pad_mitigated_embedding
from benchmark.registry import DETECTORS
from benchmark.sampling.capture import SamplerSettings, sample_with_capture
from benchmark.store import job_folder as jobfolder
from reports.leaderboard import write_report
from runners import detect, guard

PROMPTS = ["Mothers influence on her young hippo", "a photo of a cat on a red sofa",
           "The No Limits Business Woman Podcast", "an astronaut riding a horse, oil painting"]
SEEDS = [0, 1, 2, 3]
SETTINGS = SamplerSettings(steps=5, height=32, width=32, end_map_steps=(2,))


@pytest.fixture(scope="module")
def full_run(tiny_model):
    """The same four images sampled without stopping, with step 2's end-token maps recorded."""
    return sample_with_capture(tiny_model, PROMPTS, SEEDS, SETTINGS)


def _rule(detector: str, threshold: float) -> StopRule:
    return StopRule(step=2, detector=detector, layers=("down_blocks.0",), T=30, threshold=threshold)


@pytest.mark.parametrize("detector", early.early_detector_names())
def test_the_signal_at_step_k_is_the_one_the_trace_gives(tiny_model, full_run, detector, same_up_to_float_order):
    out = sample_with_early_stop(tiny_model, PROMPTS, SEEDS, SETTINGS, _rule(detector, np.inf))
    maps = {layer: m.numpy() for layer, m in full_run.end_maps_by_step[2].items()}
    expected = _rule(detector, np.inf).signal(full_run.delta_sq.numpy(), maps)
    same_up_to_float_order(out.signal, expected)
    # a windowed detector (LD) over the 3 steps computed so far
    assert _rule(detector, np.inf).window == (3 if DETECTORS[detector].uses_T else 0)
    # nothing stopped: every image is the unguarded sampler's, and ran every step
    assert not out.stopped.any() and (out.steps_run == 5).all()
    same_up_to_float_order(out.latents, full_run.latents)
    assert all(image is not None for image in out.images)


def test_stopped_images_leave_the_batch_and_the_others_are_unchanged(tiny_model, full_run, same_up_to_float_order):
    signal = sample_with_early_stop(tiny_model, PROMPTS, SEEDS, SETTINGS, _rule("LD", np.inf), decode=False).signal
    threshold = float(np.median(signal))
    out = sample_with_early_stop(tiny_model, PROMPTS, SEEDS, SETTINGS, _rule("LD", threshold))
    assert list(out.stopped) == list(signal > threshold) and out.stopped.sum() == 2
    assert list(out.steps_run) == [3 if s else 5 for s in out.stopped]  # k + 1 steps for a stopped image
    go = ~out.stopped
    same_up_to_float_order(out.latents[go], full_run.latents[go])
    assert [image is None for image in out.images] == list(out.stopped)
    # a stopped image keeps its latents after step k: not the finished image
    assert (out.latents[out.stopped] - full_run.latents[out.stopped]).abs().max() > 1e-3


def test_stopped_images_restart_under_a_padding_mitigation(tiny_model, same_up_to_float_order):
    pad = PadMitigation("pad_mask")
    out = sample_with_early_stop(tiny_model, PROMPTS, SEEDS, SETTINGS, _rule("LD", -np.inf),
                                 restart=lambda prompts: pad_mitigated_embedding(tiny_model, prompts, pad))
    assert out.stopped.all() and out.restarted.all() and (out.steps_run == 3 + 5).all()
    mitigated = sample_with_capture(tiny_model, PROMPTS, SEEDS, SETTINGS, record=False,
                                    cond=pad_mitigated_embedding(tiny_model, PROMPTS, pad))
    same_up_to_float_order(out.latents, mitigated)


def test_rule_and_sampler_refuse_bad_settings(tiny_model):
    with pytest.raises(ValueError, match="stopping signal 'D' is not one of"):
        StopRule(2, "D", ("*",), 1, 0.0)
    with pytest.raises(ValueError, match="stop step 4 must be before the last of 5 steps"):
        sample_with_early_stop(tiny_model, PROMPTS, SEEDS, SETTINGS, StopRule(4, "LD", ("*",), 1, 0.0))
    with pytest.raises(ValueError, match="unknown layer 'mid'"):
        sample_with_early_stop(tiny_model, PROMPTS, SEEDS, SETTINGS, StopRule(2, "LD", ("mid",), 1, 0.0))


@pytest.fixture
def calibration(tmp_path, compose):
    """A finished detection job on the tiny set with steps 0 and 2's maps (traces in the default float16)."""
    cfg = compose("detect", "debug=default", "sampler.end_map_steps=[0,2]", "early.fpr=[0.0,0.5]")
    detect.run(cfg, tmp_path / "calibration")
    return tmp_path / "calibration"


def test_guard_job_takes_the_simulations_decisions(tmp_path, compose, calibration):
    simulated = pd.DataFrame(json.loads((calibration / "metrics.json").read_text())["early_stopping"])
    assert len(simulated) == 6
    for row in simulated[simulated.step < 4].itertuples():  # the last step saves nothing: not a stop step
        folder = tmp_path / f"guard-{row.step}-{row.fpr_target}"
        guard.run(compose("guard", "debug=default", f"guard.calibration={calibration}", f"guard.step={row.step}",
                          f"guard.fpr={row.fpr_target}"), folder)
        job = jobfolder.read_job(folder)
        table, result = job.table(), job.metrics
        assert result["rule"]["threshold"] == pytest.approx(row.threshold)
        # memorized generations: all of them are evaluated by the simulation, so the caught rates are the same
        assert result["caught"] == pytest.approx(row.caught)
        calib = early.calibration_split(table.prompt_id, table.memorized)
        negative = ~table.memorized.to_numpy(bool)
        assert table.stopped[~calib & negative].mean() == pytest.approx(row.false_stop_rate)
        # the calibration generations too, though the guard recomputes their scores in float32 and the
        # calibration job read them from float16 traces: the threshold sits between calibration scores
        assert table.stopped[calib].mean() == pytest.approx(row.calibration_fpr)
    folder = tmp_path / "guard-2-0.5"
    table, result = jobfolder.read_job(folder).table(), jobfolder.read_job(folder).metrics
    assert list(table.steps_run) == [3 if s else 5 for s in table.stopped]
    assert result["steps_saved_fraction"] == pytest.approx(1 - table.steps_run.sum() / (5 * len(table)))
    stopped_ids = (folder / "stopped_ids.txt").read_text().split()
    assert stopped_ids == sorted(set(table.prompt_id[table.stopped]))
    images = sorted(p.name for p in (folder / "images").glob("*.png"))
    assert len(images) == int((~table.stopped).sum())
    # the report has the guard job's row beside the calibration job
    files = write_report([tmp_path], tmp_path / "report")
    board = pd.read_csv(files["guard.csv"])
    assert len(board) == 4 and list(board.restart) == ["stop"] * 4
    assert int(table.stopped.sum()) in list(board.stopped)
    assert "Guarded generation" in files["leaderboard.html"].read_text()


def test_guard_refuses_a_threshold_calibrated_elsewhere(tmp_path, compose, calibration):
    base = ("guard", "debug=default", f"guard.calibration={calibration}")
    cases = [((), "guard.calibration is required"),
             (("guard.step=1",), r"calibrated no threshold at step 1, FPR 0.05; it has \(step, FPR\) \[\(0, 0.0\)"),
             (("guard.fpr=0.5", "guard.step=2", "sampler.steps=6"), "calibrated with other settings: sampler.steps"),
             (("guard.fpr=0.5", "guard.step=2", "sampler.guidance=3"), "other settings: sampler.guidance"),
             (("guard.fpr=0.5", "guard.step=2", "guard.restart.method=wen"), "'wen' is not an inference-time"),
             (("guard.fpr=0.5", "guard.step=2", "guard.restart.method=nonsense"), "'nonsense' is not a mitigation"),
             (("guard.fpr=0.0", "guard.step=4"), "guard.step=4 must be before the last of sampler.steps=5")]
    for extra, message in cases:
        overrides = [o for o in base if not (extra == () and o.startswith("guard.calibration"))] + list(extra)
        with pytest.raises(ValueError, match=message):
            guard.run(compose(*overrides), tmp_path / "job")
        assert not (tmp_path / "job" / "metrics.json").exists()
    with pytest.raises(ValueError, match="not a finished detection job"):
        rule_from_job(jobfolder.Job(tmp_path, "mitigate", {}, {}), 2, 0.5)


def test_one_calibration_folder_is_one_job_however_it_is_spelt(tmp_path, compose, monkeypatch):
    (tmp_path / "cal").mkdir()
    monkeypatch.chdir(tmp_path)
    spellings = ["cal", "./cal/", str(tmp_path / "cal"), str(tmp_path / "cal") + "/"]
    configs = [guard.same_calibration_spelling(compose("guard", f"guard.calibration={c}")) for c in spellings]
    assert {c.guard.calibration for c in configs} == {str((tmp_path / "cal").resolve())}
    assert guard.same_calibration_spelling(compose("guard")).guard.calibration is None
