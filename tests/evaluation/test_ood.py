"""The out-of-distribution reference and check (octa3d.evaluation.ood, ood_check): the Gaussian fit and its
distance, cross-fitting, the conformal threshold's false-alarm rate on fresh in-distribution samples, geometry and
intensity scores, a check end to end on PreprocessRecords, and the fold vote."""

from __future__ import annotations

import math

import numpy as np
import pytest

from octa3d.data.record import PreprocessRecord
from octa3d.evaluation import ood
from octa3d.evaluation.ood_check import OodCheck, OodResult, checks_of, summary_block, summary_line, vote


def _cloud(rng: np.random.Generator, n: int, dim: int = 16, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes, means at -1 / +1 on every axis, one correlated covariance; ``shift`` moves every sample by that
    much per axis, with alternating signs (away from both classes, not along the line between them)."""
    y = rng.integers(0, 2, n)
    rng_mix = np.random.default_rng(7)  # the same covariance for every call
    mix = np.eye(dim) + 0.5 * rng_mix.standard_normal((dim, dim)) / math.sqrt(dim)
    away = shift * np.where(np.arange(dim) % 2 == 0, 1.0, -1.0)
    x = rng.standard_normal((n, dim)) @ mix + np.where(y[:, None] == 1, 1.0, -1.0) + away
    return x, y


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    return float((outside[:, None] > inside[None, :]).mean() + 0.5 * (outside[:, None] == inside[None, :]).mean())


def test_mahalanobis_separates_a_shifted_cloud_and_matches_the_definition():
    rng = np.random.default_rng(0)
    x, y = _cloud(rng, 300)
    fit = ood.fit_gaussian(x, y)
    assert fit["classes"] == [0, 1] and fit["dim"] == 16 and 0 <= fit["shrinkage"] <= 1
    fresh, _ = _cloud(rng, 300)
    shifted, _ = _cloud(rng, 300, shift=1.5)
    assert _auroc(ood.mahalanobis(fresh, fit), ood.mahalanobis(shifted, fit)) > 0.95
    # the score is the squared distance to the closest class mean under the shared precision
    v = fresh[0]
    prec, means = fit["precision"].double().numpy(), fit["means"].double().numpy()
    want = min(float((v - m) @ prec @ (v - m)) for m in means)
    assert ood.mahalanobis(v[None], fit)[0] == pytest.approx(want, rel=1e-6)


def test_ledoit_wolf_keeps_the_fit_usable_with_fewer_samples_than_features():
    rng = np.random.default_rng(1)
    x, y = _cloud(rng, 40, dim=128)
    fit = ood.fit_gaussian(x, y)
    assert fit["precision"].shape == (128, 128) and np.isfinite(fit["precision"].numpy()).all()
    assert fit["shrinkage"] > 0
    fresh, _ = _cloud(rng, 100, dim=128)
    far, _ = _cloud(rng, 100, dim=128, shift=1.0)
    assert _auroc(ood.mahalanobis(fresh, fit), ood.mahalanobis(far, fit)) > 0.9


def test_cross_fit_scores_each_subject_with_a_fit_that_excluded_it():
    seen: list[set[int]] = []

    def fit(idx):
        seen.append(set(idx.tolist()))
        return set(idx.tolist())

    def score(model, idx):
        assert not model & set(idx.tolist())  # never scored by a fit that saw it
        return np.full(len(idx), float(len(seen)))

    out = ood.cross_fit(23, fit, score, folds=5, seed=3)
    assert len(out) == 23 and len(seen) == 5 and set(out.tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(ood.cross_fit(9, fit, score, folds=5)) == 0  # too few to refit


def test_conformal_threshold_holds_its_false_alarm_rate_on_fresh_samples():
    rng = np.random.default_rng(2)
    x, y = _cloud(rng, 200)
    # reference scores held out of the fit: cross-fitted training samples plus a validation set scored by the fit
    fit = ood.fit_gaussian(x, y)
    val, _ = _cloud(rng, 40)
    ref = np.concatenate([ood.mahalanobis(val, fit),
                          ood.cross_fit(len(x), lambda i: ood.fit_gaussian(x[i], y[i]),
                                        lambda f, i: ood.mahalanobis(x[i], f))])
    t, rate = ood.conformal_threshold(ref, 0.05)
    assert rate == 0.05
    fresh, _ = _cloud(rng, 4000)
    far = float(np.mean(ood.mahalanobis(fresh, fit) > t))
    assert far <= 0.05 + 0.02, far  # conformal: <= 5 % in expectation (binomial noise on 4000 samples)
    assert far >= 0.01  # and not a threshold so high that it never fires
    # the rule itself: ceil((n + 1)(1 - rate))-th smallest; too few scores: the largest, with its own rate
    assert ood.conformal_threshold(np.arange(1, 40.0), 0.05) == (38.0, 0.05)
    assert ood.conformal_threshold(np.arange(1, 11.0), 0.05) == (10.0, pytest.approx(1 / 11))
    assert ood.conformal_threshold(np.zeros(0), 0.05) == (math.inf, 0.0)


def test_reference_scores_pool_validation_and_cross_fitted_training_eyes():
    ref = {"validation": {"features": [4.0, 6.0, 8.0]}, "training": {"features": [1.0, 2.0, 3.0]}}
    scores, how = ood.reference_scores(ref, "features")
    assert how == {"n_validation": 3, "n_training_cross_fitted": 3}
    assert scores.tolist() == [4.0, 6.0, 8.0, 1.0, 2.0, 3.0]
    assert ood.reference_scores({"validation": {}, "training": {}}, "features")[0].size == 0


def _record(shape=(32, 64, 32), spacing=(0.1875, 0.03125, 0.1875), intensity=((0.0, 240.0),)) -> PreprocessRecord:
    source = {"shape": list(shape), "spacing": list(spacing), "origin": [0.0] * 3,
              "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}
    return PreprocessRecord(source=source, crop_box=[(0, n) for n in shape], cropped_shape=tuple(shape),
                            input_shape=(16, 16, 16), intensity=list(intensity))


def test_geometry_score_is_zero_inside_the_training_range_and_one_at_ten_percent_outside():
    fit = ood.fit_geometry([ood.geometry_of(_record()), ood.geometry_of(_record(shape=(40, 64, 32)))])
    assert fit["shape"] == {"min": [32.0, 64.0, 32.0], "max": [40.0, 64.0, 32.0]}
    assert ood.geometry_score(ood.geometry_of(_record(shape=(36, 64, 32))), fit)[0] == 0.0
    score, what = ood.geometry_score(ood.geometry_of(_record(shape=(44, 64, 32))), fit)
    assert score == pytest.approx(1.0) and what.startswith("shape 44x64x32")
    big = ood.geometry_of(_record(shape=(400, 640, 400), spacing=(0.015, 0.003125, 0.015)))
    score, what = ood.geometry_score(big, fit)
    assert score > 10 and what == "spacing 0.015x0.00313x0.015 mm, trained on 0.188x0.0312x0.188"
    score, what = ood.geometry_score(ood.geometry_of(_record(shape=(400, 640, 400))), fit)
    assert what.startswith("shape 400x640x400, trained on 32x64x32 to 40x64x32")
    # an array input has no spacing: only its shape is compared
    assert set(ood.geometry_of(_record(), spacing_known=False)) == {"shape"}
    assert ood.geometry_score(ood.geometry_of(_record(shape=(64, 32)), spacing_known=False), fit)[0] == math.inf


def test_intensity_scale_has_a_floor_where_every_training_scan_agrees():
    values = np.array([[0.0, 255.0]] * 10)  # saturated 8-bit scans: no spread at all
    fit = ood.fit_intensity(values)
    assert fit["scale"] == pytest.approx([2.55, 2.55])
    assert ood.intensity_scores(np.array([[0.0, 253.0]]), fit)[0] < 1  # 2 grey levels: not a drift
    assert ood.intensity_scores(np.array([[30.0, 183.0]]), fit)[0] > 10  # 0.6 v + 30


def _reference(rng: np.random.Generator, n_train: int = 60, n_val: int = 15) -> dict:
    def part(n):
        x, y = _cloud(rng, n)
        recs = [_record(intensity=((0.0, float(rng.normal(240, 5))),)) for _ in range(n)]
        return {"geometry": [ood.geometry_of(r) for r in recs], "intensity": np.stack([ood.intensity_of(r)
                                                                                         for r in recs]),
                "features": x, "labels": y}

    return ood.build_reference(part(n_train), part(n_val), ["OCTA"], [0.5, 99.5], seed=0)


def test_a_check_flags_each_kind_of_shift_with_its_reason_and_not_the_ordinary_scan():
    rng = np.random.default_rng(4)
    ref = _reference(rng)
    assert ref["n_train"] == 60 and ref["n_val"] == 15 and len(ref["training"]["features"]) == 60
    check = OodCheck(ref, 0.05)
    assert set(check.thresholds) == {"intensity", "features"}
    assert check.false_alarm_bound == 0.05  # 75 reference eyes: enough for the rate
    assert check.about["features"]["n_training_cross_fitted"] == 60
    fresh, _ = _cloud(rng, 200)
    ok = [check.check(_record(), f) for f in fresh]
    assert np.mean([r.flagged for r in ok]) <= 0.1 and all(r.reason == "" for r in ok if not r.flagged)
    r = check.check(_record(shape=(400, 640, 400)), fresh[0])
    assert r.flagged and r.reason.startswith("geometry (shape 400x640x400") and r.score > 1
    r = check.check(_record(intensity=((30.0, 170.0),)), fresh[0])
    assert r.flagged and len(r.reasons) == 1 and r.reasons[0].startswith("intensity (OCTA p")
    far, _ = _cloud(rng, 1, shift=4.0)
    r = check.check(_record(), far[0])
    assert r.flagged and r.reasons == [f"features ({r.components['features']:.1f}x the threshold distance to the "
                                       "training classes)"]
    assert check.check(_record(), None).components.keys() == {"geometry", "intensity"}  # no features: skipped


def test_checks_need_a_reference_of_this_version_in_every_model():
    rng = np.random.default_rng(5)
    ref = _reference(rng)
    assert checks_of([{"ood_reference": ref}, {"ood_reference": ref}]) is not None
    assert checks_of([{"ood_reference": ref}, {}]) is None  # one member predates the check
    assert checks_of([{"ood_reference": {**ref, "version": 99}}]) is None
    block = summary_block(None, [], [])
    assert block["available"] is False and "predates" in block["note"] and summary_line(block) is None


def _res(geometry: float = 0.0, features: float = 0.0) -> OodResult:
    comps = {"geometry": geometry, "intensity": 0.2, "features": features}
    reasons = [f"{c} (x)" for c, v in comps.items() if v > 1]
    return OodResult(max(comps.values()), max(comps.values()) > 1, reasons, comps)


def test_an_ensemble_flags_what_a_majority_of_its_folds_flag():
    assert not vote([_res(features=3.0), _res(), _res()]).flagged  # one fold of three: a fold's false alarm
    two = vote([_res(features=3.0), _res(features=1.5), _res()])
    assert two.flagged and two.score == 1.5 and two.reasons == ["features (x) [2/3 folds]"]
    mixed = vote([_res(geometry=2.0), _res(features=2.0), _res()])  # a majority flags, each fold for another check
    assert mixed.flagged and mixed.reasons == ["geometry (x) [1/3 folds]", "features (x) [1/3 folds]"]
    assert vote([_res(geometry=2.0), _res(features=2.0)]).flagged  # 2 folds: both must flag
    assert not vote([_res(features=2.0), _res()]).flagged
    block = summary_block([OodCheck(_reference(np.random.default_rng(6)))], [True, False, ""],
                          ["geometry (a); features (b)", "", ""])
    assert block["n_checked"] == 2 and block["n_flagged"] == 1
    assert block["by_reason"] == {"geometry": 1, "intensity": 0, "features": 1}
    assert "1 of 2 (geometry 1, features 1)" in summary_line(block)
