"""``--mode export``: the MONAI bundle run by ``python -m monai.bundle run`` reproduces octa3d's
calibrated probabilities on a NIfTI volume; fp32 TorchScript + model card beside it, loadable by test/explain with
the temperature; fold ensembles; 2D models refused."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from octa3d.checkpoint.io import model_record, save_checkpoint
from octa3d.checkpoint.models import load_any_model
from octa3d.checkpoint.settings import checkpoint_config
from octa3d.cli import parse_config
from octa3d.deploy.bundle_scripts import transforms as bundle_transforms
from octa3d.errors import ConfigError, RunExistsError

#: probabilities of the bundle vs octa3d (float32 preprocessing in another order of operations: ~1e-7 seen)
ATOL = 1e-4
#: MONAI Bundle specification: mandatory metadata.json keys, and those of each tensor format
META_KEYS = ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors",
             "copyright", "network_data_format")
TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
               "channel_def")


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--mode", "export", "--runs-dir", str(tmp_path / "runs"), "--exp", "e", "--model", "cnn",
            "--input-size", "16", *extra]


def _checkpoint(cfg, path: Path, temperature: float | None, seed: int) -> None:
    from octa3d.model import create_model

    torch.manual_seed(seed)
    model = create_model("cnn", cfg.model.dim, cfg.in_channels, 2)
    with torch.no_grad():  # an untrained net predicts ~0.5 everywhere: sharpen it so that the comparison bites
        for p in model.parameters():
            p.mul_(3.0)
    record = model_record(cfg, ["NORMAL", "CNV"], "classifier")
    if temperature is not None:
        record["temperature"] = temperature
    save_checkpoint(path, model, record, epoch=1, config=cfg)


def _octa3d_probs(cfg, scan: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """What octa3d's test/explain/predict compute, through the API's forward and calibration (the float32
    preprocessed input, as the bundle sees it): each checkpoint calibrated with its temperature, then averaged."""
    import octa3d
    from octa3d.data.presets import build_preset
    from octa3d.data.sources import subject_from_path

    probs = []
    for path in paths:
        predictor = octa3d.load(path, device="cpu", cam="none")
        ecfg = checkpoint_config(cfg, load_any_model(path)[1])
        x, _ = build_preset(ecfg).preprocess(subject_from_path(str(scan), ecfg.data))
        probs.append(predictor.combine("scan", predictor.forward(x[None])).probs)
    return np.mean(probs, axis=0), x


def _bundle_parser(bundle: Path):
    from monai.bundle import ConfigParser

    if str(bundle) not in sys.path:
        sys.path.insert(0, str(bundle))  # as monai.bundle run does: scripts/ importable
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]  # another bundle's scripts
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return parser


def test_bundle_run_reproduces_octa3d_probabilities(tmp_path, nifti_scan):
    from octa3d.stages.export import run

    (tmp_path / "scans").mkdir()
    scan, _ = nifti_scan(tmp_path / "scans" / "scanA.nii.gz")
    cfg, _ = parse_config(_args(tmp_path))
    best = cfg.run_dir / "train" / "checkpoints" / "best.pt"
    _checkpoint(cfg, best, 1.7, seed=0)
    rep = run(cfg)
    out = cfg.run_dir / "export"
    bundle = out / "bundle"
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "docs/README.md",
                "scripts/transforms.py", "scripts/inference.py", "scripts/__init__.py"):
        assert (bundle / rel).is_file(), rel
    assert rep["temperatures"] == {"best": 1.7} and rep["checks"]["bundle_max_abs_prob_diff"] < 1e-5
    want, x = _octa3d_probs(cfg, scan, [best])
    assert abs(want[0] - 0.5) > 0.02  # not a trivially uniform prediction

    # the bundle as a MONAI user runs it, in its own process, from its folder
    if importlib.util.find_spec("fire") is not None:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--dataset_dir", str(tmp_path / "scans")]
    else:  # `python -m monai.bundle` needs `fire` for its command line; the same run() without it
        cmd = [sys.executable, "-c", "from monai.bundle import run; run(config_file='configs/inference.json', "
               f"dataset_dir={str(tmp_path / 'scans')!r})"]
    done = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = pd.read_csv(bundle / "eval" / "predictions.csv")
    assert list(got.columns) == ["file", "p_NORMAL", "p_CNV", "prediction"] and len(got) == 1
    np.testing.assert_allclose(got[["p_NORMAL", "p_CNV"]].to_numpy()[0], want, atol=ATOL)
    assert got["prediction"][0] == ["NORMAL", "CNV"][int(np.argmax(want))]
    assert json.loads((bundle / "eval" / "predictions.json").read_text())["class_names"] == ["NORMAL", "CNV"]

    # the preprocessing alone: MONAI transforms == octa3d's preset
    parser = _bundle_parser(bundle)
    d = parser.get_parsed_content("preprocessing")({"image": str(scan)})
    np.testing.assert_allclose(np.asarray(d["image"]), x, atol=1e-5)

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert set(META_KEYS) <= set(meta)
    fmt = meta["network_data_format"]
    for spec in (fmt["inputs"]["image"], fmt["outputs"]["pred"]):
        assert set(TENSOR_KEYS) <= set(spec)
    assert fmt["inputs"]["image"]["spatial_shape"] == [16, 16, 16]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "NORMAL", "1": "CNV"}
    assert meta["octa3d"]["temperatures"] == {"best": 1.7}

    # the fp32 TorchScript + card: loaded as test/explain load it, temperature in the record, same logits
    ts, rec, is_q = load_any_model(out / "model_fp32.ts")
    assert not is_q and rec["artifact_format"] == "torchscript" and rec["temperature"] == 1.7
    card = json.loads((out / "model_card.json").read_text())
    assert card["temperature"] == 1.7 and card["quantized_engine"] is None
    assert card["artifacts"]["model_fp32.ts"]["precision"] == "fp32"
    eager, _, _ = load_any_model(best)
    xt = torch.from_numpy(x[None])
    with torch.no_grad():
        torch.testing.assert_close(ts(xt), eager(xt), atol=1e-5, rtol=1e-5)
    with pytest.raises(RunExistsError, match="--overwrite"):
        run(cfg)


def test_fold_ensemble_bundle_averages_calibrated_folds(tmp_path, nifti_scan):
    from octa3d.stages.export import run

    scan, _ = nifti_scan(tmp_path / "scanA.nii.gz")
    cfg, _ = parse_config(_args(tmp_path, "--normalize", "imagenet"))
    paths = [cfg.run_dir / "train" / f"fold-{k}" / "checkpoints" / "best.pt" for k in range(2)]
    _checkpoint(cfg, paths[0], 0.5, seed=1)
    _checkpoint(cfg, paths[1], None, seed=2)  # a fold without a fitted temperature: raw probabilities
    rep = run(cfg)
    out = cfg.run_dir / "export"
    assert rep["temperatures"] == {"fold-0": 0.5, "fold-1": None}
    for k, t in enumerate((0.5, None)):
        _, rec, _ = load_any_model(out / f"fold-{k}" / "model_fp32.ts")
        assert rec.get("temperature") == t
    bundle = out / "bundle"
    parser = _bundle_parser(bundle)
    d = parser.get_parsed_content("preprocessing")({"image": str(scan)})
    pre = [t for t in json.loads((bundle / "configs" / "inference.json").read_text())["preprocessing"]["transforms"]]
    norm = next(t for t in pre if t["_target_"] == "NormalizeIntensityd")
    assert norm["subtrahend"] == [0.449] and norm["divisor"] == [0.226]  # 1 channel: ImageNet averages
    # the bundle's network: mean over folds of softmax(logits_k / T_k), on the bundle's own input
    net = torch.jit.load(str(bundle / "models" / "model.ts"))
    post = parser.get_parsed_content("postprocessing")
    xt = torch.as_tensor(np.asarray(d["image"]))[None].float()
    with torch.no_grad():
        got = post({"pred": net(xt)[0]})["pred"].numpy()
        want = np.mean([torch.softmax(load_any_model(p)[0](xt) / (t or 1.0), 1)[0].numpy()
                        for p, t in zip(paths, (0.5, None))], axis=0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not (out / "model_fp32.ts").exists() and (out / "fold-1" / "model_card.json").is_file()


def test_2d_models_are_refused(tmp_path):
    from octa3d.stages.export import run

    cfg, _ = parse_config(["--mode", "export", "--runs-dir", str(tmp_path / "runs"), "--exp", "e", "--dim", "2d",
                           "--model", "cnn", "--input-size", "16"])
    _checkpoint(cfg, cfg.run_dir / "train" / "checkpoints" / "best.pt", None, seed=0)
    with pytest.raises(ConfigError, match="3D volume models only"):
        run(cfg)
    assert not (cfg.run_dir / "export").exists()


@pytest.mark.parametrize("seed", range(6))
def test_bundle_retina_locator_equals_octa3d(seed):
    """scripts/transforms.py (no octa3d, no scipy) finds the same slab as octa3d.data.transforms."""
    from scipy.ndimage import gaussian_filter1d

    from octa3d.data.transforms import locate_retina, slab_bounds

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(8, 90, 3))
    vol = rng.integers(0, 30, (1, *shape)).astype(np.uint8)
    axis = int(rng.integers(0, 3))
    a, b = sorted(int(v) for v in rng.integers(0, shape[axis], 2))
    sl = [slice(None)] * 4
    sl[axis + 1] = slice(a, b + 1)
    vol[tuple(sl)] += np.uint8(rng.integers(20, 200))
    profile = rng.random(shape[axis]).astype(np.float32)
    sigma = max(1.0, shape[axis] / 100)
    np.testing.assert_allclose(bundle_transforms.gaussian_smooth(profile, sigma),
                               gaussian_filter1d(profile, sigma, mode="nearest"), atol=1e-6)
    retina = locate_retina(vol, axis)
    assert bundle_transforms.locate_retina(vol.astype(np.float32), axis) == retina
    for slab in (0.5, 0.9, 7.0):
        assert bundle_transforms.slab_bounds(shape[axis], slab, retina) == slab_bounds(shape[axis], slab, retina)
