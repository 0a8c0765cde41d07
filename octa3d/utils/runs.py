"""Experiment run folders: ``runs/<exp>/`` with config, command, environment, log and one folder per stage.

Layout (see README "Run folder")::

    runs/<exp>/config.yaml  command.txt  environment.txt  octa3d.log  .lock (while a run is active)
               splits/  ae_pretrain/  train/  test/  compress/  explain/<name>/

**One run per experiment.** :func:`~octa3d.utils.lock.lock_experiment` (called by :func:`init_run` and
:func:`stage_dir`; rank 0 only under torchrun) creates ``runs/<exp>/.lock`` (PID, host, start time, mode, command)
before anything is written; a second run is refused naming the owner, so ``--overwrite`` never deletes a live
run's folder. A lock whose PID is dead on this host (kill -9) is taken over with a warning; it is released when
the stage returns (:func:`~octa3d.utils.lock.releases_locks`) or at exit. Taking it removes the temporary files
that interrupted atomic writes left in the experiment (``.<name>.<hex>.tmp*``, e.g. a kill during a checkpoint
write).

**A stage folder holds results only when the stage finished**: :meth:`StageFolder.finish` writes ``.complete``
last (atomically). A folder without it is unfinished and never blocks a retry, except an interrupted training
with a ``last.pt``, which is refused offering ``--resume`` (or ``--overwrite`` to start over).

**Earlier results are replaced only by finished ones**: :func:`stage_dir` plans the folder a run writes into:

* test, explain, compress: always ``.<stage>.partial/`` beside the stage folder, swapped into place by
  :meth:`StageFolder.finish` (old folder renamed to ``.<stage>.old``, new one renamed in, old one deleted). A
  failed or interrupted run thus leaves the previous results as they were; its partial folder is dropped.
* ae_pretrain, train: in place when there are no finished results (so ``--resume`` finds ``last.pt`` where it
  was); with ``--overwrite`` over finished results, in ``.<stage>.partial/`` and swapped in at the end. An
  interrupted ``--overwrite`` run keeps its partial folder: ``--resume`` continues it there (before the finished
  folder), ``--overwrite`` starts it over. ``--resume`` in place removes ``.complete`` until the run finishes.

A kill between the two renames of a swap is repaired by the next :func:`stage_dir` of that stage. Every flag is
validated by the stages before :func:`stage_dir` removes anything (:func:`plan_stage` refuses without writing).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from octa3d.config import Config, to_yaml
from octa3d.errors import RunExistsError
from octa3d.utils.io import atomic_write_json, atomic_write_text
from octa3d.utils.lock import lock_experiment, release_locks, releases_locks
from octa3d.utils.log import add_file_log

log = logging.getLogger("octa3d.runs")

#: Packages whose versions are recorded in environment.txt.
RECORDED_PACKAGES = (
    "octa3d", "torch", "monai", "numpy", "SimpleITK", "nibabel", "scikit-image", "scipy", "scikit-learn",
    "pandas", "openpyxl", "tensorboard", "medcam", "torchao", "onnx", "onnxruntime",
)
#: Written last into a stage folder: the stage finished.
MARKER = ".complete"
#: Results files that finished stages of earlier octa3d versions (without ``MARKER``) wrote last.
LEGACY_DONE = ("metrics.json", "report.json", "prediction.json", "summary.json")

__all__ = ["command_line", "environment_text", "experiments_over", "init_run", "is_complete",
           "last_checkpoints", "lock_experiment", "plan_stage", "release_locks", "releases_locks", "resume_folder",
           "shared_stage_dir", "stage_dir", "StageFolder"]


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    if out.returncode != 0:
        return "unknown (not a git checkout)"
    return out.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def environment_text() -> str:
    """Package versions, Python, platform, CUDA and git commit, one ``key: value`` per line."""
    import torch

    lines = [
        f"date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"host: {socket.gethostname()}",
        f"python: {sys.version.split()[0]}",
        f"platform: {platform.platform()}",
        f"git_commit: {_git_commit()}",
        f"cuda_available: {torch.cuda.is_available()}",
        f"cuda_version: {torch.version.cuda}",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpus: {', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))}")
    for pkg in RECORDED_PACKAGES:
        try:
            lines.append(f"{pkg}: {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{pkg}: not installed")
    return "\n".join(lines) + "\n"


def command_line(cfg: Config) -> str:
    """The command as typed (shell-quoted): ``cfg.argv``, else this process's ``sys.argv``."""
    args = sys.argv if cfg.argv is None else ["main.py", *cfg.argv]
    return " ".join(shlex.quote(a) for a in args)


