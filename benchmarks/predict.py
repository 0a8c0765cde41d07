"""Batch prediction figures of project issue #16: ``--mode predict`` throughput and peak memory over a cohort.

    python -m benchmarks.predict [--quick] [--work DIR] [--out result.json]

Data: one synthetic eye (32×64×32 B-scans × depth × width; ``--quick``: 16×32×16) generated with
:func:`octa3d.data.synthetic.generate` and cloned by hard links into OCTA-500-layout cohorts of 20 and 200 subjects
(``--quick``: 4 and 40; :func:`benchmarks.data_pipeline.clone_dataset`). Model: an untrained ``cnn`` checkpoint
(64³ input; ``--quick``: 16³) with a temperature, saved as an experiment's ``train/checkpoints/best.pt``.

Each cohort is predicted by ``--mode predict --input <cohort> --cam none`` in its own process (fresh interpreter;
``--quick``: a fork), which records its peak RSS (``VmHWM``, reset at the start) and the stage's seconds per
subject (read, preprocess, predict, write, resume records). In the 20-subject process the same subjects are then
preprocessed again and the bare model forward is timed on these inputs (one subject per call, as the stage runs
it): the throughput ratio is the forward's subjects/s over the stage's, each the best of 3 runs. The stage reads
the next subject on a second thread while the model runs (the machine needs two cores for that to pay). Torch
runs with ``$OCTA3D_BENCH_THREADS`` threads (default 1).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (Figure, bench_threads, finish, in_own_process, peak_rss_mb, quiet_logs, reset_peak_rss,
                               result, threads)
from benchmarks.data_pipeline import clone_dataset, source_eye

REPO = Path(__file__).resolve().parent.parent


def make_model(runs: Path, input_size: int) -> Path:
    """An experiment ``bench`` whose ``train/checkpoints/best.pt`` is an untrained cnn (NORMAL/DR, temperature 1.5)."""
    import torch

    from octa3d.checkpoint.io import model_record, save_checkpoint
    from octa3d.cli import parse_config
    from octa3d.model import create_model

    cfg, _ = parse_config(["--mode", "train", "--runs-dir", str(runs), "--exp", "bench", "--model", "cnn",
                           "--input-size", str(input_size)])
    torch.manual_seed(0)
    rec = model_record(cfg, ["NORMAL", "DR"], "classifier")
    rec.update(temperature=1.5, entropy_threshold=0.6, entropy_threshold_raw=0.6)
    path = cfg.run_dir / "train" / "checkpoints" / "best.pt"
    save_checkpoint(path, create_model("cnn", "3d", 1, 2, input_size=(input_size,) * 3), rec, epoch=1,
                               config=cfg)
    return path


def predict_case(cohort: str, runs: str, bare: bool, repeat: int = 1) -> dict[str, Any]:
    """Peak RSS (MB) and seconds per subject of ``--mode predict`` over ``cohort`` in this process; with ``bare``
    also the bare forward's seconds per subject on the same preprocessed inputs. Timings are the best of
    ``repeat`` runs (a shared machine's noise only ever slows a run down); the RSS is that of the first run."""
    import torch

    from benchmarks.common import run_stage

    quiet_logs()
    torch.set_num_threads(bench_threads())
    reset_peak_rss()
    start = peak_rss_mb()
    argv = ["--mode", "predict", "--input", cohort, "--runs-dir", runs, "--exp", "bench", "--cam", "none",
            "--overwrite", "--device", "cpu", "--log-level", "WARNING"]
    stage, total, peak, n = [], [], 0.0, 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        summary = run_stage(argv)
        total.append(time.perf_counter() - t0)
        stage.append(summary["seconds_per_subject"])
        peak, n = peak or peak_rss_mb(), summary["n_predicted"]
    out: dict[str, Any] = {"start_mb": start, "peak_mb": peak, "subjects": n, "stage_s_per_subject": min(stage),
                           "stage_runs_s_per_subject": stage, "total_s_per_subject": min(total) / max(1, n)}
    if bare:
        from octa3d.deploy.api import load

        model = load(Path(runs) / "bench", device="cpu")
        inputs = [model.prepare(s).samples for s in model.subjects(cohort)]
        net = model.models[0].model
        passes = []
        with torch.no_grad():
            net(torch.from_numpy(inputs[0]))  # warm-up
            for _ in range(repeat):
                t0 = time.perf_counter()
                for x in inputs:
                    torch.softmax(net(torch.from_numpy(x)), dim=1)
                passes.append((time.perf_counter() - t0) / len(inputs))
        out["forward_s_per_subject"] = min(passes)
        out["forward_runs_s_per_subject"] = passes
    return out


def measure(cohort: Path, runs: Path, bare: bool, fresh: bool, repeat: int = 1) -> dict[str, Any]:
    """Run :func:`predict_case` in its own process: a fresh interpreter (``fresh``) or a fork of this one."""
    return in_own_process("benchmarks.predict", "predict_case", (str(cohort), str(runs), bare, repeat), fresh,
                          preload=("octa3d.stages.predict",))


def main(args: list[str] | None = None) -> dict:
    """Measure the predict figures, print the markdown table and return the result (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (16x32x16 eyes, 16^3 input, 4 vs 40 subjects)")
    ap.add_argument("--work", help="folder for the generated data and runs (default: a temporary folder, removed)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    q = ns.quick
    shape = (16, 32, 16) if q else (32, 64, 32)
    input_size = 16 if q else 64
    counts = (4, 40) if q else (20, 200)
    work = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="octa3d-bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    cases: dict[int, dict[str, Any]] = {}
    try:
        with threads(bench_threads()):
            src = source_eye(work / ("src-" + "x".join(map(str, shape))), shape)
            runs = work / "runs"
            make_model(runs, input_size)
            for n in counts:
                cohort = clone_dataset(src, work / f"cohort-{n}", n)
                first = n == counts[0]
                cases[n] = measure(cohort, runs, bare=first, fresh=not q, repeat=3 if first and not q else 1)
                shutil.rmtree(cohort, ignore_errors=True)
    finally:
        if not ns.work:
            shutil.rmtree(work, ignore_errors=True)
    lo, hi = counts
    small, large = cases[lo], cases[hi]
    rss_ratio = large["peak_mb"] / small["peak_mb"]
    stage_rate = 1 / small["stage_s_per_subject"]
    bare_rate = 1 / small["forward_s_per_subject"]
    size, inp = "x".join(map(str, shape)), f"{input_size}^3"
    process = "fresh processes" if not q else "forked processes"
    figures = [
        Figure(f"predict subjects/s ({lo} subjects, --cam none)", stage_rate, "subjects/s",
               note=f"{size} OCTA eyes -> cnn {inp}; read + preprocess + predict + records"),
        Figure(f"predict subjects/s ({hi} subjects, --cam none)", 1 / large["stage_s_per_subject"], "subjects/s"),
        Figure("bare model forward subjects/s", bare_rate, "subjects/s",
               note=f"the same {lo} preprocessed inputs, one subject per call"),
        Figure("bare forward vs predict throughput", bare_rate / stage_rate, "x", "<= 1.2",
               note="CAMs off; 1.0 = predict costs nothing beyond the forward"),
        Figure(f"peak RSS, {hi} vs {lo} subjects", rss_ratio, "x", "<= 1.2",
               note=f"{large['peak_mb']:.0f} MB vs {small['peak_mb']:.0f} MB, {process}"),
    ]
    setup = {"volume_shape": list(shape), "input_shape": [input_size] * 3, "model": "cnn (untrained)",
             "cohorts": list(counts), "threads": bench_threads(), "cam": "none", "process": process,
             "data": "hard links of one synthetic eye (octa3d.data.synthetic.generate), page cache warm"}
    return finish(result("predict", figures, setup, q, cases={str(k): v for k, v in cases.items()}), ns.out)


if __name__ == "__main__":
    main()
