"""``--mode train``: supervised binary / multi-class training on the experiment's train split.

Per fold (``--folds K`` → ``train/fold-k/``): class-weighted cross-entropy, AdamW with warm-up + cosine schedule,
validation every epoch (accuracy, balanced accuracy, ROC-AUC from probabilities, macro-F1; 2D patches aggregated
per subject), ``best.pt`` (weights) on ``--monitor``, ``last.pt`` (weights + optimiser/scheduler/RNG state for
``--resume``) every epoch, early stopping, history.csv, TensorBoard — the loop is :func:`octa3d.training.fit.fit`.
The encoder starts from this experiment's autoencoder (``--init ae``/``auto``) or ``--init-from`` weights (octa3d,
RETFound, OCTCube or MedicalNet layouts: :mod:`octa3d.model.weights`; the load report goes to the log and to
``init_report.json`` in the fold's folder). Model options (``--shortcut-type``, ``--drop-path``) and what the
``--init-from`` file requires (ViT patch size, qkv bias ...) are recorded in the checkpoint as ``model_kwargs``.
Validation scores are reported for every fold (mean ± sd); nothing is retrained until a score is reached and no
fold is picked on test data. At the end of each fold a temperature is fitted on that fold's validation predictions
of ``best.pt`` (:func:`octa3d.evaluation.calibration.fit_temperature`; never on test subjects) and stored in
``best.pt`` as
``temperature``, which the test stage applies by default.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octa3d.checkpoint.io import load_checkpoint, model_record
from octa3d.config import Config
from octa3d.data.datasets import DataHandler
from octa3d.data.leakage import guard
from octa3d.errors import ConfigError, DataError
from octa3d.evaluation import forward
from octa3d.evaluation.calibration import (UNCERTAIN_COVERAGE, apply_temperature, entropy, entropy_threshold,
                                           expected_calibration_error, fit_temperature)
from octa3d.evaluation.figures import confusion_figure
from octa3d.evaluation.metrics import HIGHER_IS_BETTER, classification_metrics, confusion
from octa3d.evaluation.outputs import write_predictions
from octa3d.evaluation.ood import build_reference, profile_set
from octa3d.model import (create_model, freeze_encoder_stages, get_spec, init_model_kwargs, load_init_weights,
                          model_options, read_init_file, set_encoder_trainable, transfer_encoder)
from octa3d.model.weights import InitFile
from octa3d.stages.context import StageContext, setup_stage
from octa3d.training.epoch import StopTraining
from octa3d.training.fit import FitSpec, fit, config_to_resume
from octa3d.training.fitcheck import assess_fit, fit_messages
from octa3d.training.optim import build_loss, chance_loss, class_weights
from octa3d.training.precision import Precision, memory_format, wrap
from octa3d.utils import dist
from octa3d.utils.io import atomic_torch_save, atomic_write_json
from octa3d.utils.runs import plan_stage, releases_locks, shared_stage_dir
from octa3d.utils.tracking import (next_command, rerun_command, slice_grid, tensorboard_writer)

log = logging.getLogger("octa3d.train")

STAGE = "train"
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "auc", "f1_macro")


def _init_file(path: str, fmt: str) -> InitFile:
    """The ``--init-from`` file, read once for all folds (the cache is keyed by the file's size and time stamp and
    cleared at the end of :func:`run`)."""
    try:
        st = Path(path).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None  # read_init_file names the missing file
    return _read_init_file(path, fmt, stamp)


@functools.lru_cache(maxsize=1)
def _read_init_file(path: str, fmt: str, stamp: Any) -> InitFile:
    return read_init_file(path, fmt)


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Factory keywords of this run's classifier: the model options and what the ``--init-from`` file needs.

    Raises:
        ConfigError: an option the model does not take, or one that contradicts the ``--init-from`` file.
    """
    kw = model_options(cfg.model.model, dataclasses.asdict(cfg.model), cfg.is_explicit)
    if cfg.train.init_from:
        explicit = {"shortcut_type": cfg.model.shortcut_type} if cfg.is_explicit("shortcut_type") else {}
        kw.update(init_model_kwargs(_init_file(str(cfg.train.init_from), cfg.train.init_format), cfg.model.model,
                                    cfg.spatial_dims, explicit))
    return kw


