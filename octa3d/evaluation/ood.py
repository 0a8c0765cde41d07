"""Out-of-distribution reference: what a model was trained on, fitted at training time and stored in its checkpoint
(``ood_reference``), and the raw scores of a new scan against it. :mod:`octa3d.evaluation.ood_check` turns the
scores into the ``ood`` flag.

Three checks, one per way a scan can differ from the training eyes:

* **geometry**: the source shape, voxel spacing and field of view (shape x spacing, mm) per axis, against the
  range the training subjects span. Score: how far outside that range the scan lies, in units of
  :data:`GEOMETRY_TOLERANCE` (log scale; 0 inside the range, 1 at 10 % outside it). A rule, not a learned
  threshold: the training geometry is often one value, whose spread says nothing about tolerable change.
* **intensity**: per channel, the raw (as read) intensities at the clip percentiles of the preprocessing
  (``--clip-percentiles``, the ``intensity`` of each :class:`~octa3d.data.record.PreprocessRecord`), before the
  per-volume scaling to 0..1 that makes the network blind to a drift. Score: the largest ``|z|`` against the
  training subjects' mean and sd (sd at least :data:`INTENSITY_FLOOR` of the channel's clip range, so that a
  value every training scan shares, e.g. a saturated 255, does not make any difference infinite).
* **features**: the globally pooled encoder output (the input of the classification head) of the same forward
  pass as the prediction, scored as in Lee et al. 2018 ("A simple unified framework for detecting
  out-of-distribution samples and adversarial attacks"): class-conditional Gaussians with one shared covariance,
  shrunk by Ledoit-Wolf (:class:`sklearn.covariance.LedoitWolf`; the training eyes are fewer than the feature
  channels), and the score is the squared Mahalanobis distance to the closest class mean.

Reference scores: the thresholds of the learned checks are quantiles of the scores of eyes *held out of the fit*:
the validation subjects (scored by the full fit) plus every training subject scored by a refit that excluded it
(:data:`CROSS_FIT_FOLDS`-fold cross-fitting). Validation sets are small (~10 eyes); the cross-fitted training
scores make the quantile usable (:func:`reference_scores`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from octa3d.data.record import PreprocessRecord

#: Bumped when the stored reference changes meaning; a checkpoint with another version gets no check (INFO).
REFERENCE_VERSION = 1
#: The checks, in the order they are reported.
COMPONENTS = ("geometry", "intensity", "features")
#: Geometry score 1 = the scan lies this fraction outside the training range (shape, spacing or FOV, per axis).
GEOMETRY_TOLERANCE = 0.10
#: Smallest intensity sd, as a fraction of the channel's mean clip range (high - low) in training.
INTENSITY_FLOOR = 0.01
#: Folds of the cross-fitting that scores every training subject with a fit that excluded it.
CROSS_FIT_FOLDS = 5
#: The geometry quantities checked, per axis.
GEOMETRY_KEYS = ("shape", "spacing", "extent")


# ---------------------------------------------------------------------------------------------------- profiles
def geometry_of(record: PreprocessRecord, spacing_known: bool = True) -> dict[str, list[float]]:
    """The source geometry of a preprocessed scan in NumPy axis order: ``shape`` (voxels), ``spacing`` (mm) and
    ``extent`` (field of view, mm); without spacing and extent when the input carries no spacing (an array)."""
    g = record.geometry
    shape = [float(n) for n in g.shape]
    if not spacing_known:
        return {"shape": shape}
    spacing = [float(s) for s in reversed(g.spacing)]  # SimpleITK order is reversed NumPy order
    return {"shape": shape, "spacing": spacing, "extent": [n * s for n, s in zip(shape, spacing)]}


def intensity_of(record: PreprocessRecord) -> np.ndarray:
    """``(low, high)`` raw clip values per channel, flattened: ``(2 C,)``."""
    return np.asarray(record.intensity, dtype=np.float64).reshape(-1)


def intensity_names(channels: Sequence[str], percentiles: Sequence[float]) -> list[str]:
    """Names of :func:`intensity_of`'s entries, e.g. ``OCTA p0.5``, ``OCTA p99.5``."""
    return [f"{c} p{p:g}" for c in channels for p in percentiles]


# ---------------------------------------------------------------------------------------------------- geometry
def fit_geometry(geometries: Sequence[dict[str, list[float]]]) -> dict[str, Any]:
    """Per quantity and axis, the range ``[min, max]`` of the training subjects' geometry."""
    out: dict[str, Any] = {"tolerance": GEOMETRY_TOLERANCE}
    for key in GEOMETRY_KEYS:
        values = [g[key] for g in geometries if key in g]
        if values and len({len(v) for v in values}) == 1:
            a = np.asarray(values, dtype=np.float64)
            out[key] = {"min": a.min(0).tolist(), "max": a.max(0).tolist()}
    return out


