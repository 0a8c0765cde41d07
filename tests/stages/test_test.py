"""``--mode test``: metrics against hand-computed values, bootstrap CIs, checkpoint resolution, the leakage guard
and the stage's outputs on a tiny generated experiment (untrained model: the plumbing, not the score)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from octa3d.checkpoint.io import CheckpointError, load_checkpoint, model_record, save_checkpoint
from octa3d.checkpoint.models import find_checkpoints
from octa3d.cli import parse_config
from octa3d.errors import ConfigError, LeakageError, RunExistsError
from octa3d.evaluation.metrics import bootstrap_ci, evaluation_metrics, fast_scores
from octa3d.utils.io import atomic_torch_save

# ------------------------------------------------------------------------------------ fixed binary example
#   true:  0    0    0    0    0    1    1    1     1    1
#   P(1): .1   .2   .3   .6   .4   .8   .7   .45   .9   .35   -> TN 4, FP 1, FN 2, TP 3
Y2 = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
P1 = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.8, 0.7, 0.45, 0.9, 0.35])
PROBS2 = np.stack([1 - P1, P1], axis=1)

# ------------------------------------------------------------------------------------ fixed 3-class example
#   true 0 0 1 1 2 2, predicted 0 1 1 1 2 0  ->  confusion [[1,1,0],[0,2,0],[1,0,1]]
Y3 = np.array([0, 0, 1, 1, 2, 2])
PRED3 = np.array([0, 1, 1, 1, 2, 0])
PROBS3 = np.full((6, 3), 0.2)
PROBS3[np.arange(6), PRED3] = 0.6


def test_binary_metrics_match_hand_computation():
    m = evaluation_metrics(Y2, PROBS2, ["NORMAL", "DR"])
    assert m["confusion_matrix"] == [[4, 1], [2, 3]]
    assert m["sensitivity"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx(0.7)
    # kappa: po = 0.7, pe = (5*6 + 5*4) / 100 = 0.5
    assert m["kappa"] == pytest.approx(0.4)
    # AUC: 22 of the 25 (positive, negative) pairs are ordered correctly
    assert m["auc"] == pytest.approx(22 / 25)
    pc = m["per_class"]
    assert pc["DR"]["precision"] == pytest.approx(3 / 4) and pc["DR"]["recall"] == pytest.approx(0.6)
    assert pc["DR"]["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert pc["NORMAL"]["precision"] == pytest.approx(4 / 6) and pc["NORMAL"]["recall"] == pytest.approx(0.8)
    assert pc["NORMAL"]["f1"] == pytest.approx(2 * (4 / 6) * 0.8 / (4 / 6 + 0.8))
    assert m["f1_macro"] == pytest.approx((pc["DR"]["f1"] + pc["NORMAL"]["f1"]) / 2)
    assert pc["DR"]["support"] == 5


def test_multiclass_metrics_match_hand_computation():
    m = evaluation_metrics(Y3, PROBS3, ["NORMAL", "DR", "CNV"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # po = 4/6, pe = (2*2 + 2*3 + 2*1) / 36 = 1/3  ->  kappa = (2/3 - 1/3) / (2/3)
    assert m["kappa"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    pc = m["per_class"]
    assert [pc[c]["precision"] for c in ("NORMAL", "DR", "CNV")] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [pc[c]["recall"] for c in ("NORMAL", "DR", "CNV")] == pytest.approx([0.5, 1.0, 0.5])
    assert [pc[c]["f1"] for c in ("NORMAL", "DR", "CNV")] == pytest.approx([0.5, 0.8, 2 / 3])
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert "sensitivity" not in m  # binary only


@pytest.mark.parametrize("k,missing", [(2, None), (3, None), (4, 3)])
def test_fast_bootstrap_scores_equal_sklearn(k, missing):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 40)
    if missing is not None:
        y[y == missing] = 0  # a class absent from y_true: OvR AUC over the classes present
    probs = rng.dirichlet(np.ones(k), 40).round(1)  # rounding makes ties
    probs /= probs.sum(1, keepdims=True)
    ref = evaluation_metrics(y, probs, [f"c{i}" for i in range(k)])
    fast = fast_scores(y, probs)
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "kappa", "auc", "sensitivity", "specificity"):
        if key in ref:
            assert fast[key] == pytest.approx(ref[key], abs=1e-9), key


def test_bootstrap_ci_is_deterministic_and_contains_the_estimate():
    point = evaluation_metrics(Y2, PROBS2, ["NORMAL", "DR"])
    a = bootstrap_ci(Y2, PROBS2, 500, seed=7)
    b = bootstrap_ci(Y2, PROBS2, 500, seed=7)
    c = bootstrap_ci(Y2, PROBS2, 500, seed=8)
    assert a == b
    assert a != c
    for key in ("accuracy", "balanced_accuracy", "auc", "f1_macro", "sensitivity", "specificity"):
        lo, hi = a[key]
        assert lo <= point[key] <= hi, key
        assert 0 <= lo < hi <= 1, key
    assert a["n_valid"]["accuracy"] == 500
    assert 0 < a["n_valid"]["auc"] <= 500  # resamples with one class only have no AUC
    assert bootstrap_ci(Y2, PROBS2, 0, seed=7) == {}


# ------------------------------------------------------------------------------------ tiny experiment
def _args(root: Path, *extra: str) -> list[str]:
    return ["--data-root", str(root / "data"), "--runs-dir", str(root / "runs"), "--exp", "e", "--model", "cnn",
            "--input-size", "16", "--batch-size", "4", "--bootstrap", "50", "--cam", "none", *extra]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """12 synthetic eyes (NORMAL/CNV, 16x32x16), splits, and an untrained cnn saved as train/best.pt."""
    import torch

    from octa3d.data.synthetic import generate
    from octa3d.model import create_model
    from octa3d.stages.prepare import run as prepare

    root = tmp_path_factory.mktemp("exp")
    generate(root / "data", 12, (16, 32, 16), seed=0, classes=("NORMAL", "CNV"))
    cfg, _ = parse_config(_args(root, "--mode", "prepare"))
    sp = prepare(cfg)
    torch.manual_seed(0)  # the same untrained model in every run of the tests
    model = create_model("cnn", "3d", 1, 2)
    save_checkpoint(cfg.run_dir / "train" / "checkpoints" / "best.pt", model,
                           model_record(cfg, sp.class_names, "classifier"), epoch=1, config=cfg)
    return root




def test_test_stage_outputs(private_copy, experiment, tmp_path, capsys):
    from octa3d.stages.test import run

    root = private_copy(experiment)
    # --input-size 24 contradicts the checkpoint (16): refused, naming the model's value
    with pytest.raises(ConfigError, match=r"--input-size 24 \(the model: 16,16,16\)"):
        run(parse_config(_args(root, "--mode", "test", "--input-size", "24"))[0])
    cfg, _ = parse_config(_args(root, "--mode", "test"))
    m = run(cfg)
    out = root / "runs" / "e" / "test"
    for f in ("metrics.json", "predictions.csv", "roc.png", "confusion_matrix.png", "reliability.png",
              "coverage.png", "config.yaml"):
        assert (out / f).is_file(), f
    assert not (out / "cams").exists()  # --cam none
    assert any((out / "tensorboard").iterdir())
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["input_shape"] == [16, 16, 16]
    assert doc["n_subjects"] == 4 and doc["class_names"] == ["NORMAL", "CNV"]
    for key in ("accuracy", "balanced_accuracy", "auc", "f1_macro", "sensitivity", "specificity", "brier", "ece",
                "calibration_slope", "calibration_intercept", "aurc"):
        assert key in doc["ci95"], key
    # calibration numbers, bins with counts, selective prediction; this checkpoint has no temperature
    assert doc["ece_bins"] == 1 and sum(doc["reliability"]["count"]) == 4 and 0 <= doc["aurc"] <= 1
    assert doc["calibration"]["temperature"] is None and not doc["calibration"]["applied"]
    assert doc["calibration"]["raw"] == doc["calibration"]["calibrated"]
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject": str})
    assert list(pred.columns[:4]) == ["subject", "label", "p_NORMAL", "p_CNV"]
    assert np.allclose(pred[["p_NORMAL", "p_CNV"]].sum(1), 1, atol=1e-4)
    test_ids = pd.read_csv(root / "runs" / "e" / "splits" / "test.csv", dtype={"subject": str})["subject"]
    assert set(pred["subject"]) == set(test_ids)
    text = capsys.readouterr().out
    assert "balanced accuracy" in text and "metrics.json" in text
    assert "ece" in text and "(1 equal-mass bins)" in text and "at 90 % coverage accuracy" in text
    assert "calibration slope" in text and "reliability.png" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert {"test/reliability", "test/coverage", "test/roc"} <= set(ea.Tags()["images"])
    assert "test/brier" in ea.Tags()["scalars"]
    assert not math.isnan(m["accuracy"])


def test_checkpoint_config_takes_preprocessing_from_the_checkpoint(experiment):
    from octa3d.checkpoint.settings import checkpoint_config

    ckpt = load_checkpoint(experiment / "runs" / "e" / "train" / "checkpoints" / "best.pt", "classifier")
    base = ["--runs-dir", str(experiment / "runs"), "--exp", "e", "--mode", "test", "--bootstrap", "7"]
    # flags that contradict the trained model are errors naming the model's value, all at once
    bad, _ = parse_config([*base, "--model", "resnet18", "--input-size", "64", "--modality", "OCT",
                           "--slab-depth", "0.9"])
    with pytest.raises(ConfigError, match=r"--model resnet18 \(the model: cnn\).*--slab-depth 0.9"):
        checkpoint_config(bad, ckpt)
    cfg, _ = parse_config(base)
    ecfg = checkpoint_config(cfg, ckpt)
    assert ecfg.input_shape == (16, 16, 16) and ecfg.model.model == "cnn" and ecfg.data.modality == "OCTA"
    assert ecfg.preprocess.slab_depth == 0.5 and not ecfg.preprocess.augment
    assert ecfg.data.data_root == str(experiment / "data")  # --data-root left at its default: the checkpoint's
    assert ecfg.eval.bootstrap == 7 and ecfg.run_dir == experiment / "runs" / "e"
    cfg.data.data_root = "/elsewhere"
    assert checkpoint_config(cfg, ckpt).data.data_root == "/elsewhere"


def test_test_refuses_training_subjects(private_copy, experiment, tmp_path):
    from octa3d.stages.test import run

    root = private_copy(experiment)
    splits = root / "runs" / "e" / "splits"
    test = pd.read_csv(splits / "test.csv", dtype=str)
    train = pd.read_csv(splits / "train.csv", dtype=str)
    pd.concat([train, test.iloc[:1]]).to_csv(splits / "train.csv", index=False)  # a test subject also trained
    cfg, _ = parse_config(_args(root, "--mode", "test"))
    with pytest.raises(LeakageError, match=test.iloc[0]["subject"]):
        run(cfg)
    assert not (root / "runs" / "e" / "test" / "metrics.json").exists()


def test_test_refuses_autoencoder_extra_data(private_copy, experiment, tmp_path):
    """Scans that pretrained the encoder (--ae-extra-data, recorded in ae_pretrain/config.yaml) are not test data."""
    from octa3d.config import to_yaml
    from octa3d.stages.test import run

    root = private_copy(experiment)
    ae_cfg, _ = parse_config(_args(root, "--mode", "ae_pretrain", "--ae-extra-data", str(root / "data")))
    (root / "runs" / "e" / "ae_pretrain").mkdir()
    (root / "runs" / "e" / "ae_pretrain" / "config.yaml").write_text(to_yaml(ae_cfg))
    cfg, _ = parse_config(_args(root, "--mode", "test"))
    with pytest.raises(LeakageError, match="test refused"):
        run(cfg)


def test_fold_ensemble_and_missing_checkpoint(private_copy, experiment, tmp_path):
    from octa3d.stages.test import run

    root = private_copy(experiment)
    train = root / "runs" / "e" / "train"
    best = train / "checkpoints" / "best.pt"
    for k in (0, 1):
        (train / f"fold-{k}" / "checkpoints").mkdir(parents=True)
        shutil.copy(best, train / f"fold-{k}" / "checkpoints" / "best.pt")
    shutil.rmtree(train / "checkpoints")
    sid = pd.read_csv(root / "runs" / "e" / "splits" / "test.csv", dtype=str)["subject"].iloc[-1]
    args = _args(root, "--mode", "test", "--cam", "gradcam", "--cam-layer", "features.block3.act",
                 "--cam-subjects", sid)
    cfg, _ = parse_config(args)
    assert [n for n, _ in find_checkpoints(cfg)] == ["fold-0", "fold-1"]
    m = run(cfg)
    assert m["ensemble"] and set(m["folds"]) == {"fold-0", "fold-1"}
    out = root / "runs" / "e" / "test"
    assert (out / "predictions_fold-1.csv").is_file()
    # CAM of the ensemble (maps of both folds averaged) for the one requested subject only
    assert m["cam"]["n_models"] == 2 and m["cam"]["n_subjects"] == 1
    cams = sorted(f.name for f in (out / "cams").iterdir() if f.name != "names.csv")  # names.csv: ID -> stem
    assert cams == [f"{sid}_cam.nii.gz", f"{sid}_input_OCTA.nii.gz", f"{sid}_review.png"]
    # recorded paths name the final folder, not the partial one the run wrote into
    assert m["cam"]["folder"] == str(out / "cams")
    # the map's status is in predictions.csv (subjects without maps say so) and counted in metrics.json
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject": str}).set_index("subject")
    assert pred.loc[sid, "cam_status"] in ("ok", "empty", "constant")
    assert set(pred.drop(index=sid)["cam_status"]) == {"not computed"}
    assert sum(m["cam"]["status_counts"].values()) == 1
    assert "export_seconds_per_volume" in m["cam"]
    bad, _ = parse_config(_args(root, "--mode", "test", "--cam", "gradcam", "--cam-subjects", "nobody"))
    with pytest.raises(ConfigError, match="nobody"):
        run(bad)
    # identical folds: the ensemble equals each fold
    assert m["folds"]["fold-0"]["auc"] == pytest.approx(m["auc"], nan_ok=True)
    shutil.rmtree(train / "fold-1" / "checkpoints")
    with pytest.raises(CheckpointError, match="fold-1"):
        find_checkpoints(cfg)
    cfg2, _ = parse_config(_args(root, "--mode", "test", "--exp", "nothing-here"))
    with pytest.raises(CheckpointError, match="--mode train"):
        find_checkpoints(cfg2)


# --------------------------------------------------------------------- damaged data and misuse
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_with_bad_flags_or_a_full_disk_keeps_the_results(private_copy, experiment, tmp_path, monkeypatch):
    """Item 5: --overwrite with a CAM layer or class the model does not have is refused before test/ is touched,
    and a run that fails while writing (disk full) leaves the earlier results complete, with no partial folder."""
    from octa3d.evaluation import outputs
    from octa3d.stages import test as test_stage

    root = private_copy(experiment)
    test_stage.run(parse_config(_args(root, "--mode", "test"))[0])
    out = root / "runs" / "e" / "test"
    before = _files(out)
    assert ".complete" in before

    def unchanged() -> None:
        assert _files(out) == before
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".test")]

    for bad, msg in ((["--cam-layer", "nope"], "--cam-layer nope"), (["--cam-class", "GLAUCOMA"],
                                                                   "--cam-class GLAUCOMA")):
        with pytest.raises(ConfigError, match=msg):
            test_stage.run(parse_config(_args(root, "--mode", "test", "--overwrite", "--cam", "gradcam", *bad))[0])
        unchanged()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(outputs, "save_figure", full)
        with pytest.raises(OSError, match="No space"):
            test_stage.run(parse_config(_args(root, "--mode", "test", "--overwrite"))[0])
    unchanged()
    with pytest.raises(RunExistsError, match="--overwrite"):
        test_stage.run(parse_config(_args(root, "--mode", "test"))[0])
    unchanged()


def test_a_failed_attempt_never_blocks_the_retry(private_copy, experiment, tmp_path, monkeypatch):
    """Item 6: a crash mid-run (or the config.yaml/command.txt an earlier version wrote before failing) is no
    result: the retry needs no --overwrite."""
    from octa3d.evaluation import outputs
    from octa3d.stages import test as test_stage

    root = private_copy(experiment)
    out = root / "runs" / "e" / "test"
    with monkeypatch.context() as m:
        m.setattr(outputs, "save_figure", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
        with pytest.raises(RuntimeError, match="crash"):
            test_stage.run(parse_config(_args(root, "--mode", "test"))[0])
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text("run: {}\n")
    (out / "command.txt").write_text("main.py --mode test\n")
    test_stage.run(parse_config(_args(root, "--mode", "test"))[0])
    assert (out / "metrics.json").is_file() and (out / ".complete").is_file()


# ------------------------------------------------------------------------------------ temperature
def _set_temperature(path: Path, t: float) -> None:
    ck = load_checkpoint(path)
    ck["temperature"] = t
    atomic_torch_save(ck, path)


def test_temperature_scaled_probabilities_by_default_and_per_fold_in_an_ensemble(private_copy, experiment, tmp_path):
    from octa3d.evaluation.calibration import apply_temperature
    from octa3d.stages.test import run

    root = private_copy(experiment)
    train = root / "runs" / "e" / "train"
    best = train / "checkpoints" / "best.pt"
    _set_temperature(best, 3.0)
    m = run(parse_config(_args(root, "--mode", "test"))[0])
    out = root / "runs" / "e" / "test"
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject": str})
    raw = pred[["p_raw_NORMAL", "p_raw_CNV"]].to_numpy()
    assert np.allclose(pred[["p_NORMAL", "p_CNV"]].to_numpy(), apply_temperature(raw, 3.0), atol=1e-5)
    cal = m["calibration"]
    assert cal["temperature"] == 3.0 and cal["applied"] and set(cal["raw"]) == set(cal["calibrated"])
    assert m["brier"] == pytest.approx(cal["calibrated"]["brier"])
    # --no-calibrate: the raw softmax is reported (both still in metrics.json)
    m2 = run(parse_config(_args(root, "--mode", "test", "--no-calibrate", "--overwrite"))[0])
    assert not m2["calibration"]["applied"] and m2["brier"] == pytest.approx(cal["raw"]["brier"])
    pred2 = pd.read_csv(out / "predictions.csv", dtype={"subject": str})
    assert "p_raw_CNV" not in pred2 and np.allclose(pred2[["p_NORMAL", "p_CNV"]].to_numpy(), raw, atol=1e-5)
    # an ensemble averages each fold's *calibrated* probabilities
    for k, t in ((0, 2.0), (1, 4.0)):
        (train / f"fold-{k}" / "checkpoints").mkdir(parents=True)
        shutil.copy(best, train / f"fold-{k}" / "checkpoints" / "best.pt")
        _set_temperature(train / f"fold-{k}" / "checkpoints" / "best.pt", t)
    shutil.rmtree(train / "checkpoints")
    m3 = run(parse_config(_args(root, "--mode", "test", "--overwrite"))[0])
    assert m3["calibration"]["temperature"] == {"fold-0": 2.0, "fold-1": 4.0}
    pred3 = pd.read_csv(out / "predictions.csv", dtype={"subject": str})
    want = (apply_temperature(raw, 2.0) + apply_temperature(raw, 4.0)) / 2
    assert np.allclose(pred3[["p_NORMAL", "p_CNV"]].to_numpy(), want, atol=1e-5)
    # a damaged temperature is refused with the file named
    _set_temperature(train / "fold-1" / "checkpoints" / "best.pt", -1.0)
    with pytest.raises(CheckpointError, match="fold-1.*temperature"):
        run(parse_config(_args(root, "--mode", "test", "--overwrite"))[0])


# ------------------------------------------------------------------------------------ uncertainty
def _perturb(path: Path) -> None:
    """Random non-zero weights: the untrained cnn answers 0.5 for every input, so no augmentation moves it."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ck = load_checkpoint(path)
    ck["state_dict"] = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                        for k, v in ck["state_dict"].items()}
    atomic_torch_save(ck, path)


