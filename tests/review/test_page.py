"""The review page's HTML and volume files, without a browser: escaping, one row per subject, runs without maps,
and the size of the viewer volumes."""

from __future__ import annotations

import base64
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from octa3d.review import write_explain_review, write_test_review
from octa3d.review.volumes import MAX_VOXELS, js_literal, subject_volumes

EVIL = '<img src=x onerror=alert(1)>&"</script>'


def _nifti(path: Path, arr: np.ndarray, spacing=(0.05, 0.01, 0.05)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def _test_folder(tmp_path: Path, ids: list[str], cams: bool = True, shape=(8, 12, 10)) -> Path:
    """A test stage folder as the stage writes it: metrics.json, predictions.csv, cams/ (with names.csv)."""
    folder = tmp_path / "test"
    (folder / "cams").mkdir(parents=True)
    labels = ["NORMAL", "CNV"] * len(ids)
    p = np.linspace(0.1, 0.9, len(ids))
    frame = pd.DataFrame({"subject": ids, "label": labels[:len(ids)], "p_NORMAL": 1 - p, "p_CNV": p,
                          "prediction": ["CNV" if v > 0.5 else "NORMAL" for v in p]})
    frame["correct"] = frame["label"] == frame["prediction"]
    metrics = {"class_names": ["NORMAL", "CNV"], "model": "cnn", "auc": 0.75, "accuracy": 0.5,
               "ci95": {"auc": [0.5, 1.0]}}
    if cams:
        frame["cam_status"] = "ok"
        stems = [f"s{i}" for i in range(len(ids))]
        pd.DataFrame({"subject": ids, "file_stem": stems}).to_csv(folder / "cams" / "names.csv", index=False)
        rng = np.random.default_rng(0)
        for stem in stems:
            _nifti(folder / "cams" / f"{stem}_input_OCTA.nii.gz", rng.integers(0, 255, shape).astype(np.uint8))
            cam = np.zeros(shape, np.float32)
            cam[2, 3, 4] = 1.0
            _nifti(folder / "cams" / f"{stem}_cam.nii.gz", cam)
        metrics["cam"] = {"backend": "gradcam", "layer": "features", "target": "predicted class",
                          "n_subjects": len(ids), "status_counts": {"ok": len(ids)}}
    frame.to_csv(folder / "predictions.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return folder


def _data(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    m = re.search(r"<script>window\.OCTA3D = (.*?);</script>", text, re.S)
    return json.loads(m.group(1))


def test_ids_with_html_are_escaped_and_each_subject_has_one_row(tmp_path):
    ids = [EVIL, "10001", "a'b"]
    page = write_test_review(_test_folder(tmp_path, ids), {"experiment": "<b>x</b>", "data": "d&d"})
    text = page.read_text(encoding="utf-8")
    assert "<img src=x" not in text and "<b>x</b>" not in text
    assert html_escaped(EVIL) in text and "&lt;b&gt;x&lt;/b&gt;" in text
    # the ID in the script data: no "</" that would end the script element
    script = re.search(r"<script>window\.OCTA3D = (.*?);</script>", text, re.S).group(1)
    assert "</" not in script and "<" not in script
    assert {s["id"] for s in _data(page)["subjects"]} == set(ids)
    body = text.split("<tbody id='rows'>")[1].split("</tbody>")[0]
    assert body.count("<tr ") == len(ids)
    # errors first: the first rows are the incorrect ones
    correct = re.findall(r"data-correct='(\d)'", body)
    assert correct == sorted(correct)
    # the subjects' volumes are separate files, loaded when opened, and the links are relative
    subjects = _data(page)["subjects"]
    assert all(s["volumes"].startswith("subjects/") and (page.parent / s["volumes"]).is_file() for s in subjects)
    assert all(f["href"].startswith("../cams/") for s in subjects for f in s["files"])
    vol_js = (page.parent / subjects[0]["volumes"]).read_text(encoding="utf-8")
    assert "</" not in vol_js and "<img" not in vol_js
    for asset in ("niivue.umd.js", "review.js", "review.css"):
        assert (page.parent / asset).stat().st_size > 1000


def html_escaped(s: str) -> str:
    import html

    return html.escape(s)


def test_a_run_without_maps_gets_a_page_that_says_why(tmp_path):
    page = write_test_review(_test_folder(tmp_path, ["1", "2"], cams=False), {"experiment": "e"})
    assert page is not None and page.is_file()
    subjects = _data(page)["subjects"]
    assert len(subjects) == 2 and all(s["volumes"] is None for s in subjects)
    assert all("--cam none" in s["reason"] for s in subjects)
    assert "No evidence maps in this run" in page.read_text(encoding="utf-8")
    assert not (page.parent / "subjects").exists()


def test_a_folder_without_metrics_is_a_warning_not_an_error(tmp_path, caplog):
    (tmp_path / "test").mkdir()
    assert write_test_review(tmp_path / "test", {}) is None
    assert "review page of" in caplog.text


def test_viewer_volumes_are_small_uint8_with_the_geometry_kept(tmp_path):
    shape = (20, 400, 170)  # z, y, x: y and x exceed the viewer size
    scan = _nifti(tmp_path / "x_input.nii.gz", np.random.default_rng(1).normal(size=shape).astype(np.float32),
                  spacing=(0.01, 0.02, 0.1))
    cam = np.zeros(shape, np.float32)
    cam[10, 300, 150] = 1.0
    v = subject_volumes(scan, _nifti(tmp_path / "x_cam.nii.gz", cam, spacing=(0.01, 0.02, 0.1)), tmp_path)
    assert v["source_shape"] == [170, 400, 20]
    assert max(v["shape"]) <= MAX_VOXELS and v["shape"] == [85, 134, 20]
    assert v["peak"] == [75, 100, 10]  # x 150/2, y 300/3, z 10
    raw = tmp_path / "small.nii"
    raw.write_bytes(gzip.decompress(base64.b64decode(v["scan"])))
    small = sitk.ReadImage(str(raw))
    assert small.GetPixelID() == sitk.sitkUInt8
    assert small.GetSpacing() == pytest.approx((0.02, 0.06, 0.1))
    assert list(tmp_path.glob("tmp*")) == []  # the temporary NIfTI is gone
    # 100 subjects at 128^3 (the estimate in the README): scan + map files
    big = _nifti(tmp_path / "b_input.nii.gz", np.random.default_rng(2).integers(0, 255, (128,) * 3).astype(np.uint8))
    size = len(js_literal(subject_volumes(big, None, tmp_path)))
    assert size < 4e6  # random noise, the worst case for gzip: 128^3 bytes * 4/3 base64


def test_explain_page_of_one_scan(tmp_path):
    folder = tmp_path / "explain" / "x"
    folder.mkdir(parents=True)
    _nifti(folder / "a_input.nii.gz", np.ones((4, 5, 6), np.uint8))
    _nifti(folder / "a_cam.nii.gz", np.full((4, 5, 6), 0.5, np.float32))
    result = {"subject": EVIL, "prediction": "CNV", "probabilities": {"NORMAL": 0.2, "CNV": 0.8}, "model": "cnn",
              "status": "ok", "file_stem": "a", "cam": {"backend": "gradcam", "layer": "l", "n_subjects": 1}}
    page = write_explain_review(folder, {"experiment": "e", "stage": "explain"}, result)
    (s,) = _data(page)["subjects"]
    assert s["id"] == EVIL and s["has_map"] and s["sheet"] is None
    assert [f["href"] for f in s["files"]] == ["../a_input.nii.gz", "../a_cam.nii.gz"]
    assert "<img src=x" not in page.read_text(encoding="utf-8")


def test_predict_review_page_without_labels_and_with_skipped_maps(tmp_path):
    """Issue 16: a predict run's page (no metrics; labels, correctness and maps only where known)."""
    from octa3d.review import write_predict_review

    folder = _test_folder(tmp_path, ["a", EVIL, "c"])
    pred = pd.read_csv(folder / "predictions.csv", dtype=str, keep_default_na=False)
    pred.loc[0, ["label", "correct"]] = ["", ""]
    pred["entropy"] = "0.5"
    pred.loc[2, "cam_status"] = "not computed"
    pred["training_overlap"] = ["", "", "subject c is in the train split"]
    pred.to_csv(folder / "predictions.csv", index=False)
    summary = {"class_names": ["NORMAL", "CNV"], "model": "cnn",
               "cam": {"backend": "layercam", "layer": "default", "target": "predicted class", "n_subjects": 2,
                       "status_counts": {"ok": 2, "not computed": 1}}}
    page = write_predict_review(folder, {"experiment": "e", "stage": "predict", "data": "new/"}, summary)
    text = page.read_text(encoding="utf-8")
    assert EVIL not in text and "95 % CI" not in text  # no metrics table for unlabelled new scans
    # a scan that trained the model is marked in the table (its prediction is optimistic)
    assert "<th title='sort'>in training</th>" in text and text.count(">YES</td>") == 1
    subjects = {s["id"]: s for s in _data(page)["subjects"]}
    assert subjects["a"]["label"] is None and subjects["a"]["volumes"]
    assert subjects["c"]["volumes"] is None and "not in --cam-subjects" in subjects["c"]["reason"]
    assert (folder / "review" / "subjects" / "s0.js").is_file()
    (folder / "predictions.csv").unlink()
    assert write_predict_review(folder, {}, summary) is None  # logged, never raised
