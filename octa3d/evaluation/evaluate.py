"""Scoring a classifier on labelled subjects: probabilities per model, temperature scaling, bootstrap CIs,
uncertainty, and the outputs of a test folder (:mod:`octa3d.evaluation.outputs`), CAMs included.

The test stage calls :func:`evaluate` for the experiment's hold-out (``test/``) and for an external cohort
(``test-external/<name>/``): one code path, so both folders hold the same metrics, files and figures.

Probabilities are temperature-scaled with each checkpoint's ``temperature`` (fitted on its fold's validation split
by the train stage; :mod:`octa3d.evaluation.calibration`) before an ensemble averages them; ``--no-calibrate`` uses the
raw
softmax. ``metrics.json`` holds both (``calibration: {temperature, applied, raw, calibrated}``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d.cam import CamExporter, cam_backend, cam_items_from_cache, check_cam_options
from octa3d.checkpoint.models import Models, entropy_threshold_of, find_checkpoints, load_models, temperatures
from octa3d.checkpoint.settings import checkpoint_config
from octa3d.config import Config
from octa3d.data.augment import tta_augment
from octa3d.evaluation import forward
from octa3d.evaluation.calibration import (UNCERTAIN_COVERAGE, apply_temperature, calibration_scores, entropy, nll,
                                           uncertainty_report)
from octa3d.evaluation.ood_check import PREDATES, check_subjects, checks_of, summary_block
from octa3d.evaluation.metrics import bootstrap_ci, chance_report, evaluation_metrics, resampling_units
from octa3d.evaluation.outputs import cam_scalars, write_outputs
from octa3d.training.precision import Precision
from octa3d.utils import dist
from octa3d.utils.tracking import tensorboard_writer

__all__ = ["calibration_block", "evaluate", "models_for_evaluation", "predict_all", "score_metrics", "spread",
           "uncertainty_block"]

log = logging.getLogger("octa3d.evaluation")

def models_for_evaluation(cfg: Config, settings_from: Config | None = None,
                          paths: list[tuple[str, Path]] | None = None) -> tuple[Models, dict[str, Any], Config]:
    """The experiment's model(s) and the configuration they are evaluated under, with the CAM and spread options
    checked against them — the one loading path of ``--mode test``, ``--mode predict``/``explain`` and the API.

    Args:
        cfg: this invocation's configuration (finds ``--checkpoint``, ``best.pt`` or the fold ensemble).
        settings_from: the configuration merged with the checkpoint's settings (default ``cfg``; ``--external``
            passes the experiment's own, since its data flags describe the cohort).
        paths: the checkpoints, when already found (:func:`~octa3d.checkpoint.models.find_checkpoints`).

    Returns:
        ``(models, reference record, ecfg)``; ``ecfg.eval.cam`` is ``none`` for int8/ONNX models.

    Raises:
        CheckpointError: no or damaged model files. ConfigError: options the models cannot honour.
    """
    models, ref = load_models(paths if paths is not None else find_checkpoints(cfg))
    ecfg = checkpoint_config(settings_from or cfg, ref)
    ecfg.eval.cam = cam_backend(ecfg, models)
    nets, classes = [m.model for m in models], list(ref["class_names"])
    check_cam_options(ecfg.eval, nets, classes, ecfg.model.model)
    forward.check_spread_options(ecfg, nets, classes)
    return models, ref, ecfg


def predict_all(models: Models, loader: Any, precision: Precision,
                features: dict[str, dict[str, np.ndarray]] | None = None, **kw: Any
                ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Subject-level probabilities per model, aligned on the first model's subject order (``kw``: TTA / MC dropout
    options of :func:`forward.predict`; ``features``: filled with model name -> subject -> pooled features of the
    same pass)."""
    ids: list[str] = []
    y = np.zeros(0, int)
    per: dict[str, np.ndarray] = {}
    for m in models:
        feats = features.setdefault(m.name, {}) if features is not None else None
        sids, labels, probs, _ = forward.predict(m.model, loader, precision, features=feats, **kw)
        if not ids:
            ids, y = list(sids), np.asarray(labels)
        order = {s: i for i, s in enumerate(sids)}
        per[m.name] = np.asarray(probs)[[order[s] for s in ids]]
    return ids, y, per


