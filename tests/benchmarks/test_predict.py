"""Predict benchmark: the quick run gives well-formed figures (never timing thresholds); the stage's
streaming and resume behaviour are tested in tests/stages/test_predict.py."""

from __future__ import annotations

import json
import math

from benchmarks import predict


def test_quick_benchmark_result_is_well_formed(tmp_path, capsys):
    out = tmp_path / "predict.json"
    res = predict.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "predict" and res["quick"] is True
    for f in res["figures"]:
        assert f["name"] and f["unit"] and isinstance(f["value"], float) and math.isfinite(f["value"])
        assert f["value"] > 0
    targets = {f["name"] for f in res["figures"] if f["target"]}
    assert targets == {"bare forward vs predict throughput", "peak RSS, 40 vs 4 subjects"}
    assert res["cases"]["4"]["subjects"] == 4 and res["cases"]["40"]["subjects"] == 40
    assert "forward_s_per_subject" in res["cases"]["4"]
    assert "| predict | peak RSS, 40 vs 4 subjects |" in capsys.readouterr().out
