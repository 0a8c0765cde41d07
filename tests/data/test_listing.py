"""The discovery-time check of slice folders (listing and headers only) and the BMP header it reads: every
problem the reader would refuse later is found, and nothing the reader accepts is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from octa3d.data.bmp import BMP_HEAD, bmp_dims, encode_bmp8
from octa3d.data.listing import check_slice_folder
from octa3d.data.readers import read_volume
from octa3d.errors import DataError


def stack(folder: Path, n: int = 5, shape=(6, 8), names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names or [f"{k}.bmp" for k in range(1, n + 1)]):
        (folder / name).write_bytes(encode_bmp8(np.full(shape, 10 + i, np.uint8)))
    return folder


def test_bmp_dims_from_the_header_only():
    data = encode_bmp8(np.zeros((6, 9), np.uint8))
    assert bmp_dims(data[:BMP_HEAD]) == (9, 6, 8)
    assert bmp_dims(data[:BMP_HEAD], len(data)) == (9, 6, 8)
    assert bmp_dims(data[:BMP_HEAD], len(data) - 1).startswith("truncated")
    assert bmp_dims(b"\x89PNG" + bytes(40)) == "not a BMP file"



def test_bmp_dims_of_files_written_by_itk(tmp_path):
    for name, arr, vector in (("rgb.bmp", np.zeros((5, 7, 3), np.uint8), True),
                              ("gray.bmp", np.zeros((5, 7), np.uint8), False)):
        sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=vector), str(tmp_path / name))
        data = (tmp_path / name).read_bytes()
        dims = bmp_dims(data[:BMP_HEAD], len(data))
        assert dims[:2] == (7, 5), (name, dims)


def test_a_good_folder_has_no_problems(tmp_path):
    folder = stack(tmp_path / "1")
    (folder / "Thumbs.db").write_bytes(b"x")
    (folder / ".hidden").write_bytes(b"x")
    (folder / "notes.txt").write_text("x")
    lst = check_slice_folder(folder)
    assert lst.problems == [] and lst.count == 5 and lst.size == (8, 6) and lst.ignored == ["notes.txt"]
    assert read_volume(folder)[0].shape == (5, 6, 8)   # what the reader accepts, the check accepts


def test_every_problem_of_a_folder_is_listed(tmp_path):
    folder = stack(tmp_path / "1", names=["1.bmp", "2.bmp", "4.bmp", "5.bmp", "5 (copy).bmp", "scan.bmp"])
    (folder / "6.bmp").write_bytes(encode_bmp8(np.zeros((6, 9), np.uint8)))      # other width
    (folder / "7.bmp").write_bytes(encode_bmp8(np.zeros((6, 8), np.uint8))[:-10])  # truncated
    (folder / "8.bmp").write_bytes(b"garbage that is no image at all")
    problems = "\n".join(check_slice_folder(folder).problems)
    assert "image files without a slice number: scan.bmp" in problems
    assert "duplicate slice numbers: 5 (copy).bmp and 5.bmp" in problems
    assert "missing slice number(s) 3 of 1–8" in problems
    assert "6.bmp is 9×6" in problems and "the others 8×6" in problems
    assert "7.bmp: truncated" in problems
    assert "8.bmp: unreadable image header" in problems
    with pytest.raises(DataError):
        read_volume(folder)


@pytest.mark.parametrize("names", [["a.bmp", "b.bmp"], ["1.png", "2.png", "3.png"]])
def test_other_accepted_folders(tmp_path, names):
    """No numbers at all (stacked in name order) and non-BMP slices (ITK headers) are fine, as for the reader."""
    folder = tmp_path / "1"
    folder.mkdir()
    for name in names:
        sitk.WriteImage(sitk.GetImageFromArray(np.arange(12, dtype=np.uint8).reshape(3, 4)), str(folder / name))
    lst = check_slice_folder(folder)
    assert lst.problems == [] and lst.size == (4, 3) and lst.count == len(names)
    read_volume(folder)


def test_empty_folder_and_only_other_files(tmp_path):
    (tmp_path / "e").mkdir()
    assert check_slice_folder(tmp_path / "e").problems == ["no slice images"]
    (tmp_path / "e" / "a.txt").write_text("x")
    assert check_slice_folder(tmp_path / "e").problems == ["no slice images (only a.txt)"]
