"""The inference loop of an exported octa3d MONAI bundle (``scripts/inference.py`` in the bundle).

``configs/inference.json`` builds the MONAI pieces (dataset with the preprocessing transforms, the TorchScript
network, the post-processing) and its ``run`` expression calls :func:`predict`. A plain loop instead of MONAI's
ignite-based ``SupervisedEvaluator``: the bundle then needs only MONAI, PyTorch, NumPy, nibabel and ``fire``
(``python -m monai.bundle``'s command line). Must not import octa3d.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("octa3d_bundle")

#: Volume files the bundle reads (MONAI's LoadImaged with nibabel).
SUFFIXES = (".nii", ".nii.gz")


def find_inputs(path: str | Sequence[str]) -> list[dict[str, str]]:
    """The datalist of ``dataset_dir``: one NIfTI file, a folder of them (sorted), or a list of files.

    Raises:
        FileNotFoundError: nothing to read, naming the path.
    """
    if not isinstance(path, (str, os.PathLike)):
        return [{"image": str(p)} for p in path]
    p = Path(path)
    if p.is_file():
        return [{"image": str(p)}]
    files = sorted(f for f in p.glob("*") if f.is_file() and f.name.lower().endswith(SUFFIXES)) if p.is_dir() else []
    if not files:
        raise FileNotFoundError(f"dataset_dir {p}: no .nii/.nii.gz volume there; pass --dataset_dir FILE_OR_FOLDER")
    return [{"image": str(f)} for f in files]


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, then rename (no half-written output)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def predict(dataset: Sequence[dict[str, Any]], network: torch.nn.Module, postprocessing: Callable,
            class_names: Sequence[str], output_dir: str, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Run ``network`` on every preprocessed item and write ``predictions.csv`` / ``predictions.json``.

    Args:
        dataset: items ``{"image": (C, *spatial) tensor, ...}`` (a MONAI ``Dataset`` with the preprocessing).
        network: maps ``(1, C, *spatial)`` to the log of the class probabilities (octa3d's export: calibrated,
            fold ensemble averaged).
        postprocessing: dictionary transform turning ``{"pred": (K,) tensor}`` into probabilities.
        class_names: class order of the output channels.
        output_dir: folder for the predictions (created).
        device: where the network runs.

    Returns:
        One row per input: ``file``, ``p_<class>`` per class, ``prediction``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    network = network.to(device).eval()
    rows: list[dict[str, Any]] = []
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"]
        source = (getattr(image, "meta", {}) or {}).get("filename_or_obj", str(i))
        x = torch.as_tensor(image, dtype=torch.float32).unsqueeze(0).to(device)
        with torch.no_grad():
            pred = network(x)[0]
        probs = postprocessing({"pred": pred.cpu()})["pred"]
        probs = [float(v) for v in torch.as_tensor(probs).reshape(-1)]
        row = {"file": str(source), **{f"p_{n}": p for n, p in zip(class_names, probs)},
               "prediction": class_names[max(range(len(probs)), key=probs.__getitem__)]}
        rows.append(row)
        log.info("%s: %s", source, row["prediction"])
    fields = ["file", *(f"p_{n}" for n in class_names), "prediction"]

    def csv_rows(f: Any) -> None:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

    _write_atomic(out / "predictions.csv", csv_rows)
    _write_atomic(out / "predictions.json",
                  lambda f: json.dump({"class_names": list(class_names), "predictions": rows}, f, indent=2))
    print(f"{len(rows)} prediction(s) written to {out / 'predictions.csv'}")
    return rows
