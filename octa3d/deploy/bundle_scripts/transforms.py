"""The octa3d preprocessing step MONAI has no stock transform for: the retinal slab crop.

Copied into an exported MONAI bundle as ``scripts/transforms.py`` (the bundle root is on ``sys.path`` while
``python -m monai.bundle run`` runs), so it must not import octa3d: NumPy, PyTorch and MONAI only. It reproduces
``octa3d.data.transforms.locate_retina`` / ``slab_bounds`` (tests/stages/test_export.py checks it against them).

Along the depth (A-scan) axis the mean intensity profile is smoothed; voxels above
``background + 0.25 * (peak - background)`` count as tissue (background: the profile's 10th percentile); bright
runs closer than 10 % of the depth are merged, the run holding the peak is the retina, and a slab of
``slab_depth`` (fraction of the depth when <= 1, else voxels) is cut centred on it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, SpatialCrop


def gaussian_smooth(profile: np.ndarray, sigma: float) -> np.ndarray:
    """1D Gaussian filter with edge ("nearest") padding, as ``scipy.ndimage.gaussian_filter1d`` (truncate 4)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    weights /= weights.sum()
    padded = np.pad(profile.astype(np.float64), radius, mode="edge")
    return np.correlate(padded, weights, mode="valid").astype(np.float32)


def locate_retina(volume: np.ndarray, depth_axis: int, threshold: float = 0.25,
                  max_gap: float = 0.1) -> tuple[int, int]:
    """``(start, stop)`` of the retina along spatial axis ``depth_axis`` of a channel-first volume."""
    arr = np.asarray(volume)
    ax = depth_axis + 1
    depth = arr.shape[ax]
    # the same strided subsample as octa3d (about 64 positions per lateral axis)
    sub = arr[tuple(slice(None) if a in (0, ax) else slice(None, None, max(1, arr.shape[a] // 64))
                    for a in range(arr.ndim))]
    profile = sub.mean(axis=tuple(a for a in range(arr.ndim) if a != ax), dtype=np.float32)
    profile = gaussian_smooth(profile.astype(np.float32), max(1.0, depth / 100))
    bg, peak = float(np.percentile(profile, 10)), float(profile.max())
    if not np.isfinite(peak) or peak - bg <= 1e-6 * max(abs(peak), 1.0):
        return 0, depth
    above = np.concatenate([[0], (profile >= bg + threshold * (peak - bg)).astype(np.int8), [0]])
    edges = np.diff(above)
    merged: list[list[int]] = []
    for s, e in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
        if merged and s - merged[-1][1] <= max(1, int(max_gap * depth)):
            merged[-1][1] = e
        else:
            merged.append([s, e])
    p = int(np.argmax(profile))
    s, e = next(r for r in merged if r[0] <= p < r[1])
    return int(s), int(e)


def slab_bounds(depth: int, slab_depth: float, retina: tuple[int, int]) -> tuple[int, int]:
    """Depth range of a slab of ``slab_depth`` centred on ``retina``, clamped inside ``[0, depth)``."""
    n = round(slab_depth * depth) if slab_depth <= 1 else round(slab_depth)
    n = min(max(int(n), 1), depth)
    start = int(round((retina[0] + retina[1]) / 2 - n / 2))
    start = min(max(start, 0), depth - n)
    return start, start + n


class RetinalSlabCropd(MapTransform):
    """Crop a slab of ``slab_depth`` centred on the retina along ``depth_axis`` (a spatial axis, 0-based) with
    MONAI's :class:`~monai.transforms.SpatialCrop` (the affine follows the crop); the other axes are kept.

    Adds ``<key>_slab`` (``[start, stop]``) and ``<key>_retina`` to the dictionary.
    """

    def __init__(self, keys: Any, depth_axis: int, slab_depth: float, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.depth_axis, self.slab_depth = int(depth_axis), float(slab_depth)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            retina = locate_retina(arr, self.depth_axis)
            start, stop = slab_bounds(arr.shape[self.depth_axis + 1], self.slab_depth, retina)
            roi_start = [0] * (arr.ndim - 1)
            roi_end = list(arr.shape[1:])
            roi_start[self.depth_axis], roi_end[self.depth_axis] = start, stop
            d[key] = SpatialCrop(roi_start=roi_start, roi_end=roi_end)(img)
            d[f"{key}_slab"], d[f"{key}_retina"] = [start, stop], list(retina)
        return d
