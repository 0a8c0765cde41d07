"""Class-activation maps in network-input space: Grad-CAM / Grad-CAM++ (MONAI) and M3d-CAM (medcam).

MONAI's default post-processing *inverts* the map (max -> 0) and scales each sample alone; here the raw map is
min-max scaled to 0..1 per subject with high = important. MONAI scores ``logits[:, class_idx]`` with one index for
the whole batch, so the score function is replaced by a per-sample ``gather`` (a batch may mix target classes).
medcam runs with ``return_attention=True`` (map upsampled to the input size) and its own saving/evaluation off.
Mapping the maps back onto the source scan and writing files is :mod:`octa3d.cam.export`'s job.

Grad-CAM needs the gradient of the class score with respect to the target layer's *activations* only, not the
parameter gradients of the whole network. For the MONAI backends the autograd graph is therefore built from the
target layer on (:meth:`CamComputer._graph_from_layer`: parameters frozen for the call, the layer's output made a
fresh tensor that requires grad), so the backward pass runs through the head only and the trunk's forward keeps
no activations: the maps are identical, the cost is about one forward pass instead of forward + full backward
(3-4x less for a 3D resnet18). medcam runs as the library does (``logits.backward()`` through the whole network,
plus one extra forward/backward "test run" on its first call).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from octa3d.checkpoint import check_cam_capable
from octa3d.config import Config
from octa3d.errors import ConfigError

log = logging.getLogger("octa3d.cam")

BACKENDS = ("gradcam", "gradcam++", "medcam")


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling to 0..1 (high = important); a constant map becomes zeros.

    MONAI's default normaliser maps max → 0; this one keeps high = important.
    """
    x = torch.nan_to_num(torch.as_tensor(x).float())
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return out.reshape(x.shape)


def _grad_leaf(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
    """Forward hook: the layer's output as a new graph root (detached, requires grad; a clone, so that in-place
    operations downstream stay legal)."""
    if isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True).clone()
    return None


def _raw(x: torch.Tensor) -> torch.Tensor:
    """MONAI ``postprocessing`` that keeps the raw (ReLU'd, upsampled) map: scaling is done per subject."""
    return torch.nan_to_num(torch.as_tensor(x).float())


def resolve_cam_class(value: str | int | None, class_names: Sequence[str]) -> int | None:
    """``--cam-class`` as a class index (a class name, case-insensitive, or an index); None = predicted class.

    Raises:
        ConfigError: unknown name or index out of range (lists the classes).
    """
    if value is None or value == "":
        return None
    text = str(value).strip()
    names = [n.upper() for n in class_names]
    if text.upper() in names:
        return names.index(text.upper())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    raise ConfigError(f"--cam-class {value}: not a class of this model; choose a name or index from "
                      f"{', '.join(f'{i}={n}' for i, n in enumerate(class_names))}")


def check_layer(model: torch.nn.Module, layer: str, model_name: str) -> None:
    """Raise a ConfigError naming candidate layers when ``layer`` is not a module of ``model``."""
    modules = dict(model.named_modules())
    if layer in modules:
        return
    spatial = [n for n, m in modules.items() if n and isinstance(m, (torch.nn.ReLU, torch.nn.Conv2d,
                                                                      torch.nn.Conv3d, torch.nn.Sequential))]
    raise ConfigError(f"--cam-layer {layer}: model {model_name} has no module of that name; candidates "
                      f"include: {', '.join(spatial[-8:])} (the registered default is used without --cam-layer)")


