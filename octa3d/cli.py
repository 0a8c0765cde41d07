"""Command line: ``python main.py --mode MODE [flags]`` (also the ``octa3d`` console script).

The argparse groups are generated from the dataclasses in :mod:`octa3d.config`, so every flag is a config field,
documented by ``--help`` and settable from ``--config file.yaml``. Precedence: default < YAML < flag.
Each mode is one module of :mod:`octa3d.stages` exposing ``run(cfg)``; the run-folder name of a stage is its
module name. Which options were given explicitly travels on the config (``cfg.explicit``), so no stage reads argv.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args, get_origin

from octa3d import __version__
from octa3d.config import Config, apply_overrides, load_yaml, section_fields, validate
from octa3d.errors import Octa3dError, error_message, format_error
from octa3d.stages import run_stage
from octa3d.utils.io import atomic_write_text
from octa3d.utils.log import setup_logging
from octa3d.utils.tracking import cli_program

log = logging.getLogger("octa3d.cli")

_GROUP_TITLES = {
    "run": "experiment",
    "data": "data and labels",
    "preprocess": "preprocessing",
    "model": "model",
    "train": "training (--mode ae_pretrain / train)",
    "eval": "testing, prediction and evidence maps (--mode test / explain / predict)",
    "synth": "synthetic data (--mode synth)",
    "compress": "edge deployment (--mode compress)",
    "study": "studies: arms x folds on Ray, paired statistics, paper kit (--mode study)",
}


def _flag_kwargs(f: Any, tp: Any) -> dict[str, Any]:
    args = get_args(tp)
    inner = [a for a in args if a is not type(None)][0] if type(None) in args else tp
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")  # argparse %-formats help
    kw: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS}
    if inner is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["metavar"] = f.name.upper() if get_origin(inner) is not list else "A,B,..."
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
            kw.pop("metavar")
    return kw


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (groups generated from the config dataclasses)."""
    parser = argparse.ArgumentParser(
        prog="octa3d",
        description="octa3d: retinal disease classification from 3D OCTA/OCT volumes and 2D retinal images. "
                    "Stages: synth -> prepare -> ae_pretrain -> train -> test/explain -> compress.",
        epilog="Example: octa3d --mode ae_pretrain --dim 3d --model resnet50 --data-root ./data --exp my-exp "
               "(python main.py ... is the same).",
    )
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of flag defaults (keys = flag names, flat or under section names); "
                             "flags given on the command line override it.")
    parser.add_argument("--list-models", action="store_true",
                        help="Print the registered models (name, dims, parameters, CAM layer) and exit.")
    parser.add_argument("--version", action="version", version=f"octa3d {__version__}")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for sec, f, tp in section_fields():
        if sec not in groups:
            groups[sec] = parser.add_argument_group(_GROUP_TITLES.get(sec, sec))
        groups[sec].add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_flag_kwargs(f, tp))
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` into a validated :class:`Config` (default < YAML < flags).

    The config records which fields were set explicitly (``cfg.explicit``: flags and YAML keys) and the arguments
    themselves (``cfg.argv``, for command.txt), so that stages never look at the command line.

    Raises:
        ConfigError: unknown YAML key, wrong type, or out-of-range value (the flag is named).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = Config()
    explicit: set[str] = set()
    if ns.config:
        from_yaml = load_yaml(ns.config)
        apply_overrides(cfg, from_yaml, f"--config {ns.config}")
        explicit |= {k.strip().replace("-", "_") for k in from_yaml}
    flags = {k: v for k, v in vars(ns).items() if k not in ("config", "list_models")}
    apply_overrides(cfg, flags, "command line")
    explicit |= set(flags)
    validate(cfg)
    cfg.explicit, cfg.argv = frozenset(explicit), tuple(argv)
    return cfg, ns


def _save_full_message(cfg: Config | None) -> Callable[[str], str | None]:
    """Where the whole text of a long error goes: ``<runs-dir>/<exp>/errors/<time>.txt`` when the experiment folder
    exists, else ``octa3d-error-<time>.txt`` in the current folder, else in the system's temporary folder."""
    def save(text: str) -> str | None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        places = [cfg.run_dir / "errors" / f"{stamp}.txt"] if cfg is not None and cfg.run_dir.is_dir() else []
        places += [Path.cwd() / f"octa3d-error-{stamp}.txt", Path(tempfile.gettempdir()) / f"octa3d-error-{stamp}.txt"]
        for path in places:
            if path.exists():  # a second error within the second: never replace the first one's file
                path = path.with_name(f"{path.stem}-{os.getpid()}{path.suffix}")
            try:
                return str(atomic_write_text(path, f"octa3d: error: {text}\n"))
            except (OSError, Octa3dError):
                continue
        return None
    return save


def report_error(exc: BaseException, cfg: Config | None = None) -> None:
    """Print an octa3d error to stderr whole (``octa3d: error: <first line>``, its list, its advice).

    A DataLoader worker's re-raised traceback is reduced to the worker's message (:func:`octa3d.errors.error_message`);
    a list longer than :data:`octa3d.errors.MAX_LISTED` lines is cut, the whole message saved to a file that the
    last listed line names (:func:`octa3d.errors.format_error`).
    """
    text = format_error(error_message(exc), _save_full_message(cfg))
    print(f"octa3d: error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare `octa3d`: what it can do, not a prepare run on ./data
        build_parser().print_help()
        prog = cli_program()
        print(f"\nNo --mode given. To start: {prog} --mode synth --data-root ./data (a synthetic dataset; skip it "
              f"for your own data), then {prog} --mode prepare --data-root ./data --exp NAME (README 'Pipeline').")
        return 0
    try:
        cfg, ns = parse_config(argv)
    except Octa3dError as exc:
        report_error(exc)
        return 2
    setup_logging(cfg.run.log_level)
    if ns.list_models:
        from octa3d.model.registry import format_model_table  # torch + MONAI: only for --list-models

        print(format_model_table())
        return 0
    try:
        run_stage(cfg)
    except Octa3dError as exc:
        log.debug("stopped", exc_info=True)
        report_error(exc, cfg)
        return 2
    except OSError as exc:
        # a full disk hit by a writer outside utils.io's atomic writes: still one line naming the file
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        log.debug("stopped", exc_info=True)
        print(f"octa3d: error: {exc.filename or 'writing output'}: the disk is full ({exc.strerror}); free some "
              f"space (or write elsewhere with --runs-dir/--cache-dir) and rerun", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("octa3d: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