def initialise(model: torch.nn.Module, cfg: Config, fold_suffix: str, out: Path | None = None) -> str:
    """Apply ``--init-from`` and ``--init`` to a fresh classifier; returns a description of the start point.

    The ``--init-from`` load report is written to ``out/init_report.json`` (when ``out`` is given).
    """
    desc = "random"
    if cfg.train.init_from:
        report = load_init_weights(model, _init_file(str(cfg.train.init_from), cfg.train.init_format),
                                   model_name=cfg.model.model, strict=cfg.train.init_strict)
        if out is not None and dist.is_main():
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "init_report.json", report.to_dict())
        desc = (f"--init-from {cfg.train.init_from} ({report.format}, {report.encoder_loaded}/{report.encoder_total} "
                "encoder tensors)")
    ae_ckpt = cfg.run_dir / "ae_pretrain" / fold_suffix / "checkpoints" / "best.pt"
    if cfg.train.init == "ae" or (cfg.train.init == "auto" and ae_ckpt.exists()):
        if not ae_ckpt.exists():
            raise ConfigError(f"--init ae: no autoencoder checkpoint at {ae_ckpt}; run --mode ae_pretrain first "
                              f"(same --exp) or use --init random")
        ckpt = load_checkpoint(ae_ckpt, kind="autoencoder")
        if (ckpt["model_name"], ckpt["dim"], ckpt["in_channels"]) != (cfg.model.model, cfg.model.dim,
                                                                       cfg.in_channels):
            raise ConfigError(f"{ae_ckpt} was pretrained for --model {ckpt['model_name']} --dim {ckpt['dim']} with "
                              f"{ckpt['in_channels']} channel(s); this run is --model {cfg.model.model} --dim "
                              f"{cfg.model.dim} with {cfg.in_channels}. Use the same settings or --init random")
        report = transfer_encoder(ckpt["encoder_state_dict"], model, cfg.model.model)
        log.info("Encoder initialised from %s: %d tensors copied, %d not copied (head: %s)", ae_ckpt,
                 len(report.copied), len(report.not_copied), ", ".join(report.not_copied[:6]))
        desc = f"ae ({ae_ckpt}, {len(report.copied)} tensors)"
    return desc


