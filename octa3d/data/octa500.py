"""The OCTA-500 layout: the facts about its folders and field of view, and the per-eye lookups built on them.

As distributed::

    <root>/Text labels.xlsx                              ID, Gender, Age, OS/OD, Disease
    <root>/OCTA_6mm|OCTA_3mm/{OCTA,OCT}/<ID>/<n>.bmp     B-scans n = 1..S, depth rows x width columns
    <root>/OCTA_<fov>/Projection Maps/<type>/<ID>.bmp    en-face maps
    <root>/OCTA_<fov>/Lesion Masks/<ID>.nii.gz           ground-truth masks (synthetic data only)

The BMPs carry no physical size: the spacing comes from the field of view (:data:`FOV_LATERAL_MM` across both
B-scan directions, :data:`DEPTH_MM` along the A-scan) divided by the stack's size (:func:`octa500_spacing`).
Discovery of a whole dataset is :func:`octa3d.data.sources.discover`; one ``--input`` path becomes a subject
with :func:`subject_from_path`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from octa3d.data.identity import compile_group_regex, image_group
from octa3d.data.imagefiles import SLICE_EXTS, file_suffix, read_info, strip_ext
from octa3d.data.labels import read_label_table
from octa3d.data.slices import visible
from octa3d.data.subject import Subject
from octa3d.data.vendor import is_vendor, retouch_case, sniff, vendor_subject
from octa3d.errors import DataError

if TYPE_CHECKING:
    from octa3d.config import DataConfig

#: The fields of view, in the order discovery visits them.
FOVS: tuple[str, ...] = ("6mm", "3mm")
#: Physical size covered by an OCTA-500 scan across both B-scan directions, in mm, per field of view.
FOV_LATERAL_MM: dict[str, float] = {"6mm": 6.0, "3mm": 3.0}
#: Depth covered along the A-scan, in mm: 640 rows cover 2 mm in both FOVs; a resampled stack still covers 2 mm.
DEPTH_MM = 2.0
#: The per-modality folders of a field of view, each holding one ``<ID>/`` B-scan folder per eye.
MODALITIES: tuple[str, ...] = ("OCTA", "OCT")
PROJECTIONS_DIR = "Projection Maps"
MASKS_DIR = "Lesion Masks"
#: Lesion mask file types, in the order they are looked for.
MASK_EXTS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Label table names accepted in the dataset root (or a FOV folder), in order of preference (lower case).
LABEL_TABLE_NAMES: tuple[str, ...] = ("text labels.xlsx", "text labels.csv", "labels.xlsx", "labels.csv")


def fov_dir(root: str | Path, fov: str) -> Path:
    """The folder of field of view ``fov`` (``"6mm"`` → ``<root>/OCTA_6mm``)."""
    return Path(root) / f"OCTA_{fov}"


def octa500_spacing(scan_dir: str | Path, fov: str) -> tuple[float, float, float] | None:
    """SimpleITK-order (x=columns, y=rows, z=B-scans) spacing in mm of a B-scan folder, from its actual size.

    Args:
        scan_dir: an eye's ``OCTA/<ID>`` or ``OCT/<ID>`` folder of numbered slices.
        fov: ``"6mm"`` or ``"3mm"``.

    Returns:
        The spacing, or None when the folder holds no readable slice (the reader names the broken file when the
        volume is loaded).
    """
    try:
        slices = [f for f in visible(Path(scan_dir)) if f.is_file() and file_suffix(f) in SLICE_EXTS]
        if not slices:
            return None
        width, rows = read_info(slices[0]).GetSize()[:2]
    except (DataError, OSError, ValueError):
        return None
    return fov_spacing(fov, width, rows, len(slices))


def fov_spacing(fov: str, width: int, rows: int, n_slices: int) -> tuple[float, float, float]:
    """SimpleITK-order spacing in mm of a stack of ``n_slices`` B-scans of ``width`` × ``rows`` pixels."""
    lateral = FOV_LATERAL_MM[fov]
    return (lateral / width, DEPTH_MM / rows, lateral / n_slices)


def find_mask(fov_folder: Path, sid: str) -> Path | None:
    """The lesion mask ``<fov_folder>/Lesion Masks/<sid>.<ext>`` of eye ``sid``, or None."""
    return next((fov_folder / MASKS_DIR / f"{sid}{ext}" for ext in MASK_EXTS
                 if (fov_folder / MASKS_DIR / f"{sid}{ext}").is_file()), None)


def match_projection(folder: Path, wanted: str) -> Path | None:
    """The map-type folder of ``Projection Maps`` named ``wanted`` (exact, else case-insensitive), or None."""
    if not folder.is_dir():
        return None
    types = {d.name: d for d in visible(folder) if d.is_dir()}
    if wanted in types:
        return types[wanted]
    lower = {k.lower(): v for k, v in types.items()}
    return lower.get(wanted.lower())


def eyes_with_maps_only(fov_folder: Path, projection: str | None) -> dict[str, list[str]]:
    """Eyes of one field of view that have projection maps but no scan discovery would use: neither an ``OCT`` nor
    an ``OCTA`` folder, nor (``projection``: the map type ``--projection`` names) that map.

    Args:
        fov_folder: ``<root>/OCTA_<fov>``.
        projection: the requested map type for ``--dim 2d``, or None when volumes are needed (3D, ``compute``).

    Returns:
        Eye ID → the map types it has (what the user probably mistook for its scan), for such eyes only.
    """
    maps_root = fov_folder / PROJECTIONS_DIR
    if not maps_root.is_dir():
        return {}
    chosen = match_projection(maps_root, projection) if projection is not None else None
    have = set().union(*({d.name for d in visible(fov_folder / m) if d.is_dir()} for m in MODALITIES
                         if (fov_folder / m).is_dir()))
    out: dict[str, list[str]] = {}
    for tdir in sorted((d for d in visible(maps_root) if d.is_dir()), key=lambda d: d.name):
        for f in visible(tdir):
            if f.is_file() and file_suffix(f) in SLICE_EXTS and f.stem not in have:
                out.setdefault(f.stem, []).append(tdir.name)
    if chosen is not None:  # an eye with the chosen map is a 2D subject: discovery uses it
        for sid in [s for s, types in out.items() if chosen.name in types]:
            del out[sid]
    return out


def find_label_tables(root: Path, fov_dirs: Iterable[Path]) -> list[Path]:
    """``Text labels.xlsx`` (or .csv / labels.*) in the root, else one table per FOV folder (merged later)."""

    def named(folder: Path) -> list[Path]:
        hits = [f for f in visible(folder) if f.is_file() and f.name.lower() in LABEL_TABLE_NAMES]
        return sorted(hits, key=lambda f: LABEL_TABLE_NAMES.index(f.name.lower()))

    if named(root):
        return named(root)[:1]
    tables = []
    for folder in fov_dirs:
        # Fall back to any spreadsheet with "label" in its name inside the FOV folder.
        hits = named(folder) or sorted(f for f in visible(folder) if f.is_file() and "label" in f.name.lower()
                                       and f.suffix.lower() in (".xlsx", ".csv"))
        if hits:
            tables.append(hits[0])
    return tables


def octa500_labels(cfg: DataConfig, root: Path, fov_dirs: list[Path]) -> tuple[dict[str, str], str]:
    """ID → label of an OCTA-500 dataset (``--labels``, else the tables :func:`find_label_tables` finds).

    Returns:
        The labels and a description of where they came from (for messages).

    Raises:
        DataError: no table, or two tables give one ID different labels.
    """
    if cfg.labels:
        return read_label_table(cfg.labels), str(cfg.labels)
    tables = find_label_tables(root, fov_dirs)
    if not tables:
        raise DataError(f"no label table in {root} or {', '.join(d.name for d in fov_dirs)}: expected "
                        f"'{root / 'Text labels.xlsx'}' (ID and Disease columns); pass --labels FILE")
    merged: dict[str, str] = {}
    for t in tables:
        for sid, lab in read_label_table(t).items():
            if merged.get(sid, lab) != lab:
                raise DataError(f"label tables {', '.join(map(str, tables))}: ID {sid} is {merged[sid]} in one "
                                f"and {lab} in another; keep one label per ID")
            merged[sid] = lab
    return merged, ", ".join(map(str, tables))


def _sibling_paths(p: Path) -> dict[str, str]:
    """``{modality: folder}`` of an OCTA-500 eye folder and its other-modality sibling (``--modality OCT+OCTA``)."""
    if not (p.is_dir() and p.parent.name in MODALITIES):
        raise DataError(f"--input {p}: --modality OCT+OCTA needs an OCTA-500 subject folder .../OCTA/<ID> (or "
                        f".../OCT/<ID>) whose sibling folder holds the other modality")
    other = "OCT" if p.parent.name == "OCTA" else "OCTA"
    sibling = p.parent.parent / other / p.name
    if not sibling.is_dir():
        raise DataError(f"--input {p}: --modality OCT+OCTA needs the {other} scan of the same eye at {sibling}, "
                        f"which does not exist; use --modality {p.parent.name} or add that folder")
    return {p.parent.name: str(p), other: str(sibling)}


def subject_from_path(path: str | Path, data_cfg: DataConfig) -> Subject:
    """A :class:`Subject` for one scan (``--input``): a scan file, a slice/DICOM folder, or an OCTA-500 eye folder.

    An OCTA-500 folder (``.../OCTA_6mm/OCTA/<ID>``) gets the field-of-view spacing, its ``Projection Maps`` and,
    if present, its lesion mask; with ``data_cfg.modality == "OCT+OCTA"`` its sibling ``.../OCT/<ID>`` (or ``OCTA``)
    folder is the second
    channel. A vendor export (HEYEX .vol / .e2e / XML export, Topcon .fda, Duke .mat, RETOUCH case folder) gets its
    channels by modality and its scan record (:func:`octa3d.data.vendor.vendor_subject`). Anything else is read as
    one ``"image"``. The ID is the name without its scan extension; the subject
    is unlabelled and ``meta["input"]`` holds the path. A 2D image file gets the patient group that discovery of
    class folders gives it (``data_cfg.group_regex`` on its file name: ``CNV-6294785-1.jpeg`` → ``6294785``), so
    :func:`octa3d.data.leakage.training_overlap` finds the patient's other images; anything else is its own group.

    Raises:
        DataError: the path does not exist, or the sibling folder needed for OCT+OCTA is missing.
        ConfigError: ``data_cfg.group_regex`` is not a valid regular expression (2D image files only).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"--input {p}: no such file or folder")
    if is_vendor(p) or retouch_case(p) is not None or (p.is_file() and sniff(p)):
        return vendor_subject(p, meta={"input": str(p)})
    fov_folder = p.parent.parent
    fov = fov_folder.name.replace("OCTA_", "") if p.is_dir() else ""
    octa500 = p.is_dir() and p.parent.name in MODALITIES and fov in FOV_LATERAL_MM
    paths = _sibling_paths(p) if data_cfg.modality == "OCT+OCTA" else {"image": str(p)}
    mask = find_mask(fov_folder, p.name) if octa500 else None
    group = image_group(p.name, compile_group_regex(data_cfg.group_regex)) \
        if p.is_file() and file_suffix(p) in SLICE_EXTS else ""
    maps = fov_folder / PROJECTIONS_DIR
    projections = {d.name: str(d / f"{p.name}.bmp") for d in sorted(maps.iterdir())
                   if d.is_dir() and (d / f"{p.name}.bmp").is_file()} if octa500 and maps.is_dir() else {}
    return Subject(id=strip_ext(p.name), label=None, paths=paths, group=group,
                   spacing=octa500_spacing(p, fov) if octa500 else None, projections=projections,
                   mask=str(mask) if mask else None, meta={"input": str(p)})
