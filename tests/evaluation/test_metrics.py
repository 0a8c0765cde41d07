"""Metrics from probabilities, checked against hand-computed values."""

import math

import numpy as np
import pytest

from octa3d.evaluation.metrics import (bootstrap_ci, bootstrap_indices, classification_metrics, confusion,
                                       resampling_units, roc_auc)


def test_binary_metrics_hand_computed():
    y = np.array([0, 0, 0, 1, 1])
    # P(class 1): the positives are ranked 0.6 and 0.4; negatives 0.1, 0.3, 0.45
    p1 = np.array([0.1, 0.3, 0.45, 0.6, 0.4])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs)
    # hard predictions: [0,0,0,1,0] -> accuracy 4/5, sensitivity 1/2, specificity 1 -> balanced 0.75
    assert m["accuracy"] == 0.8
    assert m["balanced_accuracy"] == 0.75
    # AUC from probabilities: pairs (pos, neg) correctly ordered: 0.6 beats all 3, 0.4 beats 0.1 and 0.3 -> 5/6
    assert math.isclose(m["auc"], 5 / 6)
    # the hard-label "AUC" the old code reported would be 0.75 -- different, which is the point
    hard = np.stack([1 - (p1 > 0.5), (p1 > 0.5)], axis=1).astype(float)
    assert math.isclose(roc_auc(y, hard), 0.75)
    assert confusion(y, probs).tolist() == [[3, 0], [1, 1]]


def test_multiclass_auc_ovr_and_missing_class():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    m = classification_metrics(y, probs)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["f1_macro"] == 1.0
    assert math.isnan(roc_auc(np.array([1, 1]), probs[:2]))


# ------------------------------------------------------------------------------------------------ bootstrap
def _noisy_binary(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    p1 = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.3, n), 0.01, 0.99)
    return y, np.stack([1 - p1, p1], axis=1)


def test_bootstrap_resamples_whole_patient_groups_and_never_lacks_a_class():
    # 3 classes; patients P1 (2 images, class 0), P2 (3 images, class 1), singletons; a rare class of one patient
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0, 2, 1, 0])
    groups = ["P1", "P1", "P2", "P2", "P2", "a", "b", "c", "P9", None, ""]
    for rows in bootstrap_indices(y, 300, seed=3, groups=groups):
        counts = np.bincount(rows, minlength=len(y))
        assert counts[0] == counts[1]  # the two images of P1: in or out together, as often
        assert counts[2] == counts[3] == counts[4]
        assert set(y[rows]) == {0, 1, 2}  # stratified: every class in every resample
    units = resampling_units(y, groups)
    assert units["unit"] == "patient group" and units["n_groups"] == 8 and units["n_rows"] == 11
    assert units["units_per_class"] == {0: 4, 1: 3, 2: 1}
    assert resampling_units(y)["unit"] == "subject" and resampling_units(y)["n_groups"] == 11
    # every image its own group: the same as no groups
    assert resampling_units(y, [str(i) for i in range(11)])["unit"] == "subject"


def test_bootstrap_without_groups_is_stratified():
    y = np.array([0] * 10 + [1] * 2)  # unstratified, 1 in 6 resamples of 12 would have no positive
    for rows in bootstrap_indices(y, 500, seed=0):
        assert len(rows) == 12 and (y[rows] == 1).sum() == 2


def test_cluster_bootstrap_gives_duplicated_images_the_width_of_one_image_per_patient():
    """Each patient imaged twice (identical predictions): the cluster bootstrap reproduces the intervals of one
    image per patient exactly, while resampling images independently pretends twice the data (narrower)."""
    y, probs = _noisy_binary(30)
    y2, probs2 = np.repeat(y, 2), np.repeat(probs, 2, axis=0)
    groups = np.repeat([f"patient-{i}" for i in range(30)], 2)
    one_per_patient = bootstrap_ci(y, probs, 400, seed=5)
    cluster = bootstrap_ci(y2, probs2, 400, seed=5, groups=list(groups))
    naive = bootstrap_ci(y2, probs2, 400, seed=5)
    for key in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"):
        assert cluster[key] == pytest.approx(one_per_patient[key]), key
    width = {name: ci["balanced_accuracy"][1] - ci["balanced_accuracy"][0]
             for name, ci in (("cluster", cluster), ("naive", naive))}
    assert width["naive"] < 0.85 * width["cluster"]
    assert cluster["n_valid"]["auc"] == 400  # stratified: AUC defined in every resample


