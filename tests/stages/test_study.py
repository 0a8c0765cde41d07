"""``--mode study`` end to end on tiny generated eyes: two arms (3D volume, 2D en-face) and an arm that fails,
2 folds, 1 epoch, on the embedded local Ray; then ``--resume`` runs only what is unfinished."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from octa3d.data.splits import read_splits
from octa3d.data.synthetic import generate
from octa3d.errors import ConfigError, RunExistsError, StudyError
from octa3d.stages.study import run_study

pytest.importorskip("ray")

STUDY = {
    "name": "tiny", "folds": 2, "reference": "3d-cnn", "description": "2D en-face vs 3D volume on generated eyes.",
    "common": {"model": "cnn", "input_size": 16, "epochs": 1, "batch_size": 8, "patience": 0, "bootstrap": 50},
    "arms": [{"name": "3d-cnn", "input": "volume"}, {"name": "2d-cnn", "input": "enface"},
             {"name": "broken", "input": "volume", "init_from": "/nonexistent/weights.pt"}],
    "stats": {"bootstrap": 200},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study run once through the CLI on local Ray: (root, exit status, stderr)."""
    from octa3d.cli import main

    root = tmp_path_factory.mktemp("study")
    generate(root / "data", 24, (16, 32, 16), seed=0, classes=("NORMAL", "CNV"))
    doc = {**STUDY, "common": {**STUDY["common"], "data_root": str(root / "data")}}
    (root / "study.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    rc = main(["--mode", "study", "--study", str(root / "study.yaml"), "--runs-dir", str(root / "runs"),
               "--log-level", "WARNING"])
    return root, rc


def test_study_runs_every_cell_as_an_ordinary_run_on_the_same_folds(study):
    root, rc = study
    assert rc == 2  # the broken arm failed; the others finished
    sdir = root / "runs" / "tiny"
    folds = read_splits(sdir / "splits")
    assert folds.n_folds == 2
    for arm in ("3d-cnn", "2d-cnn"):
        for k in range(2):
            cell = sdir / "cells" / arm / f"fold-{k}"
            assert (cell / ".cell-complete").is_file()
            for f in ("config.yaml", "command.txt", "environment.txt", "train/checkpoints/best.pt",
                      "train/val_predictions.csv", "test/metrics.json", "test/review/index.html"):
                assert (cell / f).is_file(), f
            sp = read_splits(cell / "splits")  # the study's fold k; the same hold-out for every cell
            assert (sp.train, sp.val, sp.test) == (folds.folds[k][0], folds.folds[k][1], folds.test)
            val = pd.read_csv(cell / "train" / "val_predictions.csv", dtype={"subject": str})
            assert sorted(val["subject"]) == sorted(folds.folds[k][1])
            assert not set(sp.test) & (set(sp.train) | set(sp.val))
    failed = json.loads((sdir / "cells" / "broken" / "fold-0" / ".cell-failed").read_text(encoding="utf-8"))
    assert "does not exist" in failed["error"]


def test_study_report_tables_methods_checklist(study):
    root, _ = study
    sdir = root / "runs" / "tiny"
    stats = json.loads((sdir / "results" / "stats.json").read_text(encoding="utf-8"))
    assert stats["arms"]["3d-cnn"]["complete"] and not stats["arms"]["broken"]["complete"]
    tests = {(r["a"], r["b"], r["population"], r["test"], r["metric"]) for r in stats["comparisons"]}
    assert ("2d-cnn", "3d-cnn", "holdout", "DeLong", "auc") in tests
    assert ("2d-cnn", "3d-cnn", "folds", "corrected t", "balanced_accuracy") in tests
    assert ("2d-cnn", "3d-cnn", "oof", "McNemar exact", "accuracy") in tests
    assert not any("broken" in (r["a"], r["b"]) for r in stats["comparisons"])  # incomplete arms are not compared
    for stem in ("arms", "arms_oof", "pairs", "subgroups"):
        for ext in ("csv", "md", "tex"):
            assert (sdir / "tables" / f"{stem}.{ext}").is_file(), f"{stem}.{ext}"
    arms = pd.read_csv(sdir / "tables" / "arms.csv")
    assert list(arms["arm"]) == ["3d-cnn", "2d-cnn", "broken"] and arms["n_holdout"].iloc[0] == len(
        read_splits(sdir / "splits").test)
    assert "\\begin{tabular}" in (sdir / "tables" / "pairs.tex").read_text(encoding="utf-8")
    sub = pd.read_csv(sdir / "tables" / "subgroups.csv")
    assert {"sex", "age", "eye"} <= set(sub["attribute"])
    methods = (sdir / "methods.md").read_text(encoding="utf-8")
    assert "2 folds" in methods and "DeLong" in methods and "seed 42" in methods and "Ray" in methods
    assert "| 2d-cnn | 2D en-face (projected) | cnn |" in methods
    checklist = (sdir / "checklist.md").read_text(encoding="utf-8")
    assert "TRIPOD+AI" in checklist and "CLAIM 2024" in checklist and "**AUTHOR**" in checklist


