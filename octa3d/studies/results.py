"""Each arm's predictions, read back from its cells' run folders (files only: a study can be reported again from disk).

* **Per fold** (out-of-fold): ``cells/<arm>/fold-k/train/val_predictions.csv``, the fold's held-out subjects
  scored by the model trained without them (raw probabilities: the temperature was fitted on these subjects).
* **Pooled out-of-fold**: the folds' predictions together, every non-test subject once.
* **Hold-out**: ``cells/<arm>/fold-k/test/predictions.csv`` of every fold, the calibrated probabilities averaged
  over the k fold models (the ensemble the test stage reports for a k-fold experiment).

An arm is *complete* when every fold's cell finished; only complete arms enter the comparisons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from octa3d.data.splits import Splits
from octa3d.studies.plan import Cell, cell_state, finished
from octa3d.studies.spec import StudySpec
from octa3d.utils.io import read_csv

log = logging.getLogger("octa3d.studies")


@dataclass
class Predictions:
    """Subject-level predictions: IDs, class indices, probabilities, patient groups (and fold per row)."""

    ids: list[str]
    y: np.ndarray
    probs: np.ndarray
    groups: list[str]
    fold: np.ndarray | None = None

    def take(self, ids: list[str]) -> Predictions:
        """The rows of ``ids``, in that order."""
        pos = {s: i for i, s in enumerate(self.ids)}
        rows = [pos[i] for i in ids]
        return Predictions(list(ids), self.y[rows], self.probs[rows], [self.groups[i] for i in rows],
                           None if self.fold is None else self.fold[rows])


@dataclass
class ArmData:
    """What the cells of one arm produced."""

    name: str
    n_folds: int
    cells: dict[int, dict[str, Any]] = field(default_factory=dict)
    folds: dict[int, Predictions] = field(default_factory=dict)
    oof: Predictions | None = None
    holdout: Predictions | None = None

    @property
    def complete(self) -> bool:
        """Every fold finished (its predictions read)."""
        return len(self.folds) == self.n_folds and self.holdout is not None


def _read(path: Path, names: list[str], sp: Splits, column: str) -> Predictions:
    df = read_csv(path, dtype={"subject": str})
    cols = [f"{column}{n}" for n in names]
    if not all(c in df.columns for c in cols):  # no p_raw_ columns: the checkpoint had no temperature
        cols = [f"p_{n}" for n in names]
    ids = list(df["subject"])
    wrong = [i for i, lab in zip(ids, df["label"]) if names[sp.labels[i]] != lab]
    if wrong:
        raise ValueError(f"{path}: labels of {', '.join(wrong[:5])} differ from the study's folds")
    return Predictions(ids, np.asarray([sp.labels[i] for i in ids], int), df[cols].to_numpy(np.float64),
                       [sp.groups.get(i) or i for i in ids])


def collect(spec: StudySpec, cells: list[Cell], sp: Splits) -> dict[str, ArmData]:
    """Every arm's cells, fold predictions, pooled out-of-fold and hold-out predictions (those that exist)."""
    names = list(sp.class_names)
    arms = {a.name: ArmData(a.name, spec.folds) for a in spec.arms}
    holdout_parts: dict[str, list[Predictions]] = {a: [] for a in arms}
    for c in cells:
        folder = Path(c.folder)
        info: dict[str, Any] = {"folder": folder, "state": cell_state(folder), "record": finished(folder)}
        arms[c.arm].cells[c.fold] = info
        if info["record"] is None:
            continue
        try:
            arms[c.arm].folds[c.fold] = _read(folder / "train" / "val_predictions.csv", names, sp, "p_raw_")
            holdout_parts[c.arm].append(_read(folder / "test" / "predictions.csv", names, sp, "p_"))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cell %s: its predictions cannot be read (%s); left out", c.key, exc)
            info["state"], info["error"] = "unreadable", str(exc)
            arms[c.arm].folds.pop(c.fold, None)
    for name, arm in arms.items():
        if not arm.folds:
            continue
        parts = [arm.folds[k] for k in sorted(arm.folds)]
        arm.oof = Predictions([i for p in parts for i in p.ids], np.concatenate([p.y for p in parts]),
                              np.concatenate([p.probs for p in parts]), [g for p in parts for g in p.groups],
                              np.concatenate([np.full(len(p.ids), k) for k, p in zip(sorted(arm.folds), parts)]))
        hold = holdout_parts[name]
        if len(hold) == spec.folds:
            order = list(sp.test)
            aligned = [h.take(order) for h in hold]
            arm.holdout = Predictions(order, aligned[0].y, np.mean([h.probs for h in aligned], axis=0),
                                      aligned[0].groups)
    return arms
