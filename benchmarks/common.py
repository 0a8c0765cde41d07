"""Helpers shared by the benchmark scripts: in-process stages, timing, peak memory, the result format.

Every benchmark script ``benchmarks/<name>.py`` has ``main(args: list[str] | None) -> dict`` that parses its own
flags (always ``--quick``: tiny sizes, seconds, used by the test suite) and returns :func:`result`'s dictionary.
``benchmarks/run.py`` (``make bench``) runs them all and writes ``benchmarks/results/<date>-<host>.json`` and
``.md``. A figure is a ratio measured within one run wherever it compares two things: these machines are shared
and noisy, absolute seconds from different runs are not comparable.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any


def quiet_logs() -> None:
    """octa3d logs WARNING and above only: a benchmark's output is its table."""
    import logging

    from octa3d.utils.log import setup_logging

    setup_logging("WARNING")
    logging.getLogger("octa3d").setLevel(logging.WARNING)


def run_stage(argv: list[str]) -> object:
    """Run one octa3d stage in-process (same parsing as ``python main.py ARGV``) and return its result."""
    from octa3d.cli import parse_config
    from octa3d.stages import run_stage as dispatch

    cfg, _ = parse_config(argv)
    return dispatch(cfg)


@dataclass
class Figure:
    """One measured figure.

    Attributes:
        name: what was measured, e.g. ``"loader epoch>=2 vs naive"``.
        value: the number.
        unit: ``"x"`` for ratios, ``"s"``, ``"samples/s"``, ``"MB"``, ...
        target: the issue's target as text (``">= 100"``, ``"<= 0.5"``) or ``None``.
        met: whether ``value`` meets ``target`` (``None`` without a target).
        note: how it was measured (sizes, threads) where the name does not say it.
    """

    name: str
    value: float
    unit: str
    target: str | None = None
    met: bool | None = None
    note: str = ""

    def __post_init__(self) -> None:
        self.value = float(self.value)
        if self.target is not None and self.met is None:
            op, bound = self.target.split()
            self.met = {">=": self.value >= float(bound), "<=": self.value <= float(bound)}[op]


@dataclass
class Timer:
    """Repeated timings of one callable (``median``, ``best``, ``runs`` in seconds)."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def best(self) -> float:
        return min(self.runs)


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
           ) -> Timer:
    """Time ``fn`` ``repeat`` times after ``warmup`` untimed calls (``sync``: e.g. ``torch.cuda.synchronize``)."""
    for _ in range(warmup):
        fn()
    t = Timer()
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        t.runs.append(time.perf_counter() - t0)
    return t


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB): ``VmHWM`` (reset by :func:`reset_peak_rss`), else
    ``ru_maxrss``. For clean comparisons run each case in its own process."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where not possible."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{os.getpid()}/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    return False


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (fixed threads: comparable CPU timings)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def bench_threads() -> int:
    """CPU threads for timings: ``$OCTA3D_BENCH_THREADS`` (default 1)."""
    return int(os.environ.get("OCTA3D_BENCH_THREADS", "1"))


def machine() -> dict[str, Any]:
    """Where the figures were taken."""
    import torch

    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(),
                            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "bench_threads": bench_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def result(bench: str, figures: list[Figure], setup: dict[str, Any], quick: bool, **extra: Any) -> dict[str, Any]:
    """The dictionary every benchmark's ``main`` returns (JSON-serialisable)."""
    return {"benchmark": bench, "quick": quick, "setup": setup, "figures": [asdict(f) for f in figures],
            "machine": machine(), **extra}


def finish(res: dict[str, Any], out: str | None) -> dict[str, Any]:
    """End of every benchmark's ``main``: write ``res`` to ``out`` (JSON, atomically) if given, print its table."""
    import json

    from octa3d.utils.io import atomic_write_text

    if out:
        atomic_write_text(out, json.dumps(res, indent=2) + "\n")
    print(markdown_table([res]))
    return res


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One markdown table over the figures of several benchmark results."""
    lines = ["| benchmark | figure | value | target | met | note |", "|---|---|---|---|---|---|"]
    for res in results:
        for f in res["figures"]:
            v = f["value"]
            val = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            lines.append(f"| {res['benchmark']} | {f['name']} | {val} {f['unit']} | {f['target'] or ''} | {met} | "
                         f"{f['note']} |")
    return "\n".join(lines) + "\n"


def _fork_target(conn: Any, fn: Callable[..., dict], args: tuple) -> None:
    try:
        conn.send(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


def in_own_process(module: str, func: str, args: tuple, fresh: bool, preload: tuple[str, ...] = ()) -> dict:
    """``module.func(*args)`` (a JSON-able dict) in a process of its own, so that its peak RSS is its own: a fresh
    interpreter (``fresh``: nothing imported beforehand) or a fork of this one (``preload`` modules imported first,
    so the child starts with them loaded).

    Raises:
        RuntimeError: the child failed (its error or the end of its stderr).
    """
    import importlib
    import json
    import multiprocessing
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if fresh:
        tag = f"{func.upper()}-RESULT "
        code = f"import json; from {module} import {func}; print({tag!r} + json.dumps({func}(*{args!r})))"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)}
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, env=env,
                              check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{func} subprocess failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(lines[-1][len(tag):])
    for name in preload:
        importlib.import_module(name)
    fn = getattr(importlib.import_module(module), func)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_fork_target, args=(child, fn, args))
    p.start()
    child.close()
    res = parent.recv()
    p.join()
    if "error" in res:
        raise RuntimeError(f"{func} child failed: {res['error']}")
    return res
