"""Measurements of the compress report: hold-out metrics, CPU latency, serialized size.

Latency is measured for all variants in one interleaved loop (each repetition calls every model once, in a
rotating order), so load from other processes on a shared machine slows all variants alike and the *ratios*
stay meaningful; the median over the repetitions is reported, warm-up calls excluded.
"""

from __future__ import annotations

import io
import logging
import os
import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from octa3d.evaluation.forward import predict
from octa3d.evaluation.metrics import classification_metrics, confusion
from octa3d.stages.compress.quantize import engine_candidates, packing_engine, quantized_engine, quiet
from octa3d.training.precision import Precision

log = logging.getLogger("octa3d.compress")

LATENCY_RUNS = 30
LATENCY_WARMUP = 5
#: Environment variable that sets the benchmark's thread count (default 1).
THREADS_ENV = "OCTA3D_BENCH_THREADS"


def bench_threads() -> int:
    """Threads of the latency benchmark: ``$OCTA3D_BENCH_THREADS``, default 1, at most the usable cores.

    One thread by default: on a machine shared with other jobs, OpenMP threads that wait for a busy core make
    multi-threaded timings (of small 3D networks especially) swing by orders of magnitude, while single-thread
    timings stay comparable; it is also the edge-device case.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        cores = os.cpu_count() or 1
    try:
        wanted = int(os.environ.get(THREADS_ENV, "1"))
    except ValueError:
        wanted = 1
    return max(1, min(wanted, cores))


def evaluate(model: nn.Module, loader: Any) -> dict[str, Any]:
    """Subject-level hold-out metrics of one model on the CPU (fp32 inputs).

    Returns:
        ``metrics`` (accuracy, balanced_accuracy, auc from probabilities, f1_macro), ``confusion_matrix``,
        ``ids``, ``labels`` and ``probs`` (arrays kept for agreement checks).
    """

    with quiet():
        ids, y, probs, _ = predict(model, loader, Precision(torch.device("cpu"), None, None))
    return {"metrics": classification_metrics(y, probs), "confusion_matrix": confusion(y, probs).tolist(),
            "ids": ids, "labels": y, "probs": probs}


def latency(models: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, threads: int,
            runs: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP) -> dict[str, dict[str, float]]:
    """Per-call CPU latency (batch of ``x``), interleaved across models.

    Args:
        models: name → callable taking ``x`` (PyTorch, TorchScript or :class:`~octa3d.checkpoint.exports.OnnxModule`
            built with the same thread count).
        x: the input (the same tensor for every model and call).
        threads: ``torch.set_num_threads`` during the measurement (restored afterwards).
        runs: timed calls per model (median reported).
        warmup: untimed calls per model first (TorchScript profiling, allocator, onnxruntime arenas).

    Returns:
        name → ``median_ms``, ``p10_ms``, ``p90_ms``, ``runs``.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        with torch.inference_mode(), quiet():
            for n in names:
                for _ in range(warmup):
                    models[n](x)
            for i in range(runs):
                for n in names[i % len(names):] + names[:i % len(names)]:  # rotate: no model always runs first
                    t0 = time.perf_counter()
                    models[n](x)
                    times[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return {n: {"median_ms": 1000 * statistics.median(t), "p10_ms": 1000 * float(np.percentile(t, 10)),
                "p90_ms": 1000 * float(np.percentile(t, 90)), "runs": len(t)} for n, t in times.items()}


def torchscript_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    """The TorchScript file a float model would be shipped as (same container as ``model_int8.pt``)."""
    with quiet(), torch.no_grad():
        traced = torch.jit.trace(model.cpu().eval(), x.cpu(), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()


def compressed_size(data: bytes) -> int:
    """zlib (level 1) size: what unstructured zeros save when a file is zipped for transfer."""
    return len(zlib.compress(data, 1))


class _EngineCall:
    """Call a TorchScript int8 model with a given quantized engine active (for interleaved timing)."""

    def __init__(self, model: Callable[[torch.Tensor], Any], engine: str) -> None:
        self.model, self.engine = model, engine

    def __call__(self, x: torch.Tensor) -> Any:
        with quantized_engine(self.engine):
            return self.model(x)


def pick_engine(converted: nn.Module, x: torch.Tensor, backend: str, threads: int, runs: int = 8
                ) -> tuple[str, dict[str, float]]:
    """The fastest quantized engine for the int8 model of ``backend`` on this machine.

    The model is serialized once (as ``model_int8.pt`` will be) and loaded under every candidate engine of
    :func:`~octa3d.stages.compress.quantize.engine_candidates` (loading repacks the int8 weights for that engine); the
    candidates are timed interleaved on ``x``.

    Returns:
        ``(engine, {engine: median ms})``; the timings are empty when there is a single candidate.
    """
    candidates = engine_candidates(backend)
    if len(candidates) == 1:
        return candidates[0], {}
    with quiet(), quantized_engine(packing_engine(backend)), torch.no_grad():
        traced = torch.jit.trace(converted.eval(), x.cpu(), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    calls = {}
    for e in candidates:
        buf.seek(0)
        with quantized_engine(e):
            calls[e] = _EngineCall(torch.jit.load(buf, map_location="cpu"), e)
    timed = latency(calls, x, threads, runs=runs, warmup=2)
    ms = {e: t["median_ms"] for e, t in timed.items()}
    return min(ms, key=ms.get), ms
