"""One vendor file read through eyepy: the B-scan stack as stored, its spacing, laterality and scan pattern.

Each reader returns a :class:`RawScan` (array ``(S, D, W)`` = B-scan, depth, A-scan, as eyepy gives it) and leaves
the orientation and the geometry to :func:`octa3d.data.vendor.read_vendor`. Sizes are checked against
``--max-voxels`` from the header before the B-scans are decoded where the format allows it (.vol, XML, E2E,
.mat). Every failure of eyepy or of its dependencies on a damaged file (eyepy raises construct, ValueError,
OSError, KeyError ... errors) becomes a :class:`~octa3d.errors.DataError` naming the file.

eyepy 0.21 facts these readers rely on (checked against its source):

* ``HeVolReader(path, type)`` parses the whole .vol with its ``construct`` layout; its ``.volume`` adds layer
  annotations octa3d does not use (and logs a warning per file about their names), so the B-scans are taken from
  ``parsed_file`` and converted with eyepy's own intensity transform (``vol``: log-compressed 8-bit as HEYEX shows
  it; ``angio``: flow 0..1).
* E2E: eyepy sets the scale of E2E volumes to 1 pixel (it does not know where E2E keeps it): unit spacing.
* Topcon .fda: eyepy wraps oct-converter, which is not installed with octa3d (it requires ``opencv-python``, which
  conflicts with the ``opencv-python-headless`` that octa3d needs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import construct as cs
import numpy as np

from octa3d.data.imagefiles import check_voxels
from octa3d.errors import DataError

#: The vendor formats, key → name used in messages and scan records.
FORMATS: dict[str, str] = {
    "heyex-vol": "Heidelberg HEYEX .vol", "heyex-angio-vol": "Heidelberg HEYEX angiography .vol",
    "heyex-e2e": "Heidelberg HEYEX .e2e", "heyex-xml": "Heidelberg HEYEX XML export", "topcon-fda": "Topcon .fda",
    "duke-mat": "Duke AMD/control .mat"}
#: The device behind each format (none of these files names it except the XML export, whose value wins).
DEVICES: dict[str, str] = {
    "heyex-vol": "Heidelberg Spectralis", "heyex-angio-vol": "Heidelberg Spectralis",
    "heyex-e2e": "Heidelberg Spectralis", "heyex-xml": "Heidelberg Spectralis", "topcon-fda": "Topcon 3D OCT",
    "duke-mat": "Bioptigen SD-OCT (Duke AMD study)"}
#: HEYEX scan pattern codes (the .vol header's ``scan_pattern``, E2E's B-scan header).
SCAN_PATTERNS: dict[int, str] = {0: "unknown", 1: "single line", 2: "circle", 3: "volume (ART)", 4: "fast volume",
                                 5: "radial"}
#: Patterns that are not a raster of parallel B-scans: no volume (eyepy refuses them as well).
NOT_RASTER = (2, 5)
#: How to add what eyepy needs for Topcon .fda (its ``fda`` extra would pull opencv-python; see the module doc).
FDA_INSTALL = ("pip install --no-deps 'oct-converter>=0.6.1,<0.7' && pip install natsort pydicom h5py "
               "(--no-deps keeps octa3d's opencv-python-headless: oct-converter's opencv-python would clash with it)")

# The .vol file header: eyepy's own layout up to the localizer (2048 bytes), so that the size, spacing, laterality
# and scan pattern are known before the B-scans are read.
_VOL_HEADER: cs.Struct | None = None


@dataclass
class RawScan:
    """A vendor scan as stored (before orientation).

    Attributes:
        array: ``(S, D, W)``: B-scans, depth, A-scans.
        spacing: SimpleITK-order ``(x=A-scan, y=depth, z=B-scan)`` spacing in mm, or None when the file gives none.
        laterality: the eye as the file says (``OD``/``OS``/anything else = unknown).
        scan_pattern: what kind of scan, in words, or None.
        device: the device, where the file names it.
        notes: anything else worth recording.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    laterality: str = ""
    scan_pattern: str | None = None
    device: str | None = None
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def damaged(path: Path, fmt: str) -> Iterator[None]:
    """Turn whatever eyepy (or construct, scipy, imageio below it) raises on a damaged file into a DataError."""
    try:
        yield
    except DataError:
        raise
    except cs.StreamError as exc:  # construct ran out of bytes: a cut file
        # construct's message is "Error in path (parsing) -> bscans -> data\n<what was short>": the last line
        short = str(exc).strip().splitlines()[-1] if str(exc).strip() else "the data ends early"
        raise DataError(f"{path} is truncated or damaged (a {FORMATS[fmt]} whose data ends early: {short}); an "
                        "interrupted copy or download leaves such files: copy the file again or remove it") from exc
    except Exception as exc:  # noqa: BLE001 - eyepy and its readers raise many types for a broken file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {path} as a {FORMATS[fmt]}: {reason}; the file is damaged or not such an "
                        "export: export it again or remove it") from exc


