"""Does autoencoder pretraining help? Reconstruction curves and --init ae vs --init random, same splits.

Set-up (synthetic, CPU): a small labelled OCTA-500 set (6 mm, binary NORMAL vs disease) plus unlabeled 3 mm eyes
used only by ``ae_pretrain`` through ``--ae-extra-data`` (different IDs, so the leakage guard accepts them).
For each model: ae_pretrain -> train --init ae -> test, and train --init random -> test, identical splits, seeds
and epochs; figures are hold-out test metrics (probability-based AUC, balanced accuracy) of both initialisations.

    python -m benchmarks.ae_transfer [--quick] [--models cnn,resnet18] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.common import Figure, finish, quiet_logs, result, run_stage


def main(args: list[str] | None = None) -> dict:
    """Run the comparison and write a JSON result; returns it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--models", help="comma-separated registry names (default cnn,resnet18; cnn with --quick)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    from octa3d.data.synthetic import generate

    quiet_logs()
    q = ns.quick
    ns.models = ns.models or ("cnn" if q else "cnn,resnet18")
    n_lab, n_extra, shape = (16, 4, (16, 32, 16)) if q else (40, 60, (32, 64, 32))
    size, ae_epochs, epochs = ("16", 1, 1) if q else ("32", 10, 20)
    # removed at the end, and by its finaliser at interpreter exit when a stage fails (runs hold ~1.6 GB)
    tmp = tempfile.TemporaryDirectory(prefix="octa3d-ae-bench-")
    work = Path(tmp.name)
    generate(work / "labelled", n_subjects=n_lab, shape=shape, seed=1, classes=("NORMAL", "CNV"))
    generate(work / "extra", n_subjects=n_extra, shape=shape, seed=2, fov="3mm")
    setup = {"labelled_eyes": n_lab, "extra_unlabeled_eyes": n_extra, "shape": list(shape), "input_size": int(size),
             "ae_epochs": ae_epochs, "train_epochs": epochs, "task": "binary NORMAL vs CNV", "modality": "OCTA",
             "models": ns.models.split(",")}
    figures: list[Figure] = []
    per_model: dict = {}
    for model in ns.models.split(","):
        common = ["--data-root", str(work / "labelled"), "--runs-dir", str(work / "runs"), "--model", model,
                  "--input-size", size, "--batch-size", "4", "--seed", "7", "--exp", f"{model}-ae"]
        t0 = time.perf_counter()
        run_stage(["--mode", "ae_pretrain", "--epochs", str(ae_epochs), "--lr", "1e-3", "--patience", "0",
                   "--ae-extra-data", str(work / "extra"), *common])
        ae_s = time.perf_counter() - t0
        hist = pd.read_csv(work / "runs" / f"{model}-ae" / "ae_pretrain" / "history.csv")
        rows = {}
        for init in ("ae", "random"):
            t0 = time.perf_counter()
            summary = run_stage(["--mode", "train", "--init", init, "--epochs", str(epochs), "--lr", "1e-3",
                                 "--patience", "0", "--overwrite", *common])
            train_s = time.perf_counter() - t0
            m = run_stage(["--mode", "test", "--cam", "none", "--bootstrap", "200", "--overwrite", *common])
            rows[init] = {"balanced_accuracy": m["balanced_accuracy"], "auc": m["auc"],
                          "ci95": {k: m["ci95"].get(k) for k in ("balanced_accuracy", "auc")},
                          "n_test": int(sum(map(sum, m["confusion_matrix"]))), "train_seconds": round(train_s, 1),
                          "validation": {k: round(v, 4) for k, v in summary["mean"].items()}}
        val = hist["val_loss"].tolist()
        per_model[model] = {"ae_train_loss": [round(v, 5) for v in hist["train_loss"]],
                            "ae_val_loss": [round(v, 5) for v in val], "ae_seconds": round(ae_s, 1),
                            "test_init_ae": rows["ae"], "test_init_random": rows["random"]}
        weak = max(rows[i]["balanced_accuracy"] or 0.0 for i in rows) < 0.9
        if weak:  # both initialisations weak: the difference between them says little (README "Multi-class")
            figures.append(Figure(f"{model} ae vs random: NOT MEANINGFUL (both below 0.9 balanced accuracy)",
                                  rows["ae"]["balanced_accuracy"] or 0.0, "", note="train longer before comparing"))
        figures += [Figure(f"{model} AE val loss last/first", val[-1] / val[0], "x",
                           note=f"{len(val)} epochs, {ae_s:.0f} s"),
                    *(Figure(f"{model} test {k} init {i}", rows[i][k] if rows[i][k] is not None else float("nan"), "",
                             note=f"95% CI {rows[i]['ci95'][k]}, {rows[i]['n_test']} hold-out eyes")
                      for k in ("balanced_accuracy", "auc") for i in ("ae", "random")),
                    *(Figure(f"{model} val balanced_accuracy init {i}", rows[i]["validation"]["balanced_accuracy"], "",
                             note="best epoch") for i in ("ae", "random"))]
    tmp.cleanup()
    res = result("ae_transfer", figures, setup, q, models=per_model)
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
