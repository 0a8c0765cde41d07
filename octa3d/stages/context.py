"""The set-up every data-consuming stage shares (not a stage itself): device, seeding, subjects, label map, splits
and run folder, and the set-up of an external cohort (``--mode test --external PATH``). The leakage guards these
set-ups call live in :mod:`octa3d.data.leakage`."""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from octa3d.config import Config, DataConfig
from octa3d.data.imagefiles import short
from octa3d.data.labels import normalise_label, skip_or_raise
from octa3d.data.leakage import guard_ae_extra
from octa3d.data.sources import detect_source, discover, label_origin
from octa3d.data.splits import existing_splits, labelled_subjects, load_or_make_splits
from octa3d.data.subject import Subject
from octa3d.errors import ConfigError, DataError
from octa3d.utils import dist
from octa3d.utils.io import safe_name
from octa3d.utils.runs import init_run
from octa3d.utils.seed import seed_everything

log = logging.getLogger("octa3d.stages.context")


@dataclass
class StageContext:
    """What every data-consuming stage needs: device, subjects by ID, label map, splits."""

    device: torch.device
    subjects: dict[str, Any]  # id -> Subject
    label_map: Any
    splits: Any

    def pick(self, ids: list[str]) -> list[Any]:
        """Subjects for ``ids``, with a clear error for IDs that vanished from the data root."""
        missing = [i for i in ids if i not in self.subjects]
        if missing:
            raise DataError(f"{len(missing)} subject(s) of the experiment's split files are no longer in the data "
                            f"root ({', '.join(missing[:10])}); restore them or re-split with --mode prepare "
                            f"--overwrite")
        return [self.subjects[i] for i in ids]


def setup_stage(cfg: Config) -> StageContext:
    """Distributed init, seeding, discovery, run folder and splits (created on first use).

    The run folder is created (or its config/command refreshed) only after the data was discovered and validated
    and the experiment's existing splits, if any, were found to match the settings: a wrong ``--data-root`` or a
    contradicting flag leaves no new or changed experiment behind.
    """
    device = dist.init_from_env(cfg.run.device)
    seed_everything(cfg.run.seed, cfg.train.deterministic)
    if device.type == "cuda" and not cfg.train.deterministic:
        torch.backends.cudnn.benchmark = True
    subjects, label_map, label_of = labelled_subjects(cfg)
    by_id = {s.id: s for s in subjects}
    prepared = None
    if dist.is_main():
        prepared = existing_splits(cfg)  # ConfigError before the run folder is touched
        if prepared is not None:
            guard_ae_extra(cfg, by_id, prepared)  # LeakageError, too
        init_run(cfg)
        splits = load_or_make_splits(cfg, subjects, label_map, label_of)
    dist.barrier()
    if not dist.is_main():
        splits = load_or_make_splits(cfg, subjects, label_map, label_of)
    if list(splits.class_names) != list(label_map.class_names):
        raise ConfigError(f"the experiment's class order {splits.class_names} differs from the labels found now "
                          f"{label_map.class_names}; use the same --task/--classes or another --exp")
    log.info("Device: %s%s", device, f" (DDP world size {dist.world_size()})" if dist.is_distributed() else "")
    if prepared is None:
        guard_ae_extra(cfg, by_id, splits)
    return StageContext(device, by_id, label_map, splits)


# ------------------------------------------------------------------------------------------- external cohort
#: Data flags that describe an external cohort (``--mode test --external PATH``), not the experiment: in that
#: mode they apply to PATH, and the experiment is set up with its own recorded values.
COHORT_FLAGS = ("labels", "skip_unlabeled", "source", "fov", "group_regex")


@dataclass
class ExternalCohort:
    """A labelled external cohort whose labels were mapped onto an experiment's classes.

    Attributes:
        path: the cohort (a folder or a manifest CSV), resolved.
        name: its folder under ``runs/<exp>/test-external/`` (:func:`cohort_name`).
        subjects: the subjects scored (every labelled subject whose label the experiment maps).
        layout: ``octa500``, ``manifest`` or ``folders``.
        labels_from: where the labels were read (a file, a manifest column, class folder names).
        skipped: label -> subjects left out with ``--skip-unlabeled`` (labels the experiment does not map).
    """

    path: Path
    name: str
    subjects: list[Subject]
    layout: str
    labels_from: str
    skipped: dict[str, list[str]]

    def summary(self, label_map: Any) -> dict[str, Any]:
        """metrics.json ``cohort``: what was scored (path, subjects per class, what was left out)."""
        counts = Counter(label_map.class_names[label_map.index(s.label)] for s in self.subjects)
        return {"path": str(self.path), "name": self.name, "layout": self.layout, "labels_from": self.labels_from,
                "n_subjects": len(self.subjects), "class_counts": {c: counts.get(c, 0) for c in label_map.class_names},
                "skipped_labels": {k: len(v) for k, v in sorted(self.skipped.items())}}


