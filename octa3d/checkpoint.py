"""The checkpoint format, and everything that finds, writes, reads and rebuilds a trained model.

A checkpoint rebuilds its model without the CLI: it holds the model name and kwargs, class names, input shape and
preprocessing settings next to the weights (:func:`model_record`), plus optimiser/scheduler/scaler/epoch/RNG/
early-stopping state for ``--resume``. It is written atomically (optionally on a background thread,
:class:`CheckpointWriter`) and read with ``torch.load(weights_only=True)``.

Other stages read models through this module only: :func:`find_checkpoints` (an experiment's ``best.pt`` or its
fold models), :func:`load_any_model` (octa3d checkpoints and the int8 TorchScript / ONNX files of ``--mode
compress`` with their model card), :func:`build_classifier` and :func:`checkpoint_config` (the configuration a
model is evaluated or fine-tuned under: the checkpoint's settings merged with this invocation's explicit flags,
an error for flags that contradict the model; it lives in :mod:`octa3d.checkpoint_settings`).
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

from octa3d import model_card
from octa3d.checkpoint_settings import checkpoint_config
from octa3d.config import Config, to_dict
from octa3d.errors import ConfigError, DiskFullError, Octa3dError
from octa3d.utils import dist
from octa3d.utils.io import atomic_torch_save
from octa3d.utils.seed import rng_state

log = logging.getLogger("octa3d.checkpoint")

CHECKPOINT_FORMAT = "octa3d-checkpoint-1"

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "CheckpointWriter", "build_classifier", "check_cam_capable",
           "checkpoint_config", "find_checkpoints", "fold_of", "load_any_model", "load_checkpoint", "load_models",
           "model_record", "place_models", "save_checkpoint", "unwrap"]


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
        precision: an :class:`octa3d.engine.Precision` (its GradScaler state is saved when fp16).
        early: an :class:`octa3d.optim.EarlyStopping` (its state is saved).
    """
    if not dist.is_main():
        return
    ckpt = {"format": CHECKPOINT_FORMAT, **record, "state_dict": unwrap(model).state_dict(), "epoch": epoch,
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not an octa3d checkpoint (for plain weight files use --init-from)")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{p} holds a {ckpt.get('kind')} checkpoint, expected a {kind}")
    return ckpt


def build_classifier(ckpt: dict[str, Any], path: Path | str, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a classifier from its checkpoint record and weights (eval mode, on ``device``).

    Raises:
        CheckpointError: the weights do not fit the recorded architecture.
    """
    from octa3d.model import create_model

    model = create_model(ckpt["model_name"], ckpt["dim"], ckpt["in_channels"], ckpt["num_classes"],
                         input_size=tuple(ckpt["input_shape"]), **(ckpt.get("model_kwargs") or {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {ckpt['model_name']} ({str(exc)[:200]}); the "
                              f"checkpoint is from another octa3d version or was edited") from exc
    return model.to(device).eval()


def load_any_model(path: str | Path, device: str | torch.device = "cpu", threads: int | None = None
                   ) -> tuple[nn.Module, dict[str, Any], bool]:
    """Load an octa3d classifier checkpoint or a compressed model of ``--mode compress``.

    Args:
        path: ``train/.../best.pt``, ``compress/pruned.pt`` (octa3d checkpoints, float), ``compress/model_int8.pt``
            (TorchScript int8) or ``compress/model.onnx`` / ``model_int8.onnx`` (onnxruntime).
        device: device of float PyTorch models; int8 TorchScript and ONNX models always run on the CPU.
        threads: onnxruntime intra-op threads (ONNX files only).

    Returns:
        ``(model, record, is_quantized)``. ``model`` is in eval mode and maps ``(N, C, *spatial)`` float32 to logits.
        ``record`` is checkpoint-like (``model_name``, ``dim``, ``in_channels``, ``num_classes``, ``class_names``,
        ``input_shape``, ``modality``, ``preprocess``, ``task``, ``config``; checkpoints also keep ``state_dict``
        etc.) plus ``artifact_format`` (``octa3d-checkpoint``/``torchscript``/``onnx``), ``device`` (where the
        model runs) and ``cam_capable`` (a float PyTorch model: Grad-CAM possible).

    Raises:
        CheckpointError: missing/unreadable file, or a compressed file without its model card.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"model file {p} not found")
    # a .ts export cut short no longer looks like TorchScript: its card still says what it should be
    if p.suffix.lower() == ".onnx" or model_card.is_torchscript(p) or (
            p.suffix.lower() == ".ts" and (p.parent / model_card.CARD_NAME).is_file()):
        try:
            return model_card.load_exported(p, threads)
        except model_card.CardError as exc:
            raise CheckpointError(str(exc)) from exc
    ckpt = load_checkpoint(p, kind="classifier")
    model = build_classifier(ckpt, p, torch.device(device))
    for key in ("optimizer", "scheduler", "scaler"):
        ckpt.pop(key, None)
    ckpt.update(artifact_format="octa3d-checkpoint", device=str(device), cam_capable=True)
    return model, ckpt, False


