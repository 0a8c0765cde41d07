"""Subject-level splits: no group leakage, stratification, determinism, files, guard."""

from collections import Counter

import pytest

from octa3d.config import Config
from octa3d.data.splits import (Splits, guard, load_or_make_splits, make_splits, read_splits, write_splits)
from octa3d.data.subject import Subject
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
