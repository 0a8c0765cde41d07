"""Scores of an evidence map against lesion truth: the pointing game and the map's mass inside the lesion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

DEFINITION = ("pointing_game: fraction of subjects whose CAM maximum lies inside the lesion mask; mass_inside: mean "
              "fraction of CAM mass inside it; lesion_fraction: mean lesion volume fraction (a uniform map's "
              "mass_inside). Subjects with a non-empty mask, grouped by true class; CAM of the target class.")


def localization(cam: np.ndarray, mask: np.ndarray) -> dict[str, Any] | None:
    """Pointing game (CAM maximum inside the lesion) and fraction of CAM mass inside it; None for an empty mask.

    ``lesion_fraction`` (lesion voxels / all voxels) is the mass fraction a uniform map would get: chance level.
    """
    lesion = np.asarray(mask) > 0
    if not lesion.any():
        return None
    total = float(cam.sum(dtype=np.float64))
    return {"hit": bool(lesion.flat[int(np.argmax(cam))]),
            "mass_inside": float(cam[lesion].sum(dtype=np.float64) / total) if total > 0 else 0.0,
            "lesion_fraction": np.count_nonzero(lesion) / lesion.size}


def summarize(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-class means of per-subject :func:`localization` rows (each with ``true``: the subject's class name).

    Returns:
        ``{"definition", "per_class": {class: {n, pointing_game, mass_inside, lesion_fraction}}, "per_subject"}``.
    """
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows.values():
        by_class.setdefault(row["true"] or "unlabelled", []).append(row)
    return {"definition": DEFINITION,
            "per_class": {c: {"n": len(rs), "pointing_game": float(np.mean([r["hit"] for r in rs])),
                              "mass_inside": float(np.mean([r["mass_inside"] for r in rs])),
                              "lesion_fraction": float(np.mean([r["lesion_fraction"] for r in rs]))}
                          for c, rs in sorted(by_class.items())},
            "per_subject": dict(rows)}
