"""Every guard that keeps a model's training data out of what it is scored or reported on — one module, one
identity rule (:class:`~octa3d.data.identity.IdentityIndex`: subject ID, file name of a bare-name ID, patient
group) plus a content check for copies under another name (:func:`content_matches`).

* Training stages (``ae_pretrain``, ``train``, ``compress``) never see a hold-out test subject or its patient, and
  the test stage never scores a training/validation subject (:func:`guard`); the autoencoder's extra data counts
  as training data (:func:`guard_test_set`, :func:`guard_ae_extra`).
* An external cohort (``--mode test --external``) is refused when it holds data the model learnt from
  (:func:`guard_external`).
* Predict and explain never refuse a scan, but say when it trained or validated the model (:func:`overlap_checker`,
  :func:`seen_checker`), because its prediction is then optimistic.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from octa3d.config import Config, from_dict
from octa3d.data.identity import IdentityIndex, identity_key, scan_sources, source_fingerprint
from octa3d.data.imagefiles import natural_key, short
from octa3d.data.sources import discover, discover_unlabelled
from octa3d.data.splits import TESTING_STAGES, TRAINING_STAGES, read_splits
from octa3d.data.stratify import Splits
from octa3d.data.subject import Subject
from octa3d.errors import DataError, LeakageError

log = logging.getLogger("octa3d.data.leakage")


# ---------------------------------------------------------------------------------------------------- splits
def guard(stage: str, subject_ids: list[str] | set[str], sp: Splits, groups: dict[str, str] | None = None) -> None:
    """Refuse a stage that would see subjects it must not see.

    Training stages (``ae_pretrain``, ``train``, ``compress``) may not use any test subject or any subject of a
    test patient group; the ``test`` stage may not evaluate any subject (or group) used for training/validation.
    Subjects are compared by the normalised identity of :class:`~octa3d.data.identity.IdentityIndex` (ID, the
    file name of a bare-name ID, patient group).

    Args:
        stage: stage name.
        subject_ids: the subjects the stage is about to use.
        sp: the experiment's splits.
        groups: subject -> group for subjects not in the split files (e.g. extra AE data).

    Raises:
        LeakageError: naming the overlapping subjects.
    """
    group_of = {**sp.groups, **(groups or {})}
    if stage in TRAINING_STAGES:
        forbidden, what = set(sp.test), "hold-out test"
    elif stage in TESTING_STAGES:
        forbidden, what = sp.non_test(), "training/validation"
    else:
        raise ValueError(f"unknown stage {stage!r} for the leakage guard")
    bad = IdentityIndex({s: group_of.get(s, s) for s in forbidden}).matches(subject_ids, group_of)
    if bad:
        raise LeakageError(f"{stage} refused: {len(bad)} subject(s) belong to the {what} split of this experiment "
                           f"({', '.join(bad[:10])}{' …' if len(bad) > 10 else ''}). Remove them from the input "
                           f"or use another --exp.")


def training_overlap(splits: Splits, subject: Subject, extra: dict[str, str] | None = None) -> str | None:
    """Why ``subject`` (one scan, e.g. ``--input``) is not new to the experiment's model, or None.

    The subject matches when it is a training/validation subject of ``splits`` (any fold), or of the same patient
    group as one, under the one identity of :mod:`octa3d.data.identity` that :func:`guard` uses: a Kermany image
    given by path (``CNV-6294785-1``, patient ``6294785`` via ``--group-regex``) matches the split's
    ``CNV/CNV-6294785-1`` and every other image of patient 6294785. Class-folder IDs found under another root
    (``CNV/CNV-6294785-1`` of a predict input vs ``train/CNV/CNV-6294785-1`` of the split) match by file name.
    Hold-out test subjects do not match.

    Args:
        splits: the experiment's splits (:func:`read_splits`).
        subject: as :func:`~octa3d.data.sources.discover`, :func:`~octa3d.data.sources.discover_input` or
            :func:`~octa3d.data.octa500.subject_from_path` build it (``id`` and ``group``).
        extra: subject → group of the autoencoder's extra data (``--ae-extra-data``; it trained the encoder).

    Returns:
        A clause for a warning (the caller names the experiment and the consequence), e.g. ``"CNV-6294785-2
        belongs to patient group 6294785, like training/validation subject CNV/CNV-6294785-1"``, or None.
    """
    return overlap_checker(splits, extra)(subject)


def overlap_checker(splits: Splits, extra: dict[str, str] | None = None) -> Callable[[Subject], str | None]:
    """:func:`training_overlap` for many subjects: the indexes are built once (a predict run of 1,000 scans)."""
    sets = [("training/validation subject", {s: splits.groups.get(s, s) for s in splits.non_test()}),
            ("autoencoder extra-data subject", dict(extra or {}))]
    indexes = [(IdentityIndex(m, what=w), {identity_key(s).rsplit("/", 1)[-1]: s
                                           for s in sorted(m, key=natural_key, reverse=True)}, w)
               for w, m in sets if m]

    def check(subject: Subject) -> str | None:
        key = identity_key(subject.id)
        for index, by_name, what in indexes:
            reason = index.reason(subject.id, subject.group)
            if reason is None and "/" in key and key.rsplit("/", 1)[-1] in by_name:
                # a class-folder image listed under another root: train/CNV/x vs CNV/x
                reason = f"{subject.id} is {what} {by_name[key.rsplit('/', 1)[-1]]} (same file name)"
            if reason:
                return reason
        return None
    return check


def seen_checker(cfg: Config) -> Callable[[Subject], str | None]:
    """Subject → why it trained/validated the experiment's model (its splits, any fold, and the autoencoder's
    extra data), or None; always None for an experiment without splits (a bare ``--checkpoint``)."""
    if not (cfg.run_dir / "splits" / "split.json").is_file():
        return lambda s: None
    return overlap_checker(read_splits(cfg.run_dir / "splits"), ae_extra_subjects(cfg))


# ---------------------------------------------------------------------------------------------------- content
def content_matches(these: Iterable[Subject], those: Iterable[Subject]) -> list[tuple[str, str, str]]:
    """Pairs of subjects, one of ``these`` and one of ``those``, whose scans hold the same bytes.

    Args:
        these: e.g. the hold-out test subjects.
        those: e.g. the autoencoder's ``--ae-extra-data`` subjects.

    Returns:
        ``(id in these, id in those, the first matching source of the ``those`` subject)`` per matching pair of
        subjects, in natural order.
    """
    these, those = list(these), list(those)
    paths = sorted({p for s in (*these, *those) for p in scan_sources(s)})
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # overlaps the reads of many files
        prints = dict(zip(paths, pool.map(source_fingerprint, paths)))
    owner: dict[str, str] = {}
    for s in these:
        for p in scan_sources(s):
            if prints[p] is not None:
                owner.setdefault(prints[p], s.id)
    found: dict[tuple[str, str], str] = {}
    for s in those:
        for p in scan_sources(s):
            if prints[p] in owner:
                found.setdefault((owner[prints[p]], s.id), p)
    return sorted(((a, b, p) for (a, b), p in found.items()), key=lambda t: (natural_key(t[0]), natural_key(t[1])))


# ------------------------------------------------------------------------------------ autoencoder extra data
def guard_ae_extra(cfg: Config, subjects: Mapping[str, Subject], splits: Any) -> None:
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
    (compared by content, :func:`~octa3d.data.leakage.content_matches`; only these two sets are read).

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
    (:func:`~octa3d.data.leakage.content_matches`), or belongs to the same patient group (patient groups from
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
    extra_files = {p for s in extra for p in scan_sources(s)}

    def what(path: str) -> str:
        return "autoencoder extra subject" if path in extra_files else "training/validation subject"

    why: dict[str, str] = {}
    owner = {os.path.realpath(p): (s.id, p) for s in (*seen, *extra) for p in scan_sources(s)}
    for s in cohort:
        for p in sorted(scan_sources(s)):
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
