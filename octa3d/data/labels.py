"""Label tables (ID → disease) and the mapping from raw disease names to class indices.

:func:`read_label_table` reads OCTA-500's ``Text labels.xlsx`` (or any ``.xlsx``/``.csv`` with an ID and a
disease column) with bounded memory: a workbook is streamed and only its ID and disease columns are read, whatever
range the sheet declares. :class:`LabelMap` turns raw names into class indices for ``--task binary`` (refusing
labels that are not in :data:`KNOWN_DISEASES` nor named by the user) or ``--task multi`` and is saved in
``split.json`` so later stages use exactly the same class order.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
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
#: Folder names (lower case) and manifest ``split`` values that give a dataset's own split.
SPLIT_DIRS: dict[str, str] = {"train": "train", "training": "train", "val": "val", "valid": "val",
                              "validation": "val", "test": "test", "testing": "test"}
#: Binary task: up to this many positive diseases are joined into the positive class name ("AMD+CNV").
MAX_JOINED_POSITIVES = 3
#: The disease names octa3d knows, and the datasets that use them: OCTA-500's label table, Kermany's OCT B-scan class
#: folders, and the synthetic generator (:data:`octa3d.data.synthetic.CLASSES`, a subset of OCTA-500's). With
#: ``--task binary`` every other label must be named in ``--positive`` (or be ``--negative``): a typo such as
#: ``NORMAI`` would otherwise become a positive eye.
KNOWN_DISEASES: dict[str, str] = {
    "NORMAL": "OCTA-500, Kermany, synthetic", "AMD": "OCTA-500, synthetic", "CNV": "OCTA-500, Kermany, synthetic",
    "CSC": "OCTA-500, synthetic", "DR": "OCTA-500, synthetic", "RVO": "OCTA-500, synthetic", "OTHERS": "OCTA-500",
    "DME": "Kermany", "DRUSEN": "Kermany"}
#: Diseases whose signature is structural, seen in OCT (reflectivity) but barely in OCTA (flow): reading only OCTA
#: for them is the commonest reason a multi-class model never learns them (README "Multi-class").
OCT_FINDINGS: dict[str, str] = {"AMD": "drusen (RPE elevations)", "CSC": "subretinal fluid",
                                "DME": "intraretinal fluid", "DRUSEN": "drusen (RPE elevations)"}


def modality_advice(diseases: Iterable[str], modality: str) -> str | None:
    """Why ``--modality OCTA`` may not show some of ``diseases`` (None when it is not an issue)."""
    need = {d: OCT_FINDINGS[d] for d in (normalise_label(x) for x in diseases) if d in OCT_FINDINGS}
    if modality != "OCTA" or not need:
        return None
    found = ", ".join(f"{d} ({why})" for d, why in need.items())
    return (f"--modality OCTA reads flow only, but {found} {'is an' if len(need) == 1 else 'are'} OCT "
            f"finding{'s' if len(need) > 1 else ''}: use --modality OCT+OCTA (or OCT) so the model can see "
            f"{'it' if len(need) == 1 else 'them'}")


# How many leading rows may precede the header row (titles above the table in hand-made sheets).
_HEADER_SEARCH_ROWS = 10
#: The header is looked for in this many leading columns: a label sheet is a few columns wide, and reading the whole
#: declared width (16,384 columns for one cell in XFD1) is what made pandas hold the sheet as billions of cells.
MAX_LABEL_COLUMNS = 256
#: At most this many labelled IDs per table: one row per scan, 10× the largest public OCT/OCTA set (Kermany
#: ~110k images), and the table stays ~200 MB in memory at worst. A fixed bound: ``--max-voxels`` bounds one scan's
#: size, not how many scans a dataset has.
MAX_LABEL_ROWS = 1_000_000
#: Excel's own sheet limits: a workbook declaring more is damaged (or crafted), and rows are never walked past them.
EXCEL_MAX_ROWS, EXCEL_MAX_COLUMNS = 1_048_576, 16_384
#: Unpacked size limits of a workbook's XML parts: openpyxl holds the shared strings and styles whole (1M IDs are
#: ~25 MiB of shared strings); worksheets are streamed, their limit only bounds the time spent (1M rows of a few
#: columns are ~100 MiB of XML).
MAX_XLSX_PART_BYTES, MAX_XLSX_SHEET_BYTES = 64 << 20, 1 << 30
#: A CSV table is parsed whole by pandas (~10× its size in memory).
MAX_LABEL_CSV_BYTES = 256 << 20
#: Sheet readers return rows ``start..`` (0-based) restricted to the columns ``lo..hi`` (0-based, inclusive).
RowReader = Callable[[int, int, int], Iterable]


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


def _check_xlsx_parts(path: Path) -> None:
    """Refuse a workbook whose parts that openpyxl loads whole are too large once unzipped (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as zf:
            parts = zf.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read label table {path}: not a valid .xlsx file ({exc}); save it as .xlsx or .csv "
                        "with ID and Disease columns") from exc
    for part in parts:
        if not part.filename.endswith(".xml"):  # pictures and other media are not loaded
            continue
        limit = MAX_XLSX_SHEET_BYTES if part.filename.startswith("xl/worksheets/") else MAX_XLSX_PART_BYTES
        if part.file_size > limit:
            raise DataError(f"label table {path}: its part {part.filename} unpacks to {part.file_size / 2**20:.0f} "
                            f"MiB (more than {limit >> 20} MiB for a table of labels); save only the ID and Disease "
                            "columns as a new .xlsx or .csv")


