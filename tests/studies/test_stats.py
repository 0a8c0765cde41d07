"""The study statistics against direct computations, SciPy/scikit-learn and worked examples (to 1e-6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from octa3d.evaluation.metrics import bootstrap_indices
from octa3d.studies.stats import corrected_t, delong, holm, mcnemar, paired_bootstrap, t_interval

TOL = 1e-6


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else (0.5 if x == y else 0.0)


def delong_direct(y, a, b):
    """DeLong et al. (1988) by its definition: O(m n) structural components, their covariances, the z test."""
    y = np.asarray(y).astype(bool)
    comps = []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        v10 = np.array([np.mean([_psi(x, z) for z in neg]) for x in pos])
        v01 = np.array([np.mean([_psi(x, z) for x in pos]) for z in neg])
        comps.append((v10, v01))
    m, n = int(y.sum()), int((~y).sum())
    auc = [c[0].mean() for c in comps]

    def cov(u, v):
        return float(np.sum((u - u.mean()) * (v - v.mean())) / (len(u) - 1))

    s = [[cov(comps[i][0], comps[j][0]) / m + cov(comps[i][1], comps[j][1]) / n for j in range(2)] for i in range(2)]
    var = s[0][0] + s[1][1] - 2 * s[0][1]
    z = (auc[0] - auc[1]) / math.sqrt(var)
    return auc, var, z, 2 * sps.norm.sf(abs(z))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_the_direct_computation(seed):
    rng = np.random.default_rng(seed)
    n = 60
    y = (rng.random(n) < 0.4).astype(int)
    a = np.round(y * 0.8 + rng.normal(0, 0.6, n), 1)  # rounded: ties inside and across the classes
    b = np.round(y * 0.4 + 0.5 * a + rng.normal(0, 0.6, n), 1)
    auc, var, z, p = delong_direct(y, a, b)
    res = delong(y, a, b)
    assert res["auc_a"] == pytest.approx(auc[0], abs=TOL) and res["auc_b"] == pytest.approx(auc[1], abs=TOL)
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=TOL)
    assert res["se"] ** 2 == pytest.approx(var, abs=TOL)
    assert res["z"] == pytest.approx(z, abs=TOL) and res["p"] == pytest.approx(p, abs=TOL)
    q = sps.norm.ppf(0.975)
    assert res["ci"] == pytest.approx([auc[0] - auc[1] - q * math.sqrt(var), auc[0] - auc[1] + q * math.sqrt(var)],
                                      abs=TOL)


def test_delong_of_one_classifier_against_itself_is_no_difference():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    res = delong(y, s, s)
    assert res["diff"] == 0 and res["p"] == 1.0


def test_mcnemar_worked_example_and_scipy():
    """Agresti (2002), Categorical Data Analysis, table 10.1 (presidential approval, two surveys): 150 and 86
    discordant pairs of 1600; McNemar's z^2 = (86 - 150)^2 / 236 = 17.36."""
    a = np.array([True] * 794 + [True] * 150 + [False] * 86 + [False] * 570)
    b = np.array([True] * 794 + [False] * 150 + [True] * 86 + [False] * 570)
    res = mcnemar(a, b)
    assert (res["b"], res["c"], res["n"]) == (150, 86, 1600)
    assert res["chi2_uncorrected"] == pytest.approx(4096 / 236, abs=TOL)
    assert round(res["chi2_uncorrected"], 2) == 17.36
    assert res["chi2"] == pytest.approx(63 ** 2 / 236, abs=TOL)
    assert res["p_asymptotic"] == pytest.approx(sps.chi2.sf(63 ** 2 / 236, 1), abs=TOL)
    assert res["p_exact"] == pytest.approx(sps.binomtest(150, 236, 0.5).pvalue, abs=TOL)
    assert res["diff"] == pytest.approx((150 - 86) / 1600, abs=TOL)
    assert res["odds_ratio"] == pytest.approx(150 / 86, abs=TOL)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 3), (5, 5), (2, 9), (13, 4)])
