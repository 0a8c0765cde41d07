"""The model card of octa3d's deployable files, and reading those files back without their stage.

``--mode compress`` writes ``model_int8.pt`` (TorchScript int8, card embedded as the extra file
``model_card.json``), ``model_fp32.pt`` (TorchScript of the pruned fp32 model), ``model.onnx`` / ``model_int8.onnx``
and ``model_card.json`` beside them; ``--mode export`` writes ``model_fp32.ts`` (per fold: ``fold-k/``) with its card.
The card holds what rebuilds the inputs (classes, input shape/channels/modality, preprocessing), the calibration
temperature of the source checkpoint (``temperature``: probabilities are ``softmax(logits / temperature)``; the
record carries it too, so test/explain/predict calibrate exported files as they do checkpoints) and how to load and
call each file. :func:`load_exported` reads a TorchScript or ONNX file with its card;
:func:`octa3d.checkpoint.models.load_any_model` dispatches between these and octa3d checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from octa3d import __version__
from octa3d.errors import Octa3dError
from octa3d.utils.io import atomic_path, atomic_write_text

CARD_NAME = "model_card.json"
CARD_FORMAT = "octa3d-model-card-1"
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: Checkpoint entries copied into the model card's ``record`` (what test/explain need to rebuild inputs).
RECORD_KEYS = ("kind", "model_name", "dim", "in_channels", "num_classes", "class_names", "input_shape", "modality",
               "preprocess", "task", "config", "temperature")


class CardError(Octa3dError):
    """A compressed model's card is missing or is not an octa3d model card."""


@contextlib.contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Temporarily set ``torch.backends.quantized.engine`` (restored afterwards)."""
    old = torch.backends.quantized.engine
    if name not in torch.backends.quantized.supported_engines:
        raise Octa3dError(f"this PyTorch build has no '{name}' quantized engine (available: "
                          f"{', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


def sha256(path: str | Path) -> str:
    """SHA-256 of a file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _layout(dim: str) -> str:
    return "NCDHW" if dim == "3d" else "NCHW"


