"""``--mode compress``: prune → fine-tune → QAT int8 → TorchScript/ONNX export → report, in ``<exp>/compress/``.

The source is the experiment's ``train/checkpoints/best.pt`` (or ``--checkpoint``). Data, label and preprocessing
settings come from that checkpoint, so inputs are made exactly as in training; training settings (loss,
optimiser, batch size, lr) too, unless given explicitly (:func:`octa3d.checkpoint.settings.checkpoint_config`).
Fine-tuning and QAT use the training split of the checkpoint's fold with the shared training loop
(:func:`octa3d.training.epoch.train_one_epoch`), validation subjects are only monitored, and the hold-out test subjects
are only evaluated (both checked by :func:`octa3d.data.leakage.guard`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from octa3d.checkpoint import exports
from octa3d.checkpoint.io import CheckpointError, load_checkpoint, model_record, save_checkpoint
from octa3d.checkpoint.models import build_classifier, fold_of, load_any_model
from octa3d.checkpoint.settings import checkpoint_config
from octa3d.config import Config, to_dict
from octa3d.data.datasets import DataHandler
from octa3d.data.leakage import guard
from octa3d.errors import ConfigError, DataError
from octa3d.evaluation import forward
from octa3d.evaluation.metrics import classification_metrics
from octa3d.stages.compress import export, linear_quant, measure, pruning, quantize, report
from octa3d.stages.context import StageContext, setup_stage
from octa3d.training.epoch import StepPolicy, train_one_epoch
from octa3d.training.optim import build_loss, build_optimizer, class_weights
from octa3d.training.precision import Precision
from octa3d.utils import dist
from octa3d.utils.io import atomic_write_csv
from octa3d.utils.runs import StageFolder, plan_stage, releases_locks, stage_dir
from octa3d.utils.tracking import cli_program, progress

log = logging.getLogger("octa3d.compress")

STAGE = "compress"
#: Fine-tuning and QAT learning rate = this x the training --lr (the network is already trained).
FINETUNE_LR_FACTOR = 0.1
#: Training volumes used to calibrate the onnxruntime int8 model.
CALIBRATION_SAMPLES = 32


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
    folds = sorted(train.glob("fold-*/checkpoints/best.pt"), key=fold_of)
    if folds:
        raise ConfigError(f"experiment '{cfg.exp_name}' was trained with k-fold cross-validation; compress one "
                          f"fold's model with --checkpoint (e.g. --checkpoint {folds[0]})")
    raise CheckpointError(f"no trained model to compress: {best} does not exist. Train it first: {cli_program()} "
                          f"--mode train --exp {cfg.exp_name} --runs-dir {cfg.run.runs_dir} (with the experiment's "
                          f"--data-root/--model/--input-size), or pass --checkpoint FILE")


@dataclass
class Job:
    """Everything the phases of one compress run share."""

    cfg: Config
    ctx: StageContext
    src: Path
    ckpt: dict[str, Any]
    out: Path
    names: list[str]
    loaders: dict[str, Any]
    loss_fns: tuple[nn.Module, nn.Module]
    calib: list[torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    #: "fx" (PyTorch FX QAT of the whole network) or "torchao" (Linear-dominated models: torchao QAT of the Linear
    #: layers, see :mod:`~octa3d.stages.compress.linear_quant`).
    path: str = "fx"
    fake_quantized: int = 0
    #: The stage folder: ``out`` is its partial folder, swapped into ``runs/<exp>/compress/`` when finished.
    folder: StageFolder | None = None

    @property
    def example(self) -> torch.Tensor:
        """One training volume: the trace input and the latency benchmark's input."""
        return self.calib[0]


