"""Subject-level splits: no group leakage, stratification, determinism, files, guard, the "seen in training"
check, split settings, messages."""

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from octa3d.config import Config
from octa3d.data.leakage import guard, training_overlap
from octa3d.data.octa500 import subject_from_path
from octa3d.data.splits import Splits, labelled_subjects, load_or_make_splits, make_splits, read_splits, write_splits
from octa3d.data.subject import Subject
from octa3d.data.synthetic import generate
from octa3d.errors import ConfigError, DataError, LeakageError

CLASSES = ["NORMAL", "DR", "CNV"]


def cohort(n_per_class=20, per_group=1, split=None):
    subs, lab = [], {}
    for c, name in enumerate(CLASSES):
        for i in range(n_per_class):
            sid = f"{name}-{i}"
            subs.append(Subject(id=sid, label=name, paths={}, group=f"{name}-p{i // per_group}", split=split))
            lab[sid] = c
    return subs, lab


def split(subs, lab, **kw):
    args = dict(test_fraction=0.3, val_fraction=0.2, folds=1, seed=0) | kw
    return make_splits(subs, lab, CLASSES, **args)


def groups_of(ids, subs):
    g = {s.id: s.group for s in subs}
    return {g[i] for i in ids}


def test_partition_is_complete_and_disjoint():
    subs, lab = cohort()
    sp = split(subs, lab)
    all_ids = sp.train + sp.val + sp.test
    assert sorted(all_ids) == sorted(s.id for s in subs)
    assert len(set(all_ids)) == len(all_ids)


def test_groups_never_span_splits():
    subs, lab = cohort(n_per_class=30, per_group=3)
    sp = split(subs, lab)
    tr, va, te = (groups_of(x, subs) for x in (sp.train, sp.val, sp.test))
    assert not (tr & va) and not (tr & te) and not (va & te)


def test_stratified_fractions():
    subs, lab = cohort(n_per_class=20)
    sp = split(subs, lab)
    test_counts = Counter(lab[i] for i in sp.test)
    assert all(test_counts[c] == 6 for c in range(3))  # 30 % of 20 per class
    val_counts = Counter(lab[i] for i in sp.val)
    assert all(val_counts[c] == 3 for c in range(3))  # 20 % of the remaining 14, rounded


def test_same_seed_same_split_other_seed_differs():
    subs, lab = cohort()
    a, b, c = split(subs, lab, seed=1), split(subs, lab, seed=1), split(subs, lab, seed=2)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.test != c.test


def test_kfold_covers_non_test_once_each():
    subs, lab = cohort(n_per_class=15, per_group=1)
    sp = split(subs, lab, folds=3)
    assert sp.n_folds == 3
    vals = [v for _, v in sp.folds]
    flat = [i for v in vals for i in v]
    assert sorted(flat) == sorted(set(s.id for s in subs) - set(sp.test))
    for tr, va in sp.folds:
        assert not set(tr) & set(va) and not set(tr) & set(sp.test)


def test_predefined_dataset_split_is_honoured():
    subs, lab = cohort(n_per_class=6)
    for s in subs:
        s.split = "test" if s.id.endswith(("-0", "-1")) else "train"
    sp = split(subs, lab)
    assert sorted(sp.test) == sorted(s.id for s in subs if s.split == "test")


def test_too_few_subjects_in_a_class():
    subs, lab = cohort(n_per_class=5)
    subs = [s for s in subs if not (s.label == "CNV" and s.id != "CNV-0")]
    lab = {s.id: lab[s.id] for s in subs}
    with pytest.raises(DataError, match="class CNV has only 1"):
        split(subs, lab)


def test_folds_need_enough_groups():
    subs, lab = cohort(n_per_class=4)
    with pytest.raises(DataError, match="--folds 5"):
        split(subs, lab, folds=5)


def test_write_read_roundtrip(tmp_path):
    subs, lab = cohort()
    for folds in (1, 3):
        sp = split(subs, lab, folds=folds)
        sp.settings = {"seed": 0}
        write_splits(sp, tmp_path / str(folds))
        back = read_splits(tmp_path / str(folds))
        assert (back.train, back.val, back.test, back.folds) == (sp.train, sp.val, sp.test, sp.folds)
        assert back.class_names == CLASSES and back.labels == sp.labels
    assert (tmp_path / "3" / "fold-2" / "val.csv").exists()


