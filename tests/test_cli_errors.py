"""Every error the data layer raises about a file, through the real command.

Each case damages one file of a tiny generated dataset, runs ``main.py`` (in a subprocess for a few cases, in this
process for the rest: :func:`run_cli` in conftest) and checks what the user sees: a non-zero exit, no Python
traceback, and stderr naming the subject and the file at fault. ``--mode prepare`` reaches discovery (OCTA-500
slice folders are checked from their headers there, label tables and manifests are read there); the readers
behind a manifest or 2D folders are first reached by the cache warm-up of ``--mode ae_pretrain``, before any model
is built.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from octa3d.data.bmp import encode_bmp8
from octa3d.data.synthetic import generate

SHAPE = (8, 16, 10)  # B-scans, depth rows, columns
LABELS = "Text labels.xlsx"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 eyes (NORMAL, DR, NORMAL, DR) as OCTA-500 BMP stacks + Text labels.xlsx, and as NIfTI volumes."""
    root = tmp_path_factory.mktemp("errors") / "data"
    generate(root, 4, SHAPE, seed=3, layout="both", classes=("NORMAL", "DR"))
    return root


@pytest.fixture
def data(base: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`base`, to damage."""
    return Path(shutil.copytree(base, tmp_path / "data"))


def check(res, *names: str | Path) -> None:
    """The command failed (status 2) with an ``octa3d: error:`` naming every one of ``names``, no traceback."""
    assert res.rc == 2, (res.rc, res.err[-3000:])
    assert "Traceback" not in res.err and "Traceback" not in res.out, res.err
    error = res.err[res.err.index("octa3d: error: "):]
    for name in names:
        assert str(name) in error, (str(name), error)


def prepare(data: Path, *extra: str) -> list[str]:
    return ["--mode", "prepare", "--data-root", data, "--runs-dir", data.parent / "runs", "--exp", "e", *extra]


def eye(data: Path, sid: str = "10002", modality: str = "OCTA") -> Path:
    return data / "OCTA_6mm" / modality / sid


def _labels(data: Path) -> pd.DataFrame:
    return pd.read_excel(data / LABELS, dtype=str)


def _write_labels(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_excel(path, index=False, engine="openpyxl")
    return path


# --------------------------------------------------------------------------------- OCTA-500 slice folders (prepare)
# Discovery checks every slice folder from its listing and headers and lists every eye it cannot read at once.
def _truncated_bmp(data, cut):
    cut(eye(data) / "3.bmp", 100)
    return ["10002", eye(data), "3.bmp", "truncated"]


def _zero_byte_bmp(data, cut):
    cut(eye(data) / "3.bmp", 0)
    return ["10002", eye(data), "3.bmp"]


def _missing_slice(data, cut):
    (eye(data) / "5.bmp").unlink()
    return ["10002", eye(data), "missing slice number(s) 5"]


def _duplicate_slice(data, cut):
    shutil.copy(eye(data) / "2.bmp", eye(data) / "02.bmp")
    return ["10002", eye(data), "02.bmp and 2.bmp"]


def _unnumbered_slice(data, cut):
    shutil.copy(eye(data) / "2.bmp", eye(data) / "top.bmp")
    return ["10002", eye(data), "top.bmp"]


def _mixed_sizes(data, cut):
    (eye(data) / "4.bmp").write_bytes(encode_bmp8(np.full((SHAPE[1] + 2, SHAPE[2]), 9, np.uint8)))
    return ["10002", eye(data), "4.bmp is 10×18"]


def _no_slices(data, cut):
    for f in eye(data).iterdir():
        f.unlink()
    (eye(data) / "notes.txt").write_text("scan failed\n")
    return ["10002", eye(data), "no slice images (only notes.txt)"]


def _oct_octa_count_mismatch(data, cut):
    (eye(data, modality="OCT") / f"{SHAPE[0]}.bmp").unlink()  # the last B-scan: no gap in the numbering
    return ["10002", f"the OCT and OCTA scans differ: 7 slices of 10×16 in {eye(data, modality='OCT')} and 8 slices "
                     f"of 10×16 in {eye(data)}"]


def _missing_modality_folder(data, cut):
    shutil.rmtree(eye(data, modality="OCT"))
    return ["10002 (no OCT)", data]


OCTA500_CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "truncated BMP": (_truncated_bmp, ()),
    "zero-byte BMP": (_zero_byte_bmp, ()),
    "missing slice": (_missing_slice, ()),
    "duplicate slice number": (_duplicate_slice, ()),
    "slice without a number": (_unnumbered_slice, ()),
    "mixed slice sizes": (_mixed_sizes, ()),
    "no slice images": (_no_slices, ()),
    "OCT/OCTA slice count mismatch": (_oct_octa_count_mismatch, ("--modality", "OCT+OCTA")),
    "missing OCT folder": (_missing_modality_folder, ("--modality", "OCT+OCTA")),
}


@pytest.mark.parametrize("case", list(OCTA500_CASES))
def test_octa500_slice_folder_errors_name_subject_and_file(case, data, run_cli, cut):
    damage, extra = OCTA500_CASES[case]
    names = damage(data, cut)
    res = run_cli(prepare(data, "--source", "octa500", *extra), subprocess=case in ("truncated BMP", "missing slice"))
    check(res, *names)
    assert not (data.parent / "runs").exists()  # refused before the experiment folder is made


def test_every_broken_eye_is_listed_and_a_long_list_is_capped(run_cli, cut, tmp_path):
    data = tmp_path / "many"
    generate(data, 25, (8, 8, 8), seed=1, classes=("NORMAL", "DR"))
    for i in range(25):
        cut(eye(data, str(10001 + i)) / "2.bmp", 50)
    res = run_cli(prepare(data, "--source", "octa500"))
    check(res, "25 subject(s)", "10001", eye(data, "10001"), "2.bmp", "… and 5 more (full list in ")
    saved = next(tmp_path.glob("octa3d-error-*.txt"))  # no experiment folder yet: the current folder
    assert f"(full list in {saved})" in res.err and str(eye(data, "10025")) in saved.read_text(encoding="utf-8")
    assert str(eye(data, "10025")) not in res.err


@pytest.mark.parametrize("what", ["file", "folder"])
def test_unreadable_slice_file_or_folder_names_it(what, data, run_cli, monkeypatch, request):
    target = eye(data) / "3.bmp" if what == "file" else eye(data)
    if os.geteuid() == 0:  # chmod 000 does not stop root: refuse the access as the file system would
        name = "open" if what == "file" else "scandir"
        real = getattr(os, name)

        def refuse(path, *args, **kwargs):
            if Path(path) == target:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refuse)
    else:
        target.chmod(0)
        request.addfinalizer(lambda: target.chmod(0o755))
    expected = "3.bmp: unreadable (Permission denied)" if what == "file" else "cannot list the folder (Permission"
    check(run_cli(prepare(data, "--source", "octa500")), "10002", eye(data), expected)


# ----------------------------------------------------------------------------------------- label tables (prepare)
def _no_label_table(data):
    (data / LABELS).unlink()
    return [data / LABELS, "--labels"]


def _no_disease_column(data):
    _write_labels(_labels(data).drop(columns=["Disease"]), data / LABELS)
    return [data / LABELS, "no ID and Disease columns", "columns: ID, Gender, Age, OS/OD"]


def _unknown_disease(data):
    _write_labels(_labels(data).replace({"Disease": {"DR": "DIABETIC"}}), data / LABELS)
    return [data / LABELS, "DIABETIC", "10002, 10004"]


def _one_id_two_diseases(data):
    t = _labels(data)
    _write_labels(pd.concat([t, t.iloc[[1]].assign(Disease="AMD")]), data / LABELS)
    return [data / LABELS, "10002: AMD vs DR"]


def _two_tables_disagree(data):
    """No table in the root: one per field-of-view folder, merged; they disagree about 10002."""
    (data / "OCTA_3mm").mkdir()
    _write_labels(_labels(data).replace({"Disease": {"DR": "CNV"}}), data / "OCTA_3mm" / LABELS)
    (data / LABELS).rename(data / "OCTA_6mm" / LABELS)
    return [data / "OCTA_6mm" / LABELS, data / "OCTA_3mm" / LABELS, "ID 10002"]


def _damaged_xlsx(data):
    (data / LABELS).write_bytes(b"PK\x03\x04 not really a workbook")
    return [data / LABELS, "not a valid .xlsx file"]


def _image_without_label(data):
    _write_labels(_labels(data).iloc[[0, 1, 3]], data / LABELS)
    return [data / LABELS, "1 image(s) without a label: 10003"]


def _label_without_image(data):
    t = _labels(data)
    _write_labels(pd.concat([t, t.iloc[[0]].assign(ID="10099")]), data / LABELS)
    return [data / LABELS, "1 label(s) without an image: 10099"]


def _labels_flag_missing_file(data):
    return [data / "labels.xlsx", "file not found"]


def _labels_flag_xls(data):
    (data / "labels.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    return [data / "labels.xls", ".xls format is not supported"]


def _labels_flag_json(data):
    (data / "labels.json").write_text("{}")
    return [data / "labels.json", "unsupported type '.json'"]


LABEL_CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "no Text labels.xlsx": (_no_label_table, ()),
    "no Disease column": (_no_disease_column, ()),
    "unknown disease": (_unknown_disease, ()),
    "one ID with two diseases": (_one_id_two_diseases, ()),
    "two label tables disagree": (_two_tables_disagree, ()),
    "damaged xlsx": (_damaged_xlsx, ()),
    "image without a label": (_image_without_label, ()),
    "label without an image": (_label_without_image, ()),
    "--labels file missing": (_labels_flag_missing_file, ("--labels", "{data}/labels.xlsx")),
    "--labels .xls": (_labels_flag_xls, ("--labels", "{data}/labels.xls")),
    "--labels .json": (_labels_flag_json, ("--labels", "{data}/labels.json")),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_label_table_errors_name_the_table_and_the_ids(case, data, run_cli):
    damage, extra = LABEL_CASES[case]
    names = damage(data)
    argv = prepare(data, "--source", "octa500", *(a.format(data=data) for a in extra))
    check(run_cli(argv, subprocess=case == "no Text labels.xlsx"), *names)


# ------------------------------------------------------------------------------------------ manifests (prepare)
def write_manifest(data: Path, first: str | None = None, **columns: list[str]) -> Path:
    """``data/manifest.csv`` of the 4 eyes (10001 in train, 10003 in val, the others in test), their NIfTI volumes;
    ``first`` replaces the path of 10001, ``columns`` add or replace columns."""
    ids = ["10001", "10002", "10003", "10004"]
    frame = pd.DataFrame({"subject": ids, "label": ["NORMAL", "DR", "NORMAL", "DR"],
                          "path": [f"volumes/{i}_octa.nii.gz" for i in ids],
                          "split": ["train", "train", "val", "test"]})
    if first is not None:
        frame.loc[0, "path"] = first
    for name, values in columns.items():
        frame[name] = values
    frame.to_csv(data / "manifest.csv", index=False)
    return data / "manifest.csv"


def _manifest_missing_file(data):
    write_manifest(data, "volumes/gone.nii.gz")
    return [data / "manifest.csv", "10001 (volumes/gone.nii.gz)"]


def _manifest_unsupported_file(data):
    (data / "volumes" / "10001.txt").write_text("not a scan")
    write_manifest(data, "volumes/10001.txt")
    return [data / "manifest.csv", "subject 10001", "10001.txt"]


def _manifest_missing_mask(data):
    write_manifest(data, mask=["masks/10001.nii.gz", "", "", ""])
    return [data / "manifest.csv", "subject 10001", data / "masks" / "10001.nii.gz"]


def _manifest_bad_split(data):
    write_manifest(data, split=["holdout", "train", "val", "test"])
    return [data / "manifest.csv", "subject 10001", "'holdout'"]


def _manifest_duplicate_id(data):
    write_manifest(data, subject=["10001", "10001", "10003", "10004"])
    return [data, "duplicate subject IDs: 10001"]


def _manifest_empty_id(data):
    write_manifest(data, subject=["10001", " ", "10003", "10004"])
    return [data / "manifest.csv", "row 3 has an empty subject ID"]


def _manifest_no_path_column(data):
    write_manifest(data)
    pd.read_csv(data / "manifest.csv").rename(columns={"path": "where"}).to_csv(data / "manifest.csv", index=False)
    return [data / "manifest.csv", "no path column", "columns: subject, label, where, split"]


def _manifest_unparsable(data):
    (data / "manifest.csv").write_text('subject,label,path\n10001,NORMAL,"volumes/10001_octa.nii.gz\n')
    return [data / "manifest.csv", "cannot read manifest"]


MANIFEST_CASES: dict[str, Callable] = {
    "file does not exist": _manifest_missing_file,
    "unsupported file type": _manifest_unsupported_file,
    "mask does not exist": _manifest_missing_mask,
    "bad split": _manifest_bad_split,
    "duplicate subject ID": _manifest_duplicate_id,
    "empty subject ID": _manifest_empty_id,
    "no path column": _manifest_no_path_column,
    "unparsable manifest": _manifest_unparsable,
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_errors_name_the_manifest_and_the_subject(case, data, run_cli):
    names = MANIFEST_CASES[case](data)
    check(run_cli(prepare(data)), *names)


# ------------------------------------------------------------------- readers (ae_pretrain reads the training scans)
def _volume(data: Path) -> sitk.Image:
    return sitk.ReadImage(str(data / "volumes" / "10001_octa.nii.gz"))


def _as(data: Path, name: str, image: sitk.Image | None = None) -> Path:
    """10001's volume saved as ``volumes/<name>`` (the format from the extension)."""
    path = data / "volumes" / name
    sitk.WriteImage(image if image is not None else _volume(data), str(path))
    return path


def _slices(data: Path, ext: str) -> Path:
    """10001's volume as a folder of numbered 2D slices ``1<ext>`` … ``8<ext>``."""
    folder = data / "volumes" / f"10001_{ext[1:]}"
    folder.mkdir()
    arr = sitk.GetArrayFromImage(_volume(data))
    for i, sl in enumerate(arr, 1):
        sitk.WriteImage(sitk.GetImageFromArray(sl), str(folder / f"{i}{ext}"))
    return folder


def _nii_gz_truncated(data, cut):
    return cut(data / "volumes" / "10001_octa.nii.gz", -200), "truncated"


def _nii_gz_zero_bytes(data, cut):
    return cut(data / "volumes" / "10001_octa.nii.gz", 0), "cannot read image"


def _nii_truncated(data, cut):
    return cut(_as(data, "10001.nii"), -200), "truncated"


def _tiff_truncated(data, cut):
    return cut(_as(data, "10001.tif"), -100), "truncated"


def _tiff_zero_bytes(data, cut):
    return cut(_as(data, "10001.tif"), 0), "cannot read image"


def _npy_truncated(data, cut):
    np.save(data / "volumes" / "10001.npy", sitk.GetArrayFromImage(_volume(data)))
    return cut(data / "volumes" / "10001.npy", -50), "truncated"


def _png_slice_truncated(data, cut):
    return cut(_slices(data, ".png") / "3.png", -30), "3.png"


def _png_slice_zero_bytes(data, cut):
    return cut(_slices(data, ".png") / "3.png", 0), "3.png"


def _bmp_slice_truncated(data, cut):
    folder = eye(data, "10001")
    return cut(folder / "3.bmp", 600), "3.bmp is truncated"


def _slice_missing(data, cut):
    folder = _slices(data, ".png")
    (folder / "5.png").unlink()
    return folder, "missing 5"


def _slice_duplicate(data, cut):
    folder = _slices(data, ".png")
    shutil.copy(folder / "2.png", folder / "02.png")
    return folder, "02.png and 2.png"


def _slice_sizes_differ(data, cut):
    folder = _slices(data, ".png")
    sitk.WriteImage(sitk.GetImageFromArray(np.full((SHAPE[1] + 2, SHAPE[2]), 9, np.uint8)), str(folder / "4.png"))
    return folder, "4.png is 10×18"


def _empty_folder(data, cut):
    (data / "volumes" / "10001_empty").mkdir()
    return data / "volumes" / "10001_empty", "empty folder"


def _four_d(data, cut):
    arr = sitk.GetArrayFromImage(_volume(data))
    return _as(data, "10001_4d.nii.gz", sitk.GetImageFromArray(np.stack([arr, arr]), isVector=False)), "4D image"


def _constant(data, cut):
    return _as(data, "10001_blank.nii.gz", sitk.GetImageFromArray(np.zeros(SHAPE, np.uint8))), "constant"


def _two_d_image(data, cut):
    arr = sitk.GetArrayFromImage(_volume(data))
    return _as(data, "10001.png", sitk.GetImageFromArray(arr[0])), "is a 2D image of 16×10 pixels, not a 3D scan"


def _too_large(data, cut):
    big = np.add.outer(np.arange(SHAPE[0]), np.arange(100 * 100).reshape(100, 100)).astype(np.uint8)
    return _as(data, "10001_big.nii.gz", sitk.GetImageFromArray(big)), "80,000 voxels, more than --max-voxels 70,000"


def _nan_values(data, cut):
    arr = sitk.GetArrayFromImage(_volume(data)).astype(np.float32)
    arr[0, 0, :3] = np.nan
    np.save(data / "volumes" / "10001_nan.npy", arr)
    return data / "volumes" / "10001_nan.npy", "contains 3 NaN and 0 inf values"


def _pixel_types_differ(data, cut):
    folder = _slices(data, ".png")
    sl = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "6.png"))).astype(np.uint16) * 200
    sitk.WriteImage(sitk.GetImageFromArray(sl), str(folder / "6.png"))
    return folder, "6.png has pixel type 16-bit unsigned integer"


