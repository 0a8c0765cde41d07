"""Discovery of an OCTA-500 dataset (``--source octa500``): one pass over the field-of-view folders that finds each
eye's scans, projection maps, spacing and lesion mask, checks every needed slice folder from its listing and file
headers (:func:`~octa3d.data.listing.check_slice_folder`) and reports every eye left out at once.

The layout's facts are in :mod:`octa3d.data.octa500`; :func:`octa3d.data.sources.discover` dispatches here.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from octa3d.data.imagefiles import SLICE_EXTS, natural_key, short
from octa3d.data.labels import handle_unlabeled, skip_or_raise
from octa3d.data.listing import SliceListing, check_slice_folder
from octa3d.data.octa500 import (FOVS, MODALITIES, PROJECTIONS_DIR, find_mask, fov_dir, fov_spacing,
                                 match_projection, octa500_labels, octa500_spacing)
from octa3d.data.slices import visible
from octa3d.data.subject import Subject
from octa3d.errors import DataError

if TYPE_CHECKING:
    from octa3d.config import DataConfig

__all__ = ["discover_octa500", "refuse_octa500_part"]

log = logging.getLogger("octa3d.data")


def refuse_octa500_part(p: Path, names: set[str]) -> None:
    """Stop when ``p`` is one level inside an OCTA-500 dataset: a field-of-view folder (``OCTA_6mm``, or any folder
    holding ``OCTA/<ID>/`` and ``OCT/<ID>/`` eye folders) or a modality folder (``OCTA_6mm/OCTA``). Their
    subfolders would otherwise pass for 2D class folders ("classes" OCT and OCTA, or one "class" per eye)."""
    fov_names = {fov_dir(p, f).name for f in FOVS}

    def has_eye_folders(d: Path) -> bool:
        return d.is_dir() and any(c.is_dir() for c in visible(d))

    if p.name in fov_names or (set(MODALITIES) <= names and all(has_eye_folders(p / m) for m in MODALITIES)):
        raise DataError(f"--data-root {p} is one OCTA-500 field-of-view folder, not the dataset: point --data-root "
                        f"at its parent {p.parent} (the folder holding {p.name}/ and Text labels.xlsx); use --fov "
                        "to choose a field of view")
    if p.name in MODALITIES and p.parent.name in fov_names:
        raise DataError(f"--data-root {p} is the {p.name} folder of one OCTA-500 field of view, not the dataset: "
                        f"point --data-root at {p.parent.parent} (the folder holding {p.parent.name}/); use "
                        "--modality and --fov to choose the scans")


def _id_dirs(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {d.name: d for d in visible(folder) if d.is_dir()}


def _projection_maps(proj_root: Path) -> dict[str, dict[str, Path]]:
    """Map type → eye ID → file of one FOV's ``Projection Maps`` folder."""
    if not proj_root.is_dir():
        return {}
    return {tdir.name: {f.stem: f for f in visible(tdir) if f.is_file() and f.suffix.lower() in SLICE_EXTS}
            for tdir in visible(proj_root) if tdir.is_dir()}


@dataclass
class _Octa500Scan:
    """What one pass over the FOV folders found: subjects, and the eyes left out (with why)."""

    subjects: list[Subject] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)      # "<ID> (no OCT)": a needed modality is missing
    unreadable: list[str] = field(default_factory=list)      # "<ID> (OCTA folder): problems" of the slice listing
    ignored: list[str] = field(default_factory=list)         # non-image files in slice folders (skipped)
    no_projection: list[str] = field(default_factory=list)   # IDs without the requested projection map
    proj_types: set[str] = field(default_factory=set)        # every map type seen, for the message
    #: keep unreadable eyes (their problems in ``meta["unreadable"]``) instead of stopping: --mode predict lists
    #: them as skipped and goes on
    keep_unreadable: bool = False


