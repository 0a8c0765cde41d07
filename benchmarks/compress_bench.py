"""Edge-deployment figures of project issue #6: fp32 vs pruned vs int8 (and ONNX) on a synthetic hold-out set.

Runs the documented commands in-process (and skips the steps whose outputs already exist)::

    python main.py --mode synth --data-root WORK/data --n-subjects 90 --seed 1
    python main.py --mode train --model resnet18 --input-size 32 --epochs 8 --init random \\
        --runs-dir WORK/runs --exp cmp --data-root WORK/data
    python main.py --mode compress --runs-dir WORK/runs --exp cmp --overwrite [compress flags]

and returns the report's headline figures (targets of issue 6) in the benchmarks' result format. Latency uses
``$OCTA3D_BENCH_THREADS`` threads (default 1); ratios are measured within one run.

    python -m benchmarks.compress_bench [--work /tmp/cmp] [--quick] [-- --prune-mode structured ...]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.common import Figure, finish, result, run_stage


def main(args: list[str] | None = None) -> dict:
    """Build (or reuse) the experiment, compress it, write and return the headline figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/cmp", help="folder for data and runs (reused when present)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (cnn, 16^3, 1 epoch)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ap.add_argument("compress_args", nargs="*", help="extra --mode compress flags (after --)")
    ns = ap.parse_args(args)
    from octa3d.utils.log import setup_logging

    setup_logging("WARNING")
    logging.getLogger("octa3d").setLevel(logging.WARNING)
    work = Path(ns.work)
    n, model, size, epochs = (24, "cnn", "16", "1") if ns.quick else (90, "resnet18", "32", "8")
    if not (work / "data").exists():
        run_stage(["--mode", "synth", "--data-root", str(work / "data"), "--n-subjects", str(n), "--seed", "1"])
    common = ["--runs-dir", str(work / "runs"), "--exp", "cmp"]
    if not (work / "runs" / "cmp" / "train" / "checkpoints" / "best.pt").exists():
        run_stage(["--mode", "train", "--model", model, "--input-size", size, "--epochs", epochs, "--init", "random",
                   "--data-root", str(work / "data"), *common])
    rep = run_stage(["--mode", "compress", *common, "--overwrite", *ns.compress_args])
    figures = [Figure(k, t["value"],
                      "pp" if k.endswith("_pp") else "x", t["target"], t["met"], "int8 vs fp32, hold-out set")
               for k, t in rep["targets"].items()]
    for k, v in rep["models"].items():
        figures.append(Figure(f"{k} balanced accuracy", v["balanced_accuracy"], "", note=f"{v['latency_ms']:.1f} ms, "
                              f"{v['size_bytes'] / 1e6:.1f} MB, sparsity {v['sparsity'] or 0:.2f}"))
    setup = {"model": model, "input_size": int(size), "train_epochs": int(epochs), "subjects": n,
             "settings": rep["settings"],
             "latency": {k: rep["latency"][k] for k in ("threads", "runs", "warmup", "input_shape")},
             "quantized_modules": rep["quantization"]["quantized_modules"]}
    keys = ("accuracy", "balanced_accuracy", "auc", "size_bytes", "size_ratio", "latency_ms", "speedup", "sparsity")
    res = result("compress", figures, setup, ns.quick,
                 models={k: {f: v[f] for f in keys} for k, v in rep["models"].items()})
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