def test_predictions_csv_cannot_run_formulas(tmp_path):
    """Subject IDs and labels from users' files are text cells a spreadsheet shows, never runs; probabilities stay
    numbers."""
    import csv

    from octa3d.evaluation.metrics import predictions_frame
    from octa3d.utils.io import atomic_write_csv, read_csv

    ids = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+1", "-2", "@SUM(A1)", "10001"]
    names = ["NORMAL", "-DR"]
    y = np.array([0, 1, 0, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    frame = predictions_frame(ids, y, probs, names)
    path = atomic_write_csv(tmp_path / "predictions.csv", frame)
    rows = list(csv.reader(path.open(encoding="utf-8", newline="")))  # the cells a spreadsheet gets
    assert rows[0] == ["subject", "label", "p_NORMAL", "p_-DR", "prediction", "correct"]
    assert rows[1][0] == "'" + ids[0] and rows[2] == ["'+1+1", "'-DR", "0.2", "0.8", "'-DR", "True"]
    assert rows[3][:4] == ["-2", "NORMAL", "0.6", "0.4"]  # a number-like ID is no formula: unchanged
    assert rows[4][0] == "'@SUM(A1)" and rows[5][0] == "10001"
    back = read_csv(path, dtype={"subject": str})
    assert back["subject"].tolist() == ids and back["label"].tolist() == ["NORMAL", "-DR"] * 2 + ["NORMAL"]


def test_multiclass_summary_shows_recall_per_class_confusion_matrix_and_calls_out_a_dead_class():
    from octa3d.evaluation.metrics import evaluation_metrics, summary_lines

    names = ["NORMAL", "AMD", "CNV", "CSC"]
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 0, 0, 2, 2, 2, 3, 3])  # AMD never right
    probs = np.full((8, 4), 0.1)
    probs[np.arange(8), pred] = 0.7
    m = evaluation_metrics(y, probs, names)
    m["class_names"] = names
    text = "\n".join(summary_lines(m))
    assert "recall per class   NORMAL 1.00 (n=2), AMD 0.00 (n=2), CNV 1.00 (n=2), CSC 1.00 (n=2)" in text
    assert "    AMD         1      0      1      0" in text  # the AMD row of the confusion matrix
    assert "WARNING: recall 0 for AMD" in text
    binary = evaluation_metrics(np.array([0, 1, 0, 1]), np.array([[.8, .2], [.3, .7], [.6, .4], [.4, .6]]),
                                ["NORMAL", "CNV"])
    assert not any("recall per class" in line for line in summary_lines(binary))


def test_bootstrap_and_summary_carry_the_calibration_metrics():
    """Issue 17: Brier, ECE, slope/intercept and AURC get cluster-bootstrap CIs and summary lines."""
    from octa3d.evaluation.metrics import bootstrap_ci, evaluation_metrics, summary_lines

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    p1 = np.clip(np.where(y == 1, 0.65, 0.35) + rng.normal(0, 0.2, 60), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)
    m = evaluation_metrics(y, probs, ["a", "b"])
    m["ci95"] = bootstrap_ci(y, probs, 200, seed=1, groups=[f"g{i // 2}" for i in range(60)])
    for key in ("brier", "ece", "calibration_slope", "calibration_intercept", "aurc"):
        low, high = m["ci95"][key]
        assert low <= m[key] <= high, key
    assert m["ece_bins"] == 6
    text = "\n".join(summary_lines(m))
    assert "brier score" in text and "(6 equal-mass bins)" in text and "calibration slope" in text
    assert "at 90 % coverage accuracy" in text and "54 most confident subjects" in text
    multi = evaluation_metrics([0, 1, 2], np.eye(3), ["a", "b", "c"])
    assert "calibration_slope" not in multi and "calibration slope" not in "\n".join(summary_lines(multi))


def test_chance_report_names_the_metrics_whose_ci_includes_chance():
    from octa3d.evaluation.metrics import chance_lines, chance_report

    m = {"balanced_accuracy": 0.54, "auc": 0.65, "kappa": 0.08, "n_subjects": 24,
         "ci95": {"balanced_accuracy": [0.40, 0.68], "auc": [0.51, 0.80], "kappa": [-0.2, 0.35]}}
    m["chance"] = chance_report(m, 2)
    assert m["chance"]["ci_includes_chance"] == ["balanced_accuracy", "kappa"]
    line = chance_lines(m)[0]
    assert "WARNING" in line and "balanced accuracy 0.540 [0.400, 0.680] (chance 0.50)" in line and "24 subjects" in line
    four = {"balanced_accuracy": 0.9, "ci95": {"balanced_accuracy": [0.8, 0.97], "auc": [float("nan")] * 2}}
    assert chance_report(four, 4)["ci_includes_chance"] == [] and chance_lines({**four, "chance": {}}) == []
