"""Write a synthetic OCTA-500-style dataset (``--mode synth``): BMP stacks, projections, masks, label table.

Files (``fov="6mm"``; IDs 10001, 10002, … like the real set; ``3mm`` → ``OCTA_3mm``, IDs from 10301)::

    DIR/synthetic.json                                 generator parameters and look (marks the folder as synthetic)
    DIR/Text labels.xlsx                               ID, Gender, Age, OS/OD, Disease        (octa500, both)
    DIR/OCTA_6mm/OCTA/<ID>/<n>.bmp, OCT/<ID>/<n>.bmp   n = 1..S, depth rows x width, 8-bit palette BMP
    DIR/OCTA_6mm/Projection Maps/<type>/<ID>.bmp       S x W en-face maps, types in PROJECTIONS
    DIR/OCTA_6mm/Lesion Masks/<ID>.nii.gz              uint8 (S, D, W) mask
    DIR/volumes/<ID>_octa.nii.gz, <ID>_oct.nii.gz      uint8 (S, D, W)                         (nifti, both)
    DIR/volumes/<ID>_mask.nii.gz                       mask                                    (nifti only)
    DIR/manifest.csv                                   subject,label,path,group,mask (relative paths)

Output is a pure function of the arguments (no clock in any file, not even in the xlsx), so two runs give
byte-identical files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from octa3d.data.bmp import encode_bmp8
from octa3d.data.nifti import write_nifti
from octa3d.data.octa500 import FOV_LATERAL_MM, FOVS, MASKS_DIR, PROJECTIONS_DIR, fov_dir
from octa3d.data.subject import Geometry
from octa3d.data.synthetic.anatomy import F32, Plan, eye_rng, spacing_of
from octa3d.data.synthetic.lesions import CLASSES
from octa3d.data.synthetic.look import Look, look_record
from octa3d.data.synthetic.render import chunks, plan_eye, render_chunk
from octa3d.errors import ConfigError, DataError
from octa3d.utils.io import atomic_write_bytes, atomic_write_csv, atomic_write_text

log = logging.getLogger("octa3d.data.synthetic")

LAYOUTS: tuple[str, ...] = ("octa500", "nifti", "both")
FIRST_ID: dict[str, int] = {"6mm": 10001, "3mm": 10301}
#: Projection map types as in OCTA-500: OCT maps are mean projections, OCTA(FULL) a mean, the slab OCTA maps maxima.
PROJECTIONS: tuple[str, ...] = ("OCT(FULL)", "OCT(ILM_OPL)", "OCT(OPL_BM)", "OCTA(FULL)", "OCTA(ILM_OPL)",
                                "OCTA(OPL_BM)")
MARKER = "synthetic.json"
_AGES = {"NORMAL": (25, 70), "AMD": (60, 88), "CNV": (50, 85), "DR": (40, 75), "CSC": (28, 58), "RVO": (45, 80)}


def _write_xlsx(path: Path, frame: Any) -> None:
    """Write an xlsx whose bytes depend only on its content (openpyxl stamps the time into it)."""
    buf = io.BytesIO()
    frame.to_excel(buf, index=False, engine="openpyxl")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*", rb"\g<1>2000-01-01T00:00:00Z", data)
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type, fixed.external_attr = zipfile.ZIP_DEFLATED, info.external_attr
            zo.writestr(fixed, data)
    atomic_write_bytes(path, out.getvalue())


def _projections(p: Plan, s0: int, s1: int, oct8: np.ndarray, octa8: np.ndarray) -> dict[str, np.ndarray]:
    """Projection rows of B-scans ``s0:s1`` (float32 (n, W)), computed from the 8-bit volumes as written."""
    d = (np.arange(p.shape[1], dtype=F32) + 0.5)[None, :, None]
    oct_, octa = oct8.astype(F32), octa8.astype(F32)
    out = {"OCT(FULL)": oct_.mean(1), "OCTA(FULL)": octa.mean(1)}
    for name, top, bot in (("ILM_OPL", p.ilm, p.opl), ("OPL_BM", p.opl, p.bm)):
        inside = (d >= top[s0:s1, None, :]) & (d < np.maximum(bot, top + 1)[s0:s1, None, :])
        out[f"OCT({name})"] = (oct_ * inside).sum(1) / np.maximum(inside.sum(1), 1)
        out[f"OCTA({name})"] = (octa * inside).max(1)
    return out


def _to_u8(img: np.ndarray) -> np.ndarray:
    """Contrast-stretch a projection (0.5-99.5 percentiles) to 8 bit, as displayed projection maps are."""
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).round().astype(np.uint8)


def _write_subject(rec: dict[str, Any], plan: Plan, seed: int, index: int, layout: str,
                   fov: str, look: Look) -> None:
    """Render one eye chunk by chunk and write its BMP stacks, projections, mask and/or NIfTI volumes."""
    S, D, W = plan.shape
    spacing = spacing_of(plan.shape, fov)
    ppm = (round(1000 / spacing[0]), round(1000 / spacing[1]))  # pixels per metre, informative only
    paths = rec["paths"]
    bmp, nifti = layout in ("octa500", "both"), layout in ("nifti", "both")
    mask = np.zeros(plan.shape, np.uint8)
    vols = {"OCT": np.zeros(plan.shape, np.uint8), "OCTA": np.zeros(plan.shape, np.uint8)} if nifti else {}
    proj = {k: np.zeros((S, W), F32) for k in PROJECTIONS}
    # Each B-scan stack is written into a hidden temporary folder that is renamed when complete: as safe as
    # one atomic write per BMP, without its cost (hundreds of files per eye).
    stacks: dict[str, Path] = {}
    try:
        if bmp:
            for key in ("OCT", "OCTA"):
                final = Path(paths[key])
                final.parent.mkdir(parents=True, exist_ok=True)
                stacks[key] = final.parent / f".{final.name}.partial"  # (mkdtemp would make it private, 0700)
                if stacks[key].exists():
                    shutil.rmtree(stacks[key])  # left by an interrupted run
                stacks[key].mkdir()
        for s0, s1 in chunks(plan.shape):
            oct8, octa8, m = render_chunk(plan, s0, s1, seed, index, look)
            mask[s0:s1] = m
            for key, arr in (("OCT", oct8), ("OCTA", octa8)):
                if nifti:
                    vols[key][s0:s1] = arr
                for i in range(s1 - s0 if bmp else 0):  # OCTA-500 numbering: 1.bmp is the first B-scan
                    with open(stacks[key] / f"{s0 + i + 1}.bmp", "wb") as fh:
                        fh.write(encode_bmp8(arr[i], ppm))
            for k, rows in _projections(plan, s0, s1, oct8, octa8).items():
                proj[k][s0:s1] = rows
        for key, tmp in stacks.items():
            if Path(paths[key]).exists():
                shutil.rmtree(paths[key])
            os.replace(tmp, paths[key])
    finally:
        for tmp in stacks.values():
            if tmp.exists():
                shutil.rmtree(tmp)
    if bmp:
        for k, img in proj.items():
            atomic_write_bytes(paths["projections"][k], encode_bmp8(_to_u8(img), (ppm[0], ppm[0])))
    geometry = Geometry.default(plan.shape, spacing)
    for key, arr in vols.items():
        write_nifti(arr, geometry, Path(paths[f"{key}_nifti"]))
    write_nifti(mask, geometry, Path(paths["mask"]))


def _records(root: Path, n: int, seed: int, layout: str, fov: str, classes: Sequence[str]) -> list[dict[str, Any]]:
    """IDs, classes (round-robin, so balanced), metadata and output paths of every eye."""
    fdir = fov_dir(root, fov)
    recs = []
    for i in range(n):
        sid, disease = str(FIRST_ID[fov] + i), classes[i % len(classes)]
        meta = eye_rng(seed, i, 3)
        lo, hi = _AGES.get(disease, (30, 80))
        paths: dict[str, Any] = {}
        if layout in ("octa500", "both"):
            paths.update(OCTA=str(fdir / "OCTA" / sid), OCT=str(fdir / "OCT" / sid),
                         mask=str(fdir / MASKS_DIR / f"{sid}.nii.gz"),
                         projections={k: str(fdir / PROJECTIONS_DIR / k / f"{sid}.bmp") for k in PROJECTIONS})
        if layout in ("nifti", "both"):
            vol = root / "volumes"
            paths.update(OCTA_nifti=str(vol / f"{sid}_octa.nii.gz"), OCT_nifti=str(vol / f"{sid}_oct.nii.gz"))
            paths.setdefault("mask", str(vol / f"{sid}_mask.nii.gz"))
        recs.append({"id": sid, "disease": disease, "gender": "M" if meta.random() < 0.5 else "F",
                     "age": int(meta.integers(lo, hi + 1)), "eye": None, "paths": paths})
    return recs


def _existing(root: Path) -> list[str]:
    """The names in ``root`` that belong to a dataset (ours or not)."""
    names = [*(fov_dir(root, f).name for f in FOVS), "Text labels.xlsx", "manifest.csv", "volumes", MARKER]
    return [n for n in names if (root / n).exists()]


def _clear(root: Path, overwrite: bool) -> None:
    """Refuse to write over a dataset unless ``overwrite``; never delete one this generator did not write."""
    found = _existing(root)
    if not found:
        return
    if not overwrite:
        raise DataError(f"{root} already holds a dataset ({', '.join(found)}); pass --overwrite to replace it or "
                        "choose another --data-root")
    if not (root / MARKER).is_file():
        raise DataError(f"{root} holds {', '.join(found)} but no {MARKER}, so it was not written by --mode synth; "
                        "refusing to delete it even with --overwrite: choose another --data-root")
    log.info("--overwrite: removing the previous synthetic dataset in %s", root)
    for name in found:
        target = root / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def _check_args(shape: tuple[int, ...], n_subjects: int, layout: str, fov: str, classes: Sequence[str]) -> None:
    """ConfigError naming the flag, for arguments :func:`generate` cannot honour."""
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"--shape {shape}: need three sizes >= 8 (B-scans,depth,width)")
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if fov not in FOV_LATERAL_MM:
        raise ConfigError(f"fov {fov!r}: choose one of {', '.join(FOV_LATERAL_MM)}")
    bad = [c for c in classes if c not in CLASSES]
    if bad or not classes or n_subjects < 1:
        raise ConfigError(f"synthetic classes must be a non-empty subset of {', '.join(CLASSES)} (got {bad}) and "
                          f"--n-subjects >= 1 (got {n_subjects})")


def _write_tables(root: Path, recs: list[dict[str, Any]], layout: str) -> None:
    """The label table (``octa500``) and/or the manifest CSV (``nifti``) of the written eyes."""
    import pandas as pd

    if layout in ("octa500", "both"):
        table = pd.DataFrame({"ID": [int(r["id"]) for r in recs], "Gender": [r["gender"] for r in recs],
                              "Age": [r["age"] for r in recs], "OS/OD": [r["eye"] for r in recs],
                              "Disease": [r["disease"] for r in recs]})
        _write_xlsx(root / "Text labels.xlsx", table)
    if layout in ("nifti", "both"):
        rel = lambda p: Path(p).relative_to(root).as_posix()  # noqa: E731
        atomic_write_csv(root / "manifest.csv", pd.DataFrame(
            {"subject": [r["id"] for r in recs], "label": [r["disease"] for r in recs],
             "path": [rel(r["paths"]["OCTA_nifti"]) for r in recs], "group": [r["id"] for r in recs],
             "mask": [rel(r["paths"]["mask"]) for r in recs]}))


def generate(root: str | Path, n_subjects: int, shape: Sequence[int] = (32, 64, 32), seed: int = 0,
             layout: str = "octa500", fov: str = "6mm", classes: Sequence[str] = CLASSES,
             overwrite: bool = False, look: Look = Look()) -> list[dict[str, Any]]:
    """Write a synthetic OCTA-500-style dataset (see the module docstring for the layout).

    Args:
        root: dataset folder (created if missing).
        n_subjects: number of eyes; classes are assigned round-robin (balanced).
        shape: volume shape (B-scans S, depth D, width W); OCTA-500 6mm is (400, 640, 400).
        seed: dataset seed; eye ``i`` is rendered from seeds derived from ``(seed, i)``.
        layout: ``"octa500"`` (BMP stacks + ``Text labels.xlsx``), ``"nifti"`` (``volumes/`` + ``manifest.csv``)
            or ``"both"``.
        fov: ``"6mm"`` or ``"3mm"`` (folder ``OCTA_<fov>``, first ID, lateral spacing).
        classes: class names to cycle through (subset/reordering of :data:`CLASSES`).
        overwrite: replace a previous synthetic dataset in ``root``.
        look: the cohort variant (:class:`~octa3d.data.synthetic.Look`, e.g. from
            :func:`~octa3d.data.synthetic.look_from_name`); ``synthetic.json`` records it under ``look`` (the
            preset's name, or None, and every knob). The default is the stock generator.

    Returns:
        One record per eye: ``id``, ``disease``, ``gender``, ``age``, ``eye`` (OD/OS) and ``paths`` (``OCTA``/``OCT``
        BMP folders, ``projections`` {type: BMP}, ``OCTA_nifti``/``OCT_nifti``, ``mask``; absolute paths).

    Raises:
        ConfigError: bad shape, layout, fov or class name.
        DataError: ``root`` already holds a dataset and ``overwrite`` is false.
    """
    shape = tuple(int(s) for s in shape)
    _check_args(shape, n_subjects, layout, fov, classes)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _clear(root, overwrite)
    # The marker goes first (complete: false), so that an interrupted run is still recognised as ours.
    params = {"generator": "octa3d.data.synthetic", "seed": seed, "n_subjects": n_subjects, "shape": list(shape),
              "layout": layout, "fov": fov, "classes": list(classes), "spacing_xyz_mm": spacing_of(shape, fov),
              "look": look_record(look)}
    atomic_write_text(root / MARKER, json.dumps({**params, "complete": False}, indent=1) + "\n")
    recs = _records(root, n_subjects, seed, layout, fov, list(classes))
    for i, rec in enumerate(tqdm(recs, desc="synth", unit="eye", disable=None)):
        plan = plan_eye(shape, rec["disease"], seed, i, fov, look)
        rec["eye"] = "OD" if plan.eye > 0 else "OS"
        _write_subject(rec, plan, seed, i, layout, fov, look)
        log.debug("eye %s (%s) written", rec["id"], rec["disease"])
    _write_tables(root, recs, layout)
    atomic_write_text(root / MARKER, json.dumps({**params, "complete": True}, indent=1) + "\n")
    log.info("wrote %d synthetic eyes (%s, look %s) to %s", n_subjects, "x".join(map(str, shape)),
             params["look"]["name"] or "custom", root)
    return recs
