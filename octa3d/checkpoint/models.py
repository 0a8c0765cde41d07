"""Models from files: rebuild a classifier from its checkpoint, load any model file octa3d writes (checkpoints,
TorchScript / ONNX exports with their card), find an experiment's checkpoints and load an ensemble of them.

Stages read models through this module: :func:`find_checkpoints` (an experiment's ``best.pt`` or its fold
models), :func:`load_models` (an ensemble, checked for agreement, as :class:`LoadedModel` records) and
:func:`place_models`.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from octa3d.checkpoint import exports
from octa3d.checkpoint.io import CheckpointError, load_checkpoint
from octa3d.config import Config
from octa3d.model import create_model, get_spec

log = logging.getLogger("octa3d.checkpoint")


class LoadedModel(NamedTuple):
    """One loaded member of an ensemble."""

    name: str  #: ``best``, ``fold-k`` or ``checkpoint``
    path: Path  #: the file it was read from
    record: dict[str, Any]  #: checkpoint-like record (see :func:`load_any_model`), with ``is_quantized``
    model: nn.Module  #: eval mode


#: An ensemble as :func:`load_models` returns it.
Models = list[LoadedModel]


def build_classifier(ckpt: dict[str, Any], path: Path | str, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a classifier from its checkpoint record and weights (eval mode, on ``device``).

    Raises:
        CheckpointError: the weights do not fit the recorded architecture.
    """
    legacy = get_spec(ckpt["model_name"]).legacy_kwargs
    kwargs = {**(legacy(ckpt["state_dict"]) if legacy else {}), **(ckpt.get("model_kwargs") or {})}
    model = create_model(ckpt["model_name"], ckpt["dim"], ckpt["in_channels"], ckpt["num_classes"],
                         input_size=tuple(ckpt["input_shape"]), **kwargs)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {ckpt['model_name']} ({str(exc)[:200]}); the "
                              f"checkpoint is from another octa3d version or was edited") from exc
    return model.to(device).eval()


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
    # a .ts export cut short no longer looks like TorchScript: its card still says what it should be
    if p.suffix.lower() == ".onnx" or exports.is_torchscript(p) or (
            p.suffix.lower() == ".ts" and (p.parent / exports.CARD_NAME).is_file()):
        try:
            return exports.load_exported(p, threads)
        except exports.CardError as exc:
            raise CheckpointError(str(exc)) from exc
    ckpt = load_checkpoint(p, kind="classifier")
    model = build_classifier(ckpt, p, torch.device(device))
    for key in ("optimizer", "scheduler", "scaler"):
        ckpt.pop(key, None)
    ckpt.update(artifact_format="octa3d-checkpoint", device=str(device), cam_capable=True)
    return model, ckpt, False


# ---------------------------------------------------------------------------------------------------- finding
def fold_of(path: str | Path) -> int | None:
    """The fold number of a path inside a ``fold-k`` folder (the innermost one), or None."""
    hits = [int(m.group(1)) for part in Path(path).parts if (m := re.fullmatch(r"fold-(\d+)", part))]
    return hits[-1] if hits else None


def find_checkpoints(cfg: Config) -> list[tuple[str, Path]]:
    """The classifier checkpoint(s) to use: ``--checkpoint``, else ``train/checkpoints/best.pt``, else every
    ``train/fold-k/checkpoints/best.pt`` (an ensemble).

    Returns:
        ``[(name, path)]``; names are ``"checkpoint"``, ``"best"`` or ``"fold-k"``.

    Raises:
        CheckpointError: nothing to evaluate, or a fold without its best.pt (names the paths and the fix).
    """
    if cfg.eval.checkpoint:
        p = Path(cfg.eval.checkpoint)
        if not p.is_file():
            raise CheckpointError(f"--checkpoint {p}: file not found")
        return [("checkpoint", p)]
    train = cfg.run_dir / "train"
    single = train / "checkpoints" / "best.pt"
    if single.is_file():
        return [("best", single)]
    folds = sorted((d for d in train.glob("fold-*") if d.is_dir() and fold_of(d) is not None), key=fold_of)
    if folds:
        missing = [str(d / "checkpoints" / "best.pt") for d in folds if not (d / "checkpoints" / "best.pt").is_file()]
        if missing:
            raise CheckpointError(f"fold checkpoint(s) missing: {', '.join(missing)}; finish --mode train for "
                                  f"experiment '{cfg.exp_name}' (or pass --checkpoint FILE to use one model)")
        return [(d.name, d / "checkpoints" / "best.pt") for d in folds]
    raise CheckpointError(f"no trained model for experiment '{cfg.exp_name}': {single} does not exist (nor "
                          f"{train}/fold-k/checkpoints/best.pt). Run --mode train with the same --exp/--runs-dir "
                          f"first, or pass --checkpoint FILE")


def load_models(paths: list[tuple[str, Path]], device: torch.device | str = "cpu") -> tuple[Models, dict[str, Any]]:
    """Load every model of an ensemble (:func:`load_any_model`) and check that they agree on classes, model and
    preprocessing.

    Returns:
        The members (:class:`LoadedModel`) and the first record (the reference); records get ``is_quantized``.
    """
    out = []
    ref: dict[str, Any] | None = None
    for name, path in paths:
        model, rec, is_q = load_any_model(path, device)
        rec["is_quantized"] = is_q
        if ref is None:
            ref = rec
        else:
            for key in ("class_names", "model_name", "dim", "in_channels", "input_shape", "modality", "preprocess"):
                if rec.get(key) != ref.get(key):
                    raise CheckpointError(f"{path}: {key} {rec.get(key)!r} differs from {paths[0][1]} "
                                          f"({ref.get(key)!r}); fold checkpoints of one ensemble must match")
        out.append(LoadedModel(name, Path(path), rec, model))
    if ref is None:
        raise CheckpointError("no model to load")
    return out, ref


def place_models(models: Models, device: torch.device) -> torch.device:
    """Move float models to ``device``; int8 TorchScript and ONNX models run on the CPU, and so does the whole
    evaluation when one is in the set. Returns the device inputs go to."""
    if any(m.record["device"] == "cpu" and not m.record["cam_capable"] for m in models):
        if device.type != "cpu":
            log.info("evaluating on the CPU: %s runs on the CPU only", models[0].path.name)
        return torch.device("cpu")
    for m in models:
        m.model.to(device)
    return device


# ---------------------------------------------------------------------------------------------------- records
def temperatures(models: Models) -> dict[str, float | None]:
    """Each model's fitted temperature (None: the checkpoint has none, e.g. trained before temperature scaling).

    Raises:
        CheckpointError: a recorded temperature that is not a positive finite number.
    """
    out: dict[str, float | None] = {}
    for m in models:
        name, path, rec = m.name, m.path, m.record
        t = rec.get("temperature")
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise CheckpointError(f"{path}: temperature {t!r} is not a positive number; re-run --mode train for "
                                  f"this experiment or use --no-calibrate")
        out[name] = None if t is None else float(t)
    return out


def entropy_threshold_of(models: Models, calibrated: bool) -> float | None:
    """The ``uncertain`` threshold: the mean over the models of their validation entropy threshold (the raw one
    under ``calibrated=False``); None when a checkpoint has none (a checkpoint written before uncertainty flags existed: no flag)."""
    key = "entropy_threshold" if calibrated else "entropy_threshold_raw"
    ths = [m.record.get(key) for m in models]
    return float(np.mean(ths)) if ths and all(t is not None for t in ths) else None
