"""Subject-level splits (made by ``--mode prepare``, :mod:`octa3d.stages.prepare`; run folder ``splits/``) and the
leakage guard.

Splits are made over *groups* (patients): a group never spans two splits. They are stratified by class, fixed by
``--seed``, written once to ``runs/<exp>/splits/`` and reused by every later stage of the experiment. A stage
that would see a subject it must not see (test subjects in training, training subjects in testing) is stopped by
:func:`guard`.

Files::

    splits/split.json                  settings, class order, counts
    splits/{train,val,test}.csv        subject,group,label,class_index   (single split)
    splits/test.csv + fold-k/{train,val}.csv                             (--folds K > 1)
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from octa3d.config import Config
from octa3d.data.subject import Subject
from octa3d.errors import ConfigError, DataError, LeakageError
from octa3d.utils.io import atomic_write_csv, atomic_write_text

log = logging.getLogger("octa3d.data.splits")

#: Settings that define a split; a later stage with different values would silently use other subjects.
SPLIT_KEYS = ("data_root", "source", "modality", "fov", "task", "classes", "negative", "positive",
              "test_fraction", "val_fraction", "folds", "seed")

TRAINING_STAGES = ("ae_pretrain", "train", "compress")
TESTING_STAGES = ("test",)


@dataclass
class Splits:
    """Subject IDs per split; ``folds`` holds (train, val) pairs when ``--folds K > 1``."""

    train: list[str]
    val: list[str]
    test: list[str]
    folds: list[tuple[list[str], list[str]]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # subject -> class index
    groups: dict[str, str] = field(default_factory=dict)  # subject -> group
    class_names: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def fold(self, k: int) -> tuple[list[str], list[str]]:
        """(train, val) subject IDs of fold ``k`` (0-based); the single split when there are no folds."""
        if not self.folds:
            if k != 0:
                raise ConfigError(f"fold {k} requested but the experiment has a single train/val split")
            return self.train, self.val
        return self.folds[k]

    @property
    def n_folds(self) -> int:
        """Number of train/val folds (1 for a single split)."""
        return max(1, len(self.folds))

    def non_test(self) -> set[str]:
        """Every subject that training stages may use."""
        return set(self.train) | set(self.val) | {s for tr, va in self.folds for s in (*tr, *va)}


def _split_settings(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    out = {k: getattr(d, k) for k in SPLIT_KEYS if hasattr(d, k)}
    out["data_root"] = str(Path(d.data_root).resolve())
    out["seed"] = cfg.run.seed
    out["dim"] = cfg.model.dim
    return out


def _pick_groups(groups_by_class: dict[int, list[str]], fraction: float, rng: np.random.Generator,
                 what: str, class_names: list[str]) -> set[str]:
    """Take round(fraction * n) groups of every class (at least one, leaving at least one behind)."""
    picked: set[str] = set()
    for cls in sorted(groups_by_class):
        grp = sorted(groups_by_class[cls])
        n = len(grp)
        k = int(round(fraction * n))
        k = min(max(k, 1), n - 1)
        if n < 2:
            raise DataError(f"class {class_names[cls]} has only {n} subject group(s): at least 2 are needed to "
                            f"put one in {what} and keep one for training; add data, merge or drop the class "
                            f"(--classes), or lower the split fractions")
        order = rng.permutation(n)
        picked.update(grp[i] for i in order[:k])
    return picked


def _group_strata(subjects: list[Subject], label_of: dict[str, int]
                  ) -> tuple[dict[str, list[Subject]], dict[str, int], dict[str, set[str]]]:
    """Subjects per group, each group's stratum (class) and the dataset's own split(s) of each group.

    Raises:
        DataError: a group sits in more than one of the dataset's own train/val/test folders.
    """
    by_group: dict[str, list[Subject]] = defaultdict(list)
    for s in subjects:
        by_group[s.group].append(s)
    # A group's stratum is its most common class (ties -> lowest index), so mixed-label patients stay whole.
    group_class = {g: Counter(label_of[s.id] for s in ss).most_common(1)[0][0] for g, ss in by_group.items()}
    predefined = {g: {s.split for s in ss} - {None} for g, ss in by_group.items()}
    mixed = [g for g, sp in predefined.items() if len(sp) > 1]
    if mixed:
        raise DataError(f"patient group(s) {', '.join(sorted(mixed)[:10])} appear in more than one of the "
                        f"dataset's train/val/test folders: the dataset's own split leaks patients; fix the "
                        f"folders or --group-regex")
    return by_group, group_class, predefined  # type: ignore[return-value]


def _by_class(groups: list[str], group_class: dict[str, int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for g in groups:
        out[group_class[g]].append(g)
    return out


def _test_groups(group_class: dict[str, int], predefined: dict[str, set[str]], fraction: float,
                 rng: np.random.Generator, class_names: list[str]) -> set[str]:
    """The hold-out groups: the dataset's own test folder if it has one, else a stratified random pick."""
    everyone = _by_class(sorted(group_class), group_class)
    if not any(predefined.values()):
        return _pick_groups(everyone, fraction, rng, "the test split", class_names)
    test_groups = {g for g, sp in predefined.items() if "test" in sp}
    if not test_groups:  # train/val folders only: the hold-out is still drawn
        test_groups = _pick_groups(everyone, fraction, rng, "the test split", class_names)
    log.info("Honouring the dataset's own train/test folders (%d test groups)", len(test_groups))
    return test_groups


