"""Deployable files of ``--mode compress`` and :func:`load_any_model`, which reads any of them back.

Files (all in ``runs/<exp>/compress/``, written atomically):

* ``model_int8.pt``: TorchScript (``torch.jit.trace``) of the FX-converted int8 model; the model card is embedded
  as the extra file ``model_card.json``.
* ``model.onnx``: the pruned fp32 model, ``torch.onnx.export(dynamo=False, opset_version=17)``, dynamic batch.
* ``model_int8.onnx``: onnxruntime static QDQ quantization of ``model.onnx`` (int8 weights per channel, int8
  activations), calibrated on training samples.
* ``pruned.pt``: the pruned fp32 model as an octa3d checkpoint.
* ``model_card.json``: classes, input shape/channels/modality, preprocessing, how to load and call each file.

Everything a user needs without octa3d: ``torch.jit.load`` / ``onnxruntime.InferenceSession``, an input of shape
``(N, C, D, H, W)`` float32 made as the card's ``preprocess`` section says, softmax over the output logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from octa3d.compress.quantize import packing_engine, quantized_engine, quiet
from octa3d.engine import CheckpointError
from octa3d.errors import ConfigError
from octa3d.utils.io import atomic_path, atomic_write_text

log = logging.getLogger("octa3d.compress")

CARD_NAME = "model_card.json"
CARD_FORMAT = "octa3d-model-card-1"
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: Checkpoint entries copied into the model card's ``record`` (what test/explain need to rebuild inputs).
RECORD_KEYS = ("kind", "model_name", "dim", "in_channels", "num_classes", "class_names", "input_shape", "modality",
               "preprocess", "task", "config")


def sha256(path: str | Path) -> str:
    """SHA-256 of a file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _layout(dim: str) -> str:
    return "NCDHW" if dim == "3d" else "NCHW"


def build_card(ckpt: dict[str, Any], source: str | Path, backend: str) -> dict[str, Any]:
    """The model card of an experiment's compressed models (``artifacts`` are added as files are written).

    Args:
        ckpt: the source classifier checkpoint (its record: classes, input, preprocessing, config).
        source: path of that checkpoint.
        backend: ``--qbackend`` of the int8 TorchScript model.
    """
    from octa3d import __version__

    record = {k: ckpt[k] for k in RECORD_KEYS if k in ckpt}
    names = list(ckpt["class_names"])
    shape = [int(ckpt["in_channels"]), *map(int, ckpt["input_shape"])]
    return {
        "format": CARD_FORMAT,
        "octa3d_version": __version__,
        "torch_version": torch.__version__,
        "source_checkpoint": str(source),
        "task": ckpt.get("task"),
        "class_names": names,
        "positive_class": names[1] if len(names) == 2 else None,
        "input": {
            "name": INPUT_NAME, "shape": ["N", *shape], "dtype": "float32", "layout": _layout(ckpt["dim"]),
            "in_channels": int(ckpt["in_channels"]), "spatial_shape": list(map(int, ckpt["input_shape"])),
            "modality": ckpt.get("modality"),
            "values": "intensities clipped at the preprocess.clip_percentiles of each scan and scaled to 0..1, "
                      "after the retinal slab crop and resize of the preprocess settings",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(names)], "dtype": "float32",
                   "meaning": "logits; softmax over axis 1 gives class probabilities in class_names order"},
        # inference preprocessing only: the cache folder and training augmentation do not apply to a deployment
        "preprocess": {k: v for k, v in (ckpt.get("preprocess") or {}).items() if k not in ("cache_dir", "augment")},
        "quantized_engine": backend,
        "record": record,
        "artifacts": {},
    }


def usage(file: str, fmt: str, backend: str | None = None) -> str:
    """Python lines that load and call one compressed file without octa3d."""
    if fmt == "torchscript":
        return (f"import torch; torch.backends.quantized.engine = '{backend}'; "
                f"m = torch.jit.load('{file}').eval(); "
                f"probs = torch.softmax(m(x), 1)  # x: float32 tensor shaped like input.shape")
    if fmt == "onnx":
        return (f"import onnxruntime as ort, numpy as np; s = ort.InferenceSession('{file}'); "
                f"logits = s.run(None, {{'{INPUT_NAME}': x}})[0]  # x: float32 numpy array shaped like input.shape")
    return (f"from octa3d.compress import load_any_model; m, record, _ = load_any_model('{file}'); "
            f"probs = torch.softmax(m(x), 1)")


def add_artifact(card: dict[str, Any], path: Path, fmt: str, precision: str, **extra: Any) -> None:
    """Describe one written file in the card (size, hash, how to load it)."""
    card["artifacts"][path.name] = {
        "format": fmt, "precision": precision, "bytes": path.stat().st_size, "sha256": sha256(path),
        "usage": usage(path.name, fmt, card.get("quantized_engine")), **extra,
    }


