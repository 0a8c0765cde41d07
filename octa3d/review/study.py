"""``<study>/index.html``: the study page, one static file opened from disk (no server, no script, nothing fetched).

It shows the arms (cross-validated and hold-out metrics with CIs), the forest plot of differences against the
reference arm, the ROC curves and per-fold values (PNG figures beside it in ``figures/``), every pairwise test
(Holm-adjusted), the subgroup table, every cell with its state and links to its review page and log, and the paper
kit's files. Every text from the run is HTML-escaped; every link is relative, so the folder can be moved or zipped.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
from pathlib import Path
from typing import Any

from octa3d import __version__
from octa3d.studies.tables import HEADLINE, POPULATION_NAMES, describe_arm, fmt, fmt_p
from octa3d.utils.io import atomic_write_text

e = html.escape

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1280px;padding:16px 24px;
color:#1d232a}
h1{font-size:22px;margin:4px 0 8px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #dde2e7;padding-bottom:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}dt{color:#5a6570}dd{margin:0}
table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{border:1px solid #dde2e7;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f2f5f8}td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
tr.ref td{background:#f6fbff}td.sig{font-weight:600;color:#0b5394}.p{font-size:11px}.done{color:#1b7f3b}.failed{color:#b3261e;
font-weight:600}.waiting,.running{color:#8a6d00}img{max-width:100%;border:1px solid #dde2e7;margin:4px 0}
.note{color:#5a6570;font-size:12px}.ci{color:#5a6570;font-size:11px}.wide{overflow-x:auto}code{background:#f2f5f8;padding:0 3px}details summary{cursor:pointer;color:#0b5394}
"""


def _rel(target: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(target, page_dir)).as_posix()


def _value(v: Any, ci: Any) -> str:
    """A metric cell: the value, its interval below it in small type."""
    text = fmt(v, ci)
    value, _, interval = text.partition(" ")
    return e(value) + (f"<br><span class='ci'>{e(interval)}</span>" if interval else "")


#: Metrics of the page's arms table (cross-validated, hold-out); the tables/ files hold them all.
CV_KEYS = ("balanced_accuracy", "auc", "f1_macro")
HOLDOUT_KEYS = ("balanced_accuracy", "auc", "f1_macro", "ece", "kappa_quadratic")


def _arms(ctx: dict[str, Any]) -> str:
    have = {m for s in ctx["summaries"].values() for m in (s.get("holdout") or {})}
    ho_keys = [m for m in HOLDOUT_KEYS if m in have]
    out = ["<div class='wide'><table><tr><th rowspan='2'>arm</th><th rowspan='2'>input</th><th rowspan='2'>model"
           "</th><th rowspan='2'>init</th><th rowspan='2'>folds</th>"
           f"<th colspan='{len(CV_KEYS)}'>cross-validation (mean of folds)</th>"
           f"<th colspan='{len(ho_keys)}'>hold-out (fold models averaged)</th></tr><tr>"
           + "".join(f"<th>{e(HEADLINE[m])}</th>" for m in (*CV_KEYS, *ho_keys)) + "</tr>"]
    for name in ctx["order"]:
        s, d = ctx["summaries"][name], describe_arm(ctx["values"][name])
        cv = [_value((s["fold"].get(m) or {}).get("mean"), [(s["fold"].get(m) or {}).get("low"),
                                                            (s["fold"].get(m) or {}).get("high")]) for m in CV_KEYS]
        hold = s.get("holdout") or {}
        ho = [_value(hold.get(m), (hold.get("ci") or {}).get(m)) for m in ho_keys]
        folds = f"{len(s['folds_done'])}/{s['n_folds']}"
        cls = " class='ref'" if name == ctx["reference"] else ""
        cells = [e(name) + ("<br><span class='ci'>reference</span>" if cls else ""), e(d["input"]), e(d["model"]),
                 e(d["init"]), e(folds)]
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells)
                   + "".join(f"<td class='num'>{c}</td>" for c in cv + ho) + "</tr>")
    out.append("</table></div>")
    n_hold = next((s["holdout"]["n"] for s in ctx["summaries"].values() if s.get("holdout")), "?")
    out.append(f"<p class='note'>CV: mean of the {ctx['folds']} folds' validation metrics with its "
               f"{ctx['level']} % t interval. Hold-out: the {n_hold} hold-out eyes scored by the average of the fold "
               f"models, {ctx['level']} % bootstrap CI ({ctx['bootstrap']} resamples of patient groups). Pooled "
               "out-of-fold metrics: <a href='tables/arms_oof.md'>tables/arms_oof.md</a>.</p>")
    return "\n".join(out)