def test_guard_refuses_test_subjects_in_training_and_train_in_test():
    subs, lab = cohort()
    sp = split(subs, lab)
    guard("train", sp.train + sp.val, sp)
    guard("test", sp.test, sp)
    with pytest.raises(LeakageError, match=sp.test[0]):
        guard("ae_pretrain", sp.train + sp.test[:1], sp)
    with pytest.raises(LeakageError, match="training/validation"):
        guard("test", sp.test + sp.train[:1], sp)


def test_guard_checks_patient_groups_of_extra_subjects():
    subs, lab = cohort(per_group=2)
    sp = split(subs, lab)
    test_group = sp.groups[sp.test[0]]
    with pytest.raises(LeakageError):
        guard("ae_pretrain", ["extra-scan"], sp, groups={"extra-scan": test_group})


def test_load_or_make_reuses_and_detects_changed_settings(tmp_path):
    class LM:
        class_names = CLASSES

    cfg = Config()
    cfg.run.runs_dir = str(tmp_path)
    subs, lab = cohort()
    sp = load_or_make_splits(cfg, subs, LM(), lab)
    again = load_or_make_splits(cfg)  # no discovery needed: read from the run folder
    assert again.test == sp.test
    cfg.data.test_fraction = 0.25
    with pytest.raises(ConfigError, match="--test-fraction was 0.3"):
        load_or_make_splits(cfg)


def test_splits_fold_accessor():
    sp = Splits(train=["a"], val=["b"], test=["c"])
    assert sp.fold(0) == (["a"], ["b"])
    with pytest.raises(ConfigError):
        sp.fold(1)


# ------------------------------------------------------------------------------------------- one identity
def kermany(root: Path, patients: dict[str, list[int]], images: int = 2) -> Path:
    """``root/<CLASS>/<CLASS>-<patient>-<k>.jpeg`` class folders, ``images`` B-scans per patient."""
    import SimpleITK as sitk

    for cls, ids in patients.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in ids:
            for k in range(1, images + 1):
                arr = (np.arange(48, dtype=np.uint8).reshape(6, 8) * (p % 5 + k)).astype(np.uint8)
                sitk.WriteImage(sitk.GetImageFromArray(arr), str(root / cls / f"{cls}-{p}-{k}.png"))
    return root


def kermany_cfg(root: Path, runs: Path, exp: str = "k", mode: str = "prepare") -> Config:
    cfg = Config()
    cfg.data.data_root, cfg.data.task = str(root), "multi"
    cfg.model.dim = "2d"
    cfg.run.runs_dir, cfg.run.exp, cfg.run.mode = str(runs), exp, mode
    return cfg


def test_training_overlap_finds_a_2d_image_and_its_patient_given_by_path(tmp_path):
    """Split files store class-folder subjects as CNV/CNV-6294785-1; one image given by path is CNV-6294785-1,
    of patient 6294785 (the same --group-regex rule as discovery). Both it and the patient's other images match."""
    root = kermany(tmp_path / "data", {"NORMAL": [11, 12, 13, 14], "CNV": [21, 22, 23, 24]})
    cfg = kermany_cfg(root, tmp_path / "runs")
    sp = load_or_make_splits(cfg)
    assert sp.groups["CNV/CNV-21-1"] == "21"
    trained = next(s for s in sp.train if s.startswith("CNV/"))
    tested = next(s for s in sp.test if s.startswith("CNV/"))
    copy = tmp_path / "elsewhere" / (Path(trained).name + ".png")            # the user's copy of the file
    copy.parent.mkdir()
    shutil.copy(root / (trained + ".png"), copy)
    subject = subject_from_path(copy, cfg.data)
    patient = sp.groups[trained]
    assert (subject.id, subject.group) == (Path(trained).name, patient)
    assert training_overlap(sp, subject) == (f"{subject.id} is training/validation subject {trained} (same file "
                                             "name)")
    sibling = Path(trained).name[:-1] + ("2" if trained.endswith("1") else "1")
    other = Subject(sibling + "-copy", None, {"image": "x.png"}, group=patient)  # another image of the patient
    assert f"belongs to patient group {patient}, like training/validation subject" in training_overlap(sp, other)
    in_place = subject_from_path(root / (trained + ".png"), cfg.data)          # the file in the data root
    assert training_overlap(sp, in_place) is not None
    assert training_overlap(sp, subject_from_path(root / (tested + ".png"), cfg.data)) is None   # hold-out
    # the same identity in the guard: the bare file name of a hold-out image (extra data) is refused in training
    with pytest.raises(LeakageError, match=Path(tested).name):
        guard("ae_pretrain", [Path(tested).name], sp, groups={Path(tested).name: "unknown"})


