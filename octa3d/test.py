"""``--mode test``: hold-out evaluation of the experiment's classifier, with bootstrap CIs, plots and Grad-CAM.

The model is ``train/checkpoints/best.pt``, or every ``train/fold-k/checkpoints/best.pt`` (evaluated one by one and
as an ensemble of averaged probabilities), or ``--checkpoint``. Preprocessing comes from the checkpoint (input
size, preprocessing settings, modality), never from the flags of this invocation, so a model is always evaluated
on inputs made the way it was trained. Only the experiment's hold-out subjects are used, and the leakage guard
refuses any that trained or validated the model (including autoencoder extra data).

Outputs in ``runs/<exp>/test/``: ``metrics.json``, ``predictions.csv`` (and ``predictions_fold-k.csv``),
``roc.png``, ``confusion_matrix.png``, ``cams/`` (see :mod:`octa3d.explain`) and ``tensorboard/``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d import engine
from octa3d.config import Config, from_dict
from octa3d.engine import CheckpointError, Precision
from octa3d.errors import ConfigError, DataError
from octa3d.metrics import CI_METRICS, bootstrap_ci, evaluation_metrics  # noqa: F401  (re-exported)
from octa3d.utils import dist
from octa3d.utils.io import atomic_write_csv, atomic_write_text
from octa3d.utils.runs import stage_dir

log = logging.getLogger("octa3d.test")

STAGE = "test"


def _json_safe(obj: Any) -> Any:
    """NaN → null (strict JSON), NumPy scalars → Python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ------------------------------------------------------------------------------------------------ checkpoints
def _fold_number(path: Path) -> int:
    m = re.search(r"fold-(\d+)", path.as_posix())
    return int(m.group(1)) if m else -1


def find_checkpoints(cfg: Config) -> list[tuple[str, Path]]:
    """The classifier checkpoint(s) to evaluate: ``--checkpoint``, else ``train/checkpoints/best.pt``, else every
    ``train/fold-k/checkpoints/best.pt`` (an ensemble).

    Returns:
        ``[(name, path)]``; names are ``"checkpoint"``, ``"best"`` or ``"fold-k"``.

    Raises:
        CheckpointError: nothing to evaluate, or a fold without its best.pt (names the paths and the fix).
    """
    if cfg.eval.checkpoint:
        p = Path(cfg.eval.checkpoint)
        if not p.is_file():
            raise CheckpointError(f"--checkpoint {p}: file not found")
        return [("checkpoint", p)]
    train = cfg.run_dir / "train"
    single = train / "checkpoints" / "best.pt"
    if single.is_file():
        return [("best", single)]
    folds = sorted((d for d in train.glob("fold-*") if d.is_dir()), key=_fold_number)
    if folds:
        missing = [str(d / "checkpoints" / "best.pt") for d in folds if not (d / "checkpoints" / "best.pt").is_file()]
        if missing:
            raise CheckpointError(f"fold checkpoint(s) missing: {', '.join(missing)}; finish --mode train for "
                                  f"experiment '{cfg.exp_name}' (or pass --checkpoint FILE to test one model)")
        return [(d.name, d / "checkpoints" / "best.pt") for d in folds]
    raise CheckpointError(f"no trained model for experiment '{cfg.exp_name}': {single} does not exist (nor "
                          f"{train}/fold-k/checkpoints/best.pt). Run --mode train with the same --exp/--runs-dir "
                          f"first, or pass --checkpoint FILE")


def _saved_config(doc: dict[str, Any]) -> Config:
    """A checkpoint's saved config; keys this octa3d version does not know (other version) are dropped."""
    from octa3d.config import section_fields

    try:
        return from_dict(doc)
    except ConfigError as exc:
        known = {f.name for _, f, _ in section_fields()}
        log.warning("the checkpoint's saved configuration has settings this version does not know (%s); "
                    "ignoring them", exc)
        return from_dict({sec: {k: v for k, v in vals.items() if k in known}
                          for sec, vals in doc.items() if isinstance(vals, dict)})


