"""One image file read with SimpleITK: supported extensions, the header, colour-to-grayscale, error messages.

Pixel types are kept as stored (uint8 BMPs stay uint8), except that colour pixels (palette or RGB(A)) become one
grayscale channel: SimpleITK/ITK converts them with the Rec. 709 luminance ``0.2125 R + 0.7154 G + 0.0721 B``
when a scalar output type is requested, which is what every reader here does.

Damaged files never pass as data: a header declaring more than ``--max-voxels`` is refused before any pixel is
allocated (:func:`check_voxels`), and a file shorter than its header says (an interrupted copy) is refused before
it is decoded (:func:`check_complete`: BMP, JPEG, multi-page TIFF, NIfTI; the other decoders fail by themselves).

The public readers are in :mod:`octa3d.data.readers`; folders (slice stacks, DICOM series) in
:mod:`octa3d.data.slices`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from octa3d.config.schema import DataConfig
from octa3d.data.bmp import BMP_HEAD, bmp_dims
from octa3d.data.nifti import nifti_damage
from octa3d.errors import DataError

#: Default bound on a file's declared voxels/pixels (``--max-voxels``); the schema's default is the one truth.
MAX_VOXELS: int = next(int(f.default) for f in fields(DataConfig) if f.name == "max_voxels")

#: Extensions of 2D raster images (a folder of these is a slice stack; one of them is a 2D image).
SLICE_EXTS: frozenset[str] = frozenset({".bmp", ".png", ".tif", ".tiff", ".jpg", ".jpeg"})
#: Extensions of volume files read by SimpleITK (``.tif``/``.tiff`` may be multi-page).
SITK_EXTS: frozenset[str] = frozenset({".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm",
                                       ".tif", ".tiff", ".bmp", ".png", ".jpg", ".jpeg"})
#: Extensions of the vendor exports read through eyepy (:mod:`octa3d.data.vendor`; an .xml only when it is a
#: HEYEX export).
VENDOR_EXTS: frozenset[str] = frozenset({".vol", ".e2e", ".fda", ".mat", ".xml"})
#: Every file extension the readers accept.
SUPPORTED_EXTS: frozenset[str] = SITK_EXTS | {".npy"} | VENDOR_EXTS
#: The accepted scan formats, for error messages.
FORMATS_HELP = ("a folder of numbered 2D slices (.bmp/.png/.tif/.jpg), a DICOM series folder, "
                ".nii/.nii.gz, .nrrd, .mha/.mhd, multi-page .tif/.tiff, .npy, or a vendor export (Heidelberg "
                ".vol/.e2e/HEYEX XML, Topcon .fda, Duke .mat)")

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
    if len(lines) > 1 and lines[-1].startswith("Reason: "):  # a stale errno ("No such file or directory")
        lines.pop()
    last = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", last.replace("sitk::ERROR: ", ""))


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's stderr warnings (e.g. GDCM's "No Series were found") while probing a folder."""
    old = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(old)


def check_voxels(path: str | Path, size: Sequence[int], max_voxels: int | None, note: str = "") -> None:
    """Refuse a declared size above ``--max-voxels`` before anything of that size is allocated.

    Args:
        path: the file or folder (named in the message).
        size: declared dimensions (any order), e.g. ITK's ``(x, y, z)`` or ``(width, height, slices)``.
        max_voxels: the bound (None: :data:`MAX_VOXELS`).
        note: how the size was declared, appended to the message (e.g. ``" (400 slices of 1.bmp's size)"``).

    Raises:
        DataError: naming the file, the declared size and ``--max-voxels``.
    """
    limit = MAX_VOXELS if max_voxels is None else int(max_voxels)
    n = math.prod(int(v) for v in size)
    if n > limit:
        raise DataError(f"{path}: its header declares {'×'.join(map(str, size))} = {n:,} voxels{note}, more than "
                        f"--max-voxels {limit:,}; the header is damaged or this is not a scan (refused before "
                        "reading it); raise --max-voxels if the scan is genuinely that large")


