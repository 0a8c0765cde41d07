"""``--mode test``: hold-out evaluation of the experiment's classifier, with bootstrap CIs, plots and Grad-CAM.

The model is ``train/checkpoints/best.pt``, or every ``train/fold-k/checkpoints/best.pt`` (evaluated one by one and
as an ensemble of averaged probabilities), or ``--checkpoint`` (see :func:`octa3d.checkpoint.find_checkpoints`).
Preprocessing comes from the checkpoint (input size, preprocessing settings, modality), never from the flags of
this invocation, so a model is always evaluated on inputs made the way it was trained. Only the experiment's
hold-out subjects are used, and the leakage guard refuses any that trained or validated the model (including
autoencoder extra data).

Probabilities are temperature-scaled with each checkpoint's ``temperature`` (fitted on its fold's validation split
by the train stage; :mod:`octa3d.calibration`) before an ensemble averages them; ``--no-calibrate`` uses the raw
softmax. ``metrics.json`` holds both (``calibration: {temperature, applied, raw, calibrated}``).

Outputs in ``runs/<exp>/test/``: ``metrics.json``, ``predictions.csv`` (and ``predictions_fold-k.csv``),
``roc.png``, ``confusion_matrix.png``, ``reliability.png``, ``coverage.png``, ``cams/`` (see
:mod:`octa3d.cam.export`) and ``tensorboard/``.
"""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from octa3d import engine
from octa3d.calibration import (UNCERTAIN_COVERAGE, apply_temperature, calibration_scores, entropy, nll,
                                reliability_bins, risk_coverage, uncertainty_report)
from octa3d.cam import CamExporter, cam_backend, cam_items_from_cache, check_cam_options, score_lines
from octa3d.checkpoint import CheckpointError, checkpoint_config, find_checkpoints, load_models, place_models
from octa3d.config import Config
from octa3d.context import guard_test_set, setup_stage
from octa3d.data.datasets import DataHandler
from octa3d.errors import ConfigError, DataError
from octa3d.metrics import (CI_METRICS, bootstrap_ci, evaluation_metrics, format_metric, predictions_frame,
                            resampling_units, summary_lines)
from octa3d.plots import confusion_figure, roc_figure, save_figure
from octa3d.plots_calibration import coverage_figure, reliability_figure
from octa3d.review import write_test_review
from octa3d.utils import dist
from octa3d.utils.io import atomic_write_csv, atomic_write_json
from octa3d.utils.runs import plan_stage, releases_locks, shared_stage_dir
from octa3d.utils.tracking import tensorboard_writer

log = logging.getLogger("octa3d.test")

STAGE = "test"

Models = list[tuple[str, Path, dict[str, Any], torch.nn.Module]]


