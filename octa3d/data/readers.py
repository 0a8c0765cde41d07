"""Read scans from disk into NumPy arrays (SimpleITK order) plus their :class:`Geometry`.

Supported inputs:

* a folder of numbered 2D slices (``1.bmp`` … ``400.bmp``, ``slice_001.png`` …; BMP/PNG/TIF/TIFF/JPG), stacked
  in *numeric* order along axis 0 (the OCTA-500 layout);
* a DICOM series folder;
* NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``), MetaImage (``.mha``/``.mhd``), multi-page TIFF;
* NumPy ``.npy`` (no geometry on disk: unit spacing unless one is given);
* 2D images (PNG/JPG/BMP/TIF) for :func:`read_image_2d`.

Pixel types are kept as stored (uint8 BMPs stay uint8), except that colour pixels (palette or RGB(A)) become one
grayscale channel: SimpleITK/ITK converts them with the Rec. 709 luminance ``0.2125 R + 0.7154 G + 0.0721 B``
when a scalar output type is requested, which is what every reader here does.

Every problem a user can fix raises :class:`~octa3d.errors.DataError` naming the file or folder and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from octa3d.data.subject import Geometry, Subject
from octa3d.errors import DataError

log = logging.getLogger("octa3d.data")

#: Extensions of 2D raster images (a folder of these is a slice stack; one of them is a 2D image).
SLICE_EXTS: frozenset[str] = frozenset({".bmp", ".png", ".tif", ".tiff", ".jpg", ".jpeg"})
#: Extensions of volume files read by SimpleITK (``.tif``/``.tiff`` may be multi-page).
SITK_EXTS: frozenset[str] = frozenset({".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm",
                                       ".tif", ".tiff", ".bmp", ".png", ".jpg", ".jpeg"})
#: Every file extension the readers accept.
SUPPORTED_EXTS: frozenset[str] = SITK_EXTS | {".npy"}
# Files that file managers drop into folders; never slices.
_JUNK = {"thumbs.db", "desktop.ini"}
_FORMATS_HELP = ("a folder of numbered 2D slices (.bmp/.png/.tif/.jpg), a DICOM series folder, "
                 ".nii/.nii.gz, .nrrd, .mha/.mhd, multi-page .tif/.tiff or .npy")

# Vector (multi-component) pixel type -> the scalar type of one component. Asking SimpleITK for the scalar
# type makes ITK convert RGB/RGBA/palette pixels to luminance instead of returning vectors.
_VECTOR_TO_SCALAR = {
    sitk.sitkVectorUInt8: sitk.sitkUInt8, sitk.sitkVectorInt8: sitk.sitkInt8,
    sitk.sitkVectorUInt16: sitk.sitkUInt16, sitk.sitkVectorInt16: sitk.sitkInt16,
    sitk.sitkVectorUInt32: sitk.sitkUInt32, sitk.sitkVectorInt32: sitk.sitkInt32,
    sitk.sitkVectorFloat32: sitk.sitkFloat32, sitk.sitkVectorFloat64: sitk.sitkFloat64,
}


# ----------------------------------------------------------------------------------------------- helpers
def file_suffix(path: str | Path) -> str:
    """Lower-case extension, with ``.nii.gz`` kept whole.

    Args:
        path: a file name or path.

    Returns:
        e.g. ``".bmp"``, ``".nii.gz"``, or ``""`` when the name has no extension.
    """
    # os.path, not pathlib: this runs for every slice of every scan (400 per OCTA-500 volume)
    name = os.path.basename(os.fspath(path)).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return os.path.splitext(name)[1] if not name.endswith(".") else ""


def slice_number(path: str | Path) -> int | None:
    """The slice number in a slice file name: the last run of digits in its stem.

    ``"1.bmp"`` → 1, ``"slice_001.png"`` → 1, ``"scan2_slice_010.tif"`` → 10, ``"top.png"`` → ``None``.
    """
    name = os.path.basename(os.fspath(path))
    stem = os.path.splitext(name)[0] if not name.endswith(".") else name
    digits = re.findall(r"\d+", stem)
    return int(digits[-1]) if digits else None


def _short(items: Sequence[object], limit: int = 20) -> str:
    """``"a, b, c"`` with at most ``limit`` items and a ``(+N more)`` tail."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _sitk_reason(exc: Exception) -> str:
    """The useful last line of a SimpleITK exception (its first lines are C++ source locations)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__).replace("sitk::ERROR: ", "")


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's stderr warnings (e.g. GDCM's "No Series were found") while probing a folder."""
    old = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(old)


