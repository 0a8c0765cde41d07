"""The ``ood`` flag of a prediction: a new scan's scores against each model's stored reference
(:mod:`octa3d.evaluation.ood`), thresholds at a false-alarm rate, a fold ensemble's vote, and the reason.

**Threshold rule.** ``--ood-false-alarm`` (default :data:`FALSE_ALARM`, 5 %) is the share of in-distribution eyes
allowed to be flagged. The reference eyes are held out of the fit (validation subjects plus cross-fitted training
subjects, :func:`~octa3d.evaluation.ood.reference_scores`). Each learned check (intensity, features) is first put
on one scale, its score over its own split-conformal quantile at that rate among the reference eyes; an eye's
combined score is the larger of the two, and the threshold is the split-conformal quantile of the reference eyes'
combined scores at the rate, so the learned checks together flag at most that share of new in-distribution eyes
(checked in ``benchmarks/ood.py``: less conservative than splitting the rate over the checks). The geometry rule
(:data:`~octa3d.evaluation.ood.GEOMETRY_TOLERANCE` outside the training range) flags no scan inside the range.
Each check's score is divided by its resulting threshold, so ``ood_score`` > 1 means flagged; ``ood_score`` is the
largest over the checks.

**Ensembles** (``--folds K``): every fold model has its own reference; an eye is flagged when a *majority* of the
folds flag it (``ood_score`` is the (K // 2 + 1)-th largest fold score). "Any fold" would add the folds'
false alarms up to K x the rate; a majority keeps it near the rate of one model while a scan unlike the training
data, which every fold has seen the same of, is flagged by all of them.

Nothing is refused: a flagged scan is predicted like any other; ``uncertain`` becomes true and the reason says
which check fired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from octa3d.data.record import PreprocessRecord
from octa3d.evaluation import ood

#: Default share of in-distribution eyes flagged (``--ood-false-alarm``).
FALSE_ALARM = 0.05
#: What a model without a usable reference gets (the columns stay empty).
PREDATES = ("the model predates the out-of-distribution check (no training reference in the model file: a checkpoint "
            "from before the check, an export or a compressed model): the ood columns are empty; --mode train "
            "writes checkpoints that have it")


@dataclass
class OodResult:
    """One subject's check.

    Attributes:
        score: ``ood_score``: the largest check score over its threshold (> 1: flagged); ensemble: the fold vote.
        flagged: ``ood``.
        reasons: the checks that fired, each with what lay outside (e.g. ``geometry (shape 400x640x400, trained
            on 32x64x32)``).
        components: each check's score over its threshold.
    """

    score: float
    flagged: bool
    reasons: list[str]
    components: dict[str, float]

    @property
    def reason(self) -> str:
        """``ood_reason``: the reasons joined by ``; `` (empty when not flagged)."""
        return "; ".join(self.reasons)


class OodCheck:
    """One model's check at a false-alarm rate.

    Args:
        reference: the checkpoint's ``ood_reference``.
        false_alarm: share of in-distribution eyes allowed to be flagged.
    """

    def __init__(self, reference: dict[str, Any], false_alarm: float = FALSE_ALARM) -> None:
        self.ref = reference
        learned = [c for c in ("intensity", "features") if c in reference["validation"]
                   and (reference["validation"][c] or reference["training"].get(c))]
        self.rate = false_alarm
        self.thresholds: dict[str, float] = {}
        self.about: dict[str, Any] = {}
        scores, how = {}, {}
        for c in learned:
            scores[c], how[c] = ood.reference_scores(reference, c)
        scale = {c: max(ood.conformal_threshold(scores[c], false_alarm)[0], 1e-12) for c in learned}
        self.guaranteed = 0.0
        if learned and len({len(v) for v in scores.values()}) == 1:  # one row per reference eye: the joint rule
            joint, self.guaranteed = ood.conformal_threshold(np.max([scores[c] / scale[c] for c in learned], axis=0),
                                                             false_alarm)
            self.thresholds = {c: scale[c] * joint for c in learned}
        else:  # checks scored on other eyes (not written by this version): each at its own quantile
            for c in learned:
                self.thresholds[c], g = ood.conformal_threshold(scores[c], false_alarm / len(learned))
                self.guaranteed += g
        for c in learned:
            self.about[c] = {**how[c], "threshold": self.thresholds[c]}

    @property
    def false_alarm_bound(self) -> float:
        """The false-alarm rate the thresholds guarantee together (more than the asked rate with few reference
        eyes: ``1 / (n + 1)`` when ``n`` eyes are too few for the rate)."""
        return float(self.guaranteed)

    def check(self, record: PreprocessRecord, features: np.ndarray | None, spacing_known: bool = True
              ) -> OodResult:
        """Score one preprocessed subject (``features``: its pooled features from this model, or None)."""
        comp: dict[str, float] = {}
        why: dict[str, str] = {}
        comp["geometry"], why["geometry"] = ood.geometry_score(ood.geometry_of(record, spacing_known),
                                                               self.ref["geometry"])
        if "intensity" in self.thresholds:
            v = ood.intensity_of(record)
            fit = self.ref["intensity"]
            if len(v) == len(fit["mean"]):
                comp["intensity"] = _over(float(ood.intensity_scores(v, fit)[0]), self.thresholds["intensity"])
                why["intensity"] = _intensity_text(v, fit)
        if "features" in self.thresholds and features is not None and len(features) == self.ref["features"]["dim"]:
            comp["features"] = _over(float(ood.mahalanobis(features[None], self.ref["features"])[0]),
                                     self.thresholds["features"])
            why["features"] = f"{comp['features']:.1f}x the threshold distance to the training classes"
        score = max(comp.values())
        reasons = [f"{c} ({why[c]})" for c in ood.COMPONENTS if comp.get(c, 0.0) > 1]
        return OodResult(score, score > 1, reasons, comp)


def _over(score: float, threshold: float) -> float:
    """``score / threshold``; a zero threshold (every reference score 0) flags any positive score."""
    if threshold > 0:
        return score / threshold
    return math.inf if score > 0 else 0.0


def _intensity_text(v: np.ndarray, fit: dict[str, Any]) -> str:
    """The entry farthest from training, e.g. ``OCTA p99.5 = 120 vs 255 +- 2.6 in training``."""
    z = np.abs((v - np.asarray(fit["mean"])) / np.asarray(fit["scale"]))
    j = int(np.argmax(z))
    return f"{fit['names'][j]} = {v[j]:.4g} vs {fit['mean'][j]:.4g} +- {fit['scale'][j]:.2g} in training"


def checks_of(records: Sequence[dict[str, Any]], false_alarm: float = FALSE_ALARM) -> list[OodCheck] | None:
    """One :class:`OodCheck` per model record, or None when any model has no usable reference (a checkpoint from
    before the check, an export, a compressed model)."""
    refs = [r.get("ood_reference") for r in records]
    if not refs or any(not isinstance(x, dict) or x.get("version") != ood.REFERENCE_VERSION for x in refs):
        return None
    return [OodCheck(x, false_alarm) for x in refs]


def check_subjects(checks: list[OodCheck], names: Sequence[str], ids: Sequence[str], record_of: Any,
                   features: dict[str, dict[str, np.ndarray]]) -> list[OodResult]:
    """Every subject's (voted) result: ``names`` the models in ``checks``' order, ``record_of(id)`` a subject's
    :class:`~octa3d.data.record.PreprocessRecord`, ``features[model][id]`` its pooled features."""
    return [vote([c.check(record_of(i), features.get(n, {}).get(i)) for c, n in zip(checks, names)]) for i in ids]


def vote(results: Sequence[OodResult]) -> OodResult:
    """An ensemble's result: flagged when a majority of the fold models flag (see the module docstring)."""
    if len(results) == 1:
        return results[0]
    k = len(results) // 2  # the (k + 1)-th largest fold score > 1 <=> more than half the folds flag
    score = sorted((r.score for r in results), reverse=True)[k]
    comps = {c: sorted((r.components.get(c, 0.0) for r in results), reverse=True)[k]
             for c in ood.COMPONENTS if any(c in r.components for r in results)}
    flagged = score > 1
    voted = [c for c in ood.COMPONENTS if comps.get(c, 0.0) > 1]
    if flagged and not voted:  # the majority flags, each fold for another check: name them all
        voted = [c for c in ood.COMPONENTS if any(r.components.get(c, 0.0) > 1 for r in results)]
    first = {reason.split(" ", 1)[0]: reason for r in results if r.flagged for reason in r.reasons}
    reasons = [first.get(c, c) + f" [{sum(r.components.get(c, 0.0) > 1 for r in results)}/{len(results)} folds]"
               for c in voted] if flagged else []
    return OodResult(score, flagged, reasons, comps)


