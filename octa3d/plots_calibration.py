"""Figures of calibration and selective prediction: the reliability diagram and accuracy vs coverage.

Both return a ``matplotlib.figure.Figure`` for :func:`octa3d.plots.save_figure` (PNG) and TensorBoard's
``add_figure``, like the ROC and confusion-matrix figures. The numbers come from :mod:`octa3d.calibration`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from octa3d.plots import plt  # Agg backend selected there (headless)


def reliability_figure(rel: dict[str, Any], ece: float | None = None, raw: dict[str, Any] | None = None,
                       title: str = "Reliability diagram (test)") -> Any:
    """Observed frequency against mean predicted score per equal-mass bin; each bin's subject count below.

    Args:
        rel: :func:`octa3d.calibration.reliability_bins` of the reported probabilities.
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
        curve: :func:`octa3d.calibration.risk_coverage`.
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
