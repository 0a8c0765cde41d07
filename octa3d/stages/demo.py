"""``--mode demo`` (``make demo``): the whole pipeline on a generated dataset, in minutes on a laptop CPU.

1. ``synth``: a small synthetic OCTA-500 set (:data:`DEMO_CLASSES`; with ``--task multi``
   :data:`DEMO_MULTI_CLASSES`; lesion masks included) in ``<runs-dir>/<exp>/data`` — reused when it already exists
   with the same settings;
2. ``prepare`` → ``ae_pretrain`` → ``train`` → ``test`` (with evidence-map export) in experiment ``demo``;
3. a second generated cohort (:data:`NEW_COHORT_SIZE` eyes, another seed, the 3 mm field of view: other eyes and
   IDs) in ``<runs-dir>/<exp>/new_eyes``, scored as external validation (``test --external``) and predicted as new
   scans (``predict --input``); 4. ``export`` (MONAI bundle + fp32 TorchScript).

Every stage runs through its entry in :data:`octa3d.stages.STAGES` with a Config built from
``DEMO_DEFAULTS < STAGE_DEFAULTS[stage] < the options you set`` (``cfg.explicit``), so any flag you give
(``--epochs 5``, ``--model resnet18``, ``--n-subjects 90``, ``--cam medcam`` …) overrides the demo default.
``--overwrite`` is part of the defaults: a second ``make demo`` re-runs every stage into fresh folders (the
generated data are kept).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from octa3d.cam import score_lines
from octa3d.config import Config, apply_overrides, get_value, to_argv, validate
from octa3d.data.synthetic import CLASSES, MARKER, generate, look_from_name
from octa3d.data.synthetic.look import look_record
from octa3d.errors import ConfigError
from octa3d.evaluation.metrics import summary_lines
from octa3d.stages import STAGES
from octa3d.utils.io import read_csv, safe_name

log = logging.getLogger("octa3d.demo")

#: Synthetic classes of the demo set: a balanced binary task, NORMAL vs CNV (a neovascular tuft above the RPE,
#: bright in OCTA), which a small CNN learns from ~40 training eyes at 32^3. ``--positive`` changes the disease.
DEMO_CLASSES: tuple[str, ...] = ("NORMAL", "CNV")
#: Classes generated for ``--task multi`` (unless ``--classes`` names others): harder, AMD drusen are subtle at 32^3.
DEMO_MULTI_CLASSES: tuple[str, ...] = ("NORMAL", "AMD", "CNV", "CSC")


def demo_classes(cfg: Config) -> tuple[str, ...]:
    """Synthetic classes to generate for the demo's task (``--task``, ``--classes``, ``--negative``/``--positive``).

    Raises:
        ConfigError: a requested class the generator cannot draw.
    """
    d = cfg.data
    if d.task == "multi":
        names = tuple(c.upper() for c in d.classes) if d.classes else DEMO_MULTI_CLASSES
    else:
        names = (d.negative.upper(), *(p.upper() for p in d.positive)) if d.positive else (
            d.negative.upper(), *(c for c in DEMO_CLASSES if c != d.negative.upper()))
    bad = [c for c in names if c not in CLASSES]
    if bad:
        raise ConfigError(f"the demo generates synthetic eyes of {', '.join(CLASSES)} only; {', '.join(bad)} "
                          f"cannot be generated (fix --classes/--negative/--positive)")
    return tuple(dict.fromkeys(names))

#: Settings of every demo stage (yours win over them). Tuned to finish within 10 minutes on 2 CPU cores (see
#: README "Demo").
DEMO_DEFAULTS: dict[str, Any] = {
    "exp": "demo", "dim": "3d", "model": "cnn", "modality": "OCTA", "task": "binary",
    "input_size": [32], "n_subjects": 72, "shape": [32, 64, 32],
    "batch_size": 8, "lr": 1e-3, "warmup_epochs": 1, "patience": 0,
    "num_workers": 0, "bootstrap": 1000, "overwrite": True,
}

#: Extra defaults of ``--task multi``: its classes include OCT findings (AMD drusen, CSC fluid) that OCTA alone
#: barely shows, and four classes need the stock recipe (60 epochs, batch 4), not the binary demo's shortcut (16
#: epochs, batch 8), after which the 4-class model had not left chance on its own training set (README
#: "Multi-class"); the demo's lr 1e-3 is the stock rate.
MULTI_DEFAULTS: dict[str, Any] = {"modality": "OCT+OCTA", "batch_size": 4}
MULTI_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {"train": {"epochs": 60}}

#: Extra defaults per stage (before your settings).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "prepare": {},
    "ae_pretrain": {"epochs": 4},
    "train": {"epochs": 16},
    "test": {},
}

DEMO_STEPS: tuple[str, ...] = ("prepare", "ae_pretrain", "train", "test", "test --external", "predict", "export")
#: Eyes of the second generated cohort (external validation and predict).
NEW_COHORT_SIZE = 12
#: mode and settings of the steps after ``test``: the second cohort goes in as ``{new}``.
STEP_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "test --external": ("test", {"external": "{new}"}), "predict": ("predict", {"input": "{new}"}),
    "export": ("export", {})}

def stage_config(stage: str, user: Config, data_root: str | None = None, new_cohort: str | None = None) -> Config:
    """The Config of one demo stage (or step of :data:`STEP_SETTINGS`): demo defaults < stage defaults < the user's
    explicit settings < the step's own (``new_cohort``: the second cohort's folder).

    The stage's ``explicit`` set and recorded command line are those of the equivalent command
    (``python main.py <demo defaults> <your flags> --mode <stage>``), so each stage's command.txt can be re-run.
    """
    mode, step = STEP_SETTINGS.get(stage, (stage, {}))
    multi = user.data.task == "multi"
    values = {**DEMO_DEFAULTS, **(MULTI_DEFAULTS if multi else {}),
              **({"data_root": data_root} if data_root is not None else {}),
              **STAGE_DEFAULTS.get(stage, {}), **(MULTI_STAGE_DEFAULTS.get(stage, {}) if multi else {})}
    values.update({k: get_value(user, k) for k in sorted(user.explicit) if k != "mode"})
    values.update({k: v.format(new=new_cohort) for k, v in step.items()})
    cfg = Config()
    apply_overrides(cfg, values, "demo")
    cfg.run.mode = mode
    validate(cfg)
    cfg.explicit = frozenset(values) | {"mode"}
    cfg.argv = tuple(to_argv(values) + ["--mode", mode])
    return cfg


def _data_root(user: Config) -> tuple[str, bool]:
    """``(root, explicit)``: the user's ``--data-root`` (flag or YAML) or ``<runs-dir>/<exp>/data``."""
    cfg = stage_config("prepare", user)
    if user.is_explicit("data_root") or cfg.data.data_root != Config().data.data_root:
        return cfg.data.data_root, True
    return str(Path(cfg.run.runs_dir) / cfg.exp_name / "data"), False


