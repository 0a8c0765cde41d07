"""Faithfulness of an evidence map without lesion truth: deletion and insertion curves (Petsiuk et al. 2018).

Voxels are removed from the network input (deletion: set to 0) or revealed on a blurred copy (insertion) in order
of map value, in :data:`STEPS` equal steps; the explained class's probability is tracked and its area under the
curve (x = fraction of voxels, 0..1) reported. A faithful map makes the probability fall fast when deleting (low
deletion AUC) and rise fast when inserting (high insertion AUC). The same deletion in a random order (seeded) is
the reference: a map is informative when its deletion AUC is below the random one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Steps of the deletion / insertion curves (forward passes per curve: STEPS + 1).
STEPS = 16
DEFINITION = ("deletion_auc / insertion_auc: area under the explained class's probability while the network "
              f"input's voxels are set to 0 / revealed on a blurred copy in order of map value ({STEPS} steps, "
              "x = fraction of voxels 0..1); deletion_auc_random: the same deletion in a random order. Lower "
              "deletion and higher insertion = more faithful.")


def _blurred(x: torch.Tensor) -> torch.Tensor:
    """A strongly blurred copy (1/8 resolution, upsampled): the insertion canvas without the details."""
    size = tuple(int(s) for s in x.shape[2:])
    small = tuple(max(1, s // 8) for s in size)
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(F.adaptive_avg_pool3d(x, small) if x.ndim == 5 else F.adaptive_avg_pool2d(x, small),
                         size=size, mode=mode, align_corners=False)


@torch.no_grad()
def _curve(models: Sequence[torch.nn.Module], x: torch.Tensor, order: torch.Tensor, target: int, insert: bool,
           canvas: torch.Tensor) -> np.ndarray:
    """Probability of ``target`` after each step, averaged over the samples (patches) and models."""
    p, n = x.shape[0], order.shape[1]
    probs = []
    for k in range(STEPS + 1):
        count = round(n * k / STEPS)
        keep = torch.zeros(p, n, dtype=torch.bool, device=x.device)
        keep.scatter_(1, order[:, :count], True)  # the first `count` voxels in map order
        keep = keep.reshape(p, 1, *x.shape[2:])
        xs = torch.where(keep, x, canvas) if insert else torch.where(keep, torch.zeros_like(x), x)
        probs.append(float(np.mean([torch.softmax(m.eval()(xs).float(), 1)[:, target].mean().item()
                                    for m in models])))
    return np.asarray(probs)


def deletion_insertion(models: Sequence[torch.nn.Module], samples: np.ndarray, maps: np.ndarray, target: int,
                       device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """Deletion / insertion AUCs of one subject.

    Args:
        models: the classifier(s) (an ensemble's probabilities are averaged).
        samples: ``(P, C, *S)`` network inputs of the subject (P patches, or 1).
        maps: ``(P, *S)`` their maps (0..1).
        target: the explained class.
        device: where the models are.
        seed: seed of the random-order reference.
    """
    x = torch.from_numpy(np.asarray(samples, np.float32)).to(device)
    m = torch.from_numpy(np.asarray(maps, np.float32)).reshape(x.shape[0], -1).to(device)
    order = torch.argsort(m, dim=1, descending=True, stable=True)
    g = torch.Generator().manual_seed(int(seed))
    rand = torch.stack([torch.randperm(m.shape[1], generator=g) for _ in range(m.shape[0])]).to(device)
    canvas = _blurred(x)
    xs = np.linspace(0.0, 1.0, STEPS + 1)
    dele = _curve(models, x, order, target, False, canvas)
    ins = _curve(models, x, order, target, True, canvas)
    ref = _curve(models, x, rand, target, False, canvas)
    return {"deletion_auc": float(np.trapezoid(dele, xs)), "insertion_auc": float(np.trapezoid(ins, xs)),
            "deletion_auc_random": float(np.trapezoid(ref, xs))}


def summarize(rows: dict[str, dict[str, float]]) -> dict[str, object]:
    """Means over subjects, with the definition and the per-subject values."""
    keys = ("deletion_auc", "insertion_auc", "deletion_auc_random")
    return {"definition": DEFINITION, "n": len(rows),
            **{k: float(np.mean([r[k] for r in rows.values()])) for k in keys}, "per_subject": rows}
