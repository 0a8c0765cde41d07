"""Label tables (ID → disease) and the mapping from raw disease names to class indices.

:func:`read_label_table` reads OCTA-500's ``Text labels.xlsx`` (or any ``.xlsx``/``.csv`` with an ID and a
disease column). :class:`LabelMap` turns raw names into class indices for ``--task binary`` or ``--task multi``
and is saved in ``split.json`` so later stages use exactly the same class order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from octa3d.data.imagefiles import natural_key, short
from octa3d.errors import DataError

if TYPE_CHECKING:
    from octa3d.config import DataConfig

log = logging.getLogger("octa3d.data")

# Header names accepted for each column, compared after normalise_header() (lower case, no spaces/_/-/.).
ID_HEADERS = ("id", "subject", "subjectid", "patientid", "patient", "eyeid", "caseid")
DISEASE_HEADERS = ("disease", "label", "class", "diagnosis", "diseasetype", "category")
#: Binary task: up to this many positive diseases are joined into the positive class name ("AMD+CNV").
MAX_JOINED_POSITIVES = 3
# How many leading rows may precede the header row (titles above the table in hand-made sheets).
_HEADER_SEARCH_ROWS = 10


def normalise_header(name: object) -> str:
    """Column name for matching: lower case without whitespace, ``_``, ``-`` or ``.``."""
    return re.sub(r"[\s_\-.]+", "", str(name)).lower()


def normalise_id(value: object) -> str:
    """Subject ID as text: stripped, with Excel's float artefact removed (``10001.0`` → ``"10001"``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    m = re.fullmatch(r"(\d+)\.0+", text)
    return m.group(1) if m else text


def normalise_label(value: object) -> str:
    """Disease name: stripped, inner whitespace collapsed, upper case (``"normal "`` → ``"NORMAL"``)."""
    if isinstance(value, float) and value.is_integer():  # numeric class codes from Excel: 1.0 -> "1"
        value = int(value)
    return re.sub(r"\s+", " ", str(value).strip()).upper()


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan")


def _find_column(headers: list[str], wanted: tuple[str, ...]) -> int | None:
    norm = [normalise_header(h) for h in headers]
    for w in wanted:  # earlier names win: an "ID" column beats a "Patient" column
        if w in norm:
            return norm.index(w)
    return None


def _sheets(path: Path) -> dict[str, pd.DataFrame]:
    """All sheets (or the CSV) as header-less string tables."""
    ext = path.suffix.lower()
    try:
        if ext in (".xlsx", ".xlsm", ".xls"):
            return pd.read_excel(path, sheet_name=None, header=None, dtype=object)
        if ext in (".csv", ".tsv", ".txt"):
            sep = "\t" if ext == ".tsv" else None  # None: let pandas sniff ',' / ';' / tab
            return {"csv": pd.read_csv(path, header=None, dtype=str, sep=sep, engine="python",
                                       keep_default_na=False, skipinitialspace=True)}
    except Exception as exc:  # noqa: BLE001 - pandas/openpyxl raise many types for a broken file
        raise DataError(f"cannot read label table {path}: {exc}; save it as .xlsx or .csv") from exc
    raise DataError(f"label table {path}: unsupported type '{ext}'; use .xlsx or .csv with ID and Disease columns")


