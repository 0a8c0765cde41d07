"""Quantization-aware training to int8 with PyTorch's FX graph mode, for the whole network.

Why FX and not torchao: torchao 0.18's ``quantize_(model, QATConfig(...))`` fake-quantizes ``nn.Linear`` /
``nn.Embedding`` only (a Conv3d raises), and it does not compose with the FX path: ``prepare_qat_fx`` cannot
symbolically trace torchao's ``FakeQuantizedLinear`` (``len(x.shape)`` on a Proxy), and with that module
declared non-traceable the converted torchao weights (tensor subclasses) make ``torch.jit.trace`` fail. So FX
quantizes every layer of a convolutional network here, convolutions, the linear head and the residual adds
included; see :data:`TORCHAO_NOTE` (written to the report). Linear-dominated networks (ViT) are quantized with
torchao instead: :mod:`octa3d.stages.compress.linear_quant`.

Flow (``prepare_qat_fx`` → train → ``eval()`` → ``convert_fx``): Conv+BN(+ReLU) are fused into QAT modules that
fold BatchNorm into the weights; weights are fake-quantized per channel (x86) or per tensor (qnnpack) to qint8,
activations per tensor to quint8.

x86 runtime engine: the converted model is run with the ``onednn`` or the ``x86`` quantized engine, whichever is
faster on the machine (:func:`engine_candidates`); the choice is recorded in the model card.

qnnpack (ARM) specifics, both worked around here:

* qnnpack has no int8 ``max_pool3d``, and FX would run max pooling on int8 tensors even with a ``None`` qconfig
  (pooling is a "copy" op lowered by pattern). Every ``nn.MaxPool3d`` is therefore swapped for
  :class:`FloatMaxPool3d` (same arguments), declared non-traceable and given a ``None`` qconfig: the converted
  graph dequantizes before the pool and re-quantizes after it.
* qnnpack cannot unpack 3D convolution weights in this PyTorch, so neither ``torch.jit.save`` nor reading the
  int8 weights works under that engine. The model is converted and serialized with the x86 engine (same
  qnnpack qconfig, so the same int8 numbers); loading it with ``torch.backends.quantized.engine = "qnnpack"``
  repacks the weights for qnnpack.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from octa3d.checkpoint.exports import quantized_engine  # noqa: F401  (re-exported: the stage sets engines through it)
from octa3d.errors import Octa3dError

log = logging.getLogger("octa3d.compress")

TORCHAO_NOTE = ("torchao QAT (quantize_ with QATConfig) was not applied to this convolutional model: in torchao 0.18 "
                "it covers nn.Linear only, and it does not compose with the FX path used for the convolutions "
                "(prepare_qat_fx cannot trace torchao's FakeQuantizedLinear; converted torchao tensor-subclass "
                "weights cannot be exported with torch.jit.trace). PyTorch FX QAT quantized every layer, the linear "
                "head included. Linear-dominated models (ViT) take the torchao path instead.")


class FloatMaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` that FX quantization leaves in float (qnnpack has no int8 max_pool3d).

    FX lowers pooling by *exact* module type, so this subclass is not turned into an int8 op; it is also declared
    non-traceable, which makes the converted graph ``dequantize → pool → quantize`` around it.
    """


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the deprecation / tracer / observer warnings that torch.ao quantization and tracing emit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def engine_candidates(backend: str) -> list[str]:
    """Quantized engines that can run the int8 model of ``backend`` on this machine, preferred first.

    x86: ``onednn`` and ``x86`` run the same int8 weights and qparams (per-channel symmetric weights, 7-bit
    activations). In PyTorch 2.13 the ``x86`` engine sends quantized conv3d to FBGEMM, which at batch 1 was barely
    faster than fp32 on the development machine, while oneDNN's int8 conv3d was about 3x faster; the stage times
    both and keeps the faster (:func:`octa3d.stages.compress.measure.pick_engine`).
    """
    wanted = ("onednn", "x86") if backend == "x86" else (backend,)
    return [e for e in wanted if e in torch.backends.quantized.supported_engines] or [backend]


def packing_engine(backend: str) -> str:
    """Engine used to convert, serialize and inspect the int8 model of ``backend`` (see module docstring)."""
    if backend == "qnnpack" and "x86" in torch.backends.quantized.supported_engines:
        return "x86"
    return backend


def _swap_max_pools(model: nn.Module) -> int:
    n = 0
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if type(child) is nn.MaxPool3d:
                setattr(parent, child_name, FloatMaxPool3d(child.kernel_size, child.stride, child.padding,
                                                           child.dilation, child.return_indices, child.ceil_mode))
                n += 1
    return n


