"""``--mode explain --input PATH``: predict one scan and export its class activation map.

The scan (a file in any supported format, a slice/DICOM folder, or an OCTA-500 subject folder, see
:func:`octa3d.data.sources.subject_from_path`) is preprocessed as the model was trained (settings from the
checkpoint), predicted by the experiment's model or fold ensemble, and its map exported in the source geometry by
:class:`octa3d.cam.CamExporter`, into ``runs/<exp>/explain/<scan>/`` with ``prediction.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from octa3d import engine
from octa3d.cam import CamExporter, CamItem, cam_backend
from octa3d.checkpoint import checkpoint_config, find_checkpoints, load_models, place_models
from octa3d.config import Config
from octa3d.data.presets import build_preset
from octa3d.data.sources import subject_from_path
from octa3d.data.splits import read_splits, training_overlap
from octa3d.errors import ConfigError
from octa3d.utils import dist
from octa3d.utils.io import atomic_write_json, safe_name
from octa3d.utils.runs import init_run, stage_dir
from octa3d.utils.tracking import tensorboard_writer

log = logging.getLogger("octa3d.explain")

def _warn_if_seen(ecfg: Config, subject: Any) -> None:
    """Warn when the scan (or its patient) trained or validated the experiment's model: its prediction is then
    optimistic. One identity rule for every source type (:func:`octa3d.data.splits.training_overlap`)."""
    if (ecfg.run_dir / "splits" / "split.json").is_file():
        reason = training_overlap(read_splits(ecfg.run_dir / "splits"), subject)
        if reason:
            log.warning("%s of experiment '%s': its prediction and CAM are optimistic", reason, ecfg.exp_name)


def run(cfg: Config) -> dict[str, Any]:
    """Predict ``--input`` and export its CAM into ``runs/<exp>/explain/<name>/``.

    Returns:
        ``{"subject", "probabilities", "prediction", "checkpoints", "cam"...}`` (also written as prediction.json).
    """
    if not cfg.eval.input:
        raise ConfigError("--mode explain needs --input PATH: a scan file (NIfTI, NRRD, MHA, .npy, TIFF, DICOM "
                          "folder, folder of slices) or an OCTA-500 subject folder")
    models, ref = load_models(find_checkpoints(cfg))
    ecfg = checkpoint_config(cfg, ref)
    ecfg.eval.cam = cam_backend(ecfg, models)
    device = place_models(models, dist.init_from_env(cfg.run.device))
    names = list(ref["class_names"])
    subject = subject_from_path(cfg.eval.input, ecfg.data)
    preset = build_preset(ecfg)
    image, record = preset.preprocess(subject)
    patches = range(len(record.patches)) if record.patches else [-1]
    samples = np.stack([preset.sample(image, record, p) for p in patches])
    probs = engine.predict_samples([m for *_, m in models], samples, device)
    pred = names[int(np.argmax(probs))]
    init_run(ecfg)
    _warn_if_seen(ecfg, subject)
    out = stage_dir(ecfg, f"explain/{safe_name(subject.id)}")
    result: dict[str, Any] = {"subject": subject.id, "input": str(cfg.eval.input), "prediction": pred,
                              "probabilities": {n: float(p) for n, p in zip(names, probs)},
                              "checkpoints": {n: str(p) for n, p, *_ in models}, "model": ref["model_name"],
                              "model_format": "int8" if ref["is_quantized"] else ref["artifact_format"]}
    if ecfg.eval.cam != "none":
        tb = tensorboard_writer(out / "tensorboard")
        item = CamItem(subject, record, lambda: samples, probs, None)
        report = CamExporter(ecfg, [m for *_, m in models], names, out, preset, tb=tb, device=device).export([item])
        tb.close()
        result["cam"] = report["cam"]
        result.update(report["subjects"][subject.id])
    atomic_write_json(out / "prediction.json", result)
    print(f"{subject.id} ({cfg.eval.input}): predicted {pred} ("
          + ", ".join(f"p({n}) = {p:.3f}" for n, p in zip(names, probs)) + f") by {ref['model_name']} "
          f"[{', '.join(str(p) for _, p, *_ in models)}]")
    files = ["prediction.json"] + [Path(f).name for f in result.get("files", {}).values()]
    print(f"Files in {out}/: {', '.join(files)}")
    return result
