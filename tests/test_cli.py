"""The command line: help, config precedence, errors, stage dispatch."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from octa3d.cli import build_parser, main, parse_config
from octa3d.config import section_fields
from octa3d.errors import DiskFullError

ROOT = Path(__file__).resolve().parents[1]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for _, f, _ in section_fields():
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert f.metadata["help"].split()[0] in out


def test_every_flag_sets_its_field():
    """Every flag reaches the config (no flag without effect on the configuration)."""
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    for _, f, _ in section_fields():
        assert f.name in dests


def test_users_command_is_accepted_as_written():
    cfg, _ = parse_config(["--dim", "3d", "--model", "resnet50", "--mode", "ae_pretrain"])
    assert cfg.model.model == "resnet50" and cfg.run.mode == "ae_pretrain"
    assert cfg.data.data_root == "./data"


def test_config_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 5\nbatch_size_unused: 1\n")
    with pytest.raises(Exception, match="unknown key 'batch_size_unused'"):
        parse_config(["--config", str(y)])
    y.write_text("seed: 5\ntask: multi\n")
    cfg, _ = parse_config(["--config", str(y), "--seed", "9"])
    assert cfg.run.seed == 9  # flag beats YAML
    assert cfg.data.task == "multi"  # YAML beats default


def test_unknown_config_key_exit_code(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("nonsense: 1\n")
    assert main(["--config", str(y)]) == 2
    assert "unknown key 'nonsense'" in capsys.readouterr().err


def test_main_py_runs_as_script():
    res = subprocess.run([sys.executable, "main.py", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "octa3d" in res.stdout


def test_no_data_says_how_to_point_at_data_or_synthesize(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["--dim", "3d", "--model", "resnet50", "--mode", "prepare"])
    err = capsys.readouterr().err
    assert code == 2 and "no data at" in err and "--mode synth" in err and "--data-root" in err
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_explicit_options_are_recorded_on_the_config(tmp_path):
    """Stages read which options the user set from the config (flags and YAML keys), never from argv."""
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  lr: 0.01\ninput-size: 24\n", encoding="utf-8")
    cfg, _ = parse_config(["--mode", "test", "--config", str(yml), "--data-root", "./data", "--no-amp"])
    assert cfg.explicit == {"mode", "lr", "input_size", "data_root", "amp"}
    assert cfg.is_explicit("data_root") and not cfg.is_explicit("epochs")
    assert cfg.argv == ("--mode", "test", "--config", str(yml), "--data-root", "./data", "--no-amp")
    assert cfg.train.lr == 0.01 and cfg.preprocess.input_size == [24] and cfg.train.amp is False


def test_synth_then_prepare_make_a_run_folder(tmp_path, capsys):
    data, runs = tmp_path / "d", tmp_path / "runs"
    assert main(["--mode", "synth", "--data-root", str(data), "--n-subjects", "18", "--shape", "12,24,12"]) == 0
    assert main(["--mode", "prepare", "--data-root", str(data), "--dim", "3d", "--runs-dir", str(runs)]) == 0
    exp = runs / "3d-resnet18-binary"
    for f in ("config.yaml", "command.txt", "environment.txt", "octa3d.log", "splits/train.csv",
              "splits/val.csv", "splits/test.csv", "splits/split.json"):
        assert (exp / f).exists(), f
    # a second prepare with other split settings is refused, naming the flag and --overwrite
    code = main(["--mode", "prepare", "--data-root", str(data), "--runs-dir", str(runs), "--seed", "3"])
    assert code == 2 and "--seed was 42" in capsys.readouterr().err


def test_bare_octa3d_prints_help_not_a_prepare_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here: a prepare run would fail with "no data at ./data"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/octa3d"])
    assert main([]) == 0
    cap = capsys.readouterr()
    assert "usage: octa3d" in cap.out and "--mode" in cap.out and "octa3d --mode synth" in cap.out
    assert not cap.err and not (tmp_path / "runs").exists()
    res = subprocess.run([sys.executable, "main.py"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "usage: octa3d" in res.stdout and "python main.py --mode synth" in res.stdout


@pytest.mark.parametrize("args, yaml_text, expected", [
    (["--lr", "nan"], None, "--lr: cannot read 'nan' as float: need a finite number"),
    (["--slab-depth", "nan"], None, "--slab-depth"),
    (["--num-workers", "-1"], None, "--num-workers -1"),
    (["--device", "gpu0"], None, "--device 'gpu0'"),
    ([], "epochs: true\n", "--epochs: cannot read True"),
    ([], "exp: [a, b]\n", "--exp: cannot read ['a', 'b']"),
    (["--exp", "../../escaped"], None, "--exp '../../escaped': must be a plain folder name"),
])
def test_misuse_is_one_line_error_before_anything_is_written(tmp_path, capsys, monkeypatch, args, yaml_text,
                                                              expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inner").mkdir()
    argv = ["--mode", "prepare", "--runs-dir", str(tmp_path / "inner" / "runs"), *args]
    if yaml_text:
        (tmp_path / "c.yaml").write_text(yaml_text, encoding="utf-8")
        argv += ["--config", str(tmp_path / "c.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["inner", *(["c.yaml"] if yaml_text else [])])
    assert not any((tmp_path / "inner").iterdir())


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device", "runs/x/train/history.csv"),
                                 DiskFullError("runs/x/train/history.csv: cannot write it, the disk is full")])
def test_full_disk_during_a_stage_is_one_line(tmp_path, capsys, monkeypatch, exc):
    import octa3d.cli as cli

    def stage(_cfg):
        raise exc

    monkeypatch.setattr(cli, "run_stage", stage)
    assert main(["--mode", "prepare", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("octa3d: error: runs/x/train/history.csv") and "disk is full" in err
    assert err.count("\n") == 1


def test_an_error_from_a_dataloader_worker_shows_its_own_message(tmp_path, capsys, monkeypatch):
    """torch re-raises a worker's exception with the worker's traceback in its message: only the original message
    shows (tests/test_errors.py checks that against a real worker)."""
    import octa3d.cli as cli

    msg = ("Caught DiskFullError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
           "  File \"x.py\", line 1, in f\n    raise DiskFullError(...)\n"
           "octa3d.errors.DiskFullError: /c/ab/k.npy: cannot write it, the disk is full (no space left on device)\n")

    def stage(_cfg):
        raise DiskFullError(msg)

    monkeypatch.setattr(cli, "run_stage", stage)
    assert main(["--mode", "prepare", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == ("octa3d: error: /c/ab/k.npy: cannot write it, the disk is full (no space "
                                       "left on device)\n")


@pytest.mark.parametrize("exp_exists", [True, False])
def test_a_long_list_is_capped_and_saved_whole(tmp_path, capsys, monkeypatch, exp_exists):
    """Issue 27: an error listing subjects is printed whole, its list capped; the full text is in a file it names
    (the experiment's errors/ folder when the experiment exists, else the current folder)."""
    import octa3d.cli as cli
    from octa3d.errors import MAX_LISTED, DataError

    items = [f"  {10001 + i}: OCTA folder /d/OCTA/{10001 + i}: 3.bmp: truncated" for i in range(30)]
    msg = "\n".join(["/d: 30 subject(s) have slice folders that cannot be read as one volume:", *items,
                     "fix or restore these files"])

    def stage(_cfg):
        raise DataError(msg)

    monkeypatch.setattr(cli, "run_stage", stage)
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "runs" / "e"
    if exp_exists:
        exp.mkdir(parents=True)
    assert main(["--mode", "train", "--runs-dir", "runs", "--exp", "e"]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == "octa3d: error: /d: 30 subject(s) have slice folders that cannot be read as one volume:"
    assert lines[1:MAX_LISTED + 1] == items[:MAX_LISTED] and lines[-1] == "fix or restore these files"
    more = lines[MAX_LISTED + 1]
    assert more.startswith("  … and 10 more (full list in ") and more.endswith(".txt)")
    saved = Path(more[len("  … and 10 more (full list in "):-1])
    where = exp / "errors" if exp_exists else tmp_path
    assert (saved if saved.is_absolute() else tmp_path / saved).parent == where
    assert (tmp_path / saved).read_text(encoding="utf-8") == f"octa3d: error: {msg}\n"
    assert [p.name for p in where.iterdir() if p.name.startswith(".")] == []  # atomic: no temporary file left
    if not exp_exists:
        assert not (tmp_path / "runs").exists()  # no experiment folder made for it
