"""``benchmarks/ood.py --quick``: a well-formed result; on a 1-epoch model the feature scores say little, but the
geometry and intensity checks do not depend on training: the gain/offset-changed and the resized cohorts are
flagged."""

from __future__ import annotations

import json

from benchmarks import ood


def test_quick_ood_result_is_well_formed(tmp_path):
    out = tmp_path / "ood.json"
    res = ood.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(res))
    assert res["benchmark"] == "ood" and res["quick"] is True
    by_name = {f["name"]: f for f in res["figures"]}
    for shift in ("gain-offset", "shape-48x64x48"):
        for score in ood.SCORES:
            assert 0 <= by_name[f"{shift}: OOD AUROC {score}"]["value"] <= 1
        assert by_name[f"{shift}: share flagged ood"]["value"] == 1.0
        assert by_name[f"{shift}: OOD AUROC combined"]["value"] == 1.0
    far = by_name["false-alarm rate on in-distribution eyes (ood flag)"]
    assert far["target"] == "<= 0.05" and 0 <= far["value"] <= 1
    assert by_name["cost: check seconds / predict seconds"]["target"] == "<= 0.1"
    assert len(res["runs"]["in_distribution"]["fresh"]["flag"]) == 6
    assert res["runs"]["default_rule_reproduced"] is True  # the alternatives are computed the pipeline's way
