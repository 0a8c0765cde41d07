"""The settings a model is evaluated or fine-tuned under: checkpoint settings vs this invocation's flags
(octa3d.checkpoint.settings)."""

import pytest

from octa3d.checkpoint.io import model_record
from octa3d.checkpoint.settings import checkpoint_config
from octa3d.config import Config
from octa3d.errors import ConfigError


def _trained(*flags: str) -> dict:
    """A checkpoint record (no weights needed) of a model trained with ``flags``."""
    from octa3d.cli import parse_config
    from octa3d.config import to_dict

    cfg, _ = parse_config(["--mode", "train", "--exp", "e", *flags])
    return {**model_record(cfg, ["NORMAL", "ABNORMAL"], "classifier"), "config": to_dict(cfg)}


def _settings(ckpt: dict, *flags: str, fine_tune: bool = False) -> Config:
    from octa3d.cli import parse_config

    cfg, _ = parse_config(["--mode", "test", "--exp", "e", *flags])
    return checkpoint_config(cfg, ckpt, fine_tune=fine_tune)


def test_flags_contradicting_the_model_are_an_error_naming_its_values():
    ckpt = _trained("--dim", "3d", "--model", "cnn", "--modality", "OCT+OCTA", "--input-size", "16",
                    "--slab-depth", "0.6")
    # the same values given again (in any spelling) are fine
    ecfg = _settings(ckpt, "--dim", "3d", "--model", "cnn", "--modality", "OCT+OCTA", "--input-size", "16,16,16",
                     "--slab-depth", "0.60")
    assert ecfg.in_channels == 2 and ecfg.input_shape == (16, 16, 16)
    for flags, named in ((["--dim", "2d"], "--dim 2d (the model: 3d)"),
                         (["--model", "resnet18"], "--model resnet18 (the model: cnn)"),
                         (["--modality", "OCTA"], "--modality OCTA (the model: OCT+OCTA)"),
                         (["--input-size", "32"], "--input-size 32 (the model: 16,16,16)"),
                         (["--task", "multi"], "--task multi (the model: binary)"),
                         (["--slab-depth", "0.9"], "--slab-depth 0.9 (the model: 0.6)")):
        with pytest.raises(ConfigError, match="contradict the trained model") as err:
            _settings(ckpt, *flags)
        assert named in str(err.value) and "Leave these options out" in str(err.value)
    with pytest.raises(ConfigError) as err:  # every contradiction at once
        _settings(ckpt, "--dim", "2d", "--modality", "OCT")
    assert "--dim 2d" in str(err.value) and "--modality OCT (the model: OCT+OCTA)" in str(err.value)
    # not given explicitly: the model's values, silently (that is the documented behaviour)
    assert _settings(ckpt).model.dim == "3d"


def test_harmless_differences_warn_which_value_wins(caplog):
    ckpt = _trained("--model", "cnn", "--input-size", "16", "--fov", "6mm", "--no-augment")
    with caplog.at_level("WARNING", logger="octa3d"):
        ecfg = _settings(ckpt, "--fov", "3mm", "--augment")
    assert ecfg.data.fov == "6mm" and not ecfg.preprocess.augment
    assert "--fov 3mm ignored: the experiment's value 6mm is used" in caplog.text
    assert "--augment ignored: evaluation never augments" in caplog.text
    # compress fine-tuning: an explicit --augment / --no-augment is a training flag and wins
    assert _settings(ckpt, "--augment", fine_tune=True).preprocess.augment
    assert not _settings(_trained("--model", "cnn", "--input-size", "16"), "--no-augment",
                         fine_tune=True).preprocess.augment


def test_projection_contradiction_gives_advice_that_works():
    """A 2D model trained on OCTA-500 projection maps: --projection compute at test/explain used to be ignored
    (and the data error then advised the very same flag). The error names the model's maps and what works."""
    ckpt = _trained("--dim", "2d", "--model", "cnn", "--input-size", "16", "--projection", "OCTA(FULL)")
    with pytest.raises(ConfigError) as err:
        _settings(ckpt, "--projection", "compute")
    msg = str(err.value)
    assert "--projection compute (the model: OCTA(FULL))" in msg
    assert "Projection Maps/OCTA(FULL)/<ID>.bmp" in msg and "train a model with --projection compute" in msg
    assert _settings(ckpt, "--projection", "OCTA(FULL)").data.projection == "OCTA(FULL)"
    # a 3D model never reads projections: nothing to contradict
    assert _settings(_trained("--model", "cnn", "--input-size", "16"), "--projection", "OCTA(FULL)")


def test_following_the_projection_advice_works(tmp_path):
    """End to end: a 2D model trained on 'OCTA(FULL)' maps refuses --projection compute at explain, and the
    advised map file explains."""
    from octa3d.cli import parse_config
    from octa3d.data.synthetic import generate
    from octa3d.stages import explain, train

    generate(tmp_path / "data", n_subjects=16, shape=(8, 24, 8), seed=0)
    common = ["--runs-dir", str(tmp_path / "runs"), "--exp", "maps"]
    train.run(parse_config(["--mode", "train", "--data-root", str(tmp_path / "data"), *common, "--dim", "2d",
                            "--model", "cnn", "--input-size", "16", "--projection", "OCTA(FULL)", "--epochs", "1",
                            "--batch-size", "4", "--init", "random"])[0])
    eye = sorted((tmp_path / "data" / "OCTA_6mm" / "OCTA").iterdir())[0]
    argv = ["--mode", "explain", *common, "--cam", "none"]
    with pytest.raises(ConfigError, match="Projection Maps"):
        explain.run(parse_config([*argv, "--input", str(eye), "--projection", "compute"])[0])
    advised = tmp_path / "data" / "OCTA_6mm" / "Projection Maps" / "OCTA(FULL)" / f"{eye.name}.bmp"
    res = explain.run(parse_config([*argv, "--input", str(advised)])[0])
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