def write_card(card: dict[str, Any], folder: Path) -> Path:
    """Write ``model_card.json`` atomically."""
    return atomic_write_text(folder / CARD_NAME, json.dumps(card, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ writers
def save_torchscript(model: nn.Module, example: torch.Tensor, path: Path, card: dict[str, Any],
                     backend: str) -> torch.jit.ScriptModule:
    """Trace the int8 model and save it (card embedded as extra file ``model_card.json``).

    Tracing and saving use the packing engine (qnnpack cannot serialize 3D conv weights; see
    :mod:`octa3d.compress.quantize`); the file is loaded with ``backend`` as engine.
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


# ------------------------------------------------------------------------------------------------ loading
class OnnxModule(nn.Module):
    """An onnxruntime session behind the ``nn.Module`` call interface (CPU; ``(N, C, ...)`` → logits).

    Args:
        path: ``.onnx`` file.
        threads: intra-op threads (None: onnxruntime's default).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits as a float32 CPU tensor."""
        arr = x.detach().cpu().float().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _embedded_card(path: Path) -> str | None:
    """The model card that :func:`save_torchscript` stored inside a TorchScript archive (``<name>/extra/``)."""
    with zipfile.ZipFile(path) as z:
        hits = [n for n in z.namelist() if n.endswith(f"/extra/{CARD_NAME}")]
        return z.read(hits[0]).decode() if hits else None


def _card_for(path: Path, embedded: str | None = None) -> dict[str, Any]:
    side = path.parent / CARD_NAME
    if side.is_file():
        card = json.loads(side.read_text(encoding="utf-8"))
    elif embedded:
        card = json.loads(embedded)
    else:
        raise CheckpointError(f"{path}: no {CARD_NAME} beside it; a compressed model needs its model card "
                              f"(classes, input shape, preprocessing) — copy it from the compress folder")
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{side}: not an octa3d model card (format {card.get('format')!r})")
    return card


def load_any_model(path: str | Path, device: str | torch.device = "cpu", threads: int | None = None
                   ) -> tuple[nn.Module, dict[str, Any], bool]:
    """Load an octa3d classifier checkpoint or a compressed model of ``--mode compress``.

    Args:
        path: ``train/.../best.pt``, ``compress/pruned.pt`` (octa3d checkpoints, float), ``compress/model_int8.pt``
            (TorchScript int8) or ``compress/model.onnx`` / ``model_int8.onnx`` (onnxruntime).
        device: device of float PyTorch models; int8 TorchScript and ONNX models always run on the CPU.
        threads: onnxruntime intra-op threads (ONNX files only).

    Returns:
        ``(model, record, is_quantized)``. ``model`` is in eval mode and maps ``(N, C, *spatial)`` float32 to logits.
        ``record`` is checkpoint-like (``model_name``, ``dim``, ``in_channels``, ``num_classes``, ``class_names``,
        ``input_shape``, ``modality``, ``preprocess``, ``task``, ``config``; checkpoints also keep ``state_dict``
        etc.) plus ``artifact_format`` (``octa3d-checkpoint``/``torchscript``/``onnx``), ``device`` (where the
        model runs) and ``cam_capable`` (a float PyTorch model: Grad-CAM possible).

    Raises:
        CheckpointError: missing/unreadable file, or a compressed file without its model card.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"model file {p} not found")
    if p.suffix.lower() == ".onnx":
        card = _card_for(p)
        info = card.get("artifacts", {}).get(p.name, {})
        record = {**card["record"], "artifact_format": "onnx", "artifact": info, "device": "cpu",
                  "cam_capable": False, "card": card}
        is_q = str(info.get("precision", "int8" if "int8" in p.name else "fp32")).startswith("int8")
        return OnnxModule(p, threads).eval(), record, is_q
    if _is_torchscript(p):
        card = _card_for(p, _embedded_card(p))
        engine = card.get("quantized_engine", "x86")
        # int8 weights are repacked for the engine that is active while loading: set it first, and leave it set
        with quantized_engine(engine):
            model = torch.jit.load(str(p), map_location="cpu")
        torch.backends.quantized.engine = engine
        info = card.get("artifacts", {}).get(p.name, {})
        record = {**card["record"], "artifact_format": "torchscript", "artifact": info, "device": "cpu",
                  "cam_capable": False, "card": card}
        return model.eval(), record, str(info.get("precision", "int8")).startswith("int8")
    from octa3d.engine import load_checkpoint
    from octa3d.test import build_classifier

    ckpt = load_checkpoint(p, kind="classifier")
    model = build_classifier(ckpt, p, torch.device(device))
    for key in ("optimizer", "scheduler", "scaler"):
        ckpt.pop(key, None)
    ckpt.update(artifact_format="octa3d-checkpoint", device=str(device), cam_capable=True)
    return model, ckpt, False


def check_cam_capable(path: str | Path, record: dict[str, Any], is_quantized: bool) -> None:
    """Refuse Grad-CAM on a model without float PyTorch gradients (int8 TorchScript, ONNX).

    Raises:
        ConfigError: naming the file and the float model to explain instead.
    """
    if record.get("cam_capable") and not is_quantized:
        return
    p = Path(path)
    why = ("an int8 model: quantized kernels have no gradients" if is_quantized
           else f"a {record.get('artifact_format')} model: Grad-CAM needs gradients of a PyTorch float model")
    alt = p.parent / "pruned.pt"
    hint = f"{alt} (the same network before int8 conversion)" if alt.is_file() else "the experiment's float checkpoint"
    raise ConfigError(f"--checkpoint {p}: class activation maps need a float model, and this is {why}. Explain "
                      f"{hint} or train/checkpoints/best.pt instead, or use --cam none")
