"""``--mode prepare``: splits written once into the run folder, reused, re-made only with --overwrite."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from octa3d.config import Config
from octa3d.data.synthetic import generate
from octa3d.errors import ConfigError, DataError
from octa3d.stages import prepare


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prep") / "data"
    generate(root, 12, (8, 16, 8), seed=1, classes=("NORMAL", "DR"))
    return root


def config(data_root: Path, runs: Path) -> Config:
    cfg = Config()
    cfg.data.data_root, cfg.run.runs_dir, cfg.run.exp, cfg.run.mode = str(data_root), str(runs), "e", "prepare"
    cfg.argv = ("--mode", "prepare", "--exp", "e")
    return cfg


def test_writes_splits_and_run_folder(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(data_root, tmp_path / "runs")
    sp = prepare.run(cfg)
    out = capsys.readouterr().out
    assert f"Splits of experiment 'e' (12 subjects) in {tmp_path / 'runs' / 'e' / 'splits'}" in out
    assert "NORMAL" in out and "test" in out
    folder = tmp_path / "runs" / "e"
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "command.txt", "environment.txt", "splits"}
    assert "--mode prepare --exp e" in (folder / "command.txt").read_text(encoding="utf-8")
    doc = json.loads((folder / "splits" / "split.json").read_text(encoding="utf-8"))
    assert doc["class_names"] == sp.class_names and sorted(sp.train + sp.val + sp.test) == sorted(sp.labels)
    assert prepare.run(cfg).test == sp.test  # a second run reuses the splits


def test_changed_settings_need_overwrite(data_root: Path, tmp_path: Path) -> None:
    cfg = config(data_root, tmp_path / "runs")
    first = prepare.run(cfg)
    cfg.data.test_fraction = 0.5
    with pytest.raises(ConfigError, match="--test-fraction was 0.3"):
        prepare.run(cfg)
    cfg.run.overwrite = True
    again = prepare.run(cfg)
    assert len(again.test) > len(first.test)


def test_no_data_leaves_no_run_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data at"):
        prepare.run(config(tmp_path / "nothing", tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_refused_invocations_leave_the_experiment_as_it_was(data_root: Path, tmp_path: Path) -> None:
    """Other settings, or a wrong --data-root even with --overwrite: config, command and splits unchanged."""
    runs = tmp_path / "runs"
    cfg = config(data_root, runs)
    first = prepare.run(cfg)
    folder = runs / "e"
    files = ("config.yaml", "command.txt", "splits/split.json", "splits/test.csv")
    before = {f: (folder / f).read_text(encoding="utf-8") for f in files}
    cfg.data.test_fraction = 0.5
    with pytest.raises(ConfigError):
        prepare.run(cfg)
    wrong = config(tmp_path / "nothing", runs)
    wrong.run.overwrite = True
    with pytest.raises(DataError, match="no data at"):
        prepare.run(wrong)
    assert {f: (folder / f).read_text(encoding="utf-8") for f in files} == before
    assert prepare.run(config(data_root, runs)).test == first.test


def test_a_field_of_view_folder_is_refused_before_any_run_folder(data_root: Path, tmp_path: Path) -> None:
    fov = next(p for p in data_root.iterdir() if p.name.startswith("OCTA_"))
    with pytest.raises(DataError, match=f"point --data-root at its parent {re.escape(str(data_root))} "):
        prepare.run(config(fov, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_resplit_that_fails_keeps_the_earlier_splits(data_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14 item 5: --overwrite re-splits only once the new splits are made; a failure restores the old."""
    cfg = config(data_root, tmp_path / "runs")
    prepare.run(cfg)
    folder = cfg.run_dir / "splits"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def fail(*a, **k):
        raise DataError("a class is too small to split")

    monkeypatch.setattr(prepare, "load_or_make_splits", fail)
    cfg.run.overwrite = True
    with pytest.raises(DataError, match="too small"):
        prepare.run(cfg)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert not (cfg.run_dir / ".splits.old").exists() and not (cfg.run_dir / ".lock").exists()
