"""``--mode compress``: prune → fine-tune → QAT int8 → TorchScript/ONNX export → report, in ``<exp>/compress/``.

The source is the experiment's ``train/checkpoints/best.pt`` (or ``--checkpoint``). Data, label and preprocessing
settings come from that checkpoint, so inputs are made exactly as in training; training settings (loss,
optimiser, batch size, lr) too, unless given on this command line. Fine-tuning and QAT use the training split of
the checkpoint's fold, validation subjects are only monitored, and the hold-out test subjects are only evaluated
(both checked by :func:`octa3d.data.splits.guard`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import logging
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from octa3d import engine
from octa3d.compress import export, measure, pruning, quantize, report
from octa3d.config import Config, TrainConfig, to_dict
from octa3d.data.splits import guard
from octa3d.engine import CheckpointError, Precision
from octa3d.errors import ConfigError, DataError
from octa3d.metrics import classification_metrics
from octa3d.train import predict
from octa3d.utils.io import atomic_write_csv
from octa3d.utils.runs import stage_dir

log = logging.getLogger("octa3d.compress")

STAGE = "compress"
#: Fine-tuning and QAT learning rate = this x the training --lr (the network is already trained).
FINETUNE_LR_FACTOR = 0.1
#: Training volumes used to calibrate the onnxruntime int8 model.
CALIBRATION_SAMPLES = 32


# ------------------------------------------------------------------------------------------------ configuration
def source_checkpoint(cfg: Config) -> Path:
    """``--checkpoint`` or the experiment's ``train/checkpoints/best.pt``.

    Raises:
        CheckpointError: no trained model (names the missing file and the command that makes it).
    """
    if cfg.eval.checkpoint:
        p = Path(cfg.eval.checkpoint)
        if not p.is_file():
            raise CheckpointError(f"--checkpoint {p}: file not found")
        return p
    train = cfg.run_dir / "train"
    best = train / "checkpoints" / "best.pt"
    if best.is_file():
        return best
    folds = sorted(train.glob("fold-*/checkpoints/best.pt"))
    if folds:
        raise ConfigError(f"experiment '{cfg.exp_name}' was trained with k-fold cross-validation; compress one "
                          f"fold's model with --checkpoint (e.g. --checkpoint {folds[0]})")
    raise CheckpointError(f"no trained model to compress: {best} does not exist. Train it first: python main.py "
                          f"--mode train --exp {cfg.exp_name} --runs-dir {cfg.run.runs_dir} (with the experiment's "
                          f"--data-root/--model/--input-size), or pass --checkpoint FILE")


def _explicit_train_flags(argv: list[str] | None) -> set[str]:
    """Training fields set on the command line (or its --config YAML): they override the checkpoint's."""
    if not argv:
        return set()
    from octa3d.cli import build_parser
    from octa3d.config import load_yaml

    ns = build_parser().parse_args(argv)
    keys = {k for k in vars(ns) if k not in ("config", "list_models")}
    if ns.config:
        keys |= {k.replace("-", "_") for k in load_yaml(ns.config)}
    return keys & {f.name for f in dataclasses.fields(TrainConfig)}


def compress_config(cfg: Config, ckpt: dict[str, Any], argv: list[str] | None) -> Config:
    """The configuration the source checkpoint is compressed under: its data, preprocessing (augmentation kept for
    fine-tuning) and training settings, with this invocation's run, compress, data-root and cache settings and any
    training flag given explicitly."""
    from octa3d.test import checkpoint_config

    ecfg = checkpoint_config(cfg, ckpt, argv, keep_augment=True)
    ecfg.compress = copy.deepcopy(cfg.compress)
    for name in _explicit_train_flags(argv):
        setattr(ecfg.train, name, copy.deepcopy(getattr(cfg.train, name)))
    return ecfg


def _fold_of(path: Path) -> int:
    m = [re.fullmatch(r"fold-(\d+)", part) for part in path.parts]
    hits = [int(x.group(1)) for x in m if x]
    return hits[-1] if hits else 0


