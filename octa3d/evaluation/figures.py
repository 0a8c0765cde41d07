"""Figures of a scored cohort: ROC curves, confusion matrices, the reliability diagram and accuracy vs coverage.

Each returns a ``matplotlib.figure.Figure`` so that the same figure can go to a PNG file (:func:`save_figure`,
atomic) and to TensorBoard (``SummaryWriter.add_figure``). The numbers come from :mod:`octa3d.evaluation.metrics`
and :mod:`octa3d.evaluation.calibration`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI machines / clusters

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from octa3d.utils.io import atomic_path  # noqa: E402


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically and close it.

    Args:
        fig: the figure.
        path: destination ``.png``.
        dpi: resolution.

    Returns:
        The path written.
    """
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def roc_figure(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
               auc: float | None = None, cohort: str = "test") -> Figure:
    """ROC curve(s) from probabilities: binary = P(class 1); multi-class = one-vs-rest per class.

    Args:
        y_true: ``(N,)`` class indices.
        probs: ``(N, K)`` probabilities.
        class_names: the K class names.
        auc: the headline AUC to print in the title (optional).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=100)
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="chance")
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    for c in classes:
        pos = y_true == c
        if pos.all() or not pos.any():
            continue  # undefined: this class is absent (or alone) in the test set
        fpr, tpr, _ = roc_curve(pos.astype(int), probs[:, c])
        a = roc_auc_score(pos.astype(int), probs[:, c])
        label = f"{class_names[c]} vs rest" if len(classes) > 1 else f"{class_names[1]} (positive)"
        ax.plot(fpr, tpr, lw=1.8, label=f"{label}: AUC {a:.3f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    title = f"ROC ({cohort} subjects)"
    if auc is not None and np.isfinite(auc):
        title += f", AUC {auc:.3f}" + (" (OvR macro)" if len(classes) > 1 else "")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _draw_confusion(ax: Any, cm: np.ndarray, class_names: Sequence[str], title: str) -> None:
    k = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}\n{100 * frac[i, j]:.0f}%", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_title(title, fontsize=10)


def confusion_figure(cm: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix (test)"
                     ) -> Figure:
    """Confusion matrix (rows = true, columns = predicted) with counts and row percentages."""
    return confusion_figures({title: cm}, class_names)


def confusion_figures(cms: dict[str, np.ndarray], class_names: Sequence[str]) -> Figure:
    """Several confusion matrices side by side (e.g. fp32 vs int8), titled by their keys."""
    k = len(class_names)
    fig, axes = plt.subplots(1, len(cms), figsize=(len(cms) * (1.6 + 0.9 * k), 1.3 + 0.8 * k), dpi=100,
                             squeeze=False)
    for ax, (title, cm) in zip(axes[0], cms.items()):
        _draw_confusion(ax, np.asarray(cm), class_names, title)
    fig.tight_layout()
    return fig


def reliability_figure(rel: dict[str, Any], ece: float | None = None, raw: dict[str, Any] | None = None,
                       title: str = "Reliability diagram (test)") -> Any:
    """Observed frequency against mean predicted score per equal-mass bin; each bin's subject count below.

    Args:
        rel: :func:`octa3d.evaluation.calibration.reliability_bins` of the reported probabilities.
        ece: the ECE printed in the legend.
        raw: the bins of the uncalibrated probabilities, drawn dashed for comparison (None: not drawn).
        title: figure title.

    Returns:
        The figure: points on the diagonal are calibrated; below it the model is over-confident.
    """
    # counts in a panel of their own (as in the usual reliability plot): labels on the points overlap when bins sit
    # close together, which is exactly the case of a confident model
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.2, 5.6), sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    binary = rel.get("kind") == "positive"
    if raw and raw.get("mean_score"):
        ax.plot(raw["mean_score"], raw["observed"], "s--", color="tab:orange", alpha=0.7, markersize=4,
                label="uncalibrated")
    label = "calibrated" if raw else "model"
    if ece is not None and np.isfinite(ece):
        label += f" (ECE {ece:.3f})"
    xs, ys, counts = rel.get("mean_score", []), rel.get("observed", []), rel.get("count", [])
    ax.plot(xs, ys, "o-", color="tab:blue", label=label)
    hist.bar(xs, counts, width=0.02, color="tab:blue")
    for x, n in zip(xs, counts):
        hist.annotate(str(n), (x, n), textcoords="offset points", xytext=(0, 1), ha="center", fontsize=7)
    hist.set_ylabel("subjects", fontsize=8)
    hist.set_ylim(0, max(counts, default=1) * 1.4)
    hist.set_xlabel("mean predicted P(positive)" if binary else "mean confidence (max probability)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("observed positive rate" if binary else "observed accuracy")
    ax.set_title(f"{title}\n{len(xs)} equal-mass bins")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def coverage_figure(curve: dict[str, np.ndarray], aurc: float | None = None, coverage: float = 0.9,
                    title: str = "Selective prediction (test)") -> Any:
    """Accuracy and balanced accuracy of the most confident subjects against the share kept (coverage).

    Args:
        curve: :func:`octa3d.evaluation.calibration.risk_coverage`.
        aurc: the area under the risk-coverage curve, shown in the title.
        coverage: the coverage marked with a vertical line (the one quoted in the summary).
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4))
    cov = np.asarray(curve.get("coverage", []))
    ax.plot(cov, curve.get("accuracy", []), label="accuracy", color="tab:blue", linewidth=2.5)
    ax.plot(cov, curve.get("balanced_accuracy", []), "--", label="balanced accuracy", color="tab:green")
    ax.axvline(coverage, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of subjects kept, most confident first)")
    ax.set_ylabel("score on the kept subjects")
    ax.set_title(title + (f"\nAURC {aurc:.3f} (risk = error rate)" if aurc is not None and np.isfinite(aurc)
                          else ""))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig
