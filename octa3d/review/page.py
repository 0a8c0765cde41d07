"""``review/index.html``: one self-contained page per test (or explain, or predict) run, opened from disk with no server.

The page holds the run's header (experiment, model, classes, data, date, octa3d version), the headline metrics
with their 95 % CIs, the ROC and confusion-matrix figures, the map scores, and a table of the subjects (errors
first; sortable by each column, "only errors" filter). Opening a subject shows its scan with the evidence map as a
colour overlay in NiiVue (vendored in ``vendor/``, BSD-2-Clause; copied beside the page so nothing is fetched at
view time), its PNG review sheet and links to the full-resolution NIfTIs. Volumes load lazily
(:mod:`octa3d.review.volumes`). Every text from the run is HTML-escaped; data reach the script through
:func:`~octa3d.review.volumes.js_literal`.

Layout::

    review/index.html  review/niivue.umd.js  review/review.js  review/review.css  review/subjects/<stem>.js
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

from octa3d import __version__
from octa3d.cam.backends import STATUS_TEXT
from octa3d.review.volumes import js_literal, subject_volumes, write_subject_js
from octa3d.utils.io import atomic_copy, atomic_write_text, read_csv, safe_name

log = logging.getLogger("octa3d.review")

HERE = Path(__file__).parent
ASSETS = {"niivue.umd.js": HERE / "vendor" / "niivue.umd.js", "review.js": HERE / "static" / "review.js",
          "review.css": HERE / "static" / "review.css"}
METRICS = ["balanced_accuracy", "auc", "accuracy", "f1_macro", "kappa", "sensitivity", "specificity", "brier", "ece",
           "calibration_slope", "calibration_intercept", "aurc"]
#: why a subject has no map to show, by its ``cam_status``
NO_MAP = {"not computed": "no evidence map was computed for this subject (not in --cam-subjects)",
          "none": "no evidence maps were computed for this run (--cam none)"}

e = html.escape


def _metric_rows(metrics: dict[str, Any]) -> str:
    ci = metrics.get("ci95") or {}
    out = []
    for k in METRICS:
        v = metrics.get(k)
        if not isinstance(v, (int, float)):
            continue
        c = ci.get(k)
        ci_txt = f"{c[0]:.3f} \u2013 {c[1]:.3f}" if c and all(isinstance(x, (int, float)) for x in c) else "\u2013"
        out.append(f"<tr><td>{e(k.replace('_', ' '))}</td><td>{v:.3f}</td><td>{e(ci_txt)}</td></tr>")
    return "\n".join(out)


def _cam_scores(metrics: dict[str, Any]) -> str:
    cam = metrics.get("cam")
    if not cam:
        return "<p>No evidence maps in this run.</p>"
    counts = ", ".join(f"{v} {k}" for k, v in (cam.get("status_counts") or {}).items())
    parts = [f"<p>Evidence maps: {e(str(cam.get('backend')))} on layer {e(str(cam.get('layer')))}, target "
             f"{e(str(cam.get('target')))}; {e(str(cam.get('n_subjects')))} subjects ({e(counts)}).</p>"]
    loc = (metrics.get("localization") or {}).get("per_class") or {}
    if loc:
        enface = all("pointing_game_enface" in v for v in loc.values())
        parts.append("<table class='small'><tr><th>class</th><th>n with masks</th><th>pointing game</th>"
                     + ("<th>pointing game en face</th>" if enface else "")
                     + "<th>mass in lesion</th><th>\u00d7 chance</th></tr>")
        for cls, v in loc.items():
            parts.append(f"<tr><td>{e(str(cls))}</td><td>{e(str(v.get('n')))}</td>"
                         f"<td>{v.get('pointing_game', float('nan')):.2f}</td>"
                         + (f"<td>{v['pointing_game_enface']:.2f}</td>" if enface else "")
                         + f"<td>{v.get('mass_inside', float('nan')):.3f}</td>"
                         f"<td>{v.get('mass_ratio', float('nan')):.1f}</td></tr>")
        parts.append("</table>")
    f = metrics.get("faithfulness")
    if f:
        parts.append(f"<p>Deletion AUC {f.get('deletion_auc', float('nan')):.3f} (random order "
                     f"{f.get('deletion_auc_random', float('nan')):.3f}, lower is better), insertion AUC "
                     f"{f.get('insertion_auc', float('nan')):.3f} ({e(str(f.get('n')))} subjects).</p>")
    return "\n".join(parts)


def _ood_summary(block: dict[str, Any]) -> str:
    """One paragraph on the out-of-distribution check: how many scans were flagged and for what."""
    if not block:
        return ""
    if not block.get("available"):
        return f"<p class='ood-note'>Out-of-distribution check: none ({e(str(block.get('note', '')))}).</p>"
    why = ", ".join(f"{k} {v}" for k, v in (block.get("by_reason") or {}).items() if v)
    return (f"<p class='ood-note'><span class='ood-key'>&nbsp;</span> Out of distribution (unlike the training "
            f"scans): {e(str(block.get('n_flagged')))} of {e(str(block.get('n_checked')))}"
            + (f" ({e(why)})" if why else "") + f"; threshold for {100 * float(block.get('false_alarm', 0)):.0f} % "
            "false alarms on in-distribution eyes. Flagged scans are shaded; they are predicted anyway and marked "
            "uncertain: check them (scanner, protocol, field of view) before trusting the prediction.</p>")


def _ood_row(row: dict[str, Any], rec: dict[str, Any]) -> None:
    """The ``ood``/``ood_reason`` of a predictions.csv record into a page row (nothing when the check is empty)."""
    if str(rec.get("ood", "")) in ("True", "False"):
        row["ood"] = str(rec["ood"]) == "True"
        row["ood_reason"] = str(rec.get("ood_reason") or "")


def _table(rows: list[dict[str, Any]], classes: list[str]) -> str:
    head = ["ID", "true", "predicted", *[f"p({c})" for c in classes], "correct", "map"]
    extra = any("uncertainty" in r for r in rows)
    if extra:
        head.append("uncertainty")
    seen = any("seen" in r for r in rows)  # predict: the scan trained/validated the model (optimistic)
    if seen:
        head.append("in training")
    ood = any("ood" in r for r in rows)  # unlike the training scans: shaded, with the reason
    if ood:
        head.append("out of distribution")
    out = ["<table id='subjects'><thead><tr>" + "".join(f"<th title='sort'>{e(h)}</th>" for h in head)
           + "</tr></thead><tbody id='rows'>"]
    for i, r in enumerate(rows):
        correct = r.get("correct")
        cells = [(r["id"], r["id"]), (r.get("label") or "\u2013", r.get("label") or ""),
                 (r["prediction"], r["prediction"])]
        cells += [(f"{p:.3f}", f"{p:.6f}") for p in r["probs"]]
        cells.append(({True: "yes", False: "NO"}.get(correct, "\u2013"), {True: "1", False: "0"}.get(correct, "")))
        cells.append((r["cam_status"], r["cam_status"]))
        if extra:
            u = r.get("uncertainty")
            cells.append((f"{u:.3f}" if isinstance(u, float) else "\u2013", str(u)))
        if seen:
            cells.append(("YES" if r.get("seen") else "no", "1" if r.get("seen") else "0"))
        flagged = bool(r.get("ood"))
        if ood:
            # the checks that fired in the cell (rows stay one line); what lay outside in the row's tooltip
            checks = ", ".join(x.split(" (", 1)[0] for x in (r.get("ood_reason") or "flagged").split("; "))
            cells.append((f"YES: {checks}" if flagged else "no", "1" if flagged else "0"))
        names = [n for n, on in (("error", correct is False), ("ood", flagged)) if on]
        cls = f" class='{' '.join(names)}'" if names else ""
        cls += f" title='out of distribution: {e(r.get('ood_reason') or '', quote=True)}'" if flagged else ""
        out.append(f"<tr data-idx='{i}' data-correct='{'0' if correct is False else '1'}' "
                   f"data-ood='{int(flagged)}'{cls}>"
                   + "".join(f"<td data-v=\"{e(str(v))}\">{e(str(t))}</td>" for t, v in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _render(info: dict[str, Any], metrics: dict[str, Any], rows: list[dict[str, Any]], classes: list[str],
            figures: list[str], subjects_js: list[dict[str, Any]]) -> str:
    header = [("experiment", info.get("experiment")), ("stage", info.get("stage")), ("model", metrics.get("model")),
              ("classes", ", ".join(classes)), ("data", info.get("data")),
              ("date", _dt.datetime.now().strftime("%Y-%m-%d %H:%M")), ("octa3d", __version__),
              ("subjects", str(len(rows)))]
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in header if v not in (None, ""))
    figs = "".join(f"<a href='{e(f)}'><img src='{e(f)}' alt='{e(Path(f).stem)}'></a>" for f in figures)
    metric_rows = _metric_rows(metrics)
    metrics_html = ("<table class='small'><tr><th>metric</th><th>value</th><th>95 % CI</th></tr>"
                    f"{metric_rows}</table>" if metric_rows else "")
    title = f"octa3d review \u2014 {info.get('experiment', '')}"
    ood_html = _ood_summary(metrics.get("ood") or {})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="review.css"></head>
<body>
<header><h1>{e(title)}</h1><dl>{dl}</dl></header>
<section id="summary"><div>{metrics_html}{_cam_scores(metrics)}{ood_html}</div><div class="figs">{figs}</div></section>
<main>
<section id="list"><p><label><input type="checkbox" id="only-errors"> only errors</label>
<span id="n-shown"></span> &middot; click a row to open it; <kbd>j</kbd>/<kbd>k</kbd> or arrows: next/previous;
click a column header to sort</p>
{_table(rows, classes)}</section>
<section id="viewer" hidden><h2 id="subject-title"></h2>
<p id="viewer-status"></p>
<div id="controls"><label><input type="checkbox" id="overlay-on" checked> map overlay</label>
<label>opacity <input type="range" id="opacity" min="0" max="100" value="50"></label>
<label>threshold <input type="range" id="threshold" min="0" max="254" value="25"></label></div>
<div id="gl-box"><canvas id="gl"></canvas></div>
<p id="subject-files"></p>
<a id="sheet-link" href="#"><img id="sheet" alt="review sheet" hidden></a>
</section></main>
<pre id="selftest-result"></pre>
<script>window.OCTA3D = {js_literal({"subjects": subjects_js})};</script>
<script src="niivue.umd.js"></script>
<script src="review.js"></script>
</body></html>
"""


