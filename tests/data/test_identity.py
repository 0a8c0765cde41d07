"""One identity for every source: normalised IDs and patient groups, and matching a subject against a set."""

from __future__ import annotations

import re

import pytest

from octa3d.data.identity import IdentityIndex, compile_group_regex, identity_key, image_group
from octa3d.errors import ConfigError

KERMANY = re.compile(r"^[A-Za-z]+-(\d+)-")


@pytest.mark.parametrize("text,key", [("10001", "10001"), (" 10001 ", "10001"), (10001.0, "10001"),
                                      ("10001.0", "10001"), ("s01.nii.gz", "s01"), ("CNV\\CNV-1-1", "CNV/CNV-1-1"),
                                      ("train/CNV/CNV-1-1", "train/CNV/CNV-1-1"), ("eye.v2", "eye.v2")])
def test_identity_key(text, key):
    assert identity_key(text) == key


def test_image_group_is_the_patient_of_the_regex_else_the_stem():
    assert image_group("CNV-6294785-1.jpeg", KERMANY) == "6294785"
    assert image_group("scan.tif", KERMANY) == "scan"
    assert image_group("p7_left.png", re.compile(r"^p\d+")) == "p7"          # no group: the whole match
    assert compile_group_regex(r"^p(\d+)_").pattern == r"^p(\d+)_"
    with pytest.raises(ConfigError, match="--group-regex"):
        compile_group_regex("(")


def test_index_matches_id_file_name_and_patient_group():
    index = IdentityIndex({"CNV/CNV-6294785-1": "6294785", "10001": "10001", "NORMAL/scan": "scan"},
                          what="training subject")
    assert index.reason("CNV/CNV-6294785-1", "6294785") == "CNV/CNV-6294785-1 is a training subject"
    assert index.reason("CNV-6294785-1") == "CNV-6294785-1 is training subject CNV/CNV-6294785-1 (same file name)"
    assert index.reason("CNV-6294785-2", "6294785") == ("CNV-6294785-2 belongs to patient group 6294785, like "
                                                       "training subject CNV/CNV-6294785-1")
    assert index.reason("10001.0") == "10001.0 is training subject 10001"
    assert index.reason("10002") is None and index.reason("CNV-555-1", "555") is None
    # a name with folders is compared whole: another class folder's file of the same name is another image ...
    assert index.reason("DR/CNV-6294785-1", "other") is None
    # ... unless its patient group says otherwise
    assert index.matches(["DR/scan", "DR/x", "10001"], {"DR/scan": "scan", "DR/x": "x"}) == ["10001", "DR/scan"]


# ------------------------------------------------------------------------------------------- content
def _slices(folder, n=5, size=1000, seed=0):
    import numpy as np

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        (folder / f"{i}.bmp").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return folder


def test_source_fingerprint_matches_a_copy_anywhere_and_nothing_else(tmp_path):
    import shutil

    from octa3d.data.identity import FINGERPRINT_CHUNK, source_fingerprint

    eye = _slices(tmp_path / "OCTA" / "10001")
    copy = tmp_path / "extra" / "OCTA" / "99999"
    shutil.copytree(eye, copy)
    (copy / "Thumbs.db").write_bytes(b"x")  # junk a file manager adds does not hide the copy
    assert source_fingerprint(eye) == source_fingerprint(copy) is not None
    assert source_fingerprint(_slices(tmp_path / "other", seed=1)) != source_fingerprint(eye)
    changed = tmp_path / "changed"
    shutil.copytree(eye, changed)
    data = bytearray((changed / "3.bmp").read_bytes())  # the middle slice
    data[500] ^= 1
    (changed / "3.bmp").write_bytes(bytes(data))
    assert source_fingerprint(changed) != source_fingerprint(eye)
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero.nii").write_bytes(b"")
    assert source_fingerprint(tmp_path / "empty") is None and source_fingerprint(tmp_path / "zero.nii") is None
    assert source_fingerprint(tmp_path / "missing") is None
    # a large file: size and its start, middle and end
    big = tmp_path / "big.nii"
    big.write_bytes(bytes(8 * FINGERPRINT_CHUNK))
    same = tmp_path / "sub" / "renamed.nii"
    same.parent.mkdir()
    same.write_bytes(big.read_bytes())
    assert source_fingerprint(big) == source_fingerprint(same)
    for offset in (0, 4 * FINGERPRINT_CHUNK, 8 * FINGERPRINT_CHUNK - 1):
        data = bytearray(big.read_bytes())
        data[offset] = 1
        same.write_bytes(bytes(data))
        assert source_fingerprint(same) != source_fingerprint(big)


def test_content_matches_pairs_subjects_holding_the_same_scan(tmp_path):
    import shutil

    from octa3d.data.leakage import content_matches
    from octa3d.data.subject import Subject

    a, b = _slices(tmp_path / "d" / "a"), _slices(tmp_path / "d" / "b", seed=2)
    copy = tmp_path / "x" / "new"
    shutil.copytree(b, copy)
    other = _slices(tmp_path / "x" / "other", seed=3)
    test = [Subject("a", "DR", {"OCTA": str(a)}), Subject("b", "DR", {"OCTA": str(b)})]
    extra = [Subject("new", None, {"OCTA": str(copy)}), Subject("other", None, {"image": str(other)})]
    assert content_matches(test, extra) == [("b", "new", str(copy))]
    assert content_matches(test[:1], extra) == []
