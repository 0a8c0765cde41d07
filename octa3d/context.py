"""The set-up every data-consuming stage shares: device, seeding, subjects, label map, splits and run folder,
plus the leakage guard of the hold-out test set (which also covers the autoencoder's extra data), and the set-up
and leakage guard of an external cohort (``--mode test --external PATH``)."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from octa3d.config import Config, DataConfig, from_dict
from octa3d.data.identity import content_matches, identity_key
from octa3d.data.imagefiles import natural_key, short
from octa3d.data.labels import normalise_label, skip_or_raise
from octa3d.data.sources import detect_source, discover, discover_unlabelled, label_origin
from octa3d.data.splits import existing_splits, guard, labelled_subjects, load_or_make_splits
from octa3d.data.subject import Subject
from octa3d.errors import ConfigError, DataError, LeakageError
from octa3d.utils import dist
from octa3d.utils.io import safe_name
from octa3d.utils.runs import init_run
from octa3d.utils.seed import seed_everything

log = logging.getLogger("octa3d.context")


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
            _guard_ae_extra(cfg, by_id, prepared)  # LeakageError, too
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
        _guard_ae_extra(cfg, by_id, splits)
    return StageContext(device, by_id, label_map, splits)


def _guard_ae_extra(cfg: Config, subjects: Mapping[str, Subject], splits: Any) -> None:
    """``--mode ae_pretrain``: refuse ``--ae-extra-data`` holding a hold-out test scan under another ID (the
    stage itself compares the extra data's IDs and patient groups with the test split)."""
    if cfg.run.mode == "ae_pretrain" and cfg.train.ae_extra_data:
        guard_content("ae_pretrain", [subjects[i] for i in splits.test if i in subjects],
                      discover_unlabelled(cfg.data, cfg.train.ae_extra_data, cfg.model.dim))


def _ae_extra_roots(cfg: Config) -> list[str]:
    """Every ``--ae-extra-data`` root of the experiment: this invocation's flag and ``ae_pretrain/config.yaml``."""
    roots = {cfg.train.ae_extra_data}
    record = cfg.run_dir / "ae_pretrain" / "config.yaml"
    if record.is_file():
        try:
            roots.add(from_dict(yaml.safe_load(record.read_text(encoding="utf-8"))).train.ae_extra_data)
        except Exception as exc:  # noqa: BLE001 - an unreadable record must not hide the real error
            log.warning("cannot read %s (%s): autoencoder extra data not checked", record, exc)
    return sorted(r for r in roots if r)


def _ae_extra(cfg: Config, roots: list[str]) -> list[Subject]:
    """The subjects of the autoencoder's extra data roots (one that cannot be listed is warned about)."""
    out: list[Subject] = []
    for root in roots:
        try:
            out += discover_unlabelled(cfg.data, root, cfg.model.dim)
        except DataError as exc:
            log.warning("autoencoder extra data %s cannot be listed (%s); its overlap with the test set is not "
                        "checked", root, exc)
    return out


def ae_extra_subjects(cfg: Config) -> dict[str, str]:
    """Subject -> group of every autoencoder ``--ae-extra-data`` of the experiment (``ae_pretrain/config.yaml``
    and this invocation's flag): they trained the encoder, so they are never test subjects."""
    return {s.id: s.group for s in _ae_extra(cfg, _ae_extra_roots(cfg))}


def guard_content(stage: str, test: list[Subject], extra: list[Subject]) -> None:
    """Refuse when a hold-out test subject's scan is also among the autoencoder's extra data under another ID
    (compared by content, :func:`~octa3d.data.identity.content_matches`; only these two sets are read).

    Raises:
        LeakageError: naming both IDs of each copy.
    """
    if not test or not extra:
        return
    pairs = content_matches(test, extra)
    if pairs:
        listed = "; ".join(f"test subject {a} = extra subject {b} at {src}" for a, b, src in pairs[:10])
        more = f" (+{len(pairs) - 10} more)" if len(pairs) > 10 else ""
        raise LeakageError(f"{stage} refused: {len(pairs)} hold-out test scan(s) are also in --ae-extra-data under "
                           f"another ID, byte for byte: {listed}{more}. The autoencoder must never see test scans: "
                           "remove these copies from the extra data (and re-run ae_pretrain), or use another --exp.")


def guard_test_set(cfg: Config, test_ids: list[str], splits: Any, stage: str = "test",
                   subjects: Mapping[str, Subject] | None = None) -> None:
    """Refuse test subjects that trained/validated the model or pretrained its encoder (LeakageError): by ID and
    patient group, and for the autoencoder's extra data also by content (a test scan copied under a new ID).

    Args:
        cfg: the stage's configuration.
        test_ids: the subjects about to be tested.
        splits: the experiment's splits.
        stage: stage name for the message.
        subjects: ID -> discovered subject (e.g. ``StageContext.subjects``) for the content check; discovered
            again when not given.
    """
    extra = _ae_extra(cfg, _ae_extra_roots(cfg))
    if extra:
        groups = {s.id: s.group for s in extra}
        splits = copy.copy(splits)
        splits.train = list(splits.train) + sorted(groups)
        splits.groups = {**splits.groups, **groups}
    guard(stage, test_ids, splits)
    if extra:
        if subjects is None:
            subjects = {s.id: s for s in discover(cfg.data, cfg.model.dim)}
        guard_content(stage, [subjects[i] for i in test_ids if i in subjects], extra)


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


def _scans(subject: Subject) -> set[str]:
    return {*subject.paths.values(), *subject.projections.values()}


def _patient(sid: str, group: str | None) -> str | None:
    """The normalised patient group of a subject when it names a patient (a ``--group-regex`` match, a manifest
    group column), None when it is only the subject's own ID or file name (OCTA-500 eyes): such IDs are local to
    a dataset (``10001`` exists in every OCTA-500-layout cohort) and say nothing about another cohort."""
    key = identity_key(group or "")
    return key if key and key != identity_key(sid).rsplit("/", 1)[-1] else None


def guard_external(cfg: Config, cohort: list[Subject], splits: Any, subjects: Mapping[str, Subject]) -> list[str]:
    """Refuse an external cohort that holds data the model learnt from (LeakageError naming the first subjects).

    An external subject overlaps when it reads the same file as a training/validation subject (any fold) or an
    autoencoder ``--ae-extra-data`` subject, holds the same scan bytes under any name
    (:func:`~octa3d.data.identity.content_matches`), or belongs to the same patient group (patient groups from
    ``--group-regex`` or a manifest group column). An equal subject ID alone is not an overlap: IDs are local to a
    dataset; such IDs are returned (and warned about) instead.

    Args:
        cfg: the stage's configuration (finds the autoencoder's extra data).
        cohort: the external subjects.
        splits: the experiment's splits.
        subjects: ID -> discovered subject of the experiment's data root (``StageContext.subjects``).

    Returns:
        The external IDs equal to a training/validation ID whose scans differ.
    """
    seen_ids = sorted(splits.non_test(), key=natural_key)
    seen = [subjects[i] for i in seen_ids if i in subjects]
    if len(seen) < len(seen_ids):
        log.warning("%d training/validation subject(s) are no longer in the data root (%s): their scans are not "
                    "compared with the external cohort", len(seen_ids) - len(seen),
                    short([i for i in seen_ids if i not in subjects], 5))
    extra = _ae_extra(cfg, _ae_extra_roots(cfg))
    extra_files = {p for s in extra for p in _scans(s)}

    def what(path: str) -> str:
        return "autoencoder extra subject" if path in extra_files else "training/validation subject"

    why: dict[str, str] = {}
    owner = {os.path.realpath(p): (s.id, p) for s in (*seen, *extra) for p in _scans(s)}
    for s in cohort:
        for p in sorted(_scans(s)):
            if os.path.realpath(p) in owner:
                other, src = owner[os.path.realpath(p)]
                why.setdefault(s.id, f"{s.id} reads the file of {what(src)} {other} ({p})")
    for a, b, src in content_matches(cohort, [*seen, *extra]):
        why.setdefault(a, f"{a} holds the same scan as {what(src)} {b}")
    patients = {g: (sid, "training/validation subject") for sid in seen_ids
                if (g := _patient(sid, splits.groups.get(sid)))}
    patients.update({g: (s.id, "autoencoder extra subject") for s in extra if (g := _patient(s.id, s.group))})
    for s in cohort:
        g = _patient(s.id, s.group)
        if g in patients:
            why.setdefault(s.id, f"{s.id} belongs to patient {s.group}, like {patients[g][1]} {patients[g][0]}")
    if why:
        bad = sorted(why, key=natural_key)
        raise LeakageError(f"test --external refused: {len(bad)} subject(s) of the cohort are data the model of "
                           f"experiment '{cfg.exp_name}' learnt from: {'; '.join(why[i] for i in bad[:5])}"
                           f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''}. An external cohort must be new "
                           "to the model: remove these subjects from it")
    keys = {identity_key(i) for i in seen_ids}
    same = sorted((s.id for s in cohort if identity_key(s.id) in keys), key=natural_key)
    if same:
        log.warning("%d external subject ID(s) also name training/validation subjects of experiment '%s' (%s) but "
                    "hold other scans: scored as another cohort's subjects (if they are the same eyes exported "
                    "again, this is not an external validation)", len(same), cfg.exp_name, short(same, 5))
    return same
