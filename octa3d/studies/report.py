"""The study's report, written from whatever cells finished: statistics, tables, figures, methods, checklist, page.

Files (in the study folder)::

    results/stats.json                 every arm's summary and every comparison (the numbers of the tables)
    results/predictions_oof.csv        pooled out-of-fold predictions, one block of rows per arm
    results/predictions_holdout.csv    hold-out predictions (fold models averaged), one block per arm
    tables/arms.* arms_oof.* pairs.* subgroups.* (csv, md, tex)  folds.csv
    figures/forest.png roc.png folds.png
    methods.md  checklist.md  index.html

It reads only files (:mod:`octa3d.studies.results`), so it can be written again at any time, e.g. after
``--resume`` finished the last cells.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from octa3d.data.splits import Splits
from octa3d.review.study import write_study_page
from octa3d.studies.compare import arm_summary, compare
from octa3d.studies.engine import Outcome
from octa3d.studies.figures import write_figures
from octa3d.studies.kit import checklist_text, methods_text
from octa3d.studies.plan import Cell
from octa3d.studies.results import ArmData, collect
from octa3d.studies.spec import StudySpec
from octa3d.studies.subgroups import attributes, subgroup_rows, write_subgroups
from octa3d.studies.tables import arms_tables, fmt, pairs_table
from octa3d.utils.io import atomic_write_csv, atomic_write_json, atomic_write_text

log = logging.getLogger("octa3d.studies")


def _predictions(arms: dict[str, ArmData], order: list[str], pop: str, names: list[str]) -> pd.DataFrame:
    frames = []
    for n in order:
        p = getattr(arms[n], pop)
        if p is None:
            continue
        df = pd.DataFrame({"arm": n, "subject": p.ids, "group": p.groups, "label": [names[i] for i in p.y]})
        if p.fold is not None:
            df["fold"] = p.fold
        for c, cls in enumerate(names):
            df[f"p_{cls}"] = p.probs[:, c].round(6)
        df["prediction"] = [names[i] for i in p.probs.argmax(1)]
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["arm", "subject"])


def summary_text(spec: StudySpec, summaries: dict[str, dict[str, Any]], failed: list[str]) -> str:
    """The CLI's closing table: every arm's CV and hold-out balanced accuracy and AUC."""
    lines = [f"Study {spec.name}: {len(spec.arms)} arms x {spec.folds} folds"
             + (f" ({len(failed)} cells failed)" if failed else ""),
             f"  {'arm':<24} {'folds':>5}  {'bal.acc. CV':<22} {'bal.acc. hold-out':<22} {'AUC hold-out':<22}"]
    for arm in spec.arms:
        s = summaries[arm.name]
        f = s["fold"].get("balanced_accuracy") or {}
        h = s.get("holdout") or {}
        ci = h.get("ci") or {}
        lines.append(f"  {arm.name:<24} {len(s['folds_done']):>2}/{spec.folds:<2}  "
                     f"{fmt(f.get('mean'), [f.get('low'), f.get('high')]):<22} "
                     f"{fmt(h.get('balanced_accuracy'), ci.get('balanced_accuracy')):<22} "
                     f"{fmt(h.get('auc'), ci.get('auc')):<22}")
    return "\n".join(lines)


def write_report(spec: StudySpec, study_dir: Path, cells: list[Cell], sp: Splits, outcomes: dict[str, Outcome],
                 run_info: dict[str, Any]) -> dict[str, Any]:
    """Collect, compare and write everything (see the module docstring).

    Args:
        spec: the study; study_dir: its folder; cells: its cells; sp: its folds.
        outcomes: what became of each cell in this run (failed ones are listed).
        run_info: ``executor``, ``address`` (for methods.md).

    Returns:
        ``{"page", "summary" (text), "arms" (summaries), "rows" (comparisons), "files"}``.
    """
    names = list(sp.class_names)
    order = [a.name for a in spec.arms]
    st = spec.stats
    seed = st["seed"] if st["seed"] is not None else int(spec.arms[0].values.get("seed", 42))
    arms = collect(spec, cells, sp)
    for o in outcomes.values():  # this run's error messages, for the page
        if o.status == "failed":
            arm, _, fold = o.key.rpartition("/fold-")
            arms[arm].cells[int(fold)]["error"] = o.error
    summaries = {n: arm_summary(arms[n], st, seed) for n in order}
    rows = compare(arms, order, spec.reference, st, seed, len(names))
    values = spec.arms[0].values
    attrs = attributes(values.get("data_root", "./data"), values.get("labels"))
    sub = subgroup_rows(arms, order, attrs, seed, st["level"], st["bootstrap"])
    files: list[Path] = []
    res = study_dir / "results"
    files.append(Path(atomic_write_json(res / "stats.json", {"study": spec.name, "reference": spec.reference,
                                                              "stats": st, "arms": summaries, "comparisons": rows})))
    for pop in ("oof", "holdout"):
        files.append(Path(atomic_write_csv(res / f"predictions_{pop}.csv", _predictions(arms, order, pop, names))))
    tables = study_dir / "tables"
    files += arms_tables(tables, spec, summaries)
    files += pairs_table(tables, spec, rows)  # written even without comparisons: the page links it
    files += write_subgroups(tables, spec.name, sub, st["level"], st["bootstrap"])
    figures = write_figures(study_dir / "figures", arms, summaries, rows, order, spec.reference, len(names) == 2)
    info = {**run_info, "n_cells": len(cells), "stats_seed": seed}
    files.append(Path(atomic_write_text(study_dir / "methods.md", methods_text(spec, study_dir, sp, summaries, info))))
    files.append(Path(atomic_write_text(study_dir / "checklist.md",
                                        checklist_text(spec, study_dir, sp, summaries, bool(sub)))))
    failed = sorted(k for k, o in outcomes.items() if o.status == "failed")
    ctx = {"name": spec.name, "description": spec.description, "order": order, "reference": spec.reference,
           "values": {a.name: a.values for a in spec.arms}, "summaries": summaries, "rows": rows, "subgroups": sub,
           "figures": figures, "kit": [f for f in files if f.suffix in (".md", ".tex", ".csv", ".json")],
           "folds": spec.folds, "level": int(round(100 * st["level"])), "bootstrap": st["bootstrap"],
           "data": values.get("data_root"), "classes": names, "n_test": len(sp.test), "n_cv": len(sp.non_test()),
           "failed": failed, "n_cells": len(cells),
           "n_done": sum(c["state"] == "done" for a in arms.values() for c in a.cells.values())}
    page = write_study_page(study_dir, ctx)
    return {"page": page, "summary": summary_text(spec, summaries, failed), "arms": summaries, "rows": rows,
            "files": files}
