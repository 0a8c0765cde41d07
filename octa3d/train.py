"""``--mode train``: supervised binary / multi-class training on the experiment's train split.

Per fold (``--folds K`` → ``train/fold-k/``): class-weighted cross-entropy, AdamW with warm-up + cosine schedule,
validation every epoch (accuracy, balanced accuracy, ROC-AUC from probabilities, macro-F1; 2D patches aggregated
per subject), ``best.pt`` on ``--monitor``, ``last.pt`` every epoch, early stopping, history.csv, TensorBoard.
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
from octa3d.errors import ConfigError, DataError
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


def _confusion_figure(cm: np.ndarray, names: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1.0 + 0.6 * len(names)), dpi=80)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center")
    fig.tight_layout()
    return fig


def train_fold(cfg: Config, ctx: engine.StageContext, out: Path, fold: int) -> dict[str, Any]:
    """Train one classifier on fold ``fold``; returns the best validation metrics."""
    from octa3d.data.datasets import DataHandler
    from octa3d.model import check_input_size, create_model, freeze_encoder_stages

    sp = ctx.splits
    tr_ids, va_ids = sp.fold(fold)
    guard(STAGE, tr_ids + va_ids, sp)
    if not va_ids:
        raise ConfigError("--mode train needs validation subjects (--val-fraction > 0 or --folds > 1)")
    names = list(sp.class_names)
    check_input_size(cfg.model.model, cfg.input_shape)
    handler = DataHandler(cfg, ctx.label_map)
    train_subs, val_subs = ctx.pick(tr_ids), ctx.pick(va_ids)
    handler.warm(train_subs + val_subs)
    train_loader = handler.loader(train_subs, train=True, batch_size=cfg.train.batch_size)
    val_loader = handler.loader(val_subs, train=False, batch_size=cfg.train.batch_size)

    kw = {"input_size": cfg.input_shape} if cfg.model.model == "vit" else {}
    model = create_model(cfg.model.model, cfg.model.dim, cfg.in_channels, len(names), **kw)
    start = initialise(model, cfg, f"fold-{fold}" if sp.n_folds > 1 else "")
    if cfg.train.freeze_encoder_stages:
        freeze_encoder_stages(model, cfg.model.model, cfg.train.freeze_encoder_stages)
    model.to(ctx.device)
    net: torch.nn.Module = model
    if dist.is_distributed():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    weights = class_weights([sp.labels[i] for i in tr_ids], len(names)).to(ctx.device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    val_loss_fn = torch.nn.CrossEntropyLoss(weight=weights, reduction="none")
    precision = Precision.for_device(ctx.device, cfg.train.amp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = engine.build_optimizer(params, cfg)
    scheduler = engine.build_scheduler(optimizer, cfg, max(1, len(train_loader)))
    monitor = cfg.train.monitor
    early = EarlyStopping(mode="max" if HIGHER_IS_BETTER[monitor] else "min", patience=cfg.train.patience)
    history = History(out / "history.csv")
    tb = engine.tensorboard_writer(out / "tensorboard")
    record = engine.model_record(cfg, names, "classifier")
    log.info("train %s fold %d: %d train / %d val subjects, classes %s, start: %s", cfg.model.model, fold,
             len(tr_ids), len(va_ids), names, start)

    step, best_metrics = 0, {}
    for epoch in range(cfg.train.epochs):
        train_loader.sampler.set_epoch(epoch)  # order + augmentation = f(seed, epoch): exact resume
        net.train()
        t0, total, count, correct = time.perf_counter(), 0.0, 0, 0
        bar = engine.progress(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch")
        for batch in bar:
            x = batch["image"].to(ctx.device, non_blocking=True)
            y = batch["label"].to(ctx.device, non_blocking=True)
            with precision.autocast():
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise DataError(f"train: loss became {loss.item()} at epoch {epoch + 1}, step {step} (subjects "
                                f"{', '.join(batch['subject'])}); last.pt holds the previous epoch. Lower --lr or "
                                f"check these scans")
            precision.step(loss, optimizer, params)
            scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_loss, train_acc = total / max(1, count), correct / max(1, count)
        _, y_val, p_val, val_loss = predict(net, val_loader, precision, val_loss_fn)
        metrics = {**classification_metrics(y_val, p_val), "val_loss": val_loss}
        value = metrics[monitor]
        improved = early.update(value if not math.isnan(value) else -math.inf, epoch)
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, **metrics, "lr": lr,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        tb.add_scalar("loss/train", train_loss, epoch + 1)
        tb.add_scalar("loss/val", val_loss, epoch + 1)
        tb.add_scalar("accuracy/train", train_acc, epoch + 1)
        for k in ("accuracy", "balanced_accuracy", "auc", "f1_macro"):
            tb.add_scalar(f"val/{k}", metrics[k], epoch + 1)
        tb.add_scalar("lr", lr, epoch + 1)
        if dist.is_main():
            tb.add_figure("val/confusion_matrix", _confusion_figure(confusion(y_val, p_val), names), epoch + 1)
            if epoch == 0:
                tb.add_image("inputs/train", engine.slice_grid(x), epoch + 1)
        ck = dict(epoch=epoch + 1, optimizer=optimizer, scheduler=scheduler, precision=precision, early=early,
                  metrics=metrics, config=cfg)
        engine.save_checkpoint(out / "checkpoints" / "last.pt", model, record, **ck)
        if improved:
            best_metrics = dict(metrics, epoch=epoch + 1)
            engine.save_checkpoint(out / "checkpoints" / "best.pt", model, record, **ck)
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
    out = stage_dir(cfg, STAGE, argv) if dist.is_main() else cfg.run_dir / STAGE
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
