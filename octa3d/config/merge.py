"""Reading, merging, checking and writing configurations: YAML files, command-line values, validation, and the
mapping a run folder's ``config.yaml`` holds. Precedence: field default < ``--config`` YAML < explicit flag."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from octa3d.config.schema import SECTIONS, Config, section_fields
from octa3d.errors import ConfigError


def _key(name: str) -> str:
    return name.strip().replace("-", "_")


def _field_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    return {f.name: (sec, f, tp) for sec, f, tp in section_fields()}


class _Why(ValueError):
    """Why a value was refused (shown in the message, unlike Python's own conversion errors)."""


def _scalar(value: Any, tp: Any) -> Any:
    """``value`` as ``tp`` (bool, int, float or str), refusing what only looks convertible.

    YAML gives typed values: ``true`` is not the integer 1, ``[a, b]`` is not the string ``"['a', 'b']"``, and
    ``nan``/``inf`` are no learning rate or fraction. Raises ValueError (:class:`_Why`: with the reason).
    """
    if isinstance(value, (list, tuple, dict, set)):
        kind = "mapping" if isinstance(value, dict) else "list"
        raise _Why(f"got a {kind}, need one value")
    if tp is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        elif isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise _Why("need true or false")
    if isinstance(value, bool):
        raise _Why("got true/false, need " + ("a number" if tp in (int, float) else "text (quote it in YAML)"))
    if tp is str:
        return str(value)
    if tp is float:
        out = float(value)
        if not math.isfinite(out):
            raise _Why("need a finite number")
        return out
    if tp is int:
        if isinstance(value, int):
            return value
        num = float(value) if isinstance(value, str) and not value.strip().lstrip("+-").isdigit() else value
        if isinstance(num, float):  # 1e9 or 3.0 (YAML reads 1e9 as text): whole numbers only
            if not math.isfinite(num) or not num.is_integer():
                raise _Why("need a whole number")
            return int(num)
        return int(num)
    return tp(value)


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type.

    Lists accept a comma-separated string or a YAML list; ``None``/``null`` is allowed for optional fields.
    Booleans are not numbers or text, lists not text, and floats must be finite.

    Raises:
        ConfigError: naming the flag, the value and what is needed.
    """
    flag = "--" + name.replace("_", "-")
    args = get_args(tp)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag} may not be empty")
    inner = [a for a in args if a is not type(None)][0] if optional else tp
    origin = get_origin(inner)
    what = (f"a list of {get_args(inner)[0].__name__}" if origin is list
            else getattr(inner, "__name__", str(inner)))
    try:
        if origin is list:
            (elem,) = get_args(inner)
            items = value
            if isinstance(value, str):
                items = [v for v in re.split(r"[,\s]+", value.strip()) if v]
            elif isinstance(value, dict):
                raise _Why("got a mapping")
            elif not isinstance(value, (list, tuple)):
                items = [value]
            return [_scalar(v.strip() if isinstance(v, str) else v, elem) for v in items]
        return _scalar(value, inner)
    except (TypeError, ValueError, OverflowError) as exc:
        why = f": {exc}" if isinstance(exc, _Why) else ""
        raise ConfigError(f"{flag}: cannot read {value!r} as {what}{why}") from exc


def apply_overrides(cfg: Config, values: dict[str, Any], origin: str) -> None:
    """Set fields from a flat ``{name: value}`` mapping (names with '-' or '_').

    Raises:
        ConfigError: on an unknown key (named, with ``origin``) or a value of the wrong type.
    """
    index = _field_index()
    for raw_key, value in values.items():
        key = _key(raw_key)
        if key not in index:
            # names sharing the first letters, then near misspellings ("modle" -> model)
            near = [k for k in index if k.startswith(key[:4])] + difflib.get_close_matches(key, list(index), 3, 0.75)
            close = [k.replace("_", "-") for k in dict.fromkeys(near)][:3]
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{origin}: unknown key '{raw_key}'{hint}")
        sec, f, tp = index[key]
        setattr(getattr(cfg, sec), f.name, coerce(value, tp, f.name))


def get_value(cfg: Config, name: str) -> Any:
    """The value of field ``name`` (flag name with '-' or '_') wherever its section is."""
    sec, f, _ = _field_index()[_key(name)]
    return getattr(getattr(cfg, sec), f.name)


def to_argv(values: dict[str, Any]) -> list[str]:
    """Command-line arguments that set ``values`` (``{field: value}``), e.g. for a recorded command line."""
    index = _field_index()
    out: list[str] = []
    for name, value in values.items():
        flag = "--" + _key(name).replace("_", "-")
        inner = index[_key(name)][2]
        if inner is bool or (get_origin(inner) is not None and bool in get_args(inner)):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def flatten_yaml(doc: Any, origin: str) -> dict[str, Any]:
    """Accept a flat mapping or one nested by section names; return a flat mapping."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{origin}: expected a mapping of flag names to values, got {type(doc).__name__}")
    flat: dict[str, Any] = {}
    for k, v in doc.items():
        if _key(str(k)) in SECTIONS and isinstance(v, dict):
            flat.update(v)
        else:
            flat[str(k)] = v
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a flat mapping (keys validated later by :func:`apply_overrides`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: file not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {p}: not valid YAML ({exc})") from exc
    return flatten_yaml(doc, f"--config {p}")


def validate(cfg: Config) -> None:
    """Check value ranges and cross-field rules; raise :class:`ConfigError` naming the flag."""
    for sec, f, _ in section_fields():
        choices = f.metadata.get("choices")
        val = getattr(getattr(cfg, sec), f.name)
        if choices and val not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')} {val!r}: choose one of {', '.join(choices)}")
    _validate_run(cfg)
    d, p = cfg.data, cfg.preprocess
    if not 0.0 < d.test_fraction < 1.0:
        raise ConfigError(f"--test-fraction {d.test_fraction}: must be between 0 and 1")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {d.val_fraction}: must be in [0, 1)")
    if d.max_voxels < 1:
        raise ConfigError(f"--max-voxels {d.max_voxels}: must be >= 1")
    if d.folds < 1:
        raise ConfigError(f"--folds {d.folds}: must be >= 1 (1 = single train/val split)")
    if len(p.clip_percentiles) != 2 or not 0 <= p.clip_percentiles[0] < p.clip_percentiles[1] <= 100:
        raise ConfigError(f"--clip-percentiles {p.clip_percentiles}: need two increasing numbers in 0..100")
    if p.slab_depth <= 0:
        raise ConfigError(f"--slab-depth {p.slab_depth}: must be > 0")
    if any(s < 8 for s in cfg.input_shape):
        raise ConfigError(f"--input-size {cfg.input_shape}: every side must be >= 8")
    if math.prod(cfg.input_shape) > d.max_voxels:
        raise ConfigError(f"--input-size {cfg.input_shape}: {math.prod(cfg.input_shape)} voxels per sample is "
                          f"more than --max-voxels {d.max_voxels}")
    if p.patch_size < 0 or p.patch_stride < 0:
        raise ConfigError("--patch-size/--patch-stride must be >= 0")
    if p.depth_axis not in (0, 1, 2):
        raise ConfigError(f"--depth-axis {p.depth_axis}: must be 0, 1 or 2")
    t = cfg.train
    if t.epochs < 1 or t.batch_size < 1 or t.lr <= 0:
        raise ConfigError("--epochs, --batch-size must be >= 1 and --lr > 0")
    if t.weight_decay < 0:
        raise ConfigError(f"--weight-decay {t.weight_decay}: must be >= 0")
    if t.warmup_epochs < 0 or t.patience < 0 or t.freeze_encoder_stages < 0 or t.freeze_epochs < 0:
        raise ConfigError("--warmup-epochs, --patience, --freeze-encoder-stages, --freeze-epochs must be >= 0")
    if t.max_steps < 0:
        raise ConfigError(f"--max-steps {t.max_steps}: must be >= 0 (0 = no limit)")
    if t.accum_steps < 1 or t.clip_grad < 0 or not 0 <= t.label_smoothing < 1:
        raise ConfigError("--accum-steps must be >= 1, --clip-grad >= 0, --label-smoothing in [0, 1)")
    if not 0 < t.layer_decay <= 1:
        raise ConfigError(f"--layer-decay {t.layer_decay}: must be in (0, 1] (1 = off)")
    if not 0 < t.mask_ratio < 1:
        raise ConfigError(f"--mask-ratio {t.mask_ratio}: must be between 0 and 1 (fraction of patches hidden)")
    if not 0 <= cfg.model.drop_path < 1:
        raise ConfigError(f"--drop-path {cfg.model.drop_path}: must be in [0, 1)")
    if cfg.eval.external and cfg.run.mode != "test":
        raise ConfigError(f"--external {cfg.eval.external}: only for --mode test (external validation); "
                          "use --input with --mode predict/explain")
    if cfg.eval.faithfulness_subjects < 0:
        raise ConfigError("--faithfulness-subjects must be >= 0 (0 = off)")
    if cfg.eval.bootstrap < 0:
        raise ConfigError("--bootstrap must be >= 0")
    if cfg.eval.tta < 0 or cfg.eval.mc_dropout < 0:
        raise ConfigError(f"--tta {cfg.eval.tta} / --mc-dropout {cfg.eval.mc_dropout}: passes must be >= 0 (0 = off)")
    if not 0 < cfg.eval.ood_false_alarm < 1:
        raise ConfigError(f"--ood-false-alarm {cfg.eval.ood_false_alarm}: must be between 0 and 1 (e.g. 0.05)")
    if cfg.synth.n_subjects < 1:
        raise ConfigError("--n-subjects must be >= 1")
    if len(cfg.synth.shape) != 3 or any(s < 8 for s in cfg.synth.shape):
        raise ConfigError(f"--shape {cfg.synth.shape}: need three sizes >= 8 (B-scans,depth,width)")
    if math.prod(cfg.synth.shape) > d.max_voxels:
        raise ConfigError(f"--shape {cfg.synth.shape}: {math.prod(cfg.synth.shape)} voxels per volume is more "
                          f"than --max-voxels {d.max_voxels}")
    c = cfg.compress
    if not 0.0 <= c.prune_amount < 1.0:
        raise ConfigError(f"--prune-amount {c.prune_amount}: must be in [0, 1) (the final fraction of weights pruned)")
    if c.prune_rounds < 1:
        raise ConfigError(f"--prune-rounds {c.prune_rounds}: must be >= 1")
    if c.qat_epochs < 0 or c.finetune_epochs < 0:
        raise ConfigError("--qat-epochs and --finetune-epochs must be >= 0")
    _validate_study(cfg)


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
#: ``--ray-address``: the embedded local Ray, the running cluster, a Ray Client address or a GCS HOST:PORT.
RAY_ADDRESS_PATTERN = re.compile(r"local|auto|ray://[^\s/]+:\d+|[^\s/:]+:\d+")


def _validate_study(cfg: Config) -> None:
    """--mode study needs its file; the cell resources and retries are usable; --ray-address is an address."""
    s = cfg.study
    if cfg.run.mode == "study" and not s.study:
        raise ConfigError("--mode study needs --study FILE.yaml (the arms and folds; docs/how-to/studies.md)")
    if not RAY_ADDRESS_PATTERN.fullmatch(s.ray_address):
        raise ConfigError(f"--ray-address {s.ray_address!r}: choose local (an embedded Ray on this machine), auto "
                          "(the running cluster), ray://HOST:PORT or HOST:PORT")
    if s.cell_cpus < 0 or s.cell_gpus < 0 or s.cell_retries < 0:
        raise ConfigError(f"--cell-cpus {s.cell_cpus}, --cell-gpus {s.cell_gpus}, --cell-retries {s.cell_retries}: "
                          "must be >= 0 (--cell-cpus 0 = automatic)")


def _validate_run(cfg: Config) -> None:
    """The experiment name stays one folder inside --runs-dir; --device, --num-workers, --seed are usable."""
    r = cfg.run
    name, flag = cfg.exp_name, "--exp" if r.exp is not None else "the experiment name (from --dim/--model/--task)"
    if (name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute()
            or Path(name).drive):
        raise ConfigError(f"{flag} {name!r}: must be a plain folder name inside --runs-dir (no '/', '\\', '..' or "
                          f"absolute path); choose the parent folder with --runs-dir")
    if not DEVICE_PATTERN.fullmatch(r.device):
        raise ConfigError(f"--device {r.device!r}: choose auto, cpu, cuda, cuda:N (N = GPU index) or mps")
    if r.num_workers < 0:
        raise ConfigError(f"--num-workers {r.num_workers}: must be >= 0 (0 = load in the main process)")
    if not 0 <= r.seed < 2**32:
        raise ConfigError(f"--seed {r.seed}: must be in 0..{2**32 - 1} (NumPy's seed range)")


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Config as a YAML-ready mapping nested by section."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """Config as YAML text (re-loadable with ``--config``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(doc: dict[str, Any]) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. a run folder's config.yaml)."""
    cfg = Config()
    apply_overrides(cfg, flatten_yaml(doc, "config"), "config")
    return cfg