#: Columns of the page's comparison tables: (test, metric, heading) per population kind.
FOLD_COLUMNS = (("corrected t", "balanced_accuracy", "Bal. acc."), ("corrected t", "auc", "AUC"),
                ("corrected t", "f1_macro", "Macro-F1"))
PAIRED_COLUMNS = (("DeLong", "auc", "AUC (DeLong)"), ("McNemar exact", "accuracy", "Accuracy (McNemar exact)"),
                  ("McNemar asymptotic", "accuracy", "Accuracy (McNemar asympt.)"),
                  ("paired bootstrap", "balanced_accuracy", "Bal. acc. (bootstrap)"),
                  ("paired bootstrap", "f1_macro", "Macro-F1 (bootstrap)"))


def _test_cell(r: dict[str, Any] | None) -> str:
    """Difference [CI], then p and Holm's p; bold when Holm's p < 0.05."""
    if r is None:
        return "<td class='num'>\u2013</td>"
    sig = isinstance(r.get("p_holm"), float) and r["p_holm"] < 0.05
    return (f"<td class='num{' sig' if sig else ''}'>{_value(r['estimate'], [r['ci_low'], r['ci_high']])}"
            f"<br><span class='p'>p {e(fmt_p(r['p']))} \u00b7 Holm {e(fmt_p(r.get('p_holm')))}</span></td>")


def _pairs(rows: list[dict[str, Any]], vs_reference: bool) -> str:
    """One row per pair and population, one column per test (the long form is tables/pairs.*)."""
    picked = [r for r in rows if r["vs_reference"] == vs_reference]
    if not picked:
        return "<p>None.</p>"
    index = {(r["a"], r["b"], r["population"], r["test"], r["metric"]): r for r in picked}
    pairs = list(dict.fromkeys((r["a"], r["b"]) for r in picked))
    out = []
    for pops, cols, title in ((("folds",), FOLD_COLUMNS, "per fold: corrected resampled t-test over the folds"),
                              (("oof", "holdout"), PAIRED_COLUMNS, "the same eyes: pooled out-of-fold and hold-out")):
        out.append(f"<p class='note'>{e(title)}</p><div class='wide'><table><tr><th>comparison</th>"
                   + ("<th>population</th>" if len(pops) > 1 else "") + "".join(f"<th>{e(h)}</th>" for *_, h in cols)
                   + "</tr>")
        for a, b in pairs:
            for pop in pops:
                cells = "".join(_test_cell(index.get((a, b, pop, t, m))) for t, m, _ in cols)
                where = f"<td>{e(POPULATION_NAMES[pop])}</td>" if len(pops) > 1 else ""
                out.append(f"<tr><td>{e(a)} vs {e(b)}</td>{where}{cells}</tr>")
        out.append("</table></div>")
    return "\n".join(out)


def _subgroups(rows: list[dict[str, Any]], population: str, folded: bool = False) -> str:
    """The subgroup rows of one population (a collapsed section when ``folded``)."""
    if not rows:
        return "" if folded else "<p>The labels carry no age, sex or eye columns (or no arm is complete): no subgroups.</p>"
    metrics = ("balanced_accuracy", "auc", "f1_macro")
    out = [f"<details{'' if folded else ' open'}><summary>{e(population)}</summary><table><tr><th>arm</th>"
           "<th>attribute</th><th>group</th><th>n</th>" + "".join(f"<th>{e(HEADLINE[m])}</th>" for m in metrics)
           + "</tr>"]
    for r in rows:
        vals = [_value(r.get(m), [r.get(f"{m}_low"), r.get(f"{m}_high")]) if m in r else "n too small"
                for m in metrics]
        out.append(f"<tr><td>{e(r['arm'])}</td><td>{e(r['attribute'])}</td><td>{e(r['group'])}</td>"
                   f"<td class='num'>{r['n']}</td>" + "".join(f"<td class='num'>{v}</td>" for v in vals) + "</tr>")
    out.append("</table></details>")
    return "\n".join(out)