def _no_images_in_folder(data, cut):
    folder = data / "volumes" / "10001_notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("exported elsewhere\n")
    return folder, "no 2D slices (.bmp/.png/.tif/.jpg) and no DICOM series found (files: notes.txt)"


def _npy_wrong_shape(data, cut):
    np.save(data / "volumes" / "10001.npy", np.ones((2, *SHAPE), np.uint8))
    return data / "volumes" / "10001.npy", "array of shape (2, 8, 16, 10)"


def _dicom_orphan(data, cut, dicom_series):
    folder = dicom_series(data / "volumes" / "10001_dicom", sitk.GetArrayFromImage(_volume(data)))
    cut(folder / "3.dcm", -300)
    return folder, "3.dcm belong(s) to no readable series"


def _angio_vol(data: Path, name: str = "10001_Angio.vol", **kw) -> Path:
    """10001's OCTA volume as a HEYEX angiography export (the OCTA channel of a Heidelberg scan)."""
    from octa3d.data.synthetic.vendor_files import write_heyex_vol

    arr = sitk.GetArrayFromImage(_volume(data)) / 255.0
    return write_heyex_vol(data / "volumes" / name, arr, angio=True, **kw)


def _vol_truncated(data, cut):
    return cut(_angio_vol(data), -300), "is truncated or damaged"


