"""``make bench``: run every benchmark, write ``benchmarks/results/<date>-<host>.json`` and ``.md``, print the table.

Each benchmark runs in its own process (clean peak-memory figures; one failing benchmark does not stop the others)
with ``$OCTA3D_BENCH_THREADS`` CPU threads (default 1: fixed threads make CPU timings comparable).

    python -m benchmarks.run [--quick] [--only data_pipeline,gradcam] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import bench_threads, machine, markdown_table

log = logging.getLogger("octa3d.bench")

REPO = Path(__file__).resolve().parent.parent
#: Benchmark modules in the order they run (cheap and independent first).
BENCHMARKS = ("data_pipeline", "vendor_read", "train_step", "gradcam", "cam_quality", "explain_fullsize", "recipe",
              "calibration", "predict", "ood", "compress_bench", "ae_transfer", "mae_transfer", "study")


def run_one(name: str, quick: bool, work: Path) -> dict:
    """Run ``python -m benchmarks.<name>`` in a subprocess; its result, or ``{"benchmark", "error"}``."""
    out = work / f"{name}.json"
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)] + (["--quick"] if quick else [])
    if name == "compress_bench":
        cmd += ["--work", str(work / "compress")]
    n = str(bench_threads())
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OCTA3D_BENCH_THREADS": n}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace")
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        log.error("benchmark %s failed (exit %s):\n%s", name, proc.returncode, tail)
        return {"benchmark": name, "error": f"exit {proc.returncode}: {tail[-2000:]}", "figures": [],
                "seconds": seconds}
    res = json.loads(out.read_text(encoding="utf-8"))
    res["seconds"] = seconds
    return res


def main(args: list[str] | None = None) -> int:
    """Run the benchmarks; returns the exit status (1 when one failed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that every benchmark runs (seconds)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ns = ap.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n.strip() for n in ns.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="octa3d-bench-") as tmp:
        for name in names:
            log.info("benchmark %s%s ...", name, " (quick)" if ns.quick else "")
            results.append(run_one(name, ns.quick, Path(tmp)))
            log.info("  %s: %s s", name, results[-1]["seconds"])
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    # a subset gets its own file: it never replaces the results of a full run
    subset = "" if names == list(BENCHMARKS) else "-" + "-".join(names)
    stem = f"{stamp}-{socket.gethostname()}{subset}" + ("-quick" if ns.quick else "")
    doc = {"date": dt.datetime.now().isoformat(timespec="seconds"), "quick": ns.quick, "machine": machine(),
           "command": "python -m benchmarks.run " + " ".join(args if args is not None else sys.argv[1:]),
           "results": results}
    table = markdown_table([r for r in results if r["figures"]])
    failed = [r["benchmark"] for r in results if "error" in r]
    m = doc["machine"]
    md = (f"# octa3d benchmarks {doc['date']}\n\n`{doc['command']}` on {m['host']}: {m['processor']}, "
          f"{m['cpu_count']} CPUs, {m['bench_threads']} thread(s), torch {m['torch']}"
          + (f", {m['gpu']}" if m.get("gpu") else ", no GPU") + "\n\n" + table
          + (f"\nFailed: {', '.join(failed)} (see the JSON's error fields)\n" if failed else ""))
    out_dir = Path(ns.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from octa3d.utils.io import atomic_write_text

    atomic_write_text(out_dir / f"{stem}.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out_dir / f"{stem}.md", md)
    print(md)
    print(f"Written: {out_dir / (stem + '.json')}, {out_dir / (stem + '.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
