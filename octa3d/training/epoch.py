"""One training epoch — shared by ``ae_pretrain``, ``train`` (through :func:`octa3d.training.fit.fit`) and
compress fine-tuning.

One loop means one behaviour: gradient accumulation (``--accum-steps``), clipping (``--clip-grad``), AMP
(:class:`~octa3d.training.precision.Precision`), channels-last, the host-synchronisation policy
(:data:`SYNC_EVERY`), the non-finite-loss error and ``--max-steps`` apply to every stage that trains.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from octa3d.config import Config
from octa3d.errors import DataError, Octa3dError
from octa3d.training.precision import Precision, memory_format
from octa3d.utils.tracking import progress

log = logging.getLogger("octa3d.training")

#: Training steps between reads of the loss back to the host (progress bar, non-finite check, epoch means) on an
#: accelerator, so that no per-step synchronisation stalls its queue. Every step on CPU, where reading costs nothing.
SYNC_EVERY = 10


class StopTraining(Exception):
    """``--max-steps`` reached: training stops as an interruption would (``last.pt`` keeps the last finished
    epoch, so ``--resume`` continues exactly)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after {step} optimiser steps (--max-steps)")
        self.step = step


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
