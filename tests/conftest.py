"""Shared fixtures: small generated datasets only (no network, no real scans)."""

from __future__ import annotations

import logging
import os

import pytest

# Keep the suite predictable on 2-core CI machines (and quiet when several workers share the cores).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _octa3d_logs_reach_caplog():
    """``octa3d.cli.main`` stops the ``octa3d`` logger from propagating (its own console handler prints) and
    benchmarks quieten octa3d loggers: tests that ran those before must not hide later tests' log records from
    pytest's ``caplog``."""
    logger = logging.getLogger("octa3d")
    before = logger.propagate
    logger.propagate = True
    for name, child in list(logging.root.manager.loggerDict.items()):
        if name.startswith("octa3d.") and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)
    yield
    logger.propagate = before
