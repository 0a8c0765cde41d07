"""``benchmarks/study.py --quick``: both executors run the same 2-arm x 3-fold study and the result is well formed
(the ratio is judged in the benchmark run, not here: a shared machine's timings are noise at these sizes)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import study

pytest.importorskip("ray")


@pytest.mark.slow  # two studies in fresh interpreters, ~80 s on 2 cores; tests/stages/test_study.py is the fast one
def test_quick_study_benchmark_result_is_well_formed(tmp_path):
    out = tmp_path / "study.json"
    res = study.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "study" and res["quick"] is True
    ratio = res["figures"][0]
    assert ratio["target"] == "<= 1.15" and math.isfinite(ratio["value"]) and ratio["value"] > 0
    for executor in ("ray", "sequential"):
        run = res["runs"][executor]
        assert not run["failed"] and len(run["cell_s"]) == 6  # 2 arms x 3 folds, every cell finished
        assert set(run["holdout_balanced_accuracy"]) == {"3d-cnn", "2d-cnn"}
