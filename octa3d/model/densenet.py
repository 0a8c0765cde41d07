"""DenseNet-121 (MONAI ``DenseNet121``), 2D or 3D."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DenseNet121

from octa3d.model.registry import register_model


class DenseNetClassifier(DenseNet121):
    """MONAI DenseNet-121 with the registry interface.

    ``features`` ends with ``norm5`` (no activation); the ReLU that follows lives in ``class_layers``, which is
    why the Grad-CAM layer is ``class_layers.relu`` (the rectified last feature map, as in MONAI's examples).
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``features``: ``(B, 1024, *spatial / 32)``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU, global average pooling, linear classifier."""
        return self.class_layers(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


@register_model(
    "densenet121", cam_layer="class_layers.relu", min_input=32, feature_size=1024,
    stages=(("features.conv0", "features.norm0"),
            ("features.denseblock1", "features.transition1"),
            ("features.denseblock2", "features.transition2"),
            ("features.denseblock3", "features.transition3"),
            ("features.denseblock4", "features.norm5")),
    head_prefixes=("class_layers",), description="MONAI DenseNet-121",
)
def densenet121(spatial_dims: int, in_channels: int, num_classes: int, input_size: Sequence[int] | None = None,
                **kw: Any) -> DenseNetClassifier:
    """MONAI ``DenseNet121`` (``pretrained=False``); ``kw`` go to ``monai.networks.nets.DenseNet``."""
    kw.setdefault("act", ("relu", {"inplace": False}))
    return DenseNetClassifier(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                              pretrained=False, **kw)
