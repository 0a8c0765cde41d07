"""``--mode explain``: one NIfTI scan predicted and explained in its own geometry, and OCTA-500 subject folders as
input; output folders that never collide, refused before the scan is read; one input file per
channel, named by modality (item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from octa3d.checkpoint.io import CheckpointError, model_record, save_checkpoint
from octa3d.cli import parse_config
from octa3d.errors import RunExistsError


def _explain_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--mode", "explain", "--runs-dir", str(tmp_path / "runs"), "--exp", "e", "--model", "cnn",
            "--input-size", "16", "--cam-layer", "features.block3.act", *extra]


def test_explain_single_nifti(tmp_path, capsys, nifti_scan, same_geometry):
    from octa3d.model import create_model
    from octa3d.stages.explain import run

    src, vol = nifti_scan(tmp_path / "scanA.nii.gz")
    args = _explain_args(tmp_path, "--input", str(src))
    cfg, _ = parse_config(args)
    with pytest.raises(CheckpointError, match="no trained model"):
        run(cfg)
    save_checkpoint(cfg.run_dir / "train" / "checkpoints" / "best.pt", create_model("cnn", "3d", 1, 2),
                           model_record(cfg, ["NORMAL", "CNV"], "classifier"), epoch=1, config=cfg)
    res = run(cfg)
    out = Path(res["folder"])
    assert out.parent == tmp_path / "runs" / "e" / "explain" and out.name.startswith("scanA_layercam_")
    doc = json.loads((out / "prediction.json").read_text())
    assert doc["prediction"] in ("NORMAL", "CNV")
    assert sum(doc["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    # through the Python API: raw probabilities, entropy and the flag beside the reported ones
    assert doc["calibrated"] is False and doc["probabilities_raw"] == doc["probabilities"]  # no temperature stored
    assert doc["entropy"] >= 0 and doc["uncertain"] is None
    same_geometry(out / "scanA_cam.nii.gz", src)
    same_geometry(out / "scanA_input.nii.gz", src)  # a NIfTI does not say its modality
    assert (out / "scanA_review.png").is_file() and res["cam"]["backend"] == "layercam"  # the default method
    assert res["status"] in ("ok", "empty") and "peak" in res
    assert "predicted" in capsys.readouterr().out
    # the input and the settings are recorded
    assert doc["input"] == str(src) and doc["channels"] == [None]
    assert doc["settings"]["cam"] == "layercam" and doc["settings"]["cam_layer"] == "features.block3.act"
    assert doc["settings"]["files"] == [str(src.resolve())] and doc["settings"]["hash"] in out.name
    # --cam none: prediction only, in a folder of its own (the CAM results stay)
    cfg2, _ = parse_config(args + ["--cam", "none"])
    res2 = run(cfg2)
    out2 = Path(res2["folder"])
    assert out2 != out and out2.name.startswith("scanA_no-cam_")
    assert (out2 / "prediction.json").is_file() and not (out2 / "scanA_cam.nii.gz").exists()
    assert (out / "scanA_cam.nii.gz").is_file()


def _model(cfg) -> None:
    from octa3d.model import create_model

    save_checkpoint(cfg.run_dir / "train" / "checkpoints" / "best.pt",
                               create_model("cnn", "3d", cfg.in_channels, 2),
                               model_record(cfg, ["NORMAL", "CNV"], "classifier"), epoch=1, config=cfg)


def test_explain_refuses_an_existing_folder_before_reading_the_scan(tmp_path, monkeypatch, nifti_scan):
    """Item 8: the same scan with the same settings is refused at once (no decode); other CAM settings or another
    file with the same name get folders of their own."""
    from octa3d.stages import explain

    src, _ = nifti_scan(tmp_path / "scanA.nii.gz")
    (tmp_path / "b").mkdir()
    other, _ = nifti_scan(tmp_path / "b" / "scanA.nii.gz")
    args = _explain_args(tmp_path, "--input", str(src), "--faithfulness-subjects", "0")
    _model(parse_config(args)[0])
    explain.run(parse_config(args)[0])
    runs = tmp_path / "runs" / "e" / "explain"

    def folders() -> set[Path]:
        return {p.parent for p in runs.glob("*/prediction.json")}

    (first,) = folders()

    def no_read(*a, **k):
        raise AssertionError("the scan was read before the existing output folder was refused")

    with monkeypatch.context() as m:
        m.setattr(explain.Predictor, "prepare", no_read)
        with pytest.raises(RunExistsError, match="--overwrite"):
            explain.run(parse_config(args)[0])
    assert (first / "scanA_cam.nii.gz").is_file()  # untouched
    for extra in (["--cam", "gradcam"], ["--cam-class", "CNV", "--cam-layer", "features.block2.act"]):
        explain.run(parse_config(args + extra)[0])
    explain.run(parse_config(_explain_args(tmp_path, "--input", str(other), "--faithfulness-subjects", "0"))[0])
    assert len(folders()) == 4 and all((f / "scanA_cam.nii.gz").is_file() for f in folders())
    assert any("gradcam" in f.name for f in folders())
    # --overwrite replaces the one folder
    again = Path(explain.run(parse_config(args + ["--overwrite"])[0])["folder"])
    assert again == first and len(folders()) == 4


def test_explain_names_oct_and_octa_folders_apart(tmp_path):
    """Item 8: the OCT and the OCTA folder of one eye are distinct inputs (distinct folders); an OCT+OCTA model
    reads the same two folders through either, which is one input."""
    from octa3d.config import Config
    from octa3d.data.octa500 import subject_from_path
    from octa3d.data.synthetic import generate
    from octa3d.stages.explain import output_name

    generate(tmp_path / "data", 1, (8, 24, 8), seed=0, classes=("CNV",))
    eye = next((tmp_path / "data" / "OCTA_6mm" / "OCTA").iterdir())
    oct_eye = eye.parent.parent / "OCT" / eye.name
    cfg = Config()
    ckpt = [tmp_path / "best.pt"]
    n_octa, s_octa = output_name(cfg, subject_from_path(eye, cfg.data), ckpt)
    n_oct, _ = output_name(cfg, subject_from_path(oct_eye, cfg.data), ckpt)
    assert n_octa.startswith(f"{eye.name}_OCTA_layercam_") and n_oct.startswith(f"{eye.name}_OCT_layercam_")
    assert s_octa["files"] == [str(eye.resolve())] and s_octa["checkpoints"] == [str(ckpt[0].resolve())]
    cfg.data.modality = "OCT+OCTA"
    both = {output_name(cfg, subject_from_path(p, cfg.data), ckpt)[0] for p in (eye, oct_eye)}
    assert len(both) == 1 and next(iter(both)).startswith(f"{eye.name}_OCT+OCTA_layercam_")
    assert len({n_octa, n_oct} | both) == 3


def _bmp_stack(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("*.bmp"), key=lambda f: int(f.stem))
    return sitk.GetArrayFromImage(sitk.ReadImage([str(f) for f in files], sitk.sitkUInt8))


@pytest.mark.parametrize("modality", ["OCTA", "OCT+OCTA"])
def test_explain_octa500_eye_writes_one_input_per_modality(tmp_path, modality, same_geometry):
    """Item 9: one input NIfTI per channel, named by modality, holding that modality's scan (before: an
    ``_input.nii.gz`` that held the OCT channel even for the OCTA folder, and duplicated ``_input_OCT``)."""
    from octa3d.data.synthetic import generate
    from octa3d.stages.explain import run

    generate(tmp_path / "data", 1, (8, 24, 8), seed=0, classes=("CNV",))
    eye = next((tmp_path / "data" / "OCTA_6mm" / "OCTA").iterdir())
    args = _explain_args(tmp_path, "--input", str(eye), "--modality", modality, "--cam", "gradcam")
    cfg, _ = parse_config(args)
    _model(cfg)
    res = run(cfg)
    (out,) = {p.parent for p in (tmp_path / "runs" / "e" / "explain").glob("*/prediction.json")}
    sid, mods = eye.name, modality.split("+")
    assert sorted(f.name for f in out.iterdir() if f.suffix == ".gz") == sorted(
        [f"{sid}_cam.nii.gz"] + [f"{sid}_input_{m}.nii.gz" for m in mods])
    for m in mods:
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{sid}_input_{m}.nii.gz")))
        assert np.array_equal(stored, _bmp_stack(eye.parent.parent / m / sid)), m
        same_geometry(out / f"{sid}_input_{m}.nii.gz", out / f"{sid}_cam.nii.gz")
    assert out.name.startswith(f"{sid}_{modality}_gradcam_") and res["channels"] == mods
