"""Calibration and per-eye uncertainty on generated eyes (issue 17): what temperature scaling does to the hold-out,
whether the ``uncertain`` flag finds the errors, and what ``--tta 8`` costs.

For each task (4-class NORMAL/AMD/CNV/CSC and binary NORMAL vs CNV), generated eyes (OCTA-500 layout) go through
the documented commands with the stock settings except a shortened training (``--epochs``, default 20: the stock
60 epochs classify these eyes almost perfectly, and a model without errors says nothing about calibration)::

    python main.py --mode prepare|train|test --data-root WORK/data-<task> --exp <task> --seed <seed> \\
        --task ... --model cnn --input-size 32 --modality OCT+OCTA --epochs 20

Figures (hold-out subjects only; the temperature and the entropy threshold come from the validation split):
hold-out ECE (equal-mass bins) and NLL with the raw softmax vs temperature-scaled; the error rate of the eyes
flagged ``uncertain`` vs the unflagged ones (the flag should concentrate errors); the test wall time with
``--tta 8`` vs without on the binary model (TTA gives the spread ``p_sd`` of binary tasks only).

    python -m benchmarks.calibration [--quick] [--epochs 20] [--seed 1] [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, finish, quiet_logs, result, run_stage

log = logging.getLogger("octa3d.bench")

TASKS: dict[str, dict[str, Any]] = {
    "multi": {"classes": ("NORMAL", "AMD", "CNV", "CSC"), "flags": ["--task", "multi"]},
    "binary": {"classes": ("NORMAL", "CNV"), "flags": ["--task", "binary"]},
}


def _test(common: list[str], extra: list[str], bootstrap: int) -> tuple[dict[str, Any], float]:
    """One ``--mode test`` run (CAMs off): its metrics and wall seconds."""
    t0 = time.perf_counter()
    m = run_stage([*common, "--mode", "test", "--cam", "none", "--bootstrap", str(bootstrap), "--overwrite",
                   *extra])
    return m, time.perf_counter() - t0


def _task(work: Path, task: str, n: int, shape: tuple[int, ...], size: int, epochs: int, seed: int, tta: int,
          bootstrap: int) -> dict[str, Any]:
    """Generate, prepare, train and test one task; its calibration/uncertainty figures (and TTA timing)."""
    from octa3d.data.synthetic import generate

    data = work / f"data-{task}-{n}"
    if not (data / "synthetic.json").is_file():
        generate(data, n, shape, seed=200 + len(task), classes=TASKS[task]["classes"])
    common = ["--data-root", str(data), "--runs-dir", str(work / "runs"), "--exp", f"{task}-s{seed}",
              "--seed", str(seed), "--model", "cnn", "--input-size", str(size), "--modality", "OCT+OCTA",
              "--log-level", "WARNING", *TASKS[task]["flags"]]
    run_stage([*common, "--mode", "prepare", "--overwrite"])
    run_stage([*common, "--mode", "train", "--init", "random", "--epochs", str(epochs), "--overwrite"])
    m, plain_s = _test(common, [], bootstrap)
    cal, unc = m["calibration"], m["uncertainty"]
    row: dict[str, Any] = {
        "n_test": int(m["n_subjects"]), "balanced_accuracy": m["balanced_accuracy"], "auc": m["auc"],
        "temperature": cal["temperature"], "ece_bins": m.get("ece_bins"),
        "ece_raw": cal["raw"]["ece"], "ece_calibrated": cal["calibrated"]["ece"],
        "nll_raw": cal["raw"]["nll"], "nll_calibrated": cal["calibrated"]["nll"],
        "brier_raw": cal["raw"]["brier"], "brier_calibrated": cal["calibrated"]["brier"],
        "n_errors": int(round((1 - m["accuracy"]) * m["n_subjects"])),
        "n_flagged": unc.get("n_flagged"), "share_flagged": unc.get("share_flagged"),
        "error_rate_flagged": unc.get("error_rate_flagged"), "error_rate_unflagged": unc.get("error_rate_unflagged"),
        "test_seconds": round(plain_s, 2)}
    if tta and task == "binary":
        mt, tta_s = _test(common, ["--tta", str(tta)], bootstrap)
        row.update(tta=tta, test_seconds_tta=round(tta_s, 2), p_sd_mean=mt["uncertainty"].get("p_sd_mean"),
                   tta_probabilities_unchanged=bool(abs(mt["auc"] - m["auc"]) < 1e-12))
    return row


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def main(args: list[str] | None = None) -> dict:
    """Run the calibration benchmark; write and return the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): 16 eyes, 16^3, 1 epoch, --tta 2")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs (default 20: an imperfect model)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", help="folder for data and runs (default: a temporary folder, removed)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    quiet_logs()
    q = ns.quick
    n, shape, size, epochs, tta, boot = ((16, (16, 32, 16), 16, 1, 2, 50) if q
                                         else (120, (32, 64, 32), 32, ns.epochs, 8, 1000))
    tmp = None if ns.work else tempfile.TemporaryDirectory(prefix="octa3d-calibration-")
    work = Path(ns.work or tmp.name)
    runs = {task: _task(work, task, n, shape, size, epochs, ns.seed, tta, boot) for task in TASKS}
    figures: list[Figure] = []
    for task, r in runs.items():
        note = (f"{r['n_test']} hold-out eyes, {r['n_errors']} errors, balanced accuracy "
                f"{r['balanced_accuracy']:.3f}; T = {r['temperature']} fitted on validation; {r['ece_bins']} bins")
        figures += [Figure(f"{task}: hold-out ECE raw", r["ece_raw"], "", note=note),
                    Figure(f"{task}: hold-out ECE temperature-scaled", r["ece_calibrated"], "",
                           note=f"NLL {r['nll_raw']:.3f} -> {r['nll_calibrated']:.3f}"),
                    Figure(f"{task}: error rate of eyes flagged uncertain", _num(r["error_rate_flagged"]), "",
                           note=f"{r['n_flagged']} of {r['n_test']} flagged (threshold for 90 % coverage on "
                                f"validation)"),
                    Figure(f"{task}: error rate of unflagged eyes", _num(r["error_rate_unflagged"]), "")]
    b = runs["binary"]
    if "test_seconds_tta" in b:
        figures.append(Figure(f"binary: test wall time --tta {b['tta']} vs none", b["test_seconds_tta"] /
                              b["test_seconds"], "x", note=f"{b['test_seconds']:.1f} s vs {b['test_seconds_tta']:.1f}"
                              f" s incl. bootstrap, CAMs off; mean p_sd {_num(b['p_sd_mean']):.4f}"))
    setup = {"eyes": n, "shape": list(shape), "input_size": size, "model": "cnn", "modality": "OCT+OCTA",
             "epochs": epochs, "seed": ns.seed, "bootstrap": boot,
             "settings": "stock --mode train defaults except --epochs (see module docstring)"}
    if tmp is not None:
        tmp.cleanup()
    return finish(result("calibration", figures, setup, q, runs=runs), ns.out)


if __name__ == "__main__":
    main()
