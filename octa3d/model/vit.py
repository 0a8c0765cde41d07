"""Vision Transformers (MONAI ``ViT``, classification head), 2D or 3D: ``vit`` (MONAI defaults), ``vit_base`` and
``vit_large`` (the ViT-B/16 and ViT-L/16 of timm, RETFound and OCTCube).

Differences from calling MONAI's ``ViT`` directly, and why:

* ``forward`` returns logits only (MONAI returns ``(logits, hidden_states)``).
* The head is a plain ``Linear`` (MONAI's default ``post_activation="Tanh"`` squashes logits into [-1, 1],
  which cripples cross-entropy).
* Grad-CAM needs a spatial map, but a ViT has tokens. ``cam_grid`` is a parameter-free module that shows the
  patch tokens entering the *last* transformer block as a ``(B, hidden, *grid)`` map (the usual ViT Grad-CAM
  target: after the final LayerNorm only the class token reaches the head, so later patch tokens get no
  gradient). Its output is turned back into tokens, so the computation is unchanged.
* MONAI's unused ``norm_cross_attn`` LayerNorms (built even without cross-attention) are removed.
* Stochastic depth (``drop_path_rate``, MONAI's ``DropPath`` on both residual branches, rate rising linearly from 0
  at the first block to ``drop_path_rate`` at the last, as in timm) and the LayerNorm epsilon (``norm_eps``: timm
  ViTs use 1e-6) are options; neither adds parameters, so the state-dict names stay MONAI's.
* The position embeddings fix the input size: the factory requires ``input_size`` and ``forward`` refuses
  another size with a clear message (a side that is not a multiple of the patch size loses its remainder, as
  in MONAI).

Parameter names (what ``--init-from`` maps foreign checkpoints onto, and what the masked autoencoder reuses):
``patch_embedding.patch_embeddings.{weight,bias}`` (a Conv with kernel = stride = patch size),
``patch_embedding.position_embeddings`` ``(1, n_patches, hidden)`` (patch tokens only, row-major over the patch
grid), ``cls_token`` ``(1, 1, hidden)``, ``blocks.N.norm1``, ``blocks.N.attn.qkv`` (fused q, k, v; bias only with
``qkv_bias``), ``blocks.N.attn.out_proj``, ``blocks.N.norm2``, ``blocks.N.mlp.linear1`` / ``linear2``, ``norm`` and
the head ``classification_head``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.layers import DropPath
from monai.networks.nets import ViT
from torch import nn

from octa3d.errors import ConfigError
from octa3d.model.registry import register_model

#: hidden size, blocks, heads and MLP width of the registered sizes (timm's ViT-B/16 and ViT-L/16)
VIT_SIZES = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}


class TokenGrid(nn.Module):
    """``(B, N, C)`` patch tokens → ``(B, C, *grid)`` map (a reshape; exists so hooks can target it)."""

    def __init__(self, grid: Sequence[int]) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reshape tokens to the patch grid."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)


class DropPathBlock(TransformerBlock):
    """MONAI's ``TransformerBlock`` with stochastic depth on both residual branches (same parameters)."""

    drop_path: nn.Module

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-norm attention and MLP, each residual branch dropped per sample with the block's rate."""
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask))
        if self.with_cross_attention:
            x = x + self.cross_attn(self.norm_cross_attn(x), context=context)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def patch_tuple(patch_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """One patch side (isotropic) or one per axis → a tuple of ``spatial_dims`` ints."""
    patch = (int(patch_size),) * spatial_dims if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if len(patch) != spatial_dims or min(patch) < 1:
        raise ConfigError(f"patch size {patch_size!r} must be one positive number or {spatial_dims} of them")
    return patch


class ViTClassifier(ViT):
    """MONAI ViT returning logits, with a Grad-CAM-able token map (``cam_grid``)."""

    def __init__(self, *, spatial_dims: int, in_channels: int, num_classes: int, img_size: Sequence[int],
                 patch_size: int | Sequence[int] = 16, drop_path_rate: float = 0.0, norm_eps: float | None = None,
                 **kw: Any) -> None:
        kw.setdefault("post_activation", None)
        patch = patch_tuple(patch_size, spatial_dims)
        super().__init__(in_channels=in_channels, img_size=img_size, patch_size=patch, proj_type="conv",
                         classification=True, num_classes=num_classes, spatial_dims=spatial_dims, **kw)
        self.img_size = tuple(int(s) for s in img_size)
        self.patch_size = patch
        self.cam_grid = TokenGrid([s // p for s, p in zip(self.img_size, patch)])
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            # MONAI builds this LayerNorm even without cross-attention and never uses it; parameters without
            # gradients make DDP fail ("unused parameters") and optimisers carry dead weights
            if not blk.with_cross_attention:
                blk.norm_cross_attn = nn.Identity()
            rate = float(drop_path_rate) * i / max(1, n - 1)
            blk.__class__ = DropPathBlock  # same parameters; forward adds the drop path (identity when 0)
            blk.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
        if norm_eps is not None:
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.eps = float(norm_eps)

    @property
    def grid(self) -> tuple[int, ...]:
        """The patch grid (tokens per spatial axis)."""
        return self.cam_grid.grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final LayerNorm: ``(B, 1 + n_patches, hidden)``; token 0 is the class token."""
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"this ViT was built for input size {self.img_size}, got {tuple(x.shape[2:])}; "
                             "rebuild it with input_size set to the data's size")
        x = self.patch_embedding(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks[:-1]:
            x = blk(x)
        # route the patch tokens through the CAM map and back (identity on values)
        grid = self.cam_grid(x[:, 1:])
        x = torch.cat((x[:, :1], grid.flatten(2).transpose(1, 2)), dim=1)
        x = self.blocks[-1](x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Linear classifier on the class token."""
        return self.classification_head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


_VIT_STAGES = (("patch_embedding", "cls_token"), ("blocks", "norm"))


@register_model(
    "vit", cam_layer="cam_grid", min_input=16, ae_supported=True, feature_size=768,
    stages=_VIT_STAGES, head_prefixes=("classification_head",), options=("drop_path",),
    needs_input_size=True, description="MONAI ViT-B/16 with MONAI's defaults (no qkv bias; input size fixed)",
)
def vit(spatial_dims: int, in_channels: int, num_classes: int, input_size: Sequence[int] | None = None,
        **kw: Any) -> ViTClassifier:
    """MONAI ``ViT`` (ViT-B/16 by default); ``kw``: ``patch_size``, ``hidden_size``, ``mlp_dim``,
    ``num_layers``, ``num_heads``, ``dropout_rate``, ``qkv_bias``, ``drop_path_rate``, ``norm_eps`` ...

    ``feature_size`` in the registry is the default ``hidden_size`` (768).
    """
    if input_size is None:
        raise TypeError("vit needs input_size")
    return ViTClassifier(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                         img_size=input_size, **kw)


def _sized(size: str, spatial_dims: int, in_channels: int, num_classes: int,
           input_size: Sequence[int] | None = None, **kw: Any) -> ViTClassifier:
    """ViT-B/L as timm builds them (qkv bias, LayerNorm eps 1e-6); ``kw`` as for :func:`vit` (sizes fixed)."""
    if input_size is None:
        raise TypeError(f"vit_{size} needs input_size")
    fixed = {"hidden_size", "num_layers", "num_heads", "mlp_dim"} & set(kw)
    if fixed:
        raise TypeError(f"unexpected keyword argument {min(fixed)!r} (vit_{size} has a fixed size; use vit)")
    hidden, layers, heads, mlp = VIT_SIZES[size]
    kw.setdefault("qkv_bias", True)
    kw.setdefault("norm_eps", 1e-6)
    return ViTClassifier(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                         img_size=input_size, hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_dim=mlp,
                         **kw)


for _size, (_hidden, _layers, _, _) in VIT_SIZES.items():
    register_model(
        f"vit_{_size}", cam_layer="cam_grid", min_input=16, ae_supported=True, feature_size=_hidden,
        stages=_VIT_STAGES, head_prefixes=("classification_head",), needs_input_size=True, options=("drop_path",),
        description=f"ViT-{_size[0].upper()}/16 as in timm/RETFound/OCTCube ({_layers} blocks, {_hidden} wide, "
                    "qkv bias; input size fixed)",
    )(partial(_sized, _size))
