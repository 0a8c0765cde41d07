"""``benchmarks/gradcam.py --quick``: a well-formed result in the benchmarks' format (figures are not judged:
timings on shared machines are no test)."""

from __future__ import annotations

import json
import math

from benchmarks import gradcam


def test_quick_gradcam_result_is_well_formed(tmp_path, capsys):
    out = tmp_path / "gradcam.json"
    res = gradcam.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "gradcam" and res["quick"] is True
    for f in res["figures"]:
        assert f["name"] and isinstance(f["unit"], str) and isinstance(f["value"], float), f
        assert math.isfinite(f["value"]), f
    by_name = {f["name"]: f for f in res["figures"]}
    ratio = by_name["cnn 16^3: default (gradcam) vs medcam, s/volume incl. export"]
    assert ratio["target"] == "<= 0.5" and ratio["unit"] == "x"
    assert ratio["met"] is (ratio["value"] <= 0.5)  # the verdict follows from the value and the target
    for part in ("default (gradcam) s/volume incl. export", "medcam s/volume incl. export",
                 "default (gradcam) CAM computation s/volume", "medcam CAM computation s/volume",
                 "export without the CAM s/volume", "default CAM batched vs 1 subject per pass",
                 "map max abs difference, gradcam vs medcam"):
        assert f"cnn 16^3: {part}" in by_name, part
    assert 0 <= by_name["cnn 16^3: map max abs difference, gradcam vs medcam"]["value"] <= 1
    (case,) = res["setup"]["cases"]
    assert case["subjects"] == 3 and set(case["runs_s_per_volume"]) == {"gradcam", "medcam", "gradcam-b1"}
    # every backend really exported every subject through the real exporter
    for backend in ("gradcam", "medcam", "gradcam-b1"):
        folder = tmp_path / "work" / "out" / "cnn16" / backend
        assert len(list(folder.glob("*_cam.nii.gz"))) == 3 and len(list(folder.glob("*_review.png"))) == 3
    assert "| gradcam | cnn 16^3: default (gradcam) vs medcam" in capsys.readouterr().out
