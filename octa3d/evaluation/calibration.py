"""Calibration and selective prediction: do the probabilities mean what they say, and which eyes to hand over.

Definitions (the README's "Calibration and selective prediction" section explains how to read them):

* **Brier score**: mean squared error of the predicted probabilities against the outcome. Binary tasks use
  P(positive class) against 0/1; multi-class tasks the whole probability vector against the one-hot label (sum
  over classes, mean over subjects; 0 = perfect, 2 = worst).
* **ECE** (expected calibration error) with *equal-mass* bins: subjects sorted by their score and cut into
  :func:`n_bins_for` groups of (nearly) equal size; ECE = sum over bins of (bin share) x |mean score - observed
  frequency|. The score is P(positive) against the positive rate for binary tasks, and the top-label confidence
  (max probability) against accuracy for multi-class tasks.
* **Calibration slope and intercept** (binary): the logistic regression ``logit P(y=1) = a + b * logit(p)`` fitted
  by maximum likelihood (:func:`calibration_fit`). Perfect calibration: b = 1, a = 0; b < 1 means over-confident
  (too extreme) probabilities. Undefined (NaN) when the outcome is one class or separated by ``p``.
* **Temperature scaling**: calibrated probabilities ``softmax(log p / T)``; for one patch per subject this equals
  ``softmax(logits / T)``. T > 1 softens over-confident probabilities. :func:`fit_temperature` minimises the
  negative log-likelihood over ``log T`` on *validation* predictions.
* **Selective prediction**: subjects ranked by confidence (max probability); at coverage c the most confident
  fraction c is kept. AURC = the mean error rate over the coverages 1/N, 2/N, ..., 1 (lower is better; the
  best achievable for an error rate r is about r + (1 - r) ln(1 - r), a random ranking gives about r).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Most bins of the expected calibration error; fewer when the test set is small (:func:`n_bins_for`).
MAX_BINS = 10
#: Fewest subjects per ECE bin: a bin of fewer subjects measures noise, not calibration.
MIN_PER_BIN = 10
#: Probabilities are clipped to [EPS, 1 - EPS] before a logarithm or logit.
EPS = 1e-7
#: The coverage quoted in the summary ("at 90 % coverage the model reaches ...").
REPORT_COVERAGE = 0.9
#: Keys of :func:`calibration_scores` (bootstrap CIs are computed for these).
CALIBRATION_KEYS = ("brier", "ece", "calibration_slope", "calibration_intercept", "aurc")


def n_bins_for(n: int) -> int:
    """ECE bins for ``n`` subjects: 10, fewer so that each bin holds at least 10 subjects (at least 1 bin)."""
    return int(max(1, min(MAX_BINS, n // MIN_PER_BIN)))


def _as_arrays(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probabilities of shape {p.shape} do not match {len(y)} labels")
    return y, p


def brier_score(y_true: Any, probs: Any) -> float:
    """Brier score: binary on P(class 1); multi-class on the probability vector vs one-hot (NaN when empty)."""
    y, p = _as_arrays(y_true, probs)
    if not len(y):
        return math.nan
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - (y == 1)) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _score_and_outcome(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the ECE and the reliability diagram compare: (P(positive), y == 1) for binary tasks, else
    (max probability, prediction correct)."""
    if p.shape[1] == 2:
        return p[:, 1], (y == 1).astype(np.float64)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def reliability_bins(y_true: Any, probs: Any, n_bins: int | None = None) -> dict[str, list[float]]:
    """Equal-mass bins of the reliability diagram.

    Args:
        y_true: ``(N,)`` class indices.
        probs: ``(N, K)`` probabilities.
        n_bins: number of bins (default :func:`n_bins_for` N); never more than N.

    Returns:
        ``mean_score``, ``observed`` (positive rate or accuracy), ``count`` and the bins' ``low``/``high`` score
        per bin, and ``kind`` ("positive" for binary, "top-label" otherwise).
    """
    y, p = _as_arrays(y_true, probs)
    score, outcome = _score_and_outcome(y, p)
    n_bins = min(n_bins or n_bins_for(len(y)), len(y))
    order = np.argsort(score, kind="stable")
    out: dict[str, Any] = {"mean_score": [], "observed": [], "count": [], "low": [], "high": [],
                           "kind": "positive" if p.shape[1] == 2 else "top-label"}
    for idx in np.array_split(order, n_bins) if n_bins else []:
        out["mean_score"].append(float(score[idx].mean()))
        out["observed"].append(float(outcome[idx].mean()))
        out["count"].append(int(len(idx)))
        out["low"].append(float(score[idx].min()))
        out["high"].append(float(score[idx].max()))
    return out


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int | None = None) -> float:
    """ECE with equal-mass bins (see the module docstring); NaN when there are no subjects."""
    y, p = _as_arrays(y_true, probs)
    if not len(y):
        return math.nan
    score, outcome = _score_and_outcome(y, p)
    n_bins = min(n_bins or n_bins_for(len(y)), len(y))
    parts = np.array_split(np.argsort(score, kind="stable"), n_bins)
    return float(sum(len(i) * abs(score[i].mean() - outcome[i].mean()) for i in parts) / len(y))