def _info(path: Path) -> sitk.ImageFileReader:
    """Header of one image file (no pixels read); DataError naming the file if it cannot be parsed."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"cannot read image {path}: {_sitk_reason(exc)}; the file is corrupt, truncated or not "
                        "an image: re-export it or remove it") from exc
    return reader


def _scalar_type(reader: sitk.ImageFileReader) -> int:
    """Pixel type to request so that the image comes back with one (grayscale) component."""
    pid = reader.GetPixelID()
    if reader.GetNumberOfComponents() > 1:
        return _VECTOR_TO_SCALAR.get(pid, sitk.sitkFloat32)
    return pid


def _read_with_pil(path: Path) -> sitk.Image:
    """Fallback for 2D rasters ITK cannot decode (e.g. gray+alpha PNG); Pillow comes with scikit-image."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "I", "I;16", "F"):
            im = im.convert("L")  # luminance, like ITK's colour-to-scalar conversion
        arr = np.asarray(im)
    return sitk.GetImageFromArray(arr)


def _read_sitk_file(path: Path) -> sitk.Image:
    """Read one image/volume file with SimpleITK, colour pixels converted to grayscale."""
    try:
        reader = _info(path)
        return sitk.ReadImage(str(path), _scalar_type(reader))
    except (DataError, RuntimeError) as exc:
        # Only plain 2D rasters: a Pillow-read TIFF would silently lose all pages but the first.
        if file_suffix(path) in (".png", ".jpg", ".jpeg", ".bmp"):
            try:
                return _read_with_pil(path)
            except Exception:  # noqa: BLE001 - the SimpleITK error below is the informative one
                pass
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read image {path}: {_sitk_reason(exc)}; the file is corrupt, truncated or not "
                        "an image: re-export it or remove it") from exc


def _squeeze_4d(img: sitk.Image, path: Path) -> sitk.Image:
    """NIfTI often stores a 3D scan as 4D with one time point; drop that axis, refuse real 4D data."""
    if img.GetDimension() == 4:
        if img.GetSize()[3] == 1:
            return img[:, :, :, 0]
        raise DataError(f"{path} is a 4D image of size {img.GetSize()} (x, y, z, t); octa3d reads one 3D scan "
                        "per subject: split the time points into separate files")
    return img


# ----------------------------------------------------------------------------------------------- folders
def _visible_files(folder: Path) -> list[Path]:
    return [f for f in folder.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.name.lower() not in _JUNK]


def _order_slices(folder: Path, files: list[Path]) -> list[Path]:
    """Sort slice files numerically and check the numbering is complete and unique."""
    numbers = {f: slice_number(f) for f in files}
    unnumbered = sorted(f.name for f, n in numbers.items() if n is None)
    if unnumbered and len(unnumbered) == len(files):
        # No numbers at all: the name order is the only order there is.
        log.warning("slices in %s carry no numbers; stacking them in name order", folder)
        return sorted(files, key=lambda f: f.name)
    if unnumbered:
        raise DataError(f"slice folder {folder}: files without a slice number: {_short(unnumbered, 10)}; name "
                        "slices 1.bmp, 2.bmp, … and move other files out of the folder")
    by_number: dict[int, list[str]] = {}
    for f, n in numbers.items():
        by_number.setdefault(n, []).append(f.name)  # type: ignore[arg-type]
    dups = [" and ".join(sorted(names)) for n, names in sorted(by_number.items()) if len(names) > 1]
    if dups:
        raise DataError(f"slice folder {folder}: duplicate slice numbers: {_short(dups, 10)}; keep one file per "
                        "slice number")
    lo, hi = min(by_number), max(by_number)
    missing = sorted(set(range(lo, hi + 1)) - set(by_number))
    if missing:
        raise DataError(f"slice folder {folder}: missing {_short(missing)} (found {len(files)} slices numbered "
                        f"{lo}–{hi}); restore the missing slices or renumber them consecutively")
    return sorted(files, key=lambda f: numbers[f])  # type: ignore[arg-type,return-value]