def cohort_name(path: str | Path) -> str:
    """``test-external/<name>``: the cohort's folder (or manifest file) stem and 8 hex digits of its resolved path.

    A manifest named ``manifest.csv`` takes its folder's name. The digest keeps two cohorts with the same stem
    (``siteA/data`` and ``siteB/data``) apart; the same path always gives the same name.
    """
    p = Path(path).expanduser().resolve()
    stem = p.parent.name if p.name.lower() == "manifest.csv" else (p.stem if p.is_file() else p.name)
    return f"{safe_name(stem or 'cohort')}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def experiment_config(cfg: Config) -> Config:
    """``cfg`` for setting up the experiment itself under ``--external``: the :data:`COHORT_FLAGS` given for the
    cohort are dropped, so the experiment is rediscovered with its own recorded label file, layout and rules."""
    base = copy.deepcopy(cfg)
    default = Config().data
    for name in COHORT_FLAGS:
        if name != "skip_unlabeled":
            setattr(base.data, name, getattr(default, name))
    base.explicit = frozenset(cfg.explicit - set(COHORT_FLAGS))
    return base


def external_data_config(cfg: Config, ecfg: Config) -> DataConfig:
    """The data settings of ``cfg.eval.external``: the experiment's (modality, FOV, projection, patient rule ...)
    with the cohort's own path, layout (auto-detected) and labels.

    The labels are the cohort's own (OCTA-500 ``Text labels.xlsx`` inside PATH, the manifest's label column, the
    class folder names) unless ``--labels`` is given explicitly for this run; the experiment's recorded label file
    never applies to another cohort. ``--source``, ``--fov`` and ``--group-regex``, when given, also describe the
    cohort; ``--skip-unlabeled`` is this run's.
    """
    data = copy.deepcopy(ecfg.data)
    data.data_root = str(Path(cfg.eval.external).expanduser())
    data.source = cfg.data.source if cfg.is_explicit("source") else "auto"
    data.labels = cfg.data.labels if cfg.is_explicit("labels") else None
    data.skip_unlabeled = cfg.data.skip_unlabeled
    for name in ("fov", "group_regex"):
        if cfg.is_explicit(name):
            setattr(data, name, getattr(cfg.data, name))
    return data


def external_cohort(data: DataConfig, dim: str, label_map: Any) -> ExternalCohort:
    """Discover the cohort of ``data.data_root`` and keep every labelled subject, mapped with the experiment's
    ``label_map`` (binary merging and class order included).

    Raises:
        DataError: no cohort there, unlabeled subjects, or labels the experiment does not map (listed with their
            subjects and the experiment's mapping) unless ``--skip-unlabeled``; no subject left.
    """
    layout = data.source if data.source != "auto" else detect_source(data.data_root)
    subjects = discover(data, dim)
    origin = label_origin(data)
    unknown: dict[str, list[str]] = {}
    for s in subjects:
        if label_map.index(s.label) is None:
            unknown.setdefault(normalise_label(s.label), []).append(s.id)
    if unknown:
        listed = "; ".join(f"{lab} ({len(ids)}: {short(ids, 5)})" for lab, ids in sorted(unknown.items()))
        mapped = ", ".join(f"{raw}→{label_map.class_names[i]}" for raw, i in label_map.mapping.items())
        skip_or_raise(data, f"external cohort {data.data_root}: {sum(map(len, unknown.values()))} subject(s) have "
                            f"labels the experiment does not score: {listed} (labels from {origin}; the experiment "
                            f"maps {mapped})", "fix their labels, or pass --skip-unlabeled to leave them out")
    kept = [s for s in subjects if label_map.index(s.label) is not None]
    if not kept:
        raise DataError(f"external cohort {data.data_root}: no subject has a label the experiment scores "
                        f"({', '.join(label_map.class_names)}; labels from {origin})")
    path = Path(data.data_root).resolve()
    return ExternalCohort(path, cohort_name(path), kept, layout, origin, unknown)


