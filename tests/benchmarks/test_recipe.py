"""``benchmarks/recipe.py --quick``: a well-formed ladder result (the figures are judged in the benchmark run: a
2-epoch model on 16 eyes learns nothing, which the fit check must say)."""

from __future__ import annotations

import json

from benchmarks import recipe


def test_quick_recipe_ladder_is_well_formed(tmp_path):
    out = tmp_path / "recipe.json"
    res = recipe.main(["--quick", "--looks", "dropout-only", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "recipe" and res["quick"] is True and res["setup"]["looks"] == ["dropout-only"]
    by_name = {f["name"]: f for f in res["figures"]}
    f1 = by_name["dropout-only: 4-class macro-F1"]
    assert f1["target"] == ">= 0.9" and f1["met"] is (f1["value"] >= 0.9) and 0 <= f1["value"] <= 1
    assert by_name["dropout-only: NORMAL vs DR balanced accuracy"]["target"] == ">= 0.95"
    multi = res["runs"]["dropout-only / 4-class / seed 1"]
    assert set(multi["recall"]) == {"NORMAL", "AMD", "CNV", "DR"} and multi["n_test"] >= 4
    assert multi["verdict"] in ("fit", "did_not_learn", "under_fit", "over_fit") and multi["epochs_run"] == 2
    assert set(res["runs"]["dropout-only / NORMAL vs DR / seed 1"]["recall"]) == {"NORMAL", "DR"}
    assert by_name["dropout-only: 4-class lowest per-class recall"]["value"] == min(multi["recall"].values())
    assert "DR" in multi["pointing_game"]  # the default map scored against the non-perfusion mask
    assert 0 <= multi["pointing_game_enface"]["DR"] <= 1  # and en face (peak depth ignored)
    grouped = by_name["dropout-only: NORMAL vs all balanced accuracy, 4-class model grouped"]
    assert grouped["value"] == multi["as_normal_vs_all"]["balanced_accuracy"]
    assert "binary NORMAL vs all" in grouped["note"]
    assert by_name["runs stopped while training loss > 0.9 x chance"]["value"] == 0
    table = (tmp_path / "recipe.ladder.md").read_text(encoding="utf-8")
    assert table == res["ladder"] and table.count("| dropout-only |") == 3


def test_ablation_table_and_epochs_to_leave_chance_count_a_run_that_never_left_with_its_epochs(monkeypatch):
    never = {"left_chance_epoch": None, "epochs_run": 60, "balanced_accuracy": 0.5}
    early = {"left_chance_epoch": 6, "epochs_run": 31, "balanced_accuracy": 1.0}
    assert recipe._left([never, early]) == 33
    table = recipe.ablation_table({"recipe (stock)": [early, early], "x": [never, early]})
    assert "| recipe (stock) | 6/6 | 1.00/1.00 | 31/31 |" in table and "| x | never/6 | 0.50/1.00 | 60/31 |" in table
    assert {"--model", "cnn_fc3"} <= set(recipe.ABLATIONS["old cnn head (FC3 + dropout 0.5)"])
    from octa3d.model import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the ablation model stays in this test
    recipe._register_ablation_models()
    from octa3d.model import create_model

    heads = [m.out_features for m in create_model("cnn_fc3", 3, 2, 2).classifier if hasattr(m, "out_features")]
    assert heads == [256, 64, 2]


def test_a_4_class_run_read_as_normal_vs_all(tmp_path):
    """1 - p(NORMAL) is the abnormal score; a NORMAL eye predicted as a disease is a false positive."""
    from benchmarks.recipe import normal_vs_all_from_multi

    p = tmp_path / "predictions.csv"
    p.write_text("subject,label,p_NORMAL,p_DR,prediction\n1,NORMAL,0.9,0.1,NORMAL\n2,NORMAL,0.4,0.6,DR\n"
                 "3,DR,0.2,0.8,DR\n4,AMD,0.3,0.1,AMD\n", encoding="utf-8")
    got = normal_vs_all_from_multi(p)
    assert got["balanced_accuracy"] == 0.75  # NORMAL recall 1/2, abnormal recall 2/2
    assert got["auc"] == 1.0  # abnormal scores 0.8, 0.7 above normal 0.1, 0.6
    assert normal_vs_all_from_multi(tmp_path / "missing.csv") is None
