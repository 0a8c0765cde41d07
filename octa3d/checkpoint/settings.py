"""The settings a trained model is evaluated (or fine-tuned) under: the checkpoint's, plus this invocation's flags
where they may differ, and an error for explicit flags that contradict the model.

A model is only meaningful on inputs made the way it was trained, so test, explain and compress take the model,
dimension, modality, task, input size and preprocessing from the checkpoint (:func:`checkpoint_config`). A flag
the user gave explicitly (``cfg.is_explicit``) that says otherwise is not silently ignored:

* :data:`MODEL_FLAGS` / :data:`PREPROCESS_FLAGS` (``--normalize`` among them: the checkpoint's normalisation is
  applied), ``--shortcut-type`` (against the checkpoint's ``model_kwargs``) and ``--projection``: a
  :class:`~octa3d.errors.ConfigError` naming the checkpoint's value (the user asked for a model that does not
  exist);
* :data:`DATA_FLAGS` (which subjects and labels the experiment has) and ``--augment``: a warning that says which
  value wins, because the experiment's splits and labels are fixed and evaluation never augments.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

from octa3d.config import Config, PreprocessConfig, TrainConfig, from_dict, section_fields
from octa3d.errors import ConfigError

log = logging.getLogger("octa3d.checkpoint")

#: Flags fixed by the model record (field -> record key): contradicting one is an error.
MODEL_FLAGS = {"model": "model_name", "dim": "dim", "modality": "modality", "task": "task"}
#: Preprocessing flags fixed by the checkpoint's ``preprocess`` record (``input_size`` by ``input_shape``): every
#: preprocessing setting but where the cache lives and the training augmentation.
PREPROCESS_FLAGS = tuple(f.name for f in dataclasses.fields(PreprocessConfig) if f.name not in ("cache_dir", "augment"))
#: Data flags whose checkpoint (saved config) value is used, with a warning when an explicit flag differs.
DATA_FLAGS = ("source", "fov", "classes", "negative", "positive", "group_regex", "test_fraction", "val_fraction",
              "folds")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return str(value)


def _same(a: Any, b: Any) -> bool:
    """Equal as flag values (lists vs tuples, 0.5 vs 0.50, numbers vs their text)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def _saved_config(doc: dict[str, Any]) -> Config:
    """A checkpoint's saved config; keys this octa3d version does not know (other version) are dropped."""
    try:
        return from_dict(doc)
    except ConfigError as exc:
        known = {f.name for _, f, _ in section_fields()}
        log.warning("the checkpoint's saved configuration has settings this version does not know (%s); "
                    "ignoring them", exc)
        return from_dict({sec: {k: v for k, v in vals.items() if k in known}
                          for sec, vals in doc.items() if isinstance(vals, dict)})


def _projection_advice(trained: str) -> str:
    return (f"the model was trained on OCTA-500 '{trained}' projection maps and is only evaluated on such maps. "
            f"Pass the map itself (--input '<OCTA_6mm|OCTA_3mm>/Projection Maps/{trained}/<ID>.bmp'), or test "
            f"an experiment whose data root holds 'Projection Maps/{trained}'; to use volumes without maps, train "
            f"a model with --projection compute (another --exp)")


def contradictions(cfg: Config, ckpt: dict[str, Any], saved: Config | None) -> list[str]:
    """Explicit flags of ``cfg`` that contradict the model of ``ckpt`` (one line each, naming both values).

    Args:
        cfg: this invocation's configuration.
        ckpt: a classifier checkpoint or a record of :func:`octa3d.checkpoint.models.load_any_model`.
        saved: the checkpoint's saved configuration (None when it has none).
    """
    out = []
    for name, key in MODEL_FLAGS.items():
        mine = getattr(cfg.model if name in ("model", "dim") else cfg.data, name)
        if cfg.is_explicit(name) and ckpt.get(key) is not None and not _same(mine, ckpt[key]):
            out.append(f"{_flag(name)} {_show(mine)} (the model: {_show(ckpt[key])})")
    # model options: the checkpoint's model_kwargs rebuild the model (absent = the default, MONAI's "B")
    shortcut = (ckpt.get("model_kwargs") or {}).get("shortcut_type", "B")
    if cfg.is_explicit("shortcut_type") and ckpt.get("model_name", "").startswith("resnet") and (
            cfg.model.shortcut_type != shortcut):
        out.append(f"--shortcut-type {cfg.model.shortcut_type} (the model: {shortcut})")
    pre = ckpt.get("preprocess") or {}
    if cfg.is_explicit("input_size") and cfg.preprocess.input_size and ckpt.get("input_shape"):
        size, shape = list(cfg.preprocess.input_size), list(ckpt["input_shape"])
        if not _same(size * len(shape) if len(size) == 1 else size, shape):
            out.append(f"--input-size {_show(size)} (the model: {_show(shape)})")
    for name in PREPROCESS_FLAGS:
        if name != "input_size" and cfg.is_explicit(name) and name in pre and not _same(getattr(cfg.preprocess, name), pre[name]):
            out.append(f"{_flag(name)} {_show(getattr(cfg.preprocess, name))} (the model: {_show(pre[name])})")
    dim = ckpt.get("dim", saved.model.dim if saved else None)
    if (cfg.is_explicit("projection") and saved is not None and dim == "2d"
            and not _same(cfg.data.projection, saved.data.projection)):
        trained = saved.data.projection
        why = (_projection_advice(trained) if trained != "compute" else
               "the model was trained on projections computed from the volumes; OCTA-500 maps are other images")
        out.append(f"--projection {cfg.data.projection} (the model: {trained}): {why}")
    return out


