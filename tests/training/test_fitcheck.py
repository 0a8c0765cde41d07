"""The end-of-training fit check (octa3d.training.fitcheck): verdicts and the advice a user reads."""

from __future__ import annotations

import math

from octa3d.training.fitcheck import assess_fit, fit_messages

LN2 = math.log(2)


def _history(losses, accs):
    return [{"epoch": i + 1, "train_loss": l, "train_accuracy": a} for i, (l, a) in enumerate(zip(losses, accs))]


def test_a_run_that_stayed_at_chance_did_not_learn_and_is_told_what_to_try():
    rep = assess_fit(_history([0.70, 0.69, 0.66], [0.5, 0.52, 0.6]), LN2,
                     {"epoch": 2, "balanced_accuracy": 0.54}, temperature=20.0)
    assert rep["verdict"] == "did_not_learn" and rep["left_chance_epoch"] is None
    assert rep["problems"] == ["did_not_learn", "temperature_at_bound"]
    info, warnings = fit_messages(rep, "fold 0", 3e-4)
    assert "left chance at epoch never" in info and "did not learn" in info
    assert len(warnings) == 2 and "fold 0: the model did not learn" in warnings[0]
    assert "--epochs 6" in warnings[0] and "--lr 0.0009" in warnings[0] and "Training recipe" in warnings[0]
    assert "temperature 20.000 is at the bound" in warnings[1] and "no information" in warnings[1]


def test_verdicts_fit_under_fit_over_fit():
    fit = assess_fit(_history([0.7, 0.5, 0.1], [0.5, 0.8, 0.98]), LN2, {"epoch": 3, "balanced_accuracy": 0.95})
    assert fit["verdict"] == "fit" and fit["left_chance_epoch"] == 2 and fit["problems"] == []
    assert fit_messages(fit, "fold 0", 1e-3)[1] == []
    under = assess_fit(_history([0.7, 0.6, 0.55], [0.5, 0.7, 0.78]), LN2, {"epoch": 3, "balanced_accuracy": 0.7})
    assert under["verdict"] == "under_fit" and "under-fits" in fit_messages(under, "fold 1", 1e-3)[1][0]
    over = assess_fit(_history([0.7, 0.2, 0.05], [0.5, 0.9, 1.0]), LN2, {"epoch": 3, "balanced_accuracy": 0.6})
    assert over["verdict"] == "over_fit" and over["gap"] == 0.4
    assert "gap 0.40" in fit_messages(over, "fold 0", 1e-3)[1][0]