def _cells(ctx: dict[str, Any], page_dir: Path) -> str:
    out = ["<table><tr><th>arm</th>" + "".join(f"<th>fold {k}</th>" for k in range(ctx["folds"])) + "</tr>"]
    for name in ctx["order"]:
        tds = []
        for k in range(ctx["folds"]):
            c = ctx["summaries"][name]["cells"].get(k) or {"state": "waiting", "folder": ""}
            folder = Path(c["folder"])
            links = []
            review = folder / "test" / "review" / "index.html"
            if review.is_file():
                links.append(f"<a href='{e(_rel(review, page_dir))}'>review</a>")
            if (folder / "octa3d.log").is_file():
                links.append(f"<a href='{e(_rel(folder / 'octa3d.log', page_dir))}'>log</a>")
            err = f"<br><span class='note'>{e((c.get('error') or '')[:160])}</span>" if c.get("error") else ""
            tds.append(f"<td><span class='{e(c['state'])}'>{e(c['state'])}</span> {' · '.join(links)}{err}</td>")
        out.append(f"<tr><td>{e(name)}</td>{''.join(tds)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def write_study_page(study_dir: Path, ctx: dict[str, Any]) -> Path:
    """Write ``<study_dir>/index.html`` from the report context (:func:`octa3d.studies.report.write_report`).

    Args:
        study_dir: the study folder (the page's links are relative to it).
        ctx: ``name``, ``description``, ``order`` (arm names), ``reference``, ``values`` (arm -> flags),
            ``summaries``, ``rows`` (comparisons), ``subgroups``, ``figures`` (paths), ``kit`` (paths), ``folds``,
            ``level``, ``bootstrap``, ``data``, ``classes``, ``n_test``, ``n_cv``, ``failed``.

    Returns:
        The page's path.
    """
    page = study_dir / "index.html"
    header = [("study", ctx["name"]), ("data", ctx["data"]), ("classes", " vs ".join(ctx["classes"])),
              ("subjects", f"{ctx['n_cv']} in {ctx['folds']} folds + {ctx['n_test']} hold-out (patient-level)"),
              ("cells", f"{ctx['n_done']} of {ctx['n_cells']} finished" + (f", {len(ctx['failed'])} failed"
                                                                             if ctx["failed"] else "")),
              ("reference arm", ctx["reference"]), ("date", _dt.datetime.now().strftime("%Y-%m-%d %H:%M")),
              ("octa3d", __version__)]
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in header)
    figs = {p.stem: _rel(p, study_dir) for p in ctx["figures"]}

    def fig(stem: str, alt: str) -> str:
        return f"<a href='{e(figs[stem])}'><img src='{e(figs[stem])}' alt='{e(alt)}'></a>" if stem in figs else \
            "<p>Not available (no complete arm to show yet).</p>"

    kit = "".join(f"<li><a href='{e(_rel(p, study_dir))}'>{e(_rel(p, study_dir))}</a></li>" for p in ctx["kit"])
    desc = f"<p>{e(ctx['description'])}</p>" if ctx.get("description") else ""
    failed = (f"<p class='failed'>{len(ctx['failed'])} cell(s) failed: {e(', '.join(ctx['failed']))}. Fix the cause "
              "and run the same command with --resume; the comparisons cover complete arms only.</p>"
              if ctx["failed"] else "")
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>octa3d study \u2014 {e(ctx['name'])}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<header><h1>octa3d study \u2014 {e(ctx['name'])}</h1>{desc}<dl>{dl}</dl>{failed}</header>
<h2 id="arms">Arms</h2>
{_arms(ctx)}
<h2 id="forest">Differences vs {e(ctx['reference'])}</h2>
{fig('forest', 'forest plot')}
{_pairs(ctx['rows'], True)}
<h2 id="roc">ROC curves</h2>
{fig('roc', 'ROC curves per arm')}
<h2 id="folds">Per-fold values</h2>
{fig('folds', 'per-fold values per arm')}
<h2 id="pairs">Other pairwise comparisons</h2>
<details><summary>every other pair of arms</summary>{_pairs(ctx['rows'], False)}</details>
<p class="note">Differences are first arm minus second arm, with {ctx['level']} % CIs. p-values are two-sided and Holm-adjusted
within each population, test and metric over all pairs of arms (bold: adjusted p &lt; 0.05). Every comparison in
long form: <a href="tables/pairs.md">tables/pairs.md</a>.</p>
<h2 id="subgroups">Subgroups</h2>
{_subgroups([r for r in ctx['subgroups'] if r['population'] == 'holdout'], 'hold-out')}
{_subgroups([r for r in ctx['subgroups'] if r['population'] == 'oof'], 'pooled out-of-fold', True)}
<h2 id="cells">Cells</h2>
{_cells(ctx, study_dir)}
<h2 id="kit">Paper kit</h2>
<ul>{kit}</ul>
</body></html>
"""
    atomic_write_text(page, text)
    return page