def spread(ecfg: Config, seed: int, models: Models, loader: Any, precision: Precision, ids: list[str],
           per_model: dict[str, np.ndarray], temps: dict[str, float | None], applied: bool
           ) -> tuple[np.ndarray | None, str | None]:
    """Per-eye sd of P(positive) (binary tasks) over the ``--tta``/``--mc-dropout`` passes of every model (each
    calibrated like the reported probabilities), else over an ensemble's folds.

    Every pass is drawn from (``seed``, pass, subject, patch) — TTA by :func:`~octa3d.data.augment.tta_augment`,
    MC-dropout masks by :func:`~octa3d.evaluation.forward.mc_seed` — so the API and ``--mode predict``, which
    see one subject at a time, give the same numbers.

    Args:
        seed: this invocation's ``--seed`` (not the split seed ``ecfg.run.seed``).
    """
    n_tta, n_mc = ecfg.eval.tta, ecfg.eval.mc_dropout
    samples: list[np.ndarray] = []
    passes = [{"augment": tta_augment(ecfg, seed, k)} for k in range(n_tta)]
    passes += [{"mc_pass": (seed, k)} for k in range(n_mc)]
    for kw in passes:
        sids, _, per = predict_all(models, loader, precision, **kw)
        order = [{s: i for i, s in enumerate(sids)}[s] for s in ids]
        samples += [(apply_temperature(p, temps[n]) if applied else p)[order, 1] for n, p in per.items()]
    if samples:  # one sample has no spread: sd 0
        return np.std(samples, axis=0, ddof=int(len(samples) > 1)), f"{len(models)} model(s) x {n_tta} TTA + {n_mc} MC"
    if len(models) > 1:
        return np.std([p[:, 1] for p in per_model.values()], axis=0, ddof=1), f"fold ensemble of {len(models)}"
    return None, None


