"""Synthetic OCTA-500 generator (``--mode synth``): plausible OCT/OCTA eyes with known, localized lesions.

Every eye is a layered retina (bright RNFL, darker inner layers, OPL, dark ONL, IS/OS + RPE, choroid) with a
foveal pit and avascular zone, a superficial vessel tree (arcades from the optic-disc side, shadowing the OCT
below them), capillary plexuses, choriocapillaris, OCT speckle and OCTA decorrelation noise, and random
per-eye position/tilt/thickness/brightness. Classes are assigned round-robin and each adds one signature,
recorded in a ground-truth mask (1 = the lesion, 2 = a secondary finding):

* DR: capillary dropout in the inner retina (1) + microaneurysm dots (2);
* CNV: neovascular flow tuft above the RPE, bright in OCTA and hyper-reflective in OCT (1);
* AMD: drusen, dome-shaped RPE elevations with flow voids beneath (1);
* CSC: subretinal fluid, a dark dome between neuroretina and RPE (1);
* RVO: wedge of non-perfusion downstream of an occluded vein (1) + the dilated vein (2);
* NORMAL: none (all-zero mask).

Files (``fov="6mm"``; IDs 10001, 10002, … like the real set; ``3mm`` → ``OCTA_3mm``, IDs from 10301)::

    DIR/synthetic.json                                 generator parameters (marks the folder as synthetic)
    DIR/Text labels.xlsx                               ID, Gender, Age, OS/OD, Disease        (octa500, both)
    DIR/OCTA_6mm/OCTA/<ID>/<n>.bmp, OCT/<ID>/<n>.bmp   n = 1..S, depth rows x width, 8-bit palette BMP
    DIR/OCTA_6mm/Projection Maps/<type>/<ID>.bmp       S x W en-face maps, types in PROJECTIONS
    DIR/OCTA_6mm/Lesion Masks/<ID>.nii.gz              uint8 (S, D, W) mask
    DIR/volumes/<ID>_octa.nii.gz, <ID>_oct.nii.gz      uint8 (S, D, W)                         (nifti, both)
    DIR/volumes/<ID>_mask.nii.gz                       mask                                    (nifti only)
    DIR/manifest.csv                                   subject,label,path,group,mask (relative paths)

Arrays follow :mod:`octa3d.data.subject`: ``(S, D, W)`` = (B-scan, depth row, column), SimpleITK spacing
``(fov/W, 2/D, fov/S)`` mm. Output is a pure function of the arguments (per-eye seeds derived from ``seed`` and
the eye's index; no clock in any file), so two runs give byte-identical files. Volumes are rendered a few
B-scans at a time in float32, so the OCTA-500 size 400x640x400 fits in a few hundred MB.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import struct
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter, map_coordinates
from tqdm import tqdm

from octa3d.errors import ConfigError, DataError
from octa3d.utils.io import atomic_path, atomic_write_bytes, atomic_write_csv, atomic_write_text

log = logging.getLogger("octa3d.data.synthetic")

CLASSES: tuple[str, ...] = ("NORMAL", "AMD", "CNV", "DR", "CSC", "RVO")
LAYOUTS: tuple[str, ...] = ("octa500", "nifti", "both")
FOV_MM: dict[str, float] = {"6mm": 6.0, "3mm": 3.0}
FIRST_ID: dict[str, int] = {"6mm": 10001, "3mm": 10301}
DEPTH_MM = 2.0
#: Projection map types as in OCTA-500: OCT maps are mean projections, OCTA(FULL) a mean, the slab OCTA maps maxima.
PROJECTIONS: tuple[str, ...] = ("OCT(FULL)", "OCT(ILM_OPL)", "OCT(OPL_BM)", "OCTA(FULL)", "OCTA(ILM_OPL)",
                                "OCTA(OPL_BM)")
MARKER = "synthetic.json"
_AGES = {"NORMAL": (25, 70), "AMD": (60, 88), "CNV": (50, 85), "DR": (40, 75), "CSC": (28, 58), "RVO": (45, 80)}
_VOXELS_PER_CHUNK = 2_000_000  # ~8 MB per float32 temporary: fast numpy, bounded memory at 400x640x400
F32 = np.float32


# ------------------------------------------------------------------------------------------- small helpers
def _lut(x: np.ndarray, knots: Sequence[float], values: Sequence[float], n: int = 1024) -> np.ndarray:
    """Piecewise-linear map of ``x`` through (knots, values), clamped, in float32.

    ``np.interp`` always returns float64; a 1024-entry table keeps chunk temporaries in float32.
    """
    lo, hi = knots[0], knots[-1]
    table = np.interp(np.linspace(lo, hi, n), knots, values).astype(F32)
    idx = np.clip((x - lo) * ((n - 1) / (hi - lo)), 0, n - 1).astype(np.int32)
    return table[idx]


def _lowfreq(rng: np.random.Generator, s: int, w: int, cells: int = 5) -> np.ndarray:
    """Smooth random field (unit std) from a coarse grid; looks the same at any resolution."""
    coarse = rng.standard_normal((cells, cells))
    yy, xx = np.meshgrid(np.linspace(0, cells - 1, s), np.linspace(0, cells - 1, w), indexing="ij")
    g = map_coordinates(coarse, [yy, xx], order=3, mode="nearest")
    return ((g - g.mean()) / max(g.std(), 1e-6)).astype(F32)


def _mesh(rng: np.random.Generator, s: int, w: int, scale_px: float) -> np.ndarray:
    """Vessel-mesh texture in 0..1: the zero crossings of band-passed noise look like a capillary network."""
    n = gaussian_filter(rng.standard_normal((s, w), dtype=F32), max(scale_px, 0.5))
    n /= max(float(n.std()), 1e-6)
    return np.exp(-(n / 0.7) ** 2).astype(F32)


def _ellipse_rho(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float,
                 theta: float) -> np.ndarray:
    """Normalized elliptical radius (1 on the boundary) of en-face points."""
    c, s = math.cos(theta), math.sin(theta)
    x, y = u - cu, v - cv
    return np.sqrt(((c * x + s * y) / ru) ** 2 + ((-s * x + c * y) / rv) ** 2).astype(F32)


def _bmp_bytes(img: np.ndarray, ppm: tuple[int, int] = (0, 0)) -> bytes:
    """An 8-bit palette (indexed) BMP with a grayscale colour table, like the OCTA-500 files.

    Args:
        img: 2D uint8 image (rows x columns).
        ppm: pixels per metre (x, y) for the header (ITK ignores them; image viewers show the scale).
    """
    h, w = img.shape
    stride = (w + 3) // 4 * 4  # BMP rows are padded to 4 bytes
    rows = np.zeros((h, stride), np.uint8)
    rows[:, :w] = img[::-1]  # positive height = bottom-up rows
    palette = np.zeros((256, 4), np.uint8)
    palette[:, :3] = np.arange(256, dtype=np.uint8)[:, None]  # B, G, R, reserved
    offset = 14 + 40 + palette.nbytes
    header = b"BM" + struct.pack("<IHHI", offset + rows.nbytes, 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 0, rows.nbytes, ppm[0], ppm[1], 256, 256)
    return header + info + palette.tobytes() + rows.tobytes()


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


def _write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, float, float]) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def spacing_of(shape: Sequence[int], fov: str = "6mm") -> tuple[float, float, float]:
    """SimpleITK-order spacing (x=columns, y=rows, z=B-scans) in mm of a synthetic ``(S, D, W)`` volume."""
    s, d, w = shape
    return (FOV_MM[fov] / w, DEPTH_MM / d, FOV_MM[fov] / s)


# ------------------------------------------------------------------------------------------- eye model
@dataclass
class _Vessel:
    pts: np.ndarray       # (N, 2) en-face (u, v) in FOV units
    radius: np.ndarray    # (N,) radius in mm
    vein: bool
    parent: int = -1
    at: int = 0           # index of the parent point it branches from


@dataclass
class _Plan:
    """Everything needed to render one eye; en-face maps are (S, W) float32, depths in voxel rows."""

    shape: tuple[int, int, int]
    ilm: np.ndarray
    opl: np.ndarray
    nre: np.ndarray       # bottom of the neuroretina (= RPE top unless fluid lifts it)
    rpe: np.ndarray       # top of the RPE band
    rpe_th: np.ndarray
    bm: np.ndarray        # Bruch's membrane = top of the choroid (below drusen)
    chb: np.ndarray       # bottom of the choroid
    cap1: np.ndarray      # superficial capillary density
    cap2: np.ndarray      # deep capillary density
    cc: np.ndarray        # choriocapillaris flow
    chv: np.ndarray       # choroidal vessel pattern
    vessels: list[_Vessel]
    gain: tuple[float, float]
    eye: float = 1.0                 # +1 OD (disc to the right), -1 OS
    vmap: np.ndarray | None = None   # large-vessel coverage 0..1
    zv: np.ndarray | None = None     # vessel centre depth
    rvd: np.ndarray | None = None    # vessel half-height in rows
    tuft: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None      # CNV: footprint, top, flow texture
    slabs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # mask parts
    spheres: list[tuple[float, ...]] = field(default_factory=list)    # (s, d, w, rs, rd, rw) microaneurysms


def _rng(seed: int, index: int, stream: int, *more: int) -> np.random.Generator:
    """Independent streams per eye: anatomy (0), lesion (1), noise (2, per B-scan), metadata (3).

    Keeping the lesion in its own stream makes a NORMAL 'twin' of a diseased eye pixel-identical outside it.
    """
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, index, stream, *more])


def _walk(rng: np.random.Generator, start: tuple[float, float], heading: float, radius: float, vein: bool,
          fovea: tuple[float, float], r_arc: float, faz: float, max_len: float, main: bool,
          vessels: list[_Vessel], parent: int, at: int, depth: int) -> None:
    """Grow one vessel (and, recursively, its branches) as a random walk; mains circle the fovea."""
    step = 0.01
    n_max = int(max_len / step)
    jit = rng.standard_normal(n_max)
    branch_u = rng.random(n_max)
    x, y, h = start[0], start[1], heading
    qx, qy = x - fovea[0], y - fovea[1]
    rot = 1.0 if qx * math.sin(h) - qy * math.cos(h) > 0 else -1.0  # keep circling the same way
    pts = [(x, y)]
    children: list[tuple[int, float, float]] = []
    for k in range(n_max):
        qx, qy = x - fovea[0], y - fovea[1]
        rq = math.hypot(qx, qy) + 1e-6
        if main:  # tangent around the fovea plus a pull towards the (slowly widening) arcade radius
            tx, ty = -qy / rq * rot, qx / rq * rot
            target = r_arc * (1 + 0.3 * k * step)
            pull = 0.9 * (rq - target) / target
            want = math.atan2(ty - pull * qy / rq, tx - pull * qx / rq)
            h += 0.2 * math.atan2(math.sin(want - h), math.cos(want - h)) + 0.08 * jit[k]
        else:
            h += 0.12 * jit[k]
        x, y = x + step * math.cos(h), y + step * math.sin(h)
        pts.append((x, y))
        if rq < faz + 0.02 or not (-0.8 < x < 1.8 and -0.8 < y < 1.8):
            break
        if depth < 2 and k > 5 and branch_u[k] < (0.05 if main else 0.025) and 0 < x < 1 and 0 < y < 1:
            children.append((len(pts) - 1, h + rng.choice([-1.0, 1.0]) * rng.uniform(0.45, 1.0),
                             rng.uniform(0.15, 0.45)))
    arr = np.asarray(pts, F32)
    taper = np.linspace(1.0, 0.7, len(arr), dtype=F32)  # vessels thin towards their ends
    me = len(vessels)
    vessels.append(_Vessel(arr, (radius * taper).astype(F32), vein, parent, at))
    for idx, ch, length in children:
        _walk(rng, (float(arr[idx, 0]), float(arr[idx, 1])), ch, float(radius * taper[idx] * rng.uniform(0.55, 0.7)),
              vein, fovea, r_arc, faz, length, False, vessels, me, idx, depth + 1)


def _anatomy(shape: tuple[int, int, int], rng: np.random.Generator, fov: str) -> tuple[_Plan, dict[str, float]]:
    """A healthy eye: layer surfaces, vessel tree and textures (all drawn from the anatomy stream)."""
    S, D, W = shape
    fmm = FOV_MM[fov]
    v, u = np.meshgrid((np.arange(S, dtype=F32) + 0.5) / S, (np.arange(W, dtype=F32) + 0.5) / W, indexing="ij")
    fu, fv = 0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03)
    eye = 1.0 if rng.random() < 0.5 else -1.0  # OD: optic disc to the right of the fovea, OS: to the left
    r2 = ((u - fu) ** 2 + (v - fv) ** 2) * fmm ** 2  # mm^2 from the foveal centre
    # Retina band in the middle of the depth, thick enough (20-25 % of D) to keep the layers at 64 rows.
    t0 = D * rng.uniform(0.20, 0.25)
    centre = D * rng.uniform(0.44, 0.54)
    tilt = D * (rng.uniform(-0.05, 0.05) * (u - 0.5) + rng.uniform(-0.05, 0.05) * (v - 0.5))
    curve = -D * rng.uniform(0.0, 0.06) * ((u - 0.5) ** 2 + (v - 0.5) ** 2) * 4  # globe curvature
    rpe = (centre + t0 / 2 + tilt + curve + 0.02 * t0 * _lowfreq(rng, S, W)).astype(F32)
    pit = np.exp(-r2 / (2 * rng.uniform(0.45, 0.65) ** 2)).astype(F32)
    thin = 1.0 - 0.08 * r2 / (fmm / 2) ** 2  # slightly thinner retina towards the periphery
    opl = rpe - 0.42 * t0 * (1 + 0.2 * pit)  # the ONL thickens in the pit ...
    ilm = opl - 0.5 * t0 * thin * (1 - 0.88 * pit) * (1 + 0.06 * _lowfreq(rng, S, W))  # ... inner layers vanish
    rpe_th = np.full((S, W), max(1.5, 0.1 * t0), F32)
    chb = rpe + rpe_th + D * rng.uniform(0.10, 0.14) * (1 + 0.1 * _lowfreq(rng, S, W))
    faz = rng.uniform(0.2, 0.33) / fmm  # foveal avascular zone radius, FOV units
    px = fmm / W
    dist = np.sqrt(r2) / fmm
    avascular = np.clip((dist - faz) / (0.1 / fmm), 0, 1).astype(F32)
    cap1 = (0.35 + 0.65 * _mesh(rng, S, W, 0.02 / px)) * avascular
    cap2 = (0.35 + 0.65 * _mesh(rng, S, W, 0.025 / px)) * avascular
    cc = (0.6 + 0.4 * _mesh(rng, S, W, 0.015 / px)).astype(F32)
    chv = _mesh(rng, S, W, 0.12 / px)
    # Vessel tree: two arcades (artery + vein above and below the fovea) and 1-2 smaller vessels, from the disc.
    disc = (fu + eye * rng.uniform(0.62, 0.75), fv + rng.uniform(-0.05, 0.05))
    r_arc = rng.uniform(0.22, 0.32)
    to_fovea = math.atan2(fv - disc[1], fu - disc[0])
    vessels: list[_Vessel] = []
    mains = [(False, -1), (True, -1), (False, 1), (True, 1)]
    mains += [(bool(rng.random() < 0.5), int(rng.choice([-1, 1]))) for _ in range(int(rng.integers(1, 3)))]
    for i, (vein, side) in enumerate(mains):
        spread = rng.uniform(0.35, 0.8) if i < 4 else rng.uniform(0.05, 0.3)
        heading = to_fovea + side * eye * spread
        radius = rng.uniform(0.06, 0.075) if vein else rng.uniform(0.045, 0.055)
        if i >= 4:
            radius *= 0.7
        _walk(rng, disc, heading, radius, vein, (fu, fv), r_arc * (1 if i < 4 else 0.6), faz,
              rng.uniform(0.95, 1.3), i < 4, vessels, -1, 0, 0)
    gain = (float(rng.uniform(0.85, 1.1)), float(rng.uniform(0.85, 1.1)))
    plan = _Plan(shape, ilm.astype(F32), opl.astype(F32), rpe.copy(), rpe, rpe_th, (rpe + rpe_th).astype(F32),
                 chb.astype(F32), cap1.astype(F32), cap2.astype(F32), cc, chv, vessels, gain, eye)
    return plan, {"fu": fu, "fv": fv, "eye": eye, "t0": t0, "faz": faz}


def _rasterize(plan: _Plan, fov: str) -> tuple[np.ndarray, np.ndarray]:
    """Fill the vessel coverage, centre depth and half-height maps of ``plan``.

    Returns:
        For each pixel, the vessel index and the (fractional) point index along that vessel of the nearest
        centre-line sample, so that a lesion can pick out the pixels of one part of one vessel.
    """
    S, D, W = plan.shape
    dx, dy = FOV_MM[fov] / W, FOV_MM[fov] / S
    rows, cols, radii, owner, pos = [], [], [], [], []
    for i, ves in enumerate(plan.vessels):  # resample the centre line every ~0.5 pixel so that it has no gaps
        p = ves.pts.astype(np.float64) * (W, S)
        arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(p, axis=0).T))])
        t = np.linspace(0, arc[-1], max(2, int(arc[-1] / 0.5) + 1))
        cols.append(np.interp(t, arc, p[:, 0]))
        rows.append(np.interp(t, arc, p[:, 1]))
        radii.append(np.interp(t, arc, ves.radius))
        owner.append(np.full(len(t), i))
        pos.append(np.interp(t, arc, np.arange(len(p))))
    r_all, c_all, rad = (np.concatenate(a) for a in (rows, cols, radii))
    order = np.argsort(rad, kind="stable")  # wider vessels drawn last win where vessels cross
    ri, ci = np.floor(r_all[order]).astype(int), np.floor(c_all[order]).astype(int)
    keep = (ri >= 0) & (ri < S) & (ci >= 0) & (ci < W)
    label = np.full((S, W), -1, np.int64)
    label[ri[keep], ci[keep]] = order[keep]
    if (label < 0).all():
        label[0, 0] = int(np.argmax(rad))  # degenerate: no vessel inside the FOV
    dist, (ni, nj) = distance_transform_edt(label < 0, sampling=(dy, dx), return_indices=True)
    nearest = label[ni, nj]
    r_mm = rad[nearest]
    px = min(dx, dy)
    # Partial-volume coverage of a tube of radius r; sub-pixel vessels fade instead of vanishing.
    plan.vmap = (np.clip((r_mm - dist) / px + 0.5, 0, 1) * np.minimum(1.0, 2 * r_mm / px)).astype(F32)
    plan.rvd = np.maximum(0.7, r_mm / (DEPTH_MM / D)).astype(F32)
    plan.zv = (plan.ilm + np.maximum(plan.rvd, 0.12 * (plan.opl - plan.ilm))).astype(F32)
    return np.concatenate(owner)[nearest], np.concatenate(pos)[nearest]


# ------------------------------------------------------------------------------------------- lesions
def _place(rng: np.random.Generator, a: dict[str, float], r_lo: float, r_hi: float,
           margin: float) -> tuple[float, float]:
    """A lesion centre r_lo..r_hi (FOV units) from the fovea, kept ``margin`` inside the FOV."""
    ang, r = rng.uniform(0, 2 * math.pi), rng.uniform(r_lo, r_hi)
    return (float(np.clip(a["fu"] + r * math.cos(ang), margin, 1 - margin)),
            float(np.clip(a["fv"] + r * math.sin(ang), margin, 1 - margin)))


def _add_lesion(plan: _Plan, disease: str, rng: np.random.Generator, a: dict[str, float], fov: str) -> None:
    """Deform/mark ``plan`` with the signature of ``disease`` (lesion stream only) and rasterize the vessels."""
    S, D, W = plan.shape
    v, u = np.meshgrid((np.arange(S, dtype=F32) + 0.5) / S, (np.arange(W, dtype=F32) + 0.5) / W, indexing="ij")
    t0 = a["t0"]

    def footprint(cu: float, cv: float, r: float) -> np.ndarray:
        ratio = rng.uniform(0.75, 1.3)
        return _ellipse_rho(u, v, cu, cv, r * ratio, r / ratio, rng.uniform(0, math.pi))

    if disease == "CSC":  # serous detachment: the whole neuroretina is lifted off the RPE by a fluid dome
        cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
        rho = footprint(cu, cv, rng.uniform(0.14, 0.2))
        lift = (t0 * rng.uniform(0.3, 0.45) * np.clip(1 - rho ** 2, 0, 1) ** 0.7).astype(F32)
        for name in ("ilm", "opl", "nre"):
            setattr(plan, name, getattr(plan, name) - lift)
        plan.slabs.append((1, lift >= 0.5, plan.nre, plan.rpe))
    elif disease == "AMD":  # drusen: RPE domes over Bruch's membrane, choriocapillaris flow voids beneath
        cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
        h = np.zeros((S, W), F32)
        for _ in range(int(rng.integers(3, 7))):
            du, dv = cu + rng.uniform(-0.12, 0.12), cv + rng.uniform(-0.12, 0.12)
            rho = footprint(du, dv, rng.uniform(0.05, 0.085))
            h = np.maximum(h, t0 * rng.uniform(0.26, 0.38) * np.clip(1 - rho ** 2, 0, 1))
        plan.rpe = plan.rpe - h
        plan.nre = plan.nre - h
        plan.opl = plan.opl - 0.5 * h  # the outer nuclear layer is compressed over the drusen
        plan.cc = plan.cc * (1 - 0.85 * np.clip(h / 1.0, 0, 1))
        plan.slabs.append((1, h >= 0.5, plan.rpe, plan.bm))
    elif disease == "CNV":  # type-2 neovascular membrane above the RPE, lifting the outer retina a little
        cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
        rho = footprint(cu, cv, rng.uniform(0.09, 0.13))
        h = (t0 * rng.uniform(0.3, 0.42) * np.clip(1 - rho ** 2, 0, 1) ** 0.6).astype(F32)
        plan.nre, plan.opl, plan.ilm = plan.nre - 0.5 * h, plan.opl - 0.5 * h, plan.ilm - 0.3 * h
        top = (plan.rpe - h).astype(F32)
        px = FOV_MM[fov] / W
        plan.tuft = (h >= 0.5, top, 0.45 + 0.55 * _mesh(rng, S, W, 0.015 / px))
        plan.slabs.append((1, h >= 0.5, top, plan.rpe))
    elif disease == "DR":  # irregular non-perfused patch of both capillary plexuses + microaneurysms
        cu, cv = _place(rng, a, 0.14, 0.3, 0.2)
        r = rng.uniform(0.15, 0.21)
        rho = footprint(cu, cv, r) * (1 + 0.18 * _lowfreq(rng, S, W, 6))
        drop = np.clip((1 - rho) / 0.15, 0, 1).astype(F32)
        plan.cap1, plan.cap2 = plan.cap1 * (1 - drop), plan.cap2 * (1 - drop)
        plan.slabs.append((1, drop >= 0.5, plan.ilm, plan.opl))
        for _ in range(int(rng.integers(4, 9))):
            ang, rr = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.8, 1.3)
            mu = float(np.clip(cu + rr * math.cos(ang), 0.05, 0.95))
            mv = float(np.clip(cv + rr * math.sin(ang), 0.05, 0.95))
            i, j = min(int(mv * S), S - 1), min(int(mu * W), W - 1)
            depth = plan.ilm[i, j] + rng.uniform(0.6, 0.85) * (plan.opl[i, j] - plan.ilm[i, j])
            rs = max(1.0, 0.06 / (FOV_MM[fov] / S))
            rw = max(1.0, 0.06 / (FOV_MM[fov] / W))
            rd = max(1.0, 0.06 / (DEPTH_MM / D))
            plan.spheres.append((i + 0.5, math.floor(depth) + 0.5, j + 0.5, rs, rd, rw))
    elif disease == "RVO":
        _rvo(plan, rng, u, v, a, fov)
        return
    elif disease != "NORMAL":
        raise ConfigError(f"unknown synthetic class {disease!r}; choose from {', '.join(CLASSES)}")
    _rasterize(plan, fov)


def _rvo(plan: _Plan, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, a: dict[str, float],
         fov: str) -> None:
    """Branch vein occlusion: wedge of non-perfusion downstream of a point on a vein, the vein dilated."""
    half = math.radians(rng.uniform(24, 36))

    def territory(apex: np.ndarray, axis: float) -> np.ndarray:  # soft-edged wedge opening along ``axis``
        ang = np.arctan2(v - apex[1], u - apex[0]) - axis
        ang = np.abs(np.arctan2(np.sin(ang), np.cos(ang)))
        near = np.hypot(u - apex[0], v - apex[1])
        return (np.clip((half - ang) / math.radians(6), 0, 1) * np.clip(near / 0.03, 0, 1)).astype(F32)

    cands = [(vi, k) for vi, ves in enumerate(plan.vessels) if ves.vein and ves.parent < 0
             for k in range(len(ves.pts) // 5, int(len(ves.pts) * 0.6))
             if 0.12 < ves.pts[k, 0] < 0.88 and 0.12 < ves.pts[k, 1] < 0.88]
    wedge, dilated = None, {}
    for _ in range(12 if cands else 0):  # an occlusion whose territory lies well inside the FOV
        vi, k = cands[int(rng.integers(len(cands)))]
        pts = plan.vessels[vi].pts
        # The territory drained through the block opens along the chord to the vein further on; as the
        # arcade curves around the fovea this leans towards the macula, as in a branch vein occlusion.
        ahead = pts[min(k + 30, len(pts) - 1)] - pts[k]
        wedge = territory(pts[k].astype(float), math.atan2(float(ahead[1]), float(ahead[0])))
        if (wedge >= 0.5).mean() >= 0.1:
            # Upstream of the block (away from the disc) the vein and its branches there are congested/dilated.
            vein = plan.vessels[vi]
            vein.radius = vein.radius * np.where(np.arange(len(pts)) >= k, rng.uniform(1.7, 2.1), 1).astype(F32)
            dilated = {vi: k} | {ci: 0 for ci, c in enumerate(plan.vessels) if c.parent == vi and c.at >= k}
            for ci in list(dilated)[1:]:
                plan.vessels[ci].radius = plan.vessels[ci].radius * F32(1.5)
            break
    if not dilated:  # no suitable vein in the FOV: occlude at a random point, no vein to dilate
        wedge = territory(np.array(_place(rng, a, 0.1, 0.2, 0.25)), rng.uniform(0, 2 * math.pi))
    plan.cap1, plan.cap2 = plan.cap1 * (1 - 0.92 * wedge), plan.cap2 * (1 - 0.92 * wedge)
    owner, pos = _rasterize(plan, fov)
    plan.slabs.append((1, wedge >= 0.5, plan.ilm, plan.opl))
    # Label 2: the voxels of the dilated part of the vein, found through the raster's nearest-vessel index.
    sel = np.zeros(owner.shape, bool)
    for vi, k in dilated.items():
        sel |= (owner == vi) & (pos >= k)
    vein = sel & (plan.vmap >= 0.5)
    if vein.any():
        plan.slabs.append((2, vein, plan.zv - plan.rvd, plan.zv + plan.rvd))


# ------------------------------------------------------------------------------------------- rendering
def _render_chunk(p: _Plan, s0: int, s1: int, seed: int, index: int) -> tuple[np.ndarray, ...]:
    """OCT, OCTA (uint8) and mask of B-scans ``s0:s1``, all arrays (n, D, W)."""
    S, D, W = p.shape
    n = s1 - s0

    def e(m: np.ndarray) -> np.ndarray:  # en-face map -> broadcastable (n, 1, W)
        return m[s0:s1, None, :]

    d = (np.arange(D, dtype=F32) + 0.5)[None, :, None]
    ilm, opl, nre, rpe, rpe_th, bm, chb = (e(m) for m in (p.ilm, p.opl, p.nre, p.rpe, p.rpe_th, p.bm, p.chb))
    # Anatomical coordinate of the neuroretina: 0 at the ILM, 0.5 at the OPL, 0.9 at the photoreceptor tips.
    a = np.where(d < opl, 0.5 * (d - ilm) / np.maximum(opl - ilm, 0.5),
                 0.5 + 0.4 * (d - opl) / np.maximum(nre - opl, 0.5)).astype(F32)
    ch = ((d - bm) / np.maximum(chb - bm, 1.0)).astype(F32)  # 0 at Bruch's membrane, 1 at the sclera
    neuro = _lut(a, [-0.03, 0.0, 0.09, 0.13, 0.3, 0.34, 0.42, 0.46, 0.52, 0.56, 0.78, 0.8, 0.82, 0.85, 0.88, 0.9],
                 [0.03, 0.78, 0.72, 0.45, 0.5, 0.3, 0.3, 0.55, 0.5, 0.18, 0.18, 0.4, 0.2, 0.72, 0.5, 0.55])
    choroid = _lut(ch, [0.0, 0.15, 0.8, 1.0, 1.6], [0.72, 0.55, 0.4, 0.15, 0.06])
    choroid *= 1 - 0.4 * e(p.chv) * (ch > 0.15)  # dark lumens of the large choroidal vessels
    struct_ = np.select([d < nre, d < rpe, d < rpe + rpe_th, d < bm], [neuro, 0.02, 0.9, 0.55], choroid).astype(F32)
    vmap, zv, rvd = e(p.vmap), e(p.zv), e(p.rvd)
    tube = (vmap * np.exp(-(((d - zv) / rvd) ** 2))).astype(F32)
    struct_ += 0.15 * tube
    struct_ *= np.where(d > zv + rvd, 1 - 0.55 * vmap, 1).astype(F32)  # shadow below large vessels
    svp = _lut(a, [0.04, 0.1, 0.28, 0.34], [0, 1, 1, 0]) * e(p.cap1)
    dcp = _lut(a, [0.38, 0.43, 0.5, 0.55], [0, 1, 1, 0]) * e(p.cap2)
    flow = 0.95 * tube + 0.6 * svp + 0.55 * dcp
    flow += np.where((d >= rpe) & (d < rpe + rpe_th), 0.1 + 0.3 * vmap, 0)  # projection artefacts on the RPE
    flow += _lut(ch, [0.0, 0.04, 0.18, 0.28], [0, 1, 1, 0]) * e(p.cc) * 0.75  # choriocapillaris
    flow += _lut(ch, [0.2, 0.35, 0.8, 1.1], [0, 1, 1, 0]) * (0.2 + 0.3 * e(p.chv))  # choroidal flow
    mask = np.zeros((n, D, W), np.uint8)
    if p.tuft is not None:
        foot, top, tex = p.tuft
        inside = e(foot) & (d >= e(top)) & (d < rpe)
        struct_ = np.where(inside, 0.5 + 0.35 * e(tex), struct_)  # fibrovascular tissue: hyper-reflective
        flow = np.where(inside, e(tex), flow)
    for label, foot, top, bot in p.slabs:  # later parts (secondary findings) overwrite earlier ones
        mask[np.broadcast_to(e(foot) & (d >= e(top)) & (d < e(bot)), mask.shape)] = label
    for cs, cd, cw, rs, rd, rw in p.spheres:  # microaneurysms: bright OCTA dots, slightly reflective
        if cs + rs < s0 or cs - rs > s1:
            continue
        q = ((np.arange(s0, s1, dtype=F32)[:, None, None] + 0.5 - cs) / rs) ** 2 + ((d - cd) / rd) ** 2 \
            + ((np.arange(W, dtype=F32)[None, None, :] + 0.5 - cw) / rw) ** 2
        ball = q <= 1.0
        flow = np.where(ball, 0.95, flow)
        struct_ = np.where(ball, struct_ + 0.25, struct_)
        mask[ball] = 2
    noise = np.stack([_rng(seed, index, 2, s).standard_normal((2, D, W), dtype=F32) for s in range(s0, s1)], 1)
    oct_ = struct_ * np.exp(0.4 * noise[0] - 0.08) * p.gain[0]  # multiplicative speckle (log-normal)
    octa = (flow * np.exp(0.3 * noise[1] - 0.045) + 0.25 * struct_ * np.abs(noise[0])) * p.gain[1]
    return (np.clip(oct_ * 230 + 4 + 3 * noise[1], 0, 255).astype(np.uint8),
            np.clip(octa * 235 + 2 * np.abs(noise[1]), 0, 255).astype(np.uint8), mask)


def _plan(shape: Sequence[int], disease: str, seed: int, index: int, fov: str) -> _Plan:
    shp = tuple(int(x) for x in shape)
    plan, a = _anatomy(shp, _rng(seed, index, 0), fov)  # type: ignore[arg-type]
    _add_lesion(plan, disease, _rng(seed, index, 1), a, fov)
    return plan


def _chunks(shape: Sequence[int]) -> list[tuple[int, int]]:
    step = max(1, _VOXELS_PER_CHUNK // (shape[1] * shape[2]))
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def make_volume(shape: Sequence[int] = (32, 64, 32), disease: str = "NORMAL", seed: int = 0, index: int = 0,
                fov: str = "6mm") -> dict[str, Any]:
    """Render one synthetic eye in memory (the same voxels :func:`generate` writes for that seed and index).

    ``disease="NORMAL"`` with the seed/index of a diseased eye gives its healthy twin: identical anatomy and
    noise, only the lesion missing.

    Returns:
        ``{"oct", "octa", "mask"}`` uint8 arrays of ``shape`` (S, D, W) and ``"spacing"`` (SimpleITK order).
    """
    plan = _plan(shape, disease, seed, index, fov)
    parts = [_render_chunk(plan, s0, s1, seed, index) for s0, s1 in _chunks(shape)]
    oct_, octa, mask = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return {"oct": oct_, "octa": octa, "mask": mask, "spacing": spacing_of(shape, fov)}


# ------------------------------------------------------------------------------------------- writing
def _projections(p: _Plan, s0: int, s1: int, oct8: np.ndarray, octa8: np.ndarray) -> dict[str, np.ndarray]:
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


def _write_subject(rec: dict[str, Any], plan: _Plan, seed: int, index: int, layout: str,
                   fov: str) -> None:
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
        for s0, s1 in _chunks(plan.shape):
            oct8, octa8, m = _render_chunk(plan, s0, s1, seed, index)
            mask[s0:s1] = m
            for key, arr in (("OCT", oct8), ("OCTA", octa8)):
                if nifti:
                    vols[key][s0:s1] = arr
                for i in range(s1 - s0 if bmp else 0):  # OCTA-500 numbering: 1.bmp is the first B-scan
                    with open(stacks[key] / f"{s0 + i + 1}.bmp", "wb") as fh:
                        fh.write(_bmp_bytes(arr[i], ppm))
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
            atomic_write_bytes(paths["projections"][k], _bmp_bytes(_to_u8(img), (ppm[0], ppm[0])))
    for key, arr in vols.items():
        _write_nifti(Path(paths[f"{key}_nifti"]), arr, spacing)
    _write_nifti(Path(paths["mask"]), mask, spacing)


def _records(root: Path, n: int, seed: int, layout: str, fov: str, classes: Sequence[str]) -> list[dict[str, Any]]:
    """IDs, classes (round-robin, so balanced), metadata and output paths of every eye."""
    fov_dir = root / f"OCTA_{fov}"
    recs = []
    for i in range(n):
        sid, disease = str(FIRST_ID[fov] + i), classes[i % len(classes)]
        meta = _rng(seed, i, 3)
        lo, hi = _AGES.get(disease, (30, 80))
        paths: dict[str, Any] = {}
        if layout in ("octa500", "both"):
            paths.update(OCTA=str(fov_dir / "OCTA" / sid), OCT=str(fov_dir / "OCT" / sid),
                         mask=str(fov_dir / "Lesion Masks" / f"{sid}.nii.gz"),
                         projections={k: str(fov_dir / "Projection Maps" / k / f"{sid}.bmp") for k in PROJECTIONS})
        if layout in ("nifti", "both"):
            vol = root / "volumes"
            paths.update(OCTA_nifti=str(vol / f"{sid}_octa.nii.gz"), OCT_nifti=str(vol / f"{sid}_oct.nii.gz"))
            paths.setdefault("mask", str(vol / f"{sid}_mask.nii.gz"))
        recs.append({"id": sid, "disease": disease, "gender": "M" if meta.random() < 0.5 else "F",
                     "age": int(meta.integers(lo, hi + 1)), "eye": None, "paths": paths})
    return recs


def _existing(root: Path) -> list[str]:
    names = ["OCTA_6mm", "OCTA_3mm", "Text labels.xlsx", "manifest.csv", "volumes", MARKER]
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


def generate(root: str | Path, n_subjects: int, shape: Sequence[int] = (32, 64, 32), seed: int = 0,
             layout: str = "octa500", fov: str = "6mm", classes: Sequence[str] = CLASSES,
             overwrite: bool = False) -> list[dict[str, Any]]:
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

    Returns:
        One record per eye: ``id``, ``disease``, ``gender``, ``age``, ``eye`` (OD/OS) and ``paths`` (``OCTA``/``OCT``
        BMP folders, ``projections`` {type: BMP}, ``OCTA_nifti``/``OCT_nifti``, ``mask``; absolute paths).

    Raises:
        ConfigError: bad shape, layout, fov or class name.
        DataError: ``root`` already holds a dataset and ``overwrite`` is false.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"--shape {shape}: need three sizes >= 8 (B-scans,depth,width)")
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if fov not in FOV_MM:
        raise ConfigError(f"fov {fov!r}: choose one of {', '.join(FOV_MM)}")
    bad = [c for c in classes if c not in CLASSES]
    if bad or not classes or n_subjects < 1:
        raise ConfigError(f"synthetic classes must be a non-empty subset of {', '.join(CLASSES)} (got {bad}) and "
                          f"--n-subjects >= 1 (got {n_subjects})")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _clear(root, overwrite)
    params = {"generator": "octa3d.data.synthetic", "seed": seed, "n_subjects": n_subjects, "shape": list(shape),
              "layout": layout, "fov": fov, "classes": list(classes), "spacing_xyz_mm": spacing_of(shape, fov)}
    atomic_write_text(root / MARKER, json.dumps({**params, "complete": False}, indent=1) + "\n")
    recs = _records(root, n_subjects, seed, layout, fov, list(classes))
    for i, rec in enumerate(tqdm(recs, desc="synth", unit="eye", disable=None)):
        plan = _plan(shape, rec["disease"], seed, i, fov)
        rec["eye"] = "OD" if plan.eye > 0 else "OS"
        _write_subject(rec, plan, seed, i, layout, fov)
        log.debug("eye %s (%s) written", rec["id"], rec["disease"])
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
    atomic_write_text(root / MARKER, json.dumps({**params, "complete": True}, indent=1) + "\n")
    log.info("wrote %d synthetic eyes (%s) to %s", n_subjects, "x".join(map(str, shape)), root)
    return recs


def run(cfg: Any, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``--mode synth``: generate the dataset from ``cfg`` and print a summary with the next command.

    Uses ``--data-root``, ``--n-subjects``, ``--shape``, ``--layout``, ``--seed``, ``--overwrite`` and ``--fov``
    (3mm writes ``OCTA_3mm``; anything else 6mm).
    """
    root = Path(cfg.data.data_root)
    fov = cfg.data.fov if cfg.data.fov in FOV_MM else "6mm"
    recs = generate(root, cfg.synth.n_subjects, cfg.synth.shape, seed=cfg.run.seed, layout=cfg.synth.layout,
                    fov=fov, overwrite=cfg.run.overwrite)
    counts = Counter(r["disease"] for r in recs)
    where = {"octa500": f"{root}/OCTA_{fov}/{{OCTA,OCT}}/<ID>/<n>.bmp, labels in '{root}/Text labels.xlsx'",
             "nifti": f"{root}/volumes/<ID>_{{octa,oct}}.nii.gz, labels in {root}/manifest.csv"}
    lines = [f"Synthetic OCTA-500: {len(recs)} eyes of {'x'.join(map(str, cfg.synth.shape))} "
             f"(B-scans x depth x width, {fov}, seed {cfg.run.seed}) in {root}",
             "  classes: " + ", ".join(f"{c} {counts[c]}" for c in CLASSES if counts[c])]
    lines += [f"  volumes: {where[k]}" for k in ("octa500", "nifti") if cfg.synth.layout in (k, "both")]
    lines += [f"  lesion masks: {Path(recs[0]['paths']['mask']).parent}/",
              f"Next: python main.py --mode prepare --data-root {root} --dim 3d"]
    print("\n".join(lines))
    return recs