# ------------------------------------------------------------------------------------------------ training
def fine_tune(job: Job, model: nn.Module, epochs: int, phase: str) -> list[dict[str, Any]]:
    """Train ``model`` for ``epochs`` on the training loader (fp32, at ``FINETUNE_LR_FACTOR`` x ``--lr``) with the
    shared loop (accumulation, clipping, non-finite checks), monitoring the validation loader.

    Returns:
        One history row per epoch (``phase``: ``prune-1`` …, ``qat``).
    """
    cfg, device = job.cfg, job.ctx.device
    tcfg = copy.deepcopy(cfg)
    tcfg.train.lr = cfg.train.lr * FINETUNE_LR_FACTOR
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tcfg)
    precision = Precision(device, None, None)  # fake-quantized modules train in fp32
    policy = StepPolicy(cfg.train.accum_steps, cfg.train.clip_grad)
    rows = []
    for e in range(epochs):
        job.loaders["train"].sampler.set_epoch(job.epoch + e)  # a new shuffle per epoch across phases
        model.train()
        t0 = time.perf_counter()
        train_loss, _, _, _ = train_one_epoch(
            model, job.loaders["train"], job.loss_fns[0], optimizer, None, precision, params, policy, step=0,
            desc=f"compress {phase} epoch {e + 1}/{epochs}")
        with quantize.quiet():
            _, yv, pv, vloss = forward.predict(model, job.loaders["val"], precision, job.loss_fns[1])
        row = {"phase": phase, "epoch": e + 1, "train_loss": train_loss, "val_loss": vloss,
               **{f"val_{k}": v for k, v in classification_metrics(yv, pv).items()},
               "seconds": time.perf_counter() - t0}
        log.info("%s epoch %d/%d  loss %.4f/%.4f  val bal.acc %.3f  auc %.3f", phase, e + 1, epochs,
                 row["train_loss"], vloss, row["val_balanced_accuracy"], row["val_auc"])
        rows.append(row)
    job.epoch += epochs
    job.history += rows
    return rows


def _calibrate(model: nn.Module, loader: Any, device: torch.device) -> None:
    """Observer pass without training (``--qat-epochs 0``): eval mode, so BatchNorm keeps its statistics."""
    model.eval()
    with torch.no_grad():
        for batch in progress(loader, desc="calibration", unit="batch"):
            model(batch["image"].to(device))


# ------------------------------------------------------------------------------------------------ phases
def _setup(cfg: Config) -> Job:
    """Source checkpoint, its configuration, splits (guarded), loaders, losses and calibration samples."""
    if dist.is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--mode compress runs in a single process; start it without torchrun")
    src = source_checkpoint(cfg)
    ckpt = load_checkpoint(src, kind="classifier")
    ecfg = checkpoint_config(cfg, ckpt, fine_tune=True)
    plan_stage(ecfg, STAGE)  # RunExistsError before the experiment is touched
    ctx = setup_stage(ecfg)
    sp = ctx.splits
    names = list(sp.class_names)
    if list(ckpt["class_names"]) != names:
        raise ConfigError(f"{src} predicts classes {ckpt['class_names']} but experiment '{ecfg.exp_name}' has "
                          f"classes {names}; compress it in its own experiment (--exp)")
    tr_ids, va_ids = sp.fold(fold_of(src) or 0)
    guard(STAGE, tr_ids + va_ids, sp)  # fine-tuning, QAT and calibration: never a test subject
    test_ids = list(sp.test)
    guard("test", test_ids, sp)  # the report's evaluation: hold-out subjects only
    if not va_ids or not test_ids:
        raise DataError(f"experiment '{ecfg.exp_name}' needs validation and hold-out test subjects for --mode compress")
    handler = DataHandler(ecfg, ctx.label_map)
    tr_subs, va_subs, te_subs = ctx.pick(tr_ids), ctx.pick(va_ids), ctx.pick(test_ids)
    handler.warm(tr_subs + va_subs + te_subs)
    folder = stage_dir(ecfg, STAGE)  # inputs read; earlier results stay until this run has finished
    out = folder.path
    bs = ecfg.train.batch_size
    loaders = {"train": handler.loader(tr_subs, train=True, batch_size=bs),
               "val": handler.loader(va_subs, train=False, batch_size=bs),
               "test": handler.loader(te_subs, train=False, batch_size=bs),
               "calib": handler.loader(tr_subs, train=False, batch_size=1)}
    weights = class_weights([sp.labels[i] for i in tr_ids], len(names)).to(ctx.device)
    loss_fns = (build_loss(ecfg, weights), build_loss(ecfg, weights, reduction="none"))
    calib = [b["image"] for _, b in zip(range(CALIBRATION_SAMPLES), loaders["calib"])]
    c = ecfg.compress
    log.info("compress %s (%s): %d train / %d val / %d test subjects; pruning %s %.2f in %d round(s), QAT %d "
             "epoch(s), backend %s", ckpt["model_name"], src, len(tr_ids), len(va_ids), len(test_ids), c.prune_mode,
             c.prune_amount, c.prune_rounds, c.qat_epochs, c.qbackend)
    return Job(ecfg, ctx, src, ckpt, out, names, loaders, loss_fns, calib, folder=folder)


