"""Discovery of datasets of vendor exports (``--source vendor``; auto-detected by :func:`vendor_layout`).

Layouts, recognised from the folder structure:

* ``duke``: the Duke AMD / control dataset (Farsiu et al., Ophthalmology 2013) as distributed,
  ``<root>/AMD/*.mat`` and ``<root>/Control/*.mat``: the class is the folder (AMD → ``AMD``, Control → ``NORMAL``,
  the dataset's normal eyes, so that ``--task binary`` works with its default ``--negative NORMAL``);
* ``retouch``: the RETOUCH challenge data, ``<root>/<…Cirrus|Spectralis|Topcon…>/<case>/oct.mhd`` (+ the fluid
  reference ``reference.mhd``, which becomes the case's lesion mask): RETOUCH gives no diagnosis per volume, so
  labels come from ``--labels`` or a label table in the root (``labels.csv``/``labels.xlsx``; IDs = case folder
  names such as ``TRAIN001``);
* ``class-folders``: ``<root>/[train|val|test/]<CLASS>/<scan>``, a scan being a vendor file or a HEYEX XML export
  folder: the class is the folder (as for 2D class folders), existing train/val/test folders are honoured;
* ``files``: ``<root>/<scan>`` …: labels from ``--labels`` or a label table in the root (IDs = file names without
  extension).

A structural ``.vol`` and its angiography export (``scan.vol`` + ``scan_Angio.vol``) are one subject with ``OCT``
and ``OCTA`` channels; IDs are file names without extension (:func:`~octa3d.data.vendor.scan_id`). Every subject
carries its scan record (``meta["scan"]``) and, where the header names the patient, a pseudonymous patient group.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from octa3d.data.imagefiles import file_suffix, natural_key, short
from octa3d.data.labels import SPLIT_DIRS, handle_unlabeled, normalise_label, read_label_table, skip_or_raise
from octa3d.data.octa500 import find_label_tables
from octa3d.data.slices import visible
from octa3d.data.subject import Subject
from octa3d.data.vendor import RETOUCH_DEVICES, VENDOR_HELP, heyex_xml, retouch_case, scan_paths, vendor_format, vendor_subject
from octa3d.errors import DataError

if TYPE_CHECKING:
    from octa3d.config import DataConfig

__all__ = ["LAYOUTS", "discover_vendor", "folder_scans", "vendor_layout"]

log = logging.getLogger("octa3d.data")

LAYOUTS = ("duke", "retouch", "class-folders", "files")
#: Duke class folder names (lower case) → label.
DUKE_CLASSES = {"amd": "AMD", "control": "NORMAL", "controls": "NORMAL", "normal": "NORMAL"}
_RETOUCH_DIR = re.compile("|".join(RETOUCH_DEVICES), re.IGNORECASE)
_FILE_FORMATS = frozenset({".vol", ".e2e", ".fda", ".mat"})


def _entry_is_scan(entry: os.DirEntry) -> bool:
    """A folder entry is a vendor scan: a vendor file by name, a HEYEX .xml, or a HEYEX XML export folder (the
    listing's file types only: class folders of 2D datasets hold ~100k images and are probed here too)."""
    if entry.name.startswith("."):
        return False
    suffix = file_suffix(entry.name)
    if suffix in _FILE_FORMATS:
        return True
    if suffix == ".xml" or entry.is_dir():
        try:
            return heyex_xml(Path(entry.path)) is not None
        except DataError:
            return True  # an export folder with two XMLs: a scan the reader will refuse by name
    return False


def _has_scan(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(_entry_is_scan(e) for e in it)
    except OSError:
        return False


def _split_dirs(root: Path) -> dict[str, Path]:
    return {SPLIT_DIRS[d.name.lower()]: d for d in visible(root) if d.is_dir() and d.name.lower() in SPLIT_DIRS}


def _retouch_dirs(root: Path) -> list[Path]:
    return [d for d in visible(root) if d.is_dir() and _RETOUCH_DIR.search(d.name)
            and any(retouch_case(c) for c in visible(d) if c.is_dir())]


def vendor_layout(root: str | Path) -> str | None:
    """Which vendor layout the folder ``root`` holds (:data:`LAYOUTS`), or None.

    A folder that is itself one scan (a HEYEX XML export, a RETOUCH case) is no dataset: None.
    """
    p = Path(root)
    if not p.is_dir() or heyex_xml(p) is not None or retouch_case(p) is not None:
        return None
    if _has_scan(p):
        return "files"
    if _retouch_dirs(p):
        return "retouch"
    bases = list(_split_dirs(p).values()) or [p]
    classes = [d for b in bases for d in visible(b) if d.is_dir() and _has_scan(d)]
    if not classes:
        return None
    duke = all(d.name.lower() in DUKE_CLASSES for d in classes) and all(
        file_suffix(f) == ".mat" for d in classes for f in visible(d) if f.is_file() and _is_scan_file(f))
    return "duke" if duke else "class-folders"


def _is_scan_file(f: Path) -> bool:
    return file_suffix(f) in _FILE_FORMATS or (file_suffix(f) == ".xml" and heyex_xml(f) is not None)


def folder_scans(folder: Path) -> list[dict[str, str]]:
    """The scans directly in ``folder``: vendor files and HEYEX XML export folders, a structural ``.vol`` and its
    angiography export as one scan (channel → path), in natural order of their names."""
    entries = sorted((c for c in visible(folder) if not c.name.startswith(".")), key=lambda c: natural_key(c.name))
    out, taken = [], set()
    for c in entries:
        if str(c) in taken or not (_is_scan_file(c) if c.is_file() else c.is_dir() and vendor_format(c)):
            continue
        paths = scan_paths(c)
        if any(v in taken for v in paths.values()):
            continue
        taken.update(paths.values())
        out.append(paths)
    return out


def _subjects_in(folder: Path, label: str | None, split: str | None) -> list[Subject]:
    return [vendor_subject(paths.get("OCT") or paths["OCTA"], label=label, split=split) for paths in
            folder_scans(folder)]


def discover_vendor(cfg: DataConfig, require_labels: bool = True, keep_unreadable: bool = False) -> list[Subject]:
    """The subjects of a vendor dataset at ``cfg.data_root`` (any of :data:`LAYOUTS`).

    Args:
        cfg: the data settings (data_root, labels, modality, skip_unlabeled).
        require_labels: False for scans whose labels are not used: subjects keep ``label=None`` where none is found.
        keep_unreadable: keep subjects lacking the ``--modality`` channel (``--mode predict`` skips them one by one,
            with the reason); otherwise they stop discovery (or are skipped with ``--skip-unlabeled``).

    Raises:
        DataError: no vendor layout there, labels missing (unless not required or ``--skip-unlabeled``), or
            subjects lacking the modality's channel.
    """
    root = Path(cfg.data_root)
    layout = vendor_layout(root)
    if layout is None:
        raise DataError(f"{root}: no vendor dataset there (expected vendor exports ({', '.join(LAYOUTS)} layout): "
                        "files such as scan.vol, class folders <CLASS>/scan.vol, Duke AMD/ and Control/ .mat folders, "
                        "or RETOUCH Cirrus/Spectralis/Topcon case folders)")
    if layout in ("duke", "class-folders"):
        splits = _split_dirs(root)
        subjects = []
        for split, base in (sorted(splits.items()) or [(None, root)]):
            for cdir in sorted((d for d in visible(base) if d.is_dir()), key=lambda d: d.name):
                name = DUKE_CLASSES.get(cdir.name.lower()) if layout == "duke" else normalise_label(cdir.name)
                found = _subjects_in(cdir, name, split)
                if not found:
                    log.warning("class folder %s holds no vendor scans (%s)", cdir, VENDOR_HELP)
                subjects += found
        if cfg.labels:  # a label file overrides the folder names, as for the other layouts
            subjects = _apply_table(cfg, root, subjects, require_labels)
    else:
        if layout == "retouch":
            subjects = [vendor_subject(c) for d in _retouch_dirs(root) for c in sorted(visible(d), key=lambda c:
                        natural_key(c.name)) if retouch_case(c)]
        else:
            subjects = _subjects_in(root, None, None)
        subjects = _apply_table(cfg, root, subjects, require_labels)
    _check_modality(cfg, root, subjects, require_labels, keep_unreadable)
    log.info("%s: %s layout of vendor exports, %d subject(s)", root, layout, len(subjects))
    return subjects


def _apply_table(cfg: DataConfig, root: Path, subjects: list[Subject], require_labels: bool) -> list[Subject]:
    """Labels from ``--labels`` or a label table in the root (ID = subject ID)."""
    tables = [Path(cfg.labels)] if cfg.labels else find_label_tables(root, [])
    if not tables:
        if require_labels:
            raise DataError(f"{root}: no labels for these vendor exports: pass --labels FILE (a .csv/.xlsx with ID "
                            f"and label columns; IDs such as {short([s.id for s in subjects], 3)}) or put labels.csv "
                            "in the folder (RETOUCH gives fluid masks, not a diagnosis per volume)")
        return subjects
    table = read_label_table(tables[0])
    for s in subjects:
        s.label = table.get(s.id)
    if not require_labels:
        return subjects
    have = {s.id for s in subjects}
    handle_unlabeled(cfg, [s.id for s in subjects if s.label is None], [i for i in table if i not in have],
                     f"{root} (labels from {tables[0]})")
    return [s for s in subjects if s.label is not None]


def _check_modality(cfg: DataConfig, root: Path, subjects: list[Subject], require_labels: bool,
                    keep_unreadable: bool) -> None:
    """Every subject must have the channel(s) ``--modality`` reads (a structural-only .vol has no OCTA)."""
    keys = ["OCT", "OCTA"] if cfg.modality == "OCT+OCTA" else [cfg.modality]
    lacking = [s for s in subjects if any(k not in s.paths for k in keys)]
    if not lacking or keep_unreadable:
        return
    listed = short(sorted((f"{s.id} (has {', '.join(sorted(s.paths))})" for s in lacking), key=natural_key), 10)
    msg = (f"{root}: {len(lacking)} subject(s) have no {' and '.join(keys)} scan, which --modality {cfg.modality} "
           f"reads: {listed}")
    fix = ("use --modality OCT (structural exports), add the angiography exports (scan_Angio.vol beside scan.vol), "
           "or pass --skip-unlabeled to skip them")
    if require_labels:
        skip_or_raise(cfg, msg, fix)
    else:
        log.warning("%s; they are not used", msg)
    for s in lacking:
        subjects.remove(s)