def _check_listings(sid: str, listings: dict[str, SliceListing], found: _Octa500Scan) -> bool:
    """Record every problem of an eye's slice folders in ``found``; returns whether its volumes can be read."""
    problems = [f"{m} folder {lst.folder}: {'; '.join(lst.problems)}" for m, lst in listings.items() if lst.problems]
    found.ignored += [f"{lst.folder / n}" for lst in listings.values() for n in lst.ignored]
    if not problems and len(listings) == 2:  # OCT+OCTA: both channels must come from one scan
        (m0, a), (m1, b) = listings.items()
        if (a.count, a.size) != (b.count, b.size):
            problems.append(f"the {m0} and {m1} scans differ: {a.count} slices of {'×'.join(map(str, a.size or ()))}"
                            f" in {a.folder} and {b.count} slices of {'×'.join(map(str, b.size or ()))} in "
                            f"{b.folder} (width×height)")
    if problems:
        found.unreadable.append(f"{sid}: " + "; ".join(problems))
    return not problems


def _listings(folders: list[Path]) -> dict[Path, SliceListing]:
    """:func:`check_slice_folder` of many folders; threads overlap the file reads (slow or network disks)."""
    if len(folders) < 8:
        return {f: check_slice_folder(f) for f in folders}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(folders, pool.map(check_slice_folder, folders)))


def _scan_fov(cfg: DataConfig, fov: str, fdir: Path, labels: dict[str, str], needed: list[str],
              use_projection: bool, found: _Octa500Scan, check_unlabelled: bool = True) -> None:
    """Add the eyes of one FOV folder to ``found`` (needed modalities, projection maps, spacing, mask), their slice
    folders checked (those of eyes without a label only with ``check_unlabelled``)."""
    scans = {m: _id_dirs(fdir / m) for m in MODALITIES}
    maps = _projection_maps(fdir / PROJECTIONS_DIR)
    found.proj_types |= set(maps)
    ids = set().union(*(s.keys() for s in scans.values()))
    chosen = match_projection(fdir / PROJECTIONS_DIR, cfg.projection) if use_projection else None
    if use_projection and chosen is not None:
        ids |= set(maps[chosen.name])
    eyes = []
    for sid in ids:
        paths = {m: str(scans[m][sid]) for m in MODALITIES if sid in scans[m]}
        lacking = [m for m in needed if m not in paths]
        if lacking:
            found.incomplete.append(f"{sid} (no {'/'.join(lacking)})")
            continue
        projections = {t: str(files[sid]) for t, files in sorted(maps.items()) if sid in files}
        if use_projection and (chosen is None or chosen.name not in projections):
            found.no_projection.append(sid)
            continue
        eyes.append((sid, paths, projections))
    # A projection-map subject reads no volume (needed is empty): nothing to check.
    checked = _listings([Path(paths[m]) for sid, paths, _ in eyes if check_unlabelled or sid in labels
                         for m in needed])
    for sid, paths, projections in eyes:
        listings = {m: checked[Path(paths[m])] for m in needed if Path(paths[m]) in checked}
        meta: dict[str, str] = {"fov": fov}
        if listings and not _check_listings(sid, listings, found):
            if not found.keep_unreadable:
                continue
            meta["unreadable"] = found.unreadable[-1]
            listings = {}
        spacing = None
        if needed:  # the first needed scan gives the stack's size
            first = listings.get(needed[0])
            spacing = (octa500_spacing(Path(paths[needed[0]]), fov) if first is None or first.size is None
                       else fov_spacing(fov, *first.size, first.count))
        mask = find_mask(fdir, sid)
        found.subjects.append(Subject(id=sid, label=labels.get(sid), paths=paths, projections=projections,
                                      spacing=spacing, mask=str(mask) if mask else None, meta=meta))


def _all_octa500_ids(root: Path) -> set[str]:
    """Every eye ID with a scan or a projection map in any FOV folder of ``root``."""
    ids: set[str] = set()
    for f in FOVS:
        for m in MODALITIES:
            ids |= set(_id_dirs(fov_dir(root, f) / m))
        proj_root = fov_dir(root, f) / PROJECTIONS_DIR
        if proj_root.is_dir():
            for tdir in (d for d in visible(proj_root) if d.is_dir()):
                ids |= {x.stem for x in visible(tdir) if x.is_file()}
    return ids


