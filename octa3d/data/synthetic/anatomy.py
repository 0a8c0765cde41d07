"""The healthy eye of the synthetic generator: layer surfaces, vessel tree and textures, as a render :class:`Plan`.

Every eye is a layered retina (bright RNFL, darker inner layers, OPL, dark ONL, IS/OS + RPE, choroid) with a
foveal pit and avascular zone, a superficial vessel tree (arcades from the optic-disc side, shadowing the OCT
below them), capillary plexuses, choriocapillaris, and random per-eye position/tilt/thickness/brightness, all
drawn from the eye's anatomy random stream (:func:`eye_rng`). :mod:`.lesions` then deforms the plan and
:mod:`.render` turns it into voxels.

The names here are shared by the generator's modules; the package's public API is :mod:`octa3d.data.synthetic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter, map_coordinates

from octa3d.data.octa500 import DEPTH_MM, FOV_LATERAL_MM
from octa3d.data.synthetic.look import Look

F32 = np.float32


# ------------------------------------------------------------------------------------------- small helpers
def lut(x: np.ndarray, knots: Sequence[float], values: Sequence[float], n: int = 1024) -> np.ndarray:
    """Piecewise-linear map of ``x`` through (knots, values), clamped, in float32.

    ``np.interp`` always returns float64; a 1024-entry table keeps chunk temporaries in float32.
    """
    lo, hi = knots[0], knots[-1]
    table = np.interp(np.linspace(lo, hi, n), knots, values).astype(F32)
    idx = np.clip((x - lo) * ((n - 1) / (hi - lo)), 0, n - 1).astype(np.int32)
    return table[idx]


def lowfreq(rng: np.random.Generator, s: int, w: int, cells: int = 5) -> np.ndarray:
    """Smooth random field (unit std) from a coarse grid; looks the same at any resolution."""
    coarse = rng.standard_normal((cells, cells))
    yy, xx = np.meshgrid(np.linspace(0, cells - 1, s), np.linspace(0, cells - 1, w), indexing="ij")
    g = map_coordinates(coarse, [yy, xx], order=3, mode="nearest")
    return ((g - g.mean()) / max(g.std(), 1e-6)).astype(F32)


def mesh(rng: np.random.Generator, s: int, w: int, scale_px: float, width: float = 0.7) -> np.ndarray:
    """Vessel-mesh texture in 0..1: the zero crossings of band-passed noise look like a capillary network.

    ``scale_px`` sets the spacing of the lines, ``width`` their thickness relative to it (so the area they cover).
    """
    n = gaussian_filter(rng.standard_normal((s, w), dtype=F32), max(scale_px, 0.5))
    n /= max(float(n.std()), 1e-6)
    return np.exp(-(n / width) ** 2).astype(F32)


def ellipse_rho(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float,
                 theta: float) -> np.ndarray:
    """Normalized elliptical radius (1 on the boundary) of en-face points."""
    c, s = math.cos(theta), math.sin(theta)
    x, y = u - cu, v - cv
    return np.sqrt(((c * x + s * y) / ru) ** 2 + ((-s * x + c * y) / rv) ** 2).astype(F32)


def spacing_of(shape: Sequence[int], fov: str = "6mm") -> tuple[float, float, float]:
    """SimpleITK-order spacing (x=columns, y=rows, z=B-scans) in mm of a synthetic ``(S, D, W)`` volume."""
    s, d, w = shape
    return (FOV_LATERAL_MM[fov] / w, DEPTH_MM / d, FOV_LATERAL_MM[fov] / s)


# ------------------------------------------------------------------------------------------- eye model
@dataclass
class Vessel:
    """One vessel's centre line (a random walk) with its radius profile; branches name their parent."""

    pts: np.ndarray       # (N, 2) en-face (u, v) in FOV units
    radius: np.ndarray    # (N,) radius in mm
    vein: bool
    parent: int = -1
    at: int = 0           # index of the parent point it branches from


