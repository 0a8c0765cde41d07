"""The disease signatures of the synthetic generator: each deforms a healthy :class:`~.anatomy.Plan` and records
its lesion in the plan's mask parts (1 = the lesion, 2 = a secondary finding):

* DR: capillary dropout in the inner retina (1) + microaneurysm dots (2), or one of them (``Look.dr_kind``);
* CNV: neovascular flow tuft above the RPE, bright in OCTA and hyper-reflective in OCT (1);
* AMD: drusen, dome-shaped RPE elevations with flow voids beneath (1);
* CSC: subretinal fluid, a dark dome between neuroretina and RPE (1);
* RVO: wedge of non-perfusion downstream of an occluded vein (1) + the dilated vein (2);
* NORMAL: none (all-zero mask).

Every draw comes from the eye's lesion stream, so a NORMAL twin (same seed and index) has the same anatomy. A
:class:`~.look.Look` scales each signature (``contrast``, ``size``, ``count``, ``ma_depth``, ``dr_kind``); the
stock look leaves the arithmetic exact, so its eyes are those of the generator before looks existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from octa3d.data.octa500 import DEPTH_MM, FOV_LATERAL_MM
from octa3d.data.synthetic.anatomy import F32, Plan, ellipse_rho, lowfreq, mesh, rasterize
from octa3d.data.synthetic.look import Look
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


def _lerp(a: Any, b: Any, t: float) -> Any:
    """``a`` moved a fraction ``t`` towards ``b``; exactly ``b`` at ``t = 1`` (stock) and ``a`` at ``t = 0``."""
    return (1 - t) * a + t * b


def _radius(r: float, look: Look, shape: tuple[int, ...]) -> float:
    """A lesion radius (FOV units) scaled by ``look.size``, but not below 1.5 pixels (or stock, if smaller).

    A small look must not make a lesion vanish between the pixel centres of a small volume; at ``size = 1`` this is
    exactly ``r``.
    """
    return max(r * look.size, min(r, 1.5 / min(shape[0], shape[2])))


def _count(n: int, look: Look) -> int:
    """A number of foci scaled by ``look.count`` (rounded half up, at least one)."""
    return max(1, int(n * look.count + 0.5))


def _footprint(rng: np.random.Generator, u: _Grid, v: _Grid, cu: float, cv: float, r: float) -> np.ndarray:
    """Elliptical radius around ``(cu, cv)`` of a randomly stretched and turned ellipse of mean radius ``r``."""
    ratio = rng.uniform(0.75, 1.3)
    return ellipse_rho(u, v, cu, cv, r * ratio, r / ratio, rng.uniform(0, math.pi))


def _csc(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str,
         look: Look) -> None:
    """Serous detachment: the whole neuroretina is lifted off the RPE by a fluid dome."""
    cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
    rho = _footprint(rng, u, v, cu, cv, _radius(rng.uniform(0.14, 0.2), look, plan.shape))
    plan.fluid = _lerp(0.45, plan.fluid, look.contrast)  # less contrast: fluid as grey as the outer retina
    lift = (a["t0"] * rng.uniform(0.3, 0.45) * np.clip(1 - rho ** 2, 0, 1) ** 0.7).astype(F32)
    for name in ("ilm", "opl", "nre"):
        setattr(plan, name, getattr(plan, name) - lift)
    plan.slabs.append((1, lift >= 0.5, plan.nre, plan.rpe))


def _amd(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str,
         look: Look) -> None:
    """Drusen: RPE domes over Bruch's membrane, choriocapillaris flow voids beneath.

    Their elevation is what makes drusen visible, so ``look.contrast`` scales their height (and the void's depth).
    """
    S, _, W = plan.shape
    cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
    h = np.zeros((S, W), F32)
    for _ in range(_count(int(rng.integers(3, 7)), look)):
        du, dv = cu + rng.uniform(-0.12, 0.12) * look.size, cv + rng.uniform(-0.12, 0.12) * look.size
        rho = _footprint(rng, u, v, du, dv, _radius(rng.uniform(0.05, 0.085), look, plan.shape))
        h = np.maximum(h, a["t0"] * rng.uniform(0.26, 0.38) * look.contrast * np.clip(1 - rho ** 2, 0, 1))
    plan.rpe = plan.rpe - h
    plan.nre = plan.nre - h
    plan.opl = plan.opl - 0.5 * h  # the outer nuclear layer is compressed over the drusen
    plan.cc = plan.cc * (1 - np.minimum(0.85 * look.contrast * np.clip(h / 1.0, 0, 1), 1))
    plan.slabs.append((1, h >= 0.5, plan.rpe, plan.bm))


def _cnv(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str,
         look: Look) -> None:
    """Type-2 neovascular membrane above the RPE, lifting the outer retina a little.

    (``look.contrast`` acts on the tuft's voxels in :func:`~.render.render_chunk`.)
    """
    S, _, W = plan.shape
    cu, cv = _place(rng, a, 0.0, 0.15, 0.25)
    rho = _footprint(rng, u, v, cu, cv, _radius(rng.uniform(0.09, 0.13), look, plan.shape))
    h = (a["t0"] * rng.uniform(0.3, 0.42) * np.clip(1 - rho ** 2, 0, 1) ** 0.6).astype(F32)
    plan.nre, plan.opl, plan.ilm = plan.nre - 0.5 * h, plan.opl - 0.5 * h, plan.ilm - 0.3 * h
    top = (plan.rpe - h).astype(F32)
    px = FOV_LATERAL_MM[fov] / W
    plan.tuft = (h >= 0.5, top, 0.45 + 0.55 * mesh(rng, S, W, 0.015 / px))
    plan.slabs.append((1, h >= 0.5, top, plan.rpe))


def _dr(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str,
         look: Look) -> None:
    """Irregular non-perfused patch of both capillary plexuses + microaneurysms around its edge.

    ``look.dr_kind`` keeps one of the two; the patch is drawn either way, so the microaneurysms of
    ``"microaneurysms"`` sit where those of ``"both"`` do. (``look.contrast`` scales the microaneurysms'
    brightness in :func:`~.render.render_chunk`.)
    """
    S, D, W = plan.shape
    cu, cv = _place(rng, a, 0.14, 0.3, 0.2)
    r = _radius(rng.uniform(0.15, 0.21), look, plan.shape)
    rho = _footprint(rng, u, v, cu, cv, r) * (1 + 0.18 * lowfreq(rng, S, W, 6))
    patch = np.clip((1 - rho) / 0.15, 0, 1).astype(F32)  # 1 inside, a soft edge
    if look.dr_kind in ("both", "dropout"):
        # Non-perfusion is an absence of flow: the capillaries are removed there (not darkened), and the mask's
        # label 1 covers the whole non-perfused slab of the inner retina.
        drop = np.minimum(patch * look.contrast, 1)
        plan.cap1, plan.cap2 = plan.cap1 * (1 - drop), plan.cap2 * (1 - drop)
        plan.slabs.append((1, patch >= 0.5, plan.ilm, plan.opl))
    if look.dr_kind == "dropout":
        return
    for _ in range(_count(int(rng.integers(4, 9)), look)):
        ang, rr = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.8, 1.3)
        mu = float(np.clip(cu + rr * math.cos(ang), 0.05, 0.95))
        mv = float(np.clip(cv + rr * math.sin(ang), 0.05, 0.95))
        i, j = min(int(mv * S), S - 1), min(int(mu * W), W - 1)
        depth = plan.ilm[i, j] + rng.uniform(*look.ma_depth) * (plan.opl[i, j] - plan.ilm[i, j])
        rs = max(1.0, 0.06 * look.size / (FOV_LATERAL_MM[fov] / S))
        rw = max(1.0, 0.06 * look.size / (FOV_LATERAL_MM[fov] / W))
        rd = max(1.0, 0.06 * look.size / (DEPTH_MM / D))
        plan.spheres.append((i + 0.5, math.floor(depth) + 0.5, j + 0.5, rs, rd, rw))


def add_lesion(plan: Plan, disease: str, rng: np.random.Generator, a: dict[str, float], fov: str,
               look: Look = Look()) -> None:
    """Deform/mark ``plan`` with the signature of ``disease`` (lesion stream only) and rasterize the vessels.

    Args:
        plan: a healthy eye from :func:`~.anatomy.healthy_eye`; changed in place.
        disease: one of :data:`CLASSES`.
        rng: the eye's lesion stream.
        a: the anatomy facts :func:`~.anatomy.healthy_eye` returned.
        fov: ``"6mm"`` or ``"3mm"``.
        look: the cohort's look (:class:`~.look.Look`; the default is stock).

    Raises:
        ConfigError: unknown class.
    """
    S, D, W = plan.shape
    v, u = np.meshgrid((np.arange(S, dtype=F32) + 0.5) / S, (np.arange(W, dtype=F32) + 0.5) / W, indexing="ij")
    if disease == "RVO":  # rasterizes the vessels itself: it finds the dilated vein's pixels in the raster
        _rvo(plan, rng, u, v, a, fov, look)
        return
    if disease != "NORMAL":
        if disease not in _SIGNATURES:
            raise ConfigError(f"unknown synthetic class {disease!r}; choose from {', '.join(CLASSES)}")
        _SIGNATURES[disease](plan, rng, u, v, a, fov, look)
    rasterize(plan, fov)


def _rvo(plan: Plan, rng: np.random.Generator, u: _Grid, v: _Grid, a: dict[str, float], fov: str,
         look: Look) -> None:
    """Branch vein occlusion: wedge of non-perfusion downstream of a point on a vein, the vein dilated."""
    half = math.radians(rng.uniform(24, 36) * look.size)

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
        if (wedge >= 0.5).mean() >= 0.1 * look.size:  # a narrower wedge covers proportionally less
            # Upstream of the block (away from the disc) the vein and its branches there are congested/dilated.
            vein = plan.vessels[vi]
            widen = _lerp(1.0, rng.uniform(1.7, 2.1), look.contrast)
            vein.radius = vein.radius * np.where(np.arange(len(pts)) >= k, widen, 1).astype(F32)
            dilated = {vi: k} | {ci: 0 for ci, c in enumerate(plan.vessels) if c.parent == vi and c.at >= k}
            for ci in list(dilated)[1:]:
                plan.vessels[ci].radius = plan.vessels[ci].radius * F32(_lerp(1.0, 1.5, look.contrast))
            break
    if not dilated:  # no suitable vein in the FOV: occlude at a random point, no vein to dilate
        wedge = territory(np.array(_place(rng, a, 0.1, 0.2, 0.25)), rng.uniform(0, 2 * math.pi))
    loss = np.minimum(0.92 * look.contrast * wedge, 1)
    plan.cap1, plan.cap2 = plan.cap1 * (1 - loss), plan.cap2 * (1 - loss)
    owner, pos = rasterize(plan, fov)
    plan.slabs.append((1, wedge >= 0.5, plan.ilm, plan.opl))
    # Label 2: the voxels of the dilated part of the vein, found through the raster's nearest-vessel index.
    sel = np.zeros(owner.shape, bool)
    for vi, k in dilated.items():
        sel |= (owner == vi) & (pos >= k)
    vein = sel & (plan.vmap >= 0.5)
    if vein.any():
        plan.slabs.append((2, vein, plan.zv - plan.rvd, plan.zv + plan.rvd))


_SIGNATURES: dict[str, Callable[[Plan, np.random.Generator, _Grid, _Grid, dict[str, float], str, Look], None]] = {
    "CSC": _csc, "AMD": _amd, "CNV": _cnv, "DR": _dr}
