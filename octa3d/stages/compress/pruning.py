"""Iterative magnitude pruning with ``torch.nn.utils.prune`` and the sparsity bookkeeping around it.

Two modes:

* ``unstructured``: :func:`torch.nn.utils.prune.global_unstructured` (L1) over the weights of every
  convolution and linear layer, so layers with many small weights lose more than small, important ones.
* ``structured``: :func:`torch.nn.utils.prune.ln_structured` (L2 norm, ``dim=0``) on every convolution: whole
  output channels are zeroed, the same fraction per layer (a global channel ranking would empty thin layers).

Rounds follow a geometric schedule: after round ``r`` of ``R`` the cumulative sparsity is
``1 - (1 - amount) ** (r / R)``; each round passes an *absolute count* to the pruning call, which PyTorch's
``PruningContainer`` applies to the still-unpruned weights/channels, so the final sparsity is exactly the
requested one (up to rounding to whole weights/channels).

Masks stay as forward pre-hooks during fine-tuning (pruned weights get no effective update) and are made
permanent with :func:`finalize`. FX quantization cannot trace pruning hooks, so the masks are carried over to the
QAT model by module name (:func:`masks_of` → :func:`apply_masks`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.utils.prune as prune
from torch import nn

log = logging.getLogger("octa3d.compress")

#: Module types whose ``weight`` is pruned (convolutions of any dimension and linear layers).
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (*CONV_TYPES, nn.Linear)


def prunable_modules(model: nn.Module, mode: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers a pruning mode touches.

    Args:
        model: the float network.
        mode: ``"unstructured"`` (conv + linear) or ``"structured"`` (conv only: output channels).
    """
    types = CONV_TYPES if mode == "structured" else PRUNABLE_TYPES
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


def cumulative_sparsity(amount: float, rounds: int, r: int) -> float:
    """Target sparsity after round ``r`` (1-based) of ``rounds`` (geometric schedule reaching ``amount``)."""
    return 1.0 - (1.0 - amount) ** (r / rounds)


def _pruned_channels(module: nn.Module) -> int:
    mask = getattr(module, "weight_mask", None)
    if mask is None:
        return 0
    return int((mask.flatten(1).sum(1) == 0).sum())


def prune_step(model: nn.Module, mode: str, target: float) -> dict[str, float]:
    """Prune ``model`` in place up to cumulative sparsity ``target`` (hooks added or extended).

    Args:
        model: the float network (may already carry masks from earlier rounds).
        mode: ``"unstructured"`` or ``"structured"``.
        target: cumulative fraction of weights (unstructured, over all conv/linear weights) or of output
            channels (structured, per conv layer) that are zero afterwards.

    Returns:
        :func:`sparsity` of the model after the step.
    """
    layers = prunable_modules(model, mode)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layers to prune in mode {mode!r}")
    if mode == "unstructured":
        total = sum(m.weight.numel() for _, m in layers)
        done = sum(int((m.weight_mask == 0).sum()) if hasattr(m, "weight_mask") else 0 for _, m in layers)
        extra = max(0, round(target * total) - done)
        # global: one magnitude threshold over all layers, applied to the still-unpruned weights
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                                  amount=extra)
    elif mode == "structured":
        for _, m in layers:
            channels = m.weight.shape[0]
            extra = max(0, round(target * channels) - _pruned_channels(m))
            prune.ln_structured(m, "weight", amount=extra, n=2, dim=0)
    else:
        raise ValueError(f"unknown pruning mode {mode!r}")
    return sparsity(model)


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current pruning masks by module name (modules with a ``weight_mask`` buffer)."""
    return {n: m.weight_mask.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Re-attach pruning masks by module name with :func:`torch.nn.utils.prune.custom_from_mask`.

    Used on the FX QAT model (its fused ``ConvBnReLU3d``/``Linear`` QAT modules keep the float modules' names and
    ``weight`` shapes): without the hooks, QAT training would regrow the pruned weights.

    Returns:
        The number of modules that got a mask.

    Raises:
        KeyError: a masked module name is missing in ``model`` (the graph was restructured).
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise KeyError(f"pruned module {name!r} not found in the quantization-aware model")
        mod = modules[name]
        prune.custom_from_mask(mod, "weight", mask.to(mod.weight.device, mod.weight.dtype))
    return len(masks)


def finalize(model: nn.Module) -> int:
    """Make every pruning mask permanent (:func:`torch.nn.utils.prune.remove`); returns how many were removed."""
    n = 0
    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
            n += 1
    return n


def sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of a float model (effective weights, i.e. with masks applied).

    Returns:
        ``weights`` (conv + linear), ``conv_weights``, ``conv_channels`` (output channels whose weights are all
        zero) and ``zero``/``total`` counts of conv + linear weights.
    """
    zero = total = czero = ctotal = ch_zero = ch_total = 0
    for m in model.modules():
        if not isinstance(m, PRUNABLE_TYPES):
            continue
        w = m.weight.detach()
        z = int((w == 0).sum())
        zero, total = zero + z, total + w.numel()
        if isinstance(m, CONV_TYPES):
            czero, ctotal = czero + z, ctotal + w.numel()
            ch_zero += int((w.flatten(1).abs().sum(1) == 0).sum())
            ch_total += w.shape[0]
    return {"weights": zero / max(1, total), "conv_weights": czero / max(1, ctotal),
            "conv_channels": ch_zero / max(1, ch_total), "zero": zero, "total": total}
