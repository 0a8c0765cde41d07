"""The checkpoint format: what a checkpoint holds (:func:`model_record`), writing it atomically (optionally on a
background thread, :class:`CheckpointWriter`) and reading it safely (``torch.load(weights_only=True)``).

A checkpoint rebuilds its model without the CLI: it holds the model name and kwargs, class names, input shape and
preprocessing settings next to the weights, plus optimiser/scheduler/scaler/epoch/RNG/early-stopping state for
``--resume``. It carries its format (:data:`CHECKPOINT_FORMAT`) and the octa3d version that wrote it, so that a
file written by a newer octa3d gets an error naming that version instead of a failure deep in the model code.
"""

from __future__ import annotations

import io
import logging
import pickle
import pickletools
import re
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from octa3d import __version__
from octa3d.config import Config, to_dict
from octa3d.errors import DiskFullError, Octa3dError
from octa3d.utils import dist
from octa3d.utils.io import atomic_torch_save
from octa3d.utils.seed import rng_state

log = logging.getLogger("octa3d.checkpoint")


#: The format this code writes and the newest it reads. Raise it when a change makes old readers misread a file
#: (a renamed record key, another state-dict layout) and teach :func:`load_checkpoint` to read the old one.
CHECKPOINT_VERSION = 1
CHECKPOINT_FORMAT = f"octa3d-checkpoint-{CHECKPOINT_VERSION}"
_FORMAT_RE = re.compile(r"octa3d-checkpoint-(\d+)")


class CheckpointError(Octa3dError):
    """A checkpoint is missing, truncated, corrupt or of the wrong kind."""


# ---------------------------------------------------------------------------------------------------- writing
def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_record(cfg: Config, class_names: list[str] | None, kind: str) -> dict[str, Any]:
    """What rebuilds the model and its inputs without the CLI (``kind``: "classifier" or "autoencoder")."""
    return {
        "kind": kind,
        "model_name": cfg.model.model,
        "dim": cfg.model.dim,
        "in_channels": cfg.in_channels,
        "num_classes": len(class_names) if class_names else 0,
        "class_names": list(class_names or []),
        "input_shape": list(cfg.input_shape),
        "modality": cfg.data.modality,
        "preprocess": to_dict(cfg)["preprocess"],
        "task": cfg.data.task,
    }


