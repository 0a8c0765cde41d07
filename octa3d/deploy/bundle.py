"""A MONAI bundle of a trained octa3d classifier (or fold ensemble), written by ``--mode export``.

Layout (``runs/<exp>/export/bundle/``), after the MONAI Bundle specification::

    configs/metadata.json    versions, task, classes, input/output format (network_data_format)
    configs/inference.json   preprocessing as MONAI transforms, the TorchScript network, post-processing, run
    models/model.ts          fp32 TorchScript: (N, C, D, H, W) -> log of the calibrated class probabilities
    scripts/transforms.py    the retinal slab crop (no stock MONAI transform does it)
    scripts/inference.py     the loop: predictions.csv / predictions.json
    docs/README.md

``models/model.ts`` is :class:`CalibratedEnsemble`: ``log(mean_k softmax(logits_k / T_k))`` over the fold models
with their fitted temperatures (one model: ``log_softmax(logits / T)``), so the stock post-processing
``Activationsd(softmax=True)`` yields exactly the probabilities octa3d's test/predict report (calibrated, fold
average). The preprocessing repeats :class:`octa3d.data.presets.Clip3DPreset` with MONAI transforms (see
:func:`preprocessing`). 2D models are refused (their aspect padding, projections and patches have no bundle form).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from octa3d import __version__
from octa3d.checkpoint.exports import save_torchscript_fp32
from octa3d.errors import ConfigError
from octa3d.utils.io import atomic_write_text

#: ImageNet mean/std of ``--normalize imagenet`` (RGB; 1-2 channel inputs use their averages).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCRIPTS = Path(__file__).parent / "bundle_scripts"
BUNDLE_VERSION = "0.1.0"
#: ``configs/logging.conf`` (``monai.bundle run`` applies it; without one it warns): INFO to stdout.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


class CalibratedEnsemble(nn.Module):
    """Fold models behind one forward: the log of the mean of their temperature-scaled softmax probabilities.

    Args:
        models: the fold classifiers (logits out).
        temperatures: one per model; None or 1.0 leaves a model's probabilities as they are.
    """

    def __init__(self, models: list[nn.Module], temperatures: list[float | None]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.register_buffer("temperatures", torch.tensor([t or 1.0 for t in temperatures], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, *spatial)`` -> ``(N, K)`` log-probabilities."""
        if len(self.members) == 1:
            return torch.log_softmax(self.members[0](x) / self.temperatures[0], dim=1)
        probs = [torch.softmax(m(x) / self.temperatures[i], dim=1) for i, m in enumerate(self.members)]
        return torch.log(torch.stack(probs).mean(0))


