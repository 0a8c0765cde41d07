"""Data-pipeline figures of project issue #7: the octa3d training loader vs a naive loader that re-reads every epoch.

    python -m benchmarks.data_pipeline [--quick] [--work DIR] [--out result.json]

Data: ONE synthetic eye of OCTA-500 size (400×640×400 B-scans × depth × width; ``--quick``: 16×32×16) is
generated with :func:`octa3d.data.synthetic.generate`; more subjects are made by hard-linking its BMP folders
under new IDs (OCTA-500 layout, ``Text labels.xlsx`` rewritten). Every subject is a separate cache entry (the
cache key holds the folder path), so each is decoded and preprocessed on its own; the BMPs sit in the page cache
for both loaders.

Our loader is the train stage's: ``parse_config`` → :func:`octa3d.data.splits.labelled_subjects` (``discover``
+ label map) → :class:`~octa3d.data.datasets.DataHandler` ``warm`` + ``loader(train=True)`` with augmentation,
``--modality OCT+OCTA``, the default input size (128³; ``--quick``: 16³) and batch size. Epoch 1 is cold (empty
cache: ``warm`` + the first pass), epochs >= 2 read the cache. The baseline is
:func:`benchmarks.naive_loader.naive_loader` (SimpleITK float read, float percentiles, trilinear resize of the
whole volume, every epoch, batch 1, no workers). Peak RSS while preparing and iterating a small and a 10x larger
dataset (32×64×32 eyes; the same number of samples loaded from each) is measured in separate processes (fresh
interpreters; ``--quick``: forks).

Torch and ITK run with ``$OCTA3D_BENCH_THREADS`` threads (default 1); ratios are measured within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (Figure, bench_threads, finish, in_own_process, peak_rss_mb, quiet_logs,
                               reset_peak_rss, result, threads)

log = logging.getLogger("octa3d.bench")

REPO = Path(__file__).resolve().parent.parent
FIRST_ID = 10001
#: Labels of the cloned subjects, alternating (a binary task: NORMAL vs DR).
CLASSES = ("NORMAL", "DR")


# ------------------------------------------------------------------------------------------- data
def source_eye(root: Path, shape: tuple[int, int, int]) -> Path:
    """Generate one synthetic eye of ``shape`` in ``root`` (reused when one of that shape is already there)."""
    marker = root / "synthetic.json"
    if marker.is_file():
        params = json.loads(marker.read_text(encoding="utf-8"))
        if params.get("complete") and tuple(params.get("shape", ())) == shape:
            return root
    from octa3d.data.synthetic import generate

    t0 = time.perf_counter()
    generate(root, 1, shape, seed=1, overwrite=True)
    log.info("generated one %s eye in %.1f s", "x".join(map(str, shape)), time.perf_counter() - t0)
    return root


def clone_dataset(src: Path, dst: Path, n: int) -> Path:
    """An OCTA-500-layout dataset of ``n`` subjects whose B-scan folders are hard links of the one eye in ``src``.

    Args:
        src: a synthetic dataset holding one eye (``OCTA_6mm/{OCT,OCTA}/<ID>/<n>.bmp``).
        dst: new dataset folder (replaced when it exists).
        n: number of subjects; labels alternate over :data:`CLASSES`.

    Returns:
        ``dst``.
    """
    import pandas as pd

    if dst.exists():
        shutil.rmtree(dst)
    for modality in ("OCT", "OCTA"):
        (eye,) = [p for p in (src / "OCTA_6mm" / modality).iterdir() if p.is_dir()]
        files = sorted(eye.iterdir())
        for i in range(n):
            folder = dst / "OCTA_6mm" / modality / str(FIRST_ID + i)
            folder.mkdir(parents=True)
            for f in files:
                try:
                    os.link(f, folder / f.name)
                except OSError:  # another file system, or no hard links: copy
                    shutil.copy2(f, folder / f.name)
    ids = [FIRST_ID + i for i in range(n)]
    table = pd.DataFrame({"ID": ids, "Gender": ["F"] * n, "Age": [60] * n, "OS/OD": ["OD"] * n,
                          "Disease": [CLASSES[i % len(CLASSES)] for i in range(n)]})
    table.to_excel(dst / "Text labels.xlsx", index=False, engine="openpyxl")
    return dst


@contextlib.contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """Run SimpleITK filters/readers with ``n`` threads inside the block."""
    import SimpleITK as sitk

    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def _config(root: Path, runs: Path, input_size: int | None, workers: int = 0) -> Any:
    from octa3d.cli import parse_config

    argv = ["--mode", "train", "--data-root", str(root), "--modality", "OCT+OCTA", "--runs-dir", str(runs),
            "--exp", "bench", "--num-workers", str(workers), "--log-level", "WARNING"]
    argv += ["--input-size", str(input_size)] if input_size else []
    cfg, _ = parse_config(argv)
    return cfg


# ------------------------------------------------------------------------------------------- loaders
def octa3d_epochs(root: Path, runs: Path, input_size: int | None, epochs: int, workers: int = 0) -> dict[str, Any]:
    """Time the octa3d training loader: epoch 1 from an empty cache (``warm`` + first pass), then the others.

    ``workers`` DataLoader worker processes (``--num-workers``; 0 = the main process).

    Returns:
        ``{"seconds": [per epoch], "samples": [per epoch], "subjects", "batch_size", "input_shape"}``.
    """
    from octa3d.data.datasets import DataHandler
    from octa3d.data.splits import labelled_subjects

    cfg = _config(root, runs, input_size, workers)
    shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    subjects, label_map, _ = labelled_subjects(cfg)
    handler = DataHandler(cfg, label_map)
    seconds, samples = [], []
    t0 = time.perf_counter()
    counts = handler.warm(subjects, progress=False)
    loader = handler.loader(subjects, train=True, batch_size=cfg.train.batch_size)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += len(batch["label"])
        seconds.append(time.perf_counter() - t0)
        samples.append(n)
        t0 = time.perf_counter()
    assert counts["misses"] == len(subjects), counts
    return {"seconds": seconds, "samples": samples, "subjects": len(subjects), "batch_size": cfg.train.batch_size,
            "input_shape": list(cfg.input_shape)}


def naive_epoch(root: Path, runs: Path, input_size: int | None, n_subjects: int) -> dict[str, Any]:
    """Time one epoch of the naive loader over the first ``n_subjects`` subjects (every epoch costs the same)."""
    from benchmarks.naive_loader import naive_loader
    from octa3d.data.splits import labelled_subjects

    cfg = _config(root, runs, input_size)
    subjects, label_map, _ = labelled_subjects(cfg)
    items = [((s.paths["OCT"], s.paths["OCTA"]), int(label_map.index(s.label))) for s in subjects[:n_subjects]]
    loader = naive_loader(items, cfg.input_shape, cfg.preprocess.clip_percentiles)
    t0 = time.perf_counter()
    n = sum(len(batch["label"]) for batch in loader)
    return {"seconds": time.perf_counter() - t0, "samples": n}


def stage_times(root: Path, runs: Path, input_size: int | None) -> dict[str, float]:
    """Seconds per subject of each cold step: octa3d decode / preprocess (best of 2), naive read / clip+resize
    (one run each: they are slow)."""
    import numpy as np
    import SimpleITK as sitk

    from benchmarks.naive_loader import _bmp_files, naive_volume
    from octa3d.data.presets import build_preset
    from octa3d.data.readers import load_subject
    from octa3d.data.splits import labelled_subjects

    cfg = _config(root, runs, input_size)
    subject = labelled_subjects(cfg)[0][0]
    preset = build_preset(cfg)

    def best(fn: Any, repeat: int = 2) -> float:
        runs_ = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            runs_.append(time.perf_counter() - t0)
        return min(runs_)

    loaded = [load_subject(subject, "OCT+OCTA")]
    out = {"octa3d_decode_s": best(lambda: load_subject(subject, "OCT+OCTA")),
           "octa3d_preprocess_s": best(lambda: preset.preprocess_array(*loaded[0], subject.id))}
    loaded.clear()  # free the full-size volume before the naive reads
    folders = [subject.paths["OCT"], subject.paths["OCTA"]]
    out["naive_read_s"] = best(lambda: [sitk.GetArrayFromImage(sitk.ReadImage(_bmp_files(f), sitk.sitkFloat32))
                                        for f in folders], repeat=1)
    out["naive_total_s"] = best(lambda: [naive_volume(f, cfg.input_shape, cfg.preprocess.clip_percentiles)
                                         for f in folders], repeat=1)
    out["naive_clip_resize_s"] = max(0.0, out["naive_total_s"] - out["naive_read_s"])
    return {k: float(np.round(v, 4)) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- memory
def rss_case(root: str, runs: str, input_size: int | None, epochs: int = 1) -> dict[str, float]:
    """Peak RSS (MB) of this process while preparing ``root`` (cold cache) and iterating ``epochs`` training epochs.

    The cases of the RSS figure load the same number of samples (the small dataset for more epochs), so the
    dataset size is the only difference: glibc's heap high-water mark creeps up with the number of 16 MB sample
    tensors allocated (its dynamic mmap threshold), whatever the dataset size.
    """
    import torch

    torch.set_num_threads(bench_threads())
    reset_peak_rss()
    start = peak_rss_mb()
    res = octa3d_epochs(Path(root), Path(runs), input_size, epochs=epochs)
    return {"start_mb": start, "peak_mb": peak_rss_mb(), "subjects": res["subjects"], "epochs": epochs,
            "samples": sum(res["samples"])}


def measure_rss(root: Path, runs: Path, input_size: int | None, epochs: int, fresh: bool) -> dict[str, float]:
    """Run :func:`rss_case` in its own process: a fresh interpreter (``fresh``) or a fork of this one."""
    return in_own_process("benchmarks.data_pipeline", "rss_case", (str(root), str(runs), input_size, epochs), fresh,
                          preload=("octa3d.cli", "octa3d.data.datasets", "octa3d.data.splits"))


# ------------------------------------------------------------------------------------------- main
def main(args: list[str] | None = None) -> dict:
    """Measure the loader figures, print the markdown table and return the result (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (16x32x16 eyes, 16^3 input): seconds")
    ap.add_argument("--work", help="folder for the generated data and caches (default: a temporary folder, "
                                   "removed afterwards; a given folder is kept and its full-size eye reused)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    quiet_logs()
    q = ns.quick
    shape = (16, 32, 16) if q else (400, 640, 400)
    small_shape = (16, 32, 16) if q else (32, 64, 32)
    input_size = 16 if q else None  # None: the default --input-size (128^3 in 3D)
    n_subjects, n_naive, epochs = (6, 6, 3) if q else (8, 2, 4)
    rss_counts = (4, 40) if q else (20, 200)
    work = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="octa3d-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    n_threads = bench_threads()
    try:
        with threads(n_threads), itk_threads(n_threads):
            # memory first, while this process holds little (quick mode forks it)
            small = source_eye(work / ("src-" + "x".join(map(str, small_shape))), small_shape)
            rss = {}
            for n in rss_counts:
                root = clone_dataset(small, work / f"rss-{n}", n)
                rss[n] = measure_rss(root, work / f"rss-{n}-runs", input_size, max(rss_counts) // n, fresh=not q)
                shutil.rmtree(work / f"rss-{n}-runs", ignore_errors=True)  # its cache: up to 1.6 GB at 128^3
                shutil.rmtree(root, ignore_errors=True)
            src = source_eye(work / ("src-" + "x".join(map(str, shape))), shape)
            root = clone_dataset(src, work / "data", n_subjects)
            runs = work / "runs"
            ours = octa3d_epochs(root, runs, input_size, epochs)
            naive = naive_epoch(root, runs, input_size, n_naive)
            steps = stage_times(root, runs, input_size)
    finally:
        if not ns.work:
            shutil.rmtree(work, ignore_errors=True)

    cold_s, cold_n = ours["seconds"][0], ours["samples"][0]
    warm_s, warm_n = sum(ours["seconds"][1:]), sum(ours["samples"][1:])
    cold_per_subject = cold_s / ours["subjects"]
    naive_rate = naive["samples"] / naive["seconds"]
    naive_per_subject = naive["seconds"] / naive["samples"]
    warm_rate = warm_n / warm_s
    size = "x".join(map(str, shape))
    inp = "x".join(map(str, ours["input_shape"]))
    lo, hi = rss_counts
    rss_ratio = rss[hi]["peak_mb"] / rss[lo]["peak_mb"]
    figures = [
        Figure("loader samples/s, epochs >= 2 (cache + augmentation)", warm_rate, "samples/s",
               note=f"{warm_n} samples over {epochs - 1} epochs, {size} OCT+OCTA -> {inp}, batch "
                    f"{ours['batch_size']}"),
        Figure("loader samples/s, epoch 1 (cold: decode + preprocess + cache)", cold_n / cold_s, "samples/s",
               note=f"{ours['subjects']} subjects, warm() + first pass"),
        Figure("naive loader samples/s (every epoch)", naive_rate, "samples/s",
               note=f"{naive['samples']} subjects, batch 1, no workers, no augmentation"),
        Figure("epochs >= 2 vs naive loader", warm_rate / naive_rate, "x", ">= 100", note="samples/s ratio"),
        Figure("cold preprocessing vs naive, per volume", naive_per_subject / cold_per_subject, "x", ">= 5",
               note=f"{naive_per_subject:.2f} s vs {cold_per_subject:.2f} s per OCT+OCTA subject"),
        Figure("peak RSS, 10x more subjects", rss_ratio, "x", "<= 1.2",
               note=f"{hi} vs {lo} subjects: {rss[hi]['peak_mb']:.0f} MB vs {rss[lo]['peak_mb']:.0f} MB; "
                    f"{'x'.join(map(str, small_shape))} eyes, warm + {hi} samples each, "
                    f"{'fresh processes' if not q else 'forked processes'}"),
        Figure("cold decode per subject (octa3d)", steps["octa3d_decode_s"], "s", note="OCT+OCTA BMP stacks"),
        Figure("cold preprocess per subject (octa3d)", steps["octa3d_preprocess_s"], "s",
               note="slab crop + clip/scale + resize"),
        Figure("naive read per subject", steps["naive_read_s"], "s", note="SimpleITK float32, OCT+OCTA"),
        Figure("naive clip + resize per subject", steps["naive_clip_resize_s"], "s", note="float32, whole volume"),
    ]
    for f in figures:
        if not math.isfinite(f.value):
            raise RuntimeError(f"figure {f.name!r} is not finite: {f.value}")
    setup = {"volume_shape": list(shape), "input_shape": ours["input_shape"], "modality": "OCT+OCTA",
             "subjects": ours["subjects"], "naive_subjects": naive["samples"], "epochs": epochs,
             "batch_size": ours["batch_size"], "threads": n_threads, "augment": True,
             "data": "hard links of one synthetic eye (octa3d.data.synthetic.generate), page cache warm",
             "rss": {"volume_shape": list(small_shape), "cases": {str(k): v for k, v in rss.items()},
                     "process": "fresh interpreter" if not q else "fork"}}
    res = result("data_pipeline", figures, setup, q,
                 epochs={"seconds": ours["seconds"], "samples": ours["samples"]},
                 naive={"seconds": naive["seconds"], "samples": naive["samples"]}, stages=steps)
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
