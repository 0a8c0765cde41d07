"""Shared fixtures: small generated datasets only (no network, no real scans)."""

from __future__ import annotations

import os

# Keep the suite predictable on 2-core CI machines (and quiet when several workers share the cores).
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
