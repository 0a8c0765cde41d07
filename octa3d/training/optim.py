"""Optimisation recipe pieces: optimiser (with layer-wise learning-rate decay), learning-rate schedule, early
stopping, losses and class weights."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from octa3d.config import Config
from octa3d.errors import DataError
from octa3d.model.registry import get_spec

log = logging.getLogger("octa3d.training.optim")


def layer_decay_groups(model: torch.nn.Module, model_name: str, params: Any, lr: float, decay: float
                       ) -> list[dict[str, Any]]:
    """Parameter groups for layer-wise learning-rate decay: a layer ``d`` steps below the head trains at
    ``lr * decay**d`` (BEiT/MAE fine-tuning recipe).

    Layers follow the registry's encoder stages (:attr:`~octa3d.model.registry.ModelSpec.stages`) in forward
    order; a stage prefix that is a ``ModuleList`` (a ViT's ``blocks``) counts one layer per element. So a ViT has
    the patch/position embeddings and class token deepest (``decay**(L+1)``), block ``i`` at ``decay**(L-i)`` and
    the final norm with the head (``lr``), as in MAE's ``param_groups_lrd``; a ResNet has its stem deepest
    (``decay**5``), ``layer1``..``layer4`` above it and ``fc`` at ``lr``.

    Args:
        model: the classifier.
        model_name: its registered name.
        params: the parameters to optimise (a subset of ``model``'s; others are left out).
        lr: the head's learning rate (``--lr``).
        decay: ``--layer-decay`` in (0, 1].

    Returns:
        Groups ``{"params", "lr", "lr_scale", "layer_id"}``, deepest first; the scheduler's factor multiplies
        each group's own initial rate.
    """
    spec = get_spec(model_name)
    layers: list[list[str]] = []
    for si, stage in enumerate(spec.stages):
        plain: list[str] = []
        expanded = False
        for prefix in stage:
            module = getattr(model, prefix, None) if "." not in prefix else None
            if isinstance(module, torch.nn.ModuleList):
                if plain:
                    layers.append(plain)
                    plain = []
                layers.extend([[f"{prefix}.{i}"] for i in range(len(module))])
                expanded = True
            else:
                plain.append(prefix)
        # a transformer's final norm (after the blocks, last stage) trains with the head, as in MAE/BEiT
        if plain and not (expanded and si == len(spec.stages) - 1):
            layers.append(plain)
    top = len(layers)
    wanted = {id(p) for p in params}
    groups: dict[int, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if id(p) not in wanted:
            continue
        lid = next((i for i, prefixes in enumerate(layers)
                    if any(name == q or name.startswith(q + ".") for q in prefixes)), top)
        groups.setdefault(lid, []).append(p)
    return [{"params": ps, "lr": lr * decay ** (top - i), "lr_scale": decay ** (top - i), "layer_id": i}
            for i, ps in sorted(groups.items())]


def build_optimizer(params: Any, cfg: Config, model: torch.nn.Module | None = None,
                    model_name: str | None = None) -> torch.optim.Optimizer:
    """``--optimizer`` (AdamW, or SGD with Nesterov momentum 0.9) with ``--lr`` and ``--weight-decay``.

    With ``--layer-decay`` below 1 and the classifier given (``model``, ``model_name``), the parameters are split
    into per-layer groups with decayed learning rates (:func:`layer_decay_groups`).

    Uses PyTorch's fused kernels where every parameter allows them (CPU and CUDA, floating point): one kernel per
    parameter instead of a dozen, e.g. AdamW on a 3D ResNet-18 on CPU ~4x faster, the same update rule. Falls back
    to the default implementation otherwise.
    """
    params = list(params)  # may be a generator: it is read twice when the fused variant is refused
    if model is not None and model_name and cfg.train.layer_decay < 1:
        params = layer_decay_groups(model, model_name, params, cfg.train.lr, cfg.train.layer_decay)
        log.info("--layer-decay %g: %d learning-rate groups, from %.3g (deepest) to %.3g (head)",
                 cfg.train.layer_decay, len(params), params[0]["lr"], params[-1]["lr"])
    if cfg.train.optimizer == "sgd":
        cls, kw = torch.optim.SGD, {"momentum": 0.9, "nesterov": True}
    else:
        cls, kw = torch.optim.AdamW, {}
    kw.update(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError) as exc:  # e.g. a device or dtype without fused kernels
        log.debug("fused %s unavailable (%s); using the default implementation", cls.__name__, exc)
        return cls(params, **kw)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up over ``--warmup-epochs`` then cosine decay to 1 % of ``--lr`` at the last epoch."""
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warm = min(cfg.train.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EarlyStopping:
    """Track the best value of a monitored metric; ``patience`` epochs without improvement stop training.

    A tie on the monitored metric counts as an improvement when the tie-break value (the validation loss) is lower.
    Why: on the small validation sets of eye studies a discrete metric such as balanced accuracy saturates (16
    validation eyes reach 1.000 early in training), and without the tie-break ``best.pt`` froze at the first
    saturated epoch while early stopping ended training ten epochs later, with the model still under-fitted
    (4-class generated eyes, 60 epochs, two seeds: hold-out macro-F1 0.887/0.942 stopped at epochs 29/36; with the
    tie-break 0.972/0.972, trained to epoch 60; README "Multi-class").

    Two rules keep a run from ending inside the initial plateau, where a classifier sits at chance for a while
    before it learns (README "Training recipe": 6-17 epochs on generated cohorts, 20 on an independent one):

    * **Armed only after leaving chance.** With ``arm_below`` set (:data:`LEFT_CHANCE` x the chance loss, see
      :func:`chance_loss`), patience does not count until an epoch's training loss falls below it, and the epochs
      before that one cannot stay the best: the first epoch below it replaces them. A run that never leaves chance
      trains for all its epochs (and the end-of-training check says it did not learn).
    * **Validation loss is progress too.** An epoch with the lowest validation loss so far (the ``tie_break``)
      resets patience without becoming the best: balanced accuracy at the argmax is blind to probabilities that
      are moving towards the right class (validation AUC reached 1.00 two epochs before balanced accuracy left 0.5).
    """

    mode: str = "max"
    patience: int = 10
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    best_tie: float | None = None
    arm_below: float | None = None
    armed_epoch: int | None = None
    lowest_tie: float | None = None

    @property
    def armed(self) -> bool:
        """True once patience counts (from the start when ``arm_below`` is None)."""
        return self.arm_below is None or self.armed_epoch is not None

    def update(self, value: float, epoch: int, tie_break: float | None = None,
               train_loss: float | None = None) -> bool:
        """Record ``value`` (and the lower-is-better ``tie_break``, the validation loss) for ``epoch`` whose mean
        training loss was ``train_loss``; return True on a new best."""
        if not self.armed and train_loss is not None and train_loss < self.arm_below:
            self.armed_epoch, self.best, self.best_tie = epoch, None, None  # the plateau's epochs drop out
        tie_ok = tie_break is not None and not math.isnan(tie_break)
        progress = tie_ok and (self.lowest_tie is None or tie_break < self.lowest_tie)
        if progress:
            self.lowest_tie = float(tie_break)
        if math.isnan(value):
            self._no_gain(progress)
            return False
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        tie_won = (self.best is not None and value == self.best and tie_ok
                   and (self.best_tie is None or tie_break < self.best_tie))
        if better or tie_won:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            self.best_tie = float(tie_break) if tie_ok else None
            return True
        self._no_gain(progress)
        return False

    def _no_gain(self, progress: bool) -> None:
        """An epoch that is not a new best: patience counts it unless it made progress or the run is unarmed."""
        self.bad_epochs = 0 if progress or not self.armed else self.bad_epochs + 1

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` epochs passed without improvement (never when patience is 0)."""
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Serializable state."""
        return {"mode": self.mode, "patience": self.patience, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "best_tie": self.best_tie, "arm_below": self.arm_below,
                "armed_epoch": self.armed_epoch, "lowest_tie": self.lowest_tie}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a state saved before arming existed counts from the start)."""
        self.arm_below = None
        for k, v in d.items():
            setattr(self, k, v)


#: A run has left chance once its training loss is below this fraction of the chance loss (issue targets: no run
#: may stop above 0.9 ln K).
LEFT_CHANCE = 0.9


def chance_loss(loss_fn: Any, labels: list[int], n_classes: int) -> float:
    """The training loss of a model that has learnt nothing: ``loss_fn`` on all-zero logits (uniform
    probabilities) over the training labels, so class weights, label smoothing and focal terms are included
    (ln K for plain cross-entropy)."""
    target = torch.as_tensor(labels, dtype=torch.long)
    with torch.no_grad():
        weight = getattr(loss_fn, "weight", None)
        logits = torch.zeros(len(target), n_classes, device=weight.device if weight is not None else "cpu")
        return float(loss_fn(logits, target.to(logits.device)))


# ---------------------------------------------------------------------------------------------------- losses
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


def reconstruction_loss(kind: str) -> Any:
    """``--ae-loss``: ``torch.nn.functional.mse_loss`` or ``l1_loss`` (both take ``reduction=``)."""
    return torch.nn.functional.mse_loss if kind == "mse" else torch.nn.functional.l1_loss
