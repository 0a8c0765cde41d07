"""Vendor OCT exports (Heidelberg HEYEX .vol / .e2e / XML, Topcon .fda, Duke .mat) read through eyepy: which format a
path is, which files make one scan (structural + angiography), the scan as an array with its geometry, and what the
file says about the scan (the *scan record*, ``Subject.meta["scan"]``).

Formats (:data:`~octa3d.data.vendor_formats.FORMATS`) are recognised by extension and checked by their first bytes
(:func:`sniff`; a file with another extension but a vendor signature is read too):

* HEYEX ``.vol`` (``HSF-OCT-…``; files eyepy writes start ``ep-v``). A ``.vol`` whose name ends in ``angio``
  (``scan_Angio.vol``, ``Angio.vol``) is the angiography export of the structural ``.vol`` of the same name without
  it (``scan.vol``; for a bare ``Angio.vol`` the folder's only other ``.vol``): together they are one subject with
  an ``OCT`` and an ``OCTA`` channel (:func:`scan_paths`).
* HEYEX ``.e2e`` (``CMDb``), HEYEX XML export (a folder holding one ``<HEDX>`` .xml and its B-scan images, or the
  .xml), Topcon ``.fda`` (``FOCT``; needs oct-converter), Duke AMD/control ``.mat`` (``MATLAB 5.0``).
* Known formats octa3d does not read (Zeiss ``.img``, Topcon ``.fds``, Optovue ``.oct``, HEYEX ``.sdb``) are refused
  with the list of supported ones (:func:`unsupported`).

Arrays follow :mod:`octa3d.data.subject`: ``(S, D, W)`` = (B-scan, depth, A-scan), SimpleITK spacing ``(x = A-scan,
y = depth, z = B-scan)`` in mm. **Orientation**: a left eye (OS) is mirrored along the B-scan width (array axis 2),
so that every scan is seen as a right eye (OD); its geometry then has x direction -1 and its origin at the far
column, so each voxel keeps its physical position and a map exported in this geometry lies on the source. The scan
record says what was done. An eye of unknown laterality is left as stored.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from octa3d.data.imagefiles import file_suffix, read_info
from octa3d.data.subject import Geometry, Subject
from octa3d.data.vendor_formats import (DEVICES, FORMATS, SCAN_PATTERNS, RawScan, check_pattern, read_duke, read_e2e,
                                        read_fda, read_vol, read_xml, vol_header)
from octa3d.errors import DataError

__all__ = ["FORMATS", "VENDOR_HELP", "VendorScan", "heyex_xml", "is_vendor", "read_vendor", "retouch_case",
           "scan_info", "scan_paths", "sniff", "unsupported", "vendor_format", "vendor_subject"]

log = logging.getLogger("octa3d.data")

#: The formats read, for messages.
VENDOR_HELP = ("Heidelberg HEYEX .vol (with its …Angio.vol angiography export), .e2e and XML exports, Topcon .fda "
               "(with oct-converter), Duke AMD/control .mat, RETOUCH oct.mhd folders")
_BY_EXT = {".vol": "heyex-vol", ".e2e": "heyex-e2e", ".fda": "topcon-fda", ".mat": "duke-mat"}
_MAGIC = ((b"HSF-OCT-", "heyex-vol"), (b"ep-v", "heyex-vol"), (b"CMDb", "heyex-e2e"), (b"FOCT", "topcon-fda"),
          (b"MATLAB 5.0 MAT-file", "duke-mat"), (b"MATLAB 7.3 MAT-file", "duke-mat"))
#: Vendor formats octa3d knows of but does not read (eyepy 0.21 reads none of them).
UNSUPPORTED = {".img": "Zeiss Cirrus .img", ".fds": "Topcon .fds", ".oct": "Optovue/Bioptigen .oct",
               ".sdb": "Heidelberg HEYEX .sdb database"}
_ANGIO = re.compile(r"^(?P<base>.*?)[\s._-]*angio$", re.IGNORECASE)
_ORIENTED = "mirrored along the B-scan width (array axis 2): left eye (OS) shown as a right eye (OD)"


def sniff(path: Path) -> str | None:
    """The vendor format a file's first bytes announce, or None (also for an unreadable file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return None
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def heyex_xml(path: Path) -> Path | None:
    """The HEYEX XML of an export: ``path`` itself (an ``.xml`` whose root is ``<HEDX>``) or the one such file
    in the folder ``path``; None otherwise."""
    def is_heyex(f: Path) -> bool:
        try:
            with open(f, "rb") as fh:
                return b"<HEDX" in fh.read(512)
        except OSError:
            return False

    if path.is_file():
        return path if file_suffix(path) == ".xml" and is_heyex(path) else None
    try:  # scandir, names first: this runs for every scan folder read (400-slice OCTA-500 eyes included)
        with os.scandir(path) as it:
            xmls = [Path(e.path) for e in it if file_suffix(e.name) == ".xml" and not e.name.startswith(".")
                    and e.is_file()]
    except OSError:  # not a folder, or unreadable: the readers name the problem
        return None
    hits = [f for f in xmls if is_heyex(f)]
    if len(hits) > 1:
        raise DataError(f"{path} holds {len(hits)} HEYEX XML files ({', '.join(sorted(f.name for f in hits))}); "
                        "an export folder holds one scan: point at one of the .xml files")
    return hits[0] if hits else None