def test_training_overlap_octa500_eye_folder(tmp_path):
    root = tmp_path / "data"
    generate(root, 8, (8, 16, 8), seed=1, classes=("NORMAL", "DR"))
    cfg = Config()
    cfg.data.data_root, cfg.run.runs_dir, cfg.run.exp = str(root), str(tmp_path / "runs"), "e"
    sp = load_or_make_splits(cfg)
    fov = next(p for p in root.iterdir() if p.name.startswith("OCTA_"))
    seen = subject_from_path(fov / "OCTA" / sp.train[0], cfg.data)
    assert training_overlap(sp, seen) == f"{sp.train[0]} is a training/validation subject"
    assert training_overlap(sp, subject_from_path(fov / "OCTA" / sp.test[0], cfg.data)) is None


def test_label_counts_in_messages_count_subjects(tmp_path):
    root = kermany(tmp_path / "data", {"NORMAL": [11, 12, 13], "CNV": [21, 22], "DME": [31]}, images=2)
    cfg = kermany_cfg(root, tmp_path / "runs")
    cfg.data.classes = ["NORMAL", "DRUSEN"]
    with pytest.raises(DataError, match=r"labels present \(CNV \(4\), DME \(2\), NORMAL \(6\)\)"):
        labelled_subjects(cfg)


def test_split_settings_of_2d_folders_record_no_octa500_settings(tmp_path):
    root = kermany(tmp_path / "data", {"NORMAL": [11, 12, 13, 14], "CNV": [21, 22, 23, 24]})
    cfg = kermany_cfg(root, tmp_path / "runs")
    load_or_make_splits(cfg)
    record = tmp_path / "runs" / "k" / "splits" / "split.json"
    doc = json.loads(record.read_text())
    assert doc["settings"]["modality"] is None and doc["settings"]["fov"] is None
    assert doc["settings"]["dim"] == "2d" and doc["settings"]["source"] == "auto"
    cfg.data.modality = "OCT"                                  # meaningless for class folders: not a new split
    assert load_or_make_splits(cfg).test
    doc["settings"].update(modality="OCTA", fov="all")         # recorded before these were null: still accepted
    record.write_text(json.dumps(doc))
    assert load_or_make_splits(cfg).test
    octa = tmp_path / "octa"
    generate(octa, 8, (8, 16, 8), seed=1, classes=("NORMAL", "DR"))
    ocfg = Config()
    ocfg.data.data_root, ocfg.run.runs_dir, ocfg.run.exp = str(octa), str(tmp_path / "runs"), "o"
    load_or_make_splits(ocfg)
    settings = json.loads((tmp_path / "runs" / "o" / "splits" / "split.json").read_text())["settings"]
    assert (settings["modality"], settings["fov"]) == ("OCTA", "all")


@pytest.fixture
def split_log(capture_log):
    return capture_log("octa3d.data.splits")


