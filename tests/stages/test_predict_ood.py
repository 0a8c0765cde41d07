"""The out-of-distribution flag end to end, on a model the train stage fitted (so its checkpoint holds the
reference): ``--mode predict`` through the CLI flags a strongly shifted scan (other shape, intensities halved) with
its reason and marks it uncertain while the in-distribution eyes mostly pass; the review page shades it; the
external test, the Python API (files and arrays) and a fold ensemble carry the same columns."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import octa3d
from octa3d.cli import parse_config

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _base(root: Path) -> list[str]:
    return ["--runs-dir", str(root / "runs"), "--exp", "e"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """30 synthetic eyes (NORMAL/CNV, 16x32x16), a cnn trained for 3 epochs by the train stage, and a cohort of
    6 fresh in-distribution eyes plus one shifted scan (40x48x40, intensities halved) as NIfTI files."""
    from octa3d.data.synthetic import generate
    from octa3d.stages.prepare import run as prepare
    from octa3d.stages.train import run as train

    root = tmp_path_factory.mktemp("ood")
    generate(root / "data", 30, (16, 32, 16), seed=0, classes=("NORMAL", "CNV"))
    args = [*_base(root), "--data-root", str(root / "data"), "--model", "cnn", "--input-size", "16",
            "--batch-size", "4", "--num-workers", "0", "--log-level", "WARNING"]
    prepare(parse_config(["--mode", "prepare", *args])[0])
    train(parse_config(["--mode", "train", *args, "--epochs", "3", "--init", "random", "--lr", "3e-3"])[0])
    generate(root / "fresh", 6, (16, 32, 16), seed=9, classes=("NORMAL", "CNV"), layout="nifti")
    generate(root / "big", 1, (40, 48, 40), seed=5, classes=("CNV",), layout="nifti")
    cohort = root / "cohort"
    cohort.mkdir()
    rows = []
    for rec in pd.read_csv(root / "fresh" / "manifest.csv", dtype=str).itertuples():
        dst = cohort / f"eye-{rec.subject}.nii.gz"
        shutil.copy(root / "fresh" / rec.path, dst)
        rows.append({"subject": dst.name[:-7], "label": rec.label, "path": str(dst)})
    img = sitk.ReadImage(str(root / "big" / "volumes" / "10001_octa.nii.gz"))
    half = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) // 2).astype(np.uint8))
    half.CopyInformation(img)
    sitk.WriteImage(half, str(cohort / "shifted.nii.gz"))
    rows.append({"subject": "shifted", "label": "CNV", "path": str(cohort / "shifted.nii.gz")})
    pd.DataFrame(rows).to_csv(root / "external.csv", index=False)
    return root


def test_the_train_stage_stores_the_reference(trained):
    from octa3d.checkpoint.io import load_checkpoint

    ref = load_checkpoint(trained / "runs" / "e" / "train" / "checkpoints" / "best.pt")["ood_reference"]
    assert ref["version"] == 1 and ref["features"]["method"] == "mahalanobis" and ref["features"]["dim"] == 128
    assert ref["geometry"]["shape"] == {"min": [16.0, 32.0, 16.0], "max": [16.0, 32.0, 16.0]}
    assert len(ref["training"]["features"]) == ref["n_train"] >= 10 and len(ref["validation"]["features"]) == ref["n_val"]
    assert ref["intensity"]["names"] == ["OCTA p0.5", "OCTA p99.5"]


def _screenshot(page: Path, png: Path) -> None:
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--enable-unsafe-swiftshader",
                    "--use-angle=swiftshader", "--virtual-time-budget=4000", "--window-size=1400,700",
                    "--hide-scrollbars", f"--screenshot={png}", page.resolve().as_uri()],
                   capture_output=True, timeout=120, check=False)


def test_predict_flags_the_shifted_scan_with_its_reason_and_the_page_shades_it(trained, run_cli, tmp_path):
    res = run_cli(["--mode", "predict", *_base(trained), "--input", trained / "cohort", "--cam", "none"])
    assert res.rc == 0, res.err
    folder = next((trained / "runs" / "e" / "predict").glob("cohort_no-cam_*"))
    pred = pd.read_csv(folder / "predictions.csv", dtype={"subject": str, "ood_reason": str},
                       keep_default_na=False).set_index("subject")
    assert {"ood_score", "ood", "ood_reason", "uncertain"} <= set(pred.columns)
    shifted = pred.loc["shifted"]
    assert str(shifted["ood"]) == "True"
    assert str(shifted["uncertain"]) == "True" and float(shifted["ood_score"]) > 1
    assert shifted["ood_reason"].startswith("geometry (shape 40x48x40") and "intensity (OCTA p" in shifted["ood_reason"]
    eyes = pred.drop(index="shifted")
    assert (eyes["ood"].astype(str) == "True").sum() <= 1  # in distribution: mostly not flagged
    assert (eyes.loc[eyes["ood"].astype(str) == "False", "ood_reason"] == "").all()
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))["ood"]
    assert summary["available"] and summary["n_checked"] == 7 and summary["by_reason"]["geometry"] == 1
    assert f"out of distribution: {summary['n_flagged']} of 7 (geometry 1, intensity 1" in res.out
    # the review page: the flagged row shaded, its reason shown, the summary paragraph says what to do
    html = (folder / "review" / "index.html").read_text(encoding="utf-8")
    row = next(line for line in html.splitlines() if "data-v=\"shifted\"" in line)
    assert "class='ood'" in row and "data-ood='1'" in row and ">YES: geometry, intensity</td>" in row
    assert "title='out of distribution: geometry (shape 40x48x40" in row
    assert "<th title='sort'>out of distribution</th>" in html and "Out of distribution (unlike the training" in html
    if CHROMIUM:  # the page as a user sees it (pitfalls.md: headless Chromium with SwiftShader)
        png = tmp_path / "ood_review.png"
        _screenshot(folder / "review" / "index.html", png)
        assert png.is_file() and png.stat().st_size > 10_000


def test_external_test_and_the_api_carry_the_columns(trained, run_cli):
    res = run_cli(["--mode", "test", *_base(trained), "--external", trained / "external.csv", "--cam", "none",
                   "--bootstrap", "0"])
    assert res.rc == 0, res.err
    folder = next((trained / "runs" / "e" / "test-external").iterdir())
    pred = pd.read_csv(folder / "predictions.csv", dtype={"subject": str}, keep_default_na=False).set_index("subject")
    assert str(pred.loc["shifted", "ood"]) == "True" and str(pred.loc["shifted", "uncertain"]) == "True"
    assert pred.loc["shifted", "ood_reason"].startswith("geometry")
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["ood"]["available"] and metrics["ood"]["n_flagged"] >= 1
    assert "out of distribution:" in res.out
    # the API: the same columns for files, and for arrays (no spacing: only the shape is compared)
    model = octa3d.load(trained / "runs" / "e", device="cpu", cam="none")
    table = model.predict([trained / "cohort" / "shifted.nii.gz"])
    assert bool(table.loc[0, "ood"]) and table.loc[0, "ood_reason"].startswith("geometry")
    eye = sitk.GetArrayFromImage(sitk.ReadImage(str(next((trained / "cohort").glob("eye-*.nii.gz")))))
    arr = model.predict(eye)
    assert "geometry" not in arr.loc[0, "ood_reason"] and isinstance(arr.loc[0, "ood_score"], float)


def test_a_fold_ensemble_votes_by_majority(trained, tmp_path):
    run = tmp_path / "runs" / "e"
    shutil.copytree(trained / "runs" / "e" / "train", run / "train")
    best = run / "train" / "checkpoints" / "best.pt"
    for k in (0, 1, 2):
        (run / "train" / f"fold-{k}" / "checkpoints").mkdir(parents=True)
        shutil.copy(best, run / "train" / f"fold-{k}" / "checkpoints" / "best.pt")
    best.unlink()
    model = octa3d.load(run, device="cpu", cam="none")
    assert len(model.ood) == 3
    table = model.predict([trained / "cohort" / "shifted.nii.gz"])
    assert bool(table.loc[0, "ood"]) and "[3/3 folds]" in table.loc[0, "ood_reason"]


def test_explain_reports_the_check_for_its_one_scan(trained, run_cli):
    res = run_cli(["--mode", "explain", *_base(trained), "--input", trained / "cohort" / "shifted.nii.gz",
                   "--cam", "none"])
    assert res.rc == 0, res.err
    (doc,) = [json.loads(p.read_text(encoding="utf-8"))
              for p in (trained / "runs" / "e" / "explain").glob("*/prediction.json")]
    assert doc["ood"] is True and doc["uncertain"] is True and doc["ood_reason"].startswith("geometry")
    assert "out of distribution (unlike the training scans" in res.out
