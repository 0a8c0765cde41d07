"""The study page alone (no study run): escaped texts, relative links, failed cells and missing figures said."""

from __future__ import annotations

import math

from octa3d.review.study import write_study_page


def _summary(name: str, folder: str, state: str = "done") -> dict:
    iv = {"mean": 0.8, "low": 0.7, "high": 0.9, "sd": 0.05, "n": 2}
    hold = {"n": 10, "balanced_accuracy": 0.75, "auc": 0.8, "f1_macro": 0.7, "ece": 0.1,
            "ci": {"balanced_accuracy": [0.6, 0.9], "auc": [0.6, 0.95], "f1_macro": [0.5, 0.85], "ece": [0.05, 0.2]}}
    return {"name": name, "complete": state == "done", "n_folds": 2, "folds_done": [0, 1] if state == "done" else [],
            "fold_values": {"balanced_accuracy": [0.7, 0.9]}, "fold": {"balanced_accuracy": iv, "auc": iv},
            "cells": {0: {"state": state, "folder": folder, "error": "boom <b>" if state == "failed" else None}},
            "oof": None, "holdout": hold if state == "done" else None}


def test_page_escapes_texts_links_cells_and_says_what_is_missing(tmp_path):
    cell = tmp_path / "cells" / "a" / "fold-0"
    (cell / "test" / "review").mkdir(parents=True)
    (cell / "test" / "review" / "index.html").write_text("x")
    row = {"a": "b<x>", "b": "a", "population": "holdout", "test": "DeLong", "metric": "auc", "estimate": 0.1,
           "ci_low": -0.1, "ci_high": 0.3, "p": 0.004, "p_holm": 0.008, "vs_reference": True}
    ctx = {"name": "s", "description": "<script>alert(1)</script>", "order": ["a", "b<x>"], "reference": "a",
           "values": {"a": {"dim": "3d", "model": "cnn"}, "b<x>": {"dim": "2d", "model": "cnn"}},
           "summaries": {"a": _summary("a", str(cell)), "b<x>": _summary("b<x>", str(tmp_path / "nope"), "failed")},
           "rows": [row, {**row, "population": "folds", "test": "corrected t", "p": math.nan, "p_holm": math.nan}],
           "subgroups": [], "figures": [], "kit": [], "folds": 2, "level": 95, "bootstrap": 100, "data": "/d",
           "classes": ["NORMAL", "CNV"], "n_test": 10, "n_cv": 20, "failed": ["b<x>/fold-0"], "n_cells": 2,
           "n_done": 1}
    html = write_study_page(tmp_path, ctx).read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;" in html and "b&lt;x&gt;" in html
    assert "href='cells/a/fold-0/test/review/index.html'" in html  # relative to the study folder
    assert "1 cell(s) failed" in html and "boom &lt;b&gt;" in html
    assert "Not available" in html  # no figures yet
    assert "class='num sig'" in html and "Holm 0.008" in html and "p n/a" in html
