"""``--mode test --external PATH``: an external labelled cohort scored with the experiment's class mapping into
``test-external/<name>/`` (the internal ``test/`` untouched), labels the experiment does not score refused or
skipped, and cohorts overlapping the model's training data refused (same files, a copied scan under a new ID, a
shared patient)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from octa3d.checkpoint.io import model_record, save_checkpoint
from octa3d.cli import main, parse_config
from octa3d.data.leakage import guard_external
from octa3d.data.stratify import Splits
from octa3d.data.subject import Subject
from octa3d.errors import ConfigError, DataError, LeakageError
from octa3d.stages.context import cohort_name, experiment_config, external_data_config


def _args(root: Path, *extra: str) -> list[str]:
    return ["--data-root", str(root / "data"), "--runs-dir", str(root / "runs"), "--exp", "e", "--model", "cnn",
            "--input-size", "16", "--batch-size", "4", "--bootstrap", "50", "--cam", "none", *extra]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """12 synthetic NORMAL/CNV eyes (16x32x16), splits, an untrained cnn as train/best.pt, the hold-out tested,
    and a disjoint cohort made by ``--mode synth`` with another seed (all six synthetic classes, the same IDs)."""
    from octa3d.data.synthetic import generate
    from octa3d.model import create_model
    from octa3d.stages.prepare import run as prepare
    from octa3d.stages.test import run as test

    root = tmp_path_factory.mktemp("ext")
    generate(root / "data", 12, (16, 32, 16), seed=0, classes=("NORMAL", "CNV"))
    cfg, _ = parse_config(_args(root, "--mode", "prepare"))
    sp = prepare(cfg)
    model = create_model("cnn", "3d", 1, 2)
    save_checkpoint(cfg.run_dir / "train" / "checkpoints" / "best.pt", model,
                               model_record(cfg, sp.class_names, "classifier"), epoch=1, config=cfg)
    test(parse_config(_args(root, "--mode", "test"))[0])
    assert main(["--mode", "synth", "--data-root", str(root / "site2" / "cohort"), "--seed", "1",
                 "--n-subjects", "12", "--shape", "16,32,16"]) == 0
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disjoint_cohort_is_scored_into_test_external(experiment, capsys, caplog, monkeypatch):
    from octa3d.evaluation import outputs
    from octa3d.stages.test import run

    titles: list[str] = []  # the figures name their cohort: a PNG pasted into a paper says what it shows
    real = outputs.confusion_figure
    monkeypatch.setattr(outputs, "confusion_figure",
                        lambda cm, names, title: titles.append(title) or real(cm, names, title))

    cohort = experiment / "site2" / "cohort"
    internal = experiment / "runs" / "e" / "test"
    before = _files(internal)
    # AMD, DR, CSC, RVO: labels the NORMAL-vs-CNV model does not score: listed, refused ...
    with pytest.raises(DataError, match=r"does not score: AMD \(2: .*CSC.*DR.*RVO.*NORMAL→NORMAL.*--skip-unlabeled"):
        run(parse_config(_args(experiment, "--mode", "test", "--external", str(cohort)))[0])
    # ... or left out with --skip-unlabeled; the same IDs (10001 ...) as the training eyes, other scans: scored
    with caplog.at_level("WARNING", logger="octa3d"):
        m = run(parse_config(_args(experiment, "--mode", "test", "--external", str(cohort), "--skip-unlabeled"))[0])
    assert "also name training/validation subjects" in caplog.text
    assert titles and set(titles) == {"Confusion matrix (external)"}
    out = experiment / "runs" / "e" / "test-external" / cohort_name(cohort)
    assert out.name.startswith("cohort-") and (out / ".complete").is_file()
    for f in ("metrics.json", "predictions.csv", "roc.png", "confusion_matrix.png", "reliability.png",
              "coverage.png", "review/index.html"):
        assert (out / f).is_file(), f
    assert any((out / "tensorboard").iterdir())
    doc = json.loads((out / "metrics.json").read_text())
    labels = pd.read_excel(cohort / "Text labels.xlsx", dtype={"ID": str})
    scored = labels[labels["Disease"].isin(["NORMAL", "CNV"])]
    assert doc["cohort"]["path"] == str(cohort.resolve()) and doc["cohort"]["layout"] == "octa500"
    assert doc["cohort"]["n_subjects"] == len(scored) == doc["n_subjects"] == m["n_subjects"] == 4
    assert doc["cohort"]["class_counts"] == {"NORMAL": 2, "CNV": 2}
    assert doc["cohort"]["skipped_labels"] == {"AMD": 2, "CSC": 2, "DR": 2, "RVO": 2}
    splits = experiment / "runs" / "e" / "splits"
    seen = {s for f in ("train.csv", "val.csv") for s in pd.read_csv(splits / f, dtype=str)["subject"]}
    assert doc["cohort"]["id_matches_with_other_scans"] == len(seen & set(scored["ID"])) > 0
    assert doc["class_names"] == ["NORMAL", "CNV"] and "auc" in doc["ci95"]
    pred = pd.read_csv(out / "predictions.csv", dtype={"subject": str})
    assert sorted(pred["subject"]) == sorted(scored["ID"])
    assert dict(zip(pred["subject"], pred["label"])) == dict(zip(scored["ID"], scored["Disease"]))
    assert f"External validation of experiment 'e' on {cohort.resolve()}: 4 subjects" in capsys.readouterr().out
    # the cache is keyed by the files, not the IDs: cohort eye 10001 is not the experiment's eye 10001
    assert len(list((experiment / "runs" / ".cache").rglob("*.npy"))) == 4 + 4
    # maps as in the internal test (--overwrite replaces the folder); a subject outside the cohort is refused
    cams = ["--cam", "gradcam", "--cam-layer", "features.block3.act", "--skip-unlabeled", "--overwrite"]
    with pytest.raises(ConfigError, match="--cam-subjects 10002: not subjects of the external cohort"):
        run(parse_config(_args(experiment, "--mode", "test", "--external", str(cohort), *cams,
                               "--cam-subjects", "10002"))[0])
    m = run(parse_config(_args(experiment, "--mode", "test", "--external", str(cohort), *cams,
                               "--cam-subjects", "10001"))[0])
    assert m["cam"]["n_subjects"] == 1 and (out / "cams" / "10001_cam.nii.gz").is_file()
    status = pd.read_csv(out / "predictions.csv", dtype={"subject": str}).set_index("subject")["cam_status"]
    assert status["10001"] != "not computed" and status["10007"] == "not computed"
    assert _files(internal) == before  # the internal hold-out is never touched
    # the internal metrics.json names its cohort too
    assert json.loads((internal / "metrics.json").read_text())["cohort"]["name"] == "hold-out test split"


def test_cohort_names_and_whose_flags_describe_the_cohort(experiment, tmp_path):
    a, b = tmp_path / "siteA" / "data", tmp_path / "siteB" / "data"
    a.mkdir(parents=True), b.mkdir(parents=True)
    (b / "manifest.csv").write_text("subject,label,path\n")
    assert cohort_name(a) == cohort_name(str(a) + "/") != cohort_name(b)
    assert cohort_name(b / "manifest.csv").startswith("data-") and cohort_name(a).startswith("data-")
    cfg, _ = parse_config(_args(experiment, "--mode", "test", "--external", str(a), "--labels", "ext.xlsx",
                                "--skip-unlabeled"))
    base = experiment_config(cfg)  # the experiment is set up with its own labels, not the cohort's
    assert base.data.labels is None and not base.is_explicit("labels") and base.data.skip_unlabeled
    data = external_data_config(cfg, base)
    assert (data.data_root, data.labels, data.source, data.skip_unlabeled) == (str(a), "ext.xlsx", "auto", True)
    base.data.labels = "experiment.xlsx"  # recorded for the experiment: never the cohort's
    cfg2, _ = parse_config(_args(experiment, "--mode", "test", "--external", str(a)))
    assert external_data_config(cfg2, base).labels is None


def test_overlapping_cohorts_are_refused(experiment, tmp_path):
    from octa3d.stages.test import run

    internal = experiment / "runs" / "e" / "test"
    before = _files(internal)
    data = experiment / "data"
    # a path that is not there: named as --external, before anything is set up
    with pytest.raises(DataError, match=r"--external .*nowhere: no such file or folder"):
        run(parse_config(_args(experiment, "--mode", "test", "--external", str(tmp_path / "nowhere")))[0])
    # the experiment's own data root
    with pytest.raises(DataError, match="own data root"):
        run(parse_config(_args(experiment, "--mode", "test", "--external", str(data)))[0])
    # a copy of it: same IDs, same files
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    train = pd.read_csv(experiment / "runs" / "e" / "splits" / "train.csv", dtype=str)["subject"].tolist()
    with pytest.raises(LeakageError, match=rf"test --external refused: \d+ subject\(s\).*{train[0]} holds the same "
                                           rf"scan as training/validation subject {train[0]}"):
        run(parse_config(_args(experiment, "--mode", "test", "--external", str(copy)))[0])
    # a training scan copied under a new ID into a manifest cohort of other scans
    site = tmp_path / "site3"
    cohort = experiment / "site2" / "cohort" / "OCTA_6mm" / "OCTA"
    shutil.copytree(data / "OCTA_6mm" / "OCTA" / train[1], site / "new-eye")
    rows = ["subject,label,path", f"x1,NORMAL,{cohort / '10001'}", f"x2,CNV,{cohort / '10003'}",
            f"renamed,NORMAL,{site / 'new-eye'}"]
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(LeakageError, match=f"renamed holds the same scan as training/validation subject {train[1]}"):
        run(parse_config(_args(experiment, "--mode", "test", "--external", str(site / "manifest.csv")))[0])
    assert not (experiment / "runs" / "e" / "test-external" / cohort_name(site / "manifest.csv")).exists()
    assert _files(internal) == before


def test_patient_groups_overlap_but_ids_of_another_dataset_do_not(experiment, tmp_path):
    """Kermany-style 2D class folders: another image of a training patient is refused; an OCTA-500 ID that a
    training eye also has, with another scan, is another cohort's eye (returned, not refused)."""
    def image(name: str, text: str) -> str:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return str(p)

    seen = {"CNV/CNV-6294785-1": Subject("CNV/CNV-6294785-1", "CNV", {"image": image("in/a.jpeg", "a")},
                                         group="6294785"),
            "10001": Subject("10001", "NORMAL", {"OCTA": image("in/10001.bmp", "b")})}
    sp = Splits(train=list(seen), val=[], test=[], class_names=["NORMAL", "CNV"],
                groups={k: v.group for k, v in seen.items()})
    cfg, _ = parse_config(_args(tmp_path, "--mode", "test"))
    other_patient = Subject("CNV/CNV-6294785-3", "CNV", {"image": image("ext/c.jpeg", "c")}, group="6294785")
    with pytest.raises(LeakageError, match="CNV/CNV-6294785-3 belongs to patient 6294785, like training/validation "
                                           "subject CNV/CNV-6294785-1"):
        guard_external(cfg, [other_patient], sp, seen)
    same_id = Subject("10001", "NORMAL", {"OCTA": image("ext/10001.bmp", "d")})
    new_patient = Subject("CNV/CNV-111-1", "CNV", {"image": image("ext/e.jpeg", "e")}, group="111")
    assert guard_external(cfg, [same_id, new_patient], sp, seen) == ["10001"]
    same_bytes = Subject("CNV/CNV-222-1", "CNV", {"image": image("ext/f.jpeg", "a")}, group="222")
    with pytest.raises(LeakageError, match="CNV/CNV-222-1 holds the same scan as training/validation subject "
                                           "CNV/CNV-6294785-1"):
        guard_external(cfg, [same_bytes], sp, seen)


def test_scans_that_pretrained_the_encoder_are_refused(experiment, tmp_path):
    """--ae-extra-data (this run's flag or ae_pretrain/config.yaml) trained the encoder: not external test data."""
    extra = experiment / "site2" / "cohort"
    shutil.copytree(extra / "OCTA_6mm" / "OCTA" / "10005", tmp_path / "z")
    cfg, _ = parse_config(_args(experiment, "--mode", "test", "--ae-extra-data", str(extra)))
    sp = Splits(train=["10001"], val=[], test=[], class_names=["NORMAL", "CNV"], groups={"10001": "10001"})
    z = Subject("z", "NORMAL", {"image": str(tmp_path / "z")})
    with pytest.raises(LeakageError, match="z holds the same scan as autoencoder extra subject 10005"):
        guard_external(cfg, [z], sp, {})
