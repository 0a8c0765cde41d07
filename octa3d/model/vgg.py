"""VGG-16 and VGG-19 with batch normalisation, dimension-generic (MONAI has no VGG).

The convolutional part follows torchvision's ``vgg16_bn``/``vgg19_bn`` exactly, with the same module indices
(``features.0`` …), so 2D torchvision weights load through ``--init-from`` for the layers whose shapes match.
The head differs on purpose: torchvision pools to 7×7 and feeds 25,088 values to 4096-wide layers (in 3D that
is 7³·512 inputs, ~720 M parameters); here global average pooling feeds a 512-wide MLP, so any input of at
least 32 per side works and the model stays trainable on small data.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

from octa3d.model.registry import register_model

_CFGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _layout(cfg: Sequence[int | str]) -> tuple[tuple[tuple[str, ...], ...], str]:
    """Encoder stages (``features.i`` prefixes per pooling block) and the last ReLU's name, from a cfg."""
    stages, current, idx, last_relu = [], [], 0, ""
    for v in cfg:
        if v == "M":
            current.append(f"features.{idx}")
            stages.append(tuple(current))
            current, idx = [], idx + 1
        else:
            current += [f"features.{idx}", f"features.{idx + 1}", f"features.{idx + 2}"]
            last_relu = f"features.{idx + 2}"
            idx += 3
    return tuple(stages), last_relu


class VGG(nn.Module):
    """VGG with BatchNorm for ``spatial_dims`` 2 or 3.

    Args:
        cfg: channel list with ``"M"`` for max-pooling (torchvision's configuration format).
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        hidden: width of the two hidden classifier layers.
        dropout: dropout probability in the classifier.
    """

    def __init__(self, cfg: Sequence[int | str], spatial_dims: int, in_channels: int, num_classes: int,
                 hidden: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        maxpool, avgpool = Pool[Pool.MAX, spatial_dims], Pool[Pool.ADAPTIVEAVG, spatial_dims]
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(maxpool(kernel_size=2, stride=2))
            else:
                layers += [conv(c, int(v), kernel_size=3, padding=1), norm(int(v)), nn.ReLU(inplace=False)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = avgpool(1)
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden), nn.ReLU(inplace=False), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=False), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, norm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional part: ``(B, 512, *spatial / 32)``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling and the MLP classifier."""
        return self.classifier(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def _vgg(arch: str, spatial_dims: int, in_channels: int, num_classes: int,
         input_size: Sequence[int] | None = None, **kw: Any) -> VGG:
    """VGG ``arch`` with BatchNorm; ``kw``: ``hidden``, ``dropout``."""
    return VGG(_CFGS[arch], spatial_dims, in_channels, num_classes, **kw)


for _arch, _cfg in _CFGS.items():
    _stages, _last_relu = _layout(_cfg)
    # CAM at the last ReLU (before the final max-pool): twice the resolution of the encoder output
    register_model(
        _arch, cam_layer=_last_relu, min_input=32, feature_size=512, stages=_stages, head_prefixes=("classifier",),
        description=f"VGG-{_arch[3:]} with BatchNorm (dimension-generic, GAP head)",
    )(partial(_vgg, _arch))