def uncertainty_block(models: Models, y: np.ndarray, probs: np.ndarray, applied: bool, p_sd: np.ndarray | None,
                      source: str | None, ecfg: Config, ood: np.ndarray | None = None
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """metrics.json ``uncertainty`` and predictions.csv's ``entropy``, ``p_sd``, ``uncertain``: the threshold is the
    checkpoints' validation one (mean over folds; raw under ``--no-calibrate``; none in old checkpoints: no flag);
    an eye flagged out of distribution (``ood``) is uncertain as well."""
    thr = entropy_threshold_of(models, applied)
    e = entropy(probs)
    block = uncertainty_report(y, probs, e, thr, ood)
    block.update(coverage=models[0].record.get("uncertainty_coverage", UNCERTAIN_COVERAGE), entropy_unit="nats",
                 threshold_from="validation split of each fold (train stage)" if thr is not None else None,
                 p_sd_source=source, p_sd_mean=float(np.mean(p_sd)) if p_sd is not None else None,
                 tta=ecfg.eval.tta, mc_dropout=ecfg.eval.mc_dropout)
    cols = {"entropy": np.round(e, 6), **({"p_sd": np.round(p_sd, 6)} if p_sd is not None else {})}
    flag = (e > thr) | (ood if ood is not None else False) if thr is not None else None
    return block, {**cols, **({"uncertain": flag} if flag is not None else {})}


def calibration_block(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, temps: dict[str, float | None],
                      applied: bool) -> dict[str, Any]:
    """metrics.json ``calibration``: the temperature(s) and raw vs calibrated scores side by side."""
    def scores(p: np.ndarray) -> dict[str, float]:
        return {**calibration_scores(y, p), "nll": nll(y, p)}

    fitted = {n: t for n, t in temps.items() if t is not None}
    return {"temperature": (next(iter(temps.values())) if len(temps) == 1 else temps),
            "applied": applied, "fitted_on": "validation split of each fold, at the end of training",
            "note": None if fitted else "no temperature in the checkpoint(s): raw probabilities used",
            "raw": scores(raw), "calibrated": scores(calibrated)}


def score_metrics(ecfg: Config, seed: int, y: np.ndarray, probs: np.ndarray, per_model: dict[str, np.ndarray],
                  names: list[str], models: Models, ref: dict[str, Any], groups: list[str]) -> dict[str, Any]:
    """metrics.json: headline metrics with bootstrap CIs (resampling patient groups, stratified by class; ``seed``:
    this invocation's ``--seed``), the model, and per-fold metrics of an ensemble."""
    n_boot = ecfg.eval.bootstrap
    metrics = evaluation_metrics(y, probs, names)
    metrics["ci95"] = bootstrap_ci(y, probs, n_boot, seed, groups=groups)
    metrics["chance"] = chance_report(metrics, len(names))
    units = resampling_units(y, groups)
    metrics.update({"class_names": names, "positive_class": names[1] if len(names) == 2 else None,
                    "bootstrap": {"resamples": n_boot, "seed": seed, "method": "percentile", "level": 0.95,
                                  "unit": units["unit"], "n_groups": units["n_groups"], "stratified": True},
                    "model": ref["model_name"], "dim": ref["dim"], "input_shape": ref["input_shape"],
                    "modality": ref["modality"], "checkpoints": {m.name: str(m.path) for m in models},
                    "model_format": "int8" if ref["is_quantized"] else ref["artifact_format"],
                    "ensemble": len(models) > 1})
    if len(models) > 1:
        metrics["folds"] = {}
        for m in models:
            fm = evaluation_metrics(y, per_model[m.name], names)
            fm["ci95"] = bootstrap_ci(y, per_model[m.name], n_boot, seed, groups=groups)
            metrics["folds"][m.name] = fm
    return metrics


def evaluate(ecfg: Config, out: Path, models: Models, ref: dict[str, Any], handler: Any, subjects: list[Any],
             names: list[str], group_of: Mapping[str, str], wanted: set[str], device: torch.device, *, seed: int,
             cohort: str = "test") -> dict[str, Any]:
    """Predict ``subjects``, score them and write the outputs (predictions, plots, TensorBoard, CAMs) into ``out``.

    Args:
        ecfg: the configuration the models are evaluated under (:func:`octa3d.checkpoint.settings.checkpoint_config`:
            the model's data and preprocessing settings, this invocation's test/CAM options).
        out: the stage folder being built.
        models: the loaded models (an ensemble averages their probabilities).
        ref: the first model's record (name, dim, input shape ...).
        handler: the :class:`~octa3d.data.datasets.DataHandler` the subjects were warmed with.
        subjects: the labelled subjects to score.
        names: the class names, in the models' order.
        group_of: subject ID -> patient group (the bootstrap's resampling unit); an ID missing is its own group.
        wanted: the subjects whose CAMs are exported (when ``--cam`` is not none).
        device: where the models are.
        seed: this invocation's ``--seed``, which draws the bootstrap resamples and the TTA/MC-dropout passes
            (``ecfg.run.seed`` is the seed the experiment's splits were made with).
        cohort: what the figure titles call the subjects ("test" hold-out, "external" cohort).

    Returns:
        The metrics dictionary (to be written as ``metrics.json`` by the caller).
    """
    loader = handler.loader(subjects, train=False, batch_size=ecfg.train.batch_size)
    precision = Precision.for_device(device, ecfg.train.amp)
    feats: dict[str, dict[str, np.ndarray]] = {}
    ids, y, raw_per = predict_all(models, loader, precision, features=feats)
    temps = temperatures(models)
    # each member is calibrated with its own fold's temperature before the ensemble averages
    cal_per = {n: apply_temperature(p, temps[n]) for n, p in raw_per.items()}
    applied = bool(ecfg.eval.calibrate) and any(t is not None for t in temps.values())
    per_model = cal_per if applied else raw_per
    raw = np.mean([raw_per[m.name] for m in models], axis=0)
    probs = np.mean([per_model[m.name] for m in models], axis=0)
    # patients, not images, are the independent units: two B-scans of one patient are resampled together
    metrics = score_metrics(ecfg, seed, y, probs, per_model, names, models, ref, [group_of.get(i) or i for i in ids])
    metrics["calibration"] = calibration_block(y, raw, np.mean([cal_per[m.name] for m in models], axis=0), temps,
                                               applied)
    raw_cols = raw if applied else None
    p_sd, source = (spread(ecfg, seed, models, loader, precision, ids, per_model, temps, applied)
                    if len(names) == 2 else (None, None))
    checks = checks_of([m.record for m in models], ecfg.eval.ood_false_alarm)
    ood = check_subjects(checks, [m.name for m in models], ids, handler.record, feats) if checks else []
    flags = np.array([r.flagged for r in ood], bool) if checks else None
    metrics["uncertainty"], extra = uncertainty_block(models, y, probs, applied, p_sd, source, ecfg, flags)
    if checks is None:
        log.info(PREDATES)
    metrics["ood"] = summary_block(checks, [r.flagged for r in ood], [r.reason for r in ood])
    none = [""] * len(ids)  # a model that predates the check: empty columns
    extra.update(ood_score=[round(r.score, 4) for r in ood] if checks else none,
                 ood=[r.flagged for r in ood] if checks else none, ood_reason=[r.reason for r in ood] if checks else none)
    tb = tensorboard_writer(out / "tensorboard")
    cam_status = None
    if ecfg.eval.cam != "none" and dist.is_main():
        by_id = {s: i for i, s in enumerate(ids)}
        cam_subs = [s for s in subjects if s.id in wanted]
        items = cam_items_from_cache(handler, cam_subs, {s.id: probs[by_id[s.id]] for s in cam_subs},
                                     {s.id: int(y[by_id[s.id]]) for s in cam_subs})
        exporter = CamExporter(ecfg, [m.model for m in models], names, out / "cams", handler.preset, tb=tb,
                               device=device)
        cam_report = exporter.export(items)
        metrics["cam"] = cam_report["cam"]
        for key in ("localization", "faithfulness"):
            if cam_report.get(key):
                metrics[key] = cam_report[key]
        cam_status = {k: v["status"] for k, v in cam_report["subjects"].items()}
        cam_scalars(tb, metrics)
    if dist.is_main():
        write_outputs(out, tb, ids, y, probs, per_model, names, metrics, raw_cols, extra, cohort, cam_status)
    tb.close()
    return metrics
