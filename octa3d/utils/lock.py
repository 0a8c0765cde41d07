"""One run per experiment: ``runs/<exp>/.lock`` (see :mod:`octa3d.utils.runs`).

:func:`lock_experiment` creates the lock file (PID, host, start time, mode, command) atomically before a run writes
anything into the experiment, and refuses while another live run holds it. A lock of a dead PID on this host (a
killed run) is stale and taken over with a warning; a lock from another host is never assumed dead. Taking the lock
also removes the temporary files that interrupted atomic writes left in the experiment. Locks are re-entrant in
one process (the demo runs every stage in one) and released by :func:`releases_locks` or at exit. Under torchrun
only rank 0 takes it.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import functools
import json
import logging
import os
import re
import shlex
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from octa3d.config import Config
from octa3d.errors import RunExistsError

log = logging.getLogger("octa3d.runs")

LOCK = ".lock"
#: Temporary files of :mod:`octa3d.utils.io` (``.<name>.<hex>.tmp<suffix>``).
_TEMP = re.compile(r"^\..+\.[0-9a-f]{8,}\.tmp")
_HELD: dict[Path, Path] = {}  # run folder -> its lock file, held by this process


def _command(cfg: Config) -> str:
    args = sys.argv if cfg.argv is None else ["main.py", *cfg.argv]
    return " ".join(shlex.quote(a) for a in args)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a value we cannot test): never assume it is dead
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _stale(owner: dict[str, Any]) -> bool:
    """The owner is a dead process on this host (an unreadable lock is one a kill cut short while writing)."""
    if not owner:
        return True
    pid = owner.get("pid")
    here = owner.get("host") == socket.gethostname() and isinstance(pid, int)
    # this very process without the lock in _HELD: a lock file copied along with an experiment folder
    return here and (pid == os.getpid() or not _pid_alive(pid))


def _sweep_temp(folder: Path) -> None:
    """Remove temporary files that an interrupted atomic write (e.g. a kill during a checkpoint write) left."""
    for p in folder.rglob(".*"):
        if _TEMP.match(p.name) and p.is_file():
            log.warning("removing %s, left by an interrupted write", p)
            p.unlink(missing_ok=True)


def _create(tmp: Path, lock: Path) -> None:
    """Create ``lock`` with ``tmp``'s content; FileExistsError when it exists."""
    try:
        os.link(tmp, lock)  # atomic: fails if a lock exists, and the lock is never seen half-written
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: exclusive create, then write
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tmp.read_text(encoding="utf-8"))


def lock_experiment(cfg: Config) -> None:
    """Take ``runs/<exp>/.lock`` for this process (re-entrant; a no-op on ranks other than 0).

    Raises:
        RunExistsError: another live run holds the experiment (names its PID, host, mode and start).
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return  # under torchrun rank 0 holds the lock for every rank
    run = cfg.run_dir.resolve()
    if run in _HELD:
        return
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "mode": cfg.run.mode,
            "started": _dt.datetime.now().isoformat(timespec="seconds"), "command": _command(cfg)}
    for _ in range(3):
        tmp = run / f".lock.{os.getpid()}.new"
        tmp.write_text(json.dumps(mine), encoding="utf-8")
        try:
            _create(tmp, lock)
        except FileExistsError:
            owner = _read_lock(lock)
            if owner is None:
                continue  # released meanwhile
            if not _stale(owner):
                raise RunExistsError(
                    f"experiment '{cfg.exp_name}' is in use by another octa3d run (pid {owner.get('pid')} on "
                    f"{owner.get('host')}, --mode {owner.get('mode')}, started {owner.get('started')}): wait for "
                    f"it to finish or use another --exp; if that run is no longer running, delete {lock}") from None
            if owner.get("pid") != os.getpid():
                log.warning("taking over %s from a run that is no longer running (pid %s, --mode %s, started %s)",
                            lock, owner.get("pid"), owner.get("mode"), owner.get("started"))
            lock.unlink(missing_ok=True)
            continue
        finally:
            tmp.unlink(missing_ok=True)
        if (_read_lock(lock) or {}).get("pid") == os.getpid():  # a simultaneous take-over: one of two wins
            _HELD[run] = lock
            _sweep_temp(run)
            return
    raise RunExistsError(f"cannot take {lock}: another run is starting on experiment '{cfg.exp_name}'")


def release_locks(keep: set[Path] | frozenset[Path] = frozenset()) -> None:
    """Release the experiment locks this process holds (except those in ``keep``)."""
    for run in [r for r in _HELD if r not in keep]:
        lock = _HELD.pop(run)
        if (_read_lock(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


atexit.register(release_locks)


def releases_locks(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a stage's ``run``: experiment locks taken during the call are released when it returns or fails."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = frozenset(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            release_locks(keep=before)

    return wrapper


