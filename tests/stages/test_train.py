"""Supervised training: learning, resume equality, freeze schedule, early stopping, TensorBoard, failures, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from octa3d.checkpoint.io import load_checkpoint
from octa3d.cli import parse_config
from octa3d.errors import ConfigError, DataError, RunExistsError
from octa3d.stages import train as train_mod
from octa3d.training.optim import FocalLoss, class_weights

ROOT = Path(__file__).resolve().parents[2]


def make_blob_dataset(root: Path, n: int = 24, shape=(12, 24, 12), seed: int = 0) -> Path:
    """Manifest of .npy volumes: DR eyes carry a bright blob, NORMAL eyes none (an easy task)."""
    rng = np.random.default_rng(seed)
    rows = []
    (root / "vols").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = "DR" if i % 2 else "NORMAL"
        v = rng.integers(20, 60, shape).astype(np.uint8)
        v[:, 8:16] += 60  # a "retina" band
        if label == "DR":
            z, x = rng.integers(1, shape[0] - 5), rng.integers(1, shape[2] - 5)
            v[z:z + 4, 9:14, x:x + 4] = 250
        np.save(root / "vols" / f"s{i:02d}.npy", v)
        rows.append({"subject": f"s{i:02d}", "label": label, "path": f"vols/s{i:02d}.npy"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def blob_root(tmp_path_factory) -> Path:
    return make_blob_dataset(tmp_path_factory.mktemp("blobs"), n=32)


def cfg_for(root: Path, runs: Path, exp: str, *extra: str):
    argv = ["--mode", "train", "--data-root", str(root), "--runs-dir", str(runs), "--exp", exp,
            "--dim", "3d", "--model", "cnn", "--input-size", "16", "--slab-depth", "1.0", "--batch-size", "4",
            "--epochs", "3", "--lr", "3e-3", "--warmup-epochs", "0", "--val-fraction", "0.25",
            "--deterministic", "--init", "random", *extra]
    return parse_config(argv)[0], argv


def test_loss_falls_and_validation_beats_chance(blob_root, tmp_path, capsys, monkeypatch):
    # 24^3 and enough optimiser steps: at 16^3 with a dozen steps the last BatchNorm (1 voxel x 4 samples)
    # keeps eval-mode statistics far from the batch statistics (a small-batch BatchNorm effect, not a bug).
    cfg, argv = cfg_for(blob_root, tmp_path, "learn", "--epochs", "6", "--patience", "0", "--input-size", "24")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/octa3d", *argv])  # run as the console script
    summary = train_mod.run(cfg)
    out = capsys.readouterr().out
    # one split: no "± 0.000" spread; the hint repeats the folders actually used, with the command actually run
    assert "±" not in out and "Validation (best epoch): " in out
    assert f"Next: octa3d --mode test --exp learn --runs-dir {tmp_path} --data-root {blob_root}" in out
    hist = pd.read_csv(tmp_path / "learn" / "train" / "history.csv")
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert summary["mean"]["balanced_accuracy"] >= 0.75 and summary["mean"]["auc"] >= 0.8
    ck = load_checkpoint(tmp_path / "learn" / "train" / "checkpoints" / "best.pt", kind="classifier")
    assert ck["class_names"] == ["NORMAL", "DR"] and ck["input_shape"] == [24, 24, 24]
    # TensorBoard: the per-epoch scalar tags are in the event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "learn" / "train" / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss/train", "loss/val", "val/accuracy", "val/balanced_accuracy", "val/auc", "val/f1_macro",
            "lr"} <= tags
    assert len(ea.Scalars("val/auc")) == 6


def test_resume_after_kill_equals_uninterrupted_run(blob_root, tmp_path):
    cfg, argv = cfg_for(blob_root, tmp_path, "full")
    train_mod.run(cfg)
    cfg, argv = cfg_for(blob_root, tmp_path, "killed", "--max-steps", "6")  # mid-epoch 2 (4 steps per epoch)
    assert train_mod.run(cfg)["stopped_at_step"] == 6
    assert load_checkpoint(tmp_path / "killed" / "train" / "checkpoints" / "last.pt")["epoch"] == 1
    cfg, argv = cfg_for(blob_root, tmp_path, "killed", "--resume")
    train_mod.run(cfg)
    a = load_checkpoint(tmp_path / "full" / "train" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "train" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert a["metrics"] == b["metrics"]
    ha = pd.read_csv(tmp_path / "full" / "train" / "history.csv").drop(columns="seconds")
    hb = pd.read_csv(tmp_path / "killed" / "train" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, hb)
    # resuming a finished run changes nothing
    cfg, argv = cfg_for(blob_root, tmp_path, "killed", "--resume")
    train_mod.run(cfg)
    assert load_checkpoint(tmp_path / "killed" / "train" / "checkpoints" / "last.pt")["epoch"] == 3


def test_freeze_schedule_freezes_exactly_the_encoder_then_unfreezes():
    from octa3d.config import Config
    from octa3d.model import create_model, get_spec

    cfg = Config()
    cfg.model.model = "cnn"
    cfg.train.freeze_epochs = 2
    model = create_model("cnn", 3, 1, 2)
    spec = get_spec("cnn")
    schedule = train_mod.FreezeSchedule(model, cfg, torch.device("cpu"))
    for epoch, frozen in ((0, True), (1, True), (2, False)):
        schedule(epoch)
        assert schedule.frozen is frozen
        for name, p in model.named_parameters():
            expect = not frozen or spec.is_head_key(name)
            assert p.requires_grad is expect, (epoch, name)


def test_freeze_encoder_keeps_encoder_weights(blob_root, tmp_path):
    cfg, argv = cfg_for(blob_root, tmp_path, "frozen", "--freeze-encoder", "--epochs", "2")
    torch.manual_seed(cfg.run.seed)
    train_mod.run(cfg)
    from octa3d.model import create_model, get_spec
    from octa3d.utils.seed import seed_everything

    seed_everything(cfg.run.seed)
    fresh = create_model("cnn", 3, 1, 2).state_dict()  # same seed -> same initial weights
    ck = load_checkpoint(tmp_path / "frozen" / "train" / "checkpoints" / "last.pt")
    spec = get_spec("cnn")
    enc = [k for k in fresh if spec.is_encoder_key(k)]
    head = [k for k in fresh if spec.is_head_key(k) and fresh[k].is_floating_point()]
    assert enc and all(torch.equal(fresh[k], ck["state_dict"][k]) for k in enc)  # incl. BN running stats
    assert any(not torch.equal(fresh[k], ck["state_dict"][k]) for k in head)


def test_a_run_at_chance_is_not_stopped_early_and_says_it_did_not_learn(blob_root, tmp_path, run_cli):
    """A frozen encoder (BatchNorm in eval mode) and a negligible learning rate: the model cannot leave chance.
    Early stopping does not end it (patience counts only once the training loss is below 0.9 x chance) and the
    command says, as the user sees it, that the model did not learn and what to try."""
    _, argv = cfg_for(blob_root, tmp_path, "chance", "--epochs", "4", "--patience", "1", "--lr", "1e-12",
                      "--freeze-encoder")
    res = run_cli(argv)
    assert res.rc == 0
    hist = pd.read_csv(tmp_path / "chance" / "train" / "history.csv")
    assert len(hist) == 4  # patience 1, but never armed
    assert "WARNING" in res.err and "fold 0: the model did not learn" in res.err and "--epochs 8" in res.err
    assert "Fit check: fold-0 did not learn" in res.out
    summary = json.loads((tmp_path / "chance" / "train" / "summary.json").read_text())
    fit = summary["folds"]["fold-0"]["fit"]
    assert fit["verdict"] == "did_not_learn" and fit["left_chance_epoch"] is None and fit["epochs_run"] == 4
    assert fit["chance_loss"] == pytest.approx(math.log(2))


def test_nan_loss_stops_with_epoch_step_and_subjects(blob_root, tmp_path, monkeypatch):
    class NanLoss(torch.nn.Module):
        def forward(self, logits, y):
            return logits.sum() * float("nan")

    monkeypatch.setattr(train_mod, "build_loss", lambda cfg, w, reduction="mean": NanLoss())
    cfg, argv = cfg_for(blob_root, tmp_path, "nan")
    with pytest.raises(DataError, match=r"epoch 1, step 0 \(subjects s\d\d"):
        train_mod.run(cfg)


def test_class_absent_from_training_split():
    with pytest.raises(DataError, match="no training samples"):
        class_weights([0, 0, 2], 3)


def test_focal_loss_reduces_to_ce_at_gamma_zero():
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    focal = FocalLoss(gamma=0.0)
    assert torch.allclose(focal(logits, y), torch.nn.functional.cross_entropy(logits, y))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_PREDICT = """
