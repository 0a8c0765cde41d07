"""``--mode test``: hold-out evaluation of the experiment's classifier, with bootstrap CIs, plots and Grad-CAM, or the
external validation of that classifier on another labelled cohort (``--external PATH``).

The model is ``train/checkpoints/best.pt``, or every ``train/fold-k/checkpoints/best.pt`` (evaluated one by one and
as an ensemble of averaged probabilities), or ``--checkpoint`` (see :func:`octa3d.checkpoint.models.find_checkpoints`).
Preprocessing comes from the checkpoint (input size, preprocessing settings, modality), never from the flags of
this invocation, so a model is always evaluated on inputs made the way it was trained. Only the experiment's
hold-out subjects are used, and the leakage guard refuses any that trained or validated the model (including
autoencoder extra data). Scoring, calibration and the output files are :mod:`octa3d.evaluation`'s.

Outputs in ``runs/<exp>/test/``: ``metrics.json``, ``predictions.csv`` (and ``predictions_fold-k.csv``),
``roc.png``, ``confusion_matrix.png``, ``reliability.png``, ``coverage.png``, ``cams/`` (see
:mod:`octa3d.cam.export`), ``tensorboard/`` and ``review/index.html``.

``--external PATH`` scores every labelled subject of PATH (an OCTA-500-layout folder, a manifest CSV or 2D class
folders; its own labels, or ``--labels``) with the experiment's class mapping, after refusing subjects that
trained, validated or pretrained the model (:func:`octa3d.data.leakage.guard_external`), into
``runs/<exp>/test-external/<name>/`` (:func:`octa3d.stages.context.cohort_name`) with the same files; ``test/`` is
not touched.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from octa3d.checkpoint.models import Models, find_checkpoints, place_models
from octa3d.config import Config
from octa3d.data.datasets import DataHandler
from octa3d.data.leakage import guard_external, guard_test_set
from octa3d.errors import ConfigError, DataError
from octa3d.evaluation.evaluate import evaluate, models_for_evaluation
from octa3d.evaluation.outputs import print_summary
from octa3d.review import write_test_review
from octa3d.stages.context import experiment_config, external_cohort, external_data_config, setup_stage
from octa3d.utils import dist
from octa3d.utils.io import atomic_write_json
from octa3d.utils.runs import plan_stage, releases_locks, shared_stage_dir

log = logging.getLogger("octa3d.test")

STAGE = "test"
EXTERNAL = "test-external"


def _cam_subjects(cfg: Config, test_ids: list[str], what: str = "hold-out test subjects") -> set[str]:
    """The subjects whose CAMs are exported (``--cam-subjects``, default all), checked against ``test_ids``."""
    wanted = set(cfg.eval.cam_subjects or test_ids)
    unknown = sorted(wanted - set(test_ids))
    if unknown and cfg.eval.cam != "none":
        raise ConfigError(f"--cam-subjects {', '.join(unknown)}: not {what} of experiment "
                          f"'{cfg.exp_name}' (test subjects: {', '.join(test_ids[:10])}"
                          f"{' …' if len(test_ids) > 10 else ''})")
    return wanted


@releases_locks
def run(cfg: Config) -> dict[str, Any]:
    """Evaluate the experiment's classifier on its hold-out subjects (``runs/<exp>/test/``), or with
    ``--external PATH`` on that cohort (``runs/<exp>/test-external/<name>/``).

    Every option is checked before the stage folder is prepared; the outputs are written beside it and replace
    earlier results only once complete (:func:`octa3d.utils.runs.stage_dir`).

    Returns:
        The metrics dictionary written to ``metrics.json``.
    """
    ckpt_paths = find_checkpoints(cfg)
    if not (cfg.run_dir / "splits" / "split.json").is_file():
        raise DataError(f"experiment '{cfg.exp_name}' has no splits ({cfg.run_dir / 'splits'}): the test stage "
                        f"only evaluates an experiment's hold-out subjects (or, with --external, another cohort "
                        f"against them); run --mode prepare and --mode train first (same --exp/--runs-dir), or "
                        f"predict single scans with --mode explain --input PATH")
    external = cfg.eval.external
    if external and not Path(external).expanduser().exists():
        raise DataError(f"--external {external}: no such file or folder (give a labelled cohort: an OCTA-500 folder, "
                        "a manifest CSV with a label column, or 2D class folders)")
    # --labels, --skip-unlabeled ... given with --external describe that cohort, not the experiment
    models, ref, ecfg = models_for_evaluation(cfg, experiment_config(cfg) if external else cfg, ckpt_paths)
    ctx = setup_stage(ecfg)
    device = place_models(models, ctx.device)
    sp = ctx.splits
    names = list(sp.class_names)
    if list(ref["class_names"]) != names:
        raise ConfigError(f"{ckpt_paths[0][1]} predicts classes {ref['class_names']} but experiment "
                          f"'{cfg.exp_name}' has classes {names}; test it in its own experiment (--exp)")
    if external:
        return _external(cfg, ecfg, models, ref, ctx, device)
    test_ids = list(sp.test)
    if not test_ids:
        raise DataError(f"experiment '{cfg.exp_name}' has no hold-out test subjects ({cfg.run_dir / 'splits'})")
    guard_test_set(ecfg, test_ids, sp, subjects=ctx.subjects)
    wanted = _cam_subjects(ecfg, test_ids)
    plan_stage(ecfg, STAGE)  # every option checked: now refuse (RunExistsError) before the scans are read
    subjects = ctx.pick(test_ids)
    log.info("test: %d hold-out subjects, %d model(s) (%s), classes %s", len(test_ids), len(models),
             ", ".join(m.name for m in models), names)
    counts = Counter(names[sp.labels[i]] for i in test_ids)
    cohort = {"path": str(Path(ecfg.data.data_root).resolve()), "name": "hold-out test split",
              "n_subjects": len(test_ids), "class_counts": {c: counts.get(c, 0) for c in names}}
    return _score(cfg, ecfg, STAGE, models, ref, ctx, subjects, sp.groups, wanted, device,
                  {"data": ecfg.data.data_root, "cohort": cohort}, None)


def _external(cfg: Config, ecfg: Config, models: Models, ref: dict[str, Any], ctx: Any, device: torch.device
              ) -> dict[str, Any]:
    """``--external PATH``: discover the cohort with the experiment's label map, refuse overlaps, score it."""
    data = external_data_config(cfg, ecfg)
    if Path(data.data_root).resolve() == Path(ecfg.data.data_root).resolve():
        raise DataError(f"--external {cfg.eval.external} is the experiment's own data root: its hold-out is scored "
                        "by --mode test without --external; an external cohort is another dataset")
    cohort = external_cohort(data, ecfg.model.dim, ctx.label_map)
    same_ids = guard_external(ecfg, cohort.subjects, ctx.splits, ctx.subjects)
    ids = [s.id for s in cohort.subjects]
    wanted = _cam_subjects(ecfg, ids, f"subjects of the external cohort {cohort.path}")
    stage = f"{EXTERNAL}/{cohort.name}"
    plan_stage(ecfg, stage)
    info = {**cohort.summary(ctx.label_map), "id_matches_with_other_scans": len(same_ids)}
    log.info("external test: %d subjects of %s (%s), %d model(s), classes %s", len(ids), cohort.path,
             ", ".join(f"{k} {v}" for k, v in info["class_counts"].items()), len(models), ctx.label_map.class_names)
    title = f"External validation of experiment '{cfg.exp_name}' on {cohort.path}"
    return _score(cfg, ecfg, stage, models, ref, ctx, cohort.subjects, {s.id: s.group for s in cohort.subjects},
                  wanted, device, {"data": str(cohort.path), "cohort": info}, title)


