"""Class-activation maps in network-input space, one interface for every method.

Methods (``--cam``):

* ``gradcam``: channel weights = spatial mean of the gradient (Selvaraju et al. 2017); ``gradcam++``: the
  higher-order weights of Chattopadhay et al. 2018 (the formula of MONAI's ``GradCAMpp``);
* ``layercam``: element-wise positive gradient x activation (Jiang et al. 2021) — usable at early, high-resolution
  layers, and fused across layers (``--cam-layer a,b``);
* ``hirescam``: element-wise gradient x activation summed over channels (Draelos & Carin 2020; faithful to what a
  global-pool + linear head computes);
* ``occlusion``: MONAI ``OcclusionSensitivity`` (model-agnostic: the drop in the explained class's probability when
  a Gaussian blob occludes each region). Cost: one forward pass per occlusion position — with a mask of 1/4 of the
  input per axis and 50 % overlap about 7^3 = 343 forwards per 3D volume (7^2 per 2D image), in batches;
* ``medcam``: M3d-CAM's Grad-CAM (``medcam.inject(..., return_attention=True)``), one layer.

The gradient methods share one hook-based implementation: forward hooks record each target layer's activation, one
backward pass from the explained class's logit gives every layer's gradient. The autograd graph starts at the
earliest target layer (parameters frozen for the call, that layer's output made a fresh leaf), so the trunk before
it keeps no activations and the backward pass runs through the head only. Each layer's map (ReLU'd, upsampled to
the input size with (tri)linear interpolation) is scaled to 0..1 per subject, high = important; several layers are
fused by their element-wise mean (coarse layers say *which* region, fine layers *where* in it).

A map that is all zero (no positive evidence for the explained class at that layer), constant or non-finite is
reported per sample in :attr:`CamComputer.status` instead of being scaled into a fake pattern.
Mapping the maps back onto the source scan and writing files is :mod:`octa3d.cam.export`'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from octa3d.config import Config
from octa3d.config.schema import CAM_METHODS
from octa3d.errors import ConfigError

log = logging.getLogger("octa3d.cam")

#: ``--cam`` methods (``none`` switches maps off), as the flag defines them.
BACKENDS = CAM_METHODS
#: Per-sample map status: a map that is not ``ok`` is not drawn as evidence.
OK, EMPTY, CONSTANT, NONFINITE = "ok", "empty", "constant", "non-finite"
STATUS_TEXT = {EMPTY: "all zero: no positive evidence for the explained class at this layer",
               CONSTANT: "constant: the map does not vary over the input",
               NONFINITE: "not finite: NaN or infinite values in the gradients or activations"}


def check_cam_capable(path: str | Path, record: dict[str, Any], is_quantized: bool) -> None:
    """Refuse class activation maps for a model without float PyTorch gradients (int8 TorchScript, ONNX).

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


def map_status(raw: torch.Tensor) -> str:
    """Status of one raw (unscaled, non-negative) map: ``ok``, ``empty``, ``constant`` or ``non-finite``."""
    if not bool(torch.isfinite(raw).all()):
        return NONFINITE
    hi, lo = float(raw.max()), float(raw.min())
    if hi <= 0:
        return EMPTY
    if hi - lo <= 1e-6 * hi:
        return CONSTANT
    return OK


