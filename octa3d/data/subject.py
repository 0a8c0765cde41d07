"""The records that flow through the data package: a discovered :class:`Subject` and a scan's :class:`Geometry`.

Conventions (shared by readers, transforms, CAM export):

* A volume is a NumPy array in SimpleITK order ``(slow, depth, fast)``. For an OCTA-500 B-scan stack that is
  ``(n_bscans, rows, columns)`` = ``(400, 640, 400)``: axis 0 indexes the B-scan (``1.bmp`` … ``400.bmp``), axis 1
  the A-scan depth (BMP rows), axis 2 the lateral position (BMP columns). ``--depth-axis`` (default 1) names the
  depth axis for other sources.
* A loaded sample is channel-first: ``(C, *spatial)``; C = 2 for ``--modality OCT+OCTA`` (OCT first).
* :class:`Geometry` stores what is needed to write an array back *in the source scan's space* (same shape and
  affine as the source, for 3D Slicer / ITK-SNAP / napari overlays).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of a scan, in SimpleITK conventions.

    Attributes:
        shape: array shape in NumPy order (e.g. ``(400, 640, 400)``).
        spacing: voxel size per axis in SimpleITK (x, y, z) order = reversed NumPy order, in mm.
        origin: physical position of voxel 0 (SimpleITK order).
        direction: row-major direction cosine matrix (SimpleITK order), ``ndim*ndim`` numbers.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def default(cls, shape: tuple[int, ...], spacing: tuple[float, ...] | None = None) -> Geometry:
        """Identity direction, zero origin, unit (or given) spacing."""
        n = len(shape)
        eye = tuple(float(v) for v in np.eye(n).ravel())
        return cls(tuple(int(s) for s in shape), tuple(float(s) for s in (spacing or (1.0,) * n)),
                   (0.0,) * n, eye)

    @classmethod
    def from_sitk(cls, image: Any) -> Geometry:
        """Geometry of a ``SimpleITK.Image``."""
        return cls(tuple(int(s) for s in reversed(image.GetSize())), tuple(image.GetSpacing()),
                   tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def to_sitk(self, array: np.ndarray) -> Any:
        """Wrap ``array`` (shape must equal :attr:`shape`) in a ``SimpleITK.Image`` with this geometry."""
        import SimpleITK as sitk

        if tuple(array.shape) != tuple(self.shape):
            raise ValueError(f"array shape {array.shape} does not match the source geometry {self.shape}")
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def to_dict(self) -> dict[str, list]:
        """JSON/pickle-friendly form."""
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(int(v) for v in d["shape"]), tuple(float(v) for v in d["spacing"]),
                   tuple(float(v) for v in d["origin"]), tuple(float(v) for v in d["direction"]))


@dataclass
class Subject:
    """One eye / image series found in the data root, before any pixel is read.

    Attributes:
        id: unique subject ID (OCTA-500: the numeric folder name, e.g. ``"10001"``).
        label: raw class name from the label source (e.g. ``"DR"``), or ``None`` if unlabeled.
        paths: modality → path of the scan (a folder of slices or a file). OCTA-500: ``{"OCTA": dir, "OCT": dir}``;
            manifest/2D sources: ``{"image": path}``.
        group: patient ID used to keep splits leak-free (defaults to ``id``; Kermany: the patient number).
        split: split fixed by the dataset itself (``"train"``/``"val"``/``"test"``), else ``None``.
        mask: path of a ground-truth lesion mask in the scan's geometry (synthetic data), else ``None``.
        projections: OCTA-500 en-face projection maps, map type → BMP path.
        spacing: voxel spacing to impose (SimpleITK order) when the files carry none (BMP stacks).
        meta: anything else worth keeping (fov, eye, age …).
    """

    id: str
    label: str | None
    paths: dict[str, str]
    group: str = ""
    split: str | None = None
    mask: str | None = None
    projections: dict[str, str] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.id
