"""Vendor exports read through eyepy (:mod:`octa3d.data.vendor`): eyepy's own HEYEX test files, files written here
in each format with known voxels and spacing, the left-eye orientation and its geometry, the angiography pair, and
every damaged or unsupported file as a DataError naming it."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from octa3d.data.readers import load_subject, read_image_2d, read_volume
from octa3d.data.subject import Subject
from octa3d.data.vendor import read_vendor, scan_info, scan_paths, sniff, vendor_format, vendor_subject
from octa3d.errors import DataError

SPACING = (0.0114, 0.0039, 0.12)  # SimpleITK order: A-scan, depth, B-scan distance (mm)


# ------------------------------------------------------------------------------------------ eyepy's HEYEX files
def test_eyepy_heyex_vol_and_xml_fixtures_read_with_their_header_geometry(eyepy_fixtures):
    for path in (eyepy_fixtures / "test_volume.vol", eyepy_fixtures / "heyex_xml" / "test_volume"):
        arr, geo = read_volume(path)
        assert arr.shape == (10, 40, 50) and arr.dtype == np.uint8 and arr.max() > arr.min()
        assert np.allclose(geo.spacing, (0.011819, 0.003872, 0.031444), atol=1e-6)
        assert geo.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # a right eye: as stored
    s = vendor_subject(eyepy_fixtures / "heyex_xml" / "test_volume" / "test_dummy.xml")
    assert s.id == "test_dummy" and s.paths == {"OCT": str(eyepy_fixtures / "heyex_xml" / "test_volume" /
                                                             "test_dummy.xml")}
    info = s.meta["scan"]
    assert info["format"] == "heyex-xml" and info["laterality"] == "OD" and info["shape"] == [10, 40, 50]
    assert info["patient_group"].startswith("patient-") and "Study-01" not in str(info)  # a pseudonym, not the ID


# ------------------------------------------------------------------------------------------ files written here
def test_written_vol_round_trips_voxels_spacing_and_header(tmp_path, vendor_export):
    vol = vendor_export.volume()
    path = vendor_export.vol(tmp_path / "e1.vol", vol, SPACING, "OD", patient_id="P-7")
    assert vendor_format(path) == "heyex-vol" and sniff(path) == "heyex-vol"
    scan = read_vendor(path)
    assert scan.array.dtype == np.uint8 and np.array_equal(scan.array, vol)  # eyepy's vol intensities: exact
    assert scan.geometry.spacing == SPACING and scan.geometry.origin == (0.0, 0.0, 0.0)
    assert scan.info["laterality"] == "OD" and scan.info["orientation"] == "as stored"
    assert scan.info["scan_pattern"] == "volume (ART)" and scan.info["device"] == "Heidelberg Spectralis"
    head = scan_info(path)  # discovery: the header only
    assert head["shape"] == [6, 40, 24] and head["spacing_mm"] == list(SPACING) and head["laterality"] == "OD"
    assert head["patient_group"] == scan_info(vendor_export.vol(tmp_path / "e2.vol", vol, patient_id="P-7")
                                              )["patient_group"] != ""  # one patient, one group


def test_left_eye_is_mirrored_to_a_right_eye_and_keeps_its_physical_positions(tmp_path, vendor_export):
    vol = vendor_export.volume()
    left = read_vendor(vendor_export.vol(tmp_path / "os.vol", vol, SPACING, "OS"))
    assert np.array_equal(left.array, vol[:, :, ::-1])
    assert left.info["laterality"] == "OS" and "mirrored" in left.info["orientation"]
    # every voxel keeps its physical position: the mirrored array in its geometry is the stored scan
    img = left.geometry.to_sitk(left.array)
    stored = read_vendor(vendor_export.vol(tmp_path / "od.vol", vol, SPACING, "OD"))
    ref = stored.geometry.to_sitk(stored.array)
    for idx in [(0, 0, 0), (23, 5, 2), (7, 39, 5)]:  # (x=A-scan, y=depth, z=B-scan)
        mirrored = (23 - idx[0], idx[1], idx[2])
        assert np.allclose(img.TransformIndexToPhysicalPoint(mirrored), ref.TransformIndexToPhysicalPoint(idx))
        assert img[mirrored] == ref[idx]


def test_angiography_export_is_the_octa_channel_of_its_structural_scan(tmp_path, vendor_export):
    vol = vendor_export.volume()
    flow = np.random.default_rng(1).random(vol.shape).astype(np.float32)
    oct_path = vendor_export.vol(tmp_path / "exam.vol", vol, SPACING, "OS")
    angio = vendor_export.vol(tmp_path / "exam_Angio.vol", flow, SPACING, "OS", angio=True)
    assert vendor_format(angio) == "heyex-angio-vol"
    assert scan_paths(oct_path) == scan_paths(angio) == {"OCT": str(oct_path), "OCTA": str(angio)}
    s = vendor_subject(angio)
    assert s.id == "exam"
    arr, geo = load_subject(s, "OCT+OCTA")
    assert arr.shape == (2, *vol.shape) and arr.dtype == np.float32
    assert np.array_equal(arr[0], vol[:, :, ::-1]) and np.allclose(arr[1], flow[:, :, ::-1])
    assert geo.direction[0] == -1.0 and s.meta["scan"]["files"] == {"OCT": str(oct_path), "OCTA": str(angio)}
    # a bare Angio.vol pairs with the folder's one structural .vol
    (tmp_path / "b").mkdir()
    bare = vendor_export.vol(tmp_path / "b" / "Angio.vol", flow, SPACING, "OD", angio=True)
    assert scan_paths(bare) == {"OCTA": str(bare)}
    assert vendor_subject(bare).id == "b"
    other = vendor_export.vol(tmp_path / "b" / "scan.vol", vol, SPACING, "OD")
    assert scan_paths(bare) == {"OCT": str(other), "OCTA": str(bare)}


def test_structural_scan_without_angiography_names_the_missing_channel(tmp_path, vendor_export):
    s = vendor_subject(vendor_export.vol(tmp_path / "exam.vol", vendor_export.volume()))
    with pytest.raises(DataError, match=r"subject exam: no OCTA scan \(has: OCT\).*scan_Angio.vol"):
        load_subject(s, "OCTA")


def test_channels_of_different_eyes_are_refused(tmp_path, vendor_export):
    vol = vendor_export.volume()
    vendor_export.vol(tmp_path / "exam.vol", vol, SPACING, "OD")
    angio = vendor_export.vol(tmp_path / "exam_Angio.vol", vol / 255.0, SPACING, "OS", angio=True)
    with pytest.raises(DataError, match=f"{angio} is an OS eye but .* is OD"):
        load_subject(vendor_subject(angio), "OCT+OCTA")


def test_written_heyex_xml_export_reads_its_voxels_spacing_and_laterality(tmp_path, vendor_export):
    vol = vendor_export.volume()
    folder = vendor_export.xml(tmp_path / "export", vol, (0.0118, 0.0039, 0.12), "L")
    assert vendor_format(folder) == "heyex-xml" and vendor_format(folder / "export.xml") == "heyex-xml"
    scan = read_vendor(folder)
    assert np.array_equal(scan.array, vol[:, :, ::-1]) and scan.info["laterality"] == "OS"
    assert np.allclose(scan.geometry.spacing, (0.0118, 0.0039, 0.12))
    assert scan.info["device"] == "Heidelberg Engineering Spectralis"


def test_duke_mat_reads_with_the_dataset_spacing(tmp_path, vendor_export):
    vol = vendor_export.volume()
    path = vendor_export.duke(tmp_path / "Farsiu_Ophthalmology_2013_AMD_Subject_1001.mat", vol)
    scan = read_vendor(path)
    assert np.array_equal(scan.array, vol) and scan.geometry.spacing == (0.0067, 0.0045, 0.067)
    assert scan.info["laterality"] == "unknown" and scan.info["orientation"] == "as stored (laterality unknown)"
    np.savez(tmp_path / "x.npz", a=1)
    import scipy.io as sio

    sio.savemat(str(tmp_path / "other.mat"), {"data": np.ones((2, 2))})
    with pytest.raises(DataError, match=r"other.mat is not a Duke AMD/control .mat file: it holds data variables"):
        read_volume(tmp_path / "other.mat")


def test_single_line_scan_is_a_2d_bscan(tmp_path, vendor_export):
    vol = vendor_export.volume((1, 40, 24))
    path = vendor_export.vol(tmp_path / "line.vol", vol, SPACING, "OD", scan_pattern=1)
    assert np.array_equal(read_image_2d(path), vol[0])
    arr, geo = load_subject(vendor_subject(path), "OCT")  # as a one-slice NIfTI: one 2D channel
    assert arr.shape == (1, 40, 24) and geo.spacing == SPACING[:2]


def test_vendor_file_under_another_name_is_read_by_its_signature(tmp_path, vendor_export):
    vol = vendor_export.volume()
    path = tmp_path / "exam.dat"
    vendor_export.vol(path, vol, SPACING)
    assert np.array_equal(read_volume(path)[0], vol)


def test_e2e_volume_through_eyepy_reader_in_pixel_units(tmp_path, monkeypatch, vendor_export):
    """eyepy's E2E reader (replaced by a stand-in with its API: there is no small public E2E file) gives the first
    volume series; octa3d records that E2E spacing is unknown to eyepy and mirrors a left eye."""
    import eyepy.io.he as he

    vol = vendor_export.volume()

    class Series:
        n_bscans = vol.shape[0]

        def __init__(self, pattern: int) -> None:
            self.pattern = pattern

        def get_meta(self):
            return {"bscan_meta": [{"scan_pattern": self.pattern, "size_x": 24, "size_y": 40}]}

        def get_volume(self):
            return types.SimpleNamespace(data=vol)

        def laterality(self):
            return "OS"

    class Reader:
        def __init__(self, path):
            self.series = [Series(2), Series(3)]  # a circle scan first: skipped, as eyepy does

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(he, "HeE2eReader", Reader)
    path = tmp_path / "exam.E2E"
    path.write_bytes(b"CMDb" + bytes(60))
    scan = read_vendor(path)
    assert np.array_equal(scan.array, vol[:, :, ::-1]) and scan.geometry.spacing == (1.0, 1.0, 1.0)
    assert scan.info["spacing_mm"] is None and "unit spacing" in scan.info["notes"][0]
    assert "series 2 of 2" in scan.info["notes"][1] and scan.info["scan_pattern"] == "volume (ART)"


def test_topcon_fda_needs_oct_converter_and_goes_through_eyepy(tmp_path, monkeypatch, vendor_export):
    path = tmp_path / "exam.fda"
    path.write_bytes(b"FOCT\x00FDA" + bytes(64))
    monkeypatch.setitem(sys.modules, "oct_converter", None)  # not installed (as in octa3d's own install)
    with pytest.raises(DataError, match=r"exam.fda: reading Topcon .fda files needs oct-converter.*--no-deps"):
        read_volume(path)
    # with oct-converter present, eyepy's own import_topcon_fda converts what oct-converter returns
    vol = vendor_export.volume()

    class FDA:
        def __init__(self, path, printing=False):
            pass

        def read_oct_volume(self):
            meta = {"param_scan_04": {"x_dimension_mm": 6.0, "y_dimension_mm": 6.0, "z_resolution_um": 2.6},
                    "regist_info": {"bounding_box_in_fundus_pixels": [10, 10, 110, 110]}}
            return types.SimpleNamespace(volume=list(vol), contours=None, metadata=meta)

        def read_fundus_image(self):
            return types.SimpleNamespace(image=np.zeros((128, 128), np.uint8))

    readers = types.ModuleType("oct_converter.readers")
    readers.FDA = FDA
    package = types.ModuleType("oct_converter")
    package.readers = readers
    monkeypatch.setitem(sys.modules, "oct_converter", package)
    monkeypatch.setitem(sys.modules, "oct_converter.readers", readers)
    scan = read_vendor(path)
    assert np.array_equal(scan.array, vol) and scan.info["format"] == "topcon-fda"
    assert np.allclose(scan.geometry.spacing, (6.0 / 23, 0.0026, 6.0 / 5))


# ------------------------------------------------------------------------------------------ damaged and unsupported
def _vol(tmp_path: Path, vendor_export, name: str = "exam.vol", **kw) -> Path:
    return vendor_export.vol(tmp_path / name, vendor_export.volume(), SPACING, **kw)


def test_damaged_vendor_files_are_data_errors_naming_the_file(tmp_path, vendor_export, cut):
    cases = {
        "truncated": (cut(_vol(tmp_path, vendor_export, "a.vol"), -5000), "is truncated or damaged"),
        "garbage": (tmp_path / "b.vol", "is named like a Heidelberg HEYEX .vol but does not start like one"),
        "empty": (tmp_path / "c.vol", "is named like a Heidelberg HEYEX .vol but is empty"),
        "circle": (_vol(tmp_path, vendor_export, "d.vol", scan_pattern=2), "a circle scan .* is not a volume"),
        "e2e garbage": (tmp_path / "e.e2e", "cannot read .* as a Heidelberg HEYEX .e2e"),
        "xml broken": (tmp_path / "f", "cannot read .* as a Heidelberg HEYEX XML export"),
        "xml B-scan missing": (tmp_path / "g", "cannot read .* as a Heidelberg HEYEX XML export"),
        "mat garbage": (tmp_path / "h.mat", "cannot read .* as a Duke AMD/control .mat"),
    }
    (tmp_path / "b.vol").write_bytes(b"not a HEYEX file at all" * 100)
    (tmp_path / "c.vol").write_bytes(b"")
    (tmp_path / "e.e2e").write_bytes(b"CMDb" + bytes(100))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.xml").write_text("<?xml version='1.0'?><HEDX><BODY><Patient>", encoding="utf-8")
    vendor_export.xml(tmp_path / "g", vendor_export.volume())
    (tmp_path / "g" / "B3.tif").unlink()
    (tmp_path / "h.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(40))
    for case, (path, reason) in cases.items():
        with pytest.raises(DataError, match=reason) as err:
            read_volume(path)
        assert str(path) in str(err.value), case
        subject = Subject(id="s1", label=None, paths={"OCT": str(path)})
        with pytest.raises(DataError, match=f"subject s1: .*{reason}"):
            load_subject(subject, "OCT")


def test_header_beyond_max_voxels_is_refused_before_reading(tmp_path, vendor_export):
    path = _vol(tmp_path, vendor_export)
    with pytest.raises(DataError, match=r"6×40×24|24×40×6"):
        read_volume(path, max_voxels=1000)


def test_unsupported_vendor_files_name_what_is_supported(tmp_path):
    for name, what in (("scan.img", "Zeiss Cirrus .img"), ("scan.fds", "Topcon .fds")):
        (tmp_path / name).write_bytes(b"\x00" * 64)
        with pytest.raises(DataError, match=f"{what} files are not supported; octa3d reads Heidelberg HEYEX .vol"):
            read_volume(tmp_path / name)


def test_retouch_case_reads_with_simpleitk_and_its_reference_is_the_mask(tmp_path, vendor_export):
    vol = vendor_export.volume()
    case = vendor_export.retouch(tmp_path / "RETOUCH-TrainingSet-Topcon" / "TRAIN049", vol)
    s = vendor_subject(case)
    assert s.id == "TRAIN049" and s.paths == {"OCT": str(case / "oct.mhd")}
    assert s.mask == str(case / "reference.mhd") and s.meta["scan"]["device"] == "Topcon T-1000/T-2000"
    arr, geo = load_subject(s, "OCT")
    assert np.array_equal(arr[0], vol) and np.allclose(geo.spacing, (0.0117, 0.002, 0.047))
    assert sitk.ReadImage(s.mask).GetSize() == (24, 40, 6)


def test_lesion_mask_of_a_mirrored_scan_is_mirrored_with_it(tmp_path, vendor_export):
    from octa3d.cam.sources import read_mask
    from octa3d.data.transforms import PreprocessRecord

    vol = vendor_export.volume()
    mask = np.zeros(vol.shape, np.uint8)
    mask[2, 10:14, 0:3] = 1  # at the first A-scans of the scan as stored
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "mask.nii.gz"))
    s = vendor_subject(vendor_export.vol(tmp_path / "os.vol", vol, SPACING, "OS"), mask=str(tmp_path / "mask.nii.gz"))
    arr, geo = load_subject(s, "OCT")
    record = PreprocessRecord(source=geo.to_dict(), crop_box=[(0, n) for n in geo.shape], cropped_shape=geo.shape,
                              input_shape=(4, 4, 4), meta={"scan": s.meta["scan"]})
    assert np.array_equal(read_mask(s, record), mask[:, :, ::-1])  # lies on the mirrored array, as the scan does
