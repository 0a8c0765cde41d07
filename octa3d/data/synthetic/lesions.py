"""The disease signatures of the synthetic generator: each deforms a healthy :class:`~.anatomy.Plan` and records
its lesion in the plan's mask parts (1 = the lesion, 2 = a secondary finding):

* DR: capillary dropout in the inner retina (1) + microaneurysm dots (2);
* CNV: neovascular flow tuft above the RPE, bright in OCTA and hyper-reflective in OCT (1);
* AMD: drusen, dome-shaped RPE elevations with flow voids beneath (1);
* CSC: subretinal fluid, a dark dome between neuroretina and RPE (1);
* RVO: wedge of non-perfusion downstream of an occluded vein (1) + the dilated vein (2);
* NORMAL: none (all-zero mask).

Every draw comes from the eye's lesion stream, so a NORMAL twin (same seed and index) has the same anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from octa3d.data.octa500 import DEPTH_MM, FOV_LATERAL_MM
from octa3d.data.synthetic.anatomy import F32, Plan, ellipse_rho, lowfreq, mesh, rasterize
from octa3d.errors import ConfigError

#: The synthetic classes, in the round-robin order :func:`~octa3d.data.synthetic.generate` assigns them.
CLASSES: tuple[str, ...] = ("NORMAL", "AMD", "CNV", "DR", "CSC", "RVO")

_Grid = np.ndarray  # en-face coordinates u (columns) or v (B-scans) in FOV units, (S, W) float32


def _place(rng: np.random.Generator, a: dict[str, float], r_lo: float, r_hi: float,
           margin: float) -> tuple[float, float]:
    """A lesion centre r_lo..r_hi (FOV units) from the fovea, kept ``margin`` inside the FOV."""
    ang, r = rng.uniform(0, 2 * math.pi), rng.uniform(r_lo, r_hi)
    return (float(np.clip(a["fu"] + r * math.cos(ang), margin, 1 - margin)),
            float(np.clip(a["fv"] + r * math.sin(ang), margin, 1 - margin)))



def _footprint(rng: np.random.Generator, u: _Grid, v: _Grid, cu: float, cv: float, r: float) -> np.ndarray:
    """Elliptical radius around ``(cu, cv)`` of a randomly stretched and turned ellipse of mean radius ``r``."""
    ratio = rng.uniform(0.75, 1.3)
    return ellipse_rho(u, v, cu, cv, r * ratio, r / ratio, rng.uniform(0, math.pi))


def _csc(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str) -> None:
    """Serous detachment: the whole neuroretina is lifted off the RPE by a fluid dome."""
    cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
    rho = _footprint(rng, u, v, cu, cv, rng.uniform(0.14, 0.2))
    lift = (a["t0"] * rng.uniform(0.3, 0.45) * np.clip(1 - rho ** 2, 0, 1) ** 0.7).astype(F32)
    for name in ("ilm", "opl", "nre"):
        setattr(plan, name, getattr(plan, name) - lift)
    plan.slabs.append((1, lift >= 0.5, plan.nre, plan.rpe))


def _amd(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str) -> None:
    """Drusen: RPE domes over Bruch's membrane, choriocapillaris flow voids beneath."""
    S, _, W = plan.shape
    cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
    h = np.zeros((S, W), F32)
    for _ in range(int(rng.integers(3, 7))):
        du, dv = cu + rng.uniform(-0.12, 0.12), cv + rng.uniform(-0.12, 0.12)
        rho = _footprint(rng, u, v, du, dv, rng.uniform(0.05, 0.085))
        h = np.maximum(h, a["t0"] * rng.uniform(0.26, 0.38) * np.clip(1 - rho ** 2, 0, 1))
    plan.rpe = plan.rpe - h
    plan.nre = plan.nre - h
    plan.opl = plan.opl - 0.5 * h  # the outer nuclear layer is compressed over the drusen
    plan.cc = plan.cc * (1 - 0.85 * np.clip(h / 1.0, 0, 1))
    plan.slabs.append((1, h >= 0.5, plan.rpe, plan.bm))


