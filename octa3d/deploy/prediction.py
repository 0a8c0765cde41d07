"""What the Python API returns: one subject's :class:`Prediction` (a ``predictions.csv`` row), a preprocessed
subject (:class:`Prepared`) and a prediction with its evidence map (:class:`Explanation`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from octa3d.data.subject import Subject

__all__ = ["Explanation", "Prediction", "Prepared"]


@dataclass
class Prediction:
    """One subject's prediction.

    Attributes:
        subject: the subject ID.
        probs: ``(K,)`` reported probabilities (calibrated unless ``calibrated`` is False).
        raw: ``(K,)`` uncalibrated softmax (mean over patches and ensemble members).
        prediction: the predicted class name.
        entropy: predictive entropy of ``probs`` in nats.
        uncertain: entropy above the validation threshold; None when the checkpoint has no threshold.
        calibrated: whether ``probs`` are temperature-scaled.
        label: the subject's label when the input says it (manifest column, class folder, label table).
        p_sd: binary models: sd of P(positive) over the ``--tta``/``--mc-dropout`` passes, else over a fold
            ensemble's members (as ``--mode test``); None without either.
        ood_score: the out-of-distribution score (> 1: flagged; :mod:`octa3d.evaluation.ood_check`); None when
            the model predates the check.
        ood: the scan is unlike the training scans (``uncertain`` is then true as well); None: no check.
        ood_reason: which check fired and what lay outside the training range (empty when not flagged).
    """

    subject: str
    probs: np.ndarray
    raw: np.ndarray
    prediction: str
    entropy: float
    uncertain: bool | None
    calibrated: bool
    label: str | None = None
    p_sd: float | None = None
    ood_score: float | None = None
    ood: bool | None = None
    ood_reason: str = ""

    def row(self, classes: list[str]) -> dict[str, Any]:
        """A ``predictions.csv`` row: subject, label, ``p_<class>``, ``p_raw_<class>``, prediction, entropy,
        uncertain (empty when unknown), ood_score, ood, ood_reason (empty without the check), correct (empty
        without a label of the model's classes)."""
        out: dict[str, Any] = {"subject": self.subject, "label": self.label or ""}
        out.update({f"p_{c}": round(float(p), 6) for c, p in zip(classes, self.probs)})
        out.update({f"p_raw_{c}": round(float(p), 6) for c, p in zip(classes, self.raw)})
        known = self.label is not None and self.label in classes
        out.update(prediction=self.prediction, entropy=round(self.entropy, 6),
                   uncertain="" if self.uncertain is None else bool(self.uncertain),
                   ood_score="" if self.ood_score is None else round(float(self.ood_score), 4),
                   ood="" if self.ood is None else bool(self.ood), ood_reason=self.ood_reason,
                   correct=(self.label == self.prediction) if known else "")
        if self.p_sd is not None:
            out["p_sd"] = round(self.p_sd, 6)
        return out


@dataclass
class Prepared:
    """A preprocessed subject: network inputs ``(P, C, *input_shape)`` float32 and the preprocessing record."""

    subject: Subject
    samples: np.ndarray
    record: Any


@dataclass
class Explanation:
    """A prediction and its evidence map: ``cam`` in the source geometry (when no ``out_dir`` was given), else the
    ``files`` written (``cam``, ``input*``, ``review``) with the map's ``status``; ``report``: the exporter's
    summary of the subject (peak, localisation where a lesion mask exists)."""

    prediction: Prediction
    cam: np.ndarray | None = None
    status: str = ""
    files: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
