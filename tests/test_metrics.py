import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from benchmark.measures import metrics


def test_tpr_at_fpr_follows_wens_rule_by_hand():
    # 2 positives, 100 negatives; one negative outscores both positives, one positive beats all the rest
    labels = np.r_[np.ones(2), np.zeros(100)].astype(bool)
    scores = np.r_[[5.0, 3.0], [10.0], np.linspace(0, 2, 99)]
    # ROC: (0,0) -> (0.01, 0) -> (0.01, 1.0) ...; the last point with FPR strictly below 1% is (0, 0)
    assert metrics.tpr_at_fpr(labels, scores) == 0.0
    assert metrics.tpr_at_fpr(labels, scores, fpr=0.02) == 1.0


def test_same_as_sklearn_on_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = int(rng.integers(10, 300))
        labels = rng.random(n) < 0.3
        if labels.all() or not labels.any():
            continue
        scores = np.round(rng.normal(size=n) + labels, int(rng.integers(0, 3)))  # ties included
        fpr, tpr, _ = roc_curve(labels, scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert metrics.tpr_at_fpr(labels, scores) == pytest.approx(tpr[np.where(fpr < 0.01)[0][-1]], abs=1e-12)
        f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
        assert metrics.best_f1(labels, scores) == pytest.approx(f1.max(), abs=1e-12)


def test_replicate_rows_same_as_sklearn_row_by_row():
    # the bootstrap's batched path: every row its own ROC, with ties and rows of one or two distinct scores
    rng = np.random.default_rng(2)
    labels = np.r_[np.ones(30), np.zeros(120)].astype(bool)
    scores = np.round(rng.normal(size=150) + labels, 1)
    idx = np.concatenate([rng.choice(30, (200, 30)), rng.choice(np.arange(30, 150), (200, 120))], axis=1)
    rows_l, rows_s = labels[idx], scores[idx]
    rows_s[0] = 0.0
    rows_s[1] = rows_l[1]
    got = metrics._metric_rows(rows_l, rows_s)
    for r in range(len(idx)):
        fpr, tpr, _ = roc_curve(rows_l[r], rows_s[r])
        assert got["auc"][r] == pytest.approx(roc_auc_score(rows_l[r], rows_s[r]), abs=1e-12)
        assert got["tpr_at_1pct_fpr"][r] == pytest.approx(tpr[np.where(fpr < 0.01)[0][-1]], abs=1e-12)
        precision, recall, _ = precision_recall_curve(rows_l[r], rows_s[r])
        f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
        assert got["f1"][r] == pytest.approx(f1.max(), abs=1e-12)


def test_one_or_two_distinct_scores_as_sklearn():
    labels = np.array([True, False, True, False])
    for scores in (np.zeros(4), np.array([1.0, 0.0, 0.0, 0.0])):
        fpr, tpr, _ = roc_curve(labels, scores)
        assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
        assert metrics.tpr_at_fpr(labels, scores) == pytest.approx(tpr[np.where(fpr < 0.01)[0][-1]])


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50), np.zeros(150)].astype(bool)
    scores = rng.normal(size=200) + labels
    m = metrics.detection_metrics(labels, scores, n_boot=300)
    for name in ("auc", "tpr_at_1pct_fpr", "f1"):
        assert m[f"{name}_lo"] <= m[name] <= m[f"{name}_hi"]
    assert 0.6 < m["auc"] < 0.9 and m["auc_hi"] - m["auc_lo"] > 0.02
    assert metrics.detection_metrics(labels, scores, n_boot=300) == m  # seeded


def test_nan_and_single_class_are_named():
    with pytest.raises(ValueError, match=r"LD\[all\].*non-finite.*position 1"):
        metrics.detection_metrics([1, 0, 0], [0.5, np.nan, 0.1], n_boot=0, what="LD[all]")
    with pytest.raises(ValueError, match="both positives and negatives"):
        metrics.roc_auc([1, 1], [0.1, 0.2])


def test_localization_metrics():
    truth = np.zeros((8, 8), bool)
    truth[:4, :4] = True
    soft = truth * 0.8 + 0.1
    assert metrics.pixel_auroc(soft, truth) == 1.0
    assert metrics.iou(metrics.binarize(soft, "otsu"), truth) == 1.0
    assert metrics.iou(metrics.binarize(soft, "top:0.25"), truth) == 1.0
    assert metrics.iou(metrics.binarize(soft, "mean"), truth) == 1.0
    assert metrics.iou(np.ones_like(truth), truth) == pytest.approx(0.25)
    assert metrics.pixel_auroc(1 - soft, truth) == 0.0
    with pytest.raises(ValueError, match="unknown binarisation"):
        metrics.binarize(soft, "median")


def test_localization_control_exposes_a_spatially_biased_map():
    from benchmark.localization.evaluation import Truth, localization_table
    rng = np.random.default_rng(0)
    corner, centre = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    corner[:4, :4], centre[2:6, 2:6] = True, True
    masks = {"local-a": corner, "local-b": centre}
    # memorized generations bright on their own region; never-trained ones always bright at the centre
    maps = [masks[p] + 0.1 * rng.random((8, 8)) for p in masks] + [centre + 0.1 * rng.random((8, 8))] * 3
    ids = list(masks) + ["heldout-0", "heldout-1", "heldout-2"]
    truth = {p: Truth(np.zeros((3, 8, 8)), m) for p, m in masks.items()}
    table = localization_table({"l": np.stack(maps)}, ids, truth, {"all": ["l"]}).set_index("layers")
    assert table.loc["all", "pixel_auroc"] == 1.0 and table.loc["all", "n_control"] == 3
    # against the corner mask the centre map scores below 1, against the centre mask 1: mean well above 0.5
    assert 0.6 < table.loc["all", "control_auroc"] < 1.0
    assert table.loc["all-ones (floor)", "control_auroc"] == 0.5
    assert table.loc["all-ones (floor)", "iou"] == table.loc["all-ones (floor)", "control_iou"] == pytest.approx(0.25)
