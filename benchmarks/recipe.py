"""The stock training recipe over a ladder of cohort looks it was not tuned on.

For every generator look (``--synth-look``: :data:`octa3d.data.synthetic.look.PRESETS`), seed and task, generate a
cohort (OCTA-500 layout, lesion masks; a different cohort per seed), then run the documented commands with the
**stock settings** of ``--mode train`` (epochs, schedule, learning rate, loss, augmentation, early stopping) and only
the CPU-sized model fixed::

    python main.py --mode synth --synth-look LOOK ...   (here: octa3d.data.synthetic.generate(look=...))
    python main.py --mode prepare|train|test --data-root WORK/<look>-<cohort>-s<seed> --exp ... --seed <seed> \\
        --task binary|multi --model cnn --input-size 32 --modality OCT+OCTA

Tasks: binary NORMAL vs DR (80 eyes), binary NORMAL vs all (DR, CNV, AMD; 120 eyes) and 4-class
NORMAL/AMD/CNV/DR (the same 120 eyes). Per run: epochs until the training loss left chance (below 0.9 x the chance
loss, from history.csv), the end-of-training fit check, training accuracy at stop, hold-out balanced accuracy /
macro-F1 / AUC with 95 % cluster-bootstrap CIs, lowest per-class recall, the default evidence map's pointing game
per lesion class (tolerance as ``--mode test`` reports it) and wall time. ``--ablate`` adds NORMAL vs DR runs on the
``dropout-only`` look (every seed) that change one setting at a time, the old cnn head among them.

    python -m benchmarks.recipe [--quick] [--ablate] [--looks stock,faint] [--seeds 1,2] [--size 32] [--work DIR]
        [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, finish, quiet_logs, result, run_stage

log = logging.getLogger("octa3d.bench")

#: Cohorts: the classes generated and how many eyes.
COHORTS: dict[str, dict[str, Any]] = {
    "nd": {"classes": ("NORMAL", "DR"), "n": 80},
    "all": {"classes": ("NORMAL", "AMD", "CNV", "DR"), "n": 120},
}
#: Tasks: name -> (cohort, task flags).
TASKS: dict[str, tuple[str, list[str]]] = {
    "NORMAL vs DR": ("nd", ["--task", "binary"]),
    "NORMAL vs all": ("all", ["--task", "binary"]),
    "4-class": ("all", ["--task", "multi"]),
}

#: One change at a time against the recipe (NORMAL vs DR on the ``dropout-only`` look, DR as non-perfusion only,
#: every seed: where the stock cnn sat longest at chance before the head changed): name -> extra flags.
ABLATIONS: dict[str, list[str]] = {
    "old cnn head (FC3 + dropout 0.5)": ["--model", "cnn_fc3"],
    "lr 3e-4 (the previous default)": ["--lr", "3e-4"],
    "batch 8": ["--batch-size", "8"],
    "no warm-up": ["--warmup-epochs", "0"],
    "no augmentation": ["--no-augment"],
    "OCTA only": ["--modality", "OCTA"],
}
ABLATION_LOOK, ABLATION_TASK = "dropout-only", "NORMAL vs DR"


def _register_ablation_models() -> None:
    """``cnn_fc3``: the cnn with the head octa3d 0.1.0 used (for the ablation only; registered in this process)."""
    from octa3d.model import list_models
    from octa3d.model.cnn import ConvFC
    from octa3d.model.registry import get_spec, register_model

    if "cnn_fc3" in list_models():
        return
    spec = get_spec("cnn")
    register_model("cnn_fc3", cam_layer=spec.cam_layer, min_input=spec.min_input, feature_size=spec.feature_size,
                   stages=spec.stages, head_prefixes=spec.head_prefixes,
                   description="cnn with the FC3 head and dropout 0.5 (recipe ablation)")(
        lambda spatial_dims, in_channels, num_classes, input_size=None, **kw:
            ConvFC(spatial_dims, in_channels, num_classes, **({"head": "fc3", "dropout": 0.5} | kw)))


def _history(path: Path) -> list[dict[str, float]]:
    import csv

    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [{k: float(v) for k, v in r.items() if v not in ("", None) and k != "encoder_frozen"}
                for r in csv.DictReader(fh)]


def normal_vs_all_from_multi(predictions: Path) -> dict[str, float] | None:
    """A 4-class run read as NORMAL vs all: abnormal score 1 - p(NORMAL), abnormal when the argmax is not NORMAL.

    The same eyes as the binary NORMAL vs all task, so the two say whether training on the diseases and grouping
    afterwards beats training on the grouped label. None without the run's ``predictions.csv``.
    """
    import csv

    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if not predictions.is_file():
        return None
    with predictions.open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("label")]
    y = np.array([r["label"] != "NORMAL" for r in rows])
    if len(set(y.tolist())) < 2:
        return None
    pred = np.array([r["prediction"] != "NORMAL" for r in rows])
    return {"balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "auc": float(roc_auc_score(y, [1 - float(r["p_NORMAL"]) for r in rows]))}


def _size_tag(size: int) -> str:
    """Suffix of data and run folders at a non-default ``--size`` (the 16/32 folders keep their old names)."""
    return "" if size in (16, 32) else f"-{size}"


def _with_grouped(row: dict[str, Any], task: str, run: Path) -> dict[str, Any]:
    """Add ``as_normal_vs_all`` to a 4-class row (also to rows saved before the figure existed)."""
    if task == "4-class" and "as_normal_vs_all" not in row:
        row["as_normal_vs_all"] = normal_vs_all_from_multi(run / "test" / "predictions.csv")
    return row


def _run(work: Path, look: str, task: str, seed: int, shape: tuple[int, ...], size: int, extra: list[str],
         exp: str, quick: bool) -> dict[str, Any]:
    """generate -> prepare -> train -> test of one experiment; its figures (reused from ``row.json`` of an earlier
    run in the same ``--work`` folder)."""
    from octa3d.data.synthetic import generate
    from octa3d.data.synthetic.look import PRESETS
    from octa3d.utils.io import atomic_write_json

    saved = work / "runs" / exp / "row.json"
    if saved.is_file():
        log.warning("%s: reusing the result in %s", exp, saved)
        return _with_grouped(json.loads(saved.read_text(encoding="utf-8")), task, saved.parent)
    cohort, task_flags = TASKS[task]
    n = 16 if quick else COHORTS[cohort]["n"]
    data = work / f"{look}-{cohort}-s{seed}{_size_tag(size)}"
    if not (data / "synthetic.json").is_file():
        generate(data, n, shape, seed=1000 * seed + len(cohort), classes=COHORTS[cohort]["classes"],
                 look=PRESETS[look])
    common = ["--data-root", str(data), "--runs-dir", str(work / "runs"), "--exp", exp, "--seed", str(seed),
              "--model", "cnn", "--input-size", str(size), "--modality", "OCT+OCTA", "--log-level", "WARNING",
              *task_flags, *extra]
    t0 = time.perf_counter()
    run_stage([*common, "--mode", "prepare"])
    summary = run_stage([*common, "--mode", "train", "--init", "random", *(["--epochs", "2"] if quick else [])])
    train_s = time.perf_counter() - t0
    m = run_stage([*common, "--mode", "test", "--bootstrap", "200" if quick else "1000"])
    fit = summary["folds"]["fold-0"]["fit"]
    hist = _history(work / "runs" / exp / "train" / "history.csv")
    loc = (m.get("localization") or {}).get("per_class", {})
    row = {"look": look, "task": task, "seed": seed,
           "balanced_accuracy": m["balanced_accuracy"], "f1_macro": m["f1_macro"], "auc": m["auc"],
           "ci95": {k: m["ci95"].get(k) for k in ("balanced_accuracy", "f1_macro", "auc")},
           "recall": {c: v["recall"] for c, v in m["per_class"].items()},
           "pointing_game": {c: v["pointing_game"] for c, v in loc.items()},
           "pointing_game_enface": {c: v.get("pointing_game_enface") for c, v in loc.items()},
           "n_test": int(m["n_subjects"]), "best_epoch": int(fit["best_epoch"] or 0),
           "epochs_run": len(hist), "left_chance_epoch": fit["left_chance_epoch"], "verdict": fit["verdict"],
           "train_accuracy": fit["train_accuracy"], "stopped_early": fit["stopped_early"],
           "stopped_above_chance_loss": bool(fit["stopped_early"] and fit["left_chance_epoch"] is None),
           "ci_includes_chance": m.get("chance", {}).get("ci_includes_chance", []),
           "seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(train_s, 1)}
    atomic_write_json(saved, _with_grouped(row, task, saved.parent))
    return row


def _left(rows: list[dict[str, Any]]) -> float:
    """Mean epoch at which the training loss left chance; a run that never did counts with all its epochs."""
    return statistics.fmean(r["left_chance_epoch"] if r["left_chance_epoch"] is not None else r["epochs_run"]
                            for r in rows) if rows else math.nan


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def ladder_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per look x task (mean over seeds; the worst seed's lowest recall and pointing game)."""
    lines = ["| look | task | left chance (epoch) | train acc | bal. acc | macro-F1 | AUC | lowest recall | "
             "pointing game (min over classes) | epochs | s/run |", "|" + "---|" * 11]
    keyed: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["look"], r["task"]), []).append(r)
    for (look, task), rs in keyed.items():
        left = "/".join(str(r["left_chance_epoch"]) if r["left_chance_epoch"] is not None else "never" for r in rs)
        pg = [min(v for c, v in r["pointing_game"].items() if c != "NORMAL") for r in rs
              if set(r["pointing_game"]) - {"NORMAL"}]
        worst_pg = f"{min(pg):.2f}" if pg else "n/a"
        lines.append(
            f"| {look} | {task} | {left} | {_mean(rs, 'train_accuracy'):.2f} | {_mean(rs, 'balanced_accuracy'):.3f} | "
            f"{_mean(rs, 'f1_macro'):.3f} | {_mean(rs, 'auc'):.3f} | {min(min(r['recall'].values()) for r in rs):.2f} "
            f"| {worst_pg} | {'/'.join(str(r['epochs_run']) for r in rs)} | {_mean(rs, 'seconds'):.0f} |")
    return "\n".join(lines) + "\n"