def vol_header(path: Path) -> Any:
    """The parsed header of a HEYEX .vol (eyepy's layout), without reading its B-scans.

    Raises:
        DataError: not a .vol header (too short, or not one eyepy's layout can parse).
    """
    global _VOL_HEADER
    from eyepy.io.he.vol_reader import vol_format

    if _VOL_HEADER is None:
        _VOL_HEADER = cs.Struct(*[s for s in vol_format.subcons if s.name not in ("localizer", "bscans")])
    with damaged(path, "heyex-vol"), open(path, "rb") as f:
        return _VOL_HEADER.parse(f.read(_VOL_HEADER.sizeof()))


def check_pattern(path: Path, code: int) -> None:
    """Refuse a HEYEX scan that is not a raster of parallel B-scans (a circle or radial scan)."""
    if int(code) in NOT_RASTER:
        raise DataError(f"{path}: a {SCAN_PATTERNS[int(code)]} scan (HEYEX scan pattern {code}) is not a volume of "
                        "parallel B-scans; octa3d reads volume scans (patterns 3 and 4) and single B-scans "
                        "(pattern 1, as a 2D image)")


def read_vol(path: Path, angio: bool, max_voxels: int | None) -> RawScan:
    """A HEYEX .vol: structural (eyepy's ``vol`` intensities, uint8) or angiography (``angio``: float32 0..1)."""
    from eyepy.core.utils import intensity_transforms
    from eyepy.io.he.vol_reader import HeVolReader

    fmt = "heyex-angio-vol" if angio else "heyex-vol"
    head = vol_header(path)
    check_voxels(path, (head.size_x, head.size_y, head.n_bscans), max_voxels)
    check_voxels(path, (head.size_x_slo, head.size_y_slo), max_voxels, " (its localizer image)")
    check_pattern(path, head.scan_pattern)
    with damaged(path, fmt):
        bscans = HeVolReader(str(path), type="octa" if angio else "oct").parsed_file.bscans
        transform = intensity_transforms["angio" if angio else "vol"]
        out = None
        for i, b in enumerate(bscans):  # one B-scan at a time: the peak is the output plus one float B-scan
            img = transform(np.array(b.data, dtype=np.float32))  # the transforms write into their input
            if out is None:
                out = np.empty((len(bscans), *img.shape), img.dtype)
            out[i] = img
    if out is None:
        raise DataError(f"{path}: the {FORMATS[fmt]} holds no B-scan (its header says {head.n_bscans})")
    return RawScan(out, (float(head.scale_x), float(head.scale_y), float(head.distance)), str(head.scan_position),
                   SCAN_PATTERNS.get(int(head.scan_pattern), f"code {head.scan_pattern}"))


