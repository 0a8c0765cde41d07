"""The discovery-time check of a slice folder (an OCTA-500 eye's ``OCTA/<ID>`` or ``OCT/<ID>``): from the folder
listing and each file's header only, no pixel decoded.

Everything the reader would later refuse mid-run is found up front: missing or repeated slice numbers, image files
without a number, unreadable headers, truncated BMPs, and slices whose size differs from the others. Files that
are not images are listed in ``ignored`` (the reader skips them too). :func:`check_slice_folder` returns every
problem of one folder; OCTA-500 discovery (:mod:`octa3d.data.octa500_scan`) collects them over the whole dataset
into one error.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from octa3d.data.bmp import BMP_HEAD, bmp_dims
from octa3d.data.imagefiles import SLICE_EXTS, file_suffix, natural_key, read_info, short
from octa3d.data.slices import JUNK_FILES, number_slices
from octa3d.errors import DataError

__all__ = ["SliceListing", "check_slice_folder"]


@dataclass
class SliceListing:
    """What the listing and headers of one slice folder say.

    Attributes:
        folder: the folder.
        count: number of slice files.
        size: ``(width, height)`` of (most of) the slices, None when none could be read.
        problems: every reason the folder cannot be read as one volume (empty: it can).
        ignored: files that are not slices (the reader skips them).
    """

    folder: Path
    count: int = 0
    size: tuple[int, int] | None = None
    problems: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _read_head(path: str) -> tuple[bytes, int] | str:
    """The first :data:`BMP_HEAD` bytes and the size of a file (raw os calls: this runs for every slice of every
    eye at every stage's discovery), or why it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.read(fd, BMP_HEAD), os.fstat(fd).st_size
        finally:
            os.close(fd)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"


def _header(path: str, suffix: str) -> tuple[int, int] | str:
    """``(width, height)`` of one slice file, or why it cannot be read (the reader converts every pixel type of
    a stack to one grayscale type, so only the size must agree)."""
    if suffix == ".bmp":
        got = _read_head(path)
        if isinstance(got, str):
            return got
        dims = bmp_dims(*got)
        if not isinstance(dims, str):
            return dims[0], dims[1]
        if not dims.startswith(("not a BMP", "unsupported")):
            return dims
    try:  # not a BMP header ITK would know without asking it: as for other formats
        info = read_info(Path(path))
    except DataError:
        return "unreadable image header"
    size = info.GetSize()
    if len(size) != 2 and not (len(size) == 3 and size[2] == 1):
        return f"not a 2D image (size {'×'.join(map(str, size))})"
    return size[0], size[1]


def _files(folder: Path) -> list[os.DirEntry]:
    """The files of ``folder`` a user put there (as :func:`~octa3d.data.slices.visible_files`, without a stat
    call per file)."""
    with os.scandir(folder) as it:
        return [e for e in it if not e.name.startswith(".") and e.is_file() and e.name.lower() not in JUNK_FILES]


def check_slice_folder(folder: Path) -> SliceListing:
    """Check that ``folder`` holds one readable stack of numbered 2D slices, from its listing and file headers.

    Args:
        folder: a folder of numbered slices (``1.bmp`` … ``400.bmp``).

    Returns:
        Its :class:`SliceListing`; ``problems`` lists every defect (each naming the files concerned).
    """
    out = SliceListing(folder)
    try:
        files = _files(folder)
    except OSError as exc:
        out.problems.append(f"cannot list the folder ({exc.strerror or exc})")
        return out
    suffix = {e.name: file_suffix(e.name) for e in files}
    slices = {e.name: e.path for e in files if suffix[e.name] in SLICE_EXTS}
    out.ignored = sorted(n for n in suffix if n not in slices)
    out.count = len(slices)
    if not slices:
        out.problems.append("no slice images" + (f" (only {short(out.ignored, 5)})" if out.ignored else ""))
        return out
    nb = number_slices(list(slices))
    if nb.unnumbered and not nb.all_unnumbered:
        out.problems.append(f"image files without a slice number: {short(nb.unnumbered, 10)}")
    if nb.duplicates:
        out.problems.append(f"duplicate slice numbers: {short(nb.duplicates, 10)}")
    if nb.missing:
        out.problems.append(f"missing slice number(s) {short(nb.missing)} of {nb.span[0]}–{nb.span[1]}")
    heads = {n: _header(p, suffix[n]) for n, p in slices.items()}
    broken = {n: h for n, h in heads.items() if isinstance(h, str)}
    for reason in sorted(set(broken.values())):
        names = sorted((n for n, h in broken.items() if h == reason), key=natural_key)
        out.problems.append(f"{short(names, 10)}: {reason}")
    kinds = Counter(h for h in heads.values() if not isinstance(h, str))
    if kinds:
        common = kinds.most_common(1)[0][0]
        out.size = (common[0], common[1])
        odd = sorted((n for n, h in heads.items() if not isinstance(h, str) and h != common), key=natural_key)
        if odd:
            desc = ", ".join(f"{n} is {_describe(heads[n])}" for n in odd[:10])
            more = f" (+{len(odd) - 10} more)" if len(odd) > 10 else ""
            out.problems.append(f"slices of mixed sizes (width×height): {desc}{more}, the others "
                                f"{_describe(common)}")
    return out


def _describe(head: tuple[int, int] | str) -> str:
    return head if isinstance(head, str) else f"{head[0]}×{head[1]}"

