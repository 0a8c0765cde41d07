"""The unit of work of a study: one cell (an arm on one fold) → a finished, ordinary octa3d run folder.

:func:`run_cell` writes the cell's fold of the study's splits into its run folder, then runs its stages through
the mode table (:data:`octa3d.stages.STAGES`: ``ae_pretrain`` when the arm starts from an autoencoder, ``train``,
``test`` on the study's hold-out) and writes ``.cell-complete`` last. It is safe to call again at any point: a
finished cell returns its record, a finished stage is skipped, an interrupted training resumes from its
``last.pt`` (``--resume``), an unfinished test starts over. It runs wherever the executor puts it (a Ray worker
or this process) and depends on nothing but its :class:`~octa3d.studies.plan.Cell`.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from octa3d.config import to_argv
from octa3d.data.splits import read_splits
from octa3d.stages import STAGES
from octa3d.studies.plan import Cell, finished, mark_finished, stage_config, write_cell_splits
from octa3d.utils.log import setup_logging
from octa3d.utils.runs import is_complete, resume_folder

log = logging.getLogger("octa3d.studies")

TRAINING = ("ae_pretrain", "train")


def run_cell(cell: Cell) -> dict[str, Any]:
    """Run (or finish) one cell; returns its record (also in its ``.cell-complete``).

    Args:
        cell: the cell: its folder, its stages' flags, the study's splits folder, its torch threads.

    Returns:
        ``{"arm", "fold", "seconds", "stages": {mode: seconds}, "validation": best validation metrics,
        "test": hold-out headline metrics}``.

    Raises:
        Octa3dError: what a stage raised (a bad setting or file: the cell fails, the study goes on).
    """
    done = finished(cell.folder)
    if done is not None:
        return done
    if not any(getattr(h, "_octa3d_console", False) for h in logging.getLogger("octa3d").handlers):
        setup_logging("WARNING")  # a fresh Ray worker: warnings to its stderr, everything to the cell's octa3d.log
    torch.set_num_threads(max(1, cell.threads))
    t0 = time.perf_counter()
    first = stage_config(cell.stages[0][1], cell.stages[0][0])
    write_cell_splits(first, read_splits(Path(cell.splits)), cell.fold)
    seconds: dict[str, float] = {}
    for mode, values in cell.stages:
        cfg = stage_config(values, mode)
        if is_complete(cfg.run_dir / mode):
            continue
        if mode in TRAINING and resume_folder(cfg, mode) is not None:
            values = {**values, "resume": True}  # a killed attempt: continue from its last.pt
            cfg = stage_config(values, mode)
            log.warning("cell %s: resuming the interrupted %s", cell.key, mode)
        cfg.argv = tuple(to_argv(values) + ["--mode", mode])
        t = time.perf_counter()
        importlib.import_module(STAGES[mode]).run(cfg)
        seconds[mode] = round(time.perf_counter() - t, 2)
    record = {"arm": cell.arm, "fold": cell.fold, "seconds": round(time.perf_counter() - t0, 2), "stages": seconds,
              "validation": _read(Path(cell.folder) / "train" / "summary.json").get("mean", {}),
              "test": {k: v for k, v in _read(Path(cell.folder) / "test" / "metrics.json").items()
                       if k in ("balanced_accuracy", "auc", "accuracy", "f1_macro", "n_subjects")}}
    mark_finished(cell.folder, record)
    return record


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