def read_label_table(path: str | Path) -> dict[str, str]:
    """Read an ID → disease table.

    The ID column may be called ID/Subject/Patient ID, the disease column Disease/Label/Class/Diagnosis (case,
    spaces and underscores ignored). The header may sit below a few title rows; every sheet of a workbook that
    has both columns is read. Rows with an empty ID or disease are skipped (such subjects count as unlabeled).

    Args:
        path: ``.xlsx`` or ``.csv`` file.

    Returns:
        ``{id: DISEASE}`` with normalised IDs (``"10001"``) and upper-case disease names.

    Raises:
        DataError: missing/unreadable file, no ID or disease column (names the columns found), or one ID
            listed with two different diseases.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label table {p}: file not found; pass --labels with an .xlsx/.csv holding ID and "
                        "Disease columns")
    table: dict[str, str] = {}
    conflicts: dict[str, set[str]] = {}
    found_headers: list[str] = []
    used = 0
    for sheet, df in _sheets(p).items():
        rows = df.values.tolist()
        for r, row in enumerate(rows[:_HEADER_SEARCH_ROWS]):
            headers = ["" if _is_blank(h) else str(h).strip() for h in row]
            id_col, dis_col = _find_column(headers, ID_HEADERS), _find_column(headers, DISEASE_HEADERS)
            if id_col is not None and dis_col is not None:
                break
            if r == 0:
                found_headers += [h for h in headers if h]
        else:
            continue
        used += 1
        for row in rows[r + 1:]:
            raw_id, raw_label = row[id_col], row[dis_col]
            if _is_blank(raw_id) or _is_blank(raw_label):
                continue
            sid, label = normalise_id(raw_id), normalise_label(raw_label)
            if sid in table and table[sid] != label:
                conflicts.setdefault(sid, {table[sid]}).add(label)
            table.setdefault(sid, label)
        log.debug("label table %s [%s]: ID column '%s', disease column '%s'", p, sheet, headers[id_col],
                  headers[dis_col])
    if not used:
        raise DataError(f"label table {p}: no ID and Disease columns found (columns: "
                        f"{', '.join(found_headers) or 'none'}); name them 'ID' and 'Disease' (also accepted: "
                        "Subject/Patient ID and Label/Class/Diagnosis)")
    if conflicts:
        listed = "; ".join(f"{sid}: {' vs '.join(sorted(v))}" for sid, v in sorted(conflicts.items())[:20])
        raise DataError(f"label table {p}: {len(conflicts)} ID(s) listed with different diseases ({listed}); "
                        "keep one row per ID")
    return table


@dataclass
class LabelMap:
    """Raw disease names → class indices.

    Attributes:
        class_names: class name per index (index = class id, e.g. ``["NORMAL", "DR"]``).
        mapping: raw (normalised) disease name → class index; raw names not in it are excluded (index ``None``).
        task: ``"binary"`` or ``"multi"`` (informative; kept in split.json).
    """

    class_names: list[str]
    mapping: dict[str, int] = field(default_factory=dict)
    task: str = "multi"

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def index(self, raw: str | None) -> int | None:
        """Class index of a raw disease name, or ``None`` if that disease is not used by this task."""
        if raw is None:
            return None
        return self.mapping.get(normalise_label(raw))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for split.json / checkpoints)."""
        return {"task": self.task, "class_names": list(self.class_names), "mapping": dict(self.mapping)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelMap:
        """Inverse of :meth:`to_dict`."""
        return cls([str(c) for c in d["class_names"]], {str(k): int(v) for k, v in d["mapping"].items()},
                   str(d.get("task", "multi")))

    @classmethod
    def build(cls, data_cfg: DataConfig, present: Iterable[str | None]) -> LabelMap:
        """Class order and mapping for ``data_cfg.task`` from the labels present in the data.

        Binary: class 0 = ``data_cfg.negative``; class 1 = ``data_cfg.positive`` (default: every present disease
        but the negative). The positive class is named after its diseases joined by ``+`` (``"AMD+CNV"``) when
        there are at most :data:`MAX_JOINED_POSITIVES`, else ``"ABNORMAL"``. Present diseases that are neither
        negative nor positive are excluded. Multi: ``data_cfg.classes`` in the given order, or every present
        disease sorted with the negative first; others are excluded.

        Args:
            data_cfg: a :class:`~octa3d.config.DataConfig` (uses task, classes, negative, positive).
            present: raw labels of the discovered subjects (duplicates and ``None`` allowed).

        Returns:
            The label map.

        Raises:
            DataError: a requested class is not present (lists the classes present), or fewer than two classes.
        """
        counts: dict[str, int] = {}
        for raw in present:
            if raw is not None and str(raw).strip():
                name = normalise_label(raw)
                counts[name] = counts.get(name, 0) + 1
        avail = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "none"
        negative = normalise_label(data_cfg.negative)

        def require(names: list[str], flag: str) -> None:
            absent = [n for n in names if n not in counts]
            if absent:
                raise DataError(f"{flag} {','.join(absent)}: not among the labels present ({avail}); choose from "
                                "those")

        if data_cfg.task == "binary":
            require([negative], "--negative")
            if data_cfg.positive:
                positives = sorted({normalise_label(p) for p in data_cfg.positive})
                require(positives, "--positive")
                if negative in positives:
                    raise DataError(f"--positive {','.join(positives)} includes the --negative class {negative}")
            else:
                positives = sorted(n for n in counts if n != negative)
            if not positives:
                raise DataError(f"--task binary needs a positive class besides {negative}; labels present: "
                                f"{avail}")
            pos_name = "+".join(positives) if len(positives) <= MAX_JOINED_POSITIVES else "ABNORMAL"
            mapping = {negative: 0, **{p: 1 for p in positives}}
            label_map = cls([negative, pos_name], mapping, "binary")
        else:
            if data_cfg.classes:
                names = list(dict.fromkeys(normalise_label(c) for c in data_cfg.classes))
                require(names, "--classes")
            else:
                names = sorted(counts, key=lambda n: (n != negative, n))
            if len(names) < 2:
                raise DataError(f"--task multi needs at least two classes, got {', '.join(names) or 'none'}; "
                                f"labels present: {avail}")
            label_map = cls(names, {n: i for i, n in enumerate(names)}, "multi")
        excluded = sorted(set(counts) - set(label_map.mapping))
        if excluded:
            log.info("labels not used by --task %s (subjects excluded): %s", data_cfg.task,
                     ", ".join(f"{n} ({counts[n]})" for n in excluded))
        return label_map


# ------------------------------------------------------------------------------------------- unlabeled
def skip_or_raise(cfg: DataConfig, msg: str, fix: str) -> None:
    """Stop with ``msg; fix``, or with --skip-unlabeled warn that the listed subjects are skipped."""
    if not cfg.skip_unlabeled:
        raise DataError(f"{msg}; {fix}")
    log.warning("%s; skipped (--skip-unlabeled)", msg)


def handle_unlabeled(cfg: DataConfig, no_label: list[str], no_image: list[str], where: str) -> None:
    """Stop (listing both kinds) or, with --skip-unlabeled, warn; the caller drops the subjects."""
    if not no_label and not no_image:
        return
    no_label, no_image = sorted(no_label, key=natural_key), sorted(no_image, key=natural_key)
    parts = []
    if no_label:
        parts.append(f"{len(no_label)} image(s) without a label: {short(no_label)}")
    if no_image:
        parts.append(f"{len(no_image)} label(s) without an image: {short(no_image)}")
    skip_or_raise(cfg, f"{where}: " + "; ".join(parts), "fix the labels/files or pass --skip-unlabeled to skip "
                  "them")
