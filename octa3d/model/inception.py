"""Inception-v3, a dimension-generic port of torchvision's ``Inception3`` (no torchvision import).

Same blocks and names as torchvision (``Conv2d_1a_3x3`` … ``Mixed_7c``, ``AuxLogits``, ``fc``; the names keep
"2d" in 3D too) and, in 2D, the same parameter names and shapes, so ImageNet weights from a local file load
through ``--init-from`` (except the first conv when ``in_channels`` != 3).

Generalising the factorised convolutions to 3D:

* Inception-C/D chain 1×7 and 7×1 convolutions; in 3D the chain gets one 7-tap conv per axis (1×1×7, 1×7×1,
  7×1×1), numbered on after torchvision's names (e.g. ``branch7x7_4`` exists only in 3D).
* Inception-E concatenates parallel 1×3 and 3×1 convolutions with 384 channels each; in 3D there are three
  (suffixes a/b/c) with 256 channels each, so every block keeps its torchvision channel count and the encoder
  output stays 2048 channels.

Stem and reduction convolutions are unpadded as in the original, so the minimum input is 75 per side (Mixed_7c
is then 1 voxel); global average pooling makes every larger size work. The auxiliary classifier is off by
default (``aux_logits=False``); when on, a training-mode ``forward`` returns ``(logits, aux_logits)``. Its
fixed 5-wide average pool is adaptive here (equal to torchvision's at the canonical 299 input) so that small
inputs work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

from octa3d.model.registry import register_model


class BasicConv(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001), ReLU (torchvision's ``BasicConv2d``)."""

    def __init__(self, dims: int, cin: int, cout: int, kernel_size: int | Sequence[int], stride: int = 1,
                 padding: int | Sequence[int] = 0) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, dims](cin, cout, kernel_size=kernel_size, stride=stride, padding=padding,
                                          bias=False)
        self.bn = Norm[Norm.BATCH, dims](cout, eps=0.001)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv → BN → ReLU."""
        return self.relu(self.bn(self.conv(x)))


class AvgPool3(nn.Module):
    """3-wide average pooling, stride 1, zero padding 1 counted in the mean (torchvision's branch pool).

    Written as explicit padding + unpadded pooling because ``avg_pool3d`` refuses inputs smaller than the
    kernel even when padding would cover them (a 1-voxel Mixed_7c map at the minimum input); the result is the
    same as ``AvgPool(3, 1, padding=1, count_include_pad=True)``.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.pad = [1] * (2 * dims)
        self.pool = Pool[Pool.AVG, dims](kernel_size=3, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad by one, then average 3-wide windows."""
        return self.pool(F.pad(x, self.pad))


def _axis_conv(dims: int, cin: int, cout: int, k: int, axis: int) -> BasicConv:
    """A ``k``-tap convolution along one spatial axis ("same" padding), e.g. 1×7 for ``axis=dims-1``."""
    kernel = tuple(k if i == axis else 1 for i in range(dims))
    padding = tuple(k // 2 if i == axis else 0 for i in range(dims))
    return BasicConv(dims, cin, cout, kernel, padding=padding)


class _Block(nn.Module):
    """Base class: runs named chains of sub-modules and concatenates the branch outputs."""

    branches: list[list[str]]

    def _chain(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        for n in names:
            x = getattr(self, n)(x)
        return x

    def _add_chain(self, prefix: str, start: int, dims: int, cin: int, cmid: int, cout: int, k: int,
                   axes: Sequence[int]) -> list[str]:
        """Factorised k-tap convs along ``axes`` named ``{prefix}{start}``, ``{prefix}{start+1}`` …"""
        names = []
        for j, axis in enumerate(axes):
            name = f"{prefix}{start + j}"
            self.add_module(name, _axis_conv(dims, cin if j == 0 else cmid, cout if j == len(axes) - 1 else cmid,
                                             k, axis))
            names.append(name)
        return names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the branches along channels."""
        return torch.cat([self._chain(x, names) for names in self.branches], 1)


class InceptionA(_Block):
    """35×35 block (Mixed_5b–5d): 1×1, 5×5, double 3×3 and pooled branches."""

    def __init__(self, dims: int, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv(dims, cin, 64, 1)
        self.branch5x5_1 = BasicConv(dims, cin, 48, 1)
        self.branch5x5_2 = BasicConv(dims, 48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(dims, cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(dims, 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(dims, 96, 96, 3, padding=1)
        self.pool = AvgPool3(dims)
        self.branch_pool = BasicConv(dims, cin, pool_features, 1)
        self.branches = [["branch1x1"], ["branch5x5_1", "branch5x5_2"],
                         ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], ["pool", "branch_pool"]]


class InceptionB(_Block):
    """Grid reduction 35 → 17 (Mixed_6a)."""

    def __init__(self, dims: int, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv(dims, cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(dims, cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(dims, 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(dims, 96, 96, 3, stride=2)
        self.pool = Pool[Pool.MAX, dims](kernel_size=3, stride=2)
        self.branches = [["branch3x3"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], ["pool"]]


class InceptionC(_Block):
    """17×17 block with factorised 7-tap convolutions (Mixed_6b–6e)."""

    def __init__(self, dims: int, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        last_first = list(reversed(range(dims)))  # torchvision: 1×7 (last axis) first
        self.branch1x1 = BasicConv(dims, cin, 192, 1)
        self.branch7x7_1 = BasicConv(dims, cin, c7, 1)
        b7 = self._add_chain("branch7x7_", 2, dims, c7, c7, 192, 7, last_first)
        self.branch7x7dbl_1 = BasicConv(dims, cin, c7, 1)
        # torchvision: 7×1, 1×7, 7×1, 1×7 (first axis first, twice)
        bdbl = self._add_chain("branch7x7dbl_", 2, dims, c7, c7, 192, 7, list(range(dims)) * 2)
        self.pool = AvgPool3(dims)
        self.branch_pool = BasicConv(dims, cin, 192, 1)
        self.branches = [["branch1x1"], ["branch7x7_1", *b7], ["branch7x7dbl_1", *bdbl], ["pool", "branch_pool"]]


class InceptionD(_Block):
    """Grid reduction 17 → 8 (Mixed_7a)."""

    def __init__(self, dims: int, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv(dims, cin, 192, 1)
        self.branch3x3_2 = BasicConv(dims, 192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(dims, cin, 192, 1)
        b7 = self._add_chain("branch7x7x3_", 2, dims, 192, 192, 192, 7, list(reversed(range(dims))))
        last = f"branch7x7x3_{2 + dims}"
        self.add_module(last, BasicConv(dims, 192, 192, 3, stride=2))
        self.pool = Pool[Pool.MAX, dims](kernel_size=3, stride=2)
        self.branches = [["branch3x3_1", "branch3x3_2"], ["branch7x7x3_1", *b7, last], ["pool"]]


class InceptionE(_Block):
    """8×8 block with parallel axis-wise 3-tap convolutions (Mixed_7b, 7c); 2048 output channels."""

    def __init__(self, dims: int, cin: int) -> None:
        super().__init__()
        width = 768 // dims  # 2 × 384 in 2D, 3 × 256 in 3D
        axes = list(reversed(range(dims)))
        self.branch1x1 = BasicConv(dims, cin, 320, 1)
        self.branch3x3_1 = BasicConv(dims, cin, 384, 1)
        self.split3x3 = [f"branch3x3_2{s}" for s in "abc"[:dims]]
        for name, axis in zip(self.split3x3, axes):
            self.add_module(name, _axis_conv(dims, 384, width, 3, axis))
        self.branch3x3dbl_1 = BasicConv(dims, cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(dims, 448, 384, 3, padding=1)
        self.split3x3dbl = [f"branch3x3dbl_3{s}" for s in "abc"[:dims]]
        for name, axis in zip(self.split3x3dbl, axes):
            self.add_module(name, _axis_conv(dims, 384, width, 3, axis))
        self.pool = AvgPool3(dims)
        self.branch_pool = BasicConv(dims, cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate 1×1, split 3×3, split double-3×3 and pooled branches."""
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([getattr(self, n)(b3) for n in self.split3x3], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([getattr(self, n)(bd) for n in self.split3x3dbl], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on Mixed_6e (training only)."""

    def __init__(self, dims: int, cin: int, num_classes: int) -> None:
        super().__init__()
        self.pool = Pool[Pool.ADAPTIVEAVG, dims](5)
        self.conv0 = BasicConv(dims, cin, 128, 1)
        self.conv1 = BasicConv(dims, 128, 768, 5)
        self.conv1.stddev = 0.01  # type: ignore[assignment]
        self.gap = Pool[Pool.ADAPTIVEAVG, dims](1)
        self.fc = nn.Linear(768, num_classes)
        self.fc.stddev = 0.001  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Auxiliary logits ``(B, num_classes)``."""
        return self.fc(torch.flatten(self.gap(self.conv1(self.conv0(self.pool(x)))), 1))


class Inception3(nn.Module):
    """Inception-v3 for ``spatial_dims`` 2 or 3.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        aux_logits: add the auxiliary classifier (training ``forward`` then returns ``(logits, aux)``).
        dropout: dropout probability before ``fc``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, aux_logits: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__()
        d = spatial_dims
        self.Conv2d_1a_3x3 = BasicConv(d, in_channels, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(d, 32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(d, 32, 64, 3, padding=1)
        self.maxpool1 = Pool[Pool.MAX, d](kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv(d, 64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(d, 80, 192, 3)
        self.maxpool2 = Pool[Pool.MAX, d](kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(d, 192, pool_features=32)
        self.Mixed_5c = InceptionA(d, 256, pool_features=64)
        self.Mixed_5d = InceptionA(d, 288, pool_features=64)
        self.Mixed_6a = InceptionB(d, 288)
        self.Mixed_6b = InceptionC(d, 768, channels_7x7=128)
        self.Mixed_6c = InceptionC(d, 768, channels_7x7=160)
        self.Mixed_6d = InceptionC(d, 768, channels_7x7=160)
        self.Mixed_6e = InceptionC(d, 768, channels_7x7=192)
        self.AuxLogits = InceptionAux(d, 768, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(d, 768)
        self.Mixed_7b = InceptionE(d, 1280)
        self.Mixed_7c = InceptionE(d, 2048)
        self.avgpool = Pool[Pool.ADAPTIVEAVG, d](1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.1, a=-2, b=2)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # the aux head's own (smaller) init scales
            if hasattr(m, "stddev"):
                target = m.conv if isinstance(m, BasicConv) else m
                nn.init.trunc_normal_(target.weight, mean=0.0, std=float(m.stddev), a=-2, b=2)

    def _to_6e(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        return self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))

    def _from_6e(self, x: torch.Tensor) -> torch.Tensor:
        return self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem to Mixed_7c: ``(B, 2048, *spatial')`` (1 voxel per side at the minimum input of 75)."""
        return self._from_6e(self._to_6e(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling, dropout, ``fc``."""
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, num_classes)``; ``(logits, aux_logits)`` in training mode with ``aux_logits=True``."""
        x = self._to_6e(x)
        aux = self.AuxLogits(x) if self.AuxLogits is not None and self.training else None
        logits = self.forward_head(self._from_6e(x))
        return (logits, aux) if aux is not None else logits


@register_model(
    "inception_v3", cam_layer="Mixed_7c", min_input=75, feature_size=2048,
    stages=(("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
            ("Mixed_5b", "Mixed_5c", "Mixed_5d"), ("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
            ("Mixed_7a", "Mixed_7b", "Mixed_7c")),
    head_prefixes=("AuxLogits", "fc"), description="Inception-v3 (torchvision port, dimension-generic)",
)
def inception_v3(spatial_dims: int, in_channels: int, num_classes: int, input_size: Sequence[int] | None = None,
                 **kw: Any) -> Inception3:
    """Inception-v3; ``kw``: ``aux_logits`` (default False), ``dropout``."""
    return Inception3(spatial_dims, in_channels, num_classes, **kw)