def _score(cfg: Config, ecfg: Config, stage: str, models: Models, ref: dict[str, Any], ctx: Any,
           subjects: list[Any], group_of: dict[str, str], wanted: set[str], device: torch.device,
           about: dict[str, Any], title: str | None) -> dict[str, Any]:
    """Warm the cache, score ``subjects`` into ``runs/<exp>/<stage>/`` (metrics.json with ``about``'s ``cohort``,
    review page) and print the summary."""
    handler = DataHandler(ecfg, ctx.label_map)
    handler.warm(subjects)
    with shared_stage_dir(ecfg, stage) as folder:
        metrics = evaluate(ecfg, folder.path, models, ref, handler, subjects, list(ctx.splits.class_names),
                           group_of, wanted, device, seed=cfg.run.seed,
                           cohort="test" if stage == STAGE else "external")
        metrics["cohort"] = about["cohort"]
        if dist.is_main():
            atomic_write_json(folder.path / "metrics.json", folder.rebase(metrics))
            # written into the folder being built: its links are relative, so they hold once it is renamed
            page = write_test_review(folder.path, {"experiment": cfg.exp_name, "stage": stage,
                                                   "data": about["data"]})
            out = folder.finish(ecfg)
            print_summary(cfg.exp_name, metrics, out, len(subjects), title)
            if page is not None:
                print(f"Review page: {out / 'review' / 'index.html'} (open it in a browser; works from disk)")
    return folder.rebase(metrics)