def calibration_fit(y_true: Any, p_positive: Any, max_iter: int = 50) -> tuple[float, float]:
    """Calibration intercept and slope: logistic regression of the 0/1 outcome on logit(p), by Newton's method.

    Args:
        y_true: ``(N,)`` 0/1 outcomes.
        p_positive: ``(N,)`` predicted P(positive).
        max_iter: Newton iterations at most.

    Returns:
        ``(intercept, slope)``; ``(nan, nan)`` when the fit is undefined: one outcome class, all logits equal, or
        outcomes separated by the logits (the maximum-likelihood slope is then infinite).
    """
    y = (np.asarray(y_true) == 1).astype(np.float64)
    z = np.log(np.clip(np.asarray(p_positive, np.float64), EPS, 1 - EPS))
    z = z - np.log(np.clip(1 - np.asarray(p_positive, np.float64), EPS, 1 - EPS))
    pos, neg = z[y == 1], z[y == 0]
    if not len(pos) or not len(neg) or np.ptp(z) == 0:
        return math.nan, math.nan
    if neg.max() <= pos.min() or pos.max() <= neg.min():  # (quasi-)complete separation
        return math.nan, math.nan
    x = np.stack([np.ones_like(z), z], axis=1)
    beta = np.zeros(2)
    for _ in range(max_iter):
        mu = 1 / (1 + np.exp(-np.clip(x @ beta, -500, 500)))
        w = mu * (1 - mu)
        hess = x.T @ (x * w[:, None])
        try:
            step = np.linalg.solve(hess, x.T @ (y - mu))
        except np.linalg.LinAlgError:
            return math.nan, math.nan
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    else:  # no convergence (near-separated or near-constant logits): the numbers would be arbitrary
        return math.nan, math.nan
    if not np.all(np.isfinite(beta)):
        return math.nan, math.nan
    return float(beta[0]), float(beta[1])


