"""Optimiser, schedule and early stopping (octa3d.training.optim)."""

import pytest
import torch

from octa3d.config import Config
from octa3d.training import optim


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
    # a lower metric with the lowest loss so far: not the best, but progress, so patience starts again
    assert not es.update(0.9, 3, tie_break=0.1) and es.bad_epochs == 0 and es.best_epoch == 1
    assert not es.update(0.9, 4, tie_break=0.2) and not es.update(float("nan"), 5, tie_break=0.3)
    assert es.should_stop and es.best == 1.0 and es.best_tie == 0.5
    plain = optim.EarlyStopping(mode="max", patience=2)  # no tie-break value (e.g. monitoring the loss itself)
    assert plain.update(1.0, 0) and not plain.update(1.0, 1)
    restored = optim.EarlyStopping()
    restored.load_state_dict(es.state_dict())
    assert restored.best_tie == 0.5 and not restored.update(1.0, 6, tie_break=0.7)


def test_early_stopping_is_armed_once_the_training_loss_leaves_chance():
    es = optim.EarlyStopping(mode="max", patience=1, arm_below=0.6)
    assert es.update(1.0, 0, tie_break=0.7, train_loss=0.69)  # a lucky score at chance is best for now ...
    for epoch in (1, 2, 3):  # ... but patience does not count while the training loss sits at chance
        assert not es.update(0.5, epoch, tie_break=0.7, train_loss=0.69) and not es.should_stop
    assert not es.armed and es.best_epoch == 0
    assert es.update(0.6, 4, tie_break=0.7, train_loss=0.5) and es.armed_epoch == 4  # the plateau drops out
    assert es.best == 0.6 and not es.update(0.6, 5, tie_break=0.8, train_loss=0.4) and es.should_stop
    restored = optim.EarlyStopping(arm_below=0.6)
    restored.load_state_dict(es.state_dict())
    assert restored.state_dict() == es.state_dict()
    legacy = optim.EarlyStopping(arm_below=0.6)  # a last.pt from before arming existed: counts from the start
    legacy.load_state_dict({"mode": "max", "patience": 1, "best": 0.5, "best_epoch": 0, "bad_epochs": 0})
    assert legacy.armed and not legacy.update(0.5, 1, train_loss=0.69) and legacy.should_stop


def test_chance_loss_is_the_loss_of_uniform_probabilities():
    import math

    labels = [0, 0, 0, 1]
    assert optim.chance_loss(torch.nn.CrossEntropyLoss(), labels, 2) == pytest.approx(math.log(2))
    weighted = torch.nn.CrossEntropyLoss(weight=optim.class_weights(labels, 2))
    assert optim.chance_loss(weighted, labels, 2) == pytest.approx(math.log(2))
    assert optim.chance_loss(torch.nn.CrossEntropyLoss(), [0, 1, 2, 3], 4) == pytest.approx(math.log(4))
    focal = optim.FocalLoss()  # (1 - 1/K)^2 ln K
    assert optim.chance_loss(focal, labels, 2) == pytest.approx(0.25 * math.log(2))


def test_layer_decay_learning_rates_resnet_and_vit():
    """--layer-decay: deepest layers get lr * decay^depth; the scheduler scales every group by the same factor."""
    from octa3d.model import create_model

    cfg = Config()
    cfg.train.lr, cfg.train.layer_decay, cfg.train.epochs, cfg.train.warmup_epochs = 1e-3, 0.5, 2, 0
    res = create_model("resnet18", 2, 1, 2)
    opt = optim.build_optimizer(res.parameters(), cfg, model=res, model_name="resnet18")
    by_module = {}
    for g in opt.param_groups:
        for p in g["params"]:
            name = next(n for n, q in res.named_parameters() if q is p)
            by_module.setdefault(name.split(".")[0], set()).add(g["lr"])
    want = {"conv1": 1e-3 / 32, "bn1": 1e-3 / 32, "layer1": 1e-3 / 16, "layer2": 1e-3 / 8, "layer3": 1e-3 / 4,
            "layer4": 1e-3 / 2, "fc": 1e-3}
    assert {k: v.pop() for k, v in by_module.items() if len(v) == 1} == pytest.approx(want)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(res.parameters()))
    sched = optim.build_scheduler(opt, cfg, steps_per_epoch=4)
    opt.step()
    sched.step()
    ratios = {g["lr"] / g["initial_lr"] for g in opt.param_groups}
    assert len({round(r, 12) for r in ratios}) == 1  # one schedule factor for every group

    vit = create_model("vit", 2, 1, 2, input_size=16, patch_size=8, num_layers=2, hidden_size=32, num_heads=4,
                       mlp_dim=64)
    opt = optim.build_optimizer(vit.parameters(), cfg, model=vit, model_name="vit")
    lr_of = {n: g["lr"] for g in opt.param_groups for n, p in vit.named_parameters()
             if any(p is q for q in g["params"])}
    assert lr_of["cls_token"] == lr_of["patch_embedding.position_embeddings"] == pytest.approx(1e-3 / 8)
    assert lr_of["blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 / 4)
    assert lr_of["blocks.1.mlp.linear1.weight"] == pytest.approx(1e-3 / 2)
    assert lr_of["norm.weight"] == lr_of["classification_head.weight"] == pytest.approx(1e-3)
    # off (1.0) or no model: one group at --lr, as before
    cfg.train.layer_decay = 1.0
    assert len(optim.build_optimizer(vit.parameters(), cfg, model=vit, model_name="vit").param_groups) == 1
