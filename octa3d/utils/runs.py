"""Experiment run folders: ``runs/<exp>/`` with config, command, environment, log and one folder per stage.

Layout (see README "Run folder")::

    runs/<exp>/config.yaml  command.txt  environment.txt  octa3d.log
               splits/  ae_pretrain/  train/  test/  compress/

A stage folder that already holds results is never silently replaced: :func:`stage_dir` refuses and names
``--overwrite``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import platform
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from octa3d.config import Config, to_yaml
from octa3d.errors import RunExistsError
from octa3d.utils.io import atomic_write_text
from octa3d.utils.log import add_file_log

log = logging.getLogger("octa3d.runs")

#: Packages whose versions are recorded in environment.txt.
RECORDED_PACKAGES = (
    "octa3d", "torch", "monai", "numpy", "SimpleITK", "nibabel", "scikit-image", "scipy", "scikit-learn",
    "pandas", "openpyxl", "tensorboard", "medcam", "torchao", "onnx", "onnxruntime",
)


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
    """Create/refresh ``runs/<exp>/``: config.yaml, command.txt (appended), environment.txt, log file.

    The root ``config.yaml`` holds the configuration of the latest invocation; every stage also copies its own
    into its folder, so each result can be traced to the exact settings that produced it.

    Returns:
        The run folder.
    """
    run = cfg.run_dir
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


def stage_dir(cfg: Config, stage: str, *, resume: bool = False) -> Path:
    """Return a fresh folder ``runs/<exp>/<stage>/``, refusing to replace existing results.

    Args:
        cfg: the configuration (``--overwrite`` is read from it).
        stage: stage name, e.g. ``"ae_pretrain"``.
        resume: keep the existing folder (training resume).

    Raises:
        RunExistsError: the folder holds files and neither ``--overwrite`` nor ``resume`` was given.
    """
    path = cfg.run_dir / stage
    if path.exists() and any(path.iterdir()) and not resume:
        if not cfg.run.overwrite:
            raise RunExistsError(
                f"{path} already holds results of an earlier '{stage}' run; pass --overwrite to replace them, "
                f"or choose another experiment name with --exp")
        log.warning("--overwrite: removing earlier results in %s", path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.yaml", to_yaml(cfg))
    atomic_write_text(path / "command.txt", command_line(cfg) + "\n")
    return path
