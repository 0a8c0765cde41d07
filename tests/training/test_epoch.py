"""The shared loops (octa3d.training): precision policy, accumulation, clipping, step limit, non-finite losses,
reconstruction target."""

import math

import pytest
import torch

from octa3d.errors import DataError
from octa3d.training.epoch import StepPolicy, StopTraining, train_one_epoch
from octa3d.training.precision import Precision


def test_precision_is_fp32_on_cpu():
    prec = Precision.for_device(torch.device("cpu"), enabled=True)
    assert prec.dtype is None and prec.scaler is None


class _Loader(list):
    """A list of batches with a sampler stand-in (what train_one_epoch reads of a DataLoader)."""


def _batches(n: int, seed: int = 0) -> _Loader:
    g = torch.Generator().manual_seed(seed)
    return _Loader({"image": torch.randn(2, 1, 4, 4, 4, generator=g), "label": torch.tensor([0, 1]),
                    "subject": [f"s{2 * i}", f"s{2 * i + 1}"]} for i in range(n))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))


def _epoch(model, loader, policy, target="label", loss_fn=None):
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    prec = Precision.for_device(torch.device("cpu"), enabled=False)
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    return train_one_epoch(model, loader, loss_fn, opt, None, prec, params, policy, step=0, desc="epoch 1/1",
                                  target=target)


def test_accumulation_takes_one_step_per_accum_batches_and_matches_the_big_batch():
    loader = _batches(4)
    a, b = _model(), _model()
    _, _, steps, _ = _epoch(a, loader, StepPolicy(accum_steps=2))
    assert steps == 2
    # the same update as two optimiser steps over the concatenated pairs of batches
    big = _Loader({"image": torch.cat([loader[i]["image"], loader[i + 1]["image"]]),
                   "label": torch.cat([loader[i]["label"], loader[i + 1]["label"]]),
                   "subject": loader[i]["subject"] + loader[i + 1]["subject"]} for i in (0, 2))
    _epoch(b, big, StepPolicy(accum_steps=1))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_clipping_bounds_the_update():
    loader = _batches(1)
    big_loss = lambda out, y: 1e4 * torch.nn.functional.cross_entropy(out, y)  # noqa: E731
    free, clipped = _model(), _model()
    w0 = clipped[1].weight.detach().clone()
    _epoch(free, loader, StepPolicy(), loss_fn=big_loss)
    _epoch(clipped, loader, StepPolicy(clip_grad=1.0), loss_fn=big_loss)
    step_free = (free[1].weight - w0).norm()
    step_clipped = torch.cat([(p - q).flatten() for p, q in zip(clipped.parameters(), _model().parameters())]).norm()
    assert step_clipped <= 0.1 * 1.0 + 1e-6 < step_free  # lr x max norm


def test_max_steps_stops_after_that_many_optimiser_steps():
    with pytest.raises(StopTraining) as stop:
        _epoch(_model(), _batches(5), StepPolicy(max_steps=3))
    assert stop.value.step == 3


def test_non_finite_loss_names_step_and_subjects():
    nan_loss = lambda out, y: out.sum() * float("nan")  # noqa: E731
    with pytest.raises(DataError, match=r"loss became nan at epoch 1, step 0 \(subjects s0, s1\)"):
        _epoch(_model(), _batches(2), StepPolicy(), loss_fn=nan_loss)


def test_reconstruction_target_is_the_input_and_has_no_accuracy():
    ae = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1))
    loss, acc, steps, _ = _epoch(ae, _batches(3), StepPolicy(), target="input",
                                 loss_fn=torch.nn.functional.mse_loss)
    assert steps == 3 and math.isnan(acc) and loss > 0
