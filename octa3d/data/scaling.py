"""Percentile clipping, scaling to 0..1 and linear resizing of channel-first arrays: the arithmetic of the
deterministic preprocessing (:mod:`octa3d.data.transforms` wraps it in MONAI transforms).

uint8 input, the common case (OCTA-500 BMP stacks), takes fast paths: exact percentiles from a 256-bin
histogram and a 256-entry lookup table instead of float arithmetic. :func:`clip_scale_resize` fuses clipping and
resizing so that a 400×640×400 uint8 scan never gets a full-resolution float copy. :func:`normalize` applies the
``--normalize`` statistics (:func:`normalization_stats`) after the 0..1 scaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 1 << 22  # elements per pass in the uint8 paths: bounds the intp temporaries numpy makes to ~32 MB
_BLOCK_BYTES = 16 << 20  # float32 bytes of gathered source planes per block of clip_scale_resize's first pass
_PERCENTILE_SAMPLES = 2_000_000  # float input: percentiles from a strided subsample of about this many voxels


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


# ---------------------------------------------------------------------------------------------- normalisation
#: ImageNet channel statistics (RGB) of the 0..1 image: what RETFound-style (timm) checkpoints were trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: their averages over RGB, for 1-2 channel (grey) inputs
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226


def normalization_stats(kind: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Per-channel ``(mean, std)`` of ``--normalize`` for ``channels`` inputs; None for ``none``.

    ``imagenet``: the ImageNet RGB statistics for 3 channels, their RGB averages (0.449 / 0.226) on every channel
    of 1-2 channel inputs (a grey image replicated to RGB and normalised per channel sees nearly these values).
    """
    if kind in (None, "", "none"):
        return None
    if kind != "imagenet":
        raise ValueError(f"unknown normalisation {kind!r} (none or imagenet)")
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (IMAGENET_GREY_MEAN,) * channels, (IMAGENET_GREY_STD,) * channels


def normalize(x: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float], inverse: bool = False
              ) -> np.ndarray | torch.Tensor:
    """``(x - mean) / std`` per channel of a channel-first array (``inverse``: ``x * std + mean``), float32."""
    shape = (len(mean),) + (1,) * (x.ndim - 1)
    if isinstance(x, torch.Tensor):
        m = torch.tensor(mean, dtype=torch.float32).reshape(shape)
        sd = torch.tensor(std, dtype=torch.float32).reshape(shape)
        x = x.float()
    else:
        m = np.asarray(mean, dtype=np.float32).reshape(shape)
        sd = np.asarray(std, dtype=np.float32).reshape(shape)
        x = np.asarray(x, dtype=np.float32)
    return x * sd + m if inverse else (x - m) / sd