def _predict_all(models: Models, loader: Any, precision: engine.Precision, **kw: Any
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


def tta_augment(ecfg: Config, seed: int, n_pass: int) -> Callable[[torch.Tensor, list[str], list[int]], torch.Tensor]:
    """Pass ``n_pass`` of test-time augmentation: the flips and small affine of training (intensity changes left
    out), drawn from (seed, pass, subject, patch) alone: the same with one ``--seed`` whatever the batch order."""
    from monai.transforms import Compose, RandFlipd

    from octa3d.data.augment import RandPlaneAffined, train_augmentation

    geo = Compose([t for t in train_augmentation(ecfg.spatial_dims, ecfg.preprocess.depth_axis).transforms
                   if isinstance(t, (RandFlipd, RandPlaneAffined))])

    def augment(x: torch.Tensor, subjects: list[str], patches: list[int]) -> torch.Tensor:
        out = []
        for img, sid, patch in zip(x, subjects, patches):
            key = [seed % 2**32, n_pass, zlib.crc32(str(sid).encode()), patch + 1]
            geo.set_random_state(seed=int(np.random.SeedSequence(key).generate_state(1)[0]))
            out.append(torch.as_tensor(geo({"image": img})["image"], dtype=torch.float32))
        return torch.stack(out).contiguous()
    return augment


def _spread(ecfg: Config, seed: int, models: Models, loader: Any, precision: engine.Precision, ids: list[str],
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
        sids, _, per = _predict_all(models, loader, precision, **kw)
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
    key = "entropy_threshold" if applied else "entropy_threshold_raw"
    ths = [rec.get(key) for _, _, rec, _ in models]
    thr = float(np.mean(ths)) if all(t is not None for t in ths) else None
    e = entropy(probs)
    block = uncertainty_report(y, probs, e, thr)
    block.update(coverage=models[0][2].get("uncertainty_coverage", UNCERTAIN_COVERAGE), entropy_unit="nats",
                 threshold_from="validation split of each fold (train stage)" if thr is not None else None,
                 p_sd_source=source, p_sd_mean=float(np.mean(p_sd)) if p_sd is not None else None,
                 tta=ecfg.eval.tta, mc_dropout=ecfg.eval.mc_dropout)
    cols = {"entropy": np.round(e, 6), **({"p_sd": np.round(p_sd, 6)} if p_sd is not None else {})}
    return block, {**cols, **({"uncertain": e > thr} if thr is not None else {})}


def _temperatures(models: Models) -> dict[str, float | None]:
    """Each model's fitted temperature (None: the checkpoint has none, e.g. trained before temperature scaling).

    Raises:
        CheckpointError: a recorded temperature that is not a positive finite number.
    """
    out: dict[str, float | None] = {}
    for name, path, rec, _ in models:
        t = rec.get("temperature")
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise CheckpointError(f"{path}: temperature {t!r} is not a positive number; re-run --mode train for "
                                  f"this experiment or test with --no-calibrate")
        out[name] = None if t is None else float(t)
    return out


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


def _metrics(cfg: Config, y: np.ndarray, probs: np.ndarray, per_model: dict[str, np.ndarray], names: list[str],
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


def _write_predictions(out: Path, ids: list[str], y: np.ndarray, probs: np.ndarray, names: list[str],
                       cam_status: dict[str, str] | None = None, raw: np.ndarray | None = None,
                       extra: dict[str, np.ndarray] | None = None) -> None:
    """predictions.csv, with ``p_raw_<class>`` columns (uncalibrated) when ``probs`` are temperature-scaled and a
    ``cam_status`` column once maps were made (``not computed`` for the others)."""
    frame = predictions_frame(ids, y, probs, names)
    if raw is not None:
        for c, n in enumerate(names):
            frame.insert(frame.columns.get_loc("prediction"), f"p_raw_{n}", np.round(raw[:, c], 6))
    for k, v in (extra or {}).items():
        frame[k] = v
    if cam_status is not None:
        frame["cam_status"] = [cam_status.get(i, "not computed") for i in ids]
    atomic_write_csv(out / "predictions.csv", frame)


def _write_outputs(out: Path, tb: Any, ids: list[str], y: np.ndarray, probs: np.ndarray,
                   per_model: dict[str, np.ndarray], names: list[str], metrics: dict[str, Any],
                   raw: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> None:
    """predictions CSV(s), ROC, confusion-matrix, reliability and coverage PNGs, and the same in TensorBoard."""
    _write_predictions(out, ids, y, probs, names, raw=raw, extra=extra)
    if len(per_model) > 1:
        for n, p in per_model.items():
            atomic_write_csv(out / f"predictions_{n}.csv", predictions_frame(ids, y, p, names))
    cm = np.asarray(metrics["confusion_matrix"])
    save_figure(roc_figure(y, probs, names, metrics["auc"]), out / "roc.png")
    save_figure(confusion_figure(cm, names), out / "confusion_matrix.png")
    tb.add_figure("test/roc", roc_figure(y, probs, names, metrics["auc"]), 0)
    tb.add_figure("test/confusion_matrix", confusion_figure(cm, names), 0)
    raw_bins = reliability_bins(y, raw, metrics["ece_bins"]) if raw is not None and len(y) else None
    # entropy ranks the eyes when known (the same order as max probability for two classes)
    curve = risk_coverage(y, probs, confidence=-extra["entropy"] if extra else None)
    for tag, make in (("reliability", lambda: reliability_figure(metrics["reliability"], metrics["ece"], raw_bins)),
                      ("coverage", lambda: coverage_figure(curve, metrics["aurc"]))):
        save_figure(make(), out / f"{tag}.png")
        tb.add_figure(f"test/{tag}", make(), 0)
    for k in CI_METRICS:
        if k in metrics and metrics[k] is not None and math.isfinite(metrics[k]):
            tb.add_scalar(f"test/{k}", metrics[k], 0)
            ci = metrics["ci95"].get(k)
            if ci and all(math.isfinite(c) for c in ci):
                tb.add_scalar(f"test/{k}_ci_low", ci[0], 0)
                tb.add_scalar(f"test/{k}_ci_high", ci[1], 0)


def _cam_scalars(tb: Any, metrics: dict[str, Any]) -> None:
    """Map scores in TensorBoard: localisation per class, faithfulness, maps without evidence."""
    for cls, v in (metrics.get("localization") or {}).get("per_class", {}).items():
        tb.add_scalar(f"cam/pointing_game/{cls}", v["pointing_game"], 0)
        tb.add_scalar(f"cam/mass_ratio/{cls}", v["mass_ratio"], 0)
    faith = metrics.get("faithfulness") or {}
    for k in ("deletion_auc", "insertion_auc", "deletion_auc_random"):
        if k in faith:
            tb.add_scalar(f"cam/{k}", faith[k], 0)
    cam = metrics.get("cam") or {}
    tb.add_scalar("cam/without_evidence", cam.get("n_subjects", 0) - cam.get("status_counts", {}).get("ok", 0), 0)


def _hold_out(cfg: Config, test_ids: list[str]) -> set[str]:
    """The subjects whose CAMs are exported (``--cam-subjects``, default all), checked against the hold-out."""
    wanted = set(cfg.eval.cam_subjects or test_ids)
    unknown = sorted(wanted - set(test_ids))
    if unknown and cfg.eval.cam != "none":
        raise ConfigError(f"--cam-subjects {', '.join(unknown)}: not hold-out test subjects of experiment "
                          f"'{cfg.exp_name}' (test subjects: {', '.join(test_ids[:10])}"
                          f"{' …' if len(test_ids) > 10 else ''})")
    return wanted


@releases_locks
def run(cfg: Config) -> dict[str, Any]:
    """Evaluate the experiment's classifier on its hold-out subjects; write ``runs/<exp>/test/``.

    Every option is checked before the stage folder is prepared; the outputs are written beside it and replace
    earlier results only once complete (:func:`octa3d.utils.runs.stage_dir`).

    Returns:
        The metrics dictionary written to ``metrics.json``.
    """
    ckpt_paths = find_checkpoints(cfg)
    if not (cfg.run_dir / "splits" / "split.json").is_file():
        raise DataError(f"experiment '{cfg.exp_name}' has no splits ({cfg.run_dir / 'splits'}): the test stage "
                        f"only evaluates an experiment's hold-out subjects; run --mode prepare and --mode train "
                        f"first (same --exp/--runs-dir), or predict single scans with --mode explain --input PATH")
    models, ref = load_models(ckpt_paths)
    ecfg = checkpoint_config(cfg, ref)
    ecfg.eval.cam = cam_backend(ecfg, models)
    check_cam_options(ecfg.eval, [m for *_, m in models], list(ref["class_names"]), ecfg.model.model)
    if ecfg.eval.mc_dropout and not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for *_, net in models
                                        for m in net.modules()):
        raise ConfigError(f"--mc-dropout: model {ref['model_name']} has no dropout layers; use --tta N instead")
    ctx = setup_stage(ecfg)
    device = place_models(models, ctx.device)
    sp = ctx.splits
    names = list(sp.class_names)
    if list(ref["class_names"]) != names:
        raise ConfigError(f"{ckpt_paths[0][1]} predicts classes {ref['class_names']} but experiment "
                          f"'{cfg.exp_name}' has classes {names}; test it in its own experiment (--exp)")
    test_ids = list(sp.test)
    if not test_ids:
        raise DataError(f"experiment '{cfg.exp_name}' has no hold-out test subjects ({cfg.run_dir / 'splits'})")
    guard_test_set(ecfg, test_ids, sp, subjects=ctx.subjects)
    wanted = _hold_out(ecfg, test_ids)
    plan_stage(ecfg, STAGE)  # every option checked: now refuse (RunExistsError) before the scans are read
    subjects = ctx.pick(test_ids)
    handler = DataHandler(ecfg, ctx.label_map)
    handler.warm(subjects)
    with shared_stage_dir(ecfg, STAGE) as folder:
        metrics = _evaluate(cfg, ecfg, folder.path, models, ref, ctx, handler, subjects, wanted, device)
        if dist.is_main():
            atomic_write_json(folder.path / "metrics.json", folder.rebase(metrics))
            # written into the folder being built: its links are relative, so they hold once it is renamed
            page = write_test_review(folder.path, {"experiment": cfg.exp_name, "stage": STAGE,
                                                   "data": ecfg.data.data_root})
            out = folder.finish(ecfg)
            print_summary(cfg, metrics, out, len(test_ids))
            if page is not None:
                print(f"Review page: {out / 'review' / 'index.html'} (open it in a browser; works from disk)")
    return folder.rebase(metrics)


def _evaluate(cfg: Config, ecfg: Config, out: Path, models: Models, ref: dict[str, Any], ctx: Any, handler: Any,
              subjects: list[Any], wanted: set[str], device: torch.device) -> dict[str, Any]:
    """Predict, score and write the outputs (predictions, plots, TensorBoard, CAMs) into ``out``."""
    sp, names, test_ids = ctx.splits, list(ctx.splits.class_names), list(ctx.splits.test)
    loader = handler.loader(subjects, train=False, batch_size=ecfg.train.batch_size)
    log.info("test: %d hold-out subjects, %d model(s) (%s), classes %s", len(test_ids), len(models),
             ", ".join(n for n, *_ in models), names)
    ids, y, raw_per = _predict_all(models, loader, engine.Precision.for_device(device, ecfg.train.amp))
    temps = _temperatures(models)
    # each member is calibrated with its own fold's temperature before the ensemble averages (issue 17)
    cal_per = {n: apply_temperature(p, temps[n]) for n, p in raw_per.items()}
    applied = bool(ecfg.eval.calibrate) and any(t is not None for t in temps.values())
    per_model = cal_per if applied else raw_per
    raw = np.mean([raw_per[n] for n, *_ in models], axis=0)
    probs = np.mean([per_model[n] for n, *_ in models], axis=0)
    # patients, not images, are the independent units: two B-scans of one patient are resampled together
    metrics = _metrics(cfg, y, probs, per_model, names, models, ref, [sp.groups.get(i) or i for i in ids])
    metrics["calibration"] = calibration_block(y, raw, np.mean([cal_per[n] for n, *_ in models], axis=0), temps,
                                               applied)
    raw_cols = raw if applied else None
    p_sd, source = _spread(ecfg, cfg.run.seed, models, loader, engine.Precision.for_device(device, ecfg.train.amp), ids,
                           per_model, temps, applied) if len(names) == 2 else (None, None)
    metrics["uncertainty"], extra = uncertainty_block(models, y, probs, applied, p_sd, source, ecfg)
    tb = tensorboard_writer(out / "tensorboard")
    if dist.is_main():
        _write_outputs(out, tb, ids, y, probs, per_model, names, metrics, raw_cols, extra)
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
        _write_predictions(out, ids, y, probs, names, {k: v["status"] for k, v in cam_report["subjects"].items()},
                           raw=raw_cols, extra=extra)
        _cam_scalars(tb, metrics)
    tb.close()
    return metrics


def _ci_header(b: dict[str, Any]) -> str:
    if not b["resamples"]:
        return "metric (no confidence intervals: --bootstrap 0):"
    return (f"metric (95 % bootstrap CI over {b['n_groups']} {b['unit']}s, stratified by class, {b['resamples']} "
            f"resamples, seed {b['seed']}):")


def print_summary(cfg: Config, m: dict[str, Any], out: Path, n: int) -> None:
    """The CLI summary: headline metrics with CIs, localization, and where the files are."""
    ens = f"ensemble of {len(m['checkpoints'])} folds" if m.get("ensemble") else next(iter(m["checkpoints"].values()))
    lines = [f"Hold-out test of experiment '{cfg.exp_name}': {n} subjects, classes {', '.join(m['class_names'])}"
             + (f" (positive: {m['positive_class']})" if m.get("positive_class") else "")
             + f"; model {m['model']} ({ens})",
             _ci_header(m["bootstrap"])]
    lines += summary_lines(m)
    lines += calibration_summary(m.get("calibration") or {})
    lines += uncertainty_summary(m.get("uncertainty") or {})
    for name, fm in (m.get("folds") or {}).items():
        lines.append(f"  {name}: balanced accuracy {format_metric(fm, 'balanced_accuracy')}, AUC "
                     f"{format_metric(fm, 'auc')}")
    lines += score_lines(m)
    lines += [f"Files in {out}/: metrics.json, predictions.csv, roc.png, confusion_matrix.png, reliability.png, "
              "coverage.png"
              + (f", cams/ ({m['cam']['n_subjects']} subjects: *_cam.nii.gz, *_input_<modality>.nii.gz, *_review.png)"
                 if m.get("cam") else ""),
              f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}"]
    print("\n".join(lines))


def calibration_summary(c: dict[str, Any]) -> list[str]:
    """One line on temperature scaling: the temperature(s), which probabilities were used, ECE raw vs calibrated."""
    if not c:
        return []
    t = c["temperature"]
    ts = (", ".join(f"{n} {v:.2f}" for n, v in t.items() if v is not None) if isinstance(t, dict)
          else f"{t:.2f}" if t is not None else "")
    if not ts:
        return ["  temperature scaling: none (the checkpoint has no temperature; raw probabilities)"]
    used = "calibrated probabilities used (--no-calibrate: raw)" if c["applied"] else "raw probabilities used"
    ece = " → ".join(f"{c[k]['ece']:.3f}" for k in ("raw", "calibrated"))
    return [f"  temperature {ts} (fitted on validation); {used}; ECE raw → calibrated {ece}, NLL "
            + " → ".join(f"{c[k]['nll']:.3f}" for k in ("raw", "calibrated"))]


def uncertainty_summary(u: dict[str, Any]) -> list[str]:
    """One line on per-eye uncertainty: share flagged, error rate flagged vs unflagged, and the spread's source."""
    if not u:
        return []
    sd = (f"; P(positive) sd mean {u['p_sd_mean']:.3f} over {u['p_sd_source']}" if u.get("p_sd_source")
          else "; no spread (single model, --tta 0, --mc-dropout 0)")
    if u.get("threshold") is None:
        return [f"  uncertainty: mean entropy {u['entropy_mean']:.3f} nats; no `uncertain` flag (the checkpoint has "
                f"no validation entropy threshold: re-run --mode train){sd}"]
    return [f"  uncertain (entropy > {u['threshold']:.3f}, {100 * u['coverage']:.0f} % of validation eyes below): "
            f"{u['n_flagged']} eyes ({100 * u['share_flagged']:.0f} %); error rate flagged "
            f"{u['error_rate_flagged']:.3f} vs unflagged {u['error_rate_unflagged']:.3f}{sd}"]