def test_study_page_links_resolve_from_disk(study):
    root, _ = study
    sdir = root / "runs" / "tiny"
    page = (sdir / "index.html").read_text(encoding="utf-8")
    assert "octa3d study" in page and "broken" in page and "failed" in page
    links = re.findall(r"(?:href|src)=['\"]([^'\"]+)['\"]", page)
    assert any(link.endswith("test/review/index.html") for link in links)
    assert any(link.endswith("forest.png") for link in links) and any(link.endswith("roc.png") for link in links)
    for link in links:
        assert not link.startswith(("http", "/")), link  # relative: the folder can move, works from file://
        assert (sdir / link).is_file(), link


def test_resume_runs_only_unfinished_cells_and_refuses_changed_arms(study, tmp_path):
    import shutil

    root, _ = study
    src = root / "runs" / "tiny"
    runs = tmp_path / "runs"
    shutil.copytree(src, runs / "tiny")
    sdir = runs / "tiny"
    doc = yaml.safe_load((root / "study.yaml").read_text(encoding="utf-8"))
    doc["arms"] = doc["arms"][:2]  # the broken arm dropped: its cells are left as they are
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(RunExistsError, match="--resume"):
        run_study(path, runs_dir=str(runs))
    markers = {p: p.stat().st_mtime_ns for p in sdir.glob("cells/*/fold-*/.cell-complete")}
    redo = sdir / "cells" / "3d-cnn" / "fold-1"
    (redo / ".cell-complete").unlink()  # as if killed after training, before the test stage finished
    shutil.rmtree(redo / "test")
    history = (redo / "train" / "history.csv").stat().st_mtime_ns
    out = run_study(path, runs_dir=str(runs), resume=True, executor="sequential")
    assert out["outcomes"]["3d-cnn/fold-1"] == "done" and not out["failed"]
    assert sorted(k for k, v in out["outcomes"].items() if v == "skipped") == ["2d-cnn/fold-0", "2d-cnn/fold-1",
                                                                               "3d-cnn/fold-0"]
    for p, t in markers.items():
        if p.parent != redo:
            assert p.stat().st_mtime_ns == t, p  # finished cells untouched
    assert (redo / ".cell-complete").is_file() and (redo / "test" / "metrics.json").is_file()
    assert (redo / "train" / "history.csv").stat().st_mtime_ns == history  # its finished training was kept
    doc["arms"][0]["lr"] = 0.01
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"3d-cnn \(lr\)"):
        run_study(path, runs_dir=str(runs), resume=True, executor="sequential")


def test_failing_arm_is_reported_by_the_python_entry_point(study, tmp_path):
    import shutil

    root, _ = study
    shutil.copytree(root / "runs" / "tiny", tmp_path / "runs" / "tiny")
    with pytest.raises(StudyError, match=r"2 of 6 cells of study tiny failed[\s\S]*broken/fold-0"):
        run_study(root / "study.yaml", runs_dir=str(tmp_path / "runs"), resume=True, executor="sequential")
    assert Path(tmp_path / "runs" / "tiny" / "index.html").is_file()


def test_cli_errors_are_one_line_and_name_the_file_and_key(tmp_path, run_cli):
    res = run_cli(["--mode", "study"])
    assert res.rc == 2 and "--mode study needs --study FILE.yaml" in res.err
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms:\n  - {name: a, modle: cnn}\n", encoding="utf-8")
    res = run_cli(["--mode", "study", "--study", str(bad), "--runs-dir", str(tmp_path / "runs")])
    assert res.rc == 2 and f"{bad}: arms[0] (a): unknown key 'modle'" in res.err and "model" in res.err
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    res = run_cli(["--mode", "study", "--study", str(bad), "--ray-address", "somewhere"])
    assert res.rc == 2 and "--ray-address 'somewhere'" in res.err
