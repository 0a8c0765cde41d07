"""How a scan becomes a network input: the deterministic (cacheable) preprocessing.

Deterministic part (cached on disk by :mod:`octa3d.data.datasets`), in this order:

1. **Retinal slab crop** (volumes): :func:`locate_retina` finds the retina along the depth (A-scan) axis from the
   intensity profile; a slab of ``--slab-depth`` is cut around it. The crop happens *before* resizing, so the
   network sees the retina at a useful resolution instead of mostly vitreous and choroid.
2. **Percentile clipping + scaling to 0..1** per channel (uint8 fast path: 256-bin histogram + lookup table).
3. **Resize to the input size** (linear interpolation as ``torch.nn.functional.interpolate``, no antialias,
   ``align_corners=False``). The 3D slab is *stretched* to the input shape (anisotropic scaling) rather than
   padded: padding would waste input voxels, and the anisotropy is the same for every scan of a dataset. A whole
   2D image keeps its aspect ratio: it is padded with zeros to the input's aspect first (:func:`aspect_padding`),
   since 2D datasets mix image sizes (Kermany B-scans of 512×496 and 768×496) that a stretch would distort
   differently.

For volumes, steps 2 and 3 run fused (:func:`clip_scale_resize`): only the source planes the interpolation reads
are converted to float, so a 400×640×400 uint8 scan never gets a full-resolution float copy.

After the cache, every sample a preset cuts is normalised with ``--normalize`` (:class:`Normalized`: ``imagenet``
= ImageNet mean/std, averaged over RGB for 1-2 channels; recorded in the checkpoint's ``preprocess`` settings, so
test/explain/predict normalise the same way).

Everything needed to map an input-space array (a Grad-CAM map) back onto the source scan is kept in a
:class:`PreprocessRecord`; :func:`to_source_space` does the mapping.

This module holds the retina/slab/patch geometry and the MONAI transforms; the clipping and resizing arithmetic is
in :mod:`octa3d.data.scaling`, the record in :mod:`octa3d.data.record` (both re-exported here).

The presets that chain these steps for 3D clips and 2D patches are in :mod:`octa3d.data.presets`; the random
training augmentation applied after the cache is in :mod:`octa3d.data.augment`.

Axis conventions follow :mod:`octa3d.data.subject`: arrays are channel-first ``(C, *spatial)`` and
``depth_axis`` counts *spatial* axes (0..2), so its array axis is ``depth_axis + 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import MapTransform
from scipy.ndimage import gaussian_filter1d

from octa3d.data.record import PreprocessRecord, drop_axis, to_source_space
from octa3d.data.scaling import (channel_percentiles, clip_scale, clip_scale_resize, hist_percentiles,
                                 normalization_stats, normalize, resize, uint8_percentiles)
from octa3d.data.subject import Geometry, Subject

__all__ = ["PREPROCESS_VERSION", "ClipScaleIntensityd", "ClipScaleResized", "ImageReader", "Loader", "Normalized",
           "PreprocessRecord", "ProjectSlabd", "ResizeToInputd", "RetinalSlabCropd", "apply_transforms",
           "aspect_padding", "channel_percentiles", "clip_scale", "clip_scale_resize", "drop_axis",
           "hist_percentiles", "locate_retina", "normalization_stats", "normalize", "patch_grid", "resize",
           "slab_bounds", "to_source_space",
           "uint8_percentiles"]

#: Bump when the deterministic preprocessing changes: it is part of every cache key.
PREPROCESS_VERSION = "1"

Loader = Callable[[Subject, str], tuple[np.ndarray, Geometry]]
ImageReader = Callable[[str], np.ndarray]


# ---------------------------------------------------------------------------------------------- retina, slab, patches
def locate_retina(volume: np.ndarray, depth_axis: int, *, threshold: float = 0.25,
                  max_gap: float = 0.1) -> tuple[int, int]:
    """Find the retina along the depth axis from the mean intensity profile.

    The profile (mean over channels and the lateral axes, on a strided subsample) is smoothed; voxels above
    ``background + threshold * (peak - background)`` count as tissue, with background = the profile's 10th
    percentile (vitreous/deep noise dominate the low end). Above-threshold runs separated by less than
    ``max_gap`` of the depth are merged (dark layers inside the retina), and the run holding the peak is returned.

    Args:
        volume: channel-first array ``(C, *spatial)``.
        depth_axis: spatial axis of the A-scan (0-based, channel axis excluded).
        threshold: fraction of the peak height above background that counts as retina.
        max_gap: largest gap (fraction of the depth) bridged between bright runs.

    Returns:
        ``(start, stop)`` along the depth axis; ``(0, depth)`` (centred) when the profile is flat.
    """
    arr = np.asarray(volume)
    ax = depth_axis + 1
    depth = arr.shape[ax]
    # ~64 positions per lateral axis average >4000 A-scans: plenty for a profile, and fast on 400x640x400 scans.
    sub = arr[tuple(slice(None) if a in (0, ax) else slice(None, None, max(1, arr.shape[a] // 64))
                    for a in range(arr.ndim))]
    profile = sub.mean(axis=tuple(a for a in range(arr.ndim) if a != ax), dtype=np.float32)
    profile = gaussian_filter1d(profile.astype(np.float32), sigma=max(1.0, depth / 100), mode="nearest")
    bg, peak = float(np.percentile(profile, 10)), float(profile.max())
    if not np.isfinite(peak) or peak - bg <= 1e-6 * max(abs(peak), 1.0):
        return 0, depth
    above = np.concatenate([[0], (profile >= bg + threshold * (peak - bg)).astype(np.int8), [0]])
    edges = np.diff(above)
    runs = list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
    merged: list[list[int]] = []
    for s, e in runs:
        if merged and s - merged[-1][1] <= max(1, int(max_gap * depth)):
            merged[-1][1] = e
        else:
            merged.append([s, e])
    p = int(np.argmax(profile))
    s, e = next(r for r in merged if r[0] <= p < r[1])
    return int(s), int(e)


def slab_bounds(depth: int, slab_depth: float, retina: tuple[int, int]) -> tuple[int, int]:
    """Depth range of a slab of ``slab_depth`` centred on ``retina``, clamped inside ``[0, depth)``.

    Args:
        depth: scan depth in voxels.
        slab_depth: ``<= 1``: fraction of ``depth``; ``> 1``: voxels (clamped to ``depth``).
        retina: ``(start, stop)`` from :func:`locate_retina`.
    """
    n = round(slab_depth * depth) if slab_depth <= 1 else round(slab_depth)
    n = min(max(int(n), 1), depth)
    start = int(round((retina[0] + retina[1]) / 2 - n / 2))
    start = min(max(start, 0), depth - n)
    return start, start + n


def patch_grid(shape: Sequence[int], size: int, stride: int = 0) -> list[list[tuple[int, int]]]:
    """Boxes of a regular grid of ``size`` patches covering a 2D image entirely.

    Starts step by ``stride`` (0 = ``size``); the last row/column is aligned to the border so nothing is left
    out (it may overlap its neighbour). An axis shorter than ``size`` gets one patch spanning it.

    Returns:
        ``[[(y0, y1), (x0, x1)], ...]`` in row-major order.
    """
    stride = stride or size
    starts = []
    for n in shape:
        if n <= size:
            starts.append([(0, n)])
            continue
        s = list(range(0, n - size + 1, stride))
        if s[-1] + size < n:
            s.append(n - size)
        starts.append([(a, a + size) for a in s])
    return [[ry, rx] for ry in starts[0] for rx in starts[1]]


def aspect_padding(shape: Sequence[int], target: Sequence[int]) -> list[tuple[int, int]]:
    """Zeros to add around an image of ``shape`` so that it has the aspect ratio of ``target`` (centred).

    The padded shape is the smallest one with ``target``'s proportions that holds the image, so resizing it to
    ``target`` scales every axis by the same factor (up to rounding to whole pixels).

    Args:
        shape: spatial shape of the image, e.g. ``(496, 768)``.
        target: spatial shape of the network input, e.g. ``(224, 224)``.

    Returns:
        ``(before, after)`` per axis, e.g. ``[(136, 136), (0, 0)]``; all zeros when the aspects already agree.
    """
    scale = max(s / t for s, t in zip(shape, target))  # source pixels per input pixel along the tightest axis
    padded = [max(int(s), int(round(t * scale))) for s, t in zip(shape, target)]
    return [((p - s) // 2, p - s - (p - s) // 2) for s, p in zip(shape, padded)]



# ---------------------------------------------------------------------------------------------- MapTransforms
class RetinalSlabCropd(MapTransform):
    """Crop a fixed-depth slab centred on the retina (located on the first key); other axes are kept.

    Adds ``box_key`` (``(start, stop)`` per spatial axis) and ``retina_key`` to the dictionary.
    """

    def __init__(self, keys: Any, depth_axis: int, slab_depth: float, box_key: str = "crop_box",
                 retina_key: str = "retina", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.depth_axis, self.slab_depth = depth_axis, slab_depth
        self.box_key, self.retina_key = box_key, retina_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ref = d[self.first_key(d)]
        retina = locate_retina(ref, self.depth_axis)
        start, stop = slab_bounds(ref.shape[self.depth_axis + 1], self.slab_depth, retina)
        for key in self.key_iterator(d):
            sl = [slice(None)] * d[key].ndim
            sl[self.depth_axis + 1] = slice(start, stop)
            # a view, not a copy: the histogram and the gathers of clip_scale_resize read it block by block
            d[key] = d[key][tuple(sl)]
        box = [(0, int(n)) for n in ref.shape[1:]]
        box[self.depth_axis] = (start, stop)
        d[self.box_key], d[self.retina_key] = box, retina
        return d


class ProjectSlabd(MapTransform):
    """En-face projection: mean along the depth axis (float32), ``(C, S, D, W) -> (C, S, W)`` for depth 1."""

    def __init__(self, keys: Any, depth_axis: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.depth_axis = depth_axis

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key].mean(axis=self.depth_axis + 1, dtype=np.float32)
        return d


class ClipScaleIntensityd(MapTransform):
    """Per-channel percentile clipping and scaling to 0..1 float32 (:func:`clip_scale`).

    Adds ``stats_key``: the per-channel ``(low, high)`` of the first key.
    """

    def __init__(self, keys: Any, percentiles: Sequence[float], stats_key: str = "intensity",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.percentiles, self.stats_key = tuple(percentiles), stats_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for i, key in enumerate(self.key_iterator(d)):
            d[key], used = clip_scale(d[key], self.percentiles)
            if i == 0:
                d[self.stats_key] = used
        return d


class ResizeToInputd(MapTransform):
    """Resize to the network input size (:func:`resize`: linear, anisotropic stretch; pad first with
    :func:`aspect_padding` to keep the aspect ratio, as :class:`~octa3d.data.presets.Patch2DPreset` does)."""

    def __init__(self, keys: Any, spatial_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(spatial_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = resize(d[key], self.spatial_size)
        return d


class ClipScaleResized(MapTransform):
    """:class:`ClipScaleIntensityd` + :class:`ResizeToInputd` in one pass (:func:`clip_scale_resize`): the same
    output without a full-resolution float copy. Adds ``stats_key`` like :class:`ClipScaleIntensityd`."""

    def __init__(self, keys: Any, percentiles: Sequence[float], spatial_size: Sequence[int],
                 stats_key: str = "intensity", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.percentiles, self.spatial_size, self.stats_key = tuple(percentiles), tuple(spatial_size), stats_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for i, key in enumerate(self.key_iterator(d)):
            d[key], used = clip_scale_resize(d[key], self.percentiles, self.spatial_size)
            if i == 0:
                d[self.stats_key] = used
        return d


class Normalized(MapTransform):
    """``--normalize``: per-channel ``(x - mean) / std`` of a 0..1 input (``inverse``: back to 0..1).

    Not part of the cached preprocessing: presets apply it to every sample they cut (:meth:`sample`), and wrap the
    training augmentation in inverse/forward steps so that augmentation still works on 0..1 values (zero padding
    stays black, intensity changes stay relative to 0).
    """

    def __init__(self, keys: Any, mean: Sequence[float], std: Sequence[float], inverse: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mean, self.std, self.inverse = tuple(mean), tuple(std), inverse

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = normalize(d[key], self.mean, self.std, self.inverse)
        return d


def apply_transforms(transforms: Sequence[Callable], data: dict) -> dict:
    """Apply ``transforms`` to ``data`` in order and return the result.

    A plain loop, not MONAI ``Compose``: Compose re-raises every error as RuntimeError, hiding DataError.
    """
    for t in transforms:
        data = t(data)
    return data
