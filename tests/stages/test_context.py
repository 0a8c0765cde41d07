"""What every data stage sets up (octa3d.stages.context.setup_stage): nothing is written before the data is validated
and
the experiment's splits agree with the settings; a stage that makes new splits says so and names the others."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from octa3d.config import Config
from octa3d.data.synthetic import generate
from octa3d.errors import ConfigError, DataError
from octa3d.stages.context import setup_stage


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


def _extra_with_copy(src_root: Path, extra: Path, eye: str, new_id: str) -> Path:
    """``extra``: an OCTA-500 folder holding eye ``eye`` of ``src_root`` copied under ``new_id`` (both modalities)."""
    import shutil

    for mod in ("OCTA", "OCT"):
        shutil.copytree(fov_folder(src_root) / mod / eye, extra / "OCTA_6mm" / mod / new_id)
    return extra


def test_a_test_scan_copied_under_a_new_id_into_ae_extra_data_is_refused(data_root, tmp_path):
    from octa3d.data.leakage import guard_test_set
    from octa3d.errors import LeakageError

    runs = tmp_path / "runs"
    ctx = setup_stage(config(data_root, runs, mode="prepare"))
    test_eye, train_eye = ctx.splits.test[0], ctx.splits.train[0]
    extra = _extra_with_copy(data_root, tmp_path / "extra", train_eye, "90001")  # a training scan: no leak
    cfg = config(data_root, runs, mode="test")
    cfg.train.ae_extra_data = str(extra)
    guard_test_set(cfg, ctx.splits.test, ctx.splits)
    _extra_with_copy(data_root, extra, test_eye, "90002")
    with pytest.raises(LeakageError, match=rf"test refused: 1 hold-out test scan\(s\) are also in --ae-extra-data "
                                           rf"under another ID, byte for byte: test subject {test_eye} = extra "
                                           rf"subject 90002 "):
        guard_test_set(cfg, ctx.splits.test, ctx.splits, subjects=ctx.subjects)
    with pytest.raises(LeakageError, match=f"test subject {test_eye} = extra subject 90002"):
        guard_test_set(cfg, ctx.splits.test, ctx.splits)  # subjects discovered again
    # recorded by ae_pretrain (its config.yaml), not given again: still checked
    cfg.train.ae_extra_data = None
    (runs / "e" / "ae_pretrain").mkdir()
    (runs / "e" / "ae_pretrain" / "config.yaml").write_text(f"train:\n  ae_extra_data: {extra}\n")
    with pytest.raises(LeakageError, match="90002"):
        guard_test_set(cfg, ctx.splits.test, ctx.splits)
    # ae_pretrain itself refuses before training
    cfg = config(data_root, runs, mode="ae_pretrain")
    cfg.train.ae_extra_data = str(extra)
    with pytest.raises(LeakageError, match=rf"ae_pretrain refused: .*test subject {test_eye} = extra subject 90002"):
        setup_stage(cfg)


def test_ae_pretrain_with_a_copied_test_scan_leaves_the_prepared_experiment_untouched(data_root, tmp_path):
    from octa3d.errors import LeakageError

    runs = tmp_path / "runs"
    ctx = setup_stage(config(data_root, runs, mode="prepare"))
    extra = _extra_with_copy(data_root, tmp_path / "extra", ctx.splits.test[-1], "copy")
    before = {f: (runs / "e" / f).read_text() for f in ("config.yaml", "command.txt")}
    cfg = config(data_root, runs, mode="ae_pretrain")
    cfg.train.ae_extra_data = str(extra)
    with pytest.raises(LeakageError, match=f"test subject {ctx.splits.test[-1]} = extra subject copy"):
        setup_stage(cfg)
    assert {f: (runs / "e" / f).read_text() for f in before} == before
