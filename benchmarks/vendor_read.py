"""Vendor-file figures of project issue #29: reading a HEYEX ``.vol`` into the preprocessing cache vs the same
voxels from NIfTI.

    python -m benchmarks.vendor_read [--quick] [--work DIR] [--out result.json]

Data: one synthetic OCT eye of a Heidelberg Spectralis volume scan's size, 49 B-scans × 496 depth rows × 512
A-scans (``--quick``: 8×32×16), rendered with :func:`octa3d.data.synthetic.make_volume` and written twice: as a
HEYEX ``.vol`` (:func:`octa3d.data.synthetic.vendor_files.write_heyex_vol`, a right eye; a left-eye copy as well)
and as ``.nii.gz`` (:func:`octa3d.data.nifti.write_nifti`) with the same spacing. Both hold the same uint8 voxels
once read.

"Into the cache" is what a training stage pays per subject on a cache miss: :meth:`PreprocessCache.get` = read
(eyepy for the .vol, SimpleITK for the NIfTI), retinal slab crop, percentile clip, resize to the default 128³ input
(``--quick``: 16³) and the float16 store, each run into an empty cache folder; the best of 5 runs (``--quick``: 2)
per file, alternating files (a shared machine's noise only ever slows a run down). The bare read (``read_vendor``
vs ``read_volume``) is reported too. One CPU thread (``$OCTA3D_BENCH_THREADS``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, bench_threads, finish, quiet_logs, result, threads

FULL, QUICK = (49, 496, 512), (8, 32, 16)
SPACING = (0.0114, 0.0039, 0.12)  # Spectralis 20° volume scan: A-scan, depth, B-scan distance (mm)


def make_files(work: Path, shape: tuple[int, int, int]) -> dict[str, Path]:
    """The eye as ``od.vol``, ``os.vol`` and ``eye.nii.gz`` (same voxels, same spacing)."""
    import numpy as np

    from octa3d.data.nifti import write_nifti
    from octa3d.data.subject import Geometry
    from octa3d.data.synthetic import make_volume
    from octa3d.data.synthetic.vendor_files import write_heyex_vol

    work.mkdir(parents=True, exist_ok=True)
    vol = make_volume(shape, "NORMAL", seed=3)["oct"]
    files = {"vol": write_heyex_vol(work / "od.vol", vol, SPACING, "OD"),
             "vol_os": write_heyex_vol(work / "os.vol", vol, SPACING, "OS"),
             "nifti": write_nifti(vol, Geometry.default(vol.shape, SPACING), work / "eye.nii.gz")}
    from octa3d.data.readers import read_volume

    assert np.array_equal(read_volume(files["vol"])[0], read_volume(files["nifti"])[0])  # the same voxels
    return files


def cache_once(cfg: Any, subject: Any, cache_root: Path) -> float:
    """Seconds of one cache miss of ``subject`` into an empty cache folder."""
    from octa3d.data.datasets import PreprocessCache
    from octa3d.data.presets import build_preset

    shutil.rmtree(cache_root, ignore_errors=True)
    cache = PreprocessCache(cache_root, build_preset(cfg))
    t0 = time.perf_counter()
    cache.get(subject)
    seconds = time.perf_counter() - t0
    assert cache.misses == 1
    return seconds


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns :func:`benchmarks.common.result`'s dictionary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny volume, 2 runs (checks that the benchmark runs)")
    ap.add_argument("--work", default=None, help="folder for the files (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ns = ap.parse_args(args)
    quiet_logs()
    from octa3d.cli import parse_config
    from octa3d.data.readers import read_volume
    from octa3d.data.subject import Subject
    from octa3d.data.vendor import read_vendor, vendor_subject

    shape, repeat, size = (QUICK, 2, 16) if ns.quick else (FULL, 5, 128)
    tmp = tempfile.TemporaryDirectory(prefix="octa3d-vendor-bench-") if ns.work is None else None
    work = Path(ns.work or tmp.name)
    try:
        files = make_files(work / "files", shape)
        cfg, _ = parse_config(["--mode", "train", "--data-root", str(work), "--modality", "OCT",
                               "--input-size", str(size)])
        subjects = {"vol": vendor_subject(files["vol"]), "vol_os": vendor_subject(files["vol_os"]),
                    "nifti": Subject(id="eye", label=None, paths={"image": str(files["nifti"])})}
        into: dict[str, list[float]] = {k: [] for k in subjects}
        read: dict[str, list[float]] = {"vol": [], "nifti": []}
        with threads(bench_threads()):
            for k in subjects:  # warm-up: imports, page cache
                cache_once(cfg, subjects[k], work / "cache")
            for _ in range(repeat):
                for k, s in subjects.items():
                    into[k].append(cache_once(cfg, s, work / "cache"))
                t0 = time.perf_counter()
                read_vendor(files["vol"])
                read["vol"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                read_volume(files["nifti"])
                read["nifti"].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in into.items()}
        note = f"{'×'.join(map(str, shape))} uint8, into a {size}³ cache entry, best of {repeat}"
        figures = [
            Figure(".vol vs NIfTI into the cache", best["vol"] / best["nifti"], "x", "<= 1.5", note=note),
            Figure(".vol (left eye, mirrored) vs NIfTI into the cache", best["vol_os"] / best["nifti"], "x",
                   note=note),
            Figure(".vol into the cache", best["vol"], "s", note=note),
            Figure("NIfTI into the cache", best["nifti"], "s", note=note),
            Figure(".vol vs NIfTI, read only", min(read["vol"]) / min(read["nifti"]), "x",
                   note="read_vendor vs read_volume, the same voxels"),
        ]
        setup = {"shape": list(shape), "spacing_mm": list(SPACING), "input_size": size, "repeat": repeat,
                 "threads": bench_threads(), "file_mb": {k: round(p.stat().st_size / 2**20, 2)
                                                         for k, p in files.items()}}
        res = result("vendor_read", figures, setup, ns.quick,
                     runs_s={"into_cache": into, "read": read})
    finally:
        if tmp is not None:
            tmp.cleanup()
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
