"""The study's figures: a forest plot of differences against the reference arm, ROC curves of every arm (pooled
out-of-fold and hold-out), and every fold's value per arm (dots with the mean and its interval)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sklearn.metrics import auc as area, roc_curve

from octa3d.evaluation.figures import plt, save_figure
from octa3d.studies.results import ArmData

#: Forest-plot panels: (test, metric, label) of the rows compared with the reference.
FOREST = (("paired bootstrap", "balanced_accuracy", "balanced accuracy"), ("DeLong", "auc", "AUC"))
POPULATIONS = {"oof": "out-of-fold", "holdout": "hold-out"}


def forest_figure(rows: list[dict[str, Any]], reference: str, arms: list[str]) -> Any:
    """Differences (arm - reference) with their CIs: one panel per :data:`FOREST` metric, out-of-fold and hold-out
    side by side for each arm; a marker is filled when the Holm-adjusted p is below 0.05."""
    panels = [(t, m, lab) for t, m, lab in FOREST if any(r["test"] == t and r["metric"] == m for r in rows)]
    others = [a for a in arms if a != reference and any(r["a"] == a and r["vs_reference"] for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 0.6 * len(others) + 1.8),
                             squeeze=False)
    for ax, (test, metric, label) in zip(axes[0], panels):
        for j, (pop, colour) in enumerate((("oof", "tab:blue"), ("holdout", "tab:orange"))):
            for i, arm in enumerate(others):
                hit = [r for r in rows if r["a"] == arm and r["vs_reference"] and r["test"] == test
                       and r["metric"] == metric and r["population"] == pop]
                if not hit:
                    continue
                r = hit[0]
                yy = len(others) - 1 - i + (0.15 if j == 0 else -0.15)
                ax.plot([r["ci_low"], r["ci_high"]], [yy, yy], color=colour, lw=2)
                filled = math.isfinite(r.get("p_holm", math.nan)) and r["p_holm"] < 0.05
                ax.plot(r["estimate"], yy, "o", color=colour, mfc=colour if filled else "white", ms=7,
                        label=POPULATIONS[pop] if i == 0 else None)
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.set_yticks(range(len(others)), list(reversed(others)))
        ax.set_ylim(-0.7, len(others) - 0.3)
        ax.set_xlabel(f"difference in {label} (arm - {reference})")
        ax.set_title(f"{label}: {test}")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Differences vs the reference arm, 95 % CI (filled: Holm-adjusted p < 0.05)", fontsize=10)
    fig.tight_layout()
    return fig


def roc_figure(arms: dict[str, ArmData], order: list[str]) -> Any:
    """ROC curves (P(positive class)) of every arm: pooled out-of-fold and hold-out panels."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, (pop, title) in zip(axes, POPULATIONS.items()):
        for name in order:
            p = getattr(arms[name], pop)
            if p is None or len(set(p.y.tolist())) < 2:
                continue
            fpr, tpr, _ = roc_curve(p.y, p.probs[:, 1])
            auc = float(area(fpr, tpr))
            ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"ROC, {title}")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def folds_figure(summaries: dict[str, dict[str, Any]], order: list[str],
                 metrics: tuple[str, ...] = ("balanced_accuracy", "auc", "f1_macro")) -> Any:
    """Every fold's value per arm (dots), with the mean and its t interval (bar)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.45 * len(order) + 1.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, name in enumerate(order):
            s = summaries[name]
            yy = len(order) - 1 - i
            vals = [v for v in s["fold_values"].get(metric, []) if math.isfinite(v)]
            ax.plot(vals, [yy] * len(vals), "o", color="tab:blue", alpha=0.6, ms=5)
            ci = s["fold"].get(metric) or {}
            if math.isfinite(ci.get("low", math.nan)):
                ax.plot([ci["low"], ci["high"]], [yy - 0.2] * 2, color="black", lw=1.5)
            if math.isfinite(ci.get("mean", math.nan)):
                ax.plot(ci["mean"], yy - 0.2, "|", color="black", ms=10)
        ax.set_yticks(range(len(order)), list(reversed(order)))
        ax.set_ylim(-0.7, len(order) - 0.3)
        ax.set_xlabel(metric.replace("_", " "))
    fig.suptitle("Per-fold values (dots) and mean with 95 % t interval (bar)", fontsize=10)
    fig.tight_layout()
    return fig


def write_figures(folder: Path, arms: dict[str, ArmData], summaries: dict[str, dict[str, Any]],
                  rows: list[dict[str, Any]], order: list[str], reference: str, binary: bool) -> list[Path]:
    """``figures/forest.png``, ``roc.png`` (binary tasks), ``folds.png``; returns those written."""
    out = []
    if any(r["vs_reference"] for r in rows):
        out.append(save_figure(forest_figure(rows, reference, order), folder / "forest.png"))
    if binary and any(arms[n].oof is not None for n in order):
        out.append(save_figure(roc_figure(arms, order), folder / "roc.png"))
    if any(s["fold_values"] for s in summaries.values()):
        out.append(save_figure(folds_figure(summaries, order), folder / "folds.png"))
    return out