def prepare_qat(model: nn.Module, backend: str, example: torch.Tensor) -> torch.fx.GraphModule:
    """A fake-quantized copy of ``model`` for QAT (``prepare_qat_fx`` with the backend's default QAT qconfig).

    Args:
        model: float network (pruning hooks removed: FX cannot trace them).
        backend: ``"x86"`` or ``"qnnpack"``.
        example: an input batch (CPU) for tracing.

    Returns:
        The prepared ``GraphModule`` in train mode; module names of convolutions/linears are kept, so pruning
        masks can be re-attached by name.

    Raises:
        Octa3dError: the network cannot be symbolically traced.
    """
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    net = copy.deepcopy(model).cpu().train()
    qmap = get_default_qat_qconfig_mapping(backend)
    custom = PrepareCustomConfig()
    if backend == "qnnpack":
        n = _swap_max_pools(net)
        if n:
            qmap.set_object_type(FloatMaxPool3d, None)
            custom.set_non_traceable_module_classes([FloatMaxPool3d])
            log.info("qnnpack: %d MaxPool3d layer(s) kept in float (no int8 max_pool3d in qnnpack)", n)
    try:
        with quiet(), quantized_engine(backend):
            return prepare_qat_fx(net, qmap, (example.cpu(),), prepare_custom_config=custom)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, RuntimeError ... for untraceable code
        raise Octa3dError(f"model {type(model).__name__} cannot be prepared for FX quantization-aware training "
                          f"({type(exc).__name__}: {str(exc)[:200]}); --mode compress quantizes FX-traceable "
                          f"convolutional networks such as cnn and the resnets this way (and Linear-dominated "
                          f"ones such as vit with torchao)") from exc


def freeze_bn_stats(prepared: nn.Module) -> None:
    """Use running BatchNorm statistics in the fused QAT modules (small QAT batches would make them noisy)."""
    import torch.ao.nn.intrinsic.qat as nniqat

    prepared.apply(nniqat.freeze_bn_stats)


def convert(prepared: nn.Module, backend: str) -> torch.fx.GraphModule:
    """``eval()`` + ``convert_fx`` on CPU, packed for :func:`packing_engine` (the int8 model)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    net = prepared.cpu().eval()
    with quiet(), quantized_engine(packing_engine(backend)):
        return convert_fx(net)


def _is_quantized_module(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def quantized_summary(converted: torch.fx.GraphModule) -> dict[str, Any]:
    """Which layers of the converted model run in int8 and which in float (from its FX graph).

    Returns:
        ``quantized_modules``: int8 layer types with their counts (e.g. ``torch.ao.nn.quantized.Conv3d``);
        ``int8_tensor_modules``: weight-less float module types that receive int8 tensors and run int8 kernels
        (max pooling, adaptive average pooling, flatten on x86); ``float_modules``: module types that run on
        float tensors; ``quantized_ops``: functional int8 ops (e.g. ``quantized.add_relu``);
        ``dequantize_nodes``: int8 → float transitions.
    """
    modules = dict(converted.named_modules())
    qmods, int8_mods, fmods, ops = Counter(), Counter(), Counter(), Counter()
    is_q: dict[Any, bool] = {}
    dq = 0
    for node in converted.graph.nodes:
        first = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
        in_q = bool(first is not None and is_q.get(first, False))
        if node.op == "call_module":
            m = modules[str(node.target)]
            if _is_quantized_module(m):
                qmods[f"{type(m).__module__.replace('.modules', '').rsplit('.', 1)[0]}.{type(m).__name__}"] += 1
                is_q[node] = True
            else:
                (int8_mods if in_q else fmods)[f"{type(m).__module__}.{type(m).__name__}"] += 1
                is_q[node] = in_q  # pooling / flatten keep the dtype of their input
        elif node.op == "call_function":
            target = str(getattr(node.target, "__name__", node.target))
            if "quantized" in str(node.target):
                ops[str(node.target).replace("torch.ops.", "").replace(".default", "")] += 1
            is_q[node] = "quantize_per" in target or "quantized" in str(node.target) or in_q
        elif node.op == "call_method":
            dq += node.target == "dequantize"
            is_q[node] = in_q and node.target != "dequantize"
    return {"quantized_modules": dict(sorted(qmods.items())), "int8_tensor_modules": dict(sorted(int8_mods.items())),
            "float_modules": dict(sorted(fmods.items())), "quantized_ops": dict(sorted(ops.items())),
            "dequantize_nodes": dq}


def int8_sparsity(converted: nn.Module, backend: str, masks: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, Any]:
    """Zeros of the int8 weights of every quantized conv/linear layer (read back from the packed weights).

    Weights are symmetric qint8 (zero point 0), so a pruned weight is exactly 0 in int8; weights that round to
    0 count as zeros too.

    Args:
        converted: the int8 model from :func:`convert`.
        backend: its ``--qbackend``.
        masks: pruning masks by module name; when given, pruned positions holding a non-zero int8 weight are
            counted as ``mask_violations`` (0 = the pruning survived QAT and conversion).

    Returns:
        ``weights`` (overall fraction of int8 weights equal to 0), ``zero``/``total``, ``per_layer`` and
        ``mask_violations``.
    """
    per_layer, zero, total, violations = {}, 0, 0, 0
    with quantized_engine(packing_engine(backend)):
        for name, m in converted.named_modules():
            if not (_is_quantized_module(m) and callable(getattr(m, "weight", None))):
                continue
            w = m.weight()
            if not isinstance(w, torch.Tensor) or not w.is_quantized:
                continue
            q = w.int_repr()
            z = int((q == 0).sum())
            per_layer[name] = z / q.numel()
            zero, total = zero + z, total + q.numel()
            if masks is not None and name in masks:
                violations += int(((masks[name].to(q.device) == 0) & (q != 0)).sum())
    return {"weights": zero / max(1, total), "zero": zero, "total": total, "per_layer": per_layer,
            "mask_violations": violations if masks is not None else None}
