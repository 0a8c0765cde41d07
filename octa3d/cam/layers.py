"""Which layer(s) a default evidence map uses, adapted to the input size.

A class activation map is as coarse as its layer's feature map: the last stage of a 3D CNN at 32³ is 2×2×2, whose
peak can only land on a corner. The default is therefore the deepest encoder stage whose feature map is at least
1/:data:`MAX_STRIDE` of the input on every axis, fused with the stage after it (coarser, more class-specific
context). So no default map is coarser than 1/4 of the input per axis (the evidence-map issue asked for 1/8).
The candidates are the outputs of the model's registered encoder stages (:attr:`ModelSpec.stages`), measured with
one forward pass at the actual input size. The choice was measured in ``benchmarks/cam_quality.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from octa3d.model import get_spec

#: The coarsest default layer: feature size x MAX_STRIDE >= input size on every axis (1/8 localised worse in
#: benchmarks/cam_quality.py: cnn 32³ LayerCAM pointing game 0.64 at 1/8 vs 1.00 at 1/4).
MAX_STRIDE = 4
#: Layers fused by default: the finest admissible stage and this many deeper ones (when they exist).
DEEPER_FUSED = 1


def stage_outputs(model_name: str) -> list[str]:
    """Module names whose outputs are the model's encoder-stage outputs, in forward order (+ the registered layer)."""
    spec = get_spec(model_name)
    names = [stage[-1] for stage in spec.stages]
    if spec.cam_layer not in names:
        names.append(spec.cam_layer)
    return names


@torch.no_grad()
def feature_shapes(model: torch.nn.Module, layers: Sequence[str], input_shape: Sequence[int], in_channels: int
                   ) -> dict[str, tuple[int, ...]]:
    """Spatial output shape of each layer for an input of ``input_shape`` (one forward pass of zeros)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            continue

        def hook(_m: torch.nn.Module, _i: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == len(input_shape) + 2:
                shapes[name] = tuple(int(v) for v in out.shape[2:])

        handles.append(modules[name].register_forward_hook(hook))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()(torch.zeros(1, in_channels, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def default_layers(model: torch.nn.Module, model_name: str, input_shape: Sequence[int], in_channels: int
                   ) -> list[str]:
    """The default CAM layer(s) of ``model`` at ``input_shape`` (see the module docstring).

    ViT has one token grid (its patch size fixes the resolution): its registered layer is returned.
    """
    spec = get_spec(model_name)
    if spec.needs_input_size:  # ViT: the token grid is the only spatial map
        return [spec.cam_layer]
    names = stage_outputs(model_name)
    shapes = feature_shapes(model, names, input_shape, in_channels)
    spatial = [n for n in names if n in shapes]
    fine = [n for n in spatial if all(f * MAX_STRIDE >= s for f, s in zip(shapes[n], input_shape))]
    if not fine:  # every stage is coarser (tiny inputs): the finest one there is
        fine = spatial[:1] or [spec.cam_layer]
    chosen = fine[-1]
    i = spatial.index(chosen) if chosen in spatial else len(spatial)
    deeper = [n for n in spatial[i + 1:i + 1 + DEEPER_FUSED] if shapes[n] != shapes[chosen]]
    return [chosen, *deeper]
