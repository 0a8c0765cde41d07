"""Checkpoint format: round trip, corruption, background writes, format versions (octa3d.checkpoint.io)."""

import pytest
import torch

import octa3d
from octa3d.checkpoint.io import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, CheckpointWriter,
                                  load_checkpoint, model_record, save_checkpoint)
from octa3d.config import Config
from octa3d.training.optim import EarlyStopping


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    cfg = Config()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, model, model_record(cfg, ["NORMAL", "DR"], "classifier"), epoch=3,
                           optimizer=opt, early=EarlyStopping(), config=cfg)
    ck = load_checkpoint(path, kind="classifier")
    assert ck["epoch"] == 3 and ck["class_names"] == ["NORMAL", "DR"] and ck["model_name"] == "resnet18"
    assert torch.equal(ck["state_dict"]["weight"], model.weight)
    with pytest.raises(CheckpointError, match="expected a autoencoder"):
        load_checkpoint(path, kind="autoencoder")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partially written file
    with pytest.raises(CheckpointError, match="corrupt or partially written"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="--init-from"):
        load_checkpoint(tmp_path / "plain.pt")


def test_background_checkpoint_writes_a_snapshot(tmp_path):
    cfg = Config()
    model = torch.nn.Linear(3, 2)
    record = model_record(cfg, ["NORMAL", "DR"], "classifier")
    before = model.weight.detach().clone()
    with CheckpointWriter() as writer:
        for epoch in (1, 2, 3):
            save_checkpoint(tmp_path / f"e{epoch}.pt", model, record, epoch=epoch, writer=writer)
            with torch.no_grad():
                model.weight.add_(1.0)  # training goes on at once: the checkpoint holds the weights as they were
    for epoch in (1, 2, 3):
        ck = load_checkpoint(tmp_path / f"e{epoch}.pt", kind="classifier")
        assert ck["epoch"] == epoch
        torch.testing.assert_close(ck["state_dict"]["weight"], before + (epoch - 1))
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary files


def test_background_checkpoint_failure_is_raised(tmp_path):
    model = torch.nn.Linear(3, 2)
    record = model_record(Config(), ["NORMAL", "DR"], "classifier")
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    with pytest.raises(CheckpointError, match="writing a checkpoint failed"):
        with CheckpointWriter() as writer:
            save_checkpoint(tmp_path / "file" / "last.pt", model, record, epoch=1, writer=writer)


def test_checkpoints_record_the_version_that_wrote_them_and_newer_formats_say_so(tmp_path):
    """A file of a format this octa3d does not know yet is refused with the version that wrote it, not a failure
    deep in the model code."""
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, model_record(Config(), ["NORMAL", "DR"], "classifier"), epoch=1)
    ck = load_checkpoint(path)
    assert ck["format"] == CHECKPOINT_FORMAT == f"octa3d-checkpoint-{CHECKPOINT_VERSION}"
    assert ck["octa3d_version"] == octa3d.__version__
    ck.update(format=f"octa3d-checkpoint-{CHECKPOINT_VERSION + 1}", octa3d_version="9.1.0")
    torch.save(ck, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=r"written by octa3d 9\.1\.0 in format 2; this octa3d .* reads formats "
                                              r"up to 1: upgrade octa3d"):
        load_checkpoint(tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="written by octa3d 9.1.0"):
        octa3d.load(tmp_path / "newer.pt", device="cpu")


def test_the_out_of_distribution_reference_survives_a_weights_only_round_trip(tmp_path):
    """The reference the train stage stores (tensors, lists, numbers) loads with weights_only=True and gives the
    same thresholds and scores as before it was written."""
    import numpy as np

    from octa3d.evaluation import ood
    from octa3d.evaluation.ood_check import OodCheck, checks_of

    rng = np.random.default_rng(0)

    def part(n):
        return {"geometry": [{"shape": [32.0, 64.0, 32.0], "spacing": [0.19, 0.03, 0.19], "extent": [6, 2, 6.0]}] * n,
                "intensity": np.column_stack([np.zeros(n), rng.normal(240, 5, n)]),
                "features": rng.standard_normal((n, 24)), "labels": rng.integers(0, 2, n)}

    ref = ood.build_reference(part(40), part(10), ["OCTA"], [0.5, 99.5])
    path = tmp_path / "best.pt"
    save_checkpoint(path, torch.nn.Linear(3, 2), {**model_record(Config(), ["NORMAL", "DR"], "classifier"),
                                                  "ood_reference": ref}, epoch=1)
    back = load_checkpoint(path, kind="classifier")["ood_reference"]
    assert torch.equal(back["features"]["precision"], ref["features"]["precision"])
    assert back["training"] == ref["training"] and back["geometry"] == ref["geometry"]
    before, after = OodCheck(ref), checks_of([{"ood_reference": back}])[0]
    assert after.thresholds == before.thresholds
    x = rng.standard_normal((5, 24))
    assert np.allclose(ood.mahalanobis(x, back["features"]), ood.mahalanobis(x, ref["features"]))
