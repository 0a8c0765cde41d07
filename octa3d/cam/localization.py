"""Scores of an evidence map against lesion truth: the pointing game (with a stated tolerance) and the map's mass
inside the lesion relative to chance."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFINITION = ("pointing_game: fraction of subjects whose map maximum lies inside the lesion mask or within the "
              "tolerance (one network-input voxel, in source voxels per axis: `tolerance_voxels`) of it; "
              "pointing_game_exact: inside the mask itself; pointing_game_enface (volumes): the same test with the "
              "depth axis dropped (peak position en face vs the mask's en-face footprint: a map that finds the "
              "lesion but places its maximum above or below it hits en face and misses in 3D); mass_inside: mean "
              "fraction of map mass inside the lesion; lesion_fraction: mean lesion volume fraction (a uniform "
              "map's mass_inside = chance); "
              "mass_ratio: mean of mass_inside / lesion_fraction per subject (chance = 1). A map without evidence "
              "(cam_status not ok) counts as a miss with mass 0. Subjects with a non-empty mask, grouped by true "
              "class; map of the explained (target) class.")


def tolerance(source_shape: Sequence[int], input_shape: Sequence[int]) -> tuple[int, ...]:
    """One network-input voxel in source voxels per axis (the finest detail a map at input size can place)."""
    return tuple(max(0, math.ceil(s / i)) for s, i in zip(source_shape, input_shape))


def localization(cam: np.ndarray, mask: np.ndarray, tol: Sequence[int] | None = None, ok: bool = True,
                 depth_axis: int | None = None) -> dict[str, Any] | None:
    """Pointing game and mass inside the lesion of one map; None for an empty mask.

    Args:
        cam: the map in the mask's geometry (0..1).
        mask: lesion mask (non-zero = lesion).
        tol: tolerance in voxels per axis around the peak (default 0: exact).
        ok: whether the map holds evidence (a map with another status scores as a miss with no mass).
        depth_axis: the A-scan axis of a volume; with it, ``hit_enface`` (the pointing game en face) is added.
    """
    lesion = np.asarray(mask) > 0
    if not lesion.any():
        return None
    fraction = np.count_nonzero(lesion) / lesion.size
    enface = depth_axis is not None and cam.ndim == 3
    if not ok:
        return {"hit": False, "hit_exact": False, "mass_inside": 0.0, "lesion_fraction": fraction,
                "mass_ratio": 0.0} | ({"hit_enface": False} if enface else {})
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    tol = tuple(tol) if tol is not None else (0,) * cam.ndim
    window = tuple(slice(max(0, p - r), p + r + 1) for p, r in zip(peak, tol))
    total = float(cam.sum(dtype=np.float64))
    inside = float(cam[lesion].sum(dtype=np.float64) / total) if total > 0 else 0.0
    out = {"hit": bool(lesion[window].any()), "hit_exact": bool(lesion[peak]), "mass_inside": inside,
           "lesion_fraction": fraction, "mass_ratio": inside / fraction}
    if enface:
        out["hit_enface"] = bool(lesion.any(axis=depth_axis)[tuple(w for a, w in enumerate(window)
                                                                    if a != depth_axis)].any())
    return out


def summarize(rows: Mapping[str, Mapping[str, Any]], tol: Sequence[int] | None = None) -> dict[str, Any]:
    """Per-class means of per-subject :func:`localization` rows (each with ``true``: the subject's class name).

    Returns:
        ``{"definition", "tolerance_voxels", "per_class": {class: {n, pointing_game, pointing_game_exact,
        [pointing_game_enface,] mass_inside, lesion_fraction, mass_ratio}}, "per_subject"}``.
    """
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows.values():
        by_class.setdefault(row["true"] or "unlabelled", []).append(row)

    def mean(rs: list[Mapping[str, Any]], key: str) -> float:
        return float(np.mean([r[key] for r in rs]))

    return {"definition": DEFINITION, "tolerance_voxels": list(tol) if tol is not None else None,
            "per_class": {c: {"n": len(rs), "pointing_game": mean(rs, "hit"),
                              "pointing_game_exact": mean(rs, "hit_exact"),
                              **({"pointing_game_enface": mean(rs, "hit_enface")}
                                 if all("hit_enface" in r for r in rs) else {}),
                              "mass_inside": mean(rs, "mass_inside"),
                              "lesion_fraction": mean(rs, "lesion_fraction"), "mass_ratio": mean(rs, "mass_ratio")}
                          for c, rs in sorted(by_class.items())},
            "per_subject": dict(rows)}
