"""The loops: train one epoch, predict / evaluate, reconstruct — shared by ``ae_pretrain``, ``train`` (through
:func:`octa3d.trainer.fit`) and compress fine-tuning.

One loop means one behaviour: gradient accumulation (``--accum-steps``), clipping (``--clip-grad``), AMP
(:class:`Precision`), channels-last, the host-synchronisation policy (:data:`SYNC_EVERY`), the non-finite-loss
error, ``--max-steps`` and ``--resume`` apply to every stage that trains.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d.config import Config
from octa3d.errors import ConfigError, DataError, Octa3dError
from octa3d.utils import dist
from octa3d.utils.tracking import progress

log = logging.getLogger("octa3d.engine")

#: Training steps between reads of the loss back to the host (progress bar, non-finite check, epoch means) on an
#: accelerator, so that no per-step synchronisation stalls its queue. Every step on CPU, where reading costs nothing.
SYNC_EVERY = 10


class StopTraining(Exception):
    """``--max-steps`` reached: training stops as an interruption would (``last.pt`` keeps the last finished
    epoch, so ``--resume`` continues exactly)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after {step} optimiser steps (--max-steps)")
        self.step = step


# ---------------------------------------------------------------------------------------------------- precision
@dataclass
class Precision:
    """Mixed-precision policy for one device."""

    device: torch.device
    dtype: torch.dtype | None  # None = full fp32
    scaler: torch.amp.GradScaler | None

    @classmethod
    def for_device(cls, device: torch.device, enabled: bool) -> Precision:
        """bf16 autocast on CUDA when supported, else fp16 with a GradScaler; fp32 on CPU."""
        if device.type != "cuda" or not enabled:
            return cls(device, None, None)
        if torch.cuda.is_bf16_supported():
            return cls(device, torch.bfloat16, None)
        return cls(device, torch.float16, torch.amp.GradScaler("cuda"))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass (loss scaled when fp16)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], clip: float = 0.0) -> None:
        """Optional gradient clipping, optimiser step (unscaled when fp16), zero the gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def memory_format(cfg: Config) -> torch.memory_format:
    """``--channels-last``: channels_last(_3d) for the model and its input batches."""
    if not cfg.train.channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if cfg.spatial_dims == 3 else torch.channels_last


def wrap(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """DDP and/or torch.compile around the model (rebuild it when the set of trainable parameters changes)."""
    net = model
    if dist.is_distributed():
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


# ---------------------------------------------------------------------------------------------------- one epoch
@dataclass
class StepPolicy:
    """How optimiser steps are taken (from ``--accum-steps``, ``--clip-grad``, ``--max-steps``)."""

    accum_steps: int = 1
    clip_grad: float = 0.0
    max_steps: int = 0  # 0 = no limit
    memory_format: torch.memory_format = torch.contiguous_format

    @classmethod
    def from_config(cls, cfg: Config) -> StepPolicy:
        t = cfg.train
        return cls(t.accum_steps, t.clip_grad, t.max_steps, memory_format(cfg))


def train_one_epoch(net: torch.nn.Module, loader: Any, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                    scheduler: Any, precision: Precision, params: list[torch.Tensor], policy: StepPolicy, *,
                    step: int, desc: str, target: str = "label", last_ckpt: Path | None = None, tb: Any = None
                    ) -> tuple[float, float, int, torch.Tensor | None]:
    """One pass over ``loader``: forward, loss, backward, optimiser + scheduler step every ``accum_steps`` batches.

    Args:
        net: the (possibly DDP/compiled) model, already in train mode.
        loader: training loader (its sampler's epoch already set).
        loss_fn: ``loss_fn(output.float(), target)`` → mean loss.
        optimizer: optimiser over ``params``.
        scheduler: per-step learning-rate schedule, or None.
        precision: autocast / scaler policy (its device is where batches go).
        params: parameters for gradient clipping.
        policy: accumulation, clipping, step limit, memory format.
        step: optimiser steps taken before this epoch.
        desc: progress-bar and error-message label (e.g. ``"epoch 3/20"``).
        target: ``"label"`` (classification: loss against ``batch["label"]``, accuracy counted) or ``"input"``
            (reconstruction: loss against the input itself).
        last_ckpt: the checkpoint named in the non-finite-loss error.
        tb: TensorBoard writer for the per-step loss (``train/loss_step``), or None.

    Returns:
        (mean training loss, training accuracy (NaN for reconstruction), optimiser steps after this epoch, last
        input batch or None).

    Raises:
        DataError: a loss is not finite (epoch, step and the batch's subjects in the message).
        StopTraining: ``max_steps`` optimiser steps reached.
    """
    device, accum = precision.device, policy.accum_steps
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    pending: list[tuple[int, torch.Tensor, torch.Tensor, int, list[str]]] = []  # not yet read back
    total, correct, count = 0.0, 0, 0
    x = None
    no_hits = torch.zeros((), dtype=torch.long)
    bar = progress(loader, desc=desc, unit="batch")
    for i, batch in enumerate(bar):
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=policy.memory_format)
        y = batch["label"].to(device, non_blocking=True) if target == "label" else x
        last_in_epoch = i + 1 == len(loader)
        try:
            with precision.autocast():
                out = net(x)
            loss = loss_fn(out.float(), y)
            hits = (out.argmax(1) == y).sum() if target == "label" else no_hits
            pending.append((step, loss.detach(), hits, len(x), list(batch["subject"])))
            if len(pending) >= sync_every or last_in_epoch:  # the one host synchronisation
                total, correct, count = _read_back(pending, (total, correct, count), desc, last_ckpt, bar, tb)
                pending = []
            precision.backward(loss / accum)
        except torch.OutOfMemoryError as exc:
            raise Octa3dError(f"out of GPU memory at batch size {len(x)}, input {tuple(x.shape[2:])}: use a "
                              f"smaller --batch-size or --input-size, or keep the effective batch with "
                              f"--accum-steps") from exc
        if (i + 1) % accum == 0 or last_in_epoch:
            precision.step(optimizer, params, policy.clip_grad)
            if scheduler is not None:
                scheduler.step()
            step += 1
            if policy.max_steps and step >= policy.max_steps:
                raise StopTraining(step)
    accuracy = correct / max(1, count) if target == "label" else math.nan
    return total / max(1, count), accuracy, step, x


def _read_back(pending: list[tuple[int, torch.Tensor, torch.Tensor, int, list[str]]],
               sums: tuple[float, int, int], desc: str, last_ckpt: Path | None, bar: Any, tb: Any
               ) -> tuple[float, int, int]:
    """Read the pending losses back to the host: check them, add them to the epoch sums, show the last one."""
    total, correct, count = sums
    losses = torch.stack([p[1] for p in pending]).tolist()
    hits = torch.stack([p[2] for p in pending]).tolist()
    for (at, _, _, n, subjects), value, h in zip(pending, losses, hits):
        if not math.isfinite(value):
            where = f"; {last_ckpt} holds the previous epoch" if last_ckpt else ""
            raise DataError(f"loss became {value} at {desc.split('/')[0]}, step {at} (subjects "
                            f"{', '.join(subjects)}){where}. Lower --lr, use --clip-grad, or check these scans")
        total, correct, count = total + value * n, correct + int(h), count + n
        if tb is not None:
            tb.add_scalar("train/loss_step", value, at + 1)
    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return total, correct, count


# ---------------------------------------------------------------------------------------------------- evaluation
def has_dropout(model: torch.nn.Module) -> bool:
    """Whether ``model`` has dropout layers (what ``--mc-dropout`` samples)."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in model.modules())


def check_spread_options(cfg: Config, models: Sequence[torch.nn.Module], classes: Sequence[str]) -> None:
    """Refuse ``--tta``/``--mc-dropout`` where they would do nothing: they give the spread of P(positive) of binary
    models, and MC dropout needs dropout layers.

    Raises:
        ConfigError: naming the flag and what to do.
    """
    if (cfg.eval.tta or cfg.eval.mc_dropout) and len(classes) != 2:
        raise ConfigError(f"--tta/--mc-dropout give the spread of P(positive) of binary models; this model has "
                          f"{len(classes)} classes (its per-eye uncertainty is the entropy column): drop the flag")
    if cfg.eval.mc_dropout and not any(has_dropout(m) for m in models):
        raise ConfigError(f"--mc-dropout: model {cfg.model.model} has no dropout layers; use --tta N instead")


def sample_dropout(model: torch.nn.Module, on: bool) -> None:
    """Evaluation mode, with the dropout modules sampling (train mode) when ``on`` (MC dropout); everything else,
    BatchNorm included, stays in eval."""
    model.eval()
    if on:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.train()


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, precision: Precision, loss_fn: Any = None,
            augment: Callable[[torch.Tensor, list[str], list[int]], torch.Tensor] | None = None,
            mc_dropout: bool = False) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    """Subject-level probabilities over a loader, merged across DDP ranks (each subject once).

    Args:
        augment: test-time augmentation ``(batch images on CPU, subjects, patches) -> images``, applied before
            the batch goes to the device.
        mc_dropout: dropout modules sample (train mode) while everything else, BatchNorm included, stays in eval.

    Returns:
        (subject IDs, labels (N,), probabilities (N, K), mean loss).
    """
    from octa3d.data.datasets import aggregate_patches

    sample_dropout(model, mc_dropout)
    rows: dict[tuple[str, int], tuple[int, np.ndarray, float]] = {}
    for batch in progress(loader, desc="val", unit="batch"):
        x = batch["image"]
        if augment is not None:
            x = augment(x, list(batch["subject"]), batch["patch"].tolist())
        x = x.to(precision.device, non_blocking=True)
        y = batch["label"].to(precision.device)
        with precision.autocast():
            logits = model(x)
        logits = logits.float()
        losses = (loss_fn(logits, y) if loss_fn is not None else torch.zeros(len(y))).tolist()
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        for sid, patch, lab, p, ls in zip(batch["subject"], batch["patch"].tolist(), y.tolist(), probs, losses):
            rows[(sid, int(patch))] = (int(lab), p, float(ls))
    model.eval()  # MC dropout: leave no module sampling behind
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


@torch.no_grad()
def reconstruction_error(model: torch.nn.Module, loader: Any, precision: Precision, loss_fn: Callable) -> float:
    """Mean per-sample reconstruction loss over a loader (deduplicated across DDP ranks)."""
    model.eval()
    per_sample: dict[tuple[str, int], float] = {}
    for batch in progress(loader, desc="val", unit="batch"):
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


@torch.no_grad()
def predict_samples(models: Sequence[torch.nn.Module], samples: np.ndarray, device: torch.device) -> np.ndarray:
    """Probabilities ``(K,)`` of one subject: softmax averaged over its patches and the ensemble's members."""
    x = torch.from_numpy(np.asarray(samples, np.float32)).to(device)
    probs = [torch.softmax(m.eval()(x).float(), dim=1).mean(0) for m in models]
    return torch.stack(probs).mean(0).cpu().numpy().astype(np.float64)
