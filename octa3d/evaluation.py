"""Scoring a classifier on labelled subjects: probabilities per model, temperature scaling, bootstrap CIs,
uncertainty, and the outputs of a test folder (:mod:`octa3d.evaluation_outputs`), CAMs included.

The test stage calls :func:`evaluate` for the experiment's hold-out (``test/``) and for an external cohort
(``test-external/<name>/``): one code path, so both folders hold the same metrics, files and figures.

Probabilities are temperature-scaled with each checkpoint's ``temperature`` (fitted on its fold's validation split
by the train stage; :mod:`octa3d.calibration`) before an ensemble averages them; ``--no-calibrate`` uses the raw
softmax. ``metrics.json`` holds both (``calibration: {temperature, applied, raw, calibrated}``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d import engine
from octa3d.calibration import (UNCERTAIN_COVERAGE, apply_temperature, calibration_scores, entropy, nll,
                                uncertainty_report)
from octa3d.cam import CamExporter, cam_items_from_cache
from octa3d.config import Config
from octa3d.evaluation_outputs import cam_scalars, write_outputs, write_predictions
from octa3d.data.augment import tta_augment  # noqa: F401  (re-exported)
from octa3d.inference import entropy_threshold_of, temperatures  # noqa: F401  (re-exported)
from octa3d.metrics import bootstrap_ci, evaluation_metrics, resampling_units
from octa3d.utils import dist
from octa3d.utils.tracking import tensorboard_writer

__all__ = ["Models", "calibration_block", "evaluate", "predict_all", "score_metrics", "spread", "tta_augment",
           "temperatures", "uncertainty_block"]

log = logging.getLogger("octa3d.evaluation")

#: ``[(name, checkpoint path, checkpoint record, model)]`` as :func:`octa3d.checkpoint.load_models` returns them.
Models = list[tuple[str, Path, dict[str, Any], torch.nn.Module]]


def predict_all(models: Models, loader: Any, precision: engine.Precision, **kw: Any
                ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Subject-level probabilities per model, aligned on the first model's subject order (``kw``: TTA / MC dropout
    options of :func:`engine.predict`)."""
    ids: list[str] = []
    y = np.zeros(0, int)
    per: dict[str, np.ndarray] = {}
    for name, _, _, model in models:
        sids, labels, probs, _ = engine.predict(model, loader, precision, **kw)
        if not ids:
            ids, y = list(sids), np.asarray(labels)
        order = {s: i for i, s in enumerate(sids)}
        per[name] = np.asarray(probs)[[order[s] for s in ids]]
    return ids, y, per


def spread(ecfg: Config, seed: int, models: Models, loader: Any, precision: engine.Precision, ids: list[str],
           per_model: dict[str, np.ndarray], temps: dict[str, float | None], applied: bool
           ) -> tuple[np.ndarray | None, str | None]:
    """Per-eye sd of P(positive) (binary tasks) over the ``--tta``/``--mc-dropout`` passes of every model (each
    calibrated like the reported probabilities; drawn from this run's ``seed``), else over an ensemble's folds."""
    n_tta, n_mc = ecfg.eval.tta, ecfg.eval.mc_dropout
    samples: list[np.ndarray] = []
    for k in range(n_tta + n_mc):
        if k >= n_tta:
            torch.manual_seed((seed + 7919 * (k + 1)) % 2**32)  # MC dropout masks: fixed by --seed
        kw = {"augment": tta_augment(ecfg, seed, k)} if k < n_tta else {"mc_dropout": True}
        sids, _, per = predict_all(models, loader, precision, **kw)
        order = [{s: i for i, s in enumerate(sids)}[s] for s in ids]
        samples += [(apply_temperature(p, temps[n]) if applied else p)[order, 1] for n, p in per.items()]
    if samples:  # one sample has no spread: sd 0
        return np.std(samples, axis=0, ddof=int(len(samples) > 1)), f"{len(models)} model(s) x {n_tta} TTA + {n_mc} MC"
    if len(models) > 1:
        return np.std([p[:, 1] for p in per_model.values()], axis=0, ddof=1), f"fold ensemble of {len(models)}"
    return None, None


def uncertainty_block(models: Models, y: np.ndarray, probs: np.ndarray, applied: bool, p_sd: np.ndarray | None,
                      source: str | None, ecfg: Config) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """metrics.json ``uncertainty`` and predictions.csv's ``entropy``, ``p_sd``, ``uncertain``: the threshold is the
    checkpoints' validation one (mean over folds; raw under ``--no-calibrate``; none in old checkpoints: no flag)."""
    thr = entropy_threshold_of(models, applied)
    e = entropy(probs)
    block = uncertainty_report(y, probs, e, thr)
    block.update(coverage=models[0][2].get("uncertainty_coverage", UNCERTAIN_COVERAGE), entropy_unit="nats",
                 threshold_from="validation split of each fold (train stage)" if thr is not None else None,
                 p_sd_source=source, p_sd_mean=float(np.mean(p_sd)) if p_sd is not None else None,
                 tta=ecfg.eval.tta, mc_dropout=ecfg.eval.mc_dropout)
    cols = {"entropy": np.round(e, 6), **({"p_sd": np.round(p_sd, 6)} if p_sd is not None else {})}
    return block, {**cols, **({"uncertain": e > thr} if thr is not None else {})}


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