def _vol_not_heyex(data, cut):
    path = data / "volumes" / "10001_Angio.vol"
    path.write_bytes(b"#VOL raw volume from another program\n" + bytes(4000))
    return path, "is named like a Heidelberg HEYEX angiography .vol but does not start like one"


def _vol_circle_scan(data, cut):
    return _angio_vol(data, scan_pattern=2), "a circle scan (HEYEX scan pattern 2) is not a volume"


def _vendor_unsupported(data, cut):
    path = data / "volumes" / "10001.fds"
    path.write_bytes(bytes(64))
    return path, "Topcon .fds files are not supported; octa3d reads Heidelberg HEYEX .vol"


READER_CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "truncated NIfTI (.nii.gz)": (_nii_gz_truncated, ()),
    "zero-byte NIfTI": (_nii_gz_zero_bytes, ()),
    "truncated NIfTI (.nii)": (_nii_truncated, ()),
    "truncated TIFF": (_tiff_truncated, ()),
    "zero-byte TIFF": (_tiff_zero_bytes, ()),
    "truncated .npy": (_npy_truncated, ()),
    "truncated PNG slice": (_png_slice_truncated, ()),
    "zero-byte PNG slice": (_png_slice_zero_bytes, ()),
    "truncated BMP slice": (_bmp_slice_truncated, ()),
    "missing slice": (_slice_missing, ()),
    "duplicate slice number": (_slice_duplicate, ()),
    "slices of different sizes": (_slice_sizes_differ, ()),
    "empty scan folder": (_empty_folder, ()),
    "4D image": (_four_d, ()),
    "constant scan": (_constant, ()),
    "2D image as a volume": (_two_d_image, ()),
    "header beyond --max-voxels": (_too_large, ("--max-voxels", "70000")),
    "NaN values": (_nan_values, ()),
    "slices of different pixel types": (_pixel_types_differ, ()),
    "no images in a scan folder": (_no_images_in_folder, ()),
    ".npy of the wrong shape": (_npy_wrong_shape, ()),
    "truncated DICOM file": (_dicom_orphan, ()),
    "truncated HEYEX .vol": (_vol_truncated, ()),
    "a .vol that is not a HEYEX export": (_vol_not_heyex, ()),
    "HEYEX circle scan": (_vol_circle_scan, ()),
}


