"""What every training loop records: per-epoch history CSV, TensorBoard, progress bars (rank 0, terminals only),
and the console's "Next:" hints, written as the command the user actually ran (:func:`next_command`)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from octa3d.config import Config, get_value, to_argv
from octa3d.utils.io import atomic_write_csv, read_csv

if TYPE_CHECKING:
    import torch

# torch, pandas and the distributed helpers (octa3d.utils.dist imports torch) are imported where used: the CLI
# imports this module for its hints, and `octa3d` without arguments / --help must not wait for torch.


@dataclass
class History:
    """Per-epoch metrics, rewritten atomically to ``history.csv`` after every epoch (a full disk stops the run with
    :class:`~octa3d.errors.DiskFullError` naming the file; the previous ``history.csv`` stays intact)."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch and rewrite the CSV (rank 0 only)."""
        import pandas as pd

        from octa3d.utils import dist
        self.rows = [r for r in self.rows if r.get("epoch") != row.get("epoch")] + [row]
        if dist.is_main():
            atomic_write_csv(self.path, pd.DataFrame(self.rows))

    def load(self) -> None:
        """Read an existing history (resume); text cells come back as written (see ``atomic_write_csv``)."""
        if self.path.exists():
            self.rows = read_csv(self.path).to_dict("records")


def tensorboard_writer(folder: Path) -> Any:
    """A SummaryWriter on rank 0, else a no-op stand-in (so callers need no rank checks)."""
    from octa3d.utils import dist

    if not dist.is_main():
        class _Null:
            def __getattr__(self, _name: str) -> Any:
                return lambda *a, **k: None

        return _Null()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))


def slice_grid(volumes: torch.Tensor, max_items: int = 4) -> torch.Tensor:
    """Central slices (along the first spatial axis for 3D) of up to ``max_items`` samples, first channel,
    min-max scaled, stacked side by side as a (1, H, W*n) image for TensorBoard."""
    import torch

    x = volumes[:max_items, :1].detach().float().cpu()
    if x.ndim == 5:
        x = x[:, :, x.shape[2] // 2]
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return torch.cat(list(x), dim=-1)


def progress_enabled(stream: Any = None) -> bool:
    """Progress bars only on rank 0 and only when ``stream`` (default stderr) is a terminal: a redirected log
    would otherwise fill with carriage-return updates."""
    from octa3d.utils import dist

    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        tty = False
    return dist.is_main() and tty


def progress(iterable: Any, **kw: Any) -> Any:
    """tqdm on rank 0 when stderr is a terminal; a pass-through iterator otherwise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress_enabled(), dynamic_ncols=True, leave=False, **kw)


# ---------------------------------------------------------------------------------------------- console hints
def cli_program(argv0: str | None = None) -> str:
    """How the user started octa3d, to repeat in hints: ``octa3d`` (the console script), ``python <path>/main.py``
    or ``python -m octa3d.cli``; ``python main.py`` when it cannot be told (e.g. called from Python)."""
    arg = sys.argv[0] if argv0 is None and sys.argv else (argv0 or "")
    name = Path(arg).name
    if name in ("octa3d", "octa3d.exe", "octa3d-script.py"):
        return "octa3d"
    if name == "main.py":
        return "python " + shlex.quote(arg)
    if name == "cli.py" and Path(arg).parent.name == "octa3d":
        return "python -m octa3d.cli"
    return "python main.py"


def _config_file(argv: Iterable[str] | None) -> str | None:
    args = list(argv or ())
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def next_command(cfg: Any, mode: str, keep: Iterable[str] = (), extra: Iterable[str] = ()) -> str:
    """The command that runs ``mode`` on this experiment next, as the user would type it.

    It names the program actually run (:func:`cli_program`) and repeats ``--config``, ``--exp``, and
    ``--runs-dir`` / ``--data-root`` whenever they are not the defaults (so the next stage finds this one's
    outputs), plus the explicit options among ``keep`` (e.g. the model settings that a later stage must match).

    Args:
        cfg: this stage's :class:`~octa3d.config.Config`.
        mode: the ``--mode`` of the next command.
        keep: config field names repeated when the user gave them.
        extra: further arguments appended as they are.
    """
    default = Config()
    args: list[str] = []
    config = _config_file(cfg.argv if cfg.argv is not None else sys.argv[1:])
    if config:
        args += ["--config", config]
    args += ["--mode", mode, "--exp", cfg.exp_name]
    if cfg.is_explicit("runs_dir") or cfg.run.runs_dir != default.run.runs_dir:
        args += ["--runs-dir", str(cfg.run.runs_dir)]
    if cfg.is_explicit("data_root") or cfg.data.data_root != default.data.data_root:
        args += ["--data-root", str(cfg.data.data_root)]
    args += to_argv({name: get_value(cfg, name) for name in keep
                     if cfg.is_explicit(name) and name not in ("mode", "exp", "runs_dir", "data_root")})
    return " ".join([cli_program(), *(shlex.quote(a) for a in [*args, *extra])])


def rerun_command(cfg: Any, add: Iterable[str] = (), drop: Iterable[str] = ()) -> str:
    """The command of this invocation again (``cfg.argv``, as :func:`cli_program` runs it), without the flags in
    ``drop`` (and their values) and with ``add`` appended where missing (e.g. ``--resume``)."""
    args = list(cfg.argv if cfg.argv is not None else sys.argv[1:])
    dropped = set(drop)
    kept: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in dropped:  # the flag and its value (a following token that is not a flag)
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        if a.split("=", 1)[0] in dropped:
            continue
        kept.append(a)
    kept += [a for a in add if a not in kept]
    return " ".join([cli_program(), *(shlex.quote(a) for a in kept)])
