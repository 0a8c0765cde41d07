"""Distributed training with torchrun + DDP (NCCL on GPU, gloo on CPU).

``torchrun --nproc_per_node=N main.py --mode train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; without them everything
runs as a single process and these helpers are no-ops.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("octa3d.dist")


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 logs, writes checkpoints and TensorBoard events."""
    return rank() == 0


def init_from_env(device_spec: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun, and choose this process's device.

    Args:
        device_spec: ``--device`` (auto, cpu, cuda, cuda:N).

    Returns:
        The device this rank computes on (``cuda:LOCAL_RANK`` under torchrun with GPUs).
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    want_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if device_spec.startswith("cuda") and not torch.cuda.is_available():
        from octa3d.errors import ConfigError

        raise ConfigError(f"--device {device_spec}: CUDA is not available on this machine (use --device cpu)")
    if launched and not is_distributed():
        backend = "nccl" if want_cuda else "gloo"
        dist.init_process_group(backend=backend)
        log.info("DDP: rank %d/%d, backend %s", rank(), world_size(), backend)
    if want_cuda:
        if launched:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device(device_spec if device_spec != "auto" else "cuda")
    return torch.device("cpu")


def barrier() -> None:
    """Synchronise ranks (no-op when single-process)."""
    if is_distributed():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' ``obj`` in rank order (``[obj]`` when single-process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Destroy the process group at the end of a run."""
    if is_distributed():
        dist.destroy_process_group()