class FreezeSchedule:
    """``--freeze-encoder`` / ``--freeze-epochs`` / ``--freeze-encoder-stages``: which parameters train each epoch.

    DDP registers the trainable parameters at construction, so the wrapped network is rebuilt whenever the set
    changes. Every parameter stays in the optimiser (frozen ones get no gradient), so the schedule and
    ``--resume`` never change the optimiser's layout.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        self.encoder_modules, _ = get_spec(cfg.model.model).split(model)
        self.frozen: bool | None = None
        self.net: torch.nn.Module = model

    def __call__(self, epoch: int) -> torch.nn.Module:
        cfg = self.cfg
        frozen = cfg.train.freeze_encoder or epoch < cfg.train.freeze_epochs
        set_encoder_trainable(self.model, cfg.model.model, not frozen)
        if not frozen and cfg.train.freeze_encoder_stages:
            freeze_encoder_stages(self.model, cfg.model.model, cfg.train.freeze_encoder_stages)
        if frozen != self.frozen:
            self.net = wrap(self.model, cfg, self.device)
            if self.frozen is not None:
                log.info("epoch %d: encoder unfrozen, training the whole network", epoch + 1)
            self.frozen = frozen
        self.net.train()
        if frozen:
            self.encoder_modules.eval()  # linear probe: frozen BatchNorm statistics stay as pretrained
        return self.net


def _validator(val_loader: Any, precision: Precision, loss_fn: Any, names: list[str], cfg: Config,
               first_epoch: list[int]) -> tuple[Any, Any]:
    """``validate(net)`` and ``epoch_end(...)`` callbacks of :func:`engine.fit` for a classifier."""
    last: dict[str, Any] = {}

    def validate(net: torch.nn.Module) -> dict[str, float]:
        _, y, p, val_loss = forward.predict(net, val_loader, precision, loss_fn)
        last.update(y=y, p=p)
        return {**classification_metrics(y, p), "val_loss": val_loss}

    def epoch_end(epoch: int, metrics: dict[str, float], x: torch.Tensor | None, tb: Any) -> None:
        tb.add_scalar("loss/val", metrics["val_loss"], epoch + 1)
        for k in SUMMARY_KEYS:
            tb.add_scalar(f"val/{k}", metrics[k], epoch + 1)
        if dist.is_main():
            tb.add_figure("val/confusion_matrix", confusion_figure(confusion(last["y"], last["p"]), names,
                                                                   "Confusion matrix (validation)"), epoch + 1)
            if epoch == first_epoch[0] and x is not None:
                tb.add_image("inputs/train", slice_grid(x), epoch + 1)

    return validate, epoch_end


def _log_line(row: dict[str, Any]) -> str:
    return (f"loss {row['train_loss']:.4f}/{row['val_loss']:.4f}  bal.acc {row['balanced_accuracy']:.3f}  "
            f"auc {row['auc']:.3f}  f1 {row['f1_macro']:.3f}")


def train_fold(cfg: Config, ctx: StageContext, out: Path, fold: int) -> dict[str, Any]:
    """Train one classifier on fold ``fold`` (or resume it); returns the best validation metrics."""
    sp = ctx.splits
    tr_ids, va_ids = sp.fold(fold)
    guard(STAGE, tr_ids + va_ids, sp)
    if not va_ids:
        raise ConfigError("--mode train needs validation subjects (--val-fraction > 0 or --folds > 1)")
    names = list(sp.class_names)
    weights = class_weights([sp.labels[i] for i in tr_ids], len(names)).to(ctx.device)
    handler = DataHandler(cfg, ctx.label_map)
    train_subs, val_subs = ctx.pick(tr_ids), ctx.pick(va_ids)
    handler.warm(train_subs + val_subs)
    train_loader = handler.loader(train_subs, train=True, batch_size=cfg.train.batch_size)
    val_loader = handler.loader(val_subs, train=False, batch_size=cfg.train.batch_size)

    last = out / "checkpoints" / "last.pt"
    resuming = cfg.train.resume and last.exists()
    # a resumed run rebuilds the recorded model (the --init-from file may be gone); a new one asks the file
    kwargs = (load_checkpoint(last, kind="classifier").get("model_kwargs") or {}) if resuming else model_kwargs(cfg)
    model = create_model(cfg.model.model, cfg.model.dim, cfg.in_channels, len(names), input_size=cfg.input_shape,
                         **kwargs)
    start = "resume" if resuming else initialise(model, cfg, f"fold-{fold}" if sp.n_folds > 1 else "", out)
    model.to(ctx.device, memory_format=memory_format(cfg))
    precision = Precision.for_device(ctx.device, cfg.train.amp)
    first_epoch = [0]
    validate, epoch_end = _validator(val_loader, precision, build_loss(cfg, weights, reduction="none"), names, cfg,
                                     first_epoch)
    schedule = FreezeSchedule(model, cfg, ctx.device)

    def prepare_epoch(epoch: int) -> torch.nn.Module:
        if schedule.frozen is None:
            first_epoch[0] = epoch
        return schedule(epoch)

    monitor = cfg.train.monitor
    loss_fn = build_loss(cfg, weights)
    chance = chance_loss(loss_fn, [sp.labels[i] for i in tr_ids], len(names))
    spec = FitSpec(model=model, loss_fn=loss_fn, validate=validate, monitor=monitor, chance_loss=chance,
                          mode="max" if HIGHER_IS_BETTER[monitor] else "min",
                          record={**model_record(cfg, names, "classifier"), "model_kwargs": kwargs},
                          prepare_epoch=prepare_epoch,
                          epoch_end=epoch_end, log_line=_log_line,
                          row_extra=lambda: {"encoder_frozen": bool(schedule.frozen)})
    log.info("train %s fold %d: %d train / %d val subjects, classes %s, start: %s", cfg.model.model, fold,
             len(tr_ids), len(va_ids), names, start)
    result = fit(spec, cfg, train_loader, out, ctx.device, name=f"fold {fold}")
    _hparams(out, cfg, start, result.best)
    best = dict(result.best)
    # the out-of-distribution reference sees the training eyes as the model will see new ones: no augmentation
    train_eval = handler.loader(train_subs, train=False, batch_size=cfg.train.batch_size)
    best.update(calibrate_checkpoint(out / "checkpoints" / "best.pt", model, val_loader, precision, va_ids, sp.test,
                                     names, reference=(train_eval, handler.record, cfg)))
    best["fit"] = assess_fit(result.history, chance, result.best, best["temperature"], result.stopped_early)
    info, warnings = fit_messages(best["fit"], f"fold {fold}", cfg.train.lr)
    log.info("Fit check, %s", info)
    for w in warnings:
        log.warning(w)
    return best


def calibrate_checkpoint(path: Path, model: torch.nn.Module, val_loader: Any, precision: Precision,
                         val_ids: list[str], test_ids: list[str], names: list[str] | None = None,
                         reference: tuple[Any, Any, Config] | None = None) -> dict[str, float]:
    """Fit the temperature of ``path`` (a fold's ``best.pt``) on its validation subjects and store it there, with
    the out-of-distribution reference of the model (:func:`octa3d.evaluation.ood.build_reference`).

    With ``names`` the fold's validation predictions of ``best.pt`` are also written beside its ``checkpoints/``
    folder as ``val_predictions.csv`` (calibrated ``p_<class>`` and raw ``p_raw_<class>`` columns): with k folds
    these are the out-of-fold predictions a study (:mod:`octa3d.studies`) pools and compares. The calibrated
    columns use the temperature fitted on these very subjects; accuracy, AUC and F1 are the same either way
    (temperature scaling keeps the order of the classes), calibration scores are read from the raw ones.

    Args:
        path: the fold's best checkpoint; its weights are loaded into ``model`` (the fold's network).
        val_loader: the fold's validation loader (the only data the temperature sees).
        val_ids: the fold's validation subject IDs; test_ids: the experiment's hold-out subjects.
        names: the class names (writes ``val_predictions.csv``), or None.
        reference: ``(training subjects' loader without augmentation, subject ID -> PreprocessRecord, cfg)``: the
            reference is fitted on the training subjects and its thresholds' scores come from the validation
            subjects (features of the temperature's own forward pass) and cross-fitting; None: no reference.

    Returns:
        ``temperature``, the validation ECE before/after (``val_ece_raw``, ``val_ece_calibrated``), and the
        entropy threshold of the ``uncertain`` flag (``entropy_threshold`` on the calibrated, ``..._raw`` on the
        raw probabilities; :data:`UNCERTAIN_COVERAGE` of the validation eyes lie at or below it). All but the ECEs
        are stored in the checkpoint (and ``ood_reference``).

    Raises:
        DataError: a validation subject is a hold-out test subject (the temperature would see test data).
    """
    leaked = sorted(set(val_ids) & set(test_ids))
    if leaked:
        raise DataError(f"temperature scaling refused: validation subjects {', '.join(leaked[:5])} are hold-out test "
                        f"subjects; re-run --mode prepare for this experiment")
    ckpt = load_checkpoint(path, kind="classifier")
    model.load_state_dict(ckpt["state_dict"])
    val_features: dict[str, np.ndarray] = {}
    ids, y, probs, _ = forward.predict(model, val_loader, precision, features=val_features)
    if set(ids) & set(test_ids):  # what was actually predicted, not only what was asked for
        raise DataError(f"temperature scaling refused: the validation loader of {path} holds test subjects")
    t = fit_temperature(y, probs)
    cal = apply_temperature(probs, t)
    report = {"temperature": t, "val_ece_raw": expected_calibration_error(y, probs),
              "val_ece_calibrated": expected_calibration_error(y, cal),
              # the `uncertain` flag of the test stage: entropy above what (1 - coverage) of validation eyes reach
              "entropy_threshold": entropy_threshold(entropy(cal), UNCERTAIN_COVERAGE),
              "entropy_threshold_raw": entropy_threshold(entropy(probs), UNCERTAIN_COVERAGE),
              "uncertainty_coverage": UNCERTAIN_COVERAGE}
    log.info("temperature %.3f fitted on %d validation subjects (validation ECE %.3f -> %.3f), entropy threshold "
             "%.3f (%.0f %% of them unflagged); stored in %s", t, len(ids), report["val_ece_raw"],
             report["val_ece_calibrated"], report["entropy_threshold"], 100 * UNCERTAIN_COVERAGE, path)
    if reference is not None:
        ckpt["ood_reference"] = _ood_reference(model, precision, reference, (ids, y, val_features))
    if dist.is_main():
        ckpt.update(report)
        for k in ("val_ece_raw", "val_ece_calibrated"):
            ckpt.pop(k)
        atomic_torch_save(ckpt, path)
        if names is not None:
            write_predictions(path.parent.parent, ids, np.asarray(y), cal, names, raw=probs,
                              name="val_predictions.csv")
    return report


def _ood_reference(model: torch.nn.Module, precision: Precision, reference: tuple[Any, Any, Config],
                   val: tuple[list[str], np.ndarray, dict[str, np.ndarray]]) -> dict[str, Any]:
    """The checkpoint's ``ood_reference``: one more forward pass, over the training subjects, then the fits."""
    loader, record_of, cfg = reference
    t0 = time.perf_counter()
    feats: dict[str, np.ndarray] = {}
    tr_ids, tr_y, _, _ = forward.predict(model, loader, precision, features=feats)
    ref = build_reference(profile_set(tr_ids, tr_y, feats, record_of), profile_set(*val, record_of),
                          cfg.data.modality.split("+"), cfg.preprocess.clip_percentiles, seed=cfg.run.seed)
    log.info("out-of-distribution reference: %d training + %d validation subjects (geometry, intensity%s) in "
             "%.1f s", len(tr_ids), len(val[0]), ", features" if "features" in ref else "", time.perf_counter() - t0)
    return ref


def _hparams(out: Path, cfg: Config, start: str, best: dict[str, Any]) -> None:
    """The run's hyper-parameters and best validation scores in TensorBoard's HPARAMS tab."""
    tb = tensorboard_writer(out / "tensorboard")
    tb.add_hparams({"model": cfg.model.model, "dim": cfg.model.dim, "lr": cfg.train.lr,
                    "batch_size": cfg.train.batch_size, "init": start.split(" ")[0]},
                   {f"hparam/{k}": v for k, v in best.items() if isinstance(v, float)})
    tb.close()


def summary_line(summary: dict[str, Any], n_folds: int) -> str:
    """Best validation scores: the value for one split, mean ± sd over folds (an sd of one value is no spread),
    and the end-of-training fit check of every fold that did not fit."""
    if n_folds == 1:
        line = "Validation (best epoch): " + "  ".join(f"{k} {summary['mean'][k]:.3f}" for k in SUMMARY_KEYS)
    else:
        line = f"Validation (best epoch per fold, mean ± sd over {n_folds} folds): " + "  ".join(
            f"{k} {summary['mean'][k]:.3f}±{summary['sd'][k]:.3f}" for k in SUMMARY_KEYS)
    bad = {f: r["fit"]["verdict"] for f, r in summary.get("folds", {}).items()
           if r.get("fit", {}).get("verdict", "fit") != "fit"}
    if bad:
        line += ("\nFit check: " + ", ".join(f"{f} {v.replace('_', ' ')}" for f, v in bad.items())
                 + " (see the WARNING above; README 'Training recipe' says what to try)")
    return line


@releases_locks
def run(cfg: Config) -> dict[str, Any]:
    """Train the classifier on every fold of the experiment; writes ``train/summary.json``.

    ``--resume`` continues the recorded run with its own settings (:func:`octa3d.training.fit.config_to_resume`); the
    stage folder is planned (:func:`octa3d.utils.runs.plan_stage`) before anything is written, and finished
    earlier results are replaced only when this run has finished.
    """
    cfg = config_to_resume(cfg, STAGE)
    if not cfg.train.resume:
        model_kwargs(cfg)  # model options and the --init-from file checked before anything is written
    plan_stage(cfg, STAGE, training=True)  # RunExistsError before the experiment is touched
    ctx = setup_stage(cfg)
    sp = ctx.splits
    per_fold = {}
    with shared_stage_dir(cfg, STAGE, training=True) as folder:
        out = folder.path
        try:
            for k in range(sp.n_folds):
                fold_out = out / f"fold-{k}" if sp.n_folds > 1 else out
                per_fold[f"fold-{k}"] = train_fold(cfg, ctx, fold_out, k)
        except StopTraining as stop:
            print(f"Training {stop}; last.pt holds the last finished epoch. Continue with: "
                  f"{rerun_command(cfg, ['--resume'], drop=['--max-steps', '--overwrite'])}")
            _read_init_file.cache_clear()
            dist.cleanup()
            return {"stopped_at_step": stop.step, "folds": per_fold}
        summary = {"monitor": cfg.train.monitor, "folds": per_fold,
                   "mean": {k: float(np.nanmean([f[k] for f in per_fold.values()])) for k in SUMMARY_KEYS},
                   "sd": {k: float(np.nanstd([f[k] for f in per_fold.values()])) for k in SUMMARY_KEYS}}
        if dist.is_main():
            atomic_write_json(out / "summary.json", summary)
            out = folder.finish(cfg)
            print(summary_line(summary, sp.n_folds))
            print(f"Checkpoints and history in {out}. Next: {next_command(cfg, 'test')}")
    _read_init_file.cache_clear()  # the file's tensors are in the model by now
    dist.cleanup()
    return summary
