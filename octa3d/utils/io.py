"""Atomic file writes: write to a temporary file in the same folder, then ``os.replace``.

A crash or Ctrl-C mid-write therefore never leaves a truncated file under the final name. The file gets the
permissions of any new file (``0666`` less the umask), not the ``0600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _create_temp(dest: Path, suffix: str) -> Path:
    """Create an empty, uniquely named file beside ``dest`` with the permissions the umask gives any new file.

    ``tempfile.mkstemp`` would create it with mode 0600, and ``os.replace`` keeps that mode: results on a shared
    server would be unreadable to colleagues. ``os.open(..., 0o666)`` lets the kernel apply the umask, as for a
    file written with ``open()``.
    """
    for _ in range(100):
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file beside {dest}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    Args:
        path: final destination.
        suffix: suffix for the temporary file (writers that infer the format from the name need the real
            extension, e.g. ``.nii.gz``); defaults to the destination's full suffix.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(dest.suffixes)
    tmp_path = _create_temp(dest, sfx)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # never the locale: CI may run with LANG unset
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (checkpoints are never half-written)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_csv(path: str | Path, frame: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a file atomically (the same bytes under a second name, e.g. no second compression pass)."""
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def json_safe(obj: Any) -> Any:
    """``obj`` with only strict-JSON values: NaN and ±inf → null, NumPy scalars/arrays → Python, tuples → lists,
    paths → strings, keys → strings."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (see :func:`json_safe`: never ``NaN``/``Infinity``) atomically."""
    import json

    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n")


def safe_name(text: str) -> str:
    """A subject ID usable as a file name."""
    import re

    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._") or "subject"
