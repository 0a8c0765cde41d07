"""Study benchmark: what running a study's cells as Ray tasks costs against running them one after another.

A 2-arm x 3-fold study (3D volume vs 2D en-face, ``--model cnn``) on generated eyes (OCTA-500 layout, NORMAL vs
CNV; 60 eyes of 24x48x24, input 24, 3 epochs; ``--quick``: 24 eyes of 16x32x16, input 16, 1 epoch) is run twice,
each in a fresh interpreter and its own runs folder, with the same study file:

* ``--executor ray``: the cells as tasks on the embedded local Ray (``ray.init(address="local")``; every CPU, the
  CPUs divided among the cells, torch threads = CPUs per cell); the wall time includes starting and stopping Ray;
* ``--executor sequential``: the same cells one after another in that process, each with every CPU's threads.

Both include the report (statistics, tables, page), which is the same work. The figure is the ratio of the two
wall times (target <= 1.15: Ray's start-up and scheduling cost at most 15 % over running the cells in-process; on
a machine with more CPUs than one cell uses, Ray's parallel cells make it well below 1). The per-cell seconds of
both runs are kept in the result.

    python -m benchmarks.study [--quick] [--work DIR] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, finish, in_own_process, result

SIZES = {"full": {"n": 60, "shape": [24, 48, 24], "input": 24, "epochs": 3},
         "quick": {"n": 24, "shape": [16, 32, 16], "input": 16, "epochs": 1}}


def study_file(work: Path, size: dict[str, Any]) -> Path:
    """Generate the eyes (once) and write the 2-arm x 3-fold study file."""
    import yaml

    from octa3d.data.synthetic import generate

    data = work / "data"
    if not (data / "Text labels.xlsx").is_file():
        generate(data, size["n"], size["shape"], seed=0, classes=("NORMAL", "CNV"))
    doc = {"name": "bench", "folds": 3, "reference": "3d-cnn",
           "common": {"data_root": str(data), "model": "cnn", "input_size": size["input"], "epochs": size["epochs"],
                      "batch_size": 8, "lr": 0.001, "patience": 0, "bootstrap": 200},
           "arms": [{"name": "3d-cnn", "input": "volume"}, {"name": "2d-cnn", "input": "enface"}],
           "stats": {"bootstrap": 500}}
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def case(study: str, runs: str, executor: str) -> dict[str, Any]:
    """Run the study with ``executor`` in this process: wall time, per-cell seconds, the arms' hold-out BA."""
    from benchmarks.common import quiet_logs
    from octa3d.stages.study import run_study

    quiet_logs()
    t0 = time.perf_counter()
    out = run_study(study, runs_dir=runs, executor=executor)
    wall = time.perf_counter() - t0
    cells = {}
    for marker in Path(out["folder"]).glob("cells/*/fold-*/.cell-complete"):
        rec = json.loads(marker.read_text(encoding="utf-8"))
        cells[f"{rec['arm']}/fold-{rec['fold']}"] = rec["seconds"]
    ba = {a: (s.get("holdout") or {}).get("balanced_accuracy") for a, s in out["arms"].items()}
    return {"wall_s": round(wall, 2), "cell_s": cells, "cells_sum_s": round(sum(cells.values()), 2),
            "holdout_balanced_accuracy": ba, "failed": out["failed"]}


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run both cases and return the benchmark result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used by the test suite)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ns = ap.parse_args(args)
    size = SIZES["quick" if ns.quick else "full"]
    with tempfile.TemporaryDirectory(prefix="octa3d-bench-study-") as tmp:
        work = Path(ns.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        study = study_file(work, size)
        runs = {}
        for executor in ("sequential", "ray"):
            folder = work / f"runs-{executor}"
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            runs[executor] = in_own_process("benchmarks.study", "case", (str(study), str(folder), executor),
                                            fresh=True)
    ratio = runs["ray"]["wall_s"] / runs["sequential"]["wall_s"]
    cpus = os.cpu_count()
    figures = [
        Figure("study wall time, Ray tasks vs in-process one after another", ratio, "x", "<= 1.15",
               note=f"2 arms x 3 folds, {size['epochs']} epoch(s), {cpus} CPUs; Ray start-up and report included"),
        Figure("study wall time on Ray", runs["ray"]["wall_s"], "s"),
        Figure("study wall time in-process", runs["sequential"]["wall_s"], "s"),
    ]
    setup = {**size, "arms": 2, "folds": 3, "cpus": cpus}
    return finish(result("study", figures, setup, ns.quick, runs=runs), ns.out)


if __name__ == "__main__":
    main()
