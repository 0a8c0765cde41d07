"""``--mode export``: deployable files of a trained 3D classifier in ``runs/<exp>/export/``.

::

    export/
      bundle/            MONAI bundle (configs/metadata.json, configs/inference.json, models/model.ts,
                         scripts/, docs/README.md; see octa3d.deploy.bundle): fold ensemble, calibrated
      model_fp32.ts      fp32 TorchScript of the model (logits) + model_card.json (classes, preprocessing,
      model_card.json    temperature); with folds one fold-k/ folder each
      report.json        what was exported and the TorchScript-vs-eager check

The source is the experiment's ``train/checkpoints/best.pt``, its fold models, or ``--checkpoint`` (an octa3d
checkpoint). ``model_fp32.ts`` loads in test/explain/predict (``--checkpoint``) through
:func:`octa3d.checkpoint.models.load_any_model`; its card carries the temperature, so the probabilities are calibrated
as for the checkpoint. Nothing reads data: no data root is needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from octa3d.checkpoint import exports
from octa3d.checkpoint.io import CheckpointError, load_checkpoint
from octa3d.checkpoint.models import build_classifier, find_checkpoints
from octa3d.checkpoint.settings import checkpoint_config
from octa3d.config import Config
from octa3d.deploy import bundle
from octa3d.errors import ConfigError
from octa3d.utils.io import atomic_write_json
from octa3d.utils.runs import init_run, plan_stage, releases_locks, stage_dir

log = logging.getLogger("octa3d.export")

STAGE = "export"
#: Largest |TorchScript - eager| difference (logits of each model, probabilities of the bundle) accepted on the
#: check input: tracing records the same float32 kernels, so only reduction order may differ.
TOLERANCE = 1e-4
#: Records of one ensemble must agree on these.
_SAME = ("class_names", "model_name", "dim", "in_channels", "input_shape", "modality", "preprocess")


def _load(paths: list[tuple[str, Path]]) -> list[tuple[str, Path, dict[str, Any]]]:
    """The checkpoints (octa3d classifier checkpoints only), checked for being one exportable ensemble."""
    out = []
    for name, path in paths:
        if exports.is_torchscript(path) or path.suffix.lower() == ".onnx":
            raise ConfigError(f"--checkpoint {path}: --mode export needs an octa3d checkpoint (train/.../best.pt or "
                              "compress/pruned.pt), not an exported file")
        ckpt = load_checkpoint(path, kind="classifier")
        bundle.check_exportable(ckpt, path)
        try:
            ckpt["temperature"] = exports.checked_temperature(ckpt.get("temperature"), path)
        except exports.CardError as exc:
            raise CheckpointError(str(exc)) from exc
        if out:
            ref_path, ref = out[0][1], out[0][2]
            for key in _SAME:
                if ckpt.get(key) != ref.get(key):
                    raise CheckpointError(f"{path}: {key} {ckpt.get(key)!r} differs from {ref_path} "
                                          f"({ref.get(key)!r}); fold checkpoints of one ensemble must match")
        out.append((name, path, ckpt))
    return out


def _example(ckpt: dict[str, Any], seed: int) -> torch.Tensor:
    """A seeded input in the network's value range (the trace and the check input)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, int(ckpt["in_channels"]), *map(int, ckpt["input_shape"])), generator=g)


def _write_model(folder: Path, name: str, path: Path, ckpt: dict[str, Any], model: torch.nn.Module,
                 example: torch.Tensor) -> tuple[Path, float]:
    """``model_fp32.ts`` + ``model_card.json`` in ``folder``; returns the file and its max |logit| difference."""
    card = exports.build_card(ckpt, path, None)
    card["exported_by"] = "--mode export"
    ts_path = folder / "model_fp32.ts"
    traced = exports.save_torchscript_fp32(model, example, ts_path, card)
    with torch.no_grad():
        diff = float((traced(example) - model(example)).abs().max())
    exports.add_artifact(card, ts_path, "torchscript", "fp32", source=name, max_abs_logit_diff=diff)
    exports.write_card(card, folder)
    return ts_path, diff


@releases_locks
def run(cfg: Config) -> dict[str, Any]:
    """Export the experiment's classifier (or fold ensemble) into ``runs/<exp>/export/`` (replaced only once
    finished).

    Returns:
        The report (also ``report.json``): files, temperatures, TorchScript-vs-eager differences.

    Raises:
        ConfigError: a 2D model, or an exported file as ``--checkpoint``.
        CheckpointError: no trained model, or fold models that disagree.
    """
    loaded = _load(find_checkpoints(cfg))
    ref = loaded[0][2]
    ecfg = checkpoint_config(cfg, ref)
    plan_stage(ecfg, STAGE)  # RunExistsError before anything is traced
    example = _example(ref, ecfg.run.seed)
    models = {name: build_classifier(ckpt, path, "cpu") for name, path, ckpt in loaded}
    temps = {name: ckpt["temperature"] for name, _, ckpt in loaded}
    sources = {name: str(path) for name, path, _ in loaded}
    folded = len(loaded) > 1 or loaded[0][0].startswith("fold-")
    init_run(ecfg)
    with stage_dir(ecfg, STAGE) as sf:
        out = sf.path
        files: dict[str, Any] = {}
        diffs: dict[str, float] = {}
        for name, path, ckpt in loaded:
            ts_path, diffs[name] = _write_model(out / name if folded else out, name, path, ckpt, models[name],
                                                example)
            files[f"{name}/model_fp32.ts" if folded else "model_fp32.ts"] = str(ts_path)
        ensemble = bundle.CalibratedEnsemble([models[n] for n, *_ in loaded], [temps[n] for n, *_ in loaded]).eval()
        written = bundle.write_bundle(out / "bundle", ensemble, example, ref, temps, sources)
        bundle_ts = torch.jit.load(str(written["model"]), map_location="cpu")
        with torch.no_grad():
            want, got = torch.exp(ensemble(example)), torch.softmax(bundle_ts(example), dim=1)
        prob_diff = float((want - got).abs().max())
        bad = {n: d for n, d in {**diffs, "bundle": prob_diff}.items() if not d <= TOLERANCE}  # NaN is bad too
        if bad:
            raise CheckpointError(f"TorchScript export of {ref['model_name']} differs from the model ("
                                  + ", ".join(f"{n}: {d:.3g}" for n, d in bad.items()) + "): the network is not "
                                  "traceable as is; report it with the model name")
        report = {"model": ref["model_name"], "class_names": list(ref["class_names"]), "models": sources,
                  "temperatures": temps, "files": files | {f"bundle/{p.relative_to(out / 'bundle')}": str(p)
                                                          for p in written.values()},
                  "checks": {"max_abs_logit_diff": diffs, "bundle_max_abs_prob_diff": prob_diff},
                  "run": "python -m monai.bundle run --config_file configs/inference.json --dataset_dir SCAN_OR_FOLDER"
                         " (from the bundle folder)"}
        report = sf.rebase(report)
        atomic_write_json(out / "report.json", report)
        final = sf.finish(ecfg)
    print(f"Exported {ref['model_name']} ({', '.join(sources)}) to {final}/: bundle/ (MONAI bundle; run it from "
          f"there with: python -m monai.bundle run --config_file configs/inference.json --dataset_dir "
          f"SCAN_OR_FOLDER), {'fold-k/' if folded else ''}model_fp32.ts + model_card.json; temperatures "
          + ", ".join(f"{k} {'none' if v is None else f'{v:.3g}'}" for k, v in temps.items()))
    return report