def _fold_groups(rest: list[str], group_class: dict[str, int], folds: int, seed: int,
                 class_names: list[str]) -> list[tuple[list[str], list[str]]]:
    """(train, val) groups of a stratified group k-fold over the non-test groups."""
    from sklearn.model_selection import StratifiedGroupKFold

    counts = Counter(group_class[g] for g in rest)
    few = [class_names[c] for c, n in counts.items() if n < folds]
    if few:
        raise DataError(f"--folds {folds}: class(es) {', '.join(few)} have fewer than {folds} non-test "
                        f"subject groups; lower --folds or add data")
    skf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    y = [group_class[g] for g in rest]
    return [([rest[i] for i in tr_idx], [rest[i] for i in va_idx])
            for tr_idx, va_idx in skf.split(np.zeros(len(rest)), y, groups=rest)]


def _val_groups(rest: list[str], group_class: dict[str, int], predefined: dict[str, set[str]], fraction: float,
                rng: np.random.Generator, class_names: list[str]) -> set[str]:
    """The validation groups: the dataset's own val folder if it has one, else a stratified pick (or none)."""
    predefined_val = {g for g in rest if "val" in predefined[g]}
    if predefined_val:
        return predefined_val
    if fraction > 0:
        return _pick_groups(_by_class(rest, group_class), fraction, rng, "the validation split", class_names)
    return set()


def make_splits(subjects: list[Subject], label_of: dict[str, int], class_names: list[str], *,
                test_fraction: float, val_fraction: float, folds: int, seed: int) -> Splits:
    """Stratified, group-level train/val/test (or k-fold) split.

    Args:
        subjects: discovered subjects (already filtered to those with a class index).
        label_of: subject ID -> class index.
        class_names: class order.
        test_fraction: hold-out fraction of groups per class.
        val_fraction: validation fraction of the remaining groups per class (single split).
        folds: K > 1 for stratified group k-fold inside the non-test groups.
        seed: split seed.

    Returns:
        The :class:`Splits`. A dataset's own ``split`` field (2D folders with train/test) is honoured.

    Raises:
        DataError: a class has too few groups for the requested split.
    """
    rng = np.random.default_rng(seed)  # one stream: the test pick, then the validation pick
    by_group, group_class, predefined = _group_strata(subjects, label_of)
    test_groups = _test_groups(group_class, predefined, test_fraction, rng, class_names)
    rest = sorted(set(by_group) - test_groups)
    missing = set(range(len(class_names))) - {group_class[g] for g in rest}
    if missing:
        raise DataError(f"class(es) {', '.join(class_names[c] for c in sorted(missing))} have no training "
                        f"subjects left after the hold-out split; add data or lower --test-fraction")

    def ids(gs: set[str] | list[str]) -> list[str]:
        return sorted((s.id for g in gs for s in by_group[g]), key=_natural)

    result = Splits(train=[], val=[], test=ids(test_groups), labels=dict(label_of),
                    groups={s.id: s.group for s in subjects}, class_names=list(class_names))
    if folds > 1:
        result.folds = [(ids(tr), ids(va)) for tr, va in _fold_groups(rest, group_class, folds, seed, class_names)]
        result.train, result.val = result.folds[0]
    else:
        val_groups = _val_groups(rest, group_class, predefined, val_fraction, rng, class_names)
        result.train, result.val = ids(sorted(set(rest) - val_groups)), ids(val_groups)
    return result


