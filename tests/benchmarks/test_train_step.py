"""``benchmarks/train_step.py --quick``: a well-formed result in the benchmarks' format (figures are not judged:
timings on shared machines are no test)."""

from __future__ import annotations

import json
import math

from benchmarks import train_step


def test_quick_train_step_result_is_well_formed(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    res = train_step.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "train_step" and res["quick"] is True
    for f in res["figures"]:
        assert f["name"] and isinstance(f["unit"], str) and isinstance(f["value"], float), f
        assert math.isfinite(f["value"]) and f["value"] > 0, f
    by_name = {f["name"]: f for f in res["figures"]}
    for model in ("cnn", "resnet18"):
        assert by_name[f"{model} 16^3 train step, CPU fp32"]["unit"] == "volumes/s"
    ratio = by_name["train stage step vs bare loop, main-thread CPU (cnn 16^3)"]
    assert ratio["target"] == "<= 1.10" and ratio["unit"] == "x"
    assert ratio["met"] is (ratio["value"] <= 1.10)  # the verdict follows from the value and the target
    assert set(res["volumes_per_s"]) == {"cpu/cnn/16/fp32", "cpu/resnet18/16/fp32"}
    per_epoch = res["overhead"]["per_epoch"]["main-thread CPU"]
    assert len(per_epoch["cycle"]) == 1 and all(v > 0 for v in per_epoch["bare_train"])
    assert "cuda" in res["setup"]  # the CUDA figures, or why they were skipped
    loader = by_name["training loader samples/s, epochs >= 2, 1 workers (16x16x16)"]
    assert loader["unit"] == "samples/s" and res["loader"]["workers"] == 1 and len(res["loader"]["samples"]) == 3
    assert res["setup"]["gflop_per_step"]["resnet18/16"] > res["setup"]["gflop_per_step"]["cnn/16"] > 0
    assert "| train_step | train stage step vs bare loop" in capsys.readouterr().out


def test_flop_count_and_peak_table():
    # meta device: counts a resnet50 at 128^3 without computing it (forward + backward ~ 3x the forward)
    assert 3.0e12 < train_step.step_flops("resnet50", 128, 2) < 4.5e12
    assert train_step.step_flops("cnn", 16, 2) * 2 == train_step.step_flops("cnn", 16, 4)
    assert train_step.peak_tflops("NVIDIA H100 PCIe") == 756.0 and train_step.peak_tflops("NVIDIA H100 80GB HBM3")
    assert train_step.peak_tflops("NVIDIA H200") == 989.4 and train_step.peak_tflops("Some GPU") is None
