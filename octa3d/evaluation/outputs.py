"""The files of a test folder (``test/`` or ``test-external/<name>/``) and the CLI summary of its metrics.

``predictions.csv`` (and ``predictions_fold-k.csv`` of an ensemble), ``roc.png``, ``confusion_matrix.png``,
``reliability.png``, ``coverage.png`` and the same figures and scalars in TensorBoard; :func:`print_summary` prints
the headline metrics with their CIs. :mod:`octa3d.evaluation` computes what these write.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from octa3d.cam import score_lines
from octa3d.evaluation.calibration import reliability_bins, risk_coverage
from octa3d.evaluation.figures import confusion_figure, coverage_figure, reliability_figure, roc_figure, save_figure
from octa3d.evaluation.ood_check import summary_line
from octa3d.evaluation.metrics import CI_METRICS, chance_lines, format_metric, predictions_frame, summary_lines
from octa3d.utils.io import atomic_write_csv

__all__ = ["calibration_summary", "cam_scalars", "print_summary", "uncertainty_summary", "write_outputs",
           "write_predictions"]


def write_predictions(out: Path, ids: list[str], y: np.ndarray, probs: np.ndarray, names: list[str],
                      cam_status: dict[str, str] | None = None, raw: np.ndarray | None = None,
                      extra: dict[str, np.ndarray] | None = None, name: str = "predictions.csv") -> None:
    """predictions.csv (or ``name``), with ``p_raw_<class>`` columns (uncalibrated) when ``probs`` are
    temperature-scaled and a ``cam_status`` column once maps were made (``not computed`` for the others)."""
    frame = predictions_frame(ids, y, probs, names)
    if raw is not None:
        for c, n in enumerate(names):
            frame.insert(frame.columns.get_loc("prediction"), f"p_raw_{n}", np.round(raw[:, c], 6))
    for k, v in (extra or {}).items():
        frame[k] = v
    if cam_status is not None:
        frame["cam_status"] = [cam_status.get(i, "not computed") for i in ids]
    atomic_write_csv(out / name, frame)


def write_outputs(out: Path, tb: Any, ids: list[str], y: np.ndarray, probs: np.ndarray,
                  per_model: dict[str, np.ndarray], names: list[str], metrics: dict[str, Any],
                  raw: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None,
                  cohort: str = "test", cam_status: dict[str, str] | None = None) -> None:
    """predictions CSV(s) (with ``cam_status`` once maps were made), ROC, confusion-matrix, reliability and
    coverage PNGs, and the same in TensorBoard."""
    write_predictions(out, ids, y, probs, names, cam_status, raw=raw, extra=extra)
    if len(per_model) > 1:
        for n, p in per_model.items():
            atomic_write_csv(out / f"predictions_{n}.csv", predictions_frame(ids, y, p, names))
    cm = np.asarray(metrics["confusion_matrix"])
    # figure titles name the cohort ("test" or "external"): the PNGs travel into papers and slides alone
    save_figure(roc_figure(y, probs, names, metrics["auc"], cohort), out / "roc.png")
    save_figure(confusion_figure(cm, names, f"Confusion matrix ({cohort})"), out / "confusion_matrix.png")
    tb.add_figure("test/roc", roc_figure(y, probs, names, metrics["auc"], cohort), 0)
    tb.add_figure("test/confusion_matrix", confusion_figure(cm, names, f"Confusion matrix ({cohort})"), 0)
    raw_bins = reliability_bins(y, raw, metrics["ece_bins"]) if raw is not None and len(y) else None
    # entropy ranks the eyes when known (the same order as max probability for two classes)
    curve = risk_coverage(y, probs, confidence=-extra["entropy"] if extra else None)
    for tag, make in (("reliability", lambda: reliability_figure(metrics["reliability"], metrics["ece"], raw_bins,
                                                                  title=f"Reliability diagram ({cohort})")),
                      ("coverage", lambda: coverage_figure(curve, metrics["aurc"],
                                                           title=f"Selective prediction ({cohort})"))):
        save_figure(make(), out / f"{tag}.png")
        tb.add_figure(f"test/{tag}", make(), 0)
    for k in CI_METRICS:
        if k in metrics and metrics[k] is not None and math.isfinite(metrics[k]):
            tb.add_scalar(f"test/{k}", metrics[k], 0)
            ci = metrics["ci95"].get(k)
            if ci and all(math.isfinite(c) for c in ci):
                tb.add_scalar(f"test/{k}_ci_low", ci[0], 0)
                tb.add_scalar(f"test/{k}_ci_high", ci[1], 0)


def cam_scalars(tb: Any, metrics: dict[str, Any]) -> None:
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


def _ci_header(b: dict[str, Any]) -> str:
    if not b["resamples"]:
        return "metric (no confidence intervals: --bootstrap 0):"
    return (f"metric (95 % bootstrap CI over {b['n_groups']} {b['unit']}s, stratified by class, {b['resamples']} "
            f"resamples, seed {b['seed']}):")


def print_summary(exp: str, m: dict[str, Any], out: Path, n: int, title: str | None = None) -> None:
    """The CLI summary: headline metrics with CIs, localization, and where the files are.

    Args:
        exp: the experiment's name.
        m: the metrics (``metrics.json``).
        out: the folder holding the files.
        n: how many subjects were scored.
        title: what was scored (default: the experiment's hold-out test).
    """
    ens = f"ensemble of {len(m['checkpoints'])} folds" if m.get("ensemble") else next(iter(m["checkpoints"].values()))
    head = title or f"Hold-out test of experiment '{exp}'"
    lines = [f"{head}: {n} subjects, classes {', '.join(m['class_names'])}"
             + (f" (positive: {m['positive_class']})" if m.get("positive_class") else "")
             + f"; model {m['model']} ({ens})",
             _ci_header(m["bootstrap"])]
    lines += summary_lines(m)
    lines += chance_lines(m)
    lines += calibration_summary(m.get("calibration") or {})
    lines += uncertainty_summary(m.get("uncertainty") or {})
    ood_line = summary_line(m.get("ood") or {})
    lines += [ood_line] if ood_line else []
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
    return [f"  uncertain (entropy > {u['threshold']:.3f}, {100 * u['coverage']:.0f} % of validation eyes below; or out "
            "of distribution): "
            f"{u['n_flagged']} eyes ({100 * u['share_flagged']:.0f} %); error rate flagged "
            f"{u['error_rate_flagged']:.3f} vs unflagged {u['error_rate_unflagged']:.3f}{sd}"]
