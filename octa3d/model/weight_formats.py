"""Foreign checkpoint layouts → the registry's parameter names (``--init-format``), with the adaptations the
mapping needs: position embeddings resized to the model's patch grid, RGB patch/stem kernels adapted to 1-2 channels,
OCTCube's separate spatial/temporal embeddings combined, fused/split attention projections converted.

Layouts (read from the upstream model code; tested on generated checkpoints in the same layout):

* ``retfound`` — timm ``VisionTransformer`` (RETFound's ``models_vit.py``, MAE pre-training files):
  ``patch_embed.proj`` (Conv2d), ``cls_token``, ``pos_embed`` ``(1, 1 + n, C)`` (class token first), ``blocks.N.norm1``,
  ``blocks.N.attn.qkv`` (fused, bias), ``blocks.N.attn.proj``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1/fc2``, ``norm``
  (or ``fc_norm`` after global-pool fine-tuning), ``head``; MAE files add ``decoder_*``/``mask_token`` (not loaded).
* ``octcube`` — OCTCube's 3D ViT (``models_vit_st*.py``, ``video_vit.py``): ``patch_embed.proj`` (Conv3d, kernel
  ``(t, p, p)`` over (B-scans, depth, width)), ``pos_embed_spatial`` ``(1, h*w, C)`` + ``pos_embed_temporal``
  ``(1, t, C)`` (+ ``pos_embed_class``) or one ``pos_embed``; attention as ``attn.q/k/v`` + ``attn.proj``
  (``video_vit.Attention``), ``attn.qkv``, or flash-attention's ``mixer.Wqkv`` + ``mixer.out_proj``.
* ``medicalnet`` — Tencent MedicalNet 3D ResNets (``models/resnet.py``): ``conv1`` (1 channel), ``bn1``,
  ``layerK.N.{conv,bn}M``, ``layerK.0.downsample.{0,1}`` (shortcut B, no bias; shortcut A has no parameters),
  ``conv_seg`` (segmentation head, not loaded) — the names are MONAI's already.

MONAI's ViT (:mod:`octa3d.model.vit`) adds the position embedding to patch tokens only, so the class-token entry
of a timm ``pos_embed`` (a constant) is added to ``cls_token``: the same numbers enter the first block.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from octa3d.errors import ConfigError

FORMATS = ("octa3d", "retfound", "octcube", "medicalnet")
#: formats holding a ViT and the spatial dimensions of their patch embedding
VIT_FORMATS = {"retfound": 2, "octcube": 3}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: block sub-names → MONAI ``TransformerBlock`` names (fused qkv and split q/k/v are handled separately)
_BLOCK_NAMES = {"norm1.": "norm1.", "norm2.": "norm2.", "attn.qkv.": "attn.qkv.", "attn.proj.": "attn.out_proj.",
                "mixer.Wqkv.": "attn.qkv.", "mixer.out_proj.": "attn.out_proj.", "mlp.fc1.": "mlp.linear1.",
                "mlp.fc2.": "mlp.linear2."}
PATCH_KEY = "patch_embed.proj.weight"
MONAI_PATCH = "patch_embedding.patch_embeddings"
MONAI_POS = "patch_embedding.position_embeddings"


@dataclass
class Mapped:
    """A checkpoint in the model's names: ``tensors[model key] = (tensor, source keys)``; ``unused`` file keys."""

    tensors: dict[str, tuple[torch.Tensor, list[str]]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    adaptations: list[str] = field(default_factory=list)

    def put(self, key: str, tensor: torch.Tensor, *sources: str) -> None:
        """Record ``tensor`` for model key ``key``, made from the file's ``sources``."""
        self.tensors[key] = (tensor, list(sources))


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """The layout of a (``module.``-stripped) state dict: one of :data:`FORMATS`.

    OCTCube: separate spatial/temporal position embeddings, a 5D patch kernel or split/flash attention names;
    RETFound: timm names with a 4D patch kernel; MedicalNet: ResNet names with ``conv_seg`` or a 5D 1-channel stem
    and no ``fc``; anything else is read as an octa3d/MONAI state dict (names matched as they are).
    """
    keys = set(state)
    patch = state.get(PATCH_KEY)
    if "pos_embed_spatial" in keys or "pos_embed_temporal" in keys or (patch is not None and patch.ndim == 5):
        return "octcube"
    if any(".mixer.Wqkv." in k or ".attn.q.weight" in k for k in keys):
        return "octcube"
    if patch is not None or any(k.startswith("blocks.") and ".mlp.fc1." in k for k in keys):
        return "retfound"
    stem = state.get("conv1.weight")
    if "layer1.0.conv1.weight" in keys and (any(k.startswith("conv_seg.") for k in keys)
                                            or (stem is not None and stem.ndim == 5 and "fc.weight" not in keys)):
        return "medicalnet"
    return "octa3d"


# ---------------------------------------------------------------------------------------------- architecture
def vit_architecture(state: dict[str, torch.Tensor], fmt: str) -> dict[str, Any]:
    """What the file says about the ViT it holds: patch size, hidden size, blocks, input channels, qkv bias.

    Raises:
        ConfigError: no patch-embedding kernel, or one of the wrong dimension for the layout.
    """
    patch = state.get(PATCH_KEY)
    dims = VIT_FORMATS[fmt]
    if patch is None or patch.ndim != dims + 2:
        raise ConfigError(f"--init-format {fmt}: expected '{PATCH_KEY}' as a {dims}D convolution kernel "
                          f"({dims + 2} dimensions), found {None if patch is None else tuple(patch.shape)}")
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    qkv_bias = any(k.endswith(("attn.qkv.bias", "attn.q.bias", "mixer.Wqkv.bias")) for k in state)
    return {"spatial_dims": dims, "patch_size": [int(s) for s in patch.shape[2:]], "hidden_size": int(patch.shape[0]),
            "num_layers": max(blocks) + 1 if blocks else 0, "in_channels": int(patch.shape[1]), "qkv_bias": qkv_bias}


def resnet_architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Shortcut type (A: no shortcut parameters), whether type-B shortcuts have a bias, stem input channels."""
    has_downsample = any(".downsample." in k for k in state)
    stem = state.get("conv1.weight")
    return {"shortcut_type": "B" if has_downsample else "A",
            "bias_downsample": any(k.endswith("downsample.0.bias") for k in state),
            "in_channels": int(stem.shape[1]) if stem is not None else None}


# ---------------------------------------------------------------------------------------------- adaptations
def adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first-layer kernel ``(out, C_file, *k)`` for ``channels`` inputs: ``sum over C_file / channels``, repeated.

    The documented equivalence: an image given as the same grey values on every channel produces the same
    response in the file's network (all ``C_file`` channels = the grey image) and in ours (all ``channels`` =
    the grey image). 1 channel from RGB = the sum of the RGB kernels; 2 channels from RGB = the RGB mean × 3/2 on
    each; 2 channels from a 1-channel file = half the kernel on each.
    """
    return (weight.sum(1, keepdim=True) / channels).repeat(1, channels, *([1] * (weight.ndim - 2)))


def _grid_of(n: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    """The source patch grid of a flat position embedding of ``n`` tokens (the model's grid when it has ``n``)."""
    if math.prod(grid) == n:
        return grid
    if len(grid) == 2 and math.isqrt(n) ** 2 == n:
        return (math.isqrt(n),) * 2
    if len(grid) == 3:  # OCTCube grids are square in-plane: n = t * s * s
        options = [(t, math.isqrt(n // t)) for t in range(1, n + 1)
                   if n % t == 0 and math.isqrt(n // t) ** 2 == n // t]
        closest = [o for o in options if o[0] == grid[0]] or [o for o in options if o[1] == grid[1]]
        if closest:
            return (closest[0][0], closest[0][1], closest[0][1])
    raise ConfigError(f"cannot tell the patch grid of a position embedding with {n} tokens (the model's grid is "
                      f"{'x'.join(map(str, grid))}); use the input size the checkpoint was trained with")


def resize_grid(pos: torch.Tensor, src: tuple[int, ...], dst: tuple[int, ...]) -> torch.Tensor:
    """Position embeddings ``(1, prod(src), C)`` → ``(1, prod(dst), C)``, interpolated over the patch grid
    (bicubic in 2D, trilinear in 3D, linear in 1D; ``align_corners=False``)."""
    if tuple(src) == tuple(dst):
        return pos
    c = pos.shape[-1]
    mode = {1: "linear", 2: "bicubic", 3: "trilinear"}[len(src)]
    x = pos.reshape(1, *src, c).movedim(-1, 1).float()
    x = F.interpolate(x, size=tuple(dst), mode=mode, align_corners=False)
    return x.movedim(1, -1).reshape(1, math.prod(dst), c).to(pos.dtype)


# ---------------------------------------------------------------------------------------------- ViT mapping
def _map_block(state: dict[str, torch.Tensor], i: int, rest: dict[str, str], out: Mapped) -> None:
    """One transformer block: ``rest`` = {sub-name: file key}."""
    pre = f"blocks.{i}."
    for kind in ("weight", "bias"):
        split = [rest.get(f"attn.{p}.{kind}") for p in "qkv"]
        if all(split):
            out.put(pre + f"attn.qkv.{kind}", torch.cat([state[k] for k in split]), *split)
            for p in "qkv":
                rest.pop(f"attn.{p}.{kind}")
    for sub, key in rest.items():
        for old, new in _BLOCK_NAMES.items():
            if sub.startswith(old):
                out.put(pre + new + sub[len(old):], state[key], key)
                break
        else:
            out.unused.append(key)


def map_vit(state: dict[str, torch.Tensor], fmt: str, grid: tuple[int, ...], in_channels: int) -> Mapped:
    """A RETFound/timm or OCTCube state dict in MONAI ViT names, resized to the model's patch ``grid``.

    Args:
        state: the file's tensors (wrappers and ``module.`` prefixes removed).
        fmt: ``retfound`` or ``octcube``.
        grid: the model's patch grid (tokens per spatial axis).
        in_channels: the model's input channels.

    Returns:
        The mapped tensors, the file keys not used (head, decoder ...) and the adaptations made, in words.
    """
    out = Mapped()
    blocks: dict[int, dict[str, str]] = {}
    for key in state:
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = key
    for i, rest in sorted(blocks.items()):
        _map_block(state, i, rest, out)
    used = {k for _, srcs in out.tensors.values() for k in srcs} | set(out.unused)

    for kind in ("weight", "bias"):
        key = f"patch_embed.proj.{kind}"
        if key in state:
            w = state[key]
            if kind == "weight" and w.shape[1] != in_channels:
                out.adaptations.append(f"patch-embedding kernel: {w.shape[1]} input channel(s) -> {in_channels} "
                                       f"(sum over the file's channels / {in_channels}, repeated)")
                w = adapt_channels(w, in_channels)
            out.put(f"{MONAI_PATCH}.{kind}", w, key)
    norm = "norm" if any(k.startswith("norm.") for k in state) else "fc_norm"
    if norm == "fc_norm" and any(k.startswith("fc_norm.") for k in state):
        out.adaptations.append("fc_norm (the norm of a global-pool fine-tuned model) loaded as the final norm, "
                               "which octa3d applies before taking the class token")
    for kind in ("weight", "bias"):
        if f"{norm}.{kind}" in state:
            out.put(f"norm.{kind}", state[f"{norm}.{kind}"], f"{norm}.{kind}")

    cls = state.get("cls_token")
    cls_sources = ["cls_token"] if cls is not None else []
    pos, cls_pos, pos_sources = _position_embeddings(state, grid, out)
    pos_sources = [k for k in pos_sources if k in state]
    if pos is not None:
        out.put(MONAI_POS, pos, *pos_sources)
    if cls is not None:
        if cls_pos is not None:
            cls = cls + cls_pos
            out.adaptations.append("the class token's position embedding added to cls_token (MONAI adds position "
                                   "embeddings to patch tokens only)")
        out.put("cls_token", cls, *cls_sources)
    used |= {k for _, srcs in out.tensors.values() for k in srcs}
    used |= {k for k in ("pos_embed", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class") if k in state}
    out.unused.extend(k for k in state if k not in used)
    return out


def _position_embeddings(state: dict[str, torch.Tensor], grid: tuple[int, ...], out: Mapped
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """``(patch position embeddings for grid, class-token entry or None, source keys)``."""
    if "pos_embed_spatial" in state or "pos_embed_temporal" in state:
        return _octcube_positions(state, grid, out)
    pos = state.get("pos_embed")
    if pos is None:
        return None, None, []
    n = pos.shape[1]
    # timm puts the class token's entry first when the file has a class token (unless its grid fits without it)
    prefix = 1 if "cls_token" in state and n > 1 and _fits(n - 1, grid) else 0
    cls_pos, patches = (pos[:, :1], pos[:, 1:]) if prefix else (None, pos)
    src = _grid_of(patches.shape[1], grid)
    if src != tuple(grid):
        mode = "bicubic" if len(grid) == 2 else "trilinear"
        out.adaptations.append(f"position embeddings interpolated from a {'x'.join(map(str, src))} to a "
                               f"{'x'.join(map(str, grid))} patch grid ({mode})")
    return resize_grid(patches, src, tuple(grid)), cls_pos, ["pos_embed"]


def _fits(n: int, grid: tuple[int, ...]) -> bool:
    try:
        _grid_of(n, grid)
        return True
    except ConfigError:
        return False


def _octcube_positions(state: dict[str, torch.Tensor], grid: tuple[int, ...], out: Mapped
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """OCTCube: ``pos[t, h, w] = temporal[t] + spatial[h, w]`` on the model's grid (each part resized first)."""
    spatial, temporal = state.get("pos_embed_spatial"), state.get("pos_embed_temporal")
    if spatial is None or temporal is None or len(grid) != 3:
        raise ConfigError("an OCTCube checkpoint with separate position embeddings needs both pos_embed_spatial and "
                          "pos_embed_temporal, and a 3D model (--dim 3d)")
    side = math.isqrt(spatial.shape[1])
    if side * side != spatial.shape[1]:
        raise ConfigError(f"pos_embed_spatial has {spatial.shape[1]} tokens, not a square in-plane grid")
    sp = resize_grid(spatial, (side, side), tuple(grid[1:]))
    tp = resize_grid(temporal, (temporal.shape[1],), (grid[0],))
    if (side, side) != tuple(grid[1:]) or temporal.shape[1] != grid[0]:
        out.adaptations.append(f"OCTCube position embeddings resized: spatial {side}x{side} -> "
                               f"{grid[1]}x{grid[2]} (bicubic), temporal {temporal.shape[1]} -> {grid[0]} (linear)")
    out.adaptations.append("OCTCube spatial + temporal position embeddings combined (summed over the patch grid)")
    c = spatial.shape[-1]
    pos = (tp.reshape(grid[0], 1, c) + sp.reshape(1, grid[1] * grid[2], c)).reshape(1, -1, c)
    return pos, state.get("pos_embed_class"), ["pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"]


# ---------------------------------------------------------------------------------------------- ResNet mapping
def map_resnet(state: dict[str, torch.Tensor], in_channels: int) -> Mapped:
    """MedicalNet names are MONAI's: copied as they are; the stem kernel adapted to ``in_channels``."""
    out = Mapped()
    for key, tensor in state.items():
        if key.startswith(("conv_seg.", "fc.")):
            out.unused.append(key)
            continue
        if key == "conv1.weight" and tensor.shape[1] != in_channels:
            out.adaptations.append(f"conv1 kernel: {tensor.shape[1]} input channel(s) -> {in_channels} (sum over "
                                   f"the file's channels / {in_channels}, repeated)")
            tensor = adapt_channels(tensor, in_channels)
        out.put(key, tensor, key)
    return out