def _snapshot(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are detached CPU copies (nested dicts, lists and tuples followed)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on one background thread, so that training goes on while a checkpoint reaches the disk.

    :func:`save_checkpoint` with ``writer=`` snapshots the checkpoint's tensors into CPU memory on the calling
    thread (training may change the live ones at once) and queues the atomic write; writes happen in order.
    :meth:`submit` first waits while ``max_pending`` writes are queued, which bounds the memory held by snapshots.
    :meth:`close` (also on leaving a ``with`` block) waits for every write; a failed write raises
    :class:`CheckpointError` there, or at the next :meth:`submit`. When the block is left by an exception, the
    writes still finish (the previous epoch's ``last.pt`` stays complete for ``--resume``) and a write error is
    logged rather than hiding that exception.
    """

    def __init__(self, max_pending: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="octa3d-checkpoint")
        self._futures: list[Future] = []
        self.max_pending = max_pending

    def submit(self, obj: Any, path: Path) -> None:
        """Queue ``atomic_torch_save(obj, path)`` (``obj`` must no longer change)."""
        # one worker thread: writes finish in order, so the finished ones are at the front
        while self._futures and (self._futures[0].done() or len(self._futures) >= self.max_pending):
            self._result(self._futures.pop(0))
        self._futures.append(self._pool.submit(atomic_torch_save, obj, path))

    @staticmethod
    def _result(future: Future) -> None:
        try:
            future.result()
        except DiskFullError:
            raise  # already one line naming the file
        except Exception as exc:
            raise CheckpointError(f"writing a checkpoint failed: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Wait for all queued writes; raise :class:`CheckpointError` for the first that failed."""
        futures, self._futures = self._futures, []
        try:
            for f in futures:
                self._result(f)
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as err:
            log.error("%s (while stopping after %s)", err, exc_type.__name__)


def save_checkpoint(path: Path, model: nn.Module, record: dict[str, Any], *, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    precision: Any = None, early: Any = None, metrics: dict[str, float] | None = None,
                    config: Config | None = None, writer: CheckpointWriter | None = None) -> None:
    """Write a checkpoint atomically (rank 0 only). ``record`` may carry extra entries (tensors/primitives).

    Without ``optimizer``/``scheduler``/``precision`` the checkpoint holds the weights and their record only
    (enough for test/explain/compress, not for ``--resume``). With ``writer`` the write happens in the background
    (see :class:`CheckpointWriter`); the file appears once the write is done.

    Args:
        precision: an :class:`octa3d.training.precision.Precision` (its GradScaler state is saved when fp16).
        early: an :class:`octa3d.training.optim.EarlyStopping` (its state is saved).
    """
    if not dist.is_main():
        return
    ckpt = {"format": CHECKPOINT_FORMAT, "octa3d_version": __version__, **record,
            "state_dict": unwrap(model).state_dict(), "epoch": epoch,
            "metrics": dict(metrics or {}), "rng": rng_state()}
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if precision is not None and precision.scaler is not None:
        ckpt["scaler"] = precision.scaler.state_dict()
    if early is not None:
        ckpt["early_stopping"] = early.state_dict()
    if config is not None:
        ckpt["config"] = to_dict(config)
    if writer is None:
        atomic_torch_save(ckpt, path)
    else:
        writer.submit(_snapshot(ckpt), path)


# ---------------------------------------------------------------------------------------------------- reading
# torch's weights-only unpickler refuses what it does not allow with these words (GLOBAL os.system, a class ...)
_REFUSED = re.compile(r"unsupported global|not an allowed global|is blocked|unsupported class", re.IGNORECASE)


def _pickle_imports(p: Path) -> list[str] | None:
    """What the pickle(s) in ``p`` import, parsed with :mod:`pickletools` (never run); None unless well-formed.

    A torch zip archive's ``data.pkl`` is parsed; a legacy file is a few pickles in a row.
    """
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = p.read_bytes()
        stream, found = io.BytesIO(data), []
        for _ in range(8):  # the legacy format holds 4 pickles (magic, version, system info, the object)
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(".".join(strings[-2:]))
                if isinstance(arg, str):
                    strings.append(arg)
            if stream.tell() >= len(data) or data[stream.tell():stream.tell() + 1] not in (b"\x80", b"("):
                break
        return found
    except Exception:  # noqa: BLE001 - not a well-formed pickle: damaged, not refused
        return None


def _load_error(p: Path, exc: Exception) -> CheckpointError:
    """A refused (possibly malicious) pickle is not a damaged file: say which one it is."""
    imports: list[str] | None = None
    if isinstance(exc, pickle.UnpicklingError):
        imports = _pickle_imports(p)
        if not _REFUSED.search(str(exc)) and not imports:  # e.g. "Unsupported operand" of random bytes
            imports = None
    if imports is not None:
        allowed = ("torch.", "collections.OrderedDict", "builtins.set", "numpy.")
        odd = [i for i in dict.fromkeys(imports) if not i.startswith(allowed)] or imports
        what = f": it imports {', '.join(odd[:3])}" if odd else ""
        return CheckpointError(f"checkpoint {p} refused: the file contains code/objects that weights_only loading "
                               f"does not allow (possibly malicious{what}); nothing in it was run. Use only "
                               "checkpoints written by octa3d from a source you trust")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(Check the documentation|$)", str(exc), re.DOTALL)
    detail = detail.group(1) if detail else str(exc)  # torch's long weights_only preamble says nothing here
    return CheckpointError(f"checkpoint {p} is corrupt or partially written ({type(exc).__name__}: "
                           f"{' '.join(detail.split())[:120]}); delete it and re-run the stage (or resume from "
                           "another checkpoint)")


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``).

    Args:
        path: checkpoint file.
        kind: expected ``kind`` ("classifier"/"autoencoder"), or None to accept any.

    Raises:
        CheckpointError: missing, truncated/corrupt, refused by ``weights_only`` (objects or code other than
            tensors and containers: possibly malicious, never run), not an octa3d checkpoint, or of another kind.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated zips / bad pickles
        raise _load_error(p, exc) from exc
    fmt = _FORMAT_RE.fullmatch(str(ckpt.get("format"))) if isinstance(ckpt, dict) else None
    if fmt is None:
        raise CheckpointError(f"{p} is not an octa3d checkpoint (for plain weight files use --init-from)")
    if int(fmt.group(1)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {p} was written by octa3d {ckpt.get('octa3d_version', '(unknown)')} in "
                              f"format {fmt.group(1)}; this octa3d {__version__} reads formats up to "
                              f"{CHECKPOINT_VERSION}: upgrade octa3d to use it")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{p} holds a {ckpt.get('kind')} checkpoint, expected a {kind}")
    return ckpt
