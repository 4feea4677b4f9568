"""Early-step BE (benchmark/early/step_detection.py) and the localization leaderboard, on constructed numbers and the
tiny model."""
import json

import numpy as np
import pandas as pd
import pytest

from benchmark.data.prompts import Truth
from benchmark.detectors.detection import TraceArrays
from benchmark.early import step_detection as early
from benchmark.localization import evaluation
from runners.detect import run


def test_calibrate_by_hand():
    negatives = np.arange(1, 11) / 10  # 0.1 .. 1.0
    # halfway between the largest score kept and the smallest one stopped
    assert early.calibrate(negatives, 0.1) == pytest.approx(0.95)  # one of ten may exceed it: 1.0 stops, 0.9 not
    assert early.calibrate(negatives, 0.01) == pytest.approx(1.05)  # none may: the same margin above the largest
    assert early.calibrate(negatives, 0.25) == pytest.approx(0.85)  # floor(2.5) = 2 may
    assert early.calibrate([0.3, 0.5, 0.5, 0.2], 0.25) == pytest.approx(0.5)  # a tie at the boundary: both kept
    assert early.calibrate([0.4], 0.5) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="fpr=1"):
        early.calibrate(negatives, 1.0)


def _scores(values: dict[str, list[float]], step: int) -> pd.DataFrame:
    kinds = {"g0": "global", "l0": "local"}
    return pd.DataFrame([{"prompt_id": p, "kind": kinds.get(p, "none"), "memorized": p in kinds, "seed": s,
                          "step": step, "detector": "BE_intensity", "layers": "all", "T": 0, "score": v}
                         for p, vs in values.items() for s, v in enumerate(vs)])


def test_early_stopping_counts_by_hand():
    # negatives n0, n2 calibrate (sorted ids, every other one); n1, n3 are evaluated
    values = {"n0": [0.1, 0.2], "n1": [0.3, 0.6], "n2": [0.4, 0.5], "n3": [0.0, 0.1],
              "g0": [0.7, 0.8], "l0": [0.47, 0.3]}
    table = early.early_stopping(_scores(values, 4), "BE_intensity", "all", 1, [0.0, 0.25], n_steps=10)
    strict, loose = table.iloc[0], table.iloc[1]
    # fpr 0: threshold = the largest calibration score 0.5 plus half its gap to the next, 0.4; stopped: g0 x2, n1's 0.6
    assert strict.threshold == pytest.approx(0.55) and strict.calibration_fpr == 0
    assert strict.caught == pytest.approx(0.5) and strict.caught_global == 1 and strict.caught_local == 0
    assert strict.false_stop_rate == pytest.approx(0.25)
    # 3 stopped at step 4 of 10 save 5 steps each, over 8 evaluated generations (4 memorized + 4 negatives)
    assert strict.steps_saved_mean == pytest.approx(15 / 8) and strict.steps_saved_fraction == pytest.approx(15 / 80)
    assert (strict.n_memorized, strict.n_eval_negatives, strict.n_calibration) == (4, 4, 4)
    # fpr 0.25: floor(1) = 1 calibration score may exceed: threshold between 0.4 and 0.5; l0's 0.47 is caught now
    assert loose.threshold == pytest.approx(0.45) and loose.calibration_fpr == pytest.approx(0.25)
    assert loose.caught_local == pytest.approx(0.5) and loose.caught == pytest.approx(0.75)


def test_early_stopping_needs_two_negative_prompts():
    with pytest.raises(ValueError, match="at least 2 non-memorized prompts"):
        early.early_stopping(_scores({"n0": [0.1], "g0": [0.9]}, 0), "BE_intensity", "all", 1, [0.1], 5)
    with pytest.raises(ValueError, match="early.signal.detector 'D'"):
        early.check_signal({"detector": "D", "layers": "all", "T": 1}, {"all": ["*"]}, [0.1])


def _arrays(n: int = 2, steps: int = 5) -> TraceArrays:
    rows = pd.DataFrame({"prompt_id": ["m", "n"][:n], "kind": ["global", "none"][:n], "memorized": [True, False][:n],
                         "seed": [0] * n})
    delta = np.ones((n, steps, 4, 4))
    maps = {"a": np.zeros((n, 2, 2)), "b": np.zeros((n, 2, 2))}
    return TraceArrays(rows, delta, maps, {}, np.array([3] * n), {})


def test_score_by_step_reads_each_steps_maps():
    arrays = _arrays()
    step_maps = {0: {"a": np.full((2, 2, 2), 0.1), "b": np.full((2, 2, 2), 0.3)},
                 4: {"a": np.full((2, 2, 2), 0.5), "b": np.full((2, 2, 2), 0.7)}}
    table = early.score_by_step(arrays, step_maps, {"all": ["*"], "a": ["a"]}, [1, 5])

    def pick(**kw):
        return table.loc[np.logical_and.reduce([table[k] == v for k, v in kw.items()]), "score"].to_numpy()

    assert pick(step=0, detector="BE_intensity", layers="all") == pytest.approx([0.2, 0.2])
    assert pick(step=4, detector="BE_intensity", layers="a") == pytest.approx([0.5, 0.5])
    # LD's window at step 0 is capped at 1 step; at step 4 both windows exist. A constant mask cancels: LD = D = 4
    assert set(table[(table.step == 0) & (table.detector == "LD")]["T"]) == {1}
    assert set(table[(table.step == 4) & (table.detector == "LD")]["T"]) == {1, 5}
    assert pick(step=4, detector="LD", layers="all", T=5) == pytest.approx([4.0, 4.0])


def _truth():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    return {"m": Truth(np.zeros((3, 4, 4)), mask)}, mask


