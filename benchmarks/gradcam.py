"""Grad-CAM figure of project issue #7: seconds per volume of the CAM export, octa3d's default backend
(``--cam gradcam``, MONAI GradCAM) vs the ``medcam`` backend, same model, same inputs, same export.

Both backends run through the real exporter, built the way ``--mode test`` builds it
(:func:`octa3d.cam.cam_items_from_cache` over a :class:`~octa3d.data.datasets.DataHandler`'s preprocessing
cache, then ``CamExporter(cfg, models, names, out, preset, tb=..., device="cpu").export(items)``), so a volume's
time holds reading its input from the cache, the CAM (several subjects per forward/backward pass,
``--batch-size``), mapping it back to the source geometry, ``<id>_cam.nii.gz`` + ``<id>_input.nii.gz``, the review
PNG (source scan re-read) and the TensorBoard image. The data are synthetic OCTA-500 eyes
(``octa3d.data.synthetic.generate``, NORMAL/CNV, BMP stacks + lesion masks, so localization is scored too)::

    python main.py --mode synth --data-root WORK/data-64x128x64 --n-subjects 8 --shape 64,128,64 --seed 0

The model is an untrained registry network (seed 0; weights do not change the cost); both backends get identical
copies of it (separate copies: MONAI's hooks stay on the model it wraps). Each backend's exporter is warmed up
on one subject first, which leaves out first-call costs and medcam's one-off "test run" (an extra
forward/backward pass on its first call): a conservative comparison. Then the backends are timed alternately,
``--repeat`` times each, best run kept (the machines are shared). The maps of the two backends are compared
voxel by voxel (``map max |diff|``: both are Grad-CAM of the same layer, so the comparison is like for like).

Where the 2x comes from (see :mod:`octa3d.cam`): the default backend builds the autograd graph from the target
layer on, so its backward pass covers the classifier head only; medcam back-propagates through the whole
network. The export itself is the same for both; it was made cheaper (review sheet composed as pixels instead of
a matplotlib figure, no duplicate NIfTI compression), which matters most for small, fast models, where the
export dominates.

    python -m benchmarks.gradcam [--quick] [--work DIR] [--subjects 8] [--repeat 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Figure, bench_threads, finish, quiet_logs, result, threads

log = logging.getLogger("octa3d.bench.gradcam")

#: Target of issue 7: default backend's seconds per volume over medcam's.
TARGET = "<= 0.5"


@dataclass
class Case:
    """One model/input-size configuration.

    Attributes:
        model: registered model name.
        size: network input size (cube side).
        shape: synthetic source volume shape (B-scans, depth, width).
        batch: ``--batch-size`` (subjects per CAM pass).
    """

    model: str
    size: int
    shape: tuple[int, int, int]
    batch: int

    @property
    def label(self) -> str:
        """Figure prefix, e.g. ``"resnet18 64^3"``."""
        return f"{self.model} {self.size}^3"


FULL = (Case("resnet18", 64, (64, 128, 64), 4), Case("cnn", 32, (32, 64, 32), 4))
QUICK = (Case("cnn", 16, (16, 32, 16), 2),)


def _items(case: Case, work: Path, n: int) -> tuple[Any, Any, list[Any], list[str]]:
    """Synthetic eyes, the stage configuration and the CAM items from the warm preprocessing cache."""
    from octa3d.cli import parse_config
    from octa3d.data.datasets import DataHandler
    from octa3d.data.splits import labelled_subjects
    from octa3d.data.synthetic import generate
    from octa3d.cam import cam_items_from_cache
    from octa3d.model import get_spec

    data = work / f"data-{'x'.join(map(str, case.shape))}"
    if not data.exists():
        generate(data, n, case.shape, seed=0, classes=("NORMAL", "CNV"))
    cfg, _ = parse_config(["--mode", "test", "--data-root", str(data), "--runs-dir", str(work / "runs"),
                           "--exp", f"cam-{case.model}{case.size}", "--model", case.model,
                           "--input-size", str(case.size), "--batch-size", str(case.batch), "--cam", "gradcam",
                           # one layer (medcam explains one): the model's registered layer, as before the
                           # adaptive default (benchmarks/cam_quality.py compares layers)
                           "--cam-layer", get_spec(case.model).cam_layer])
    subjects, label_map, label_of = labelled_subjects(cfg)
    subjects = subjects[:n]
    handler = DataHandler(cfg, label_map)
    handler.warm(subjects, progress=False)
    k = len(label_map.class_names)
    probs = {s.id: np.where(np.arange(k) == label_of[s.id], 0.7, 0.3 / max(1, k - 1)) for s in subjects}
    items = cam_items_from_cache(handler, subjects, probs, {s.id: label_of[s.id] for s in subjects})
    return cfg, handler, items, list(label_map.class_names)


class _Run:
    """One warmed-up exporter (backend, batch size) and its timings."""

    def __init__(self, cfg: Any, handler: Any, model: Any, names: list[str], items: list[Any], backend: str,
                 batch: int, out: Path) -> None:
        from octa3d.cam import CamExporter
        from octa3d.utils.tracking import tensorboard_writer

        c = copy.deepcopy(cfg)
        c.eval.cam, c.train.batch_size = backend, batch
        self.items, self.out = items, out
        self.tb = tensorboard_writer(out / "tensorboard")
        self.exporter = CamExporter(c, [copy.deepcopy(model).eval()], names, out, handler.preset, tb=self.tb,
                                    device="cpu")
        self.exporter.export(items[:1])  # warm-up (first-call costs; medcam's one-off test run)
        self.total: list[float] = []
        self.cam: list[float] = []
        self.report: dict[str, Any] = {}

    def time(self) -> None:
        """Export every item once; record seconds per volume (total, and the CAM computation alone)."""
        t0 = time.perf_counter()
        self.report = self.exporter.export(self.items)
        self.total.append((time.perf_counter() - t0) / len(self.items))
        self.cam.append(self.report["cam"]["seconds_per_volume"])

    def close(self) -> None:
        """Flush the TensorBoard writer."""
        self.tb.close()


def _max_diff(a: Path, b: Path, ids: list[str]) -> float:
    """Largest voxel difference between the CAM volumes two runs wrote."""
    import SimpleITK as sitk

    from octa3d.utils.io import safe_name

    worst = 0.0
    for sid in ids:
        x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / f"{safe_name(sid)}_cam.nii.gz"))) for d in (a, b))
        worst = max(worst, float(np.abs(x.astype(np.float64) - y).max()))
    return worst


def bench_case(case: Case, work: Path, n: int, repeat: int) -> tuple[list[Figure], dict[str, Any]]:
    """Figures of one configuration: default vs medcam (ratio, seconds), CAM-only seconds, batching, agreement."""
    import torch

    from octa3d.model import create_model

    cfg, handler, items, names = _items(case, work, n)
    torch.manual_seed(0)
    model = create_model(case.model, "3d", 1, len(names)).eval()
    out = work / "out" / f"{case.model}{case.size}"
    runs = {key: _Run(cfg, handler, model, names, items, backend, batch, out / key)
            for key, backend, batch in (("gradcam", "gradcam", case.batch), ("medcam", "medcam", case.batch),
                                        ("gradcam-b1", "gradcam", 1))}
    for _ in range(repeat):  # alternate: load changes on a shared machine hit every backend alike
        for r in runs.values():
            r.time()
    for r in runs.values():
        r.close()
    g, m, g1 = runs["gradcam"], runs["medcam"], runs["gradcam-b1"]
    gt, mt = min(g.total), min(m.total)
    gc, mc = min(g.cam), min(m.cam)
    ids = [it.subject.id for it in items]
    diff = _max_diff(g.out, m.out, ids)
    fs = "x".join(map(str, g.report["cam"]["feature_shape"]))
    lbl, note = case.label, f"{len(items)} subjects, batch {case.batch}, source {'x'.join(map(str, case.shape))}"
    figures = [
        Figure(f"{lbl}: default (gradcam) vs medcam, s/volume incl. export", gt / mt, "x", TARGET,
               note=f"{gt:.3f} vs {mt:.3f} s; the CAM is {gc / gt:.0%} of the default's time; {note}"),
        Figure(f"{lbl}: default (gradcam) s/volume incl. export", gt, "s", note=note),
        Figure(f"{lbl}: medcam s/volume incl. export", mt, "s", note=note),
        Figure(f"{lbl}: default (gradcam) CAM computation s/volume", gc, "s", note=f"batch {case.batch}"),
        Figure(f"{lbl}: medcam CAM computation s/volume", mc, "s", note=f"batch {case.batch}"),
        Figure(f"{lbl}: export without the CAM s/volume", gt - gc, "s",
               note="cache read, map to source, 2 NIfTI, review PNG, TensorBoard (default-backend run)"),
        Figure(f"{lbl}: default CAM batched vs 1 subject per pass", min(g1.cam) / gc, "x",
               note=f"CAM s/volume at batch 1 over batch {case.batch} (> 1: batching helps)"),
        Figure(f"{lbl}: map max abs difference, gradcam vs medcam", diff, "",
               note=f"source-space CAM volumes, 0..1 scale; layer map {fs}"),
    ]
    setup = {"model": case.model, "input_size": case.size, "source_shape": list(case.shape),
             "batch_size": case.batch, "subjects": len(items), "feature_shape": g.report["cam"]["feature_shape"],
             "layer": g.report["cam"]["layer"],
             "runs_s_per_volume": {k: {"total": r.total, "cam": r.cam} for k, r in runs.items()}}
    return figures, setup


def main(args: list[str] | None = None) -> dict:
    """Time the CAM export with both backends for each configuration; write and return the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (cnn 16^3, 3 subjects)")
    ap.add_argument("--work", help="folder for data, cache and exports (default: a temporary folder)")
    ap.add_argument("--subjects", type=int, help="subjects per configuration (default 8; quick 3)")
    ap.add_argument("--repeat", type=int, help="timed exports per backend, best kept (default 2; quick 1)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    quiet_logs()
    cases = QUICK if ns.quick else FULL
    n = ns.subjects or (3 if ns.quick else 8)
    repeat = ns.repeat or (1 if ns.quick else 2)
    figures: list[Figure] = []
    setups = []
    with tempfile.TemporaryDirectory(prefix="octa3d-gradcam-") as tmp, threads(bench_threads()):
        work = Path(ns.work or tmp)
        for case in cases:
            t0 = time.perf_counter()
            f, s = bench_case(case, work, n, repeat)
            log.info("%s: %.0f s", case.label, time.perf_counter() - t0)
            figures += f
            setups.append(s)
    setup = {"cases": setups, "threads": bench_threads(), "repeat": repeat, "timing": "best of --repeat, backends "
             "alternated; each exporter warmed up on one subject first (excludes medcam's one-off test run)",
             "weights": "untrained (seed 0), identical for both backends", "device": "cpu"}
    res = result("gradcam", figures, setup, ns.quick)
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
