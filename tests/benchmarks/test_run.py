"""``make bench`` harness: runs benchmarks in subprocesses, writes the dated JSON + markdown, reports failures."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import common, run


def test_quick_run_writes_results_for_each_benchmark(tmp_path, capsys):
    status = run.main(["--quick", "--only", "compress_bench,ae_transfer", "--out-dir", str(tmp_path)])
    assert status == 0
    (js,) = tmp_path.glob("*-quick.json")
    (md,) = tmp_path.glob("*-quick.md")
    assert js.name.endswith("-compress_bench-ae_transfer-quick.json")  # a subset never replaces a full run's file
    doc = json.loads(js.read_text(encoding="utf-8"))
    assert [r["benchmark"] for r in doc["results"]] == ["compress", "ae_transfer"]
    assert doc["machine"]["bench_threads"] >= 1 and "torch" in doc["machine"]
    for res in doc["results"]:
        assert res["quick"] and res["figures"] and "error" not in res
        for f in res["figures"]:
            assert f["name"] and isinstance(f["unit"], str) and isinstance(f["value"], float)
    names = {f["name"] for f in doc["results"][0]["figures"]}
    assert {"int8_speedup", "int8_size_ratio", "int8_balanced_accuracy_drop_pp"} <= names
    assert all(math.isfinite(f["value"]) for f in doc["results"][0]["figures"])
    text = md.read_text(encoding="utf-8")
    assert "| compress | int8_speedup |" in text and "| ae_transfer |" in text
    assert text in capsys.readouterr().out


def test_failing_benchmark_is_reported_and_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "BENCHMARKS", (*run.BENCHMARKS, "does_not_exist"))
    assert run.main(["--quick", "--only", "does_not_exist", "--out-dir", str(tmp_path)]) == 1
    doc = json.loads(next(tmp_path.glob("*.json")).read_text(encoding="utf-8"))
    assert "No module named" in doc["results"][0]["error"]
    assert "Failed: does_not_exist" in next(tmp_path.glob("*.md")).read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        run.main(["--only", "nonsense", "--out-dir", str(tmp_path)])


def test_figure_checks_its_target():
    assert common.Figure("a", 120, "x", ">= 100").met is True
    assert common.Figure("b", 0.7, "x", "<= 0.5").met is False
    assert common.Figure("c", 3, "s").met is None
    table = common.markdown_table([common.result("demo", [common.Figure("b", 0.7, "x", "<= 0.5")], {}, True)])
    assert "| demo | b | 0.7 x | <= 0.5 | **no** |" in table


def test_figure_verdict_follows_value_and_target():
    from benchmarks.common import Figure

    assert Figure("a", 2.0, "x", target="<= 2.5").met is True
    assert Figure("a", 3.0, "x", target="<= 2.5").met is False
    assert Figure("a", 3.0, "x", target=">= 2.5").met is True
    assert Figure("a", 3.0, "x").met is None