def imagenet_stats(channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``--normalize imagenet`` for a ``channels``-channel input."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    mean, std = round(sum(IMAGENET_MEAN) / 3, 3), round(sum(IMAGENET_STD) / 3, 3)  # 0.449, 0.226
    return [mean] * channels, [std] * channels


def check_exportable(record: dict[str, Any], path: str | Path) -> None:
    """Refuse what the bundle cannot reproduce.

    Raises:
        ConfigError: a 2D model, or a preprocessing without its settings.
    """
    if record.get("dim") != "3d":
        raise ConfigError(f"{path}: --mode export writes MONAI bundles of 3D volume models only; this is a "
                          f"{record.get('dim')} model (its aspect padding, projection maps and patches have no bundle "
                          "form). Deploy it with --mode compress (TorchScript/ONNX + model card) or octa3d.load")
    pre = record.get("preprocess") or {}
    missing = [k for k in ("depth_axis", "slab_depth", "clip_percentiles") if k not in pre]
    if missing:
        raise ConfigError(f"{path}: the checkpoint records no preprocessing {', '.join(missing)}; it is from an older "
                          "octa3d: re-train it to export a bundle")


def preprocessing(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The MONAI transforms (config form) that turn a NIfTI volume into the network input, as octa3d does.

    octa3d reads volumes with SimpleITK, whose arrays are ``(z, y, x)``; MONAI's nibabel reader gives ``(x, y, z)``,
    hence the transpose. Then: retinal slab crop (``scripts.transforms``), per-channel percentile clip and scaling
    to 0..1 (``ScaleIntensityRangePercentilesd``), linear resize without antialiasing and ``align_corners=False``
    (``Resized``, as ``torch.nn.functional.interpolate``), and ImageNet normalisation when the model was trained
    with it.
    """
    pre = record["preprocess"]
    channels = int(record["in_channels"])
    lo, hi = (float(v) for v in pre["clip_percentiles"])
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        # several channels: a 4D NIfTI with the channels last, in the order of the model's modality
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel" if channels == 1 else -1},
        {"_target_": "Transposed", "keys": "image", "indices": [0, 3, 2, 1]},
        {"_target_": "scripts.transforms.RetinalSlabCropd", "keys": "image", "depth_axis": int(pre["depth_axis"]),
         "slab_depth": float(pre["slab_depth"])},
        {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": lo, "upper": hi, "b_min": 0.0,
         "b_max": 1.0, "clip": True, "channel_wise": True},
        {"_target_": "Resized", "keys": "image", "spatial_size": [int(s) for s in record["input_shape"]],
         "mode": "trilinear", "align_corners": False, "anti_aliasing": False},
    ]
    if pre.get("normalize", "none") == "imagenet":
        mean, std = imagenet_stats(channels)
        steps.append({"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": mean, "divisor": std,
                      "channel_wise": True})
    steps.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    return steps


def inference_config(record: dict[str, Any]) -> dict[str, Any]:
    """``configs/inference.json``: run from the bundle folder, ``--dataset_dir`` a NIfTI file or folder."""
    return {
        "imports": ["$import torch", "$import scripts", "$import scripts.inference", "$import scripts.transforms"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "class_names": list(record["class_names"]),
        "datalist": "$scripts.inference.find_inputs(@dataset_dir)",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing(record)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
        "run": ["$scripts.inference.predict(@dataset, @network, @postprocessing, @class_names, @output_dir, "
                "@device)"],
    }


def metadata(record: dict[str, Any], temperatures: dict[str, float | None], sources: dict[str, str]) -> dict[str, Any]:
    """``configs/metadata.json`` with the mandatory keys of the MONAI Bundle specification."""
    import monai


    names = list(record["class_names"])
    channels = int(record["in_channels"])
    modality = record.get("modality") or "OCTA"
    pre = record["preprocess"]
    value_range = [0, 1] if pre.get("normalize", "none") != "imagenet" else []
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by octa3d {__version__} --mode export"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel"), "fire": _version("fire")},
        "name": f"octa3d {record['model_name']} {record.get('task', '')}".strip(),
        "task": f"{record.get('task', '')} classification of retinal {modality} volumes: {', '.join(names)}",
        "description": (f"octa3d {record['model_name']} ({len(sources)} model(s): {', '.join(sources)}), "
                        "temperature-calibrated class probabilities averaged over the models."),
        "authors": "octa3d export",
        "copyright": "see the training data's licence",
        "intended_use": "research only, not for clinical diagnosis",
        "data_type": "nifti",
        "octa3d": {"version": __version__, "checkpoints": sources, "temperatures": temperatures,
                   "preprocess": {k: v for k, v in pre.items() if k not in ("cache_dir", "augment")}},
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": modality, "num_channels": channels,
                "spatial_shape": [int(s) for s in record["input_shape"]], "dtype": "float32",
                "value_range": value_range, "is_patch_data": False,
                "channel_def": {str(i): m for i, m in enumerate(modality.split("+"))} if channels > 1
                else {"0": modality}}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classes", "num_channels": len(names), "spatial_shape": [1],
                "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {str(i): n for i, n in enumerate(names)},
                "description": "log of the calibrated class probabilities; softmax (post-processing) gives them"}},
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def readme(record: dict[str, Any], temperatures: dict[str, float | None]) -> str:
    """``docs/README.md``: what the bundle does and how to run it."""
    names = ", ".join(record["class_names"])
    pre = record["preprocess"]
    temps = ", ".join(f"{k}: {'none' if v is None else f'{v:.4g}'}" for k, v in temperatures.items())
    channels = int(record["in_channels"])
    shape = "x".join(str(s) for s in record["input_shape"])
    return f"""# octa3d {record['model_name']} — MONAI bundle

Classifies retinal {record.get('modality') or 'OCTA'} volumes into: {names}. Research use only.

## Run
From this folder (needs `monai`, `torch`, `nibabel` and `fire`):

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/scan_or_folder

`--dataset_dir` is one `.nii`/`.nii.gz` volume or a folder of them{'' if channels == 1 else
f' (4D, the {channels} channels last: {record.get("modality")})'}; `--output_dir` (default `eval/`) receives
`predictions.csv` and `predictions.json` (file, one probability per class, predicted class).

## What it computes
Preprocessing, as octa3d trained the model: volume read as SimpleITK orders it (slices, rows, columns), retinal
slab of {pre['slab_depth']} cropped around the retina along axis {pre['depth_axis']}
(`scripts/transforms.py`), intensities clipped at percentiles {list(pre['clip_percentiles'])} per channel and
scaled to 0..1, linear resize to {shape}{', ImageNet mean/std normalisation' if pre.get('normalize') == 'imagenet'
else ''}. `models/model.ts` returns the log of the class probabilities calibrated by temperature scaling (fitted
on the validation split; {temps}) and averaged over the fold models; the post-processing softmax turns them into
the probabilities octa3d's `--mode test` / `--mode predict` report.

Differences from octa3d: float (non-uint8) volumes of more than 2 million voxels get exact percentiles here,
octa3d estimates them on a subsample (differences ~1e-3 in the clip values); other inputs agree within float
rounding (probabilities within 1e-4).
"""


def write_bundle(folder: Path, ensemble: nn.Module, example: torch.Tensor, record: dict[str, Any],
                 temperatures: dict[str, float | None], sources: dict[str, str]) -> dict[str, Path]:
    """Write the bundle into ``folder`` (created).

    Args:
        ensemble: :class:`CalibratedEnsemble` of the models.
        example: an input ``(1, C, *input_shape)`` to trace with.
        record: the checkpoint record (classes, input, preprocessing).
        temperatures: model name -> fitted temperature (None: none).
        sources: model name -> checkpoint path.

    Returns:
        The files written, by role.
    """
    check_exportable(record, next(iter(sources.values()), "?"))
    files = {"metadata": folder / "configs" / "metadata.json", "inference": folder / "configs" / "inference.json",
             "model": folder / "models" / "model.ts", "readme": folder / "docs" / "README.md"}
    meta = metadata(record, temperatures, sources)
    save_torchscript_fp32(ensemble, example, files["model"], extra_files={"metadata.json": json.dumps(meta)})
    atomic_write_text(files["metadata"], json.dumps(meta, indent=2) + "\n")
    atomic_write_text(files["inference"], json.dumps(inference_config(record), indent=2) + "\n")
    atomic_write_text(files["readme"], readme(record, temperatures))
    atomic_write_text(folder / "configs" / "logging.conf", LOGGING_CONF)
    scripts = folder / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    atomic_write_text(scripts / "__init__.py",
                      '"""octa3d bundle scripts (copied from octa3d.deploy.bundle_scripts)."""\n')
    for name in ("transforms.py", "inference.py"):
        shutil.copyfile(SCRIPTS / name, scripts / name)
        files[name] = scripts / name
    return files
