"""Quantization of Linear-dominated networks (the ViTs): torchao QAT, then int8 kernels for the Linear layers.

Which path a model takes (:func:`quantization_path`): the FX path of :mod:`~octa3d.stages.compress.quantize`
quantizes convolutions and needs a symbolically traceable network (the CNNs). A ViT is neither: almost all its
weights are ``nn.Linear`` (96 % of ViT-B/16's conv + linear weights; the rest is the patch-embedding convolution)
and its forward checks the input size, which FX cannot trace. torchao covers exactly these layers:

1. **QAT** with torchao 0.18: ``quantize_(model, QATConfig(BASE, step="prepare"))`` swaps every ``nn.Linear`` for a
   ``FakeQuantizedLinear`` that simulates ``BASE`` = :func:`base_config` (int8 per-token asymmetric dynamic
   activations, int8 per-output-channel symmetric weights) while the model fine-tunes; pruning masks are
   re-attached by module name, so pruned weights stay zero. ``QATConfig(step="convert")`` without a base config
   swaps back to plain ``nn.Linear`` holding the QAT-trained weights.
2. **torchao int8** (:func:`torchao_int8`): ``quantize_(model, BASE)`` gives the int8 model whose numerics the QAT
   simulated. Its weights are tensor subclasses, which ``torch.jit.trace`` cannot export, and on a CPU without
   ``torch.compile`` its kernels are slower than fp32; it is evaluated in-process as a report row.
3. **The deployable int8 file** (:func:`convert_dynamic`): PyTorch's dynamic quantization of the same QAT-trained
   Linear layers (``quantize_dynamic`` with per-channel int8 weights, activations quantized per call) runs on the
   fbgemm/oneDNN/qnnpack int8 GEMMs and is traced to TorchScript like the FX model (``model_int8.pt``). Its weights
   are quantized as in QAT; its activations per tensor rather than per token, so it is close to, not identical
   with, what QAT simulated (the report compares both rows on the hold-out set). The patch embedding, LayerNorms
   and attention softmax stay float.
"""

from __future__ import annotations

import copy
import io
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from octa3d.checkpoint.exports import quantized_engine
from octa3d.errors import Octa3dError
from octa3d.stages.compress.quantize import packing_engine, quiet

log = logging.getLogger("octa3d.compress")

#: Models whose conv + linear weights are at least this share ``nn.Linear`` take the torchao path.
LINEAR_SHARE = 0.5
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

BASE_CONFIG_TEXT = ("Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)): "
                    "int8 per-token asymmetric dynamic activations, int8 per-output-channel symmetric weights")
NOTE = ("torchao QAT applied to every nn.Linear (" + BASE_CONFIG_TEXT + "). model_int8.pt runs the QAT-trained "
        "Linear layers with PyTorch dynamic int8 quantization (per-channel weights as in QAT, activations quantized "
        "per tensor at run time), because torch.jit.trace cannot export torchao's tensor-subclass weights; the "
        "'torchao_int8' row is torchao's own int8 model (the numerics QAT simulated), evaluated in-process.")


def _torchao() -> Any:
    """``import torchao`` without its import-time warnings (CUDA-only kernel libraries that a CPU machine cannot
    load, no Triton, pytree deprecations): they concern kernels this path does not use."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with quiet():
            import torchao
            import torchao.quantization.qat  # noqa: F401
        return torchao
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def linear_share(model: nn.Module) -> float:
    """Fraction of the conv + linear weights that sit in ``nn.Linear`` layers."""
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, _CONV))
    return lin / max(1, lin + conv)


def quantization_path(model: nn.Module) -> str:
    """``"torchao"`` for Linear-dominated models (ViT), ``"fx"`` for convolutional ones (see module docstring)."""
    return "torchao" if linear_share(model) >= LINEAR_SHARE else "fx"


def base_config() -> Any:
    """The torchao int8 scheme QAT simulates and :func:`torchao_int8` applies."""
    _torchao()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def prepare_qat(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers fake-quantize (torchao ``QATConfig`` prepare step).

    Module names are kept, so pruning masks re-attach by name. Raises ``Octa3dError`` without Linear layers.
    """
    _torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig


    net = copy.deepcopy(model).cpu().train()
    if not any(isinstance(m, nn.Linear) for m in net.modules()):
        raise Octa3dError(f"model {type(model).__name__} has no nn.Linear layer for torchao QAT")
    with quiet():
        quantize_(net, QATConfig(base_config(), step="prepare"))
    return net


def fake_quantized_layers(prepared: nn.Module) -> int:
    """Number of torchao fake-quantized Linear layers in a :func:`prepare_qat` model."""
    return sum(type(m).__name__.endswith("FakeQuantizedLinear") for m in prepared.modules())


def strip_fake_quant(prepared: nn.Module) -> nn.Module:
    """torchao's convert step without a base config: plain ``nn.Linear`` layers with the QAT-trained weights
    (pruning hooks must be removed first)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    with quiet():
        quantize_(prepared, QATConfig(step="convert"))
    return prepared.eval()


def torchao_int8(model: nn.Module) -> nn.Module:
    """A copy of the float ``model`` with torchao int8 Linear weights (:func:`base_config`), on the CPU."""
    from torchao.quantization import quantize_

    net = copy.deepcopy(model).cpu().eval()
    with quiet():
        quantize_(net, base_config())
    return net


def convert_dynamic(model: nn.Module, backend: str) -> nn.Module:
    """PyTorch dynamic int8 quantization of every ``nn.Linear`` (per-channel weights), packed for
    :func:`~octa3d.stages.compress.quantize.packing_engine` like the FX model."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    net = copy.deepcopy(model).cpu().eval()
    with quiet(), quantized_engine(packing_engine(backend)):
        return quantize_dynamic(net, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def state_dict_bytes(model: nn.Module) -> bytes:
    """``torch.save(model.state_dict())``: the file a torchao model would be shipped as (needs torchao + the model
    code to load)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def quantized_summary(converted: nn.Module) -> dict[str, Any]:
    """Which layers of the dynamic int8 model run in int8 (same keys as the FX summary).

    ``quantized_modules``: int8 layer types with counts; ``float_modules``: the other layer types with weights
    (patch embedding, LayerNorm); dynamic quantization has no int8 tensors between layers, so
    ``int8_tensor_modules``/``quantized_ops`` are empty and ``dequantize_nodes`` is 0.
    """
    qmods: Counter = Counter()
    fmods: Counter = Counter()
    for m in converted.modules():
        mod = type(m).__module__
        if mod.startswith("torch.ao.nn.quantized.dynamic"):
            qmods[f"torch.ao.nn.quantized.dynamic.{type(m).__name__}"] += 1
        elif not mod.startswith("torch.ao.nn.quantized") and any(
                True for _ in m.parameters(recurse=False)):
            fmods[f"{mod}.{type(m).__name__}"] += 1
    return {"quantized_modules": dict(sorted(qmods.items())), "int8_tensor_modules": {},
            "float_modules": dict(sorted(fmods.items())), "quantized_ops": {}, "dequantize_nodes": 0}