def _bmp8_header(data: bytes) -> tuple[int, int, int, bool, bytes] | None:
    """``(width, height, pixel offset, top_down, BGRx palette)`` of an uncompressed 8-bit palette BMP, else None.

    Only the layout OCTA-500 (and :mod:`octa3d.data.synthetic`) uses: a ``BM`` file header, a BITMAPINFOHEADER,
    one plane, 8 bits per pixel, no compression, a colour table of at most 256 4-byte entries.
    """
    if len(data) < 54 or data[:2] != b"BM":
        return None
    offset, hsize, width, height, planes, bpp, compression = struct.unpack_from("<I I i i H H I", data, 10)
    n_colors = struct.unpack_from("<I", data, 46)[0] or 256
    if hsize != 40 or planes != 1 or bpp != 8 or compression != 0 or width <= 0 or height == 0 or n_colors > 256:
        return None
    table = 14 + hsize
    if table + 4 * n_colors > offset or offset + (width + 3) // 4 * 4 * abs(height) > len(data):
        return None
    return width, abs(height), offset, height < 0, data[table:table + 4 * n_colors]


def _palette_lut(palette: bytes) -> np.ndarray | None:
    """Gray value of every palette index, as ITK computes it for a scalar read (None: identity table)."""
    bgr = np.frombuffer(palette, np.uint8).reshape(-1, 4)[:, :3].astype(np.float64)
    # itk::ConvertPixelBuffer::ConvertRGBToGray: (2125 R + 7154 G + 721 B) / 10000, truncated
    lut = ((2125.0 * bgr[:, 2] + 7154.0 * bgr[:, 1] + 721.0 * bgr[:, 0]) / 10000.0).astype(np.uint8)
    if len(lut) == 256 and np.array_equal(lut, np.arange(256, dtype=np.uint8)):
        return None
    return lut


def _read_bmp8_stack(files: list[Path]) -> np.ndarray | None:
    """Decode a stack of uncompressed 8-bit palette BMPs with NumPy (~10x faster than ITK), or None.

    Gives exactly what ``sitk.ReadImage(files, sitk.sitkUInt8)`` gives (palette → ITK luminance, bottom-up rows
    flipped). Returns None as soon as a file has another layout, size or an index outside its palette, so the
    ITK path (with its checks and error messages) handles everything else.
    """
    out: np.ndarray | None = None
    luts: dict[bytes, np.ndarray | None] = {}
    for i, f in enumerate(files):
        try:
            data = f.read_bytes()
        except OSError:
            return None
        head = _bmp8_header(data)
        if head is None:
            return None
        width, height, offset, top_down, palette = head
        if out is None:
            out = np.empty((len(files), height, width), np.uint8)
        elif out.shape[1:] != (height, width):
            return None
        stride = (width + 3) // 4 * 4  # rows are padded to 4 bytes
        rows = np.frombuffer(data, np.uint8, count=stride * height, offset=offset).reshape(height, stride)[:, :width]
        rows = rows if top_down else rows[::-1]
        if palette not in luts:
            luts[palette] = _palette_lut(palette)
        lut = luts[palette]
        if lut is None:
            out[i] = rows
        else:
            if len(lut) < 256 and int(rows.max()) >= len(lut):
                return None
            np.take(lut, rows, out=out[i], mode="wrap")  # indices checked above; "wrap" is the fast path
    return out


