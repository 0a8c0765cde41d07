"""``benchmarks/calibration.py --quick``: a well-formed result whose figures are the test stage's own numbers (the
values are judged in the benchmark run: a 1-epoch model on 16 eyes learns nothing)."""

from __future__ import annotations

import json

from benchmarks import calibration


def test_quick_calibration_result_is_well_formed(tmp_path):
    out = tmp_path / "calibration.json"
    res = calibration.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "calibration" and res["quick"] is True
    by_name = {f["name"]: f for f in res["figures"]}
    for task in ("multi", "binary"):
        run = res["runs"][task]
        metrics = json.loads((tmp_path / "work" / "runs" / f"{task}-s1" / "test" / "metrics.json").read_text(
            encoding="utf-8"))
        # the figures are read from the test stage's metrics.json, not recomputed
        assert by_name[f"{task}: hold-out ECE raw"]["value"] == metrics["calibration"]["raw"]["ece"]
        assert by_name[f"{task}: hold-out ECE temperature-scaled"]["value"] == metrics["calibration"]["calibrated"]["ece"]
        assert run["n_test"] == metrics["n_subjects"] >= 4
    tta = by_name["binary: test wall time --tta 2 vs none"]
    assert tta["unit"] == "x" and tta["value"] > 0
    # the TTA passes measure spread only: the reported probabilities (hence AUC) are those of the plain pass
    assert res["runs"]["binary"]["tta_probabilities_unchanged"] is True
