"""The study folder, its subject-level folds and its cells (one arm on one fold = one ordinary octa3d run folder).

Layout::

    <runs-dir>/<study>/
      study.yaml  plan.json  config.yaml  command.txt  environment.txt  octa3d.log
      splits/                      the study's folds: test.csv (the hold-out), fold-k/{train,val}.csv, split.json
      cells/<arm>/fold-<k>/        an ordinary run folder: config.yaml  splits/  [ae_pretrain/]  train/  test/
                                   .cell-complete (written last) | .cell-running | .cell-failed
      results/ tables/ figures/ methods.md checklist.md index.html     (:mod:`octa3d.studies.report`)

The folds are made once (:func:`study_splits`) and every cell's ``splits/`` is its fold of them
(:func:`write_cell_splits`): train = the fold's training subjects, val = the fold's held-out subjects (its
out-of-fold predictions), test = the study's hold-out, the same for every cell. A cell is finished when its
``.cell-complete`` marker exists; nothing else is needed to skip it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octa3d.config import Config, apply_overrides
from octa3d.data.splits import Splits, labelled_subjects, make_splits, read_splits, split_settings, write_splits
from octa3d.data.imagefiles import short
from octa3d.errors import ConfigError, DataError
from octa3d.studies.spec import StudySpec
from octa3d.utils.io import atomic_write_json

log = logging.getLogger("octa3d.studies")

CELL_MARKER = ".cell-complete"
CELL_RUNNING = ".cell-running"
CELL_FAILED = ".cell-failed"
PLAN_FILE = "plan.json"
#: Split settings that must match between a study's recorded folds and a resumed study.
FOLD_KEYS = ("data_root", "source", "fov", "task", "classes", "negative", "positive", "test_fraction", "seed")


@dataclass
class Cell:
    """One unit of work: an arm on one fold, run into its own run folder (picklable, plain values only).

    Attributes:
        arm: the arm's name.
        fold: the fold index (0-based); n_folds: the study's number of folds.
        folder: the cell's run folder (absolute).
        stages: ``(mode, {flag: value})`` in the order they run (ae_pretrain when ``init: ae``, train, test).
        splits: the study's ``splits/`` folder (absolute).
        threads: torch threads (the CPUs the cell was given).
        extra: free-form values for a cell function other than the study's own (another backend, a test).
    """

    arm: str
    fold: int
    n_folds: int
    folder: str
    stages: list[tuple[str, dict[str, Any]]]
    splits: str
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``<arm>/fold-<k>``."""
        return f"{self.arm}/fold-{self.fold}"


def cell_folder(study_dir: Path, arm: str, fold: int) -> Path:
    """``<study>/cells/<arm>/fold-<k>``."""
    return study_dir / "cells" / arm / f"fold-{fold}"


def build_cells(spec: StudySpec, study_dir: Path) -> list[Cell]:
    """Every (arm, fold) cell of the study, fold-major (every arm's fold 0 first: early results for all arms)."""
    study_dir = study_dir.resolve()
    cells = []
    for k in range(spec.folds):
        for arm in spec.arms:
            folder = cell_folder(study_dir, arm.name, k)
            where = {"runs_dir": str(folder.parent), "exp": folder.name, "folds": 1}
            # one preprocessing cache for the study: an arm's folds read the same eyes the same way
            base = {"cache_dir": str(study_dir / ".cache"), **arm.values, **where}
            stages = [("ae_pretrain", {**base, **arm.ae_pretrain})] if arm.runs_ae else []
            stages += [("train", base), ("test", {**base, **arm.test})]
            cells.append(Cell(arm.name, k, spec.folds, str(folder), stages, str(study_dir / "splits")))
    return cells


def stage_config(values: dict[str, Any], mode: str) -> Config:
    """The Config of one stage of a cell: ``values`` over the defaults, ``mode`` set, explicit = ``values``."""
    cfg = Config()
    apply_overrides(cfg, values, "study cell")
    cfg.run.mode = mode
    cfg.explicit = frozenset(values) | {"mode"}
    return cfg


