"""The study's tables: one numeric CSV and the same table formatted as Markdown and LaTeX (booktabs) per table.

``tables/arms.*`` (every arm: cross-validated mean with its t interval, hold-out with bootstrap CIs),
``tables/arms_oof.*`` (pooled out-of-fold metrics with bootstrap CIs), ``tables/pairs.*`` (every comparison),
``tables/folds.csv`` (every fold's value) and ``tables/subgroups.*`` (:mod:`octa3d.studies.subgroups`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from octa3d.studies.spec import StudySpec
from octa3d.utils.io import atomic_write_csv, atomic_write_text

#: Headline metrics of the arm tables, with their printed names.
HEADLINE = {"balanced_accuracy": "Bal. acc.", "auc": "AUC", "f1_macro": "Macro-F1", "accuracy": "Accuracy",
            "ece": "ECE", "kappa_quadratic": "QW kappa"}
POPULATION_NAMES = {"folds": "per fold", "oof": "pooled out-of-fold", "holdout": "hold-out"}


def fmt(v: Any, ci: Any = None, digits: int = 3) -> str:
    """``0.812 [0.750, 0.861]`` (``n/a`` when undefined)."""
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    text = f"{v:.{digits}f}"
    if ci is not None and len(ci) == 2 and all(isinstance(c, (int, float)) and math.isfinite(c) for c in ci):
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def fmt_p(p: Any) -> str:
    """A p-value as printed: ``<0.001``, ``0.034``, ``n/a``."""
    if not isinstance(p, (int, float)) or not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def describe_arm(values: dict[str, Any]) -> dict[str, str]:
    """What an arm is, in words: input, model, modality, initialisation."""
    if values.get("dim") == "2d":
        proj = values.get("projection", "compute")
        inp = "2D en-face (projected)" if proj == "compute" else f"2D en-face map {proj}"
    else:
        inp = "3D volume"
    init = {"auto": "random", "random": "random", "ae": "autoencoder (fold's training eyes)"}[values.get("init", "auto")]
    if values.get("init_from"):
        init = f"weights {Path(str(values['init_from'])).name}" + (" + autoencoder" if values.get("init") == "ae"
                                                                     else "")
    return {"input": inp, "model": str(values.get("model", "resnet18")), "modality": str(values.get("modality", "OCTA")),
            "init": init}


def _md(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "<": r"$<$", ">": r"$>$", "≥": r"$\geq$", "–": "--"}
_TEX_RE = re.compile("|".join(map(re.escape, _TEX)))


def _tex_escape(text: str) -> str:
    """``text`` safe inside a LaTeX table (one pass: an escape is never escaped again)."""
    return _TEX_RE.sub(lambda m: _TEX[m.group()], text)


def _tex(headers: list[str], rows: list[list[str]], caption: str, label: str) -> str:
    cols = "l" * len(headers)
    lines = [r"\begin{table}[ht]", r"\centering", r"\small", f"\\caption{{{_tex_escape(caption)}}}",
             f"\\label{{tab:{label}}}", f"\\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(_tex_escape(h) for h in headers) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(folder: Path, stem: str, numeric: pd.DataFrame, headers: list[str], rows: list[list[str]],
                caption: str) -> list[Path]:
    """``<stem>.csv`` (numbers), ``<stem>.md`` and ``<stem>.tex`` (formatted ``rows``); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = [atomic_write_csv(folder / f"{stem}.csv", numeric)]
    out.append(atomic_write_text(folder / f"{stem}.md", f"{caption}\n\n" + _md(headers, rows)))
    out.append(atomic_write_text(folder / f"{stem}.tex", _tex(headers, rows, caption, stem)))
    return [Path(p) for p in out]


def _metric_keys(summaries: dict[str, dict[str, Any]]) -> list[str]:
    have = {m for s in summaries.values() for pop in ("oof", "holdout") if s.get(pop) for m in s[pop]}
    return [m for m in HEADLINE if m in have]


