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
