"""``--mode synth``: write a synthetic OCTA-500-style dataset to ``--data-root`` and say what to run next."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from octa3d.config import Config
from octa3d.data.octa500 import FOV_LATERAL_MM
from octa3d.data.synthetic import CLASSES, generate, look_from_name
from octa3d.utils.tracking import cli_program


def run(cfg: Config) -> list[dict[str, Any]]:
    """Generate the dataset from ``cfg`` and print a summary with the next command.

    Uses ``--data-root``, ``--n-subjects``, ``--shape``, ``--layout``, ``--synth-look``, ``--seed``, ``--overwrite``
    and ``--fov`` (3mm writes ``OCTA_3mm``; anything else 6mm).

    Returns:
        The records of the written eyes (:func:`octa3d.data.synthetic.generate`).

    Raises:
        ConfigError: bad shape, layout or look.
        DataError: ``--data-root`` already holds a dataset and ``--overwrite`` is not given.
    """
    root = Path(cfg.data.data_root)
    fov = cfg.data.fov if cfg.data.fov in FOV_LATERAL_MM else "6mm"
    recs = generate(root, cfg.synth.n_subjects, cfg.synth.shape, seed=cfg.run.seed, layout=cfg.synth.layout,
                    fov=fov, overwrite=cfg.run.overwrite, look=look_from_name(cfg.synth.synth_look))
    counts = Counter(r["disease"] for r in recs)
    where = {"octa500": f"{root}/OCTA_{fov}/{{OCTA,OCT}}/<ID>/<n>.bmp, labels in '{root}/Text labels.xlsx'",
             "nifti": f"{root}/volumes/<ID>_{{octa,oct}}.nii.gz, labels in {root}/manifest.csv"}
    lines = [f"Synthetic OCTA-500: {len(recs)} eyes of {'x'.join(map(str, cfg.synth.shape))} "
             f"(B-scans x depth x width, {fov}, seed {cfg.run.seed}, look {cfg.synth.synth_look}) in {root}",
             "  classes: " + ", ".join(f"{c} {counts[c]}" for c in CLASSES if counts[c])]
    lines += [f"  volumes: {where[k]}" for k in ("octa500", "nifti") if cfg.synth.layout in (k, "both")]
    lines += [f"  lesion masks: {Path(recs[0]['paths']['mask']).parent}/",
              f"Next: {cli_program()} --mode prepare --data-root {root} --exp <name> --dim 3d --model <model>"]
    print("\n".join(lines))  # the CLI summary: stdout, not the log
    return recs