def write_page(out: Path, info: dict[str, Any], metrics: dict[str, Any], rows: list[dict[str, Any]],
               classes: list[str], cam_dir: Path, figures: list[str] = ()) -> Path:
    """Write ``out/index.html`` with its assets and one volume file per subject that has a scan on disk.

    Args:
        out: the review folder (created).
        info: ``experiment``, ``stage``, ``data`` (shown in the header).
        metrics: ``metrics.json`` of the run (``model``, headline metrics, ``ci95``, ``cam``, ``localization``).
        rows: one dict per subject: ``id``, ``label`` (None when unknown), ``prediction``, ``probs`` (per class),
            ``correct`` (None when unknown), ``cam_status``, ``stem`` (file stem in ``cam_dir``; None: no files).
        classes: class names (probability columns).
        cam_dir: the folder of ``<stem>_cam.nii.gz``, ``<stem>_input*.nii.gz`` and ``<stem>_review.png``.
        figures: paths relative to ``out`` of figures shown in the header.

    Returns:
        The path of ``index.html``.
    """
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for name, src in ASSETS.items():
        atomic_copy(src, out / name)
    rel = Path("..") / cam_dir.relative_to(out.parent) if cam_dir != out.parent else Path("..")
    # errors first, then the run's order
    rows = sorted(rows, key=lambda r: (r.get("correct") is not False,))

    subjects_js, sizes = [], 0
    for r in rows:
        s: dict[str, Any] = {"id": r["id"], "label": r.get("label"), "prediction": r["prediction"],
                             "files": [], "sheet": None, "volumes": None, "has_map": False, "reason": "",
                             "ood": (r.get("ood_reason") or "flagged") if r.get("ood") else ""}
        stem, status = r.get("stem"), r["cam_status"]
        scans = sorted(cam_dir.glob(f"{stem}_input*.nii.gz")) if stem else []
        cam = cam_dir / f"{stem}_cam.nii.gz" if stem else None
        if not scans:
            s["reason"] = NO_MAP.get(status, f"no scan exported for this subject (map status: {status})")
        else:
            # the last modality, as on the review sheet (OCTA of OCT+OCTA)
            scan = next((p for p in scans if p.name.endswith("_input_OCTA.nii.gz")), scans[-1])
            has_map = cam is not None and cam.is_file() and status == "ok"
            if not has_map:
                s["reason"] = f"no evidence map: {STATUS_TEXT.get(status, status)} (the scan alone is shown)"
            vol = subject_volumes(scan, cam if has_map else None, out)
            sizes += write_subject_js(out / "subjects" / f"{stem}.js", r["id"], vol)
            s.update(volumes=f"subjects/{stem}.js", has_map=vol["cam"] is not None)
            s["files"] = [{"name": p.name, "href": (rel / p.name).as_posix()}
                          for p in [*scans, *([cam] if cam.is_file() else [])]]
            sheet = cam_dir / f"{stem}_review.png"
            if sheet.is_file():
                s["sheet"] = (rel / sheet.name).as_posix()
        subjects_js.append(s)
    text = _render(info, metrics, rows, classes, list(figures), subjects_js)
    atomic_write_text(out / "index.html", text)
    log.info("review page %s: %d subjects, %.1f MB of volumes, written in %.1f s", out / "index.html", len(rows),
             sizes / 1e6, time.perf_counter() - t0)
    return out / "index.html"