def arms_tables(folder: Path, spec: StudySpec, summaries: dict[str, dict[str, Any]]) -> list[Path]:
    """``arms.*`` and ``arms_oof.*``; ``folds.csv``."""
    keys = _metric_keys(summaries)
    level = int(round(100 * spec.stats["level"]))
    num, rows, rows_oof, fold_rows = [], [], [], []
    for arm in spec.arms:
        s = summaries[arm.name]
        d = describe_arm(arm.values)
        rec: dict[str, Any] = {"arm": arm.name, **d, "complete": s["complete"], "folds_done": len(s["folds_done"])}
        for pop in ("fold", "oof", "holdout"):
            for m in keys:
                if pop == "fold":
                    f = s["fold"].get(m) or {}
                    rec.update({f"cv_{m}": f.get("mean"), f"cv_{m}_low": f.get("low"), f"cv_{m}_high": f.get("high")})
                else:
                    p = s.get(pop) or {}
                    ci = (p.get("ci") or {}).get(m) or [None, None]
                    rec.update({f"{pop}_{m}": p.get(m), f"{pop}_{m}_low": ci[0], f"{pop}_{m}_high": ci[1]})
        rec["n_oof"], rec["n_holdout"] = (s.get("oof") or {}).get("n"), (s.get("holdout") or {}).get("n")
        num.append(rec)
        status = "" if s["complete"] else f" ({len(s['folds_done'])}/{spec.folds} folds)"
        head = [arm.name + status, d["input"], d["model"]]
        rows.append(head + [fmt(rec[f"cv_{m}"], [rec[f"cv_{m}_low"], rec[f"cv_{m}_high"]]) for m in keys[:3]]
                    + [fmt(rec[f"holdout_{m}"], [rec[f"holdout_{m}_low"], rec[f"holdout_{m}_high"]]) for m in keys])
        rows_oof.append(head + [fmt(rec[f"oof_{m}"], [rec[f"oof_{m}_low"], rec[f"oof_{m}_high"]]) for m in keys])
        for m, vals in s["fold_values"].items():
            fold_rows += [{"arm": arm.name, "fold": k, "metric": m, "value": v}
                          for k, v in zip(s["folds_done"], vals)]
    names = [HEADLINE[m] for m in keys]
    headers = ["Arm", "Input", "Model", *[f"{n} (CV)" for n in names[:3]], *[f"{n} (hold-out)" for n in names]]
    cap = (f"Arms of study {spec.name}: mean over {spec.folds} folds with {level} % t interval (CV), and the hold-out "
           f"set scored by the average of the fold models with {level} % bootstrap CI.")
    out = write_table(folder, "arms", pd.DataFrame(num), headers, rows, cap)
    cap_oof = (f"Pooled out-of-fold predictions of study {spec.name} (every non-test subject once, scored by the "
               f"fold model that did not see it), {level} % bootstrap CI.")
    out += write_table(folder, "arms_oof", pd.DataFrame(num), ["Arm", "Input", "Model", *names], rows_oof, cap_oof)
    out.append(Path(atomic_write_csv(folder / "folds.csv", pd.DataFrame(fold_rows, columns=["arm", "fold", "metric",
                                                                                              "value"]))))
    return out


def pairs_table(folder: Path, spec: StudySpec, rows: list[dict[str, Any]]) -> list[Path]:
    """``pairs.*``: every comparison (comparisons with the reference first), estimate [CI], p and Holm's p."""
    order = {"folds": 0, "oof": 1, "holdout": 2}
    ranked = sorted(rows, key=lambda r: (not r["vs_reference"], order[r["population"]], r["test"], r["metric"]))
    shown = [[f"{r['a']} vs {r['b']}", POPULATION_NAMES[r["population"]], r["test"], HEADLINE.get(r["metric"],
              r["metric"]), fmt(r["estimate"], [r["ci_low"], r["ci_high"]]), fmt_p(r["p"]), fmt_p(r.get("p_holm"))]
             for r in ranked]
    numeric = pd.DataFrame([{k: (v if not isinstance(v, list) else ";".join(f"{x:.6g}" for x in v))
                             for k, v in r.items()} for r in ranked])
    level = int(round(100 * spec.stats["level"]))
    cap = (f"Pairwise comparisons of study {spec.name} (difference = first arm - second arm, {level} % CI; p two-sided; "
           "Holm-adjusted within each population, test and metric over the pairs).")
    headers = ["Comparison", "Population", "Test", "Metric", "Difference [CI]", "p", "p (Holm)"]
    return write_table(folder, "pairs", numeric, headers, shown, cap)
