"""Vendor exports through ``--mode predict``, ``--mode explain`` and the Python API: a folder mixing a HEYEX
``.vol`` (a left eye with its angiography export), a NIfTI scan and an OCTA-500 eye is predicted whole, a damaged
``.vol`` among them is skipped with its reason, and the maps lie in the source scan's geometry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from octa3d.checkpoint.io import model_record, save_checkpoint
from octa3d.cli import parse_config

LAYER = "features.block3.act"
SPACING = (0.0114, 0.0039, 0.12)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """8 synthetic OCTA-500 eyes read as OCT (16x32x16), splits, an untrained cnn (temperature 2) as best.pt."""
    from octa3d.data.synthetic import generate
    from octa3d.model import create_model
    from octa3d.stages.prepare import run as prepare

    root = tmp_path_factory.mktemp("pred-vendor")
    generate(root / "data", 8, (16, 32, 16), seed=0, classes=("NORMAL", "CNV"))
    cfg, _ = parse_config(["--mode", "prepare", "--data-root", str(root / "data"), "--runs-dir", str(root / "runs"),
                           "--exp", "e", "--model", "cnn", "--input-size", "16", "--modality", "OCT"])
    sp = prepare(cfg)
    rec = model_record(cfg, sp.class_names, "classifier")
    rec.update(temperature=2.0, entropy_threshold=0.6, entropy_threshold_raw=0.6)
    save_checkpoint(cfg.run_dir / "train" / "checkpoints" / "best.pt", create_model("cnn", "3d", 1, 2), rec, epoch=1,
                    config=cfg)
    return root


def _cohort(root: Path, folder: Path, vendor_export, nifti_scan, cut) -> Path:
    """exam.vol (+ exam_Angio.vol, a left eye), scan.nii.gz, an OCTA-500 eye folder and a truncated bad.vol."""
    folder.mkdir()
    vol = vendor_export.volume((10, 32, 20))
    vendor_export.vol(folder / "exam.vol", vol, SPACING, "OS")
    vendor_export.vol(folder / "exam_Angio.vol", vol / 255.0, SPACING, "OS", angio=True)
    nifti_scan(folder / "scan.nii.gz")
    shutil.copytree(root / "data" / "OCTA_6mm" / "OCT" / "10001", folder / "10001")
    cut(vendor_export.vol(folder / "bad.vol", vol, SPACING, "OD"), -3000)
    return folder


def test_predict_mixed_folder_skips_the_damaged_vol_and_maps_in_source_geometry(
        private_copy, experiment, tmp_path, vendor_export, nifti_scan, cut, capsys):
    from octa3d.stages.predict import run

    root = private_copy(experiment)
    folder = _cohort(root, tmp_path / "clinic", vendor_export, nifti_scan, cut)
    s = run(parse_config(["--mode", "predict", "--runs-dir", str(root / "runs"), "--exp", "e", "--input",
                          str(folder), "--cam-layer", LAYER])[0])
    out = Path(s["folder"])
    assert s["kind"] == "mixed" and s["n_subjects"] == 4 and s["n_predicted"] == 3 and s["n_skipped"] == 1
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject": str})
    assert sorted(pred["subject"]) == ["10001", "exam", "scan"] and set(pred["cam_status"]) <= {"ok", "empty"}
    skipped = pd.read_csv(out / "skipped.csv", dtype=str)
    assert list(skipped["subject"]) == ["bad"] and str(folder / "bad.vol") in skipped["reason"][0]
    assert "truncated or damaged" in skipped["reason"][0] and "reasons in skipped.csv" in capsys.readouterr().out
    # the scan record says what was done to the left eye; the map and the input lie in its (mirrored) geometry
    doc = json.loads((out / "subjects" / "exam.json").read_text(encoding="utf-8"))
    assert doc["scan"]["laterality"] == "OS" and "mirrored" in doc["scan"]["orientation"]
    assert doc["scan"]["files"] == {"OCT": str(folder / "exam.vol")}  # an OCT model reads the structural scan
    cam = sitk.ReadImage(str(out / "cams" / "exam_cam.nii.gz"))
    assert cam.GetSize() == (20, 32, 10) and np.allclose(cam.GetSpacing(), SPACING)
    assert np.allclose(cam.GetDirection(), (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert np.allclose(cam.GetOrigin(), (19 * SPACING[0], 0, 0))
    shown = sitk.ReadImage(str(out / "cams" / "exam_input_OCT.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(shown), vendor_export.volume((10, 32, 20))[:, :, ::-1])


def test_explain_and_the_python_api_read_a_vol(private_copy, experiment, tmp_path, vendor_export):
    import octa3d
    from octa3d.stages.explain import run

    root = private_copy(experiment)
    vol = vendor_export.volume((10, 32, 20))
    path = vendor_export.vol(tmp_path / "exam.vol", vol, SPACING, "OS")
    res = run(parse_config(["--mode", "explain", "--runs-dir", str(root / "runs"), "--exp", "e", "--input",
                            str(path), "--cam-layer", LAYER])[0])
    assert res["subject"] == "exam" and res["scan"]["laterality"] == "OS" and res["channels"] == ["OCT"]
    frame = octa3d.load(root / "runs" / "e", device="cpu").predict(path)
    assert list(frame["subject"]) == ["exam"] and np.isclose(frame.filter(like="p_").iloc[0, :2].sum(), 1.0)