def _read_slices(folder: Path, files: list[Path]) -> sitk.Image | np.ndarray:
    """Stack a folder of 2D slices into a 3D image (axis 0 = slice number).

    Uncompressed 8-bit palette BMPs (OCTA-500) come back as a uint8 array decoded by :func:`_read_bmp8_stack`
    (default geometry, as ITK gives BMPs); everything else as a SimpleITK image.
    """
    ordered = _order_slices(folder, files)
    if all(file_suffix(f) == ".bmp" for f in ordered):
        fast = _read_bmp8_stack(ordered)
        if fast is not None:
            return fast
    first = _info(ordered[0])
    size0, type0 = first.GetSize(), _scalar_type(first)
    for f in ordered[1:]:
        r = _info(f)
        if r.GetSize() != size0:
            raise DataError(f"slice folder {folder}: {f.name} is {'×'.join(map(str, r.GetSize()))} but "
                            f"{ordered[0].name} is {'×'.join(map(str, size0))} (width×height); all slices of a "
                            "volume must have the same size: fix or remove the odd file")
        if _scalar_type(r) != type0:
            raise DataError(f"slice folder {folder}: {f.name} has pixel type "
                            f"{sitk.GetPixelIDValueAsString(r.GetPixelID())} but {ordered[0].name} has "
                            f"{sitk.GetPixelIDValueAsString(first.GetPixelID())}; re-export the slices with one "
                            "bit depth")
    if len(size0) != 2:
        raise DataError(f"slice folder {folder}: {ordered[0].name} is not a 2D image (size {size0}); a slice "
                        "folder must hold 2D images only")
    try:
        # A list of files + a scalar output type gives a 3D volume (palette/RGB BMPs come back as gray).
        return sitk.ReadImage([str(f) for f in ordered], type0)
    except RuntimeError as exc:
        # Headers were fine, so some file's pixel data is broken: find it to name it.
        for f in ordered:
            try:
                sitk.ReadImage(str(f), type0)
            except RuntimeError as exc1:
                raise DataError(f"cannot read slice {f}: {_sitk_reason(exc1)}; the file is corrupt or "
                                "truncated: re-export it") from exc1
        raise DataError(f"cannot stack the slices in {folder}: {_sitk_reason(exc)}") from exc


def _read_dicom(folder: Path) -> sitk.Image | None:
    """Read the DICOM series in ``folder`` (the largest one if several); ``None`` if there is none."""
    with _quiet_itk():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        return None
    names = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    chosen = max(series, key=lambda s: len(names[s]))
    if len(series) > 1:
        log.warning("DICOM folder %s holds %d series; reading the largest (%s, %d files). Put each series in "
                    "its own folder to choose another.", folder, len(series), chosen, len(names[chosen]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names[chosen])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"cannot read the DICOM series in {folder}: {_sitk_reason(exc)}; check that no file "
                        "is corrupt or truncated") from exc


def _read_folder(folder: Path) -> sitk.Image | np.ndarray:
    files = _visible_files(folder)
    if not files:
        sub = sorted(d.name for d in folder.iterdir() if d.is_dir())
        hint = f" (it only holds folders: {_short(sub, 5)})" if sub else ""
        raise DataError(f"empty folder {folder}{hint}: a scan folder must hold numbered 2D slices or a DICOM "
                        "series; check --data-root / the manifest path")
    slices = [f for f in files if file_suffix(f) in SLICE_EXTS]
    maybe_dicom = [f for f in files if file_suffix(f) in ("", ".dcm", ".ima")]
    if maybe_dicom or not slices:
        img = _read_dicom(folder)
        if img is not None:
            return img
    if slices:
        return _read_slices(folder, slices)
    raise DataError(f"{folder}: no 2D slices (.bmp/.png/.tif/.jpg) and no DICOM series found (files: "
                    f"{_short(sorted(f.name for f in files), 5)}); expected {_FORMATS_HELP}")