def _warn_overridden(cfg: Config, ecfg: Config, fine_tune: bool) -> None:
    """Warn about explicit flags whose checkpoint value wins (harmless, but the user asked for something else)."""
    for name in DATA_FLAGS:
        mine, used = getattr(cfg.data, name), getattr(ecfg.data, name)
        if cfg.is_explicit(name) and not _same(mine, used):
            log.warning("%s %s ignored: the experiment's value %s is used (its splits and labels were made with it)",
                        _flag(name), _show(mine), _show(used))
    if cfg.is_explicit("augment") and cfg.preprocess.augment and not fine_tune:
        log.warning("--augment ignored: evaluation never augments its inputs")


def checkpoint_config(cfg: Config, ckpt: dict[str, Any], *, fine_tune: bool = False) -> Config:
    """The configuration a checkpoint is evaluated (or fine-tuned) under.

    Data, label and preprocessing settings come from the checkpoint (its saved config, overridden by its model
    record: model, dim, modality, task, input size, preprocessing), so inputs are made exactly as in training.
    Where things are and how this invocation runs (run section, cache folder, test/CAM options) come from
    ``cfg``; the data root and label file too when given explicitly (else the checkpoint's). With ``fine_tune``
    the checkpoint's training augmentation and training settings are kept, except training flags (and
    ``--augment``) given explicitly.

    Args:
        cfg: this invocation's configuration (``cfg.explicit`` names the options the user set).
        ckpt: a loaded classifier checkpoint (or a record of :func:`octa3d.checkpoint.models.load_any_model`).
        fine_tune: keep augmentation and merge explicit training flags (``--mode compress``).

    Raises:
        ConfigError: explicit flags contradict the model (see :func:`contradictions`); all are named at once
            with the checkpoint's values.
    """
    saved = isinstance(ckpt.get("config"), dict)
    saved_cfg = _saved_config(ckpt["config"]) if saved else None
    bad = contradictions(cfg, ckpt, saved_cfg)
    if bad:
        raise ConfigError(
            "options contradict the trained model, which is always used with the settings it was trained with: "
            + "; ".join(bad) + ". Leave these options out (the model's values are used), or train a model with "
            "them (--mode train, another --exp) and use that one")
    ecfg = saved_cfg if saved_cfg is not None else copy.deepcopy(cfg)
    split_seed = ecfg.run.seed
    ecfg.run = copy.deepcopy(cfg.run)
    ecfg.run.exp = cfg.exp_name
    ecfg.run.seed = split_seed  # the split check compares it; the bootstrap uses cfg.run.seed
    ecfg.eval = copy.deepcopy(cfg.eval)
    explicit_root = cfg.is_explicit("data_root") or cfg.data.data_root != Config().data.data_root
    if explicit_root or not saved:
        ecfg.data.data_root = cfg.data.data_root
    elif ecfg.data.data_root != cfg.data.data_root:
        log.info("Using the checkpoint's data root %s (pass --data-root to use another)", ecfg.data.data_root)
    if cfg.data.labels:
        ecfg.data.labels = cfg.data.labels
    ecfg.preprocess.cache_dir = cfg.preprocess.cache_dir or str(cfg.cache_dir)
    ecfg.model.model, ecfg.model.dim = ckpt["model_name"], ckpt["dim"]
    ecfg.data.modality = ckpt.get("modality", ecfg.data.modality)
    ecfg.data.task = ckpt.get("task", ecfg.data.task)
    for key, value in (ckpt.get("preprocess") or {}).items():
        if key != "cache_dir" and hasattr(ecfg.preprocess, key):
            setattr(ecfg.preprocess, key, copy.deepcopy(value))
    ecfg.preprocess.input_size = [int(s) for s in ckpt["input_shape"]]
    if fine_tune and cfg.is_explicit("augment"):
        ecfg.preprocess.augment = cfg.preprocess.augment
    ecfg.preprocess.augment = ecfg.preprocess.augment and fine_tune
    if saved:
        _warn_overridden(cfg, ecfg, fine_tune)
    if fine_tune:
        ecfg.compress = copy.deepcopy(cfg.compress)
        for f in TrainConfig.__dataclass_fields__:
            if cfg.is_explicit(f):
                setattr(ecfg.train, f, copy.deepcopy(getattr(cfg.train, f)))
    ecfg.explicit, ecfg.argv = cfg.explicit, cfg.argv
    return ecfg


