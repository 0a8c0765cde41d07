"""Shared fixtures: small generated datasets only (no network, no real scans)."""

from __future__ import annotations

import locale
import logging
import os
import subprocess as _subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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


# ------------------------------------------------------------------------------------------ damaged files, the CLI
def _cut(path: Path, keep: int) -> Path:
    """Keep the first ``keep`` bytes (negative: drop the last ``-keep``), as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


@pytest.fixture
def cut():
    """``cut(path, keep) -> path``: truncate a file to its first ``keep`` bytes (negative: drop the last ``-keep``)."""
    return _cut


def _dicom_series(folder: Path, volume: np.ndarray) -> Path:
    """One int16 DICOM series ``0.dcm`` … in ``folder``, a file per slice of ``volume`` (slices, rows, columns)."""
    # GDCM's writer resets the process locale to "C" (ASCII): later tests would decode subprocess output and write
    # log files as ASCII (see tests/data/test_readers.py)
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom(folder, volume)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom(folder: Path, volume: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    img = sitk.GetImageFromArray(volume.astype(np.int16))
    for i in range(volume.shape[0]):
        sl = img[:, :, i]
        for tag, value in {"0020|000d": "1.2.3.4", "0020|000e": "1.2.3.4.5", "0020|0013": str(i + 1),
                           "0020|0032": f"0\\0\\{i}", "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0060": "OT"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{i}.dcm"))
        writer.Execute(sl)
    return folder


@pytest.fixture
def dicom_series():
    """``dicom_series(folder, volume) -> folder``: write ``volume`` as a DICOM series, one file per slice."""
    return _dicom_series


MAIN_PY = Path(__file__).resolve().parents[1] / "main.py"


class CliResult(NamedTuple):
    """What a user of the command sees: exit status, stdout, stderr."""

    rc: int
    out: str
    err: str


@pytest.fixture
def run_cli(tmp_path, capsys, monkeypatch):
    """``run_cli(argv, subprocess=False, cwd=tmp_path) -> CliResult(rc, out, err)``: the command as a user runs it.

    ``subprocess=True`` runs ``python main.py ARGV`` in a child process (what a user sees, exactly; ~1-5 s for the
    imports); otherwise :func:`octa3d.cli.main` runs in this process with stdout/stderr captured and its console
    log handler bound to the captured stderr, so the log lines a stage prints are there too. Either way the
    command runs in ``cwd`` (files an error leaves in the current folder land there).
    """
    from octa3d.cli import main

    def run(argv: list[str], subprocess: bool = False, cwd: Path | None = None) -> CliResult:
        argv = [str(a) for a in argv]
        cwd = Path(cwd or tmp_path)
        if subprocess:
            env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # messages hold ×, –, …: decoded as UTF-8 below
            proc = _subprocess.run([sys.executable, str(MAIN_PY), *argv], cwd=cwd, capture_output=True,
                                   encoding="utf-8", errors="replace", timeout=300, check=False, env=env)
            return CliResult(proc.returncode, proc.stdout, proc.stderr)
        logger = logging.getLogger("octa3d")
        before = list(logger.handlers)
        for h in before:  # a console handler bound to an earlier test's captured stderr: rebound below by main
            if getattr(h, "_octa3d_console", False):
                logger.removeHandler(h)
        capsys.readouterr()
        with monkeypatch.context() as m:
            m.chdir(cwd)
            try:
                rc = main(argv)
            finally:
                for h in list(logger.handlers):
                    if h not in before:
                        logger.removeHandler(h)
                        h.close()
                for h in before:
                    if h not in logger.handlers and getattr(h, "_octa3d_console", False):
                        logger.addHandler(h)
        cap = capsys.readouterr()
        return CliResult(rc, cap.out, cap.err)

    return run
