"""Autoencoder from any CNN encoder, encoder transfer into the classifier, freezing helpers."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import octa3d.model as M
from octa3d.errors import ConfigError
from octa3d.model.mae import MaskedAutoEncoder, is_vit

# ViTs are pretrained by masked autoencoding (tests/model/test_mae.py), whatever their registry flag says
CNNS = [n for n in M.list_models() if M.get_spec(n).ae_supported and not is_vit(n)]
# default run: one encoder of each kind (flat, residual, dense, squeeze-excitation, MBConv, VGG, inception)
FAST = {("cnn", 2), ("cnn", 3), ("resnet18", 2), ("resnet18", 3), ("densenet121", 2), ("seresnet50", 2),
        ("efficientnet-b0", 2), ("vgg16", 2), ("inception_v3", 2)}


def grid(names: list[str]) -> list[Any]:
    return [pytest.param(n, d, id=f"{n}-{d}d", marks=() if (n, d) in FAST else pytest.mark.slow)
            for n in names for d in (2, 3)]


def smooth_volumes(n: int, size: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Sums of Gaussian blobs in [0, 1]: smooth, so an untrained AE is far off and a few steps help."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, size)] * dim, indexing="ij")
    vols = torch.zeros(n, 1, *(size,) * dim)
    for i in range(n):
        for _ in range(3):
            centre = torch.rand(dim, generator=g) * 1.2 - 0.6
            r2 = sum((a - c) ** 2 for a, c in zip(axes, centre))
            vols[i, 0] += torch.exp(-r2 / 0.1)
    return vols / vols.amax()


@pytest.mark.parametrize("name, dim", grid(CNNS))
def test_ae_reconstructs_input_shape_and_encoder_keys(name: str, dim: int) -> None:
    spec = M.get_spec(name)
    size = spec.min_input
    ae = M.build_autoencoder(name, dim, 2, size).eval()
    x = torch.rand(2, 2, *(size,) * dim)
    with torch.no_grad():
        assert ae(x).shape == x.shape
    # the AE encoder is the classifier minus its head: same keys, same shapes
    with torch.device("meta"):  # shapes only; no need to initialise a second network
        clf = M.create_model(name, dim, 2, 5)
    clf_state = clf.state_dict()
    enc_state = M.encoder_state_dict(ae)
    assert list(enc_state) == spec.encoder_keys(clf_state)
    assert all(enc_state[k].shape == clf_state[k].shape for k in enc_state)
    assert math.prod(ae.levels[-1].shape) < math.prod(ae.levels[0].shape)


@pytest.mark.parametrize("name, shape", [("cnn", (20, 36, 27)), ("resnet18", (17, 33, 16))])
def test_ae_odd_anisotropic_sizes(name: str, shape: tuple[int, ...]) -> None:
    """Rounding at odd sizes leaves stages a voxel off; the decoder still returns the exact input shape."""
    ae = M.build_autoencoder(name, "3d", 1, shape).eval()
    with torch.no_grad():
        assert ae(torch.rand(2, 1, *shape)).shape == (2, 1, *shape)


def test_ae_training_reduces_mse() -> None:
    torch.manual_seed(0)
    ae = M.build_autoencoder("cnn", 3, 1, 32)
    x = smooth_volumes(2, 32, 3)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ae(x), x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < 0.7 * losses[0], losses


def test_vit_gets_a_masked_autoencoder() -> None:
    ae = M.build_autoencoder("vit", 3, 1, 32, mask_ratio=0.5, patch_size=16, hidden_size=24, mlp_dim=48,
                             num_layers=1, num_heads=2)
    assert isinstance(ae, MaskedAutoEncoder) and (ae.n_patches, ae.n_keep) == (8, 4)
    assert set(M.encoder_state_dict(ae)) == set(M.get_spec("vit").encoder_keys(
        M.create_model("vit", 3, 1, 2, input_size=32, patch_size=16, hidden_size=24, mlp_dim=48, num_layers=1,
                       num_heads=2).state_dict()))


@pytest.mark.parametrize("name, dim, size", [("cnn", 3, 16), ("resnet18", 2, 16)])
def test_transfer_copies_exactly_the_encoder(name: str, dim: int, size: int) -> None:
    ae = M.build_autoencoder(name, dim, 1, size)
    with torch.no_grad():  # make every encoder tensor distinguishable from a fresh init (BN buffers included)
        for t in ae.encoder.state_dict().values():
            t.add_(0.5) if t.is_floating_point() else t.add_(7)
    enc_state = M.encoder_state_dict(ae)
    clf = M.create_model(name, dim, 1, 4)
    before = {k: v.clone() for k, v in clf.state_dict().items()}

    report = M.transfer_encoder(enc_state, clf, name)

    spec = M.get_spec(name)
    after = clf.state_dict()
    assert report.copied == spec.encoder_keys(after) and set(report.not_copied) == set(spec.head_keys(after))
    for k in report.copied:
        assert torch.equal(after[k], enc_state[k]), k
    for k in report.not_copied:
        assert torch.equal(after[k], before[k]), k
    # a full AE state dict (encoder.* and decoder.* keys) is accepted too
    clf2 = M.create_model(name, dim, 1, 4)
    assert M.transfer_encoder(ae.state_dict(), clf2, name).copied == report.copied


@pytest.mark.parametrize("build, clf_args, match", [
    (("cnn", 3, 1, 16), ("resnet18", 3, 1), "'conv1.weight'.*missing"),       # other model
    (("cnn", 3, 2, 16), ("cnn", 3, 1), r"\(8, 2, 3, 3, 3\).*\(8, 1, 3, 3, 3\)"),  # other in_channels
    (("cnn", 2, 1, 16), ("cnn", 3, 1), r"\(8, 1, 3, 3\).*\(8, 1, 3, 3, 3\)"),      # other dimension
])
def test_transfer_mismatch_raises(build: tuple, clf_args: tuple, match: str) -> None:
    ae = M.build_autoencoder(*build)
    name, dim, ch = clf_args
    clf = M.create_model(name, dim, ch, 2)
    with pytest.raises(ConfigError, match=match):
        M.transfer_encoder(M.encoder_state_dict(ae), clf, name)


def test_transfer_rejects_extra_keys() -> None:
    clf = M.create_model("cnn", 2, 1, 2)
    state = {k: v for k, v in clf.state_dict().items()}  # includes the head
    with pytest.raises(ConfigError, match="classifier.*not an encoder tensor"):
        M.transfer_encoder(state, clf, "cnn")


def test_freeze_encoder_stages_and_head_only() -> None:
    model = M.create_model("resnet18", 2, 1, 2)
    frozen = M.freeze_encoder_stages(model, "resnet18", 2)  # stem + layer1
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1.")) for n in frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layer2.0.conv1.weight" in trainable and "layer1.0.conv1.weight" not in trainable

    M.set_encoder_trainable(model, "resnet18", False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    M.set_encoder_trainable(model, "resnet18", True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="5 encoder stages"):
        M.freeze_encoder_stages(model, "resnet18", 6)
