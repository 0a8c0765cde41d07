"""Initialising a model from a local weight file (``--init-from``): MedicalNet, torchvision, our own checkpoints.

Nothing is downloaded: MONAI's ``pretrained=True`` paths fail offline, so pretrained weights come as files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from octa3d.errors import ConfigError

logger = logging.getLogger("octa3d.model")

_NESTED_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network", "encoder_state")
_STRIP_PREFIXES = ("", "encoder.", "model.", "net.")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensor dictionary inside a checkpoint: itself, or nested under a usual key (depth-first)."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if key in obj:
                found = _find_state_dict(obj[key])
                if found is not None:
                    return found
        # MedicalNet-style files sometimes mix tensors with metadata: keep the tensors
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    return None


def _strip_module(key: str) -> str:
    # DataParallel/DDP checkpoints (MedicalNet among them) prefix every key with "module."
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def load_init_weights(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Initialise ``model`` from a local weight file (``--init-from``), copying tensors whose names and shapes match.

    Accepts a bare state dict or one nested under ``state_dict``/``model``/... (e.g. MedicalNet
    ``{"state_dict": {"module.conv1.weight": ...}}``), with or without ``module.`` prefixes, and our own AE
    checkpoints (``encoder.`` prefix). Loaded with ``torch.load(weights_only=True)``: no code runs.

    Args:
        model: the freshly built model.
        path: ``.pth``/``.pt`` file.

    Returns:
        ``(loaded, skipped)``: model keys that were copied, and file keys that were not (unknown name or other
        shape).

    Raises:
        ConfigError: the file is missing, unreadable, holds no tensors, or none of them fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--init-from: weight file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, not a torch file ...
        raise ConfigError(f"--init-from: cannot read '{path}' as PyTorch weights "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    state = _find_state_dict(obj)
    if state is None:
        raise ConfigError(f"--init-from: '{path}' holds no tensors (expected a state dict, possibly under "
                          f"one of {', '.join(_NESTED_KEYS)})")
    original = {_strip_module(k): k for k in state}  # report skipped tensors under their names in the file
    state = {_strip_module(k): v for k, v in state.items()}
    own = model.state_dict()

    # pick the key prefix under which the file fits the model best (AE checkpoints: "encoder.")
    def fitting(prefix: str) -> dict[str, str]:
        out = {}
        for k, v in state.items():
            name = k[len(prefix):]
            if k.startswith(prefix) and name in own and tuple(own[name].shape) == tuple(v.shape):
                out[name] = k
        return out

    matched = max((fitting(p) for p in _STRIP_PREFIXES), key=len)
    if not matched:
        raise ConfigError(f"--init-from: none of the {len(state)} tensors in '{path}' match the model by name and "
                          f"shape (file keys start with {sorted(state)[:3]}, model keys with {list(own)[:3]})")
    model.load_state_dict({name: state[k] for name, k in matched.items()}, strict=False)
    loaded = list(matched)
    used = set(matched.values())
    skipped = [original[k] for k in state if k not in used]
    untouched = len(own) - len(loaded)
    logger.info("--init-from %s: loaded %d tensors, skipped %d from the file, %d model tensors keep their "
                "random init", path, len(loaded), len(skipped), untouched)
    if skipped:
        logger.info("skipped (name or shape differs): %s", ", ".join(skipped[:50]) +
                    (f" ... (+{len(skipped) - 50})" if len(skipped) > 50 else ""))
    return loaded, skipped
