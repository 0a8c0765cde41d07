"""``--mode prepare``: discover the subjects, map their labels and write the experiment's splits.

The splits (``runs/<exp>/splits/``) are made once and reused by every later stage; ``--overwrite`` re-splits.
"""

from __future__ import annotations

import logging
import os
import shutil

from octa3d.config import Config
from octa3d.data.splits import Splits, existing_splits, format_counts, labelled_subjects, load_or_make_splits
from octa3d.utils.runs import init_run, releases_locks

log = logging.getLogger("octa3d.data.splits")


@releases_locks
def run(cfg: Config) -> Splits:
    """Write (or, without ``--overwrite``, reuse) the splits and print their per-class counts.

    Returns:
        The experiment's :class:`~octa3d.data.splits.Splits`.

    Raises:
        DataError: no usable subjects, or a class too small to split.
        ConfigError: existing splits were made with other settings.
    """
    folder = cfg.run_dir / "splits"
    # Discover and validate first: a wrong --data-root must neither leave an empty experiment behind nor, with
    # --overwrite, delete the existing splits.
    subjects, label_map, label_of = labelled_subjects(cfg)
    replace = (folder / "split.json").exists() and cfg.run.overwrite
    if not replace:
        existing_splits(cfg)  # other settings: ConfigError before config.yaml/command.txt are rewritten
    init_run(cfg)  # takes the experiment's lock: a live run's splits are never deleted
    old = folder.with_name(".splits.old")  # the earlier splits, until the new ones are written
    if old.is_dir() and not (folder / "split.json").exists():
        log.warning("restoring %s from %s (an earlier re-split was interrupted)", folder, old)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(old, folder)
    shutil.rmtree(old, ignore_errors=True)
    if replace:
        log.warning("--overwrite: re-splitting; earlier splits in %s are replaced", folder)
        os.rename(folder, old)
    try:
        sp = load_or_make_splits(cfg, subjects, label_map, label_of)
    except BaseException:
        if replace:  # a split that cannot be made leaves the earlier one in place
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
    print(f"Splits of experiment '{cfg.exp_name}' ({len(sp.labels)} subjects) in {folder}:")
    print(format_counts(sp))
    return sp
