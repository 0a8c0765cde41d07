"""Model registry: one place that knows every network, its Grad-CAM layer and its encoder/head split.

A family module registers a factory with :func:`register_model`::

    @register_model("cnn", cam_layer="features.block5.act", min_input=16, feature_size=128,
                    stages=(("features.block1",), ...), head_prefixes=("classifier",))
    def cnn(spatial_dims, in_channels, num_classes, input_size=None, **kw) -> nn.Module: ...

Every registered network follows the same small interface (like timm's ``forward_features`` /
``forward_head``), which the autoencoder, the trainer and the CAM code rely on:

* ``forward(x) == forward_head(forward_features(x))`` returns logits ``(B, num_classes)``;
* ``forward_features(x)`` returns the encoder output, a ``(B, feature_size, *spatial)`` map for CNNs;
* the state-dict keys split cleanly into encoder keys (``ModelSpec.encoder_prefixes``) and head keys
  (``ModelSpec.head_prefixes``); a pretrained encoder is transferred key by key.

Models are always built with random weights (``pretrained=False``): nothing here downloads. Local weight files
(octa3d, RETFound/timm, OCTCube, MedicalNet layouts) are applied with :func:`load_init_weights`
(:mod:`octa3d.model.weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from octa3d.errors import ConfigError

logger = logging.getLogger("octa3d.model")

Factory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelSpec] = {}


def _matches(key: str, prefix: str) -> bool:
    """``key`` lies under the module/parameter ``prefix`` (dot boundary: ``layer1`` does not match ``layer10``)."""
    return key == prefix or key.startswith(prefix + ".")


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about one registered network.

    Attributes:
        name: registry name (``--model``).
        factory: ``factory(spatial_dims, in_channels, num_classes, input_size=None, **kw) -> nn.Module``.
        dims: supported spatial dimensions.
        cam_layer: dotted module path whose forward output is the spatial map used for Grad-CAM.
        min_input: documented minimum side length of the input (voxels/pixels per spatial axis).
        ae_supported: whether :func:`octa3d.model.autoencoder.build_autoencoder` can mirror the encoder.
        feature_size: channels of the encoder output (``forward_features``).
        stages: encoder stages in forward order, each a tuple of state-dict/module prefixes; used to freeze the
            first n stages. Together they cover every encoder tensor.
        head_prefixes: state-dict/module prefixes of the classification head (everything not in the encoder).
        needs_input_size: the factory requires ``input_size`` (ViT position embeddings).
        description: one line for the model table.
        options: the model options of the configuration this family takes (keys of :data:`MODEL_OPTIONS`).
        legacy_kwargs: ``legacy_kwargs(state_dict) -> factory keywords`` that rebuild the architecture an older
            octa3d version saved under this name (its checkpoints record no keywords for what was then the
            default); None when the architecture never changed.
    """

    name: str
    factory: Factory
    dims: tuple[int, ...]
    cam_layer: str
    min_input: int
    ae_supported: bool
    feature_size: int
    stages: tuple[tuple[str, ...], ...]
    head_prefixes: tuple[str, ...]
    needs_input_size: bool = False
    description: str = ""
    options: tuple[str, ...] = ()
    legacy_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    _param_cache: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ encoder / head split
    @property
    def encoder_prefixes(self) -> tuple[str, ...]:
        """All encoder prefixes (the stages flattened, forward order)."""
        return tuple(p for stage in self.stages for p in stage)

    def is_encoder_key(self, key: str) -> bool:
        """Whether a state-dict key (or module/parameter name) belongs to the encoder."""
        return any(_matches(key, p) for p in self.encoder_prefixes)

    def is_head_key(self, key: str) -> bool:
        """Whether a state-dict key (or module/parameter name) belongs to the classification head."""
        return any(_matches(key, p) for p in self.head_prefixes)

    def encoder_keys(self, state_dict: Mapping[str, Any]) -> list[str]:
        """The encoder keys of ``state_dict``, in its order."""
        return [k for k in state_dict if self.is_encoder_key(k)]

    def head_keys(self, state_dict: Mapping[str, Any]) -> list[str]:
        """The head keys of ``state_dict``, in its order."""
        return [k for k in state_dict if self.is_head_key(k)]

    def split(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Views of ``model``'s encoder and head as two containers sharing its parameters.

        The containers hold the model's top-level children (and top-level parameters such as ViT's
        ``cls_token``) under their own names, so ``encoder.state_dict()`` has exactly the classifier's encoder
        keys. They are for inspection, optimiser parameter groups and freezing; they have no ``forward``.

        Args:
            model: a model built by :func:`create_model` for this spec.

        Returns:
            ``(encoder, head)``.
        """
        encoder, head = nn.Module(), nn.Module()
        tops_enc = {p.split(".")[0] for p in self.encoder_prefixes}
        tops_head = {p.split(".")[0] for p in self.head_prefixes}
        shared = tops_enc & tops_head
        if shared:  # a registration bug, not a user error
            raise RuntimeError(f"{self.name}: top-level names {sorted(shared)} are in both encoder and head")
        for container, tops in ((encoder, tops_enc), (head, tops_head)):
            for top in sorted(tops):
                obj = getattr(model, top, None)
                if isinstance(obj, nn.Parameter):
                    container.register_parameter(top, obj)
                elif isinstance(obj, nn.Module):
                    container.add_module(top, obj)
        return encoder, head

    def count_parameters(self, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 2) -> int:
        """Number of parameters, counted on the meta device (no memory, no initialisation cost)."""
        if in_channels == 1 and num_classes == 2 and spatial_dims in self._param_cache:
            return self._param_cache[spatial_dims]
        kw: dict[str, Any] = {}
        if self.needs_input_size:
            kw["input_size"] = (max(self.min_input, 96),) * spatial_dims
        with torch.device("meta"):
            model = self.factory(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kw)
        n = sum(p.numel() for p in model.parameters())
        if in_channels == 1 and num_classes == 2:
            self._param_cache[spatial_dims] = n
        return n


def register_model(
    name: str,
    *,
    dims: Sequence[int] = (2, 3),
    cam_layer: str,
    min_input: int,
    ae_supported: bool = True,
    feature_size: int,
    stages: Sequence[Sequence[str]],
    head_prefixes: Sequence[str],
    needs_input_size: bool = False,
    description: str = "",
    options: Sequence[str] = (),
    legacy_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> Callable[[Factory], Factory]:
    """Decorator registering a model factory under ``name`` (see :class:`ModelSpec` for the fields).

    Returns:
        The decorator; it returns the factory unchanged.
    """

    def deco(fn: Factory) -> Factory:
        if name in _REGISTRY:
            raise RuntimeError(f"model name '{name}' registered twice")
        _REGISTRY[name] = ModelSpec(
            name=name, factory=fn, dims=tuple(dims), cam_layer=cam_layer, min_input=int(min_input),
            ae_supported=ae_supported, feature_size=int(feature_size),
            stages=tuple(tuple(s) for s in stages), head_prefixes=tuple(head_prefixes),
            needs_input_size=needs_input_size, description=description, options=tuple(options),
            legacy_kwargs=legacy_kwargs,
        )
        return fn

    return deco


# ---------------------------------------------------------------------- lookup
def list_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``.

    Raises:
        ConfigError: unknown name; the message lists the registered names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; registered models: {', '.join(list_models())} "
                          "(see --list-models)") from None


def parse_dim(dim: int | str) -> int:
    """``2``/``3``/``"2d"``/``"3d"`` → 2 or 3.

    Raises:
        ConfigError: anything else.
    """
    text = str(dim).lower().strip()
    if text in ("2", "2d"):
        return 2
    if text in ("3", "3d"):
        return 3
    raise ConfigError(f"dimension must be 2d or 3d, got {dim!r}")


def normalize_input_size(input_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """One side (isotropic) or one side per axis → a tuple of ``spatial_dims`` ints.

    Raises:
        ConfigError: wrong number of sides or a non-positive side.
    """
    sides = [int(input_size)] if isinstance(input_size, (int, float)) else [int(s) for s in input_size]
    if len(sides) == 1:
        sides = sides * spatial_dims
    if len(sides) != spatial_dims or any(s < 1 for s in sides):
        raise ConfigError(f"input size {input_size!r} must be one positive number or {spatial_dims} of them "
                          f"for a {spatial_dims}D model")
    return tuple(sides)


def check_input_size(name: str, input_shape: int | Sequence[int], spatial_dims: int | None = None) -> None:
    """Refuse an input smaller than the documented minimum of ``name``.

    Args:
        name: registered model name.
        input_shape: spatial size (one side, or one side per axis).
        spatial_dims: 2 or 3; default: ``len(input_shape)`` (3 for a single number).

    Raises:
        ConfigError: a side is below the minimum; the message names it and the minimum.
    """
    spec = get_spec(name)
    if spatial_dims is None:
        spatial_dims = 3 if isinstance(input_shape, (int, float)) else len(input_shape)
    shape = normalize_input_size(input_shape, spatial_dims)
    if min(shape) < spec.min_input:
        raise ConfigError(
            f"model '{name}' needs an input of at least {spec.min_input} per spatial side "
            f"(documented minimum {'x'.join([str(spec.min_input)] * spatial_dims)}), got {'x'.join(map(str, shape))}; "
            "raise --input-size or pick a model for smaller inputs (--list-models)")


def disable_inplace(model: nn.Module) -> nn.Module:
    """Switch every in-place activation/dropout to out-of-place.

    Grad-CAM's full backward hooks (MONAI ``GradCAM``, medcam) fail or give wrong gradients when a hooked
    module's output is modified in place by the next ReLU, so every network is built without in-place ops.
    """
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    return model


def create_model(
    name: str,
    dim: int | str,
    in_channels: int,
    num_classes: int,
    input_size: int | Sequence[int] | None = None,
    **kw: Any,
) -> nn.Module:
    """Build a registered network with random weights.

    Args:
        name: registered name (``--model``), see :func:`list_models`.
        dim: 2, 3, ``"2d"`` or ``"3d"``.
        in_channels: input channels (1 = OCTA or OCT, 2 = OCT+OCTA).
        num_classes: number of classes (≥ 2; binary tasks use two logits).
        input_size: spatial input size; checked against the model's minimum; required by ``vit``.
        **kw: family-specific options passed to the factory (e.g. ``dropout``, ``conv1_t_stride``).

    Returns:
        The model, with ``forward``, ``forward_features`` and ``forward_head``, and no in-place activations.

    Raises:
        ConfigError: unknown name, unsupported dimension, bad channels/classes, too small an input, an unknown
            option.
    """
    spec = get_spec(name)
    spatial_dims = parse_dim(dim)
    if spatial_dims not in spec.dims:
        raise ConfigError(f"model '{name}' supports {'/'.join(f'{d}d' for d in spec.dims)} only, not {spatial_dims}d")
    if int(in_channels) < 1:
        raise ConfigError(f"in_channels must be ≥ 1, got {in_channels}")
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes must be ≥ 2 (binary tasks use two logits), got {num_classes}")
    size: tuple[int, ...] | None = None
    if input_size is not None:
        size = normalize_input_size(input_size, spatial_dims)
        check_input_size(name, size, spatial_dims)
    elif spec.needs_input_size:
        raise ConfigError(f"model '{name}' needs the input size at construction (--input-size)")
    try:
        model = spec.factory(spatial_dims=spatial_dims, in_channels=int(in_channels), num_classes=int(num_classes),
                             input_size=size, **kw)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ConfigError(f"model '{name}': unknown option ({e})") from None
        raise
    return disable_inplace(model)


#: Model options of the configuration (``ModelConfig`` field -> (factory keyword, default)). A family lists the
#: ones it takes in ``register_model(options=...)``; the factory gets them only when they differ from the default,
#: so a checkpoint records (``model_kwargs``) only what rebuilds its model differently from the plain name.
MODEL_OPTIONS: dict[str, tuple[str, Any]] = {"shortcut_type": ("shortcut_type", "B"),
                                             "drop_path": ("drop_path_rate", 0.0)}


def model_options(name: str, values: Mapping[str, Any], explicit: Callable[[str], bool] = lambda _: False
                  ) -> dict[str, Any]:
    """The factory keywords for the configuration's model options (``--shortcut-type``, ``--drop-path``).

    Args:
        name: registered model name.
        values: option name -> value (e.g. ``dataclasses.asdict(cfg.model)``).
        explicit: whether the user set an option explicitly (``cfg.is_explicit``).

    Returns:
        ``{factory keyword: value}`` for the options ``name`` takes whose value is not the default.

    Raises:
        ConfigError: an option set explicitly for a model that does not take it.
    """
    spec = get_spec(name)
    out: dict[str, Any] = {}
    for opt, (kw, default) in MODEL_OPTIONS.items():
        value = values.get(opt, default)
        if opt not in spec.options:
            if explicit(opt):
                takers = [n for n in list_models() if opt in _REGISTRY[n].options]
                raise ConfigError(f"--{opt.replace('_', '-')} applies to {', '.join(takers)} only; --model {name} "
                                  "has no such option (leave it out)")
            continue
        if value != default:
            out[kw] = value
    return out


# ---------------------------------------------------------------------- table for --list-models
def format_model_table(params: bool = False) -> str:
    """A plain-text table of the registered models (printed by ``main.py --list-models``).

    Columns: name, dims, minimum input side, registered (last) CAM layer, whether AE pretraining is supported, and
    with ``params`` the parameters of the 3D model with 1 input channel and 2 classes (building every model takes
    seconds, so the CLI lists without them; the README's "Models" table has them).
    """
    rows = [("name", "dims", "min input", "CAM layer", "AE") + (("params (3D, 1ch, 2cls)",) if params else ())]
    for name in list_models():
        spec = _REGISTRY[name]
        row = (name, "/".join(f"{d}d" for d in spec.dims), str(spec.min_input), spec.cam_layer,
               "yes" if spec.ae_supported else "no")
        if params:
            row += (f"{spec.count_parameters(3) / 1e6:.2f} M" if 3 in spec.dims else "-",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    sized = [n for n in list_models() if _REGISTRY[n].needs_input_size]
    if sized and params:  # their position embeddings grow with the input
        lines.append(f"({', '.join(sized)}: parameters at a 96^3 input; the input size is fixed at construction)")
    return "\n".join(lines)
