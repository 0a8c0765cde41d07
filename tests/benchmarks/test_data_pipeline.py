"""Data-pipeline benchmark: the quick run gives well-formed figures (never timing thresholds), and the dataset
cloning and naive baseline it relies on work. The faster data paths it measures are tested in tests/data/."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from benchmarks import data_pipeline
from benchmarks.naive_loader import naive_loader
from octa3d.data.readers import read_volume

FIGURES = {"loader samples/s, epochs >= 2 (cache + augmentation)",
           "loader samples/s, epoch 1 (cold: decode + preprocess + cache)",
           "naive loader samples/s (every epoch)", "epochs >= 2 vs naive loader",
           "cold preprocessing vs naive, per volume", "peak RSS, 10x more subjects"}


# ------------------------------------------------------------------------------------------- benchmark
def test_quick_benchmark_result_is_well_formed(tmp_path, capsys):
    out = tmp_path / "data_pipeline.json"
    res = data_pipeline.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "data_pipeline" and res["quick"] is True
    names = {f["name"] for f in res["figures"]}
    assert FIGURES <= names
    for f in res["figures"]:
        assert f["name"] and isinstance(f["unit"], str) and f["unit"]
        assert isinstance(f["value"], float) and math.isfinite(f["value"]) and f["value"] >= 0
    targets = {f["name"]: f for f in res["figures"] if f["target"]}
    assert set(targets) == {"epochs >= 2 vs naive loader", "cold preprocessing vs naive, per volume",
                            "peak RSS, 10x more subjects"}
    assert all(isinstance(f["met"], bool) for f in targets.values())
    assert res["setup"]["modality"] == "OCT+OCTA" and res["setup"]["augment"] is True
    assert res["epochs"]["samples"] == [res["setup"]["subjects"]] * res["setup"]["epochs"]
    assert "| data_pipeline | epochs >= 2 vs naive loader |" in capsys.readouterr().out


def test_clone_dataset_links_one_eye_under_new_ids(tmp_path):
    from octa3d.data.labels import read_label_table

    src = data_pipeline.source_eye(tmp_path / "src", (8, 16, 8))
    dst = data_pipeline.clone_dataset(src, tmp_path / "data", 3)
    ids = sorted(p.name for p in (dst / "OCTA_6mm" / "OCTA").iterdir())
    assert ids == ["10001", "10002", "10003"]
    assert len(list((dst / "OCTA_6mm" / "OCT" / "10003").glob("*.bmp"))) == 8
    assert read_label_table(dst / "Text labels.xlsx") == {"10001": "NORMAL", "10002": "DR", "10003": "NORMAL"}
    a, _ = read_volume(dst / "OCTA_6mm" / "OCT" / "10002")
    b, _ = read_volume(src / "OCTA_6mm" / "OCT" / "10001")
    assert np.array_equal(a, b)
    loader = naive_loader([((str(dst / "OCTA_6mm" / "OCT" / "10001"), str(dst / "OCTA_6mm" / "OCTA" / "10001")), 1)],
                          (8, 8, 8))
    (batch,) = list(loader)
    assert batch["image"].shape == (1, 2, 8, 8, 8) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
