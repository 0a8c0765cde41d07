"""A small CNN after ClinicaDL's ``Conv5_FC3``: five conv blocks, global average pooling, dropout, a linear head.

Fast on a CPU (≈0.4 M parameters in 3D), which makes it the default for demos and smoke tests. Differences
from ClinicaDL: max-pooling uses ``ceil_mode`` (the role of ClinicaDL's ``PadMaxPool``: odd sizes keep their
border), the head starts from global average pooling instead of flattening a fixed-size map (any input of at
least 16 per side works), and it is one linear layer behind dropout 0.2, not three FC layers behind dropout 0.5.
Why: on cohorts the recipe was not tuned to, the three-layer head behind dropout 0.5 held the network at chance
for 14-17 epochs before it learned; a linear head on the pooled features left chance in 7-8 (README, "Training
recipe": the ablation). ``head="fc3"`` keeps the old layout, which checkpoints of octa3d 0.1.0 hold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

from octa3d.model.registry import register_model

_CHANNELS = (8, 16, 32, 64, 128)


#: Head layouts: ``linear`` (the default) and ``fc3`` (ClinicaDL's, the default of octa3d 0.1.0).
HEADS = ("linear", "fc3")


class ConvFC(nn.Module):
    """5 × [conv3, BN, ReLU, max-pool 2] with 8…128 channels, global average pooling, dropout and the head.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        dropout: dropout probability before the head.
        head: ``linear`` (128 → classes) or ``fc3`` (128 → 256 → 64 → classes, ReLU between).
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, dropout: float = 0.2,
                 head: str = "linear") -> None:
        if head not in HEADS:
            raise ValueError(f"cnn head must be one of {', '.join(HEADS)}, got {head!r}")
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        maxpool, avgpool = Pool[Pool.MAX, spatial_dims], Pool[Pool.ADAPTIVEAVG, spatial_dims]
        blocks, c = OrderedDict(), in_channels
        for i, out in enumerate(_CHANNELS, start=1):
            blocks[f"block{i}"] = nn.Sequential(OrderedDict(
                conv=conv(c, out, kernel_size=3, padding=1), norm=norm(out), act=nn.ReLU(inplace=False),
                pool=maxpool(kernel_size=2, stride=2, ceil_mode=True),
            ))
            c = out
        self.features = nn.Sequential(blocks)
        self.avgpool = avgpool(1)
        fc: list[nn.Module] = [nn.Linear(c, num_classes)] if head == "linear" else [
            nn.Linear(c, 256), nn.ReLU(inplace=False), nn.Linear(256, 64), nn.ReLU(inplace=False),
            nn.Linear(64, num_classes)]
        self.classifier = nn.Sequential(nn.Flatten(1), nn.Dropout(dropout), *fc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv blocks: ``(B, 128, *ceil(spatial / 32))``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling, dropout, the head."""
        return self.classifier(self.avgpool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


@register_model(
    "cnn", cam_layer="features.block5.act", min_input=16, feature_size=_CHANNELS[-1],
    stages=tuple((f"features.block{i}",) for i in range(1, 6)), head_prefixes=("classifier",),
    description="small Conv5 CNN (ClinicaDL style), linear head",
    # octa3d 0.1.0 saved the FC3 head (dropout 0.5) under this name without keywords; its last layer is classifier.6
    legacy_kwargs=lambda sd: {"head": "fc3", "dropout": 0.5} if "classifier.6.weight" in sd else {},
)
def cnn(spatial_dims: int, in_channels: int, num_classes: int, input_size: Sequence[int] | None = None,
        **kw: Any) -> ConvFC:
    """The small CNN; ``kw``: ``dropout``, ``head``."""
    return ConvFC(spatial_dims, in_channels, num_classes, **kw)
