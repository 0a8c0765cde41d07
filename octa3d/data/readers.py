"""Read scans from disk into NumPy arrays (SimpleITK order) plus their :class:`Geometry`.

Supported inputs:

* a folder of numbered 2D slices (``1.bmp`` … ``400.bmp``, ``slice_001.png`` …; BMP/PNG/TIF/TIFF/JPG), stacked
  in *numeric* order along axis 0 (the OCTA-500 layout; :mod:`octa3d.data.slices`);
* a DICOM series folder;
* NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``), MetaImage (``.mha``/``.mhd``), multi-page TIFF;
* NumPy ``.npy`` (no geometry on disk: unit spacing unless one is given);
* vendor exports read through eyepy (Heidelberg HEYEX .vol / .e2e / XML, Topcon .fda, Duke .mat;
  :mod:`octa3d.data.vendor`): a left eye is mirrored to a right eye's orientation, its geometry says so, and
  :func:`load_subject` writes what the file says (and what was done) into the subject's scan record;
* 2D images (PNG/JPG/BMP/TIF) for :func:`read_image_2d`.

Pixel types are kept as stored, colour pixels become one grayscale channel (:mod:`octa3d.data.imagefiles`).
Every problem a user can fix raises :class:`~octa3d.errors.DataError` naming the file or folder and the fix,
including truncated files and headers declaring more voxels than ``max_voxels`` (``--max-voxels``; the readers take
it as a keyword, ``None`` meaning the schema's default :data:`MAX_VOXELS`), refused before any allocation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from octa3d.data.imagefiles import (FORMATS_HELP, MAX_VOXELS, SITK_EXTS, SLICE_EXTS, SUPPORTED_EXTS, check_voxels,
                                    file_suffix, read_sitk_file, squeeze_4d)
from octa3d.data.slices import read_folder, slice_number
from octa3d.data.subject import Geometry, Subject
from octa3d.data.vendor import read_vendor, sniff, unsupported, vendor_format
from octa3d.errors import DataError

__all__ = ["MAX_VOXELS", "SITK_EXTS", "SLICE_EXTS", "SUPPORTED_EXTS", "check_values", "file_suffix", "load_subject",
           "read_image_2d", "read_volume", "slice_number"]


def _read_any(path: str | Path, spacing: Sequence[float] | None = None, max_voxels: int | None = None,
              info: dict | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a 2D or 3D scan of any supported kind; the workhorse behind the public readers (``info``: filled with
    a vendor export's scan record)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; check --data-root / the manifest path")
    ext = file_suffix(p)
    # a vendor export by name, or (any other name that no reader here claims) by its first bytes
    if vendor_format(p) is not None or (p.is_file() and ext not in SITK_EXTS | {".npy"} and sniff(p)):
        scan = read_vendor(p, tuple(spacing) if spacing is not None else None, max_voxels=max_voxels)
        if info is not None:
            info.update(scan.info)
        return scan.array, scan.geometry
    if p.is_dir():
        img = read_folder(p, max_voxels)
    else:
        if ext == ".npy":
            return _read_npy(p, spacing, max_voxels)
        if ext not in SITK_EXTS:
            raise unsupported(p) or DataError(f"{p}: unsupported file type '{ext or p.name}'; expected "
                                              f"{FORMATS_HELP}, or a 2D image (.png/.jpg/.bmp/.tif)")
        img = squeeze_4d(read_sitk_file(p, max_voxels), p)
    ndim = img.ndim if isinstance(img, np.ndarray) else img.GetDimension()
    if spacing is not None:
        if len(spacing) != ndim:
            raise DataError(f"{p}: spacing {tuple(spacing)} has {len(spacing)} values but the image is {ndim}D")
        spacing = tuple(float(s) for s in spacing)
    if isinstance(img, np.ndarray):  # fast-decoded slices: ITK's BMP geometry (unit spacing, zero origin)
        return img, Geometry.default(img.shape, spacing)
    if spacing is not None:
        img.SetSpacing(spacing)
    return sitk.GetArrayFromImage(img), Geometry.from_sitk(img)


def _check_npy(p: Path, max_voxels: int | None) -> None:
    """Check a ``.npy`` header before loading: a numeric dtype, a shape within ``max_voxels``, all bytes present.

    ``np.load`` allocates the header's shape first, so a header claiming 2000³ float32 would end in a MemoryError
    (or the OOM killer), and a cut file in numpy's own message.
    """
    fmt = np.lib.format
    with open(p, "rb") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f, max_header_size=1 << 16)
        start = f.tell()
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(f"{p}: array of dtype {dtype}; expected a numeric array")
    check_voxels(p, shape, max_voxels)
    need = start + math.prod(shape) * dtype.itemsize
    size = p.stat().st_size
    if size < need:
        raise DataError(f"{p} is truncated ({size} bytes, its header declares {need} for a {dtype} array of shape "
                        f"{shape}); an interrupted copy or download leaves such files: copy it again or remove it")


def _read_npy(p: Path, spacing: Sequence[float] | None, max_voxels: int | None = None
              ) -> tuple[np.ndarray, Geometry]:
    try:
        _check_npy(p, max_voxels)
        arr = np.load(p, allow_pickle=False)  # never unpickle: a data file must not run code
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"cannot read {p}: {exc}; save it with numpy.save() as a plain numeric array") from exc
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{p}: array of dtype {arr.dtype}; expected a numeric array")
    if arr.ndim not in (2, 3):
        raise DataError(f"{p}: array of shape {arr.shape}; expected a 3D volume (slices, rows, columns) or a "
                        "2D image (rows, columns)")
    if spacing is not None and len(spacing) != arr.ndim:
        raise DataError(f"{p}: spacing {tuple(spacing)} has {len(spacing)} values but the array is {arr.ndim}D")
    return arr, Geometry.default(arr.shape, tuple(spacing) if spacing is not None else None)


def read_volume(path: str | Path, spacing: Sequence[float] | None = None, *, max_voxels: int | None = None
                ) -> tuple[np.ndarray, Geometry]:
    """Read a 3D scan.

    Args:
        path: a folder of numbered 2D slices, a DICOM series folder, or a ``.nii``/``.nii.gz``/``.nrrd``/
            ``.mha``/``.mhd``/multi-page ``.tif``/``.npy`` file.
        spacing: voxel spacing in SimpleITK (x, y, z) order that replaces the file's (BMP stacks carry none).
        max_voxels: the largest size a header may declare (``--max-voxels``; None: its default,
            :data:`MAX_VOXELS`); larger scans are refused before any memory is allocated.

    Returns:
        ``(array, geometry)``: the array in SimpleITK order ``(slices, rows, columns)`` with the file's dtype
        (uint8 stays uint8; colour pixels become luminance), and its :class:`Geometry`.

    Raises:
        DataError: missing path, empty folder, incomplete/duplicate slice numbering, slices of different sizes,
            unreadable, truncated, too large or unsupported file, or a 2D image.
    """
    arr, geo = _read_any(path, spacing, max_voxels)
    if arr.ndim != 3:
        raise DataError(f"{path} is a 2D image of {arr.shape[0]}×{arr.shape[1]} pixels, not a 3D scan; give a "
                        f"volume ({FORMATS_HELP}) or use --dim 2d")
    return arr, geo


def read_image_2d(path: str | Path, *, max_voxels: int | None = None) -> np.ndarray:
    """Read a 2D image as one grayscale channel.

    Args:
        path: a ``.png``/``.jpg``/``.bmp``/``.tif`` image (palette and RGB converted by luminance), or a 2D
            ``.npy``/NIfTI/NRRD/MHA file.
        max_voxels: the largest pixel count a header may declare (``--max-voxels``; None: :data:`MAX_VOXELS`).

    Returns:
        ``(H, W)`` array; uint8 for 8-bit inputs, the file's dtype otherwise.

    Raises:
        DataError: missing/unreadable/truncated/too large/unsupported file, or a 3D volume.
    """
    arr, _ = _read_2d_or_3d(path, max_voxels=max_voxels)
    if arr.ndim != 2:
        raise DataError(f"{path} is a 3D volume of shape {arr.shape}, not a 2D image; use --dim 3d or give a "
                        "2D image")
    return arr


def _read_2d_or_3d(path: str | Path, spacing: Sequence[float] | None = None, max_voxels: int | None = None,
                   info: dict | None = None) -> tuple[np.ndarray, Geometry]:
    """Like :func:`_read_any`, but a 3D image with a single slice (e.g. a 2D NIfTI, a single-line HEYEX scan)
    counts as 2D."""
    # a vendor scan is always read as 3D: the reader applies the spacing itself (a mirrored eye's origin follows it)
    vendor = spacing is not None and len(spacing) == 3 and vendor_format(path) is not None
    arr, geo = _read_any(path, spacing if vendor else None, max_voxels, info)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
        # Keep the in-plane geometry (drop the z row/column of the direction matrix).
        d = np.asarray(geo.direction).reshape(3, 3)[:2, :2]
        geo = Geometry(arr.shape, geo.spacing[:2], geo.origin[:2], tuple(float(v) for v in d.ravel()))
    if spacing is not None:
        if len(spacing) != arr.ndim:
            raise DataError(f"{path}: spacing {tuple(spacing)} has {len(spacing)} values but the image is "
                            f"{arr.ndim}D")
        geo = dataclasses.replace(geo, spacing=tuple(float(s) for s in spacing))
    return arr, geo


def check_values(arr: np.ndarray, what: str) -> None:
    """Refuse arrays that cannot be a real scan: NaN/inf anywhere, or one value everywhere."""
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.any():
            raise DataError(f"{what} is all NaN/inf: the scan is empty or failed to export; remove it or fix "
                            "the file")
        if not finite.all():
            n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
            raise DataError(f"{what} contains {n_nan} NaN and {n_inf} inf values: fix the export (e.g. replace "
                            "them by 0) or remove the file")
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        val = f"{lo:g}" if arr.dtype.kind == "f" else str(lo)
        raise DataError(f"{what} is constant (all {val}): the scan is empty or failed to export; remove it or "
                        "fix the file")


def load_subject(subject: Subject, modality: str, *, max_voxels: int | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a subject's scan(s) as one channel-first array.

    Args:
        subject: a discovered subject. OCTA-500 subjects have ``paths`` keys ``"OCTA"``/``"OCT"``; manifest and
            2D-folder subjects have ``"image"`` (used whatever the modality).
        modality: ``"OCTA"``, ``"OCT"`` or ``"OCT+OCTA"`` (two channels, OCT first).
        max_voxels: the largest size a scan's header may declare (``cfg.data.max_voxels``, ``--max-voxels``;
            None: :data:`MAX_VOXELS`), checked before the scan is allocated.

    Returns:
        ``(array, geometry)``: ``(C, *spatial)`` with C = 2 for ``OCT+OCTA`` else 1 (a 2D image gives
        ``(1, H, W)``), and the spatial :class:`Geometry` (``subject.spacing`` applied when given).

    Raises:
        DataError: naming the subject and file, for a missing modality, unreadable data, channels of different
            shapes, NaN/inf values, or a constant (empty) scan.
    """
    if "image" in subject.paths:
        keys = ["image"]
    else:
        keys = ["OCT", "OCTA"] if modality == "OCT+OCTA" else [modality]
        missing = [k for k in keys if k not in subject.paths]
        if missing:
            where = ("add the angiography export beside it (scan_Angio.vol next to scan.vol)" if missing == ["OCTA"]
                     else "add its structural export") if "scan" in subject.meta else "add the missing folder"
            raise DataError(f"subject {subject.id}: no {' or '.join(missing)} scan (has: "
                            f"{', '.join(sorted(subject.paths)) or 'nothing'}); choose --modality from those or "
                            f"{where}")
    # channels are copied into the output as they are read: the peak holds the output + one channel (not 2x all)
    out: np.ndarray | None = None
    geometry: Geometry | None = None
    for k, key in enumerate(keys):
        path = subject.paths[key]
        info: dict = {}
        try:
            arr, geo = _read_2d_or_3d(path, subject.spacing, max_voxels, info)
        except DataError as exc:
            raise DataError(f"subject {subject.id}: {exc}") from exc
        if info:
            _record_scan(subject, key, path, info)
        kind = "image" if arr.ndim == 2 else "volume"
        what = f"subject {subject.id}: {kind if key == 'image' else key + ' ' + kind} {path}"
        check_values(arr, what)
        if geometry is not None and geo.shape != geometry.shape:
            raise DataError(f"subject {subject.id}: {keys[0]} shape {geometry.shape} and {key} shape {geo.shape} "
                            "differ; both modalities must come from the same scan (use --modality with one of "
                            "them, or fix the export)")
        geometry = geometry or geo
        if out is None:
            out = np.empty((len(keys), *arr.shape), arr.dtype)
        elif np.result_type(out.dtype, arr.dtype) != out.dtype:  # e.g. uint8 OCT + uint16 OCTA: as np.stack
            out = out.astype(np.result_type(out.dtype, arr.dtype))
        out[k] = arr
        del arr
    assert out is not None and geometry is not None
    return out, geometry


def _record_scan(subject: Subject, key: str, path: str, info: dict) -> None:
    """Complete the subject's scan record (``meta["scan"]``) with what a vendor file says and what was done to it
    (the first channel read describes the scan); the channels of one subject must show the same eye."""
    rec = dict(subject.meta.get("scan") or {})
    files = {k: v for k, v in (rec.get("files") or {}).items() if k != key}
    if files and rec.get("laterality") != info["laterality"]:
        raise DataError(f"subject {subject.id}: {path} is an "
                        f"{info['laterality']} eye but {', '.join(files.values())} is {rec.get('laterality')}: the "
                        "channels of a subject must come from one scan of one eye; fix the pairing of the exports")
    if not files:
        rec.update(info)
    rec["files"] = {**files, key: path}
    subject.meta["scan"] = rec
