"""Vendor-read benchmark: the quick run gives well-formed figures (never timing thresholds: the quick volume is
tiny and the machine shared); the reader itself is tested in tests/data/test_vendor.py."""

from __future__ import annotations

import json
import math

from benchmarks import vendor_read


def test_quick_benchmark_result_is_well_formed(tmp_path, capsys):
    out = tmp_path / "vendor_read.json"
    res = vendor_read.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "vendor_read" and res["quick"] is True and res["setup"]["shape"] == [8, 32, 16]
    for f in res["figures"]:
        assert f["name"] and f["unit"] and isinstance(f["value"], float) and math.isfinite(f["value"])
        assert f["value"] > 0
    assert {f["name"] for f in res["figures"] if f["target"]} == {".vol vs NIfTI into the cache"}
    assert len(res["runs_s"]["into_cache"]["vol"]) == 2
    assert "| vendor_read | .vol vs NIfTI into the cache |" in capsys.readouterr().out