def _cnv(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str) -> None:
    """Type-2 neovascular membrane above the RPE, lifting the outer retina a little."""
    S, _, W = plan.shape
    cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
    rho = _footprint(rng, u, v, cu, cv, rng.uniform(0.09, 0.13))
    h = (a["t0"] * rng.uniform(0.3, 0.42) * np.clip(1 - rho ** 2, 0, 1) ** 0.6).astype(F32)
    plan.nre, plan.opl, plan.ilm = plan.nre - 0.5 * h, plan.opl - 0.5 * h, plan.ilm - 0.3 * h
    top = (plan.rpe - h).astype(F32)
    px = FOV_LATERAL_MM[fov] / W
    plan.tuft = (h >= 0.5, top, 0.45 + 0.55 * mesh(rng, S, W, 0.015 / px))
    plan.slabs.append((1, h >= 0.5, top, plan.rpe))


def _dr(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str) -> None:
    """Irregular non-perfused patch of both capillary plexuses + microaneurysms around its edge."""
    S, D, W = plan.shape
    cu, cv = _place(rng, a, 0.14, 0.3, 0.2)
    r = rng.uniform(0.15, 0.21)
    rho = _footprint(rng, u, v, cu, cv, r) * (1 + 0.18 * lowfreq(rng, S, W, 6))
    drop = np.clip((1 - rho) / 0.15, 0, 1).astype(F32)
    plan.cap1, plan.cap2 = plan.cap1 * (1 - drop), plan.cap2 * (1 - drop)
    plan.slabs.append((1, drop >= 0.5, plan.ilm, plan.opl))
    for _ in range(int(rng.integers(4, 9))):
        ang, rr = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.8, 1.3)
        mu = float(np.clip(cu + rr * math.cos(ang), 0.05, 0.95))
        mv = float(np.clip(cv + rr * math.sin(ang), 0.05, 0.95))
        i, j = min(int(mv * S), S - 1), min(int(mu * W), W - 1)
        depth = plan.ilm[i, j] + rng.uniform(0.6, 0.85) * (plan.opl[i, j] - plan.ilm[i, j])
        rs = max(1.0, 0.06 / (FOV_LATERAL_MM[fov] / S))
        rw = max(1.0, 0.06 / (FOV_LATERAL_MM[fov] / W))
        rd = max(1.0, 0.06 / (DEPTH_MM / D))
        plan.spheres.append((i + 0.5, math.floor(depth) + 0.5, j + 0.5, rs, rd, rw))


def add_lesion(plan: Plan, disease: str, rng: np.random.Generator, a: dict[str, float], fov: str) -> None:
    """Deform/mark ``plan`` with the signature of ``disease`` (lesion stream only) and rasterize the vessels.

    Args:
        plan: a healthy eye from :func:`~.anatomy.healthy_eye`; changed in place.
        disease: one of :data:`CLASSES`.
        rng: the eye's lesion stream.
        a: the anatomy facts :func:`~.anatomy.healthy_eye` returned.
        fov: ``"6mm"`` or ``"3mm"``.

    Raises:
        ConfigError: unknown class.
    """
    S, D, W = plan.shape
    v, u = np.meshgrid((np.arange(S, dtype=F32) + 0.5) / S, (np.arange(W, dtype=F32) + 0.5) / W, indexing="ij")
    if disease == "RVO":  # rasterizes the vessels itself: it finds the dilated vein's pixels in the raster
        _rvo(plan, rng, u, v, a, fov)
        return
    if disease != "NORMAL":
        if disease not in _SIGNATURES:
            raise ConfigError(f"unknown synthetic class {disease!r}; choose from {', '.join(CLASSES)}")
        _SIGNATURES[disease](plan, rng, u, v, a, fov)
    rasterize(plan, fov)


def _rvo(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str) -> None:
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
    owner, pos = rasterize(plan, fov)
    plan.slabs.append((1, wedge >= 0.5, plan.ilm, plan.opl))
    # Label 2: the voxels of the dilated part of the vein, found through the raster's nearest-vessel index.
    sel = np.zeros(owner.shape, bool)
    for vi, k in dilated.items():
        sel |= (owner == vi) & (pos >= k)
    vein = sel & (plan.vmap >= 0.5)
    if vein.any():
        plan.slabs.append((2, vein, plan.zv - plan.rvd, plan.zv + plan.rvd))


_SIGNATURES: dict[str, Callable[[Plan, np.random.Generator, _Grid, _Grid, dict[str, float], str], None]] = {
    "CSC": _csc, "AMD": _amd, "CNV": _cnv, "DR": _dr}