def _prune(job: Job, model: nn.Module) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], dict[str, Any]]:
    """Iterative magnitude pruning with fine-tuning between rounds; writes ``pruned.pt``.

    Returns:
        (per-round summary, the pruning masks, the pruned model's sparsity).
    """
    c = job.cfg.compress
    rounds: list[dict[str, Any]] = []
    if c.prune_mode == "structured" and job.path == "torchao":
        log.warning("--prune-mode structured prunes convolution channels only: in this Linear-dominated model that "
                    "is the patch embedding alone (use unstructured to prune the Linear layers)")
    if c.prune_mode != "none" and c.prune_amount > 0:
        for r in range(1, c.prune_rounds + 1):
            target = pruning.cumulative_sparsity(c.prune_amount, c.prune_rounds, r)
            now = pruning.prune_step(model, c.prune_mode, target)
            key = "conv_channels" if c.prune_mode == "structured" else "weights"
            log.info("pruning round %d/%d: %s sparsity %.3f (target %.3f)", r, c.prune_rounds, key, now[key], target)
            rows = fine_tune(job, model, c.finetune_epochs, f"prune-{r}")
            rounds.append({"round": r, "target": target, "sparsity": now[key], "weight_sparsity": now["weights"],
                           "val_balanced_accuracy": rows[-1]["val_balanced_accuracy"] if rows else None})
    masks = pruning.masks_of(model)
    pruning.finalize(model)
    sparsity = pruning.sparsity(model)
    save_checkpoint(job.out / "pruned.pt", model, _record(job, sparsity), epoch=int(job.ckpt.get("epoch", 0)),
                    metrics=dict(job.ckpt.get("metrics") or {}), config=job.cfg)
    return rounds, masks, sparsity


def _record(job: Job, sparsity: dict[str, Any]) -> dict[str, Any]:
    c = job.cfg.compress
    # the source's calibration temperature travels with every file: test/predict apply it to them as to
    # the source; it was fitted before pruning/QAT, which change the logits little (see report.json's agreement)
    temperature = {"temperature": job.ckpt["temperature"]} if job.ckpt.get("temperature") is not None else {}
    # the options the network was built with (ViT patch size, MedicalNet shortcut A ...) rebuild pruned.pt
    return {**model_record(job.cfg, job.names, "classifier"), "model_kwargs": job.ckpt.get("model_kwargs") or {},
            **temperature,
            "compress": {"source_checkpoint": str(job.src), "prune_mode": c.prune_mode,
                         "prune_amount": c.prune_amount, "prune_rounds": c.prune_rounds, "sparsity": sparsity}}


def _quantize(job: Job, model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module | None]:
    """QAT (masks re-attached so pruned weights stay zero) or calibration, then int8 conversion.

    Returns:
        The int8 model, and for the torchao path the float model with the QAT-trained weights (else None).
    """
    if job.path == "torchao":
        return _quantize_linear(job, model, masks)
    c = job.cfg.compress
    prepared = quantize.prepare_qat(model, c.qbackend, job.example)
    pruning.apply_masks(prepared, masks)
    prepared.to(job.ctx.device)
    quantize.freeze_bn_stats(prepared)  # trained BatchNorm statistics; QAT batches are small
    with quantize.quiet():
        if c.qat_epochs > 0:
            fine_tune(job, prepared, c.qat_epochs, "qat")
        else:
            _calibrate(prepared, job.loaders["calib"], job.ctx.device)
    pruning.finalize(prepared)
    return quantize.convert(prepared, c.qbackend), None