import os, sys
import torch
import torch.distributed as tdist
from octa3d.stages import train as train_mod
from octa3d.data.datasets import EpochSampler
from octa3d.evaluation.forward import predict
from octa3d.training.precision import Precision

tdist.init_process_group("gloo")
rank, world = tdist.get_rank(), tdist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
xs = torch.randn(7, 8)
items = [{"image": xs[i], "label": torch.tensor(i % 3), "subject": f"s{i}", "patch": -1} for i in range(7)]


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return 7

    def __getitem__(self, key):
        return items[key[0]]


loader = torch.utils.data.DataLoader(DS(), batch_size=2, sampler=EpochSampler(7, False, 0, rank, world))
ids, y, p, _ = predict(model, loader, Precision(torch.device("cpu"), None, None))
if rank == 0:
    torch.save({"ids": ids, "y": torch.tensor(y), "p": torch.tensor(p)}, sys.argv[1])
tdist.destroy_process_group()
"""


def _torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_ddp_validation_gathers_each_subject_once(tmp_path):
    """2 gloo ranks (7 samples: one rank gets a padded repeat) give exactly the single-process predictions."""
    script = tmp_path / "ddp_predict.py"
    script.write_text(DDP_PREDICT)
    outs = {}
    for world in (1, 2):
        res = _torchrun(world, str(script), str(tmp_path / f"w{world}.pt"))
        assert res.returncode == 0, res.stderr[-3000:]
        outs[world] = torch.load(tmp_path / f"w{world}.pt", weights_only=False)
    assert outs[1]["ids"] == outs[2]["ids"] == [f"s{i}" for i in range(7)]
    assert torch.equal(outs[1]["y"], outs[2]["y"]) and torch.allclose(outs[1]["p"], outs[2]["p"])


@pytest.mark.slow
def test_torchrun_two_processes_train(blob_root, tmp_path):
    res = _torchrun(2, str(ROOT / "main.py"), "--mode", "train", "--data-root", str(blob_root), "--runs-dir",
                    str(tmp_path), "--exp", "ddp", "--model", "cnn", "--input-size", "16", "--slab-depth", "1.0",
                    "--epochs", "2", "--batch-size", "2", "--init", "random", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    hist = pd.read_csv(tmp_path / "ddp" / "train" / "history.csv")
    assert len(hist) == 2 and (tmp_path / "ddp" / "train" / "checkpoints" / "best.pt").exists()


def test_kfold_trains_every_fold_and_reports_mean_sd(blob_root, tmp_path):
    import json

    cfg, argv = cfg_for(blob_root, tmp_path, "cv", "--folds", "2", "--epochs", "1")
    summary = train_mod.run(cfg)
    out = tmp_path / "cv" / "train"
    for k in (0, 1):
        assert (out / f"fold-{k}" / "checkpoints" / "best.pt").exists()
        assert (tmp_path / "cv" / "splits" / f"fold-{k}" / "val.csv").exists()
    saved = json.loads((out / "summary.json").read_text())
    line = train_mod.summary_line(saved, 2)
    assert "mean ± sd over 2 folds" in line and f"{saved['mean']['auc']:.3f}±{saved['sd']['auc']:.3f}" in line
    assert set(saved["folds"]) == {"fold-0", "fold-1"} and set(saved["mean"]) == set(saved["sd"])
    assert saved["mean"] == summary["mean"]


# ------------------------------------------------------------------------------------ temperature
def test_temperature_is_fitted_per_fold_on_validation_only(blob_root, tmp_path, monkeypatch):
    from octa3d.evaluation import calibration, forward

    seen: list[str] = []
    fits: list[int] = []
    real_predict, real_fit = forward.predict, calibration.fit_temperature

    def spy_predict(model, loader, *a, **kw):
        out = real_predict(model, loader, *a, **kw)
        seen.extend(out[0])
        return out

    val_probs: list[np.ndarray] = []

    def spy_fit(y, probs):
        fits.append(len(y))
        val_probs.append(np.asarray(probs))
        return real_fit(y, probs)

    monkeypatch.setattr(forward, "predict", spy_predict)
    monkeypatch.setattr(train_mod, "fit_temperature", spy_fit)
    cfg, _ = cfg_for(blob_root, tmp_path, "temp", "--folds", "2", "--epochs", "1")
    summary = train_mod.run(cfg)
    test_ids = set(pd.read_csv(tmp_path / "temp" / "splits" / "test.csv", dtype={"subject": str})["subject"])
    assert test_ids and not test_ids & set(seen)  # no prediction during training ever saw a test subject
    for k in (0, 1):
        val = pd.read_csv(tmp_path / "temp" / "splits" / f"fold-{k}" / "val.csv", dtype={"subject": str})
        assert fits[k] == len(val)  # one fit per fold, on exactly that fold's validation subjects
        ck = load_checkpoint(tmp_path / "temp" / "train" / f"fold-{k}" / "checkpoints" / "best.pt")
        assert ck["temperature"] > 0 and ck["temperature"] == summary["folds"][f"fold-{k}"]["temperature"]
        assert "val_ece_calibrated" in summary["folds"][f"fold-{k}"]
        # the `uncertain` threshold: >= 90 % of this fold's validation eyes at or below it, the fewest possible
        e = calibration.entropy(calibration.apply_temperature(val_probs[k], ck["temperature"]))
        thr, n = ck["entropy_threshold"], len(e)
        assert ck["uncertainty_coverage"] == 0.9 and thr == summary["folds"][f"fold-{k}"]["entropy_threshold"]
        assert (e <= thr).sum() >= 0.9 * n and ((e < thr).sum() < 0.9 * n)
        assert (calibration.entropy(val_probs[k]) <= ck["entropy_threshold_raw"]).mean() >= 0.9
        # the fold's out-of-fold predictions (a study pools them): raw and calibrated, its validation eyes only
        pred = pd.read_csv(tmp_path / "temp" / "train" / f"fold-{k}" / "val_predictions.csv", dtype={"subject": str})
        assert sorted(pred["subject"]) == sorted(val["subject"])
        raw_cols = [c for c in pred.columns if c.startswith("p_raw_")]
        assert len(raw_cols) == val_probs[k].shape[1]
        assert np.allclose(np.sort(pred[raw_cols].to_numpy(), axis=0), np.sort(val_probs[k], axis=0), atol=1e-5)
        cal = calibration.apply_temperature(val_probs[k], ck["temperature"])
        assert np.allclose(np.sort(pred[[c.replace("p_raw_", "p_") for c in raw_cols]].to_numpy(), axis=0),
                           np.sort(cal, axis=0), atol=1e-5)


def test_temperature_refuses_validation_subjects_that_are_test_subjects(tmp_path):
    path = tmp_path / "best.pt"
    with pytest.raises(DataError, match="s7"):
        train_mod.calibrate_checkpoint(path, None, None, None, ["s1", "s7"], ["s7", "s9"])
    assert not path.exists()  # refused before anything was read or written


def test_channels_last_path_trains(blob_root, tmp_path):
    cfg, argv = cfg_for(blob_root, tmp_path, "cl", "--channels-last", "--epochs", "1")
    train_mod.run(cfg)
    assert (tmp_path / "cl" / "train" / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_compile_path_trains(blob_root, tmp_path):
    cfg, argv = cfg_for(blob_root, tmp_path, "comp", "--compile", "--epochs", "1")
    train_mod.run(cfg)
    ck = load_checkpoint(tmp_path / "comp" / "train" / "checkpoints" / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in ck["state_dict"])  # saved unwrapped


# --------------------------------------------------------------------------------- damaged data and misuse
def test_interrupted_training_offers_resume_and_resume_means_the_same_run(blob_root, tmp_path):
    """Item 6: after an interruption (last.pt after epoch 1) a plain retry is refused offering --resume, and the
    resumable last.pt stays. Item 7: --resume refuses changed settings (listed, config.yaml untouched) and fewer
    epochs; more epochs after the run finished train further, at the schedule's final rate, and are recorded."""
    out = tmp_path / "cut" / "train"
    cfg, _ = cfg_for(blob_root, tmp_path, "cut", "--epochs", "2", "--max-steps", "6")
    assert train_mod.run(cfg)["stopped_at_step"] == 6
    assert not (out / ".complete").exists()
    with pytest.raises(RunExistsError, match=r"interrupted.*--resume.*--overwrite"):
        train_mod.run(cfg_for(blob_root, tmp_path, "cut", "--epochs", "2")[0])
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    recorded = (out / "config.yaml").read_bytes()
    bad = cfg_for(blob_root, tmp_path, "cut", "--epochs", "2", "--resume", "--lr", "1e-3", "--batch-size", "2",
                  "--model", "resnet18")[0]
    with pytest.raises(ConfigError) as err:
        train_mod.run(bad)
    for change in ("--lr: 0.003 -> 0.001", "--batch-size: 4 -> 2", "--model: cnn -> resnet18"):
        assert change in str(err.value)
    with pytest.raises(ConfigError, match=r"--epochs: 2 -> 1 \(fewer epochs"):
        train_mod.run(cfg_for(blob_root, tmp_path, "cut", "--epochs", "1", "--resume")[0])
    assert (out / "config.yaml").read_bytes() == recorded
    # --resume alone continues with the recorded settings (the recorded --max-steps is no longer in force)
    train_mod.run(parse_config(["--mode", "train", "--runs-dir", str(tmp_path), "--exp", "cut", "--resume",
                                "--data-root", str(blob_root)])[0])
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2 and (out / ".complete").is_file()
    train_mod.run(cfg_for(blob_root, tmp_path, "cut", "--epochs", "3", "--resume", "--num-workers", "0")[0])
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3]
    assert hist["lr"].iloc[-1] == pytest.approx(3e-3 * 0.01)  # past the 2-epoch schedule: its final rate
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["epoch"] == 3 and last["finished"] is True and last["schedule_epochs"] == 2
    assert "epochs: 3" in (out / "config.yaml").read_text() and (out / ".complete").is_file()


