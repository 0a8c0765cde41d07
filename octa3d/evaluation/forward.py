"""Forward passes over labelled loaders: subject-level probabilities (with test-time augmentation or MC dropout),
the pooled encoder features of the same pass (the out-of-distribution check's input) and reconstruction error;
the ``--tta``/``--mc-dropout`` option check shared by test, predict and the API."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from octa3d.config import Config
from octa3d.data.datasets import aggregate_patches
from octa3d.errors import ConfigError
from octa3d.training.precision import Precision
from octa3d.utils import dist
from octa3d.utils.tracking import progress


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


def mc_seed(seed: int, k: int, subject: str, patch: int) -> int:
    """The seed of the dropout masks of MC-dropout pass ``k`` for one sample: fixed by ``--seed`` and the sample
    alone, so that a subject gets the same masks in ``--mode test`` (batches of many subjects), ``--mode predict``
    and the API (one subject at a time)."""
    return (seed + 7919 * (k + 1) + zlib.crc32(f"{subject}#{patch}".encode())) % 2**32


def logits(model: torch.nn.Module, x: torch.Tensor, precision: Precision, mc_pass: tuple[int, int] | None = None,
           subjects: Sequence[str] = (), patches: Sequence[int] = ()) -> torch.Tensor:
    """Float32 logits of a batch already on the device, the one forward of every evaluation path.

    Args:
        mc_pass: ``(seed, k)`` for MC-dropout pass ``k`` (the dropout layers must be sampling,
            :func:`sample_dropout`): each sample is forwarded on its own with masks from :func:`mc_seed`, because
            dropout draws one mask tensor per batch and a sample's mask would otherwise depend on its batch.
        subjects: the subject of each sample (MC dropout only).
        patches: the patch index of each sample (-1 for a whole volume/image; MC dropout only).
    """
    with precision.autocast():
        if mc_pass is None:
            return model(x).float()
        out = []
        for i, (sid, patch) in enumerate(zip(subjects, patches, strict=True)):
            torch.manual_seed(mc_seed(mc_pass[0], mc_pass[1], sid, int(patch)))
            out.append(model(x[i:i + 1]))
        return torch.cat(out).float()


def has_features(model: torch.nn.Module) -> bool:
    """Whether ``model`` exposes the encoder/head split (registered networks do; TorchScript, ONNX and int8 exports
    do not): its pooled features can come from the prediction's own forward pass."""
    return (not isinstance(model, torch.jit.ScriptModule) and callable(getattr(model, "forward_features", None))
            and callable(getattr(model, "forward_head", None)))


def pool_features(f: torch.Tensor) -> torch.Tensor:
    """The penultimate representation ``(B, F)`` of an encoder output: the global mean of a ``(B, C, *spatial)`` map;
    the class token of a ViT's ``(B, tokens, hidden)`` (what its head reads)."""
    if f.ndim == 2:
        return f
    if f.ndim == 3:
        return f[:, 0]
    return f.flatten(2).mean(dim=2)


def logits_and_features(model: torch.nn.Module, x: torch.Tensor, precision: Precision
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 logits and pooled features ``(B, F)`` of one forward pass (``forward_head(forward_features(x))``,
    which is ``model(x)`` for every registered network); features None for models without the split."""
    if not has_features(model):
        return logits(model, x, precision), None
    with precision.autocast():
        f = model.forward_features(x)
        out = model.forward_head(f)
    return out.float(), pool_features(f).float()


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, precision: Precision, loss_fn: Any = None,
            augment: Callable[[torch.Tensor, list[str], list[int]], torch.Tensor] | None = None,
            mc_pass: tuple[int, int] | None = None, features: dict[str, np.ndarray] | None = None
            ) -> tuple[list[str], np.ndarray, np.ndarray, float]:
    """Subject-level probabilities over a loader, merged across DDP ranks (each subject once).

    Args:
        augment: test-time augmentation ``(batch images on CPU, subjects, patches) -> images``, applied before
            the batch goes to the device.
        mc_pass: ``(seed, k)``: MC-dropout pass ``k`` — dropout modules sample (train mode) while everything else,
            BatchNorm included, stays in eval; masks as :func:`logits` draws them.
        features: filled with subject ID -> pooled features ``(F,)`` of the same pass (mean over a subject's
            patches) when given; left empty for models without ``forward_features`` (plain passes only).

    Returns:
        (subject IDs, labels (N,), probabilities (N, K), mean loss).
    """
    sample_dropout(model, mc_pass is not None)
    want = features is not None and mc_pass is None and has_features(model)
    rows: dict[tuple[str, int], tuple[int, np.ndarray, float, np.ndarray | None]] = {}
    try:
        for batch in progress(loader, desc="val", unit="batch"):
            x, subjects, patches = batch["image"], list(batch["subject"]), batch["patch"].tolist()
            if augment is not None:
                x = augment(x, subjects, patches)
            x = x.to(precision.device, non_blocking=True)
            y = batch["label"].to(precision.device)
            if want:
                out, f = logits_and_features(model, x, precision)
                feats = f.cpu().numpy()
            else:
                out, feats = logits(model, x, precision, mc_pass, subjects, patches), [None] * len(y)
            losses = (loss_fn(out, y) if loss_fn is not None else torch.zeros(len(y))).tolist()
            probs = torch.softmax(out, dim=1).cpu().numpy()
            for sid, patch, lab, p, ls, fv in zip(subjects, patches, y.tolist(), probs, losses, feats):
                rows[(sid, int(patch))] = (int(lab), p, float(ls), fv)
    finally:
        model.eval()  # MC dropout: leave no module sampling behind
    merged: dict[tuple[str, int], tuple[int, np.ndarray, float, np.ndarray | None]] = {}
    for part in dist.gather_objects(rows):
        merged.update(part)  # DistributedSampler pads with repeats: keyed merge keeps each sample once
    keys = sorted(merged)
    sids = [k[0] for k in keys]
    probs = np.stack([merged[k][1] for k in keys]) if keys else np.zeros((0, 0))
    label_of = {k[0]: merged[k][0] for k in keys}
    mean_loss = float(np.mean([merged[k][2] for k in keys])) if keys else math.nan
    ids, agg = aggregate_patches(sids, probs)
    if want and keys:
        fids, fagg = aggregate_patches(sids, np.stack([merged[k][3] for k in keys]))
        features.update(zip(fids, np.asarray(fagg)))
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