def ensure_data(cfg: Config, root: str, explicit: bool, n_subjects: int | None = None, seed: int | None = None,
                fov: str = "6mm") -> str:
    """Generate the demo dataset at ``root`` unless one with the same settings is there already.

    An explicit ``--data-root`` holding a real (non-synthetic) dataset is used as it is. ``n_subjects``, ``seed``
    and ``fov`` default to the demo's (``--n-subjects``, ``--seed``, 6 mm); the second cohort sets them. Both
    cohorts have the ``--synth-look`` (a dataset generated before looks existed is the stock look).

    Returns:
        What happened: ``"reused"``, ``"generated"`` or ``"user data"``.
    """
    r = Path(root)
    classes = demo_classes(cfg)
    n_subjects = cfg.synth.n_subjects if n_subjects is None else n_subjects
    seed = cfg.run.seed if seed is None else seed
    look = look_from_name(cfg.synth.synth_look)
    want = {"seed": seed, "n_subjects": n_subjects, "shape": list(cfg.synth.shape),
            "layout": "octa500", "fov": fov, "classes": list(classes)}
    marker = r / MARKER
    if marker.is_file():
        try:
            have = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            have = {}
        same_look = have.get("look", look_record(look_from_name("stock"))) == look_record(look)
        if have.get("complete") and same_look and all(have.get(k) == v for k, v in want.items()):
            log.info("Reusing the demo dataset in %s", r)
            return "reused"
        log.info("The dataset in %s was generated with other settings (or is incomplete): regenerating", r)
    elif explicit and r.exists() and any(r.iterdir()):
        log.info("Using your dataset in %s (not generated by the demo)", r)
        return "user data"
    t0 = time.perf_counter()
    generate(r, n_subjects, cfg.synth.shape, seed=seed, layout="octa500", fov=fov, classes=classes,
             overwrite=marker.is_file(), look=look)
    log.info("Generated %d synthetic eyes (%s) in %s in %.1f s", n_subjects,
             "x".join(map(str, cfg.synth.shape)), r, time.perf_counter() - t0)
    return "generated"


def _pick_review(metrics: dict[str, Any], test_dir: Path) -> Path | None:
    """A review PNG worth opening first: a correctly predicted diseased eye, else any."""
    cams = test_dir / "cams"
    if not cams.is_dir():
        return None
    try:
        pred = read_csv(test_dir / "predictions.csv", dtype={"subject": str})
        names = metrics["class_names"]
        good = pred[(pred["label"] != names[0]) & pred["correct"]]["subject"].tolist()
    except (OSError, KeyError, ValueError):
        good = []
    try:
        stems = dict(read_csv(cams / "names.csv", dtype=str).itertuples(index=False, name=None))
    except (OSError, ValueError):
        stems = {}
    for sid in good:
        f = cams / f"{stems.get(sid, safe_name(sid))}_review.png"
        if f.is_file():
            return f
    found = sorted(cams.glob("*_review.png"))
    return found[0] if found else None


def run(cfg: Config) -> dict[str, Any]:
    """Run the demo pipeline; print headline metrics, timings and where to look.

    Args:
        cfg: the configuration of ``--mode demo``: the options set explicitly (``cfg.explicit``) override the demo
            defaults of every stage.

    Returns:
        ``{"metrics": test metrics, "seconds": {stage: s}, "data": ..., "experiment": run folder}``.
    """
    t_start = time.perf_counter()
    root, explicit = _data_root(cfg)
    base = stage_config("prepare", cfg, root)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data_state = ensure_data(base, root, explicit)
    seconds["synth"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = str(Path(base.run.runs_dir) / base.exp_name / "new_eyes")
    ensure_data(base, new, False, n_subjects=NEW_COHORT_SIZE, seed=base.run.seed + 1, fov="3mm")
    seconds["synth"] += time.perf_counter() - t0
    results: dict[str, Any] = {}
    for stage in DEMO_STEPS:
        scfg = stage_config(stage, cfg, root, new)
        if stage == "export" and scfg.model.dim == "2d":
            print("\n=== demo: export skipped: MONAI bundles are built for 3D models ===", flush=True)
            continue
        print(f"\n=== demo: {stage} ===  (python main.py {' '.join(scfg.argv or ())})", flush=True)
        t0 = time.perf_counter()
        results[stage] = importlib.import_module(STAGES[scfg.run.mode]).run(scfg)
        seconds[stage] = time.perf_counter() - t0
    _print_summary(results, base, root, data_state, seconds, time.perf_counter() - t_start)
    return {"metrics": results["test"], "seconds": seconds, "data": root, "experiment": str(base.run_dir)}


def _print_summary(results: dict[str, Any], base: Config, root: str, data_state: str, seconds: dict[str, float],
                   total: float) -> None:
    metrics, ext, pred = results["test"], results["test --external"], results["predict"]
    test_dir = base.run_dir / "test"
    review = _pick_review(metrics, test_dir)
    cam_nii = review.with_name(review.name.replace("_review.png", "_cam.nii.gz")) if review else None
    lines = ["", f"=== demo finished in {total / 60:.1f} min ("
             + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"); data: {root} ({data_state}) ===",
             f"Hold-out test ({metrics['n_subjects']} eyes, {' vs '.join(metrics['class_names'])}):"]
    lines += summary_lines(metrics)
    lines += score_lines(metrics)
    lines.append(f"External cohort ({ext['n_subjects']} other eyes, {ext['cohort']['path']}): balanced accuracy "
                 f"{ext['balanced_accuracy']:.3f}, AUC {ext['auc']:.3f}; predicted as new scans: "
                 f"{pred['n_predicted']} eyes, {pred['n_uncertain'] or 0} flagged uncertain")
    page = test_dir / "review" / "index.html"
    lines += ["Where to look:",
              *([f"  review page    {page}  (open it in a browser from disk: metrics, subjects, 3D viewer)"]
                if page.is_file() else []),
              f"  metrics        {test_dir / 'metrics.json'}",
              f"  predictions    {test_dir / 'predictions.csv'}  (ROC: roc.png, confusion_matrix.png)"]
    if review:
        lines.append(f"  CAM review     {review}")
    if cam_nii and cam_nii.is_file():  # the scan, one file per modality: <id>_input_OCTA.nii.gz ...
        scans = sorted(cam_nii.parent.glob(cam_nii.name.replace("_cam.nii.gz", "_input*.nii.gz")))
        lines.append(f"  CAM volume     {cam_nii}  (open over {' or '.join(map(str, scans)) or 'the scan'}"
                     f" in 3D Slicer / ITK-SNAP / napari)")
    lines += [f"  external test  {base.run_dir / 'test-external'}/*/metrics.json",
              f"  predictions    {pred['folder']}/predictions.csv  (new scans; review/index.html)",
              *([f"  MONAI bundle   {base.run_dir / 'export' / 'bundle'}  (python -m monai.bundle run "
                 "--config_file configs/inference.json --dataset_dir SCAN)"] if "export" in results else []),
              f"  TensorBoard    tensorboard --logdir {base.run.runs_dir}"]
    print("\n".join(lines))
