"""Initialising a model from a local weight file (``--init-from``): octa3d/MONAI state dicts, RETFound-style 2D
ViTs, OCTCube-style 3D ViTs and MedicalNet 3D ResNets, with a load report.

Nothing is downloaded: MONAI's ``pretrained=True`` paths fail offline, so pretrained weights come as files. Flow::

    init = read_init_file(path, fmt)                       # tensors + layout (detected or given)
    kw = init_model_kwargs(init, name, dim)                # what the model must be built with (patch size ...)
    model = create_model(name, dim, channels, classes, input_size=..., **kw)
    report = load_init_weights(model, init, model_name=name, strict=...)   # mapped, adapted, checked, logged

The name mapping and the adaptations live in :mod:`octa3d.model.weight_formats`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from octa3d.errors import ConfigError
from octa3d.model.registry import get_spec
from octa3d.model.weight_formats import (FORMATS, VIT_FORMATS, Mapped, detect_format, map_resnet, map_vit,
                                         resnet_architecture, vit_architecture)

logger = logging.getLogger("octa3d.model")

_NESTED_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "teacher", "net", "network",
                "encoder_state")
_STRIP_PREFIXES = ("", "encoder.", "model.", "net.")
_WRAPPER_PREFIXES = ("module.", "backbone.")  # DataParallel/DDP (MedicalNet among them); DINO-style backbones


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


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


@dataclass
class InitFile:
    """A weight file read for ``--init-from``: its tensors (wrapper prefixes removed) and layout."""

    path: Path
    format: str
    state: dict[str, torch.Tensor]
    original: dict[str, str]  # stripped name -> name in the file (for the report)


def read_init_file(path: str | Path, fmt: str = "auto") -> InitFile:
    """Read a local weight file with ``torch.load(weights_only=True)`` (no code runs) and find its layout.

    Accepts a bare state dict or one nested under ``state_dict``/``model``/``teacher``/... (RETFound:
    ``{"model": ...}``, MedicalNet: ``{"state_dict": {"module.conv1.weight": ...}}``), with or without
    ``module.``/``backbone.`` prefixes.

    Args:
        path: ``.pth``/``.pt`` file.
        fmt: one of ``auto`` and :data:`~octa3d.model.weight_formats.FORMATS` (``--init-format``).

    Raises:
        ConfigError: the file is missing, unreadable or holds no tensors; an unknown format.
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"--init-format {fmt}: choose auto or one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"--init-from: weight file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, not a torch file ...
        raise ConfigError(f"--init-from: cannot read '{path}' as PyTorch weights "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raw = _find_state_dict(obj)
    if raw is None:
        raise ConfigError(f"--init-from: '{path}' holds no tensors (expected a state dict, possibly under "
                          f"one of {', '.join(_NESTED_KEYS)})")
    original = {_strip_wrappers(k): k for k in raw}
    state = {_strip_wrappers(k): v for k, v in raw.items()}
    found = detect_format(state) if fmt == "auto" else fmt
    logger.info("--init-from %s: %d tensors, format %s%s", path, len(state), found,
                " (detected)" if fmt == "auto" else "")
    return InitFile(path, found, state, original)


def _as_init(source: str | Path | InitFile, fmt: str) -> InitFile:
    return source if isinstance(source, InitFile) else read_init_file(source, fmt)


def init_model_kwargs(source: str | Path | InitFile, model_name: str, spatial_dims: int,
                      explicit: Mapping[str, Any] | None = None, fmt: str = "auto") -> dict[str, Any]:
    """The factory keywords a model needs to take the file's weights (recorded in the checkpoint's ``model_kwargs``).

    ViT layouts: ``patch_size`` (from the patch kernel), ``qkv_bias`` and ``norm_eps`` 1e-6 (timm/OCTCube).
    MedicalNet: ``shortcut_type`` (A when the file has no shortcut parameters), ``bias_downsample`` and
    ``conv1_t_stride=2`` (MedicalNet's stem). octa3d files need nothing.

    Args:
        source: the file (path or :class:`InitFile`).
        model_name: registered name (``--model``).
        spatial_dims: 2 or 3.
        explicit: model keywords the user set explicitly (e.g. ``{"shortcut_type": "B"}``); a contradiction with
            the file is an error.
        fmt: ``--init-format`` when ``source`` is a path.

    Raises:
        ConfigError: the file's layout does not fit the model family or dimension, or an explicit option
            contradicts the file.
    """
    init = _as_init(source, fmt)
    spec = get_spec(model_name)
    explicit = dict(explicit or {})
    if init.format in VIT_FORMATS:
        dims = VIT_FORMATS[init.format]
        if "blocks" not in spec.encoder_prefixes:
            raise ConfigError(f"{init.path} holds a Vision Transformer ({init.format} layout); --model {model_name} is "
                              "not one: use --model vit_large (ViT-L/16) or vit_base (ViT-B/16)")
        if spatial_dims != dims:
            hint = ("RETFound-style checkpoints are 2D: use --dim 2d (B-scans, en-face images)" if dims == 2 else
                    "OCTCube-style checkpoints are 3D: use --dim 3d")
            raise ConfigError(f"{init.path}: {hint}")
        arch = vit_architecture(init.state, init.format)
        return {"patch_size": arch["patch_size"], "qkv_bias": arch["qkv_bias"], "norm_eps": 1e-6}
    if init.format == "medicalnet":
        if "shortcut_type" not in spec.options:
            raise ConfigError(f"{init.path} holds a MedicalNet ResNet; use --model resnet10..152 (not {model_name})")
        arch = resnet_architecture(init.state)
        wanted = explicit.get("shortcut_type")
        if wanted is not None and wanted != arch["shortcut_type"]:
            raise ConfigError(f"--shortcut-type {wanted}: {init.path} was trained with shortcut type "
                              f"{arch['shortcut_type']} ({'no' if arch['shortcut_type'] == 'A' else 'with'} shortcut "
                              "parameters); leave --shortcut-type out or set it to the file's")
        kw: dict[str, Any] = {"conv1_t_stride": 2}
        if arch["shortcut_type"] == "A":
            kw["shortcut_type"] = "A"
        elif not arch["bias_downsample"]:
            kw["bias_downsample"] = False
        return kw
    return {}


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class LoadReport:
    """What ``--init-from`` did: tensors loaded, missing, unexpected, shape-mismatched, and adaptations."""

    path: str
    format: str
    loaded: list[dict[str, Any]] = field(default_factory=list)      # {"key", "source", "shape"}
    missing: list[dict[str, Any]] = field(default_factory=list)     # {"key", "shape", "encoder"}
    unexpected: list[dict[str, Any]] = field(default_factory=list)  # {"key", "shape"} (file names)
    mismatched: list[dict[str, Any]] = field(default_factory=list)  # {"key", "file_shape", "model_shape", "encoder"}
    adaptations: list[str] = field(default_factory=list)
    encoder_total: int = 0
    encoder_loaded: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)      # per encoder stage: {"stage", "loaded", "total"}

    @property
    def encoder_missing(self) -> list[str]:
        """Encoder tensors of the model that did not get a value from the file (missing or of another shape)."""
        return [m["key"] for m in self.missing + self.mismatched if m["encoder"]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``init_report.json``)."""
        return {"path": self.path, "format": self.format, "encoder_loaded": self.encoder_loaded,
                "encoder_total": self.encoder_total,
                "encoder_fraction": self.encoder_loaded / self.encoder_total if self.encoder_total else 0.0,
                "stages": self.stages, "adaptations": self.adaptations, "loaded": self.loaded,
                "missing": self.missing, "unexpected": self.unexpected, "mismatched": self.mismatched}

    def table(self, limit: int = 25) -> str:
        """The report as a plain-text table for the log."""
        head = (f"--init-from {self.path} (format {self.format}): {self.encoder_loaded}/{self.encoder_total} "
                f"encoder tensors loaded ({100 * self.encoder_loaded / max(1, self.encoder_total):.1f} %), "
                f"{len(self.missing)} missing, {len(self.mismatched)} shape-mismatched, {len(self.unexpected)} "
                "file tensors unused")
        lines = [head]
        width = max([len(s["stage"]) for s in self.stages] + [5])
        lines += [f"  {'stage'.ljust(width)}  loaded/total"] + [
            f"  {s['stage'].ljust(width)}  {s['loaded']}/{s['total']}" for s in self.stages]
        rows = ([("missing" if m["encoder"] else "new head", m["key"], _shape(m["shape"])) for m in self.missing]
                + [("mismatch", m["key"], f"file {_shape(m['file_shape'])} vs model {_shape(m['model_shape'])}")
                   for m in self.mismatched]
                + [("unused", u["key"], _shape(u["shape"])) for u in self.unexpected])
        lines += [f"  {what:<8}  {key}  {shape}" for what, key, shape in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"  ... {len(rows) - limit} more in init_report.json")
        lines += [f"  adapted: {a}" for a in self.adaptations]
        return "\n".join(lines)


def _shape(shape: Any) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _octa3d_mapping(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> Mapped:
    """octa3d/MONAI names, under the key prefix that fits the model best (AE checkpoints: ``encoder.``)."""
    def fitting(prefix: str) -> Mapped:
        out = Mapped()
        for k, v in state.items():
            name = k[len(prefix):]
            if k.startswith(prefix) and name in own:
                out.put(name, v, k)
        return out

    best = max((fitting(p) for p in _STRIP_PREFIXES),
               key=lambda m: sum(tuple(t.shape) == tuple(own[k].shape) for k, (t, _) in m.tensors.items()))
    used = {s for _, srcs in best.tensors.values() for s in srcs}
    best.unused = [k for k in state if k not in used]
    return best


def load_init_weights(model: nn.Module, source: str | Path | InitFile, *, model_name: str | None = None,
                      fmt: str = "auto", strict: bool = False) -> LoadReport:
    """Initialise ``model`` from a local weight file (``--init-from``), mapping foreign names to the model's.

    Tensors whose (mapped) names and shapes match are copied; the rest is reported. The report is logged as a
    table (WARNING when an encoder tensor is missing or mismatched, INFO otherwise).

    Args:
        model: the freshly built model (for ViT layouts built with :func:`init_model_kwargs`).
        source: the file (path or :class:`InitFile`).
        model_name: registered name, for the encoder/head split (default: every tensor counts as encoder).
        fmt: ``--init-format`` when ``source`` is a path.
        strict: ``--init-strict``: any encoder tensor left without a value is an error.

    Returns:
        The :class:`LoadReport`.

    Raises:
        ConfigError: unreadable file; a ViT of another width or depth; no encoder tensor loaded (always); an
            encoder tensor missing or mismatched with ``strict``.
    """
    init = _as_init(source, fmt)
    own = model.state_dict()
    spec = get_spec(model_name) if model_name else None
    is_encoder = spec.is_encoder_key if spec else (lambda _k: True)
    if init.format in VIT_FORMATS:
        _check_vit_size(model, init, model_name)
        mapped = map_vit(init.state, init.format, tuple(model.grid), int(own[
            "patch_embedding.patch_embeddings.weight"].shape[1]))
    elif init.format == "medicalnet":
        stem = own.get("conv1.weight")
        mapped = map_resnet(init.state, int(stem.shape[1]) if stem is not None else 1)
    else:
        mapped = _octa3d_mapping(init.state, own)
    report = LoadReport(str(init.path), init.format, adaptations=list(mapped.adaptations))
    take = {}
    for key, (tensor, sources) in mapped.tensors.items():
        files = [init.original.get(s, s) for s in sources]
        if key not in own:
            report.unexpected += [{"key": f, "shape": list(init.state[s].shape)} for f, s in zip(files, sources)]
        elif tuple(tensor.shape) != tuple(own[key].shape):
            report.mismatched.append({"key": key, "source": files, "file_shape": list(tensor.shape),
                                      "model_shape": list(own[key].shape), "encoder": is_encoder(key)})
        else:
            take[key] = tensor
            report.loaded.append({"key": key, "source": files, "shape": list(tensor.shape)})
    report.unexpected += [{"key": init.original.get(k, k), "shape": list(init.state[k].shape)} for k in mapped.unused]
    mismatched = {m["key"] for m in report.mismatched}
    report.missing = [{"key": k, "shape": list(v.shape), "encoder": is_encoder(k)} for k, v in own.items()
                      if k not in take and k not in mismatched]
    encoder_keys = [k for k in own if is_encoder(k)]
    report.encoder_total, report.encoder_loaded = len(encoder_keys), sum(k in take for k in encoder_keys)
    for stage in (spec.stages if spec else (("",),)):
        keys = [k for k in encoder_keys if not stage[0] or any(k == p or k.startswith(p + ".") for p in stage)]
        report.stages.append({"stage": "+".join(stage) or "all", "loaded": sum(k in take for k in keys),
                              "total": len(keys)})
    if report.encoder_loaded == 0:
        logger.warning(report.table())
        raise ConfigError(f"--init-from: none of the model's {report.encoder_total} encoder tensors could be loaded "
                          f"from '{init.path}' (format {init.format}); check --model/--dim/--init-format against the "
                          "file (the table above lists what was found)")
    if strict and report.encoder_missing:
        logger.warning(report.table())
        raise ConfigError(f"--init-strict: {len(report.encoder_missing)} encoder tensor(s) not in '{init.path}' or "
                          f"of another shape (first: {', '.join(report.encoder_missing[:3])}); drop --init-strict to "
                          "start them from random weights")
    model.load_state_dict(take, strict=False)
    level = logging.WARNING if report.encoder_missing else logging.INFO
    logger.log(level, "%s", report.table())
    return report


def _check_vit_size(model: nn.Module, init: InitFile, model_name: str | None) -> None:
    """Refuse a ViT file of another width or depth than the model, naming the registered size that fits."""
    arch = vit_architecture(init.state, init.format)
    hidden, depth = int(model.norm.normalized_shape[0]), len(model.blocks)
    if (arch["hidden_size"], arch["num_layers"]) != (hidden, depth):
        # not at the top: octa3d.model imports this module before its families, which register in the order
        # --list-models shows them; importing vit here first would list the ViTs first
        from octa3d.model.vit import VIT_SIZES

        fits = [f"vit_{n}" for n, (h, d, _, _) in VIT_SIZES.items() if (h, d) == (arch["hidden_size"],
                                                                                  arch["num_layers"])]
        raise ConfigError(f"{init.path} holds a ViT {arch['hidden_size']} wide with {arch['num_layers']} blocks; "
                          f"--model {model_name or '?'} is {hidden} wide with {depth} blocks"
                          + (f": use --model {fits[0]}" if fits else ""))
