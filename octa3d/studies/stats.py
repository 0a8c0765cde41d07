"""Paired statistics for comparing two classifiers on the same subjects, and intervals over folds.

* :func:`delong`: DeLong, DeLong & Clarke-Pearson (1988) test of two correlated ROC-AUCs (binary), computed with the
  mid-rank algorithm of Sun & Xu (2014); the AUC difference with its confidence interval.
* :func:`mcnemar`: McNemar's test of paired accuracy, exact (binomial on the discordant pairs) and asymptotic
  (chi-squared with Edwards' continuity correction), the accuracy difference (Wald CI of paired proportions) and
  the discordant odds ratio with its CI.
* :func:`paired_bootstrap`: the difference in balanced accuracy, macro-F1, accuracy and AUC over stratified
  resamples of subjects (whole patient groups together; :func:`octa3d.evaluation.metrics.bootstrap_indices`), the
  same resample for both classifiers; percentile CI and a two-sided bootstrap p-value.
* :func:`corrected_t`: the corrected resampled t-test of Nadeau & Bengio (2003) over k folds: the variance of the
  per-fold differences inflated by ``1/k + n_test/n_train``, because the folds' training sets overlap.
* :func:`holm`: Holm's step-down adjustment of a family of p-values.
* :func:`t_interval`: mean and t-based confidence interval of per-fold values.

Each is checked in ``tests/studies/test_stats.py`` against a direct computation or a worked example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from octa3d.evaluation.metrics import bootstrap_indices, fast_scores

#: Metrics whose paired difference :func:`paired_bootstrap` reports.
BOOTSTRAP_METRICS = ("balanced_accuracy", "f1_macro", "accuracy", "auc")


def _z(level: float) -> float:
    return float(sps.norm.ppf(0.5 + level / 2))


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` with its t interval (``k - 1`` degrees of freedom); NaN values are left out.

    Returns:
        ``{"mean", "low", "high", "sd", "n"}`` (low/high NaN for fewer than two values).
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "sd": math.nan, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "sd": math.nan, "n": 1}
    sd = float(v.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


# ------------------------------------------------------------------------------------------------------ DeLong
def _midrank(x: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based, ties share their average rank)."""
    return sps.rankdata(x, method="average")


def delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong's structural components of ``scores`` (one row per classifier) on labels ``y`` (0/1).

    Returns:
        ``(auc (K,), V10 (K, m) over the m positives, V01 (K, n) over the n negatives)``.
    """
    y = np.asarray(y).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = s[:, y], s[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs positive and negative subjects")
    v10, v01 = np.empty((len(s), m)), np.empty((len(s), n))
    for k in range(len(s)):
        tz = _midrank(np.concatenate([pos[k], neg[k]]))
        v10[k] = (tz[:m] - _midrank(pos[k])) / n  # share of negatives below each positive (ties half)
        v01[k] = 1.0 - (tz[m:] - _midrank(neg[k])) / m  # share of positives above each negative
    return v10.mean(axis=1), v10, v01


def delong_cov(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    """DeLong's covariance matrix of the AUCs: ``S10 / m + S01 / n``."""
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10, ddof=1)) if m > 1 else np.zeros((len(v10), len(v10)))
    s01 = np.atleast_2d(np.cov(v01, ddof=1)) if n > 1 else np.zeros((len(v01), len(v01)))
    return s10 / m + s01 / n


def delong(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """DeLong's test of two correlated AUCs (the same subjects scored by classifiers a and b).

    Args:
        y: ``(N,)`` labels, 1 = positive.
        score_a, score_b: ``(N,)`` scores (P(positive)) of a and b.
        level: confidence level of the intervals.

    Returns:
        ``auc_a``, ``auc_b``, ``diff`` (a - b), ``se``, ``z``, ``p`` (two-sided), ``ci`` of the difference,
        ``ci_a``/``ci_b`` (each AUC's DeLong interval, clipped to [0, 1]).
    """
    auc, v10, v01 = delong_components(y, np.vstack([score_a, score_b]))
    cov = delong_cov(v10, v01)
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[0] - auc[1])
    se = math.sqrt(max(var, 0.0))
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    p = float(2 * sps.norm.sf(abs(z))) if math.isfinite(z) else 0.0
    q = _z(level)

    def one(k: int) -> list[float]:
        half = q * math.sqrt(max(cov[k, k], 0.0))
        return [max(0.0, float(auc[k]) - half), min(1.0, float(auc[k]) + half)]

    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": diff, "se": se, "z": z, "p": p,
            "ci": [diff - q * se, diff + q * se], "ci_a": one(0), "ci_b": one(1)}