def _is_angio(path: Path) -> bool:
    return file_suffix(path) == ".vol" and _ANGIO.match(path.stem) is not None


def vendor_format(path: str | Path) -> str | None:
    """The vendor format of ``path`` from its name (a folder: whether it is a HEYEX XML export), else None.

    Args:
        path: a file or folder.

    Returns:
        A key of :data:`FORMATS`, or None for anything that is not a vendor export by name.
    """
    p = Path(path)
    if p.is_dir() or file_suffix(p) == ".xml":
        return "heyex-xml" if heyex_xml(p) is not None else None
    if _is_angio(p):
        return "heyex-angio-vol"
    return _BY_EXT.get(file_suffix(p))


def is_vendor(path: str | Path) -> bool:
    """True for a vendor export (by name; a folder or .xml by its HEYEX XML)."""
    return vendor_format(path) is not None


def unsupported(path: Path) -> DataError | None:
    """The error for a vendor format octa3d does not read (by extension), naming what it reads; else None."""
    name = UNSUPPORTED.get(file_suffix(path))
    if name is None:
        return None
    return DataError(f"{path}: {name} files are not supported; octa3d reads {VENDOR_HELP}, and NIfTI, NRRD, "
                     "MHA/MHD, DICOM, TIFF and .npy: convert the scan (e.g. with OCT-Converter) to one of those")


def _angio_base(path: Path) -> str:
    m = _ANGIO.match(path.stem)
    return m.group("base") if m else path.stem


def scan_paths(path: str | Path) -> dict[str, str]:
    """The channel files of the scan ``path`` belongs to: ``{"OCT": structural, "OCTA": angiography}`` (either may
    be absent). An angiography ``.vol`` brings its structural partner and vice versa (see the module docstring)."""
    p = Path(path)
    if file_suffix(p) != ".vol":
        return {"OCT": str(p)}
    try:
        vols = [p.parent / n for n in _vol_names(p.parent)]
    except OSError:
        vols = [p]
    plain = [f for f in vols if not _is_angio(f)]
    if _is_angio(p):
        base = _angio_base(p)
        partner = next((f for f in plain if f.stem.lower() == base.lower()), None)
        if partner is None and not base and len(plain) == 1:
            partner = plain[0]  # a bare Angio.vol beside one structural .vol
        return {"OCT": str(partner), "OCTA": str(p)} if partner else {"OCTA": str(p)}
    angio = [f for f in vols if _is_angio(f) and _angio_base(f).lower() == p.stem.lower()]
    if not angio and len(plain) == 1:
        angio = [f for f in vols if _is_angio(f) and not _angio_base(f)]
    return {"OCT": str(p), "OCTA": str(angio[0])} if angio else {"OCT": str(p)}


