"""ResNet-18 … ResNet-152 (MONAI ``ResNet``) and SE-ResNet-50 (MONAI ``SEResNet50``), 2D or 3D.

The classes below only add the registry interface (``forward_features``/``forward_head``) to MONAI's networks;
parameter names stay MONAI's, so MedicalNet 3D weights (``module.conv1.weight`` …) load with
``--init-from`` (:mod:`octa3d.model.weight_formats`). ``--shortcut-type A`` (MedicalNet ResNet-18/34: a zero-padded
identity shortcut without parameters) and ``bias_downsample`` (MedicalNet's type-B shortcuts have no bias) are
options; ``--init-from`` with a MedicalNet file sets both from the file.

MONAI's defaults are kept: ``conv1`` has stride 1 (``conv1_t_stride=2`` halves the cost of the first stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from monai.networks.nets import SEResNet50
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck, get_inplanes
from torch import nn

from octa3d.model.registry import register_model

_NO_INPLACE = ("relu", {"inplace": False})


class ResNetClassifier(ResNet):
    """MONAI ResNet with the registry interface; ``forward`` is MONAI's forward split in two."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and ``layer1``…``layer4``: ``(B, C, *spatial / 16)`` (stride-1 ``conv1``)."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling and the linear classifier."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


_RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
    "resnet101": (ResNetBottleneck, [3, 4, 23, 3]),
    "resnet152": (ResNetBottleneck, [3, 8, 36, 3]),
}


def _resnet(arch: str, spatial_dims: int, in_channels: int, num_classes: int,
            input_size: Sequence[int] | None = None, **kw: Any) -> ResNetClassifier:
    """Build ``arch`` like ``monai.networks.nets.resnetXX(pretrained=False, ...)`` would.

    Args:
        arch: key of ``_RESNETS``.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        input_size: unused (any size ≥ the minimum works).
        **kw: further ``monai.networks.nets.ResNet`` options (``conv1_t_stride``, ``shortcut_type`` ...).
    """
    block, layers = _RESNETS[arch]
    kw.setdefault("act", _NO_INPLACE)
    return ResNetClassifier(block, layers, get_inplanes(), spatial_dims=spatial_dims, n_input_channels=in_channels,
                            num_classes=num_classes, **kw)


_RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

for _arch, (_block, _) in _RESNETS.items():
    register_model(
        _arch, cam_layer="layer4", min_input=16, feature_size=512 * _block.expansion,
        stages=_RESNET_STAGES, head_prefixes=("fc",), options=("shortcut_type",),
        description=f"MONAI ResNet ({_arch[6:]} layers)",
    )(partial(_resnet, _arch))


class SEResNetClassifier(SEResNet50):
    """MONAI SE-ResNet-50 with the registry interface."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``layer0``…``layer4``: ``(B, 2048, *spatial / 32)``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling, optional dropout, linear classifier."""
        return self.logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


@register_model("seresnet50", cam_layer="layer4", min_input=32, feature_size=2048,
                stages=(("layer0",), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
                head_prefixes=("last_linear",), description="MONAI SE-ResNet-50")
def seresnet50(spatial_dims: int, in_channels: int, num_classes: int, input_size: Sequence[int] | None = None,
               **kw: Any) -> SEResNetClassifier:
    """MONAI ``SEResNet50`` (``pretrained=False``); ``kw`` go to ``monai.networks.nets.SENet``."""
    return SEResNetClassifier(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                              pretrained=False, **kw)
