"""``--mode train``: supervised binary / multi-class training on the experiment's train split.

Per fold (``--folds K`` → ``train/fold-k/``): class-weighted cross-entropy, AdamW with warm-up + cosine schedule,
validation every epoch (accuracy, balanced accuracy, ROC-AUC from probabilities, macro-F1; 2D patches aggregated
per subject), ``best.pt`` (weights) on ``--monitor``, ``last.pt`` (weights + optimiser/scheduler/RNG state for
``--resume``) every epoch, written in the background while the next epoch trains, early stopping, history.csv,
TensorBoard.
The encoder starts from this experiment's autoencoder (``--init ae``/``auto``) or ``--init-from`` weights.
Validation scores are reported for every fold (mean ± sd); nothing is retrained until a score is reached and no
fold is picked on test data.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d import engine
from octa3d.config import Config
from octa3d.data.splits import guard
from octa3d.engine import EarlyStopping, History, Precision
from octa3d.errors import ConfigError, DataError, Octa3dError
from octa3d.metrics import HIGHER_IS_BETTER, classification_metrics, confusion
from octa3d.utils import dist
from octa3d.utils.io import atomic_write_text
from octa3d.utils.runs import stage_dir

log = logging.getLogger("octa3d.train")

STAGE = "train"


def class_weights(labels: list[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (K * n_c)`` from the training split.

    Raises:
        DataError: a class has no training subject.
    """
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes)
    if (counts == 0).any():
        raise DataError(f"class index(es) {np.flatnonzero(counts == 0).tolist()} have no training samples; "
                        f"add data, change --classes, or re-split")
    return torch.tensor(counts.sum() / (n_classes * counts), dtype=torch.float32)


def initialise(model: torch.nn.Module, cfg: Config, fold_suffix: str) -> str:
    """Apply ``--init-from`` and ``--init`` to a fresh classifier; returns a description of the start point."""
    from octa3d.model import load_init_weights, transfer_encoder

    desc = "random"
    if cfg.train.init_from:
        loaded, skipped = load_init_weights(model, cfg.train.init_from)
        desc = f"--init-from {cfg.train.init_from} ({len(loaded)} tensors)"
    ae_ckpt = cfg.run_dir / "ae_pretrain" / fold_suffix / "checkpoints" / "best.pt"
    if cfg.train.init == "ae" or (cfg.train.init == "auto" and ae_ckpt.exists()):
        if not ae_ckpt.exists():
            raise ConfigError(f"--init ae: no autoencoder checkpoint at {ae_ckpt}; run --mode ae_pretrain first "
                              f"(same --exp) or use --init random")
        ckpt = engine.load_checkpoint(ae_ckpt, kind="autoencoder")
        if (ckpt["model_name"], ckpt["dim"], ckpt["in_channels"]) != (cfg.model.model, cfg.model.dim,
                                                                       cfg.in_channels):
            raise ConfigError(f"{ae_ckpt} was pretrained for --model {ckpt['model_name']} --dim {ckpt['dim']} with "
                              f"{ckpt['in_channels']} channel(s); this run is --model {cfg.model.model} --dim "
                              f"{cfg.model.dim} with {cfg.in_channels}. Use the same settings or --init random")
        report = transfer_encoder(ckpt["encoder_state_dict"], model, cfg.model.model)
        log.info("Encoder initialised from %s: %d tensors copied, %d not copied (head: %s)", ae_ckpt,
                 len(report.copied), len(report.not_copied), ", ".join(report.not_copied[:6]))
        desc = f"ae ({ae_ckpt}, {len(report.copied)} tensors)"
    return desc


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, precision: Precision, loss_fn: Any = None
            ) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    """Subject-level probabilities over a loader, merged across DDP ranks (each subject once).

    Returns:
        (subject IDs, labels (N,), probabilities (N, K), mean loss).
    """
    from octa3d.data.datasets import aggregate_patches

    model.eval()
    rows: dict[tuple[str, int], tuple[int, np.ndarray, float]] = {}
    for batch in engine.progress(loader, desc="val", unit="batch"):
        x = batch["image"].to(precision.device, non_blocking=True)
        y = batch["label"].to(precision.device)
        with precision.autocast():
            logits = model(x)
        logits = logits.float()
        losses = (loss_fn(logits, y) if loss_fn is not None else torch.zeros(len(y))).tolist()
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        for sid, patch, lab, p, ls in zip(batch["subject"], batch["patch"].tolist(), y.tolist(), probs, losses):
            rows[(sid, int(patch))] = (int(lab), p, float(ls))
    merged: dict[tuple[str, int], tuple[int, np.ndarray, float]] = {}
    for part in dist.gather_objects(rows):
        merged.update(part)  # DistributedSampler pads with repeats: keyed merge keeps each sample once
    keys = sorted(merged)
    sids = [k[0] for k in keys]
    probs = np.stack([merged[k][1] for k in keys]) if keys else np.zeros((0, 0))
    label_of = {k[0]: merged[k][0] for k in keys}
    mean_loss = float(np.mean([merged[k][2] for k in keys])) if keys else math.nan
    ids, agg = aggregate_patches(sids, probs)
    return list(ids), np.array([label_of[i] for i in ids]), np.asarray(agg), mean_loss


