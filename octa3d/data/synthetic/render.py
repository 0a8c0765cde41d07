"""Turn an eye :class:`~.anatomy.Plan` into voxels: OCT, OCTA (uint8) and the lesion mask, a few B-scans at a time.

OCT speckle and OCTA decorrelation noise are drawn per B-scan from the eye's noise stream, so any chunking gives
the same voxels; chunks of about two million voxels keep the float32 temporaries small, so the OCTA-500 size
400x640x400 renders in a few hundred MB. A :class:`~.look.Look` scales the noise, adds OCTA artefacts and
per-eye drift; the stock look leaves every voxel as it was before looks existed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from octa3d.data.octa500 import DEPTH_MM, FOV_LATERAL_MM
from octa3d.data.synthetic.anatomy import F32, Plan, eye_rng, healthy_eye, lut, spacing_of
from octa3d.data.synthetic.lesions import add_lesion
from octa3d.data.synthetic.look import Look

_VOXELS_PER_CHUNK = 2_000_000  # ~8 MB per float32 temporary: fast numpy, bounded memory at 400x640x400


def render_chunk(p: Plan, s0: int, s1: int, seed: int, index: int, look: Look = Look()) -> tuple[np.ndarray, ...]:
    """OCT, OCTA (uint8) and mask of B-scans ``s0:s1``, all arrays (n, D, W).

    ``look`` is the one ``p`` was planned with (:func:`plan_eye`): its lesion contrast, noise and artefacts act here.
    """
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
    neuro = lut(a, [-0.03, 0.0, 0.09, 0.13, 0.3, 0.34, 0.42, 0.46, 0.52, 0.56, 0.78, 0.8, 0.82, 0.85, 0.88, 0.9],
                 [0.03, 0.78, 0.72, 0.45, 0.5, 0.3, 0.3, 0.55, 0.5, 0.18, 0.18, 0.4, 0.2, 0.72, 0.5, 0.55])
    choroid = lut(ch, [0.0, 0.15, 0.8, 1.0, 1.6], [0.72, 0.55, 0.4, 0.15, 0.06])
    choroid *= 1 - 0.4 * e(p.chv) * (ch > 0.15)  # dark lumens of the large choroidal vessels
    struct_ = np.select([d < nre, d < rpe, d < rpe + rpe_th, d < bm], [neuro, p.fluid, 0.9, 0.55],
                        choroid).astype(F32)
    vmap, zv, rvd = e(p.vmap), e(p.zv), e(p.rvd)
    tube = (vmap * np.exp(-(((d - zv) / rvd) ** 2))).astype(F32)
    struct_ += 0.15 * tube
    struct_ *= np.where(d > zv + rvd, 1 - 0.55 * vmap, 1).astype(F32)  # shadow below large vessels
    svp = lut(a, [0.04, 0.1, 0.28, 0.34], [0, 1, 1, 0]) * e(p.cap1)
    dcp = lut(a, [0.38, 0.43, 0.5, 0.55], [0, 1, 1, 0]) * e(p.cap2)
    flow = 0.95 * tube + 0.6 * svp + 0.55 * dcp
    flow += np.where((d >= rpe) & (d < rpe + rpe_th), 0.1 + 0.3 * vmap, 0)  # projection artefacts on the RPE
    flow += lut(ch, [0.0, 0.04, 0.18, 0.28], [0, 1, 1, 0]) * e(p.cc) * 0.75  # choriocapillaris
    flow += lut(ch, [0.2, 0.35, 0.8, 1.1], [0, 1, 1, 0]) * (0.2 + 0.3 * e(p.chv))  # choroidal flow
    if look.artefacts:  # projection artefact: a large vessel's flow reappears below it, as bright as the tissue
        flow += look.artefacts * vmap * struct_ * (d > zv + rvd)
    c = look.contrast  # lesion contrast: the lesion's voxels move this fraction of the way from the healthy ones
    mask = np.zeros((n, D, W), np.uint8)
    if p.tuft is not None:
        foot, top, tex = p.tuft
        inside = e(foot) & (d >= e(top)) & (d < rpe)
        struct_ = np.where(inside, (1 - c) * struct_ + c * (0.5 + 0.35 * e(tex)), struct_)  # hyper-reflective
        flow = np.where(inside, (1 - c) * flow + c * e(tex), flow)
    for label, foot, top, bot in p.slabs:  # later parts (secondary findings) overwrite earlier ones
        mask[np.broadcast_to(e(foot) & (d >= e(top)) & (d < e(bot)), mask.shape)] = label
    for cs, cd, cw, rs, rd, rw in p.spheres:  # microaneurysms: bright OCTA dots, slightly reflective
        if cs + rs < s0 or cs - rs > s1:
            continue
        q = ((np.arange(s0, s1, dtype=F32)[:, None, None] + 0.5 - cs) / rs) ** 2 + ((d - cd) / rd) ** 2 \
            + ((np.arange(W, dtype=F32)[None, None, :] + 0.5 - cw) / rw) ** 2
        ball = q <= 1.0
        flow = np.where(ball, (1 - c) * flow + c * 0.95, flow)
        struct_ = np.where(ball, struct_ + 0.25 * c, struct_)
        mask[ball] = 2
    if p.motion is not None:  # bulk motion decorrelates all tissue of a B-scan: a bright line across the en face
        flow = flow + p.motion[s0:s1, None, None] * struct_
    noise = np.stack([eye_rng(seed, index, 2, s).standard_normal((2, D, W), dtype=F32) for s in range(s0, s1)], 1)
    ks, kd = look.speckle, look.decorrelation  # log-normal sigmas 0.4 ks, 0.3 kd; their means stay -sigma^2 / 2
    oct_ = struct_ * np.exp(0.4 * ks * noise[0] - 0.08 * ks * ks) * p.gain[0]  # multiplicative speckle
    octa = (flow * np.exp(0.3 * kd * noise[1] - 0.045 * kd * kd) + 0.25 * kd * struct_ * np.abs(noise[0])) * p.gain[1]
    return (np.clip(oct_ * 230 + 4 + 3 * ks * noise[1] + p.offset[0], 0, 255).astype(np.uint8),
            np.clip(octa * 235 + 2 * kd * np.abs(noise[1]) + p.offset[1], 0, 255).astype(np.uint8), mask)


def plan_eye(shape: Sequence[int], disease: str, seed: int, index: int, fov: str, look: Look = Look()) -> Plan:
    """The render plan of eye ``index`` of dataset ``seed``: its healthy anatomy, the look's drift and artefacts,
    plus the ``disease`` signature (placed on the drifted anatomy)."""
    shp = tuple(int(x) for x in shape)
    plan, a = healthy_eye(shp, eye_rng(seed, index, 0), fov, look)  # type: ignore[arg-type]
    _drift(plan, look, eye_rng(seed, index, 4), fov)
    _motion(plan, look, eye_rng(seed, index, 5))
    add_lesion(plan, disease, eye_rng(seed, index, 1), a, fov, look)
    return plan


def _drift(plan: Plan, look: Look, rng: np.random.Generator, fov: str) -> None:
    """A look's between-eye drift: per-eye gain and offset of OCT and OCTA, a tilt of the retina across the B-scan.

    With the stock look (no spread, no tilt) the gain is multiplied by exactly 1 and 0 is added to the offsets and
    surfaces, so the eye is unchanged.
    """
    _, D, W = plan.shape
    z = rng.standard_normal(4)
    g = np.exp(look.gain_spread * z[:2])
    plan.gain = (plan.gain[0] * float(g[0]), plan.gain[1] * float(g[1]))
    plan.offset = (255 * look.offset_spread * float(z[2]), 255 * look.offset_spread * float(z[3]))
    theta = math.radians(look.tilt_deg * rng.uniform(-1, 1))
    col_mm = ((np.arange(W, dtype=F32) + 0.5) / W - 0.5) * FOV_LATERAL_MM[fov]
    shift = (math.tan(theta) * col_mm / (DEPTH_MM / D)).astype(F32)[None, :]  # rows, the same for every B-scan
    for name in ("ilm", "opl", "nre", "rpe", "bm", "chb"):
        setattr(plan, name, (getattr(plan, name) + shift).astype(F32))


def _motion(plan: Plan, look: Look, rng: np.random.Generator) -> None:
    """A look's OCTA motion lines: ``1 + Poisson(3 artefacts)`` random B-scans (a saccade or blink each), each at
    strength ``artefacts x U(0.5, 1)``; the count does not depend on the number of B-scans, so that the tiny
    volumes of tests and the demo get them too."""
    if not look.artefacts:
        return
    S = plan.shape[0]
    lines = rng.choice(S, size=min(S, 1 + int(rng.poisson(3 * look.artefacts))), replace=False)
    plan.motion = np.zeros(S, F32)
    plan.motion[lines] = look.artefacts * rng.uniform(0.5, 1.0, len(lines))


def chunks(shape: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` B-scan ranges of about ``_VOXELS_PER_CHUNK`` voxels covering an ``(S, D, W)`` volume."""
    step = max(1, _VOXELS_PER_CHUNK // (shape[1] * shape[2]))
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def make_volume(shape: Sequence[int] = (32, 64, 32), disease: str = "NORMAL", seed: int = 0, index: int = 0,
                fov: str = "6mm", look: Look = Look()) -> dict[str, Any]:
    """Render one synthetic eye in memory (the same voxels :func:`~octa3d.data.synthetic.generate` writes for that
    seed and index).

    ``disease="NORMAL"`` with the seed/index of a diseased eye gives its healthy twin: identical anatomy and
    noise, only the lesion missing. ``look`` picks the cohort variant (:class:`~.look.Look`; default stock).

    Returns:
        ``{"oct", "octa", "mask"}`` uint8 arrays of ``shape`` (S, D, W) and ``"spacing"`` (SimpleITK order).
    """
    plan = plan_eye(shape, disease, seed, index, fov, look)
    parts = [render_chunk(plan, s0, s1, seed, index, look) for s0, s1 in chunks(shape)]
    oct_, octa, mask = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return {"oct": oct_, "octa": octa, "mask": mask, "spacing": spacing_of(shape, fov)}
