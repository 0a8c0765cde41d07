"""Export of class activation maps in the *source scan's* geometry: NIfTI map + input, PNG review sheet,
TensorBoard slices, and localisation scores where lesion masks exist.

Each map is computed in network-input space (for an ensemble: the mean of the fold models' maps), mapped back onto
the source scan with :func:`octa3d.data.transforms.to_source_space` (undoing resize and slab crop; zero outside the
crop) and written with the source :class:`~octa3d.data.subject.Geometry`, so it overlays the scan in 3D Slicer,
ITK-SNAP or napari. Per subject: ``<id>_cam.nii.gz`` (float32 0..1), the scan as read, one file per channel named
by its modality (``<id>_input_OCT.nii.gz``, ``<id>_input_OCTA.nii.gz``; ``<id>_input.nii.gz`` when the source does
not say which modality it is), ``<id>_review.png`` (en-face maximum projection with the CAM plus the B-scan and
the slow-axis section through the CAM peak, naming the modality shown, with millimetre scale bars; 2D models: the
image with the CAM overlaid) and central CAM slices in TensorBoard. A map without evidence (all zero, constant,
non-finite) is reported per subject (``status``, a warning naming the subject and why) and its review sheet says
so instead of marking a peak. ``<id>`` is the subject ID as a file-name stem (:func:`octa3d.utils.io.unique_names`:
IDs that are not plain names, or that differ only in letter case, get a hash suffix, so distinct subjects never
share files); ``names.csv`` in the folder maps every subject ID to its stem.

Scores: with lesion masks the pointing game and mass in the lesion (:mod:`octa3d.cam.localization`); for the first
``--faithfulness-subjects`` subjects the deletion / insertion AUCs (:mod:`octa3d.cam.faithfulness`), which need no
truth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d.cam import faithfulness
from octa3d.cam.backends import OK, STATUS_TEXT, CamComputer, check_layer, minmax, parse_layers, resolve_cam_class
from octa3d.cam.layers import default_layers
from octa3d.cam.localization import localization, summarize, tolerance
from octa3d.cam.sheets import central_slices, review_figure_2d, review_figure_3d, save_png
from octa3d.cam.sources import CamItem, read_mask, scan_channels, slice_files, source_image
from octa3d.config import Config
from octa3d.data.nifti import write_nifti
from octa3d.data.transforms import PreprocessRecord, to_source_space
from octa3d.utils.io import atomic_write_csv, safe_name, unique_names

log = logging.getLogger("octa3d.cam")


class CamExporter:
    """Compute CAMs for :class:`CamItem` batches and write the per-subject exports.

    Args:
        cfg: the (checkpoint-derived) config: ``--cam``, ``--cam-layer``, ``--cam-class``, depth axis, batch size,
            ``--faithfulness-subjects``.
        models: the classifier(s); several = an ensemble (maps averaged).
        class_names: class names (file titles, ``--cam-class``).
        out_dir: folder for the files.
        preset: the preprocessing preset (reads source images).
        tb: optional TensorBoard writer (central CAM slices).
        device: where the models are.
    """

    def __init__(self, cfg: Config, models: Sequence[torch.nn.Module], class_names: Sequence[str], out_dir: Path,
                 preset: Any, tb: Any = None, device: torch.device | str = "cpu") -> None:
        self.cfg, self.class_names, self.out, self.preset, self.tb = cfg, list(class_names), Path(out_dir), preset, tb
        self.device = torch.device(device)
        self.models = list(models)
        layers = parse_layers(cfg.eval.cam_layer)
        if not layers and cfg.eval.cam != "occlusion":
            layers = default_layers(self.models[0], cfg.model.model, cfg.input_shape, cfg.in_channels)
        for m in self.models:
            check_layer(m, layers, cfg.model.model)
        self.layer = ",".join(layers) if cfg.eval.cam != "occlusion" else "(input occlusion)"
        self.target = resolve_cam_class(cfg.eval.cam_class, self.class_names)
        self.computer = CamComputer(self.models, cfg.eval.cam, layers)
        self.batch_size = max(1, cfg.train.batch_size)
        self.faithful_left = max(0, int(cfg.eval.faithfulness_subjects))
        self.stems: dict[str, str] = {}  # subject ID -> file stem, set by export() for all its subjects at once

    def _target(self, item: CamItem) -> int:
        return self.target if self.target is not None else int(np.argmax(item.probs))

    def batches(self, items: Sequence[CamItem]
                ) -> Iterator[tuple[list[CamItem], list[np.ndarray], list[np.ndarray], list[str], float]]:
        """Input-space maps ``(P, *input_shape)`` of several subjects per forward pass (about ``--batch-size``
        samples), yielded batch by batch so that memory stays bounded: ``(items, samples, maps, statuses,
        seconds the CAM took)``."""
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
            if i == len(group) and fs and any(f * 16 < s for f, s in zip(fs, x.shape[2:])):  # once
                log.warning("CAM layer %s has a %s map at input size %s: too coarse to localise a lesion; choose "
                            "an earlier layer with --cam-layer (or leave it unset for the adaptive default)",
                            self.layer, "x".join(map(str, fs)), "x".join(map(str, x.shape[2:])))
            bounds = np.cumsum([0, *counts])
            yield (group, samples, [cams[a:b] for a, b in zip(bounds[:-1], bounds[1:])], list(self.computer.status),
                   seconds)

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

    def _tolerance(self, record: PreprocessRecord) -> tuple[int, ...]:
        shape = record.cropped_shape if not record.patches else [b - a for a, b in record.patches[0]]
        return tolerance(shape, record.input_shape)

    def export_one(self, item: CamItem, maps: np.ndarray, status: str = OK) -> dict[str, Any]:
        """Write the NIfTI/PNG/TensorBoard exports of one subject; returns its summary (status, peak,
        localization)."""
        rec, name = item.record, self.stems.get(item.subject.id) or safe_name(item.subject.id)
        target = self._target(item)
        geo = rec.geometry
        # full-size scans: the float32 CAM (410 MB at 400x640x400) is written before the scan is read, so that
        # ITK's copy of it and the scan are never in memory together
        cam = self.to_source(maps, rec)
        if status == OK and not cam.any():  # evidence only outside the crop: nothing left in the source geometry
            status = "empty"
        files = {"cam": write_nifti(cam, geo, self.out / f"{name}_cam.nii.gz")}
        image = source_image(self.preset, item.subject, rec)
        channels = scan_channels(item.subject, rec, self.cfg.data.modality)
        for c, ch in enumerate(channels):  # one file per channel, named by its modality where the source says it
            tag = safe_name(ch.modality) if ch.modality else (f"c{c}" if len(channels) > 1 else "")
            files[f"input_{tag}" if tag else "input"] = write_nifti(
                image[c], geo, self.out / (f"{name}_input_{tag}.nii.gz" if tag else f"{name}_input.nii.gz"))
        mask = read_mask(item.subject, rec)
        no_map = None if status == OK else STATUS_TEXT.get(status, status)
        if no_map:
            log.warning("subject %s: the %s map of class %s is %s; exported with cam_status '%s' (no peak)",
                        item.subject.id, self.cfg.eval.cam, self.class_names[target], no_map, status)
        title = self._title(item, target)
        shown = channels[-1]  # the sheet draws the last channel (OCTA of OCT+OCTA) and names it
        # millimetre scale bars only where the source has a physical spacing (npy, photos, BMPs: all 1.0)
        spacing = geo.spacing[::-1] if any(v != 1.0 for v in geo.spacing) else None
        # the scan as read (uint8 stays uint8): the figures convert only the slices they show
        if cam.ndim == 3:
            sheet = review_figure_3d(image[-1], cam, self.cfg.preprocess.depth_axis, title, mask, spacing=spacing,
                                     no_map=no_map, channel=shown.modality, slice_names=slice_files(shown.path))
        else:
            proj = (rec.meta or {}).get("projection")
            what = (f"{shown.modality or 'scan'} en-face (mean over the retinal slab)" if proj == "compute" else
                    f"{shown.modality} projection map" if proj else shown.modality)
            sheet = review_figure_2d(image[-1], cam, title, mask, no_map=no_map, spacing=spacing, channel=what)
        files["review"] = save_png(sheet, self.out / f"{name}_review.png")
        if self.tb is not None:
            self.tb.add_image(f"cam/{name}", central_slices(cam, image[-1]), 0)
        out: dict[str, Any] = {"target": self.class_names[target], "status": status, "file_stem": name,
                               "files": {k: str(v) for k, v in files.items()},
                               "peak": ([int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape)]
                                        if status == OK else None)}
        loc = (localization(cam, mask, self._tolerance(rec), ok=status == OK, depth_axis=self.cfg.preprocess.depth_axis)
               if mask is not None else None)
        if loc is not None:
            out["localization"] = loc
        return out

    def _faithfulness(self, item: CamItem, samples: np.ndarray, maps: np.ndarray, status: str
                      ) -> dict[str, float] | None:
        """Deletion / insertion AUCs for the first ``--faithfulness-subjects`` subjects with an evidence map."""
        if self.faithful_left <= 0 or status != OK:
            return None
        self.faithful_left -= 1
        return faithfulness.deletion_insertion(self.models, samples, maps, self._target(item), self.device,
                                               seed=self.cfg.run.seed)

    def export(self, items: Sequence[CamItem]) -> dict[str, Any]:
        """CAMs of every item (batched), their files, and the score summaries.

        Returns:
            ``{"cam": {backend, layer, target, n_subjects, status_counts, seconds_per_volume, folder, ...},
            "subjects": {id: {status, file_stem, peak, files, localization?}}, "localization": ... (with lesion
            masks), "faithfulness": ... (deletion / insertion AUCs)}``; ``names.csv`` (subject, file_stem) in the
            folder.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self.stems = unique_names(it.subject.id for it in items)
        per_subject: dict[str, Any] = {}
        faithful: dict[str, dict[str, float]] = {}
        seconds, faithful_s, t_start = 0.0, 0.0, time.perf_counter()
        for group, samples, maps, statuses, sec in self.batches(items):
            seconds += sec
            for item, x, m, st in zip(group, samples, maps, statuses):
                per_subject[item.subject.id] = self.export_one(item, m, st)
                t0 = time.perf_counter()
                scores = self._faithfulness(item, x, m, per_subject[item.subject.id]["status"])
                faithful_s += time.perf_counter() - t0
                if scores is not None:
                    faithful[item.subject.id] = scores
                log.debug("CAM of %s written", item.subject.id)
        self._write_names(per_subject)
        counts: dict[str, int] = {}
        for v in per_subject.values():
            counts[v["status"]] = counts.get(v["status"], 0) + 1
        report: dict[str, Any] = {
            "cam": {"backend": self.cfg.eval.cam, "layer": self.layer,
                    "target": "predicted class" if self.target is None else self.class_names[self.target],
                    "n_subjects": len(items), "n_models": self.computer.n_members, "status_counts": counts,
                    "feature_shape": list(self.computer.feature_shape or []),
                    "seconds_per_volume": seconds / max(1, len(items)),
                    "export_seconds_per_volume": (time.perf_counter() - t_start - faithful_s) / max(1, len(items)),
                    "folder": str(self.out)},
            "subjects": per_subject}
        loc_rows = {sid: dict(v["localization"], true=self.class_names[it.true] if it.true is not None else None)
                    for it, (sid, v) in zip(items, per_subject.items()) if "localization" in v}
        if loc_rows:
            report["localization"] = summarize(loc_rows, self._tolerance(items[0].record))
        if faithful:
            report["faithfulness"] = faithfulness.summarize(faithful)
        bad = len(items) - counts.get(OK, 0)
        log.info("CAM (%s, layer %s): %d subject(s)%s, %.2f s per volume, files in %s", self.cfg.eval.cam,
                 self.layer, len(items), f", {bad} without evidence map" if bad else "",
                 report["cam"]["seconds_per_volume"], self.out)
        return report

    def _write_names(self, per_subject: dict[str, Any]) -> None:
        """``names.csv``: subject ID -> file stem of the subjects exported by this call."""
        import pandas as pd

        atomic_write_csv(self.out / "names.csv", pd.DataFrame(
            {"subject": list(per_subject), "file_stem": [v["file_stem"] for v in per_subject.values()]}))