def _xlsx_sheets(path: Path) -> Iterator[tuple[str, list[list[Any]], RowReader]]:
    """Stream the sheets of a workbook: read-only openpyxl, only the cells needed (see :data:`MAX_LABEL_COLUMNS`)."""
    import openpyxl

    _check_xlsx_parts(path)
    wb = openpyxl.load_workbook(path, read_only=True, data_only=True, keep_links=False)
    try:
        for ws in wb.worksheets:
            rows, cols = ws.max_row, ws.max_column  # the declared <dimension>: may be absent or lie
            if (rows or 0) > EXCEL_MAX_ROWS or (cols or 0) > EXCEL_MAX_COLUMNS:
                raise DataError(f"label table {path} [{ws.title}]: declares {rows} rows × {cols} columns, beyond "
                                f"Excel's {EXCEL_MAX_ROWS} × {EXCEL_MAX_COLUMNS}; the file is damaged: save the "
                                "table again from a spreadsheet program")
            if (rows or 0) * (cols or 0) > 10_000_000:
                log.info("label table %s [%s] declares %s rows × %s columns; reading only its ID and disease "
                         "columns", path, ws.title, rows, cols)
            head = [list(r) for r in ws.iter_rows(max_row=_HEADER_SEARCH_ROWS, max_col=MAX_LABEL_COLUMNS,
                                                  values_only=True)]

            def rows_of(start: int, lo: int, hi: int, ws: Any = ws) -> Iterator[tuple[Any, ...]]:
                # max_row bounds the walk even when the sheet's XML names rows past Excel's limit
                return ws.iter_rows(min_row=start + 1, max_row=EXCEL_MAX_ROWS, min_col=lo + 1, max_col=hi + 1,
                                    values_only=True)

            yield ws.title, head, rows_of
    finally:
        wb.close()


def _csv_sheet(path: Path) -> Iterator[tuple[str, list[list[Any]], RowReader]]:
    """The one "sheet" of a CSV/TSV file (pandas holds all of it: the file size is bounded first)."""
    size = path.stat().st_size
    if size > MAX_LABEL_CSV_BYTES:
        raise DataError(f"label table {path}: {size / 2**20:.0f} MiB is more than {MAX_LABEL_CSV_BYTES >> 20} MiB "
                        "for a table of labels; save only the ID and Disease columns")
    sep = "\t" if path.suffix.lower() == ".tsv" else None  # None: let pandas sniff ',' / ';' / tab
    values = pd.read_csv(path, header=None, dtype=str, sep=sep, engine="python", keep_default_na=False,
                         skipinitialspace=True).values.tolist()

    def rows_of(start: int, lo: int, hi: int) -> Iterator[list[Any]]:
        return (row[lo:hi + 1] for row in values[start:])

    yield "csv", values[:_HEADER_SEARCH_ROWS], rows_of


def _sheets(path: Path) -> Iterator[tuple[str, list[list[Any]], RowReader]]:
    """Each sheet (or the CSV) as ``(name, first rows, reader of rows start.. and columns lo..hi)``."""
    ext = path.suffix.lower()
    if ext in (".xlsx", ".xlsm"):
        return _xlsx_sheets(path)
    if ext in (".csv", ".tsv", ".txt"):
        return _csv_sheet(path)
    if ext == ".xls":
        raise DataError(f"label table {path}: the old .xls format is not supported; save it as .xlsx or .csv")
    raise DataError(f"label table {path}: unsupported type '{ext}'; use .xlsx or .csv with ID and Disease columns")


