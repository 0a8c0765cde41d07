"""History CSV, TensorBoard images (octa3d.utils.tracking)."""

import io
import sys

import pytest
import torch

from octa3d.cli import parse_config
from octa3d.utils.tracking import (History, cli_program, next_command, progress, progress_enabled, rerun_command,
                                   slice_grid)


def test_slice_grid_shape():
    img = slice_grid(torch.rand(3, 2, 8, 10, 12))
    assert img.shape == (1, 10, 36) and float(img.max()) <= 1.0


def test_history_rewrites_an_epoch_instead_of_duplicating_it(tmp_path):
    h = History(tmp_path / "history.csv")
    h.append({"epoch": 1, "loss": 1.0})
    h.append({"epoch": 2, "loss": 0.5})
    h.append({"epoch": 2, "loss": 0.4})  # a resumed epoch replaces its row
    h2 = History(tmp_path / "history.csv")
    h2.load()
    assert [r["loss"] for r in h2.rows] == [1.0, 0.4]


def test_history_on_a_full_disk_is_one_error_and_keeps_the_last_complete_file(tmp_path, monkeypatch):
    import errno

    import pandas as pd

    from octa3d.errors import DiskFullError

    h = History(tmp_path / "history.csv")
    h.append({"epoch": 1, "loss": 1.0})
    before = h.path.read_bytes()

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(DiskFullError, match="history.csv: cannot write it, the disk is full"):
        h.append({"epoch": 2, "loss": 0.5})
    assert h.path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["history.csv"]


def test_history_text_cells_are_spreadsheet_safe_and_read_back(tmp_path):
    h = History(tmp_path / "history.csv")
    h.append({"epoch": 1, "note": "=cmd|' /C calc'!A0", "delta": -0.5})
    assert "'=cmd" in h.path.read_text(encoding="utf-8") and ",-0.5" in h.path.read_text(encoding="utf-8")
    h2 = History(h.path)
    h2.load()
    assert h2.rows == [{"epoch": 1, "note": "=cmd|' /C calc'!A0", "delta": -0.5}]


# ------------------------------------------------------------------------------------------------ console
class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bars_only_on_a_terminal(monkeypatch, tty):
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    assert progress_enabled() is tty
    assert list(progress(range(3), desc="x")) == [0, 1, 2]
    assert ("\r" in stream.getvalue()) is tty  # a redirected log gets no carriage-return updates


@pytest.mark.parametrize("argv0, prog", [
    ("/home/u/.venv/bin/octa3d", "octa3d"),
    ("main.py", "python main.py"),
    ("/work/my code/main.py", "python '/work/my code/main.py'"),
    ("/x/octa3d/cli.py", "python -m octa3d.cli"),
    ("/usr/bin/pytest", "python main.py"),
])
def test_cli_program_names_the_command_actually_run(argv0, prog):
    assert cli_program(argv0) == prog


def test_next_command_repeats_runs_dir_data_root_and_config(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/octa3d"])
    cfg, _ = parse_config(["--mode", "ae_pretrain", "--runs-dir", "/r", "--data-root", "/d d", "--model", "cnn",
                           "--exp", "e", "--epochs", "3"])
    assert next_command(cfg, "test") == "octa3d --mode test --exp e --runs-dir /r --data-root '/d d'"
    assert next_command(cfg, "train", keep=("model", "dim", "epochs")) == (
        "octa3d --mode train --exp e --runs-dir /r --data-root '/d d' --model cnn --epochs 3")
    cfg, _ = parse_config(["--mode", "train"])  # defaults: nothing to repeat but the experiment
    assert next_command(cfg, "test") == "octa3d --mode test --exp 3d-resnet18-binary"
    yml = tmp_path / "c.yaml"
    yml.write_text("runs_dir: elsewhere\n", encoding="utf-8")
    cfg, _ = parse_config(["--config", str(yml), "--mode", "train", "--exp", "e"])
    monkeypatch.setattr(sys, "argv", ["main.py"])
    assert next_command(cfg, "test") == f"python main.py --config {yml} --mode test --exp e --runs-dir elsewhere"


def test_rerun_command_resumes_without_the_step_limit(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["main.py"])
    cfg, _ = parse_config(["--mode", "train", "--exp", "e", "--max-steps", "6", "--overwrite", "--lr", "1e-3"])
    assert rerun_command(cfg, ["--resume"], drop=["--max-steps", "--overwrite"]) == (
        "python main.py --mode train --exp e --lr 1e-3 --resume")
