"""``--mode study --study study.yaml``: arms × folds of ordinary octa3d runs on Ray, paired statistics, a paper kit.

1. The study file is read and checked (:func:`octa3d.studies.load_study`): every arm's flags, every model.
2. The study folder ``<runs-dir>/<name>/`` is locked and recorded (config, command, environment, ``study.yaml``,
   ``plan.json``); a study that exists already is continued with ``--resume`` only (finished cells are kept; an
   arm whose settings changed is refused).
3. The subject-level folds are made once (or read back) and every arm is checked to read the same eyes.
4. The cells run (:func:`octa3d.studies.engine.execute` with :func:`~octa3d.stages.study.cell.run_cell`): Ray tasks
   on this machine or a cluster, or ``--executor sequential``.
5. The statistics, tables, methods, checklist and the study page are written from whatever finished
   (:func:`octa3d.studies.report.write_report`); failed cells are listed and the command exits non-zero, so
   ``--resume`` can retry them.

The same from Python: :func:`run_study` (``from octa3d.stages.study import run_study``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml

from octa3d.config import Config, apply_overrides, get_value, validate
from octa3d.errors import ConfigError, RunExistsError, StudyError
from octa3d.studies import ExecOptions, build_cells, execute, load_study
from octa3d.studies.plan import PLAN_FILE, check_arm_subjects, check_resume, study_splits, write_plan
from octa3d.studies.report import write_report
from octa3d.studies.spec import MANAGED, check_models
from octa3d.stages.study.cell import run_cell
from octa3d.utils.io import atomic_write_text
from octa3d.utils.runs import init_run, releases_locks

__all__ = ["run", "run_cell", "run_study"]

log = logging.getLogger("octa3d.studies")


def _flags_of(cfg: Config) -> dict[str, Any]:
    """The flags given explicitly (command line / --config) that apply to every arm (not the study's own)."""
    return {k: get_value(cfg, k) for k in sorted(cfg.explicit) if k not in MANAGED and k != "log_level"}


def run_study(study: str | Path | dict[str, Any], cfg: Config | None = None, **flags: Any) -> dict[str, Any]:
    """Run (or continue, ``resume=True``) a study from Python.

    Args:
        study: a study YAML file or the same mapping.
        cfg: a parsed configuration (the CLI passes its own); default: octa3d's defaults with ``flags``.
        **flags: octa3d flags by field name, e.g. ``runs_dir="runs"``, ``resume=True``, ``executor="sequential"``,
            ``ray_address="auto"``, ``epochs=2`` (flags other than the study's own apply to every arm).

    Returns:
        ``{"folder", "page", "arms": {arm: summary}, "outcomes": {cell: status}, "failed": [cell, ...]}``.

    Raises:
        StudyError: some cells failed (after the report of the others was written).
    """
    if cfg is None:
        cfg = Config()
        apply_overrides(cfg, flags, "run_study")
        cfg.explicit = frozenset(k.replace("-", "_") for k in flags)
    else:
        cfg = copy.deepcopy(cfg)
        apply_overrides(cfg, flags, "run_study")
        cfg.explicit = cfg.explicit | {k.replace("-", "_") for k in flags}
    cfg.run.mode = "study"
    cfg.study.study = str(study) if not isinstance(study, dict) else "<dict>"
    validate(cfg)
    if cfg.run.overwrite:
        raise ConfigError("--overwrite: a study is never replaced (its cells may hold days of training); continue "
                          "it with --resume, or delete its folder, or choose another name (name: / --exp)")
    spec = load_study(study, _flags_of(cfg))
    if cfg.is_explicit("folds"):
        if cfg.data.folds < 2:
            raise ConfigError(f"--folds {cfg.data.folds}: a study needs at least 2 folds")
        spec.folds = cfg.data.folds
    check_models(spec)
    scfg = copy.deepcopy(cfg)
    scfg.run.exp = cfg.run.exp or spec.name
    study_dir = scfg.run_dir
    resuming = (study_dir / PLAN_FILE).is_file()
    if resuming and not cfg.train.resume:
        raise RunExistsError(f"{study_dir} holds a study already: continue it with --resume (finished cells are "
                             "kept), or choose another name (name: in the study file, or --exp)")
    dropped = check_resume(spec, study_dir) if resuming else []
    if dropped:
        log.warning("arms %s ran earlier but are no longer in the study file: their cells are left as they are",
                    ", ".join(dropped))
    return _run(spec, scfg, study_dir)


@releases_locks
def _run(spec: Any, scfg: Config, study_dir: Path) -> dict[str, Any]:
    init_run(scfg)  # the study's lock, config.yaml, command.txt, environment.txt, octa3d.log
    atomic_write_text(study_dir / "study.yaml", yaml.safe_dump(spec.doc, sort_keys=False))
    splits = study_splits(spec, study_dir)
    check_arm_subjects(spec, splits)
    cells = build_cells(spec, study_dir)
    write_plan(spec, study_dir, cells)
    s = scfg.study
    opts = ExecOptions(executor=s.executor, address=s.ray_address, cell_cpus=s.cell_cpus, cell_gpus=s.cell_gpus,
                       retries=s.cell_retries)
    log.info("Study %s: %d arms x %d folds = %d cells in %s", spec.name, len(spec.arms), spec.folds, len(cells),
             study_dir)
    outcomes = execute(cells, run_cell, opts)
    report = write_report(spec, study_dir, cells, splits, outcomes,
                          {"executor": s.executor, "address": s.ray_address})
    failed = sorted(k for k, o in outcomes.items() if o.status == "failed")
    print(report["summary"])
    print(f"Study page: {report['page']} (open it in a browser; works from disk)")
    result = {"folder": str(study_dir), "page": str(report["page"]), "arms": report["arms"],
              "outcomes": {k: o.status for k, o in outcomes.items()}, "failed": failed}
    if failed:
        listed = "\n".join(f"  {k}: {(outcomes[k].error or '').splitlines()[0][:200]}" for k in failed)
        raise StudyError(f"{len(failed)} of {len(cells)} cells of study {spec.name} failed (the others finished; "
                         f"the report covers the arms whose folds all finished):\n{listed}\nfix the cause and "
                         f"continue the study with --resume (finished cells are not run again)")
    return result


def run(cfg: Config) -> dict[str, Any]:
    """``--mode study``: run the study of ``--study`` (see the module docstring)."""
    return run_study(cfg.study.study, cfg)
