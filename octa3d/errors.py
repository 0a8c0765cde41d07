"""Exceptions that the CLI turns into an ``octa3d: error: ...`` message and a non-zero exit, and how that message is
laid out (:func:`format_error`).

Every message names the file/subject/flag at fault and says what to do. A message that lists several subjects or
files puts one per indented line below its first line (and its advice on the last line); the CLI prints it whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: Listed lines of an error shown on the console; the rest are counted and the whole message goes to a file.
MAX_LISTED = 20

# torch.utils.data re-raises a worker's exception as the same type with the worker's whole traceback as message:
# "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n..." (the same
# for the pin-memory thread), ending with traceback.format_exception's "module.Name: message" (every line of a
# multi-line message, then any notes).
_WORKER = re.compile(r"Caught (\w+) (?:in DataLoader worker process \d+|in pin memory thread[^\n]*)\.\n"
                     r"Original Traceback \(most recent call last\):\n")


class Octa3dError(Exception):
    """Base class of the errors a user can fix."""


class ConfigError(Octa3dError, ValueError):
    """A configuration value or file is invalid."""


class DataError(Octa3dError):
    """The data root, a scan, or the labels cannot be used as they are."""


class LeakageError(Octa3dError):
    """A stage was about to use a subject from a split it must never see (e.g. test subjects in training)."""


class RunExistsError(Octa3dError):
    """A stage folder already holds results and ``--overwrite`` was not given."""


class StudyError(Octa3dError):
    """Cells of a study failed (the others finished; ``--resume`` runs the failed ones again)."""


class DiskFullError(Octa3dError):
    """A write failed because the file system is full (or the user's disk quota is spent)."""


def error_message(exc: BaseException) -> str:
    """The message of ``exc`` as its user should read it: whole, except that an error re-raised from a DataLoader
    worker (its message is the worker's traceback) is reduced to the original message, all of its lines.

    Args:
        exc: any exception.

    Returns:
        The message, stripped of surrounding blank space.
    """
    text = str(exc).strip()
    m = _WORKER.match(text)
    if not m:
        return text
    lines = text[m.end():].splitlines()
    # the final exception's line follows the last frame ("  File ...", its source and caret lines are indented)
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    start = frames[-1] + 1 if frames else 0
    head = re.compile(rf"(?:[\w.]+\.)?{re.escape(m.group(1))}(?:: |$)")
    for i in range(start, len(lines)):
        hit = head.match(lines[i])
        if hit:
            return "\n".join([lines[i][hit.end():], *lines[i + 1:]]).strip()
    return lines[-1].strip() if lines else text


def format_error(text: str, full_list: Callable[[str], str | None] | None = None, limit: int = MAX_LISTED) -> str:
    """``text`` laid out for the console: its first line, its listed lines, its last line.

    The lines between the first and an unindented last line (the advice) are the list. A list longer than
    ``limit`` shows its first ``limit`` lines and "… and N more (full list in F)", F being where
    ``full_list(text)`` saved the whole message (it returns the path, or None when it could not save it).

    Args:
        text: the message (see :func:`error_message`).
        full_list: saves the whole message and returns its path; None: nothing is saved.
        limit: most listed lines shown.

    Returns:
        The text to print after ``octa3d: error: ``.
    """
    lines = text.strip().splitlines() or [""]
    first, rest = lines[0], lines[1:]
    tail = [rest.pop()] if rest and not rest[-1][:1].isspace() else []
    if len(rest) <= limit:
        return "\n".join([first, *rest, *tail])
    saved = full_list(text) if full_list is not None else None
    indent = re.match(r"\s*", rest[limit]).group(0) or "  "
    where = f" (full list in {saved})" if saved else ""
    return "\n".join([first, *rest[:limit], f"{indent}… and {len(rest) - limit} more{where}", *tail])