# ----------------------------------------------------------------------------------------------------- McNemar
def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """McNemar's test of paired accuracy.

    Args:
        correct_a, correct_b: ``(N,)`` booleans, subject classified correctly by a / by b.
        level: confidence level.

    Returns:
        ``b`` (a right, b wrong), ``c`` (a wrong, b right), ``n``; ``p_exact`` (two-sided binomial test of b among
        b + c at 1/2), ``chi2`` and ``p_asymptotic`` (with continuity correction), ``chi2_uncorrected`` and its
        ``p_uncorrected``; ``diff`` (accuracy a - b) with its Wald ``ci`` for paired proportions; the discordant
        odds ratio ``odds_ratio`` = b / c with its log-scale ``or_ci`` (0.5 added to b and c when one is 0).
    """
    a, bb = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b, c, n = int((a & ~bb).sum()), int((~a & bb).sum()), len(a)
    d = b + c
    p_exact = 1.0 if d == 0 else float(min(1.0, 2 * sps.binom.cdf(min(b, c), d, 0.5)))
    chi2 = (abs(b - c) - 1) ** 2 / d if d else 0.0
    chi2 = 0.0 if d and abs(b - c) < 1 else chi2
    chi2_u = (b - c) ** 2 / d if d else 0.0
    q = _z(level)
    diff = (b - c) / n if n else math.nan
    se = math.sqrt(max(d - (b - c) ** 2 / n, 0.0)) / n if n else math.nan
    hb, hc = (b + 0.5, c + 0.5) if 0 in (b, c) else (b, c)
    log_or, se_or = math.log(hb / hc), math.sqrt(1 / hb + 1 / hc)
    return {"b": b, "c": c, "n": n, "p_exact": p_exact, "chi2": float(chi2), "p_asymptotic": float(sps.chi2.sf(chi2, 1)),
            "chi2_uncorrected": float(chi2_u), "p_uncorrected": float(sps.chi2.sf(chi2_u, 1)),
            "diff": diff, "ci": [diff - q * se, diff + q * se], "odds_ratio": hb / hc,
            "or_ci": [math.exp(log_or - q * se_or), math.exp(log_or + q * se_or)]}


# --------------------------------------------------------------------------------------------- paired bootstrap
def paired_bootstrap(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, n_resamples: int, seed: int,
                     groups: Sequence[Any] | None = None, level: float = 0.95,
                     metrics: Sequence[str] = BOOTSTRAP_METRICS) -> dict[str, dict[str, Any]]:
    """Differences a - b of ``metrics`` over paired, stratified (cluster) bootstrap resamples of the subjects.

    Args:
        y: ``(N,)`` class indices; probs_a, probs_b: ``(N, K)`` probabilities of a and b for the same rows.
        n_resamples: resamples; seed: their seed; groups: patient group per row (drawn whole), or None.
        level: confidence level.
        metrics: keys of :func:`octa3d.evaluation.metrics.fast_scores`.

    Returns:
        ``{metric: {"diff", "ci", "p", "n_valid"}}``: the difference on all subjects, its percentile interval and
        the two-sided bootstrap p-value ``min(1, 2 min(P(d <= 0), P(d >= 0)))`` over the resamples where it is
        defined.
    """
    y = np.asarray(y).astype(int)
    pa, pb = np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)
    full_a, full_b = fast_scores(y, pa), fast_scores(y, pb)
    draws: dict[str, list[float]] = {m: [] for m in metrics}
    for rows in bootstrap_indices(y, n_resamples, seed, groups):
        sa, sb = fast_scores(y[rows], pa[rows]), fast_scores(y[rows], pb[rows])
        for m in metrics:
            draws[m].append(sa[m] - sb[m])
    alpha = (1 - level) / 2 * 100
    out = {}
    for m in metrics:
        d = np.asarray(draws[m])
        d = d[np.isfinite(d)]
        p = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))) if len(d) else math.nan
        ci = [float(x) for x in np.percentile(d, [alpha, 100 - alpha])] if len(d) else [math.nan, math.nan]
        out[m] = {"diff": float(full_a[m] - full_b[m]), "ci": ci, "p": p, "n_valid": int(len(d))}
    return out


# -------------------------------------------------------------------------------------- corrected resampled t-test
def corrected_t(diffs: Sequence[float], n_train: float, n_test: float, level: float = 0.95) -> dict[str, Any]:
    """Nadeau & Bengio's corrected resampled t-test of per-fold differences (a - b on each fold's held-out part).

    ``t = mean(d) / sqrt((1/k + n_test/n_train) s^2)`` with ``k - 1`` degrees of freedom; for k-fold
    cross-validation ``n_test/n_train = 1/(k - 1)``.

    Args:
        diffs: the k per-fold differences.
        n_train, n_test: (mean) training and held-out subjects per fold.
        level: confidence level of the interval of the mean difference.

    Returns:
        ``mean``, ``se`` (corrected), ``t``, ``df``, ``p`` (two-sided), ``ci``, ``k``.
    """
    d = np.asarray([x for x in diffs if math.isfinite(x)], np.float64)
    k = len(d)
    if k < 2:
        return {"mean": float(d.mean()) if k else math.nan, "se": math.nan, "t": math.nan, "df": k - 1,
                "p": math.nan, "ci": [math.nan, math.nan], "k": k}
    mean, var = float(d.mean()), float(d.var(ddof=1))
    se = math.sqrt((1 / k + n_test / n_train) * var)
    if se > 0:
        t = mean / se
        p = float(2 * sps.t.sf(abs(t), k - 1))
    else:  # every fold the same difference
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    half = float(sps.t.ppf(0.5 + level / 2, k - 1)) * se
    return {"mean": mean, "se": se, "t": t, "df": k - 1, "p": p, "ci": [mean - half, mean + half], "k": k}


# ------------------------------------------------------------------------------------------------------ Holm
def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, np.float64)
    out = np.full(len(p), math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(x) for x in out]
