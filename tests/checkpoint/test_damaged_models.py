"""Damaged and hostile model files: one-line errors naming the file; a pickle
that weights_only refuses is reported as refused (possibly malicious), never as damaged, and never run."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from octa3d.checkpoint.exports import CARD_FORMAT, CARD_NAME
from octa3d.checkpoint.io import CheckpointError, load_checkpoint
from octa3d.checkpoint.models import load_any_model

REFUSED = "refused: the file contains code/objects that weights_only loading does not allow (possibly malicious"


class Payload:
    """Unpickling this runs ``touch <marker>``: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_as_such_and_never_run(tmp_path, legacy):
    marker, f = tmp_path / "ran", tmp_path / "best.pt"
    obj = {"format": "octa3d-checkpoint-1", "kind": "classifier", "x": Payload(marker)}
    if legacy:
        f.write_bytes(pickle.dumps(obj, protocol=4))
    else:
        torch.save(obj, f)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(f)
    msg = str(err.value)
    assert REFUSED in msg and "system" in msg and str(f) in msg and "\n" not in msg
    assert "corrupt" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "model.ts"])
def test_random_bytes_and_cut_checkpoints_are_damaged_not_refused(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(os.urandom(3000))
    with pytest.raises(CheckpointError, match="corrupt or partially written") as err:
        load_any_model(f)
    assert "Weights only load failed" not in str(err.value)  # torch's preamble says nothing useful here
    torch.save({"format": "octa3d-checkpoint-1", "w": torch.zeros(500)}, f)
    f.write_bytes(f.read_bytes()[:900])
    with pytest.raises(CheckpointError, match="corrupt or partially written"):
        load_any_model(f)


def write_card(folder: Path, artifacts: dict | None = None) -> None:
    record = {"kind": "classifier", "model_name": "tiny", "dim": "2d", "in_channels": 1, "num_classes": 2,
              "class_names": ["A", "B"], "input_shape": [4, 4]}
    (folder / CARD_NAME).write_text(json.dumps({"format": CARD_FORMAT, "record": record,
                                                "artifacts": artifacts or {}}))


def test_truncated_onnx_is_a_one_line_error(tmp_path):
    f = tmp_path / "model.onnx"
    torch.onnx.export(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval(), (torch.zeros(1, 1, 4, 4),), str(f),
                      dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"])
    full = f.stat().st_size
    write_card(tmp_path, {"model.onnx": {"format": "onnx", "precision": "fp32", "bytes": full}})
    assert load_any_model(f)[1]["artifact_format"] == "onnx"
    f.write_bytes(f.read_bytes()[:full // 2])
    with pytest.raises(CheckpointError, match=rf"model.onnx is {full // 2} bytes but its model card records {full}"):
        load_any_model(f)
    write_card(tmp_path)  # a card without the file's size: onnxruntime's failure, in one line
    with pytest.raises(CheckpointError, match=r"model.onnx is not an ONNX model onnxruntime can load") as err:
        load_any_model(f)
    assert "\n" not in str(err.value)


def test_torchscript_look_alike_is_a_one_line_error(tmp_path):
    f = tmp_path / "model_int8.pt"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("model/constants.pkl", b"not a pickle")
        z.writestr("model/code/__torch__.py", "def forward(self): pass")
    write_card(tmp_path)
    with pytest.raises(CheckpointError, match=r"model_int8.pt is not a TorchScript model") as err:
        load_any_model(f)
    assert "\n" not in str(err.value)


def test_damaged_model_card_is_a_one_line_error(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"\x08\x07")
    (tmp_path / CARD_NAME).write_text('{"format": "octa3d-model-card-1", "rec')
    with pytest.raises(CheckpointError, match=r"model_card.json: the model card is not valid JSON"):
        load_any_model(f)


def _fp32_export(folder: Path, temperature) -> Path:
    """An fp32 TorchScript file with its card, as --mode export / compress write them."""
    from octa3d.checkpoint.exports import add_artifact, build_card, save_torchscript_fp32, write_card

    ckpt = {"kind": "classifier", "model_name": "tiny", "dim": "3d", "in_channels": 1, "num_classes": 2,
            "class_names": ["a", "b"], "input_shape": [4, 4, 4], "preprocess": {}, "temperature": temperature}
    card = build_card(ckpt, folder / "best.pt", None)
    f = folder / "model_fp32.ts"
    save_torchscript_fp32(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), torch.rand(1, 1, 4, 4, 4), f, card)
    add_artifact(card, f, "torchscript", "fp32")
    write_card(card, folder)
    return f


def test_cut_fp32_torchscript_is_named_and_its_temperature_travels(tmp_path):
    f = _fp32_export(tmp_path, 1.5)
    model, rec, is_q = load_any_model(f)
    assert rec["temperature"] == 1.5 and not is_q and model(torch.rand(2, 1, 4, 4, 4)).shape == (2, 2)
    data = f.read_bytes()
    f.write_bytes(data[:-100])  # the end of the zip is cut: no longer recognisable as TorchScript
    with pytest.raises(CheckpointError, match=r"model_fp32.ts(: damaged archive| is corrupt| is \d+ bytes)") as err:
        load_any_model(f)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "2"])
def test_a_bad_temperature_is_refused_when_exporting(tmp_path, bad):
    from octa3d.checkpoint.exports import CardError

    with pytest.raises(CardError, match="temperature .* is not a positive number") as err:
        _fp32_export(tmp_path, bad)
    assert "\n" not in str(err.value)