def checked_temperature(value: Any, where: str | Path) -> float | None:
    """A checkpoint's calibration temperature as a float (None: none was fitted).

    Raises:
        CardError: a value that is not a positive finite number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CardError(f"{where}: temperature {value!r} is not a positive number; re-run --mode train for this "
                        "experiment")
    return float(value)


def build_card(ckpt: dict[str, Any], source: str | Path, backend: str | None) -> dict[str, Any]:
    """The model card of an experiment's exported models (``artifacts`` are added as files are written).

    Args:
        ckpt: the source classifier checkpoint (its record: classes, input, preprocessing, config, temperature).
        source: path of that checkpoint.
        backend: ``--qbackend`` of an int8 TorchScript model; None when the card describes float files only.
    """
    record = {k: ckpt[k] for k in RECORD_KEYS if k in ckpt}
    temperature = checked_temperature(ckpt.get("temperature"), source)
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
                   "meaning": "logits; softmax over axis 1 gives class probabilities in class_names order"
                              + ("" if temperature is None else "; softmax(logits / temperature) gives the "
                                 "calibrated probabilities octa3d reports")},
        # temperature scaling fitted on the validation split at the end of training (None: not fitted)
        "temperature": temperature,
        # inference preprocessing only: the cache folder and training augmentation do not apply to a deployment
        "preprocess": {k: v for k, v in (ckpt.get("preprocess") or {}).items() if k not in ("cache_dir", "augment")},
        "quantized_engine": backend,
        "record": record,
        "artifacts": {},
    }


def usage(file: str, fmt: str, backend: str | None = None) -> str:
    """Python lines that load and call one compressed file without octa3d."""
    if fmt == "torchscript" and not backend:
        return (f"import torch; m = torch.jit.load('{file}').eval(); "
                f"probs = torch.softmax(m(x) / card['temperature'], 1)  # x: float32 tensor shaped like "
                "input.shape; temperature 1 when null")
    if fmt == "torchscript":
        return (f"import torch; torch.backends.quantized.engine = '{backend}'; "
                f"m = torch.jit.load('{file}').eval(); "
                f"probs = torch.softmax(m(x), 1)  # x: float32 tensor shaped like input.shape")
    if fmt == "onnx":
        return (f"import onnxruntime as ort, numpy as np; s = ort.InferenceSession('{file}'); "
                f"logits = s.run(None, {{'{INPUT_NAME}': x}})[0]  # x: float32 numpy array shaped like input.shape")
    return (f"from octa3d.checkpoint.models import load_any_model; m, record, _ = load_any_model('{file}'); "
            f"probs = torch.softmax(m(x), 1)")


def add_artifact(card: dict[str, Any], path: Path, fmt: str, precision: str, **extra: Any) -> None:
    """Describe one written file in the card (size, hash, how to load it)."""
    card["artifacts"][path.name] = {
        "format": fmt, "precision": precision, "bytes": path.stat().st_size, "sha256": sha256(path),
        "usage": usage(path.name, fmt, card.get("quantized_engine") if precision.startswith("int8") else None),
        **extra,
    }


def save_torchscript_fp32(model: nn.Module, example: torch.Tensor, path: Path, card: dict[str, Any] | None = None,
                          extra_files: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    """Trace a float model on the CPU and save it atomically (``card`` embedded as ``model_card.json``, plus any
    ``extra_files``, e.g. a MONAI bundle's ``metadata.json``).

    EfficientNet's memory-efficient swish is an autograd function tracing cannot record: switched off first.
    """
    model = model.cpu().eval()
    for m in model.modules():
        if hasattr(m, "set_swish"):
            m.set_swish(memory_efficient=False)
    with torch.no_grad():
        traced = torch.jit.trace(model, example.cpu().float(), check_trace=False)
        extra = {CARD_NAME: json.dumps(card, default=str)} if card is not None else {}
        extra.update(extra_files or {})
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files=extra)
    return traced


def write_card(card: dict[str, Any], folder: Path) -> Path:
    """Write ``model_card.json`` atomically."""
    return atomic_write_text(folder / CARD_NAME, json.dumps(card, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ reading
def _check_size(path: Path, info: dict[str, Any]) -> None:
    """Compare the file with the size its card recorded (a cut copy is named as such, before any parser runs)."""
    want, have = info.get("bytes"), path.stat().st_size
    if isinstance(want, int) and want != have:
        raise CardError(f"{path} is {have} bytes but its model card records {want}: the file is truncated or was "
                        "replaced; copy it again or re-run --mode compress or --mode export")


def _unloadable(path: Path, what: str, exc: Exception) -> CardError:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return CardError(f"{path} is not {what} ({type(exc).__name__}: {first[:160]}); the file is truncated or damaged: "
                     "copy it again or re-run --mode compress or --mode export")


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


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is laid out like a TorchScript archive (a zip with ``constants.pkl`` or ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def embedded_card(path: Path) -> str | None:
    """The model card that :func:`save_torchscript` stored inside a TorchScript archive (``<name>/extra/``)."""
    try:
        with zipfile.ZipFile(path) as z:
            hits = [n for n in z.namelist() if n.endswith(f"/extra/{CARD_NAME}")]
            return z.read(hits[0]).decode() if hits else None
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise CardError(f"{path}: damaged archive ({exc}); the file is truncated or not a TorchScript model: copy "
                        "it again or re-run --mode compress or --mode export") from exc


def read_card(path: Path, embedded: str | None = None) -> dict[str, Any]:
    """The model card beside ``path`` (or the one embedded in it).

    Raises:
        CardError: no card, a card that is not JSON, or not an octa3d card.
    """
    side = path.parent / CARD_NAME
    try:
        if side.is_file():
            card = json.loads(side.read_text(encoding="utf-8"))
        elif embedded:
            card = json.loads(embedded)
        else:
            card = None
    except (ValueError, OSError) as exc:
        raise CardError(f"{side if side.is_file() else path}: the model card is not valid JSON ({exc}); copy "
                        "model_card.json again from the compress folder") from exc
    if card is None:
        raise CardError(f"{path}: no {CARD_NAME} beside it; a compressed model needs its model card "
                        f"(classes, input shape, preprocessing) — copy it from the compress folder")
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        fmt = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise CardError(f"{side}: not an octa3d model card (format {fmt!r})")
    return card


def load_exported(path: Path, threads: int | None = None) -> tuple[nn.Module, dict[str, Any], bool]:
    """Load an exported TorchScript or ONNX file with its card (see :func:`octa3d.checkpoint.models.load_any_model`).

    Raises:
        CardError: no card beside or inside the file, or not an octa3d card; a file shorter or longer than its
            card records, or one that onnxruntime / ``torch.jit.load`` cannot load (truncated, or a look-alike).
    """
    if path.suffix.lower() == ".onnx":
        card = read_card(path)
        info = card.get("artifacts", {}).get(path.name, {})
        _check_size(path, info)
        record = {**card["record"], "artifact_format": "onnx", "artifact": info, "device": "cpu",
                  "cam_capable": False, "card": card}
        if "temperature" not in record and card.get("temperature") is not None:
            record["temperature"] = card["temperature"]
        is_q = str(info.get("precision", "int8" if "int8" in path.name else "fp32")).startswith("int8")
        try:
            session = OnnxModule(path, threads)
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise _unloadable(path, "an ONNX model onnxruntime can load", exc) from exc
        return session.eval(), record, is_q
    card = read_card(path, embedded_card(path))
    info = card.get("artifacts", {}).get(path.name, {})
    _check_size(path, info)
    is_q = str(info.get("precision", "int8")).startswith("int8")
    # int8 weights are repacked for the engine that is active while loading: set it first, and leave it set.
    # An fp32 file needs no engine (and a card of float files records none).
    engine = card.get("quantized_engine", "x86") if is_q else None
    try:
        with quantized_engine(engine) if engine else contextlib.nullcontext():
            model = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise _unloadable(path, "a TorchScript model", exc) from exc
    if engine:
        torch.backends.quantized.engine = engine
    record = {**card["record"], "artifact_format": "torchscript", "artifact": info, "device": "cpu",
              "cam_capable": False, "card": card}
    if "temperature" not in record and card.get("temperature") is not None:
        record["temperature"] = card["temperature"]
    return model.eval(), record, is_q
