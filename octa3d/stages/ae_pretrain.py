"""``--mode ae_pretrain``: ClinicaDL-style autoencoder pretraining of the classifier's encoder.

The autoencoder's encoder *is* the classifier's feature extractor (same module names), its decoder mirrors it.
It trains on the experiment's training subjects only (plus optional unlabeled ``--ae-extra-data``, checked
against the hold-out test subjects); the validation subjects' reconstruction loss picks ``best.pt`` and drives
early stopping. The loop is :func:`octa3d.training.fit.fit`, the same as ``--mode train``'s, so ``--accum-steps``,
``--clip-grad``, AMP, ``--max-steps`` and ``--resume`` behave the same. ``--mode train`` then starts from
``ae_pretrain/best.pt`` (``--init ae``/``auto``).

A ViT (:func:`octa3d.model.mae.is_vit`) is pretrained by masked autoencoding instead (:mod:`octa3d.model.mae`):
``--mask-ratio`` of its patches are hidden, a lightweight decoder predicts them, and the ``--ae-loss`` is taken on
the hidden patches only; its encoder tensors carry the classifier's names, so the transfer is the same.

Outputs: ``runs/<exp>/ae_pretrain/[fold-k/]{checkpoints/{best,last}.pt, history.csv, tensorboard/}``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from octa3d.checkpoint.io import model_record
from octa3d.config import Config
from octa3d.data.datasets import DataHandler
from octa3d.data.leakage import guard
from octa3d.data.sources import discover_unlabelled
from octa3d.evaluation import forward
from octa3d.model import build_autoencoder, encoder_state_dict, model_options
from octa3d.model.mae import MaskedAutoEncoder, build_mae, is_vit, mae_loss
from octa3d.stages.context import StageContext, setup_stage
from octa3d.training.epoch import StopTraining
from octa3d.training.fit import FitSpec, fit, config_to_resume
from octa3d.training.optim import reconstruction_loss
from octa3d.training.precision import Precision, memory_format
from octa3d.utils import dist
from octa3d.utils.runs import plan_stage, releases_locks, shared_stage_dir
from octa3d.utils.tracking import next_command, rerun_command, slice_grid

log = logging.getLogger("octa3d.ae_pretrain")

STAGE = "ae_pretrain"
#: Options the classifier must share with the autoencoder (repeated in the "Next:" hint when given).
MODEL_FLAGS = ("dim", "model", "shortcut_type", "modality", "task", "classes", "negative", "positive", "labels",
               "source", "fov", "projection", "input_size", "depth_axis", "slab_depth", "clip_percentiles",
               "patch_size", "patch_stride", "cache_dir", "seed", "test_fraction", "val_fraction", "folds",
               "group_regex")


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
    subs = discover_unlabelled(cfg.data, cfg.train.ae_extra_data, cfg.model.dim)
    guard(STAGE, [s.id for s in subs], splits, groups={s.id: s.group for s in subs})
    for s in subs:
        s.id = s.id if s.id.startswith("extra:") else f"extra:{s.id}"
    log.info("--ae-extra-data: %d extra scans (none is a test subject)", len(subs))
    return subs


def _reconstruction_images(ae: torch.nn.Module, loader: Any, device: torch.device, precision: Precision,
                           every: int) -> Any:
    """``epoch_end`` callback: input and reconstruction slices in TensorBoard every ``every`` epochs."""

    def epoch_end(epoch: int, metrics: dict[str, float], x: torch.Tensor | None, tb: Any) -> None:
        tb.add_scalar("loss/val", metrics.get("val_loss", metrics.get("train_loss", float("nan"))), epoch + 1)
        if (epoch + 1) % every and epoch:
            return
        sample = next(iter(loader))["image"][:4].to(device)
        ae.eval()
        with torch.no_grad(), precision.autocast():
            if isinstance(ae, MaskedAutoEncoder):  # its forward is the loss: show the masked input and the fill-in
                masked, rec = ae.reconstruct(sample)
                tb.add_image("reconstruction/masked_input", slice_grid(masked), epoch + 1)
            else:
                rec = ae(sample)
        tb.add_image("reconstruction/input", slice_grid(sample), epoch + 1)
        tb.add_image("reconstruction/output", slice_grid(rec), epoch + 1)

    return epoch_end


def build_pretext_model(cfg: Config) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model ``ae_pretrain`` trains for ``--model``, its loop loss function and a record of the method.

    A ViT gets a masked autoencoder (its forward returns the masked-patch ``--ae-loss``, see
    :func:`octa3d.model.mae.mae_loss`); every other model the mirrored-decoder autoencoder with ``--ae-loss``.
    """
    # the classifier's own options (e.g. --shortcut-type), so that the encoder tensors have its shapes
    kw = model_options(cfg.model.model, dataclasses.asdict(cfg.model), cfg.is_explicit)
    if is_vit(cfg.model.model):
        mae = build_mae(cfg.model.model, cfg.model.dim, cfg.in_channels, cfg.input_shape,
                        mask_ratio=cfg.train.mask_ratio, loss=cfg.train.ae_loss, **kw)
        return mae, mae_loss, {"method": "MAE", "mask_ratio": mae.mask_ratio, "patch": list(mae.patch),
                               "norm_pix_loss": mae.norm_pix_loss, "loss": mae.loss_kind}
    ae = build_autoencoder(cfg.model.model, cfg.model.dim, cfg.in_channels, cfg.input_shape, **kw)
    return ae, reconstruction_loss(cfg.train.ae_loss), {"method": "AE", "loss": cfg.train.ae_loss}