def risk_coverage(y_true: Any, probs: Any, confidence: Any = None) -> dict[str, np.ndarray]:
    """Selective-prediction curve: keep the k most confident subjects, k = 1..N.

    Args:
        y_true: ``(N,)`` class indices.
        probs: ``(N, K)`` probabilities.
        confidence: ``(N,)`` ranking score, higher = more confident (default: the max probability); ties keep the
            input order.

    Returns:
        ``coverage`` (k/N), ``risk`` (error rate of the kept subjects), ``accuracy`` and ``balanced_accuracy``
        (mean recall over the classes present among the kept subjects), each ``(N,)``.
    """
    y, p = _as_arrays(y_true, probs)
    conf = p.max(axis=1) if confidence is None else np.asarray(confidence, np.float64)
    order = np.argsort(-conf, kind="stable")
    ys, correct = y[order], (p.argmax(axis=1) == y)[order].astype(np.float64)
    n, k = len(y), p.shape[1]
    kept = np.arange(1, n + 1)
    acc = np.cumsum(correct) / kept
    # recall of each class among the first k kept subjects: cumulative hits / cumulative support
    onehot = np.eye(k)[ys]
    support, hits = np.cumsum(onehot, axis=0), np.cumsum(onehot * correct[:, None], axis=0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    bal = recall.sum(axis=1) / np.maximum((support > 0).sum(axis=1), 1)
    return {"coverage": kept / max(n, 1), "risk": 1 - acc, "accuracy": acc, "balanced_accuracy": bal}


def aurc(y_true: Any, probs: Any, confidence: Any = None) -> float:
    """Area under the risk-coverage curve (mean error rate over coverages 1/N..1); NaN when empty."""
    if not len(np.asarray(y_true)):
        return math.nan
    return float(np.mean(risk_coverage(y_true, probs, confidence)["risk"]))


def at_coverage(curve: dict[str, np.ndarray], coverage: float = REPORT_COVERAGE) -> dict[str, float]:
    """Accuracy and balanced accuracy of the most confident ``coverage`` share (at least one subject)."""
    n = len(curve["coverage"])
    if not n:
        return {"coverage": coverage, "n_kept": 0, "accuracy": math.nan, "balanced_accuracy": math.nan}
    k = max(1, int(math.ceil(coverage * n - 1e-9)))
    return {"coverage": coverage, "n_kept": k, "accuracy": float(curve["accuracy"][k - 1]),
            "balanced_accuracy": float(curve["balanced_accuracy"][k - 1])}


def calibration_scores(y_true: Any, probs: Any, n_bins: int | None = None) -> dict[str, float]:
    """Brier, ECE, AURC and (binary) calibration slope/intercept: NumPy only, cheap enough for the bootstrap."""
    y, p = _as_arrays(y_true, probs)
    out = {"brier": brier_score(y, p), "ece": expected_calibration_error(y, p, n_bins), "aurc": aurc(y, p)}
    if p.shape[1] == 2:
        out["calibration_intercept"], out["calibration_slope"] = calibration_fit(y, p[:, 1])
    return out


def calibration_report(y_true: Any, probs: Any) -> dict[str, Any]:
    """Everything of this module for metrics.json: :func:`calibration_scores`, the bin count, the reliability
    bins, and the selective-prediction figures at :data:`REPORT_COVERAGE`."""
    y, p = _as_arrays(y_true, probs)
    n_bins = n_bins_for(len(y))
    out: dict[str, Any] = dict(calibration_scores(y, p, n_bins))
    out["ece_bins"] = n_bins
    out["reliability"] = reliability_bins(y, p, n_bins) if len(y) else {}
    sel = at_coverage(risk_coverage(y, p))
    out["selective"] = {f"{k}_at_{int(round(REPORT_COVERAGE * 100))}" if k in ("accuracy", "balanced_accuracy")
                        else k: v for k, v in sel.items()}
    return out


# ------------------------------------------------------------------------------------------ temperature scaling
def apply_temperature(probs: Any, temperature: float | None) -> np.ndarray:
    """``softmax(log p / T)`` row-wise; ``T`` None or 1 returns the probabilities unchanged (as float64)."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature is None or temperature == 1.0 or not len(p):
        return p
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    z = np.log(np.clip(p, EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(y_true: Any, probs: Any) -> float:
    """Mean negative log-likelihood of the true classes."""
    y, p = _as_arrays(y_true, probs)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))))


#: The range :func:`fit_temperature` searches; a fit at either end means the validation outputs carry little
#: information (upper) or the validation set is nearly separable (lower); the train stage warns about both.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(y_true: Any, probs: Any, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Temperature that minimises the validation NLL of ``softmax(log p / T)`` (bounded search over log T).

    Call it with *validation* predictions only (the train stage does, per fold); fitting on test subjects would
    make the reported calibration optimistic.

    Args:
        y_true: ``(N,)`` validation class indices.
        probs: ``(N, K)`` validation probabilities of the uncalibrated model.
        bounds: the range of T searched.

    Returns:
        T (1.0 when there is nothing to fit: no subjects, a single class predicted with certainty, or every validation
        subject classified correctly).
    """
    from scipy.optimize import minimize_scalar

    y, p = _as_arrays(y_true, probs)
    if not len(y):
        return 1.0
    if np.all(p.argmax(axis=1) == y):
        # separable validation set: the NLL falls monotonically as T -> 0, so the fit would sharpen to the search
        # bound (measured: T = 0.09 on 16 perfectly classified 4-class validation eyes raised the hold-out ECE
        # 0.009 -> 0.027): nothing can be learnt about over-confidence from it, keep the model as it is
        return 1.0
    res = minimize_scalar(lambda t: nll(y, apply_temperature(p, math.exp(t))),
                          bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-5})
    t = float(math.exp(res.x))
    # a flat NLL (e.g. every row one-hot): keep the identity rather than a bound picked by rounding
    return t if nll(y, apply_temperature(p, t)) < nll(y, p) - 1e-12 else 1.0