def ablation_table(named: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one line per setting (the recipe first), per seed: epoch that left chance, balanced accuracy."""
    lines = ["| setting | left chance (epoch, per seed) | hold-out bal. acc. | epochs run |", "|---|---|---|---|"]
    for name, rs in named.items():
        left = "/".join(str(r["left_chance_epoch"]) if r["left_chance_epoch"] is not None else "never" for r in rs)
        accs = "/".join(f"{r['balanced_accuracy']:.2f}" for r in rs)
        lines.append(f"| {name} | {left} | {accs} | {'/'.join(str(r['epochs_run']) for r in rs)} |")
    return "\n".join(lines) + "\n"


def _figures(rows: list[dict[str, Any]], looks: list[str]) -> list[Figure]:
    """Per look: the task targets (worst over seeds); over the ladder: runs that stopped at chance."""
    figures = []
    for look in looks:
        for task in TASKS:
            rs = [r for r in rows if r["look"] == look and r["task"] == task]
            if not rs:
                continue
            seeds = f"{len(rs)} seed(s), worst shown; {rs[0]['n_test']} hold-out eyes each"
            if task == "4-class":
                figures += [Figure(f"{look}: 4-class macro-F1", min(r["f1_macro"] for r in rs), "", ">= 0.9",
                                   note=seeds),
                            Figure(f"{look}: 4-class lowest per-class recall", min(min(r["recall"].values())
                                                                                  for r in rs), "", ">= 0.8")]
            else:
                figures.append(Figure(f"{look}: {task} balanced accuracy", min(r["balanced_accuracy"] for r in rs),
                                      "", ">= 0.95" if task == "NORMAL vs DR" else None, note=seeds))
            pg = {c: min(r["pointing_game"].get(c, math.nan) for r in rs) for c in rs[0]["pointing_game"]}
            for c, v in pg.items():
                if c != "NORMAL" and math.isfinite(v):
                    figures.append(Figure(f"{look}: {task} pointing game {c}", v, "", ">= 0.8", note=seeds))
        multi = [r for r in rows if r["look"] == look and r["task"] == "4-class" and r.get("as_normal_vs_all")]
        grouped = [r for r in rows if r["look"] == look and r["task"] == "NORMAL vs all"]
        if multi and grouped:
            figures.append(Figure(
                f"{look}: NORMAL vs all balanced accuracy, 4-class model grouped", _mean(
                    [r["as_normal_vs_all"] for r in multi], "balanced_accuracy"), "",
                note=f"mean over {len(multi)} seed(s); the binary NORMAL vs all model on the same eyes: "
                     f"{statistics.fmean(r['balanced_accuracy'] for r in grouped):.3f}"))
    figures.append(Figure("runs stopped while training loss > 0.9 x chance", sum(r["stopped_above_chance_loss"]
                                                                                 for r in rows), "", "<= 0",
                          note=f"of {len(rows)} runs"))
    multi = [r for r in rows if r["task"] == "4-class" and r["look"] == looks[0]]
    if multi:
        figures.append(Figure("4-class wall time per run (prepare+train+test)", _mean(multi, "seconds"), "s",
                              note=f"look {looks[0]}, CPU"))
    return figures


def main(args: list[str] | None = None) -> dict:
    """Run the ladder (and ablations); write and return the result."""
    from octa3d.data.synthetic.look import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (smoke test): 16 eyes, 16^3, 2 epochs, 1 seed, the first look")
    ap.add_argument("--ablate", action="store_true",
                    help=f"also the ablations ({ABLATION_TASK} on the {ABLATION_LOOK} look, every seed)")
    ap.add_argument("--ablations", default=",".join(ABLATIONS), help="with --ablate: which (comma-separated names)")
    ap.add_argument("--looks", default=",".join(PRESETS), help="comma-separated generator looks (default: all)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all)")
    ap.add_argument("--seeds", default="1,2", help="comma-separated cohort/split/training seeds (default 1,2)")
    ap.add_argument("--size", type=int, default=32,
                    help="volumes of SIZE x 2*SIZE x SIZE voxels and --input-size SIZE (default 32; 48 takes ~3x "
                         "the CPU time)")
    ap.add_argument("--work", help="folder for data and runs (default: a temporary folder, removed)")
    ap.add_argument("--out", help="also write the result here (JSON); the ladder table goes next to it (.md)")
    ns = ap.parse_args(args)
    quiet_logs()
    q = ns.quick
    size = 16 if q else ns.size
    shape = (size, 2 * size, size)
    seeds = [int(s) for s in ns.seeds.split(",")][: 1 if q else None]
    looks = [s for s in ns.looks.split(",") if s][: 1 if q else None]
    tasks = [t for t in ns.tasks.split(",") if t]
    tmp = None if ns.work else tempfile.TemporaryDirectory(prefix="octa3d-recipe-")
    work = Path(ns.work or tmp.name)
    runs: dict[str, dict[str, Any]] = {}
    for look in looks:
        for task in tasks:
            for seed in seeds:
                exp = f"{look}-{task.replace(' ', '')}-s{seed}{_size_tag(size)}"
                runs[f"{look} / {task} / seed {seed}"] = _run(work, look, task, seed, shape, size, [], exp, q)
    rows = list(runs.values())
    figures = _figures(rows, looks)
    if ns.ablate and not q:
        _register_ablation_models()
        look = ABLATION_LOOK if ABLATION_LOOK in looks else looks[0]
        base = [runs[f"{look} / {ABLATION_TASK} / seed {s}"] for s in seeds if f"{look} / {ABLATION_TASK} / seed {s}"
                in runs]
        named = {"recipe (stock)": base}
        for name in [a for a in ns.ablations.split(",") if a]:
            extra = ABLATIONS[name]
            rows_abl = [_run(work, look, ABLATION_TASK, seed, shape, size, extra,
                             f"abl-{look}-{'-'.join(extra).strip('-')}-s{seed}{_size_tag(size)}", q) for seed in seeds]
            named[name] = rows_abl
            for seed, row in zip(seeds, rows_abl):
                runs[f"ablation: {name} / seed {seed}"] = row
            accs = "/".join(f"{r['balanced_accuracy']:.2f}" for r in rows_abl)
            figures.append(Figure(f"ablation {name}: epochs to leave chance", _left(rows_abl), "epochs",
                                  note=f"recipe {_left(base):.1f}; {look}, {ABLATION_TASK}, mean over seeds "
                                       f"{','.join(map(str, seeds))} (a run that never left chance counts its "
                                       f"epochs run); hold-out balanced accuracy {accs}"))
        abl = ablation_table(named)
        print(abl)
        if ns.out:
            from octa3d.utils.io import atomic_write_text

            atomic_write_text(str(Path(ns.out).with_suffix(".ablation.md")), abl)
    table = ladder_table(rows)
    print(table)
    setup = {"shape": list(shape), "input_size": size, "model": "cnn", "modality": "OCT+OCTA", "seeds": seeds,
             "looks": looks, "tasks": {t: [TASKS[t][0], *TASKS[t][1]] for t in tasks},
             "cohorts": {k: {"classes": list(v["classes"]), "n": 16 if q else v["n"]} for k, v in COHORTS.items()},
             "settings": "stock --mode train defaults (see README 'Training recipe')"}
    if ns.out:
        from octa3d.utils.io import atomic_write_text

        atomic_write_text(str(Path(ns.out).with_suffix(".ladder.md")), table)
    if tmp is not None:
        tmp.cleanup()
    return finish(result("recipe", figures, setup, q, runs=runs, ladder=table), ns.out)


if __name__ == "__main__":
    main()
