"""EfficientNet-B0 … B4 (MONAI ``EfficientNetBN``, ``pretrained=False``), 2D or 3D.

MONAI's EfficientNet applies one shared ``_swish`` module twice (after the stem and after the head conv), so a
hook on it fires twice per forward and Grad-CAM would see the stem map. The subclass adds a separate
``_head_act`` module for the last feature map and uses it as the CAM layer; ``set_swish`` switches both
(call ``set_swish(memory_efficient=False)`` before ONNX export or tracing).

MONAI computes TensorFlow-style "same" padding once, for the model's nominal image size (224 for B0 … 380 for
B4); other input sizes work, the padding is just not exactly "same" for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from monai.networks.layers.factories import Act
from monai.networks.nets import EfficientNetBN

from octa3d.model.registry import register_model


class EfficientNetClassifier(EfficientNetBN):
    """MONAI EfficientNetBN with the registry interface and a dedicated head activation (CAM layer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_act = Act["memswish"]()

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Memory-efficient swish for training, plain swish for export/tracing (both activations)."""
        super().set_swish(memory_efficient)
        self._head_act = Act["memswish"]() if memory_efficient else Act["swish"](alpha=1.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, MBConv blocks, 1×1 head conv + BN + swish: ``(B, feature_size, *spatial / 32)``."""
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(x))))
        x = self._blocks(x)
        return self._head_act(self._bn1(self._conv_head(self._conv_head_padding(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling, dropout, linear classifier."""
        return self._fc(self._dropout(self._avg_pooling(x).flatten(start_dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def _efficientnet(model_name: str, spatial_dims: int, in_channels: int, num_classes: int,
                  input_size: Sequence[int] | None = None, **kw: Any) -> EfficientNetClassifier:
    """MONAI ``EfficientNetBN(model_name, pretrained=False, ...)``; ``kw``: ``norm``."""
    return EfficientNetClassifier(model_name, pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels,
                                  num_classes=num_classes, **kw)


# 7 MBConv stacks for B0-B4 (depth scaling repeats blocks inside a stack); grouped by output stride
_STAGES = (("_conv_stem", "_bn0", "_blocks.0"), ("_blocks.1",), ("_blocks.2",), ("_blocks.3", "_blocks.4"),
           ("_blocks.5", "_blocks.6", "_conv_head", "_bn1"))
# 1280 rounded by the width coefficient (MONAI _round_filters, divisor 8)
_FEATURES = {"b0": 1280, "b1": 1280, "b2": 1408, "b3": 1536, "b4": 1792}

for _variant, _features in _FEATURES.items():
    register_model(
        f"efficientnet-{_variant}", cam_layer="_head_act", min_input=32, feature_size=_features,
        stages=_STAGES, head_prefixes=("_fc",), description=f"MONAI EfficientNetBN {_variant.upper()}",
    )(partial(_efficientnet, f"efficientnet-{_variant}"))
