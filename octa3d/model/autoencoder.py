"""Autoencoder pretraining from any registered CNN (ViTs: masked autoencoding, :mod:`octa3d.model.mae`), and the
encoder transfer into the classifier.

``build_autoencoder`` builds the classifier with the same factory, removes its head, and uses the rest as the
encoder, so ``ae.encoder.state_dict()`` has exactly the classifier's encoder keys and shapes and the transfer
is a 1:1 copy. The decoder mirrors the encoder: a dummy input is passed through the encoder (on the meta
device, so nothing is computed) while hooks record every place where a module's output is spatially smaller
than its input; the distinct sizes are the encoder's resolution levels. The decoder climbs back through the same
sizes, one stage per level: a stride-2 transposed convolution where the level doubles (else a 1×1 conv and
interpolation), norm and activation, a 3×3 conv, norm and activation, and finally a 3×3 conv to the input
channels. A size that rounding leaves one voxel off is interpolated to the recorded shape. Decoder widths are
half the encoder's, clamped to [8, 256], which keeps e.g. a 3D ResNet-50 AE at 64³ trainable on a CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from octa3d.errors import ConfigError
from octa3d.model.mae import build_mae, is_vit
from octa3d.model.registry import ModelSpec, create_model, get_spec, normalize_input_size, parse_dim

logger = logging.getLogger("octa3d.model")

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


@dataclass(frozen=True)
class Level:
    """One resolution level of the encoder: spatial size and (widest) channel count seen at it."""

    shape: tuple[int, ...]
    channels: int


# ---------------------------------------------------------------------- probing the encoder
class _Features(nn.Module):
    """``forward`` = the wrapped model's ``forward_features`` (``functional_call`` only calls ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _strip_head(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Replace every head module by ``nn.Identity`` (no state): what is left is the encoder."""
    for prefix in spec.head_prefixes:
        parent_name, _, leaf = prefix.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(getattr(parent, leaf, None), nn.Module):
            setattr(parent, leaf, nn.Identity())
    return model


