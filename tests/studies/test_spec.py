"""The study file is checked before anything runs: every error names the file, the arm and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from octa3d.errors import ConfigError
from octa3d.studies.plan import build_cells
from octa3d.studies.spec import check_models, load_study


def _write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return p


BASE = {"folds": 3, "common": {"data_root": "/data", "epochs": 2}, "arms": [{"name": "a", "model": "cnn"},
                                                                          {"name": "b", "model": "resnet18"}]}


def _fails(tmp_path: Path, doc: dict, *parts: str) -> str:
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_study(path)
    text = str(err.value)
    assert str(path) in text, text
    for part in parts:
        assert part in text, text
    return text


def test_a_valid_study_expands_its_arms_and_precedence(tmp_path):
    spec = load_study(_write(tmp_path, {**BASE, "grid": {"lr": [0.001, 0.0003]}}), cli={"epochs": 3, "lr": 0.1})
    assert [a.name for a in spec.arms] == ["a-0.001", "a-0.0003", "b-0.001", "b-0.0003"]
    a = spec.arm("a-0.001")
    assert a.values["epochs"] == 3  # the command line over common
    assert a.values["lr"] == 0.001  # the arm (its grid value) over the command line
    assert a.values["data_root"] == str(Path("/data").resolve()) and a.values["cam"] == "none"
    assert spec.name == "s" and spec.reference == "a-0.001" and spec.folds == 3


def test_input_sugar_and_default_names(tmp_path):
    spec = load_study(_write(tmp_path, {"arms": [{"input": "volume", "model": "resnet18"},
                                                 {"input": "enface", "model": "vgg19"},
                                                 {"input": "enface:OCTA(FULL)", "model": "vgg19", "name": "map"}]}))
    vol, enf, mp = spec.arms
    assert (vol.name, vol.values["dim"]) == ("3d-resnet18", "3d")
    assert (enf.name, enf.values["dim"], enf.values["projection"]) == ("2d-vgg19", "2d", "compute")
    assert mp.values["projection"] == "OCTA(FULL)"


@pytest.mark.parametrize("doc,parts", [
    ({**BASE, "fodls": 3}, ("unknown key 'fodls'", "folds")),
    ({**BASE, "arms": [{"name": "a", "epoch": 2}]}, ("arms[0] (a)", "unknown key 'epoch'", "epochs")),
    ({**BASE, "common": {"data_rot": "x"}}, ("common", "unknown key 'data_rot'")),
    ({**BASE, "arms": [{"name": "a", "test_fraction": 0.2}]}, ("arms[0] (a)", "test-fraction", "common:")),
    ({**BASE, "arms": [{"name": "a", "exp": "x"}]}, ("arms[0] (a)", "exp", "set by the study")),
    ({**BASE, "arms": [{"name": "a"}, {"name": "a"}]}, ("two or more arms are named a",)),
    ({**BASE, "arms": [{"name": "a", "input": "bscan"}]}, ("input 'bscan'", "class-folder")),
    ({**BASE, "arms": [{"name": "a", "lr": "fast"}]}, ("arms[0] (a)", "--lr", "'fast'")),
    ({**BASE, "reference": "c"}, ("reference: 'c'",)),
    ({**BASE, "folds": 1}, ("folds: 1", ">= 2")),
    ({**BASE, "stats": {"bootstrap": 10}}, ("stats: bootstrap",)),
    ({**BASE, "stats": {"boot": 10}}, ("stats", "unknown key 'boot'")),
    ({**BASE, "arms": [{"name": "a/b"}]}, ("name 'a/b'",)),
    ({**BASE, "arms": [{"name": "a", "test": {"cam": "nonsense"}}]}, ("arms[0] (a)", "--cam")),
])
def test_errors_name_the_file_the_arm_and_the_key(tmp_path, doc, parts):
    _fails(tmp_path, doc, *parts)


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_study(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(bad)


def test_models_are_checked_against_the_registry(tmp_path):
    spec = load_study(_write(tmp_path, {"arms": [{"name": "x", "model": "resnet9000"}]}))
    with pytest.raises(ConfigError, match="arm x: unknown model 'resnet9000'"):
        check_models(spec)
    spec = load_study(_write(tmp_path, {"arms": [{"name": "y", "model": "inception_v3", "input_size": 32}]}))
    with pytest.raises(ConfigError, match="arm y: model 'inception_v3' needs an input of at least 75"):
        check_models(spec)


def test_cells_are_ordinary_runs_with_ae_first(tmp_path):
    spec = load_study(_write(tmp_path, {**BASE, "arms": [{"name": "a", "init": "ae", "ae_pretrain": {"epochs": 7}},
                                                         {"name": "b", "test": {"cam": "gradcam"}}]}))
    cells = build_cells(spec, tmp_path / "study")
    assert [c.key for c in cells] == ["a/fold-0", "b/fold-0", "a/fold-1", "b/fold-1", "a/fold-2", "b/fold-2"]
    a, b = cells[0], cells[1]
    assert [m for m, _ in a.stages] == ["ae_pretrain", "train", "test"] and a.stages[0][1]["epochs"] == 7
    assert [m for m, _ in b.stages] == ["train", "test"] and b.stages[1][1]["cam"] == "gradcam"
    train = a.stages[1][1]
    assert train["epochs"] == 2 and train["folds"] == 1 and train["exp"] == "fold-0"
    assert Path(train["runs_dir"]) == (tmp_path / "study" / "cells" / "a").resolve()
    assert train["cache_dir"] == str((tmp_path / "study").resolve() / ".cache")


def test_the_shipped_studies_are_valid():
    """``studies/*.yaml`` load and name registered models with usable input sizes."""
    root = Path(__file__).resolve().parents[2] / "studies"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        spec = load_study(f)
        check_models(spec)
    spec = load_study(root / "octa500_2d_vs_3d.yaml")
    assert spec.folds == 5 and len(spec.arms) == 7 and spec.reference == "3d-resnet18"
    assert {a.values["model"] for a in spec.arms if a.values["dim"] == "2d"} == {"vgg19", "resnet50", "resnet152",
                                                                                  "inception_v3"}
    assert {a.values["model"] for a in spec.arms if a.values["dim"] == "3d"} == {"resnet18", "resnet50",
                                                                                  "inception_v3"}
