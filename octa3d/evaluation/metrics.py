"""Classification metrics computed from predicted *probabilities* (never AUC from hard labels).

Validation (:func:`classification_metrics`) and hold-out testing (:func:`evaluation_metrics` with
:func:`bootstrap_ci` 95 % percentile intervals, a class-stratified bootstrap of subjects or, where several
scans share a patient, of patient groups) share these definitions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from octa3d.evaluation.calibration import CALIBRATION_KEYS, calibration_report, calibration_scores, n_bins_for

#: Metrics that get bootstrap confidence intervals (sensitivity/specificity and the calibration slope/intercept
#: only for binary tasks; Brier, ECE and AURC are defined in :mod:`octa3d.evaluation.calibration`).
CI_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1_macro", "kappa", "sensitivity", "specificity",
              *CALIBRATION_KEYS)

HIGHER_IS_BETTER = {"accuracy": True, "balanced_accuracy": True, "auc": True, "f1_macro": True,
                    "val_loss": False}


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC from probabilities: binary uses P(class 1); multi-class is one-vs-rest macro.

    Returns NaN when it is undefined (a class absent from ``y_true``).
    """
    y_true = np.asarray(y_true)
    n_classes = probs.shape[1]
    present = np.unique(y_true)
    if len(present) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n_classes == 2:
            return float(roc_auc_score(y_true, probs[:, 1]))
        if len(present) < n_classes:
            # OvR macro over the classes that occur (sklearn refuses otherwise); documented as such.
            scores = [roc_auc_score(y_true == c, probs[:, c]) for c in present]
            return float(np.mean(scores))
        return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Headline metrics of one evaluation.

    Args:
        y_true: (N,) integer class indices.
        probs: (N, K) class probabilities (rows sum to 1).

    Returns:
        accuracy, balanced_accuracy, auc (from probabilities), f1_macro.
    """
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    labels = list(range(probs.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "accuracy": float(accuracy_score(y_true, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
            "auc": roc_auc(y_true, probs),
            "f1_macro": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        }


def confusion(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(K, K) confusion matrix, rows = true class, columns = predicted class."""
    return confusion_matrix(np.asarray(y_true).astype(int), np.asarray(probs).argmax(axis=1),
                            labels=list(range(np.asarray(probs).shape[1])))


def _rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC-AUC as the Mann-Whitney U statistic (ties count half), NaN when a class is absent."""
    from scipy.stats import rankdata

    n1 = int(positive.sum())
    n0 = len(positive) - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fast_scores(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The bootstrap metrics with NumPy only (no sklearn overhead: called ~1000 times per evaluation).

    Same definitions as :func:`evaluation_metrics` (checked against sklearn in the tests): balanced accuracy
    over the classes present in ``y_true``; macro-F1 over all K classes with 0 for undefined F1; AUC binary on
    P(class 1) and one-vs-rest macro over the classes present otherwise; kappa unweighted.
    """
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = np.bincount(y_true * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    n = cm.sum()
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(k), where=present)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    po, pe = tp.sum() / n, float((support * predicted).sum()) / n ** 2
    out = {"accuracy": tp.sum() / n, "balanced_accuracy": float(recall[present].mean()),
           "f1_macro": float(f1.mean()), "kappa": (po - pe) / (1 - pe) if pe < 1 else math.nan}
    if k == 2:
        out["auc"] = _rank_auc(y_true == 1, probs[:, 1])
        out["sensitivity"] = recall[1] if present[1] else math.nan
        out["specificity"] = recall[0] if present[0] else math.nan
    else:
        classes = np.flatnonzero(present)
        out["auc"] = (float(np.mean([_rank_auc(y_true == c, probs[:, c]) for c in classes]))
                      if len(classes) >= 2 else math.nan)
    return {key: float(v) for key, v in out.items()}


