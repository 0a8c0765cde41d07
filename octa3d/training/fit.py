"""The epoch loop shared by ``--mode ae_pretrain`` and ``--mode train``: :func:`fit` trains a model for
``--epochs`` with validation every epoch, ``best.pt`` on the monitored metric, ``last.pt`` for exact ``--resume``
(written in the background while the next epoch trains), early stopping, history.csv and TensorBoard. What differs
between the stages (loss target, validation, freeze schedules, extra TensorBoard content) comes in a
:class:`FitSpec`; one epoch is :func:`octa3d.training.epoch.train_one_epoch`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from octa3d.checkpoint.io import CheckpointWriter, load_checkpoint, save_checkpoint
from octa3d.checkpoint.settings import merge_recorded_config
from octa3d.config import Config
from octa3d.errors import ConfigError
from octa3d.training.epoch import StepPolicy, train_one_epoch
from octa3d.training.optim import LEFT_CHANCE, EarlyStopping, build_optimizer, build_scheduler
from octa3d.training.precision import Precision, wrap
from octa3d.utils.runs import last_checkpoints, resume_folder
from octa3d.utils.seed import set_rng_state
from octa3d.utils.tracking import History, tensorboard_writer

log = logging.getLogger("octa3d.training.fit")


@dataclass
class FitSpec:
    """What differs between the stages that train with :func:`fit`.

    Attributes:
        model: the bare model (on its device, in its memory format).
        loss_fn: training loss, ``loss_fn(output.float(), target)``.
        target: ``"label"`` or ``"input"`` (see :func:`train_one_epoch`).
        validate: ``validate(net) -> metrics`` on the validation subjects (must hold ``monitor``).
        monitor: the metric that picks ``best.pt`` and drives early stopping; ``mode``: "max" or "min".
        record: the checkpoint record (:func:`octa3d.checkpoint.io.model_record`).
        kind_label: the stage's word in logs and progress bars (``"epoch"``, ``"ae epoch"``).
        prepare_epoch: ``prepare_epoch(epoch) -> net`` (freeze schedules; default: wrap once).
        epoch_end: ``epoch_end(epoch, metrics, last_batch, tb)`` for stage-specific TensorBoard content.
        extra_record: entries added to every checkpoint at save time (e.g. the encoder's weights).
        log_line: ``log_line(row) -> str`` for the per-epoch log.
        row_extra: ``row_extra() -> dict`` of stage-specific history columns (e.g. whether the encoder was frozen).
        params: the parameters to optimise and clip (default: all of ``model``).
        chance_loss: the training loss at chance (:func:`octa3d.training.optim.chance_loss`); early stopping
            counts only once the training loss is below :data:`~octa3d.training.optim.LEFT_CHANCE` x it
            (None: from the first epoch, e.g. autoencoders).
    """

    model: torch.nn.Module
    loss_fn: Callable
    validate: Callable[[torch.nn.Module], dict[str, float]]
    monitor: str
    mode: str
    record: dict[str, Any]
    target: str = "label"
    kind_label: str = "epoch"
    prepare_epoch: Callable[[int], torch.nn.Module] | None = None
    epoch_end: Callable[[int, dict[str, float], torch.Tensor | None, Any], None] | None = None
    extra_record: Callable[[], dict[str, Any]] | None = None
    log_line: Callable[[dict[str, Any]], str] | None = None
    row_extra: Callable[[], dict[str, Any]] | None = None
    params: list[torch.Tensor] = field(default_factory=list)
    chance_loss: float | None = None


@dataclass
class FitResult:
    """What :func:`fit` reports: the best epoch's metrics (with ``epoch``), how many epochs have run, the history
    rows and whether early stopping ended the run."""

    best: dict[str, Any]
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


@dataclass
class FitState:
    """The mutable training state that ``last.pt`` saves and ``--resume`` restores."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    early: EarlyStopping
    history: History
    first_epoch: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    finished: bool = False


def config_to_resume(cfg: Config, stage: str) -> Config:
    """``--resume``: the configuration of the run it continues (see
    :func:`octa3d.checkpoint.settings.merge_recorded_config`), checked before anything is written.

    The recorded settings are the resumed folder's ``config.yaml`` (else its ``last.pt``'s). More ``--epochs``
    are refused for a run that early stopping ended (they would not train).

    Raises:
        ConfigError: options that change the run, or more epochs after early stopping.
    """
    folder = resume_folder(cfg, stage) if cfg.train.resume else None
    if folder is None:
        return cfg
    lasts = last_checkpoints(folder)
    record = folder / "config.yaml"
    try:
        doc, where = yaml.safe_load(record.read_text(encoding="utf-8")), record
    except (OSError, yaml.YAMLError):
        doc, where = load_checkpoint(lasts[0]).get("config"), lasts[0]
    if not isinstance(doc, dict):
        log.warning("--resume: no recorded settings in %s; the settings of this invocation are used", folder)
        return cfg
    ecfg = merge_recorded_config(cfg, doc, str(where))
    for last in lasts:
        ck = load_checkpoint(last)
        early = ck.get("early_stopping") or {}
        stopped = early.get("patience", 0) > 0 and early.get("bad_epochs", 0) >= early.get("patience", 0)
        if ck.get("finished") and stopped and ecfg.train.epochs > int(ck["epoch"]):
            raise ConfigError(f"--epochs {ecfg.train.epochs}: the run in {folder} was ended by early stopping after "
                              f"epoch {ck['epoch']} ({last}), so more epochs would not train; start a new run with "
                              f"--overwrite or another --exp")
    return ecfg


def _schedule_epochs(ck: dict[str, Any] | None, cfg: Config) -> int:
    """The learning-rate schedule's horizon: the epochs the run was started with (a resumed run with more
    ``--epochs`` keeps it, so its first epochs are unchanged and the extra ones train at the final rate)."""
    if ck is None:
        return cfg.train.epochs
    if ck.get("schedule_epochs"):
        return int(ck["schedule_epochs"])
    saved = (ck.get("config") or {}).get("train") or {}
    return int(saved.get("epochs") or cfg.train.epochs)


def _resume(spec: FitSpec, state: FitState, out: Path, ck: dict[str, Any]) -> None:
    """Restore ``state`` from ``ck`` (``out/checkpoints/last.pt``) and the best epoch's metrics from best.pt."""
    kind = spec.record["kind"]
    spec.model.load_state_dict(ck["state_dict"])
    state.optimizer.load_state_dict(ck["optimizer"])
    state.scheduler.load_state_dict(ck["scheduler"])
    if state.precision.scaler is not None and "scaler" in ck:
        state.precision.scaler.load_state_dict(ck["scaler"])
    state.early.load_state_dict(ck["early_stopping"])
    set_rng_state(ck["rng"])
    state.first_epoch = int(ck["epoch"])
    state.finished = bool(ck.get("finished"))
    state.history.load()
    best_file = out / "checkpoints" / "best.pt"
    if best_file.exists():
        bk = load_checkpoint(best_file, kind=kind)
        state.best_metrics = dict(bk["metrics"], epoch=bk["epoch"])


def fit(spec: FitSpec, cfg: Config, train_loader: Any, out: Path, device: torch.device, name: str = ""
        ) -> FitResult:
    """Train ``spec.model`` for ``--epochs`` (or until early stopping), validating every epoch.

    Writes ``out/checkpoints/best.pt`` (weights + record, on ``spec.monitor``), ``out/checkpoints/last.pt``
    (everything ``--resume`` needs, in the background while the next epoch trains), ``out/history.csv`` and
    ``out/tensorboard/``. With ``--resume`` and an existing ``last.pt`` it continues from there bit-exactly.

    Returns:
        The best epoch's metrics and the number of epochs run (including resumed ones).

    Raises:
        StopTraining: ``--max-steps`` reached (``last.pt`` holds the last finished epoch).
    """
    params = spec.params or list(spec.model.parameters())
    classifier = spec.record.get("kind") == "classifier"  # --layer-decay: fine-tuning a classifier only
    optimizer = build_optimizer(params, cfg, model=spec.model if classifier else None,
                                model_name=spec.record.get("model_name"))
    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.train.accum_steps))
    last_ckpt = out / "checkpoints" / "last.pt"
    ck = load_checkpoint(last_ckpt, kind=spec.record["kind"]) if cfg.train.resume and last_ckpt.exists() else None
    horizon = _schedule_epochs(ck, cfg)
    sched_cfg = cfg
    if horizon != cfg.train.epochs:
        sched_cfg = copy.deepcopy(cfg)
        sched_cfg.train.epochs = horizon
    state = FitState(optimizer, build_scheduler(optimizer, sched_cfg, steps_per_epoch),
                     Precision.for_device(device, cfg.train.amp),
                     EarlyStopping(mode=spec.mode, patience=cfg.train.patience,
                                   arm_below=None if spec.chance_loss is None else LEFT_CHANCE * spec.chance_loss),
                     History(out / "history.csv"))
    if ck is not None:
        _resume(spec, state, out, ck)
        if state.finished and (state.first_epoch >= cfg.train.epochs or state.early.should_stop):
            log.info("%s already finished (epoch %d); nothing to resume", name or out, state.first_epoch)
            return FitResult(state.best_metrics, state.first_epoch, state.history.rows, state.early.should_stop)
        log.info("Resuming %s from %s after epoch %d", name or out, last_ckpt, state.first_epoch)
        if cfg.train.epochs > horizon:
            log.info("--epochs %d: training continues past the %d-epoch learning-rate schedule; epochs %d-%d train "
                     "at its final rate (1 %% of --lr)", cfg.train.epochs, horizon, max(horizon, state.first_epoch) + 1,
                     cfg.train.epochs)
    elif cfg.train.resume:
        log.warning("--resume: no %s yet; starting %s from scratch", last_ckpt, name or out)
    tb = tensorboard_writer(out / "tensorboard")
    try:
        with CheckpointWriter() as writer:  # the next epoch trains while last.pt reaches the disk
            _epochs(spec, state, cfg, train_loader, out, params, tb, writer, steps_per_epoch, horizon)
    finally:
        tb.close()
    return FitResult(state.best_metrics, len(state.history.rows), state.history.rows, state.early.should_stop)