def ae_pretrain(data: Path, *extra: str) -> list[str]:
    return ["--mode", "ae_pretrain", "--data-root", data, "--runs-dir", data.parent / "runs", "--exp", "e",
            "--input-size", "16", "--epochs", "1", "--batch-size", "2", *extra]


@pytest.mark.parametrize("case", list(READER_CASES))
def test_reader_errors_name_subject_and_file(case, data, run_cli, cut, dicom_series):
    """A manifest's scans are read by the first training stage: 10001 (a training subject) is damaged."""
    damage, extra = READER_CASES[case]
    path, reason = damage(data, cut, dicom_series) if damage is _dicom_orphan else damage(data, cut)
    write_manifest(data, str(path))
    ok = run_cli(prepare(data))
    assert ok.rc == 0, ok.err  # discovery does not read the scans
    res = run_cli(ae_pretrain(data, *extra), subprocess=case == "truncated NIfTI (.nii.gz)")
    check(res, "subject 10001", path, reason)


def test_unsupported_vendor_file_in_a_manifest_names_what_is_supported(data, run_cli, cut):
    path, reason = _vendor_unsupported(data, cut)
    write_manifest(data, str(path))
    check(run_cli(prepare(data)), "subject 10001", path, reason)


def test_2d_image_and_projection_map_errors_name_subject_and_file(data, run_cli, cut, tmp_path):
    # 2D class folders with the dataset's own split: the truncated image is a training one
    root = tmp_path / "2d" / "fundus"
    for split, pid in (("train", 1), ("train", 2), ("val", 3), ("test", 4)):
        for cls in ("NORMAL", "DR"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            img = (np.arange(24 * 20).reshape(20, 24) * (pid + 1) % 251).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(img), str(root / split / cls / f"{cls}-{pid}{cls[0]}-1.png"))
    bad = cut(root / "train" / "DR" / "DR-1D-1.png", -40)
    assert run_cli(prepare(root, "--dim", "2d")).rc == 0
    check(run_cli(ae_pretrain(root, "--dim", "2d")), "subject train/DR/DR-1D-1", bad)
    # an OCTA-500 projection map of a training eye
    args = ("--dim", "2d", "--projection", "OCTA(FULL)", "--source", "octa500", "--val-fraction", "0")
    assert run_cli(prepare(data, *args)).rc == 0
    sid = pd.read_csv(data.parent / "runs" / "e" / "splits" / "train.csv", dtype=str)["subject"].iloc[0]
    bad = cut(data / "OCTA_6mm" / "Projection Maps" / "OCTA(FULL)" / f"{sid}.bmp", 300)
    check(run_cli(ae_pretrain(data, *args)), f"subject {sid}", bad)


