"""End-of-training check: did the classifier fit its training set, and does validation follow?

A run that never left the initial plateau reports chance-level numbers that look like results; this check says so
at the end of every ``--mode train`` fold (a WARNING with what to try, and ``fit`` in ``train/summary.json``).
Verdicts, in order of precedence:

* ``did_not_learn``: the training loss never fell below :data:`~octa3d.training.optim.LEFT_CHANCE` x the chance
  loss (what a model that predicts uniform probabilities scores, ln K for plain cross-entropy);
* ``under_fit``: it did, but the training accuracy of the last epoch is below :data:`UNDER_FIT_ACCURACY`;
* ``over_fit``: training accuracy exceeds the best validation balanced accuracy by more than :data:`GAP`;
* ``fit`` otherwise.

The training accuracy is the running one of the last epoch (augmented samples, dropout on), so it slightly
understates what the model does on its training eyes; a temperature at the bound of its search is reported as well.
"""

from __future__ import annotations

import math
from typing import Any

from octa3d.config.schema import TrainConfig
from octa3d.evaluation.calibration import TEMPERATURE_BOUNDS
from octa3d.training.optim import LEFT_CHANCE

#: Training accuracy below which a model that left chance still counts as under-fitted.
UNDER_FIT_ACCURACY = 0.9
#: Training accuracy minus validation balanced accuracy above which the fold is reported as over-fitted.
GAP = 0.2
#: The stock ``--lr``: the recipe ladder found it learns every look where 3e-4 stalled and 3e-3 was unstable.
STOCK_LR = TrainConfig().lr
#: A rise of the training loss, epoch on epoch, by more than this fraction of the chance loss counts as a jump.
JUMP = 0.25