def score_lines(m: dict[str, Any]) -> list[str]:
    """Printable lines of the map scores in a metrics dictionary (status, localisation, faithfulness)."""
    cam = m.get("cam")
    if not cam:
        return []
    counts = cam.get("status_counts", {})
    bad = {k: v for k, v in counts.items() if k != "ok"}
    lines = [f"  evidence maps: {cam['backend']} on {cam['layer']}, {cam['n_subjects']} subjects"
             + (f"; WITHOUT evidence: {', '.join(f'{v} {k}' for k, v in bad.items())} (see cam_status in "
                f"predictions.csv)" if bad else "")]
    loc = m.get("localization") or {}
    tol = "x".join(map(str, loc.get("tolerance_voxels") or []))
    for cls, v in loc.get("per_class", {}).items():
        lines.append(f"  {cls} ({v['n']} with lesion masks): pointing game {v['pointing_game']:.2f} (tolerance "
                     f"{tol} voxels; exact {v['pointing_game_exact']:.2f}"
                     + (f"; en face {v['pointing_game_enface']:.2f}" if "pointing_game_enface" in v else "")
                     + f"), map mass in lesion {v['mass_inside']:.3f}"
                     f" = {v['mass_ratio']:.1f}x chance ({v['lesion_fraction']:.4f})")
    f = m.get("faithfulness")
    if f:
        lines.append(f"  deletion AUC {f['deletion_auc']:.3f} (random order {f['deletion_auc_random']:.3f}, lower "
                     f"is better), insertion AUC {f['insertion_auc']:.3f} ({f['n']} subjects)")
    return lines
