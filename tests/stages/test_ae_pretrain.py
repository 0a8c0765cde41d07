"""--mode ae_pretrain: outputs, learning, leakage guard on extra data, 2D, encoder transfer into train."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from octa3d.checkpoint.io import load_checkpoint
from octa3d.cli import parse_config
from octa3d.data.synthetic import generate
from octa3d.errors import ConfigError, LeakageError
from octa3d.stages import ae_pretrain, train


@pytest.fixture(scope="module")
def octa_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("octa500")
    generate(root, n_subjects=24, shape=(16, 32, 16), seed=0)
    return root


def cfg_for(root: Path, runs: Path, *extra: str, mode: str = "ae_pretrain"):
    argv = ["--mode", mode, "--data-root", str(root), "--runs-dir", str(runs), "--exp", "ae", "--model", "cnn",
            "--input-size", "16", "--batch-size", "4", "--epochs", "3", "--lr", "3e-3", "--warmup-epochs", "0",
            "--deterministic", *extra]
    return parse_config(argv)[0], argv


def test_ae_pretrain_writes_outputs_and_learns(octa_root, tmp_path, capsys, monkeypatch):
    cfg, argv = cfg_for(octa_root, tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    res = ae_pretrain.run(cfg)
    # the hint is the command that continues this experiment: same folders, same model settings
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Next: "))
    assert hint.startswith(f"Next: python main.py --mode train --exp ae --runs-dir {tmp_path} --data-root {octa_root} "
                           f"--model cnn --input-size 16 ")
    out = tmp_path / "ae" / "ae_pretrain"
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3]
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert res["fold-0"]["best_val_loss"] == pytest.approx(hist["val_loss"].min())
    best = load_checkpoint(out / "checkpoints" / "best.pt", kind="autoencoder")
    assert best["model_name"] == "cnn" and best["encoder_state_dict"]
    assert (out / "checkpoints" / "last.pt").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert {"loss/train", "loss/val"} <= set(ea.Tags()["scalars"])
    assert {"reconstruction/input", "reconstruction/output"} <= set(ea.Tags()["images"])

    # --init ae (auto): the classifier's encoder equals the AE encoder exactly; the head is untouched
    from octa3d.model import create_model, get_spec

    tcfg, _ = cfg_for(octa_root, tmp_path, mode="train")
    model = create_model("cnn", 3, 1, 2)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if get_spec("cnn").is_head_key(k)}
    desc = train.initialise(model, tcfg, "")
    assert desc.startswith("ae")
    sd = model.state_dict()
    for k, v in best["encoder_state_dict"].items():
        assert torch.equal(sd[k], v), k
    for k, v in head_before.items():
        assert torch.equal(sd[k], v), k

    # a checkpoint of another model is refused with a clear message
    other, _ = cfg_for(octa_root, tmp_path, "--model", "resnet18", "--init", "ae", mode="train")
    with pytest.raises(ConfigError, match="pretrained for --model cnn"):
        train.initialise(create_model("resnet18", 3, 1, 2), other, "")


def test_ae_pretrain_refuses_to_overwrite(octa_root, tmp_path):
    cfg, argv = cfg_for(octa_root, tmp_path, "--epochs", "1")
    ae_pretrain.run(cfg)
    from octa3d.errors import RunExistsError

    with pytest.raises(RunExistsError, match="--overwrite"):
        ae_pretrain.run(cfg)


def test_extra_data_with_a_test_subject_is_refused(octa_root, tmp_path):
    cfg, argv = cfg_for(octa_root, tmp_path, "--ae-extra-data", str(octa_root), "--epochs", "1")
    with pytest.raises(LeakageError, match="hold-out test"):
        ae_pretrain.run(cfg)
    assert not (tmp_path / "ae" / "ae_pretrain" / "checkpoints").exists()


def test_unlabeled_extra_data_is_used(octa_root, tmp_path):
    extra = tmp_path / "extra"
    (extra / "v").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        vol = rng.integers(0, 80, (16, 32, 16)).astype(np.uint8)
        vol[:, 12:20] += 120
        np.save(extra / "v" / f"x{i}.npy", vol)
    pd.DataFrame({"subject": [f"x{i}" for i in range(3)], "label": "", "path": [f"v/x{i}.npy" for i in range(3)]}
                 ).to_csv(extra / "manifest.csv", index=False)
    cfg, argv = cfg_for(octa_root, tmp_path, "--ae-extra-data", str(extra), "--epochs", "1")
    ae_pretrain.run(cfg)
    assert (tmp_path / "ae" / "ae_pretrain" / "checkpoints" / "best.pt").exists()


def test_ae_pretrain_2d_enface(octa_root, tmp_path):
    cfg, argv = cfg_for(octa_root, tmp_path, "--dim", "2d", "--input-size", "32", "--epochs", "1")
    ae_pretrain.run(cfg)
    ck = load_checkpoint(tmp_path / "ae" / "ae_pretrain" / "checkpoints" / "best.pt", kind="autoencoder")
    assert ck["dim"] == "2d" and ck["input_shape"] == [32, 32]


@pytest.fixture(scope="module")
def tiny_vit():
    """A tiny ViT registered for this module only, as a user's own size would be: no registry flag marks it for
    autoencoding (``ae_supported=False``); ae_pretrain picks masked autoencoding by its family."""
    from functools import partial

    from octa3d.model.registry import _REGISTRY, register_model
    from octa3d.model.vit import vit

    register_model("vit-mae-test", cam_layer="cam_grid", min_input=16, ae_supported=False, feature_size=32,
                   stages=(("patch_embedding", "cls_token"), ("blocks", "norm")),
                   head_prefixes=("classification_head",), needs_input_size=True)(
        partial(vit, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2))
    try:
        yield "vit-mae-test"
    finally:
        _REGISTRY.pop("vit-mae-test", None)


def _spy_subjects(monkeypatch) -> dict[str, set[str]]:
    """Record which subjects ae_pretrain preprocesses and loads (training loaders apart)."""
    from octa3d.data.datasets import DataHandler

    seen: dict[str, set[str]] = {"warm": set(), "train": set(), "other": set()}
    real_warm, real_loader = DataHandler.warm, DataHandler.loader

    def warm(self, subjects, *a, **k):
        seen["warm"] |= {s.id for s in subjects}
        return real_warm(self, subjects, *a, **k)

    def loader(self, subjects, train, *a, **k):
        seen["train" if train else "other"] |= {s.id for s in subjects}
        return real_loader(self, subjects, train, *a, **k)

    monkeypatch.setattr(DataHandler, "warm", warm)
    monkeypatch.setattr(DataHandler, "loader", loader)
    return seen


def _split(runs: Path, name: str) -> set[str]:
    return set(pd.read_csv(runs / "ae" / "splits" / f"{name}.csv", dtype={"subject": str})["subject"])


def test_vit_is_pretrained_as_masked_autoencoder_on_training_subjects(octa_root, tmp_path, tiny_vit, monkeypatch,
                                                                      capture_log):
    seen = _spy_subjects(monkeypatch)
    cfg, _ = cfg_for(octa_root, tmp_path, "--model", tiny_vit, "--epochs", "4")
    ae_pretrain.run(cfg)
    train_ids, val_ids, test_ids = (_split(tmp_path, n) for n in ("train", "val", "test"))
    # test subjects never enter; the gradient sees the training subjects only, validation picks best.pt
    assert seen["train"] == train_ids and seen["other"] == val_ids and seen["warm"] == train_ids | val_ids
    assert not (seen["warm"] | seen["train"] | seen["other"]) & test_ids
    out = tmp_path / "ae" / "ae_pretrain"
    hist = pd.read_csv(out / "history.csv")
    assert hist["val_loss"].min() < hist["val_loss"].iloc[0]  # same (fixed) validation masks every epoch
    best = load_checkpoint(out / "checkpoints" / "best.pt", kind="autoencoder")
    assert best["pretext"] == {"method": "MAE", "mask_ratio": 0.75, "patch": [8, 8, 8], "norm_pix_loss": False,
                               "loss": "mse"}
    assert any(k.startswith("decoder_blocks.") for k in best["state_dict"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert {"reconstruction/input", "reconstruction/masked_input", "reconstruction/output"} <= set(ea.Tags()["images"])

    # --mode train --init ae: the classifier's encoder is the MAE encoder, tensor for tensor, and the log says so
    from octa3d.model import create_model, get_spec

    tcfg, _ = cfg_for(octa_root, tmp_path, "--model", tiny_vit, "--init", "ae", mode="train")
    model = create_model(tiny_vit, 3, 1, 2, input_size=16)
    records = capture_log("octa3d.train")
    assert train.initialise(model, tcfg, "").startswith("ae")
    sd, enc = model.state_dict(), best["encoder_state_dict"]
    assert sorted(enc) == sorted(get_spec(tiny_vit).encoder_keys(sd))
    for k, v in enc.items():
        assert torch.equal(sd[k], v), k
    msg = next(r.getMessage() for r in records if "Encoder initialised" in r.getMessage())
    assert f"{len(enc)} tensors copied" in msg and "classification_head" in msg


def test_vit_masks_follow_the_seed_across_resume(octa_root, tmp_path, tiny_vit):
    """Masks come from the seeded RNG: a run cut by --max-steps and resumed ends with the same weights."""
    extra = ("--model", tiny_vit, "--epochs", "2")
    ae_pretrain.run(cfg_for(octa_root, tmp_path / "full", *extra)[0])
    assert ae_pretrain.run(cfg_for(octa_root, tmp_path / "cut", *extra, "--max-steps", "5")[0])["stopped_at_step"] == 5
    assert load_checkpoint(tmp_path / "cut" / "ae" / "ae_pretrain" / "checkpoints" / "last.pt")["epoch"] == 1
    ae_pretrain.run(cfg_for(octa_root, tmp_path / "cut", *extra, "--resume")[0])
    a, b = (load_checkpoint(tmp_path / r / "ae" / "ae_pretrain" / "checkpoints" / "last.pt") for r in ("full", "cut"))
    assert a["epoch"] == b["epoch"] == 2
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_vit_masked_autoencoder_2d(octa_root, tmp_path, tiny_vit):
    cfg, _ = cfg_for(octa_root, tmp_path, "--model", tiny_vit, "--dim", "2d", "--input-size", "32", "--epochs", "1",
                     "--mask-ratio", "0.5", "--ae-loss", "l1")
    ae_pretrain.run(cfg)
    ck = load_checkpoint(tmp_path / "ae" / "ae_pretrain" / "checkpoints" / "best.pt", kind="autoencoder")
    assert ck["dim"] == "2d" and ck["pretext"]["mask_ratio"] == 0.5 and ck["pretext"]["loss"] == "l1"
    from octa3d.model import create_model

    model = create_model(tiny_vit, 2, 1, 2, input_size=32)
    tcfg, _ = cfg_for(octa_root, tmp_path, "--model", tiny_vit, "--dim", "2d", "--input-size", "32", mode="train")
    assert train.initialise(model, tcfg, "").startswith("ae")
    assert torch.equal(model.state_dict()["cls_token"], ck["encoder_state_dict"]["cls_token"])


def test_ae_resume_after_interruption_equals_uninterrupted_run(octa_root, tmp_path):
    """--max-steps stops as a kill would (last.pt = last finished epoch); --resume then continues bit-exactly."""
    cfg, _ = cfg_for(octa_root, tmp_path / "full")
    ae_pretrain.run(cfg)
    cfg, _ = cfg_for(octa_root, tmp_path / "cut", "--max-steps", "5")
    assert ae_pretrain.run(cfg)["stopped_at_step"] == 5
    out = tmp_path / "cut" / "ae" / "ae_pretrain"
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    cfg, _ = cfg_for(octa_root, tmp_path / "cut", "--resume")
    ae_pretrain.run(cfg)
    a = load_checkpoint(tmp_path / "full" / "ae" / "ae_pretrain" / "checkpoints" / "last.pt")
    b = load_checkpoint(out / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and b["finished"] is True
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k in a["encoder_state_dict"]:
        assert torch.equal(a["encoder_state_dict"][k], b["encoder_state_dict"][k]), k
    ha = pd.read_csv(tmp_path / "full" / "ae" / "ae_pretrain" / "history.csv").drop(columns="seconds")
    hb = pd.read_csv(out / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, hb)


def test_ae_honours_accumulation_and_clipping(octa_root, tmp_path, monkeypatch):
    clips: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        clips.append(max_norm)
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    steps = {}
    for accum in (1, 2):
        cfg, _ = cfg_for(octa_root, tmp_path / f"a{accum}", "--epochs", "2", "--accum-steps", str(accum),
                         "--clip-grad", "0.5")
        ae_pretrain.run(cfg)
        ck = load_checkpoint(tmp_path / f"a{accum}" / "ae" / "ae_pretrain" / "checkpoints" / "last.pt")
        steps[accum] = ck["scheduler"]["last_epoch"]  # one scheduler step per optimiser step
    per_epoch = steps[1] // 2
    assert per_epoch >= 2 and steps[2] == 2 * -(-per_epoch // 2)
    assert clips and set(clips) == {0.5} and len(clips) == steps[1] + steps[2]


def test_autoencoder_is_built_with_the_classifiers_model_options(octa_root, tmp_path):
    """--shortcut-type A (MedicalNet resnet18/34) changes the encoder's tensors: the AE must match the classifier."""
    from octa3d.model import create_model, encoder_state_dict, get_spec

    cfg, _ = cfg_for(octa_root, tmp_path, "--model", "resnet18", "--shortcut-type", "A")
    ae, _, kind = ae_pretrain.build_pretext_model(cfg)
    clf = create_model("resnet18", 3, 1, 2, input_size=16, shortcut_type="A")
    enc = encoder_state_dict(ae)
    assert kind["method"] == "AE" and sorted(enc) == sorted(get_spec("resnet18").encoder_keys(clf.state_dict()))
    assert not any("downsample" in k for k in enc)  # type A: zero-padded identity, no 1x1 convolution
