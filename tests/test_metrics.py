"""Metrics from probabilities, checked against hand-computed values."""

import math

import numpy as np

from octa3d.metrics import classification_metrics, confusion, roc_auc


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