def checkpoint_config(cfg: Config, ckpt: dict[str, Any], argv: Sequence[str] | None = None,
                      keep_augment: bool = False) -> Config:
    """The configuration a checkpoint is evaluated (or fine-tuned) under.

    Data, label and preprocessing settings come from the checkpoint (its saved config, overridden by its model
    record: model, dim, modality, input size, preprocessing), so inputs are made exactly as in training. Where
    things are and how this invocation runs (run section, data root, cache folder, test/CAM options) come from
    ``cfg``; the data root is the checkpoint's when this invocation left ``--data-root`` at its default.

    Args:
        cfg: this invocation's configuration.
        ckpt: a loaded classifier checkpoint.
        argv: this invocation's arguments (to tell an explicit ``--data-root ./data`` from the default).
        keep_augment: keep the checkpoint's training augmentation (fine-tuning); off for evaluation.
    """
    ecfg = _saved_config(ckpt["config"]) if isinstance(ckpt.get("config"), dict) else copy.deepcopy(cfg)
    split_seed = ecfg.run.seed
    ecfg.run = copy.deepcopy(cfg.run)
    ecfg.run.exp = cfg.exp_name
    ecfg.run.seed = split_seed  # the split check compares it; the bootstrap uses cfg.run.seed
    ecfg.eval = copy.deepcopy(cfg.eval)
    default_root = Config().data.data_root
    explicit_root = cfg.data.data_root != default_root or any(a.startswith("--data-root") for a in argv or [])
    if explicit_root or not isinstance(ckpt.get("config"), dict):
        ecfg.data.data_root = cfg.data.data_root
    elif ecfg.data.data_root != cfg.data.data_root:
        log.info("Using the checkpoint's data root %s (pass --data-root to use another)", ecfg.data.data_root)
    if cfg.data.labels:
        ecfg.data.labels = cfg.data.labels
    ecfg.preprocess.cache_dir = cfg.preprocess.cache_dir
    if ecfg.preprocess.cache_dir is None:
        ecfg.preprocess.cache_dir = str(cfg.cache_dir)
    ecfg.model.model, ecfg.model.dim = ckpt["model_name"], ckpt["dim"]
    ecfg.data.modality = ckpt.get("modality", ecfg.data.modality)
    ecfg.data.task = ckpt.get("task", ecfg.data.task)
    for key, value in (ckpt.get("preprocess") or {}).items():
        if key != "cache_dir" and hasattr(ecfg.preprocess, key):
            setattr(ecfg.preprocess, key, copy.deepcopy(value))
    ecfg.preprocess.input_size = [int(s) for s in ckpt["input_shape"]]
    ecfg.preprocess.augment = ecfg.preprocess.augment and keep_augment
    return ecfg


def build_classifier(ckpt: dict[str, Any], path: Path | str, device: torch.device) -> torch.nn.Module:
    """Rebuild a classifier from its checkpoint record and weights (eval mode, on ``device``).

    Raises:
        CheckpointError: the weights do not fit the recorded architecture.
    """
    from octa3d.model import create_model, get_spec

    kw = {"input_size": tuple(ckpt["input_shape"])} if getattr(get_spec(ckpt["model_name"]), "needs_input_size",
                                                               False) else {}
    model = create_model(ckpt["model_name"], ckpt["dim"], ckpt["in_channels"], ckpt["num_classes"], **kw)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {ckpt['model_name']} ({str(exc)[:200]}); the "
                              f"checkpoint is from another octa3d version or was edited") from exc
    return model.to(device).eval()


def load_models(paths: list[tuple[str, Path]], device: torch.device | str = "cpu"
                ) -> tuple[list[tuple[str, Path, dict[str, Any], torch.nn.Module]], dict[str, Any]]:
    """Load every model (octa3d checkpoints, or ``--mode compress`` files: int8 TorchScript, ONNX); check that
    they agree on classes, model and preprocessing (an ensemble needs that).

    Returns:
        ``[(name, path, record, model)]`` and the first record (the reference). Records are checkpoint-like (see
        :func:`octa3d.compress.load_any_model`) with ``is_quantized`` added.
    """
    from octa3d.compress import load_any_model

    out = []
    ref: dict[str, Any] | None = None
    for name, path in paths:
        model, rec, is_q = load_any_model(path, device)
        rec["is_quantized"] = is_q
        if ref is None:
            ref = rec
        else:
            for key in ("class_names", "model_name", "dim", "in_channels", "input_shape", "modality", "preprocess"):
                if rec.get(key) != ref.get(key):
                    raise CheckpointError(f"{path}: {key} {rec.get(key)!r} differs from {paths[0][1]} "
                                          f"({ref.get(key)!r}); fold checkpoints of one ensemble must match")
        out.append((name, Path(path), rec, model))
    assert ref is not None
    return out, ref