def _vol_names(folder: Path) -> tuple[str, ...]:
    """The ``.vol`` files of a folder, listed once per folder state: pairing every scan of a folder of thousands
    of exports must not list the folder once per scan. The state is the folder's mtime (it changes when files come
    or go); a folder changed in the last 2 s is listed again, as its mtime may not have ticked yet (coarse clocks)."""
    st = os.stat(folder)
    if time.time_ns() - st.st_mtime_ns < 2_000_000_000:
        return _list_vols(str(folder), -1)
    return _cached_vols(str(folder), st.st_mtime_ns)


def _list_vols(folder: str, mtime_ns: int) -> tuple[str, ...]:
    with os.scandir(folder) as it:
        return tuple(sorted(e.name for e in it if not e.name.startswith(".") and file_suffix(e.name) == ".vol"
                            and e.is_file()))


_cached_vols = functools.lru_cache(maxsize=256)(_list_vols)


def scan_id(paths: dict[str, str]) -> str:
    """A subject ID for a vendor scan: the structural file's name without extension (an angiography export alone:
    its name without ``angio``; a bare ``Angio.vol``: its folder's name; a HEYEX XML export folder: its name)."""
    if "OCT" in paths:
        p = Path(paths["OCT"])
        return p.name if p.is_dir() else p.name[: -len(file_suffix(p))] if file_suffix(p) else p.name
    p = Path(paths["OCTA"])
    return _angio_base(p) or p.parent.name


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class VendorScan:
    """A vendor scan as octa3d uses it: ``array`` ``(S, D, W)`` oriented as a right eye, its ``geometry`` and
    ``info`` (the scan record: format, device, laterality, what was done, scan pattern, spacing, stored shape)."""

    array: np.ndarray
    geometry: Geometry
    info: dict[str, Any]


def _laterality(text: str) -> str:
    t = str(text).strip().strip("\x00").upper()
    return "OD" if t in ("OD", "R", "RIGHT") else "OS" if t in ("OS", "L", "LEFT") else "unknown"


def _format_of(p: Path) -> str:
    """The format to read ``p`` as (by name, confirmed by its signature; by signature alone for another name),
    or a DataError saying what is supported."""
    fmt = vendor_format(p)
    if fmt == "heyex-xml":
        return fmt
    magic = sniff(p)
    if fmt is None:
        if magic is None:
            raise unsupported(p) or DataError(f"{p}: not a vendor export octa3d reads; it reads {VENDOR_HELP}")
        return magic  # a vendor file under another name
    if magic != ("heyex-vol" if fmt == "heyex-angio-vol" else fmt):
        what = "is empty" if p.stat().st_size == 0 else \
            f"does not start like one (it starts like {'a ' + FORMATS[magic] if magic else 'no vendor export'})"
        raise DataError(f"{p} is named like a {FORMATS[fmt]} but {what}: the file is damaged or not such an "
                        f"export (octa3d reads {VENDOR_HELP}); export it again or remove it")
    return fmt


