"""Label tables (column detection, normalisation, errors) and LabelMap for binary/multi tasks."""

from __future__ import annotations

import json
import logging

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


# ------------------------------------------------------------------------------------------- bounded memory
_BOUNDED_READ = """
import re, resource, sys
from octa3d.data.labels import read_label_table
from octa3d.errors import DataError
vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
limit = vm + 300 * 2**20  # imports done: 300 MB more address space for the read
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    print("TABLE", sorted(read_label_table(sys.argv[1]).items()))
except DataError as exc:
    print("ERROR", exc)
"""


def _bounded_read(path) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BOUNDED_READ, str(path)], capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_stray_cell_in_xfd1048576_is_read_in_bounded_memory(tmp_path):
    # 5 KB on disk; pandas materialised the declared 1048576 x 16384 range (22 GB before the OOM killer)
    import openpyxl

    path = tmp_path / "Text labels.xlsx"
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["ID", "Gender", "Age", "OS/OD", "Disease"])
    for i in range(5):
        ws.append([10001 + i, "M", 50, "OD", "NORMAL" if i % 2 else "DR"])
    ws["XFD1048576"] = 1
    wb.save(path)
    assert path.stat().st_size < 10_000
    out = _bounded_read(path)
    assert out.startswith("TABLE [('10001', 'DR'), ('10002', 'NORMAL'), ('10003', 'DR'), ('10004', 'NORMAL'), "
                          "('10005', 'DR')]"), out


def _rewrite_sheet(path, edit) -> None:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        parts = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    name = "xl/worksheets/sheet1.xml"
    parts[name] = edit(parts[name].decode()).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in parts.items():
            zf.writestr(n, data)


def test_crafted_workbooks_are_refused_or_read_without_walking_past_excel_limits(tmp_path):
    import re

    import openpyxl

    path = tmp_path / "labels.xlsx"
    wb = openpyxl.Workbook()
    wb.active.append(["ID", "Disease"])
    wb.active.append([1, "DR"])
    wb.save(path)
    # a <dimension> beyond Excel's own limits: the file is damaged
    _rewrite_sheet(path, lambda x: re.sub(r'<dimension ref="[^"]*"', '<dimension ref="A1:B99999999"', x))
    with pytest.raises(DataError, match=r"labels\.xlsx \[Sheet\]: declares 99999999 rows × 2 columns, beyond "
                                        "Excel's"):
        read_label_table(path)
    # a row numbered far past Excel's last row (no dimension): rows are never walked that far
    wb.save(path)
    _rewrite_sheet(path, lambda x: re.sub(r'<dimension ref="[^"]*"/>', "", x).replace(
        "</sheetData>", '<row r="2000000000"><c r="A2000000000" t="inlineStr"><is><t>2</t></is></c>'
                        '<c r="B2000000000" t="inlineStr"><is><t>AMD</t></is></c></row></sheetData>'))
    assert _bounded_read(path).startswith("TABLE [('1', 'DR')]")
    # a zip bomb of shared strings
    wb.save(path)
    import zipfile

    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("xl/sharedStrings.xml", b" " * (80 << 20))
    with pytest.raises(DataError, match=r"labels\.xlsx: its part xl/sharedStrings\.xml unpacks to 80 MiB"):
        read_label_table(path)
    (tmp_path / "old.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    with pytest.raises(DataError, match=r"old\.xls: the old \.xls format is not supported"):
        read_label_table(tmp_path / "old.xls")
    (tmp_path / "notzip.xlsx").write_text("ID,Disease\n1,DR\n")
    with pytest.raises(DataError, match=r"notzip\.xlsx: not a valid \.xlsx file"):
        read_label_table(tmp_path / "notzip.xlsx")


# ------------------------------------------------------------------------------------------- binary task
def test_binary_logs_the_classes_merged_into_the_positive_class(capture_log):
    records = capture_log("octa3d.data")
    LabelMap.build(DataConfig(task="binary"), PRESENT)
    assert "--task binary: the positive class AMD+CNV+DR merges AMD (1), CNV (1), DR (2); the negative class is " \
           "NORMAL (3)" in [r.getMessage() for r in records if r.levelno == logging.INFO]


def test_binary_refuses_a_label_typo_unless_named_in_positive():
    present = PRESENT + ["NORMAI", "Glaucoma"]
    where = {"NORMAI": ["10007"], "GLAUCOMA": ["10009", "10008"]}
    with pytest.raises(DataError, match=r"--task binary: unknown label\(s\) in /d/Text labels\.xlsx: GLAUCOMA \(1 "
                                        r"subject\(s\): 10008, 10009\); NORMAI \(1 subject\(s\): 10007\); known "
                                        r"disease names are NORMAL, .*DRUSEN\. Fix the label\(s\) in /d/Text "
                                        r"labels\.xlsx, or name them in --positive"):
        LabelMap.build(DataConfig(task="binary"), present, where, "/d/Text labels.xlsx")
    with pytest.raises(DataError, match=r"unknown label\(s\) in the labels: NORMAI \(1 subject\(s\)\)"):
        LabelMap.build(DataConfig(task="binary", positive=["glaucoma"]), present)
    lm = LabelMap.build(DataConfig(task="binary", positive=["GLAUCOMA", "NORMAI"]), present)
    assert lm.class_names == ["NORMAL", "GLAUCOMA+NORMAI"] and lm.index("DR") is None
    # a custom negative is named by the user; multi-class tasks show every label as its own class
    assert LabelMap.build(DataConfig(task="binary", negative="HEALTHY"), ["HEALTHY", "DR"]).class_names == \
        ["HEALTHY", "DR"]
    assert "NORMAI" in LabelMap.build(DataConfig(task="multi"), present).class_names


def test_known_diseases_cover_the_synthetic_generator():
    from octa3d.data.labels import KNOWN_DISEASES
    from octa3d.data.synthetic import CLASSES

    assert set(CLASSES) <= set(KNOWN_DISEASES)
    assert {"NORMAL", "AMD", "CNV", "CSC", "DR", "RVO", "OTHERS", "DME", "DRUSEN"} == set(KNOWN_DISEASES)


def test_modality_advice_names_the_oct_findings_that_octa_alone_cannot_show():
    from octa3d.data.labels import modality_advice

    text = modality_advice(["NORMAL", "amd", "CNV", "CSC"], "OCTA")
    assert "AMD (drusen" in text and "CSC (subretinal fluid)" in text and "--modality OCT+OCTA" in text
    assert modality_advice(["NORMAL", "AMD"], "OCT+OCTA") is None
    assert modality_advice(["NORMAL", "CNV", "DR"], "OCTA") is None  # flow findings: OCTA shows them
