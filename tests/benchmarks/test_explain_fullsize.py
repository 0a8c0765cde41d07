"""``benchmarks/explain_fullsize.py --quick``: a well-formed result in the benchmarks' format (figures are not
judged: timings and memory on shared machines are no test)."""

from __future__ import annotations

import json
import math

from benchmarks import explain_fullsize


def test_quick_explain_fullsize_result_is_well_formed(tmp_path, capsys):
    out = tmp_path / "explain.json"
    res = explain_fullsize.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "explain_fullsize" and res["quick"] is True
    for f in res["figures"]:
        assert f["name"] and isinstance(f["unit"], str) and isinstance(f["value"], float), f
        assert math.isfinite(f["value"]), f
    by_name = {f["name"]: f for f in res["figures"]}
    rss = by_name["explain 40x64x40 OCT+OCTA: peak RSS"]
    assert rss["unit"] == "MB" and rss["value"] > 0 and rss["target"] == "<= 3000"
    assert rss["met"] is (rss["value"] <= 3000)  # the verdict follows from the value and the target
    assert by_name["explain 40x64x40 OCT+OCTA: wall time"]["value"] > 0
    assert "explain 40x64x40: peak RSS above the imports" in by_name
    assert "explain 40x64x40: CAM computation" in by_name
    setup = res["setup"]
    assert setup["shape"] == [40, 64, 40] and setup["modality"] == "OCT+OCTA" and setup["model"] == "cnn"
    # the stage really ran on the generated eye: CAM, one input scan per modality (no unnamed duplicate) and the
    # review sheet
    assert sorted(setup["files"]) == ["20001_cam.nii.gz", "20001_input_OCT.nii.gz", "20001_input_OCTA.nii.gz",
                                      "20001_review.png"]
    assert "| explain_fullsize | explain 40x64x40 OCT+OCTA: peak RSS" in capsys.readouterr().out
