"""Run folders and atomic writes."""

import os
import stat

import pandas as pd
import pytest

from octa3d.config import Config
from octa3d.errors import RunExistsError
from octa3d.utils.io import atomic_copy, atomic_path, atomic_write_csv, atomic_write_json, atomic_write_text
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


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    """Outputs get 0666 less the umask, like any other new file (not mkstemp's 0600: colleagues on a shared
    server must be able to read the results)."""
    old = os.umask(umask)
    try:
        files = [atomic_write_text(tmp_path / "a.txt", "x"), atomic_write_json(tmp_path / "b.json", {"a": 1}),
                 atomic_write_csv(tmp_path / "c.csv", pd.DataFrame({"a": [1]}))]
        files.append(atomic_copy(files[0], tmp_path / "d.txt"))
        with atomic_path(tmp_path / "e.nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz")  # writers that infer the format from the name still can
            tmp.write_bytes(b"x")
        files.append(tmp_path / "e.nii.gz")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(plain.stat().st_mode) == expected
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(expected) for f in files}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.csv", "d.txt", "e.nii.gz",
                                                          "plain.txt"]


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
