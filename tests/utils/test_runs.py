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
    with stage_dir(cfg, "train") as folder:
        (folder.path / "metrics.json").write_text("{}")
        d = folder.finish(cfg)
    with pytest.raises(RunExistsError, match="--overwrite"):
        stage_dir(cfg, "train")
    cfg.run.overwrite = True
    d2 = stage_dir(cfg, "train").finish(cfg)
    assert d2 == d and not (d2 / "metrics.json").exists()


def test_environment_text_has_versions():
    assert "python:" in environment_text()


# --------------------------------------------------------------------------------- damaged data and misuse
def _cfg(tmp_path, **run):
    cfg = Config()
    cfg.run.runs_dir = str(tmp_path / "runs")
    cfg.run.exp = "e"
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def _finished(cfg, stage="test", text="old"):
    with stage_dir(cfg, stage) as folder:
        (folder.path / "metrics.json").write_text(text)
        return folder.finish(cfg)


def test_overwrite_replaces_results_only_once_the_new_run_finished(tmp_path):
    """Item 5: a failed --overwrite run (disk full) leaves the earlier results as they were, and no partial
    folder; a finished one replaces them and leaves nothing beside them."""
    cfg = _cfg(tmp_path)
    final = _finished(cfg)
    cfg.run.overwrite = True
    with pytest.raises(OSError, match="No space left"):
        with stage_dir(cfg, "test") as folder:
            assert folder.path != final and (final / "metrics.json").read_text() == "old"
            (folder.path / "metrics.json").write_text("half")
            raise OSError(28, "No space left on device")
    assert (final / "metrics.json").read_text() == "old" and (final / ".complete").is_file()
    assert sorted(p.name for p in final.parent.iterdir() if p.name.startswith(".test")) == []
    with stage_dir(cfg, "test") as folder:
        (folder.path / "metrics.json").write_text("new")
        assert folder.rebase({"f": [str(folder.path / "cams" / "a.nii.gz")]}) == {"f": [str(final / "cams" /
                                                                                              "a.nii.gz")]}
        folder.finish(cfg)
    assert (final / "metrics.json").read_text() == "new"
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".test")] == []


def test_a_swap_cut_by_a_kill_is_repaired(tmp_path):
    """A kill between the two renames of a swap: the next run puts the finished results back in place."""
    cfg = _cfg(tmp_path)
    final = _finished(cfg)
    partial = final.parent / ".test.partial"
    partial.mkdir()
    (partial / "metrics.json").write_text("new")
    (partial / ".complete").write_text("{}")
    final.rename(final.parent / ".test.old")  # killed here
    cfg.run.overwrite = True
    with stage_dir(cfg, "test"):
        assert (final / "metrics.json").read_text() == "new"
        assert not (final.parent / ".test.old").exists()


def test_unfinished_attempts_never_block_a_retry(tmp_path):
    """Item 6: config.yaml/command.txt of a failed attempt are no results; an interrupted training with a last.pt
    is refused offering --resume (and --overwrite), and --resume continues in that folder."""
    cfg = _cfg(tmp_path)
    stage_dir(cfg, "test")  # a typo or crash after the folder was prepared: nothing finished
    stage_dir(cfg, "test").finish(cfg)  # the retry is not refused
    train = stage_dir(cfg, "train", training=True).path
    (train / "history.csv").write_text("epoch\n")
    stage_dir(cfg, "train", training=True)  # no last.pt: cleaned and retried
    assert not (train / "history.csv").exists()
    (train / "checkpoints").mkdir()
    (train / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(RunExistsError, match=r"--resume.*--overwrite"):
        stage_dir(cfg, "train", training=True)
    assert (train / "checkpoints" / "last.pt").is_file()
    cfg.train.resume = True
    assert stage_dir(cfg, "train", training=True).path == train
    assert (train / "checkpoints" / "last.pt").is_file()


def test_interrupted_overwrite_training_resumes_in_its_partial_folder(tmp_path):
    """Training --overwrite over finished results works beside them; if interrupted, the finished results stay,
    --resume continues the partial run and its end swaps it in."""
    cfg = _cfg(tmp_path)
    final = _finished(cfg, "train")
    cfg.run.overwrite = True
    with pytest.raises(KeyboardInterrupt):
        with stage_dir(cfg, "train", training=True) as folder:
            (folder.path / "checkpoints").mkdir()
            (folder.path / "checkpoints" / "last.pt").write_bytes(b"x")
            raise KeyboardInterrupt
    partial = folder.path
    assert partial.name == ".train.partial" and (partial / "checkpoints" / "last.pt").is_file()
    assert (final / "metrics.json").read_text() == "old"
    cfg.run.overwrite = False
    with pytest.raises(RunExistsError, match="--resume"):
        stage_dir(cfg, "train", training=True)
    cfg.train.resume = True
    with stage_dir(cfg, "train", training=True) as folder:
        assert folder.path == partial
        folder.finish(cfg)
    assert (final / "checkpoints" / "last.pt").is_file() and not partial.exists()


_HOLDER = """
import sys, time
from octa3d.config import Config
from octa3d.utils.runs import lock_experiment
cfg = Config(); cfg.run.runs_dir = sys.argv[1]; cfg.run.exp = "e"; cfg.run.mode = "train"
lock_experiment(cfg)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path, caplog):
    """Item 10: a live run's lock refuses a second run before it writes anything (even with --overwrite); once
    that run is killed (kill -9: a stale lock with a dead PID), the lock is taken over with a warning."""
    import subprocess
    import sys

    from octa3d.utils.lock import release_locks

    cfg = _cfg(tmp_path, overwrite=True)
    final = _finished(cfg)
    release_locks()  # this process's run has ended
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "runs")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in final.parent.iterdir())
        with pytest.raises(RunExistsError, match=rf"in use by another octa3d run \(pid {proc.pid}"):
            init_run(cfg)
        with pytest.raises(RunExistsError, match="in use"):
            stage_dir(cfg, "test")
        assert sorted(p.name for p in final.parent.iterdir()) == before
        assert (final / "metrics.json").read_text() == "old"
    finally:
        proc.kill()
        proc.wait()
    with caplog.at_level("WARNING", logger="octa3d.runs"):
        init_run(cfg)
    assert "no longer running" in caplog.text and str(proc.pid) in caplog.text
    release_locks()
    assert not (final.parent / ".lock").exists()


def test_stale_lock_and_orphaned_temp_files_are_cleaned(tmp_path, caplog, monkeypatch):
    """Item 10: a lock of a dead PID on this host is taken over; temporary files of writes a kill cut short are
    removed when the next run starts; other ranks of torchrun take no lock."""
    import json
    import socket

    from octa3d.utils.lock import release_locks, releases_locks

    cfg = _cfg(tmp_path)
    run = cfg.run_dir
    (run / "train" / "checkpoints").mkdir(parents=True)
    orphan = run / "train" / "checkpoints" / ".last.pt.0123456789ab.tmp.pt"
    orphan.write_bytes(b"half a checkpoint")
    keep = run / "train" / "notes.tmp"
    keep.write_text("mine")
    (run / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "mode": "train",
                                           "started": "2026-01-01T00:00:00"}))
    with caplog.at_level("WARNING", logger="octa3d.runs"):
        releases_locks(init_run)(cfg)
    assert "no longer running" in caplog.text
    assert not orphan.exists() and keep.exists()
    assert not (run / ".lock").exists()  # released when the decorated call returned
    monkeypatch.setenv("RANK", "1")
    init_run(cfg)
    assert not (run / ".lock").exists()
    release_locks()
