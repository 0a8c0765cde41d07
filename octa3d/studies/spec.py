"""The study file (``--study study.yaml``): what is compared, over which folds, read and checked before anything runs.

A study is a list of *arms* (one model, input, modality, initialisation or any other set of octa3d flags each),
every arm trained and tested on the same subject-level folds::

    name: octa500-2d-vs-3d          # the study folder: <runs-dir>/<name>/ (default: the file's stem)
    folds: 5                        # k folds inside the non-test subjects; the hold-out is --test-fraction
    reference: 3d-resnet18          # the arm the forest plot compares the others with (default: the first)
    common:                         # octa3d flags every arm shares (flat, or nested by section)
      data_root: ./data
      task: binary
    arms:
      - {name: 2d-vgg19, input: enface, model: vgg19}
      - {name: 3d-resnet18, input: volume, model: resnet18, ae_pretrain: {epochs: 10}}
    grid:                           # optional: every arm is crossed with every combination of these values
      lr: [0.001, 0.0003]
    stats: {bootstrap: 2000, level: 0.95, ordered: false}

An arm holds octa3d flags (any flag of ``--help``, YAML names with ``-`` or ``_``) and these study keys: ``name``,
``input`` (``volume`` = ``--dim 3d``; ``enface`` = ``--dim 2d`` projected from the volume; ``enface:<map>`` = an
OCTA-500 ``Projection Maps/<map>`` image), ``ae_pretrain`` and ``test`` (flags for that stage only; the arm's own
flags drive every stage). Precedence for a cell: octa3d defaults < :data:`CELL_DEFAULTS` < ``common`` < the command
line's flags < the arm. Flags that define the subjects or the folds (:data:`STUDY_LEVEL`) may only be common, so
every arm sees the same eyes in the same folds; flags the study sets itself (:data:`MANAGED`) are refused.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from octa3d.config import Config, apply_overrides, flatten_yaml, get_value, validate
from octa3d.errors import ConfigError
from octa3d.model import check_input_size, get_spec

#: Keys of a study file.
STUDY_KEYS = ("name", "description", "folds", "reference", "common", "arms", "grid", "stats")
#: Keys of ``stats:`` and their defaults.
STATS_DEFAULTS: dict[str, Any] = {"bootstrap": 2000, "level": 0.95, "ordered": False, "seed": None}
#: Keys of an arm that are no octa3d flag.
ARM_KEYS = ("name", "input", "ae_pretrain", "test")
#: Flags that define the subjects, the hold-out and the folds: the same for every arm (``common`` or the command
#: line only).
STUDY_LEVEL = ("data_root", "source", "labels", "fov", "task", "classes", "negative", "positive", "test_fraction",
               "val_fraction", "seed", "group_regex", "skip_unlabeled", "max_voxels", "cache_dir")
#: Flags the study sets for each cell (its folder, its stages, its folds, resuming).
MANAGED = ("mode", "exp", "runs_dir", "overwrite", "resume", "folds", "checkpoint", "input", "external", "max_steps",
           "study", "ray_address", "executor", "cell_cpus", "cell_gpus", "cell_retries")
#: Settings of every cell below the study's own: no evidence maps and no faithfulness scores (minutes per cell on a
#: CPU; ask for them with ``test: {cam: layercam}``).
CELL_DEFAULTS: dict[str, Any] = {"cam": "none", "faithfulness_subjects": 0}
#: Flags that name files or folders: made absolute against the current folder when the study is read, since the
#: cells run elsewhere (Ray workers start in folders of their own).
PATH_FLAGS = ("data_root", "labels", "cache_dir", "init_from", "ae_extra_data")
#: ``input:`` values: volume, enface, enface:<OCTA-500 projection map folder>.
INPUTS = ("volume", "enface")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,79}$")


@dataclass
class Arm:
    """One arm: its name, the flags of its cells (train stage) and the per-stage extras.

    Attributes:
        name: a folder name (``cells/<name>/``).
        values: flag name -> value for the arm's cells, common settings and command-line flags included.
        own: the flags the arm sets itself (its identity in tables and methods).
        ae_pretrain: extra flags of its ae_pretrain stage (run when ``init`` is ``ae``).
        test: extra flags of its test stage.
    """

    name: str
    values: dict[str, Any]
    own: dict[str, Any]
    ae_pretrain: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)

    @property
    def runs_ae(self) -> bool:
        """True when the arm's cells pretrain an autoencoder first (``init: ae``)."""
        return self.values.get("init") == "ae"


