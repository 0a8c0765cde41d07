"""Where cells run: a killed worker and a failing cell are retried on Ray, an octa3d error is reported at once, a
failure never stops the others, and finished cells are never run again (cheap stand-in cells, no training)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from octa3d.errors import ConfigError
from octa3d.studies.engine import ExecOptions, cell_resources, execute
from octa3d.studies.plan import CELL_FAILED, Cell, finished, mark_finished


def stand_in(cell: Cell) -> dict:
    """A cell that counts its attempts in its folder and behaves as ``cell.extra['mode']`` says."""
    done = finished(cell.folder)
    if done is not None:
        return done
    counter = Path(cell.folder) / "attempts"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    mode = cell.extra["mode"]
    if mode == "die_once" and n == 1:
        os._exit(1)  # the worker process dies, as when it is killed or runs out of memory
    if mode == "raise_once" and n == 1:
        raise RuntimeError("a transient failure")
    if mode == "bad_setting":
        raise ConfigError("--lr -1: must be > 0")
    record = {"arm": cell.arm, "fold": cell.fold, "threads": cell.threads}
    mark_finished(cell.folder, record)
    return record


def _cells(root: Path, modes: list[str]) -> list[Cell]:
    return [Cell(m, 0, 1, str(root / m / "fold-0"), [], str(root / "splits"), extra={"mode": m}) for m in modes]


def _attempts(cell: Cell) -> int:
    return int((Path(cell.folder) / "attempts").read_text())


def test_cells_on_local_ray_retry_kills_and_failures_and_skip_finished(tmp_path):
    pytest.importorskip("ray")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    cells = _cells(tmp_path, ["ok", "die_once", "raise_once", "bad_setting"])
    out = execute(cells, stand_in, ExecOptions(retries=1, report_every=1))
    assert {k: o.status for k, o in out.items()} == {"ok/fold-0": "done", "die_once/fold-0": "done",
                                                     "raise_once/fold-0": "done", "bad_setting/fold-0": "failed"}
    assert [_attempts(c) for c in cells] == [1, 2, 2, 1]  # octa3d errors are not retried
    assert "--lr -1" in out["bad_setting/fold-0"].error
    assert "--lr -1" in json.loads((Path(cells[3].folder) / CELL_FAILED).read_text())["error"]
    assert out["ok/fold-0"].record["threads"] == 1  # 2 CPUs shared by 4 cells
    again = execute(cells, stand_in, ExecOptions(retries=0, executor="sequential"))
    assert {k: o.status for k, o in again.items()} == {"ok/fold-0": "skipped", "die_once/fold-0": "skipped",
                                                       "raise_once/fold-0": "skipped", "bad_setting/fold-0": "failed"}
    assert [_attempts(c) for c in cells] == [1, 2, 2, 2]  # only the unfinished cell ran again


def test_sequential_executor_retries_and_goes_on(tmp_path):
    cells = _cells(tmp_path, ["raise_once", "bad_setting", "ok"])
    out = execute(cells, stand_in, ExecOptions(executor="sequential", retries=1))
    assert [out[c.key].status for c in cells] == ["done", "failed", "done"]
    assert [_attempts(c) for c in cells] == [2, 1, 1]


def test_cell_resources():
    opts = ExecOptions()
    assert cell_resources(2, 0, 4, opts) == (1, 0.0)
    assert cell_resources(16, 0, 4, opts) == (4, 0.0)
    assert cell_resources(64, 0, 2, opts) == (8, 0.0)  # at most 8 threads per cell
    assert cell_resources(16, 4, 10, opts) == (4, 1.0)  # one GPU per cell, the CPUs per GPU
    assert cell_resources(16, 4, 10, ExecOptions(cell_gpus=0.5)) == (2, 0.5)
    assert cell_resources(16, 0, 4, ExecOptions(cell_cpus=3)) == (3, 0.0)


def test_progress_counts_and_eta_per_arm(tmp_path):
    from octa3d.studies.engine import Outcome, Progress
    from octa3d.studies.plan import CELL_RUNNING

    cells = [Cell(a, k, 2, str(tmp_path / a / f"fold-{k}"), [], "") for a in ("slow", "fast") for k in range(2)]
    p = Progress(cells, skipped=1)
    assert p.line() == "study: 1/5 cells done, 0 running, 0 failed, 4 waiting; ETA after the first cell"
    p.ended["slow/fold-0"] = Outcome("slow/fold-0", "done", 100.0)
    p.ended["fast/fold-0"] = Outcome("fast/fold-0", "failed", 1.0, "boom")
    Path(cells[1].folder).mkdir(parents=True)
    (Path(cells[1].folder) / CELL_RUNNING).write_text("{}")  # slow/fold-1 has just started
    line = p.line()
    # slow/fold-1 is expected to take what slow/fold-0 took; fast/fold-1 what any finished cell took
    assert line.startswith("study: 2/5 cells done, 1 running, 1 failed, 1 waiting; ETA ")
    assert line.endswith("ETA 3.3 min")  # (100 s left of slow/fold-1 + 100 s for fast/fold-1) / 1 running
