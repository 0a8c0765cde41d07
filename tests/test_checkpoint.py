"""Checkpoint format: round trip, corruption, background writes (octa3d.checkpoint)."""

import pytest
import torch

from octa3d import checkpoint
from octa3d.config import Config
from octa3d.optim import EarlyStopping


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    cfg = Config()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_checkpoint(path, model, checkpoint.model_record(cfg, ["NORMAL", "DR"], "classifier"), epoch=3,
                           optimizer=opt, early=EarlyStopping(), config=cfg)
    ck = checkpoint.load_checkpoint(path, kind="classifier")
    assert ck["epoch"] == 3 and ck["class_names"] == ["NORMAL", "DR"] and ck["model_name"] == "resnet18"
    assert torch.equal(ck["state_dict"]["weight"], model.weight)
    with pytest.raises(checkpoint.CheckpointError, match="expected a autoencoder"):
        checkpoint.load_checkpoint(path, kind="autoencoder")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partially written file
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or partially written"):
        checkpoint.load_checkpoint(path)
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load_checkpoint(tmp_path / "none.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(checkpoint.CheckpointError, match="--init-from"):
        checkpoint.load_checkpoint(tmp_path / "plain.pt")


def test_background_checkpoint_writes_a_snapshot(tmp_path):
    cfg = Config()
    model = torch.nn.Linear(3, 2)
    record = checkpoint.model_record(cfg, ["NORMAL", "DR"], "classifier")
    before = model.weight.detach().clone()
    with checkpoint.CheckpointWriter() as writer:
        for epoch in (1, 2, 3):
            checkpoint.save_checkpoint(tmp_path / f"e{epoch}.pt", model, record, epoch=epoch, writer=writer)
            with torch.no_grad():
                model.weight.add_(1.0)  # training goes on at once: the checkpoint holds the weights as they were
    for epoch in (1, 2, 3):
        ck = checkpoint.load_checkpoint(tmp_path / f"e{epoch}.pt", kind="classifier")
        assert ck["epoch"] == epoch
        torch.testing.assert_close(ck["state_dict"]["weight"], before + (epoch - 1))
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary files


def test_background_checkpoint_failure_is_raised(tmp_path):
    model = torch.nn.Linear(3, 2)
    record = checkpoint.model_record(Config(), ["NORMAL", "DR"], "classifier")
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    with pytest.raises(checkpoint.CheckpointError, match="writing a checkpoint failed"):
        with checkpoint.CheckpointWriter() as writer:
            checkpoint.save_checkpoint(tmp_path / "file" / "last.pt", model, record, epoch=1, writer=writer)


def test_fold_of_reads_the_innermost_fold_folder(tmp_path):
    assert checkpoint.fold_of("runs/e/train/fold-3/checkpoints/best.pt") == 3
    assert checkpoint.fold_of("runs/fold-1/e/train/fold-12/checkpoints/best.pt") == 12
    assert checkpoint.fold_of("runs/e/train/checkpoints/best.pt") is None
    assert checkpoint.fold_of("runs/e/train/fold-x/best.pt") is None


def test_find_checkpoints_orders_folds_numerically(tmp_path):
    cfg = Config()
    cfg.run.runs_dir, cfg.run.exp = str(tmp_path), "e"
    for k in (0, 2, 10, 1):
        f = tmp_path / "e" / "train" / f"fold-{k}" / "checkpoints" / "best.pt"
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
    assert [n for n, _ in checkpoint.find_checkpoints(cfg)] == ["fold-0", "fold-1", "fold-2", "fold-10"]
