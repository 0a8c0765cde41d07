"""Figures of the test and explain stages (matplotlib, Agg backend): ROC curves, confusion matrix, CAM reviews.

Every function returns a ``matplotlib.figure.Figure`` so that the same figure can go to a PNG file
(:func:`save_figure`, atomic) and to TensorBoard (``SummaryWriter.add_figure``).
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

#: Colour map of CAM overlays (high = important = hot).
CAM_CMAP = "jet"


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
               auc: float | None = None) -> Figure:
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
    title = "ROC (test subjects)"
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


def _scaled(img: np.ndarray) -> np.ndarray:
    """Percentile-stretch an image to 0..1 for display."""
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    return np.clip((img - lo) / max(float(hi - lo), 1e-6), 0, 1)


def _overlay(ax: Any, image: np.ndarray, cam: np.ndarray, title: str, alpha: float = 0.45,
             peak: tuple[float, float] | None = None) -> Any:
    ax.imshow(_scaled(image), cmap="gray", aspect="auto", interpolation="nearest")
    im = ax.imshow(cam, cmap=CAM_CMAP, vmin=0, vmax=1, alpha=alpha * np.clip(cam * 1.5, 0, 1), aspect="auto",
                   interpolation="bilinear")
    if peak is not None:
        ax.plot(peak[1], peak[0], marker="+", c="white", ms=10, mew=1.5)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _suptitle(fig: Figure, title: str, width: int = 140) -> None:
    import textwrap

    fig.suptitle(textwrap.fill(title, width), fontsize=9, y=1.0, va="bottom")


def review_figure_3d(volume: np.ndarray, cam: np.ndarray, depth_axis: int, title: str,
                     mask: np.ndarray | None = None, spacing: Sequence[float] | None = None) -> Figure:
    """En-face maximum projection with the CAM overlaid, plus the two B-scans through the CAM peak.

    Args:
        volume: ``(D0, D1, D2)`` scan in source space (first channel).
        cam: same shape, 0..1.
        depth_axis: the A-scan (depth) axis; the en-face view projects along it.
        title: figure title (subject, true/predicted class, probabilities).
        mask: optional lesion mask (same shape): its en-face outline is drawn.
        spacing: voxel size per array axis (NumPy order); gives the en-face view its physical aspect ratio
            (B-scans keep a stretched depth axis, as OCT viewers show them).

    Returns:
        A figure with three panels: en-face, B-scan across axis ``a``, B-scan across axis ``b`` (depth vertical).
    """
    lateral = [a for a in range(3) if a != depth_axis]
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    # en-face: rows = first lateral axis, columns = second; max projection keeps small bright lesions visible
    enface = volume.max(axis=depth_axis)
    cam_face = cam.max(axis=depth_axis)
    panels = [("en-face (max projection) + CAM (max over depth)", enface, cam_face,
               (peak[lateral[0]], peak[lateral[1]]), None if mask is None else mask.max(axis=depth_axis))]
    for fixed, other in ((lateral[0], lateral[1]), (lateral[1], lateral[0])):
        idx = [slice(None)] * 3
        idx[fixed] = peak[fixed]
        sl_img, sl_cam = volume[tuple(idx)], cam[tuple(idx)]
        # remaining axes in increasing order: transpose so that depth is vertical
        rem = [a for a in range(3) if a != fixed]
        if rem[0] != depth_axis:
            sl_img, sl_cam = sl_img.T, sl_cam.T
        sl_mask = None
        if mask is not None:
            sl_mask = mask[tuple(idx)] if rem[0] == depth_axis else mask[tuple(idx)].T
        panels.append((f"B-scan through the peak (axis {fixed} = {peak[fixed]})", sl_img, sl_cam,
                       (peak[depth_axis], peak[other]), sl_mask))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), dpi=100, gridspec_kw={"width_ratios": [1, 1.2, 1.2]})
    im = None
    for ax, (name, img, c, pk, m) in zip(axes, panels):
        im = _overlay(ax, img, c, name, peak=pk)
        if m is not None and (m > 0).any():
            ax.contour((m > 0).astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    if spacing is not None:
        axes[0].set_aspect(float(spacing[lateral[0]]) / float(spacing[lateral[1]]))
    if mask is not None and mask.any():
        axes[0].set_title(axes[0].get_title() + "\n(green: lesion mask)", fontsize=8)
    fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01, label="CAM (0..1)")
    _suptitle(fig, title)
    return fig


def review_figure_2d(image: np.ndarray, cam: np.ndarray, title: str, mask: np.ndarray | None = None) -> Figure:
    """A 2D image beside the same image with its CAM overlaid.

    Args:
        image: ``(H, W)`` source image (or projection).
        cam: same shape, 0..1.
        title: figure title.
        mask: optional lesion mask (same shape), outlined.
    """
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4.2), dpi=100)
    axes[0].imshow(_scaled(image), cmap="gray", aspect="auto", interpolation="nearest")
    axes[0].set_title("input", fontsize=8)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    im = _overlay(axes[1], image, cam, "CAM overlay", peak=(peak[0], peak[1]))
    if mask is not None and mask.any():
        axes[1].contour((mask > 0).astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    fig.colorbar(im, ax=list(axes), fraction=0.025, pad=0.01, label="CAM (0..1)")
    _suptitle(fig, title, 100)
    return fig


def central_slices(cam: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """Central slices of a 3D CAM (each axis) or a 2D CAM, side by side as an ``(3, H, W)`` RGB image in 0..1
    for TensorBoard; the grey scan (if given) is blended underneath."""
    cmap = plt.get_cmap(CAM_CMAP)

    def rgb(c: np.ndarray, img: np.ndarray | None) -> np.ndarray:
        col = cmap(np.clip(c, 0, 1))[..., :3]
        if img is None:
            return col
        g = _scaled(img)[..., None]
        a = 0.6 * np.clip(c, 0, 1)[..., None]
        return (1 - a) * g + a * col

    if cam.ndim == 2:
        tiles = [rgb(cam, image)]
    else:
        tiles = []
        for ax in range(3):
            idx = [slice(None)] * 3
            idx[ax] = cam.shape[ax] // 2
            tiles.append(rgb(cam[tuple(idx)], None if image is None else image[tuple(idx)]))
    h = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, h - t.shape[0]), (0, 1), (0, 0))) for t in tiles]
    return np.concatenate(padded, axis=1).transpose(2, 0, 1).astype(np.float32)
