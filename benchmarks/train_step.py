"""Training-step figures of project issue #7: step throughput per model and input size, and the overhead of the
full ``--mode train`` stage over a bare forward/backward/step loop.

1. **Step throughput** (volumes/s): one optimiser step (forward, cross-entropy, backward, AdamW) of a 3D
   classifier from ``octa3d.model.create_model(name, "3d", 1, 2)`` on a batch of random volumes already in memory.
   CPU: fp32 only, ``$OCTA3D_BENCH_THREADS`` threads (default 1). CUDA (when ``torch.cuda.is_available()``): fp32,
   AMP (``octa3d.training.precision.Precision.for_device``: bf16 where supported), AMP + channels-last and AMP +
   channels-last +
   ``torch.compile``, timed with ``torch.cuda.synchronize``; speed-ups are ratios within this run.
2. **Stage overhead** (x): the real training stage, run in-process on a synthetic dataset
   (``octa3d.data.synthetic.generate``)::

       python main.py --mode train --model resnet18 --input-size 32 --batch-size 2 --epochs 5 --init random \\
           --patience 0 --device cpu --data-root WORK/data --runs-dir WORK/runs --exp step

   Timestamps are taken around the stage's training loops and validation passes (thin wrappers around
   ``engine.progress`` and ``forward.predict``; nothing else changes). One epoch *cycle* runs from the start of an
   epoch's training loop to the start of the next one, so it holds the training steps (data loading from the warm
   preprocessing cache, augmentation, loss/accuracy bookkeeping, progress bar), the validation pass, metrics,
   history.csv, TensorBoard (scalars + confusion-matrix figure), ``best.pt``/``last.pt`` and logging. Epochs >= 2
   are measured (the first carries one-off costs: first-iteration allocations, the TensorBoard input image).
   The bare loop (same model, batch sizes, input size and optimiser as the stage builds it, cross-entropy, on
   tensors already in memory) runs one epoch right after each of the stage's validation passes, inside the same
   process; its time is taken out of the cycle. Stage and bare epochs thus alternate under the same machine load,
   and each figure is the median of per-epoch ratios. The target applies to the *training-step part*: the cycle
   minus its validation pass, against the bare training epoch. The whole cycle is also reported against the bare
   epoch plus a bare ``no_grad`` forward over the validation samples.

3. **MFU** (CUDA only): resnet50 at 128³, AMP + channels-last with and without ``torch.compile``; achieved TFLOP/s
   from the FLOPs of one step counted by ``FlopCounterMode`` on the meta device, and model-FLOP utilisation
   against the card's datasheet peak (:data:`PEAK_TFLOPS`; aim >= 30 %). On CPU the FLOPs per step of every
   throughput case are reported with it (GFLOP/s achieved).
4. **Loader**: the training loader's samples/s (epochs >= 2, cache + augmentation, OCT+OCTA at 128³) with up to
   8 worker processes, and on CUDA its ratio to the resnet50 128³ GPU step (>= 1: the loader keeps up).

    python -m benchmarks.train_step [--quick] [--models resnet18,resnet50,densenet121] [--sizes 32,64] \\
        [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, bench_threads, finish, result, run_stage, threads, timeit

log = logging.getLogger("octa3d.bench.train_step")

#: Overhead target of issue 7 (full stage training step vs bare loop).
OVERHEAD_TARGET = "<= 1.10"


# ------------------------------------------------------------------------------------------------ step throughput
def _step_fn(model: Any, optimizer: Any, x: Any, y: Any, precision: Any) -> Callable[[], None]:
    """One training step (forward under ``precision``'s autocast, CE loss, backward, optimiser step)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with precision.autocast():
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        precision.backward(loss)
        precision.step(optimizer, params)

    return step


def _throughput(name: str, size: int, batch: int, device: Any, variant: str, repeat: int, warmup: int
                ) -> float:
    """Volumes per second of one training step of ``name`` at ``size``³ under ``variant``.

    Args:
        name: registry model name.
        size: isotropic input size.
        batch: batch size.
        device: torch device.
        variant: ``fp32``, ``amp``, ``amp+cl`` (channels-last) or ``amp+cl+compile``.
        repeat: timed steps.
        warmup: untimed steps first (compilation, cuDNN autotuning, allocator).

    Returns:
        ``batch / median step seconds``.
    """
    import torch

    from octa3d.config import Config
    from octa3d.model import create_model
    from octa3d.training.optim import build_optimizer
    from octa3d.training.precision import Precision

    torch.manual_seed(0)
    fmt = torch.channels_last_3d if "cl" in variant.split("+") else torch.contiguous_format
    model = create_model(name, "3d", 1, 2).to(device, memory_format=fmt).train()
    optimizer = build_optimizer(model.parameters(), Config())  # AdamW as the stages build it
    net = torch.compile(model) if variant.endswith("compile") else model
    x = torch.randn(batch, 1, size, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.arange(batch, device=device) % 2
    precision = Precision.for_device(device, variant != "fp32")
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    t = timeit(_step_fn(net, optimizer, x, y, precision), repeat=repeat, warmup=warmup, sync=sync)
    del net, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch / t.median


#: Dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s of common data-centre cards, from the vendors'
#: datasheets, matched in order by a substring of ``torch.cuda.get_device_name()``. Other cards: achieved TFLOP/s
#: is reported without a utilisation figure.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.1),
               ("L4", 121.0), ("A10", 125.0), ("V100", 125.0))

#: The model-FLOP-utilisation case of issue 7 (3D, one channel, batch = --batch-size) and its aim.
MFU_MODEL, MFU_SIZE, MFU_TARGET = "resnet50", 128, ">= 0.30"


def peak_tflops(device_name: str) -> float | None:
    """Datasheet peak of ``device_name`` from :data:`PEAK_TFLOPS`, or None for an unknown card."""
    for key, peak in PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


def step_flops(name: str, size: int, batch: int) -> float:
    """FLOPs of one training step (forward + cross-entropy + backward) of ``name`` at ``size``³, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on the meta device: shapes only, nothing is computed. The
    optimiser update (a few FLOPs per parameter) is not counted, as in the usual model-FLOP utilisation."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from octa3d.model import create_model

    with torch.device("meta"):
        model = create_model(name, "3d", 1, 2)
        x = torch.empty(batch, 1, size, size, size)
        y = torch.zeros(batch, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def step_figures(models: list[str], sizes: list[int], batch: int, repeat: int) -> tuple[list[Figure], dict]:
    """Throughput figures on CPU (fp32) and, when available, CUDA (fp32/AMP/channels-last/compile)."""
    import torch

    figures: list[Figure] = []
    raw: dict[str, float] = {}
    gflops: dict[str, float] = {}  # per training step, "name/size"
    cpu = torch.device("cpu")
    n = torch.get_num_threads()
    for name in models:
        for s in sizes:
            t0 = time.perf_counter()
            v = _throughput(name, s, batch, cpu, "fp32", repeat, 1)
            flops = step_flops(name, s, batch)
            raw[f"cpu/{name}/{s}/fp32"] = v
            gflops[f"{name}/{s}"] = round(flops / 1e9, 3)
            log.info("cpu %s %d^3 fp32: %.3f volumes/s (%.0f s)", name, s, v, time.perf_counter() - t0)
            figures.append(Figure(f"{name} {s}^3 train step, CPU fp32", v, "volumes/s",
                                  note=f"batch {batch}, 1 channel, 2 classes, AdamW, {n} thread(s), median of "
                                       f"{repeat}; {flops / 1e9:.3g} GFLOP/step = {v / batch * flops / 1e9:.3g} "
                                       "GFLOP/s"))
    setup = {"models": models, "sizes": sizes, "batch_size": batch, "repeat": repeat, "cpu_threads": n,
             "gflop_per_step": gflops}
    if not torch.cuda.is_available():
        setup["cuda"] = ("skipped: no CUDA device (fp32 vs AMP bf16, channels-last and torch.compile, and "
                         f"{MFU_MODEL} {MFU_SIZE}^3 model-FLOP utilisation run on CUDA)")
        log.info("CUDA figures skipped: no CUDA device")
        return figures, {"setup": setup, "volumes_per_s": raw}
    gpu = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    prec = amp_name(gpu)
    setup["cuda"] = {"device": torch.cuda.get_device_name(0), "amp_dtype": prec, "cudnn_benchmark": True}
    for name in models:
        for s in sizes:
            base = None
            for variant in ("fp32", "amp", "amp+cl", "amp+cl+compile"):
                try:
                    v = _throughput(name, s, batch, gpu, variant, max(repeat, 10),
                                    3 if variant.endswith("compile") else 2)
                except Exception as exc:  # noqa: BLE001 - e.g. compile unsupported: report, keep going
                    log.warning("cuda %s %d^3 %s failed: %s", name, s, variant, exc)
                    setup.setdefault("cuda_failures", {})[f"{name}/{s}/{variant}"] = f"{type(exc).__name__}: {exc}"
                    continue
                raw[f"cuda/{name}/{s}/{variant}"] = v
                log.info("cuda %s %d^3 %s: %.1f volumes/s", name, s, variant, v)
                label = {"fp32": "fp32", "amp": f"AMP {prec}", "amp+cl": f"AMP {prec} + channels-last",
                         "amp+cl+compile": f"AMP {prec} + channels-last + compile"}[variant]
                figures.append(Figure(f"{name} {s}^3 train step, CUDA {label}", v, "volumes/s",
                                      note=f"batch {batch}, median of {max(repeat, 10)}"))
                if variant == "fp32":
                    base = v
                elif base:
                    figures.append(Figure(f"{name} {s}^3 CUDA {label} vs fp32", v / base, "x",
                                          note="speed-up, same run"))
    figures += mfu_figures(gpu, batch, max(repeat, 10), raw, setup)
    return figures, {"setup": setup, "volumes_per_s": raw}


def mfu_figures(gpu: Any, batch: int, repeat: int, raw: dict[str, float], setup: dict[str, Any]) -> list[Figure]:
    """:data:`MFU_MODEL` at :data:`MFU_SIZE`³ with AMP + channels-last (with and without ``torch.compile``): the
    faster variant's volumes/s, achieved TFLOP/s and model-FLOP utilisation against :func:`peak_tflops`."""
    import torch

    flops = step_flops(MFU_MODEL, MFU_SIZE, batch)
    best: tuple[float, str] | None = None
    for variant in ("amp+cl", "amp+cl+compile"):
        try:
            v = _throughput(MFU_MODEL, MFU_SIZE, batch, gpu, variant, repeat, 3 if variant.endswith("compile") else 2)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at this batch: report, keep going
            log.warning("cuda %s %d^3 %s failed: %s", MFU_MODEL, MFU_SIZE, variant, exc)
            setup.setdefault("cuda_failures", {})[f"{MFU_MODEL}/{MFU_SIZE}/{variant}"] = f"{type(exc).__name__}: {exc}"
            continue
        raw[f"cuda/{MFU_MODEL}/{MFU_SIZE}/{variant}"] = v
        best = max(best or (v, variant), (v, variant))
    if best is None:
        return []
    v, variant = best
    name, case = torch.cuda.get_device_name(0), f"{MFU_MODEL} {MFU_SIZE}^3"
    achieved = v / batch * flops / 1e12
    peak = peak_tflops(name)
    setup["mfu"] = {"model": MFU_MODEL, "size": MFU_SIZE, "batch": batch, "variant": variant,
                    "tflop_per_step": round(flops / 1e12, 4), "peak_tflops": peak, "device": name}
    figures = [Figure(f"{case} train step, CUDA {amp_name(gpu)} ({variant})", v, "volumes/s",
                      note=f"batch {batch}, median of {repeat}; the faster of with/without torch.compile"),
               Figure(f"{case} achieved TFLOP/s", achieved, "TFLOP/s",
                      note=f"{flops / 1e12:.3g} TFLOP per step (FlopCounterMode: forward + backward)")]
    if peak is None:
        setup["mfu"]["note"] = f"no datasheet peak for {name!r} in PEAK_TFLOPS: utilisation not computed"
    else:
        figures.append(Figure(f"{case} model-FLOP utilisation", achieved / peak, "", MFU_TARGET,
                              note=f"achieved vs {peak:g} TFLOP/s dense {amp_name(gpu)} peak of {name}"))
    return figures


def amp_name(device: Any) -> str:
    """Name of the AMP dtype :class:`octa3d.training.precision.Precision` picks on ``device`` (``"fp32"`` if none)."""
    import torch

    from octa3d.training.precision import Precision

    dtype = Precision.for_device(device, True).dtype
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ------------------------------------------------------------------------------------------------ stage overhead
def _batch_sizes(n: int, batch: int, drop_last: bool) -> list[int]:
    """Sizes of the batches a loader over ``n`` samples yields per epoch."""
    sizes = [batch] * (n // batch)
    if n % batch and not drop_last:
        sizes.append(n % batch)
    return sizes


#: The clocks read at every timestamp: wall, CPU time of the calling (main) thread, CPU time of the process.
CLOCKS = ("wall", "main-thread CPU", "process CPU")


def _now() -> tuple[float, float, float]:
    """``(perf_counter, thread_time, process_time)``: see :data:`CLOCKS`."""
    return time.perf_counter(), time.thread_time(), time.process_time()


def _span(t0: tuple[float, ...], t1: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(b - a for a, b in zip(t0, t1))


class BareLoop:
    """A bare training loop (forward, cross-entropy, backward, optimiser step) and a bare ``no_grad`` validation
    forward over tensors already in memory; :meth:`epoch` times one of each on every clock of :data:`CLOCKS`.

    Args:
        model_name: registry name; built as in the stage (``create_model(name, "3d", 1, 2)``).
        size: isotropic input size.
        batches: batch sizes of one training epoch (as the stage's loader yields them).
        val_samples: validation samples per epoch.
        val_batch: validation batch size.
        cfg: the stage's configuration: the optimiser is built from it as the stage builds it.
    """

    def __init__(self, model_name: str, size: int, batches: list[int], val_samples: int, val_batch: int,
                 cfg: Any) -> None:
        import torch

        from octa3d.model import create_model
        from octa3d.training.optim import build_optimizer

        torch.manual_seed(0)
        self.model = create_model(model_name, "3d", 1, 2)
        self.optimizer = build_optimizer(self.model.parameters(), cfg)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.xs = [torch.rand(b, 1, size, size, size) for b in batches]
        self.ys = [torch.arange(b) % 2 for b in batches]
        self.vxs = [torch.rand(b, 1, size, size, size) for b in _batch_sizes(val_samples, val_batch, False)]
        self.train_s: list[tuple[float, ...]] = []
        self.val_s: list[tuple[float, ...]] = []

    def epoch(self) -> None:
        """One training epoch and one validation pass, timed (appended to ``train_s`` / ``val_s``)."""
        import torch

        t0 = _now()
        self.model.train()
        for x, y in zip(self.xs, self.ys):
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        t1 = _now()
        self.model.eval()
        with torch.no_grad():
            for x in self.vxs:
                self.model(x)
        self.train_s.append(_span(t0, t1))
        self.val_s.append(_span(t1, _now()))


class StageClock:
    """Timestamps of the train stage's epochs, with a bare-loop epoch slotted in after each validation pass.

    While active it wraps ``octa3d.training.epoch.progress`` (the start of each training loop) and
    ``octa3d.evaluation.forward.predict``
    (the validation pass); after each validation pass it runs ``between(clock)`` (here: one :class:`BareLoop`
    epoch), whose duration is recorded and later taken out of the stage's epoch cycle. Slotting the bare epochs
    between the stage's epochs puts both under the same machine load.
    """

    def __init__(self, between: Callable[[StageClock], None] | None = None) -> None:
        self.between = between
        self.epoch_starts: list[tuple[float, ...]] = []
        self.val: list[tuple[tuple[float, ...], tuple[float, ...]]] = []  # (start, end) of each validation pass
        self.between_s: list[tuple[float, ...]] = []
        self.train_loader: Any = None
        self.val_loader: Any = None

    def __enter__(self) -> StageClock:
        from octa3d.evaluation import forward
        from octa3d.training import epoch

        self._modules = epoch, forward
        self._progress, self._predict = epoch.progress, forward.predict

        def progress(iterable: Any, **kw: Any) -> Any:
            if str(kw.get("desc", "")).startswith("epoch"):
                self.epoch_starts.append(_now())
                self.train_loader = iterable
            return self._progress(iterable, **kw)

        def predict(model: Any, loader: Any, *a: Any, **k: Any) -> Any:
            self.val_loader = loader
            t0 = _now()
            out = self._predict(model, loader, *a, **k)
            t1 = _now()
            self.val.append((t0, t1))
            if self.between is not None:
                self.between(self)
            self.between_s.append(_span(t1, _now()))
            return out

        epoch.progress, forward.predict = progress, predict
        return self

    def __exit__(self, *exc: Any) -> None:
        epoch, forward = self._modules
        epoch.progress, forward.predict = self._progress, self._predict


def overhead_figures(work: Path, model: str, size: int, n_subjects: int, shape: tuple[int, int, int], epochs: int,
                     batch: int) -> tuple[list[Figure], dict]:
    """Run the train stage with timestamps and bare epochs slotted in; overhead figures and raw timings."""
    import statistics

    from octa3d.cli import parse_config
    from octa3d.data.synthetic import generate

    data = work / "data"
    if not (data / "Text labels.xlsx").exists():
        generate(data, n_subjects=n_subjects, shape=shape, seed=1)
    argv = ["--mode", "train", "--data-root", str(data), "--runs-dir", str(work / "runs"), "--exp", "step",
            "--model", model, "--input-size", str(size), "--batch-size", str(batch), "--epochs", str(epochs),
            "--init", "random", "--patience", "0", "--device", "cpu", "--num-workers", "0", "--overwrite"]
    cfg = parse_config(argv)[0]
    bare: list[BareLoop] = []

    def between(clock: StageClock) -> None:
        if not bare:  # built at the first epoch's end (not a timed epoch): the stage's loaders are known then
            tl = clock.train_loader
            bare.append(BareLoop(model, size, _batch_sizes(len(tl.sampler), tl.batch_size, tl.drop_last),
                                 len(clock.val_loader.sampler), batch, cfg))
        bare[0].epoch()

    t0 = time.perf_counter()
    with StageClock(between) as clock:
        run_stage(argv)
    stage_s = time.perf_counter() - t0
    # one validation pass per epoch, then after the last epoch up to two more on the validation split (the
    # temperature fit's and the out-of-distribution threshold's); only the per-epoch passes are timed below
    if len(clock.epoch_starts) != epochs or not epochs <= len(clock.val) <= epochs + 2:
        raise RuntimeError(f"expected {epochs} epochs with validation, timed {len(clock.epoch_starts)}/"
                           f"{len(clock.val)}")
    b = bare[0]
    n_train, n_val = sum(len(y) for y in b.ys), sum(len(x) for x in b.vxs)
    per: dict[str, dict[str, list[float]]] = {}
    for c, clk in enumerate(CLOCKS):
        seg: dict[str, list[float]] = {k: [] for k in ("cycle", "val", "train_part", "loop", "end_of_epoch",
                                                        "bare_train", "bare_val")}
        for k in range(1, epochs - 1):  # 0-based epochs 1..E-2: from the loop's start to the next loop's start
            start, nxt, (v0, v1) = clock.epoch_starts[k][c], clock.epoch_starts[k + 1][c], clock.val[k]
            cycle = nxt - start - clock.between_s[k][c]
            seg["cycle"].append(cycle)
            seg["val"].append(v1[c] - v0[c])
            seg["train_part"].append(cycle - (v1[c] - v0[c]))
            seg["loop"].append(v0[c] - start)
            seg["end_of_epoch"].append(nxt - v1[c] - clock.between_s[k][c])
            seg["bare_train"].append(b.train_s[k][c])
            seg["bare_val"].append(b.val_s[k][c])
        per[clk] = seg
    med = statistics.median
    ratios = {clk: med(p / t for p, t in zip(s["train_part"], s["bare_train"])) for clk, s in per.items()}
    cpu = per["main-thread CPU"]
    whole = med(cy / (t + v) for cy, t, v in zip(cpu["cycle"], cpu["bare_train"], cpu["bare_val"]))
    others = med(p - m for p, m in zip(per["process CPU"]["cycle"], cpu["cycle"]))
    m, s_ = model, f"{size}^3"
    where = (f"{m} {s_}, batch {batch}, {n_train} train / {n_val} val samples, epochs 2..{epochs - 1}, median of "
             f"per-epoch ratios")
    part = ("epoch cycle minus its validation pass (steps, data from the warm cache, augmentation, bookkeeping, "
            "progress bar, metrics/history/TensorBoard/checkpoints amortised) vs a bare forward/backward/AdamW "
            "epoch on in-memory tensors run between the stage's epochs")
    figures = [
        Figure(f"train stage step vs bare loop, main-thread CPU ({m} {s_})", ratios["main-thread CPU"], "x",
               OVERHEAD_TARGET,
               note=f"{where}: {part}. CPU time of the training thread: insensitive to other users' load on a "
                    f"shared machine, and what the wall clock shows where the background checkpoint writer has a "
                    f"core of its own (see 'other threads')"),
        Figure(f"train stage step vs bare loop, wall clock ({m} {s_})", ratios["wall"], "x",
               note=f"{where}: as above on the wall clock (noisy where other processes share the cores)"),
        Figure(f"train stage step vs bare loop, process CPU ({m} {s_})", ratios["process CPU"], "x",
               note=f"{where}: as above, all threads' CPU time (counts the background checkpoint writes)"),
        Figure(f"train stage whole epoch vs bare train+val, main-thread CPU ({m} {s_})", whole, "x",
               note=f"{where}: whole cycle incl. validation vs bare epoch + bare no_grad validation forward"),
        Figure(f"train stage CPU s per training sample ({m} {s_})", med(cpu["train_part"]) / n_train, "s",
               note="main thread, epoch cycle minus validation pass"),
        Figure(f"bare loop CPU s per training sample ({m} {s_})", med(cpu["bare_train"]) / n_train, "s",
               note="forward + CE + backward + AdamW step + zero_grad on in-memory tensors"),
        Figure(f"train stage end-of-epoch CPU s ({m} {s_})", med(cpu["end_of_epoch"]), "s",
               note="main thread: metrics, history.csv, TensorBoard, checkpoint snapshots, logging"),
        Figure(f"train stage other threads' CPU s per epoch ({m} {s_})", others, "s",
               note="background checkpoint writer, TensorBoard event writer, progress-bar monitor"),
    ]
    raw = {"argv": argv, "stage_seconds": round(stage_s, 2), "n_train": n_train, "n_val": n_val,
           "per_epoch": {clk: {k: [round(v, 4) for v in vs] for k, vs in seg.items()} for clk, seg in per.items()},
           "step_ratio": ratios}
    log.info("stage %.1f s; step ratio %s; per epoch %s", stage_s, ratios, raw["per_epoch"])
    return figures, raw


# ------------------------------------------------------------------------------------------------ loader
def loader_figures(work: Path, size: int, n_subjects: int, shape: tuple[int, int, int], workers: int, epochs: int,
                   gpu_rate: float | None, gpu_case: str) -> tuple[list[Figure], dict]:
    """Training-loader throughput with ``workers`` worker processes (epochs >= 2: cache + augmentation, OCT+OCTA)
    and, when ``gpu_rate`` (volumes/s of a GPU training step) is given, whether the loader keeps up with it."""
    from benchmarks.data_pipeline import octa3d_epochs
    from octa3d.data.synthetic import generate

    data = work / ("loader-" + "x".join(map(str, shape)))
    if not (data / "Text labels.xlsx").exists():
        generate(data, n_subjects=n_subjects, shape=shape, seed=2)
    res = octa3d_epochs(data, work / "loader-runs", size, epochs, workers=workers)
    rate = sum(res["samples"][1:]) / sum(res["seconds"][1:])
    inp = "x".join(map(str, res["input_shape"]))
    figures = [Figure(f"training loader samples/s, epochs >= 2, {workers} workers ({inp})", rate, "samples/s",
                      note=f"{res['subjects']} subjects of {'x'.join(map(str, shape))}, OCT+OCTA, batch "
                           f"{res['batch_size']}, cache + augmentation")]
    if gpu_rate:
        figures.append(Figure(f"training loader vs {gpu_case} GPU step", rate / gpu_rate, "x", ">= 1",
                              note="samples/s of the loader over volumes/s of the GPU step: >= 1 keeps up "
                                   "(1 input channel on the GPU side, 2 in the loader: pessimistic)"))
    return figures, {"workers": workers, "seconds": res["seconds"], "samples": res["samples"],
                     "input_shape": res["input_shape"]}


# ------------------------------------------------------------------------------------------------ main
def main(args: list[str] | None = None) -> dict:
    """Measure the figures, print the markdown table, optionally write JSON; returns the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (cnn + resnet18 at 16^3; seconds)")
    ap.add_argument("--models", help="comma-separated registry names for the throughput figures "
                                     "(default resnet18,resnet50,densenet121; cnn,resnet18 with --quick)")
    ap.add_argument("--sizes", help="comma-separated isotropic input sizes (default 32,64; 16 with --quick)")
    ap.add_argument("--batch-size", type=int, default=2, help="samples per step (default 2)")
    ap.add_argument("--skip-overhead", action="store_true", help="throughput figures only (no stage run)")
    ap.add_argument("--work", help="folder for the synthetic data and runs (default: a new temporary folder)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    from octa3d.utils.log import setup_logging

    setup_logging("WARNING")
    q = ns.quick
    models = (ns.models or ("cnn,resnet18" if q else "resnet18,resnet50,densenet121")).split(",")
    sizes = [int(s) for s in (ns.sizes or ("16" if q else "32,64")).split(",")]
    ovh = ({"model": "cnn", "size": 16, "n_subjects": 16, "shape": (16, 32, 16), "epochs": 3} if q else
           {"model": "resnet18", "size": 32, "n_subjects": 40, "shape": (32, 64, 32), "epochs": 5})
    tmp = None if ns.work else tempfile.TemporaryDirectory(prefix="octa3d-train-step-")
    work = Path(ns.work or tmp.name)
    n = bench_threads()
    with threads(n):
        figures, step_raw = step_figures(models, sizes, ns.batch_size, 2 if q else 3)
        setup: dict[str, Any] = {**step_raw["setup"], "threads": n}
        extra: dict[str, Any] = {"volumes_per_s": step_raw["volumes_per_s"]}
        if not ns.skip_overhead:
            f, raw = overhead_figures(work, ovh["model"], ovh["size"], ovh["n_subjects"], ovh["shape"],
                                      ovh["epochs"], ns.batch_size)
            figures += f
            setup["overhead"] = {**ovh, "shape": list(ovh["shape"]), "work": str(work)}
            extra["overhead"] = raw
        # the loader at the MFU case's input size (quick: tiny), fed by up to 8 worker processes
        lsize, lshape = (16, (16, 32, 16)) if q else (MFU_SIZE, (64, 128, 64))
        workers = 1 if q else min(8, os.cpu_count() or 1)
        gpu_rate = step_raw["volumes_per_s"].get(f"cuda/{MFU_MODEL}/{MFU_SIZE}/" + str(
            setup.get("mfu", {}).get("variant")))
        f, raw = loader_figures(work, lsize, 8 if q else 16, lshape, workers, 3, gpu_rate, f"{MFU_MODEL} {MFU_SIZE}^3")
        figures += f
        extra["loader"] = raw
    if tmp is not None:
        tmp.cleanup()
    for f in figures:
        if not math.isfinite(f.value):
            log.warning("figure %r is not finite (%s)", f.name, f.value)
    res = result("train_step", figures, setup, q, **extra)
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
