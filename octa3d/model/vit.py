"""Vision Transformer (MONAI ``ViT``, classification head), 2D or 3D.

Differences from calling MONAI's ``ViT`` directly, and why:

* ``forward`` returns logits only (MONAI returns ``(logits, hidden_states)``).
* The head is a plain ``Linear`` (MONAI's default ``post_activation="Tanh"`` squashes logits into [-1, 1],
  which cripples cross-entropy).
* Grad-CAM needs a spatial map, but a ViT has tokens. ``cam_grid`` is a parameter-free module that shows the
  patch tokens entering the *last* transformer block as a ``(B, hidden, *grid)`` map (the usual ViT Grad-CAM
  target: after the final LayerNorm only the class token reaches the head, so later patch tokens get no
  gradient). Its output is turned back into tokens, so the computation is unchanged.
* MONAI's unused ``norm_cross_attn`` LayerNorms (built even without cross-attention) are removed.
* The position embeddings fix the input size: the factory requires ``input_size`` and ``forward`` refuses
  another size with a clear message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import ViT
from torch import nn

from octa3d.model.registry import register_model


class TokenGrid(nn.Module):
    """``(B, N, C)`` patch tokens → ``(B, C, *grid)`` map (a reshape; exists so hooks can target it)."""

    def __init__(self, grid: Sequence[int]) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reshape tokens to the patch grid."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)


class ViTClassifier(ViT):
    """MONAI ViT returning logits, with a Grad-CAM-able token map (``cam_grid``)."""

    def __init__(self, *, spatial_dims: int, in_channels: int, num_classes: int, img_size: Sequence[int],
                 patch_size: int | Sequence[int] = 16, **kw: Any) -> None:
        kw.setdefault("post_activation", None)
        super().__init__(in_channels=in_channels, img_size=img_size, patch_size=patch_size, proj_type="conv",
                         classification=True, num_classes=num_classes, spatial_dims=spatial_dims, **kw)
        self.img_size = tuple(int(s) for s in img_size)
        patch = (patch_size,) * spatial_dims if isinstance(patch_size, int) else tuple(patch_size)
        self.cam_grid = TokenGrid([s // p for s, p in zip(self.img_size, patch)])
        for blk in self.blocks:
            # MONAI builds this LayerNorm even without cross-attention and never uses it; parameters without
            # gradients make DDP fail ("unused parameters") and optimisers carry dead weights
            if not blk.with_cross_attention:
                blk.norm_cross_attn = nn.Identity()

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


@register_model(
    "vit", cam_layer="cam_grid", min_input=16, ae_supported=False, feature_size=768,
    stages=(("patch_embedding", "cls_token"), ("blocks", "norm")), head_prefixes=("classification_head",),
    needs_input_size=True, description="MONAI ViT-B/16 (input size fixed at construction)",
)
def vit(spatial_dims: int, in_channels: int, num_classes: int, input_size: Sequence[int] | None = None,
        **kw: Any) -> ViTClassifier:
    """MONAI ``ViT`` (ViT-B/16 by default); ``kw``: ``patch_size``, ``hidden_size``, ``mlp_dim``,
    ``num_layers``, ``num_heads``, ``dropout_rate`` ...

    ``feature_size`` in the registry is the default ``hidden_size`` (768).
    """
    if input_size is None:
        raise TypeError("vit needs input_size")
    return ViTClassifier(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                         img_size=input_size, **kw)
