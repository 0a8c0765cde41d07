"""How a scan becomes a network input: the deterministic (cacheable) preprocessing.

Deterministic part (cached on disk by :mod:`octa3d.data.datasets`), in this order:

1. **Retinal slab crop** (volumes): :func:`locate_retina` finds the retina along the depth (A-scan) axis from the
   intensity profile; a slab of ``--slab-depth`` is cut around it. The crop happens *before* resizing, so the
   network sees the retina at a useful resolution instead of mostly vitreous and choroid.
2. **Percentile clipping + scaling to 0..1** per channel (uint8 fast path: 256-bin histogram + lookup table).
3. **Resize to the input size** (linear interpolation as ``torch.nn.functional.interpolate``, no antialias,
   ``align_corners=False``). The slab is *stretched* to the input shape (anisotropic scaling) rather than padded:
   padding would waste input voxels, and the anisotropy is the same for every scan of a dataset.

For volumes, steps 2 and 3 run fused (:func:`clip_scale_resize`): only the source planes the interpolation reads
are converted to float, so a 400×640×400 uint8 scan never gets a full-resolution float copy.

Everything needed to map an input-space array (a Grad-CAM map) back onto the source scan is kept in a
:class:`PreprocessRecord`; :func:`to_source_space` does the mapping.

The presets that chain these steps for 3D clips and 2D patches are in :mod:`octa3d.data.presets`; the random
training augmentation applied after the cache is in :mod:`octa3d.data.augment`.

Axis conventions follow :mod:`octa3d.data.subject`: arrays are channel-first ``(C, *spatial)`` and
``depth_axis`` counts *spatial* axes (0..2), so its array axis is ``depth_axis + 1``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform
from scipy.ndimage import gaussian_filter1d

from octa3d.data.subject import Geometry, Subject

log = logging.getLogger("octa3d.data")

#: Bump when the deterministic preprocessing changes: it is part of every cache key.
PREPROCESS_VERSION = "1"

_CHUNK = 1 << 22  # elements per pass in the uint8 paths: bounds the intp temporaries numpy makes to ~32 MB
_BLOCK_BYTES = 16 << 20  # float32 bytes of gathered source planes per block of clip_scale_resize's first pass
_PERCENTILE_SAMPLES = 2_000_000  # float input: percentiles from a strided subsample of about this many voxels

Loader = Callable[[Subject, str], tuple[np.ndarray, Geometry]]
ImageReader = Callable[[str], np.ndarray]


# ---------------------------------------------------------------------------------------------- array functions
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


def hist_percentiles(counts: np.ndarray, q: Sequence[float]) -> list[float]:
    """Percentiles of the data behind a histogram of integer values, identical to ``np.percentile`` (linear).

    Args:
        counts: ``counts[v]`` = number of voxels of value ``v``.
        q: percentiles in 0..100.
    """
    cdf = np.cumsum(counts)
    n = int(cdf[-1])
    out = []
    for p in q:
        r = p / 100 * (n - 1)
        k = int(np.floor(r))
        # sorted[k] is the first value whose cumulative count exceeds k
        v0 = int(np.searchsorted(cdf, k, side="right"))
        v1 = int(np.searchsorted(cdf, min(k + 1, n - 1), side="right"))
        out.append(v0 + (r - k) * (v1 - v0))
    return out


def uint8_percentiles(channel: np.ndarray, q: Sequence[float]) -> list[float]:
    """Exact percentiles of a uint8 array from a 256-bin histogram (no sort, no float copy).

    Counts blocks of about ``_CHUNK`` voxels along the first axis with ``torch.bincount`` (several times faster
    than ``np.bincount``, which widens uint8 to intp); a non-contiguous view (a slab crop) is copied one block at
    a time, never whole.
    """
    x = np.asarray(channel)
    if x.ndim == 0 or x.size == 0:
        raise ValueError("percentiles of an empty array")
    x = x.reshape(1, -1) if x.ndim == 1 else x
    rows = max(1, _CHUNK // max(1, x[0].size))
    counts = torch.zeros(256, dtype=torch.int64)
    for i in range(0, x.shape[0], rows):
        block = torch.from_numpy(np.ascontiguousarray(x[i:i + rows]).reshape(-1))
        counts += torch.bincount(block, minlength=256)
    return hist_percentiles(counts.numpy(), q)


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """In place: ``clip((x - lo) / (hi - lo), 0, 1)``; a constant input (hi <= lo) becomes zeros."""
    x -= np.float32(lo)
    x *= np.float32(1.0 / (hi - lo) if hi > lo else 0.0)
    np.clip(x, 0.0, 1.0, out=x)
    return x


def channel_percentiles(x: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` clip values of one channel: exact histogram percentiles for uint8, else ``np.percentile``
    on a strided subsample of about ``_PERCENTILE_SAMPLES`` voxels."""
    if x.dtype == np.uint8:
        lo, hi = uint8_percentiles(x, percentiles)
    else:
        step = max(1, int(np.ceil((x.size / _PERCENTILE_SAMPLES) ** (1 / x.ndim))))
        sample = np.asarray(x[(slice(None, None, step),) * x.ndim], dtype=np.float32)
        lo, hi = (float(v) for v in np.percentile(sample, list(percentiles)))
    return float(lo), float(hi)


