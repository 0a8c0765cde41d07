"""Masked autoencoding for ViTs: patch layout, masking, masked-only loss, learning, encoder transfer, 2D and 3D."""

from __future__ import annotations

import pytest
import torch

import octa3d.model as M
from octa3d.errors import ConfigError
from octa3d.model.autoencoder import encoder_state_dict
from octa3d.model.mae import MaskedAutoEncoder, build_mae, is_vit, mae_loss

TINY = {"patch_size": 8, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2}
SHAPES = {3: (16, 32, 16), 2: (32, 32)}
DIMS = [pytest.param(d, id=f"{d}d") for d in (2, 3)]


def tiny(dim: int, in_channels: int = 1, **kw) -> MaskedAutoEncoder:
    torch.manual_seed(0)
    return build_mae("vit", dim, in_channels, SHAPES[dim], **{**TINY, **kw})


def blobs(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Smooth volumes in [0, 1] (Gaussian blobs): predictable from neighbouring patches."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    out = torch.zeros(n, 1, *shape)
    for i in range(n):
        for _ in range(3):
            c = torch.rand(len(shape), generator=g) * 1.2 - 0.6
            out[i, 0] += torch.exp(-sum((a - ci) ** 2 for a, ci in zip(axes, c)) / 0.15)
    return out / out.amax()


def test_is_vit_by_model_family() -> None:
    assert is_vit("vit") and not is_vit("cnn") and not is_vit("resnet18")
    assert isinstance(M.build_autoencoder("vit", 3, 1, SHAPES[3], **TINY), MaskedAutoEncoder)


@pytest.mark.parametrize("dim", DIMS)
def test_patch_layout_matches_the_patch_embedding(dim: int) -> None:
    mae = tiny(dim, in_channels=2)
    x = torch.rand(2, 2, *SHAPES[dim])
    patches = mae.patchify(x)
    assert patches.shape == (2, mae.n_patches, 8 ** dim * 2)
    assert torch.equal(mae.unpatchify(patches), x)
    # token i of the conv embedding sees exactly patch i of patchify (same order, same voxel layout)
    conv = mae.encoder.patch_embedding.patch_embeddings
    tokens = conv(x).flatten(2).transpose(1, 2)
    w = conv.weight.permute(0, *range(2, 2 + dim), 1).reshape(conv.weight.shape[0], -1)
    torch.testing.assert_close(tokens, patches @ w.T + conv.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", DIMS)
def test_decoder_predicts_every_patch(dim: int) -> None:
    mae = tiny(dim)
    x = torch.rand(3, 1, *SHAPES[dim])
    keep, _ = mae.random_mask(3, x.device)
    latent = mae.encode(x, keep)
    assert latent.shape == (3, 1 + mae.n_keep, 32)
    assert mae.decode(latent, keep).shape == (3, mae.n_patches, 8 ** dim)
    assert mae(x).shape == (3, 1)
    masked, rec = mae.eval().reconstruct(x)
    assert masked.shape == rec.shape == x.shape


def test_runs_under_mixed_precision() -> None:
    mae = tiny(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the AMP path of --amp on CUDA, here on CPU
        loss = mae_loss(mae(torch.rand(2, 1, *SHAPES[3])))
    loss.float().backward()
    assert torch.isfinite(loss) and mae.mask_token.grad is not None


def test_masking_is_random_per_sample_and_deterministic_with_the_seed() -> None:
    mae = tiny(3)  # 2x4x2 = 16 patches, 4 visible at ratio 0.75
    assert (mae.n_patches, mae.n_keep) == (16, 4)
    torch.manual_seed(5)
    keep_a, mask_a = mae.random_mask(4, torch.device("cpu"))
    torch.manual_seed(5)
    keep_b, mask_b = mae.random_mask(4, torch.device("cpu"))
    torch.manual_seed(6)
    keep_c, _ = mae.random_mask(4, torch.device("cpu"))
    assert torch.equal(keep_a, keep_b) and torch.equal(mask_a, mask_b) and not torch.equal(keep_a, keep_c)
    assert (mask_a.sum(1) == 12).all() and len({tuple(k.tolist()) for k in keep_a}) > 1
    assert all(mask_a[i, keep_a[i]].sum() == 0 for i in range(4))
    # eval mode: the same masks every call, whatever the global RNG did (comparable validation losses)
    x = torch.rand(2, 1, *SHAPES[3])
    mae.eval()
    first = mae(x)
    torch.rand(100)
    assert torch.equal(first, mae(x))
    mae.train()
    assert not torch.equal(mae(x), mae(x))


def test_loss_counts_masked_patches_only() -> None:
    mae = tiny(3)
    target = torch.rand(2, mae.n_patches, 8 ** 3)
    _, mask = mae.random_mask(2, torch.device("cpu"))
    wrong_where_visible = target + (1 - mask).unsqueeze(-1) * 5.0
    assert torch.equal(mae.masked_loss(wrong_where_visible, target, mask), torch.zeros(2, 1))
    wrong_where_hidden = target + mask.unsqueeze(-1) * 0.5
    torch.testing.assert_close(mae.masked_loss(wrong_where_hidden, target, mask), torch.full((2, 1), 0.25))
    l1 = tiny(3, loss="l1")
    torch.testing.assert_close(l1.masked_loss(wrong_where_hidden, target, mask), torch.full((2, 1), 0.5))
    # norm_pix_loss: targets are per-patch standardised
    t = tiny(3, norm_pix_loss=True).targets(torch.rand(2, 1, *SHAPES[3]))
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    assert mae_loss(torch.tensor([[1.0], [3.0]])) == 2.0


@pytest.mark.parametrize("dim", DIMS)
def test_pretraining_lowers_the_masked_patch_loss(dim: int) -> None:
    mae = tiny(dim)
    data = blobs(8, SHAPES[dim])
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)

    def held_out_loss() -> float:
        mae.eval()  # fixed masks: before and after are measured on the same hidden patches
        with torch.no_grad():
            value = mae_loss(mae(data)).item()
        mae.train()
        return value

    before = held_out_loss()
    torch.manual_seed(0)
    for _ in range(6):  # six short epochs of two batches
        for batch in data.split(4):
            loss = mae_loss(mae(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = held_out_loss()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("dim", DIMS)
def test_encoder_transfers_into_the_classifier_unchanged(dim: int) -> None:
    mae = tiny(dim)
    state = encoder_state_dict(mae)
    spec = M.get_spec("vit")
    clf = M.create_model("vit", dim, 1, 3, input_size=SHAPES[dim], **TINY)
    assert sorted(state) == sorted(spec.encoder_keys(clf.state_dict()))
    head = {k: v.clone() for k, v in clf.state_dict().items() if spec.is_head_key(k)}
    report = M.transfer_encoder(state, clf, "vit")
    assert len(report.copied) == len(state) and report.not_copied == list(head)
    sd = clf.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in state.items())
    assert all(torch.equal(sd[k], v) for k, v in head.items())
    # the classifier's own forward runs on the transferred encoder: same tokens as the MAE with nothing hidden
    x = torch.rand(2, 1, *SHAPES[dim])
    every = torch.arange(mae.n_patches).expand(2, -1)
    torch.testing.assert_close(clf.eval().forward_features(x), mae.eval().encode(x, every), atol=1e-5, rtol=1e-5)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="mask-ratio"):
        tiny(3, mask_ratio=1.0)
    with pytest.raises(ConfigError, match="hides no patch"):
        tiny(3, mask_ratio=0.01)
    with pytest.raises(ConfigError, match="whole number"):
        build_mae("vit", 3, 1, (16, 36, 16), **TINY)
    with pytest.raises(ConfigError, match="needs a ViT"):
        build_mae("cnn", 3, 1, 16)
