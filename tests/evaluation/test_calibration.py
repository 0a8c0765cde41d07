"""Calibration metrics, temperature scaling and selective prediction against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from octa3d.evaluation.calibration import (apply_temperature, at_coverage, aurc, brier_score, calibration_fit,
                                           calibration_report, expected_calibration_error, fit_temperature, n_bins_for,
                                           reliability_bins, risk_coverage)


def _binary(p1):
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=1)


def test_brier_binary_and_multiclass_by_hand():
    # binary: ((0.8-1)^2 + (0.4-0)^2) / 2 = (0.04 + 0.16) / 2
    assert brier_score([1, 0], _binary([0.8, 0.4])) == pytest.approx(0.1)
    # multi-class: row 1 (0.7-1)^2 + 0.2^2 + 0.1^2 = 0.14; row 2 (true class 2) 0.25^2 + 0.25^2 + 0.5^2
    probs = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    assert brier_score([0, 2], probs) == pytest.approx((0.14 + (0.0625 + 0.0625 + 0.25)) / 2)


def test_ece_equal_mass_bins_by_hand():
    # sorted scores .1 .2 | .7 .9; outcomes 0 1 | 1 1 -> |.15-.5| = .35 and |.8-1| = .2, each half the subjects
    p = _binary([0.7, 0.1, 0.9, 0.2])
    y = [1, 0, 1, 1]  # aligned with the scores .7 .1 .9 .2 -> sorted outcomes 0 1 1 1
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.2)
    bins = reliability_bins(y, p, n_bins=2)
    assert bins["count"] == [2, 2] and bins["observed"] == [0.5, 1.0]
    assert bins["mean_score"] == pytest.approx([0.15, 0.8])
    # one bin: |mean score - positive rate| = |0.475 - 0.75|
    assert expected_calibration_error(y, p, n_bins=1) == pytest.approx(0.275)


def test_ece_multiclass_uses_top_label_confidence():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    y = [0, 0, 2, 0]  # correct, wrong, correct, correct; confidences .6 .7 .8 .5
    # one bin: mean confidence 0.65 vs accuracy 0.75
    assert expected_calibration_error(y, probs, n_bins=1) == pytest.approx(0.1)
    assert reliability_bins(y, probs, n_bins=1)["kind"] == "top-label"


def test_bin_count_rule():
    assert [n_bins_for(n) for n in (0, 5, 19, 30, 99, 100, 1000)] == [1, 1, 1, 3, 9, 10, 10]


def test_calibration_slope_intercept_by_hand():
    # two score levels, saturated model: a + b*logit(.5) = logit(1/4), a + b*logit(.75) = logit(3/4)
    # -> a = -ln 3, b = 2 ln 3 / ln 3 = 2
    p = [0.5] * 4 + [0.75] * 4
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    a, b = calibration_fit(y, p)
    assert a == pytest.approx(-math.log(3), abs=1e-8)
    assert b == pytest.approx(2.0, abs=1e-8)


def test_calibration_fit_matches_unpenalised_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 200)
    y = (rng.uniform(size=200) < p ** 1.5).astype(int)
    a, b = calibration_fit(y, p)
    z = np.log(p / (1 - p))[:, None]
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(z, y)
    assert a == pytest.approx(ref.intercept_[0], abs=1e-4)
    assert b == pytest.approx(ref.coef_[0, 0], abs=1e-4)


def test_calibration_fit_undefined_cases_are_nan():
    assert all(math.isnan(v) for v in calibration_fit([1, 1, 1], [0.2, 0.5, 0.9]))  # one outcome class
    assert all(math.isnan(v) for v in calibration_fit([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]))  # separated
    assert all(math.isnan(v) for v in calibration_fit([0, 1, 0, 1], [0.5] * 4))  # one score


def test_aurc_perfect_ranking_is_the_optimum():
    n, errors = 10, 2
    y = np.zeros(n, dtype=int)
    conf = np.linspace(0.99, 0.6, n)
    p1 = 1 - conf
    p1[-errors:] = conf[-errors:]  # the two least confident are the wrong ones
    probs = _binary(p1)
    # risk is 0 until the first error enters: sum over k = 9, 10 of (k - 8) / k, averaged over the 10 coverages
    optimum = (1 / 9 + 2 / 10) / 10
    assert aurc(y, probs) == pytest.approx(optimum)
    curve = risk_coverage(y, probs)
    assert curve["risk"][-1] == pytest.approx(errors / n)
    assert at_coverage(curve, 0.8) == {"coverage": 0.8, "n_kept": 8, "accuracy": 1.0, "balanced_accuracy": 1.0}


def test_aurc_random_ranking_is_close_to_the_error_rate():
    rng = np.random.default_rng(1)
    n, rate = 400, 0.25
    y = np.zeros(n, dtype=int)
    wrong = rng.permutation(n) < int(rate * n)
    conf = rng.uniform(0.55, 1.0, n)  # confidence unrelated to being wrong
    probs = _binary(np.where(wrong, conf, 1 - conf))
    vals = [aurc(y, probs, confidence=rng.uniform(size=n)) for _ in range(50)]
    assert np.mean(vals) == pytest.approx(rate, abs=0.02)
    # a perfect ranking does far better: about r + (1 - r) ln(1 - r)
    assert aurc(y, probs, confidence=~wrong) == pytest.approx(rate + (1 - rate) * math.log(1 - rate), abs=0.01)


def test_balanced_accuracy_on_the_kept_subjects():
    probs = _binary([0.9, 0.1, 0.8, 0.4])  # confidences .9 .9 .8 .6
    y = [1, 0, 0, 1]  # correct, correct, wrong, wrong
    curve = risk_coverage(y, probs)
    assert curve["accuracy"].tolist() == [1.0, 1.0, pytest.approx(2 / 3), 0.5]
    assert curve["balanced_accuracy"].tolist() == [1.0, 1.0, 0.75, 0.5]


def _overconfident(rng, n):
    """A calibrated binary score z (P(y=1) = sigmoid(z)) reported as logits 5z: an over-confident model."""
    z = rng.normal(0, 1.5, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(int)
    logits = np.stack([np.zeros(n), 5 * z], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, e / e.sum(axis=1, keepdims=True)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(2)
    y_val, p_val = _overconfident(rng, 400)
    y_test, p_test = _overconfident(rng, 400)
    t = fit_temperature(y_val, p_val)  # validation only: the test arrays never reach the fit
    assert 3.5 < t < 7.0
    before = expected_calibration_error(y_test, p_test)
    after = expected_calibration_error(y_test, apply_temperature(p_test, t))
    assert after < before / 2
    # scaling never changes the predicted class
    assert (apply_temperature(p_test, t).argmax(1) == p_test.argmax(1)).all()
    # and the test data cannot move the fitted temperature: refitting with other test data gives the same T
    assert fit_temperature(y_val, p_val) == t


def test_temperature_identity_cases():
    p = _binary([0.3, 0.8])
    assert np.allclose(apply_temperature(p, None), p) and np.allclose(apply_temperature(p, 1.0), p)
    assert fit_temperature([], np.zeros((0, 2))) == 1.0
    with pytest.raises(ValueError):
        apply_temperature(p, -1.0)
    # every validation eye right: the NLL keeps falling as T -> 0, so a fit would sharpen to the bound; T stays 1
    separable = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.8, 0.1, 0.1]])
    assert fit_temperature([0, 1, 2, 0], separable) == 1.0
    assert fit_temperature([0, 1, 2, 1], separable) != 1.0  # one mistake: a temperature is identifiable again


def test_report_has_every_number_and_no_slope_for_multiclass():
    rng = np.random.default_rng(3)
    y, p = _overconfident(rng, 60)
    rep = calibration_report(y, p)
    assert rep["ece_bins"] == 6 and sum(rep["reliability"]["count"]) == 60
    assert {"brier", "ece", "aurc", "calibration_slope", "calibration_intercept", "selective"} <= set(rep)
    assert rep["selective"]["n_kept"] == 54 and "accuracy_at_90" in rep["selective"]
    multi = calibration_report([0, 1, 2], np.eye(3))
    assert "calibration_slope" not in multi and multi["brier"] == 0.0 and multi["ece"] == 0.0


# ------------------------------------------------------------------------------------------ uncertainty per eye
def test_entropy_of_known_vectors():
    from octa3d.evaluation.calibration import entropy

    e = entropy([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]])
    assert e == pytest.approx([np.log(2), 0.0, -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))])
    assert entropy(np.full((1, 4), 0.25))[0] == pytest.approx(np.log(4))  # uniform over K: ln K
    assert np.signbit(entropy([[1.0, 0.0]])[0]) == False  # noqa: E712  (no "-0.0" in predictions.csv)


def test_uncertain_threshold_leaves_the_stated_coverage_of_validation_unflagged():
    from octa3d.evaluation.calibration import entropy, entropy_threshold, uncertainty_report

    rng = np.random.default_rng(0)
    p1 = rng.uniform(0, 1, 200)
    probs = np.stack([1 - p1, p1], 1)
    e = entropy(probs)
    t = entropy_threshold(e, 0.9)
    assert (e <= t).mean() == pytest.approx(0.9)  # 180 of 200 validation eyes unflagged, 20 flagged
    assert (e <= entropy_threshold(e, 0.75)).sum() == 150
    assert entropy_threshold(e[:8], 0.9) == e[:8].max()  # 8 eyes: ceil(7.2) = 8 kept, none flagged
    assert entropy_threshold([], 0.9) == np.inf
    with pytest.raises(ValueError):
        entropy_threshold(e, 0.0)
    # flagged eyes hold the errors here: the labels are wrong exactly where p is near 0.5
    y = np.where(np.abs(p1 - 0.5) < 0.05, (p1 < 0.5).astype(int), (p1 >= 0.5).astype(int))
    r = uncertainty_report(y, probs, e, t)
    assert r["n_flagged"] == 20 and r["share_flagged"] == pytest.approx(0.1)
    assert r["error_rate_unflagged"] == 0.0 and r["error_rate_flagged"] > 0.5
    assert uncertainty_report(y, probs, e, None)["n_flagged"] is None