def probe_levels(encoder: nn.Module, in_channels: int, input_shape: Sequence[int]) -> list[Level]:
    """Resolution levels of ``encoder.forward_features`` for one input size, input first, output last.

    A level is recorded where a module's output is spatially smaller than its input (strided conv, pooling,
    unpadded conv). Adaptive pools are ignored: squeeze-and-excitation blocks pool to 1 voxel without being a
    stage of the encoder.

    Args:
        encoder: a model with ``forward_features``.
        in_channels: input channels.
        input_shape: spatial input size.

    Returns:
        Levels from the input size down to the encoder output (whose channels are exact).
    """
    dims = len(input_shape)
    records: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []

    def hook(module: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(module, _ADAPTIVE_POOLS) or not args or not isinstance(args[0], torch.Tensor):
            return
        if isinstance(out, torch.Tensor) and out.ndim == dims + 2 and args[0].ndim == dims + 2:
            records.append((tuple(args[0].shape[2:]), tuple(out.shape[2:]), int(out.shape[1])))

    handles = [m.register_forward_hook(hook) for m in encoder.modules()]
    was_training = encoder.training
    encoder.eval()  # BatchNorm in training mode refuses a batch of one at a 1-voxel bottleneck
    try:
        try:  # shapes only: meta stand-ins for the weights, so nothing is computed or copied
            wrapper = _Features(encoder)
            meta = {k: torch.empty_like(v, device="meta")
                    for k, v in [*wrapper.named_parameters(), *wrapper.named_buffers()]}
            with torch.no_grad():
                out = torch.func.functional_call(
                    wrapper, meta, (torch.zeros(1, in_channels, *input_shape, device="meta"),))
        except Exception as e:  # an op without a meta kernel: probe for real
            logger.debug("meta probe failed (%s); probing with real tensors", e)
            records.clear()
            device = next(encoder.parameters()).device
            with torch.no_grad():
                out = encoder.forward_features(torch.zeros(1, in_channels, *input_shape, device=device))
    finally:
        encoder.train(was_training)
        for h in handles:
            h.remove()
    if out.ndim != dims + 2:
        raise ConfigError("the encoder output has no spatial map; this model cannot be mirrored by a decoder")

    widest: dict[tuple[int, ...], int] = {}
    downsampled: set[tuple[int, ...]] = set()
    for shape_in, shape_out, channels in records:
        widest[shape_out] = max(widest.get(shape_out, 0), channels)
        if math.prod(shape_out) < math.prod(shape_in) and all(o <= i for o, i in zip(shape_out, shape_in)):
            downsampled.add(shape_out)
    first, last = tuple(input_shape), tuple(out.shape[2:])
    inner = [s for s in downsampled if math.prod(last) < math.prod(s) < math.prod(first)]
    shapes = [first, *sorted(inner, key=math.prod, reverse=True), last]
    levels = [Level(s, widest.get(s, 0)) for s in shapes[:-1]] + [Level(last, int(out.shape[1]))]
    return levels


# ---------------------------------------------------------------------- decoder
class UpStage(nn.Module):
    """One decoder stage: up to ``out_size`` (transposed conv or 1×1 conv + interpolation), norm, act,
    optionally a refining 3×3 conv, norm, act."""

    def __init__(self, dims: int, cin: int, cout: int, in_size: Sequence[int], out_size: Sequence[int],
                 refine: bool = True) -> None:
        super().__init__()
        self.out_size = tuple(int(s) for s in out_size)
        self.doubling = all(2 * i - 1 <= o <= 2 * i + 1 for i, o in zip(in_size, out_size))
        conv, norm = Conv[Conv.CONV, dims], Norm[Norm.BATCH, dims]
        if self.doubling:
            self.up = Conv[Conv.CONVTRANS, dims](cin, cout, kernel_size=2, stride=2)
        else:  # change channels at the low resolution, where it is cheap
            self.up = conv(cin, cout, kernel_size=1)
        self.norm = norm(cout)
        self.act = nn.ReLU(inplace=False)
        self.refine = nn.Sequential(conv(cout, cout, kernel_size=3, padding=1, bias=False), norm(cout),
                                    nn.ReLU(inplace=False)) if refine else nn.Identity()
        self.mode = _INTERP[dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample to the recorded size and refine."""
        x = self.up(x)
        if tuple(x.shape[2:]) != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode=self.mode, align_corners=False)
        return self.refine(self.act(self.norm(x)))


class MirrorDecoder(nn.Module):
    """Decoder climbing the encoder's levels back to the input size.

    Args:
        dims: 2 or 3.
        levels: encoder levels from :func:`probe_levels` (input first, encoder output last).
        out_channels: channels of the reconstruction (the encoder's input channels).
        max_channels: widest decoder stage.
        min_channels: narrowest decoder stage.
    """

    def __init__(self, dims: int, levels: Sequence[Level], out_channels: int, max_channels: int = 256,
                 min_channels: int = 8) -> None:
        super().__init__()
        self.out_size = tuple(levels[0].shape)
        self.mode = _INTERP[dims]
        stages, cin = [], levels[-1].channels
        for i in reversed(range(len(levels) - 1)):
            width = levels[i].channels or levels[i + 1].channels // 2  # nothing recorded at the input size
            cout = int(min(max(width // 2, min_channels), max_channels))
            # the full-resolution stage skips the refining conv: it is the costliest and the head conv follows
            stages.append(UpStage(dims, cin, cout, levels[i + 1].shape, levels[i].shape, refine=i > 0))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = Conv[Conv.CONV, dims](cin, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor, out_size: Sequence[int] | None = None) -> torch.Tensor:
        """Reconstruction at ``out_size`` (default: the size the decoder was built for)."""
        x = self.head(self.stages(z))
        size = tuple(out_size) if out_size is not None else self.out_size
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False)
        return x


class AutoEncoder(nn.Module):
    """Classifier encoder + mirrored decoder; ``forward(x)`` returns a reconstruction shaped like ``x``.

    Attributes:
        name: registered model name of the encoder.
        encoder: the classifier built by the registry factory, head removed (``forward_features`` is used).
        decoder: :class:`MirrorDecoder`.
        levels: the probed encoder levels.
    """

    def __init__(self, name: str, encoder: nn.Module, decoder: MirrorDecoder, levels: Sequence[Level]) -> None:
        super().__init__()
        self.name = name
        self.encoder = encoder
        self.decoder = decoder
        self.levels = list(levels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder feature map."""
        return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` (same shape)."""
        return self.decoder(self.encode(x), x.shape[2:])


def build_autoencoder(name: str, dim: int | str, in_channels: int, input_shape: int | Sequence[int],
                      decoder_max_channels: int = 256, decoder_min_channels: int = 8, **kw: Any) -> AutoEncoder:
    """Autoencoder whose encoder is the classifier ``name``'s own feature extractor.

    Args:
        name: registered model name; for a ViT the result is a :class:`octa3d.model.mae.MaskedAutoEncoder`
            (``**kw`` may then also hold its options: ``mask_ratio``, ``norm_pix_loss``, ``loss`` ...).
        dim: 2, 3, ``"2d"`` or ``"3d"``.
        in_channels: input channels.
        input_shape: spatial input size (one side or one per axis) the decoder is built for.
        decoder_max_channels: widest decoder stage.
        decoder_min_channels: narrowest decoder stage.
        **kw: model options, as for :func:`octa3d.model.create_model` (use the same as for the classifier).

    Returns:
        The :class:`AutoEncoder` (a ``MaskedAutoEncoder`` for a ViT).

    Raises:
        ConfigError: unknown model, a model without AE support, too small an input.
    """
    if is_vit(name):  # token sequences have no spatial map to mirror: masked autoencoding instead
        return build_mae(name, dim, in_channels, input_shape, **kw)  # type: ignore[return-value]
    spec = get_spec(name)
    if not spec.ae_supported:
        raise ConfigError(f"AE pretraining is not supported for {name}: its encoder output is a token sequence, "
                          "not a spatial map a decoder can mirror; train it directly (--mode train)")
    dims = parse_dim(dim)
    shape = normalize_input_size(input_shape, dims)
    encoder = _strip_head(create_model(name, dims, in_channels, 2, input_size=shape, **kw), spec)
    levels = probe_levels(encoder, in_channels, shape)
    decoder = MirrorDecoder(dims, levels, in_channels, decoder_max_channels, decoder_min_channels)
    n_dec = sum(p.numel() for p in decoder.parameters())
    logger.info("AE %s %dD: encoder levels %s; decoder %d stages, %.2f M parameters", name, dims,
                " → ".join("x".join(map(str, lv.shape)) + f"@{lv.channels}" for lv in levels),
                len(decoder.stages), n_dec / 1e6)
    return AutoEncoder(name, encoder, decoder, levels)


# ---------------------------------------------------------------------- transfer
@dataclass
class TransferReport:
    """What :func:`transfer_encoder` did.

    Attributes:
        copied: classifier keys overwritten from the encoder state (all encoder keys).
        not_copied: classifier keys left as they were (the head).
    """

    copied: list[str] = field(default_factory=list)
    not_copied: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"copied {len(self.copied)} encoder tensors; kept {len(self.not_copied)} head tensors"


def encoder_state_dict(ae: nn.Module) -> dict[str, torch.Tensor]:
    """The (masked) autoencoder's encoder state dict, keyed exactly as the classifier's encoder tensors."""
    spec = get_spec(ae.name)
    state = ae.encoder.state_dict()
    stray = [k for k in state if not spec.is_encoder_key(k)]
    if stray:  # a registration bug: the stripped model still holds non-encoder tensors
        raise RuntimeError(f"{ae.name}: AE encoder holds keys outside the encoder prefixes: {stray[:5]}")
    return dict(state)


def transfer_encoder(encoder_state: Mapping[str, torch.Tensor], classifier: nn.Module, name: str) -> TransferReport:
    """Copy a pretrained encoder into ``classifier``; the head keeps its (random) initialisation.

    Args:
        encoder_state: :func:`encoder_state_dict` output; a full AE state dict (``encoder.``/``decoder.`` keys)
            is accepted too.
        classifier: model built by :func:`octa3d.model.create_model` for ``name``.
        name: registered model name.

    Returns:
        :class:`TransferReport`.

    Raises:
        ConfigError: the state does not fit the classifier (another model, dimension or channel count); the
            message names the first mismatching key and both shapes.
    """
    spec = get_spec(name)
    own = classifier.state_dict()
    enc_keys = spec.encoder_keys(own)
    state = dict(encoder_state)
    if enc_keys and enc_keys[0] not in state and f"encoder.{enc_keys[0]}" in state:
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    hint = ("pretrain the AE with the same --model, --dim and --modality (input channels) as the classifier")
    for key in enc_keys:
        if key not in state:
            raise ConfigError(f"encoder checkpoint does not match model '{name}': key '{key}' (shape "
                              f"{tuple(own[key].shape)}) is missing from it; {hint}")
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise ConfigError(f"encoder checkpoint does not match model '{name}': '{key}' has shape "
                              f"{tuple(state[key].shape)} in the checkpoint but {tuple(own[key].shape)} in the "
                              f"model; {hint}")
    extra = [k for k in state if k not in enc_keys]
    if extra:
        raise ConfigError(f"encoder checkpoint does not match model '{name}': it holds '{extra[0]}', which is not "
                          f"an encoder tensor of this model ({len(extra)} such keys); {hint}")
    classifier.load_state_dict({k: state[k] for k in enc_keys}, strict=False)
    report = TransferReport(copied=list(enc_keys), not_copied=[k for k in own if k not in set(enc_keys)])
    logger.info("encoder transfer into %s: %s", name, report)
    return report


# ---------------------------------------------------------------------- freezing
def _set_requires_grad(model: nn.Module, prefixes: Sequence[str], flag: bool) -> list[str]:
    names = []
    for pname, p in model.named_parameters():
        if any(pname == pre or pname.startswith(pre + ".") for pre in prefixes):
            p.requires_grad_(flag)
            names.append(pname)
    return names


def set_encoder_trainable(model: nn.Module, name: str, flag: bool) -> list[str]:
    """Make every encoder parameter trainable (``flag=True``) or frozen (head-only training).

    BatchNorm running statistics still update in ``train()`` mode; put frozen stages in ``eval()`` if they
    must stay fixed too.

    Returns:
        The names of the parameters changed.
    """
    return _set_requires_grad(model, get_spec(name).encoder_prefixes, flag)


def freeze_encoder_stages(model: nn.Module, name: str, n: int) -> list[str]:
    """Freeze the first ``n`` encoder stages (``ModelSpec.stages``); the others stay as they are.

    Raises:
        ConfigError: ``n`` is negative or larger than the number of stages.

    Returns:
        The names of the frozen parameters.
    """
    stages = get_spec(name).stages
    if not 0 <= n <= len(stages):
        raise ConfigError(f"model '{name}' has {len(stages)} encoder stages; cannot freeze {n}")
    return _set_requires_grad(model, [p for stage in stages[:n] for p in stage], False)
