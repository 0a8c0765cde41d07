"""The pipeline stages: one module per ``--mode``, each with ``run(cfg)``.

A stage imports library modules (``octa3d.data``, ``octa3d.model``, ``octa3d.training``, ``octa3d.evaluation``,
``octa3d.checkpoint``, ``octa3d.cam``, ``octa3d.deploy``, ``octa3d.review``, ``octa3d.utils``) and the set-up every
stage
shares (:mod:`octa3d.stages.context`, which is no stage), and never another stage; the demo composes stages through
:data:`STAGES`. The stage's module name is its run-folder name (``runs/<exp>/<stage>/``).
"""

from __future__ import annotations

import importlib
from typing import Any

from octa3d.config import Config

#: mode -> module implementing ``run(cfg)``; the one mode -> stage table.
STAGES: dict[str, str] = {
    "synth": "octa3d.stages.synth",
    "prepare": "octa3d.stages.prepare",
    "ae_pretrain": "octa3d.stages.ae_pretrain",
    "train": "octa3d.stages.train",
    "test": "octa3d.stages.test",
    "explain": "octa3d.stages.explain",
    "predict": "octa3d.stages.predict",
    "export": "octa3d.stages.export",
    "compress": "octa3d.stages.compress",
    "study": "octa3d.stages.study",
    "demo": "octa3d.stages.demo",
}


def run_stage(cfg: Config) -> Any:
    """Import the stage module of ``cfg.run.mode`` and return its ``run(cfg)``."""
    return importlib.import_module(STAGES[cfg.run.mode]).run(cfg)
