"""``--init-from`` with foreign layouts: generated checkpoints in the RETFound (timm), OCTCube and MedicalNet naming
layouts, loaded into the registry's models and compared with reference forwards written here from the upstream
definitions (timm/MAE ``Block``: pre-norm, fused qkv with bias, GELU MLP; OCTCube ``video_vit``: split q/k/v,
separate spatial + temporal position embeddings). Tiny sizes: hidden 32, 2 blocks, 4 heads.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import octa3d.model as M
from octa3d.errors import ConfigError
from octa3d.model.weight_formats import adapt_channels, detect_format, resize_grid

HIDDEN, DEPTH, HEADS, MLP = 32, 2, 4, 64
TINY = {"hidden_size": HIDDEN, "num_layers": DEPTH, "num_heads": HEADS, "mlp_dim": MLP}


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.2


def block_state(prefix: str, attn: str = "fused") -> dict[str, torch.Tensor]:
    """One transformer block in timm names (``attn``: fused ``qkv``, ``split`` q/k/v, or flash-attn ``mixer``)."""
    s = {f"{prefix}norm1.weight": 1 + _r(HIDDEN), f"{prefix}norm1.bias": _r(HIDDEN),
         f"{prefix}norm2.weight": 1 + _r(HIDDEN), f"{prefix}norm2.bias": _r(HIDDEN),
         f"{prefix}mlp.fc1.weight": _r(MLP, HIDDEN), f"{prefix}mlp.fc1.bias": _r(MLP),
         f"{prefix}mlp.fc2.weight": _r(HIDDEN, MLP), f"{prefix}mlp.fc2.bias": _r(HIDDEN)}
    if attn == "split":
        for p in "qkv":
            s[f"{prefix}attn.{p}.weight"], s[f"{prefix}attn.{p}.bias"] = _r(HIDDEN, HIDDEN), _r(HIDDEN)
    else:
        name = "mixer.Wqkv" if attn == "mixer" else "attn.qkv"
        s[f"{prefix}{name}.weight"], s[f"{prefix}{name}.bias"] = _r(3 * HIDDEN, HIDDEN), _r(3 * HIDDEN)
    proj = "mixer.out_proj" if attn == "mixer" else "attn.proj"
    s[f"{prefix}{proj}.weight"], s[f"{prefix}{proj}.bias"] = _r(HIDDEN, HIDDEN), _r(HIDDEN)
    return s


def retfound_state(patch=(8, 8), grid=(4, 4), in_ch=3, mae_extras=True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    s = {"patch_embed.proj.weight": _r(HIDDEN, in_ch, *patch), "patch_embed.proj.bias": _r(HIDDEN),
         "cls_token": _r(1, 1, HIDDEN), "pos_embed": _r(1, 1 + math.prod(grid), HIDDEN),
         "norm.weight": 1 + _r(HIDDEN), "norm.bias": _r(HIDDEN), "head.weight": _r(5, HIDDEN), "head.bias": _r(5)}
    for i in range(DEPTH):
        s.update(block_state(f"blocks.{i}."))
    if mae_extras:
        s.update({"mask_token": _r(1, 1, 16), "decoder_embed.weight": _r(16, HIDDEN), "decoder_pred.bias": _r(3)})
    return s


def octcube_state(patch=(4, 8, 8), grid=(4, 2, 2), in_ch=1, attn="split") -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    s = {"patch_embed.proj.weight": _r(HIDDEN, in_ch, *patch), "patch_embed.proj.bias": _r(HIDDEN),
         "cls_token": _r(1, 1, HIDDEN), "pos_embed_spatial": _r(1, grid[1] * grid[2], HIDDEN),
         "pos_embed_temporal": _r(1, grid[0], HIDDEN), "pos_embed_class": _r(1, 1, HIDDEN),
         "norm.weight": 1 + _r(HIDDEN), "norm.bias": _r(HIDDEN), "head.weight": _r(3, HIDDEN), "head.bias": _r(3)}
    for i in range(DEPTH):
        s.update(block_state(f"blocks.{i}.", attn))
    return s


# ---------------------------------------------------------------------------- reference forward (upstream)
def ref_block(s: dict[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    """timm/MAE ``Block`` (and OCTCube's ``video_vit.Block``): pre-norm attention + GELU MLP, LayerNorm eps 1e-6."""
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
    if p + "attn.q.weight" in s:  # OCTCube video_vit.Attention: three projections
        q, k, v = (F.linear(h, s[f"{p}attn.{t}.weight"], s[f"{p}attn.{t}.bias"]).reshape(b, n, HEADS, -1)
                   .transpose(1, 2) for t in "qkv")
    else:
        name = p + ("mixer.Wqkv" if p + "mixer.Wqkv.weight" in s else "attn.qkv")
        qkv = F.linear(h, s[name + ".weight"], s[name + ".bias"]).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
    att = ((q @ k.transpose(-2, -1)) * (c // HEADS) ** -0.5).softmax(-1)
    proj = p + ("mixer.out_proj" if p + "mixer.out_proj.weight" in s else "attn.proj")
    x = x + F.linear((att @ v).transpose(1, 2).reshape(b, n, c), s[proj + ".weight"], s[proj + ".bias"])
    h = F.layer_norm(x, (c,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])), s[p + "mlp.fc2.weight"],
                 s[p + "mlp.fc2.bias"])
    return x + h


def ref_tokens(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """RETFound ``forward_features`` up to the final norm (all tokens); OCTCube's sep_pos_embed forward."""
    w = s["patch_embed.proj.weight"]
    conv = F.conv2d if w.ndim == 4 else F.conv3d
    t = conv(x, w, s["patch_embed.proj.bias"], stride=tuple(w.shape[2:])).flatten(2).transpose(1, 2)
    t = torch.cat((s["cls_token"].expand(x.shape[0], -1, -1), t), 1)
    if "pos_embed_spatial" in s:
        sp, tp = s["pos_embed_spatial"], s["pos_embed_temporal"]
        pos = sp.repeat(1, tp.shape[1], 1) + torch.repeat_interleave(tp, sp.shape[1], dim=1)
        pos = torch.cat((s["pos_embed_class"], pos), 1)
    else:
        pos = s["pos_embed"]
    t = t + pos
    for i in range(DEPTH):
        t = ref_block(s, f"blocks.{i}.", t)
    return F.layer_norm(t, (HIDDEN,), s["norm.weight"], s["norm.bias"], eps=1e-6)


def build(tmp_path, state, dim, in_ch, size, wrapper="model", fmt="auto", name="vit"):
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: state, "epoch": 7}, path)
    init = M.read_init_file(path, fmt)
    kw = M.init_model_kwargs(init, name, dim)
    torch.manual_seed(5)
    model = M.create_model(name, dim, in_ch, 2, input_size=size, **TINY, **kw).eval()
    return model, M.load_init_weights(model, init, model_name=name), kw


