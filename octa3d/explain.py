"""Grad-CAM maps of a classifier, exported in the *source scan's* geometry; ``--mode explain`` for one new scan.

Backends (``--cam``):

* ``gradcam`` (default) / ``gradcam++``: :class:`monai.visualize.GradCAM` / ``GradCAMpp`` on ``--cam-layer``
  (default: the model's registered layer) with our own post-processing: the raw map, then min-max to 0..1 per
  subject with high = important (MONAI's default normaliser *inverts* the map, and would scale every 2D patch
  alone). MONAI scores ``logits[:, class_idx]`` with one index for the whole batch, so the wrapper's score
  function is replaced by a per-sample ``gather``: a batch may mix targets.
* ``medcam``: M3d-CAM (``medcam.inject(..., return_attention=True)``), which returns the map upsampled to the
  input size; medcam's own saving and evaluation stay off (``evaluate=True`` breaks on NumPy >= 1.24 and its
  files are uint8 at feature-map size with an identity affine): we write the NIfTI ourselves.

Each map is computed in network-input space (for an ensemble: the mean of the fold models' maps), mapped back onto
the source scan with :func:`octa3d.data.transforms.to_source_space` (undoing resize and slab crop; zero outside the
crop) and written with the source :class:`~octa3d.data.subject.Geometry`, so it overlays the scan in 3D Slicer,
ITK-SNAP or napari. Per subject: ``<id>_cam.nii.gz`` (float32 0..1), ``<id>_input.nii.gz`` (the scan as read; with
two channels also ``<id>_input_<modality>.nii.gz``), ``<id>_review.png`` (en-face maximum projection with the CAM
plus the B-scans through the CAM peak; 2D models: the image with the CAM overlaid) and central CAM slices in
TensorBoard. With lesion masks (synthetic data), the pointing game and the CAM mass inside the lesion are scored.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d.cam import CamComputer, check_layer, minmax, resolve_cam_class
from octa3d.config import Config
from octa3d.data.subject import Geometry, Subject
from octa3d.data.transforms import PreprocessRecord, to_source_space
from octa3d.errors import ConfigError, DataError
from octa3d.utils.io import atomic_path, atomic_write_text

log = logging.getLogger("octa3d.explain")

# ------------------------------------------------------------------------------------------------ items
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


def safe_name(text: str) -> str:
    """A subject ID usable as a file name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._") or "subject"


# ------------------------------------------------------------------------------------------------ source space
def write_nifti(array: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Write ``array`` with ``geometry`` (shape, spacing, origin, direction) as NIfTI, atomically.

    ITK's gzip is already fast (its ``compressionLevel`` makes no difference to time or size here: a
    400x640x400 uint8 scan takes ~4 s, a float32 CAM of that size ~5 s), so the savings are in writing less.
    """
    import SimpleITK as sitk

    img = geometry.to_sitk(np.ascontiguousarray(array))
    with atomic_path(path, suffix=".nii.gz") as tmp:  # the temp name keeps .nii.gz: ITK picks the writer by it
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return path


def copy_file(src: Path, dst: Path) -> Path:
    """Copy a written file atomically (the same image under a second name: no second compression pass)."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


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
    import SimpleITK as sitk

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


