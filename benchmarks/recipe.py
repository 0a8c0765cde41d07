"""The training recipe on generated eyes: binary and 4-class hold-out results with the default settings, and the
ablations that explain the multi-class defaults.

For each task (binary NORMAL vs CNV; 4-class NORMAL/AMD/CNV/CSC) and seed: generate the eyes (OCTA-500 layout,
lesion masks), then run the documented commands with the **stock settings** of ``--mode train`` (epochs, schedule,
learning rate, loss, augmentation, early stopping, ``--modality`` advice) and only the CPU-sized model fixed
(``--model cnn --input-size 32``, as in the demo)::

    python main.py --mode prepare|train|test --data-root WORK/data-<task> --exp <task>-s<seed> --seed <seed> \\
        --task binary|multi [--classes ...] --model cnn --input-size 32 --modality OCT+OCTA

Figures are hold-out test metrics (subjects never seen in training; probability-based AUC; 95 % cluster-bootstrap
CIs), per-class recall, and CPU wall time per run. ``--ablate`` adds 4-class runs (first seed) that change one
setting at a time against the recipe, to show which settings the multi-class defaults depend on.

    python -m benchmarks.recipe [--quick] [--ablate] [--seeds 1,2] [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, finish, quiet_logs, result, run_stage

log = logging.getLogger("octa3d.bench")

TASKS: dict[str, dict[str, Any]] = {
    "binary": {"classes": ("NORMAL", "CNV"), "flags": ["--task", "binary"]},
    "multi": {"classes": ("NORMAL", "AMD", "CNV", "CSC"), "flags": ["--task", "multi"]},
}

#: One change at a time against the recipe (4-class, first seed): name -> extra flags.
ABLATIONS: dict[str, list[str]] = {
    "OCTA only": ["--modality", "OCTA"],
    "30 epochs (the old default)": ["--epochs", "30"],
    "lr 1e-3 (the old demo's)": ["--lr", "1e-3"],
    "no augmentation": ["--no-augment"],
    "monitor val_loss": ["--monitor", "val_loss"],
}


def _run(work: Path, task: str, seed: int, n: int, shape: tuple[int, ...], size: int, extra: list[str],
         exp: str, quick: bool) -> dict[str, Any]:
    """prepare -> train -> test of one experiment; its hold-out metrics and wall time (reused from ``row.json`` of
    an earlier run in the same ``--work`` folder)."""
    import json

    from octa3d.data.synthetic import generate
    from octa3d.utils.io import atomic_write_json

    saved = work / "runs" / exp / "row.json"
    if saved.is_file():
        log.warning("%s: reusing the result in %s", exp, saved)
        return json.loads(saved.read_text(encoding="utf-8"))

    data = work / f"data-{task}-{n}"
    if not (data / "synthetic.json").is_file():
        generate(data, n, shape, seed=100 + len(task), classes=TASKS[task]["classes"])
    common = ["--data-root", str(data), "--runs-dir", str(work / "runs"), "--exp", exp, "--seed", str(seed),
              "--model", "cnn", "--input-size", str(size), "--modality", "OCT+OCTA", "--log-level", "WARNING",
              *TASKS[task]["flags"], *extra]
    t0 = time.perf_counter()
    run_stage([*common, "--mode", "prepare"])
    train_extra = ["--epochs", "1"] if quick else []
    summary = run_stage([*common, "--mode", "train", "--init", "random", *train_extra])
    train_s = time.perf_counter() - t0
    m = run_stage([*common, "--mode", "test", "--cam", "none", "--bootstrap", "200" if quick else "1000"])
    row = {"balanced_accuracy": m["balanced_accuracy"], "f1_macro": m["f1_macro"], "auc": m["auc"],
            "ci95": {k: m["ci95"].get(k) for k in ("balanced_accuracy", "f1_macro", "auc")},
            "recall": {c: v["recall"] for c, v in m["per_class"].items()},
            "n_test": int(m["n_subjects"]), "best_epoch": int(summary["folds"]["fold-0"].get("epoch", 0)),
            "epochs_run": _epochs_run(work / "runs" / exp / "train" / "history.csv"),
            "seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(train_s, 1)}
    atomic_write_json(saved, row)
    return row


def _epochs_run(history: Path) -> int:
    """Epochs in a training history.csv (early stopping may end before --epochs)."""
    return max(0, len(history.read_text(encoding="utf-8").splitlines()) - 1) if history.is_file() else 0


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def main(args: list[str] | None = None) -> dict:
    """Run the recipe (and ablations); write and return the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): 16 eyes, 16^3, 1 epoch, 1 seed")
    ap.add_argument("--ablate", action="store_true", help="also the 4-class ablations (first seed)")
    ap.add_argument("--seeds", default="1,2", help="comma-separated split/training seeds (default 1,2)")
    ap.add_argument("--work", help="folder for data and runs (default: a temporary folder, removed)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    quiet_logs()
    q = ns.quick
    n, shape, size = (16, (16, 32, 16), 16) if q else (120, (32, 64, 32), 32)
    seeds = [int(s) for s in ns.seeds.split(",")][: 1 if q else None]
    tmp = None if ns.work else tempfile.TemporaryDirectory(prefix="octa3d-recipe-")
    work = Path(ns.work or tmp.name)
    runs: dict[str, dict[str, Any]] = {}
    figures: list[Figure] = []
    for task in TASKS:
        rows = []
        for seed in seeds:
            rows.append(_run(work, task, seed, n, shape, size, [], f"{task}-s{seed}", q))
            runs[f"{task} seed {seed}"] = rows[-1]
        seeds_note = f"mean of {len(rows)} seed(s) {','.join(map(str, seeds))}; {rows[0]['n_test']} hold-out eyes " \
                     f"each; CIs per seed in the JSON"
        if task == "binary":
            figures.append(Figure("binary balanced accuracy", _mean(rows, "balanced_accuracy"), "", ">= 0.95",
                                  note=seeds_note))
        else:
            worst = min(min(r["recall"].values()) for r in rows)
            figures += [Figure("4-class macro-F1", _mean(rows, "f1_macro"), "", ">= 0.85", note=seeds_note),
                        Figure("4-class lowest per-class recall (any seed)", worst, "", ">= 0.6"),
                        Figure("4-class balanced accuracy", _mean(rows, "balanced_accuracy"), "", note=seeds_note)]
        figures += [Figure(f"{task} AUC", _mean(rows, "auc"), "", note=seeds_note),
                    Figure(f"{task} wall time per run (prepare+train+test)", _mean(rows, "seconds"), "s",
                           note=f"{n} eyes, cnn {size}^3, CPU")]
    if ns.ablate and not q:
        base = runs[f"multi seed {seeds[0]}"]
        for name, extra in ABLATIONS.items():
            row = _run(work, "multi", seeds[0], n, shape, size, extra, "abl-" + "-".join(extra).strip("-"), q)
            runs[f"ablation: {name}"] = row
            figures.append(Figure(f"ablation {name}: 4-class macro-F1", row["f1_macro"], "",
                                  note=f"recipe {base['f1_macro']:.3f} (same seed); lowest recall "
                                       f"{min(row['recall'].values()):.2f}; {row['epochs_run']} epochs run, best "
                                       f"{row['best_epoch']}"))
    setup = {"eyes": n, "shape": list(shape), "input_size": size, "model": "cnn", "modality": "OCT+OCTA",
             "seeds": seeds, "tasks": {k: list(v["classes"]) for k, v in TASKS.items()},
             "settings": "stock --mode train defaults (see README 'Multi-class')"}
    if tmp is not None:
        tmp.cleanup()
    return finish(result("recipe", figures, setup, q, runs=runs), ns.out)


if __name__ == "__main__":
    main()
