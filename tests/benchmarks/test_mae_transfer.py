"""``benchmarks/mae_transfer.py --quick``: the MAE-vs-random comparison runs end to end and is well formed (the
figures themselves are judged in the benchmark run: one epoch on 16 eyes learns nothing)."""

from __future__ import annotations

import json

from benchmarks import mae_transfer
from octa3d.model import list_models


def test_quick_mae_transfer_result_is_well_formed(tmp_path):
    out = tmp_path / "mae.json"
    res = mae_transfer.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "mae_transfer" and res["quick"] is True and res["setup"]["mask_ratio"] == 0.75
    run = res["models"][mae_transfer.MODEL]
    assert len(run["mae_val_loss"]) == 1 and run["mae_val_loss"][0] > 0
    for init in ("test_init_ae", "test_init_random"):
        assert run[init]["n_test"] >= 4 and set(run[init]["ci95"]) == {"balanced_accuracy", "auc"}
    names = {f["name"] for f in res["figures"]}
    assert {"vit test auc init MAE", "vit test auc init random", "vit test balanced_accuracy init MAE"} <= names
    assert mae_transfer.MODEL not in list_models()  # registered for the run only
