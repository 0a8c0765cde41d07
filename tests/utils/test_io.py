"""File names from subject IDs, spreadsheet-safe CSV cells, and a full disk during atomic writes
(octa3d.utils.io)."""

import errno
import os
import subprocess
import sys
from collections import namedtuple

import pandas as pd
import pytest

from octa3d.errors import DiskFullError
from octa3d.utils import io
from octa3d.utils.io import (atomic_path, atomic_torch_save, atomic_write_csv, atomic_write_text, defuse_cell,
                             read_csv, safe_name, undefuse_cell, unique_names)

TRIAL_IDS = ["a/b", "a_b", "-x", "x", "+y", "y", "x y", "x_y", "../../evil", "evil", "10001", "CNV-13823-1", "",
             ".", "..", "_a_", "a", "CON", "con", "é", "e", "x-hdeadbeef", "a" * 300, "a" * 301]


def test_distinct_subjects_get_distinct_file_names():
    """9 test subjects once gave 6 CAM sets: sanitising merged a/b with a_b, x y with x_y, ../../evil with evil."""
    names = [safe_name(i) for i in TRIAL_IDS]
    assert len(set(names)) == len(TRIAL_IDS)
    for plain in ("a_b", "x_y", "evil", "10001", "CNV-13823-1", "a"):  # plain IDs keep their names
        assert safe_name(plain) == plain
    for n in names:
        assert n and "/" not in n and "\\" not in n and n[0] not in ".-+_" and len(n) <= 120
    # stable: a digest of the ID (not a counter, not Python's per-process hash), so reruns and other machines agree
    assert safe_name("a/b") == "a_b-hc14cddc0"
    code = "from octa3d.utils.io import safe_name; print(safe_name('a/b'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == safe_name("a/b")


def test_unique_names_separates_ids_that_differ_only_in_case():
    stems = unique_names(["Case1", "case1", "other", "a/b"])
    assert len({s.casefold() for s in stems.values()}) == 4
    assert stems["other"] == "other" and stems["a/b"] == safe_name("a/b")
    assert unique_names(["case1", "Case1"]) == {k: stems[k] for k in ("case1", "Case1")}  # order-independent


@pytest.mark.parametrize("cell", ["=1+1", "+cmd", "-x", "@SUM(A1)", "\tx", "\r=1", "'=a", "''-b", "-inf"])
def test_formula_cells_are_defused_and_restored(cell):
    out = defuse_cell(cell)
    assert out.startswith("'") and undefuse_cell(out) == cell


@pytest.mark.parametrize("cell", ["-0.5", "+3", "-1e-3", "normal", "'x", "a=b", "", 3, -2.0, None])
def test_numbers_and_plain_text_are_unchanged(cell):
    assert defuse_cell(cell) == cell and undefuse_cell(cell) == cell


def test_csv_text_cells_are_defused_numbers_are_not(tmp_path):
    frame = pd.DataFrame({"subject": ["=HYPERLINK(\"http://x\")", "-12", "ok", "@x"], "loss": [-0.5, 1.0, 2.0, -3.0],
                          "=head": ["+a", "b", "c", "d"]})
    path = atomic_write_csv(tmp_path / "t.csv", frame)
    text = path.read_text(encoding="utf-8")
    assert "'=HYPERLINK" in text and "'@x" in text and "'+a" in text and "'=head" in text
    assert ",-0.5," in text and "\n-12," in text  # numbers stay numbers
    assert frame["subject"][0].startswith("=")  # the caller's frame is not modified
    back = read_csv(path, dtype={"subject": str})
    pd.testing.assert_frame_equal(back, frame)


# ------------------------------------------------------------------------------------------------ full disk
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_is_one_error_naming_the_file_and_keeps_the_old_one(tmp_path, code):
    dest = atomic_write_text(tmp_path / "history.csv", "old")

    def write(*_a, **_k):
        raise OSError(code, os.strerror(code))

    with pytest.raises(DiskFullError, match="history.csv.*disk is full") as exc:
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            write()
    assert "\n" not in str(exc.value)
    assert dest.read_text() == "old" and not _leftovers(tmp_path)


def test_full_disk_when_creating_or_renaming(tmp_path, monkeypatch):
    monkeypatch.setattr(io.os, "replace", _enospc)
    with pytest.raises(DiskFullError, match="a.txt"):
        atomic_write_text(tmp_path / "a.txt", "x")
    assert not _leftovers(tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(io.os, "open", _enospc)  # no free inode for the temporary file
    with pytest.raises(DiskFullError, match="b.txt"):
        atomic_write_text(tmp_path / "b.txt", "x")


def test_csv_writer_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(pd.DataFrame, "to_csv", _enospc)
    with pytest.raises(DiskFullError, match="predictions.csv"):
        atomic_write_csv(tmp_path / "predictions.csv", pd.DataFrame({"a": [1]}))
    assert not _leftovers(tmp_path)


Usage = namedtuple("Usage", "total used free")


def test_c_writers_without_errno_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save/ITK report a full disk as RuntimeError: taken for one when the disk has no room left."""
    import torch

    def fail(*_a, **_k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", fail)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _p: Usage(10**9, 10**9, 4096))
    with pytest.raises(DiskFullError, match="last.pt"):
        atomic_torch_save({"x": 1}, tmp_path / "last.pt")
    assert not _leftovers(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _p: Usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="file write failed"):  # plenty of space: not a full disk
        atomic_torch_save({"x": 1}, tmp_path / "last.pt")


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "c.txt"):
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "c.txt"):
            raise KeyError("x")
    assert not _leftovers(tmp_path)
