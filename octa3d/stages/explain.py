"""``--mode explain --input PATH``: predict one scan and export its class activation map.

The scan (a file in any supported format, a slice/DICOM folder, or an OCTA-500 subject folder, see
:func:`octa3d.data.sources.subject_from_path`) is preprocessed as the model was trained (settings from the
checkpoint), predicted by the experiment's model or fold ensemble through the Python API
(:class:`octa3d.deploy.api.Predictor`: calibrated probabilities unless ``--no-calibrate``, raw ones, entropy and
the ``uncertain`` flag and the out-of-distribution check in ``prediction.json``), and its map exported in the
source geometry by :class:`octa3d.cam.CamExporter`, into ``runs/<exp>/explain/<name>/`` with ``prediction.json``.

``<name>`` (:func:`output_name`) is unique per input and settings: ``<ID>[_<modality>]_<cam>_<hash>``, e.g.
``10001_OCTA_layercam_3f9a1c0e``, where the modality names the OCTA-500 folder read (``OCT``, ``OCTA``,
``OCT+OCTA``, or a projection map type) and the hash covers the files read, the checkpoint(s) and the CAM method,
layer and class (and ``--no-calibrate``). Explaining the OCT and the OCTA folder of one eye, or one scan with other CAM
settings, thus never
writes into the same folder; the same command twice does, and is refused without ``--overwrite`` before the scan is
read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from octa3d.cam import CamItem
from octa3d.cam.sources import path_modality, scan_channels
from octa3d.config import Config
from octa3d.data.leakage import seen_checker
from octa3d.data.sources import subject_from_path
from octa3d.data.subject import Subject
from octa3d.deploy.api import Predictor
from octa3d.errors import ConfigError
from octa3d.review import write_explain_review
from octa3d.utils.io import atomic_write_json, safe_name
from octa3d.utils.runs import init_run, plan_stage, releases_locks, stage_dir
from octa3d.utils.tracking import tensorboard_writer

log = logging.getLogger("octa3d.explain")

def _input_modality(subject: Subject) -> str:
    """The OCTA-500 modality folder(s) an ``--input`` reads (``"OCTA"``, ``"OCT+OCTA"``, ``"OCTA(FULL)"``), or ``""``
    when the input is no OCTA-500 eye folder or projection map."""
    if "image" not in subject.paths:
        return "+".join(sorted(subject.paths))  # an eye's OCT and OCTA folders: "OCT+OCTA"
    return path_modality(Path(subject.paths["image"])) or ""


def output_name(ecfg: Config, subject: Subject, checkpoints: list[Path]) -> tuple[str, dict[str, Any]]:
    """The folder name under ``explain/`` for this input and these settings, and the settings it stands for.

    Args:
        ecfg: the checkpoint-derived config (effective ``--cam``, ``--cam-layer``, ``--cam-class``).
        subject: the ``--input`` subject (its files name the input; an OCT+OCTA eye read through its OCT or its
            OCTA folder is the same input).
        checkpoints: the model file(s).

    Returns:
        ``(name, settings)``: ``<ID>[_<modality>]_<cam>_<hash8>`` and the dictionary hashed (recorded in
        prediction.json).
    """
    cam = ecfg.eval.cam
    settings: dict[str, Any] = {
        "files": sorted(str(Path(p).resolve()) for p in subject.paths.values()),
        "checkpoints": sorted(str(Path(p).resolve()) for p in checkpoints),
        "cam": cam, "cam_layer": (ecfg.eval.cam_layer or "default") if cam != "none" else None,
        "cam_class": (ecfg.eval.cam_class or "predicted") if cam != "none" else None,
        "calibrate": bool(ecfg.eval.calibrate)}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    parts = [subject.id, _input_modality(subject), cam if cam != "none" else "no-cam", digest]
    return safe_name("_".join(p for p in parts if p)), dict(settings, hash=digest)


REFUSAL_HINT = " (other CAM settings or another scan get their own folder)"


@releases_locks
def run(cfg: Config) -> dict[str, Any]:
    """Predict ``--input`` and export its CAM into ``runs/<exp>/explain/<name>/`` (:func:`output_name`).

    Every option is checked before anything is written; the outputs replace an earlier explanation only once
    complete (:func:`octa3d.utils.runs.stage_dir`).

    Raises:
        RunExistsError: that folder holds results and ``--overwrite`` was not given (checked before the scan is
            read).

    Returns:
        ``{"subject", "input", "folder", "channels", "settings", "probabilities", "prediction", "checkpoints",
        "cam"...}`` (also written as prediction.json).
    """
    if not cfg.eval.input:
        raise ConfigError("--mode explain needs --input PATH: a scan file (NIfTI, NRRD, MHA, .npy, TIFF, DICOM "
                          "folder, folder of slices, a vendor export such as a Heidelberg .vol) or an OCTA-500 "
                          "subject folder")
    predictor = Predictor.from_config(cfg)  # the one code path of the Python API (octa3d.load)
    ecfg, models, ref, names = predictor.cfg, predictor.models, predictor.ref, predictor.classes
    subject = subject_from_path(cfg.eval.input, ecfg.data)
    folder, settings = output_name(ecfg, subject, [m.path for m in models])
    # before the scan is decoded (seconds for a full-size eye)
    plan_stage(ecfg, f"explain/{folder}", hint=REFUSAL_HINT)
    prep = predictor.prepare(subject)
    pred = predictor.predict_prepared(prep)
    probs = pred.probs
    init_run(ecfg)
    reason = seen_checker(ecfg)(subject)  # one identity rule for every source type, AE extra data included
    if reason:
        log.warning("%s of experiment '%s': its prediction and CAM are optimistic", reason, ecfg.exp_name)
    with stage_dir(ecfg, f"explain/{folder}", hint=REFUSAL_HINT) as sf:
        out = sf.path
        channels = [c.modality for c in scan_channels(subject, prep.record, ecfg.data.modality)]
        result: dict[str, Any] = {"subject": subject.id, "input": str(cfg.eval.input), "folder": str(sf.final),
                                  "channels": channels, "settings": settings, "prediction": pred.prediction,
                                  "probabilities": {n: float(p) for n, p in zip(names, probs)},
                                  "probabilities_raw": {n: float(p) for n, p in zip(names, pred.raw)},
                                  "calibrated": pred.calibrated, "entropy": pred.entropy,
                                  "uncertain": pred.uncertain, "ood_score": pred.ood_score, "ood": pred.ood,
                                  "ood_reason": pred.ood_reason,
                                  "checkpoints": predictor.checkpoints, "model": ref["model_name"],
                                  "model_format": "int8" if ref["is_quantized"] else ref["artifact_format"]}
        if prep.record.meta.get("scan"):  # a vendor export: what the file says and what was done to it
            result["scan"] = prep.record.meta["scan"]
        if ecfg.eval.cam != "none":
            tb = tensorboard_writer(out / "tensorboard")
            item = CamItem(subject, prep.record, lambda: prep.samples, probs, None)
            report = predictor.cam_exporter(out, tb=tb).export([item])
            tb.close()
            result["cam"] = report["cam"]
            result.update(report["subjects"][subject.id])
        result = sf.rebase(result)
        atomic_write_json(out / "prediction.json", result)
        page = write_explain_review(out, {"experiment": ecfg.exp_name, "stage": "explain",
                                          "data": str(cfg.eval.input)}, result)
        out = sf.finish(ecfg)
    pred = pred.prediction
    print(f"{subject.id} ({cfg.eval.input}): predicted {pred} ("
          + ", ".join(f"p({n}) = {p:.3f}" for n, p in zip(names, probs)) + f") by {ref['model_name']} "
          f"[{', '.join(str(m.path) for m in models)}]")
    if result["ood"]:
        print(f"  out of distribution (unlike the training scans; predicted anyway, marked uncertain): "
              f"{result['ood_reason']}")
    files = ["prediction.json"] + [Path(f).name for f in result.get("files", {}).values()]
    print(f"Files in {out}/: {', '.join(files)}" + (", review/index.html (open it in a browser)" if page else ""))
    return result