def read_label_table(path: str | Path) -> dict[str, str]:
    """Read an ID → disease table, with memory bounded whatever the file declares.

    The ID column may be called ID/Subject/Patient ID, the disease column Disease/Label/Class/Diagnosis (case,
    spaces and underscores ignored). The header may sit below a few title rows and within the first
    :data:`MAX_LABEL_COLUMNS` columns; every sheet of a workbook that has both columns is read. Rows with an empty
    ID or disease are skipped (such subjects count as unlabeled). A workbook is streamed (openpyxl read-only) and
    only the ID and disease columns of its rows are read, so a stray cell in XFD1048576 costs nothing; at most
    :data:`MAX_LABEL_ROWS` labelled rows are kept.

    Args:
        path: ``.xlsx`` or ``.csv`` file.

    Returns:
        ``{id: DISEASE}`` with normalised IDs (``"10001"``) and upper-case disease names.

    Raises:
        DataError: missing/unreadable/oversized file, no ID or disease column (names the columns found), or one ID
            listed with two different diseases.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label table {p}: file not found; pass --labels with an .xlsx/.csv holding ID and "
                        "Disease columns")
    try:
        return _read_table(p)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas/openpyxl raise many types for a broken file
        raise DataError(f"cannot read label table {p}: {type(exc).__name__}: {exc}; save it as .xlsx or "
                        ".csv") from exc


def _read_table(p: Path) -> dict[str, str]:
    table: dict[str, str] = {}
    conflicts: dict[str, set[str]] = {}
    found_headers: list[str] = []
    used = 0
    for sheet, head, rows_of in _sheets(p):
        for r, row in enumerate(head):
            headers = ["" if _is_blank(h) else str(h).strip() for h in row]
            id_col, dis_col = _find_column(headers, ID_HEADERS), _find_column(headers, DISEASE_HEADERS)
            if id_col is not None and dis_col is not None:
                break
            if r == 0:
                found_headers += [h for h in headers if h]
        else:
            continue
        used += 1
        lo = min(id_col, dis_col)
        for row in rows_of(r + 1, lo, max(id_col, dis_col)):
            raw_id, raw_label = row[id_col - lo], row[dis_col - lo]
            if _is_blank(raw_id) or _is_blank(raw_label):
                continue
            sid, label = normalise_id(raw_id), normalise_label(raw_label)
            if sid in table and table[sid] != label:
                conflicts.setdefault(sid, {table[sid]}).add(label)
            table.setdefault(sid, label)
            if len(table) > MAX_LABEL_ROWS:
                raise DataError(f"label table {p} [{sheet}]: more than {MAX_LABEL_ROWS:,} labelled IDs; a label "
                                "table holds one row per scan: check that this is the right file")
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
    def build(cls, data_cfg: DataConfig, present: Iterable[str | None],
              subjects_of: Mapping[str, list[str]] | None = None, origin: str = "the labels") -> LabelMap:
        """Class order and mapping for ``data_cfg.task`` from the labels present in the data.

        Binary: class 0 = ``data_cfg.negative``; class 1 = ``data_cfg.positive`` (default: every present disease
        but the negative). The positive class is named after its diseases joined by ``+`` (``"AMD+CNV"``) when
        there are at most :data:`MAX_JOINED_POSITIVES`, else ``"ABNORMAL"``; the diseases it merges are logged
        with their counts. A label that is neither the negative, nor named in ``--positive``, nor one of
        :data:`KNOWN_DISEASES` is refused (a typo). Present diseases that are neither negative nor positive are
        excluded. Multi: ``data_cfg.classes`` in the given order, or every present disease sorted with the
        negative first; others are excluded.

        Args:
            data_cfg: a :class:`~octa3d.config.DataConfig` (uses task, classes, negative, positive).
            present: raw labels of the discovered subjects (duplicates and ``None`` allowed).
            subjects_of: normalised label → subject IDs carrying it, named in the unknown-label error.
            origin: where the labels come from (a file, class folders), named in that error.

        Returns:
            The label map.

        Raises:
            DataError: a requested class is not present (lists the classes present), fewer than two classes, or
                an unknown label under ``--task binary`` (names it, its subjects and ``origin``).
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
            named = sorted({normalise_label(p) for p in data_cfg.positive or []})
            _refuse_unknown(counts, {negative, *named}, subjects_of or {}, origin)
            if named:
                positives = named
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
            log.info("--task binary: the positive class %s merges %s; the negative class is %s (%d)", pos_name,
                     ", ".join(f"{p} ({counts[p]})" for p in positives), negative, counts[negative])
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


def _refuse_unknown(counts: dict[str, int], named: set[str], subjects_of: Mapping[str, list[str]],
                    origin: str) -> None:
    """Stop ``--task binary`` on a label that is not a known disease and not named by ``--negative``/``--positive``:
    merged silently into the positive class, a typo (``NORMAI``) would turn a normal eye into a diseased one."""
    unknown = sorted(n for n in counts if n not in KNOWN_DISEASES and n not in named)
    if not unknown:
        return
    listed = "; ".join(f"{n} ({counts[n]} subject(s): {short(sorted(subjects_of.get(n, []), key=natural_key), 5)})"
                       if subjects_of.get(n) else f"{n} ({counts[n]} subject(s))" for n in unknown)
    raise DataError(f"--task binary: unknown label(s) in {origin}: {listed}; known disease names are "
                    f"{', '.join(KNOWN_DISEASES)}. Fix the label(s) in {origin}, or name them in --positive "
                    "(with the other positive diseases) if they are a real disease")


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