def read_vendor(path: str | Path, spacing: tuple[float, ...] | None = None, *, max_voxels: int | None = None
                ) -> VendorScan:
    """Read one vendor scan through eyepy, oriented as a right eye.

    Args:
        path: a vendor file, or a HEYEX XML export folder.
        spacing: SimpleITK-order spacing that replaces the file's (``Subject.spacing``).
        max_voxels: the largest size a header may declare (``--max-voxels``; None: its default).

    Returns:
        The :class:`VendorScan`: uint8 for structural HEYEX/Topcon/Duke scans, float32 0..1 for angiography.

    Raises:
        DataError: naming the file: unsupported or damaged file, a scan that is not a volume, a missing optional
            dependency (Topcon .fda), or a header above ``max_voxels``.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; check --data-root / the manifest path")
    fmt = _format_of(p)
    if fmt in ("heyex-vol", "heyex-angio-vol"):
        raw = read_vol(p, fmt == "heyex-angio-vol", max_voxels)
    elif fmt == "heyex-xml":
        raw = read_xml(heyex_xml(p) or p, max_voxels)
    elif fmt == "heyex-e2e":
        raw = read_e2e(p, max_voxels)
    elif fmt == "topcon-fda":
        raw = read_fda(p)
    else:
        raw = read_duke(p, max_voxels)
    return _oriented(p, fmt, raw, spacing)


def _oriented(p: Path, fmt: str, raw: RawScan, spacing: tuple[float, ...] | None) -> VendorScan:
    """Mirror a left eye into a right eye's orientation; the geometry and the scan record that go with it."""
    arr = raw.array
    if arr.ndim != 3:
        raise DataError(f"{p}: eyepy returned an array of shape {arr.shape}, not B-scans × depth × A-scans")
    if spacing is not None and len(spacing) != 3:
        raise DataError(f"{p}: spacing {tuple(spacing)} has {len(spacing)} values but the scan is 3D")
    sp = tuple(float(s) for s in (spacing or raw.spacing or (1.0, 1.0, 1.0)))
    eye = _laterality(raw.laterality)
    if eye == "OS":
        arr = np.ascontiguousarray(arr[:, :, ::-1])
        geometry = Geometry(tuple(arr.shape), sp, ((arr.shape[2] - 1) * sp[0], 0.0, 0.0),
                            (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        orientation = _ORIENTED
    else:
        geometry = Geometry.default(arr.shape, sp)
        orientation = "as stored" + (" (laterality unknown)" if eye == "unknown" else "")
    info = {"format": fmt, "format_name": FORMATS[fmt], "device": raw.device or DEVICES[fmt], "laterality": eye,
            "orientation": orientation, "scan_pattern": raw.scan_pattern,
            "spacing_mm": list(sp) if (spacing or raw.spacing) else None, "shape": list(raw.array.shape),
            "notes": raw.notes}
    if eye == "OS":
        log.debug("%s: left eye mirrored to a right eye's orientation", p)
    return VendorScan(arr, geometry, info)


# ------------------------------------------------------------------------------------------------ scan record
def _group(value: Any) -> str:
    """A pseudonymous patient group from a header's patient ID: splits keep a patient's eyes together without the
    ID itself being written into split files."""
    text = str(value or "").strip().strip("\x00")
    if not text or text.lower() in ("unknown", "0", "none"):
        return ""
    return "patient-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def scan_info(path: str | Path) -> dict[str, Any]:
    """The scan record of a vendor file from its header alone (no B-scan decoded), for discovery.

    Args:
        path: a vendor file or HEYEX XML export folder.

    Returns:
        ``format``, ``format_name``, ``device``, ``laterality`` (``OD``/``OS``/``unknown``), ``orientation``,
        ``scan_pattern``, ``spacing_mm``, ``shape`` where the header gives them, and ``patient_group`` (a pseudonym
        of the header's patient ID, or ""). Formats whose header needs the whole file read (.e2e, .fda, .mat) give
        what is known without reading it; the full record is written when the scan is loaded. A damaged header
        gives the format only: the reader reports the damage when the scan is loaded.
    """
    p = Path(path)
    try:
        st = os.stat(p)
        return dict(_cached_info(str(p.resolve()), st.st_size, st.st_mtime_ns))
    except (OSError, DataError):
        fmt = vendor_format(p) or "heyex-vol"
        return {"format": fmt, "format_name": FORMATS[fmt], "device": DEVICES[fmt], "laterality": "unknown",
                "patient_group": ""}


@functools.lru_cache(maxsize=4096)
def _cached_info(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    p = Path(path)
    fmt = vendor_format(p) or sniff(p) or ""
    if fmt not in FORMATS:
        raise DataError(f"{p}: not a vendor export")
    out: dict[str, Any] = {"format": fmt, "format_name": FORMATS[fmt], "device": DEVICES[fmt],
                           "laterality": "unknown", "patient_group": ""}
    if fmt in ("heyex-vol", "heyex-angio-vol"):
        h = vol_header(p)
        check_pattern(p, h.scan_pattern)
        out.update(laterality=_laterality(h.scan_position), scan_pattern=SCAN_PATTERNS.get(int(h.scan_pattern)),
                   spacing_mm=[float(h.scale_x), float(h.scale_y), float(h.distance)],
                   shape=[int(h.n_bscans), int(h.size_y), int(h.size_x)], patient_group=_group(h.patient_id))
    elif fmt == "heyex-xml":
        from eyepy.io.he.xml_reader import HeXmlReader

        try:
            v = HeXmlReader(heyex_xml(p) or p).parsed_values
        except Exception as exc:  # noqa: BLE001 - a broken XML: reported when the scan is read
            raise DataError(str(exc)) from exc
        out.update(laterality=_laterality(v["scan_position"]), shape=[v["n_bscans"], v["size_y"], v["size_x"]],
                   patient_group=_group(v["patient_id"]))
    elif fmt == "duke-mat":
        out.update(scan_pattern="volume (raster)", spacing_mm=[0.0067, 0.0045, 0.067])  # eyepy's Duke values
    out["orientation"] = _ORIENTED if out["laterality"] == "OS" else "as stored" if out["laterality"] == "OD" \
        else "as stored (laterality unknown)" if fmt in ("heyex-vol", "heyex-angio-vol", "heyex-xml", "duke-mat") \
        else "read from the file when the scan is loaded"
    return out


# ------------------------------------------------------------------------------------------------ RETOUCH, subjects
#: RETOUCH's vendor folders (``RETOUCH-TrainingSet-Cirrus`` …): the word in the folder name → the device.
RETOUCH_DEVICES = {"cirrus": "Zeiss Cirrus", "spectralis": "Heidelberg Spectralis", "topcon": "Topcon T-1000/T-2000"}


def retouch_case(path: str | Path) -> Path | None:
    """The ``oct.mhd`` of a RETOUCH case folder (``TRAIN001/oct.mhd``), or None."""
    p = Path(path)
    return p / "oct.mhd" if p.is_dir() and (p / "oct.mhd").is_file() else None


def _retouch_info(mhd: Path) -> dict[str, Any]:
    """The scan record of a RETOUCH ``oct.mhd``: MetaImage (read by SimpleITK with its spacing), the device from the
    vendor folder it is in, laterality unknown (the dataset does not give it: the scan is left as stored)."""
    vendor = next((d for w, d in RETOUCH_DEVICES.items() for part in mhd.parts[-4:-2] if w in part.lower()), None)
    try:
        size = read_info(mhd).GetSize()
        spacing = list(read_info(mhd).GetSpacing())
    except DataError:  # a damaged header: the reader names it when the scan is loaded
        size, spacing = None, None
    return {"format": "retouch-mhd", "format_name": "RETOUCH MetaImage (oct.mhd)", "device": vendor or "unknown",
            "laterality": "unknown", "orientation": "as stored (laterality unknown)", "scan_pattern": "volume",
            "spacing_mm": spacing, "shape": list(reversed(size)) if size else None, "patient_group": ""}


def vendor_subject(path: str | Path, sid: str | None = None, label: str | None = None, group: str = "",
                   split: str | None = None, mask: str | None = None, meta: dict[str, Any] | None = None
                   ) -> Subject:
    """A :class:`Subject` for one vendor scan, its channels by modality (:func:`scan_paths`) and its scan record
    (:func:`scan_info`) in ``meta["scan"]``.

    Args:
        path: a vendor file, a HEYEX XML export folder, or a RETOUCH case folder (its ``reference.mhd``, when
            present, becomes the lesion mask).
        sid: the subject ID (default: :func:`scan_id`; a RETOUCH case: its folder name).
        label, split, mask, meta: as :class:`Subject`'s (``meta`` gets ``"scan"`` added).
        group: the patient group (default: the pseudonym of the header's patient ID, else the ID).
    """
    p = Path(path)
    case = retouch_case(p)
    if case is not None:
        paths, info = {"OCT": str(case)}, _retouch_info(case)
        ref = p / "reference.mhd"
        mask = mask or (str(ref) if ref.is_file() else None)
    else:
        paths = scan_paths(p)
        info = scan_info(paths.get("OCT") or paths["OCTA"])
    return Subject(id=sid or (p.name if case is not None else scan_id(paths)), label=label, paths=paths,
                   group=group or info.get("patient_group", ""), split=split, mask=mask,
                   meta={**(meta or {}), "scan": info})