# ------------------------------------------------------------------------------------------------------ markers
def finished(folder: str | Path) -> dict[str, Any] | None:
    """The ``.cell-complete`` record of a finished cell, else None."""
    path = Path(folder) / CELL_MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def mark_finished(folder: str | Path, record: dict[str, Any]) -> None:
    """Write the cell's finished marker (last) and drop its failure record."""
    folder = Path(folder)
    atomic_write_json(folder / CELL_MARKER, {**record, "finished": _dt.datetime.now().isoformat(timespec="seconds")})
    (folder / CELL_FAILED).unlink(missing_ok=True)


def mark_failed(folder: str | Path, error: str, attempts: int | None = None) -> None:
    """Record why a cell failed (kept until it finishes)."""
    atomic_write_json(Path(folder) / CELL_FAILED, {"error": error, "attempts": attempts,
                                                   "time": _dt.datetime.now().isoformat(timespec="seconds")})


def cell_state(folder: str | Path) -> str:
    """``done``, ``running`` (a worker is on it now), ``failed`` or ``waiting``."""
    folder = Path(folder)
    if (folder / CELL_MARKER).is_file():
        return "done"
    if (folder / CELL_RUNNING).is_file():
        return "running"
    return "failed" if (folder / CELL_FAILED).is_file() else "waiting"


# ------------------------------------------------------------------------------------------------------- folds
def _fold_settings(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in split_settings(cfg).items() if k in FOLD_KEYS}


def study_splits(spec: StudySpec, study_dir: Path) -> Splits:
    """The study's folds: read from ``<study>/splits/`` or made once from the first arm's data settings.

    Raises:
        ConfigError: recorded folds made with other data settings or another number of folds.
    """
    cfg = Config()
    apply_overrides(cfg, {**spec.arms[0].values, "folds": spec.folds}, spec.source)
    folder = study_dir / "splits"
    if (folder / "split.json").is_file():
        sp = read_splits(folder)
        want, have = _fold_settings(cfg), {k: sp.settings.get(k) for k in FOLD_KEYS}
        diff = [f"{k.replace('_', '-')} was {have[k]!r}, now {v!r}" for k, v in want.items() if have.get(k) != v]
        if sp.n_folds != spec.folds:
            diff.append(f"folds was {sp.n_folds}, now {spec.folds}")
        if diff:
            raise ConfigError(f"{folder}: the study's folds were made with other settings ({'; '.join(diff)}); use "
                              "the same settings, or start another study (name: / --exp)")
        return sp
    subjects, label_map, label_of = labelled_subjects(cfg)
    sp = make_splits(subjects, label_of, label_map.class_names, test_fraction=cfg.data.test_fraction,
                     val_fraction=cfg.data.val_fraction, folds=spec.folds, seed=cfg.run.seed)
    sp.settings = {**split_settings(cfg), "study": spec.name}
    write_splits(sp, folder)
    log.info("Study folds written to %s: %d hold-out subjects, %d folds over %d subjects", folder, len(sp.test),
             sp.n_folds, len(sp.non_test()))
    return sp


def check_arm_subjects(spec: StudySpec, sp: Splits) -> None:
    """Every arm reads every subject of the folds, with the same label (2D and 3D arms: the same eyes).

    Raises:
        DataError: an arm whose data settings (``--dim``, ``--modality``, ``--projection``) miss subjects.
    """
    wanted = set(sp.test) | sp.non_test()
    seen: dict[tuple[Any, ...], str] = {}
    for arm in spec.arms:
        cfg = Config()
        apply_overrides(cfg, arm.values, spec.source)
        key = (cfg.model.dim, cfg.data.modality, cfg.data.projection)
        if key in seen:
            continue
        seen[key] = arm.name
        subjects, label_map, _ = labelled_subjects(cfg)
        found = {s.id: s for s in subjects}
        missing = sorted(wanted - set(found))
        if missing:
            raise DataError(f"arm {arm.name} (--dim {key[0]}, --modality {key[1]}, --projection {key[2]}) cannot read "
                            f"{len(missing)} subject(s) of the study's folds: {short(missing, 10)}; every arm must "
                            "see the same eyes (add the missing files, or leave these eyes out of the data root)")
        if list(label_map.class_names) != list(sp.class_names):
            raise DataError(f"arm {arm.name}: classes {label_map.class_names} differ from the study's folds "
                            f"{sp.class_names}")
        relabelled = [i for i in wanted if label_map.index(found[i].label) != sp.labels[i]]
        if relabelled:
            raise DataError(f"arm {arm.name}: subjects {short(sorted(relabelled), 10)} have another label than in the "
                            "study's folds")


