"""The fit loop (octa3d.training.fit) on its own: best/last checkpoints and history, early stopping, an exact
``--resume``, and the configuration a resumed run continues with."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from octa3d.checkpoint.io import load_checkpoint, model_record
from octa3d.checkpoint.settings import merge_recorded_config
from octa3d.cli import parse_config
from octa3d.config import to_dict
from octa3d.errors import ConfigError
from octa3d.training.epoch import StopTraining
from octa3d.training.fit import FitSpec, config_to_resume, fit


class _Loader(list):
    """Batches with the sampler stand-in fit reads (``set_epoch``)."""

    class _Sampler:
        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

    sampler = _Sampler()


def _loader(n: int = 4) -> _Loader:
    g = torch.Generator().manual_seed(0)
    out = _Loader()
    for i in range(n):
        y = torch.tensor([0, 1])
        x = torch.randn(2, 1, 4, 4, 4, generator=g) + 2.0 * y.view(-1, 1, 1, 1, 1)  # separable classes
        out.append({"image": x, "label": y, "subject": [f"s{2 * i}", f"s{2 * i + 1}"]})
    return out


def _cfg(tmp_path, *flags: str):
    return parse_config(["--mode", "train", "--runs-dir", str(tmp_path), "--exp", "e", "--lr", "0.05",
                         "--warmup-epochs", "0", "--optimizer", "sgd", *flags])[0]


def _spec(cfg, scores: list[float] | None = None, chance_loss: float | None = None) -> FitSpec:
    """A linear model on separable blobs; with ``scores`` the validation AUCs are scripted and the validation loss
    is flat (a falling validation loss is progress that resets patience)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    seen = iter(scores or [])

    def validate(net):
        with torch.no_grad():
            loss = float(F.cross_entropy(net(torch.cat([b["image"] for b in _loader()])),
                                         torch.cat([b["label"] for b in _loader()])))
        return {"val_loss": 1.0 if scores else loss, "auc": next(seen, 0.5)}

    return FitSpec(model=model, loss_fn=F.cross_entropy, validate=validate, monitor="auc", mode="max",
                   record=model_record(cfg, ["NORMAL", "DR"], "classifier"), chance_loss=chance_loss)


def test_fit_writes_best_last_and_history_and_stops_early(tmp_path):
    cfg = _cfg(tmp_path, "--epochs", "10", "--patience", "2")
    out = tmp_path / "e" / "train"
    result = fit(_spec(cfg, [0.6, 0.9, 0.8, 0.85, 0.7]), cfg, _loader(), out, torch.device("cpu"))
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4] and result.epochs_run == 4  # no gain for 2 epochs after 2
    assert result.best["epoch"] == 2 and result.best["auc"] == 0.9
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    best, last = load_checkpoint(out / "checkpoints" / "best.pt"), load_checkpoint(out / "checkpoints" / "last.pt")
    assert best["epoch"] == 2 and "optimizer" not in best  # weights + record only
    assert last["epoch"] == 4 and last["finished"] and "optimizer" in last and "early_stopping" in last


def test_a_run_that_has_not_left_chance_is_not_stopped_and_its_plateau_does_not_stay_best(tmp_path):
    """Patience counts from the first epoch whose training loss is below 0.9 x the chance loss; the epochs before
    it cannot remain best.pt (a lucky validation score at chance)."""
    cfg = _cfg(tmp_path, "--epochs", "6", "--patience", "2")
    scores = [0.9, 0.5, 0.5, 0.5, 0.5, 0.5]
    never = fit(_spec(cfg, scores, chance_loss=0.0), cfg, _loader(), tmp_path / "never", torch.device("cpu"))
    assert never.epochs_run == 6 and not never.stopped_early and never.best["epoch"] == 1
    from_start = fit(_spec(cfg, scores, chance_loss=100.0), cfg, _loader(), tmp_path / "start", torch.device("cpu"))
    assert from_start.epochs_run == 3 and from_start.stopped_early and from_start.best["epoch"] == 1
    # the same run (same seed) leaving chance at epoch 3: epochs 1-2 drop out, patience counts from epoch 3
    losses = pd.read_csv(tmp_path / "never" / "history.csv")["train_loss"].tolist()
    assert losses[0] > losses[1] > losses[2]
    chance = (losses[1] + losses[2]) / 2 / 0.9
    late = fit(_spec(cfg, scores, chance_loss=chance), cfg, _loader(), tmp_path / "late", torch.device("cpu"))
    assert late.best["epoch"] == 3 and late.best["auc"] == 0.5 and late.stopped_early and late.epochs_run == 5
    ck = load_checkpoint(tmp_path / "late" / "checkpoints" / "last.pt")
    assert ck["early_stopping"]["armed_epoch"] == 2  # 0-based


def test_resume_continues_bit_exactly(tmp_path):
    """A run stopped mid-epoch (--max-steps, as a kill would) and resumed equals the run in one go: last.pt holds
    the last finished epoch with optimiser, schedule and RNG state."""
    whole = _cfg(tmp_path / "a", "--epochs", "4", "--patience", "0")
    fit(_spec(whole), whole, _loader(), tmp_path / "a" / "out", torch.device("cpu"))
    cut = _cfg(tmp_path / "b", "--epochs", "4", "--patience", "0", "--max-steps", "6")  # 4 steps per epoch
    with pytest.raises(StopTraining):
        fit(_spec(cut), cut, _loader(), tmp_path / "b" / "out", torch.device("cpu"))
    assert load_checkpoint(tmp_path / "b" / "out" / "checkpoints" / "last.pt")["epoch"] == 1
    more = _cfg(tmp_path / "b", "--epochs", "4", "--patience", "0", "--resume")
    fit(_spec(more), more, _loader(), tmp_path / "b" / "out", torch.device("cpu"))
    a = load_checkpoint(tmp_path / "a" / "out" / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "out" / "checkpoints" / "last.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ha, hb = (pd.read_csv(tmp_path / d / "out" / "history.csv") for d in "ab")
    pd.testing.assert_series_equal(ha["train_loss"], hb["train_loss"])


def test_the_resumed_configuration_is_the_recorded_one_and_changes_are_refused():
    recorded = to_dict(parse_config(["--mode", "train", "--exp", "e", "--lr", "0.01", "--epochs", "5"])[0])
    again = parse_config(["--mode", "train", "--exp", "e", "--resume", "--epochs", "8", "--num-workers", "2"])[0]
    cfg = merge_recorded_config(again, recorded, "config.yaml")
    assert cfg.train.lr == 0.01  # the recorded learning rate, although this invocation did not repeat it
    assert cfg.train.epochs == 8 and cfg.run.num_workers == 2  # more epochs and how it runs: this invocation's
    changed = parse_config(["--mode", "train", "--exp", "e", "--resume", "--lr", "0.1"])[0]
    with pytest.raises(ConfigError, match="--lr"):
        merge_recorded_config(changed, recorded, "config.yaml")


def test_config_to_resume_refuses_more_epochs_after_early_stopping(tmp_path):
    cfg = _cfg(tmp_path, "--epochs", "10", "--patience", "1")
    out = tmp_path / "e" / "train"
    out.mkdir(parents=True)
    fit(_spec(cfg, [0.9, 0.5, 0.5]), cfg, _loader(), out, torch.device("cpu"))
    again = _cfg(tmp_path, "--epochs", "20", "--patience", "1", "--resume")
    with pytest.raises(ConfigError, match="ended by early stopping"):
        config_to_resume(again, "train")