class CamComputer:
    """Class-activation maps of one model or an ensemble (mean of the members' 0..1 maps), batched.

    Args:
        models: classifiers (eval mode is set by the backends).
        backend: one of :data:`BACKENDS`.
        layer: dotted module name of the target layer (must exist in every model).

    Call it with an input batch ``(B, C, *S)`` and per-sample target classes ``(B,)``; it returns float32
    ``(B, *S)`` maps in 0..1 at the input resolution.
    """

    def __init__(self, models: Sequence[torch.nn.Module], backend: str = "gradcam", layer: str = "") -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"--cam {backend}: choose one of {', '.join(BACKENDS)} (or none)")
        self.backend, self.layer = backend, layer
        self.models = list(models)
        self._targets: torch.Tensor | None = None
        self._nd = 0
        self._cams: list[Any] = []
        self.feature_shape: tuple[int, ...] | None = None  # spatial size of the layer's map (coarse = blurry CAM)
        if models:
            models[0].get_submodule(layer).register_forward_hook(self._record_shape)
        for m in models:
            if backend == "medcam":
                from medcam import medcam  # the package __init__ is empty: the API lives in medcam.medcam

                # evaluate/save_maps off: see the module docstring. label: our per-sample one-hot mask.
                self._cams.append(medcam.inject(m, output_dir=None, backend="gcam", layer=layer,
                                                label=self._medcam_mask, save_maps=False, evaluate=False,
                                                return_attention=True))
            else:
                from monai.visualize import GradCAM, GradCAMpp

                cls = GradCAM if backend == "gradcam" else GradCAMpp
                cam = cls(nn_module=m, target_layers=layer, postprocessing=_raw)  # scaled in __call__
                cam.nn_module.class_score = self._class_score  # per-sample targets (see module docstring)
                self._cams.append(cam)

    @contextlib.contextmanager
    def _graph_from_layer(self) -> Iterator[None]:
        """Inside the block, the models' parameters do not require grad and the target layer's output is a fresh
        graph root: a backward pass from the logits stops at the target layer (see the module docstring)."""
        frozen = [p for m in self.models for p in m.parameters() if p.requires_grad]
        handles = []
        try:
            for p in frozen:
                p.requires_grad_(False)
            for m in self.models:  # prepend: MONAI's own hook then records the tensor that is in the graph
                handles.append(m.get_submodule(self.layer).register_forward_hook(_grad_leaf, prepend=True))
            with warnings.catch_warnings():
                # expected: no input of the target layer requires grad, so the hook fires on its output gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield
        finally:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)

    def _record_shape(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.feature_shape = tuple(int(v) for v in output.shape[2:])

    def _class_score(self, logits: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
        # (B, 1, 1, ...) so that GradCAM++'s score.exp() * grad broadcasts per sample
        idx = torch.as_tensor(class_idx, device=logits.device).reshape(-1, 1)
        return logits.gather(1, idx).reshape(-1, 1, *([1] * self._nd))

    def _medcam_mask(self, output: torch.Tensor) -> torch.Tensor:
        assert self._targets is not None
        return F.one_hot(self._targets.to(output.device), output.shape[1]).to(output.dtype)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, groups: Sequence[int] | None = None) -> np.ndarray:
        """Maps of a batch.

        Args:
            x: ``(B, C, *S)`` inputs.
            targets: ``(B,)`` class index per sample.
            groups: consecutive sample counts that belong to one subject (2D patches); each group is scaled to
                0..1 *jointly*, so that a patch without evidence stays dark next to the patch that holds it.
                Default: every sample on its own.
        """
        self._targets = torch.as_tensor(targets, dtype=torch.long)
        self._nd = x.ndim - 2
        groups = list(groups) if groups is not None else [1] * x.shape[0]
        maps = []
        head_only = self._graph_from_layer() if self.backend != "medcam" else contextlib.nullcontext()
        with torch.enable_grad(), head_only:
            for cam in self._cams:
                if self.backend == "medcam":
                    _, att = cam(x)  # medcam scales every sample to 0..1 itself (it cannot be turned off)
                    m = att.detach().float().cpu()
                else:
                    m = cam(x, class_idx=self._targets.to(x.device)).detach().float().cpu()
                if tuple(m.shape[2:]) != tuple(x.shape[2:]):
                    mode = "trilinear" if self._nd == 3 else "bilinear"
                    m = F.interpolate(m, size=tuple(x.shape[2:]), mode=mode, align_corners=False)
                maps.append(self._scale(m[:, 0], groups))
        return self._scale(torch.stack(maps).mean(0), groups).numpy().astype(np.float32)

    @staticmethod
    def _scale(m: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
        parts, start = [], 0
        for n in groups:
            parts.append(minmax(m[start:start + n].reshape(1, -1)).reshape(m[start:start + n].shape))
            start += n
        return torch.cat(parts)


#: Options that ask for class activation maps explicitly (refused, not skipped, for a model without gradients).
CAM_FLAGS = ("cam", "cam_layer", "cam_class", "cam_subjects")


def cam_backend(cfg: Config, models: Sequence[tuple[str, Path, dict[str, Any], torch.nn.Module]]) -> str:
    """The CAM backend to run: ``--cam``, or ``none`` when a model cannot give class activation maps (int8, ONNX).

    Raises:
        ConfigError: CAM options were given explicitly for a model without float gradients (names the float model).
    """
    if cfg.eval.cam == "none":
        return "none"
    for _, path, rec, _ in models:
        if rec.get("cam_capable") and not rec.get("is_quantized"):
            continue
        if any(cfg.is_explicit(f) for f in CAM_FLAGS):
            check_cam_capable(path, rec, rec["is_quantized"])
        log.warning("no class activation maps: %s is a %s model without float gradients (predictions and metrics "
                    "only; explain %s for maps)", path, "int8" if rec["is_quantized"] else rec["artifact_format"],
                    path.parent / "pruned.pt" if (path.parent / "pruned.pt").is_file() else "the float checkpoint")
        return "none"
    return cfg.eval.cam