# ------------------------------------------------------------------------------------------------ --resume
#: Settings of this invocation, never taken from the recorded run (where it runs, how it logs, when it stops).
RESUME_INVOCATION = frozenset({"mode", "exp", "runs_dir", "device", "num_workers", "overwrite", "log_level",
                               "resume", "max_steps"})
#: Settings a resumed training may change when given explicitly: how it computes, not what. ``--epochs`` may
#: only grow (see :func:`merge_recorded_config`).
RESUME_SAFE = frozenset({"compile", "channels_last", "deterministic", "cache_dir"})
#: Sections a training run does not read (this invocation's values are kept).
_UNUSED_BY_TRAINING = ("eval", "synth", "compress")
#: Fields holding paths: compared as resolved paths (``./data`` and ``data`` are one folder).
_PATH_FIELDS = frozenset({"data_root", "labels", "init_from", "ae_extra_data"})


def _same_setting(name: str, a: Any, b: Any) -> bool:
    if name in _PATH_FIELDS and isinstance(a, str) and isinstance(b, str):
        from pathlib import Path

        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return _same(a, b)


def merge_recorded_config(cfg: Config, recorded: dict[str, Any], where: str) -> Config:
    """The configuration a ``--resume`` continues with: the recorded run's, plus this invocation's safe settings.

    Options not given explicitly take the recorded value (``--resume`` alone continues the run as it was), except
    :data:`RESUME_INVOCATION` (always this invocation's). Explicit options that change what the run computes are
    refused; only :data:`RESUME_SAFE` settings and a larger ``--epochs`` are taken from ``cfg``.

    Args:
        cfg: this invocation's configuration.
        recorded: the run's recorded configuration (its ``config.yaml`` or the checkpoint's ``config``).
        where: the file ``recorded`` came from (named in the error).

    Returns:
        The configuration to train with and to record in config.yaml.

    Raises:
        ConfigError: explicit options differ from the recorded run (each listed as ``--flag: recorded -> new``).
    """
    saved = _saved_config(recorded)
    changes = []
    for sec, f, _ in section_fields():
        if (sec in _UNUSED_BY_TRAINING or f.name in RESUME_SAFE | RESUME_INVOCATION
                or not cfg.is_explicit(f.name)):
            continue
        mine, rec = getattr(getattr(cfg, sec), f.name), getattr(getattr(saved, sec), f.name)
        if _same_setting(f.name, mine, rec) or (f.name == "epochs" and int(mine) > int(rec)):
            continue
        why = " (fewer epochs than the run was started with)" if f.name == "epochs" else ""
        changes.append(f"{_flag(f.name)}: {_show(rec)} -> {_show(mine)}{why}")
    if changes:
        raise ConfigError(
            f"--resume continues the run recorded in {where} with its own settings, and these options would change "
            f"it: {'; '.join(changes)}. Leave them out to resume (only more --epochs, --num-workers, --device, "
            f"--max-steps, --deterministic ... may change), or start a new run with --overwrite or another --exp")
    out = copy.deepcopy(saved)
    for sec in _UNUSED_BY_TRAINING:
        setattr(out, sec, copy.deepcopy(getattr(cfg, sec)))
    for sec, f, _ in section_fields():
        if f.name in RESUME_INVOCATION or (cfg.is_explicit(f.name) and f.name in RESUME_SAFE | {"epochs"}):
            setattr(getattr(out, sec), f.name, copy.deepcopy(getattr(getattr(cfg, sec), f.name)))
    out.explicit, out.argv = cfg.explicit, cfg.argv
    return out