class FocalLoss(torch.nn.Module):
    """Focal loss (Lin et al. 2017), gamma 2, optional class weights (alpha) and label smoothing."""

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 2.0, label_smoothing: float = 0.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else None)
        self.gamma, self.smoothing, self.reduction = gamma, label_smoothing, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none",
                                               label_smoothing=self.smoothing)
        pt = torch.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
        loss = (1 - pt).pow(self.gamma) * ce
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean() if self.reduction == "mean" else loss


def build_loss(cfg: Config, weights: torch.Tensor, reduction: str = "mean") -> torch.nn.Module:
    """``--loss`` with ``--label-smoothing``; class weights for weighted-ce and focal."""
    t = cfg.train
    if t.loss == "focal":
        return FocalLoss(weights, label_smoothing=t.label_smoothing, reduction=reduction)
    return torch.nn.CrossEntropyLoss(weight=weights if t.loss == "weighted-ce" else None,
                                     label_smoothing=t.label_smoothing, reduction=reduction)


#: Test hook: raise KeyboardInterrupt after this many optimiser steps (simulates a killed run).
STOP_AFTER_STEPS: int | None = None


def _set_trainable(model: torch.nn.Module, cfg: Config, epoch: int) -> bool:
    """Apply the freeze schedule for ``epoch``; returns True while the encoder is frozen."""
    from octa3d.model import freeze_encoder_stages, set_encoder_trainable

    frozen = cfg.train.freeze_encoder or epoch < cfg.train.freeze_epochs
    set_encoder_trainable(model, cfg.model.model, not frozen)
    if not frozen and cfg.train.freeze_encoder_stages:
        freeze_encoder_stages(model, cfg.model.model, cfg.train.freeze_encoder_stages)
    return frozen


