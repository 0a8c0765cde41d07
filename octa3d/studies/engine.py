"""Running a study's cells: as Ray tasks (an embedded local Ray, or an existing cluster) or one after another.

The unit of work is a plain function ``fn(cell) -> record`` (:class:`~octa3d.studies.plan.Cell` in, a finished run
folder out, skipped when its ``.cell-complete`` marker exists): this module only decides where and when it runs,
so another backend (a SLURM array, a thread pool) needs nothing from the study logic. Ray is imported only here and
only when it is used.

* **Local** (``--ray-address local``, the default): ``ray.init(address="local")`` starts a private Ray on this
  machine with every CPU and GPU, without dashboard, usage reporting or log forwarding (a second or two).
* **Cluster** (``auto``, ``ray://HOST:PORT``, ``HOST:PORT``): the cells go to the cluster's workers, which must
  see the study folder and the data under the same paths (a shared file system) and have octa3d installed.
* **Resources**: one GPU per cell where the cluster has GPUs (``--cell-gpus``), with the CPUs per GPU; otherwise
  the CPUs divided among the cells (1 to 8 each; ``--cell-cpus`` sets it). A cell sets its torch threads to its
  CPUs, so two cells never fight over the same cores.
* **Failures**: an octa3d error (a bad setting, a missing file) fails the cell at once, with its message; any other
  exception and a dead worker (killed, out of memory) are retried by Ray (``--cell-retries``), the retry resuming
  from the cell's stages that finished and its training's ``last.pt``. A failed cell never stops the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from octa3d.errors import ConfigError, Octa3dError, error_message
from octa3d.studies.plan import CELL_RUNNING, Cell, finished, mark_failed
from octa3d.utils.io import atomic_write_json

log = logging.getLogger("octa3d.studies")

CellFn = Callable[[Cell], dict[str, Any]]


@dataclass
class ExecOptions:
    """How cells run (the ``--executor``, ``--ray-address``, ``--cell-*`` flags)."""

    executor: str = "ray"
    address: str = "local"
    cell_cpus: int = 0
    cell_gpus: float = 1.0
    retries: int = 2
    report_every: float = 30.0


@dataclass
class Outcome:
    """What became of one cell in this run: ``done``, ``skipped`` (finished earlier) or ``failed``."""

    key: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    record: dict[str, Any] | None = None


def run_guarded(fn: CellFn, cell: Cell) -> dict[str, Any]:
    """Run ``fn(cell)`` as a task: ``.cell-running`` while it runs, octa3d errors returned (not retried), other
    exceptions recorded in ``.cell-failed`` and raised again (for Ray to retry)."""
    folder = Path(cell.folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / CELL_RUNNING, {"pid": os.getpid(), "host": socket.gethostname(),
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    t0 = time.perf_counter()
    try:
        record = fn(cell)
    except Octa3dError as exc:
        text = error_message(exc)
        mark_failed(folder, text)
        return {"status": "failed", "error": text, "seconds": time.perf_counter() - t0}
    except BaseException as exc:
        mark_failed(folder, f"{type(exc).__name__}: {error_message(exc)}")
        raise
    finally:
        (folder / CELL_RUNNING).unlink(missing_ok=True)
    return {"status": "done", "record": record, "seconds": time.perf_counter() - t0}


def cell_resources(cpus: float, gpus: float, n_cells: int, opts: ExecOptions) -> tuple[int, float]:
    """``(CPUs, GPUs)`` per cell on a cluster of ``cpus`` CPUs and ``gpus`` GPUs (see the module docstring)."""
    if gpus >= 1 and opts.cell_gpus > 0:
        per_gpu = max(1, int(cpus // max(1.0, gpus / opts.cell_gpus)))
        return (opts.cell_cpus or per_gpu), opts.cell_gpus
    return (opts.cell_cpus or max(1, min(8, int(cpus) // max(1, n_cells)))), 0.0


class Progress:
    """Cells done / running / failed / waiting and an ETA, logged when a cell ends and every ``report_every`` s."""

    def __init__(self, cells: list[Cell], skipped: int) -> None:
        self.cells = {c.key: c for c in cells}
        self.total, self.skipped = len(cells) + skipped, skipped
        self.ended: dict[str, Outcome] = {}
        self.t0 = time.perf_counter()

    def line(self) -> str:
        done = self.skipped + sum(o.status == "done" for o in self.ended.values())
        failed = sum(o.status == "failed" for o in self.ended.values())
        open_ = [c for k, c in self.cells.items() if k not in self.ended]
        started = {c.key: _mtime(Path(c.folder) / CELL_RUNNING) for c in open_}
        running = sum(t is not None for t in started.values())
        times = {k: o.seconds for k, o in self.ended.items() if o.status == "done"}
        if times and open_:
            # a cell takes what the finished cells of its arm took (of any arm, before one finished); a running
            # cell has spent part of it already; the running cells are the parallelism
            mean = sum(times.values()) / len(times)
            left = 0.0
            for c in open_:
                own = [t for k, t in times.items() if self.cells[k].arm == c.arm]
                expect = sum(own) / len(own) if own else mean
                left += max(0.1 * expect, expect - (time.time() - started[c.key])) if started[c.key] else expect
            eta = f"ETA {_duration(left / max(1, running))}"
        else:
            eta = "ETA after the first cell" if open_ else f"took {_duration(time.perf_counter() - self.t0)}"
        return (f"study: {done}/{self.total} cells done, {running} running, {failed} failed, "
                f"{len(open_) - running} waiting; {eta}")

    def end(self, outcome: Outcome) -> None:
        self.ended[outcome.key] = outcome
        if outcome.status == "failed":
            log.warning("cell %s FAILED: %s", outcome.key, (outcome.error or "").splitlines()[0][:300])
        else:
            log.info("cell %s finished in %s", outcome.key, _duration(outcome.seconds))
        log.info("%s", self.line())


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def execute(cells: list[Cell], fn: CellFn, opts: ExecOptions) -> dict[str, Outcome]:
    """Run every unfinished cell of ``cells`` with ``fn``; returns an :class:`Outcome` per cell.

    Finished cells (their marker exists) are not run again; a ``.cell-running`` left by a killed run is removed
    (the caller holds the study's lock, so no other run is working on them).
    """
    out: dict[str, Outcome] = {}
    todo = []
    for c in cells:
        record = finished(c.folder)
        if record is not None:
            out[c.key] = Outcome(c.key, "skipped", record=record)
        else:
            (Path(c.folder) / CELL_RUNNING).unlink(missing_ok=True)
            todo.append(c)
    if out:
        log.info("%d of %d cells finished earlier: not run again", len(out), len(cells))
    if not todo:
        return out
    progress = Progress(todo, len(out))
    run = _sequential if opts.executor == "sequential" else _on_ray
    run(todo, fn, opts, progress)
    out.update(progress.ended)
    return out


def _sequential(todo: list[Cell], fn: CellFn, opts: ExecOptions, progress: Progress) -> None:
    """One cell after another in this process, each retried like on Ray (all CPUs for each)."""
    threads = opts.cell_cpus or (os.cpu_count() or 1)
    for cell in todo:
        cell = dataclasses.replace(cell, threads=threads)
        for attempt in range(opts.retries + 1):
            try:
                res = run_guarded(fn, cell)
                break
            except Exception as exc:  # noqa: BLE001 - any error of one cell is that cell's failure
                res = {"status": "failed", "error": f"{type(exc).__name__}: {error_message(exc)}", "seconds": 0.0}
                log.warning("cell %s: attempt %d failed (%s)%s", cell.key, attempt + 1, res["error"][:200],
                            "; retrying" if attempt < opts.retries else "")
        progress.end(Outcome(cell.key, res["status"], res.get("seconds", 0.0), res.get("error"), res.get("record")))


def init_ray(address: str) -> bool:
    """Connect to Ray (``local``: start a private one); returns True when this call started it."""
    try:
        import ray  # imported here: the CLI must start without it and the sequential executor never needs it
    except ImportError as exc:
        raise ConfigError("--executor ray needs the ray package (pip install 'ray>=2.40'); or run the cells one "
                          "after another with --executor sequential") from exc
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network
    # Ray's own notices (e.g. that its token authentication is on) are no news to a study's user
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address == "local":  # a private Ray for this study: no dashboard, token authentication on (Ray's default)
        ray.init(address="local", include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    return True


def _on_ray(todo: list[Cell], fn: CellFn, opts: ExecOptions, progress: Progress) -> None:
    import ray

    started = init_ray(opts.address)
    refs: dict[Any, Cell] = {}
    try:
        res = ray.cluster_resources()
        cpus, gpus = cell_resources(res.get("CPU", 1.0), res.get("GPU", 0.0), len(todo), opts)
        log.info("Ray (%s): %g CPUs, %g GPUs; %d cells, each %d CPU(s)%s", opts.address, res.get("CPU", 0),
                 res.get("GPU", 0), len(todo), cpus, f" and {gpus:g} GPU" if gpus else "")
        task = ray.remote(run_guarded)
        for cell in todo:
            ref = task.options(num_cpus=cpus, num_gpus=gpus, max_retries=opts.retries, retry_exceptions=True,
                               name=cell.key).remote(fn, dataclasses.replace(cell, threads=cpus))
            refs[ref] = cell
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=opts.report_every)
            if not ready:
                log.info("%s", progress.line())
            for ref in ready:
                cell = refs[ref]
                try:
                    r = ray.get(ref)
                except ray.exceptions.RayError as exc:  # retries spent: an exception, a dead worker
                    text = _ray_error(exc)
                    mark_failed(cell.folder, text, opts.retries + 1)
                    (Path(cell.folder) / CELL_RUNNING).unlink(missing_ok=True)
                    r = {"status": "failed", "error": f"{text} (after {opts.retries + 1} attempts)"}
                progress.end(Outcome(cell.key, r["status"], r.get("seconds", 0.0), r.get("error"), r.get("record")))
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def _ray_error(exc: BaseException) -> str:
    """The useful part of a Ray error: the task's own exception, or why its worker died."""
    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, type):
        return f"{type(cause).__name__}: {error_message(cause)}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