def test_overwrite_keeps_finished_training_until_the_new_one_finishes(blob_root, tmp_path, monkeypatch):
    """Item 5: --overwrite over a finished training trains beside it; a failure (disk full) leaves the finished
    results in place and the new run resumable in its partial folder; finishing swaps it in."""
    out = tmp_path / "ow" / "train"
    train_mod.run(cfg_for(blob_root, tmp_path, "ow", "--epochs", "1")[0])
    best = (out / "checkpoints" / "best.pt").read_bytes()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(train_mod, "_hparams", full)
        with pytest.raises(OSError, match="No space"):
            train_mod.run(cfg_for(blob_root, tmp_path, "ow", "--epochs", "2", "--overwrite")[0])
    assert (out / "checkpoints" / "best.pt").read_bytes() == best and (out / ".complete").is_file()
    partial = tmp_path / "ow" / ".train.partial"
    assert load_checkpoint(partial / "checkpoints" / "last.pt")["epoch"] == 2
    with pytest.raises(RunExistsError, match="--resume"):
        train_mod.run(cfg_for(blob_root, tmp_path, "ow", "--epochs", "2")[0])
    train_mod.run(cfg_for(blob_root, tmp_path, "ow", "--epochs", "2", "--resume")[0])
    assert not partial.exists() and load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2
    assert len(pd.read_csv(out / "history.csv")) == 2 and (out / ".complete").is_file()