# ------------------------------------------------------------------------------------------ uncertainty per eye
#: Share of validation eyes left unflagged by the ``uncertain`` threshold (10 % of them are flagged).
UNCERTAIN_COVERAGE = 0.9


def entropy(probs: Any) -> np.ndarray:
    """Predictive entropy ``-sum p log p`` of each row, in nats (0 = certain; ln K = uniform over K classes)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    if p.ndim != 2:
        raise ValueError(f"probabilities of shape {p.shape}: need (N, K)")
    return 0.0 - np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)  # 0.0: no -0.0


def entropy_threshold(entropies: Any, coverage: float = UNCERTAIN_COVERAGE) -> float:
    """Entropy above which an eye is flagged ``uncertain``, so that at least ``coverage`` of these (validation)
    eyes stay unflagged: the ceil(coverage * N)-th smallest entropy (ties at it stay unflagged, so with few eyes
    fewer than 1 - coverage may be flagged). ``inf`` (nobody flagged) when there are no eyes.
    """
    e = np.sort(np.asarray(entropies, dtype=np.float64))
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if not len(e):
        return math.inf
    return float(e[max(1, int(math.ceil(coverage * len(e) - 1e-9))) - 1])


def uncertainty_report(y_true: Any, probs: Any, entropies: Any, threshold: float | None,
                       also: Any = None) -> dict[str, Any]:
    """Share of eyes flagged (entropy > ``threshold``, or ``also``: e.g. out of distribution) and the error rate of
    flagged vs unflagged eyes (NaN where a group is empty), plus the AURC with entropy as the confidence ranking."""
    y, p = _as_arrays(y_true, probs)
    e = np.asarray(entropies, dtype=np.float64)
    wrong = p.argmax(axis=1) != y if len(y) else np.zeros(0, bool)
    out: dict[str, Any] = {"entropy_mean": float(e.mean()) if len(e) else math.nan,
                           "aurc_entropy": aurc(y, p, -e) if len(y) else math.nan}
    if threshold is None:
        return {**out, "threshold": None, "n_flagged": None, "share_flagged": None}
    flag = e > threshold
    if also is not None:
        flag = flag | np.asarray(also, dtype=bool)
    rate = (lambda m: float(wrong[m].mean()) if m.any() else math.nan)
    return {**out, "threshold": float(threshold), "n_flagged": int(flag.sum()),
            "share_flagged": float(flag.mean()) if len(e) else math.nan,
            "error_rate_flagged": rate(flag), "error_rate_unflagged": rate(~flag)}