@dataclass
class Plan:
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
    vessels: list[Vessel]
    gain: tuple[float, float]
    eye: float = 1.0                 # +1 OD (disc to the right), -1 OS
    vmap: np.ndarray | None = None   # large-vessel coverage 0..1
    zv: np.ndarray | None = None     # vessel centre depth
    rvd: np.ndarray | None = None    # vessel half-height in rows
    tuft: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None      # CNV: footprint, top, flow texture
    fluid: float = 0.02              # OCT reflectivity of subretinal fluid (CSC; a look's contrast raises it)
    offset: tuple[float, float] = (0.0, 0.0)                           # OCT, OCTA offset in 8-bit grey levels
    motion: np.ndarray | None = None  # (S,) OCTA motion-line strength per B-scan (a look's artefacts)
    slabs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)  # mask parts
    spheres: list[tuple[float, ...]] = field(default_factory=list)    # (s, d, w, rs, rd, rw) microaneurysms


def eye_rng(seed: int, index: int, stream: int, *more: int) -> np.random.Generator:
    """Independent streams per eye: anatomy (0), lesion (1), noise (2, per B-scan), metadata (3), a look's
    between-eye drift (4) and artefacts (5).

    Keeping the lesion in its own stream makes a NORMAL 'twin' of a diseased eye pixel-identical outside it; giving
    a look's draws their own streams leaves the stock eyes (:class:`~.look.Look` ``()``) as they were.
    """
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, index, stream, *more])


def _walk(rng: np.random.Generator, start: tuple[float, float], heading: float, radius: float, vein: bool,
          fovea: tuple[float, float], r_arc: float, faz: float, max_len: float, main: bool,
          vessels: list[Vessel], parent: int, at: int, depth: int, branching: float = 1.0) -> None:
    """Grow one vessel (and, recursively, its branches) as a random walk; mains circle the fovea.

    ``branching`` multiplies the chance of a branch at each step.
    """
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
        if depth < 2 and k > 5 and branch_u[k] < (0.05 if main else 0.025) * branching and 0 < x < 1 and 0 < y < 1:
            children.append((len(pts) - 1, h + rng.choice([-1.0, 1.0]) * rng.uniform(0.45, 1.0),
                             rng.uniform(0.15, 0.45)))
    arr = np.asarray(pts, F32)
    taper = np.linspace(1.0, 0.7, len(arr), dtype=F32)  # vessels thin towards their ends
    me = len(vessels)
    vessels.append(Vessel(arr, (radius * taper).astype(F32), vein, parent, at))
    for idx, ch, length in children:
        _walk(rng, (float(arr[idx, 0]), float(arr[idx, 1])), ch, float(radius * taper[idx] * rng.uniform(0.55, 0.7)),
              vein, fovea, r_arc, faz, length, False, vessels, me, idx, depth + 1, branching)