def _stems(cam_dir: Path) -> dict[str, str]:
    import pandas as pd

    f = cam_dir / "names.csv"
    if not f.is_file():
        return {}
    t = pd.read_csv(f, dtype=str, keep_default_na=False)
    return dict(zip(t["subject"], t["file_stem"]))


def prediction_rows(folder: Path, classes: list[str], cam_dir: Path) -> list[dict[str, Any]]:
    """The subjects of a test stage folder's ``predictions.csv`` as :func:`write_page` rows."""
    import pandas as pd

    pred = pd.read_csv(folder / "predictions.csv", dtype={"subject": str, "label": str, "prediction": str},
                       keep_default_na=False)
    stems = _stems(cam_dir)
    has_cam = "cam_status" in pred.columns
    rows = []
    for rec in pred.to_dict("records"):
        sid = rec["subject"]
        status = str(rec["cam_status"]) if has_cam else "none"
        row = {"id": sid, "label": rec["label"], "prediction": rec["prediction"],
               "probs": [float(rec[f"p_{c}"]) for c in classes], "correct": str(rec["correct"]) == "True",
               "cam_status": status, "stem": stems.get(sid, safe_name(sid)) if has_cam else None}
        if "uncertainty" in rec:
            row["uncertainty"] = float(rec["uncertainty"])
        _ood_row(row, rec)
        rows.append(row)
    return rows