def summary_block(checks: list[OodCheck] | None, flags: Sequence[Any], reasons: Sequence[str]) -> dict[str, Any]:
    """summary.json / metrics.json ``ood``: how many subjects were flagged and for what (``flags``: each subject's
    ``ood``, ``reasons``: its ``ood_reason``), and how the thresholds were set."""
    if checks is None:
        return {"available": False, "note": PREDATES}
    flagged = [r for f, r in zip(flags, reasons) if f is True]
    c0 = checks[0]
    return {"available": True, "n_checked": sum(f in (True, False) for f in flags), "n_flagged": len(flagged),
            "by_reason": {c: sum(any(x.startswith(c) for x in r.split("; ")) for r in flagged)
                          for c in ood.COMPONENTS},
            "false_alarm": c0.rate, "false_alarm_guaranteed": c0.false_alarm_bound,
            "ensemble_rule": "majority of the fold models" if len(checks) > 1 else None,
            "thresholds": [c.about for c in checks], "geometry_tolerance": ood.GEOMETRY_TOLERANCE,
            "reference": "validation subjects + cross-fitted training subjects (held out of each fit)"}


def summary_line(block: dict[str, Any]) -> str | None:
    """One CLI line: ``out of distribution: N of M (geometry a, intensity b, features c) ...``."""
    if not block.get("available"):
        return None
    why = ", ".join(f"{k} {v}" for k, v in block["by_reason"].items() if v)
    few = block["false_alarm_guaranteed"] > block["false_alarm"] + 1e-9
    return (f"  out of distribution: {block['n_flagged']} of {block['n_checked']}" + (f" ({why})" if why else "")
            + f"; threshold for {100 * block['false_alarm']:.0f} % false alarms on in-distribution eyes"
            + (f" (too few reference eyes for that: {100 * block['false_alarm_guaranteed']:.0f} % holds)" if few else "")
            + " (column ood_reason says why; they are predicted anyway, and marked uncertain)")