def test_tta_spread_is_deterministic_with_the_seed_and_mc_dropout_samples(private_copy, experiment, tmp_path, capsys):
    from octa3d.stages.test import run

    root = private_copy(experiment)
    out = root / "runs" / "e" / "test"
    _perturb(root / "runs" / "e" / "train" / "checkpoints" / "best.pt")

    def pred(*extra: str) -> tuple[pd.DataFrame, dict]:
        m = run(parse_config(_args(root, "--mode", "test", "--overwrite", *extra))[0])
        return pd.read_csv(out / "predictions.csv", dtype={"subject": str}), m

    plain, m0 = pred()
    assert "entropy" in plain and "p_sd" not in plain and "uncertain" not in plain  # one model, no passes
    assert m0["uncertainty"]["p_sd_source"] is None and m0["uncertainty"]["threshold"] is None
    a, m = pred("--tta", "3", "--seed", "5")
    b, _ = pred("--tta", "3", "--seed", "5")
    c, _ = pred("--tta", "3", "--seed", "6")
    assert np.array_equal(a["p_sd"].to_numpy(), b["p_sd"].to_numpy())  # same seed: identical spreads
    assert not np.allclose(a["p_sd"].to_numpy(), c["p_sd"].to_numpy())  # another seed: other augmentations
    assert (a["p_sd"] > 0).any() and m["uncertainty"]["tta"] == 3 and "3 TTA" in m["uncertainty"]["p_sd_source"]
    # TTA only measures spread: the reported probabilities (and their entropy) are the plain pass
    assert np.allclose(a[["p_NORMAL", "p_CNV"]].to_numpy(), plain[["p_NORMAL", "p_CNV"]].to_numpy())
    assert np.allclose(a["entropy"], plain["entropy"])
    d, m = pred("--mc-dropout", "3")  # the cnn has dropout: its masks differ between passes
    assert (d["p_sd"] > 0).any() and "3 MC" in m["uncertainty"]["p_sd_source"]
    assert "P(positive) sd" in capsys.readouterr().out


