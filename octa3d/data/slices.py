"""A scan stored as a folder: numbered 2D slices (``1.bmp`` … ``400.bmp``, ``slice_001.png`` …) or a DICOM series.

Slices are stacked in *numeric* order along axis 0 (the OCTA-500 layout); the numbering must be complete and
unique. OCTA-500's 8-bit palette BMPs are decoded with NumPy (:func:`octa3d.data.bmp.read_bmp8_stack`), anything
else with SimpleITK. Every problem a user can fix raises :class:`~octa3d.errors.DataError` naming the folder or
file and the fix.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from octa3d.data.bmp import read_bmp8_stack
from octa3d.data.imagefiles import (FORMATS_HELP, SLICE_EXTS, check_complete, check_voxels, file_suffix, quiet_itk,
                                    read_info, scalar_type, short, sitk_reason)
from octa3d.errors import DataError

log = logging.getLogger("octa3d.data")

#: Files that file managers drop into folders (lower case); never slices.
JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})


def slice_number(path: str | Path) -> int | None:
    """The slice number in a slice file name: the last run of digits in its stem.

    ``"1.bmp"`` → 1, ``"slice_001.png"`` → 1, ``"scan2_slice_010.tif"`` → 10, ``"top.png"`` → ``None``.
    """
    name = os.path.basename(os.fspath(path))
    stem = os.path.splitext(name)[0] if not name.endswith(".") else name
    digits = re.findall(r"\d+", stem)
    return int(digits[-1]) if digits else None


def visible(folder: Path) -> list[Path]:
    """The entries (files and folders) of ``folder``, hidden ones (``.name``) left out."""
    return [c for c in folder.iterdir() if not c.name.startswith(".")]


def visible_files(folder: Path) -> list[Path]:
    """The files of ``folder`` a user put there: no hidden files, no ``Thumbs.db``/``desktop.ini``."""
    return [f for f in visible(folder) if f.is_file() and f.name.lower() not in JUNK_FILES]


@dataclass
class Numbering:
    """The slice numbers of a folder's slice files: which files carry none, which numbers repeat or are missing."""

    numbers: dict  # file (as given) -> its number or None
    unnumbered: list[str]      # names of files without a number
    duplicates: list[str]      # "2.bmp and 2 (copy).bmp" per repeated number
    missing: list[int]         # numbers absent between the lowest and the highest
    span: tuple[int, int] = (0, 0)  # lowest and highest number

    @property
    def ok(self) -> bool:
        """True when the files can be stacked: all numbered, unique and consecutive (or none numbered)."""
        return not self.duplicates and not self.missing and (not self.unnumbered or self.all_unnumbered)

    @property
    def all_unnumbered(self) -> bool:
        """No file carries a number: the name order is the only order there is."""
        return len(self.unnumbered) == len(self.numbers)


def number_slices(files: list[Path] | list[str]) -> Numbering:
    """Check the numbering of slice files (the one rule of :func:`order_slices` and the discovery-time check).

    Args:
        files: slice files, as paths or names.
    """
    numbers = {f: slice_number(f) for f in files}
    names = {f: os.path.basename(os.fspath(f)) for f in files}
    unnumbered = sorted(names[f] for f, n in numbers.items() if n is None)
    by_number: dict[int, list[str]] = {}
    for f, n in numbers.items():
        if n is not None:
            by_number.setdefault(n, []).append(names[f])
    if not by_number:
        return Numbering(numbers, unnumbered, [], [])
    dups = [" and ".join(sorted(names)) for n, names in sorted(by_number.items()) if len(names) > 1]
    lo, hi = min(by_number), max(by_number)
    missing = sorted(set(range(lo, hi + 1)) - set(by_number))
    return Numbering(numbers, unnumbered, dups, missing, (lo, hi))


def order_slices(folder: Path, files: list[Path]) -> list[Path]:
    """Sort slice files numerically and check the numbering is complete and unique.

    Raises:
        DataError: some files carry no number, a number repeats, or numbers are missing.
    """
    nb = number_slices(files)
    if nb.unnumbered and nb.all_unnumbered:
        # No numbers at all: the name order is the only order there is.
        log.warning("slices in %s carry no numbers; stacking them in name order", folder)
        return sorted(files, key=lambda f: f.name)
    if nb.unnumbered:
        raise DataError(f"slice folder {folder}: files without a slice number: {short(nb.unnumbered, 10)}; name "
                        "slices 1.bmp, 2.bmp, … and move other files out of the folder")
    if nb.duplicates:
        raise DataError(f"slice folder {folder}: duplicate slice numbers: {short(nb.duplicates, 10)}; keep one file "
                        "per slice number")
    if nb.missing:
        lo, hi = nb.span
        raise DataError(f"slice folder {folder}: missing {short(nb.missing)} (found {len(files)} slices numbered "
                        f"{lo}–{hi}); restore the missing slices or renumber them consecutively")
    return sorted(files, key=lambda f: nb.numbers[f])  # type: ignore[arg-type,return-value]


def _check_alike(folder: Path, ordered: list[Path]) -> int:
    """Check every slice has the first one's size and pixel type; return the scalar type to read them as."""
    first = read_info(ordered[0])
    size0, type0 = first.GetSize(), scalar_type(first)
    for f in ordered[1:]:
        r = read_info(f)
        if r.GetSize() != size0:
            raise DataError(f"slice folder {folder}: {f.name} is {'×'.join(map(str, r.GetSize()))} but "
                            f"{ordered[0].name} is {'×'.join(map(str, size0))} (width×height); all slices of a "
                            "volume must have the same size: fix or remove the odd file")
        if scalar_type(r) != type0:
            raise DataError(f"slice folder {folder}: {f.name} has pixel type "
                            f"{sitk.GetPixelIDValueAsString(r.GetPixelID())} but {ordered[0].name} has "
                            f"{sitk.GetPixelIDValueAsString(first.GetPixelID())}; re-export the slices with one "
                            "bit depth")
    if len(size0) != 2:
        raise DataError(f"slice folder {folder}: {ordered[0].name} is not a 2D image (size {size0}); a slice "
                        "folder must hold 2D images only")
    return type0


