"""Find the subjects of a dataset (no pixel data is read, only folder listings and image headers).

Four layouts (``--source``; ``auto`` detects them with :func:`detect_source`):

* ``octa500``: ``<root>/OCTA_6mm|OCTA_3mm/{OCTA,OCT}/<ID>/<n>.bmp`` + ``Text labels.xlsx`` (+ optional
  ``Projection Maps/<type>/<ID>.bmp`` and ``Lesion Masks/<ID>.nii.gz``; the layout's facts are in
  :mod:`octa3d.data.octa500`, its discovery, which checks every eye's slice folder, in
  :mod:`octa3d.data.octa500_scan`);
* ``manifest``: a CSV ``subject,label,path[,group][,mask][,split]`` (a file, or ``<root>/manifest.csv``;
  :mod:`octa3d.data.manifest`);
* ``vendor``: vendor exports (Heidelberg .vol/.e2e/XML, Topcon .fda) in class folders or with a label table, and
  the Duke AMD/control and RETOUCH layouts (:mod:`octa3d.data.vendor_sources`);
* ``folders``: 2D class folders ``<root>/[train|val|test/]<CLASS>/*.png|jpg|jpeg|bmp|tif|tiff``.

:func:`discover` lists a labelled dataset; :func:`discover_unlabelled` lists extra scans whose labels are not used
(``--ae-extra-data``); :func:`~octa3d.data.octa500.subject_from_path` (re-exported here) makes one ``--input`` path
a subject, and :func:`discover_input` lists every subject of a ``--mode predict --input`` (one scan, an OCTA-500
folder, a manifest, class folders of 2D images, or a plain folder of scans), labels where the input has them.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from octa3d.data.identity import compile_group_regex, image_group
from octa3d.data.imagefiles import SUPPORTED_EXTS, VENDOR_EXTS, file_suffix, natural_key, short
from octa3d.data.labels import SPLIT_DIRS, normalise_label, skip_or_raise
from octa3d.data.manifest import discover_manifest
from octa3d.data.octa500 import (FOVS, MODALITIES, eyes_with_maps_only, find_label_tables, fov_dir, octa500_labels,
                                 subject_from_path)
from octa3d.data.octa500_scan import discover_octa500, refuse_octa500_part
from octa3d.data.slices import visible, visible_files
from octa3d.data.subject import Subject
from octa3d.data.vendor import heyex_xml, retouch_case, sniff
from octa3d.data.vendor_sources import discover_vendor, folder_scans, vendor_layout
from octa3d.errors import ConfigError, DataError

if TYPE_CHECKING:
    from octa3d.config import DataConfig

__all__ = ["IMAGE_EXTS", "INPUT_KINDS", "SOURCES", "SPLIT_DIRS", "detect_source", "discover", "discover_input",
           "discover_unlabelled", "label_origin", "natural_key", "subject_from_path"]

log = logging.getLogger("octa3d.data")

SOURCES = ("octa500", "manifest", "vendor", "folders")
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

_LAYOUTS = ("an OCTA-500 folder (OCTA_6mm/OCTA/<ID>/1.bmp …, optionally OCTA_3mm/), a manifest CSV with "
            "columns subject,label,path (a .csv file or a folder holding manifest.csv), vendor exports (class "
            "folders <CLASS>/scan.vol, Duke AMD/ and Control/ .mat folders, RETOUCH Cirrus/Spectralis/Topcon case "
            "folders, or scan files with a labels.csv), or 2D class folders (<root>/[train|test/]<CLASS>/*.png|jpg|"
            "bmp|tif)")


def _no_data(root: Path | str) -> DataError:
    return DataError(f"no data at {root}: point --data-root at an OCTA-500 folder (OCTA_6mm/...), a manifest CSV "
                     "(subject,label,path) or 2D class folders, or create a synthetic set with: python main.py "
                     f"--mode synth --data-root {root}")


def _iter_images(folder: Path) -> Iterator[Path]:
    return (f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".")
            and f.suffix.lower() in IMAGE_EXTS)


def _images_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """The images below ``folder`` and the image links whose target is gone (one pass: class folders are large)."""
    images, dangling = [], []
    for f in folder.rglob("*"):
        if f.name.startswith(".") or f.suffix.lower() not in IMAGE_EXTS:
            continue
        if f.is_file():
            images.append(f)
        elif f.is_symlink() and not f.exists():
            dangling.append(f)
    return sorted(images, key=lambda f: natural_key(f.as_posix())), dangling


def _split_dirs(root: Path) -> dict[str, Path]:
    return {SPLIT_DIRS[d.name.lower()]: d for d in visible(root) if d.is_dir() and d.name.lower() in SPLIT_DIRS}


def detect_source(root: str | Path) -> str:
    """Which layout ``root`` holds.

    Args:
        root: ``--data-root``: a folder or a manifest ``.csv`` file.

    Returns:
        ``"manifest"`` (a .csv file, or a folder with ``manifest.csv``), ``"octa500"`` (a folder with
        ``OCTA_6mm``/``OCTA_3mm``), ``"vendor"`` (vendor exports in one of
        :data:`~octa3d.data.vendor_sources.LAYOUTS`) or ``"folders"`` (class subfolders of images, optionally
        under train/val/test).

    Raises:
        DataError: ``root`` is missing or empty (says how to create a synthetic set), or matches no layout.
    """
    p = Path(root)
    if not p.exists() or (p.is_dir() and not visible(p)):
        raise _no_data(root)
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "manifest"
        raise DataError(f"--data-root {root} is a file but not a manifest .csv; expected {_LAYOUTS}")
    names = {c.name for c in visible(p)}
    if "manifest.csv" in {n.lower() for n in names}:
        return "manifest"
    if {fov_dir(p, f).name for f in FOVS} & names:
        return "octa500"
    refuse_octa500_part(p, names)
    if vendor_layout(p) is not None:  # before 2D folders: a HEYEX XML export is a folder of .tif B-scans
        return "vendor"
    splits = _split_dirs(p)
    for base in (list(splits.values()) or [p]):
        # Stop at the first image: Kermany-size folders hold ~100k files.
        if any(d.is_dir() and next(_iter_images(d), None) is not None for d in visible(base)):
            return "folders"
    hint = ""
    if set(MODALITIES) & names:
        hint = f" (this looks like one OCTA-500 field of view: point --data-root at its parent {p.parent})"
    raise DataError(f"--data-root {root}: unrecognised layout{hint}; expected {_LAYOUTS}")


def discover(cfg: DataConfig, dim: str = "3d", require_labels: bool = True, keep_unreadable: bool = False
             ) -> list[Subject]:
    """List the subjects of the dataset at ``cfg.data_root``.

    Args:
        cfg: a :class:`~octa3d.config.DataConfig` (data_root, source, labels, modality, fov, projection,
            group_regex, skip_unlabeled).
        dim: ``"2d"`` or ``"3d"``; with ``"2d"`` and ``cfg.projection != "compute"`` OCTA-500 subjects need the
            named projection map instead of volumes.
        require_labels: False for scans used without labels (``--ae-extra-data``, ``--mode explain``): a missing
            label table is fine and unlabeled subjects are kept with ``label=None``.
        keep_unreadable: keep unreadable OCTA-500 eyes, problems in ``meta["unreadable"]``, and vendor subjects
            lacking the ``--modality`` channel (``--mode predict`` skips them one by one).

    Returns:
        Subjects sorted by ID (digit runs compared as numbers).

    Raises:
        DataError: missing/unrecognised data, missing files, unlabeled subjects (unless ``skip_unlabeled``),
            duplicate IDs.
    """
    source = cfg.source if cfg.source != "auto" else detect_source(cfg.data_root)
    root = Path(cfg.data_root)
    if not root.exists() or (root.is_dir() and not visible(root)):
        raise _no_data(cfg.data_root)
    if source == "octa500":
        subjects = discover_octa500(cfg, dim, require_labels, keep_unreadable)
        _eyes_with_maps_only(cfg, dim, require_labels)
    elif source == "manifest":
        subjects = discover_manifest(cfg, require_labels)
    elif source == "vendor":
        subjects = discover_vendor(cfg, require_labels, keep_unreadable)
    elif source == "folders":
        subjects = _discover_folders(cfg)
    else:
        raise ConfigError(f"--source {source!r}: choose one of auto, {', '.join(SOURCES)}")
    seen: dict[str, int] = {}
    for s in subjects:
        seen[s.id] = seen.get(s.id, 0) + 1
    dups = sorted((k for k, n in seen.items() if n > 1), key=natural_key)
    if dups:
        raise DataError(f"{cfg.data_root}: duplicate subject IDs: {short(dups)}; every subject needs a unique ID")
    if not subjects:
        raise DataError(f"{cfg.data_root}: no subjects found ({source} layout); expected {_LAYOUTS}")
    subjects.sort(key=lambda s: natural_key(s.id))
    log.info("found %d subjects in %s (%s layout)", len(subjects), cfg.data_root, source)
    return subjects


def _eyes_with_maps_only(cfg: DataConfig, dim: str, require_labels: bool) -> None:
    """Stop (or warn, --skip-unlabeled) on labelled OCTA-500 eyes that only have projection maps the run cannot use:
    discovery takes an eye from its scan folders (or the ``--projection`` map), so such an eye - its OCT and OCTA
    folders lost in an interrupted copy - would otherwise vanish without a word."""
    root = Path(cfg.data_root)
    use_projection = dim == "2d" and cfg.projection != "compute"
    fdirs = [fov_dir(root, f) for f in (FOVS if cfg.fov == "all" else [cfg.fov]) if fov_dir(root, f).is_dir()]
    found: dict[str, list[str]] = {}
    for fdir in fdirs:
        found.update(eyes_with_maps_only(fdir, cfg.projection if use_projection else None))
    if not found:
        return
    needs = (f"'{cfg.projection}' projection map" if use_projection else
             "OCT and OCTA scan folders" if cfg.modality == "OCT+OCTA" else f"{cfg.modality} scan folder")
    if not require_labels:
        log.warning("%s: %d eye(s) have no %s, only other projection maps, and are not used: %s", root, len(found),
                    needs, short(sorted(found, key=natural_key)))
        return
    labels, src = octa500_labels(cfg, root, fdirs)
    lacking = sorted((sid for sid in found if sid in labels), key=natural_key)
    if lacking:
        listed = short([f"{sid} (only maps {', '.join(found[sid][:3])}{' …' if len(found[sid]) > 3 else ''})"
                        for sid in lacking], 10)
        skip_or_raise(cfg, f"{root}: {len(lacking)} labelled subject(s) (labels from {src}) have no {needs} "
                           f"needed for --dim {dim}: {listed}",
                      "restore their folders (an interrupted copy or a partly extracted zip?), choose another "
                      "--modality/--projection, or pass --skip-unlabeled to skip them")


def label_origin(cfg: DataConfig) -> str:
    """Where the labels of ``cfg``'s dataset come from, for messages: ``--labels``, the OCTA-500 label table(s),
    the manifest or the class folder names."""
    if cfg.labels:
        return f"--labels {cfg.labels}"
    root = Path(cfg.data_root)
    try:
        source = cfg.source if cfg.source != "auto" else detect_source(root)
    except DataError:
        return f"the labels of {root}"
    if source == "octa500":
        tables = find_label_tables(root, [fov_dir(root, f) for f in FOVS if fov_dir(root, f).is_dir()])
        return ", ".join(map(str, tables)) or f"the label table of {root}"
    if source == "manifest":
        csv = root if root.is_file() else root / "manifest.csv"
        return f"the label column of {csv}"
    if source == "vendor" and vendor_layout(root) in ("retouch", "files"):
        return ", ".join(map(str, find_label_tables(root, []))) or f"the label table of {root}"
    return f"the class folder names under {root}"


def discover_unlabelled(data_cfg: DataConfig, root: str | Path, dim: str, keep_unreadable: bool = False
                        ) -> list[Subject]:
    """The scans of another dataset whose labels are not used (``--ae-extra-data``), in any layout.

    The experiment's ``--labels`` and ``--source`` do not apply to it: its layout is detected and a label table
    is optional (subjects keep ``label=None`` where there is none).

    Args:
        data_cfg: the experiment's data settings (modality, fov, projection ... are kept); not modified.
        root: the other dataset's folder or manifest CSV.
        dim: ``"2d"`` or ``"3d"``, as for :func:`discover`.

    Returns:
        Its subjects, sorted by ID.

    Raises:
        DataError: naming ``root``, when it is missing or empty or holds no scans (never an empty list), and
            for anything else :func:`discover` refuses (e.g. a scan lacking the modality).
    """
    cfg = copy.deepcopy(data_cfg)
    cfg.data_root, cfg.labels, cfg.source = str(root), None, "auto"
    return discover(cfg, dim, require_labels=False, keep_unreadable=keep_unreadable)


# ------------------------------------------------------------------------------------------- folders
def _discover_folders(cfg: DataConfig) -> list[Subject]:
    root = Path(cfg.data_root)
    group_re = compile_group_regex(cfg.group_regex)
    splits = _split_dirs(root)
    if splits:
        others = sorted(d.name for d in visible(root) if d.is_dir() and d.name.lower() not in SPLIT_DIRS)
        log.info("%s has %s folders: honouring the dataset's own split", root, "/".join(sorted(splits)))
        if others:
            log.warning("%s: ignoring folders outside %s: %s", root, "/".join(sorted(splits)), short(others))
    bases = [(name, d) for name, d in sorted(splits.items())] or [(None, root)]
    subjects, dangling = [], []
    for split, base in bases:
        for cdir in sorted((d for d in visible(base) if d.is_dir()), key=lambda d: d.name):
            images, gone = _images_in(cdir)
            dangling += [g.relative_to(root).as_posix() for g in gone]
            if not images:
                log.warning("class folder %s holds no images (.png/.jpg/.jpeg/.bmp/.tif/.tiff)", cdir)
            for img in images:
                rel = img.relative_to(root).with_suffix("").as_posix()
                subjects.append(Subject(id=rel, label=normalise_label(cdir.name), paths={"image": str(img)},
                                        group=image_group(img.name, group_re), split=split))
    if dangling:  # a labelled image (its class folder) whose file is gone: never dropped without a word
        skip_or_raise(cfg, f"{root}: {len(dangling)} image link(s) point to files that no longer exist: "
                           f"{short(sorted(dangling, key=natural_key), 10)}",
                      "restore the files or remove the links, or pass --skip-unlabeled to skip them")
    return subjects


# ------------------------------------------------------------------------------------------- predict inputs
#: What :func:`discover_input` recognises (the ``kind`` it returns).
INPUT_KINDS = ("scan", "octa500", "manifest", "vendor", "folders", "files", "scan-folders", "mixed")


def _is_one_scan(p: Path, dim: str) -> bool:
    """A folder that holds one scan: an OCTA-500 eye folder, a HEYEX XML export, a RETOUCH case, a DICOM series, or
    (3D models) a folder of slices."""
    if p.parent.name in MODALITIES and p.parent.parent.name.startswith("OCTA_"):
        return True
    if heyex_xml(p) is not None or retouch_case(p) is not None:
        return True
    entries = visible(p)
    if any(c.is_dir() for c in entries):
        return False
    files = [f for f in entries if f.is_file()]
    suffixes = {file_suffix(f) for f in files}
    if suffixes & {".dcm", ".ima"} or (files and "" in suffixes):
        return True  # DICOM series (their files often carry no extension)
    return dim == "3d" and bool(files) and suffixes <= IMAGE_EXTS


def discover_input(path: str | Path, data_cfg: DataConfig, dim: str = "3d") -> tuple[str, list[Subject]]:
    """Every subject of a ``--mode predict --input`` path, with its label where the input says it.

    Recognised (``kind``, see :data:`INPUT_KINDS`):

    * ``scan``: one scan file (any supported format, a vendor export, a 2D image), an OCTA-500 eye folder, a HEYEX
      XML export or RETOUCH case folder, a DICOM folder, or - for 3D models - a folder of numbered slices;
    * ``octa500``: an OCTA-500 dataset folder (``OCTA_6mm``/``OCTA_3mm``; its label table optional);
    * ``manifest``: a ``.csv`` (or a folder holding ``manifest.csv``) with ``subject,path`` and optionally
      ``label``/``group`` columns;
    * ``vendor``: a Duke AMD/control, RETOUCH or class-folder layout of vendor exports
      (:mod:`octa3d.data.vendor_sources`), labelled where the layout says;
    * ``folders``: 2D models: class folders of 2D images (``<root>/[train|test/]<CLASS>/*.png``), labelled by
      their folder;
    * ``files``: a folder of scan files (vendor exports included: a ``.vol`` and its ``…Angio.vol`` are one
      subject) or (2D models) 2D images, one subject per file, unlabelled;
    * ``scan-folders``: 3D models: a folder whose subfolders are scans (slice, DICOM or HEYEX XML export folders,
      e.g. an OCTA-500 ``OCTA_6mm/OCTA`` folder), one subject per subfolder;
    * ``mixed``: 3D models: a folder of both, one subject per scan file and per scan subfolder.

    The experiment's ``--labels`` and ``--source`` do not apply to the input.

    Returns:
        ``(kind, subjects)``, subjects sorted by ID (a single scan: one).

    Raises:
        DataError: missing or empty input, or nothing recognisable in it (naming the accepted layouts).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"--input {p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "manifest", discover_unlabelled(data_cfg, p, dim)
        return "scan", [subject_from_path(p, data_cfg)]
    if not visible(p):
        raise DataError(f"--input {p}: the folder is empty")
    if _is_one_scan(p, dim):
        return "scan", [subject_from_path(p, data_cfg)]
    names = {c.name for c in visible(p)}
    if "manifest.csv" in {n.lower() for n in names}:
        return "manifest", discover_unlabelled(data_cfg, p, dim)
    if {fov_dir(p, f).name for f in FOVS} & names:
        return "octa500", discover_unlabelled(data_cfg, p, dim, keep_unreadable=True)
    if vendor_layout(p) in ("duke", "retouch", "class-folders"):
        return "vendor", discover_unlabelled(data_cfg, p, dim, keep_unreadable=True)
    subdirs = sorted((d for d in visible(p) if d.is_dir()), key=lambda d: natural_key(d.name))
    if subdirs and dim == "2d":
        cfg = copy.deepcopy(data_cfg)
        cfg.data_root, cfg.labels, cfg.source = str(p), None, "folders"
        return "folders", discover(cfg, dim, require_labels=False)
    vendor = folder_scans(p)  # vendor files and export folders, a .vol and its angiography export as one scan
    claimed = {v for paths in vendor for v in paths.values()}
    scans = [Path(paths.get("OCT") or paths["OCTA"]) for paths in vendor if Path(next(iter(paths.values()))).is_file()]
    scans += [f for f in visible_files(p) if str(f) not in claimed and (f.suffix.lower() in IMAGE_EXTS or (
        file_suffix(f) in SUPPORTED_EXTS and file_suffix(f) not in VENDOR_EXTS) or sniff(f))]
    folders = subdirs  # scan folders: slice, DICOM, HEYEX XML export, RETOUCH case folders (subject_from_path)
    if not scans and not folders:
        raise DataError(f"--input {p}: no scans in the folder; expected a scan file or folder, an OCTA-500 folder, "
                        "a manifest CSV (subject,path[,label]), class folders of 2D images or a folder of scans")
    subjects = [subject_from_path(d, data_cfg) for d in folders]
    subjects += [subject_from_path(f, data_cfg) for f in sorted(scans, key=lambda f: natural_key(f.name))]
    dups = sorted((k for k, n in Counter(s.id for s in subjects).items() if n > 1), key=natural_key)
    if dups:  # a.nii.gz and a.npy: one ID, two scans
        raise DataError(f"--input {p}: several files share the subject ID(s) {short(dups)}; rename them")
    if folders and scans:
        return "mixed", sorted(subjects, key=lambda s: natural_key(s.id))
    return ("scan-folders" if folders else "files"), subjects