def _group_codes(n: int, groups: Sequence[Any] | None) -> np.ndarray:
    """Cluster index per row, numbered in order of first appearance; a missing group (None, "", NaN) is a
    cluster of its own row."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} predictions")
    codes: dict[Any, int] = {}
    out = np.empty(n, dtype=np.int64)
    for i, g in enumerate(groups):
        missing = g is None or (isinstance(g, float) and math.isnan(g)) or (isinstance(g, str) and not g)
        key = ("row", i) if missing else ("group", str(g))
        out[i] = codes.setdefault(key, len(codes))
    return out


def resampling_units(y_true: np.ndarray, groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """What :func:`bootstrap_ci` resamples, for ``metrics.json`` and the printed header.

    Args:
        y_true: ``(N,)`` class indices.
        groups: patient group per row (e.g. the split files' ``group`` column), or None (every row its own unit).

    Returns:
        ``unit``: ``"patient group"`` when some group holds more than one row (a cluster bootstrap), else
        ``"subject"``; ``n_groups``: the number of units resampled; ``n_rows``; ``stratified``: True (units are
        resampled within their class); ``units_per_class``: units per class index (a unit's class is the
        majority label of its rows, ties to the label seen first).
    """
    y = np.asarray(y_true).astype(int)
    codes = _group_codes(len(y), groups)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    cls = _group_classes(y, codes, n_groups)
    return {"unit": "patient group" if n_groups < len(y) else "subject", "n_groups": n_groups, "n_rows": int(len(y)),
            "stratified": True, "units_per_class": {int(c): int((cls == c).sum()) for c in np.unique(cls)}}


def _group_classes(y: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Class of each cluster: the majority label of its rows, ties broken by the label that appears first."""
    if not len(y):
        return np.zeros(0, dtype=np.int64)
    k = int(y.max()) + 1
    cell = codes * k + y
    counts = np.bincount(cell, minlength=n_groups * k).reshape(n_groups, k)
    first = np.full(n_groups * k, np.inf)
    np.minimum.at(first, cell, np.arange(len(y), dtype=np.float64))
    first = first.reshape(n_groups, k)
    return np.argmin(np.where(counts == counts.max(axis=1, keepdims=True), first, np.inf), axis=1)


def bootstrap_indices(y_true: np.ndarray, n_resamples: int, seed: int,
                      groups: Sequence[Any] | None = None) -> Iterator[np.ndarray]:
    """Row indices of each bootstrap resample: a stratified cluster bootstrap.

    The units are the patient groups (every row its own unit without ``groups``). Within each class (a unit's
    class: the majority label of its rows) as many units are drawn with replacement as the class has, and every
    row of a drawn unit enters the resample: two images of one patient are in or out together, and every class
    that labels a unit is present in every resample.

    Args:
        y_true: ``(N,)`` class indices.
        n_resamples: number of resamples.
        seed: NumPy generator seed (the same seed gives the same resamples).
        groups: patient group per row, or None.

    Yields:
        ``(M,)`` int arrays of row indices (``M`` = N without groups, else the rows of the drawn units).
    """
    y = np.asarray(y_true).astype(int)
    codes = _group_codes(len(y), groups)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    order = np.argsort(codes, kind="stable")  # rows grouped by cluster, in row order within one
    lengths = np.bincount(codes, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    cls = _group_classes(y, codes, n_groups)
    strata = [np.flatnonzero(cls == c) for c in np.unique(cls)]
    rng = np.random.default_rng(seed)
    draws = [s[rng.integers(0, len(s), size=(n_resamples, len(s)))] for s in strata]
    for r in range(n_resamples):
        picked = np.concatenate([d[r] for d in draws])
        lens = lengths[picked]
        # rows of the picked clusters, concatenated: start of each cluster + 0..len-1
        offsets = np.repeat(starts[picked] - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        yield order[offsets]


def bootstrap_ci(y_true: np.ndarray, probs: np.ndarray, n_resamples: int, seed: int,
                 level: float = 0.95, groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """Percentile bootstrap CIs: a stratified (cluster) bootstrap of subjects or patient groups.

    Resamples come from :func:`bootstrap_indices`: whole patient groups when ``groups`` puts several rows in one
    group (two B-scans of one patient are never split), each class resampled within itself so that no resample
    lacks a class. :func:`resampling_units` says what was resampled (``unit``, ``n_groups``) for the report.

    Args:
        y_true: ``(N,)`` class indices.
        probs: ``(N, K)`` probabilities.
        n_resamples: number of resamples (0 = none).
        seed: NumPy generator seed: the same seed gives the same intervals.
        level: confidence level.
        groups: patient group per row (None: each row is its own unit).

    Returns:
        ``{metric: [low, high]}`` for :data:`CI_METRICS` (sens/spec for binary only); a metric undefined in some
        resamples (e.g. AUC when a class is missing) uses the others, and ``n_valid`` says how many.
    """
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if n_resamples <= 0 or len(y_true) == 0:
        return {}
    draws: dict[str, list[float]] = {}
    n_bins = n_bins_for(len(y_true))  # the full sample's ECE bin count, so every resample bins alike
    for row in bootstrap_indices(y_true, n_resamples, seed, groups):
        scores = {**fast_scores(y_true[row], probs[row]), **calibration_scores(y_true[row], probs[row], n_bins)}
        for k, v in scores.items():
            draws.setdefault(k, []).append(v)
    alpha = (1 - level) / 2 * 100
    out: dict[str, Any] = {}
    n_valid = {}
    for k in CI_METRICS:
        vals = np.asarray(draws.get(k, []), dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if k not in draws:
            continue
        n_valid[k] = int(len(vals))
        out[k] = ([float(v) for v in np.percentile(vals, [alpha, 100 - alpha])] if len(vals) else
                  [math.nan, math.nan])
    out["n_valid"] = n_valid
    return out


def evaluation_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Every hold-out metric of one set of subject-level predictions (no CIs).

    Args:
        y_true: ``(N,)`` class indices.
        probs: ``(N, K)`` probabilities.
        class_names: the K class names.

    Returns:
        accuracy, balanced_accuracy, auc (from probabilities; OvR macro for K > 2), f1_macro, kappa, per-class
        precision/recall/F1/support, confusion_matrix (rows = true), and for binary tasks sensitivity and
        specificity (positive = class index 1); calibration and selective prediction
        (:func:`octa3d.evaluation.calibration.calibration_report`: brier, ece, ece_bins, reliability, aurc, selective,
        and for
        binary tasks calibration_slope/calibration_intercept).
    """
    from sklearn.metrics import cohen_kappa_score, precision_recall_fscore_support

    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    out: dict[str, Any] = dict(classification_metrics(y_true, probs))
    kappa = cohen_kappa_score(y_true, pred, labels=list(range(k)))
    out["kappa"] = float(kappa) if np.isfinite(kappa) else math.nan
    prec, rec, f1, sup = precision_recall_fscore_support(y_true, pred, labels=list(range(k)), zero_division=0)
    out["per_class"] = {name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                               "support": int(sup[i])} for i, name in enumerate(class_names)}
    cm = confusion(y_true, probs)
    out["confusion_matrix"] = cm.tolist()
    if k == 2:
        out["sensitivity"] = float(cm[1, 1] / cm[1].sum()) if cm[1].sum() else math.nan
        out["specificity"] = float(cm[0, 0] / cm[0].sum()) if cm[0].sum() else math.nan
    out["n_subjects"] = int(len(y_true))
    out.update(calibration_report(y_true, probs))
    return out


def chance_report(m: dict[str, Any], n_classes: int) -> dict[str, Any]:
    """metrics.json ``chance``: the chance level of the headline metrics that have one (balanced accuracy 1/K,
    AUC 0.5, kappa 0) and those whose 95 % CI reaches it (``ci_includes_chance``): such a result does not show
    that the model beats guessing on these subjects."""
    levels = {"balanced_accuracy": 1.0 / n_classes, "auc": 0.5, "kappa": 0.0}
    hits = []
    for key, level in levels.items():
        ci = (m.get("ci95") or {}).get(key)
        if ci and math.isfinite(ci[0]) and ci[0] <= level:
            hits.append(key)
    return {"levels": levels, "ci_includes_chance": hits}


def chance_lines(m: dict[str, Any]) -> list[str]:
    """A WARNING line for the CLI summary when a headline CI includes chance (see :func:`chance_report`)."""
    hits = (m.get("chance") or {}).get("ci_includes_chance") or []
    if not hits:
        return []
    levels = m["chance"]["levels"]
    what = ", ".join(f"{k.replace('_', ' ')} {format_metric(m, k)} (chance {levels[k]:.2f})" for k in hits)
    return [f"  WARNING: the 95 % CI of {what} includes chance: on these {m.get('n_subjects', '?')} subjects the "
            "model is not shown to beat guessing (more test subjects, or see the train stage's fit check)"]


def format_metric(m: dict[str, Any], key: str) -> str:
    """``value [low, high]`` of one metric of an :func:`evaluation_metrics` result (``n/a`` when undefined)."""
    v = m.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    ci = m.get("ci95", {}).get(key)
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(math.isfinite(c) for c in ci) else "")


def summary_lines(m: dict[str, Any]) -> list[str]:
    """Headline metrics (with 95 % CIs) as printable lines."""
    keys = ["balanced_accuracy", "auc", "accuracy", "f1_macro", "kappa"]
    if "sensitivity" in m:
        keys += ["sensitivity", "specificity"]
    lines = [f"  {k.replace('_', ' '):<18} {format_metric(m, k)}" for k in keys]
    return lines + calibration_lines(m) + class_lines(m)


def calibration_lines(m: dict[str, Any]) -> list[str]:
    """Brier, ECE (with its bin count), calibration slope/intercept (binary), AURC and the 90 %-coverage accuracy."""
    if "brier" not in m:
        return []
    lines = [f"  {'brier score':<18} {format_metric(m, 'brier')}",
             f"  {'ece':<18} {format_metric(m, 'ece')} ({m.get('ece_bins')} equal-mass bins)"]
    if "calibration_slope" in m:
        lines += [f"  {'calibration slope':<18} {format_metric(m, 'calibration_slope')} (1 = calibrated)",
                  f"  {'calib. intercept':<18} {format_metric(m, 'calibration_intercept')} (0 = calibrated)"]
    lines.append(f"  {'aurc':<18} {format_metric(m, 'aurc')} (risk = error rate; lower is better)")
    sel = m.get("selective") or {}
    if sel.get("n_kept"):
        cov = int(round(100 * sel["coverage"]))
        lines.append(f"  at {cov} % coverage accuracy {sel[f'accuracy_at_{cov}']:.3f}, balanced accuracy "
                     f"{sel[f'balanced_accuracy_at_{cov}']:.3f} ({sel['n_kept']} most confident subjects)")
    return lines


def class_lines(m: dict[str, Any]) -> list[str]:
    """Multi-class runs: recall per class, the confusion matrix and a call-out of classes never predicted right.

    Macro figures hide a class the model never learned (a 4-class model with one dead class still reaches macro-F1
    around 0.6), so the summary shows each class.
    """
    per, cm = m.get("per_class") or {}, m.get("confusion_matrix")
    names = [n for n in (m.get("class_names") or list(per)) if n in per]
    if len(names) <= 2:
        return []
    lines = ["  recall per class   " + ", ".join(f"{n} {per[n]['recall']:.2f} (n={per[n]['support']})"
                                               for n in names)]
    if cm is not None and len(cm) == len(names):
        width = max(6, *(len(n) for n in names))
        lines.append("  confusion matrix (rows = true, columns = predicted):")
        lines.append("    " + " " * width + " " + " ".join(f"{n[:width]:>{width}}" for n in names))
        lines += ["    " + f"{n[:width]:<{width}} " + " ".join(f"{int(v):>{width}}" for v in row)
                  for n, row in zip(names, cm)]
    dead = [n for n in names if per[n]["support"] and per[n]["recall"] == 0]
    if dead:
        lines.append(f"  WARNING: recall 0 for {', '.join(dead)}: the model never predicts "
                     f"{'this class' if len(dead) == 1 else 'these classes'} correctly")
    return lines


def predictions_frame(ids: Sequence[str], y: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> Any:
    """``predictions.csv``: subject, true label, one probability column per class, prediction, correct."""
    import pandas as pd

    cols: dict[str, Any] = {"subject": list(ids), "label": [names[i] for i in y]}
    for c, n in enumerate(names):
        cols[f"p_{n}"] = np.round(probs[:, c], 6)
    cols["prediction"] = [names[i] for i in probs.argmax(axis=1)]
    cols["correct"] = probs.argmax(axis=1) == y
    return pd.DataFrame(cols)