def geometry_score(geometry: dict[str, list[float]], fit: dict[str, Any]) -> tuple[float, str]:
    """How far outside the training range the scan's geometry lies (1 = :data:`GEOMETRY_TOLERANCE` outside), and
    what lies farthest (e.g. ``shape 400x640x400, trained on 32x64x32``)."""
    unit = math.log1p(float(fit.get("tolerance", GEOMETRY_TOLERANCE)))
    worst, what = 0.0, ""
    for key in GEOMETRY_KEYS:
        if key not in geometry or key not in fit:
            continue
        v, lo, hi = (np.asarray(x, dtype=np.float64) for x in (geometry[key], fit[key]["min"], fit[key]["max"]))
        if v.shape != lo.shape:  # another number of axes than any training scan
            return math.inf, f"{key} {_fmt(v)}, trained on {len(lo)}-axis scans"
        lv = np.log(np.maximum(v, 1e-12))
        d = np.maximum(0.0, np.maximum(np.log(np.maximum(lo, 1e-12)) - lv, lv - np.log(np.maximum(hi, 1e-12))))
        score = float(d.max() / unit)
        if score > worst:
            trained = _fmt(lo) if np.allclose(lo, hi) else f"{_fmt(lo)} to {_fmt(hi)}"
            worst, what = score, f"{key} {_fmt(v)}{' mm' if key != 'shape' else ''}, trained on {trained}"
    return worst, what


def _fmt(v: np.ndarray) -> str:
    return "x".join(f"{x:.3g}" for x in v)


# ---------------------------------------------------------------------------------------------------- intensity
def fit_intensity(values: np.ndarray) -> dict[str, Any]:
    """Mean and sd (floored: :data:`INTENSITY_FLOOR`) of the training subjects' clip values ``(N, 2 C)``."""
    a = np.asarray(values, dtype=np.float64)
    mean = a.mean(0)
    sd = a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(mean)
    span = np.abs(mean[1::2] - mean[0::2])  # each channel's clip range
    floor = np.repeat(INTENSITY_FLOOR * np.maximum(span, 1e-6), 2)
    return {"mean": mean.tolist(), "scale": np.maximum(sd, floor).tolist()}


def intensity_scores(values: np.ndarray, fit: dict[str, Any]) -> np.ndarray:
    """Largest ``|z|`` over the entries, per subject: ``(N, 2 C)`` -> ``(N,)``."""
    z = (np.atleast_2d(values) - np.asarray(fit["mean"])) / np.asarray(fit["scale"])
    return np.abs(z).max(axis=1)