def _jpeg_damage(data: bytes) -> str | None:
    """Why a JPEG stream is incomplete (no end-of-image marker after its scans), or None.

    libjpeg only warns about a cut stream ("Premature end of JPEG file") and fills the rest with gray, so the
    markers are walked here: segments are skipped by their length (an EXIF thumbnail's own end marker is inside
    one), entropy-coded data by scanning for the next marker (0xFF is stuffed as FF00 there).
    """
    if data[:2] != b"\xff\xd8":
        return None  # not a JPEG stream: the decoder names the problem
    pos, n = 2, len(data)
    while pos + 2 <= n:
        if data[pos] != 0xFF:  # stray bytes between segments: libjpeg skips them with a warning, so do we
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xD9:
            return None
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte / parameterless markers
            pos += 1 if marker == 0xFF else 2
            continue
        if pos + 4 > n:
            break
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            m = _JPEG_MARKER.search(data, pos)
            pos = m.start() if m else n
    return f"the stream ends at byte {n} without its end-of-image marker"


_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _tiff_damage(path: Path, size: int) -> str | None:
    """Why a (multi-page) TIFF lacks bytes its directories point to, or None.

    libtiff stops at a page directory beyond the end of the file and ITK then returns the pages before it: a cut
    multi-page TIFF silently loses pages. Every directory and every strip/tile it lists must lie inside the file.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return None  # not TIFF: the decoder names the problem
        e = "<" if head[:2] == b"II" else ">"
        big = struct.unpack_from(e + "H", head, 2)[0] == 43
        if big and len(head) < 16:
            return "the header is cut short"
        # classic TIFF: 2-byte counts, 12-byte entries, 4-byte offsets; BigTIFF: 8, 20, 8
        cnt_fmt, ent, off_fmt = (("Q", 20, "Q") if big else ("H", 12, "I"))
        inline = 8 if big else 4
        offset = struct.unpack_from(e + off_fmt, head, 8 if big else 4)[0]
        sizes = {1: 1, 2: 1, 3: 2, 4: 4, 6: 1, 7: 1, 8: 2, 9: 4, 16: 8, 17: 8}
        fmt = {1: "B", 3: "H", 4: "I", 16: "Q"}
        seen: set[int] = set()
        page = 0
        while offset and offset not in seen:
            seen.add(offset)
            page += 1
            f.seek(offset)
            raw = f.read(struct.calcsize(cnt_fmt))
            if len(raw) < struct.calcsize(cnt_fmt):
                return f"page {page}'s directory (at byte {offset}) lies beyond the end of the file ({size} bytes)"
            count = struct.unpack(e + cnt_fmt, raw)[0]
            table = f.read(count * ent + struct.calcsize(off_fmt))
            if len(table) < count * ent + struct.calcsize(off_fmt):
                return f"page {page}'s directory (at byte {offset}) is cut short by the end of the file"
            tags: dict[int, list[int]] = {}
            for k in range(count):
                tag, typ, n = struct.unpack_from(e + ("HHQ" if big else "HHI"), table, k * ent)
                if tag not in (273, 279, 324, 325) or typ not in fmt:
                    continue
                vpos = k * ent + (12 if big else 8)
                nbytes = n * sizes[typ]
                if nbytes <= inline:
                    buf = table[vpos:vpos + nbytes]
                else:
                    where = struct.unpack_from(e + off_fmt, table, vpos)[0]
                    if where + nbytes > size:
                        return f"page {page}'s strip table lies beyond the end of the file ({size} bytes)"
                    f.seek(where)
                    buf = f.read(nbytes)
                tags[tag] = list(struct.unpack(e + fmt[typ] * n, buf))
            for offs, counts in ((273, 279), (324, 325)):
                end = max((o + c for o, c in zip(tags.get(offs, []), tags.get(counts, []))), default=0)
                if end > size:
                    return f"page {page}'s pixel data needs {end} bytes but the file has {size}"
            offset = struct.unpack_from(e + off_fmt, table, count * ent)[0]
    return None


def check_complete(path: Path) -> None:
    """Refuse a file shorter than its own header says (an interrupted copy or a partly extracted archive).

    Decoders do not always notice: ITK fills a cut BMP or NIfTI with whatever memory held (or zeros), libjpeg
    fills a cut JPEG with gray, and a cut multi-page TIFF loses its last pages. BMP, JPEG, TIFF and NIfTI files are
    checked here; PNG, NRRD, MetaImage and ``.npy`` readers already fail on missing bytes.

    Raises:
        DataError: naming the file and what is missing.
    """
    ext = file_suffix(path)
    try:
        size = path.stat().st_size
        if ext == ".bmp":
            with open(path, "rb") as f:
                dims = bmp_dims(f.read(BMP_HEAD), size)
            reason = dims[len("truncated ("):-1] if isinstance(dims, str) and dims.startswith("truncated") else None
        elif ext in (".jpg", ".jpeg"):
            reason = _jpeg_damage(path.read_bytes())
        elif ext in (".tif", ".tiff"):
            reason = _tiff_damage(path, size)
        elif ext in (".nii", ".nii.gz"):
            reason = nifti_damage(path)
        else:
            return
    except (OSError, struct.error) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        raise DataError(f"{path} is truncated or damaged ({reason}); an interrupted copy or download leaves such "
                        "files: copy the file again or remove it")


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


def _read_with_pil(path: Path, max_voxels: int | None) -> sitk.Image:
    """Fallback for 2D rasters ITK cannot decode (e.g. gray+alpha PNG); Pillow comes with scikit-image."""
    from PIL import Image

    with Image.open(path) as im:  # opening reads the header only: check the size before decoding
        check_voxels(path, im.size, max_voxels)
        if im.mode not in ("L", "I", "I;16", "F"):
            im = im.convert("L")  # luminance, like ITK's colour-to-scalar conversion
        arr = np.asarray(im)
    return sitk.GetImageFromArray(arr)


def read_sitk_file(path: Path, max_voxels: int | None = None) -> sitk.Image:
    """Read one image/volume file with SimpleITK, colour pixels converted to grayscale.

    The header is read first: a declared size above ``max_voxels`` and a file shorter than its header says
    (:func:`check_complete`) are refused before any pixel is read.

    Args:
        path: the file.
        max_voxels: bound on the declared voxels/pixels (None: :data:`MAX_VOXELS`, ``--max-voxels``' default).

    Raises:
        DataError: naming the file, if it is too large, truncated, or neither SimpleITK nor (for plain 2D rasters)
            Pillow can read it.
    """
    try:
        reader = read_info(path)
    except DataError as exc:
        return _fallback(path, exc, max_voxels)
    check_voxels(path, reader.GetSize(), max_voxels)
    check_complete(path)
    try:
        return sitk.ReadImage(str(path), scalar_type(reader))
    except RuntimeError as exc:
        return _fallback(path, _unreadable(path, exc), max_voxels)


def _fallback(path: Path, error: DataError, max_voxels: int | None) -> sitk.Image:
    """Pillow for a plain 2D raster that ITK cannot read, else raise ``error`` (ITK's, the informative one).

    Only plain 2D rasters: a Pillow-read TIFF would silently lose all pages but the first.
    """
    if file_suffix(path) in (".png", ".jpg", ".jpeg", ".bmp"):
        check_complete(path)
        try:
            return _read_with_pil(path, max_voxels)
        except DataError:
            raise
        except Exception:  # noqa: BLE001 - the SimpleITK error is the informative one
            pass
    raise error from error.__cause__


def squeeze_4d(img: sitk.Image, path: Path) -> sitk.Image:
    """NIfTI often stores a 3D scan as 4D with one time point; drop that axis, refuse real 4D data."""
    if img.GetDimension() == 4:
        if img.GetSize()[3] == 1:
            return img[:, :, :, 0]
        raise DataError(f"{path} is a 4D image of size {img.GetSize()} (x, y, z, t); octa3d reads one 3D scan "
                        "per subject: split the time points into separate files")
    return img