def init_run(cfg: Config) -> Path:
    """Lock and create/refresh ``runs/<exp>/``: config.yaml, command.txt (appended), environment.txt, log file.

    The root ``config.yaml`` holds the configuration of the latest invocation; every stage also copies its own
    into its folder, so each result can be traced to the exact settings that produced it.

    Returns:
        The run folder.

    Raises:
        RunExistsError: another run is active on the experiment (see :func:`lock_experiment`).
    """
    run = cfg.run_dir
    lock_experiment(cfg)
    run.mkdir(parents=True, exist_ok=True)
    add_file_log(run / "octa3d.log")
    atomic_write_text(run / "config.yaml", to_yaml(cfg))
    cmd_file = run / "command.txt"
    previous = cmd_file.read_text(encoding="utf-8") if cmd_file.exists() else ""
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    atomic_write_text(cmd_file, previous + f"# {stamp} mode={cfg.run.mode}\n{command_line(cfg)}\n")
    atomic_write_text(run / "environment.txt", environment_text())
    log.info("Experiment folder: %s", run)
    return run


def experiments_over(runs_dir: Path, data_root: str, exclude: str | None = None) -> dict[str, dict]:
    """The experiments of ``runs_dir`` whose splits were made over ``data_root``.

    Args:
        runs_dir: the runs folder (``--runs-dir``).
        data_root: the resolved data root, as recorded in ``splits/split.json`` settings.
        exclude: an experiment name to leave out (the current one).

    Returns:
        Experiment name → its split settings, sorted by name; unreadable split files are skipped.
    """
    out: dict[str, dict] = {}
    if not runs_dir.is_dir():
        return out
    for record in sorted(runs_dir.glob("*/splits/split.json")):
        name = record.parent.parent.name
        if name == exclude or name.startswith("."):
            continue
        try:
            settings = json.loads(record.read_text(encoding="utf-8")).get("settings", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(settings, dict) and settings.get("data_root") == data_root:
            out[name] = settings
    return out


# ------------------------------------------------------------------------------------------------ stage folders
def _sibling(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds the results of a finished stage (``.complete``, or a legacy results file)."""
    return (folder / MARKER).is_file() or any((folder / f).is_file() for f in LEGACY_DONE)


def last_checkpoints(folder: Path) -> list[Path]:
    """The ``last.pt`` files of a training folder (``checkpoints/`` and ``fold-k/checkpoints/``)."""
    if not folder.is_dir():
        return []
    return sorted([*folder.glob("checkpoints/last.pt"), *folder.glob("fold-*/checkpoints/last.pt")])


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def resume_folder(cfg: Config, stage: str) -> Path | None:
    """The folder ``--resume`` continues: an interrupted ``--overwrite`` run's partial folder, else the stage
    folder, when it holds a ``last.pt``; None when there is nothing to resume."""
    final = cfg.run_dir / stage
    for folder in (_sibling(final, "partial"), final):
        if last_checkpoints(folder):
            return folder
    return None


def plan_stage(cfg: Config, stage: str, *, training: bool = False, hint: str = "") -> tuple[Path, str]:
    """Where a stage run writes, without touching anything: ``(folder, action)``, action ``"resume"``,
    ``"fresh"`` or ``"replace"`` (see the module docstring).

    Raises:
        RunExistsError: finished results without ``--overwrite``, or an interrupted training without
            ``--resume``/``--overwrite`` (the message offers both).
    """
    final = cfg.run_dir / stage
    partial = _sibling(final, "partial")
    if training and cfg.train.resume:
        folder = resume_folder(cfg, stage)
        if folder is not None:
            return folder, "resume"
    if training and last_checkpoints(partial) and not cfg.run.overwrite:
        raise RunExistsError(
            f"{partial} holds an interrupted --overwrite run of '{stage}' ({final} keeps the earlier results): "
            f"continue it with --resume, or pass --overwrite to start it over")
    if is_complete(final):
        if not cfg.run.overwrite:
            raise RunExistsError(
                f"{final} already holds results of a finished '{stage}' run; pass --overwrite to replace them (they "
                f"are kept until the new run has finished){hint}, or choose another experiment name with --exp")
        return partial, "replace"
    if training:
        lasts = last_checkpoints(final)
        if lasts and not cfg.run.overwrite:
            raise RunExistsError(
                f"{final} holds an interrupted '{stage}' run ({', '.join(str(p.relative_to(final)) for p in lasts)}"
                f"): continue it with --resume (same settings; more --epochs allowed), or pass --overwrite to start "
                f"over")
        return final, "fresh"
    return partial, "fresh"


@dataclass
class StageFolder:
    """A stage run's output folder: ``path`` is written, ``final`` is where the results end up.

    Use as a context manager: leaving it by an exception drops a partial folder (a training's one is kept when it
    holds a resumable ``last.pt``); :meth:`finish` marks the results complete and swaps them into place.
    """

    final: Path
    path: Path
    training: bool = False
    owner: bool = True  # False on torchrun ranks other than 0: they only read ``path``

    def __enter__(self) -> StageFolder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self.owner and self.path != self.final and self.path.exists():
            if self.training and last_checkpoints(self.path):
                log.warning("the interrupted run is kept in %s: continue it with --resume", self.path)
            else:
                shutil.rmtree(self.path, ignore_errors=True)  # the earlier results in final stay as they were

    def rebase(self, obj: Any) -> Any:
        """``obj`` (JSON-like) with paths inside ``path`` rewritten to ``final``, for files written to record."""
        if isinstance(obj, dict):
            return {k: self.rebase(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.rebase(v) for v in obj]
        if isinstance(obj, str) and self.path != self.final and obj.startswith(str(self.path)):
            return str(self.final) + obj[len(str(self.path)):]
        return obj

    def finish(self, cfg: Config) -> Path:
        """Write ``.complete`` (last, atomically) and move the results into ``final``; returns ``final``."""
        if not self.owner:
            return self.final
        atomic_write_json(self.path / MARKER, {"finished": _dt.datetime.now().isoformat(timespec="seconds"),
                                               "mode": cfg.run.mode, "command": command_line(cfg)})
        if self.path != self.final:
            _swap(self.path, self.final)
        return self.final


def _swap(new: Path, final: Path) -> None:
    """Replace ``final`` by ``new``: old renamed aside, new renamed in, old deleted (repaired by :func:`_recover`)."""
    old = _sibling(final, "old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _recover(final: Path) -> None:
    """Finish a swap a kill interrupted: complete new results, else the previous ones, back under ``final``."""
    if final.exists():
        return
    partial, old = _sibling(final, "partial"), _sibling(final, "old")
    for folder in (partial, old):
        if (folder / MARKER).is_file():
            log.warning("restoring %s from %s (an earlier run was interrupted while replacing it)", final, folder)
            os.rename(folder, final)
            return


def stage_dir(cfg: Config, stage: str, *, training: bool = False, hint: str = "") -> StageFolder:
    """Prepare the folder a stage run writes into (see the module docstring), with its config.yaml and
    command.txt; call only after every flag and input was validated.

    Args:
        cfg: the configuration (``--overwrite``, ``--resume`` are read from it).
        stage: stage folder relative to the experiment, e.g. ``"train"`` or ``"explain/<name>"``.
        training: ae_pretrain/train (writes in place when possible, keeps resumable runs).
        hint: appended to the refusal message.

    Raises:
        RunExistsError: see :func:`plan_stage` and :func:`lock_experiment`.
    """
    lock_experiment(cfg)
    final = cfg.run_dir / stage
    _recover(final)
    path, action = plan_stage(cfg, stage, training=training, hint=hint)
    old, partial = _sibling(final, "old"), _sibling(final, "partial")
    if old.exists():
        shutil.rmtree(old)
    if partial.exists() and (path != partial or action != "resume"):
        shutil.rmtree(partial)  # a failed or abandoned run's partial output
    if action == "fresh" and path == final and _has_files(final):
        log.warning("removing the unfinished output of an earlier '%s' run in %s", stage, final)
        shutil.rmtree(final)
    elif action == "replace":
        log.warning("--overwrite: %s is replaced once this run has finished", final)
    if action == "resume":
        for name in (MARKER, *LEGACY_DONE):  # unfinished again until this run ends
            (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.yaml", to_yaml(cfg))
    atomic_write_text(path / "command.txt", command_line(cfg) + "\n")
    return StageFolder(final, path, training)


def shared_stage_dir(cfg: Config, stage: str, *, training: bool = False) -> StageFolder:
    """:func:`stage_dir` on rank 0; every rank gets rank 0's folder (a collective call under torchrun)."""
    from octa3d.utils import dist  # imports torch: the CLI imports this module, and --help must stay fast

    folder = stage_dir(cfg, stage, training=training) if dist.is_main() else None
    path = Path(dist.gather_objects(str(folder.path) if folder else None)[0])
    return folder or StageFolder(cfg.run_dir / stage, path, training, owner=False)