# ------------------------------------------------------------------------------------------------ exporter
class CamExporter:
    """Compute CAMs for :class:`CamItem` batches and write the per-subject exports.

    Args:
        cfg: the (checkpoint-derived) config: ``--cam``, ``--cam-layer``, ``--cam-class``, depth axis, batch size.
        models: the classifier(s); several = an ensemble (maps averaged).
        class_names: class names (file titles, ``--cam-class``).
        out_dir: folder for the files.
        preset: the preprocessing preset (reads source images).
        tb: optional TensorBoard writer (central CAM slices).
        device: where the models are.
    """

    def __init__(self, cfg: Config, models: Sequence[torch.nn.Module], class_names: Sequence[str], out_dir: Path,
                 preset: Any, tb: Any = None, device: torch.device | str = "cpu") -> None:
        from octa3d.model import get_spec

        self.cfg, self.class_names, self.out, self.preset, self.tb = cfg, list(class_names), Path(out_dir), preset, tb
        self.device = torch.device(device)
        self.layer = cfg.eval.cam_layer or get_spec(cfg.model.model).cam_layer
        for m in models:
            check_layer(m, self.layer, cfg.model.model)
        self.target = resolve_cam_class(cfg.eval.cam_class, self.class_names)
        self.computer = CamComputer(models, cfg.eval.cam, self.layer)
        self.batch_size = max(1, cfg.train.batch_size)

    def _target(self, item: CamItem) -> int:
        return self.target if self.target is not None else int(np.argmax(item.probs))

    def batches(self, items: Sequence[CamItem]) -> Iterator[tuple[list[CamItem], list[np.ndarray], float]]:
        """Input-space maps ``(P, *input_shape)`` of several subjects per forward pass (about ``--batch-size``
        samples), yielded batch by batch so that memory stays bounded; with the seconds the CAM took."""
        i = 0
        while i < len(items):
            group, samples, counts = [], [], []
            while i < len(items) and (not group or sum(counts) < self.batch_size):
                s = items[i].samples()
                group.append(items[i])
                samples.append(s)
                counts.append(len(s))
                i += 1
            x = torch.from_numpy(np.concatenate(samples)).float().to(self.device)
            targets = torch.tensor([self._target(it) for it, n in zip(group, counts) for _ in range(n)])
            t0 = time.perf_counter()
            cams = self.computer(x, targets, counts)
            seconds = time.perf_counter() - t0
            fs = self.computer.feature_shape
            if i == len(group) and fs and min(fs) < 4:  # once, after the first batch
                log.warning("CAM layer %s has a %s map at input size %s: the CAM is too coarse to localise "
                            "anything; choose an earlier layer with --cam-layer", self.layer,
                            "x".join(map(str, fs)), "x".join(map(str, x.shape[2:])))
            bounds = np.cumsum([0, *counts])
            yield group, [cams[a:b] for a, b in zip(bounds[:-1], bounds[1:])], seconds

    def to_source(self, maps: np.ndarray, record: PreprocessRecord) -> np.ndarray:
        """Map input-space maps (one per patch) onto the source image; overlapping patches are averaged."""
        if not record.patches:
            return to_source_space(maps[0], record).astype(np.float32, copy=False)
        total = np.zeros(record.geometry.shape, np.float32)
        count = np.zeros(record.geometry.shape, np.float32)
        for p, m in enumerate(maps):
            total += to_source_space(m, record, patch=p)
            count += to_source_space(np.ones_like(m), record, patch=p) > 0
        cam = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        return minmax(torch.from_numpy(cam[None])).numpy()[0]

    def _title(self, item: CamItem, target: int) -> str:
        probs = ", ".join(f"p({n})={item.probs[i]:.2f}" for i, n in enumerate(self.class_names))
        true = f"true {self.class_names[item.true]}, " if item.true is not None else ""
        pred = self.class_names[int(np.argmax(item.probs))]
        return (f"{item.subject.id}: {true}predicted {pred} ({probs}); CAM of class {self.class_names[target]} "
                f"({self.cfg.eval.cam}, layer {self.layer})")

    def export_one(self, item: CamItem, maps: np.ndarray) -> dict[str, Any]:
        """Write the NIfTI/PNG/TensorBoard exports of one subject; returns its summary (with localization)."""
        from octa3d.plots import central_slices, review_figure_2d, review_figure_3d, save_png

        rec, name = item.record, safe_name(item.subject.id)
        target = self._target(item)
        geo = rec.geometry
        # full-size scans: the float32 CAM (410 MB at 400x640x400) is written before the scan is read, so that
        # ITK's copy of it and the scan are never in memory together
        cam = self.to_source(maps, rec)
        files = {"cam": write_nifti(cam, geo, self.out / f"{name}_cam.nii.gz")}
        image = source_image(self.preset, item.subject, rec)
        files["input"] = write_nifti(image[0], geo, self.out / f"{name}_input.nii.gz")
        if image.shape[0] > 1:
            mods = self.cfg.data.modality.split("+") if self.cfg.data.modality == "OCT+OCTA" else []
            for c in range(image.shape[0]):
                tag = mods[c] if c < len(mods) else f"c{c}"
                dst = self.out / f"{name}_input_{tag}.nii.gz"
                files[f"input_{tag}"] = copy_file(files["input"], dst) if c == 0 else write_nifti(image[c], geo, dst)
        mask = read_mask(item.subject, rec)
        title = self._title(item, target)
        # the scan as read (uint8 stays uint8): the figures convert only the slices they show
        if cam.ndim == 3:
            sheet = review_figure_3d(image[-1], cam, self.cfg.preprocess.depth_axis, title, mask,
                                     spacing=geo.spacing[::-1])
        else:
            sheet = review_figure_2d(image[-1], cam, title, mask)
        files["review"] = save_png(sheet, self.out / f"{name}_review.png")
        if self.tb is not None:
            self.tb.add_image(f"cam/{name}", central_slices(cam, image[-1]), 0)
        out: dict[str, Any] = {"target": self.class_names[target], "files": {k: str(v) for k, v in files.items()},
                               "peak": [int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape)]}
        loc = localization(cam, mask) if mask is not None else None
        if loc is not None:
            out["localization"] = loc
        return out

    def export(self, items: Sequence[CamItem]) -> dict[str, Any]:
        """CAMs of every item (batched), their files, and the localization summary per true class.

        Returns:
            ``{"cam": {backend, layer, target, n_subjects, seconds_per_volume, folder}, "subjects": {...},
            "localization": {"per_class": {class: {n, pointing_game, mass_inside, lesion_fraction}},
            "per_subject": {...}}}`` (localization only when lesion masks exist).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        per_subject: dict[str, Any] = {}
        seconds = 0.0
        for group, maps, sec in self.batches(items):
            seconds += sec
            for item, m in zip(group, maps):
                per_subject[item.subject.id] = self.export_one(item, m)
                log.debug("CAM of %s written", item.subject.id)
        report: dict[str, Any] = {
            "cam": {"backend": self.cfg.eval.cam, "layer": self.layer,
                    "target": "predicted class" if self.target is None else self.class_names[self.target],
                    "n_subjects": len(items), "n_models": len(self.computer._cams),
                    "feature_shape": list(self.computer.feature_shape or []),
                    "seconds_per_volume": seconds / max(1, len(items)), "folder": str(self.out)},
            "subjects": per_subject}
        loc_rows = {sid: dict(v["localization"], true=self.class_names[it.true] if it.true is not None else None)
                    for it, (sid, v) in zip(items, per_subject.items()) if "localization" in v}
        if loc_rows:
            by_class: dict[str, list[dict[str, Any]]] = {}
            for row in loc_rows.values():
                by_class.setdefault(row["true"] or "unlabelled", []).append(row)
            report["localization"] = {
                "definition": "pointing_game: fraction of subjects whose CAM maximum lies inside the lesion mask; "
                              "mass_inside: mean fraction of CAM mass inside it; lesion_fraction: mean lesion "
                              "volume fraction (a uniform map's mass_inside). Subjects with a non-empty mask, "
                              "grouped by true class; CAM of the target class.",
                "per_class": {c: {"n": len(rows), "pointing_game": float(np.mean([r["hit"] for r in rows])),
                                  "mass_inside": float(np.mean([r["mass_inside"] for r in rows])),
                                  "lesion_fraction": float(np.mean([r["lesion_fraction"] for r in rows]))}
                              for c, rows in sorted(by_class.items())},
                "per_subject": loc_rows}
        log.info("CAM (%s, layer %s): %d subject(s), %.2f s per volume, files in %s", self.cfg.eval.cam, self.layer,
                 len(items), report["cam"]["seconds_per_volume"], self.out)
        return report


# ------------------------------------------------------------------------------------------------ explain mode
def _strip_ext(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npy", ".tiff", ".tif", ".dcm", ".png",
                ".jpg", ".jpeg", ".bmp"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def subject_from_input(path: str | Path, cfg: Config) -> Subject:
    """A :class:`Subject` for ``--input``: a scan file, a slice/DICOM folder, or an OCTA-500 subject folder.

    An OCTA-500 folder (``.../OCTA_6mm/OCTA/<ID>``) gets the field-of-view spacing and, if present, its lesion
    mask; with ``--modality OCT+OCTA`` its sibling ``.../OCT/<ID>`` (or ``OCTA``) folder is the second channel.

    Raises:
        DataError: the path does not exist, or the sibling folder needed for OCT+OCTA is missing.
    """
    from octa3d.data.sources import FOV_LATERAL_MM, MASKS_DIR, _octa500_spacing

    p = Path(path)
    if not p.exists():
        raise DataError(f"--input {p}: no such file or folder")
    sid = _strip_ext(p.name)
    fov_dir = p.parent.parent
    fov = fov_dir.name.replace("OCTA_", "") if p.is_dir() else ""
    octa500 = p.is_dir() and p.parent.name in ("OCTA", "OCT") and fov in FOV_LATERAL_MM
    spacing = _octa500_spacing(p, fov) if octa500 else None
    if cfg.data.modality == "OCT+OCTA":
        if not (p.is_dir() and p.parent.name in ("OCTA", "OCT")):
            raise DataError(f"--input {p}: --modality OCT+OCTA needs an OCTA-500 subject folder .../OCTA/<ID> (or "
                            f".../OCT/<ID>) whose sibling folder holds the other modality")
        other = "OCT" if p.parent.name == "OCTA" else "OCTA"
        sibling = p.parent.parent / other / p.name
        if not sibling.is_dir():
            raise DataError(f"--input {p}: --modality OCT+OCTA needs the {other} scan of the same eye at {sibling}, "
                            f"which does not exist; use --modality {p.parent.name} or add that folder")
        paths = {p.parent.name: str(p), other: str(sibling)}
    else:
        paths = {"image": str(p)}
    mask = None
    if octa500:
        found = [fov_dir / MASKS_DIR / f"{p.name}{e}" for e in (".nii.gz", ".nii", ".nrrd", ".mha")]
        mask = next((str(f) for f in found if f.is_file()), None)
    return Subject(id=sid, label=None, paths=paths, spacing=spacing, mask=mask, meta={"input": str(p)})


@torch.no_grad()
def predict_samples(models: Sequence[torch.nn.Module], samples: np.ndarray, device: torch.device) -> np.ndarray:
    """Subject-level probabilities ``(K,)``: softmax averaged over patches and ensemble members."""
    x = torch.from_numpy(np.asarray(samples, np.float32)).to(device)
    probs = [torch.softmax(m.eval()(x).float(), dim=1).mean(0) for m in models]
    return torch.stack(probs).mean(0).cpu().numpy().astype(np.float64)


def run(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    """``--mode explain --input PATH``: predict one scan and export its CAM into ``runs/<exp>/explain/<name>/``.

    Returns:
        ``{"subject", "probabilities", "prediction", "checkpoints", "cam"...}`` (also written as prediction.json).
    """
    from octa3d import engine
    from octa3d.data.presets import build_preset
    from octa3d.test import cam_backend, checkpoint_config, find_checkpoints, load_models, place_models
    from octa3d.utils import dist
    from octa3d.utils.runs import init_run, stage_dir

    if not cfg.eval.input:
        raise ConfigError("--mode explain needs --input PATH: a scan file (NIfTI, NRRD, MHA, .npy, TIFF, DICOM "
                          "folder, folder of slices) or an OCTA-500 subject folder")
    ckpts = find_checkpoints(cfg)
    models, ref = load_models(ckpts)
    ecfg = checkpoint_config(cfg, ref, argv)
    ecfg.eval.cam = cam_backend(cfg, models, argv)
    device = place_models(models, dist.init_from_env(cfg.run.device))
    names = list(ref["class_names"])
    subject = subject_from_input(cfg.eval.input, ecfg)
    preset = build_preset(ecfg)
    image, record = preset.preprocess(subject)
    patches = range(len(record.patches)) if record.patches else [-1]
    samples = np.stack([preset.sample(image, record, p) for p in patches])
    probs = predict_samples([m for *_, m in models], samples, device)
    pred = names[int(np.argmax(probs))]
    init_run(ecfg, argv)
    split_file = ecfg.run_dir / "splits" / "split.json"
    if split_file.is_file():
        from octa3d.data.splits import read_splits

        if subject.id in read_splits(split_file.parent).non_test():
            log.warning("%s is a training/validation subject of experiment '%s': its prediction and CAM are "
                        "optimistic", subject.id, ecfg.exp_name)
    name = safe_name(subject.id)
    out = stage_dir(ecfg, f"explain/{name}", argv)
    result: dict[str, Any] = {"subject": subject.id, "input": str(cfg.eval.input), "prediction": pred,
                              "probabilities": {n: float(p) for n, p in zip(names, probs)},
                              "checkpoints": {n: str(p) for n, p, *_ in models}, "model": ref["model_name"],
                              "model_format": "int8" if ref["is_quantized"] else ref["artifact_format"]}
    if ecfg.eval.cam != "none":
        tb = engine.tensorboard_writer(out / "tensorboard")
        item = CamItem(subject, record, lambda: samples, probs, None)
        report = CamExporter(ecfg, [m for *_, m in models], names, out, preset, tb=tb, device=device).export([item])
        tb.close()
        result["cam"] = report["cam"]
        result.update(report["subjects"][subject.id])
    atomic_write_text(out / "prediction.json", json.dumps(result, indent=2) + "\n")
    print(f"{subject.id} ({cfg.eval.input}): predicted {pred} ("
          + ", ".join(f"p({n}) = {p:.3f}" for n, p in zip(names, probs)) + f") by {ref['model_name']} "
          f"[{', '.join(str(p) for _, p, *_ in models)}]")
    files = ["prediction.json"] + ([Path(f).name for f in result.get("files", {}).values()])
    print(f"Files in {out}/: {', '.join(files)}")
    return result
