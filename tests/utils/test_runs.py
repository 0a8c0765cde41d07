"""Run folders and atomic writes."""

import pytest

from octa3d.config import Config
from octa3d.errors import RunExistsError
from octa3d.utils.io import atomic_path, atomic_write_text
from octa3d.utils.runs import environment_text, init_run, stage_dir


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "a.txt"
    atomic_write_text(dest, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_init_run_records_config_command_environment(tmp_path):
    cfg = Config()
    cfg.run.runs_dir = str(tmp_path)
    cfg.run.exp = "e1"
    cfg.argv = ("--mode", "prepare")
    run = init_run(cfg)
    assert (run / "config.yaml").read_text().startswith("run:")
    assert "--mode prepare" in (run / "command.txt").read_text()
    env = (run / "environment.txt").read_text()
    assert "torch:" in env and "monai:" in env and "git_commit:" in env
    cfg.argv = ("--mode", "train")
    init_run(cfg)
    assert (run / "command.txt").read_text().count("main.py") == 2  # appended, not replaced
    assert (run / "octa3d.log").exists()


def test_stage_dir_refuses_without_overwrite(tmp_path):
    cfg = Config()
    cfg.run.runs_dir = str(tmp_path)
    d = stage_dir(cfg, "train")
    (d / "metrics.json").write_text("{}")
    with pytest.raises(RunExistsError, match="--overwrite"):
        stage_dir(cfg, "train")
    assert stage_dir(cfg, "train", resume=True) == d
    cfg.run.overwrite = True
    d2 = stage_dir(cfg, "train")
    assert not (d2 / "metrics.json").exists()


def test_environment_text_has_versions():
    assert "python:" in environment_text()
