"""The baseline of the data-pipeline benchmark: a training loader as older OCTA code writes it.

Every ``__getitem__`` re-reads the subject's B-scan BMPs with SimpleITK straight into float32, clips each volume
at its percentiles (``np.percentile`` on the whole float volume), scales it to 0..1 and resizes the *whole* volume
to the input size with trilinear interpolation. Nothing is cached, so every epoch pays the full cost; the loader
uses batch 1 and no worker processes. It applies no augmentation, which only flatters it.

Used by ``benchmarks/data_pipeline.py``; not part of the package.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


def _bmp_files(folder: str | Path) -> list[str]:
    """The folder's ``.bmp`` files in numeric order (``10.bmp`` after ``9.bmp``)."""
    files = [p for p in Path(folder).iterdir() if p.suffix.lower() == ".bmp"]
    return [str(p) for p in sorted(files, key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))]


def naive_volume(folder: str | Path, input_size: Sequence[int], percentiles: Sequence[float]) -> torch.Tensor:
    """Read one BMP stack as float32, clip/scale it at its percentiles and resize it: ``(*input_size)`` float32.

    Args:
        folder: a folder of numbered BMP B-scans.
        input_size: output spatial size.
        percentiles: ``(low, high)`` clip percentiles in 0..100.
    """
    vol = sitk.GetArrayFromImage(sitk.ReadImage(_bmp_files(folder), sitk.sitkFloat32))
    lo, hi = np.percentile(vol, list(percentiles))
    vol = np.clip((vol - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)
    t = torch.from_numpy(vol)[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in input_size), mode="trilinear", align_corners=False)[0, 0]


class NaiveOCTADataset(Dataset):
    """OCTA-500 subjects re-read and re-normalised on every access.

    Args:
        items: ``(folders, label)`` per subject, ``folders`` = one BMP folder per channel (e.g. OCT, OCTA).
        input_size: network input size.
        percentiles: clip percentiles.
    """

    def __init__(self, items: Sequence[tuple[Sequence[str], int]], input_size: Sequence[int],
                 percentiles: Sequence[float] = (0.5, 99.5)) -> None:
        self.items, self.input_size, self.percentiles = list(items), tuple(input_size), tuple(percentiles)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        folders, label = self.items[i]
        image = torch.stack([naive_volume(f, self.input_size, self.percentiles) for f in folders])
        return {"image": image, "label": torch.tensor(label, dtype=torch.int64)}


def naive_loader(items: Sequence[tuple[Sequence[str], int]], input_size: Sequence[int],
                 percentiles: Sequence[float] = (0.5, 99.5), seed: int = 0) -> DataLoader:
    """A shuffled DataLoader over :class:`NaiveOCTADataset` with batch 1 and no workers."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(NaiveOCTADataset(items, input_size, percentiles), batch_size=1, shuffle=True,
                      num_workers=0, generator=gen)
