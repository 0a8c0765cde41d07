"""Subject discovery: layout detection, OCTA-500, manifest CSV and 2D class folders (tiny generated trees)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from octa3d.config import DataConfig
from octa3d.data.readers import load_subject
from octa3d.data.sources import detect_source, discover, discover_unlabelled, natural_key
from octa3d.errors import DataError

N_BSCANS, ROWS, COLS = 4, 16, 12


@pytest.fixture
def records(capture_log):
    """Log records of ``octa3d.data`` (captured on the logger itself: setup_logging turns propagation off)."""
    return capture_log("octa3d.data")


def messages(records, level: int) -> str:
    return "\n".join(r.getMessage() for r in records if r.levelno == level)


def write_png(path: Path, value: int = 0, shape=(ROWS, COLS)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (value + np.arange(shape[0] * shape[1]).reshape(shape) % 5).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


def make_octa500(root: Path, fov: str, ids, modalities=("OCTA", "OCT"), labels: dict | None = None) -> Path:
    """``root/OCTA_<fov>/<mod>/<id>/<n>.bmp`` stacks of N_BSCANS B-scans of ROWS x COLS."""
    for sid in ids:
        for mod in modalities:
            for n in range(1, N_BSCANS + 1):
                write_png(root / f"OCTA_{fov}" / mod / str(sid) / f"{n}.bmp", n)
    if labels is not None:
        pd.DataFrame({"ID": list(labels), "Disease": list(labels.values())}).to_excel(
            root / "Text labels.xlsx", index=False)
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(data_root=str(root), **kw)


# ------------------------------------------------------------------------------------------- detection
def test_detect_source_layouts(tmp_path):
    assert detect_source(make_octa500(tmp_path / "o", "6mm", [1], ("OCTA",))) == "octa500"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.csv").write_text("subject,label,path\n")
    assert detect_source(tmp_path / "m") == "manifest"
    assert detect_source(tmp_path / "m" / "manifest.csv") == "manifest"
    write_png(tmp_path / "f" / "NORMAL" / "a.png")
    assert detect_source(tmp_path / "f") == "folders"
    write_png(tmp_path / "s" / "train" / "CNV" / "a.jpeg")
    assert detect_source(tmp_path / "s") == "folders"


def test_detect_source_missing_empty_unrecognised(tmp_path):
    for root in (tmp_path / "data", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        with pytest.raises(DataError) as err:
            detect_source(root)
        assert str(err.value) == (
            f"no data at {root}: point --data-root at an OCTA-500 folder (OCTA_6mm/...), a manifest CSV "
            "(subject,label,path) or 2D class folders, or create a synthetic set with: python main.py --mode synth "
            f"--data-root {root}")
    (tmp_path / "odd" / "sub").mkdir(parents=True)
    (tmp_path / "odd" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unrecognised layout.*OCTA-500.*manifest.*class folders"):
        detect_source(tmp_path / "odd")
    with pytest.raises(DataError, match="no data at"):
        discover(cfg(tmp_path / "data", source="octa500"))


@pytest.mark.parametrize("level", ["OCTA_6mm", "OCTA_6mm/OCTA", "renamed"])
def test_a_folder_inside_an_octa500_dataset_is_refused_with_its_parent(tmp_path, level):
    """``--data-root .../OCTA_6mm`` once passed for 2D class folders ("classes" OCT and OCTA, 800 "subjects")."""
    root = make_octa500(tmp_path / "data", "6mm", [1, 2], labels={1: "NORMAL", 2: "DR"})
    if level == "renamed":
        (root / "OCTA_6mm").rename(root / "fov6")
        level = "fov6"
    inner = root / level
    with pytest.raises(DataError, match=f"point --data-root at (its parent )?{re.escape(str(root))} "):
        detect_source(inner)
    with pytest.raises(DataError, match="point --data-root at"):
        discover(cfg(inner))
    if level == "OCTA_6mm":
        with pytest.raises(DataError, match=f"point --data-root at its parent {re.escape(str(root))} "):
            discover(cfg(inner, source="octa500"))
        assert detect_source(root) == "octa500"
    # class folders that happen to hold images stay class folders
    write_png(tmp_path / "k" / "OCT" / "a.png")
    write_png(tmp_path / "k" / "OCTA" / "b.png")
    assert detect_source(tmp_path / "k") == "folders"


# ------------------------------------------------------------------------------------------- OCTA-500
def test_octa500_slice_folders_checked_at_discovery_every_bad_subject_listed(tmp_path, records):
    """Missing or repeated slice numbers, stray image files, mixed sizes and truncated files are found before any
    stage runs, every bad eye in one error; non-image files are only a warning (the reader skips them)."""
    root = make_octa500(tmp_path, "6mm", [1, 2, 3, 4, 5, 6, 7],
                        labels={i: "NORMAL" if i % 2 else "DR" for i in range(1, 8)})
    octa = root / "OCTA_6mm" / "OCTA"
    (octa / "2" / "3.bmp").unlink()                                               # missing slice
    (octa / "3" / "3 (copy).bmp").write_bytes((octa / "3" / "3.bmp").read_bytes())  # duplicate number
    write_png(octa / "4" / "1.bmp", shape=(ROWS, COLS + 2))                       # mixed sizes
    data = (octa / "5" / "2.bmp").read_bytes()
    (octa / "5" / "2.bmp").write_bytes(data[:len(data) // 2])                     # truncated
    write_png(octa / "6" / "preview.bmp")                                         # stray unnumbered image
    (octa / "7" / "notes.txt").write_text("x")                                    # ignored by the reader too
    with pytest.raises(DataError) as err:
        discover(cfg(root))
    msg = str(err.value)
    assert "5 subject(s) have slice folders that cannot be read as one volume" in msg
    lines = {ln.split(":")[0].strip(): ln for ln in msg.splitlines()[1:6]}
    assert sorted(lines) == ["2", "3", "4", "5", "6"]
    assert "missing slice number(s) 3 of 1–4" in lines["2"] and str(octa / "2") in lines["2"]
    assert "duplicate slice numbers: 3 (copy).bmp and 3.bmp" in lines["3"]
    assert f"1.bmp is {COLS + 2}×{ROWS}" in lines["4"] and f"the others {COLS}×{ROWS}" in lines["4"]
    assert "2.bmp: truncated" in lines["5"]
    assert "without a slice number: preview.bmp" in lines["6"]
    assert "notes.txt" in messages(records, logging.WARNING)
    # the OCT folders are fine: only the modality that is read is checked
    assert len(discover(cfg(root, modality="OCT"))) == 7


def test_octa500_oct_and_octa_of_one_eye_must_match(tmp_path):
    root = make_octa500(tmp_path, "6mm", [1, 2], labels={1: "NORMAL", 2: "DR"})
    (root / "OCTA_6mm" / "OCT" / "2" / f"{N_BSCANS}.bmp").unlink()
    assert len(discover(cfg(root, modality="OCTA"))) == 2
    with pytest.raises(DataError, match=rf"2: the OCT and OCTA scans differ: {N_BSCANS - 1} slices .* and "
                                        rf"{N_BSCANS} slices"):
        discover(cfg(root, modality="OCT+OCTA"))


def test_octa500_unlabelled_broken_eye_skipped_with_skip_unlabeled(tmp_path):
    root = make_octa500(tmp_path, "6mm", [1, 2, 3], labels={1: "NORMAL", 2: "DR"})
    (root / "OCTA_6mm" / "OCTA" / "3" / "2.bmp").unlink()
    assert [s.id for s in discover(cfg(root, skip_unlabeled=True))] == ["1", "2"]
    with pytest.raises(DataError, match="3: OCTA folder"):
        discover(cfg(root))


def test_octa500_subjects_spacing_and_order(tmp_path):
    root = make_octa500(tmp_path, "6mm", [10, 2, 1], labels={1: "NORMAL", 2: "dr", 10: "AMD"})
    make_octa500(tmp_path, "3mm", [300], ("OCTA",))
    (tmp_path / "OCTA_3mm" / "labels.csv").write_text("ID,Disease\n300,CNV\n")  # not used: root table wins
    pd.DataFrame({"ID": [1, 2, 10, 300], "Disease": ["NORMAL", "dr", "AMD", "CNV"]}).to_excel(
        root / "Text labels.xlsx", index=False)
    subjects = discover(cfg(root))
    assert [s.id for s in subjects] == ["1", "2", "10", "300"]  # numeric order, both FOVs
    s1, s300 = subjects[0], subjects[-1]
    assert s1.label == "NORMAL" and subjects[1].label == "DR" and s1.group == "1"
    assert s1.paths == {"OCTA": str(root / "OCTA_6mm" / "OCTA" / "1"), "OCT": str(root / "OCTA_6mm" / "OCT" / "1")}
    assert s1.meta == {"fov": "6mm"} and s300.meta == {"fov": "3mm"}
    # SimpleITK order: x = columns, y = rows (2 mm depth), z = B-scans
    assert s1.spacing == pytest.approx((6 / COLS, 2 / ROWS, 6 / N_BSCANS))
    assert s300.spacing == pytest.approx((3 / COLS, 2 / ROWS, 3 / N_BSCANS))
    arr, geo = load_subject(s1, "OCTA")
    assert arr.shape == (1, N_BSCANS, ROWS, COLS) and geo.spacing == pytest.approx(s1.spacing)
    # --fov 6mm: the 3mm subject of the shared table is not reported as a label without an image
    assert [s.id for s in discover(cfg(root, fov="6mm"))] == ["1", "2", "10"]


def test_octa500_label_table_inside_fov_folder_and_explicit(tmp_path):
    root = make_octa500(tmp_path / "d", "6mm", [1, 2], ("OCTA",))
    (root / "OCTA_6mm" / "Text labels.csv").write_text("ID,Disease\n1,NORMAL\n2,CNV\n")
    assert [s.label for s in discover(cfg(root))] == ["NORMAL", "CNV"]
    (tmp_path / "mine.csv").write_text("Subject,Label\n1,DR\n2,DR\n")
    assert [s.label for s in discover(cfg(root, labels=str(tmp_path / "mine.csv")))] == ["DR", "DR"]
    (root / "OCTA_6mm" / "Text labels.csv").unlink()
    with pytest.raises(DataError, match="no label table.*--labels"):
        discover(cfg(root))


def test_octa500_unlabeled_listed_or_skipped(tmp_path, records):
    root = make_octa500(tmp_path, "6mm", [1, 2, 3], ("OCTA",), labels={1: "NORMAL", 2: "DR", 7: "AMD"})
    with pytest.raises(DataError, match=r"1 image\(s\) without a label: 3; 1 label\(s\) without an image: 7; .*"
                                        r"--skip-unlabeled"):
        discover(cfg(root))
    subjects = discover(cfg(root, skip_unlabeled=True))
    assert [s.id for s in subjects] == ["1", "2"]
    assert "without a label: 3" in messages(records, logging.WARNING)


def test_octa500_missing_modality(tmp_path, records):
    root = make_octa500(tmp_path, "6mm", [1, 2], labels={1: "NORMAL", 2: "DR"})
    make_octa500(tmp_path, "6mm", [3], ("OCTA",))
    pd.DataFrame({"ID": [1, 2, 3], "Disease": ["NORMAL", "DR", "DR"]}).to_excel(root / "Text labels.xlsx",
                                                                                index=False)
    assert len(discover(cfg(root, modality="OCTA"))) == 3
    with pytest.raises(DataError, match=r"1 subject\(s\) lack a scan needed by --modality OCT\+OCTA: 3 \(no OCT\)"):
        discover(cfg(root, modality="OCT+OCTA"))
    assert [s.id for s in discover(cfg(root, modality="OCT+OCTA", skip_unlabeled=True))] == ["1", "2"]
    assert "3 (no OCT)" in messages(records, logging.WARNING)


def test_octa500_labelled_eye_with_only_projection_maps_is_listed_never_dropped(tmp_path, records):
    # an interrupted copy: eye 3 lost its OCT and OCTA folders, its projection maps remain
    root = make_octa500(tmp_path, "6mm", [1, 2], labels={1: "NORMAL", 2: "DR", 3: "DR"})
    maps = root / "OCTA_6mm" / "Projection Maps"
    for sid in (1, 2, 3):
        for kind in ("OCTA(FULL)", "OCT(FULL)"):
            write_png(maps / kind / f"{sid}.bmp", shape=(COLS, COLS))
    for sid in (1, 2):
        write_png(maps / "OCT(ILM_OPL)" / f"{sid}.bmp", shape=(COLS, COLS))
    table = re.escape(str(root / "Text labels.xlsx"))
    with pytest.raises(DataError, match=rf"1 labelled subject\(s\) \(labels from {table}\) have no OCTA scan folder "
                                        r"needed for --dim 3d: 3 \(only maps OCT\(FULL\), OCTA\(FULL\)\); .*"
                                        r"--skip-unlabeled"):
        discover(cfg(root))
    with pytest.raises(DataError, match=r"have no OCT and OCTA scan folders needed for --dim 2d: 3 "):
        discover(cfg(root, modality="OCT+OCTA"), dim="2d")  # --projection compute: volumes needed
    with pytest.raises(DataError, match=r"have no 'OCT\(ILM_OPL\)' projection map needed for --dim 2d: 3 "):
        discover(cfg(root, projection="OCT(ILM_OPL)"), dim="2d")
    assert [s.id for s in discover(cfg(root, projection="OCTA(FULL)"), dim="2d")] == ["1", "2", "3"]
    assert [s.id for s in discover(cfg(root, skip_unlabeled=True))] == ["1", "2"]
    assert "have no OCTA scan folder needed for --dim 3d: 3 (only maps" in messages(records, logging.WARNING)
    assert [s.id for s in discover(cfg(root), require_labels=False)] == ["1", "2"]
    assert "1 eye(s) have no OCTA scan folder, only other projection maps, and are not used: 3" in \
        messages(records, logging.WARNING)


def test_octa500_projection_maps_and_masks(tmp_path):
    root = make_octa500(tmp_path, "6mm", [1, 2], ("OCTA",), labels={1: "NORMAL", 2: "DR"})
    for sid in (1, 2):
        write_png(root / "OCTA_6mm" / "Projection Maps" / "OCTA(FULL)" / f"{sid}.bmp", shape=(COLS, COLS))
    write_png(root / "OCTA_6mm" / "Projection Maps" / "OCT(ILM_OPL)" / "1.bmp", shape=(COLS, COLS))
    mask = root / "OCTA_6mm" / "Lesion Masks" / "2.nii.gz"
    mask.parent.mkdir()
    mask.write_bytes(b"")
    s1, s2 = discover(cfg(root))
    assert set(s1.projections) == {"OCTA(FULL)", "OCT(ILM_OPL)"} and list(s2.projections) == ["OCTA(FULL)"]
    assert s1.mask is None and s2.mask == str(mask)
    assert len(discover(cfg(root, projection="OCTA(FULL)"), dim="2d")) == 2
    with pytest.raises(DataError, match=r"have no 'OCT\(ILM_OPL\)' projection map: 2 \(map types available: "
                                        r"OCT\(ILM_OPL\), OCTA\(FULL\)\)"):
        discover(cfg(root, projection="OCT(ILM_OPL)"), dim="2d")


def test_octa500_projection_maps_only(tmp_path):
    # Many users download only the 2D projection maps: no volumes are needed for --dim 2d.
    root = tmp_path
    for sid in (5, 6):
        write_png(root / "OCTA_3mm" / "Projection Maps" / "OCTA(FULL)" / f"{sid}.bmp", shape=(COLS, COLS))
    (root / "OCTA_3mm" / "Text labels.csv").write_text("ID,Disease\n5,NORMAL\n6,DR\n")
    subjects = discover(cfg(root, projection="OCTA(FULL)"), dim="2d")
    assert [(s.id, s.paths, s.spacing) for s in subjects] == [("5", {}, None), ("6", {}, None)]


# ------------------------------------------------------------------------------------------- manifest
def test_manifest(tmp_path):
    (tmp_path / "vols").mkdir()
    np.save(tmp_path / "vols" / "a.npy", np.zeros((2, 3, 4), np.float32))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8)), str(tmp_path / "vols" / "b.nii.gz"))
    write_png(tmp_path / "vols" / "c" / "1.bmp")
    (tmp_path / "manifest.csv").write_text(
        "Subject, LABEL ,Path,Group,Mask\n"
        "b10,dr,vols/b.nii.gz,p1,\n"
        "b9,normal,vols/a.npy,p1,vols/b.nii.gz\n"
        f"c,AMD,{tmp_path / 'vols' / 'c'},,\n")
    subjects = discover(cfg(tmp_path))
    assert [s.id for s in subjects] == ["b9", "b10", "c"]
    b9 = subjects[0]
    assert b9.label == "NORMAL" and b9.paths == {"image": str(tmp_path / "vols" / "a.npy")}
    assert b9.group == "p1" and b9.mask == str(tmp_path / "vols" / "b.nii.gz") and subjects[2].group == "c"
    assert [s.id for s in discover(cfg(tmp_path / "manifest.csv"))] == ["b9", "b10", "c"]


def test_manifest_errors(tmp_path, records):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    csv = tmp_path / "manifest.csv"
    rows = "".join(f"m{i},DR,missing{i}.nii.gz\n" for i in range(12))
    csv.write_text("subject,label,path\n" + rows)
    with pytest.raises(DataError, match=r"manifest .*manifest\.csv: 12 subject\(s\) point to files that do not exist: "
                                        r"m0 \(missing0\.nii\.gz\), .*\(\+2 more\); .*--skip-unlabeled"):
        discover(cfg(csv))
    csv.write_text("subject,label,path\na,,a.npy\nb,DR,\nc,NORMAL,a.npy\nd,DR,a.npy\n")
    with pytest.raises(DataError, match=r"1 image\(s\) without a label: a; 1 label\(s\) without an image: b"):
        discover(cfg(csv))
    assert [s.id for s in discover(cfg(csv, skip_unlabeled=True))] == ["c", "d"]
    assert "without a label: a" in messages(records, logging.WARNING)
    csv.write_text("subject,label,path\na,DR,a.npy\na,NORMAL,a.npy\n")
    with pytest.raises(DataError, match="duplicate subject IDs: a"):
        discover(cfg(csv))
    csv.write_text("id,file\na,a.npy\n")
    with pytest.raises(DataError, match=r"no label column \(columns: id, file\)"):
        discover(cfg(csv))


def test_manifest_row_whose_file_is_gone_is_listed_and_skipped_only_when_asked(tmp_path, records):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    csv = tmp_path / "manifest.csv"
    csv.write_text("subject,label,path\na,DR,a.npy\nb,NORMAL,a.npy\nc,DR,gone.npy\n")
    with pytest.raises(DataError, match=r"1 subject\(s\) point to files that do not exist: c \(gone\.npy\)"):
        discover(cfg(csv))
    assert [s.id for s in discover(cfg(csv, skip_unlabeled=True))] == ["a", "b"]
    assert "do not exist: c (gone.npy); skipped (--skip-unlabeled)" in messages(records, logging.WARNING)
    # with --labels the subject is reported once, as a missing file (not also as a label without an image)
    (tmp_path / "labels.csv").write_text("ID,Disease\na,DR\nb,NORMAL\nc,DR\n")
    with pytest.raises(DataError) as err:
        discover(cfg(csv, labels=str(tmp_path / "labels.csv")))
    assert "without an image" not in str(err.value)


def test_class_folder_image_link_whose_file_is_gone(tmp_path, records):
    for cls in ("NORMAL", "DR"):
        write_png(tmp_path / cls / f"{cls}-1-1.png")
    (tmp_path / "DR" / "DR-2-1.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(DataError, match=r"1 image link\(s\) point to files that no longer exist: DR/DR-2-1\.png"):
        discover(cfg(tmp_path), dim="2d")
    assert len(discover(cfg(tmp_path, skip_unlabeled=True), dim="2d")) == 2


# ------------------------------------------------------------------------------------------- 2D folders
def test_kermany_folders_split_and_groups(tmp_path, records):
    for split, cls, name in [("train", "CNV", "CNV-13823-1.jpeg"), ("train", "CNV", "CNV-13823-2.JPEG"),
                             ("train", "normal", "NORMAL-99-1.png"), ("test", "CNV", "CNV-500-1.jpeg"),
                             ("test", "NORMAL", "scan.tif")]:
        write_png(tmp_path / split / cls / name)
    (tmp_path / "train" / "CNV" / "notes.txt").write_text("x")
    subjects = discover(cfg(tmp_path))
    by_id = {s.id: s for s in subjects}
    assert sorted(by_id) == sorted(["train/CNV/CNV-13823-1", "train/CNV/CNV-13823-2", "train/normal/NORMAL-99-1",
                                    "test/CNV/CNV-500-1", "test/NORMAL/scan"])
    s = by_id["train/CNV/CNV-13823-1"]
    assert (s.label, s.group, s.split) == ("CNV", "13823", "train")
    assert by_id["train/CNV/CNV-13823-2"].group == "13823"
    assert by_id["train/normal/NORMAL-99-1"].label == "NORMAL"
    assert (by_id["test/NORMAL/scan"].group, by_id["test/NORMAL/scan"].split) == ("scan", "test")  # no match
    assert "honouring the dataset's own split" in messages(records, logging.INFO)
    arr, _ = load_subject(s, "OCTA")
    assert arr.shape == (1, ROWS, COLS)


def test_flat_folders_custom_regex(tmp_path):
    write_png(tmp_path / "DR" / "p7_left.png")
    write_png(tmp_path / "NORMAL" / "p8_right.bmp")
    subjects = discover(cfg(tmp_path, group_regex=r"^p(\d+)_"))
    assert [(s.id, s.label, s.group, s.split) for s in subjects] == [
        ("DR/p7_left", "DR", "7", None), ("NORMAL/p8_right", "NORMAL", "8", None)]


def test_natural_key():
    assert sorted(["10", "9", "a10", "a2", "B1"], key=natural_key) == ["9", "10", "a2", "a10", "B1"]


def test_unlabeled_scans_allowed_when_labels_not_required(tmp_path):
    """--ae-extra-data and explain read scans without any label table."""
    root = make_octa500(tmp_path / "d", "6mm", ["10001", "10002"], labels=None)
    for f in root.glob("*.xlsx"):
        f.unlink()
    with pytest.raises(DataError):
        discover(cfg(root))
    subs = discover(cfg(root), require_labels=False)
    assert [s.id for s in subs] == ["10001", "10002"] and all(s.label is None for s in subs)


def test_discover_unlabelled_ignores_the_experiments_labels_and_source(tmp_path):
    """--ae-extra-data: another dataset, its layout detected, its labels optional."""
    extra = make_octa500(tmp_path / "extra", "6mm", ["20001", "20002"], ("OCTA",))
    (tmp_path / "labels.csv").write_text("ID,Disease\n1,NORMAL\n")
    data_cfg = cfg(tmp_path / "main", labels=str(tmp_path / "labels.csv"), source="manifest", fov="6mm")
    subs = discover_unlabelled(data_cfg, extra, "3d")
    assert [(s.id, s.label) for s in subs] == [("20001", None), ("20002", None)]
    assert subs[0].spacing == pytest.approx((6 / COLS, 2 / ROWS, 6 / N_BSCANS))
    # the caller's settings are untouched
    assert (data_cfg.data_root, data_cfg.source) == (str(tmp_path / "main"), "manifest")
    pd.DataFrame({"ID": [20001], "Disease": ["DR"]}).to_excel(extra / "Text labels.xlsx", index=False)
    assert [s.label for s in discover_unlabelled(data_cfg, str(extra), "3d")] == ["DR", None]


def test_discover_unlabelled_names_the_root_when_empty(tmp_path):
    for root in (tmp_path / "missing", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        with pytest.raises(DataError, match=f"no data at {root}"):
            discover_unlabelled(cfg(tmp_path), root, "3d")
    (tmp_path / "bare" / "OCTA_6mm" / "OCTA").mkdir(parents=True)  # the layout, but no eye in it
    with pytest.raises(DataError, match="bare: no subjects found"):
        discover_unlabelled(cfg(tmp_path), tmp_path / "bare", "3d")


# ------------------------------------------------------------------------------------------- predict inputs
def _npy(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.zeros((4, 6, 5), np.uint8))
    return path


def test_discover_input_recognises_every_predict_input_kind(tmp_path):
    """Issue 16 item 1: one scan, an OCTA-500 folder (labels optional), a manifest (label column optional), class
    folders of 2D images (labelled by folder), a folder of files, a folder of scan folders; a slice folder is one
    scan for a 3D model and many images for a 2D one."""
    from octa3d.data.sources import discover_input

    dc = DataConfig()
    kind, subs = discover_input(_npy(tmp_path / "one" / "s1.npy"), dc, "3d")
    assert (kind, [s.id for s in subs], subs[0].label) == ("scan", ["s1"], None)
    root = make_octa500(tmp_path / "o500", "6mm", [10001, 10002], labels={10001: "CNV"})
    kind, subs = discover_input(root, dc, "3d")
    assert kind == "octa500" and {s.id: s.label for s in subs} == {"10001": "CNV", "10002": None}
    assert discover_input(root / "OCTA_6mm" / "OCTA" / "10002", dc, "3d")[0] == "scan"  # an eye folder
    kind, subs = discover_input(root / "OCTA_6mm" / "OCTA", dc, "3d")                  # the modality folder
    assert kind == "scan-folders" and [s.id for s in subs] == ["10001", "10002"] and subs[0].spacing
    for name in ("a", "b"):
        _npy(tmp_path / "m" / f"{name}.npy")
    (tmp_path / "m" / "manifest.csv").write_text("subject,path,label\na,a.npy,DR\nb,b.npy,\n")
    kind, subs = discover_input(tmp_path / "m", dc, "3d")
    assert kind == "manifest" and {s.id: s.label for s in subs} == {"a": "DR", "b": None}
    (tmp_path / "m" / "nolabel.csv").write_text("subject,path\na,a.npy\n")
    assert discover_input(tmp_path / "m" / "nolabel.csv", dc, "3d")[1][0].label is None
    for cls, pid in (("CNV", 7), ("NORMAL", 8)):
        write_png(tmp_path / "k" / cls / f"{cls}-{pid}-1.png")
    kind, subs = discover_input(tmp_path / "k", dc, "2d")
    assert kind == "folders" and {s.id: (s.label, s.group) for s in subs} == {
        "CNV/CNV-7-1": ("CNV", "7"), "NORMAL/NORMAL-8-1": ("NORMAL", "8")}
    for n in (1, 2, 10):
        write_png(tmp_path / "flat" / f"CNV-9-{n}.png")
    kind, subs = discover_input(tmp_path / "flat", dc, "2d")
    assert kind == "files" and [s.id for s in subs] == ["CNV-9-1", "CNV-9-2", "CNV-9-10"] and subs[0].group == "9"
    assert discover_input(tmp_path / "flat", dc, "3d")[0] == "scan"  # numbered slices: one volume
    _npy(tmp_path / "vols" / "x.npy")
    _npy(tmp_path / "vols" / "y.npy")
    (tmp_path / "vols" / "notes.txt").write_text("not a scan")
    assert [s.id for s in discover_input(tmp_path / "vols", dc, "3d")[1]] == ["x", "y"]


def test_discover_input_refuses_missing_empty_and_ambiguous_inputs(tmp_path):
    from octa3d.data.sources import discover_input

    with pytest.raises(DataError, match="no such file"):
        discover_input(tmp_path / "nope", DataConfig(), "3d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        discover_input(tmp_path / "empty", DataConfig(), "3d")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no scans"):
        discover_input(tmp_path / "txt", DataConfig(), "3d")
    _npy(tmp_path / "dup" / "a.npy")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8)), str(tmp_path / "dup" / "a.nii.gz"))
    with pytest.raises(DataError, match="share the subject ID.*a"):
        discover_input(tmp_path / "dup", DataConfig(), "3d")
