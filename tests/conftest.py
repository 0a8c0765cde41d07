"""Shared fixtures: small generated datasets only (no network, no real scans)."""

from __future__ import annotations

import locale
import logging
import os
import subprocess as _subprocess
import sys
from collections.abc import Callable
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


# ------------------------------------------------------------------------------------------ vendor exports
#: eyepy's own small HEYEX test files (MIT), kept beside the repository in the shared data folder, not in it.
EYEPY_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eyepy-fixtures"


@pytest.fixture
def eyepy_fixtures() -> Path:
    """The folder of eyepy's HEYEX test files (``test_volume.vol``, ``heyex_xml/test_volume/``); the test is skipped
    where the shared data folder is not beside the repository (e.g. a CI checkout without it)."""
    if not (EYEPY_FIXTURES / "test_volume.vol").is_file():
        pytest.skip(f"eyepy's HEYEX test files are not at {EYEPY_FIXTURES} (../shared/data/eyepy-fixtures beside "
                    "the repository); the tests that write their own vendor files still run")
    return EYEPY_FIXTURES


def retina_volume(shape: tuple[int, int, int] = (6, 40, 24), seed: int = 0) -> np.ndarray:
    """uint8 ``(S, D, W)`` volume with a bright retina band in the middle third of the depth and a left-right
    gradient (so that a mirrored scan is told from the original)."""
    rng = np.random.default_rng(seed)
    s, d, w = shape
    vol = rng.integers(0, 30, shape).astype(np.int32)
    vol[:, d // 3: 2 * d // 3] += 100 + (np.arange(w) * 100 // max(1, w - 1))[None, None, :]
    return np.clip(vol, 0, 255).astype(np.uint8)


def _heyex_xml(folder: Path, volume: np.ndarray, spacing=(0.0118, 0.0039, 0.12), laterality: str = "R",
               patient_id: str = "P-1") -> Path:
    """A HEYEX XML export of ``volume`` (uint8 ``(S, D, W)``): ``export.xml`` with the fields eyepy's reader takes,
    ``B<n>.tif`` B-scans and an ``NIR.tif`` localizer, as the Spectralis viewer writes them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    s, d, w = volume.shape
    sx, sy, sz = spacing

    def date(y: int) -> str:
        return f"<Date><Year>{y}</Year><Month>01</Month><Day>01</Day></Date>"

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "NIR.tif")
    images = ["<Image><ID>0</ID><ImageType><Type>LOCALIZER</Type></ImageType><OphthalmicAcquisitionContext>"
              "<Width>16</Width><Height>16</Height><ScaleX>0.01</ScaleX><ScaleY>0.01</ScaleY><Angle>30</Angle>"
              "<Focus>0.0</Focus></OphthalmicAcquisitionContext><ImageData><ExamURL>file:///\\\\x\\NIR.tif</ExamURL>"
              "</ImageData></Image>"]
    for i in range(s):
        Image.fromarray(volume[i]).save(folder / f"B{i + 1}.tif")
        images.append(
            f"<Image><ID>{i + 1}</ID><ImageType><Type>OCT</Type></ImageType><OphthalmicAcquisitionContext>"
            f"<Width>{w}</Width><Height>{d}</Height><ScaleX>{sx}</ScaleX><ScaleY>{sy}</ScaleY>"
            f"<ImageQuality>30</ImageQuality><Start><Coord><X>0.0</X><Y>{i * sz}</Y></Coord></Start>"
            f"<End><Coord><X>{(w - 1) * sx}</X><Y>{i * sz}</Y></Coord></End></OphthalmicAcquisitionContext>"
            f"<ImageData><ExamURL>file:///\\\\x\\B{i + 1}.tif</ExamURL></ImageData></Image>")
    xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<HEDX><BODY><SWVersion><Version>6.9</Version></SWVersion>"
           f"<Patient><ID>1</ID><PatientID>{patient_id}</PatientID><LastName>X</LastName><FirstNames>Y</FirstNames>"
           f"<Birthdate>{date(1950)}</Birthdate><Study><StudyDate>{date(2020)}</StudyDate><Series><ID>7</ID>"
           f"<Laterality>{laterality}</Laterality><ReferenceSeries><ID>7</ID><ExamDate>{date(2020)}</ExamDate>"
           "</ReferenceSeries><GeneralEquipment><Manufacturer>Heidelberg Engineering</Manufacturer>"
           "<ManufacturerModelName>Spectralis</ManufacturerModelName></GeneralEquipment>"
           f"{''.join(images)}</Series></Study></Patient></BODY></HEDX>\n")
    (folder / "export.xml").write_text(xml, encoding="utf-8")
    return folder


def _duke_mat(path: Path, volume: np.ndarray, age: int = 70) -> Path:
    """A Duke AMD/control ``.mat`` (MATLAB 5) of ``volume`` (uint8 ``(S, D, W)``) as the dataset stores it:
    ``images`` depth × A-scans × B-scans, ``layerMaps`` B-scans × A-scans × 3 boundaries, ``Age``."""
    import scipy.io as sio

    path.parent.mkdir(parents=True, exist_ok=True)
    s, d, w = volume.shape
    layers = np.stack([np.full((s, w), d / 3), np.full((s, w), d / 2), np.full((s, w), 2 * d / 3)], -1)
    sio.savemat(str(path), {"images": np.moveaxis(volume, 0, -1), "layerMaps": layers, "Age": np.array([[age]])})
    return path


def _retouch_case(folder: Path, volume: np.ndarray, spacing=(0.0117, 0.002, 0.047), mask: bool = True) -> Path:
    """A RETOUCH case folder ``<folder>/oct.mhd`` (+ ``reference.mhd``: fluid label 1 in a block) of ``volume``."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(folder / "oct.mhd"))
    if mask:
        ref = np.zeros(volume.shape, np.uint8)
        ref[1:3, volume.shape[1] // 2: volume.shape[1] // 2 + 3, 2:6] = 1
        sitk.WriteImage(sitk.GetImageFromArray(ref), str(folder / "reference.mhd"))
    return folder


class VendorWriters(NamedTuple):
    """Writers of vendor exports with known contents (:func:`vendor_export`)."""

    volume: Callable
    vol: Callable
    xml: Callable
    duke: Callable
    retouch: Callable


@pytest.fixture
def vendor_export() -> VendorWriters:
    """``vendor_export.vol(path, volume, spacing, laterality, angio=...)`` (HEYEX .vol through eyepy's layout:
    :mod:`octa3d.data.synthetic.vendor_files`), ``.xml(folder, volume, spacing, "R"|"L")``, ``.duke(path, volume)``,
    ``.retouch(case_folder, volume, spacing)`` and ``.volume(shape, seed)`` (a uint8 retina)."""
    from octa3d.data.synthetic.vendor_files import write_heyex_vol

    return VendorWriters(retina_volume, write_heyex_vol, _heyex_xml, _duke_mat, _retouch_case)
