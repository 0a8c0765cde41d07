"""One image file read with SimpleITK: supported extensions, the header, colour-to-grayscale, error messages.

Pixel types are kept as stored (uint8 BMPs stay uint8), except that colour pixels (palette or RGB(A)) become one
grayscale channel: SimpleITK/ITK converts them with the Rec. 709 luminance ``0.2125 R + 0.7154 G + 0.0721 B``
when a scalar output type is requested, which is what every reader here does.

The public readers are in :mod:`octa3d.data.readers`; folders (slice stacks, DICOM series) in
:mod:`octa3d.data.slices`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from octa3d.errors import DataError

#: Extensions of 2D raster images (a folder of these is a slice stack; one of them is a 2D image).
SLICE_EXTS: frozenset[str] = frozenset({".bmp", ".png", ".tif", ".tiff", ".jpg", ".jpeg"})
#: Extensions of volume files read by SimpleITK (``.tif``/``.tiff`` may be multi-page).
SITK_EXTS: frozenset[str] = frozenset({".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm",
                                       ".tif", ".tiff", ".bmp", ".png", ".jpg", ".jpeg"})
#: Every file extension the readers accept.
SUPPORTED_EXTS: frozenset[str] = SITK_EXTS | {".npy"}
#: The accepted scan formats, for error messages.
FORMATS_HELP = ("a folder of numbered 2D slices (.bmp/.png/.tif/.jpg), a DICOM series folder, "
                ".nii/.nii.gz, .nrrd, .mha/.mhd, multi-page .tif/.tiff or .npy")

# Vector (multi-component) pixel type -> the scalar type of one component. Asking SimpleITK for the scalar
# type makes ITK convert RGB/RGBA/palette pixels to luminance instead of returning vectors.
_VECTOR_TO_SCALAR = {
    sitk.sitkVectorUInt8: sitk.sitkUInt8, sitk.sitkVectorInt8: sitk.sitkInt8,
    sitk.sitkVectorUInt16: sitk.sitkUInt16, sitk.sitkVectorInt16: sitk.sitkInt16,
    sitk.sitkVectorUInt32: sitk.sitkUInt32, sitk.sitkVectorInt32: sitk.sitkInt32,
    sitk.sitkVectorFloat32: sitk.sitkFloat32, sitk.sitkVectorFloat64: sitk.sitkFloat64,
}


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


def strip_ext(name: str) -> str:
    """``name`` without a supported scan extension (``"10001.nii.gz"`` → ``"10001"``); other names unchanged."""
    low = name.lower()
    # At most one extension matches (none of them is the tail of another), so the set's order does not matter.
    return next((name[:-len(ext)] for ext in SUPPORTED_EXTS if low.endswith(ext)), name)


def short(items: Sequence[object], limit: int = 20) -> str:
    """``"a, b, c"`` with at most ``limit`` items and a ``(+N more)`` tail (lists in error messages)."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value (``"9" < "10"``, ``"a2" < "a10"``)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text) if t)


def sitk_reason(exc: Exception) -> str:
    """The useful last line of a SimpleITK exception (its first lines are C++ source locations)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__).replace("sitk::ERROR: ", "")


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's stderr warnings (e.g. GDCM's "No Series were found") while probing a folder."""
    old = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(old)


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(f"cannot read image {path}: {sitk_reason(exc)}; the file is corrupt, truncated or not "
                     "an image: re-export it or remove it")


def read_info(path: Path) -> sitk.ImageFileReader:
    """Header of one image file (no pixels read).

    Raises:
        DataError: naming the file, if it cannot be parsed.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, exc) from exc
    return reader


def scalar_type(reader: sitk.ImageFileReader) -> int:
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


def read_sitk_file(path: Path) -> sitk.Image:
    """Read one image/volume file with SimpleITK, colour pixels converted to grayscale.

    Raises:
        DataError: naming the file, if neither SimpleITK nor (for plain 2D rasters) Pillow can read it.
    """
    try:
        reader = read_info(path)
        return sitk.ReadImage(str(path), scalar_type(reader))
    except (DataError, RuntimeError) as exc:
        # Only plain 2D rasters: a Pillow-read TIFF would silently lose all pages but the first.
        if file_suffix(path) in (".png", ".jpg", ".jpeg", ".bmp"):
            try:
                return _read_with_pil(path)
            except Exception:  # noqa: BLE001 - the SimpleITK error below is the informative one
                pass
        if isinstance(exc, DataError):
            raise
        raise _unreadable(path, exc) from exc


def squeeze_4d(img: sitk.Image, path: Path) -> sitk.Image:
    """NIfTI often stores a 3D scan as 4D with one time point; drop that axis, refuse real 4D data."""
    if img.GetDimension() == 4:
        if img.GetSize()[3] == 1:
            return img[:, :, :, 0]
        raise DataError(f"{path} is a 4D image of size {img.GetSize()} (x, y, z, t); octa3d reads one 3D scan "
                        "per subject: split the time points into separate files")
    return img
