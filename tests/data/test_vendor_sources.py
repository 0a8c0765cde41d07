"""Datasets of vendor exports (:mod:`octa3d.data.vendor_sources`): the Duke AMD/control and RETOUCH layouts, class
folders and plain folders of vendor files, manifests pointing at them, and ``--input`` folders mixing them with
other scans."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from octa3d.config import DataConfig
from octa3d.data.readers import load_subject
from octa3d.data.sources import detect_source, discover, discover_input, label_origin
from octa3d.data.vendor_sources import vendor_layout
from octa3d.errors import DataError

SPACING = (0.0114, 0.0039, 0.12)


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(data_root=str(root), **kw)


def test_duke_layout_classes_from_the_folders(tmp_path, vendor_export):
    root = tmp_path / "duke"
    for cls, n in (("AMD", 3), ("Control", 2)):
        for i in range(n):
            vendor_export.duke(root / cls / f"Farsiu_Ophthalmology_2013_{cls}_Subject_{1001 + i}.mat",
                               vendor_export.volume(seed=i))
    assert detect_source(root) == "vendor" and vendor_layout(root) == "duke"
    subjects = discover(_cfg(root, modality="OCT"))
    labels = {s.id: s.label for s in subjects}
    assert len(labels) == 5 and labels["Farsiu_Ophthalmology_2013_AMD_Subject_1001"] == "AMD"
    assert labels["Farsiu_Ophthalmology_2013_Control_Subject_1002"] == "NORMAL"  # the dataset's normal eyes
    assert subjects[0].meta["scan"]["spacing_mm"] == [0.0067, 0.0045, 0.067]
    assert label_origin(_cfg(root)) == f"the class folder names under {root}"
    # the default --modality OCTA: every subject is named, with the fix
    with pytest.raises(DataError, match=r"5 subject\(s\) have no OCTA scan.*use --modality OCT"):
        discover(_cfg(root))


def test_retouch_layout_labels_from_a_table_masks_from_the_reference(tmp_path, vendor_export):
    root = tmp_path / "retouch"
    ids = {"Cirrus": "TRAIN001", "Spectralis": "TRAIN025", "Topcon": "TRAIN049"}
    for vendor, case in ids.items():
        vendor_export.retouch(root / f"RETOUCH-TrainingSet-{vendor}" / case, vendor_export.volume())
    assert detect_source(root) == "vendor" and vendor_layout(root) == "retouch"
    with pytest.raises(DataError, match=r"no labels for these vendor exports: pass --labels FILE.*TRAIN001"):
        discover(_cfg(root, modality="OCT"))
    assert {s.label for s in discover(_cfg(root, modality="OCT"), require_labels=False)} == {None}
    pd.DataFrame({"ID": list(ids.values()), "Disease": ["AMD", "RVO", "AMD"]}).to_csv(root / "labels.csv",
                                                                                       index=False)
    subjects = discover(_cfg(root, modality="OCT"))
    assert [s.id for s in subjects] == ["TRAIN001", "TRAIN025", "TRAIN049"]
    assert [s.label for s in subjects] == ["AMD", "RVO", "AMD"]
    assert [s.meta["scan"]["device"] for s in subjects] == ["Zeiss Cirrus", "Heidelberg Spectralis",
                                                            "Topcon T-1000/T-2000"]
    assert all(Path(s.mask).name == "reference.mhd" for s in subjects)
    assert label_origin(_cfg(root)) == str(root / "labels.csv")


def test_class_folders_of_vol_and_xml_exports_with_the_dataset_split(tmp_path, vendor_export):
    root = tmp_path / "clinic"
    vol = vendor_export.volume()
    for split in ("train", "test"):
        for cls in ("NORMAL", "AMD"):
            d = root / split / cls
            vendor_export.vol(d / f"{split}-{cls}-1.vol", vol, SPACING, "OS", patient_id=f"{split}{cls}")
            vendor_export.vol(d / f"{split}-{cls}-1_Angio.vol", vol / 255.0, SPACING, "OS", angio=True)
            vendor_export.xml(d / f"{split}-{cls}-2", vol, laterality="R")
    assert detect_source(root) == "vendor" and vendor_layout(root) == "class-folders"
    subjects = {s.id: s for s in discover(_cfg(root, modality="OCT"))}
    assert len(subjects) == 8  # the .vol and its Angio.vol are one subject
    s = subjects["train-AMD-1"]
    assert s.label == "AMD" and s.split == "train" and set(s.paths) == {"OCT", "OCTA"}
    assert s.group.startswith("patient-") and s.meta["scan"]["laterality"] == "OS"
    assert subjects["test-NORMAL-2"].split == "test" and subjects["test-NORMAL-2"].paths == {
        "OCT": str(root / "test" / "NORMAL" / "test-NORMAL-2")}
    # --modality OCT+OCTA: the XML exports have no angiography; listed, or skipped with --skip-unlabeled
    with pytest.raises(DataError, match=r"4 subject\(s\) have no OCT and OCTA scan.*test-AMD-2 \(has OCT\)"):
        discover(_cfg(root, modality="OCT+OCTA"))
    kept = discover(_cfg(root, modality="OCT+OCTA", skip_unlabeled=True))
    assert sorted(s.id for s in kept) == ["test-AMD-1", "test-NORMAL-1", "train-AMD-1", "train-NORMAL-1"]
    arr, _ = load_subject(kept[0], "OCT+OCTA")
    assert arr.shape == (2, *vol.shape)


def test_plain_folder_of_vendor_files_with_a_label_table(tmp_path, vendor_export):
    root = tmp_path / "site"
    for i in range(3):
        vendor_export.vol(root / f"eye{i}.vol", vendor_export.volume(seed=i), SPACING)
    pd.DataFrame({"subject": ["eye0", "eye1"], "label": ["NORMAL", "DR"]}).to_csv(root / "labels.csv", index=False)
    assert vendor_layout(root) == "files"
    with pytest.raises(DataError, match=r"1 image\(s\) without a label: eye2"):
        discover(_cfg(root, modality="OCT"))
    assert [s.id for s in discover(_cfg(root, modality="OCT", skip_unlabeled=True))] == ["eye0", "eye1"]


def test_manifest_rows_may_point_at_vendor_exports(tmp_path, vendor_export):
    vol = vendor_export.volume()
    vendor_export.vol(tmp_path / "scans" / "a.vol", vol, SPACING, "OD", patient_id="P1")
    vendor_export.vol(tmp_path / "scans" / "a_Angio.vol", vol / 255.0, SPACING, "OD", angio=True)
    vendor_export.xml(tmp_path / "scans" / "b", vol)
    rows = "subject,label,path,group\ns-a,NORMAL,scans/a.vol,\ns-b,DR,scans/b/export.xml,pb\n"
    (tmp_path / "manifest.csv").write_text(rows)
    subjects = {s.id: s for s in discover(_cfg(tmp_path / "manifest.csv"))}
    assert set(subjects["s-a"].paths) == {"OCT", "OCTA"} and subjects["s-a"].group.startswith("patient-")
    assert subjects["s-b"].group == "pb" and subjects["s-b"].meta["scan"]["format"] == "heyex-xml"
    (tmp_path / "scans" / "c.fds").write_bytes(b"\x00" * 32)
    (tmp_path / "manifest.csv").write_text(rows + "s-c,DR,scans/c.fds,\n")
    with pytest.raises(DataError, match=r"subject s-c: .*Topcon .fds files are not supported; octa3d reads"):
        discover(_cfg(tmp_path / "manifest.csv"))


def test_predict_input_folder_mixing_vendor_files_nifti_and_an_octa500_eye(tmp_path, vendor_export, nifti_scan):
    from octa3d.data.synthetic import generate

    generate(tmp_path / "octa500", 2, (8, 32, 16), seed=0)
    folder = tmp_path / "new"
    folder.mkdir()
    vol = vendor_export.volume()
    vendor_export.vol(folder / "exam.vol", vol, SPACING, "OS")
    vendor_export.vol(folder / "exam_Angio.vol", vol / 255.0, SPACING, "OS", angio=True)
    nifti_scan(folder / "scan.nii.gz")
    shutil.copytree(tmp_path / "octa500" / "OCTA_6mm" / "OCT" / "10001", folder / "10001")
    vendor_export.xml(folder / "export", vol)
    kind, subjects = discover_input(folder, DataConfig(modality="OCT"))
    assert kind == "mixed" and [s.id for s in subjects] == ["10001", "exam", "export", "scan"]
    by_id = {s.id: s for s in subjects}
    assert set(by_id["exam"].paths) == {"OCT", "OCTA"} and by_id["scan"].paths == {"image": str(folder /
                                                                                              "scan.nii.gz")}
    for s in subjects:
        arr, _ = load_subject(s, "OCT")
        assert arr.ndim == 4 and arr.max() > arr.min()
    # one export folder and a dataset layout are recognised as such
    assert discover_input(folder / "export", DataConfig())[0] == "scan"
    duke = tmp_path / "duke"
    for cls in ("AMD", "Control"):
        vendor_export.duke(duke / cls / f"{cls}_1.mat", vol)
    kind, subjects = discover_input(duke, DataConfig(modality="OCT"))
    assert kind == "vendor" and sorted(s.label for s in subjects) == ["AMD", "NORMAL"]


def test_files_folder_pairs_angiography_exports(tmp_path, vendor_export):
    vol = vendor_export.volume()
    for name in ("p1", "p2"):
        vendor_export.vol(tmp_path / f"{name}.vol", vol, SPACING)
        vendor_export.vol(tmp_path / f"{name}Angio.vol", vol / 255.0, SPACING, angio=True)
    kind, subjects = discover_input(tmp_path, DataConfig(modality="OCT+OCTA"))
    assert kind == "files" and [s.id for s in subjects] == ["p1", "p2"]
    assert all(set(s.paths) == {"OCT", "OCTA"} for s in subjects)
    np.testing.assert_allclose(load_subject(subjects[0], "OCT+OCTA")[0][1], vol / 255.0, atol=1e-6)