def _report_left_out(cfg: DataConfig, root: Path, found: _Octa500Scan) -> None:
    """Stop on unreadable slice folders (every eye listed); stop or warn (--skip-unlabeled) about eyes lacking a
    needed scan or the requested projection map."""
    if found.ignored:
        log.warning("%s: %d file(s) in slice folders are not images and are ignored: %s", root, len(found.ignored),
                    short(sorted(found.ignored, key=natural_key), 10))
    if found.unreadable and found.keep_unreadable:
        log.warning("%s: %d subject(s) have slice folders that cannot be read as one volume (skipped): %s", root,
                    len(found.unreadable), short(sorted(found.unreadable, key=natural_key), 10))
    elif found.unreadable:
        bad = sorted(found.unreadable, key=natural_key)
        raise DataError(f"{root}: {len(bad)} subject(s) have slice folders that cannot be read as one volume:\n  "
                        + "\n  ".join(bad) + "\nfix or restore these files, or move these subjects' folders out "
                        "of the data root")
    if found.incomplete:
        skip_or_raise(cfg, f"{root}: {len(found.incomplete)} subject(s) lack a scan needed by --modality "
                           f"{cfg.modality}: {short(sorted(found.incomplete, key=natural_key))}",
                      "add the missing folders, choose another --modality, or pass --skip-unlabeled to skip them")
    if found.no_projection:
        skip_or_raise(cfg, f"{root}: {len(found.no_projection)} subject(s) have no '{cfg.projection}' projection "
                           f"map: {short(sorted(found.no_projection, key=natural_key))} (map types available: "
                           f"{', '.join(sorted(found.proj_types)) or 'none'})",
                      "choose --projection from the available types, use --projection compute, or pass "
                      "--skip-unlabeled to skip them")


def discover_octa500(cfg: DataConfig, dim: str, require_labels: bool = True, keep_unreadable: bool = False
                     ) -> list[Subject]:
    """The eyes of the OCTA-500 dataset at ``cfg.data_root`` (see :func:`octa3d.data.sources.discover`).

    ``keep_unreadable``: eyes whose slice folders cannot be read as one volume are kept (a warning lists them) with
    the problems in ``meta["unreadable"]``, for a caller that skips them one by one (``--mode predict``).

    Raises:
        DataError: a field-of-view or modality folder given as the root, no FOV folder, unreadable slice folders
            (every eye listed), missing scans/maps or labels (unless ``--skip-unlabeled``).
    """
    root = Path(cfg.data_root)
    fovs = list(FOVS) if cfg.fov == "all" else [cfg.fov]
    fov_dirs = {f: fov_dir(root, f) for f in fovs if fov_dir(root, f).is_dir()}
    if not fov_dirs and root.is_dir():
        refuse_octa500_part(root, {c.name for c in visible(root)})
    if not fov_dirs:
        present = ", ".join(sorted(d.name for d in visible(root) if d.is_dir())) if root.is_dir() else "nothing"
        raise DataError(f"{root}: no {' or '.join(fov_dir(root, f).name for f in fovs)} folder (found: {present}); "
                        "check --data-root and --fov")
    use_projection = dim == "2d" and cfg.projection != "compute"
    needed = [] if use_projection else (["OCT", "OCTA"] if cfg.modality == "OCT+OCTA" else [cfg.modality])
    try:
        labels, label_src = octa500_labels(cfg, root, list(fov_dirs.values()))
    except DataError:
        if require_labels:
            raise
        labels, label_src = {}, "no label table"
    found = _Octa500Scan(keep_unreadable=keep_unreadable)
    for fov, fdir in fov_dirs.items():
        # eyes without a label are dropped with --skip-unlabeled: their folders need not be readable
        _scan_fov(cfg, fov, fdir, labels, needed, use_projection, found,
                  check_unlabelled=not (require_labels and cfg.skip_unlabeled))
    _report_left_out(cfg, root, found)
    if not require_labels:
        return found.subjects
    # Labels without images are judged against every FOV folder in the root, so that --fov 6mm does not
    # report the 3mm subjects of a shared label table as missing.
    all_ids = _all_octa500_ids(root)
    no_label = [s.id for s in found.subjects if s.label is None]
    no_image = [sid for sid in labels if sid not in all_ids]
    handle_unlabeled(cfg, no_label, no_image, f"{root} with labels from {label_src}")
    return [s for s in found.subjects if s.label is not None]
