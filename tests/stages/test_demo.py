"""``--mode demo``: flag precedence, dataset reuse, and (slow) the whole pipeline end to end, twice."""

from __future__ import annotations

import json

import pytest

from octa3d.cli import parse_config
from octa3d.config import to_argv
from octa3d.errors import ConfigError
from octa3d.stages.demo import (DEMO_DEFAULTS, NEW_COHORT_SIZE, STAGE_DEFAULTS, _data_root, demo_classes, ensure_data,
                                stage_config)


def user(*args: str):
    """The configuration of ``python main.py --mode demo ARGS``."""
    return parse_config(["--mode", "demo", *args])[0]


def test_multi_class_demo_trains_with_the_stock_recipe():
    """The 4-class demo is the stock recipe (rate, batch, epochs, OCT+OCTA), not the binary demo's shortcut: a change
    of the stock defaults reaches it (README 'Training recipe')."""
    from octa3d.config.schema import TrainConfig

    stock = TrainConfig()
    cfg = stage_config("train", user("--task", "multi"), "/d")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (stock.lr, stock.batch_size, stock.epochs)
    assert cfg.data.modality == "OCT+OCTA" and cfg.train.patience == 0
    assert stock.lr == 1e-3  # the default the recipe ladder chose (docs/explanation/training-recipe.md)


def test_user_flags_override_demo_defaults(tmp_path):
    cfg = stage_config("train", user("--epochs", "2", "--model", "resnet18"), "/d")
    assert cfg.run.mode == "train" and cfg.train.epochs == 2 and cfg.model.model == "resnet18"
    assert cfg.run.overwrite and cfg.exp_name == "demo" and cfg.data.data_root == "/d"
    assert cfg.argv[-2:] == ("--mode", "train") and DEMO_DEFAULTS["overwrite"] is True
    # the recorded command reproduces the stage's configuration
    again = parse_config(list(cfg.argv))[0]
    assert again.train.epochs == 2 and again.model.model == "resnet18" and again.data.data_root == "/d"
    assert {"epochs", "model", "data_root", "overwrite"} <= cfg.explicit

    ae = stage_config("ae_pretrain", user(), "/d")
    assert ae.train.epochs == STAGE_DEFAULTS["ae_pretrain"]["epochs"]  # stage defaults differ ...
    ae = stage_config("ae_pretrain", user("--epochs", "2"), "/d")
    assert ae.train.epochs == 2  # ... and a user's flag applies to every stage
    test = stage_config("test", user(), "/d")
    assert test.eval.cam_layer is None  # the adaptive default layer (octa3d.cam.layers)
    test = stage_config("test", user("--cam-layer", "features.block4.act"), "/d")
    assert test.eval.cam_layer == "features.block4.act"
    root, explicit = _data_root(user("--runs-dir", str(tmp_path)))
    assert root == str(tmp_path / "demo" / "data") and not explicit
    assert _data_root(user("--data-root", str(tmp_path / "mine"))) == (str(tmp_path / "mine"), True)


def test_to_argv_round_trips_values():
    values = {"epochs": 3, "input_size": [32, 48, 32], "overwrite": True, "amp": False, "cam_layer": "layer3"}
    cfg = parse_config(to_argv(values))[0]
    assert cfg.train.epochs == 3 and cfg.preprocess.input_size == [32, 48, 32] and cfg.run.overwrite
    assert cfg.train.amp is False and cfg.eval.cam_layer == "layer3"


def test_demo_classes_follow_the_task():
    assert demo_classes(stage_config("prepare", user())) == ("NORMAL", "CNV")
    assert demo_classes(stage_config("prepare", user("--positive", "DR,CSC"))) == ("NORMAL", "DR", "CSC")
    assert demo_classes(stage_config("prepare", user("--task", "multi"))) == ("NORMAL", "AMD", "CNV", "CSC")
    assert demo_classes(stage_config("prepare", user("--task", "multi", "--classes", "NORMAL,RVO"))) == (
        "NORMAL", "RVO")
    with pytest.raises(ConfigError, match="XYZ"):
        demo_classes(stage_config("prepare", user("--task", "multi", "--classes", "NORMAL,XYZ")))