def write_cell_splits(cfg: Config, study: Splits, fold: int) -> Splits:
    """The cell's ``splits/``: fold ``fold`` of the study as an ordinary single split (train, val, the hold-out).

    Written once; a cell folder whose splits differ from the study's fold is refused.

    Raises:
        DataError: the cell's recorded splits are not the study's fold.
    """
    tr, va = study.fold(fold)
    ids = [*tr, *va, *study.test]
    sp = Splits(train=list(tr), val=list(va), test=list(study.test), labels={i: study.labels[i] for i in ids},
                groups={i: study.groups[i] for i in ids}, class_names=list(study.class_names),
                settings={**split_settings(cfg), "study_fold": fold, "study_folds": study.n_folds})
    folder = cfg.run_dir / "splits"
    if (folder / "split.json").is_file():
        have = read_splits(folder)
        if (set(have.train), set(have.val), set(have.test)) != (set(sp.train), set(sp.val), set(sp.test)):
            raise DataError(f"{folder} is not fold {fold} of the study's folds; delete {cfg.run_dir} to run the "
                            "cell again")
        return have
    write_splits(sp, folder)
    return sp


def write_plan(spec: StudySpec, study_dir: Path, cells: list[Cell]) -> None:
    """``plan.json``: the arms (their flags) and cells, for the record and for ``--resume``."""
    atomic_write_json(study_dir / PLAN_FILE, {
        "name": spec.name, "source": spec.source, "folds": spec.folds, "reference": spec.reference,
        "arms": {a.name: {"values": a.values, "own": a.own, "ae_pretrain": a.ae_pretrain, "test": a.test}
                 for a in spec.arms},
        "cells": [{"key": c.key, "folder": str(Path(c.folder).relative_to(study_dir.resolve()))} for c in cells]})


def check_resume(spec: StudySpec, study_dir: Path) -> list[str]:
    """Compare the study with its recorded ``plan.json``; returns the arms recorded but no longer in the study.

    Raises:
        ConfigError: an arm whose settings changed, or another number of folds (results would mix settings).
    """
    try:
        plan = json.loads((study_dir / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{study_dir / PLAN_FILE}: cannot read the study's plan ({exc})") from exc
    if plan.get("folds") != spec.folds:
        raise ConfigError(f"{study_dir}: the study ran with {plan.get('folds')} folds, the study file now says "
                          f"{spec.folds}; keep the folds or start another study")
    recorded = plan.get("arms", {})
    changed = []
    for arm in spec.arms:
        old = recorded.get(arm.name)
        new = json.loads(json.dumps({"values": arm.values, "ae_pretrain": arm.ae_pretrain, "test": arm.test}))
        if old is not None and {k: old.get(k) for k in new} != new:
            diff = sorted(k for k in {**old["values"], **new["values"]}
                          if old["values"].get(k) != new["values"].get(k))
            changed.append(f"{arm.name} ({', '.join(d.replace('_', '-') for d in diff) or 'stage settings'})")
    if changed:
        raise ConfigError(f"{study_dir}: arm(s) changed since the study started: {'; '.join(changed)}; rename a "
                          "changed arm (a new arm runs its own cells) or restore its settings")
    return sorted(set(recorded) - {a.name for a in spec.arms})
