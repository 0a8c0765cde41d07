"""How a model runs on its device: mixed precision (:class:`Precision`), channels-last memory format and the
DDP / ``torch.compile`` wrapper — shared by the training loop and every forward pass of evaluation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from octa3d.config import Config
from octa3d.utils import dist


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
