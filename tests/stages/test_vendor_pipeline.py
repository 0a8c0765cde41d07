"""The pipeline on vendor exports: class folders of HEYEX ``.vol`` files (left and right eyes) through prepare,
train, test (maps in each scan's own geometry) and an external validation on a Duke AMD/control layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from octa3d.cli import main

LAYER = "features.block3.act"
SPACING = (0.0114, 0.0039, 0.12)


def _clinic(root: Path, vendor_export) -> dict[str, str]:
    """12 eyes, 6 NORMAL and 6 AMD (a bright spot below the band), every other one a left eye; ID → laterality."""
    eyes = {}
    for i in range(12):
        cls = "AMD" if i % 2 else "NORMAL"
        vol = vendor_export.volume((8, 32, 16), seed=i)
        if cls == "AMD":
            vol[2:6, 22:26, 4:12] = 250
        eye = "OS" if (i // 2) % 2 else "OD"
        vendor_export.vol(root / cls / f"eye{i:02d}.vol", vol, SPACING, eye, patient_id=f"p{i}")
        eyes[f"eye{i:02d}"] = eye
    return eyes


def test_prepare_train_test_and_external_on_vendor_exports(tmp_path, vendor_export, capsys):
    eyes = _clinic(tmp_path / "clinic", vendor_export)
    for cls in ("AMD", "Control"):
        for i in range(2):
            vendor_export.duke(tmp_path / "duke" / cls / f"Farsiu_Ophthalmology_2013_{cls}_Subject_{i}.mat",
                               vendor_export.volume((8, 32, 16), seed=20 + i))
    args = ["--data-root", tmp_path / "clinic", "--runs-dir", tmp_path / "runs", "--exp", "v", "--model", "cnn",
            "--input-size", "16", "--modality", "OCT", "--batch-size", "4", "--bootstrap", "20", "--device", "cpu"]
    args = [str(a) for a in args]
    assert main(["--mode", "prepare", *args]) == 0
    run = tmp_path / "runs" / "v"
    train = pd.read_csv(run / "splits" / "train.csv", dtype=str)
    assert set(train["subject"]) <= set(eyes) and train["group"].str.startswith("patient-").all()
    assert main(["--mode", "train", *args, "--epochs", "1"]) == 0
    assert main(["--mode", "test", *args, "--cam-layer", LAYER]) == 0
    test_ids = pd.read_csv(run / "splits" / "test.csv", dtype=str)["subject"].tolist()
    for sid in test_ids:
        cam = sitk.ReadImage(str(run / "test" / "cams" / f"{sid}_cam.nii.gz"))
        assert cam.GetSize() == (16, 32, 8) and np.allclose(cam.GetSpacing(), SPACING)
        mirrored = eyes[sid] == "OS"
        assert np.isclose(cam.GetDirection()[0], -1.0 if mirrored else 1.0)
        assert np.isclose(cam.GetOrigin()[0], 15 * SPACING[0] if mirrored else 0.0)
    # external validation on the Duke layout: Control is NORMAL, AMD is AMD, as the experiment's classes
    assert main(["--mode", "test", *args, "--cam", "none", "--external", str(tmp_path / "duke")]) == 0
    (ext,) = (run / "test-external").iterdir()
    metrics = json.loads((ext / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["cohort"]["n_subjects"] == 4 and metrics["cohort"]["layout"] == "vendor"
    assert metrics["cohort"]["class_counts"] == {"NORMAL": 2, "AMD": 2}
    capsys.readouterr()
