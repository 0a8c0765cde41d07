"""Shared fixtures: small generated datasets only (no network, no real scans)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

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


# ------------------------------------------------------------------------------------ scans with a real geometry
def _nifti_scan(path: Path) -> tuple[Path, np.ndarray]:
    """uint8 (12, 40, 14) volume with a retina band, a blob, and a non-trivial affine."""
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 20, (12, 40, 14), dtype=np.uint8)
    vol[:, 14:26] += 60
    vol[2:5, 17:21, 2:5] = 250  # the lesion, inside the retinal slab
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.3, 0.05, 0.2))
    img.SetOrigin((10.0, -5.0, 3.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return path, vol


def _assert_same_geometry(a: Path, b: Path) -> None:
    na, nb = nib.load(str(a)), nib.load(str(b))
    assert na.shape == nb.shape
    assert np.allclose(na.affine, nb.affine, atol=1e-5)
    sa, sb = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert sa.GetSize() == sb.GetSize()
    assert np.allclose(sa.GetSpacing(), sb.GetSpacing()) and np.allclose(sa.GetOrigin(), sb.GetOrigin())
    assert np.allclose(sa.GetDirection(), sb.GetDirection())


@pytest.fixture
def nifti_scan():
    """``nifti_scan(path) -> (path, volume)``: a small uint8 NIfTI scan with a lesion and a non-trivial affine."""
    return _nifti_scan


@pytest.fixture
def same_geometry():
    """``same_geometry(a, b)``: assert two images share shape, affine, spacing, origin and direction."""
    return _assert_same_geometry


@pytest.fixture
def capture_log(request):
    """``capture_log(name) -> list``: log records of logger ``name`` (DEBUG and up), captured on the logger itself
    (setup_logging turns propagation off); handler and level restored after the test."""
    def capture(name: str) -> list[logging.LogRecord]:
        out: list[logging.LogRecord] = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = out.append  # type: ignore[method-assign]
        logger = logging.getLogger(name)
        old = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)

        def restore() -> None:
            logger.removeHandler(handler)
            logger.setLevel(old)

        request.addfinalizer(restore)
        return out

    return capture


@pytest.fixture
def private_copy(tmp_path):
    """``copy(experiment_root) -> root``: a private copy of a module-scoped experiment (tests modify its splits and
    checkpoints); its ``data`` folder is a link, so the resolved data root the split settings record stays the same."""
    import shutil

    def copy(experiment: Path) -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(experiment, dst, ignore=lambda d, names: ["data"] if Path(d) == experiment else [])
        (dst / "data").symlink_to(experiment / "data")
        return dst
    return copy
