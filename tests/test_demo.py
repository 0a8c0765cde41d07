"""``--mode demo``: flag precedence, dataset reuse, and (slow) the whole pipeline end to end, twice."""

from __future__ import annotations

import json

import pytest

from octa3d.demo import DEMO_DEFAULT_ARGS, _data_root, _user_args, ensure_data, stage_config


def test_user_flags_override_demo_defaults(tmp_path):
    assert _user_args(["--mode", "demo", "--epochs", "2", "--mode=demo"]) == ["--epochs", "2"]
    cfg, args = stage_config("train", ["--mode", "demo", "--epochs", "2", "--model", "resnet18"], "/d")
    assert cfg.run.mode == "train" and cfg.train.epochs == 2 and cfg.model.model == "resnet18"
    assert cfg.run.overwrite and cfg.exp_name == "demo" and cfg.data.data_root == "/d"
    assert args[-2:] == ["--mode", "train"] and "--overwrite" in DEMO_DEFAULT_ARGS
    from octa3d.demo import STAGE_ARGS

    ae, _ = stage_config("ae_pretrain", [], "/d")
    assert ae.train.epochs == int(STAGE_ARGS["ae_pretrain"][1])  # stage defaults differ ...
    ae, _ = stage_config("ae_pretrain", ["--epochs", "2"], "/d")
    assert ae.train.epochs == 2  # ... and a user's flag applies to every stage
    test, _ = stage_config("test", [], "/d")
    assert test.eval.cam_layer == "features.block3.act"  # the demo's layer for cnn at 32^3
    test, _ = stage_config("test", ["--cam-layer", "features.block4.act"], "/d")
    assert test.eval.cam_layer == "features.block4.act"
    root, explicit = _data_root(["--mode", "demo", "--runs-dir", str(tmp_path)])
    assert root == str(tmp_path / "demo" / "data") and not explicit
    assert _data_root(["--data-root", str(tmp_path / "mine")]) == (str(tmp_path / "mine"), True)


def test_demo_classes_follow_the_task():
    from octa3d.demo import demo_classes
    from octa3d.errors import ConfigError

    assert demo_classes(stage_config("prepare", [])[0]) == ("NORMAL", "CNV")
    assert demo_classes(stage_config("prepare", ["--positive", "DR,CSC"])[0]) == ("NORMAL", "DR", "CSC")
    assert demo_classes(stage_config("prepare", ["--task", "multi"])[0]) == ("NORMAL", "AMD", "CNV", "CSC")
    assert demo_classes(stage_config("prepare", ["--task", "multi", "--classes", "NORMAL,RVO"])[0]) == (
        "NORMAL", "RVO")
    with pytest.raises(ConfigError, match="XYZ"):
        demo_classes(stage_config("prepare", ["--task", "multi", "--classes", "NORMAL,XYZ"])[0])


def test_dataset_is_generated_once_and_reused(tmp_path):
    root = tmp_path / "data"
    args = ["--n-subjects", "2", "--shape", "8,16,8"]
    cfg, _ = stage_config("prepare", args, str(root))
    assert ensure_data(cfg, str(root), False) == "generated"
    marker = json.loads((root / "synthetic.json").read_text())
    assert marker["complete"] and marker["classes"] == ["NORMAL", "CNV"]
    assert ensure_data(cfg, str(root), False) == "reused"
    cfg3, _ = stage_config("prepare", ["--n-subjects", "3", "--shape", "8,16,8"], str(root))
    assert ensure_data(cfg3, str(root), False) == "generated"  # other settings: regenerated in place
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.csv").write_text("subject,label,path\n")
    assert ensure_data(cfg, str(mine), True) == "user data"  # never generated over a user's dataset


@pytest.mark.slow
def test_demo_end_to_end_twice(tmp_path, capsys):
    from octa3d.cli import main

    argv = ["--mode", "demo", "--runs-dir", str(tmp_path / "runs"), "--n-subjects", "12", "--shape", "16,32,16",
            "--input-size", "16", "--epochs", "2", "--bootstrap", "50", "--cam-layer", "features.block3.act"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "demo finished" in out and "balanced accuracy" in out and "tensorboard --logdir" in out
    run = tmp_path / "runs" / "demo"
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["class_names"] == ["NORMAL", "CNV"] and metrics["n_subjects"] == 4
    assert len(list((run / "test" / "cams").glob("*_cam.nii.gz"))) == 4
    assert (run / "ae_pretrain" / "checkpoints" / "best.pt").is_file()
    assert "localization" in metrics  # CNV eyes carry lesion masks
    # a second `make demo`: data reused, every stage re-run into a fresh folder
    assert main(argv) == 0
    assert "(reused)" in capsys.readouterr().out