def place_models(models: list[tuple[str, Path, dict[str, Any], torch.nn.Module]], device: torch.device
                 ) -> torch.device:
    """Move float models to ``device``; int8 TorchScript and ONNX models run on the CPU, and so does the whole
    evaluation when one is in the set. Returns the device inputs go to."""
    if any(rec["device"] == "cpu" and not rec["cam_capable"] for _, _, rec, _ in models):
        if device.type != "cpu":
            log.info("evaluating on the CPU: %s runs on the CPU only", models[0][1].name)
        return torch.device("cpu")
    for _, _, _, model in models:
        model.to(device)
    return device


def cam_backend(cfg: Config, models: list[tuple[str, Path, dict[str, Any], torch.nn.Module]],
                argv: Sequence[str] | None) -> str:
    """The CAM backend to run: ``--cam``, or ``none`` when a model cannot give class activation maps (int8, ONNX).

    Raises:
        ConfigError: CAM options were given explicitly for a model without float gradients (names the float model).
    """
    if cfg.eval.cam == "none":
        return "none"
    for _, path, rec, _ in models:
        if rec.get("cam_capable") and not rec.get("is_quantized"):
            continue
        if any(a.startswith("--cam") for a in argv or []):
            from octa3d.compress import check_cam_capable

            check_cam_capable(path, rec, rec["is_quantized"])
        log.warning("no class activation maps: %s is a %s model without float gradients (predictions and metrics "
                    "only; explain %s for maps)", path, "int8" if rec["is_quantized"] else rec["artifact_format"],
                    path.parent / "pruned.pt" if (path.parent / "pruned.pt").is_file() else "the float checkpoint")
        return "none"
    return cfg.eval.cam


# ------------------------------------------------------------------------------------------------ guard
def _ae_extra_subjects(cfg: Config) -> dict[str, str]:
    """Subject → group of the autoencoder's ``--ae-extra-data`` (from ae_pretrain/config.yaml), if any."""
    import yaml

    roots = set()
    for f in (cfg.run_dir / "ae_pretrain" / "config.yaml",):
        if f.is_file():
            try:
                roots.add(from_dict(yaml.safe_load(f.read_text(encoding="utf-8"))).train.ae_extra_data)
            except Exception as exc:  # noqa: BLE001 - an unreadable record must not hide the real error
                log.warning("cannot read %s (%s): autoencoder extra data not checked", f, exc)
    roots.add(cfg.train.ae_extra_data)
    out: dict[str, str] = {}
    for root in sorted(r for r in roots if r):
        from octa3d.data.sources import discover

        extra = copy.deepcopy(cfg.data)
        extra.data_root, extra.labels, extra.source = root, None, "auto"
        try:
            subs = discover(extra, cfg.model.dim, require_labels=False)
        except DataError as exc:
            log.warning("autoencoder extra data %s cannot be listed (%s); its overlap with the test set is not "
                        "checked", root, exc)
            continue
        out.update({s.id: s.group for s in subs})
    return out


def guard_test_set(cfg: Config, test_ids: list[str], splits: Any) -> None:
    """Refuse test subjects that trained/validated the model or pretrained its encoder (LeakageError)."""
    from octa3d.data.splits import guard

    extra = _ae_extra_subjects(cfg)
    if extra:
        splits = copy.copy(splits)
        splits.train = list(splits.train) + sorted(extra)
        splits.groups = {**splits.groups, **extra}
    guard(STAGE, test_ids, splits)


