"""What a CAM is drawn over: the subjects to explain (:class:`CamItem`), the source image as read, which modality
each of its channels is (:func:`scan_channels`), the slice files of a slice-folder scan (:func:`slice_files`) and
its lesion mask, in the geometry of the subject's :class:`~octa3d.data.transforms.PreprocessRecord`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from octa3d.data.imagefiles import SLICE_EXTS, file_suffix
from octa3d.data.octa500 import MODALITIES, PROJECTIONS_DIR
from octa3d.data.slices import number_slices, visible_files
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


@dataclass(frozen=True)
class Channel:
    """One channel of the image :func:`source_image` returns.

    Attributes:
        modality: what it shows (``"OCT"``, ``"OCTA"``, an OCTA-500 projection map type such as ``"OCTA(FULL)"``),
            or None when the source does not say (a NIfTI file, a 2D photo).
        path: the file or folder it was read from (None when not known).
    """

    modality: str | None
    path: str | None


def path_modality(path: Path) -> str | None:
    """The modality an OCTA-500-layout path shows: ``.../OCTA/<ID>`` → ``OCTA``, ``.../Projection Maps/OCT(FULL)/
    <ID>.bmp`` → ``OCT(FULL)``; None for anything else."""
    if path.is_dir() and path.parent.name in MODALITIES:
        return path.parent.name
    if path.is_file() and path.parent.parent.name == PROJECTIONS_DIR:
        return path.parent.name
    return None


def scan_channels(subject: Subject, record: PreprocessRecord, modality: str) -> list[Channel]:
    """Which modality each channel of :func:`source_image` holds, in channel order (``OCT+OCTA``: OCT first).

    Args:
        subject: the subject (OCTA-500 subjects have ``OCT``/``OCTA`` paths; ``--input`` and manifest subjects one
            ``image`` path, whose modality is known when it is an OCTA-500 eye folder or projection map).
        record: its preprocessing record (2D projection-map models read the map, not the scan).
        modality: the experiment's ``--modality``.

    Returns:
        One :class:`Channel` per channel of the record (modality None where the source does not say).
    """
    proj = (record.meta or {}).get("projection")
    if record.kind == "patch2d" and proj and proj != "compute":
        channels = [Channel(proj, subject.projections.get(proj))]
    elif "image" in subject.paths:
        path = Path(subject.paths["image"])
        channels = [Channel(path_modality(path), str(path))]
    else:
        keys = ["OCT", "OCTA"] if modality == "OCT+OCTA" else [modality]
        channels = [Channel(k, subject.paths.get(k)) for k in keys]
    if len(channels) != record.channels:  # e.g. a colour image read as one grey channel
        return [Channel(None, None)] * record.channels
    return channels


def slice_files(path: str | None) -> list[str] | None:
    """The names of a slice-folder scan's files in stacking order (array axis 0: ``1.bmp`` … ``400.bmp`` for an
    OCTA-500 eye), from the folder listing only; None for anything else (a file, a DICOM series)."""
    if not path or not Path(path).is_dir():
        return None
    files = visible_files(Path(path))
    slices = [f for f in files if file_suffix(f) in SLICE_EXTS]
    if not slices or any(file_suffix(f) in ("", ".dcm", ".ima") for f in files):
        return None
    nb = number_slices(slices)
    if nb.all_unnumbered:
        return sorted(f.name for f in slices)
    return [f.name for f in sorted(slices, key=lambda f: nb.numbers[f])] if nb.ok else None


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
    if mask.ndim == 3 and str((record.meta.get("scan") or {}).get("orientation", "")).startswith("mirrored"):
        mask = mask[:, :, ::-1]  # drawn on the vendor scan as stored; the scan was mirrored to a right eye's view
    if mask.ndim == 3 and len(shape) == 2 and record.meta.get("projection") == "compute":
        mask = mask.max(axis=int(record.meta.get("depth_axis", 1)))
    if tuple(mask.shape) != shape:
        log.warning("subject %s: lesion mask %s has shape %s, the scan %s; no localization score", subject.id,
                    subject.mask, mask.shape, shape)
        return None
    return mask