def pretrain_fold(cfg: Config, ctx: StageContext, out: Path, train_subs: list[Any], val_subs: list[Any]
                  ) -> dict[str, Any]:
    """Train (or resume) one autoencoder; returns its summary (best val loss, its epoch, epochs run)."""
    handler = DataHandler(cfg, _AnyLabel())
    handler.warm(train_subs + val_subs)
    train_loader = handler.loader(train_subs, train=True, batch_size=cfg.train.batch_size)
    val_loader = handler.loader(val_subs, train=False, batch_size=cfg.train.batch_size) if val_subs else None
    ae, loss_fn, kind = build_pretext_model(cfg)
    ae.to(ctx.device, memory_format=memory_format(cfg))
    precision = Precision.for_device(ctx.device, cfg.train.amp)

    def validate(net: torch.nn.Module) -> dict[str, float]:
        if val_loader is None:  # no validation subjects: the training loss picks best.pt
            return {}
        return {"val_loss": forward.reconstruction_error(net, val_loader, precision, loss_fn)}

    spec = FitSpec(
        model=ae, loss_fn=loss_fn, target="input", validate=validate,
        monitor="val_loss" if val_loader is not None else "train_loss", mode="min",
        record=model_record(cfg, None, "autoencoder"), kind_label="ae epoch",
        epoch_end=_reconstruction_images(ae, val_loader or train_loader, ctx.device, precision,
                                         max(1, cfg.train.epochs // 10)),
        extra_record=lambda: {"encoder_state_dict": encoder_state_dict(ae), "pretext": kind},
        log_line=lambda r: f"train {r['train_loss']:.5f}  val {r.get('val_loss', r['train_loss']):.5f}  "
                           f"lr {r['lr']:.2e}")
    n_params = sum(p.numel() for p in ae.parameters())
    log.info("%s %s (%s, %.1fM parameters): %d train / %d val scans, %d epochs", kind["method"], cfg.model.model,
             cfg.model.dim, n_params / 1e6, len(train_subs), len(val_subs), cfg.train.epochs)
    result = fit(spec, cfg, train_loader, out, ctx.device, name=f"autoencoder {out}")
    best = result.best
    return {"best_val_loss": best.get("val_loss", best.get("train_loss")), "best_epoch": best.get("epoch"),
            "epochs_run": result.epochs_run}


@releases_locks
def run(cfg: Config) -> dict[str, Any]:
    """Pretrain the encoder of ``--model`` as an autoencoder on the experiment's training subjects.

    ``--resume`` and the stage folder behave as in ``--mode train`` (:func:`octa3d.training.fit.config_to_resume`,
    :func:`octa3d.utils.runs.plan_stage`).
    """
    cfg = config_to_resume(cfg, STAGE)
    plan_stage(cfg, STAGE, training=True)  # RunExistsError before the experiment is touched
    ctx = setup_stage(cfg)
    sp = ctx.splits
    extra = extra_subjects(cfg, sp)  # LeakageError before the stage folder is prepared
    results = {}
    with shared_stage_dir(cfg, STAGE, training=True) as folder:
        out = folder.path
        try:
            for k in range(sp.n_folds):
                tr_ids, va_ids = sp.fold(k)
                guard(STAGE, tr_ids + va_ids, sp)
                fold_out = out / f"fold-{k}" if sp.n_folds > 1 else out
                results[f"fold-{k}"] = pretrain_fold(cfg, ctx, fold_out, ctx.pick(tr_ids) + extra,
                                                     ctx.pick(va_ids))
        except StopTraining as stop:
            print(f"Autoencoder pretraining {stop}; last.pt holds the last finished epoch. Continue with: "
                  f"{rerun_command(cfg, ['--resume'], drop=['--max-steps', '--overwrite'])}")
            dist.cleanup()
            return {"stopped_at_step": stop.step, **results}
        if dist.is_main():
            out = folder.finish(cfg)
            for name, r in results.items():
                print(f"ae_pretrain {name}: best val loss {r['best_val_loss']:.5f} at epoch {r['best_epoch']} "
                      f"({r['epochs_run']} epochs) -> {out}")
            print(f"Next: {next_command(cfg, 'train', keep=MODEL_FLAGS)} (starts from the pretrained encoder; add "
                  f"training options such as --epochs)")
    dist.cleanup()
    return results
