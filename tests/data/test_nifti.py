"""write_nifti: the array and its full geometry come back from the file; nothing is left half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from octa3d.data.nifti import write_nifti
from octa3d.data.subject import Geometry


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_array_and_geometry_round_trip(tmp_path: Path, dtype) -> None:
    arr = np.random.default_rng(0).integers(0, 200, (3, 5, 7)).astype(dtype)
    direction = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    geo = Geometry((3, 5, 7), (0.5, 0.25, 2.0), (1.0, -2.0, 3.5), direction)
    path = tmp_path / "sub" / "x.nii.gz"  # the folder is created
    assert write_nifti(arr, geo, path) == path
    img = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
    assert Geometry.from_sitk(img).spacing == pytest.approx(geo.spacing)
    assert Geometry.from_sitk(img).origin == pytest.approx(geo.origin)
    assert Geometry.from_sitk(img).direction == pytest.approx(direction)
    assert [p.name for p in path.parent.iterdir()] == ["x.nii.gz"]  # no temporary file left


def test_non_contiguous_array_and_shape_mismatch(tmp_path: Path) -> None:
    arr = np.arange(4 * 6 * 8, dtype=np.int16).reshape(4, 6, 8)[:, ::2, ::-1]
    write_nifti(arr, Geometry.default(arr.shape), tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v.nii.gz"))), arr)
    with pytest.raises(ValueError, match="does not match"):
        write_nifti(arr, Geometry.default((4, 6, 8)), tmp_path / "w.nii.gz")
    assert not (tmp_path / "w.nii.gz").exists() and len(list(tmp_path.iterdir())) == 1


def test_a_nifti_cut_short_by_a_full_disk_is_an_error_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    """ITK only prints "wrote only N of M bytes" when the disk fills and returns: the writer checks the result."""
    from octa3d.errors import DiskFullError

    real = sitk.WriteImage

    def short_write(img, name, *args, **kwargs):
        real(img, name, *args, **kwargs)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", short_write)
    geo = Geometry((8, 9, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    rng = np.random.default_rng(0)
    with pytest.raises(DiskFullError, match="out.nii.gz"):
        write_nifti(rng.random((8, 9, 10)).astype(np.float32), geo, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []
