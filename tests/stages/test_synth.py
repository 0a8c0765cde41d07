"""``--mode synth``: the stage writes the dataset and prints a summary with the next command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from octa3d.config import Config
from octa3d.errors import DataError
from octa3d.stages import synth

SHAPE = (10, 40, 12)


def test_run_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Config()
    cfg.data.data_root = str(tmp_path / "cli")
    cfg.synth.n_subjects, cfg.synth.shape, cfg.run.seed = 12, list(SHAPE), 3
    recs = synth.run(cfg)
    out = capsys.readouterr().out
    assert len(recs) == 12 and "NORMAL 2" in out and "RVO 2" in out
    assert f"--mode prepare --data-root {tmp_path / 'cli'} --exp <name> --dim 3d --model <model>" in out
    assert "6mm" in out and (tmp_path / "cli" / "OCTA_6mm").is_dir()  # --fov all (the default) writes 6mm
    with pytest.raises(DataError):
        synth.run(cfg)  # refuses to write over it without --overwrite


def test_run_3mm_nifti(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Config()
    cfg.data.data_root, cfg.data.fov = str(tmp_path / "d"), "3mm"
    cfg.synth.n_subjects, cfg.synth.shape, cfg.synth.layout = 2, list(SHAPE), "nifti"
    recs = synth.run(cfg)
    out = capsys.readouterr().out
    assert [r["id"] for r in recs] == ["10301", "10302"]
    assert "volumes/<ID>_{octa,oct}.nii.gz" in out and ".bmp" not in out


def test_run_with_a_look(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Config()
    cfg.data.data_root = str(tmp_path / "d")
    cfg.synth.n_subjects, cfg.synth.shape, cfg.synth.synth_look = 2, list(SHAPE), "noisy"
    synth.run(cfg)
    assert "look noisy" in capsys.readouterr().out
    assert json.loads((tmp_path / "d" / "synthetic.json").read_text())["look"]["name"] == "noisy"
