"""The set-up every data-consuming stage shares: device, seeding, subjects, label map, splits and run folder,
plus the leakage guard of the hold-out test set (which also covers the autoencoder's extra data)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from octa3d.config import Config, from_dict
from octa3d.data.sources import discover_unlabelled
from octa3d.data.splits import existing_splits, guard, labelled_subjects, load_or_make_splits
from octa3d.errors import ConfigError, DataError
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
    if dist.is_main():
        existing_splits(cfg)  # ConfigError before the run folder is touched
        init_run(cfg)
        splits = load_or_make_splits(cfg, subjects, label_map, label_of)
    dist.barrier()
    if not dist.is_main():
        splits = load_or_make_splits(cfg, subjects, label_map, label_of)
    if list(splits.class_names) != list(label_map.class_names):
        raise ConfigError(f"the experiment's class order {splits.class_names} differs from the labels found now "
                          f"{label_map.class_names}; use the same --task/--classes or another --exp")
    log.info("Device: %s%s", device, f" (DDP world size {dist.world_size()})" if dist.is_distributed() else "")
    return StageContext(device, {s.id: s for s in subjects}, label_map, splits)


def ae_extra_subjects(cfg: Config) -> dict[str, str]:
    """Subject -> group of every autoencoder ``--ae-extra-data`` of the experiment (``ae_pretrain/config.yaml``
    and this invocation's flag): they trained the encoder, so they are never test subjects."""
    roots = {cfg.train.ae_extra_data}
    record = cfg.run_dir / "ae_pretrain" / "config.yaml"
    if record.is_file():
        try:
            roots.add(from_dict(yaml.safe_load(record.read_text(encoding="utf-8"))).train.ae_extra_data)
        except Exception as exc:  # noqa: BLE001 - an unreadable record must not hide the real error
            log.warning("cannot read %s (%s): autoencoder extra data not checked", record, exc)
    out: dict[str, str] = {}
    for root in sorted(r for r in roots if r):
        try:
            subs = discover_unlabelled(cfg.data, root, cfg.model.dim)
        except DataError as exc:
            log.warning("autoencoder extra data %s cannot be listed (%s); its overlap with the test set is not "
                        "checked", root, exc)
            continue
        out.update({s.id: s.group for s in subs})
    return out


def guard_test_set(cfg: Config, test_ids: list[str], splits: Any, stage: str = "test") -> None:
    """Refuse test subjects that trained/validated the model or pretrained its encoder (LeakageError)."""
    extra = ae_extra_subjects(cfg)
    if extra:
        splits = copy.copy(splits)
        splits.train = list(splits.train) + sorted(extra)
        splits.groups = {**splits.groups, **extra}
    guard(stage, test_ids, splits)
