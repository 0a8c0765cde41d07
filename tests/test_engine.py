"""Training engine pieces: checkpoints (also written in the background), optimiser, early stopping, schedule,
RNG state."""

import random

import numpy as np
import pytest
import torch

from octa3d import engine
from octa3d.config import Config


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    cfg = Config()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "ckpt" / "last.pt"
    engine.save_checkpoint(path, model, engine.model_record(cfg, ["NORMAL", "DR"], "classifier"), epoch=3,
                           optimizer=opt, early=engine.EarlyStopping(), config=cfg)
    ck = engine.load_checkpoint(path, kind="classifier")
    assert ck["epoch"] == 3 and ck["class_names"] == ["NORMAL", "DR"] and ck["model_name"] == "resnet18"
    assert torch.equal(ck["state_dict"]["weight"], model.weight)
    with pytest.raises(engine.CheckpointError, match="expected a autoencoder"):
        engine.load_checkpoint(path, kind="autoencoder")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partially written file
    with pytest.raises(engine.CheckpointError, match="corrupt or partially written"):
        engine.load_checkpoint(path)
    with pytest.raises(engine.CheckpointError, match="not found"):
        engine.load_checkpoint(tmp_path / "none.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(engine.CheckpointError, match="--init-from"):
        engine.load_checkpoint(tmp_path / "plain.pt")


def test_background_checkpoint_writes_a_snapshot(tmp_path):
    cfg = Config()
    model = torch.nn.Linear(3, 2)
    record = engine.model_record(cfg, ["NORMAL", "DR"], "classifier")
    before = model.weight.detach().clone()
    with engine.CheckpointWriter() as writer:
        for epoch in (1, 2, 3):
            engine.save_checkpoint(tmp_path / f"e{epoch}.pt", model, record, epoch=epoch, writer=writer)
            with torch.no_grad():
                model.weight.add_(1.0)  # training goes on at once: the checkpoint holds the weights as they were
    for epoch in (1, 2, 3):
        ck = engine.load_checkpoint(tmp_path / f"e{epoch}.pt", kind="classifier")
        assert ck["epoch"] == epoch
        torch.testing.assert_close(ck["state_dict"]["weight"], before + (epoch - 1))
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary files


def test_background_checkpoint_failure_is_raised(tmp_path):
    model = torch.nn.Linear(3, 2)
    record = engine.model_record(Config(), ["NORMAL", "DR"], "classifier")
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    with pytest.raises(engine.CheckpointError, match="writing a checkpoint failed"):
        with engine.CheckpointWriter() as writer:
            engine.save_checkpoint(tmp_path / "file" / "last.pt", model, record, epoch=1, writer=writer)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_fused_when_possible_same_update(name, monkeypatch):
    cfg = Config()
    cfg.train.optimizer = name
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 2)
    b = torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    opt_a = engine.build_optimizer(a.parameters(), cfg)
    opt_b = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name](
        b.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        **({"momentum": 0.9, "nesterov": True} if name == "sgd" else {}))
    assert opt_a.defaults.get("fused") is True
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight)
    # where the fused kernels are refused (a device or dtype without them) the default implementation is used
    cls = type(opt_a)

    class NoFused(cls):
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("fused not supported here")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, cls.__name__, NoFused)
    fallback = engine.build_optimizer((p for p in torch.nn.Linear(2, 2).parameters()), cfg)
    assert isinstance(fallback, NoFused) and not fallback.defaults.get("fused")
    assert len(fallback.param_groups[0]["params"]) == 2  # a generator is read once, not exhausted by the retry


def test_early_stopping():
    es = engine.EarlyStopping(mode="max", patience=2)
    assert es.update(0.5, 0) and not es.update(0.4, 1) and not es.should_stop
    assert not es.update(0.5, 2) and es.should_stop and es.best_epoch == 0
    es2 = engine.EarlyStopping()
    es2.load_state_dict(es.state_dict())
    assert es2.state_dict() == es.state_dict()
    assert not engine.EarlyStopping(patience=0, bad_epochs=100).should_stop


def test_scheduler_warmup_then_cosine():
    cfg = Config()
    cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.lr = 4, 1, 1.0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sch = engine.build_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < 0.1


def test_rng_state_roundtrip():
    state = engine.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    engine.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_precision_is_fp32_on_cpu():
    prec = engine.Precision.for_device(torch.device("cpu"), enabled=True)
    assert prec.dtype is None and prec.scaler is None


def test_slice_grid_shape():
    img = engine.slice_grid(torch.rand(3, 2, 8, 10, 12))
    assert img.shape == (1, 10, 36) and float(img.max()) <= 1.0