def test_new_splits_outside_prepare_warn_and_name_experiments_over_the_same_data(tmp_path, split_log):
    root = kermany(tmp_path / "data", {"NORMAL": [11, 12, 13, 14], "CNV": [21, 22, 23, 24]})
    runs = tmp_path / "runs"
    load_or_make_splits(kermany_cfg(root, runs, "prepared"))
    assert not [r for r in split_log if r.levelno >= logging.WARNING]  # prepare: new splits are the point
    assert "Wrote new subject-level splits" in split_log[-1].getMessage()
    other_data = kermany(tmp_path / "other", {"NORMAL": [11, 12, 13, 14], "CNV": [21, 22, 23, 24]})
    load_or_make_splits(kermany_cfg(other_data, runs, "unrelated"))
    split_log.clear()
    cfg = kermany_cfg(root, runs, "2d-resnet18-binary", mode="train")  # a forgotten --exp/--task
    cfg.data.task = "binary"
    load_or_make_splits(cfg)
    warnings = [r.getMessage() for r in split_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "NEW EXPERIMENT '2d-resnet18-binary': --mode train found no splits" in warnings[0]
    assert "'prepared' (task multi)" in warnings[0] and "unrelated" not in warnings[0]
    assert "pass --exp NAME" in warnings[0]
    split_log.clear()
    load_or_make_splits(cfg)                                            # reused: no warning
    assert not [r for r in split_log if r.levelno == logging.WARNING]


def test_a_label_typo_stops_a_binary_task_naming_subject_and_file(tmp_path):
    import openpyxl

    root = tmp_path / "data"
    generate(root, 6, (8, 8, 8), seed=3, classes=("NORMAL", "DR"))
    table = root / "Text labels.xlsx"
    wb = openpyxl.load_workbook(table)
    ws = wb.active
    col = [c.value for c in ws[1]].index("Disease")
    ws.cell(row=2, column=col + 1, value="NORMAI")  # was NORMAL: it would have become a positive (DR) eye
    typo = str(ws.cell(row=2, column=1).value)
    wb.save(table)
    cfg = Config()
    cfg.data.data_root, cfg.run.runs_dir, cfg.run.exp = str(root), str(tmp_path / "runs"), "e"
    with pytest.raises(DataError, match=rf"unknown label\(s\) in {re.escape(str(table))}: NORMAI \(1 subject\(s\): "
                                        rf"{typo}\); .*name them in --positive"):
        labelled_subjects(cfg)
    root2 = kermany(tmp_path / "k", {"NORMAL": [11, 12], "NORMAI": [13], "CNV": [21, 22]})
    cfg = kermany_cfg(root2, tmp_path / "runs")
    cfg.data.task = "binary"
    with pytest.raises(DataError, match=r"NORMAI \(2 subject\(s\): NORMAI/NORMAI-13-1, NORMAI/NORMAI-13-2\); .*Fix "
                                        rf"the label\(s\) in the class folder names under {re.escape(str(root2))}"):
        labelled_subjects(cfg)


def test_training_overlap_matches_class_folder_ids_under_another_root_and_autoencoder_data(tmp_path):
    """Issue 16: a predict input of class folders lists ``train/CNV/CNV-21-1`` (or ``CNV/CNV-21-1`` against a split
    made under ``train/``): the same image, matched by file name, for every source type; the autoencoder's extra
    data counts as seen too."""
    from octa3d.data.leakage import overlap_checker

    root = kermany(tmp_path / "data", {"NORMAL": [11, 12, 13, 14], "CNV": [21, 22, 23, 24]})
    sp = load_or_make_splits(kermany_cfg(root, tmp_path / "runs"))
    trained = next(s for s in sp.train if s.startswith("CNV/"))
    other_root = Subject("new/" + trained, None, {"image": "x.png"}, group="no-regex-match")
    assert training_overlap(sp, other_root) == (f"new/{trained} is training/validation subject {trained} (same "
                                                "file name)")
    tested = next(s for s in sp.test if s.startswith("CNV/"))
    assert training_overlap(sp, Subject("new/" + tested, None, {}, group=sp.groups[tested])) is None
    check = overlap_checker(sp, extra={"ae/scan-7": "scan-7", "s99": "p99"})
    assert "autoencoder extra-data subject ae/scan-7" in check(Subject("scan-7", None, {}, group="scan-7"))
    assert "patient group p99" in check(Subject("s100", None, {}, group="p99"))
    assert check(Subject("fresh", None, {}, group="fresh")) is None