# ----------------------------------------------------------------------------------------------- public
def _read_any(path: str | Path, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a 2D or 3D scan of any supported kind; the workhorse behind the public readers."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; check --data-root / the manifest path")
    if p.is_dir():
        img = _read_folder(p)
    else:
        ext = file_suffix(p)
        if ext == ".npy":
            return _read_npy(p, spacing)
        if ext not in SITK_EXTS:
            raise DataError(f"{p}: unsupported file type '{ext or p.name}'; expected {_FORMATS_HELP}, or a 2D "
                            "image (.png/.jpg/.bmp/.tif)")
        img = _squeeze_4d(_read_sitk_file(p), p)
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


def _read_npy(p: Path, spacing: Sequence[float] | None) -> tuple[np.ndarray, Geometry]:
    try:
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


def read_volume(path: str | Path, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a 3D scan.

    Args:
        path: a folder of numbered 2D slices, a DICOM series folder, or a ``.nii``/``.nii.gz``/``.nrrd``/
            ``.mha``/``.mhd``/multi-page ``.tif``/``.npy`` file.
        spacing: voxel spacing in SimpleITK (x, y, z) order that replaces the file's (BMP stacks carry none).

    Returns:
        ``(array, geometry)``: the array in SimpleITK order ``(slices, rows, columns)`` with the file's dtype
        (uint8 stays uint8; colour pixels become luminance), and its :class:`Geometry`.

    Raises:
        DataError: missing path, empty folder, incomplete/duplicate slice numbering, slices of different sizes,
            unreadable or unsupported file, or a 2D image.
    """
    arr, geo = _read_any(path, spacing)
    if arr.ndim != 3:
        raise DataError(f"{path} is a 2D image of {arr.shape[0]}×{arr.shape[1]} pixels, not a 3D scan; give a "
                        f"volume ({_FORMATS_HELP}) or use --dim 2d")
    return arr, geo


def read_image_2d(path: str | Path) -> np.ndarray:
    """Read a 2D image as one grayscale channel.

    Args:
        path: a ``.png``/``.jpg``/``.bmp``/``.tif`` image (palette and RGB converted by luminance), or a 2D
            ``.npy``/NIfTI/NRRD/MHA file.

    Returns:
        ``(H, W)`` array; uint8 for 8-bit inputs, the file's dtype otherwise.

    Raises:
        DataError: missing/unreadable/unsupported file, or a 3D volume.
    """
    arr, _ = _read_2d_or_3d(path)
    if arr.ndim != 2:
        raise DataError(f"{path} is a 3D volume of shape {arr.shape}, not a 2D image; use --dim 3d or give a "
                        "2D image")
    return arr


def _read_2d_or_3d(path: str | Path, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Like :func:`_read_any`, but a 3D image with a single slice (e.g. a 2D NIfTI) counts as 2D."""
    arr, geo = _read_any(path, None)
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


def _check_values(arr: np.ndarray, what: str) -> None:
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


def load_subject(subject: Subject, modality: str) -> tuple[np.ndarray, Geometry]:
    """Read a subject's scan(s) as one channel-first array.

    Args:
        subject: a discovered subject. OCTA-500 subjects have ``paths`` keys ``"OCTA"``/``"OCT"``; manifest and
            2D-folder subjects have ``"image"`` (used whatever the modality).
        modality: ``"OCTA"``, ``"OCT"`` or ``"OCT+OCTA"`` (two channels, OCT first).

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
            raise DataError(f"subject {subject.id}: no {' or '.join(missing)} scan (has: "
                            f"{', '.join(sorted(subject.paths)) or 'nothing'}); choose --modality from those or "
                            "add the missing folder")
    # channels are copied into the output as they are read: the peak holds the output + one channel (not 2x all)
    out: np.ndarray | None = None
    geometry: Geometry | None = None
    for k, key in enumerate(keys):
        path = subject.paths[key]
        try:
            arr, geo = _read_2d_or_3d(path, subject.spacing)
        except DataError as exc:
            raise DataError(f"subject {subject.id}: {exc}") from exc
        kind = "image" if arr.ndim == 2 else "volume"
        what = f"subject {subject.id}: {kind if key == 'image' else key + ' ' + kind} {path}"
        _check_values(arr, what)
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