def healthy_eye(shape: tuple[int, int, int], rng: np.random.Generator, fov: str,
                look: Look = Look()) -> tuple[Plan, dict[str, float]]:
    """A healthy eye: layer surfaces, vessel tree and textures (all drawn from the anatomy stream).

    ``look.capillaries`` scales the capillary density (and the vessel tree's branching); the look's other knobs
    act in :func:`~.render.plan_eye`, :mod:`.lesions` and :func:`~.render.render_chunk`.

    Returns:
        The plan (vessels not yet rasterized) and the facts lesions are placed by: fovea ``fu``/``fv`` (FOV
        units), ``eye`` (+1 OD, -1 OS), retinal thickness ``t0`` (rows) and avascular zone radius ``faz``.
    """
    S, D, W = shape
    fmm = FOV_LATERAL_MM[fov]
    v, u = np.meshgrid((np.arange(S, dtype=F32) + 0.5) / S, (np.arange(W, dtype=F32) + 0.5) / W, indexing="ij")
    fu, fv = 0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03)
    eye = 1.0 if rng.random() < 0.5 else -1.0  # OD: optic disc to the right of the fovea, OS: to the left
    r2 = ((u - fu) ** 2 + (v - fv) ** 2) * fmm ** 2  # mm^2 from the foveal centre
    # Retina band in the middle of the depth, thick enough (20-25 % of D) to keep the layers at 64 rows.
    t0 = D * rng.uniform(0.20, 0.25)
    centre = D * rng.uniform(0.44, 0.54)
    tilt = D * (rng.uniform(-0.05, 0.05) * (u - 0.5) + rng.uniform(-0.05, 0.05) * (v - 0.5))
    curve = -D * rng.uniform(0.0, 0.06) * ((u - 0.5) ** 2 + (v - 0.5) ** 2) * 4  # globe curvature
    rpe = (centre + t0 / 2 + tilt + curve + 0.02 * t0 * lowfreq(rng, S, W)).astype(F32)
    pit = np.exp(-r2 / (2 * rng.uniform(0.45, 0.65) ** 2)).astype(F32)
    thin = 1.0 - 0.08 * r2 / (fmm / 2) ** 2  # slightly thinner retina towards the periphery
    opl = rpe - 0.42 * t0 * (1 + 0.2 * pit)  # the ONL thickens in the pit ...
    ilm = opl - 0.5 * t0 * thin * (1 - 0.88 * pit) * (1 + 0.06 * lowfreq(rng, S, W))  # ... inner layers vanish
    rpe_th = np.full((S, W), max(1.5, 0.1 * t0), F32)
    chb = rpe + rpe_th + D * rng.uniform(0.10, 0.14) * (1 + 0.1 * lowfreq(rng, S, W))
    faz = rng.uniform(0.2, 0.33) / fmm  # foveal avascular zone radius, FOV units
    px = fmm / W
    dist = np.sqrt(r2) / fmm
    avascular = np.clip((dist - faz) / (0.1 / fmm), 0, 1).astype(F32)
    # Density c: c times as many lines (spacing / c) of the same thickness in mm (relative width 0.7 c), so c
    # times the coverage, and the unresolved background (0.35) scaled alike.
    c = look.capillaries
    cap1 = (0.35 * c + 0.65 * mesh(rng, S, W, 0.02 / px / c, 0.7 * c)) * avascular
    cap2 = (0.35 * c + 0.65 * mesh(rng, S, W, 0.025 / px / c, 0.7 * c)) * avascular
    cc = (0.6 + 0.4 * mesh(rng, S, W, 0.015 / px)).astype(F32)
    chv = mesh(rng, S, W, 0.12 / px)
    # Vessel tree: two arcades (artery + vein above and below the fovea) and 1-2 smaller vessels, from the disc.
    disc = (fu + eye * rng.uniform(0.62, 0.75), fv + rng.uniform(-0.05, 0.05))
    r_arc = rng.uniform(0.22, 0.32)
    to_fovea = math.atan2(fv - disc[1], fu - disc[0])
    vessels: list[Vessel] = []
    mains = [(False, -1), (True, -1), (False, 1), (True, 1)]
    mains += [(bool(rng.random() < 0.5), int(rng.choice([-1, 1]))) for _ in range(int(rng.integers(1, 3)))]
    for i, (vein, side) in enumerate(mains):
        spread = rng.uniform(0.35, 0.8) if i < 4 else rng.uniform(0.05, 0.3)
        heading = to_fovea + side * eye * spread
        radius = rng.uniform(0.06, 0.075) if vein else rng.uniform(0.045, 0.055)
        if i >= 4:
            radius *= 0.7
        _walk(rng, disc, heading, radius, vein, (fu, fv), r_arc * (1 if i < 4 else 0.6), faz,
              rng.uniform(0.95, 1.3), i < 4, vessels, -1, 0, 0, c)
    gain = (float(rng.uniform(0.85, 1.1)), float(rng.uniform(0.85, 1.1)))
    plan = Plan(shape, ilm.astype(F32), opl.astype(F32), rpe.copy(), rpe, rpe_th, (rpe + rpe_th).astype(F32),
                 chb.astype(F32), cap1.astype(F32), cap2.astype(F32), cc, chv, vessels, gain, eye)
    return plan, {"fu": fu, "fv": fv, "eye": eye, "t0": t0, "faz": faz}


def rasterize(plan: Plan, fov: str) -> tuple[np.ndarray, np.ndarray]:
    """Fill the vessel coverage, centre depth and half-height maps of ``plan``.

    Returns:
        For each pixel, the vessel index and the (fractional) point index along that vessel of the nearest
        centre-line sample, so that a lesion can pick out the pixels of one part of one vessel.
    """
    S, D, W = plan.shape
    dx, dy = FOV_LATERAL_MM[fov] / W, FOV_LATERAL_MM[fov] / S
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