def test_leaderboard_rows_and_intervals():
    truth, mask = _truth()
    ids = ["m", "m", "m", "n"]
    perfect = np.stack([mask.astype(float)] * 4)
    noisy = perfect.copy()
    noisy[1] = np.rot90(mask).astype(float)  # one of the three local generations misses: IoU 0
    board = evaluation.localization_leaderboard({"perfect": perfect, "noisy": noisy,
                                                 "all-ones (floor)": np.ones((4, 4, 4))},
                                       ids, truth, n_boot=200, control_of="perfect").set_index("localizer")
    assert board.loc["perfect", "iou"] == 1 and board.loc["perfect", "iou_lo"] == 1
    assert board.loc["noisy", "iou"] == pytest.approx(2 / 3)
    assert board.loc["noisy", "iou_lo"] < 2 / 3 < board.loc["noisy", "iou_hi"] == 1  # resampling 3 generations
    assert board.loc["all-ones (floor)", "iou"] == pytest.approx(0.25)
    assert board.loc["all-ones (floor)", "pixel_auroc"] == 0.5
    # "n" has no ground truth: the control scores its map against the planted mask
    assert board.loc["unrelated-mask control: perfect", "n"] == 1
    assert board.loc["perfect", "control_iou"] == 1 and board.loc["perfect", "n"] == 3


def test_leaderboard_scores_a_partial_map_on_the_generations_it_covers():
    truth, mask = _truth()
    ids = ["m", "m", "m", "n"]
    partial = np.stack([np.rot90(mask).astype(float), mask.astype(float), mask.astype(float), mask.astype(float)])
    partial[1:3] = np.nan  # computed for the first image of each prompt only (an extra pass with n = 1)
    board = evaluation.localization_leaderboard({"partial": partial, "none": np.full((4, 4, 4), np.nan)}, ids, truth,
                                       n_boot=0).set_index("localizer")
    assert list(board.index) == ["partial"]  # no generation covered: no row, not a NaN one
    assert board.loc["partial", "n"] == 1 and board.loc["partial", "iou"] == 0  # only row 0, which misses
    assert board.loc["partial", "n_control"] == 1 and board.loc["partial", "control_iou"] == 1


def test_oracle_best_word_and_registered_localizers():
    _, mask = _truth()
    # tokens: start, word 1 (off the mask), word 2 (on it), end; the oracle takes word 2
    tokens = np.stack([np.ones((4, 4)), np.rot90(mask).astype(float), mask.astype(float), np.ones((4, 4))])
    oracle = evaluation.oracle_word_maps({"a": tokens[None]}, np.array([3]), ["a"], (4, 4))
    assert np.array_equal(oracle([0], mask[None]), mask[None].astype(float))
    maps = evaluation.leaderboard_maps({"a": mask[None].astype(float)}, {"all": ["*"]}, (4, 4),
                                       {"oracle best word": oracle})
    assert list(maps) == ["BE [all]", "oracle best word", "all-ones (floor)"]


def test_detect_job_writes_early_tables(tmp_path, compose):
    cfg = compose("detect", "debug=default", "sampler.end_map_steps=[0,2]", "early.fpr=[0.0,0.5]")
    run(cfg, tmp_path / "job")
    result = json.loads((tmp_path / "job" / "metrics.json").read_text())
    det = pd.DataFrame(result["early_detection"])
    assert set(det.step) == {0, 2, 4} and set(det.detector) == {"BE_intensity", "LD"}
    assert set(det[det.step == 0]["T"]) == {0, 1}  # LD's windows capped at k + 1
    stop = pd.DataFrame(result["early_stopping"])
    assert len(stop) == 6 and set(stop.fpr_target) == {0.0, 0.5}
    assert (stop.calibration_fpr <= stop.fpr_target).all()
    assert "Early stopping" in (tmp_path / "job" / "report.md").read_text()


def test_pixel_aurocs_equal_the_roc_auc_of_each_pair():
    from benchmark.measures.metrics import pixel_auroc

    rng = np.random.default_rng(0)
    truths = rng.random((6, 8, 8)) > 0.6
    soft = rng.integers(0, 4, (6, 8, 8)).astype(float)  # many ties
    soft[0] = 1.0  # a constant mask: 0.5
    expected = [pixel_auroc(m, t) if m.std() > 0 else 0.5 for m, t in zip(soft, truths)]
    assert evaluation.pixel_aurocs(soft, truths) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="truth mask 1 is all one class"):
        evaluation.pixel_aurocs(soft[:2], np.stack([truths[0], np.zeros((8, 8), bool)]))


def test_a_bad_stopping_signal_fails_before_sampling(tmp_path, compose):
    cfg = compose("detect", "debug=default", "sampler.end_map_steps=[1]", "early.signal.layers=nowhere")
    with pytest.raises(ValueError, match="early.signal.layers 'nowhere' is not a layer set"):
        run(cfg, tmp_path / "job")
    assert not (tmp_path / "job" / "metrics.json").exists()


def test_early_detectors_are_those_that_read_the_be_mask_and_the_view_refuses_others():
    from benchmark.registry import DETECTORS

    names = early.early_detector_names()
    assert {"BE_intensity", "LD"} <= set(names) and "D" not in names  # D reads no mask: the same at every step
    assert all("mask" in DETECTORS[n].inputs or "end_maps" in DETECTORS[n].trace_fields for n in names)
    arrays = _arrays()
    view = early.step_view(arrays.delta_sq, arrays.end_maps, 2)
    assert view.delta_sq.shape[1] == 3  # steps 0..2 only
    with pytest.raises(ValueError, match="detector 'D' cannot run before the last step"):
        early.step_signal("D", view, ["*"], 1)
    with pytest.raises(ValueError, match="step 9 needs 10 steps of delta_sq, got 5"):
        early.step_view(arrays.delta_sq, arrays.end_maps, 9)