def _epochs(spec: FitSpec, state: FitState, cfg: Config, train_loader: Any, out: Path, params: list[torch.Tensor],
            tb: Any, writer: CheckpointWriter, steps_per_epoch: int, horizon: int) -> None:
    """The epoch loop of :func:`fit`."""
    policy = StepPolicy.from_config(cfg)
    step = state.first_epoch * steps_per_epoch
    net = None
    last_ckpt = out / "checkpoints" / "last.pt"
    for epoch in range(state.first_epoch, cfg.train.epochs):
        if spec.prepare_epoch is not None:
            net = spec.prepare_epoch(epoch)
        elif net is None:
            net = wrap(spec.model, cfg, state.precision.device)
        train_loader.sampler.set_epoch(epoch)  # order + augmentation = f(seed, epoch): exact resume
        if spec.prepare_epoch is None:
            net.train()
        t0 = time.perf_counter()
        train_loss, train_acc, step, x = train_one_epoch(
            net, train_loader, spec.loss_fn, state.optimizer, state.scheduler, state.precision, params, policy,
            step=step, desc=f"{spec.kind_label} {epoch + 1}/{cfg.train.epochs}", target=spec.target,
            last_ckpt=last_ckpt, tb=tb)
        metrics = spec.validate(net)
        value = {"train_loss": train_loss, **metrics}[spec.monitor]
        if math.isnan(value):
            value = -math.inf if spec.mode == "max" else math.inf
        tie = metrics.get("val_loss") if spec.monitor != "val_loss" else None
        was_armed = state.early.armed
        improved = state.early.update(value, epoch, tie_break=tie, train_loss=train_loss)
        if state.early.armed and not was_armed:
            log.info("%s %d: training loss %.4f is below %.2f x the chance loss %.4f; early stopping counts from "
                     "here and earlier epochs no longer compete for best.pt", spec.kind_label, epoch + 1,
                     train_loss, LEFT_CHANCE, spec.chance_loss)
        lr = max(g["lr"] for g in state.optimizer.param_groups)  # the head's rate under --layer-decay
        row = {"epoch": epoch + 1, "train_loss": train_loss}
        if spec.target == "label":
            row["train_accuracy"] = train_acc
        row.update({**metrics, "lr": lr, **(spec.row_extra() if spec.row_extra else {}),
                    "seconds": time.perf_counter() - t0})
        state.history.append(row)
        tb.add_scalar("loss/train", train_loss, epoch + 1)
        if spec.target == "label":
            tb.add_scalar("accuracy/train", train_acc, epoch + 1)
        tb.add_scalar("lr", lr, epoch + 1)
        if spec.epoch_end is not None:
            spec.epoch_end(epoch, metrics, x, tb)
        stop = state.early.should_stop or epoch + 1 == cfg.train.epochs
        record = {**spec.record, **(spec.extra_record() if spec.extra_record else {})}
        ck = dict(epoch=epoch + 1, early=state.early, metrics=metrics, config=cfg, writer=writer)
        if improved:
            state.best_metrics = dict(metrics, epoch=epoch + 1)
            # weights and record only: test/explain/compress read best.pt, --resume reads last.pt
            save_checkpoint(out / "checkpoints" / "best.pt", spec.model, record, **ck)
        save_checkpoint(last_ckpt, spec.model, {**record, "finished": stop, "schedule_epochs": horizon},
                        optimizer=state.optimizer,
                        scheduler=state.scheduler, precision=state.precision, **ck)
        text = spec.log_line(row) if spec.log_line else f"loss {train_loss:.4f}"
        log.info("%s %d/%d  %s%s  %.1fs", spec.kind_label, epoch + 1, cfg.train.epochs, text,
                 " *" if improved else "", row["seconds"])
        if state.early.should_stop:
            what = spec.monitor if spec.monitor in ("val_loss", "train_loss") else f"{spec.monitor} or val_loss"
            log.info("Early stopping: no improvement of %s for %d epochs", what, cfg.train.patience)
            break