def parse_layers(value: str | Sequence[str] | None) -> list[str]:
    """``--cam-layer`` as a list of module names (a comma list fuses several layers)."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [v.strip() for v in items if v.strip()]


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


def check_layer(model: torch.nn.Module, layer: str | Sequence[str], model_name: str) -> None:
    """Raise a ConfigError naming candidate layers when a layer of ``layer`` (comma list) is not a module of
    ``model``."""
    modules = dict(model.named_modules())
    missing = [n for n in parse_layers(layer) if n not in modules]
    if not missing:
        return
    layer = ",".join(missing)
    spatial = [n for n, m in modules.items() if n and isinstance(m, (torch.nn.ReLU, torch.nn.Conv2d,
                                                                      torch.nn.Conv3d, torch.nn.Sequential))]
    raise ConfigError(f"--cam-layer {layer}: model {model_name} has no module of that name; candidates "
                      f"include: {', '.join(spatial[-8:])} (the registered default is used without --cam-layer)")


def check_cam_options(eval_cfg: Any, models: Sequence[torch.nn.Module], class_names: Sequence[str],
                      model_name: str) -> None:
    """``--cam-class`` and ``--cam-layer`` resolved against the models before any output is touched.

    Args:
        eval_cfg: the ``eval`` config section (``cam``, ``cam_class``, ``cam_layer``).
        models: the models whose maps will be computed.
        class_names: the models' classes.
        model_name: registry name, for the error message.

    Raises:
        ConfigError: a layer that is no module of a model, or a class that is not one of ``class_names``.
    """
    if eval_cfg.cam == "none":
        return
    resolve_cam_class(eval_cfg.cam_class, class_names)
    if eval_cfg.cam != "occlusion":
        for model in models:
            check_layer(model, eval_cfg.cam_layer or "", model_name)


class _Recorder:
    """Forward hooks on the target layers of one model: activations (the earliest one a fresh graph leaf)."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[str]) -> None:
        self.acts: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in layers]

    def _hook(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                return None
            if not self.acts:  # the first target layer reached: the graph starts here (head-only backward)
                output = output.detach().requires_grad_(True).clone()
            else:
                output = output.clone()  # a later layer: stays in the graph; clone keeps in-place ops legal
            output.retain_grad()
            self.acts[name] = output
            return output
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_map(method: str, acti: torch.Tensor, grad: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """The raw (ReLU'd) map ``(B, 1, *s)`` of one layer from its activation and gradient ``(B, K, *s)``."""
    b, k = acti.shape[:2]
    ones = [1] * (acti.ndim - 2)
    if method == "gradcam":
        weights = grad.reshape(b, k, -1).mean(-1).reshape(b, k, *ones)
        out = (weights * acti).sum(1, keepdim=True)
    elif method == "gradcam++":  # MONAI GradCAMpp's formula
        alpha_nr = grad.pow(2)
        alpha_dr = alpha_nr.mul(2) + acti.mul(grad.pow(3)).reshape(b, k, -1).sum(-1).reshape(b, k, *ones)
        alpha_dr = torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr))
        alpha = alpha_nr.div(alpha_dr + 1e-7)
        relu_grad = F.relu(score.exp().reshape(b, 1, *ones) * grad)
        weights = (relu_grad * alpha).reshape(b, k, -1).sum(-1).reshape(b, k, *ones)
        out = (weights * acti).sum(1, keepdim=True)
    elif method == "layercam":
        out = (F.relu(grad) * acti).sum(1, keepdim=True)
    else:  # hirescam
        out = (grad * acti).sum(1, keepdim=True)
    return F.relu(out)


