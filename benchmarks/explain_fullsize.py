"""Full-size scan figure of project issue #7: wall time and peak memory of ``--mode explain`` on one OCTA-500-size
eye (400x640x400 voxels per modality, OCT + OCTA BMP stacks).

Setup, skipped where its outputs exist in ``--work`` (in-process): one full-size synthetic eye
(``octa3d.data.synthetic.generate``, 6 mm layout with lesion mask; renamed to ID 20001 so that it is no training
subject), and a small model trained on tiny synthetic eyes with the same modality::

    python main.py --mode synth --data-root WORK/small --n-subjects 12 --shape 32,64,32 --seed 1
    python main.py --mode train --model cnn --input-size 32 --modality OCT+OCTA --epochs 1 --batch-size 4 \\
        --init random --data-root WORK/small --runs-dir WORK/runs --exp fullsize

Measured, in a subprocess (its own peak RSS, from ``os.wait4``; ``$OCTA3D_BENCH_THREADS`` threads, default 1)::

    python main.py --mode explain --runs-dir WORK/runs --exp fullsize --modality OCT+OCTA --overwrite \\
        --input WORK/big/OCTA_6mm/OCTA/20001

(run as ``octa3d.cli.main(argv)`` after importing the stage's modules, so that the same process also reports the
peak RSS the imports alone reach).

The explain stage reads both 400-BMP stacks, crops the retinal slab, resizes to the model's 32^3 input, predicts,
computes the Grad-CAM and maps it back onto the 400x640x400 source geometry, then writes, into
``explain/20001_OCT+OCTA_<cam>_<hash>/``, ``20001_cam.nii.gz`` (float32 0..1), the input scans as NIfTI (one per
modality: ``20001_input_OCT.nii.gz``, ``20001_input_OCTA.nii.gz``), the review PNG and TensorBoard images, and
scores the CAM against the lesion mask. The figures are the wall time and the peak RSS of that process (target:
<= 3 GB), and how far the peak rises above the RSS after the imports (the part of the peak the scan causes).

    python -m benchmarks.explain_fullsize [--quick] [--work DIR] [--shape 400,640,400] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, bench_threads, finish, quiet_logs, result, run_stage

log = logging.getLogger("octa3d.bench.explain_fullsize")

REPO = Path(__file__).resolve().parent.parent
#: Peak-memory target of issue 7 (MB).
RSS_TARGET = "<= 3000"
EXP, EYE = "fullsize", "20001"
#: The measured child: ``main.py``'s entry point, after importing what the stage imports and recording the peak RSS
#: so far (``VmHWM``) into the file named by its first argument.
_CHILD = ("import sys, octa3d.cli, octa3d.stages.explain, octa3d.stages.test, octa3d.cam, octa3d.cam.sheets, "
          "octa3d.data.presets, octa3d.data.readers, torch, monai, SimpleITK\n"
          "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
          "open(sys.argv[1], 'w').write(hwm[0] if hwm else '0')\n"
          "sys.exit(octa3d.cli.main(sys.argv[2:]))\n")


def run_child(cmd: list[str], log_file: Path) -> tuple[float, float, int]:
    """Run ``cmd`` in the repository root; returns ``(wall seconds, peak RSS MB, exit status)``.

    The peak RSS is the child's own ``ru_maxrss`` (``os.wait4``), not that of every child this process had.
    """
    n = str(bench_threads())
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OCTA3D_BENCH_THREADS": n}
    with open(log_file, "w", encoding="utf-8") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    return wall, usage.ru_maxrss / 1024, proc.returncode


def _rename_eye(root: Path, old: str, new: str) -> None:
    """Give a generated eye another ID (its OCT/OCTA folders and lesion mask)."""
    fov = root / "OCTA_6mm"
    for mod in ("OCT", "OCTA"):
        (fov / mod / old).rename(fov / mod / new)
    for mask in (fov / "Lesion Masks").glob(f"{old}.*"):
        mask.rename(mask.with_name(new + mask.name[len(old):]))


def setup(work: Path, shape: tuple[int, int, int], small: tuple[int, int, int], n_train: int, size: int) -> Path:
    """Generate the big eye and train the small model where missing; returns the ``--input`` folder."""
    from octa3d.data.synthetic import generate

    big = work / "big-{}".format("x".join(map(str, shape)))
    eye = big / "OCTA_6mm" / "OCTA" / EYE
    if not eye.is_dir():
        t0 = time.perf_counter()
        generate(big, 1, shape, seed=5, classes=("CNV",), overwrite=True)
        _rename_eye(big, next(p.name for p in (big / "OCTA_6mm" / "OCTA").iterdir()), EYE)
        log.info("full-size eye %s: %.0f s", "x".join(map(str, shape)), time.perf_counter() - t0)
    if not (work / "runs" / EXP / "train" / "checkpoints" / "best.pt").is_file():
        if not (work / "small").exists():
            generate(work / "small", n_train, small, seed=1, classes=("NORMAL", "CNV"))
        run_stage(["--mode", "train", "--model", "cnn", "--input-size", str(size), "--modality", "OCT+OCTA",
                   "--epochs", "1", "--batch-size", "4", "--init", "random", "--data-root", str(work / "small"),
                   "--runs-dir", str(work / "runs"), "--exp", EXP])
    return eye


def main(args: list[str] | None = None) -> dict:
    """Set up (or reuse) the eye and the model, run the explain stage in a subprocess, return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (a 40x64x40 eye, cnn 16^3)")
    ap.add_argument("--work", help="folder for data, runs and outputs, reused when present (default: temporary)")
    ap.add_argument("--shape", help="eye shape B-scans,depth,width (default 400,640,400; quick 40,64,40)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    quiet_logs()
    default = (40, 64, 40) if ns.quick else (400, 640, 400)
    shape = tuple(int(v) for v in ns.shape.split(",")) if ns.shape else default
    if len(shape) != 3:
        ap.error("--shape needs three numbers: B-scans,depth,width")
    small, n_train, size = ((16, 32, 16), 8, 16) if ns.quick else ((32, 64, 32), 12, 32)
    with tempfile.TemporaryDirectory(prefix="octa3d-explain-") as tmp:
        work = Path(ns.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        eye = setup(work, shape, small, n_train, size)
        argv = ["--mode", "explain", "--runs-dir", str(work / "runs"), "--exp", EXP, "--modality", "OCT+OCTA",
                "--overwrite", "--input", str(eye)]
        hwm = work / "import_peak_kb.txt"
        wall, rss, rc = run_child([sys.executable, "-c", _CHILD, str(hwm), *argv], work / "explain.log")
        if rc != 0:
            raise RuntimeError(f"explain failed (exit {rc}): {(work / 'explain.log').read_text()[-3000:]}")
        base_rss = int(hwm.read_text(encoding="utf-8")) / 1024
        # explain/<ID>_<modality>_<cam>_<hash>/: the newest folder of this eye read through both modalities
        out = max((work / "runs" / EXP / "explain").glob(f"{EYE}_OCT+OCTA_*"), key=lambda p: p.stat().st_mtime)
        pred: dict[str, Any] = json.loads((out / "prediction.json").read_text(encoding="utf-8"))
        written = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    dims = "x".join(map(str, shape))
    scan_mb = 2 * shape[0] * shape[1] * shape[2] / 2**20
    figures = [
        Figure(f"explain {dims} OCT+OCTA: peak RSS", rss, "MB", RSS_TARGET,
               note=f"subprocess ru_maxrss; the two uint8 scans hold {scan_mb:.3g} MB"),
        Figure(f"explain {dims} OCT+OCTA: wall time", wall, "s",
               note=f"whole process: start, imports, read, predict, CAM, {written:.3g} MB of files"),
        Figure(f"explain {dims}: peak RSS above the imports", rss - base_rss, "MB",
               note=f"the process peaked at {base_rss:.0f} MB after importing the stage's modules"),
        Figure(f"explain {dims}: CAM computation", pred["cam"]["seconds_per_volume"], "s",
               note=f"{pred['cam']['backend']}, layer {pred['cam']['layer']}"),
    ]
    setup_info = {"shape": list(shape), "modality": "OCT+OCTA", "model": pred["model"], "input_size": size,
                  "train": {"subjects": n_train, "shape": list(small), "epochs": 1},
                  "command": "python main.py " + " ".join(argv), "threads": bench_threads(),
                  "files_mb": round(written, 1), "files": sorted(Path(p).name for p in pred.get("files", {}).values()),
                  "rss_after_imports_mb": round(base_rss, 1),
                  "prediction": pred["prediction"], "localization": pred.get("localization")}
    res = result("explain_fullsize", figures, setup_info, ns.quick)
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