def test_2d_class_folder_link_to_a_missing_image_names_it(tmp_path, run_cli):
    root = tmp_path / "fundus"
    for cls in ("NORMAL", "DR"):
        (root / cls).mkdir(parents=True)
        for pid in range(3):
            sitk.WriteImage(sitk.GetImageFromArray(np.eye(8, dtype=np.uint8) * (pid + 1)),
                            str(root / cls / f"{cls}-{pid}-1.png"))
    (root / "DR" / "DR-7-1.png").symlink_to(tmp_path / "moved" / "DR-7-1.png")
    check(run_cli(prepare(root, "--dim", "2d")), root, "DR/DR-7-1.png", "no longer exist")


# ------------------------------------------------------------------------------------------ the experiment's splits
@pytest.mark.parametrize("damaged", ["split.json", "train.csv"])
def test_damaged_split_files_are_named(damaged, data, run_cli):
    write_manifest(data)
    assert run_cli(prepare(data)).rc == 0
    bad = data.parent / "runs" / "e" / "splits" / damaged
    bad.write_text('{"class_names": [' if damaged == "split.json" else 'subject,class_index\n"10001,0\n')
    check(run_cli(ae_pretrain(data)), bad, "--mode prepare --overwrite")


# --------------------------------------------------------------------- one scan or folder given with --input (explain)
CHECKPOINT = Path(__file__).resolve().parent / "checkpoint" / "fixtures" / "octa3d-0.1.0" / "classifier_best.pt"