def _quantize_linear(job: Job, model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    """torchao QAT of the Linear layers, then dynamic int8 conversion (see :mod:`linear_quant`). Dynamic
    quantization needs no calibration: with ``--qat-epochs 0`` the pruned weights are quantized as they are."""
    c = job.cfg.compress
    prepared = linear_quant.prepare_qat(model)
    pruning.apply_masks(prepared, masks)
    prepared.to(job.ctx.device)
    job.fake_quantized = linear_quant.fake_quantized_layers(prepared)
    log.info("torchao QAT: %d nn.Linear layers fake-quantized (%s)", job.fake_quantized,
             linear_quant.BASE_CONFIG_TEXT.split(":")[0])
    with quantize.quiet():
        if c.qat_epochs > 0:
            fine_tune(job, prepared, c.qat_epochs, "qat")
    pruning.finalize(prepared)
    qat_float = linear_quant.strip_fake_quant(prepared).cpu()
    return linear_quant.convert_dynamic(qat_float, c.qbackend), qat_float


def _export(job: Job, model: nn.Module, converted: nn.Module, sparsity: dict[str, Any],
            sparsity_int8: dict[str, Any], threads: int) -> dict[str, Any]:
    """TorchScript int8/fp32, ONNX fp32/int8 and the model card (the int8 file runs with the fastest engine here)."""
    c, out = job.cfg.compress, job.out
    runtime_engine, engine_ms = measure.pick_engine(converted, job.example, c.qbackend, threads)
    if engine_ms:
        log.info("int8 engine: %s (median ms at batch 1: %s)", runtime_engine,
                 ", ".join(f"{k} {v:.1f}" for k, v in engine_ms.items()))
    card = exports.build_card({**_record(job, sparsity), "config": to_dict(job.cfg)}, job.src, runtime_engine)
    paths = {"int8": out / "model_int8.pt", "onnx_fp32": out / "model.onnx", "onnx_int8": out / "model_int8.onnx",
             "ts_fp32": out / "model_fp32.pt"}
    if card.get("temperature") is not None:
        card["temperature_note"] = "fitted on the source checkpoint's validation split, before pruning and QAT"
    export.save_torchscript(converted, job.example, paths["int8"], card, c.qbackend)
    traced = exports.save_torchscript_fp32(copy.deepcopy(model), job.example, paths["ts_fp32"], card)
    with torch.no_grad():
        fp32_diff = float((traced(job.example.cpu()) - model(job.example.cpu())).abs().max())
    export.export_onnx(model, job.example, paths["onnx_fp32"])
    onnx_q = export.quantize_onnx(paths["onnx_fp32"], paths["onnx_int8"], [x.numpy() for x in job.calib])
    exports.add_artifact(card, out / "pruned.pt", "octa3d-checkpoint", "fp32", sparsity=sparsity["weights"])
    exports.add_artifact(card, paths["int8"], "torchscript", "int8", quantized_engine=runtime_engine,
                            sparsity=sparsity_int8["weights"],
                            quantization=("torchao QAT of nn.Linear, then PyTorch dynamic int8 nn.Linear"
                                          if job.path == "torchao" else "PyTorch FX QAT, static int8"))
    exports.add_artifact(card, paths["ts_fp32"], "torchscript", "fp32", sparsity=sparsity["weights"],
                            max_abs_logit_diff=fp32_diff)
    exports.add_artifact(card, paths["onnx_fp32"], "onnx", "fp32", opset=exports.ONNX_OPSET)
    exports.add_artifact(card, paths["onnx_int8"], "onnx", "int8 (QDQ)", opset=exports.ONNX_OPSET, **onnx_q)
    exports.write_card(card, out)
    return {"paths": paths, "runtime_engine": runtime_engine, "engine_ms": engine_ms, "onnx_q": onnx_q,
            "checks": {"model_fp32.pt": {"max_abs_logit_diff": fp32_diff,
                                         "against": "in-process pruned fp32 model, on the trace input"}}}


def _evaluate(job: Job, fp32: nn.Module, model: nn.Module, converted: nn.Module, exported: dict[str, Any],
              threads: int, qat_float: nn.Module | None = None) -> dict[str, Any]:
    """Hold-out evaluation and latency of every variant, from the written files where there is one (torchao's
    own int8 model, on the torchao path, in-process: it cannot be exported to TorchScript)."""
    paths, runtime_engine, test = exported["paths"], exported["runtime_engine"], job.loaders["test"]
    with exports.quantized_engine(runtime_engine):  # restored afterwards (loading sets the file's engine)
        int8_ts, _, _ = load_any_model(paths["int8"])
        runners: dict[str, nn.Module] = {"fp32": fp32.cpu().eval(), "pruned": model, "int8": int8_ts,
                                         "onnx_fp32": exports.OnnxModule(paths["onnx_fp32"], threads),
                                         "onnx_int8": exports.OnnxModule(paths["onnx_int8"], threads)}
        extra: dict[str, Any] = {}
        if qat_float is not None:
            runners["torchao_int8"] = linear_quant.torchao_int8(qat_float)
            extra = {"torchao_bytes": linear_quant.state_dict_bytes(runners["torchao_int8"]),
                     "torchao_sparsity": pruning.sparsity(qat_float)}
        evals = {k: measure.evaluate(m, test) for k, m in runners.items()}
        pack = quantize.packing_engine(job.cfg.compress.qbackend)
        with exports.quantized_engine(pack):  # the written file vs the in-process model, same int8 kernels
            inproc = measure.evaluate(converted, test)
            same_kernels = measure.evaluate(torch.jit.load(str(paths["int8"]), map_location="cpu"), test)
        log.info("latency benchmark: %d models x %d runs, %d threads", len(runners), measure.LATENCY_RUNS, threads)
        lat = measure.latency(runners, job.example, threads)
    return {"evals": evals, "inproc": inproc, "same_kernels": same_kernels, "pack": pack, "latency": lat, **extra}


@releases_locks
def run(cfg: Config) -> dict[str, Any]:
    """Compress the experiment's classifier; write ``runs/<exp>/compress/`` (replaced only once finished).

    Returns:
        The report dictionary written to ``report.json``.
    """
    t_start = time.perf_counter()
    job = _setup(cfg)
    with job.folder:  # type: ignore[union-attr]  # always set by _setup
        rep = _run(job, t_start)
        rep = job.folder.rebase(rep)
        report.write_report(job.out, rep)
        out = job.folder.finish(job.cfg)
    report.print_summary(rep, out)
    return rep


def _run(job: Job, t_start: float) -> dict[str, Any]:
    """Prune, quantize, export and evaluate into ``job.out``; returns the report."""
    fp32 = build_classifier(job.ckpt, job.src, torch.device("cpu"))
    job.path = linear_quant.quantization_path(fp32)
    log.info("quantization path: %s (%.0f %% of the conv/linear weights are nn.Linear)",
             "torchao QAT of the Linear layers" if job.path == "torchao" else "PyTorch FX QAT of the whole network",
             100 * linear_quant.linear_share(fp32))
    model = copy.deepcopy(fp32).to(job.ctx.device)
    rounds, masks, sparsity = _prune(job, model)
    converted, qat_float = _quantize(job, model, masks)
    sparsity_int8 = quantize.int8_sparsity(converted, job.cfg.compress.qbackend, masks)
    if job.history:
        atomic_write_csv(job.out / "history.csv", pd.DataFrame(job.history))
    model = model.cpu().eval()
    threads = measure.bench_threads()
    exported = _export(job, model, converted, sparsity, sparsity_int8, threads)
    results = _evaluate(job, fp32, model, converted, exported, threads, qat_float)
    rep = report.build(job, fp32, model, converted, exported, results, rounds, sparsity, sparsity_int8, threads,
                       finetune_lr=job.cfg.train.lr * FINETUNE_LR_FACTOR)
    rep["seconds"] = time.perf_counter() - t_start
    report.confusion_png(job.out / "confusion_matrices.png", job.names,
                         {"fp32": rep["models"]["fp32"]["confusion_matrix"],
                          "int8": rep["models"]["int8"]["confusion_matrix"]})
    rep["files"]["confusion_matrices.png"] = (job.out / "confusion_matrices.png").stat().st_size
    return rep