def score_metrics(cfg: Config, y: np.ndarray, probs: np.ndarray, per_model: dict[str, np.ndarray], names: list[str],
                  models: Models, ref: dict[str, Any], groups: list[str]) -> dict[str, Any]:
    """metrics.json: headline metrics with bootstrap CIs (resampling patient groups, stratified by class), the
    model, and per-fold metrics of an ensemble."""
    seed, n_boot = cfg.run.seed, cfg.eval.bootstrap
    metrics = evaluation_metrics(y, probs, names)
    metrics["ci95"] = bootstrap_ci(y, probs, n_boot, seed, groups=groups)
    units = resampling_units(y, groups)
    metrics.update({"class_names": names, "positive_class": names[1] if len(names) == 2 else None,
                    "bootstrap": {"resamples": n_boot, "seed": seed, "method": "percentile", "level": 0.95,
                                  "unit": units["unit"], "n_groups": units["n_groups"], "stratified": True},
                    "model": ref["model_name"], "dim": ref["dim"], "input_shape": ref["input_shape"],
                    "modality": ref["modality"], "checkpoints": {n: str(p) for n, p, *_ in models},
                    "model_format": "int8" if ref["is_quantized"] else ref["artifact_format"],
                    "ensemble": len(models) > 1})
    if len(models) > 1:
        metrics["folds"] = {}
        for n, *_ in models:
            fm = evaluation_metrics(y, per_model[n], names)
            fm["ci95"] = bootstrap_ci(y, per_model[n], n_boot, seed, groups=groups)
            metrics["folds"][n] = fm
    return metrics


def evaluate(cfg: Config, ecfg: Config, out: Path, models: Models, ref: dict[str, Any], handler: Any,
             subjects: list[Any], names: list[str], group_of: Mapping[str, str], wanted: set[str],
             device: torch.device, cohort: str = "test") -> dict[str, Any]:
    """Predict ``subjects``, score them and write the outputs (predictions, plots, TensorBoard, CAMs) into ``out``.

    Args:
        cfg: this invocation's configuration (``--seed`` of the bootstrap, TTA and MC dropout).
        ecfg: the configuration the models are evaluated under (:func:`octa3d.checkpoint.checkpoint_config`).
        out: the stage folder being built.
        models: the loaded models (an ensemble averages their probabilities).
        ref: the first model's record (name, dim, input shape ...).
        handler: the :class:`~octa3d.data.datasets.DataHandler` the subjects were warmed with.
        subjects: the labelled subjects to score.
        names: the class names, in the models' order.
        group_of: subject ID -> patient group (the bootstrap's resampling unit); an ID missing is its own group.
        wanted: the subjects whose CAMs are exported (when ``--cam`` is not none).
        device: where the models are.
        cohort: what the figure titles call the subjects ("test" hold-out, "external" cohort).

    Returns:
        The metrics dictionary (to be written as ``metrics.json`` by the caller).
    """
    loader = handler.loader(subjects, train=False, batch_size=ecfg.train.batch_size)
    precision = engine.Precision.for_device(device, ecfg.train.amp)
    ids, y, raw_per = predict_all(models, loader, precision)
    temps = temperatures(models)
    # each member is calibrated with its own fold's temperature before the ensemble averages (issue 17)
    cal_per = {n: apply_temperature(p, temps[n]) for n, p in raw_per.items()}
    applied = bool(ecfg.eval.calibrate) and any(t is not None for t in temps.values())
    per_model = cal_per if applied else raw_per
    raw = np.mean([raw_per[n] for n, *_ in models], axis=0)
    probs = np.mean([per_model[n] for n, *_ in models], axis=0)
    # patients, not images, are the independent units: two B-scans of one patient are resampled together
    metrics = score_metrics(cfg, y, probs, per_model, names, models, ref, [group_of.get(i) or i for i in ids])
    metrics["calibration"] = calibration_block(y, raw, np.mean([cal_per[n] for n, *_ in models], axis=0), temps,
                                               applied)
    raw_cols = raw if applied else None
    p_sd, source = (spread(ecfg, cfg.run.seed, models, loader, precision, ids, per_model, temps, applied)
                    if len(names) == 2 else (None, None))
    metrics["uncertainty"], extra = uncertainty_block(models, y, probs, applied, p_sd, source, ecfg)
    tb = tensorboard_writer(out / "tensorboard")
    if dist.is_main():
        write_outputs(out, tb, ids, y, probs, per_model, names, metrics, raw_cols, extra, cohort)
    if ecfg.eval.cam != "none" and dist.is_main():
        by_id = {s: i for i, s in enumerate(ids)}
        cam_subs = [s for s in subjects if s.id in wanted]
        items = cam_items_from_cache(handler, cam_subs, {s.id: probs[by_id[s.id]] for s in cam_subs},
                                     {s.id: int(y[by_id[s.id]]) for s in cam_subs})
        exporter = CamExporter(ecfg, [m for *_, m in models], names, out / "cams", handler.preset, tb=tb,
                               device=device)
        cam_report = exporter.export(items)
        metrics["cam"] = cam_report["cam"]
        for key in ("localization", "faithfulness"):
            if cam_report.get(key):
                metrics[key] = cam_report[key]
        write_predictions(out, ids, y, probs, names, {k: v["status"] for k, v in cam_report["subjects"].items()},
                          raw=raw_cols, extra=extra)
        cam_scalars(tb, metrics)
    tb.close()
    return metrics