def test_mcnemar_exact_matches_binomtest(b, c):
    a = np.array([True] * b + [False] * c + [True] * 7)
    bb = np.array([False] * b + [True] * c + [True] * 7)
    res = mcnemar(a, bb)
    ref = 1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue
    assert res["p_exact"] == pytest.approx(ref, abs=TOL)
    if b == c:
        assert res["chi2"] == 0 and res["p_asymptotic"] == 1.0


def test_paired_bootstrap_equals_a_direct_loop_with_sklearn():
    rng = np.random.default_rng(3)
    n = 40
    y = np.arange(n) % 2
    pa = np.clip(np.c_[1 - y * 0.6 - rng.random(n) * 0.3, np.zeros(n)], 0, 1)
    pa[:, 1] = 1 - pa[:, 0]
    pb = rng.dirichlet([1, 1], n)
    groups = [f"g{i // 2}" for i in range(n)]  # two eyes per patient, drawn together
    res = paired_bootstrap(y, pa, pb, 300, seed=7, groups=groups)
    diffs = {"balanced_accuracy": [], "f1_macro": [], "auc": []}
    for rows in bootstrap_indices(y, 300, 7, groups):
        ya, a, b = y[rows], pa[rows].argmax(1), pb[rows].argmax(1)
        diffs["balanced_accuracy"].append(balanced_accuracy_score(ya, a) - balanced_accuracy_score(ya, b))
        diffs["f1_macro"].append(f1_score(ya, a, average="macro", labels=[0, 1], zero_division=0)
                                 - f1_score(ya, b, average="macro", labels=[0, 1], zero_division=0))
        diffs["auc"].append(roc_auc_score(ya, pa[rows, 1]) - roc_auc_score(ya, pb[rows, 1]))
    for m, d in diffs.items():
        d = np.asarray(d)
        assert res[m]["ci"] == pytest.approx(list(np.percentile(d, [2.5, 97.5])), abs=TOL)
        assert res[m]["p"] == pytest.approx(min(1, 2 * min((d <= 0).mean(), (d >= 0).mean())), abs=TOL)
    assert res["balanced_accuracy"]["diff"] == pytest.approx(
        balanced_accuracy_score(y, pa.argmax(1)) - balanced_accuracy_score(y, pb.argmax(1)), abs=TOL)


def test_corrected_t_worked_example():
    """Five folds, differences 0.02, 0.05, 0.01, 0.04, 0.03: mean 0.03, s^2 = 0.00025; with n_test/n_train = 1/4
    the corrected variance of the mean is (1/5 + 1/4) * 0.00025 = 1.125e-4, t = 0.03 / 0.0106066 = 2.828427."""
    res = corrected_t([0.02, 0.05, 0.01, 0.04, 0.03], n_train=80, n_test=20)
    assert res["mean"] == pytest.approx(0.03, abs=TOL)
    assert res["se"] == pytest.approx(math.sqrt(1.125e-4), abs=TOL)
    assert res["t"] == pytest.approx(2.828427, abs=TOL) and res["df"] == 4
    assert res["p"] == pytest.approx(2 * sps.t.sf(2.8284271247, 4), abs=TOL)


def test_corrected_t_without_overlap_is_the_paired_t_test():
    d = [0.1, -0.02, 0.07, 0.03, 0.05, 0.0]
    res = corrected_t(d, n_train=1e12, n_test=1)
    ref = sps.ttest_1samp(d, 0.0)
    assert res["t"] == pytest.approx(ref.statistic, abs=TOL) and res["p"] == pytest.approx(ref.pvalue, abs=TOL)


def test_holm_worked_example():
    """p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005x4 = 0.02, 0.01x3 = 0.03, 0.03x2 = 0.06, 0.04x1 = 0.04
    -> monotone 0.02, 0.03, 0.06, 0.06, back in input order 0.03, 0.06, 0.06, 0.02."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=TOL)
    out = holm([0.5, float("nan"), 0.2])
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1]) and out[2] == pytest.approx(0.4)
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_t_interval_matches_scipy():
    v = [0.71, 0.65, 0.8, 0.74, 0.69]
    res = t_interval(v)
    lo, hi = sps.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=sps.sem(v))
    assert (res["low"], res["high"]) == pytest.approx((lo, hi), abs=TOL)
    assert math.isnan(t_interval([0.5])["low"]) and t_interval([])["n"] == 0