# ---------------------------------------------------------------------------- RETFound / timm
def test_retfound_layout_every_tensor_lands(tmp_path) -> None:
    state = retfound_state()
    model, report, kw = build(tmp_path, state, 2, 3, 32)
    assert report.format == "retfound" and kw == {"patch_size": [8, 8], "qkv_bias": True, "norm_eps": 1e-6}
    assert report.encoder_loaded == report.encoder_total and not report.encoder_missing
    assert {m["key"] for m in report.missing} == {"classification_head.weight", "classification_head.bias"}
    assert {u["key"] for u in report.unexpected} == {"head.weight", "head.bias", "mask_token",
                                                     "decoder_embed.weight", "decoder_pred.bias"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref_tokens(state, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("channels", [1, 2])
def test_retfound_rgb_kernel_adapted_to_grey_channels(tmp_path, channels, caplog) -> None:
    """A grey image on every channel gives what the RGB network gives for the grey image replicated to RGB."""
    state = retfound_state(mae_extras=False)
    with caplog.at_level(logging.INFO, logger="octa3d.model"):
        model, report, _ = build(tmp_path, state, 2, channels, 32, wrapper="teacher")
    assert any("3 input channel(s) -> " + str(channels) in a for a in report.adaptations)
    assert "adapted: patch-embedding kernel" in caplog.text
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(grey.repeat(1, channels, 1, 1)),
                                   ref_tokens(state, grey.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)


def test_adapt_channels_rule() -> None:
    w = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(adapt_channels(w, 1), w.sum(1, keepdim=True))
    torch.testing.assert_close(adapt_channels(w, 2)[:, 1], w.mean(1) * 1.5)
    torch.testing.assert_close(adapt_channels(w[:, :1], 2)[:, 0], w[:, 0] / 2)


def test_position_embeddings_interpolated_to_another_grid(tmp_path) -> None:
    state = retfound_state()  # 4x4 grid (32 px / 8)
    model, report, _ = build(tmp_path, state, 2, 3, 48)  # 6x6 grid
    pos = state["pos_embed"]
    want = F.interpolate(pos[:, 1:].reshape(1, 4, 4, HIDDEN).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, HIDDEN)
    torch.testing.assert_close(model.patch_embedding.position_embeddings.data, want)
    torch.testing.assert_close(model.cls_token.data, state["cls_token"] + pos[:, :1])
    assert any("interpolated from a 4x4 to a 6x6" in a for a in report.adaptations)
    assert report.encoder_loaded == report.encoder_total
    # 3D: trilinear, identity on the same grid
    p3 = torch.randn(1, 8, 5)
    assert torch.equal(resize_grid(p3, (2, 2, 2), (2, 2, 2)), p3)
    assert resize_grid(p3, (2, 2, 2), (3, 2, 4)).shape == (1, 24, 5)


def test_retfound_needs_2d_and_a_vit_of_its_size(tmp_path) -> None:
    path = tmp_path / "r.pth"
    torch.save({"model": retfound_state()}, path)
    with pytest.raises(ConfigError, match="RETFound-style checkpoints are 2D: use --dim 2d"):
        M.init_model_kwargs(path, "vit_large", 3)
    with pytest.raises(ConfigError, match="holds a Vision Transformer.*use --model vit_large"):
        M.init_model_kwargs(path, "resnet18", 2)
    model = M.create_model("vit", 2, 3, 2, input_size=32, patch_size=8, hidden_size=HIDDEN, num_layers=3,
                           num_heads=HEADS, mlp_dim=MLP)
    with pytest.raises(ConfigError, match="32 wide with 2 blocks.*32 wide with 3 blocks"):
        M.load_init_weights(model, path, model_name="vit")


# ---------------------------------------------------------------------------- OCTCube
@pytest.mark.parametrize("attn", ["split", "mixer", "fused"])
def test_octcube_layout_every_tensor_lands(tmp_path, attn) -> None:
    state = octcube_state(attn=attn)  # patch (4, 8, 8): 4 B-scans x 8 x 8, grid 4x2x2 on a 16x16x16 volume
    model, report, kw = build(tmp_path, state, 3, 1, (16, 16, 16))
    assert report.format == "octcube" and kw["patch_size"] == [4, 8, 8] and model.grid == (4, 2, 2)
    assert report.encoder_loaded == report.encoder_total, report.table()
    assert any("spatial + temporal" in a for a in report.adaptations)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref_tokens(state, x), atol=1e-5, rtol=1e-4)


def test_octcube_embeddings_resized_per_part(tmp_path) -> None:
    state = octcube_state()
    model, report, _ = build(tmp_path, state, 3, 2, (24, 32, 32))  # grid 6x4x4; 2 channels from 1
    sp = F.interpolate(state["pos_embed_spatial"].reshape(1, 2, 2, HIDDEN).permute(0, 3, 1, 2), size=(4, 4),
                       mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(16, HIDDEN)
    tp = F.interpolate(state["pos_embed_temporal"].permute(0, 2, 1), size=6, mode="linear",
                       align_corners=False)[0].T
    want = (tp[:, None, :] + sp[None]).reshape(1, 96, HIDDEN)
    torch.testing.assert_close(model.patch_embedding.position_embeddings.data, want)
    w = model.patch_embedding.patch_embeddings.weight.data
    torch.testing.assert_close(w[:, 0], state["patch_embed.proj.weight"][:, 0] / 2)
    assert any("temporal 4 -> 6" in a for a in report.adaptations)


def test_detect_format() -> None:
    assert detect_format(retfound_state()) == "retfound"
    assert detect_format(octcube_state()) == "octcube"
    assert detect_format(octcube_state(attn="mixer")) == "octcube"
    net = M.create_model("resnet18", 3, 1, 2, shortcut_type="A")
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert detect_format(sd) == "medicalnet"
    assert detect_format(net.state_dict()) == "octa3d"


# ---------------------------------------------------------------------------- MedicalNet
@pytest.mark.parametrize("shortcut, channels", [("A", 1), ("B", 2)])
def test_medicalnet_layout(tmp_path, shortcut, channels) -> None:
    """MedicalNet: {"state_dict": {"module.<MONAI names>"}}, conv_seg head, B shortcuts without bias."""
    torch.manual_seed(0)
    src = M.create_model("resnet18", 3, 1, 2, shortcut_type=shortcut, bias_downsample=False, conv1_t_stride=2)
    src.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a misplaced tensor would show
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {f"module.{k}": v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    state["module.conv_seg.0.weight"] = torch.zeros(512, 32, 2, 2, 2)
    path = tmp_path / f"resnet_18_{shortcut}.pth"
    torch.save({"state_dict": state}, path)
    kw = M.init_model_kwargs(path, "resnet18", 3)
    assert kw == ({"conv1_t_stride": 2, "shortcut_type": "A"} if shortcut == "A"
                  else {"conv1_t_stride": 2, "bias_downsample": False})
    model = M.create_model("resnet18", 3, channels, 2, **kw).eval()
    report = M.load_init_weights(model, path, model_name="resnet18")
    assert report.format == "medicalnet" and report.encoder_loaded == report.encoder_total
    assert [u["key"] for u in report.unexpected] == ["module.conv_seg.0.weight"]
    grey = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(grey.repeat(1, channels, 1, 1, 1)),
                                   src.forward_features(grey), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="trained with shortcut type " + shortcut):
        M.init_model_kwargs(path, "resnet18", 3, explicit={"shortcut_type": "B" if shortcut == "A" else "A"})


# ---------------------------------------------------------------------------- report, strictness
def test_report_warns_and_strict_refuses_missing_encoder_tensors(tmp_path, caplog) -> None:
    state = retfound_state()
    del state["blocks.1.mlp.fc2.weight"]
    state["blocks.0.norm1.weight"] = torch.ones(HIDDEN + 1)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    kw = M.init_model_kwargs(path, "vit", 2)

    def fresh():
        return M.create_model("vit", 2, 3, 2, input_size=32, **TINY, **kw)

    with caplog.at_level(logging.INFO, logger="octa3d.model"):
        report = M.load_init_weights(fresh(), path, model_name="vit")
    assert set(report.encoder_missing) == {"blocks.1.mlp.linear2.weight", "blocks.0.norm1.weight"}
    assert report.mismatched[0]["file_shape"] == [HIDDEN + 1] and report.mismatched[0]["model_shape"] == [HIDDEN]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "missing   blocks.1.mlp.linear2.weight" in warned[0].getMessage()
    assert "new head  classification_head.weight" in warned[0].getMessage()
    assert "mismatch  blocks.0.norm1.weight" in warned[0].getMessage()
    d = report.to_dict()
    assert d["encoder_loaded"] == d["encoder_total"] - 2 and d["stages"][0]["stage"] == "patch_embedding+cls_token"
    with pytest.raises(ConfigError, match="--init-strict: 2 encoder tensor"):
        M.load_init_weights(fresh(), path, model_name="vit", strict=True)
    empty = tmp_path / "empty.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, HIDDEN)}}, empty)
    with pytest.raises(ConfigError, match="expected 'patch_embed.proj.weight'"):
        M.load_init_weights(fresh(), empty, model_name="vit", fmt="retfound")
    torch.save({"model": {"classification_head.weight": torch.zeros(2, HIDDEN)}}, empty)
    with pytest.raises(ConfigError, match="none of the model's 30 encoder tensors"):  # 0 % is always an error
        M.load_init_weights(fresh(), empty, model_name="vit")


def test_drop_path_only_in_training() -> None:
    torch.manual_seed(0)
    model = M.create_model("vit", 2, 1, 2, input_size=16, patch_size=8, drop_path_rate=0.5, **TINY)
    assert model.blocks[0].drop_path.__class__.__name__ == "Identity"  # rate rises from 0 at the first block
    assert model.blocks[-1].drop_path.drop_prob == 0.5
    x = torch.randn(8, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