@dataclass
class StudySpec:
    """A study file, read and checked: its arms (grid expanded) and settings.

    Attributes:
        name: the study folder name.
        source: where it was read (a file path, or ``"<dict>"``).
        folds: number of folds.
        arms: the arms, in file order (grid combinations after their base arm).
        reference: the arm others are compared with in the forest plot.
        stats: the ``stats:`` settings (:data:`STATS_DEFAULTS` filled in).
        common: the common flags as given (after the command line's).
        description: free text for the page and methods.
        doc: the study file's mapping as read (recorded as ``study.yaml`` in the study folder).
    """

    name: str
    source: str
    folds: int
    arms: list[Arm]
    reference: str
    stats: dict[str, Any]
    common: dict[str, Any]
    description: str = ""
    doc: dict[str, Any] = field(default_factory=dict)

    def arm(self, name: str) -> Arm:
        """The arm called ``name``."""
        return next(a for a in self.arms if a.name == name)


def read_study(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The study mapping and where it came from (a YAML file, or a mapping given directly).

    Raises:
        ConfigError: missing file, invalid YAML, not a mapping.
    """
    if isinstance(source, dict):
        return copy.deepcopy(source), "<dict>"
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--study {path}: file not found (a YAML study file; docs/how-to/studies.md)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"--study {path}: not valid YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"--study {path}: expected a mapping (name, folds, common, arms ...), got "
                          f"{type(doc).__name__}")
    return doc, str(path)


def _known(keys: Any, allowed: tuple[str, ...], where: str) -> None:
    for k in keys:
        if str(k) not in allowed:
            close = [a for a in allowed if a.startswith(str(k)[:3])][:3]
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{k}'{hint}; allowed: {', '.join(allowed)}")


def _flags(mapping: Any, where: str) -> dict[str, Any]:
    """A mapping of octa3d flags (flat or nested by section) as ``{field_name: value}``, names checked."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of octa3d flags, got {type(mapping).__name__}")
    flat = flatten_yaml(mapping, where)
    probe = Config()
    try:
        apply_overrides(probe, flat, where)  # unknown keys (named with `where`) and wrong types
    except ConfigError as exc:
        if str(exc).startswith(where):
            raise
        raise ConfigError(f"{where}: {exc}") from exc
    return {str(k).strip().replace("-", "_"): get_value(probe, str(k)) for k in flat}


def _refuse(values: dict[str, Any], names: tuple[str, ...], where: str, why: str) -> None:
    bad = [k for k in values if k in names]
    if bad:
        raise ConfigError(f"{where}: {', '.join(k.replace('_', '-') for k in bad)} {why}")


def _input_flags(value: Any, where: str) -> dict[str, Any]:
    """``input:`` as the flags it stands for."""
    text = str(value)
    kind, _, projection = text.partition(":")
    if kind not in INPUTS or (kind == "volume" and projection):
        raise ConfigError(f"{where}: input '{text}': choose volume (3D), enface (2D, projected from the volume) or "
                          "enface:<map> (an OCTA-500 'Projection Maps' folder, e.g. enface:OCTA(FULL)); 2D B-scans "
                          "and fundus photos are class-folder data sets of their own (--dim 2d)")
    if kind == "volume":
        return {"dim": "3d"}
    return {"dim": "2d", "projection": projection or "compute"}


