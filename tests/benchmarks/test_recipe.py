"""``benchmarks/recipe.py --quick``: a well-formed result with per-class recall for both tasks (the figures are
judged in the benchmark run: a 1-epoch model on 16 eyes learns nothing)."""

from __future__ import annotations

import json

from benchmarks import recipe


def test_quick_recipe_result_is_well_formed(tmp_path):
    out = tmp_path / "recipe.json"
    res = recipe.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "recipe" and res["quick"] is True
    by_name = {f["name"]: f for f in res["figures"]}
    f1 = by_name["4-class macro-F1"]
    assert f1["target"] == ">= 0.85" and f1["met"] is (f1["value"] >= 0.85) and 0 <= f1["value"] <= 1
    assert by_name["binary balanced accuracy"]["target"] == ">= 0.95"
    multi = res["runs"]["multi seed 1"]
    assert set(multi["recall"]) == {"NORMAL", "AMD", "CNV", "CSC"} and multi["n_test"] >= 4
    assert set(res["runs"]["binary seed 1"]["recall"]) == {"NORMAL", "CNV"}
    assert by_name["4-class lowest per-class recall (any seed)"]["value"] == min(multi["recall"].values())