# ---------------------------------------------------------------------------------------------------- features
def fit_gaussian(features: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Class-conditional means and the Ledoit-Wolf-shrunk shared covariance (its inverse) of ``(N, F)`` features.

    Returns:
        ``classes`` (indices present), ``means`` ``(K, F)`` and ``precision`` ``(F, F)`` float32 tensors,
        ``shrinkage``, ``dim``.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    classes = sorted(set(y.tolist()))
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[[classes.index(c) for c in y]]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    return {"classes": classes, "means": torch.from_numpy(means).float(),
            "precision": torch.from_numpy(lw.precision_).float(), "shrinkage": float(lw.shrinkage_),
            "dim": int(x.shape[1])}


def mahalanobis(features: np.ndarray, fit: dict[str, Any]) -> np.ndarray:
    """Squared Mahalanobis distance of each ``(N, F)`` feature vector to its closest class mean: ``(N,)``."""
    x = np.atleast_2d(np.asarray(features, dtype=np.float64))
    means = np.asarray(fit["means"], dtype=np.float64)
    prec = np.asarray(fit["precision"], dtype=np.float64)
    d = x[:, None, :] - means[None]  # (N, K, F)
    return np.einsum("nkf,fg,nkg->nk", d, prec, d).min(axis=1)


# ---------------------------------------------------------------------------------------------------- reference
def cross_fit(n: int, fit: Any, score: Any, folds: int = CROSS_FIT_FOLDS, seed: int = 0) -> np.ndarray:
    """Scores of ``n`` training subjects, each by a fit on the folds that exclude it.

    Args:
        fit: ``fit(indices) -> model`` on the training subjects at ``indices``.
        score: ``score(model, indices) -> (len(indices),)`` scores.

    Returns:
        ``(n,)`` scores (empty when there are fewer than 2 x ``folds`` subjects: too few to refit).
    """
    if n < 2 * folds:
        return np.zeros(0)
    perm = np.random.default_rng(seed).permutation(n)
    out = np.zeros(n)
    for k in range(folds):
        held = np.sort(perm[k::folds])
        rest = np.setdiff1d(np.arange(n), held)
        out[held] = score(fit(rest), held)
    return out


def build_reference(train: dict[str, Any], val: dict[str, Any], channels: Sequence[str],
                    percentiles: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """The ``ood_reference`` of a checkpoint (tensors, lists and numbers only: ``weights_only`` loading).

    Args:
        train: the training subjects' ``geometry`` (list of :func:`geometry_of`), ``intensity`` ``(N, 2 C)``,
            ``features`` ``(N, F)`` (None: a model without ``forward_features``) and ``labels`` ``(N,)``.
        val: the validation subjects', the same keys.
        channels: the modality names of the channels (``OCT``, ``OCTA``).
        percentiles: ``--clip-percentiles``.
        seed: draws the cross-fitting folds.
    """
    t_int, v_int = np.asarray(train["intensity"]), np.asarray(val["intensity"])
    ref: dict[str, Any] = {
        "version": REFERENCE_VERSION, "n_train": len(t_int), "n_val": len(v_int), "folds": CROSS_FIT_FOLDS,
        "geometry": fit_geometry(list(train["geometry"]) + list(val["geometry"])),
        "intensity": {**fit_intensity(t_int), "names": intensity_names(channels, percentiles)}}
    int_fit = ref["intensity"]
    ref["validation"] = {"intensity": intensity_scores(v_int, int_fit).tolist() if len(v_int) else []}
    ref["training"] = {"intensity": cross_fit(len(t_int), lambda i: fit_intensity(t_int[i]),
                                              lambda f, i: intensity_scores(t_int[i], f), seed=seed).tolist()}
    if train.get("features") is not None:
        tf, tl = np.asarray(train["features"], dtype=np.float64), np.asarray(train["labels"])
        gauss = fit_gaussian(tf, tl)
        ref["features"] = {"method": "mahalanobis", "pooling": "global mean of forward_features (ViT: class token)",
                           **gauss}
        vf = np.asarray(val["features"], dtype=np.float64)
        ref["validation"]["features"] = mahalanobis(vf, gauss).tolist() if len(vf) else []
        ref["training"]["features"] = cross_fit(len(tf), lambda i: fit_gaussian(tf[i], tl[i]),
                                                lambda f, i: mahalanobis(tf[i], f), seed=seed).tolist()
    # geometry covers the validation scans too: a rule on the range of every scan that shaped the model
    return ref


def reference_scores(ref: dict[str, Any], component: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The held-out-of-the-fit scores of one learned check: the validation subjects' plus the cross-fitted
    training subjects', pooled as they are.

    The network has seen its training eyes (their features may lie closer to the class means than a new eye's)
    while each cross-fit refits on four fifths of them (farther); rescaling the training scores to the validation
    eyes' median was tried and dropped: with ~10 validation eyes it over-corrected (``benchmarks/ood.py``: no false
    alarm but a fifth fewer shifted eyes caught, where the pooled scores held 1 false alarm in 64 eyes).

    Returns:
        ``(scores, how)``: ``how`` says how many of each.
    """
    val = np.asarray(ref.get("validation", {}).get(component, []), dtype=np.float64)
    tr = np.asarray(ref.get("training", {}).get(component, []), dtype=np.float64)
    return np.concatenate([val, tr]), {"n_validation": len(val), "n_training_cross_fitted": len(tr)}


def conformal_threshold(scores: np.ndarray, rate: float) -> tuple[float, float]:
    """The score above which a new in-distribution eye is flagged with probability at most ``rate``: the
    ``ceil((n + 1)(1 - rate))``-th smallest of ``n`` held-out scores (split-conformal; exact for exchangeable
    eyes). With too few scores for ``rate`` the largest is used, which holds a false-alarm rate of ``1 / (n + 1)``.

    Returns:
        ``(threshold, the false-alarm rate it guarantees)``; ``(inf, 0)`` without scores.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if not n:
        return math.inf, 0.0
    k = math.ceil((n + 1) * (1 - rate) - 1e-9)
    if k > n:
        return float(s[-1]), 1.0 / (n + 1)
    return float(s[k - 1]), float(rate)


def profile_set(ids: Sequence[str], labels: np.ndarray, features: dict[str, np.ndarray],
                record_of: Any) -> dict[str, Any]:
    """The inputs of :func:`build_reference` for a set of subjects: their geometry and intensity (from each
    subject's :class:`~octa3d.data.record.PreprocessRecord`, ``record_of(id)``) and the pooled features of the
    forward pass that predicted them (``features``: id -> ``(F,)``; empty: a model without them)."""
    recs = [record_of(i) for i in ids]
    return {"labels": np.asarray(labels), "geometry": [geometry_of(r) for r in recs],
            "intensity": np.stack([intensity_of(r) for r in recs]) if recs else np.zeros((0, 2)),
            "features": np.stack([features[i] for i in ids]) if features and len(ids) else None}