def _input_truncated(data, cut):
    return cut(data / "volumes" / "10002_octa.nii.gz", -200), ["subject 10002_octa", "truncated"]


def _input_missing(data, cut):
    return data / "volumes" / "gone.nii.gz", ["no such file or folder"]


def _input_empty_folder(data, cut):
    (data / "empty").mkdir()
    return data / "empty", ["the folder is empty"]


def _input_no_scans(data, cut):
    (data / "notes").mkdir()
    (data / "notes" / "read me.txt").write_text("x")
    return data / "notes", ["no scans in the folder"]


def _input_same_id(data, cut):
    folder = data / "volumes"
    np.save(folder / "10002_octa.npy", sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "10002_octa.nii.gz"))))
    return folder, ["share the subject ID(s) 10002_octa"]


def _input_truncated_vol(data, cut):
    return cut(_angio_vol(data, "10002_Angio.vol"), -300), ["subject 10002", "truncated or damaged"]


INPUT_CASES: dict[str, tuple[Callable, str]] = {
    "truncated scan": (_input_truncated, "explain"),
    "truncated HEYEX .vol": (_input_truncated_vol, "explain"),
    "no such file": (_input_missing, "explain"),
    "empty folder": (_input_empty_folder, "predict"),
    "folder without scans": (_input_no_scans, "predict"),
    "two files, one subject ID": (_input_same_id, "predict"),
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_input_errors_name_the_input(case, data, run_cli, cut):
    damage, mode = INPUT_CASES[case]
    path, names = damage(data, cut)
    res = run_cli(["--mode", mode, "--input", path, "--checkpoint", CHECKPOINT, "--runs-dir", data.parent / "runs"])
    check(res, path, *names)
    assert not (data.parent / "runs").exists()


def test_damaged_vol_is_named_by_the_command_itself(data, run_cli, cut):
    """``python main.py --mode explain --input <damaged .vol>`` in a process of its own: what a user sees."""
    path, names = _input_truncated_vol(data, cut)
    res = run_cli(["--mode", "explain", "--input", path, "--checkpoint", CHECKPOINT, "--runs-dir",
                   data.parent / "runs"], subprocess=True)
    check(res, path, *names)


def test_synth_never_writes_over_a_dataset(data, run_cli):
    synth = ["--mode", "synth", "--data-root", data, "--n-subjects", "4", "--shape", "8,16,10"]
    check(run_cli(synth), data, "already holds a dataset (OCTA_6mm, Text labels.xlsx", "--overwrite")
    (data / "synthetic.json").unlink()  # as if these were the user's own scans
    check(run_cli([*synth, "--overwrite"]), data, "but no synthetic.json", "refusing to delete it")
