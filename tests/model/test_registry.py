"""Registry: names, input-size checks, the model table and --init-from loading.

Per-model structure (encoder/head split, CAM layer, no in-place ops) is checked in test_models.py, on the
models that test builds anyway.
"""

from __future__ import annotations

import pytest
import torch
import octa3d.model as M
from octa3d.errors import ConfigError
from octa3d.model import registry as R

ALL = M.list_models()
EXPECTED = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121", "efficientnet-b0",
            "efficientnet-b1", "efficientnet-b2", "efficientnet-b3", "efficientnet-b4", "seresnet50", "vit", "vgg16",
            "vgg19", "inception_v3", "cnn"}


@pytest.mark.parametrize("dim", [2, "2d", 3, "3d"])
def test_dim_spellings(dim: int | str) -> None:
    model = M.create_model("cnn", dim, 1, 2)
    expected = 2 if str(dim).startswith("2") else 3
    assert model.features.block1.conv.weight.ndim == expected + 2


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet9'.*resnet18.*vit"):
        M.create_model("resnet9", 3, 1, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=4), "2d or 3d"),
    (dict(num_classes=1), "num_classes"),
    (dict(in_channels=0), "in_channels"),
    (dict(input_size=[32, 32]), "one positive number or 3"),
    (dict(bogus_option=1), "unknown option"),
])
def test_create_model_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = dict(name="cnn", dim=3, in_channels=1, num_classes=2) | kwargs
    with pytest.raises(ConfigError, match=match):
        M.create_model(**args)


def test_input_size_below_minimum() -> None:
    with pytest.raises(ConfigError, match="inception_v3.*at least 75.*75x75x75.*64x64x64"):
        M.check_input_size("inception_v3", (64, 64, 64))
    with pytest.raises(ConfigError, match="at least 32"):
        M.create_model("vgg16", "2d", 1, 2, input_size=16)
    M.check_input_size("inception_v3", 75)
    M.check_input_size("cnn", (16, 40))


def test_vit_needs_input_size() -> None:
    with pytest.raises(ConfigError, match="input size"):
        M.create_model("vit", 3, 1, 2)


def test_format_model_table_lists_every_model() -> None:
    table = M.format_model_table()
    lines = table.splitlines()
    assert lines[0].split()[0] == "name" and "CAM" in lines[0]
    for name in ALL:
        row = next(line for line in lines if line.split()[0] == name)
        assert M.get_spec(name).cam_layer in row
        assert row.split()[-1] in ("yes", "no")
    assert next(line for line in lines if line.startswith("vit ")).split()[-1] == "yes"  # masked autoencoding
    assert "params" not in lines[0]  # listing builds no model (fast); counting is opt-in
    with_params = M.format_model_table(params=True).splitlines()
    assert "params" in with_params[0] and next(line for line in with_params if line.startswith("cnn ")).endswith("M")


# ---------------------------------------------------------------------- --init-from
def test_load_init_weights_nested_module_prefix(tmp_path) -> None:
    """A MedicalNet-style file: {"state_dict": {"module.<key>": ...}} with one extra and one misshaped tensor."""
    torch.manual_seed(0)
    src = M.create_model("cnn", 3, 1, 2)
    target = M.create_model("cnn", 3, 1, 2)
    state = {f"module.{k}": v.clone() for k, v in src.state_dict().items()}
    state["module.extra.weight"] = torch.zeros(3)
    state["module.classifier.2.weight"] = torch.zeros(5, 128)  # wrong shape: 5 classes
    path = tmp_path / "medicalnet.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)

    report = M.load_init_weights(target, path, model_name="cnn")
    loaded = [r["key"] for r in report.loaded]
    assert report.format == "octa3d"
    assert [u["key"] for u in report.unexpected] == ["module.extra.weight"]
    assert [(m["key"], m["file_shape"]) for m in report.mismatched] == [("classifier.2.weight", [5, 128])]
    assert "classifier.2.weight" not in loaded and "features.block1.conv.weight" in loaded
    assert report.encoder_loaded == report.encoder_total and not report.encoder_missing
    own = target.state_dict()
    for k in loaded:
        assert torch.equal(own[k], src.state_dict()[k]), k
    assert not torch.equal(own["classifier.2.weight"], torch.zeros(2, 128))


def test_load_init_weights_from_ae_checkpoint(tmp_path) -> None:
    ae = M.build_autoencoder("cnn", 2, 1, 32)
    path = tmp_path / "ae.pt"
    torch.save({"model": ae.state_dict()}, path)
    clf = M.create_model("cnn", 2, 1, 2)
    report = M.load_init_weights(clf, path, model_name="cnn")
    assert {r["key"] for r in report.loaded} == set(M.get_spec("cnn").encoder_keys(clf.state_dict()))
    assert all(u["key"].startswith("decoder.") for u in report.unexpected)
    assert {m["key"] for m in report.missing} == set(M.get_spec("cnn").head_keys(clf.state_dict()))


def test_load_init_weights_errors(tmp_path) -> None:
    model = M.create_model("cnn", 2, 1, 2)
    with pytest.raises(ConfigError, match="missing.pth.*does not exist"):
        M.load_init_weights(model, tmp_path / "missing.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="corrupt.pth"):
        M.load_init_weights(model, bad)
    other = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(ConfigError, match="none of the model's .* encoder tensors"):
        M.load_init_weights(model, other, model_name="cnn")


def test_model_options_reach_only_their_family() -> None:
    values = {"shortcut_type": "A", "drop_path": 0.1}
    assert M.model_options("resnet18", values) == {"shortcut_type": "A"}
    assert M.model_options("vit_base", values) == {"drop_path_rate": 0.1}
    assert M.model_options("resnet18", {"shortcut_type": "B", "drop_path": 0.0}) == {}  # defaults: nothing recorded
    assert M.model_options("cnn", values) == {}  # not explicit: the defaults of other families are ignored
    with pytest.raises(ConfigError, match="--shortcut-type applies to resnet18.*--model cnn"):
        M.model_options("cnn", values, explicit=lambda name: name == "shortcut_type")
    with pytest.raises(ConfigError, match="--drop-path applies to vit, vit_base, vit_large only; --model resnet18"):
        M.model_options("resnet18", values, explicit=lambda name: name == "drop_path")


def test_param_count_on_meta_matches_real() -> None:
    spec = M.get_spec("cnn")
    real = sum(p.numel() for p in M.create_model("cnn", 3, 1, 2).parameters())
    assert spec.count_parameters(3) == real
    assert R.get_spec("resnet18").count_parameters(2, in_channels=2, num_classes=5) > 0
