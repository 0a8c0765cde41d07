"""Logging set-up: console at the chosen level, plus a run-folder log file at DEBUG."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_FMT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Configure the ``octa3d`` logger for the console (idempotent)."""
    logger = logging.getLogger("octa3d")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if not any(getattr(h, "_octa3d_console", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._octa3d_console = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(h)
    for h in logger.handlers:
        if getattr(h, "_octa3d_console", False):
            h.setLevel(level)


def add_file_log(path: str | Path) -> None:
    """Also log (DEBUG and up) to ``path``, appending; replaces a previous run-folder log handler."""
    logger = logging.getLogger("octa3d")
    for h in list(logger.handlers):
        if getattr(h, "_octa3d_file", False):
            logger.removeHandler(h)
            h.close()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, encoding="utf-8")  # not the locale: GDCM can reset it to ASCII
    fh._octa3d_file = True  # type: ignore[attr-defined]
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter(_FMT))
    logger.addHandler(fh)
