"""Every registered model in 2D and 3D at its minimum input: logits shape, finite gradients, the Grad-CAM layer,
the encoder/head split and the feature size.

Inputs are the documented minimum size with a batch of 2 (BatchNorm needs two values per channel at the 1-voxel
bottleneck), so these tests also prove the documented minima.

Cost: on a 2-core CPU the big networks spend seconds per test just allocating and initialising tens of millions
of parameters, so the default run (``-m "not slow"``, what ``make test`` runs) covers one or two members of each
family in each dimension; the ``slow`` marker holds the rest (``make test-all`` runs everything).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from torch import nn

import octa3d.model as M
from octa3d.errors import ConfigError

ALL = M.list_models()
B, NUM_CLASSES = 2, 3
# a ViT-B has 86 M parameters whatever the input; the default run uses a 2-layer one (same code path)
VIT_TINY = dict(num_layers=2, hidden_size=64, mlp_dim=128, num_heads=4)

# (name, dim) pairs exercised by the default run: every family in 2D, the cheap ones in 3D
FAST = {("cnn", 2), ("cnn", 3), ("resnet18", 2), ("resnet18", 3), ("densenet121", 2), ("efficientnet-b0", 2),
        ("seresnet50", 2), ("vgg16", 2), ("inception_v3", 2), ("vit", 2), ("vit", 3)}


def grid(names: list[str], dims: tuple[int, ...] = (2, 3)) -> list[Any]:
    """(name, dim) parameters, the pairs outside FAST marked slow."""
    return [pytest.param(n, d, id=f"{n}-{d}d", marks=() if (n, d) in FAST else pytest.mark.slow)
            for n in names for d in dims]


def options(name: str, dim: int) -> dict:
    return VIT_TINY if name == "vit" and (name, dim) in FAST else {}


def build(name: str, dim: int, in_channels: int) -> nn.Module:
    torch.manual_seed(0)
    return M.create_model(name, dim, in_channels, NUM_CLASSES, input_size=M.get_spec(name).min_input,
                          **options(name, dim))


def batch(name: str, dim: int, in_channels: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(B, in_channels, *(M.get_spec(name).min_input,) * dim)


@pytest.mark.parametrize("name, dim", grid(ALL))
def test_forward_backward_cam_split(name: str, dim: int) -> None:
    """Two input channels, training mode: shapes, CAM map, feature size, one backward with finite gradients."""
    spec = M.get_spec(name)
    model = build(name, dim, 2).train()

    # encoder/head split: every state-dict key is in exactly one part; split() views carry exactly those keys
    keys = list(model.state_dict())
    enc, head = spec.encoder_keys(keys), spec.head_keys(keys)
    assert enc and head and set(enc).isdisjoint(head) and set(enc) | set(head) == set(keys)
    encoder, head_mod = spec.split(model)
    assert set(encoder.state_dict()) == set(enc) and set(head_mod.state_dict()) == set(head)
    names = set(keys) | set(dict(model.named_modules()))
    for stage in spec.stages:
        for prefix in stage:  # every stage prefix names a module or parameter of the model
            assert prefix in names, prefix
    assert not any(getattr(m, "inplace", False) for m in model.modules()), "in-place op breaks backward hooks"

    captured: dict[str, torch.Tensor] = {}
    cam_module = dict(model.named_modules())[spec.cam_layer]
    handle = cam_module.register_forward_hook(lambda mod, args, out: captured.__setitem__("map", out))
    try:
        feats = model.forward_features(batch(name, dim, 2))
        logits = model.forward_head(feats)
    finally:
        handle.remove()

    assert logits.shape == (B, NUM_CLASSES)
    if name.startswith("vit"):  # vit, vit_base, vit_large: tokens (B, 1 + patches, hidden)
        assert feats.shape[-1] == options(name, dim).get("hidden_size", spec.feature_size)
    else:
        assert feats.ndim == dim + 2 and feats.shape[1] == spec.feature_size
    cam = captured["map"]
    assert cam.ndim == dim + 2 and all(s >= 1 for s in cam.shape[2:]), cam.shape

    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name, dim", grid(ALL))
def test_single_channel_forward_and_gradcam(name: str, dim: int) -> None:
    """One input channel (OCTA or OCT alone), eval mode; MONAI GradCAM on the declared layer (its full backward
    hooks need the out-of-place activations)."""
    model = build(name, dim, 1).eval()
    x = batch(name, dim, 1)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (B, NUM_CLASSES)
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x)))  # forward = head ∘ features
    cam = GradCAM(nn_module=model, target_layers=M.get_spec(name).cam_layer, postprocessing=lambda m: m)
    maps = cam(x)
    assert maps.shape == (B, 1, *x.shape[2:])
    assert torch.isfinite(maps).all()


def test_efficientnet_set_swish_for_export() -> None:
    """``set_swish(memory_efficient=False)`` (before export) switches both activations, same outputs."""
    model = M.create_model("efficientnet-b0", 2, 1, 2).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.set_swish(memory_efficient=False)
        assert type(model._swish).__name__ == type(model._head_act).__name__ == "Swish"
        torch.testing.assert_close(model(x), ref)


def test_inception_aux_logits() -> None:
    model = M.create_model("inception_v3", 2, 1, 4, aux_logits=True).train()
    out = model(torch.randn(2, 1, 75, 75))
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 4)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 75, 75)).shape == (2, 4)
    assert M.get_spec("inception_v3").is_head_key("AuxLogits.fc.weight")


def test_vit_refuses_other_input_size() -> None:
    model = M.create_model("vit", 2, 1, 2, input_size=32, **VIT_TINY)
    with pytest.raises(ValueError, match="built for input size"):
        model(torch.randn(1, 1, 48, 48))


def test_anisotropic_input() -> None:
    """OCTA slabs are not cubes: any size ≥ the minimum per axis works."""
    model = M.create_model("resnet18", 3, 1, 2, input_size=(16, 40, 24))
    assert model(torch.randn(2, 1, 16, 40, 24)).shape == (2, 2)


def test_dimension_not_supported_message() -> None:
    with pytest.raises(ConfigError, match="2d or 3d"):
        M.create_model("cnn", "4d", 1, 2)


def test_vit_sizes_and_options() -> None:
    """vit_base / vit_large are timm's ViT-B/16 and ViT-L/16 (qkv bias, LayerNorm eps 1e-6); vit keeps MONAI's."""
    assert M.get_spec("vit_base").count_parameters(2) == pytest.approx(85.8e6, rel=0.01)
    assert M.get_spec("vit_large").count_parameters(2) == pytest.approx(303.3e6, rel=0.01)
    with torch.device("meta"):
        base = M.create_model("vit_base", 3, 1, 2, input_size=(48, 64, 64), patch_size=(3, 16, 16),
                              drop_path_rate=0.2)
        plain = M.create_model("vit", 2, 1, 2, input_size=32)
    assert base.grid == (16, 4, 4) and base.patch_embedding.patch_embeddings.kernel_size == (3, 16, 16)
    assert base.blocks[0].attn.qkv.bias is not None and base.norm.eps == 1e-6
    assert base.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert base.blocks[6].drop_path.drop_prob == pytest.approx(0.2 * 6 / 11)
    assert plain.blocks[0].attn.qkv.bias is None and plain.norm.eps == 1e-5
    with pytest.raises(ConfigError, match="fixed size"):
        M.create_model("vit_large", 2, 1, 2, input_size=32, num_layers=2)


def test_cnn_head_is_linear_and_legacy_fc3_checkpoints_rebuild_their_head() -> None:
    """The default cnn head is dropout 0.2 + one linear layer on the pooled features; a state dict with the FC3
    layout of octa3d 0.1.0 (last layer classifier.6) asks the registry for that layout, which then loads strictly."""
    net = M.create_model("cnn", 3, 2, 3)
    linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 3)]
    assert next(m for m in net.classifier if isinstance(m, nn.Dropout)).p == 0.2
    spec = M.get_spec("cnn")
    assert spec.legacy_kwargs(net.state_dict()) == {}

    old = M.create_model("cnn", 3, 2, 3, head="fc3", dropout=0.5)
    assert [m.out_features for m in old.classifier if isinstance(m, nn.Linear)] == [256, 64, 3]
    kwargs = spec.legacy_kwargs(old.state_dict())
    assert kwargs == {"head": "fc3", "dropout": 0.5}
    M.create_model("cnn", 3, 2, 3, **kwargs).load_state_dict(old.state_dict())  # strict
    with pytest.raises(ValueError, match="head must be one of linear, fc3"):
        M.create_model("cnn", 3, 2, 3, head="mlp")