def _to_unit(x: np.ndarray, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` clipped at ``lo``/``hi`` and scaled to 0..1 as a new (or ``out``) float32 array.

    uint8: a 256-entry lookup table applied with ``np.take`` in blocks (no float64, no intp copy of the input);
    other dtypes: a float32 copy scaled in place.
    """
    out = np.empty(x.shape, np.float32) if out is None else out
    if x.dtype == np.uint8:
        lut = _ramp(np.arange(256, dtype=np.float32), lo, hi)
        src, dst = np.ascontiguousarray(x).reshape(-1), out.reshape(-1)
        for i in range(0, src.size, _CHUNK):
            # mode="wrap" is a no-op for uint8 indices but takes numpy's fast path (mode="clip" is ~10x slower)
            np.take(lut, src[i:i + _CHUNK], out=dst[i:i + _CHUNK], mode="wrap")
        return out
    np.copyto(out, x, casting="unsafe")
    return _ramp(out, lo, hi)


def clip_scale(image: np.ndarray, percentiles: Sequence[float]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Clip each channel at its percentiles and scale to 0..1 float32.

    uint8 input takes the fast path: histogram percentiles and a 256-entry lookup table applied with
    ``np.take`` (no float64, no float copy besides the output). Other dtypes: ``np.percentile`` on a strided
    subsample, then in-place arithmetic on the float32 output.

    Args:
        image: channel-first array ``(C, *spatial)``.
        percentiles: ``(low, high)`` in 0..100.

    Returns:
        The float32 image and the per-channel ``(low, high)`` intensities used (source units).
    """
    out = np.empty(image.shape, np.float32)
    used = []
    for c in range(image.shape[0]):
        lo, hi = channel_percentiles(image[c], percentiles)
        _to_unit(image[c], lo, hi, out=out[c])
        used.append((lo, hi))
    return out, used


def _linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1D linear resizing as ``F.interpolate(..., align_corners=False)`` does it: output ``j`` blends source
    ``i0[j]`` and ``i1[j]`` with weight ``lam[j]`` on ``i1`` (same float32 index arithmetic as PyTorch)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return torch.from_numpy(i0), torch.from_numpy(np.minimum(i0 + 1, n_in - 1)), torch.from_numpy(lam)


def _blend(a0: torch.Tensor, a1: torch.Tensor, lam: torch.Tensor, axis: int) -> torch.Tensor:
    """In place on ``a0``: ``a0 + lam * (a1 - a0)`` with ``lam`` along ``axis``."""
    shape = [1] * a0.ndim
    shape[axis] = -1
    return a0.lerp_(a1, lam.view(shape))


def clip_scale_resize(image: np.ndarray, percentiles: Sequence[float],
                      size: Sequence[int]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """:func:`clip_scale` then :func:`resize`, without the full-resolution float32 copy of the input.

    Linear resizing reads at most two source positions per output position along each axis, so each channel is
    reduced one axis at a time, starting with the most shrinking axis: the first pass gathers the source planes it
    needs from the (uint8) input and maps only those to 0..1 float32 (lookup table); later passes blend float32
    planes, block by block along the first axis so that temporaries stay small. For a 400×320×400 uint8 slab
    resized to 128³ this converts ~16 M voxels per channel to float instead of 51 M, 32 MB at a time. Equal to
    ``resize(clip_scale(image, percentiles)[0], size)`` up to float rounding (~1e-6).

    Args:
        image: channel-first array ``(C, *spatial)`` (any numeric dtype; views are fine).
        percentiles: ``(low, high)`` in 0..100.
        size: output spatial size.

    Returns:
        float32 ``(C, *size)`` and the per-channel ``(low, high)`` intensities used (source units).
    """
    size = tuple(int(s) for s in size)
    in_shape = tuple(image.shape[1:])
    if len(size) != len(in_shape):
        raise ValueError(f"size {size} does not match the spatial shape {in_shape}")
    axes = sorted((a for a in range(len(size)) if size[a] != in_shape[a]), key=lambda a: size[a] / in_shape[a])
    out = np.empty((image.shape[0], *size), np.float32)
    used = []
    for c in range(image.shape[0]):
        x = image[c]
        lo, hi = channel_percentiles(x, percentiles)
        used.append((lo, hi))
        if not axes:
            _to_unit(x, lo, hi, out=out[c])
            continue
        # the most shrinking axis first (from uint8), then the others in axis order: gathers along the last,
        # contiguous axis are the slowest, so they run on the smallest array
        first, rest = axes[0], sorted(axes[1:])
        f0, f1, flam = _linear_taps(in_shape[first], size[first])
        taps = {a: _linear_taps(in_shape[a], size[a]) for a in rest}
        # output planes along `first` in blocks of ~_BLOCK_BYTES of gathered float32 source planes: temporaries
        # stay bounded (2 x 16 MB) instead of two fresh 64 MB arrays per channel at 400x320x400 -> 128^3
        plane = math.prod(n for a, n in enumerate(in_shape) if a != first)
        step = max(1, _BLOCK_BYTES // (4 * plane))
        dst = out[c]
        for j in range(0, size[first], step):
            blk = slice(j, min(j + step, size[first]))
            t = _blend(torch.from_numpy(_to_unit(np.take(x, f0[blk].numpy(), axis=first), lo, hi)),
                       torch.from_numpy(_to_unit(np.take(x, f1[blk].numpy(), axis=first), lo, hi)), flam[blk], first)
            for a in rest:
                i0, i1, lam = taps[a]
                t = _blend(t.index_select(a, i0), t.index_select(a, i1), lam, a)
            dst[(slice(None),) * first + (blk,)] = t.numpy()
    return out, used


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a channel-first array to ``size`` with (bi/tri)linear interpolation, float32.

    ``align_corners=False`` maps voxel centres proportionally, so resizing there and back is consistent
    (:func:`to_source_space`). No antialias: downsampling cost stays proportional to the output size.
    """
    size = tuple(int(s) for s in size)
    arr = np.asarray(image, dtype=np.float32)
    if tuple(arr.shape[1:]) == size:
        return np.ascontiguousarray(arr)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    t = torch.from_numpy(np.ascontiguousarray(arr))[None]
    return F.interpolate(t, size=size, mode=mode, align_corners=False)[0].numpy()


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


def drop_axis(geometry: Geometry, axis: int) -> Geometry:
    """Geometry of a projection along NumPy ``axis`` (that axis removed from shape, spacing, origin, direction)."""
    n = len(geometry.shape)
    keep_np = [a for a in range(n) if a != axis]
    keep_itk = [n - 1 - a for a in reversed(keep_np)]  # SimpleITK order = reversed NumPy order
    direction = np.asarray(geometry.direction).reshape(n, n)[np.ix_(keep_itk, keep_itk)]
    return Geometry(tuple(geometry.shape[a] for a in keep_np), tuple(geometry.spacing[i] for i in keep_itk),
                    tuple(geometry.origin[i] for i in keep_itk), tuple(float(v) for v in direction.ravel()))


# ---------------------------------------------------------------------------------------------- record
@dataclass
class PreprocessRecord:
    """What the deterministic preprocessing did to one scan (stored beside each cache entry).

    Attributes:
        source: :meth:`Geometry.to_dict` of the source image the crop box refers to (for a computed en-face
            projection: the 2D projection's geometry; the volume's is in ``meta["volume"]``).
        crop_box: ``(start, stop)`` per spatial axis of the region that was resized to the input.
        cropped_shape: spatial shape of that region.
        input_shape: spatial shape of a network input.
        channels: number of channels.
        kind: ``"clip3d"`` or ``"patch2d"``.
        retina: ``(start, stop)`` of the retina along the depth axis, if located.
        intensity: per-channel ``(low, high)`` clip values in source units.
        patches: 2D patch boxes in source coordinates (empty: one whole-image sample).
        meta: extras (depth axis, slab of a computed projection, volume geometry ...).
    """

    source: dict[str, list]
    crop_box: list[tuple[int, int]]
    cropped_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    channels: int = 1
    kind: str = "clip3d"
    retina: tuple[int, int] | None = None
    intensity: list[tuple[float, float]] = field(default_factory=list)
    patches: list[list[tuple[int, int]]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        """The source :class:`Geometry`."""
        return Geometry.from_dict(self.source)

    @property
    def n_samples(self) -> int:
        """Samples this scan yields: its patch count, or 1."""
        return max(1, len(self.patches))

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the cached array: the cropped image at source resolution for patch grids, else the input."""
        return (self.channels, *(self.cropped_shape if self.patches else self.input_shape))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"source": self.source, "crop_box": [list(b) for b in self.crop_box],
                "cropped_shape": list(self.cropped_shape), "input_shape": list(self.input_shape),
                "channels": self.channels, "kind": self.kind,
                "retina": list(self.retina) if self.retina is not None else None,
                "intensity": [list(v) for v in self.intensity],
                "patches": [[list(b) for b in p] for p in self.patches], "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(source=dict(d["source"]), crop_box=[(int(a), int(b)) for a, b in d["crop_box"]],
                   cropped_shape=tuple(int(v) for v in d["cropped_shape"]),
                   input_shape=tuple(int(v) for v in d["input_shape"]), channels=int(d["channels"]),
                   kind=str(d["kind"]), retina=tuple(d["retina"]) if d.get("retina") is not None else None,
                   intensity=[(float(a), float(b)) for a, b in d.get("intensity", [])],
                   patches=[[(int(a), int(b)) for a, b in p] for p in d.get("patches", [])],
                   meta=dict(d.get("meta", {})))


def to_source_space(array: np.ndarray | torch.Tensor, record: PreprocessRecord, patch: int = -1) -> np.ndarray:
    """Map an input-space array (e.g. a CAM) back onto the source scan.

    Resizes to the cropped region (or to patch ``patch``'s box) and pads it into the source shape with zeros.

    Args:
        array: ``(*input_shape)`` or ``(C, *input_shape)``.
        record: the sample's :class:`PreprocessRecord`.
        patch: patch index for patch-grid records; -1 for whole-image records.

    Returns:
        float32 array of shape ``geometry.shape`` (or ``(C, *geometry.shape)``), ready for
        :meth:`Geometry.to_sitk`.
    """
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    nd = len(record.input_shape)
    squeeze = arr.ndim == nd
    arr = arr[None] if squeeze else arr
    if tuple(arr.shape[1:]) != tuple(record.input_shape):
        raise ValueError(f"array shape {tuple(arr.shape)} does not match the input shape {record.input_shape}")
    if record.patches:
        if not 0 <= patch < len(record.patches):
            raise ValueError(f"record has {len(record.patches)} patches; got patch={patch}")
        box = record.patches[patch]
    else:
        box = record.crop_box
    region = resize(arr, [e - s for s, e in box])
    out = np.zeros((arr.shape[0], *record.geometry.shape), np.float32)
    out[(slice(None), *(slice(s, e) for s, e in box))] = region
    return out[0] if squeeze else out


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
    """Resize to the network input size (:func:`resize`: linear, anisotropic stretch, no padding)."""

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


def _run(transforms: Sequence[Callable], data: dict) -> dict:
    # A plain loop, not monai Compose: Compose re-raises every error as RuntimeError, hiding DataError.
    for t in transforms:
        data = t(data)
    return data