# ---------------------------------------------------------------------------------------------- --init-from recipe
def _medicalnet_file(path: Path, drop: str | None = None) -> Path:
    """A MedicalNet-layout resnet18 (shortcut A, 1 channel, module. prefixes, conv_seg head) at ``path``."""
    from octa3d.model import create_model

    torch.manual_seed(11)
    src = create_model("resnet18", 3, 1, 2, shortcut_type="A", conv1_t_stride=2)
    state = {f"module.{k}": v for k, v in src.state_dict().items() if not k.startswith("fc.") and k != drop}
    state["module.conv_seg.2.weight"] = torch.zeros(2, 32, 1, 1, 1)
    torch.save({"state_dict": state, "epoch": 200}, path)
    return path


def test_init_from_medicalnet_report_layer_decay_and_rebuild(blob_root, tmp_path):
    from octa3d.checkpoint.models import build_classifier
    from octa3d.checkpoint.settings import checkpoint_config

    weights = _medicalnet_file(tmp_path / "resnet_18_23dataset.pth")
    cfg, _ = cfg_for(blob_root, tmp_path, "mednet", "--model", "resnet18", "--init-from", str(weights),
                     "--epochs", "1", "--layer-decay", "0.5", "--normalize", "imagenet", "--init-strict")
    train_mod.run(cfg)
    out = tmp_path / "mednet" / "train"
    report = json.loads((out / "init_report.json").read_text())
    assert report["format"] == "medicalnet" and report["encoder_loaded"] == report["encoder_total"] > 50
    assert [u["key"] for u in report["unexpected"]] == ["module.conv_seg.2.weight"]
    assert {m["key"] for m in report["missing"]} == {"fc.weight", "fc.bias"}
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["model_kwargs"] == {"conv1_t_stride": 2, "shortcut_type": "A"}
    scales = sorted(g["lr_scale"] for g in last["optimizer"]["param_groups"])
    assert scales == pytest.approx([0.5 ** k for k in range(5, -1, -1)])  # stem, layer1..4, head
    best = load_checkpoint(out / "checkpoints" / "best.pt", kind="classifier")
    assert best["preprocess"]["normalize"] == "imagenet"
    model = build_classifier(best, out / "checkpoints" / "best.pt")  # shortcut A + stride 2 rebuilt
    assert model.conv1.stride == (2, 2, 2) and not hasattr(model.layer2[0].downsample, "state_dict")
    test_cfg = parse_config(["--mode", "test", "--runs-dir", str(tmp_path), "--exp", "mednet"])[0]
    assert checkpoint_config(test_cfg, best).preprocess.normalize == "imagenet"  # test/predict normalise alike
    bad = parse_config(["--mode", "test", "--runs-dir", str(tmp_path), "--exp", "mednet",
                        "--shortcut-type", "B", "--normalize", "none"])[0]
    with pytest.raises(ConfigError, match="--shortcut-type B \\(the model: A\\).*--normalize none"):
        checkpoint_config(bad, best)


