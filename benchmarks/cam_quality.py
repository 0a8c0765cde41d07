"""Evidence-map quality: methods x layers x models on generated eyes with lesion masks, hold-out subjects only.

Per model case (``cnn`` at 32³ and 48³, ``resnet18`` at 48³, ``efficientnet-b0`` at 48³): generate NORMAL vs CNV
eyes (CNV: a neovascular tuft above the RPE, with its lesion mask), train with the CLI (``prepare`` → ``train``),
then run ``--mode test`` once per method x layer set and read its ``metrics.json``: pointing game (tolerance: one
network-input voxel) and map mass in the lesion relative to chance on the CNV hold-out eyes, deletion AUC (with
its random-order reference) and seconds per volume (map computation, and map + export). Layer sets: every encoder
stage output between 1/2 and 1/16 of the input, the adaptive default (:func:`octa3d.cam.layers.default_layers`)
and the registered last layer (the old default). The default method and layers are judged against the targets of
the evidence-map issue: pointing game >= 0.8, mass >= 5x chance, time <= 2x the old Grad-CAM.

    python -m benchmarks.cam_quality [--quick] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, bench_threads, finish, result, run_stage, threads

log = logging.getLogger("octa3d.bench")

METHODS = ("gradcam", "gradcam++", "layercam", "hirescam")


@dataclass(frozen=True)
class Case:
    """One trained model to explain."""

    model: str
    size: int
    shape: tuple[int, int, int]
    epochs: int
    subjects: int = 72

    @property
    def label(self) -> str:
        return f"{self.model} {self.size}^3"


FULL = (Case("cnn", 32, (32, 64, 32), 16), Case("cnn", 48, (48, 96, 48), 16),
        Case("resnet18", 48, (48, 96, 48), 14), Case("efficientnet-b0", 48, (48, 96, 48), 14))
QUICK = (Case("cnn", 16, (16, 32, 16), 1, subjects=12),)


def _common(case: Case, work: Path) -> list[str]:
    return ["--data-root", str(work / f"data-{'x'.join(map(str, case.shape))}-{case.subjects}"),
            "--runs-dir", str(work / "runs"), "--exp", f"{case.model}-{case.size}", "--dim", "3d",
            "--model", case.model, "--input-size", str(case.size), "--modality", "OCTA", "--num-workers", "0",
            "--batch-size", "8", "--log-level", "WARNING"]


def train(case: Case, work: Path) -> float:
    """Generate the eyes (once per shape) and train the model; returns the training seconds."""
    from octa3d.data.synthetic import generate

    data = work / f"data-{'x'.join(map(str, case.shape))}-{case.subjects}"
    if not (data / "synthetic.json").is_file():
        generate(data, case.subjects, case.shape, seed=0, classes=("NORMAL", "CNV"))
    if (work / "runs" / f"{case.model}-{case.size}" / "train" / "summary.json").is_file():
        log.warning("%s: reusing the model trained in %s", case.label, work)  # a --work folder of an earlier run
        return 0.0
    t0 = time.perf_counter()
    run_stage([*_common(case, work), "--mode", "prepare"])
    run_stage([*_common(case, work), "--mode", "train", "--epochs", str(case.epochs), "--lr", "1e-3",
               "--warmup-epochs", "1", "--patience", "0", "--init", "random", "--overwrite"])
    return time.perf_counter() - t0


def layer_sets(case: Case, work: Path) -> dict[str, list[str]]:
    """Layer sets to compare: single stage outputs between 1/2 and 1/16 of the input, the adaptive default and the
    registered (old default) layer."""
    from octa3d.cam.layers import default_layers, feature_shapes, stage_outputs
    from octa3d.checkpoint.io import load_checkpoint
    from octa3d.checkpoint.models import build_classifier
    from octa3d.model import get_spec

    best = work / "runs" / f"{case.model}-{case.size}" / "train" / "checkpoints" / "best.pt"
    model = build_classifier(load_checkpoint(best, "classifier"), best)
    shape = (case.size,) * 3
    names = stage_outputs(case.model)
    shapes = feature_shapes(model, names, shape, 1)
    sets = {n: [n] for n in names if n in shapes and all(2 <= case.size / f <= 16 for f in shapes[n])}
    sets["default"] = default_layers(model, case.model, shape, 1)
    sets["registered"] = [get_spec(case.model).cam_layer]
    return sets


def explain(case: Case, work: Path, method: str, layers: list[str] | None, n_faithful: int) -> dict[str, Any]:
    """One ``--mode test`` run with this method and layer set; the scores it wrote."""
    args = [*_common(case, work), "--mode", "test", "--cam", method, "--bootstrap", "0", "--overwrite",
            "--faithfulness-subjects", str(n_faithful)]
    if layers:
        args += ["--cam-layer", ",".join(layers)]
    t0 = time.perf_counter()
    run_stage(args)
    wall = time.perf_counter() - t0
    m = json.loads((work / "runs" / f"{case.model}-{case.size}" / "test" / "metrics.json").read_text("utf-8"))
    loc = (m.get("localization") or {}).get("per_class", {}).get("CNV", {})
    faith = m.get("faithfulness") or {}
    cam = m["cam"]
    return {"method": method, "layers": cam["layer"], "pointing_game": loc.get("pointing_game"),
            "pointing_game_exact": loc.get("pointing_game_exact"), "mass_ratio": loc.get("mass_ratio"),
            "n_lesion_eyes": loc.get("n"), "deletion_auc": faith.get("deletion_auc"),
            "deletion_auc_random": faith.get("deletion_auc_random"), "insertion_auc": faith.get("insertion_auc"),
            "cam_s": cam["seconds_per_volume"], "export_s": cam.get("export_seconds_per_volume"),
            "without_evidence": cam["n_subjects"] - cam["status_counts"].get("ok", 0),
            "balanced_accuracy": m["balanced_accuracy"], "test_wall_s": wall}


def bench_case(case: Case, work: Path, quick: bool) -> tuple[list[Figure], dict[str, Any]]:
    """Train one case and score every method x layer set on its hold-out eyes."""
    train_s = train(case, work)
    sets = layer_sets(case, work)
    if quick:
        sets = {k: v for k, v in sets.items() if k in ("default", "registered")}
    n_faithful = 2 if quick else 6
    rows = []
    for name, layers in sets.items():
        for method in (METHODS[:1] + ("layercam",) if quick else METHODS):
            row = explain(case, work, method, layers, n_faithful)
            rows.append({"set": name, **row})
            log.info("%s %s %s: pg %s mass %s", case.label, method, name, row["pointing_game"], row["mass_ratio"])
    if not quick:
        rows.append({"set": "input", **explain(case, work, "occlusion", None, n_faithful)})
    from octa3d.config import Config

    default_method = Config().eval.cam
    cell = next(r for r in rows if r["set"] == "default" and r["method"] == default_method)
    old = next(r for r in rows if r["set"] == "registered" and r["method"] == "gradcam")
    lbl = case.label
    figures = [
        Figure(f"{lbl}: default map ({default_method}) pointing game", cell["pointing_game"] or 0.0, "",
               target=">= 0.8", note=f"{cell['n_lesion_eyes']} hold-out CNV eyes, layers {cell['layers']}"),
        Figure(f"{lbl}: default map mass in lesion vs chance", cell["mass_ratio"] or 0.0, "x", target=">= 5"),
        Figure(f"{lbl}: default map time vs old Grad-CAM (registered layer), map + export", _ratio(cell, old), "x",
               target="<= 2", note="seconds per volume of the CAM export, both from one run"),
        Figure(f"{lbl}: old default (gradcam, registered layer) pointing game", old["pointing_game"] or 0.0, "",
               note=f"layer {old['layers']}"),
        Figure(f"{lbl}: default map deletion AUC vs random order", _div(cell["deletion_auc"],
                                                                        cell["deletion_auc_random"]), "x",
               note="< 1: deleting the map's voxels first hurts the prediction faster than random"),
    ]
    return figures, {"case": lbl, "train_s": train_s, "layer_sets": sets, "rows": rows,
                     "hold_out_balanced_accuracy": cell["balanced_accuracy"]}


def _div(a: float | None, b: float | None) -> float:
    return float(a) / float(b) if a is not None and b else float("nan")


def _ratio(cell: dict[str, Any], old: dict[str, Any]) -> float:
    a = cell["export_s"] if cell["export_s"] is not None else cell["cam_s"]
    b = old["export_s"] if old["export_s"] is not None else old["cam_s"]
    return _div(a, b)


def table(setups: list[dict[str, Any]]) -> str:
    """The markdown table of every cell (README 'Evidence maps')."""
    lines = ["| model | method | layers | pointing game (exact) | mass / chance | deletion AUC (random) | "
             "insertion AUC | s/volume (map + export) |", "|---|---|---|---|---|---|---|---|"]

    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for s in setups:
        for r in s["rows"]:
            tag = " **(default)**" if r["set"] == "default" else (" (old default)" if r["set"] == "registered" else "")
            lines.append(f"| {s['case']} | {r['method']} | {r['layers']}{tag} | {f(r['pointing_game'], '.2f')} "
                         f"({f(r['pointing_game_exact'], '.2f')}) | {f(r['mass_ratio'], '.1f')} | "
                         f"{f(r['deletion_auc'], '.3f')} ({f(r['deletion_auc_random'], '.3f')}) | "
                         f"{f(r['insertion_auc'], '.3f')} | {f(r['export_s'] or r['cam_s'], '.2f')} |")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> dict:
    """Train every case, score every method x layer set; write and return the figures (and the table)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test sizes (cnn 16^3, 12 eyes, 1 epoch)")
    ap.add_argument("--work", help="folder for data, runs and cache (default: a temporary folder); models already "
                                   "trained there are reused")
    ap.add_argument("--only", help="comma list of case labels' models to run (e.g. cnn,resnet18)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    ns = ap.parse_args(args)
    from octa3d.utils.log import setup_logging

    setup_logging("WARNING")
    cases = QUICK if ns.quick else FULL
    if ns.only:
        keep = set(ns.only.split(","))
        cases = tuple(c for c in cases if c.model in keep)
    figures: list[Figure] = []
    setups = []
    with tempfile.TemporaryDirectory(prefix="octa3d-camq-") as tmp, threads(bench_threads()):
        work = Path(ns.work or tmp)
        for case in cases:
            t0 = time.perf_counter()
            f, s = bench_case(case, work, ns.quick)
            log.warning("%s: %.0f s", case.label, time.perf_counter() - t0)
            figures += f
            setups.append(s)
    setup = {"cases": setups, "threads": bench_threads(), "classes": ["NORMAL", "CNV"], "device": "cpu",
             "scoring": "hold-out eyes of each experiment; localisation on CNV eyes (lesion masks)"}
    res = result("cam_quality", figures, setup, ns.quick, table=table(setups))
    return finish(res, ns.out)


if __name__ == "__main__":
    main()
