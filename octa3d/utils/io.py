"""Atomic file writes: write to a temporary file in the same folder, then ``os.replace``.

A crash or Ctrl-C mid-write therefore never leaves a truncated file under the final name. The file gets the
permissions of any new file (``0666`` less the umask), not the ``0600`` of :func:`tempfile.mkstemp`. A full disk
(or a spent quota) is reported as one :class:`~octa3d.errors.DiskFullError` naming the file, never as a traceback
from deep inside a writer, and leaves no temporary file behind.

Also here: CSV writing that spreadsheets cannot run as formulas (:func:`defuse_cell`, :func:`read_csv` undoes it),
and the one mapping of subject IDs to file names (:func:`safe_name`, :func:`unique_names`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from octa3d.errors import DiskFullError

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Writers that are not plain Python file I/O (torch.save's zip writer, ITK, NumPy through C) report a full disk as
# RuntimeError/ValueError without an errno; below this much free space such a failure is taken for a full disk.
_NEARLY_FULL_BYTES = 16 * 2**20


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

    Raises:
        DiskFullError: the file system is full (ENOSPC) or the quota spent (EDQUOT) while creating, writing or
            renaming the file; the temporary file is removed first.
    """
    dest = Path(path)
    sfx = suffix if suffix is not None else "".join(dest.suffixes)
    tmp_path: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temp(dest, sfx)
        yield tmp_path
        os.replace(tmp_path, dest)
    except Exception as exc:
        full = _is_disk_full(exc, dest)
        _remove(tmp_path)
        if full:
            raise DiskFullError(f"{dest}: cannot write it, the disk is full ({_reason(exc)}); free some space on "
                                f"that file system (or write elsewhere, e.g. --runs-dir/--cache-dir) and "
                                f"rerun") from exc
        raise
    finally:
        _remove(tmp_path)


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _is_disk_full(exc: BaseException, dest: Path) -> bool:
    """True when ``exc`` says ENOSPC/EDQUOT, or comes from a C writer (no errno) while the disk has no room left."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _DISK_FULL_ERRNOS
    if isinstance(exc, DiskFullError) or not isinstance(exc, (OSError, RuntimeError, ValueError)):
        return False
    folder = next((p for p in (dest.parent, *dest.parents) if p.exists()), None)
    try:
        return folder is not None and shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == getattr(errno, "EDQUOT", None):
        return "disk quota exceeded"
    return "no space left on device"


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
    """Write a pandas DataFrame as CSV atomically (no index column), text cells defused (:func:`defuse_cell`).

    Subject IDs, labels and class names come from users' files; a spreadsheet opening ``predictions.csv`` would
    otherwise run an ID such as ``=HYPERLINK(...)`` as a formula. Read such files back with :func:`read_csv`.
    """
    out = frame.rename(columns=lambda c: defuse_cell(c) if isinstance(c, str) else c)
    for col in out.columns:
        if _is_text(out[col]):
            out[col] = out[col].map(defuse_cell)
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)
    return Path(path)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def defuse_cell(value: Any) -> Any:
    """A CSV text cell that spreadsheets show as text: one ``'`` before a leading ``= + - @``, tab or CR (OWASP
    CSV injection advice). Numbers (``-0.5`` as text too) and non-strings are returned unchanged.

    Cells that already start with quotes before such a character get one more, so :func:`undefuse_cell` gives
    back exactly the original text for every string.
    """
    if not isinstance(value, str):
        return value
    if value.lstrip("'")[:1] in _FORMULA_START and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def undefuse_cell(value: Any) -> Any:
    """The inverse of :func:`defuse_cell`."""
    if isinstance(value, str) and value[:1] == "'" and value.lstrip("'")[:1] in _FORMULA_START:
        return value[1:]
    return value


def read_csv(path: str | Path, **kwargs: Any) -> Any:
    """``pandas.read_csv`` of a file written by :func:`atomic_write_csv`, with text cells and headers restored."""
    import pandas as pd

    frame = pd.read_csv(path, **kwargs)
    frame = frame.rename(columns=lambda c: undefuse_cell(c) if isinstance(c, str) else c)
    for col in frame.columns:
        if _is_text(frame[col]):
            frame[col] = frame[col].map(undefuse_cell)
    return frame


def _is_text(column: Any) -> bool:
    """Object or string dtype (pandas 3 stores text as ``str``, older pandas as ``object``)."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    return is_object_dtype(column.dtype) or is_string_dtype(column.dtype)


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


_HASH_TAIL = re.compile(r"-h[0-9a-f]{8}$")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MAX_STEM = 100  # + "-h<8 hex>" + "_input_OCTA.nii.gz" stays far below the 255-byte limit of file names


def name_hash(text: str) -> str:
    """The stable 8-hex-digit hash :func:`safe_name` appends (SHA-256 of the UTF-8 text)."""
    return hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]


def safe_name(text: str) -> str:
    """A subject ID as a file-name stem: distinct IDs give distinct stems.

    IDs made of ``A-Z a-z 0-9 . _ + -`` (not starting with ``. _ - +``, not ending with ``.``/``_``) keep their
    name. Any other ID is sanitised (other characters -> ``_``, at most 100 characters) and gets ``-h`` + 8 hex
    digits of its SHA-256, so ``a/b`` and ``a_b``, ``x y`` and ``x_y``, ``../../evil`` and ``evil`` never share
    files. IDs that themselves end like such a suffix, and Windows device names (``CON``, ``NUL``...), are suffixed
    too.
    """
    text = str(text)
    # no leading '-'/'+' either: a file named "-x_cam.nii.gz" reads as an option to command-line tools
    clean = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).lstrip("._-+")[:_MAX_STEM].rstrip("._") or "subject"
    if (clean == text and not _HASH_TAIL.search(text)
            and clean.split(".")[0].upper() not in _RESERVED):
        return clean
    return f"{clean}-h{name_hash(text)}"


def unique_names(ids: Iterable[str]) -> dict[str, str]:
    """File stems of several subjects written into one folder: :func:`safe_name`, plus the hash suffix for IDs
    whose stems differ only in letter case (``Case1`` and ``case1`` share a file on macOS and Windows file
    systems). Depends only on the set of IDs, not on their order."""
    ids = list(dict.fromkeys(str(i) for i in ids))
    stems = {i: safe_name(i) for i in ids}
    folded: dict[str, list[str]] = {}
    for i, s in stems.items():
        folded.setdefault(s.casefold(), []).append(i)
    for group in folded.values():
        if len(group) > 1:
            for i in group:
                if not _HASH_TAIL.search(stems[i]):
                    stems[i] = f"{stems[i]}-h{name_hash(i)}"
    return stems
