"""The set-up every data-consuming stage shares: device, seeding, subjects, label map, splits and run folder,
plus the leakage guard of the hold-out test set (which also covers the autoencoder's extra data)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from octa3d.config import Config, from_dict
from octa3d.data.identity import content_matches
from octa3d.data.sources import discover, discover_unlabelled
from octa3d.data.splits import existing_splits, guard, labelled_subjects, load_or_make_splits
from octa3d.data.subject import Subject
from octa3d.errors import ConfigError, DataError, LeakageError
from octa3d.utils import dist
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
