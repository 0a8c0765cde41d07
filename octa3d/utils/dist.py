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

from octa3d.errors import ConfigError

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


def resolve_device(device_spec: str = "auto") -> torch.device:
    """The device ``--device`` asks for, refusing one this machine does not have (never a silent CPU fallback).

    Args:
        device_spec: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        ConfigError: an unknown device string, CUDA/MPS requested where it is not available, or a GPU index
            beyond the GPUs present.
    """
    spec = device_spec.strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("--device mps: Apple's MPS backend is not available on this machine (use --device "
                              "cpu or auto)")
        return torch.device("mps")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine (use --device cpu, or "
                              f"install a CUDA build of torch: README 'Two commands')")
        index = int(spec[5:]) if ":" in spec else None
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device(spec)
    raise ConfigError(f"--device {device_spec!r}: choose auto, cpu, cuda, cuda:N (N = GPU index) or mps")


def init_from_env(device_spec: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun, and choose this process's device.

    Args:
        device_spec: ``--device`` (auto, cpu, cuda, cuda:N, mps); see :func:`resolve_device`.

    Returns:
        The device this rank computes on (``cuda:LOCAL_RANK`` under torchrun with GPUs).

    Raises:
        ConfigError: the device is unknown or not available here (:func:`resolve_device`).
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    device = resolve_device(device_spec)
    want_cuda = device.type == "cuda"
    if launched and not is_distributed():
        backend = "nccl" if want_cuda else "gloo"
        dist.init_process_group(backend=backend)
        log.info("DDP: rank %d/%d, backend %s", rank(), world_size(), backend)
    if want_cuda and launched:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


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