def _wrap(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """DDP and/or torch.compile around the model (rebuilt when the set of trainable parameters changes)."""
    net = model
    if dist.is_distributed():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


def _memory_format(cfg: Config) -> torch.memory_format:
    if not cfg.train.channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if cfg.spatial_dims == 3 else torch.channels_last


#: Training steps between reads of the loss back to the host (progress bar, non-finite check, epoch means) on an
#: accelerator, so that no per-step synchronisation stalls its queue. Every step on CPU, where reading costs nothing.
SYNC_EVERY = 10


def train_one_epoch(net: torch.nn.Module, loader: Any, loss_fn: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, precision: Precision, params: list[torch.Tensor], cfg: Config, *, epoch: int,
                    step: int, memory_format: torch.memory_format, last_ckpt: Path
                    ) -> tuple[float, float, int, torch.Tensor | None]:
    """One pass over ``loader``: forward, loss, backward, optimiser + scheduler step every ``--accum-steps`` batches.

    Args:
        net: the (possibly DDP/compiled) model, already in train mode.
        loader: training loader (its sampler's epoch already set).
        loss_fn: training loss.
        optimizer: optimiser over ``params``.
        scheduler: per-step learning-rate schedule.
        precision: autocast / scaler policy (its device is where batches go).
        params: parameters for gradient clipping.
        cfg: configuration (``--accum-steps``, ``--clip-grad``, ``--epochs``, ``--batch-size``, input shape).
        epoch: 0-based epoch (messages, progress bar).
        step: optimiser steps taken before this epoch.
        memory_format: memory format of the input batches.
        last_ckpt: path named in the non-finite-loss error.

    Returns:
        (mean training loss, training accuracy, optimiser steps after this epoch, last input batch or None).

    Raises:
        DataError: a loss is not finite (epoch, step and the batch's subjects in the message).
    """
    device, accum = precision.device, cfg.train.accum_steps
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    pending: list[tuple[int, torch.Tensor, torch.Tensor, int, list[str]]] = []  # not yet read back
    total, correct, count = 0.0, 0, 0
    x = None
    bar = engine.progress(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch")
    for i, batch in enumerate(bar):
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = batch["label"].to(device, non_blocking=True)
        last_in_epoch = i + 1 == len(loader)
        try:
            with precision.autocast():
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            pending.append((step, loss.detach(), (logits.argmax(1) == y).sum(), len(y), list(batch["subject"])))
            if len(pending) >= sync_every or last_in_epoch:  # the one host synchronisation
                losses = torch.stack([p[1] for p in pending]).tolist()
                hits = torch.stack([p[2] for p in pending]).tolist()
                for (at, _, _, n, subjects), value, h in zip(pending, losses, hits):
                    if not math.isfinite(value):
                        raise DataError(f"train: loss became {value} at epoch {epoch + 1}, step {at} (subjects "
                                        f"{', '.join(subjects)}); {last_ckpt} holds the previous epoch. Lower "
                                        f"--lr, use --clip-grad, or check these scans")
                    total, correct, count = total + value * n, correct + int(h), count + n
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                pending = []
            precision.backward(loss / accum)
        except torch.OutOfMemoryError as exc:
            raise Octa3dError(f"out of GPU memory at batch size {cfg.train.batch_size}, input "
                              f"{cfg.input_shape}: use a smaller --batch-size or --input-size, or keep the "
                              f"effective batch with --accum-steps") from exc
        if (i + 1) % accum == 0 or last_in_epoch:
            precision.step(optimizer, params, cfg.train.clip_grad)
            scheduler.step()
            step += 1
            if STOP_AFTER_STEPS is not None and step >= STOP_AFTER_STEPS:
                raise KeyboardInterrupt(f"test hook: stopped after {step} steps")
    return total / max(1, count), correct / max(1, count), step, x


def train_fold(cfg: Config, ctx: engine.StageContext, out: Path, fold: int) -> dict[str, Any]:
    """Train one classifier on fold ``fold`` (or resume it); returns the best validation metrics."""
    from octa3d.data.datasets import DataHandler
    from octa3d.model import check_input_size, create_model, get_spec

    sp = ctx.splits
    tr_ids, va_ids = sp.fold(fold)
    guard(STAGE, tr_ids + va_ids, sp)
    if not va_ids:
        raise ConfigError("--mode train needs validation subjects (--val-fraction > 0 or --folds > 1)")
    names = list(sp.class_names)
    check_input_size(cfg.model.model, cfg.input_shape)
    weights = class_weights([sp.labels[i] for i in tr_ids], len(names)).to(ctx.device)
    handler = DataHandler(cfg, ctx.label_map)
    train_subs, val_subs = ctx.pick(tr_ids), ctx.pick(va_ids)
    handler.warm(train_subs + val_subs)
    train_loader = handler.loader(train_subs, train=True, batch_size=cfg.train.batch_size)
    val_loader = handler.loader(val_subs, train=False, batch_size=cfg.train.batch_size)

    kw = {"input_size": cfg.input_shape} if cfg.model.model == "vit" else {}
    model = create_model(cfg.model.model, cfg.model.dim, cfg.in_channels, len(names), **kw)
    last_ckpt = out / "checkpoints" / "last.pt"
    resuming = cfg.train.resume and last_ckpt.exists()
    start = "resume" if resuming else initialise(model, cfg, f"fold-{fold}" if sp.n_folds > 1 else "")
    fmt = _memory_format(cfg)
    model.to(ctx.device, memory_format=fmt)
    encoder_modules, _ = get_spec(cfg.model.model).split(model)

    loss_fn = build_loss(cfg, weights)
    val_loss_fn = build_loss(cfg, weights, reduction="none")
    precision = Precision.for_device(ctx.device, cfg.train.amp)
    # Every parameter is in the optimiser from the start (frozen ones simply get no gradient), so the freeze
    # schedule and --resume never change the optimiser's layout.
    params = list(model.parameters())
    optimizer = engine.build_optimizer(params, cfg)
    accum = cfg.train.accum_steps
    steps_per_epoch = max(1, math.ceil(len(train_loader) / accum))
    scheduler = engine.build_scheduler(optimizer, cfg, steps_per_epoch)
    monitor = cfg.train.monitor
    early = EarlyStopping(mode="max" if HIGHER_IS_BETTER[monitor] else "min", patience=cfg.train.patience)
    history = History(out / "history.csv")
    record = engine.model_record(cfg, names, "classifier")
    first_epoch, best_metrics = 0, {}
    if resuming:
        ck = engine.load_checkpoint(last_ckpt, kind="classifier")
        model.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if precision.scaler is not None and "scaler" in ck:
            precision.scaler.load_state_dict(ck["scaler"])
        early.load_state_dict(ck["early_stopping"])
        engine.set_rng_state(ck["rng"])
        first_epoch = int(ck["epoch"])
        history.load()
        best_file = out / "checkpoints" / "best.pt"
        if best_file.exists():
            bk = engine.load_checkpoint(best_file, kind="classifier")
            best_metrics = dict(bk["metrics"], epoch=bk["epoch"])
        if ck.get("finished"):
            log.info("fold %d already finished (epoch %d); nothing to resume", fold, first_epoch)
            return best_metrics
        log.info("Resuming fold %d from %s after epoch %d", fold, last_ckpt, first_epoch)
    elif cfg.train.resume:
        log.warning("--resume: no %s yet; starting fold %d from scratch", last_ckpt, fold)
    tb = engine.tensorboard_writer(out / "tensorboard")
    log.info("train %s fold %d: %d train / %d val subjects, classes %s, start: %s", cfg.model.model, fold,
             len(tr_ids), len(va_ids), names, start)

    step = first_epoch * steps_per_epoch
    frozen_before: bool | None = None
    net = model
    epoch = first_epoch - 1
    # Checkpoints are written in the background: the next epoch trains while last.pt reaches the disk.
    with engine.CheckpointWriter() as writer:
        for epoch in range(first_epoch, cfg.train.epochs):
            frozen = _set_trainable(model, cfg, epoch)
            if frozen != frozen_before:  # DDP registers trainable parameters at construction
                net = _wrap(model, cfg, ctx.device)
                if frozen_before is not None:
                    log.info("epoch %d: encoder unfrozen, training the whole network", epoch + 1)
                frozen_before = frozen
            train_loader.sampler.set_epoch(epoch)  # order + augmentation = f(seed, epoch): exact resume
            net.train()
            if frozen:
                encoder_modules.eval()  # linear probe: frozen BatchNorm statistics stay as pretrained
            t0 = time.perf_counter()
            train_loss, train_acc, step, x = train_one_epoch(
                net, train_loader, loss_fn, optimizer, scheduler, precision, params, cfg, epoch=epoch, step=step,
                memory_format=fmt, last_ckpt=last_ckpt)
            _, y_val, p_val, val_loss = predict(net, val_loader, precision, val_loss_fn)
            metrics = {**classification_metrics(y_val, p_val), "val_loss": val_loss}
            value = metrics[monitor]
            improved = early.update(value if not math.isnan(value) else -math.inf, epoch)
            lr = optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, **metrics, "lr": lr,
                   "encoder_frozen": frozen, "seconds": time.perf_counter() - t0}
            history.append(row)
            tb.add_scalar("loss/train", train_loss, epoch + 1)
            tb.add_scalar("loss/val", val_loss, epoch + 1)
            tb.add_scalar("accuracy/train", train_acc, epoch + 1)
            for k in ("accuracy", "balanced_accuracy", "auc", "f1_macro"):
                tb.add_scalar(f"val/{k}", metrics[k], epoch + 1)
            tb.add_scalar("lr", lr, epoch + 1)
            if dist.is_main():
                from octa3d.plots import confusion_figure

                tb.add_figure("val/confusion_matrix",
                              confusion_figure(confusion(y_val, p_val), names, "Confusion matrix (validation)"),
                              epoch + 1)
                if epoch == first_epoch and x is not None:
                    tb.add_image("inputs/train", engine.slice_grid(x), epoch + 1)
            stop = early.should_stop or epoch + 1 == cfg.train.epochs
            ck = dict(epoch=epoch + 1, early=early, metrics=metrics, config=cfg, writer=writer)
            if improved:
                best_metrics = dict(metrics, epoch=epoch + 1)
                # weights and record only: test/explain/compress read best.pt, --resume reads last.pt
                engine.save_checkpoint(out / "checkpoints" / "best.pt", model, record, **ck)
            engine.save_checkpoint(last_ckpt, model, {**record, "finished": stop}, optimizer=optimizer,
                                   scheduler=scheduler, precision=precision, **ck)
            log.info("epoch %d/%d  loss %.4f/%.4f  bal.acc %.3f  auc %.3f  f1 %.3f%s  %.1fs", epoch + 1,
                     cfg.train.epochs, train_loss, val_loss, metrics["balanced_accuracy"], metrics["auc"],
                     metrics["f1_macro"], " *" if improved else "", row["seconds"])
            if early.should_stop:
                log.info("Early stopping: %s has not improved for %d epochs", monitor, cfg.train.patience)
                break
    tb.add_hparams({"model": cfg.model.model, "dim": cfg.model.dim, "lr": cfg.train.lr,
                    "batch_size": cfg.train.batch_size, "init": start.split(" ")[0]},
                   {f"hparam/{k}": v for k, v in best_metrics.items() if isinstance(v, float)})
    tb.close()
    return best_metrics


def run(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    """Train the classifier on every fold of the experiment; writes ``train/summary.json``."""
    ctx = engine.setup_stage(cfg, argv)
    out = stage_dir(cfg, STAGE, argv, resume=cfg.train.resume) if dist.is_main() else cfg.run_dir / STAGE
    dist.barrier()
    sp = ctx.splits
    per_fold = {}
    for k in range(sp.n_folds):
        fold_out = out / f"fold-{k}" if sp.n_folds > 1 else out
        per_fold[f"fold-{k}"] = train_fold(cfg, ctx, fold_out, k)
    keys = ["accuracy", "balanced_accuracy", "auc", "f1_macro"]
    summary = {"monitor": cfg.train.monitor, "folds": per_fold,
               "mean": {k: float(np.nanmean([f[k] for f in per_fold.values()])) for k in keys},
               "sd": {k: float(np.nanstd([f[k] for f in per_fold.values()])) for k in keys}}
    if dist.is_main():
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"Validation (best epoch per fold, {sp.n_folds} fold(s)): " + "  ".join(
            f"{k} {summary['mean'][k]:.3f}±{summary['sd'][k]:.3f}" for k in keys))
        print(f"Checkpoints and history in {out}. Next: python main.py --mode test --exp {cfg.exp_name}")
    dist.cleanup()
    return summary
