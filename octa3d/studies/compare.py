"""The numbers of a study: each arm's metrics (per fold with t intervals, pooled out-of-fold and hold-out with
bootstrap intervals) and every pairwise comparison of complete arms on the same subjects.

Populations: ``folds`` (the k per-fold values: corrected resampled t-test), ``oof`` (pooled out-of-fold
predictions, every non-test subject once) and ``holdout`` (the study's hold-out, the arm's fold models averaged).
Every (population, test, metric) is one family: its p-values are Holm-adjusted over the pairs of arms.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score

from octa3d.evaluation.calibration import expected_calibration_error, n_bins_for
from octa3d.evaluation.metrics import bootstrap_indices, fast_scores
from octa3d.studies.results import ArmData, Predictions
from octa3d.studies.stats import corrected_t, delong, holm, mcnemar, paired_bootstrap, t_interval

#: Metrics of every arm (``kappa_quadratic`` too when ``stats: ordered``; sensitivity/specificity for binary).
METRICS = ("balanced_accuracy", "auc", "f1_macro", "accuracy", "ece")
#: Metrics compared across folds with the corrected resampled t-test.
FOLD_METRICS = ("balanced_accuracy", "auc", "f1_macro")


def scores(p: Predictions, ordered: bool = False) -> dict[str, float]:
    """The metrics of one set of predictions."""
    out = fast_scores(p.y, p.probs)
    out["ece"] = expected_calibration_error(p.y, p.probs)
    if ordered:
        out["kappa_quadratic"] = _qwk(p.y, p.probs)
    return out


def _qwk(y: np.ndarray, probs: np.ndarray) -> float:
    k = float(cohen_kappa_score(y, probs.argmax(1), labels=list(range(probs.shape[1])), weights="quadratic"))
    return k if math.isfinite(k) else math.nan


def bootstrap_scores(p: Predictions, n_resamples: int, seed: int, level: float, ordered: bool = False
                     ) -> dict[str, list[float]]:
    """Percentile intervals of :func:`scores` over stratified cluster resamples of ``p``'s eyes
    (:func:`octa3d.evaluation.metrics.bootstrap_indices`; the ECE keeps the full sample's bin count)."""
    n_bins = n_bins_for(len(p.y))
    draws: dict[str, list[float]] = {}
    for rows in bootstrap_indices(p.y, n_resamples, seed, p.groups):
        y, probs = p.y[rows], p.probs[rows]
        sc = {**fast_scores(y, probs), "ece": expected_calibration_error(y, probs, n_bins)}
        if ordered:
            sc["kappa_quadratic"] = _qwk(y, probs)
        for k, v in sc.items():
            draws.setdefault(k, []).append(v)
    a = (1 - level) / 2 * 100
    out = {}
    for k, vals in draws.items():
        d = np.asarray(vals, np.float64)
        d = d[np.isfinite(d)]
        out[k] = [float(x) for x in np.percentile(d, [a, 100 - a])] if len(d) else [math.nan, math.nan]
    return out


def _with_ci(p: Predictions, st: dict[str, Any], seed: int) -> dict[str, Any]:
    """Point values and stratified (cluster) bootstrap intervals of one population."""
    return {"n": len(p.ids), **scores(p, st["ordered"]),
            "ci": bootstrap_scores(p, st["bootstrap"], seed, st["level"], st["ordered"])}


def arm_summary(arm: ArmData, st: dict[str, Any], seed: int) -> dict[str, Any]:
    """One arm: per-fold values with their mean and t interval, pooled out-of-fold and hold-out metrics with CIs."""
    folds = {k: scores(p, st["ordered"]) for k, p in sorted(arm.folds.items())}
    keys = sorted({m for f in folds.values() for m in f})
    out: dict[str, Any] = {
        "name": arm.name, "complete": arm.complete, "n_folds": arm.n_folds, "folds_done": sorted(arm.folds),
        "fold_values": {m: [folds[k].get(m, math.nan) for k in sorted(folds)] for m in keys},
        "fold": {m: _bounded(t_interval([folds[k].get(m, math.nan) for k in sorted(folds)], st["level"]), 0.0, 1.0)
                 for m in keys},
        "cells": {k: {"state": c["state"], "folder": str(c["folder"]), "error": c.get("error")}
                  for k, c in sorted(arm.cells.items())}}
    out["oof"] = _with_ci(arm.oof, st, seed) if arm.oof is not None else None
    out["holdout"] = _with_ci(arm.holdout, st, seed) if arm.holdout is not None else None
    return out


def _bounded(iv: dict[str, Any], low: float, high: float) -> dict[str, Any]:
    """A t interval clipped to the metric's range (with few folds it can reach past 0 or 1)."""
    for k in ("low", "high"):
        if math.isfinite(iv.get(k, math.nan)):
            iv[k] = min(high, max(low, iv[k]))
    return iv


def _row(a: str, b: str, population: str, test: str, metric: str, est: float, ci: list[float], p: float,
         **extra: Any) -> dict[str, Any]:
    # every metric lies in [0, 1]: a difference in [-1, 1] (normal and t intervals can reach past it)
    return {"a": a, "b": b, "population": population, "test": test, "metric": metric, "estimate": est,
            "ci_low": max(-1.0, ci[0]) if math.isfinite(ci[0]) else math.nan,
            "ci_high": min(1.0, ci[1]) if math.isfinite(ci[1]) else math.nan, "p": p, **extra}


def compare_pair(a: ArmData, b: ArmData, st: dict[str, Any], seed: int, n_classes: int) -> list[dict[str, Any]]:
    """Every test of arm ``a`` against arm ``b`` (differences are a - b)."""
    rows: list[dict[str, Any]] = []
    lvl = st["level"]
    for population, pa, pb in (("oof", a.oof, b.oof), ("holdout", a.holdout, b.holdout)):
        pb = pb.take(pa.ids)  # the same subjects in the same order (the folds are shared)
        if n_classes == 2 and len(set(pa.y.tolist())) == 2:
            d = delong(pa.y, pa.probs[:, 1], pb.probs[:, 1], lvl)
            rows.append(_row(a.name, b.name, population, "DeLong", "auc", d["diff"], d["ci"], d["p"], z=d["z"]))
        correct_a, correct_b = pa.probs.argmax(1) == pa.y, pb.probs.argmax(1) == pb.y
        m = mcnemar(correct_a, correct_b, lvl)
        extra = {"discordant_a_right": m["b"], "discordant_b_right": m["c"], "odds_ratio": m["odds_ratio"],
                 "or_ci": m["or_ci"]}
        rows.append(_row(a.name, b.name, population, "McNemar exact", "accuracy", m["diff"], m["ci"], m["p_exact"],
                         **extra))
        rows.append(_row(a.name, b.name, population, "McNemar asymptotic", "accuracy", m["diff"], m["ci"],
                         m["p_asymptotic"], chi2=m["chi2"], **extra))
        boot = paired_bootstrap(pa.y, pa.probs, pb.probs, st["bootstrap"], seed, pa.groups, lvl,
                                metrics=("balanced_accuracy", "f1_macro"))
        for metric, r in boot.items():
            rows.append(_row(a.name, b.name, population, "paired bootstrap", metric, r["diff"], r["ci"], r["p"]))
    common = sorted(set(a.folds) & set(b.folds))
    if len(common) >= 2:
        n_test = float(np.mean([len(a.folds[k].ids) for k in common]))
        n_train = float(sum(len(a.folds[k].ids) for k in a.folds)) - n_test  # the other folds
        for metric in FOLD_METRICS:
            diffs = [scores(a.folds[k])[metric] - scores(b.folds[k].take(a.folds[k].ids))[metric] for k in common]
            t = corrected_t(diffs, n_train, n_test, lvl)
            rows.append(_row(a.name, b.name, "folds", "corrected t", metric, t["mean"], t["ci"], t["p"], t=t["t"],
                             df=t["df"]))
    return rows


def compare(arms: dict[str, ArmData], order: list[str], reference: str, st: dict[str, Any], seed: int,
            n_classes: int) -> list[dict[str, Any]]:
    """Every pair of complete arms (a comparison with the reference has the reference as ``b``), Holm-adjusted
    within each (population, test, metric) family; rows carry ``p_holm`` and ``vs_reference``."""
    done = [n for n in order if arms[n].complete]
    pairs = [(x, reference) for x in done if x != reference and reference in done]
    pairs += [(x, y) for x, y in itertools.combinations(done, 2) if reference not in (x, y)]
    rows = [r for x, y in pairs for r in compare_pair(arms[x], arms[y], st, seed, n_classes)]
    for r in rows:
        r["vs_reference"] = r["b"] == reference
    families: dict[tuple[str, str, str], list[int]] = {}
    for i, r in enumerate(rows):
        families.setdefault((r["population"], r["test"], r["metric"]), []).append(i)
    for idx in families.values():
        for i, q in zip(idx, holm([rows[i]["p"] for i in idx])):
            rows[i]["p_holm"] = q
            rows[i]["family_size"] = len(idx)
    return rows