class CamComputer:
    """Class-activation maps of one model or an ensemble (mean of the members' 0..1 maps), batched.

    Args:
        models: classifiers (put in eval mode for the call).
        backend: one of :data:`BACKENDS`.
        layer: target layer(s): a dotted module name, or a comma list / sequence of them to fuse (gradient
            methods); unused by ``occlusion``.

    Call it with an input batch ``(B, C, *S)`` and per-sample target classes ``(B,)``; it returns float32
    ``(B, *S)`` maps in 0..1 at the input resolution, and sets :attr:`status` (one entry per sample or group).
    """

    def __init__(self, models: Sequence[torch.nn.Module], backend: str = "gradcam",
                 layer: str | Sequence[str] = "") -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"--cam {backend}: choose one of {', '.join(BACKENDS)} (or none)")
        self.backend = backend
        self.layers = parse_layers(layer)
        if backend == "medcam" and len(self.layers) > 1:
            raise ConfigError(f"--cam medcam explains one layer; --cam-layer {','.join(self.layers)} names "
                              f"{len(self.layers)}: fuse layers with --cam layercam (or gradcam, hirescam)")
        if backend != "occlusion" and not self.layers:
            raise ConfigError(f"--cam {backend} needs a target layer (--cam-layer)")
        self.layer = ",".join(self.layers)
        self.models = list(models)
        self._targets: torch.Tensor | None = None
        self._medcam: list[Any] = []
        self.status: list[str] = []
        self.feature_shape: tuple[int, ...] | None = None  # finest target layer's map size (coarse = blurry)
        self.feature_shapes: dict[str, tuple[int, ...]] = {}
        if backend == "medcam":
            from medcam import medcam  # the package __init__ is empty: the API lives in medcam.medcam

            for m in self.models:  # evaluate/save_maps off: see the module docstring
                self._medcam.append(medcam.inject(m, output_dir=None, backend="gcam", layer=self.layers[0],
                                                  label=self._medcam_mask, save_maps=False, evaluate=False,
                                                  return_attention=True))

    @property
    def n_members(self) -> int:
        """Models in the ensemble."""
        return len(self.models)

    def _medcam_mask(self, output: torch.Tensor) -> torch.Tensor:
        assert self._targets is not None
        return F.one_hot(self._targets.to(output.device), output.shape[1]).to(output.dtype)

    def _gradient_maps(self, model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw per-layer maps ``(B, *S)`` at input size for one model (one forward, one backward pass)."""
        frozen = [p for p in model.parameters() if p.requires_grad]
        rec = _Recorder(model, self.layers)
        was_training = model.training
        model.eval()
        try:
            for p in frozen:
                p.requires_grad_(False)
            with torch.enable_grad():
                logits = model(x)
                score = logits.gather(1, self._targets.to(x.device).reshape(-1, 1)).reshape(-1)
                missing = [n for n in self.layers if n not in rec.acts]
                if missing:
                    raise ConfigError(f"--cam-layer {','.join(missing)}: the layer produced no tensor output in "
                                      f"the forward pass; choose a module whose output is a feature map")
                score.sum().backward()
        finally:
            rec.remove()
            for p in frozen:
                p.requires_grad_(True)
            model.train(was_training)
        mode = "trilinear" if x.ndim == 5 else "bilinear"
        out = {}
        for name in self.layers:
            acti = rec.acts[name].detach().float()
            grad = rec.acts[name].grad
            grad = torch.zeros_like(acti) if grad is None else grad.float()
            self.feature_shapes[name] = tuple(int(v) for v in acti.shape[2:])
            m = _layer_map(self.backend, acti, grad, score.detach().float())
            if tuple(m.shape[2:]) != tuple(x.shape[2:]):
                m = F.interpolate(m, size=tuple(x.shape[2:]), mode=mode, align_corners=False)
            out[name] = m[:, 0].cpu()
        finer = sorted(self.feature_shapes.values(), key=lambda s: -int(np.prod(s)))
        self.feature_shape = finer[0] if finer else None
        return out

    def _occlusion_map(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Drop of the explained class's probability when each region is occluded (MONAI), ``(B, *S)``."""
        from monai.visualize import OcclusionSensitivity

        spatial = tuple(int(s) for s in x.shape[2:])
        mask = tuple(max(2, s // 4) for s in spatial)
        occ = OcclusionSensitivity(nn_module=model, mask_size=mask, n_batch=16, verbose=False, mode="gaussian",
                                   overlap=0.5)
        self.feature_shape = tuple(max(1, round(s / (m * 0.5))) for s, m in zip(spatial, mask))
        maps = []
        with torch.no_grad():
            for i in range(x.shape[0]):
                xi = x[i:i + 1]
                t = int(self._targets[i])
                p0 = torch.softmax(model.eval()(xi).float(), 1)[0, t]
                occ_map, _ = occ(xi)
                drop = p0 - occ_map[0, t].float()  # (1, classes, *spatial): class t
                maps.append(F.relu(drop).cpu())
        return torch.stack(maps)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, groups: Sequence[int] | None = None) -> np.ndarray:
        """Maps of a batch.

        Args:
            x: ``(B, C, *S)`` inputs.
            targets: ``(B,)`` class index per sample.
            groups: consecutive sample counts that belong to one subject (2D patches); each group is scaled to
                0..1 *jointly*, so that a patch without evidence stays dark next to the patch that holds it.
                Default: every sample on its own.

        Returns:
            ``(B, *S)`` float32 maps in 0..1; :attr:`status` holds one status per group (``ok`` or why not).
        """
        self._targets = torch.as_tensor(targets, dtype=torch.long)
        groups = list(groups) if groups is not None else [1] * x.shape[0]
        members: list[torch.Tensor] = []
        raw_all: list[torch.Tensor] = []
        for k, model in enumerate(self.models):
            if self.backend == "medcam":
                with torch.enable_grad():
                    _, att = self._medcam[k](x)  # medcam scales every sample to 0..1 itself
                m = att.detach().float().cpu()
                if tuple(m.shape[2:]) != tuple(x.shape[2:]):
                    m = F.interpolate(m, size=tuple(x.shape[2:]), mode="trilinear" if x.ndim == 5 else "bilinear",
                                      align_corners=False)
                layer_maps = [m[:, 0]]
            elif self.backend == "occlusion":
                layer_maps = [self._occlusion_map(model, x)]
            else:
                layer_maps = list(self._gradient_maps(model, x).values())
            raw_all += layer_maps
            members.append(torch.stack([self._scale(m, groups) for m in layer_maps]).mean(0))
        self.status = self._group_status(raw_all, groups)
        fused = self._scale(torch.stack(members).mean(0), groups)
        return fused.numpy().astype(np.float32)

    @staticmethod
    def _group_status(raw_maps: Sequence[torch.Tensor], groups: Sequence[int]) -> list[str]:
        """One status per group: not ``ok`` when every raw map (layer, member) of the group is not ``ok``; the
        first problem found is named (non-finite values taint the whole map)."""
        out, start = [], 0
        for n in groups:
            states = [map_status(m[start:start + n]) for m in raw_maps]
            if NONFINITE in states:
                out.append(NONFINITE)
            elif OK in states:
                out.append(OK)
            else:
                out.append(states[0])
            start += n
        return out

    @staticmethod
    def _scale(m: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
        parts, start = [], 0
        for n in groups:
            parts.append(minmax(m[start:start + n].reshape(1, -1)).reshape(m[start:start + n].shape))
            start += n
        return torch.cat(parts)


#: Options that ask for class activation maps explicitly (refused, not skipped, for a model without gradients).
CAM_FLAGS = ("cam", "cam_layer", "cam_class", "cam_subjects")


def cam_backend(cfg: Config, models: Sequence[Any]) -> str:
    """The CAM backend to run: ``--cam``, or ``none`` when a model cannot give class activation maps (int8, ONNX).

    Args:
        cfg: the configuration (``--cam`` and whether CAM options were given explicitly).
        models: :class:`~octa3d.checkpoint.models.LoadedModel` members (their ``path`` and ``record``).

    Raises:
        ConfigError: CAM options were given explicitly for a model without float gradients (names the float model).
    """
    if cfg.eval.cam == "none":
        return "none"
    for m in models:
        path, rec = m.path, m.record
        if rec.get("cam_capable") and not rec.get("is_quantized"):
            continue
        if any(cfg.is_explicit(f) for f in CAM_FLAGS):
            check_cam_capable(path, rec, rec["is_quantized"])
        log.warning("no class activation maps: %s is a %s model without float gradients (predictions and metrics "
                    "only; explain %s for maps)", path, "int8" if rec["is_quantized"] else rec["artifact_format"],
                    path.parent / "pruned.pt" if (path.parent / "pruned.pt").is_file() else "the float checkpoint")
        return "none"
    return cfg.eval.cam