def _arm_name(own: dict[str, Any]) -> str:
    """A default arm name from what the arm sets: ``<dim>-<model>`` and its other values."""
    parts = [str(own.get("dim", "")), str(own.get("model", ""))]
    parts += [f"{v}" if not isinstance(v, list) else "x".join(map(str, v)) for k, v in own.items()
              if k not in ("dim", "model", "projection")]
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(p for p in parts if p)) or "arm"


def _expand_grid(arms: list[dict[str, Any]], grid: Any, where: str) -> list[dict[str, Any]]:
    """Every arm crossed with every combination of ``grid``'s values (named ``<arm>-<value>-...``)."""
    if not grid:
        return arms
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}: grid: expected flag: [value, value, ...] lists, got {grid!r}")
    out = []
    keys = list(grid)
    for arm in arms:
        for combo in itertools.product(*(grid[k] for k in keys)):
            new = copy.deepcopy(arm)
            clash = [k for k in keys if k in new]
            if clash:
                raise ConfigError(f"{where}: grid key(s) {', '.join(clash)} are also set by arm "
                                  f"{arm.get('name', '?')}; set them in one place")
            new.update(dict(zip(keys, combo)))
            if "name" in arm:
                new["name"] = "-".join([str(arm["name"]), *(re.sub(r"[^A-Za-z0-9._+]+", "_", str(v)) for v in combo)])
            out.append(new)
    return out


def load_study(source: str | Path | dict[str, Any], cli: dict[str, Any] | None = None) -> StudySpec:
    """Read and check a study: keys, arms (grid expanded), every cell's configuration.

    Args:
        source: a study YAML file or the same mapping.
        cli: flags given on the command line (``{field: value}``), applied to every arm above ``common``.

    Returns:
        The :class:`StudySpec`.

    Raises:
        ConfigError: naming the file, the arm and the key: an unknown key, a flag of the wrong type or value, a
            study-level flag set by an arm, a flag the study manages, two arms of one name, an unknown reference.
    """
    doc, where = read_study(source)
    _known(doc, STUDY_KEYS, where)
    folds = doc.get("folds", 5)
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ConfigError(f"{where}: folds: {folds!r}: need a whole number >= 2 (the same folds for every arm)")
    common = _flags(doc.get("common"), f"{where}: common")
    _refuse(common, MANAGED, f"{where}: common", "is set by the study for each cell; remove it (folds: at the top)")
    cli = {k: v for k, v in (cli or {}).items() if k not in MANAGED}
    stats = dict(STATS_DEFAULTS)
    if doc.get("stats") is not None:
        if not isinstance(doc["stats"], dict):
            raise ConfigError(f"{where}: stats: expected a mapping ({', '.join(STATS_DEFAULTS)})")
        _known(doc["stats"], tuple(STATS_DEFAULTS), f"{where}: stats")
        stats.update(doc["stats"])
    _check_stats(stats, where)
    raw_arms = doc.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        raise ConfigError(f"{where}: arms: expected a list of arms (each a mapping of flags), got {raw_arms!r}")
    for i, a in enumerate(raw_arms):
        if not isinstance(a, dict):
            raise ConfigError(f"{where}: arms[{i}]: expected a mapping of flags, got {a!r}")
    arms = [_arm(a, i, where, common, cli) for i, a in enumerate(_expand_grid(raw_arms, doc.get("grid"), where))]
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: two or more arms are named {', '.join(dup)}; give each arm its own name:")
    reference = str(doc.get("reference") or names[0])
    if reference not in names:
        raise ConfigError(f"{where}: reference: '{reference}' is no arm of the study ({', '.join(names)})")
    name = str(doc.get("name") or (Path(where).stem if where != "<dict>" else "study"))
    if not _NAME.match(name):
        raise ConfigError(f"{where}: name: '{name}' must be a plain folder name (letters, digits, . _ + -)")
    return StudySpec(name=name, source=where, folds=folds, arms=arms, reference=reference, stats=stats,
                     common={**common, **cli}, description=str(doc.get("description") or ""), doc=doc)


