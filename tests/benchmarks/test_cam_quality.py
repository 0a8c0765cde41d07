"""``benchmarks/cam_quality.py --quick``: a well-formed result (the scores themselves are judged in the benchmark
run, not here: a 2-epoch model on 16 eyes localises nothing)."""

from __future__ import annotations

import json
import math

from benchmarks import cam_quality


def test_quick_cam_quality_result_is_well_formed(tmp_path):
    out = tmp_path / "cam.json"
    res = cam_quality.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "cam_quality" and res["quick"] is True
    by_name = {f["name"]: f for f in res["figures"]}
    pg = by_name["cnn 16^3: default map (layercam) pointing game"]
    assert pg["target"] == ">= 0.8" and pg["met"] is (pg["value"] >= 0.8) and 0 <= pg["value"] <= 1
    t = by_name["cnn 16^3: default map time vs old Grad-CAM (registered layer), map + export"]
    assert math.isfinite(t["value"]) and t["value"] > 0
    (case,) = res["setup"]["cases"]
    sets = {r["set"] for r in case["rows"]}
    assert {"default", "registered"} <= sets and {r["method"] for r in case["rows"]} == {"gradcam", "layercam"}
    assert "| cnn 16^3 | layercam |" in res["table"]