def write_test_review(folder: Path, info: dict[str, Any]) -> Path | None:
    """``<folder>/review/index.html`` for a test stage folder (``metrics.json``, ``predictions.csv``, ``cams/``).

    A page that cannot be written is logged as a warning (naming the folder), never an error: the run's results
    stand without it.
    """
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        classes = list(metrics["class_names"])
        rows = prediction_rows(folder, classes, folder / "cams")
        figs = [f"../{n}" for n in ("roc.png", "confusion_matrix.png", "reliability.png", "coverage.png")
                if (folder / n).is_file()]
        return write_page(folder / "review", info, metrics, rows, classes, folder / "cams", figs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        log.warning("review page of %s not written: %s", folder, err)
        return None


def write_explain_review(folder: Path, info: dict[str, Any], result: dict[str, Any]) -> Path | None:
    """``<folder>/review/index.html`` for one explained scan (``result``: its ``prediction.json``)."""
    try:
        probs = result["probabilities"]
        classes = list(probs)
        row = {"id": result["subject"], "label": None, "prediction": result["prediction"],
               "probs": [float(probs[c]) for c in classes], "correct": None,
               "cam_status": result.get("status", "none"), "stem": result.get("file_stem")}
        _ood_row(row, result)
        metrics = {"model": result.get("model"), "cam": result.get("cam")}
        return write_page(folder / "review", info, metrics, [row], classes, folder)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        log.warning("review page of %s not written: %s", folder, err)
        return None


def write_predict_review(folder: Path, info: dict[str, Any], summary: dict[str, Any]) -> Path | None:
    """``<folder>/review/index.html`` for a predict run (``predictions.csv``, ``cams/``; ``summary``: its
    summary.json). Labels, correctness and the ``uncertain`` flag are shown where known; no metrics."""
    try:
        classes = list(summary["class_names"])
        pred = read_csv(folder / "predictions.csv", dtype={"subject": str, "label": str, "prediction": str},
                        keep_default_na=False)
        stems = _stems(folder / "cams")
        rows = []
        for rec in pred.to_dict("records"):
            sid, status = rec["subject"], str(rec.get("cam_status", "none"))
            correct = {"True": True, "False": False}.get(str(rec.get("correct", "")))
            row = {"id": sid, "label": rec.get("label") or None, "prediction": rec["prediction"],
                   "probs": [float(rec[f"p_{c}"]) for c in classes], "correct": correct, "cam_status": status,
                   "stem": stems.get(sid, safe_name(sid)) if status not in ("none", "not computed") else None}
            if "entropy" in rec:
                row["uncertainty"] = float(rec["entropy"])
            if "training_overlap" in rec:
                row["seen"] = bool(rec["training_overlap"])
            _ood_row(row, rec)
            rows.append(row)
        metrics = {"model": summary.get("model"), "cam": summary.get("cam"), "ood": summary.get("ood")}
        return write_page(folder / "review", info, metrics, rows, classes, folder / "cams")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        log.warning("review page of %s not written: %s", folder, err)
        return None
