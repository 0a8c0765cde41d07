"""Does masked-autoencoder pretraining help a small 3D ViT? MAE curves and --init ae vs --init random, same splits.

Set-up (synthetic, CPU): a small labelled OCTA-500 set (6 mm, binary NORMAL vs CNV) plus unlabeled 3 mm eyes used
only by ``ae_pretrain`` through ``--ae-extra-data`` (different IDs, so the leakage guard accepts them). The model
is a small 3D ViT (patch 8, width 96, 4 blocks, 4 heads; registered for this run only) at a 32³ input, i.e. 64
patches of which ``--mask-ratio`` are hidden during pretraining. ae_pretrain (masked autoencoding) -> train
--init ae -> test, and train --init random -> test, identical splits, seeds and epochs; figures are hold-out test
metrics (probability-based AUC, balanced accuracy, bootstrap 95 % CIs from ``--mode test``) of both starts.

    python -m benchmarks.mae_transfer [--quick] [--ae-epochs N] [--epochs N] [--labelled N] [--extra N]
                                      [--mask-ratio R] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import pandas as pd

from benchmarks.common import Figure, finish, quiet_logs, result, run_stage

MODEL = "vit-mae-bench"
#: The benchmark's ViT: small enough for a CPU, deep enough that pretraining has layers to shape.
VIT = {"patch_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_layers": 4, "num_heads": 4}
QUICK_VIT = {"patch_size": 8, "hidden_size": 24, "mlp_dim": 48, "num_layers": 1, "num_heads": 2}


def register(options: dict) -> None:
    """Register the benchmark ViT under :data:`MODEL` (a ViT of the registry's family, sized by ``options``)."""
    from octa3d.model.registry import register_model
    from octa3d.model.vit import vit

    register_model(MODEL, cam_layer="cam_grid", min_input=16, feature_size=options["hidden_size"],
                   stages=(("patch_embedding", "cls_token"), ("blocks", "norm")),
                   head_prefixes=("classification_head",), needs_input_size=True,
                   description="benchmark ViT")(partial(vit, **options))


def main(args: list[str] | None = None) -> dict:
    """Run the comparison and write a JSON result; returns it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--ae-epochs", type=int, help="MAE pretraining epochs (default 20; 1 with --quick)")
    ap.add_argument("--epochs", type=int, help="classifier epochs per start (default 60; 1 with --quick)")
    ap.add_argument("--labelled", type=int, help="labelled eyes (default 40; 16 with --quick)")
    ap.add_argument("--extra", type=int, help="unlabeled extra eyes for pretraining (default 60; 4 with --quick)")
    ap.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden (default 0.75)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    from octa3d.data.synthetic import generate
    from octa3d.model.registry import _REGISTRY

    quiet_logs()
    q = ns.quick
    n_lab, n_extra, shape = (16, 4, (16, 32, 16)) if q else (40, 60, (32, 64, 32))
    n_lab, n_extra = ns.labelled or n_lab, ns.extra if ns.extra is not None else n_extra
    size = "16" if q else "32"
    # the masked-patch loss levels off after ~12 epochs here; a ViT from scratch needs hundreds of steps
    ae_epochs = ns.ae_epochs or (1 if q else 20)
    epochs = ns.epochs or (1 if q else 60)
    options = QUICK_VIT if q else VIT
    register(options)
    # removed at the end, and by its finaliser at interpreter exit when a stage fails
    tmp = tempfile.TemporaryDirectory(prefix="octa3d-mae-bench-")
    work = Path(tmp.name)
    try:
        generate(work / "labelled", n_subjects=n_lab, shape=shape, seed=1, classes=("NORMAL", "CNV"))
        generate(work / "extra", n_subjects=n_extra, shape=shape, seed=2, fov="3mm")
        setup = {"labelled_eyes": n_lab, "extra_unlabeled_eyes": n_extra, "shape": list(shape),
                 "input_size": int(size), "vit": options, "mask_ratio": ns.mask_ratio, "ae_epochs": ae_epochs,
                 "train_epochs": epochs, "task": "binary NORMAL vs CNV", "modality": "OCTA"}
        common = ["--data-root", str(work / "labelled"), "--runs-dir", str(work / "runs"), "--model", MODEL,
                  "--input-size", size, "--batch-size", "4", "--seed", "7", "--exp", "vit-mae"]
        t0 = time.perf_counter()
        run_stage(["--mode", "ae_pretrain", "--epochs", str(ae_epochs), "--lr", "1e-3", "--patience", "0",
                   "--mask-ratio", str(ns.mask_ratio), "--ae-extra-data", str(work / "extra"), *common])
        ae_s = time.perf_counter() - t0
        hist = pd.read_csv(work / "runs" / "vit-mae" / "ae_pretrain" / "history.csv")
        rows = {}
        for init in ("ae", "random"):
            t0 = time.perf_counter()
            summary = run_stage(["--mode", "train", "--init", init, "--epochs", str(epochs), "--lr", "5e-4",
                                 "--patience", "0", "--overwrite", *common])
            train_s = time.perf_counter() - t0
            curve = pd.read_csv(work / "runs" / "vit-mae" / "train" / "history.csv")["balanced_accuracy"]
            m = run_stage(["--mode", "test", "--cam", "none", "--bootstrap", "200", "--overwrite", *common])
            rows[init] = {"balanced_accuracy": m["balanced_accuracy"], "auc": m["auc"],
                          "ci95": {k: m["ci95"].get(k) for k in ("balanced_accuracy", "auc")},
                          "n_test": int(sum(map(sum, m["confusion_matrix"]))), "train_seconds": round(train_s, 1),
                          "validation": {k: round(v, 4) for k, v in summary["mean"].items()},
                          "val_balanced_accuracy_per_epoch": [round(v, 3) for v in curve]}
    finally:
        _REGISTRY.pop(MODEL, None)
        tmp.cleanup()
    val = hist["val_loss"].tolist()
    per_model = {MODEL: {"mae_train_loss": [round(v, 5) for v in hist["train_loss"]],
                         "mae_val_loss": [round(v, 5) for v in val], "mae_seconds": round(ae_s, 1),
                         "test_init_ae": rows["ae"], "test_init_random": rows["random"]}}
    figures: list[Figure] = []
    if max(rows[i]["balanced_accuracy"] or 0.0 for i in rows) < 0.9:
        # both starts weak: the difference between them says little (README "Multi-class")
        figures.append(Figure("vit MAE vs random: NOT MEANINGFUL (both below 0.9 balanced accuracy)",
                              rows["ae"]["balanced_accuracy"] or 0.0, "", note="train longer before comparing"))
    figures += [Figure("vit MAE masked-patch val loss last/first", val[-1] / val[0], "x",
                       note=f"{len(val)} epochs, mask ratio {ns.mask_ratio}, {ae_s:.0f} s"),
                *(Figure(f"vit test {k} init {'MAE' if i == 'ae' else i}",
                         rows[i][k] if rows[i][k] is not None else float("nan"), "",
                         note=f"95% CI {rows[i]['ci95'][k]}, {rows[i]['n_test']} hold-out eyes")
                  for k in ("balanced_accuracy", "auc") for i in ("ae", "random")),
                *(Figure(f"vit val balanced_accuracy init {'MAE' if i == 'ae' else i}",
                         rows[i]["validation"]["balanced_accuracy"], "", note="best epoch") for i in ("ae", "random"))]
    res = result("mae_transfer", figures, setup, q, models=per_model)
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