def test_dataset_is_generated_once_and_reused(tmp_path):
    root = tmp_path / "data"
    args = ["--n-subjects", "2", "--shape", "8,16,8"]
    cfg = stage_config("prepare", user(*args), str(root))
    assert ensure_data(cfg, str(root), False) == "generated"
    marker = json.loads((root / "synthetic.json").read_text())
    assert marker["complete"] and marker["classes"] == ["NORMAL", "CNV"]
    assert ensure_data(cfg, str(root), False) == "reused"
    cfg3 = stage_config("prepare", user("--n-subjects", "3", "--shape", "8,16,8"), str(root))
    assert ensure_data(cfg3, str(root), False) == "generated"  # other settings: regenerated in place
    faint = stage_config("prepare", user("--n-subjects", "3", "--shape", "8,16,8", "--synth-look", "faint"), str(root))
    assert ensure_data(faint, str(root), False) == "generated"  # another look: regenerated
    assert json.loads((root / "synthetic.json").read_text())["look"]["name"] == "faint"
    assert ensure_data(faint, str(root), False) == "reused"
    legacy = json.loads((root / "synthetic.json").read_text())
    del legacy["look"]  # written before looks existed: the stock look
    (root / "synthetic.json").write_text(json.dumps(legacy))
    assert ensure_data(cfg3, str(root), False) == "reused"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.csv").write_text("subject,label,path\n")
    assert ensure_data(cfg, str(mine), True) == "user data"  # never generated over a user's dataset


@pytest.mark.slow
def test_demo_end_to_end_twice(tmp_path, capsys):
    from octa3d.cli import main

    argv = ["--mode", "demo", "--runs-dir", str(tmp_path / "runs"), "--n-subjects", "12", "--shape", "16,32,16",
            "--input-size", "16", "--epochs", "2", "--bootstrap", "50"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "demo finished" in out and "balanced accuracy" in out and "tensorboard --logdir" in out
    run = tmp_path / "runs" / "demo"
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["class_names"] == ["NORMAL", "CNV"] and metrics["n_subjects"] == 4
    assert len(list((run / "test" / "cams").glob("*_cam.nii.gz"))) == 4
    assert (run / "ae_pretrain" / "checkpoints" / "best.pt").is_file()
    # the second cohort: external validation (other eyes, 3 mm IDs), prediction as new scans, then the export
    ext = json.loads(next((run / "test-external").glob("*/metrics.json")).read_text(encoding="utf-8"))
    assert ext["cohort"]["n_subjects"] == ext["n_subjects"] > 0 and "External cohort" in out
    pred = next((run / "predict").glob("new_eyes_*/predictions.csv"))
    assert len(pred.read_text(encoding="utf-8").splitlines()) == 1 + NEW_COHORT_SIZE
    assert (run / "export" / "bundle" / "models" / "model.ts").is_file()
    assert "localization" in metrics and "faithfulness" in metrics  # CNV eyes carry lesion masks
    assert "pointing game" in out and "en face" in out and "deletion AUC" in out
    assert "pointing_game_enface" in metrics["localization"]["per_class"]["CNV"]
    # a second `make demo`: data reused, every stage re-run into a fresh folder
    assert main(argv) == 0
    assert "(reused)" in capsys.readouterr().out


def test_steps_after_test_read_the_second_cohort():
    ext = stage_config("test --external", user("--epochs", "2"), "/d", "/runs/demo/new_eyes")
    assert ext.run.mode == "test" and ext.eval.external == "/runs/demo/new_eyes" and ext.data.data_root == "/d"
    assert ext.argv[-2:] == ("--mode", "test") and "--external" in ext.argv
    pred = stage_config("predict", user(), "/d", "/runs/demo/new_eyes")
    assert pred.run.mode == "predict" and pred.eval.input == "/runs/demo/new_eyes" and pred.eval.external is None
    assert stage_config("export", user(), "/d", "/x").run.mode == "export"