def test_init_from_partial_file_warns_and_strict_refuses(blob_root, tmp_path, capture_log):
    from octa3d.model import create_model

    weights = _medicalnet_file(tmp_path / "partial.pth", drop="layer3.1.conv2.weight")
    cfg, _ = cfg_for(blob_root, tmp_path, "strict", "--model", "resnet18", "--init-from", str(weights),
                     "--init-strict")
    kw = train_mod.model_kwargs(cfg)
    with pytest.raises(ConfigError, match="--init-strict: 1 encoder tensor.*layer3.1.conv2.weight"):
        train_mod.initialise(create_model("resnet18", 3, 1, 2, **kw), cfg, "", tmp_path / "strict")
    records = capture_log("octa3d.model")
    cfg.train.init_strict = False
    start = train_mod.initialise(create_model("resnet18", 3, 1, 2, **kw), cfg, "", tmp_path / "loose")
    assert "(medicalnet, 101/102 encoder tensors)" in start
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("missing   layer3.1.conv2.weight" in m for m in warned)
    report = json.loads((tmp_path / "loose" / "init_report.json").read_text())
    assert report["encoder_loaded"] == report["encoder_total"] - 1 == 101
    # options the model does not take, or that contradict the file, are refused before anything is built
    cfg, _ = cfg_for(blob_root, tmp_path, "opts", "--shortcut-type", "A")
    with pytest.raises(ConfigError, match="--shortcut-type applies to resnet18"):
        train_mod.model_kwargs(cfg)
    cfg, _ = cfg_for(blob_root, tmp_path, "opts", "--model", "resnet18", "--init-from", str(weights),
                     "--shortcut-type", "B")
    with pytest.raises(ConfigError, match="trained with shortcut type A"):
        train_mod.model_kwargs(cfg)
