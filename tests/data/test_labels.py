"""Label tables (column detection, normalisation, errors) and LabelMap for binary/multi tasks."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from octa3d.config import DataConfig
from octa3d.data.labels import LabelMap, read_label_table
from octa3d.errors import DataError

PRESENT = ["NORMAL"] * 3 + ["DR"] * 2 + ["AMD", "CNV", None]


def test_csv_columns_found_whatever_the_case_and_spacing(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(" id ,Gender, DISEASE  \n10001.0,M,normal \n10002, F ,dr\n 10003 ,M,  \n10002,F,DR\n")
    # 10003 has no disease: it is left out (unlabeled); 10002 twice with the same label is fine.
    assert read_label_table(path) == {"10001": "NORMAL", "10002": "DR"}


def test_octa500_xlsx_with_float_ids_and_title_rows(tmp_path):
    path = tmp_path / "Text labels.xlsx"
    df = pd.DataFrame({"ID": [10001.0, 10002.0, 10010.0], "Gender": ["M", "F", "M"], "Age": [60, 70, 55],
                       "OS/OD": ["OD", "OS", "OD"], "Disease": ["NORMAL", "AMD", "Dr "]})
    with pd.ExcelWriter(path) as xw:
        df.to_excel(xw, index=False, startrow=2, sheet_name="6mm")  # two title/blank rows above the header
        pd.DataFrame({"Patient ID": [10301], "Diagnosis": ["cnv"]}).to_excel(xw, index=False, sheet_name="3mm")
    assert read_label_table(path) == {"10001": "NORMAL", "10002": "AMD", "10010": "DR", "10301": "CNV"}


def test_table_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Name,Age\nx,3\n")
    with pytest.raises(DataError, match=r"bad\.csv: no ID and Disease columns found \(columns: Name, Age\)"):
        read_label_table(bad)
    clash = tmp_path / "clash.csv"
    clash.write_text("ID,Label\n7,DR\n7,AMD\n8,NORMAL\n")
    with pytest.raises(DataError, match=r"clash\.csv: 1 ID\(s\) listed with different diseases \(7: AMD vs DR\)"):
        read_label_table(clash)
    with pytest.raises(DataError, match=r"missing\.xlsx: file not found"):
        read_label_table(tmp_path / "missing.xlsx")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported"):
        read_label_table(tmp_path / "t.json")


def test_binary_default_positives():
    lm = LabelMap.build(DataConfig(task="binary"), PRESENT)
    assert lm.class_names == ["NORMAL", "AMD+CNV+DR"]
    assert [lm.index(x) for x in ("normal", "DR", "AMD", None)] == [0, 1, 1, None]


def test_binary_many_positives_named_abnormal_and_chosen_positive():
    lm = LabelMap.build(DataConfig(task="binary"), PRESENT + ["CSC", "RVO"])
    assert lm.class_names == ["NORMAL", "ABNORMAL"]
    lm = LabelMap.build(DataConfig(task="binary", positive=["dr"]), PRESENT)
    assert lm.class_names == ["NORMAL", "DR"] and lm.index("AMD") is None and lm.index("DR") == 1


def test_multi_default_and_chosen_classes():
    lm = LabelMap.build(DataConfig(task="multi"), PRESENT)
    assert lm.class_names == ["NORMAL", "AMD", "CNV", "DR"]  # negative first, then sorted
    lm = LabelMap.build(DataConfig(task="multi", classes=["DR", "normal"]), PRESENT)
    assert lm.class_names == ["DR", "NORMAL"] and lm.index("AMD") is None and lm.index("NORMAL") == 1


@pytest.mark.parametrize("cfg", [DataConfig(task="multi", classes=["NORMAL", "GLAUCOMA"]),
                                 DataConfig(task="binary", positive=["GLAUCOMA"]),
                                 DataConfig(task="binary", negative="GLAUCOMA")])
def test_unknown_class_lists_the_present_ones(cfg):
    with pytest.raises(DataError, match=r"GLAUCOMA: not among the labels present \(AMD \(1\), CNV \(1\), DR \(2\), "
                                        r"NORMAL \(3\)\)"):
        LabelMap.build(cfg, PRESENT)


def test_too_few_classes():
    with pytest.raises(DataError, match="positive class"):
        LabelMap.build(DataConfig(task="binary"), ["NORMAL", "NORMAL"])
    with pytest.raises(DataError, match="at least two classes"):
        LabelMap.build(DataConfig(task="multi"), ["DR"])


def test_round_trip_through_json():
    lm = LabelMap.build(DataConfig(task="binary"), PRESENT)
    back = LabelMap.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert back == lm and back.num_classes == 2