# ------------------------------------------------------------------------------------------------ training
def fine_tune(model: nn.Module, loaders: dict[str, Any], loss_fns: tuple[nn.Module, nn.Module], cfg: Config,
              device: torch.device, epochs: int, phase: str, epoch_offset: int) -> list[dict[str, Any]]:
    """Train ``model`` for ``epochs`` on the training loader (fp32), monitoring the validation loader.

    Args:
        model: float or fake-quantized network (pruning hooks keep pruned weights at zero).
        loaders: ``train`` and ``val`` loaders.
        loss_fns: the training loss (class-weighted as in training) and its per-sample version for validation.
        cfg: the compress configuration (optimiser, lr, clipping).
        device: training device.
        epochs: number of epochs.
        phase: name in the history (``prune-1`` …, ``qat``).
        epoch_offset: added to the epoch for the sampler (a new shuffle per epoch across phases).

    Returns:
        One history row per epoch.
    """
    loss_fn, val_loss_fn = loss_fns
    tcfg = copy.deepcopy(cfg)
    tcfg.train.lr = cfg.train.lr * FINETUNE_LR_FACTOR
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = engine.build_optimizer(params, tcfg)
    precision = Precision(device, None, None)
    rows = []
    for e in range(epochs):
        loaders["train"].sampler.set_epoch(epoch_offset + e)
        model.train()
        t0, total, count = time.perf_counter(), 0.0, 0
        bar = engine.progress(loaders["train"], desc=f"{phase} epoch {e + 1}/{epochs}", unit="batch")
        for batch in bar:
            x, y = batch["image"].to(device), batch["label"].to(device)
            loss = loss_fn(model(x).float(), y)
            if not torch.isfinite(loss):
                raise DataError(f"compress {phase}: loss became {loss.item()} (subjects {', '.join(batch['subject'])})"
                                f"; lower --lr or check these scans")
            loss.backward()
            precision.step(optimizer, params, cfg.train.clip_grad)
            total, count = total + loss.item() * len(y), count + len(y)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        with quantize.quiet():
            _, yv, pv, vloss = predict(model, loaders["val"], precision, val_loss_fn)
        row = {"phase": phase, "epoch": e + 1, "train_loss": total / max(1, count), "val_loss": vloss,
               **{f"val_{k}": v for k, v in classification_metrics(yv, pv).items()},
               "seconds": time.perf_counter() - t0}
        log.info("%s epoch %d/%d  loss %.4f/%.4f  val bal.acc %.3f  auc %.3f", phase, e + 1, epochs,
                 row["train_loss"], vloss, row["val_balanced_accuracy"], row["val_auc"])
        rows.append(row)
    return rows


def _calibrate(model: nn.Module, loader: Any, device: torch.device) -> None:
    """Observer pass without training (``--qat-epochs 0``): eval mode, so BatchNorm keeps its statistics."""
    model.eval()
    with torch.no_grad():
        for batch in engine.progress(loader, desc="calibration", unit="batch"):
            model(batch["image"].to(device))