# ------------------------------------------------------------------------------------------------ run
def _predict_all(models: list[tuple[str, Path, dict, torch.nn.Module]], loader: Any, precision: Precision
                 ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Subject-level probabilities per model, aligned on the first model's subject order."""
    from octa3d.train import predict

    ids: list[str] = []
    y = np.zeros(0, int)
    per: dict[str, np.ndarray] = {}
    for name, _, _, model in models:
        sids, labels, probs, _ = predict(model, loader, precision)
        if not ids:
            ids, y = list(sids), np.asarray(labels)
        order = {s: i for i, s in enumerate(sids)}
        per[name] = np.asarray(probs)[[order[s] for s in ids]]
    return ids, y, per


def _predictions_frame(ids: list[str], y: np.ndarray, probs: np.ndarray, names: list[str]) -> Any:
    import pandas as pd

    cols: dict[str, Any] = {"subject": ids, "label": [names[i] for i in y]}
    for c, n in enumerate(names):
        cols[f"p_{n}"] = np.round(probs[:, c], 6)
    cols["prediction"] = [names[i] for i in probs.argmax(axis=1)]
    cols["correct"] = probs.argmax(axis=1) == y
    return pd.DataFrame(cols)


def _fmt(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    ci = m.get("ci95", {}).get(key)
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(math.isfinite(c) for c in ci) else "")


def summary_lines(m: dict[str, Any]) -> list[str]:
    """Headline metrics (with 95 % CIs) as printable lines."""
    keys = ["balanced_accuracy", "auc", "accuracy", "f1_macro", "kappa"]
    if "sensitivity" in m:
        keys += ["sensitivity", "specificity"]
    return [f"  {k.replace('_', ' '):<18} {_fmt(m, k)}" for k in keys]


def run(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate the experiment's classifier on its hold-out subjects; write ``runs/<exp>/test/``.

    Returns:
        The metrics dictionary written to ``metrics.json``.
    """
    from octa3d.data.datasets import DataHandler
    from octa3d.plots import confusion_figure, roc_figure, save_figure

    ckpt_paths = find_checkpoints(cfg)
    if not (cfg.run_dir / "splits" / "split.json").is_file():
        raise DataError(f"experiment '{cfg.exp_name}' has no splits ({cfg.run_dir / 'splits'}): the test stage "
                        f"only evaluates an experiment's hold-out subjects; run --mode prepare and --mode train "
                        f"first (same --exp/--runs-dir), or predict single scans with --mode explain --input PATH")
    models, ref = load_models(ckpt_paths)
    ecfg = checkpoint_config(cfg, ref, argv)
    ecfg.eval.cam = cam_backend(cfg, models, argv)
    ctx = engine.setup_stage(ecfg, argv)
    device = place_models(models, ctx.device)
    sp = ctx.splits
    names = list(sp.class_names)
    if list(ref["class_names"]) != names:
        raise ConfigError(f"{ckpt_paths[0][1]} predicts classes {ref['class_names']} but experiment "
                          f"'{cfg.exp_name}' has classes {names}; test it in its own experiment (--exp)")
    test_ids = list(sp.test)
    if not test_ids:
        raise DataError(f"experiment '{cfg.exp_name}' has no hold-out test subjects ({cfg.run_dir / 'splits'})")
    guard_test_set(ecfg, test_ids, sp)
    wanted = set(cfg.eval.cam_subjects or test_ids)
    unknown = sorted(wanted - set(test_ids))
    if unknown and ecfg.eval.cam != "none":
        raise ConfigError(f"--cam-subjects {', '.join(unknown)}: not hold-out test subjects of experiment "
                          f"'{cfg.exp_name}' (test subjects: {', '.join(test_ids[:10])}"
                          f"{' …' if len(test_ids) > 10 else ''})")
    out = stage_dir(ecfg, STAGE, argv) if dist.is_main() else ecfg.run_dir / STAGE
    subjects = ctx.pick(test_ids)
    handler = DataHandler(ecfg, ctx.label_map)
    handler.warm(subjects)
    loader = handler.loader(subjects, train=False, batch_size=ecfg.train.batch_size)
    precision = Precision.for_device(device, ecfg.train.amp)
    log.info("test: %d hold-out subjects, %d model(s) (%s), classes %s", len(test_ids), len(models),
             ", ".join(n for n, *_ in models), names)
    ids, y, per_model = _predict_all(models, loader, precision)
    probs = np.mean([per_model[n] for n, *_ in models], axis=0)
    seed, n_boot = cfg.run.seed, cfg.eval.bootstrap

    metrics = evaluation_metrics(y, probs, names)
    metrics["ci95"] = bootstrap_ci(y, probs, n_boot, seed)
    metrics.update({"class_names": names, "positive_class": names[1] if len(names) == 2 else None,
                    "bootstrap": {"resamples": n_boot, "seed": seed, "method": "percentile", "level": 0.95,
                                  "unit": "subject"},
                    "model": ref["model_name"], "dim": ref["dim"], "input_shape": ref["input_shape"],
                    "modality": ref["modality"], "checkpoints": {n: str(p) for n, p, *_ in models},
                    "model_format": "int8" if ref["is_quantized"] else ref["artifact_format"],
                    "ensemble": len(models) > 1})
    if len(models) > 1:
        metrics["folds"] = {}
        for n, *_ in models:
            fm = evaluation_metrics(y, per_model[n], names)
            fm["ci95"] = bootstrap_ci(y, per_model[n], n_boot, seed)
            metrics["folds"][n] = fm

    tb = engine.tensorboard_writer(out / "tensorboard")
    if dist.is_main():
        atomic_write_csv(out / "predictions.csv", _predictions_frame(ids, y, probs, names))
        if len(models) > 1:
            for n, *_ in models:
                atomic_write_csv(out / f"predictions_{n}.csv", _predictions_frame(ids, y, per_model[n], names))
        save_figure(roc_figure(y, probs, names, metrics["auc"]), out / "roc.png")
        save_figure(confusion_figure(np.asarray(metrics["confusion_matrix"]), names), out / "confusion_matrix.png")
        tb.add_figure("test/roc", roc_figure(y, probs, names, metrics["auc"]), 0)
        tb.add_figure("test/confusion_matrix", confusion_figure(np.asarray(metrics["confusion_matrix"]), names), 0)
        for k in CI_METRICS:
            if k in metrics and metrics[k] is not None and math.isfinite(metrics[k]):
                tb.add_scalar(f"test/{k}", metrics[k], 0)
                ci = metrics["ci95"].get(k)
                if ci and all(math.isfinite(c) for c in ci):
                    tb.add_scalar(f"test/{k}_ci_low", ci[0], 0)
                    tb.add_scalar(f"test/{k}_ci_high", ci[1], 0)

    if ecfg.eval.cam != "none" and dist.is_main():
        from octa3d.explain import CamExporter, cam_items_from_cache

        by_id = {s: i for i, s in enumerate(ids)}
        cam_subs = [s for s in subjects if s.id in wanted]
        items = cam_items_from_cache(handler, cam_subs, {s.id: probs[by_id[s.id]] for s in cam_subs},
                                     {s.id: int(y[by_id[s.id]]) for s in cam_subs})
        exporter = CamExporter(ecfg, [m for *_, m in models], names, out / "cams", handler.preset, tb=tb,
                               device=device)
        cam_report = exporter.export(items)
        metrics["cam"] = cam_report["cam"]
        if cam_report.get("localization"):
            metrics["localization"] = cam_report["localization"]
    tb.close()
    if dist.is_main():
        atomic_write_text(out / "metrics.json", json.dumps(_json_safe(metrics), indent=2) + "\n")
        print_summary(cfg, metrics, out, len(test_ids))
    return metrics


def print_summary(cfg: Config, m: dict[str, Any], out: Path, n: int) -> None:
    """The CLI summary: headline metrics with CIs, localization, and where the files are."""
    ens = f"ensemble of {len(m['checkpoints'])} folds" if m.get("ensemble") else next(iter(m["checkpoints"].values()))
    lines = [f"Hold-out test of experiment '{cfg.exp_name}': {n} subjects, classes {', '.join(m['class_names'])}"
             + (f" (positive: {m['positive_class']})" if m.get("positive_class") else "")
             + f"; model {m['model']} ({ens})",
             f"metric (95 % bootstrap CI, {m['bootstrap']['resamples']} resamples, seed {m['bootstrap']['seed']}):"]
    lines += summary_lines(m)
    for name, fm in (m.get("folds") or {}).items():
        lines.append(f"  {name}: balanced accuracy {_fmt(fm, 'balanced_accuracy')}, AUC {_fmt(fm, 'auc')}")
    loc = m.get("localization")
    if loc:
        for cls, v in loc.get("per_class", {}).items():
            lines.append(f"  CAM localization {cls} ({v['n']} subjects with lesion masks): pointing game "
                         f"{v['pointing_game']:.2f}, CAM mass inside lesion {v['mass_inside']:.2f} (lesion "
                         f"volume fraction {v['lesion_fraction']:.3f} = chance level)")
    lines += [f"Files in {out}/: metrics.json, predictions.csv, roc.png, confusion_matrix.png"
              + (f", cams/ ({m['cam']['n_subjects']} subjects: *_cam.nii.gz, *_input.nii.gz, *_review.png)"
                 if m.get("cam") else ""),
              f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}"]
    print("\n".join(lines))
