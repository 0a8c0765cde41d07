"""Does autoencoder pretraining help? Reconstruction curves and --init ae vs --init random, same splits.

Set-up (synthetic, CPU): a small labelled OCTA-500 set (6 mm, binary NORMAL vs disease) plus unlabeled 3 mm eyes
used only by ``ae_pretrain`` through ``--ae-extra-data`` (different IDs, so the leakage guard accepts them).
For each model: ae_pretrain -> train --init ae, and train --init random, identical splits, seeds and epochs.

    python -m benchmarks.ae_transfer [--quick] [--models cnn,resnet18] [--out benchmarks/results/ae_transfer.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import run_stage


def main(args: list[str] | None = None) -> dict:
    """Run the comparison and write a JSON result; returns it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--out", default="benchmarks/results/ae_transfer.json")
    ns = ap.parse_args(args)
    from octa3d.data.synthetic import generate
    from octa3d.utils.log import setup_logging

    setup_logging("WARNING")
    logging.getLogger("octa3d").setLevel(logging.WARNING)
    q = ns.quick
    n_lab, n_extra, shape = (16, 4, (16, 32, 16)) if q else (40, 60, (32, 64, 32))
    size, ae_epochs, epochs = ("16", 1, 1) if q else ("32", 10, 10)
    work = Path(tempfile.mkdtemp(prefix="octa3d-ae-bench-"))
    generate(work / "labelled", n_subjects=n_lab, shape=shape, seed=1)
    generate(work / "extra", n_subjects=n_extra, shape=shape, seed=2, fov="3mm")
    result: dict = {"setup": {"labelled_eyes": n_lab, "extra_unlabeled_eyes": n_extra, "shape": list(shape),
                              "input_size": int(size), "ae_epochs": ae_epochs, "train_epochs": epochs,
                              "task": "binary NORMAL vs disease", "modality": "OCTA"}, "models": {}}
    for model in ns.models.split(","):
        common = ["--data-root", str(work / "labelled"), "--runs-dir", str(work / "runs"), "--model", model,
                  "--input-size", size, "--batch-size", "4", "--seed", "7", "--patience", "0"]
        t0 = time.perf_counter()
        run_stage(["--mode", "ae_pretrain", "--exp", f"{model}-ae", "--epochs", str(ae_epochs), "--lr", "1e-3",
                   "--ae-extra-data", str(work / "extra"), *common])
        ae_s = time.perf_counter() - t0
        hist = pd.read_csv(work / "runs" / f"{model}-ae" / "ae_pretrain" / "history.csv")
        rows = {}
        for init in ("ae", "random"):
            t0 = time.perf_counter()
            summary = run_stage(["--mode", "train", "--exp", f"{model}-ae", "--init", init, "--epochs", str(epochs),
                                 "--lr", "1e-3", "--overwrite", *common])
            rows[init] = {**{k: round(v, 4) for k, v in summary["mean"].items()},
                          "seconds": round(time.perf_counter() - t0, 1)}
        result["models"][model] = {
            "ae_train_loss": [round(v, 5) for v in hist["train_loss"]],
            "ae_val_loss": [round(v, 5) for v in hist["val_loss"]],
            "ae_seconds": round(ae_s, 1),
            "train_init_ae": rows["ae"], "train_init_random": rows["random"],
        }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
