"""Scoring a labelled set on its own (octa3d.evaluation.evaluate): metrics from calibrated, ensemble-averaged
probabilities, one predictions.csv, per-fold scores, and the spread of MC-dropout passes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from octa3d.checkpoint.models import LoadedModel
from octa3d.cli import parse_config
from octa3d.evaluation.evaluate import evaluate

N = 12


class _Handler:
    """What evaluate reads of a DataHandler: a loader over the subjects (labelled 4-voxel volumes)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.tensor([i % 2 for i in range(N)])
        self.x = torch.randn(N, 1, 4, 4, 4, generator=g) + 0.8 * self.y.view(-1, 1, 1, 1, 1)

    def loader(self, subjects, train: bool, batch_size: int):
        ids = [s.id for s in subjects]
        return [{"image": self.x[i:i + batch_size], "label": self.y[i:i + batch_size],
                 "subject": ids[i:i + batch_size], "patch": torch.full((len(ids[i:i + batch_size]),), -1)}
                for i in range(0, len(ids), batch_size)]


def _member(name: str, seed: int, temperature: float) -> LoadedModel:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 2)).eval()
    rec = {"model_name": "linear", "dim": "3d", "input_shape": [4, 4, 4], "modality": "OCTA", "is_quantized": False,
           "artifact_format": "octa3d-checkpoint", "temperature": temperature, "entropy_threshold": 0.6,
           "entropy_threshold_raw": 0.6}
    return LoadedModel(name, Path(f"{name}/best.pt"), rec, net)


@pytest.fixture
def scored(tmp_path):
    ecfg = parse_config(["--mode", "test", "--exp", "e", "--runs-dir", str(tmp_path), "--cam", "none",
                         "--bootstrap", "50", "--batch-size", "5", "--mc-dropout", "3"])[0]
    models = [_member("fold-0", 0, 2.0), _member("fold-1", 1, 0.5)]
    handler = _Handler()
    subjects = [SimpleNamespace(id=f"s{i:02d}") for i in range(N)]
    out = tmp_path / "test"
    out.mkdir()
    metrics = evaluate(ecfg, out, models, models[0].record, handler, subjects, ["NORMAL", "DR"], {}, set(),
                       torch.device("cpu"), seed=7)
    return metrics, out, models, handler


def test_metrics_come_from_calibrated_ensemble_probabilities(scored):
    metrics, out, models, handler = scored
    with torch.no_grad():
        probs = np.mean([torch.softmax(m.model(handler.x) / m.record["temperature"], 1).numpy() for m in models], 0)
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred["subject"]) == [f"s{i:02d}" for i in range(N)]
    np.testing.assert_allclose(pred["p_DR"], probs[:, 1], atol=1e-6)
    assert {"p_raw_NORMAL", "p_raw_DR", "entropy", "p_sd", "uncertain"} <= set(pred.columns)
    assert metrics["auc"] == pytest.approx(roc_auc_score(handler.y.numpy(), probs[:, 1]))
    assert set(metrics["folds"]) == {"fold-0", "fold-1"} and metrics["ensemble"]
    assert metrics["calibration"]["applied"] and metrics["calibration"]["temperature"] == {"fold-0": 2.0, "fold-1": 0.5}
    assert metrics["bootstrap"]["seed"] == 7 and metrics["bootstrap"]["resamples"] == 50
    for png in ("roc", "confusion_matrix", "reliability", "coverage"):
        assert (out / f"{png}.png").stat().st_size > 0
    json.dumps(metrics, default=str)  # serialisable as metrics.json


def test_mc_dropout_spread_does_not_depend_on_the_batch_size(tmp_path, scored):
    """The masks of a pass are drawn per sample: batches of 5 and of 2 give the same p_sd."""
    metrics, out, models, handler = scored
    first = pd.read_csv(out / "predictions.csv")["p_sd"].to_numpy()
    ecfg = parse_config(["--mode", "test", "--exp", "e", "--runs-dir", str(tmp_path), "--cam", "none",
                         "--bootstrap", "0", "--batch-size", "2", "--mc-dropout", "3"])[0]
    again = tmp_path / "again"
    again.mkdir()
    evaluate(ecfg, again, models, models[0].record, handler, [SimpleNamespace(id=f"s{i:02d}") for i in range(N)],
             ["NORMAL", "DR"], {}, set(), torch.device("cpu"), seed=7)
    second = pd.read_csv(again / "predictions.csv")["p_sd"].to_numpy()
    assert (first > 0).all()
    np.testing.assert_allclose(first, second, atol=1e-7)
    assert metrics["uncertainty"]["p_sd_source"] == "2 model(s) x 0 TTA + 3 MC"
