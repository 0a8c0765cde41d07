"""What every data stage sets up (octa3d.context.setup_stage): nothing is written before the data is validated and
the experiment's splits agree with the settings; a stage that makes new splits says so and names the others."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from octa3d.config import Config
from octa3d.context import setup_stage
from octa3d.data.synthetic import generate
from octa3d.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ctx") / "data"
    generate(root, 10, (8, 16, 8), seed=2, classes=("NORMAL", "DR"))
    return root


def config(data_root: Path, runs: Path, exp: str = "e", mode: str = "train") -> Config:
    cfg = Config()
    cfg.data.data_root, cfg.run.runs_dir, cfg.run.exp, cfg.run.mode = str(data_root), str(runs), exp, mode
    cfg.run.device = "cpu"
    cfg.argv = ("--mode", mode, "--exp", exp)
    return cfg


def fov_folder(root: Path) -> Path:
    return next(p for p in sorted(root.iterdir()) if p.name.startswith("OCTA_"))


def test_a_field_of_view_folder_as_data_root_is_refused_and_no_run_folder_made(data_root, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(DataError, match=f"point --data-root at its parent {re.escape(str(data_root))} "):
        setup_stage(config(fov_folder(data_root), runs))
    assert not runs.exists()


def test_unreadable_slice_folders_stop_before_the_run_folder(data_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    eyes = sorted((fov_folder(root) / "OCTA").iterdir())
    (eyes[0] / "2.bmp").unlink()
    (eyes[1] / "3.bmp").write_bytes(b"BM")
    runs = tmp_path / "runs"
    with pytest.raises(DataError) as err:
        setup_stage(config(root, runs))
    assert "2 subject(s) have slice folders that cannot be read" in str(err.value)
    assert f"{eyes[0].name}: OCTA folder" in str(err.value) and f"{eyes[1].name}: OCTA folder" in str(err.value)
    assert not runs.exists()


def test_contradicting_settings_leave_the_experiment_untouched(data_root, tmp_path):
    runs = tmp_path / "runs"
    ctx = setup_stage(config(data_root, runs, mode="prepare"))
    assert ctx.splits.test and len(ctx.subjects) == 10
    folder = runs / "e"
    before = {f: (folder / f).read_text() for f in ("config.yaml", "command.txt")}
    cfg = config(data_root, runs)
    cfg.data.test_fraction = 0.5
    with pytest.raises(ConfigError, match="--test-fraction was 0.3"):
        setup_stage(cfg)
    assert {f: (folder / f).read_text() for f in before} == before


def test_a_stage_making_new_splits_warns_and_names_the_prepared_experiment(data_root, tmp_path, caplog):
    runs = tmp_path / "runs"
    setup_stage(config(data_root, runs, exp="prepared", mode="prepare"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="octa3d"):
        ctx = setup_stage(config(data_root, runs, exp="3d-resnet18-binary", mode="train"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NEW EXPERIMENT '3d-resnet18-binary'" in w and "'prepared' (the same split settings)" in w
               for w in warnings), warnings
    assert (runs / "3d-resnet18-binary" / "splits" / "split.json").is_file() and ctx.splits.test
