"""``--mode predict --input PATH``: every input kind, calibrated probabilities, the leakage warning
per subject for every source type, an unreadable scan in the middle, resume after kill -9, the fold ensemble."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from octa3d.checkpoint.io import load_checkpoint, model_record, save_checkpoint
from octa3d.cli import parse_config
from octa3d.evaluation.calibration import apply_temperature
from octa3d.utils.io import atomic_torch_save

LAYER = "features.block3.act"


def _save_model(cfg, classes, path: Path, temperature: float | None = 2.0, dim: str = "3d") -> None:
    from octa3d.model import create_model

    rec = model_record(cfg, classes, "classifier")
    if temperature is not None:
        rec.update(temperature=temperature, entropy_threshold=0.6, entropy_threshold_raw=0.6)
    save_checkpoint(path, create_model("cnn", dim, 1, len(classes)), rec, epoch=1, config=cfg)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """8 synthetic OCTA-500 eyes (NORMAL/CNV, 16x32x16), splits, an untrained cnn with temperature 2 as best.pt."""
    from octa3d.data.synthetic import generate
    from octa3d.stages.prepare import run as prepare

    root = tmp_path_factory.mktemp("pred")
    generate(root / "data", 8, (16, 32, 16), seed=0, classes=("NORMAL", "CNV"))
    cfg, _ = parse_config(["--mode", "prepare", "--data-root", str(root / "data"), "--runs-dir", str(root / "runs"),
                           "--exp", "e", "--model", "cnn", "--input-size", "16"])
    sp = prepare(cfg)
    _save_model(cfg, sp.class_names, cfg.run_dir / "train" / "checkpoints" / "best.pt")
    return root




def _args(root: Path, inp: Path | str, *extra: str) -> list[str]:
    return ["--mode", "predict", "--runs-dir", str(root / "runs"), "--exp", "e", "--input", str(inp), *extra]


def _run(root: Path, inp: Path | str, *extra: str) -> dict:
    from octa3d.stages.predict import run

    return run(parse_config(_args(root, inp, *extra))[0])


def test_octa500_folder_calibrated_labelled_warned_and_reported_complete(private_copy, experiment, tmp_path, capsys, capture_log):
    root = private_copy(experiment)
    logs = capture_log("octa3d.predict")
    s = _run(root, root / "data", "--cam", "none")
    out = Path(s["folder"])
    assert out.parent == root / "runs" / "e" / "predict" and out.name.startswith("data_no-cam_")
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject": str, "label": str}, keep_default_na=False)
    assert len(pred) == 8 and set(pred["label"]) == {"NORMAL", "CNV"} and set(pred["cam_status"]) == {"none"}
    raw = pred[["p_raw_NORMAL", "p_raw_CNV"]].to_numpy()
    assert np.allclose(pred[["p_NORMAL", "p_CNV"]].to_numpy(), apply_temperature(raw, 2.0), atol=2e-6)
    assert set(pred.columns) >= {"prediction", "entropy", "uncertain", "correct", "training_overlap"}
    assert (pred["correct"] == (pred["label"] == pred["prediction"])).all()
    # per-subject warning for every training/validation eye (OCTA-500 source), none for the hold-out eyes
    splits = root / "runs" / "e" / "splits"
    seen = set(pd.read_csv(splits / "train.csv", dtype=str)["subject"]) | set(
        pd.read_csv(splits / "val.csv", dtype=str)["subject"])
    assert set(pred.loc[pred["training_overlap"] != "", "subject"]) == seen
    warned = [r.getMessage() for r in logs if r.levelname == "WARNING" and "optimistic" in r.getMessage()]
    assert len(warned) == len(seen) and s["n_seen_in_training"] == len(seen)
    assert s["calibrated"] and s["n_skipped"] == 0 and (out / ".complete").is_file()
    assert (out / "review" / "index.html").is_file()
    assert "Predicted 8 of 8" in capsys.readouterr().out
    # the same command again: already complete, nothing recomputed; --overwrite starts over
    again = _run(root, root / "data", "--cam", "none")
    assert "Already complete" in capsys.readouterr().out and again["n_new"] == 8
    assert _run(root, root / "data", "--cam", "none", "--overwrite")["n_new"] == 8
    # --no-calibrate: raw probabilities reported, in a folder of its own
    s2 = _run(root, root / "data", "--cam", "none", "--no-calibrate")
    pred2 = pd.read_csv(Path(s2["folder"]) / "predictions.csv", dtype={"subject": str})
    assert s2["folder"] != s["folder"] and np.allclose(pred2[["p_NORMAL", "p_CNV"]].to_numpy(), raw, atol=2e-6)


def test_one_scan_manifest_and_an_unreadable_scan_in_the_middle(private_copy, experiment, tmp_path, nifti_scan, capture_log):
    root = private_copy(experiment)
    logs = capture_log("octa3d.predict")
    scan, _ = nifti_scan(tmp_path / "scanA.nii.gz")
    s = _run(root, scan, "--cam-layer", LAYER)
    out = Path(s["folder"])
    assert s["kind"] == "scan" and s["n_predicted"] == 1 and out.name.startswith("scanA_layercam_")
    assert (out / "cams" / "scanA_cam.nii.gz").is_file() and (out / "subjects" / "scanA.json").is_file()
    # a manifest naming two training eyes by ID (with labels): both warned about
    eyes = root / "data" / "OCTA_6mm" / "OCTA"
    train = pd.read_csv(root / "runs" / "e" / "splits" / "train.csv", dtype=str)
    rows = [f"{sid},{eyes / sid},{lab}" for sid, lab in zip(train["subject"][:2], train["label"][:2])]
    (tmp_path / "cohort.csv").write_text("subject,path,label\n" + "\n".join(rows) + "\n")
    s = _run(root, tmp_path / "cohort.csv", "--cam", "none")
    pred = pd.read_csv(Path(s["folder"]) / "predictions.csv", dtype={"subject": str})
    assert s["kind"] == "manifest" and list(pred["label"]) == list(train["label"][:2])
    assert (pred["training_overlap"].str.contains("training/validation subject")).all()
    # a folder of scans whose middle one is damaged: listed with its reason, the others predicted
    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("a", "c"):
        shutil.copy(scan, folder / f"{name}.nii.gz")
    (folder / "b.nii.gz").write_bytes(b"\x1f\x8b not a nifti at all")
    s = _run(root, folder, "--cam-layer", LAYER)
    out = Path(s["folder"])
    skipped = pd.read_csv(out / "skipped.csv", dtype=str)
    assert list(skipped["subject"]) == ["b"] and "b.nii.gz" in skipped["reason"][0]
    assert s["n_skipped"] == 1 and s["n_predicted"] == 2 and s["kind"] == "files"
    assert list(pd.read_csv(out / "predictions.csv", dtype={"subject": str})["subject"]) == ["a", "c"]
    assert any("subject b skipped" in r.getMessage() for r in logs)


KILLER = """
import os, signal, sys
from octa3d.cli import parse_config
from octa3d.stages import predict
orig, calls = predict._predict_one, []
def killing(predictor, s, exporter, *rest):
    calls.append(s.id)
    if len(calls) == 3:  # kill -9 while the 3rd subject's map files are being written
        real = exporter.export_one
        def export_then_die(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        exporter.export_one = export_then_die
    return orig(predictor, s, exporter, *rest)
predict._predict_one = killing
predict.run(parse_config(sys.argv[1:])[0])
"""


def test_resume_after_kill_9_mid_subject(private_copy, experiment, tmp_path, monkeypatch):
    from octa3d.stages import predict

    root = private_copy(experiment)
    eyes = sorted((root / "data" / "OCTA_6mm" / "OCTA").iterdir())[:5]
    (tmp_path / "five.csv").write_text("subject,path\n" + "".join(f"{e.name},{e}\n" for e in eyes))
    args = _args(root, tmp_path / "five.csv", "--cam", "gradcam", "--cam-layer", LAYER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (out,) = (root / "runs" / "e" / "predict").iterdir()
    done = sorted(f.name for f in (out / "subjects").iterdir())
    assert len(done) == 2 and not (out / ".complete").exists() and not (out / "predictions.csv").exists()
    assert len(list((out / "cams").glob("*_cam.nii.gz"))) == 3  # the 3rd subject's files, but not its record
    first = {f: (out / "subjects" / f).stat().st_mtime_ns for f in done}
    calls: list[str] = []
    real = predict._predict_one
    monkeypatch.setattr(predict, "_predict_one", lambda p, s, *a: calls.append(s.id) or real(p, s, *a))
    s = predict.run(parse_config(args)[0])
    assert len(calls) == 3 and s["n_new"] == 3 and s["n_predicted"] == 5 and (out / ".complete").is_file()
    assert {f: (out / "subjects" / f).stat().st_mtime_ns for f in done} == first  # never redone
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject": str})
    assert list(pred["subject"]) == [e.name for e in eyes] and set(pred["cam_status"]) <= {"ok", "empty", "constant"}
    names = pd.read_csv(out / "cams" / "names.csv", dtype=str)
    assert len(names) == 5 and all((out / "cams" / f"{n}_cam.nii.gz").is_file() for n in names["file_stem"])


def test_fold_ensemble_averages_calibrated_members(private_copy, experiment, tmp_path):
    root = private_copy(experiment)
    train = root / "runs" / "e" / "train"
    best = train / "checkpoints" / "best.pt"
    raw = pd.read_csv(Path(_run(root, root / "data", "--cam", "none")["folder"]) / "predictions.csv",
                      dtype={"subject": str})[["p_raw_NORMAL", "p_raw_CNV"]].to_numpy()
    for k, t in ((0, 1.5), (1, 4.0)):
        (train / f"fold-{k}" / "checkpoints").mkdir(parents=True)
        ck = load_checkpoint(best)
        ck["temperature"] = t
        atomic_torch_save(ck, train / f"fold-{k}" / "checkpoints" / "best.pt")
    shutil.rmtree(train / "checkpoints")
    s = _run(root, root / "data", "--cam", "none")
    assert list(s["checkpoints"]) == ["fold-0", "fold-1"] and s["temperature"] == {"fold-0": 1.5, "fold-1": 4.0}
    pred = pd.read_csv(Path(s["folder"]) / "predictions.csv", dtype={"subject": str})
    want = (apply_temperature(raw, 1.5) + apply_temperature(raw, 4.0)) / 2
    assert np.allclose(pred[["p_NORMAL", "p_CNV"]].to_numpy(), want, atol=2e-6)


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray((np.arange(48).reshape(6, 8) * value % 255).astype(np.uint8)), str(path))
    return path


def test_2d_class_folders_and_single_images_warn_about_training_images(tmp_path, capture_log):
    """2D folder IDs (``CNV/CNV-21-1`` in the split, ``train/CNV/CNV-21-1`` or ``CNV-21-1`` in the input) are one
    image: warned about per subject; an image of a new patient is not."""
    from octa3d.stages.predict import run
    from octa3d.stages.prepare import run as prepare

    for cls, pids in (("NORMAL", (11, 12, 13, 14)), ("CNV", (21, 22, 23, 24))):
        for p in pids:
            _png(tmp_path / "data" / cls / f"{cls}-{p}-1.png", p)
    base = ["--runs-dir", str(tmp_path / "runs"), "--exp", "e"]
    cfg, _ = parse_config(["--mode", "prepare", "--data-root", str(tmp_path / "data"), "--dim", "2d", "--model",
                           "cnn", "--input-size", "16", *base])
    sp = prepare(cfg)
    _save_model(cfg, sp.class_names, cfg.run_dir / "train" / "checkpoints" / "best.pt", dim="2d")
    trained = next(s for s in sp.train if s.startswith("CNV/"))
    new = tmp_path / "new"
    (new / "train" / "CNV").mkdir(parents=True)
    shutil.copy(tmp_path / "data" / f"{trained}.png", new / "train" / f"{trained}.png")  # a training image again
    _png(new / "train" / "CNV" / "CNV-99-1.png", 3)
    logs = capture_log("octa3d.predict")
    s = run(parse_config(["--mode", "predict", "--input", str(new), "--cam", "none", *base])[0])
    pred = pd.read_csv(Path(s["folder"]) / "predictions.csv", dtype={"subject": str}, keep_default_na=False)
    flagged = dict(zip(pred["subject"], pred["training_overlap"]))
    assert s["kind"] == "folders" and flagged[f"train/{trained}"] and not flagged["train/CNV/CNV-99-1"]
    assert set(pred["label"]) == {"CNV"}
    single = run(parse_config(["--mode", "predict", "--input", str(tmp_path / "data" / f"{trained}.png"), "--cam",
                               "none", *base])[0])
    assert single["kind"] == "scan" and single["n_seen_in_training"] == 1
    assert sum("optimistic" in r.getMessage() for r in logs) == 2


def test_an_octa500_eye_with_a_gap_in_its_slices_is_skipped_and_the_others_predicted(private_copy, experiment, tmp_path):
    root = private_copy(experiment)
    data = tmp_path / "cohort"
    shutil.copytree(experiment / "data", data)
    eye = sorted((data / "OCTA_6mm" / "OCTA").iterdir())[2]
    (eye / "3.bmp").unlink()  # slice 3 of 16 missing: not one volume
    s = _run(root, data, "--cam", "none")
    skipped = pd.read_csv(Path(s["folder"]) / "skipped.csv", dtype=str)
    assert list(skipped["subject"]) == [eye.name] and "OCTA" in skipped["reason"][0]
    assert s["n_skipped"] == 1 and s["n_predicted"] == 7
