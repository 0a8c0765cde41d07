"""Optimiser, schedule and early stopping (octa3d.optim)."""

import pytest
import torch

from octa3d import optim
from octa3d.config import Config


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_fused_when_possible_same_update(name, monkeypatch):
    cfg = Config()
    cfg.train.optimizer = name
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 2)
    b = torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    opt_a = optim.build_optimizer(a.parameters(), cfg)
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
    fallback = optim.build_optimizer((p for p in torch.nn.Linear(2, 2).parameters()), cfg)
    assert isinstance(fallback, NoFused) and not fallback.defaults.get("fused")
    assert len(fallback.param_groups[0]["params"]) == 2  # a generator is read once, not exhausted by the retry


def test_early_stopping():
    es = optim.EarlyStopping(mode="max", patience=2)
    assert es.update(0.5, 0) and not es.update(0.4, 1) and not es.should_stop
    assert not es.update(0.5, 2) and es.should_stop and es.best_epoch == 0
    es2 = optim.EarlyStopping()
    es2.load_state_dict(es.state_dict())
    assert es2.state_dict() == es.state_dict()
    assert not optim.EarlyStopping(patience=0, bad_epochs=100).should_stop


def test_scheduler_warmup_then_cosine():
    cfg = Config()
    cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.lr = 4, 1, 1.0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sch = optim.build_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < 0.1


def test_a_tie_on_a_saturated_metric_is_won_by_a_lower_validation_loss():
    """16 validation eyes saturate balanced accuracy early: ties with a lower loss keep improving best.pt and
    keep early stopping from ending an under-fitted run."""
    es = optim.EarlyStopping(mode="max", patience=2)
    assert es.update(1.0, 0, tie_break=0.9)
    assert es.update(1.0, 1, tie_break=0.5) and es.best_epoch == 1 and es.bad_epochs == 0
    assert not es.update(1.0, 2, tie_break=0.6) and es.bad_epochs == 1  # tie, higher loss: not better
    assert not es.update(0.9, 3, tie_break=0.1) and es.should_stop  # lower metric: the loss does not matter
    assert not es.update(float("nan"), 4, tie_break=0.0)
    assert es.best == 1.0 and es.best_tie == 0.5
    plain = optim.EarlyStopping(mode="max", patience=2)  # no tie-break value (e.g. monitoring the loss itself)
    assert plain.update(1.0, 0) and not plain.update(1.0, 1)
    restored = optim.EarlyStopping()
    restored.load_state_dict(es.state_dict())
    assert restored.best_tie == 0.5 and not restored.update(1.0, 5, tie_break=0.7)