def check_cam_capable(path: str | Path, record: dict[str, Any], is_quantized: bool) -> None:
    """Refuse class activation maps for a model without float PyTorch gradients (int8 TorchScript, ONNX).

    Raises:
        ConfigError: naming the file and the float model to explain instead.
    """
    if record.get("cam_capable") and not is_quantized:
        return
    p = Path(path)
    why = ("an int8 model: quantized kernels have no gradients" if is_quantized
           else f"a {record.get('artifact_format')} model: Grad-CAM needs gradients of a PyTorch float model")
    alt = p.parent / "pruned.pt"
    hint = f"{alt} (the same network before int8 conversion)" if alt.is_file() else "the experiment's float checkpoint"
    raise ConfigError(f"--checkpoint {p}: class activation maps need a float model, and this is {why}. Explain "
                      f"{hint} or train/checkpoints/best.pt instead, or use --cam none")


# ---------------------------------------------------------------------------------------------------- finding
def fold_of(path: str | Path) -> int | None:
    """The fold number of a path inside a ``fold-k`` folder (the innermost one), or None."""
    hits = [int(m.group(1)) for part in Path(path).parts if (m := re.fullmatch(r"fold-(\d+)", part))]
    return hits[-1] if hits else None


def find_checkpoints(cfg: Config) -> list[tuple[str, Path]]:
    """The classifier checkpoint(s) to use: ``--checkpoint``, else ``train/checkpoints/best.pt``, else every
    ``train/fold-k/checkpoints/best.pt`` (an ensemble).

    Returns:
        ``[(name, path)]``; names are ``"checkpoint"``, ``"best"`` or ``"fold-k"``.

    Raises:
        CheckpointError: nothing to evaluate, or a fold without its best.pt (names the paths and the fix).
    """
    if cfg.eval.checkpoint:
        p = Path(cfg.eval.checkpoint)
        if not p.is_file():
            raise CheckpointError(f"--checkpoint {p}: file not found")
        return [("checkpoint", p)]
    train = cfg.run_dir / "train"
    single = train / "checkpoints" / "best.pt"
    if single.is_file():
        return [("best", single)]
    folds = sorted((d for d in train.glob("fold-*") if d.is_dir() and fold_of(d) is not None), key=fold_of)
    if folds:
        missing = [str(d / "checkpoints" / "best.pt") for d in folds if not (d / "checkpoints" / "best.pt").is_file()]
        if missing:
            raise CheckpointError(f"fold checkpoint(s) missing: {', '.join(missing)}; finish --mode train for "
                                  f"experiment '{cfg.exp_name}' (or pass --checkpoint FILE to use one model)")
        return [(d.name, d / "checkpoints" / "best.pt") for d in folds]
    raise CheckpointError(f"no trained model for experiment '{cfg.exp_name}': {single} does not exist (nor "
                          f"{train}/fold-k/checkpoints/best.pt). Run --mode train with the same --exp/--runs-dir "
                          f"first, or pass --checkpoint FILE")


def load_models(paths: list[tuple[str, Path]], device: torch.device | str = "cpu"
                ) -> tuple[list[tuple[str, Path, dict[str, Any], nn.Module]], dict[str, Any]]:
    """Load every model of an ensemble (:func:`load_any_model`) and check that they agree on classes, model and
    preprocessing.

    Returns:
        ``[(name, path, record, model)]`` and the first record (the reference); records get ``is_quantized``.
    """
    out = []
    ref: dict[str, Any] | None = None
    for name, path in paths:
        model, rec, is_q = load_any_model(path, device)
        rec["is_quantized"] = is_q
        if ref is None:
            ref = rec
        else:
            for key in ("class_names", "model_name", "dim", "in_channels", "input_shape", "modality", "preprocess"):
                if rec.get(key) != ref.get(key):
                    raise CheckpointError(f"{path}: {key} {rec.get(key)!r} differs from {paths[0][1]} "
                                          f"({ref.get(key)!r}); fold checkpoints of one ensemble must match")
        out.append((name, Path(path), rec, model))
    if ref is None:
        raise CheckpointError("no model to load")
    return out, ref


def place_models(models: list[tuple[str, Path, dict[str, Any], nn.Module]], device: torch.device
                 ) -> torch.device:
    """Move float models to ``device``; int8 TorchScript and ONNX models run on the CPU, and so does the whole
    evaluation when one is in the set. Returns the device inputs go to."""
    if any(rec["device"] == "cpu" and not rec["cam_capable"] for _, _, rec, _ in models):
        if device.type != "cpu":
            log.info("evaluating on the CPU: %s runs on the CPU only", models[0][1].name)
        return torch.device("cpu")
    for _, _, _, model in models:
        model.to(device)
    return device
