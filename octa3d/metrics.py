"""Classification metrics computed from predicted *probabilities* (never AUC from hard labels)."""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             roc_auc_score)

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