# ------------------------------------------------------------------------------------------------ the stage
def run(cfg: Config, argv: list[str] | None = None) -> dict[str, Any]:
    """Compress the experiment's classifier; write ``runs/<exp>/compress/``.

    Returns:
        The report dictionary written to ``report.json``.
    """
    from octa3d.data.datasets import DataHandler
    from octa3d.test import build_classifier
    from octa3d.train import build_loss, class_weights
    from octa3d.utils import dist

    t_start = time.perf_counter()
    if dist.is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--mode compress runs in a single process; start it without torchrun")
    src = source_checkpoint(cfg)
    ckpt = engine.load_checkpoint(src, kind="classifier")
    ecfg = compress_config(cfg, ckpt, argv)
    c = ecfg.compress
    ctx = engine.setup_stage(ecfg, argv)
    sp = ctx.splits
    names = list(sp.class_names)
    if list(ckpt["class_names"]) != names:
        raise ConfigError(f"{src} predicts classes {ckpt['class_names']} but experiment '{ecfg.exp_name}' has "
                          f"classes {names}; compress it in its own experiment (--exp)")
    tr_ids, va_ids = sp.fold(_fold_of(src))
    guard(STAGE, tr_ids + va_ids, sp)  # fine-tuning, QAT and calibration: never a test subject
    test_ids = list(sp.test)
    guard("test", test_ids, sp)  # the report's evaluation: hold-out subjects only
    if not va_ids or not test_ids:
        raise DataError(f"experiment '{ecfg.exp_name}' needs validation and hold-out test subjects for --mode compress")
    out = stage_dir(ecfg, STAGE, argv)

    handler = DataHandler(ecfg, ctx.label_map)
    tr_subs, va_subs, te_subs = ctx.pick(tr_ids), ctx.pick(va_ids), ctx.pick(test_ids)
    handler.warm(tr_subs + va_subs + te_subs)
    bs = ecfg.train.batch_size
    loaders = {"train": handler.loader(tr_subs, train=True, batch_size=bs),
               "val": handler.loader(va_subs, train=False, batch_size=bs),
               "test": handler.loader(te_subs, train=False, batch_size=bs),
               "calib": handler.loader(tr_subs, train=False, batch_size=1)}
    weights = class_weights([sp.labels[i] for i in tr_ids], len(names)).to(ctx.device)
    loss_fns = (build_loss(ecfg, weights), build_loss(ecfg, weights, reduction="none"))
    calib = [b["image"] for _, b in zip(range(CALIBRATION_SAMPLES), loaders["calib"])]
    example = calib[0]  # one training volume: trace input and the latency benchmark's input
    log.info("compress %s (%s): %d train / %d val / %d test subjects; pruning %s %.2f in %d round(s), QAT %d "
             "epoch(s), backend %s", ckpt["model_name"], src, len(tr_ids), len(va_ids), len(test_ids), c.prune_mode,
             c.prune_amount, c.prune_rounds, c.qat_epochs, c.qbackend)

    fp32 = build_classifier(ckpt, src, torch.device("cpu"))
    model = copy.deepcopy(fp32).to(ctx.device)
    history: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    epoch = 0
    # ---- 1. iterative magnitude pruning with fine-tuning between rounds
    if c.prune_mode != "none" and c.prune_amount > 0:
        for r in range(1, c.prune_rounds + 1):
            target = pruning.cumulative_sparsity(c.prune_amount, c.prune_rounds, r)
            now = pruning.prune_step(model, c.prune_mode, target)
            key = "conv_channels" if c.prune_mode == "structured" else "weights"
            log.info("pruning round %d/%d: %s sparsity %.3f (target %.3f)", r, c.prune_rounds, key, now[key], target)
            rows = fine_tune(model, loaders, loss_fns, ecfg, ctx.device, c.finetune_epochs, f"prune-{r}", epoch)
            epoch += c.finetune_epochs
            history += rows
            rounds.append({"round": r, "target": target, "sparsity": now[key], "weight_sparsity": now["weights"],
                           "val_balanced_accuracy": rows[-1]["val_balanced_accuracy"] if rows else None})
    masks = pruning.masks_of(model)
    pruning.finalize(model)
    sparsity_fp32 = pruning.sparsity(model)
    record = {**engine.model_record(ecfg, names, "classifier"),
              "compress": {"source_checkpoint": str(src), "prune_mode": c.prune_mode, "prune_amount": c.prune_amount,
                           "prune_rounds": c.prune_rounds, "sparsity": sparsity_fp32}}
    engine.save_checkpoint(out / "pruned.pt", model, record, epoch=int(ckpt.get("epoch", 0)),
                           metrics=dict(ckpt.get("metrics") or {}), config=ecfg)

    # ---- 2. quantization-aware training (masks re-attached so pruned weights stay zero), then int8 conversion
    prepared = quantize.prepare_qat(model, c.qbackend, example)
    pruning.apply_masks(prepared, masks)
    prepared.to(ctx.device)
    quantize.freeze_bn_stats(prepared)  # trained BatchNorm statistics; QAT batches are small
    with quantize.quiet():
        if c.qat_epochs > 0:
            history += fine_tune(prepared, loaders, loss_fns, ecfg, ctx.device, c.qat_epochs, "qat", epoch)
        else:
            _calibrate(prepared, loaders["calib"], ctx.device)
    pruning.finalize(prepared)
    converted = quantize.convert(prepared, c.qbackend)
    sparsity_int8 = quantize.int8_sparsity(converted, c.qbackend, masks)
    qsummary = quantize.quantized_summary(converted)
    if history:
        atomic_write_csv(out / "history.csv", pd.DataFrame(history))

    # ---- 3. exports + model card (the int8 file is run with the fastest engine for its backend on this machine)
    model = model.cpu().eval()
    threads = measure.bench_threads()
    runtime_engine, engine_ms = measure.pick_engine(converted, example, c.qbackend, threads)
    if engine_ms:
        log.info("int8 engine: %s (median ms at batch 1: %s)", runtime_engine,
                 ", ".join(f"{k} {v:.1f}" for k, v in engine_ms.items()))
    card = export.build_card({**record, "config": to_dict(ecfg)}, src, runtime_engine)
    paths = {"int8": out / "model_int8.pt", "onnx_fp32": out / "model.onnx", "onnx_int8": out / "model_int8.onnx"}
    export.save_torchscript(converted, example, paths["int8"], card, c.qbackend)
    export.export_onnx(model, example, paths["onnx_fp32"])
    onnx_q = export.quantize_onnx(paths["onnx_fp32"], paths["onnx_int8"], [x.numpy() for x in calib])
    export.add_artifact(card, out / "pruned.pt", "octa3d-checkpoint", "fp32", sparsity=sparsity_fp32["weights"])
    export.add_artifact(card, paths["int8"], "torchscript", "int8", quantized_engine=runtime_engine,
                        sparsity=sparsity_int8["weights"])
    export.add_artifact(card, paths["onnx_fp32"], "onnx", "fp32", opset=export.ONNX_OPSET)
    export.add_artifact(card, paths["onnx_int8"], "onnx", "int8 (QDQ)", opset=export.ONNX_OPSET, **onnx_q)
    export.write_card(card, out)

    # ---- 4. hold-out evaluation of every variant, from the written files where there is one
    with quantize.quantized_engine(runtime_engine):  # restored afterwards (load_any_model sets the file's engine)
        int8_ts, _, _ = export.load_any_model(paths["int8"])
        runners: dict[str, nn.Module] = {"fp32": fp32.cpu().eval(), "pruned": model, "int8": int8_ts,
                                         "onnx_fp32": export.OnnxModule(paths["onnx_fp32"], threads),
                                         "onnx_int8": export.OnnxModule(paths["onnx_int8"], threads)}
        evals = {k: measure.evaluate(m, loaders["test"]) for k, m in runners.items()}
        pack = quantize.packing_engine(c.qbackend)
        with quantize.quantized_engine(pack):  # the written file vs the in-process model, same int8 kernels
            inproc = measure.evaluate(converted, loaders["test"])
            same_kernels = measure.evaluate(torch.jit.load(str(paths["int8"]), map_location="cpu"), loaders["test"])
        log.info("latency benchmark: %d models x %d runs, %d threads", len(runners), measure.LATENCY_RUNS, threads)
        lat = measure.latency(runners, example, threads)
    # ---- 5. sizes: shipped files; fp32 as the TorchScript file it would be shipped as (same container as int8)
    blobs = {"fp32": measure.torchscript_bytes(fp32, example), "pruned": measure.torchscript_bytes(model, example)}
    blobs.update({k: paths[k].read_bytes() for k in ("int8", "onnx_fp32", "onnx_int8")})
    files = {"fp32": None, "pruned": "pruned.pt", "int8": "model_int8.pt", "onnx_fp32": "model.onnx",
             "onnx_int8": "model_int8.onnx"}
    sparsities = {"fp32": pruning.sparsity(fp32)["weights"], "pruned": sparsity_fp32["weights"],
                  "int8": sparsity_int8["weights"], "onnx_fp32": sparsity_fp32["weights"], "onnx_int8": None}
    base = evals["fp32"]
    models = {}
    for k, ev in evals.items():
        mt = ev["metrics"]
        models[k] = {
            "description": report.VARIANTS[k], "file": files[k] or str(src),
            "accuracy": mt["accuracy"], "balanced_accuracy": mt["balanced_accuracy"], "auc": mt["auc"],
            "f1_macro": mt["f1_macro"], "size_bytes": len(blobs[k]), "size_ratio": len(blobs["fp32"]) / len(blobs[k]),
            "size_zlib_bytes": measure.compressed_size(blobs[k]), "latency_ms": lat[k]["median_ms"],
            "latency_p10_ms": lat[k]["p10_ms"], "latency_p90_ms": lat[k]["p90_ms"],
            "speedup": lat["fp32"]["median_ms"] / lat[k]["median_ms"], "sparsity": sparsities[k],
            "agreement_with_fp32": float(np.mean(ev["probs"].argmax(1) == base["probs"].argmax(1))),
            "confusion_matrix": ev["confusion_matrix"],
        }
    checks = {
        "model_int8.pt": {**_agreement(same_kernels, inproc, f"in-process FX int8 model (convert_fx output), both "
                                                             f"run with the {pack} engine"),
                          "runtime_engine": _agreement(evals["int8"], inproc, f"the file run with the "
                                                       f"{runtime_engine} engine vs the in-process model ({pack})")},
        "model.onnx": _agreement(evals["onnx_fp32"], evals["pruned"], "in-process pruned fp32 model"),
        "model_int8.onnx": _agreement(evals["onnx_int8"], evals["pruned"], "in-process pruned fp32 model"),
    }
    rep = {
        "experiment": ecfg.exp_name, "source_checkpoint": str(src),
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "class_names": names,
        "test_subjects": len(base["ids"]),
        "settings": {**dataclasses.asdict(c), "finetune_lr": ecfg.train.lr * FINETUNE_LR_FACTOR,
                     "batch_size": bs, "optimizer": ecfg.train.optimizer, "loss": ecfg.train.loss,
                     "train_device": str(ctx.device)},
        "models": models, "targets": report.target_checks(models),
        "pruning": {"mode": c.prune_mode, "amount": c.prune_amount, "rounds": rounds,
                    "sparsity_fp32": sparsity_fp32, "sparsity_int8": sparsity_int8,
                    "masks_kept_through_qat": sparsity_int8["mask_violations"] in (0, None)},
        "quantization": {"backend": c.qbackend, "packing_engine": quantize.packing_engine(c.qbackend),
                         "runtime_engine": runtime_engine, "engine_latency_ms": engine_ms,
                         "path": "PyTorch FX QAT: prepare_qat_fx(get_default_qat_qconfig_mapping(backend)) -> train "
                                 "-> eval() -> convert_fx",
                         **qsummary, "float_max_pools": qsummary["float_modules"].get(
                             f"{quantize.FloatMaxPool3d.__module__}.FloatMaxPool3d", 0),
                         "torchao": {"applied": False, "note": quantize.TORCHAO_NOTE}, "onnx_int8": onnx_q},
        "latency": {"threads": threads, "runs": measure.LATENCY_RUNS, "warmup": measure.LATENCY_WARMUP, "batch": 1,
                    "input_shape": list(example.shape), "per_model": lat,
                    "note": "The machine may be shared: compare ratios measured in one run, not absolute times."},
        "export_checks": checks,
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
        "environment": {"torch": torch.__version__, "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(),
                        "quantized_engines": list(torch.backends.quantized.supported_engines)},
        "history": history, "seconds": time.perf_counter() - t_start,
    }
    report.confusion_png(out / "confusion_matrices.png", names,
                         {"fp32": models["fp32"]["confusion_matrix"], "int8": models["int8"]["confusion_matrix"]})
    rep["files"]["confusion_matrices.png"] = (out / "confusion_matrices.png").stat().st_size
    report.write_report(out, rep)
    _print_summary(rep, out)
    return rep


def _agreement(ev: dict[str, Any], ref: dict[str, Any], what: str) -> dict[str, Any]:
    diff = np.abs(ev["probs"] - ref["probs"])
    return {"reference": what, "max_abs_prob_diff": float(diff.max()) if diff.size else math.nan,
            "same_prediction": float(np.mean(ev["probs"].argmax(1) == ref["probs"].argmax(1)))}


def _print_summary(rep: dict[str, Any], out: Path) -> None:
    m = rep["models"]
    print(f"Compressed '{rep['experiment']}' -> {out}")
    for k, r in m.items():
        auc = r["auc"] if r["auc"] is not None else math.nan
        print(f"  {k:<10} bal.acc {r['balanced_accuracy']:.3f}  auc {auc:.3f}  size {r['size_bytes'] / 1e6:7.2f} MB "
              f"({r['size_ratio']:.2f}x)  latency {r['latency_ms']:7.1f} ms ({r['speedup']:.2f}x)")
    t = rep["targets"]
    print("  targets: " + ", ".join(f"{k} {v['value']:.2f} ({'met' if v['met'] else 'NOT met'})" for k, v in t.items()))
