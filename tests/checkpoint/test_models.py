"""Models from files: finding an experiment's checkpoints, and files written by earlier octa3d versions
(octa3d.checkpoint.models)."""

import json
import shutil
from pathlib import Path

import pytest

import octa3d
from octa3d.checkpoint.models import LoadedModel, find_checkpoints, fold_of, load_models
from octa3d.config import Config


def test_fold_of_reads_the_innermost_fold_folder(tmp_path):
    assert fold_of("runs/e/train/fold-3/checkpoints/best.pt") == 3
    assert fold_of("runs/fold-1/e/train/fold-12/checkpoints/best.pt") == 12
    assert fold_of("runs/e/train/checkpoints/best.pt") is None
    assert fold_of("runs/e/train/fold-x/best.pt") is None


def test_find_checkpoints_orders_folds_numerically(tmp_path):
    cfg = Config()
    cfg.run.runs_dir, cfg.run.exp = str(tmp_path), "e"
    for k in (0, 2, 10, 1):
        f = tmp_path / "e" / "train" / f"fold-{k}" / "checkpoints" / "best.pt"
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
    assert [n for n, _ in find_checkpoints(cfg)] == ["fold-0", "fold-1", "fold-2", "fold-10"]


# ------------------------------------------------------------------------------------ files of earlier versions
FIXTURES = Path(__file__).parent / "fixtures" / "octa3d-0.1.0"


@pytest.mark.parametrize("name", ["classifier_best.pt", "model_fp32.ts"])
def test_files_written_before_the_package_regrouping_load_and_predict_as_they_did(name, capture_log):
    """A checkpoint and an fp32 TorchScript export (with its model card) written by octa3d 0.1.0 before the modules
    moved into packages load through today's code and give the probabilities they gave then; they predate the
    out-of-distribution check: its columns are empty and one INFO line says why."""
    logs = capture_log("octa3d.deploy.api")
    want = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
    got = octa3d.load(FIXTURES / name, device="cpu", cam="none").predict(FIXTURES / want["input"])
    row = got.iloc[0]
    assert row["prediction"] == want["prediction"]
    for col in ("p_NORMAL", "p_ABNORMAL", "p_raw_NORMAL", "p_raw_ABNORMAL"):
        assert row[col] == pytest.approx(want[col], abs=1e-5), col
    assert (row["ood_score"], row["ood"], row["ood_reason"]) == ("", "", "")
    said = [r for r in logs if "predates the out-of-distribution check" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"


def test_an_ensemble_loads_as_named_members(tmp_path):
    """load_models gives LoadedModel records (name, path, record, model), not anonymous tuples."""
    for k in (0, 1):
        fold = tmp_path / f"fold-{k}"
        fold.mkdir()
        shutil.copy(FIXTURES / "classifier_best.pt", fold / "best.pt")
    models, ref = load_models([(f"fold-{k}", tmp_path / f"fold-{k}" / "best.pt") for k in (0, 1)])
    assert [m.name for m in models] == ["fold-0", "fold-1"] and all(isinstance(m, LoadedModel) for m in models)
    assert models[1].path == tmp_path / "fold-1" / "best.pt" and models[0].record is ref
    assert ref["class_names"] == ["NORMAL", "ABNORMAL"] and ref["is_quantized"] is False
    assert not models[0].model.training