def read_xml(xml: Path, max_voxels: int | None) -> RawScan:
    """A HEYEX XML export (the .xml and the B-scan images beside it)."""
    from eyepy.io.he.xml_reader import HeXmlReader

    with damaged(xml, "heyex-xml"):
        reader = HeXmlReader(xml)
        v = reader.parsed_values
        if v["size_x"] and v["size_y"]:
            check_voxels(xml, (v["size_x"], v["size_y"], v["n_bscans"]), max_voxels)
        if v["n_bscans"] < 2:  # eyepy 0.21 computes the B-scan distance from consecutive B-scans and fails
            raise DataError(f"{xml}: a HEYEX XML export of {v['n_bscans']} B-scan(s); eyepy reads XML exports of "
                            "two or more B-scans: export a single B-scan as .vol instead")
        ev = reader.volume
        device = reader.xml_root[0].findtext(".//GeneralEquipment/ManufacturerModelName")
        maker = reader.xml_root[0].findtext(".//GeneralEquipment/Manufacturer")
    z = float(ev.scale_z)
    notes = [] if np.isfinite(z) and z > 0 else ["the B-scans share one position: unit B-scan distance"]
    spacing = (float(ev.scale_x), float(ev.scale_y), z if not notes else 1.0)
    named = " ".join(s for s in (maker, device) if s) or None
    return RawScan(np.asarray(ev.data), spacing, str(ev.laterality), "volume", named, notes)


def read_e2e(path: Path, max_voxels: int | None) -> RawScan:
    """A HEYEX .e2e: its first series that is a volume (as eyepy's ``import_heyex_e2e``), in pixel units."""
    from eyepy.io.he import HeE2eReader

    with damaged(path, "heyex-e2e"):
        reader = HeE2eReader(path)
        series = reader.series
        if not series:
            raise ValueError("no series in the file")
        with reader:
            for k, s in enumerate(series):
                first = s.get_meta()["bscan_meta"][0]
                code = int(first["scan_pattern"])
                if code in NOT_RASTER:
                    continue
                check_voxels(path, (first["size_x"], first["size_y"], s.n_bscans), max_voxels)
                ev = s.get_volume()
                notes = ["eyepy reads no physical spacing from E2E files: unit spacing (pixels)"]
                if len(series) > 1:
                    notes.append(f"series {k + 1} of {len(series)} (the first volume series; the file holds more)")
                return RawScan(np.asarray(ev.data), None, str(s.laterality()),
                               SCAN_PATTERNS.get(code, f"code {code}"), None, notes)
    raise DataError(f"{path}: the {FORMATS['heyex-e2e']} holds no volume scan ({len(series)} series, none a "
                    "raster of B-scans); export the volume scan")


def read_fda(path: Path) -> RawScan:
    """A Topcon .fda through eyepy's oct-converter wrapper (needs oct-converter; see :data:`FDA_INSTALL`)."""
    try:
        import oct_converter.readers  # noqa: F401 - only to say what is missing before eyepy's own ImportError
    except ImportError as exc:
        raise DataError(f"{path}: reading Topcon .fda files needs oct-converter, which octa3d does not install: "
                        f"{FDA_INSTALL}; or convert the file to NIfTI") from exc
    from eyepy.io import import_topcon_fda

    with damaged(path, "topcon-fda"):
        ev = import_topcon_fda(path)
    # eyepy's FDA reader sets no laterality (the metadata oct-converter returns has none it maps)
    return RawScan(np.asarray(ev.data), (float(ev.scale_x), float(ev.scale_y), float(ev.scale_z)),
                   str(ev.meta.get("laterality", "")), "volume (raster)")


def read_duke(path: Path, max_voxels: int | None) -> RawScan:
    """A Duke AMD/control .mat (Farsiu et al. 2013) with eyepy's reader; spacing from the dataset description."""
    import scipy.io as sio
    from eyepy.io import import_duke_mat

    with damaged(path, "duke-mat"):
        with open(path, "rb") as f:
            head = f.read(20)
        if head.startswith(b"MATLAB 7.3"):
            raise DataError(f"{path} is a MATLAB 7.3 (HDF5) .mat file; the Duke AMD/control dataset ships MATLAB 5 "
                            "files: re-save it with save(..., '-v7') or use the original file")
        names = {name: shape for name, shape, _ in sio.whosmat(str(path))}
        if "images" not in names or "layerMaps" not in names:
            raise DataError(f"{path} is not a Duke AMD/control .mat file: it holds {', '.join(sorted(names)) or 'no'}"
                            " variables, the dataset's hold 'images' and 'layerMaps'; give the dataset's own files")
        check_voxels(path, names["images"], max_voxels)
        ev = import_duke_mat(path)
    return RawScan(np.asarray(ev.data), (float(ev.scale_x), float(ev.scale_y), float(ev.scale_z)), "",
                   "volume (raster)")