def _f(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def assess_fit(history: list[dict[str, Any]], chance_loss: float, best: dict[str, Any],
               temperature: float | None = None, stopped_early: bool = False) -> dict[str, Any]:
    """The fit report of one training run.

    Args:
        history: the run's history rows (``epoch``, ``train_loss``, ``train_accuracy`` ...).
        chance_loss: :func:`octa3d.training.optim.chance_loss` of the training split.
        best: the best epoch's validation metrics (with ``epoch`` and ``balanced_accuracy``).
        temperature: the fitted calibration temperature, if any.
        stopped_early: whether early stopping ended the run.

    Returns:
        ``verdict`` (``fit``/``did_not_learn``/``under_fit``/``over_fit``), ``problems`` (every verdict that
        applies, plus ``temperature_at_bound``), ``left_chance_epoch`` (first epoch below the threshold, None if
        none), ``epochs_run``, ``stopped_early``, ``loss_jumps`` (the training loss rose by more than
        :data:`JUMP` x the chance loss from one epoch to the next), ``chance_loss``, ``left_chance_below``,
        ``train_loss`` and ``train_accuracy`` (last epoch), ``val_balanced_accuracy`` (best epoch), ``gap``,
        ``temperature``.
    """
    rows = sorted(history, key=lambda r: int(r["epoch"]))
    below = LEFT_CHANCE * chance_loss
    left = next((int(r["epoch"]) for r in rows if _f(r.get("train_loss")) < below), None)
    last = rows[-1] if rows else {}
    train_acc, val_bacc = _f(last.get("train_accuracy")), _f(best.get("balanced_accuracy"))
    gap = train_acc - val_bacc
    problems = []
    if left is None:
        problems.append("did_not_learn")
    elif train_acc < UNDER_FIT_ACCURACY:
        problems.append("under_fit")
    if left is not None and gap > GAP:
        problems.append("over_fit")
    lo, hi = TEMPERATURE_BOUNDS
    if temperature is not None and (temperature >= 0.99 * hi or temperature <= 1.01 * lo):
        problems.append("temperature_at_bound")
    verdict = next((p for p in problems if p != "temperature_at_bound"), "fit")
    losses = [_f(r.get("train_loss")) for r in rows]
    jumps = any(b - a > JUMP * chance_loss for a, b in zip(losses, losses[1:]) if not (math.isnan(a) or math.isnan(b)))
    return {"verdict": verdict, "problems": problems, "left_chance_epoch": left, "epochs_run": len(rows),
            "stopped_early": bool(stopped_early), "loss_jumps": jumps, "chance_loss": chance_loss,
            "left_chance_below": below,
            "train_loss": _f(last.get("train_loss")), "train_accuracy": train_acc, "best_epoch": best.get("epoch"),
            "val_balanced_accuracy": val_bacc, "gap": gap, "temperature": temperature}


def _lr_advice(report: dict[str, Any], lr: float) -> str:
    """The learning-rate part of the advice, from what the recipe ladder measured (docs/explanation/training-recipe.md).

    A loss that jumps about calls for a lower rate whatever the rate; otherwise a rate below the stock one may be
    raised to it, and one at or above it is not raised further (3e-3 was unstable where 1e-3 learned every look).
    """
    if report.get("loss_jumps"):
        return f"--lr {lr / 3:g} (the training loss jumped about)"
    if lr < STOCK_LR * 0.99:
        return f"--lr {min(lr * 3, STOCK_LR):g}"
    return f"--lr {lr / 3:g} if the training loss jumps about in history.csv"


def fit_messages(report: dict[str, Any], where: str, lr: float) -> tuple[str, list[str]]:
    """What to tell the user: an INFO line, and a WARNING (with what to try) per problem of ``report``.

    Args:
        report: :func:`assess_fit` output.
        where: the run's name in the messages (``"fold 0"``).
        lr: the run's ``--lr``, for concrete advice.
    """
    r = report
    info = (f"{where}: training loss {r['train_loss']:.3f} (chance {r['chance_loss']:.3f}), training accuracy "
            f"{r['train_accuracy']:.2f} after {r['epochs_run']} epochs, left chance at epoch "
            f"{r['left_chance_epoch'] if r['left_chance_epoch'] is not None else 'never'}; validation balanced "
            f"accuracy {r['val_balanced_accuracy']:.2f} (best epoch {r['best_epoch']}): {r['verdict'].replace('_', ' ')}")
    tips = "README 'Training recipe'"
    warnings = []
    for p in r["problems"]:
        if p == "did_not_learn":
            warnings.append(
                f"{where}: the model did not learn: its training loss never fell below {LEFT_CHANCE} x the chance "
                f"loss ({r['left_chance_below']:.3f}) in {r['epochs_run']} epochs, so its validation and test "
                f"numbers are at chance level. Try, in this order: check the labels (the class counts printed "
                f"by --mode prepare; every eye needs its own disease), --epochs {2 * max(1, r['epochs_run'])} "
                f"--patience 0, {_lr_advice(r, lr)}, a larger --input-size if the lesions are small, and "
                f"--no-augment to see whether the training eyes can be fitted at all ({tips})")
        elif p == "under_fit":
            warnings.append(
                f"{where}: the model under-fits: training accuracy {r['train_accuracy']:.2f} after "
                f"{r['epochs_run']} epochs (below {UNDER_FIT_ACCURACY}). Try --epochs {2 * r['epochs_run']} "
                f"--patience 0 (train every epoch), {_lr_advice(r, lr)}, a larger --input-size if the lesions are "
                f"small, or a larger model ({tips})")
        elif p == "over_fit":
            warnings.append(
                f"{where}: training accuracy {r['train_accuracy']:.2f} but validation balanced accuracy "
                f"{r['val_balanced_accuracy']:.2f} (gap {r['gap']:.2f} > {GAP}): the model fits its training eyes "
                f"better than it generalises. Try more training eyes, AE pretraining (--mode ae_pretrain), a "
                f"smaller model or more --weight-decay, and check that validation eyes look like training eyes "
                f"({tips})")
        elif p == "temperature_at_bound":
            lo, hi = TEMPERATURE_BOUNDS
            what = ("the validation probabilities carry almost no information about the labels"
                    if r["temperature"] >= 0.99 * hi else "the validation eyes are nearly separable")
            warnings.append(f"{where}: the calibration temperature {r['temperature']:.3f} is at the bound of its "
                            f"search ({lo}-{hi}): {what}; calibrated probabilities from it are not trustworthy")
    return info, warnings