def _natural(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def _frame(ids: list[str], sp: Splits) -> pd.DataFrame:
    return pd.DataFrame({"subject": ids, "group": [sp.groups[i] for i in ids],
                         "label": [sp.class_names[sp.labels[i]] for i in ids],
                         "class_index": [sp.labels[i] for i in ids]})


def write_splits(sp: Splits, folder: Path) -> None:
    """Write split CSVs and ``split.json`` into ``folder`` (atomically, file by file)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(folder / "test.csv", _frame(sp.test, sp))
    if sp.folds:
        for k, (tr, va) in enumerate(sp.folds):
            atomic_write_csv(folder / f"fold-{k}" / "train.csv", _frame(tr, sp))
            atomic_write_csv(folder / f"fold-{k}" / "val.csv", _frame(va, sp))
    else:
        atomic_write_csv(folder / "train.csv", _frame(sp.train, sp))
        atomic_write_csv(folder / "val.csv", _frame(sp.val, sp))

    def counts(idx: list[str]) -> dict[str, int]:
        c = Counter(sp.class_names[sp.labels[i]] for i in idx)
        return {n: c.get(n, 0) for n in sp.class_names}

    summary = {"train": counts(sp.train), "val": counts(sp.val), "test": counts(sp.test)}
    if sp.folds:
        summary = {"test": counts(sp.test),
                   **{f"fold-{k}": {"train": counts(tr), "val": counts(va)} for k, (tr, va) in enumerate(sp.folds)}}
    doc = {"settings": sp.settings, "class_names": sp.class_names, "n_folds": sp.n_folds, "counts": summary}
    # split.json last: its presence marks a complete split folder.
    atomic_write_text(folder / "split.json", json.dumps(doc, indent=2) + "\n")


def read_splits(folder: Path) -> Splits:
    """Read a split folder written by :func:`write_splits`.

    Raises:
        DataError: the folder is incomplete or unreadable (names the file).
    """
    meta_file = folder / "split.json"
    try:
        doc = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_file}: cannot read the split description ({exc}); re-create it with "
                        f"--mode prepare --overwrite") from exc
    sp = Splits(train=[], val=[], test=[], class_names=list(doc["class_names"]), settings=doc.get("settings", {}))

    def load(path: Path) -> list[str]:
        try:
            df = pd.read_csv(path, dtype={"subject": str, "group": str})
        except (OSError, pd.errors.ParserError) as exc:
            raise DataError(f"{path}: cannot read split file ({exc}); re-create with --mode prepare "
                            f"--overwrite") from exc
        for r in df.itertuples(index=False):
            sp.labels[r.subject] = int(r.class_index)
            sp.groups[r.subject] = str(r.group)
        return list(df["subject"])

    sp.test = load(folder / "test.csv")
    if int(doc.get("n_folds", 1)) > 1:
        for k in range(int(doc["n_folds"])):
            sp.folds.append((load(folder / f"fold-{k}" / "train.csv"), load(folder / f"fold-{k}" / "val.csv")))
        sp.train, sp.val = sp.folds[0]
    else:
        sp.train, sp.val = load(folder / "train.csv"), load(folder / "val.csv")
    return sp


def guard(stage: str, subject_ids: list[str] | set[str], sp: Splits, groups: dict[str, str] | None = None) -> None:
    """Refuse a stage that would see subjects it must not see.

    Training stages (``ae_pretrain``, ``train``, ``compress``) may not use any test subject or any subject of a
    test patient group; the ``test`` stage may not evaluate any subject (or group) used for training/validation.

    Args:
        stage: stage name.
        subject_ids: the subjects the stage is about to use.
        sp: the experiment's splits.
        groups: subject -> group for subjects not in the split files (e.g. extra AE data).

    Raises:
        LeakageError: naming the overlapping subjects.
    """
    group_of = {**sp.groups, **(groups or {})}
    used = set(subject_ids)
    if stage in TRAINING_STAGES:
        forbidden, what = set(sp.test), "hold-out test"
    elif stage in TESTING_STAGES:
        forbidden, what = sp.non_test(), "training/validation"
    else:
        raise ValueError(f"unknown stage {stage!r} for the leakage guard")
    forbidden_groups = {group_of.get(s, s) for s in forbidden}
    bad = sorted((used & forbidden) | {s for s in used if group_of.get(s, s) in forbidden_groups}, key=_natural)
    if bad:
        raise LeakageError(f"{stage} refused: {len(bad)} subject(s) belong to the {what} split of this experiment "
                           f"({', '.join(bad[:10])}{' …' if len(bad) > 10 else ''}). Remove them from the input "
                           f"or use another --exp.")


def labelled_subjects(cfg: Config) -> tuple[list[Subject], Any, dict[str, int]]:
    """Discover subjects and map labels: returns (subjects with a class, LabelMap, subject -> class index)."""
    from octa3d.data.labels import LabelMap
    from octa3d.data.sources import discover

    subjects = discover(cfg.data, cfg.model.dim)
    present = sorted({s.label for s in subjects if s.label is not None})
    label_map = LabelMap.build(cfg.data, present)
    keep, label_of, dropped = [], {}, Counter()
    for s in subjects:
        idx = label_map.index(s.label) if s.label is not None else None
        if idx is None:
            dropped[s.label] += 1
            continue
        keep.append(s)
        label_of[s.id] = idx
    if dropped:
        log.info("Not part of this task (%s): %s", cfg.data.task,
                 ", ".join(f"{k} ({v})" for k, v in sorted(dropped.items(), key=lambda kv: str(kv[0]))))
    if not keep:
        raise DataError(f"no subjects in {cfg.data.data_root} belong to the classes {label_map.class_names}")
    return keep, label_map, label_of


def load_or_make_splits(cfg: Config, subjects: list[Subject] | None = None, label_map: Any = None,
                        label_of: dict[str, int] | None = None) -> Splits:
    """Reuse ``runs/<exp>/splits/`` or create it. Every stage calls this before touching data.

    Raises:
        ConfigError: existing splits were made with other settings (names the differing flags).
    """
    folder = cfg.run_dir / "splits"
    settings = _split_settings(cfg)
    if (folder / "split.json").exists():
        sp = read_splits(folder)
        diff = {k: (sp.settings.get(k), v) for k, v in settings.items() if sp.settings.get(k) != v}
        if diff:
            desc = "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"{folder} was made with other settings ({desc}). Use the same settings, another "
                              f"--exp, or re-split with --mode prepare --overwrite (later stages must then be "
                              f"re-run).")
        log.info("Using the experiment's splits in %s", folder)
        return sp
    if subjects is None:
        subjects, label_map, label_of = labelled_subjects(cfg)
    assert label_map is not None and label_of is not None
    sp = make_splits(subjects, label_of, label_map.class_names, test_fraction=cfg.data.test_fraction,
                     val_fraction=cfg.data.val_fraction, folds=cfg.data.folds, seed=cfg.run.seed)
    sp.settings = settings
    write_splits(sp, folder)
    log.info("Wrote subject-level splits to %s", folder)
    return sp


def format_counts(sp: Splits) -> str:
    """Human summary: one line per split with per-class counts."""
    def line(name: str, idx: list[str]) -> str:
        c = Counter(sp.class_names[sp.labels[i]] for i in idx)
        return f"  {name:<9}{len(idx):>5}  " + "  ".join(f"{n}={c.get(n, 0)}" for n in sp.class_names)

    rows = [f"classes: {', '.join(f'{i}={n}' for i, n in enumerate(sp.class_names))}"]
    if sp.folds:
        rows += [line(f"fold-{k} tr", tr) + "\n" + line(f"fold-{k} va", va) for k, (tr, va) in enumerate(sp.folds)]
    else:
        rows += [line("train", sp.train), line("val", sp.val)]
    rows.append(line("test", sp.test))
    return "\n".join(rows)
