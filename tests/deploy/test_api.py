"""The Python API: ``octa3d.load`` on a run folder or a checkpoint reproduces ``--mode test``;
arrays, tensors and files give one answer; evidence maps come back in the scan's geometry; ``import octa3d``
stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import octa3d
from octa3d.checkpoint.io import CheckpointError
from octa3d.cli import parse_config

LAYER = "features.block3.act"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """12 synthetic eyes, their splits, a small cnn checkpoint with a fitted-like temperature and uncertainty
    threshold (as the train stage records them), and its ``--mode test`` results."""
    from octa3d.checkpoint.io import model_record, save_checkpoint
    from octa3d.data.synthetic import generate
    from octa3d.model import create_model
    from octa3d.stages.prepare import run as prepare
    from octa3d.stages.test import run as test

    root = tmp_path_factory.mktemp("api")
    generate(root / "data", 12, (16, 32, 16), seed=0, classes=("NORMAL", "CNV"))
    base = ["--data-root", str(root / "data"), "--runs-dir", str(root / "runs"), "--exp", "e", "--model", "cnn",
            "--input-size", "16", "--batch-size", "4", "--cam", "none", "--num-workers", "0"]
    cfg = parse_config(["--mode", "prepare", *base])[0]
    sp = prepare(cfg)
    torch.manual_seed(0)
    model = create_model("cnn", "3d", 1, 2)
    with torch.no_grad():  # weights away from the initial near-uniform output: probabilities that differ
        for p in model.parameters():
            p.mul_(2.0)
    rec = model_record(cfg, sp.class_names, "classifier")
    rec.update(temperature=1.7, entropy_threshold=0.5, entropy_threshold_raw=0.45)
    save_checkpoint(cfg.run_dir / "train" / "checkpoints" / "best.pt", model, rec, epoch=1, config=cfg)
    test(parse_config(["--mode", "test", "--bootstrap", "0", *base])[0])
    return root


def test_api_reproduces_test_probabilities(trained):
    run_dir = trained / "runs" / "e"
    test = pd.read_csv(run_dir / "test" / "predictions.csv", dtype={"subject": str})
    assert (test["p_CNV"] - test["p_raw_CNV"]).abs().max() > 1e-3  # calibration changed them: a real check
    eyes = [trained / "data" / "OCTA_6mm" / "OCTA" / sid for sid in test["subject"]]
    model = octa3d.load(run_dir)
    assert model.calibrated and model.classes == ["NORMAL", "CNV"]
    got = model.predict(eyes)
    assert list(got["subject"]) == list(test["subject"])
    for cols in (["p_NORMAL", "p_CNV"], ["p_raw_NORMAL", "p_raw_CNV"]):
        assert np.allclose(got[cols].to_numpy(float), test[cols].to_numpy(float), atol=1e-5), cols
    assert list(got["prediction"]) == list(test["prediction"])
    assert np.allclose(got["entropy"], test["entropy"], atol=1e-5)
    if "uncertain" in test:
        assert list(got["uncertain"]) == list(test["uncertain"])
    # the checkpoint file itself: the same model; calibrate=False reports the raw softmax
    raw = octa3d.load(run_dir / "train" / "checkpoints" / "best.pt", calibrate=False).predict(eyes[:2])
    assert np.allclose(raw[["p_NORMAL", "p_CNV"]].to_numpy(float), test[["p_raw_NORMAL", "p_raw_CNV"]][:2], atol=1e-5)


def test_arrays_tensors_and_files_agree_and_maps_come_back_in_source_geometry(trained, tmp_path, nifti_scan):
    model = octa3d.load(trained / "runs" / "e", device="cpu")
    vol = np.random.default_rng(1).integers(0, 200, (12, 40, 14)).astype(np.uint8)
    np.save(tmp_path / "v.npy", vol)
    from_file = model.predict(tmp_path / "v.npy")
    from_array = model.predict(vol)
    from_tensor = model.predict(torch.from_numpy(vol)[None])
    batch = model.predict(np.stack([vol, vol])[:, None])
    cols = ["p_NORMAL", "p_CNV"]
    for other in (from_array, from_tensor, batch.iloc[[1]]):
        assert np.allclose(other[cols].to_numpy(float), from_file[cols].to_numpy(float), atol=1e-6)
    assert list(batch["subject"]) == ["array-0", "array-1"] and from_file["subject"][0] == "v"
    (ex,) = model.explain(vol, method="gradcam")
    assert ex.cam.shape == vol.shape and ex.cam.dtype == np.float32 and ex.status in ("ok", "empty", "constant")
    scan, _ = nifti_scan(tmp_path / "scanA.nii.gz")
    (ex2,) = model.explain(scan, out_dir=tmp_path / "maps")
    assert ex2.cam is None and Path(ex2.files["cam"]).is_file() and ex2.prediction.subject == "scanA"
    with pytest.raises(Exception, match="array of shape"):
        model.predict(np.zeros((2, 2)))


def test_load_refuses_what_is_no_model(tmp_path):
    with pytest.raises(CheckpointError, match="no such run folder"):
        octa3d.load(tmp_path / "nothing")
    (tmp_path / "exp").mkdir()
    with pytest.raises(CheckpointError, match="not a run folder"):
        octa3d.load(tmp_path / "exp")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        octa3d.load(tmp_path / "junk.pt")


def test_import_octa3d_is_light_and_load_is_lazy():
    code = "import sys, octa3d; assert 'torch' not in sys.modules and 'octa3d.deploy.api' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from octa3d.deploy import api

    assert octa3d.load is api.load
    with pytest.raises(AttributeError, match="nothing"):
        octa3d.nothing  # noqa: B018


@pytest.mark.parametrize("flag", ["--tta", "--mc-dropout"])
def test_spread_of_the_api_equals_the_test_stage(trained, tmp_path, flag):
    """``--tta N`` and ``--mc-dropout N`` passes are drawn from (seed, pass, subject, patch), so the API (and
    --mode predict), which see one eye at a time, report the p_sd that --mode test reports for the same eyes from
    batches of four: MC-dropout masks do not depend on the batch an eye arrives in."""
    import shutil

    from octa3d.deploy.api import Predictor
    from octa3d.stages.test import run as test

    shutil.copytree(trained / "runs", tmp_path / "runs")
    base = ["--data-root", str(trained / "data"), "--runs-dir", str(tmp_path / "runs"), "--exp", "e",
            "--model", "cnn", "--input-size", "16", "--batch-size", "4", "--cam", "none", "--seed", "3"]
    test(parse_config(["--mode", "test", "--bootstrap", "0", flag, "3", "--overwrite", *base])[0])
    want = pd.read_csv(tmp_path / "runs" / "e" / "test" / "predictions.csv", dtype={"subject": str})
    model = Predictor.from_config(parse_config(["--mode", "predict", flag, "3", *base])[0])
    eyes = [trained / "data" / "OCTA_6mm" / "OCTA" / sid for sid in want["subject"]]
    got = model.predict(eyes)
    assert len(want) >= 3 and (want["p_sd"] > 0).all()
    assert np.allclose(got["p_sd"].to_numpy(float), want["p_sd"].to_numpy(float), atol=1e-5)
    key = flag.lstrip("-").replace("-", "_")
    api = octa3d.load(tmp_path / "runs" / "e", seed=3, **{key: 3}).predict(eyes)  # the notebook spelling
    assert np.allclose(api["p_sd"].to_numpy(float), want["p_sd"].to_numpy(float), atol=1e-5)
    # the probabilities themselves come from the deterministic pass: equal to the run without passes
    plain = octa3d.load(tmp_path / "runs" / "e").predict(eyes)
    assert np.allclose(api["p_CNV"].to_numpy(float), plain["p_CNV"].to_numpy(float), atol=1e-6)
    # without passes a single model has no spread: no column
    assert "p_sd" not in octa3d.load(tmp_path / "runs" / "e").predict(trained / "data" / "OCTA_6mm" / "OCTA" /
                                                                       want["subject"][0]).columns
