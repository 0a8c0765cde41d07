"""OCTA-500 layout facts and lookups: spacing from the stack, lesion masks, and one ``--input`` path as a subject
(on a tiny generated dataset)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from octa3d.config import DataConfig
from octa3d.data.octa500 import (DEPTH_MM, FOV_LATERAL_MM, FOVS, MASKS_DIR, find_mask, fov_dir, octa500_spacing,
                                 subject_from_path)
from octa3d.data.readers import load_subject
from octa3d.data.synthetic import generate, make_volume
from octa3d.errors import ConfigError, DataError

SHAPE = (8, 16, 10)  # B-scans, depth rows, columns


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("octa500") / "data"
    generate(root, 2, SHAPE, seed=5, layout="both", classes=("NORMAL", "CNV"))
    return root


def test_facts() -> None:
    assert FOVS == ("6mm", "3mm") and FOV_LATERAL_MM == {"6mm": 6.0, "3mm": 3.0} and DEPTH_MM == 2.0
    assert fov_dir("/d", "3mm") == Path("/d/OCTA_3mm")


def test_spacing_from_the_stack_size(dataset: Path, tmp_path: Path) -> None:
    eye = dataset / "OCTA_6mm" / "OCTA" / "10001"
    assert octa500_spacing(eye, "6mm") == pytest.approx((6 / 10, 2 / 16, 6 / 8))  # x=columns, y=rows, z=B-scans
    assert octa500_spacing(eye, "3mm") == pytest.approx((3 / 10, 2 / 16, 3 / 8))
    (tmp_path / "empty").mkdir()
    assert octa500_spacing(tmp_path / "empty", "6mm") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "1.bmp").write_bytes(b"not an image")
    assert octa500_spacing(tmp_path / "broken", "6mm") is None  # the reader names the file later


def test_find_mask(dataset: Path, tmp_path: Path) -> None:
    assert find_mask(dataset / "OCTA_6mm", "10002") == dataset / "OCTA_6mm" / MASKS_DIR / "10002.nii.gz"
    assert find_mask(dataset / "OCTA_6mm", "99999") is None
    (tmp_path / MASKS_DIR).mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.uint8)), str(tmp_path / MASKS_DIR / "7.nrrd"))
    assert find_mask(tmp_path, "7") == tmp_path / MASKS_DIR / "7.nrrd"


def test_octa500_folder(dataset: Path) -> None:
    eye = dataset / "OCTA_6mm" / "OCTA" / "10002"
    s = subject_from_path(eye, DataConfig(modality="OCTA"))
    assert (s.id, s.label, s.paths, s.meta) == ("10002", None, {"image": str(eye)}, {"input": str(eye)})
    assert s.spacing == pytest.approx((6 / 10, 2 / 16, 6 / 8))
    assert s.mask == str(dataset / "OCTA_6mm" / MASKS_DIR / "10002.nii.gz")
    arr, geo = load_subject(s, "OCTA")
    np.testing.assert_array_equal(arr[0], make_volume(SHAPE, "CNV", seed=5, index=1)["octa"])
    assert geo.spacing == pytest.approx(s.spacing)


@pytest.mark.parametrize("given", ["OCTA", "OCT"])
def test_oct_plus_octa_takes_the_sibling(dataset: Path, given: str) -> None:
    fov = dataset / "OCTA_6mm"
    s = subject_from_path(fov / given / "10001", DataConfig(modality="OCT+OCTA"))
    assert s.paths == {"OCTA": str(fov / "OCTA" / "10001"), "OCT": str(fov / "OCT" / "10001")}
    arr, _ = load_subject(s, "OCT+OCTA")
    ref = make_volume(SHAPE, "NORMAL", seed=5, index=0)
    np.testing.assert_array_equal(arr, np.stack([ref["oct"], ref["octa"]]))  # OCT first


def test_scan_files_and_other_folders(dataset: Path, tmp_path: Path) -> None:
    nii = dataset / "volumes" / "10001_octa.nii.gz"
    s = subject_from_path(str(nii), DataConfig())
    assert (s.id, s.paths, s.spacing, s.mask) == ("10001_octa", {"image": str(nii)}, None, None)
    plain = tmp_path / "scans" / "eye.v2"  # not an OCTA-500 folder: no FOV spacing, the name kept whole
    shutil.copytree(dataset / "OCTA_6mm" / "OCTA" / "10001", plain)
    s = subject_from_path(plain, DataConfig())
    assert (s.id, s.spacing, s.mask) == ("eye.v2", None, None)
    np.save(tmp_path / "x.npy", np.zeros((2, 2)))
    (tmp_path / "x.npy").rename(tmp_path / "Scan.NPY")
    assert subject_from_path(tmp_path / "Scan.NPY", DataConfig()).id == "Scan"  # extensions in any case


def test_a_2d_image_gets_the_patient_group_discovery_gives_it(tmp_path: Path) -> None:
    """``--input CNV-6294785-1.jpeg`` is of patient 6294785, as in class-folder discovery (``--group-regex``)."""
    from octa3d.data.sources import discover

    for cls, name in (("CNV", "CNV-6294785-1.png"), ("NORMAL", "NORMAL-77-3.png"), ("NORMAL", "scan.png")):
        (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(np.eye(4, dtype=np.uint8)), str(tmp_path / "data" / cls / name))
    cfg = DataConfig(data_root=str(tmp_path / "data"))
    for s in discover(cfg, "2d"):
        given = subject_from_path(s.paths["image"], cfg)
        assert given.group == s.group and given.id == s.id.split("/")[-1]
    assert subject_from_path(tmp_path / "data" / "CNV" / "CNV-6294785-1.png", cfg).group == "6294785"
    custom = DataConfig(group_regex=r"^([A-Z]+)-")
    assert subject_from_path(tmp_path / "data" / "CNV" / "CNV-6294785-1.png", custom).group == "CNV"
    with pytest.raises(ConfigError, match="--group-regex"):
        subject_from_path(tmp_path / "data" / "CNV" / "CNV-6294785-1.png", DataConfig(group_regex="("))


def test_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        subject_from_path(tmp_path / "missing", DataConfig())
    with pytest.raises(DataError, match="needs an OCTA-500 subject folder"):
        subject_from_path(dataset / "volumes" / "10001_octa.nii.gz", DataConfig(modality="OCT+OCTA"))
    lone = tmp_path / "OCTA_3mm" / "OCTA" / "10301"
    shutil.copytree(dataset / "OCTA_6mm" / "OCTA" / "10001", lone)
    with pytest.raises(DataError, match=r"needs the OCT scan of the same eye at .*OCT[/\\]10301.*--modality OCTA"):
        subject_from_path(lone, DataConfig(modality="OCT+OCTA"))
    s = subject_from_path(lone, DataConfig(modality="OCTA"))  # one modality is fine; the 3mm FOV gives spacing
    assert s.spacing == pytest.approx((3 / 10, 2 / 16, 3 / 8)) and s.mask is None
