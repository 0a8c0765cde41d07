"""Turn an eye :class:`~.anatomy.Plan` into voxels: OCT, OCTA (uint8) and the lesion mask, a few B-scans at a time.

OCT speckle and OCTA decorrelation noise are drawn per B-scan from the eye's noise stream, so any chunking gives
the same voxels; chunks of about two million voxels keep the float32 temporaries small, so the OCTA-500 size
400x640x400 renders in a few hundred MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from octa3d.data.synthetic.anatomy import F32, Plan, eye_rng, healthy_eye, lut, spacing_of
from octa3d.data.synthetic.lesions import add_lesion

_VOXELS_PER_CHUNK = 2_000_000  # ~8 MB per float32 temporary: fast numpy, bounded memory at 400x640x400


def render_chunk(p: Plan, s0: int, s1: int, seed: int, index: int) -> tuple[np.ndarray, ...]:
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
    neuro = lut(a, [-0.03, 0.0, 0.09, 0.13, 0.3, 0.34, 0.42, 0.46, 0.52, 0.56, 0.78, 0.8, 0.82, 0.85, 0.88, 0.9],
                 [0.03, 0.78, 0.72, 0.45, 0.5, 0.3, 0.3, 0.55, 0.5, 0.18, 0.18, 0.4, 0.2, 0.72, 0.5, 0.55])
    choroid = lut(ch, [0.0, 0.15, 0.8, 1.0, 1.6], [0.72, 0.55, 0.4, 0.15, 0.06])
    choroid *= 1 - 0.4 * e(p.chv) * (ch > 0.15)  # dark lumens of the large choroidal vessels
    struct_ = np.select([d < nre, d < rpe, d < rpe + rpe_th, d < bm], [neuro, 0.02, 0.9, 0.55], choroid).astype(F32)
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
    noise = np.stack([eye_rng(seed, index, 2, s).standard_normal((2, D, W), dtype=F32) for s in range(s0, s1)], 1)
    oct_ = struct_ * np.exp(0.4 * noise[0] - 0.08) * p.gain[0]  # multiplicative speckle (log-normal)
    octa = (flow * np.exp(0.3 * noise[1] - 0.045) + 0.25 * struct_ * np.abs(noise[0])) * p.gain[1]
    return (np.clip(oct_ * 230 + 4 + 3 * noise[1], 0, 255).astype(np.uint8),
            np.clip(octa * 235 + 2 * np.abs(noise[1]), 0, 255).astype(np.uint8), mask)


def plan_eye(shape: Sequence[int], disease: str, seed: int, index: int, fov: str) -> Plan:
    """The render plan of eye ``index`` of dataset ``seed``: its healthy anatomy plus the ``disease`` signature."""
    shp = tuple(int(x) for x in shape)
    plan, a = healthy_eye(shp, eye_rng(seed, index, 0), fov)  # type: ignore[arg-type]
    add_lesion(plan, disease, eye_rng(seed, index, 1), a, fov)
    return plan


def chunks(shape: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` B-scan ranges of about ``_VOXELS_PER_CHUNK`` voxels covering an ``(S, D, W)`` volume."""
    step = max(1, _VOXELS_PER_CHUNK // (shape[1] * shape[2]))
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def make_volume(shape: Sequence[int] = (32, 64, 32), disease: str = "NORMAL", seed: int = 0, index: int = 0,
                fov: str = "6mm") -> dict[str, Any]:
    """Render one synthetic eye in memory (the same voxels :func:`~octa3d.data.synthetic.generate` writes for that
    seed and index).

    ``disease="NORMAL"`` with the seed/index of a diseased eye gives its healthy twin: identical anatomy and
    noise, only the lesion missing.

    Returns:
        ``{"oct", "octa", "mask"}`` uint8 arrays of ``shape`` (S, D, W) and ``"spacing"`` (SimpleITK order).
    """
    plan = plan_eye(shape, disease, seed, index, fov)
    parts = [render_chunk(plan, s0, s1, seed, index) for s0, s1 in chunks(shape)]
    oct_, octa, mask = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return {"oct": oct_, "octa": octa, "mask": mask, "spacing": spacing_of(shape, fov)}
