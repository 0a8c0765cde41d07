"""Subgroup performance: each complete arm's metrics per age band, sex and eye, where the labels carry them.

The attributes come from the study's label table (OCTA-500 ``Text labels.xlsx``: ``Gender``, ``Age``, ``OS/OD``;
any table with columns named like sex/gender, age, eye/laterality/OS-OD) or from those columns of a manifest CSV.
They are read here only, never used for training. Per group: n, balanced accuracy, AUC (binary) and macro-F1 with
percentile intervals of a stratified bootstrap of the group's eyes (at most :data:`GROUP_RESAMPLES` resamples); a
group smaller than :data:`MIN_GROUP` is listed with its n only.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from octa3d.data.labels import normalise_id
from octa3d.data.octa500 import FOVS, find_label_tables, fov_dir
from octa3d.evaluation.metrics import fast_scores
from octa3d.studies.compare import bootstrap_scores
from octa3d.studies.results import ArmData, Predictions
from octa3d.studies.tables import HEADLINE, POPULATION_NAMES, fmt, write_table

log = logging.getLogger("octa3d.studies")

#: Normalised column headers of each attribute.
ATTRIBUTES = {"sex": ("gender", "sex"), "age": ("age", "ageyears"), "eye": ("osod", "odos", "eye", "laterality")}
#: Age bands (years): lower bounds and labels.
AGE_BANDS = ((0, "<50"), (50, "50-64"), (65, ">=65"))
#: Fewest eyes for a group's metrics and intervals.
MIN_GROUP = 5
SUBGROUP_METRICS = ("balanced_accuracy", "auc", "f1_macro")
#: Most bootstrap resamples per group (many groups, each small; at most the study's ``stats: bootstrap``).
GROUP_RESAMPLES = 1000


def _tables(data_root: Path, labels: str | None) -> list[Path]:
    if labels:
        return [Path(labels)]
    if data_root.suffix.lower() == ".csv":
        return [data_root]
    if (data_root / "manifest.csv").is_file():
        return [data_root / "manifest.csv"]
    return find_label_tables(data_root, [fov_dir(data_root, f) for f in FOVS if fov_dir(data_root, f).is_dir()])


def _read(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path, dtype=str)
    return pd.read_excel(path, dtype=str)


def attributes(data_root: str | Path, labels: str | None = None) -> pd.DataFrame:
    """``subject, sex, age, eye`` for the eyes of the label table(s) that name them (empty when none does)."""
    frames = []
    for path in _tables(Path(data_root), labels):
        try:
            df = _read(path)
        except (OSError, ValueError, ImportError) as exc:
            log.warning("subgroups: cannot read %s (%s)", path, exc)
            continue
        cols = {re.sub(r"[^a-z0-9]+", "", str(c).lower()): c for c in df.columns}  # 'OS/OD' -> 'osod'
        id_col = next((cols[k] for k in ("id", "subject", "subjectid", "patientid", "eyeid") if k in cols), None)
        found = {a: next((cols[k] for k in keys if k in cols), None) for a, keys in ATTRIBUTES.items()}
        if id_col is None or not any(found.values()):
            continue
        out = pd.DataFrame({"subject": [normalise_id(v) for v in df[id_col]]})
        for a, col in found.items():
            out[a] = df[col].astype(str).str.strip().str.upper().replace({"NAN": None, "": None}) if col else None
        frames.append(out)
    if not frames:
        return pd.DataFrame(columns=["subject", *ATTRIBUTES])
    return pd.concat(frames).drop_duplicates("subject").reset_index(drop=True)


def age_band(value: Any) -> str | None:
    """The :data:`AGE_BANDS` label of an age in years (None when unreadable)."""
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(age):
        return None
    return [label for low, label in AGE_BANDS if age >= low][-1]


def _groups(attrs: pd.DataFrame) -> dict[str, dict[str, str]]:
    """attribute -> {subject: group label}."""
    out: dict[str, dict[str, str]] = {}
    for a in ATTRIBUTES:
        if a not in attrs or attrs[a].isna().all():
            continue
        vals = attrs[a].map(age_band) if a == "age" else attrs[a]
        out[a] = {s: v for s, v in zip(attrs["subject"], vals) if isinstance(v, str) and v}
    return out


def subgroup_rows(arms: dict[str, ArmData], order: list[str], attrs: pd.DataFrame, seed: int, level: float,
                  resamples: int = GROUP_RESAMPLES) -> list[dict[str, Any]]:
    """One row per (arm, population, attribute, group): n and the metrics with intervals."""
    rows = []
    for attr, of in _groups(attrs).items():
        for name in order:
            arm = arms[name]
            if not arm.complete:
                continue
            for pop in ("oof", "holdout"):
                p = getattr(arm, pop)
                labels = [of.get(i) for i in p.ids]
                for g in sorted({x for x in labels if x}):
                    idx = np.asarray([i for i, x in enumerate(labels) if x == g])
                    y, probs = p.y[idx], p.probs[idx]
                    row: dict[str, Any] = {"arm": name, "population": pop, "attribute": attr, "group": g,
                                           "n": len(idx)}
                    if len(idx) >= MIN_GROUP:
                        sc = fast_scores(y, probs)
                        part = Predictions([p.ids[i] for i in idx], y, probs, [p.groups[i] for i in idx])
                        ci = bootstrap_scores(part, min(resamples, GROUP_RESAMPLES), seed, level)
                        for m in SUBGROUP_METRICS:
                            lo, hi = ci.get(m, [math.nan, math.nan])
                            row.update({m: sc.get(m, math.nan), f"{m}_low": lo, f"{m}_high": hi})
                    rows.append(row)
    return rows


def write_subgroups(folder: Path, study_name: str, rows: list[dict[str, Any]], level: float,
                    resamples: int = GROUP_RESAMPLES) -> list[Path]:
    """``tables/subgroups.*`` (nothing when no attribute was found)."""
    if not rows:
        return []
    shown = [[r["arm"], POPULATION_NAMES[r["population"]], r["attribute"], r["group"], str(r["n"]),
              *[fmt(r.get(m), [r.get(f"{m}_low"), r.get(f"{m}_high")]) if m in r else f"(n < {MIN_GROUP})"
                for m in SUBGROUP_METRICS]] for r in rows]
    headers = ["Arm", "Population", "Attribute", "Group", "n", *[HEADLINE[m] for m in SUBGROUP_METRICS]]
    cap = (f"Subgroups of study {study_name}: metrics per group with {int(round(100 * level))} % bootstrap CI "
           f"({min(resamples, GROUP_RESAMPLES)} resamples; groups under {MIN_GROUP} eyes: n only).")
    return write_table(folder, "subgroups", pd.DataFrame(rows), headers, shown, cap)
