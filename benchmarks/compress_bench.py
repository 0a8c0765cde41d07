"""Edge-deployment figures of project issue #6: fp32 vs pruned vs int8 (and ONNX) on a synthetic hold-out set.

Runs the documented commands in-process (and skips the steps whose outputs already exist)::

    python main.py --mode synth --data-root WORK/data --n-subjects 90 --seed 1
    python main.py --mode train --model resnet18 --input-size 32 --epochs 8 --init random \\
        --runs-dir WORK/runs --exp cmp --data-root WORK/data
    python main.py --mode compress --runs-dir WORK/runs --exp cmp --overwrite [compress flags]

then copies the report's headline numbers to ``--out`` (JSON) and prints a markdown table. Latency uses
``$OCTA3D_BENCH_THREADS`` threads (default 1); ratios are measured within one run.

    python -m benchmarks.compress_bench [--work /tmp/cmp] [--quick] [-- --prune-mode structured ...]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks.common import run_stage


def main(args: list[str] | None = None) -> dict:
    """Build (or reuse) the experiment, compress it, write and return the headline figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/cmp", help="folder for data and runs (reused when present)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (cnn, 16^3, 1 epoch)")
    ap.add_argument("--out", default="benchmarks/results/compress.json")
    ap.add_argument("compress_args", nargs="*", help="extra --mode compress flags (after --)")
    ns = ap.parse_args(args)
    from octa3d.utils.io import atomic_write_text
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
    keys = ("accuracy", "balanced_accuracy", "auc", "size_bytes", "size_ratio", "latency_ms", "speedup", "sparsity")
    result = {"setup": {"model": model, "input_size": int(size), "train_epochs": int(epochs), "subjects": n,
                        "settings": rep["settings"], "latency": {k: rep["latency"][k] for k in
                                                                 ("threads", "runs", "warmup", "input_shape")}},
              "models": {k: {f: v[f] for f in keys} for k, v in rep["models"].items()},
              "targets": rep["targets"], "quantized_modules": rep["quantization"]["quantized_modules"]}
    atomic_write_text(ns.out, json.dumps(result, indent=2) + "\n")
    print("| model | bal. acc | AUC | size ratio | speed-up |\n|---|---|---|---|---|")
    for k, v in result["models"].items():
        auc = v["auc"] if v["auc"] is not None else float("nan")
        print(f"| {k} | {v['balanced_accuracy']:.3f} | {auc:.3f} | {v['size_ratio']:.2f}x | {v['speedup']:.2f}x |")
    return result


if __name__ == "__main__":
    main()
