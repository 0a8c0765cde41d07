"""Subject-level splits (made by ``--mode prepare``, :mod:`octa3d.stages.prepare`; run folder ``splits/``).

Splits are made over *groups* (patients): a group never spans two splits. They are stratified by class, fixed by
``--seed`` (:func:`make_splits`, in :mod:`octa3d.data.stratify`), written once to ``runs/<exp>/splits/`` and reused
by every later stage of the experiment; a stage that makes new ones outside ``--mode prepare`` says so (WARNING)
and names the other experiments over the same data. Using them without leakage is :mod:`octa3d.data.leakage`'s
job.

Files::

    splits/split.json                  settings, class order, counts
    splits/{train,val,test}.csv        subject,group,label,class_index   (single split)
    splits/test.csv + fold-k/{train,val}.csv                             (--folds K > 1)
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from octa3d.config import Config
from octa3d.data.labels import LabelMap, modality_advice, normalise_label
from octa3d.data.sources import detect_source, discover, label_origin
from octa3d.data.stratify import Splits, make_splits
from octa3d.data.subject import Subject
from octa3d.errors import ConfigError, DataError
from octa3d.utils.io import atomic_write_csv, atomic_write_text, read_csv
from octa3d.utils.runs import experiments_over

__all__ = ["SPLIT_KEYS", "Splits", "existing_splits", "format_counts", "labelled_subjects", "load_or_make_splits",
           "make_splits", "read_splits", "split_settings", "write_splits"]

log = logging.getLogger("octa3d.data.splits")

#: Settings that define a split; a later stage with different values would silently use other subjects.
SPLIT_KEYS = ("data_root", "source", "modality", "fov", "task", "classes", "negative", "positive",
              "test_fraction", "val_fraction", "folds", "seed")
#: Settings that only mean something for the OCTA-500 layout: recorded as null for other sources.
OCTA500_ONLY_KEYS = ("modality", "fov")

TRAINING_STAGES = ("ae_pretrain", "train", "compress")
TESTING_STAGES = ("test",)


def _layout(cfg: Config) -> str | None:
    """The data layout (``--source``, detected for ``auto``), or None when the data root cannot be inspected."""
    if cfg.data.source != "auto":
        return cfg.data.source
    try:
        return detect_source(cfg.data.data_root)
    except DataError:
        return None


def split_settings(cfg: Config) -> dict[str, Any]:
    """The settings recorded in split.json; ``modality``/``fov`` are null for manifest and class-folder data (a 2D
    class-folder experiment has no OCTA-500 volume or field of view)."""
    d = cfg.data
    out = {k: getattr(d, k) for k in SPLIT_KEYS if hasattr(d, k)}
    out["data_root"] = str(Path(d.data_root).resolve())
    out["seed"] = cfg.run.seed
    out["dim"] = cfg.model.dim
    if _layout(cfg) in ("folders", "manifest"):
        out.update(dict.fromkeys(OCTA500_ONLY_KEYS))
    return out


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
            df = read_csv(path, dtype={"subject": str, "group": str})  # undoes the spreadsheet-formula guard
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


def labelled_subjects(cfg: Config) -> tuple[list[Subject], Any, dict[str, int]]:
    """Discover subjects and map labels: returns (subjects with a class, LabelMap, subject -> class index)."""
    subjects = discover(cfg.data, cfg.model.dim)
    subjects_of: dict[str, list[str]] = {}
    for s in subjects:
        if s.label is not None:
            subjects_of.setdefault(normalise_label(s.label), []).append(s.id)
    # one entry per subject: the counts in LabelMap's messages ("labels present: AMD (7), ...") are subjects
    label_map = LabelMap.build(cfg.data, [s.label for s in subjects if s.label is not None], subjects_of,
                               label_origin(cfg.data))
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
    volumes = any({"OCT", "OCTA"} & set(s.paths) for s in keep)  # --modality applies to OCTA-500 eyes only
    advice = modality_advice({s.label for s in keep}, cfg.data.modality) if volumes else None
    if advice:
        log.warning("%s", advice)
    return keep, label_map, label_of


def existing_splits(cfg: Config) -> Splits | None:
    """The experiment's splits (``runs/<exp>/splits/``), or None when it has none yet.

    Stages call this before they touch the run folder, so that a refused invocation leaves it as it was.

    Raises:
        ConfigError: the splits were made with other settings (names the differing flags).
    """
    folder = cfg.run_dir / "splits"
    if not (folder / "split.json").exists():
        return None
    sp = read_splits(folder)
    settings = split_settings(cfg)
    # a setting that does not apply to this layout (null) is not compared: splits recorded before it was null match
    diff = {k: (sp.settings.get(k), v) for k, v in settings.items()
            if sp.settings.get(k) != v and not (v is None and k in OCTA500_ONLY_KEYS)}
    if diff:
        desc = "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{folder} was made with other settings ({desc}). Use the same settings, another "
                          f"--exp, or re-split with --mode prepare --overwrite (later stages must then be "
                          f"re-run).")
    return sp


def _announce_new_splits(cfg: Config, folder: Path, settings: dict[str, Any]) -> None:
    """Say that new splits were made (a WARNING outside ``--mode prepare``: a forgotten --exp/--task/--model flag
    starts a new experiment) and name the other experiments of the runs folder over the same data."""
    others = experiments_over(Path(cfg.run.runs_dir), settings["data_root"], exclude=cfg.exp_name)

    def differs(theirs: dict[str, Any]) -> str:
        diff = [f"{k.replace('_', '-')} {theirs.get(k)}" for k in (*SPLIT_KEYS, "dim")
                if k != "data_root" and theirs.get(k) != settings.get(k)
                and not (k in OCTA500_ONLY_KEYS and None in (theirs.get(k), settings.get(k)))]
        return ", ".join(diff) or "the same split settings"

    named = "; ".join(f"'{name}' ({differs(theirs)})" for name, theirs in others.items())
    also = (f" Other experiments over the same data in {cfg.run.runs_dir}: {named}; pass --exp NAME to continue "
            "one of them." if others else "")
    if cfg.run.mode == "prepare":
        log.info("Wrote new subject-level splits to %s.%s", folder, also)
    else:
        log.warning("NEW EXPERIMENT '%s': --mode %s found no splits in %s and made new ones.%s", cfg.exp_name,
                    cfg.run.mode, folder.parent, also or " If you prepared this data under another name, pass "
                    "that --exp.")


def load_or_make_splits(cfg: Config, subjects: list[Subject] | None = None, label_map: Any = None,
                        label_of: dict[str, int] | None = None) -> Splits:
    """Reuse ``runs/<exp>/splits/`` or create it. Every stage calls this before touching data.

    Creating splits outside ``--mode prepare`` is logged as a WARNING naming the other experiments over the same
    data root in the runs folder (a forgotten flag changes the default ``--exp``).

    Raises:
        ConfigError: existing splits were made with other settings (names the differing flags).
    """
    folder = cfg.run_dir / "splits"
    sp = existing_splits(cfg)
    if sp is not None:
        log.info("Using the experiment's splits in %s", folder)
        return sp
    if subjects is None:
        subjects, label_map, label_of = labelled_subjects(cfg)
    assert label_map is not None and label_of is not None
    sp = make_splits(subjects, label_of, label_map.class_names, test_fraction=cfg.data.test_fraction,
                     val_fraction=cfg.data.val_fraction, folds=cfg.data.folds, seed=cfg.run.seed)
    sp.settings = split_settings(cfg)
    write_splits(sp, folder)
    _announce_new_splits(cfg, folder, sp.settings)
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