def _check_stats(stats: dict[str, Any], where: str) -> None:
    b, level = stats["bootstrap"], stats["level"]
    if not isinstance(b, int) or isinstance(b, bool) or b < 100:
        raise ConfigError(f"{where}: stats: bootstrap: {b!r}: need a whole number >= 100 (paired resamples)")
    if not isinstance(level, float) or not 0.5 < level < 1:
        raise ConfigError(f"{where}: stats: level: {level!r}: need a confidence level between 0.5 and 1 (0.95)")
    if not isinstance(stats["ordered"], bool):
        raise ConfigError(f"{where}: stats: ordered: {stats['ordered']!r}: true or false (classes in order of "
                          "severity: adds the quadratic weighted kappa)")
    if stats["seed"] is not None and (not isinstance(stats["seed"], int) or stats["seed"] < 0):
        raise ConfigError(f"{where}: stats: seed: {stats['seed']!r}: a whole number >= 0 (default: --seed)")


def _arm(raw: dict[str, Any], i: int, where: str, common: dict[str, Any], cli: dict[str, Any]) -> Arm:
    """One arm checked: its flags, its stage extras, the configuration of its cells."""
    label = f"{where}: arms[{i}]" + (f" ({raw['name']})" if "name" in raw else "")
    own = _flags({k: v for k, v in raw.items() if k not in ARM_KEYS}, label)  # sections nested or flat
    if "input" in raw:
        sugar = _input_flags(raw["input"], label)
        clash = [k for k in sugar if k in own and own[k] != sugar[k]]
        if clash:
            raise ConfigError(f"{label}: input '{raw['input']}' contradicts {', '.join(clash)} set in the same arm")
        own = {**sugar, **own}
    _refuse(own, MANAGED, label, "is set by the study for each cell; remove it")
    _refuse(own, STUDY_LEVEL, label, "must be the same for every arm (the same subjects in the same folds): set it "
                                     "under common:")
    extras = {}
    for stage in ("ae_pretrain", "test"):
        extras[stage] = _flags(raw.get(stage), f"{label}: {stage}")
        _refuse(extras[stage], (*MANAGED, *STUDY_LEVEL), f"{label}: {stage}", "cannot be set for one stage")
    name = str(raw.get("name") or _arm_name(own))
    if not _NAME.match(name):
        raise ConfigError(f"{label}: name '{name}': must be a plain folder name (letters, digits, . _ + -)")
    values = {**CELL_DEFAULTS, **common, **cli, **own}
    for k in PATH_FLAGS:
        if values.get(k):
            values[k] = str(Path(values[k]).expanduser().resolve())
    for stage, extra in (("train", {}), *extras.items()):
        cfg = Config()
        apply_overrides(cfg, {**values, **extra}, label)
        cfg.run.mode = stage
        try:
            validate(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from exc
    return Arm(name=name, values=values, own=own, ae_pretrain=extras["ae_pretrain"], test=extras["test"])


def check_models(spec: StudySpec) -> None:
    """Every arm's model is registered for its ``--dim`` and takes its input size.

    Raises:
        ConfigError: naming the arm (the registry's message lists the models).
    """
    for arm in spec.arms:
        cfg = Config()
        apply_overrides(cfg, arm.values, spec.source)
        try:
            model = get_spec(cfg.model.model)
            if cfg.spatial_dims not in model.dims:
                raise ConfigError(f"model '{cfg.model.model}' has no {cfg.model.dim} version")
            check_input_size(cfg.model.model, cfg.input_shape, cfg.spatial_dims)
        except ConfigError as exc:
            raise ConfigError(f"{spec.source}: arm {arm.name}: {exc}") from exc
