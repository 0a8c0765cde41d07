"""What every training loop records: per-epoch history CSV, TensorBoard, progress bars (rank 0 only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from octa3d.utils import dist
from octa3d.utils.io import atomic_write_csv


@dataclass
class History:
    """Per-epoch metrics, rewritten atomically to ``history.csv`` after every epoch."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch and rewrite the CSV (rank 0 only)."""
        self.rows = [r for r in self.rows if r.get("epoch") != row.get("epoch")] + [row]
        if dist.is_main():
            atomic_write_csv(self.path, pd.DataFrame(self.rows))

    def load(self) -> None:
        """Read an existing history (resume)."""
        if self.path.exists():
            self.rows = pd.read_csv(self.path).to_dict("records")


def tensorboard_writer(folder: Path) -> Any:
    """A SummaryWriter on rank 0, else a no-op stand-in (so callers need no rank checks)."""
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
    x = volumes[:max_items, :1].detach().float().cpu()
    if x.ndim == 5:
        x = x[:, :, x.shape[2] // 2]
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return torch.cat(list(x), dim=-1)


def progress(iterable: Any, **kw: Any) -> Any:
    """tqdm on rank 0 only (quiet in other ranks)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not dist.is_main(), dynamic_ncols=True, leave=False, **kw)
