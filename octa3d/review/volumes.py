"""The review page's volumes: each subject's scan and evidence map, resampled to a viewer size, as a small ``.js``.

A page opened from disk (``file://``) cannot ``fetch()`` its neighbours, but it can load a ``<script>``: each
subject's volumes travel as base64 of gzipped uint8 NIfTIs in ``subjects/<stem>.js``, loaded only when the subject
is opened, so the page itself stays small and opens at once for hundreds of subjects. The full-resolution NIfTIs
beside the page are linked from it.

Resampling keeps the geometry: every axis longer than :data:`MAX_VOXELS` is subsampled by an integer stride with
SimpleITK's slicing, which scales the spacing and keeps origin and direction, so orientation labels and the
millimetre ruler stay right. The scan is windowed to its 0.5-99.5 percentiles, the map (0..1) scaled to 0..255.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from octa3d.utils.io import atomic_write_text

log = logging.getLogger("octa3d.review")

#: Longest axis of a volume in the page (voxels); 160 keeps a 400x640x400 scan under ~1 MB per subject.
MAX_VOXELS = 160


def js_literal(value: Any) -> str:
    """``value`` as a JavaScript literal that is safe inside a ``<script>`` element (no ``</`` or ``<!--``)."""
    return (json.dumps(value, ensure_ascii=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def _shrink(img: Any) -> Any:
    """``img`` subsampled by integer strides so that no axis exceeds :data:`MAX_VOXELS` (geometry kept)."""
    size = img.GetSize()
    steps = [max(1, math.ceil(n / MAX_VOXELS)) for n in size]
    if all(s == 1 for s in steps):
        return img
    return img[tuple(slice(None, None, s) for s in steps)]


def _nifti_bytes(arr: np.ndarray, ref: Any, folder: Path) -> bytes:
    """A gzipped NIfTI of ``arr`` (uint8, SimpleITK's ``(z, y, x)`` order) with the geometry of ``ref``."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    # SimpleITK writes only to files: a temporary one beside the page (same disk, removed at once)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "v.nii"
        sitk.WriteImage(img, str(path))
        raw = path.read_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0)


def _scan_uint8(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float32, copy=False))
    lo, hi = np.percentile(a, [0.5, 99.5]) if a.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def subject_volumes(scan: Path, cam: Path | None, folder: Path) -> dict[str, Any]:
    """The viewer volumes of one subject.

    Args:
        scan: the full-resolution scan NIfTI (``*_input*.nii.gz``; a 2D image is shown as one slice).
        cam: the full-resolution map NIfTI (``*_cam.nii.gz``), or None when there is no map.
        folder: where a temporary file may be written (the review folder).

    Returns:
        ``{"scan": base64, "cam": base64 | None, "peak": [i, j, k] voxel of the map's maximum in the viewer volume
        (NIfTI index order) | None, "shape": viewer shape (x, y, z), "source_shape": full shape (x, y, z)}``.
    """
    import SimpleITK as sitk

    img = sitk.ReadImage(str(scan))
    if img.GetNumberOfComponentsPerPixel() > 1:  # an RGB photo: its luminance
        img = sitk.VectorIndexSelectionCast(img, 0)
    small = _shrink(img)
    out: dict[str, Any] = {"scan": base64.b64encode(_nifti_bytes(_scan_uint8(sitk.GetArrayViewFromImage(small)),
                                                                 small, folder)).decode("ascii"),
                           "cam": None, "peak": None, "shape": list(small.GetSize()),
                           "source_shape": list(img.GetSize())}
    if cam is not None:
        cimg = _shrink(sitk.ReadImage(str(cam)))
        c = np.nan_to_num(sitk.GetArrayViewFromImage(cimg).astype(np.float32))
        if c.shape != sitk.GetArrayViewFromImage(small).shape:
            log.warning("review page: %s and %s differ in shape; the map is not shown", cam.name, scan.name)
            return out
        c8 = np.clip(np.round(c * 255.0), 0, 255).astype(np.uint8)
        out["cam"] = base64.b64encode(_nifti_bytes(c8, small, folder)).decode("ascii")
        if c8.any():
            zyx = np.unravel_index(int(np.argmax(c)), c.shape)
            out["peak"] = [int(v) for v in zyx[::-1]]
    return out


def write_subject_js(path: Path, key: str, volumes: dict[str, Any]) -> int:
    """Write ``subjects/<stem>.js`` registering ``volumes`` under ``key`` in ``window.OCTA3D_VOLUMES``; returns its
    size in bytes."""
    text = ("(window.OCTA3D_VOLUMES = window.OCTA3D_VOLUMES || {})[" + js_literal(key) + "] = "
            + js_literal(volumes) + ";\n")
    atomic_write_text(path, text)  # ascii only: js_literal escapes everything else
    return len(text)
