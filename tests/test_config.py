"""Config dataclasses: coercion, YAML loading, validation, derived values."""

import pytest

from octa3d.config import Config, apply_overrides, from_dict, load_yaml, to_dict, validate
from octa3d.errors import ConfigError


def test_defaults_validate_and_derive():
    cfg = Config()
    validate(cfg)
    assert cfg.exp_name == "3d-resnet18-binary"
    assert cfg.input_shape == (128, 128, 128)
    cfg.model.dim = "2d"
    assert cfg.input_shape == (224, 224)
    assert cfg.in_channels == 1
    cfg.data.modality = "OCT+OCTA"
    assert cfg.in_channels == 2


@pytest.mark.parametrize("key", ["input-size", "input_size"])
def test_overrides_accept_dash_and_underscore(key):
    cfg = Config()
    apply_overrides(cfg, {key: "32,48,40", "clip-percentiles": [1, 99], "augment": "no"}, "test")
    assert cfg.input_shape == (32, 48, 40)
    assert cfg.preprocess.clip_percentiles == [1.0, 99.0]
    assert cfg.preprocess.augment is False


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'inptu-size'"):
        apply_overrides(Config(), {"inptu-size": 3}, "x.yaml")


def test_wrong_type_names_flag():
    with pytest.raises(ConfigError, match="--seed"):
        apply_overrides(Config(), {"seed": "abc"}, "cli")


@pytest.mark.parametrize("change, flag", [
    ({"test-fraction": 1.5}, "--test-fraction"),
    ({"folds": 0}, "--folds"),
    ({"clip-percentiles": "99,1"}, "--clip-percentiles"),
    ({"input-size": "4"}, "--input-size"),
    ({"input-size": "32,32"}, "--input-size"),
    ({"task": "triple"}, "--task"),
])
def test_validate_rejects(change, flag):
    cfg = Config()
    apply_overrides(cfg, change, "t")
    with pytest.raises(ConfigError, match=flag):
        validate(cfg)


def test_yaml_flat_and_nested_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 7\ndata:\n  task: multi\n  classes: [NORMAL, DR]\n")
    cfg = Config()
    apply_overrides(cfg, load_yaml(p), str(p))
    assert cfg.run.seed == 7 and cfg.data.task == "multi" and cfg.data.classes == ["NORMAL", "DR"]
    again = from_dict(to_dict(cfg))
    assert again == cfg


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(bad)


@pytest.mark.parametrize("values, flag", [
    ({"lr": "nan"}, "--lr.*finite"),
    ({"lr": "inf"}, "--lr.*finite"),
    ({"lr": float("nan")}, "--lr.*finite"),
    ({"slab-depth": "nan"}, "--slab-depth.*finite"),
    ({"prune-amount": "-inf"}, "--prune-amount.*finite"),
    ({"clip-percentiles": "1,nan"}, "--clip-percentiles.*finite"),
    ({"epochs": True}, "--epochs.*true/false"),  # YAML `epochs: true` is not 1
    ({"lr": True}, "--lr.*true/false"),
    ({"exp": ["a", "b"]}, "--exp.*list"),  # YAML `exp: [a, b]` is not the text "['a', 'b']"
    ({"exp": True}, "--exp.*quote"),
    ({"augment": 5}, "--augment.*true or false"),
    ({"epochs": 2.5}, "--epochs.*whole number"),
    ({"classes": {"a": 1}}, "--classes.*mapping"),
])
def test_wrong_yaml_types_are_refused(values, flag):
    with pytest.raises(ConfigError, match=flag):
        apply_overrides(Config(), values, "c.yaml")


def test_numbers_in_any_notation_for_integer_fields():
    cfg = Config()
    apply_overrides(cfg, {"max-voxels": "2e9", "epochs": 3.0, "seed": " 7 "}, "t")
    assert (cfg.data.max_voxels, cfg.train.epochs, cfg.run.seed) == (2_000_000_000, 3, 7)


@pytest.mark.parametrize("change, flag", [
    ({"exp": "../../x"}, "--exp '../../x': must be a plain folder name inside --runs-dir"),
    ({"exp": "/tmp/x"}, "--exp.*plain folder name"),
    ({"exp": "a/b"}, "--exp.*plain folder name"),
    ({"exp": "a\\b"}, "--exp.*plain folder name"),
    ({"exp": ".."}, "--exp.*plain folder name"),
    ({"model": "../x"}, "experiment name.*plain folder name"),
    ({"device": "gpu0"}, "--device 'gpu0': choose auto, cpu, cuda"),
    ({"num-workers": -1}, "--num-workers -1"),
    ({"seed": -1}, "--seed -1"),
    ({"weight-decay": -1}, "--weight-decay"),
    ({"input-size": "4096"}, "--input-size.*--max-voxels"),
])
def test_validate_rejects_run_settings(change, flag):
    cfg = Config()
    apply_overrides(cfg, change, "t")
    with pytest.raises(ConfigError, match=flag):
        validate(cfg)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_strings_that_validate(device):
    cfg = Config()
    cfg.run.device = device
    validate(cfg)  # availability is checked when the device is resolved (utils.dist), not here
