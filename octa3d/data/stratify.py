"""Stratified, group-level splitting: the :class:`Splits` of an experiment and :func:`make_splits`.

A patient group never spans two splits; every class is represented in each split; the dataset's own
train/val/test folders are honoured. Files, settings and the leakage guard are in :mod:`octa3d.data.splits`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from octa3d.data.subject import Subject
from octa3d.errors import ConfigError, DataError

log = logging.getLogger("octa3d.data.splits")


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

