"""What a CAM is drawn over: the subjects to explain (:class:`CamItem`), the source image as read and its lesion
mask, in the geometry of the subject's :class:`~octa3d.data.transforms.PreprocessRecord`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from octa3d.data.subject import Subject
from octa3d.data.transforms import PreprocessRecord
from octa3d.errors import DataError

log = logging.getLogger("octa3d.cam")


@dataclass
class CamItem:
    """One subject to explain: its network inputs (one per 2D patch) and prediction.

    Attributes:
        subject: the subject (paths, optional lesion mask).
        record: its :class:`PreprocessRecord` (how input space maps back to the source).
        samples: returns ``(P, C, *input_shape)`` float32 network inputs (P = patches, or 1).
        probs: ``(K,)`` subject-level probabilities.
        true: true class index, or None (a new scan).
    """

    subject: Subject
    record: PreprocessRecord
    samples: Callable[[], np.ndarray]
    probs: np.ndarray
    true: int | None = None


def cam_items_from_cache(handler: Any, subjects: Sequence[Subject], probs: dict[str, np.ndarray],
                         true: dict[str, int] | None = None) -> list[CamItem]:
    """CAM items whose inputs come from a :class:`~octa3d.data.datasets.DataHandler`'s preprocessing cache."""
    items = []
    for s in subjects:
        record = handler.record(s)

        def load(s: Subject = s, record: PreprocessRecord = record) -> np.ndarray:
            stored, rec = handler.cache.get(s)
            patches = range(len(rec.patches)) if rec.patches else [-1]
            return np.stack([handler.preset.sample(stored, rec, p) for p in patches])

        items.append(CamItem(s, record, load, np.asarray(probs[s.id]), (true or {}).get(s.id)))
    return items


def source_image(preset: Any, subject: Subject, record: PreprocessRecord) -> np.ndarray:
    """The image the record's geometry describes, channel-first, as read (uint8 stays uint8).

    3D: the scan. 2D: the 2D image, the OCTA-500 projection map, or the projection computed over the record's
    slab (mean along depth, as the preset computed it).
    """
    meta = record.meta or {}
    proj = meta.get("projection")
    if record.kind == "patch2d" and proj and proj != "compute":
        image = np.asarray(preset.read_2d(subject.projections[proj]))
        image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    else:
        image, _ = preset.load(subject)
        if record.kind == "patch2d" and image.ndim == 4:
            ax = int(meta.get("depth_axis", 1)) + 1
            s0, s1 = meta["slab"]
            image = np.take(image, np.arange(s0, s1), axis=ax).mean(axis=ax, dtype=np.float32)
    if image.shape[0] != record.channels:
        image = image.mean(axis=0, dtype=np.float32)[None]  # colour 2D image averaged like the preset does
    if tuple(image.shape[1:]) != tuple(record.geometry.shape):
        raise DataError(f"subject {subject.id}: the scan now has shape {tuple(image.shape[1:])} but was "
                        f"preprocessed at {tuple(record.geometry.shape)}; the file changed: re-run the stage")
    return image


def read_mask(subject: Subject, record: PreprocessRecord) -> np.ndarray | None:
    """The subject's lesion mask in the record's geometry (projected to 2D for computed projections), or None."""
    if not subject.mask:
        return None
    try:
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(subject.mask)))
    except RuntimeError as exc:
        log.warning("subject %s: lesion mask %s unreadable (%s); no localization score", subject.id, subject.mask,
                    str(exc).strip().splitlines()[-1])
        return None
    shape = tuple(record.geometry.shape)
    if mask.ndim == 3 and len(shape) == 2 and record.meta.get("projection") == "compute":
        mask = mask.max(axis=int(record.meta.get("depth_axis", 1)))
    if tuple(mask.shape) != shape:
        log.warning("subject %s: lesion mask %s has shape %s, the scan %s; no localization score", subject.id,
                    subject.mask, mask.shape, shape)
        return None
    return mask
