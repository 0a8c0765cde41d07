"""Manifest CSVs (``--source manifest``): ``subject,label,path[,group][,mask][,split]``, one row per scan.

``path`` may be any scan the readers take (:mod:`octa3d.data.readers`), vendor exports included (a ``.vol`` row
brings its angiography export along, :func:`octa3d.data.vendor.scan_paths`); relative paths are read from the
manifest's folder. ``group`` is the patient (both eyes in one split), ``mask`` a lesion mask of the scan, ``split``
the dataset's own split (``train``/``val``/``test``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from octa3d.data.imagefiles import SUPPORTED_EXTS, file_suffix, short
from octa3d.data.labels import (SPLIT_DIRS, handle_unlabeled, normalise_header, normalise_id, normalise_label,
                                read_label_table, skip_or_raise)
from octa3d.data.slices import visible
from octa3d.data.subject import Subject
from octa3d.data.vendor import VENDOR_HELP, is_vendor, retouch_case, sniff, unsupported, vendor_subject
from octa3d.errors import DataError

if TYPE_CHECKING:
    from octa3d.config import DataConfig

__all__ = ["discover_manifest"]

_MANIFEST_COLUMNS = {"subject": ("subject", "id", "subjectid"), "label": ("label", "disease", "class"),
                     "path": ("path", "image", "file", "filepath", "imagepath"), "group": ("group", "patient",
                     "patientid"), "mask": ("mask", "maskpath"), "split": ("split",)}


def discover_manifest(cfg: DataConfig, require_labels: bool = True) -> list[Subject]:
    """The subjects of the manifest ``cfg.data_root`` (a .csv, or a folder holding ``manifest.csv``).

    Args:
        cfg: the data settings (data_root, labels, skip_unlabeled).
        require_labels: False for scans whose labels are not used (subjects without a label are kept).

    Returns:
        One subject per row with a file: ``paths["image"]``, or for a vendor export its channels by modality and
        its scan record (:func:`~octa3d.data.vendor.vendor_subject`).

    Raises:
        DataError: missing/broken manifest or columns, unsupported files, missing files or labels (unless
            ``--skip-unlabeled``), a bad split value.
    """
    root = Path(cfg.data_root)
    csv = root if root.is_file() else next((f for f in visible(root) if f.name.lower() == "manifest.csv"),
                                           root / "manifest.csv")
    if not csv.is_file():
        raise DataError(f"{root}: no manifest.csv; write one with columns subject,label,path[,group][,mask]")
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:  # noqa: BLE001 - pandas raises several types for a broken CSV
        raise DataError(f"cannot read manifest {csv}: {exc}") from exc
    norm = {normalise_header(c): c for c in df.columns}
    cols = {key: next((norm[n] for n in names if n in norm), None) for key, names in _MANIFEST_COLUMNS.items()}
    required = ["subject", "path"] + ([] if cfg.labels or not require_labels else ["label"])
    absent = [k for k in required if cols[k] is None]
    if absent:
        raise DataError(f"manifest {csv}: no {', '.join(absent)} column (columns: {', '.join(map(str, df.columns))}"
                        "); the header must be subject,label,path[,group][,mask]")
    table = read_label_table(cfg.labels) if cfg.labels else None

    def cell(row: pd.Series, key: str) -> str:
        return str(row[cols[key]]).strip() if cols[key] is not None else ""

    def resolve(text: str) -> Path:
        p = Path(text).expanduser()
        return p if p.is_absolute() else csv.parent / p

    subjects, missing, no_label, no_image = [], [], [], []
    for i, row in df.iterrows():
        sid = normalise_id(cell(row, "subject"))
        if not sid:
            raise DataError(f"manifest {csv}: row {int(i) + 2} has an empty subject ID")
        label = table.get(sid) if table is not None else (normalise_label(cell(row, "label")) or None)
        path_text = cell(row, "path")
        if not path_text:
            no_image.append(sid)
            continue
        path = resolve(path_text)
        if not path.exists():
            missing.append((sid, f"{sid} ({path_text})"))
            continue
        refused = unsupported(path) if path.is_file() else None
        if refused is not None or (path.is_file() and file_suffix(path) not in SUPPORTED_EXTS and not sniff(path)):
            raise DataError(f"manifest {csv}: subject {sid}: {refused or f'unsupported file type {path.name}'}; use "
                            f"a NIfTI/NRRD/MHA/.npy/TIFF/PNG/JPG/BMP file, a folder of slices/DICOM, or {VENDOR_HELP}")
        mask_text = cell(row, "mask")
        mask = resolve(mask_text) if mask_text else None
        if mask is not None and not mask.exists():
            raise DataError(f"manifest {csv}: subject {sid}: its mask {mask} does not exist; restore it or clear "
                            "the mask cell (paths are relative to the manifest's folder)")
        split = cell(row, "split").lower() or None
        if split is not None and split not in SPLIT_DIRS:
            raise DataError(f"manifest {csv}: subject {sid}: split '{split}' is not train, val or test")
        if label is None:
            no_label.append(sid)
        split, mask_path = SPLIT_DIRS[split] if split else None, str(mask) if mask else None
        if is_vendor(path) or retouch_case(path) or (path.is_file() and sniff(path)):
            subjects.append(vendor_subject(path, sid, label, cell(row, "group"), split, mask_path))
        else:
            subjects.append(Subject(id=sid, label=label, paths={"image": str(path)}, group=cell(row, "group"),
                                    split=split, mask=mask_path))
    if missing:
        skip_or_raise(cfg, f"manifest {csv}: {len(missing)} subject(s) point to files that do not exist: "
                           f"{short([m for _, m in missing], 10)}",
                      f"restore the files or fix the paths (relative to {csv.parent}), or pass --skip-unlabeled to "
                      "skip them")
    if table is not None:  # labels whose ID has no manifest row at all (rows without a file are listed above)
        listed = {s.id for s in subjects} | set(no_image) | {sid for sid, _ in missing}
        no_image += [sid for sid in table if sid not in listed]
    if not require_labels:
        return subjects
    handle_unlabeled(cfg, no_label, no_image, f"manifest {csv}")
    return [s for s in subjects if s.label is not None]
