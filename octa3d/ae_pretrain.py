"""``--mode ae_pretrain``: ClinicaDL-style autoencoder pretraining of the classifier's encoder.

The autoencoder's encoder *is* the classifier's feature extractor (same module names), its decoder mirrors it.
It trains on the experiment's training subjects only (plus optional unlabeled ``--ae-extra-data``, checked
against the hold-out test subjects); the validation subjects' reconstruction loss picks ``best.pt`` and drives
early stopping. ``--mode train`` then starts from ``ae_pretrain/best.pt`` (``--init ae``/``auto``).

Outputs: ``runs/<exp>/ae_pretrain/[fold-k/]{checkpoints/{best,last}.pt, history.csv, tensorboard/}``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from octa3d import engine
from octa3d.config import Config
from octa3d.data.splits import guard
from octa3d.engine import EarlyStopping, History, Precision
from octa3d.errors import DataError
from octa3d.utils import dist
from octa3d.utils.runs import stage_dir

log = logging.getLogger("octa3d.ae_pretrain")

STAGE = "ae_pretrain"


class _AnyLabel:
    """Label map for reconstruction: every scan is usable, labelled or not."""

    class_names = ["scan"]

    @staticmethod
    def index(_raw: Any) -> int:
        return 0


def extra_subjects(cfg: Config, splits: Any) -> list[Any]:
    """Unlabeled scans from ``--ae-extra-data``, refused if any is a hold-out test subject (ID or group)."""
    if not cfg.train.ae_extra_data:
        return []
    import copy

    from octa3d.data.sources import discover

    extra_cfg = copy.deepcopy(cfg.data)
    extra_cfg.data_root = cfg.train.ae_extra_data
    extra_cfg.labels = None
    extra_cfg.source = "auto"
    subs = discover(extra_cfg, cfg.model.dim, require_labels=False)  # extra data need not be labelled
    if not subs:
        raise DataError(f"--ae-extra-data {cfg.train.ae_extra_data}: no scans found")
    guard(STAGE, [s.id for s in subs], splits, groups={s.id: s.group for s in subs})
    for s in subs:
        s.id = f"extra:{s.id}" if not s.id.startswith("extra:") else s.id
    log.info("--ae-extra-data: %d extra scans (none is a test subject)", len(subs))
    return subs


def _recon_loss(kind: str) -> Any:
    return F.mse_loss if kind == "mse" else F.l1_loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, precision: Precision, loss_kind: str) -> float:
    """Mean per-sample reconstruction loss over the validation subjects (deduplicated across DDP ranks)."""
    model.eval()
    per_sample: dict[tuple[str, int], float] = {}
    loss_fn = _recon_loss(loss_kind)
    for batch in engine.progress(loader, desc="val", unit="batch"):
        x = batch["image"].to(precision.device, non_blocking=True)
        with precision.autocast():
            rec = model(x)
        losses = loss_fn(rec.float(), x, reduction="none").flatten(1).mean(1)
        for sid, patch, v in zip(batch["subject"], batch["patch"].tolist(), losses.tolist()):
            per_sample[(sid, int(patch))] = v
    merged: dict[tuple[str, int], float] = {}
    for part in dist.gather_objects(per_sample):
        merged.update(part)
    return float(np.mean(list(merged.values()))) if merged else math.nan


def pretrain_fold(cfg: Config, ctx: engine.StageContext, out: Path, train_subs: list[Any],
                  val_subs: list[Any]) -> dict[str, Any]:
    """Train one autoencoder; returns its summary (best val loss, epochs)."""
    from octa3d.data.datasets import DataHandler
    from octa3d.model import build_autoencoder, check_input_size, encoder_state_dict

    check_input_size(cfg.model.model, cfg.input_shape)
    handler = DataHandler(cfg, _AnyLabel())
    handler.warm(train_subs + val_subs)
    train_loader = handler.loader(train_subs, train=True, batch_size=cfg.train.batch_size)
    val_loader = handler.loader(val_subs, train=False, batch_size=cfg.train.batch_size) if val_subs else None

    ae = build_autoencoder(cfg.model.model, cfg.model.dim, cfg.in_channels, cfg.input_shape).to(ctx.device)
    net: torch.nn.Module = ae
    if dist.is_distributed():
        net = torch.nn.parallel.DistributedDataParallel(
            ae, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    precision = Precision.for_device(ctx.device, cfg.train.amp)
    optimizer = engine.build_optimizer(ae.parameters(), cfg)
    scheduler = engine.build_scheduler(optimizer, cfg, max(1, len(train_loader)))
    early = EarlyStopping(mode="min", patience=cfg.train.patience)
    history = History(out / "history.csv")
    tb = engine.tensorboard_writer(out / "tensorboard")
    record = engine.model_record(cfg, None, "autoencoder")
    loss_fn = _recon_loss(cfg.train.ae_loss)
    image_every = max(1, cfg.train.epochs // 10)
    n_params = sum(p.numel() for p in ae.parameters())
    log.info("AE %s (%s, %.1fM parameters): %d train / %d val scans, %d epochs", cfg.model.model, cfg.model.dim,
             n_params / 1e6, len(train_subs), len(val_subs), cfg.train.epochs)

    step = 0
    for epoch in range(cfg.train.epochs):
        train_loader.sampler.set_epoch(epoch)  # order + augmentation = f(seed, epoch): exact resume
        net.train()
        t0, total, count = time.perf_counter(), 0.0, 0
        bar = engine.progress(train_loader, desc=f"ae epoch {epoch + 1}/{cfg.train.epochs}", unit="batch")
        for batch in bar:
            x = batch["image"].to(ctx.device, non_blocking=True)
            with precision.autocast():
                rec = net(x)
            loss = loss_fn(rec.float(), x)
            if not torch.isfinite(loss):
                raise DataError(f"ae_pretrain: loss became {loss.item()} at epoch {epoch + 1}, step {step} "
                                f"(subjects {', '.join(batch['subject'])}); lower --lr or check these scans")
            precision.backward(loss)
            precision.step(optimizer, list(ae.parameters()))
            scheduler.step()
            total += loss.item() * x.shape[0]
            count += x.shape[0]
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            tb.add_scalar("train/loss_step", loss.item(), step)
        train_loss = total / max(1, count)
        val_loss = evaluate(net, val_loader, precision, cfg.train.ae_loss) if val_loader else train_loss
        improved = early.update(val_loss, epoch)
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        tb.add_scalar("loss/train", train_loss, epoch + 1)
        tb.add_scalar("loss/val", val_loss, epoch + 1)
        tb.add_scalar("lr", lr, epoch + 1)
        if (epoch + 1) % image_every == 0 or epoch == 0:
            sample = next(iter(val_loader or train_loader))["image"][:4].to(ctx.device)
            ae.eval()
            with torch.no_grad(), precision.autocast():
                rec = ae(sample)
            tb.add_image("reconstruction/input", engine.slice_grid(sample), epoch + 1)
            tb.add_image("reconstruction/output", engine.slice_grid(rec), epoch + 1)
        metrics = {"val_loss": val_loss, "train_loss": train_loss}
        extra = {"encoder_state_dict": encoder_state_dict(ae)}
        kw = dict(epoch=epoch + 1, optimizer=optimizer, scheduler=scheduler, precision=precision, early=early,
                  metrics=metrics, config=cfg)
        engine.save_checkpoint(out / "checkpoints" / "last.pt", ae, {**record, **extra}, **kw)
        if improved:
            engine.save_checkpoint(out / "checkpoints" / "best.pt", ae, {**record, **extra}, **kw)
        log.info("ae epoch %d/%d  train %.5f  val %.5f%s  lr %.2e  %.1fs", epoch + 1, cfg.train.epochs, train_loss,
                 val_loss, " *" if improved else "", lr, row["seconds"])
        if early.should_stop:
            log.info("Early stopping: val loss has not improved for %d epochs", cfg.train.patience)
            break
    tb.close()
    return {"best_val_loss": early.best, "best_epoch": early.best_epoch + 1, "epochs_run": epoch + 1}


def run(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    """Pretrain the encoder of ``--model`` as an autoencoder on the experiment's training subjects."""
    ctx = engine.setup_stage(cfg, argv)
    out = stage_dir(cfg, STAGE, argv) if dist.is_main() else cfg.run_dir / STAGE
    dist.barrier()
    sp = ctx.splits
    extra = extra_subjects(cfg, sp)
    results = {}
    for k in range(sp.n_folds):
        tr_ids, va_ids = sp.fold(k)
        guard(STAGE, tr_ids + va_ids, sp)
        fold_out = out / f"fold-{k}" if sp.n_folds > 1 else out
        results[f"fold-{k}"] = pretrain_fold(cfg, ctx, fold_out, ctx.pick(tr_ids) + extra, ctx.pick(va_ids))
    if dist.is_main():
        for name, r in results.items():
            print(f"ae_pretrain {name}: best val loss {r['best_val_loss']:.5f} at epoch {r['best_epoch']} "
                  f"({r['epochs_run']} epochs) -> {out}")
        print(f"Next: python main.py --mode train --exp {cfg.exp_name} ... (starts from the pretrained encoder)")
    dist.cleanup()
    return results
