"""What the deterministic preprocessing did to one scan (:class:`PreprocessRecord`) and the way back: mapping an
input-space array (a Grad-CAM map) onto the source scan (:func:`to_source_space`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from octa3d.data.scaling import resize
from octa3d.data.subject import Geometry


def drop_axis(geometry: Geometry, axis: int) -> Geometry:
    """Geometry of a projection along NumPy ``axis`` (that axis removed from shape, spacing, origin, direction)."""
    n = len(geometry.shape)
    keep_np = [a for a in range(n) if a != axis]
    keep_itk = [n - 1 - a for a in reversed(keep_np)]  # SimpleITK order = reversed NumPy order
    direction = np.asarray(geometry.direction).reshape(n, n)[np.ix_(keep_itk, keep_itk)]
    return Geometry(tuple(geometry.shape[a] for a in keep_np), tuple(geometry.spacing[i] for i in keep_itk),
                    tuple(geometry.origin[i] for i in keep_itk), tuple(float(v) for v in direction.ravel()))


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
        pad: ``(before, after)`` source pixels of zeros added to the crop box per spatial axis before resizing, so
            that the input keeps the source's aspect ratio (whole-image 2D samples; empty: none, stretched).
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
    pad: list[tuple[int, int]] = field(default_factory=list)

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
                "patches": [[list(b) for b in p] for p in self.patches], "meta": self.meta,
                "pad": [list(p) for p in self.pad]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(source=dict(d["source"]), crop_box=[(int(a), int(b)) for a, b in d["crop_box"]],
                   cropped_shape=tuple(int(v) for v in d["cropped_shape"]),
                   input_shape=tuple(int(v) for v in d["input_shape"]), channels=int(d["channels"]),
                   kind=str(d["kind"]), retina=tuple(d["retina"]) if d.get("retina") is not None else None,
                   intensity=[(float(a), float(b)) for a, b in d.get("intensity", [])],
                   patches=[[(int(a), int(b)) for a, b in p] for p in d.get("patches", [])],
                   meta=dict(d.get("meta", {})), pad=[(int(a), int(b)) for a, b in d.get("pad", [])])


def to_source_space(array: np.ndarray | torch.Tensor, record: PreprocessRecord, patch: int = -1) -> np.ndarray:
    """Map an input-space array (e.g. a CAM) back onto the source scan.

    Resizes to the cropped region (or to patch ``patch``'s box) and pads it into the source shape with zeros. A
    record with aspect padding (:attr:`PreprocessRecord.pad`) is resized to the padded region and the padding cut
    off again: the exact inverse of the forward mapping (pad, then resize).

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
    pad = record.pad if record.pad and not record.patches else [(0, 0)] * len(box)
    region = resize(arr, [e - s + a + b for (s, e), (a, b) in zip(box, pad)])
    if any(a or b for a, b in pad):
        region = region[(slice(None), *(slice(a, a + e - s) for (s, e), (a, _) in zip(box, pad)))]
    out = np.zeros((arr.shape[0], *record.geometry.shape), np.float32)
    out[(slice(None), *(slice(s, e) for s, e in box))] = region
    return out[0] if squeeze else out