def read_slices(folder: Path, files: list[Path], max_voxels: int | None = None) -> sitk.Image | np.ndarray:
    """Stack a folder of 2D slices into a 3D image (axis 0 = slice number).

    Uncompressed 8-bit palette BMPs (OCTA-500) come back as a uint8 array decoded by
    :func:`~octa3d.data.bmp.read_bmp8_stack` (default geometry, as ITK gives BMPs); everything else as a
    SimpleITK image. The first slice's header bounds the stack's size (``max_voxels``) before anything is
    allocated, and every slice must hold the bytes its header declares.
    """
    ordered = order_slices(folder, files)
    size = read_info(ordered[0]).GetSize()
    check_voxels(folder, (*size[:2], len(ordered)), max_voxels, f" ({len(ordered)} slices the size of {ordered[0].name})")
    if all(file_suffix(f) == ".bmp" for f in ordered):
        fast = read_bmp8_stack(ordered)  # refuses (None) files shorter than their pixel data
        if fast is not None:
            return fast
    pixel_type = _check_alike(folder, ordered)
    for f in ordered:  # ITK stacks cut slices without complaint (uninitialised memory, gray or zeros)
        check_complete(f)
    try:
        # A list of files + a scalar output type gives a 3D volume (palette/RGB BMPs come back as gray).
        return sitk.ReadImage([str(f) for f in ordered], pixel_type)
    except RuntimeError as exc:
        # Headers were fine, so some file's pixel data is broken: find it to name it.
        for f in ordered:
            try:
                sitk.ReadImage(str(f), pixel_type)
            except RuntimeError as exc1:
                raise DataError(f"cannot read slice {f}: {sitk_reason(exc1)}; the file is corrupt or "
                                "truncated: re-export it") from exc1
        raise DataError(f"cannot stack the slices in {folder}: {sitk_reason(exc)}") from exc


def _looks_dicom(path: Path) -> bool:
    """A ``.dcm``/``.ima`` name, or the ``DICM`` magic after the 128-byte preamble."""
    if file_suffix(path) in (".dcm", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_dicom(folder: Path, candidates: list[Path] | None = None, max_voxels: int | None = None
               ) -> sitk.Image | None:
    """Read the DICOM series in ``folder`` (the largest one if several); ``None`` if there is none.

    Args:
        folder: the series folder.
        candidates: files that may be DICOM: any of them that is DICOM but in no series (GDCM leaves out files it
            cannot parse, e.g. a truncated one, and the volume would silently lose that slice) is an error.
        max_voxels: bound on the series' declared voxels (None: ``--max-voxels``' default).
    """
    with quiet_itk():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        return None
    names = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    chosen = max(series, key=lambda s: len(names[s]))
    if len(series) > 1:
        log.warning("DICOM folder %s holds %d series; reading the largest (%s, %d files). Put each series in "
                    "its own folder to choose another.", folder, len(series), chosen, len(names[chosen]))
    listed = {os.path.basename(n) for sid in series for n in names[sid]}
    orphans = sorted(f.name for f in candidates or [] if f.name not in listed and _looks_dicom(f))
    if orphans:
        raise DataError(f"DICOM folder {folder}: {short(orphans, 10)} belong(s) to no readable series (truncated or "
                        "damaged: the volume would lose those slices); copy them again or move them out")
    first = Path(names[chosen][0])
    size = read_info(first).GetSize()
    check_voxels(folder, (*size[:2], len(names[chosen])), max_voxels,
                 f" ({len(names[chosen])} files the size of {first.name})")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names[chosen])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"cannot read the DICOM series in {folder}: {sitk_reason(exc)}; check that no file "
                        "is corrupt or truncated") from exc


def read_folder(folder: Path, max_voxels: int | None = None) -> sitk.Image | np.ndarray:
    """A scan folder as a 3D image: its DICOM series if it holds one, else its stacked slices.

    Args:
        folder: the scan folder.
        max_voxels: bound on the declared voxels (None: ``--max-voxels``' default), checked from the headers
            before the volume is allocated.

    Raises:
        DataError: the folder is empty or holds neither slices nor a DICOM series (and every slice-stack error).
    """
    files = visible_files(folder)
    if not files:
        sub = sorted(d.name for d in folder.iterdir() if d.is_dir())
        hint = f" (it only holds folders: {short(sub, 5)})" if sub else ""
        raise DataError(f"empty folder {folder}{hint}: a scan folder must hold numbered 2D slices or a DICOM "
                        "series; check --data-root / the manifest path")
    slices = [f for f in files if file_suffix(f) in SLICE_EXTS]
    maybe_dicom = [f for f in files if file_suffix(f) in ("", ".dcm", ".ima")]
    if maybe_dicom or not slices:
        img = read_dicom(folder, maybe_dicom, max_voxels)
        if img is not None:
            return img
    if slices:
        return read_slices(folder, slices, max_voxels)
    raise DataError(f"{folder}: no 2D slices (.bmp/.png/.tif/.jpg) and no DICOM series found (files: "
                    f"{short(sorted(f.name for f in files), 5)}); expected {FORMATS_HELP}")
