"""Writers of the deployable files of ``--mode compress`` (read back by
:func:`octa3d.checkpoint.models.load_any_model`).

Files (all in ``runs/<exp>/compress/``, written atomically):

* ``model_int8.pt``: TorchScript (``torch.jit.trace``) of the FX-converted int8 model; the model card is embedded
  as the extra file ``model_card.json``.
* ``model_fp32.pt``: TorchScript of the pruned fp32 model (:func:`octa3d.checkpoint.exports.save_torchscript_fp32`).
* ``model.onnx``: the pruned fp32 model, ``torch.onnx.export(dynamo=False, opset_version=17)``, dynamic batch.
* ``model_int8.onnx``: onnxruntime static QDQ quantization of ``model.onnx`` (int8 weights per channel, int8
  activations), calibrated on training samples.
* ``pruned.pt``: the pruned fp32 model as an octa3d checkpoint.
* ``model_card.json``: classes, input shape/channels/modality, preprocessing, how to load and call each file.

Everything a user needs without octa3d: ``torch.jit.load`` / ``onnxruntime.InferenceSession``, an input of shape
``(N, C, D, H, W)`` float32 made as the card's ``preprocess`` section says, softmax over the output logits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from octa3d.checkpoint.exports import CARD_NAME, INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, quantized_engine
from octa3d.stages.compress.quantize import packing_engine, quiet
from octa3d.utils.io import atomic_path

log = logging.getLogger("octa3d.compress")


# ------------------------------------------------------------------------------------------------ writers
def save_torchscript(model: nn.Module, example: torch.Tensor, path: Path, card: dict[str, Any],
                     backend: str) -> torch.jit.ScriptModule:
    """Trace the int8 model and save it (card embedded as extra file ``model_card.json``).

    Tracing and saving use the packing engine (qnnpack cannot serialize 3D conv weights; see
    :mod:`octa3d.stages.compress.quantize`); the file is loaded with ``backend`` as engine.
    """
    with quiet(), quantized_engine(packing_engine(backend)), torch.no_grad():
        traced = torch.jit.trace(model.eval(), example.cpu(), check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={CARD_NAME: json.dumps(card, default=str)})
    return traced


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export a float model to ONNX (opset 17, TorchScript-based exporter, dynamic batch axis)."""
    with quiet(), atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(model.cpu().eval(), (example.cpu(),), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    return path


class _Calibration:
    """onnxruntime ``CalibrationDataReader`` over preprocessed training volumes."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._it = iter([{INPUT_NAME: b.astype(np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - MinMax calibration reads once
        pass


def quantize_onnx(src: Path, dest: Path, calibration: list[np.ndarray]) -> dict[str, Any]:
    """Static int8 QDQ quantization of an ONNX model with onnxruntime.

    Args:
        src: fp32 ONNX file.
        dest: int8 ONNX file to write.
        calibration: input arrays ``(1, C, *spatial)`` from the training split (MinMax calibration).

    Returns:
        The settings used (for the report).
    """
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(calibration)
    settings = {"tool": "onnxruntime.quantization.quantize_static", "quant_format": "QDQ",
                "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
                "calibrate_method": "MinMax", "calibration_samples": len(calibration), "pre_process": True}
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmpdir:
        pre = Path(tmpdir) / "pre.onnx"
        try:  # shape inference + graph optimisation (fuses BatchNorm into Conv) before quantizing
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # pragma: no cover - depends on the graph
            log.warning("onnxruntime quant_pre_process failed (%s); quantizing the unprocessed model", exc)
            pre, settings["pre_process"] = src, False
        with quiet(), atomic_path(dest) as tmp:
            quantize_static(str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return settings


