"""``--mode explain``: one NIfTI scan predicted and explained in its own geometry, and OCTA-500 subject folders as
input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from octa3d import checkpoint
from octa3d.checkpoint import CheckpointError
from octa3d.cli import parse_config


def _nifti_scan(path: Path) -> tuple[Path, np.ndarray]:
    """uint8 (12, 40, 14) volume with a retina band, a blob, and a non-trivial affine."""
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 20, (12, 40, 14), dtype=np.uint8)
    vol[:, 14:26] += 60
    vol[2:5, 17:21, 2:5] = 250  # the lesion, inside the retinal slab
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.3, 0.05, 0.2))
    img.SetOrigin((10.0, -5.0, 3.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return path, vol


def _assert_same_geometry(a: Path, b: Path) -> None:
    na, nb = nib.load(str(a)), nib.load(str(b))
    assert na.shape == nb.shape
    assert np.allclose(na.affine, nb.affine, atol=1e-5)
    sa, sb = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert sa.GetSize() == sb.GetSize()
    assert np.allclose(sa.GetSpacing(), sb.GetSpacing()) and np.allclose(sa.GetOrigin(), sb.GetOrigin())
    assert np.allclose(sa.GetDirection(), sb.GetDirection())


def _explain_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--mode", "explain", "--runs-dir", str(tmp_path / "runs"), "--exp", "e", "--model", "cnn",
            "--input-size", "16", "--cam-layer", "features.block3.act", *extra]


def test_explain_single_nifti(tmp_path, capsys):
    from octa3d.stages.explain import run
    from octa3d.model import create_model

    src, vol = _nifti_scan(tmp_path / "scanA.nii.gz")
    args = _explain_args(tmp_path, "--input", str(src))
    cfg, _ = parse_config(args)
    with pytest.raises(CheckpointError, match="no trained model"):
        run(cfg)
    checkpoint.save_checkpoint(cfg.run_dir / "train" / "checkpoints" / "best.pt", create_model("cnn", "3d", 1, 2),
                           checkpoint.model_record(cfg, ["NORMAL", "CNV"], "classifier"), epoch=1, config=cfg)
    res = run(cfg)
    out = tmp_path / "runs" / "e" / "explain" / "scanA"
    doc = json.loads((out / "prediction.json").read_text())
    assert doc["prediction"] in ("NORMAL", "CNV")
    assert sum(doc["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    _assert_same_geometry(out / "scanA_cam.nii.gz", src)
    assert (out / "scanA_review.png").is_file() and res["cam"]["backend"] == "layercam"  # the default method
    assert res["status"] in ("ok", "empty") and "peak" in res
    assert "predicted" in capsys.readouterr().out
    # --cam none: prediction only (a second run needs --overwrite)
    args2 = args + ["--cam", "none", "--overwrite"]
    cfg2, _ = parse_config(args2)
    run(cfg2)
    assert (out / "prediction.json").is_file() and not (out / "scanA_cam.nii.gz").exists()