def test_uncertain_flag_uses_the_validation_threshold_of_the_checkpoint(private_copy, experiment, tmp_path, capsys):
    from octa3d.evaluation.calibration import entropy
    from octa3d.stages.test import run

    root = private_copy(experiment)
    best = root / "runs" / "e" / "train" / "checkpoints" / "best.pt"
    # random weights: the untrained cnn gives (nearly) one probability for every eye, and entropies tied at the
    # 6 decimals of predictions.csv leave no eye above their median
    _perturb(best)
    first = run(parse_config(_args(root, "--mode", "test"))[0])
    pred = pd.read_csv(root / "runs" / "e" / "test" / "predictions.csv", dtype={"subject": str})
    e = pred["entropy"].to_numpy()
    assert np.allclose(e, entropy(pred[["p_NORMAL", "p_CNV"]].to_numpy()), atol=1e-5)
    assert first["uncertainty"]["aurc_entropy"] == pytest.approx(first["aurc"])  # binary: same ranking
    thr = float(np.median(e))
    ck = load_checkpoint(best)
    ck.update(entropy_threshold=thr, entropy_threshold_raw=thr, uncertainty_coverage=0.9)
    atomic_torch_save(ck, best)
    m = run(parse_config(_args(root, "--mode", "test", "--overwrite"))[0])
    pred = pd.read_csv(root / "runs" / "e" / "test" / "predictions.csv", dtype={"subject": str})
    flagged = pred["uncertain"].astype(bool)
    # predictions.csv rounds entropy to 6 decimals; the flag was set on the unrounded value
    assert flagged.any() and (pred.loc[flagged, "entropy"] >= thr - 1e-6).all()
    assert (pred.loc[~flagged, "entropy"] <= thr + 1e-6).all()
    u = m["uncertainty"]
    wrong = pred["prediction"] != pred["label"]
    assert u["threshold"] == thr and u["n_flagged"] == int(pred["uncertain"].sum())
    assert u["share_flagged"] == pytest.approx(pred["uncertain"].mean())
    assert u["error_rate_flagged"] == pytest.approx(wrong[pred["uncertain"]].mean())
    assert "error rate flagged" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--tta"):
        parse_config(_args(root, "--mode", "test", "--tta", "-1"))


def test_tta_on_a_multi_class_model_is_refused_not_ignored(private_copy, experiment, tmp_path):
    """The passes give the spread of P(positive): on a 3-class model they would do nothing, so they are refused."""
    from octa3d.model import create_model
    from octa3d.stages.test import run

    root = private_copy(experiment)
    cfg, _ = parse_config(_args(root, "--mode", "test"))
    ckpt = root / "three.pt"
    save_checkpoint(ckpt, create_model("cnn", "3d", 1, 3),
                               model_record(cfg, ["NORMAL", "CNV", "AMD"], "classifier"), epoch=1, config=cfg)
    with pytest.raises(ConfigError, match="binary models; this model has 3 classes"):
        run(parse_config(_args(root, "--mode", "test", "--checkpoint", str(ckpt), "--tta", "2"))[0])
    assert not (root / "runs" / "e" / "test").exists()


def test_external_outside_test_mode_is_refused():
    with pytest.raises(ConfigError, match="--external .* only for --mode test"):
        parse_config(["--mode", "predict", "--input", "x", "--external", "y"])
