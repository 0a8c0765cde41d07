"""Readers: every format, numeric slice order, colour conversion, and each DataError (tiny generated files)."""

from __future__ import annotations

import locale
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from octa3d.data.readers import load_subject, read_image_2d, read_volume, slice_number
from octa3d.data.subject import Subject
from octa3d.errors import DataError

H, W = 16, 24  # every test image is 16 rows x 24 columns


def ramp(value: int = 0, dtype=np.uint8) -> np.ndarray:
    """A non-constant (H, W) image whose first pixel is ``value``."""
    return (value + np.arange(H * W).reshape(H, W) % 7).astype(dtype)


def write_2d(path: Path, arr: np.ndarray, vector: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=vector), str(path))
    return path


def write_palette_bmp(path: Path, index: np.ndarray, palette: list[tuple[int, int, int]]) -> Path:
    """An 8-bit indexed BMP (BITMAPINFOHEADER, 256-entry colour table), as OCTA-500 ships its B-scans."""
    h, w = index.shape
    row_bytes = (w + 3) // 4 * 4  # rows are padded to 4 bytes
    pixels = b"".join(bytes(index[y].astype(np.uint8)) + b"\0" * (row_bytes - w) for y in range(h - 1, -1, -1))
    table = b"".join(struct.pack("<BBBB", b, g, r, 0) for r, g, b in palette)  # BGRx entries
    offset = 14 + 40 + len(table)
    header = struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 0, len(pixels), 2835, 2835, 256, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + info + table + pixels)
    return path


def write_slices(folder: Path, numbers, fmt: str = "{}.bmp") -> Path:
    """Slices whose first pixel is 10 * their number."""
    for n in numbers:
        write_2d(folder / fmt.format(n), ramp(10 * n))
    return folder


def write_dicom_series(folder: Path, vol: np.ndarray, spacing=(0.5, 0.5, 2.0)) -> Path:
    # GDCM's writer resets the process locale to "C" (ASCII): later tests that decode subprocess output as text
    # (torchrun, torch.compile's compiler calls) would fail depending on test order
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(folder, vol, spacing)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(folder: Path, vol: np.ndarray, spacing) -> Path:
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(spacing)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # the file names below have no extension to guess the format from
    uid = f"1.2.826.0.1.3680043.2.1125.{int(time.time() * 1000)}"
    folder.mkdir(parents=True)
    for i in range(vol.shape[0]):
        s = img[:, :, i]
        for tag, value in {"0020|000e": uid + ".1", "0020|000d": uid + ".2", "0008|0060": "OT",
                           "0020|0013": str(i + 1), "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.5\\0.5",
                           "0020|0032": "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, i))))}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{i:04d}"))  # DICOM files often have no extension
        writer.Execute(s)
    return folder


# ------------------------------------------------------------------------------------------- slice folders
def test_slice_number():
    assert [slice_number(n) for n in ("1.bmp", "slice_001.png", "scan2_slice_010.tif", "top.png")] == \
        [1, 1, 10, None]


def test_slice_folder_numeric_order(tmp_path):
    folder = write_slices(tmp_path / "scan", range(1, 13))  # lexical order would put 10, 11, 12 after 1
    arr, geo = read_volume(folder)
    assert arr.shape == (12, H, W) and arr.dtype == np.uint8
    assert [int(arr[k, 0, 0]) for k in range(12)] == [10 * n for n in range(1, 13)]
    assert geo.shape == (12, H, W) and len(geo.spacing) == 3


def test_slice_folder_padded_names_and_spacing_override(tmp_path):
    folder = write_slices(tmp_path / "scan", range(0, 10), fmt="slice_{:03d}.png")
    arr, geo = read_volume(folder, spacing=(0.25, 0.125, 0.5))
    assert [int(arr[k, 0, 0]) for k in range(10)] == [10 * n for n in range(10)]
    assert geo.spacing == (0.25, 0.125, 0.5)
    assert geo.to_sitk(arr).GetSpacing() == (0.25, 0.125, 0.5)


def test_palette_bmp_reads_as_grayscale(tmp_path):
    # Palette index i shows gray 255 - i: reading the raw indices would be wrong.
    palette = [(255 - i, 255 - i, 255 - i) for i in range(256)]
    index = (np.arange(H * W).reshape(H, W) % 200).astype(np.uint8)
    for n in (1, 2, 3):
        write_palette_bmp(tmp_path / "scan" / f"{n}.bmp", (index + n).astype(np.uint8), palette)
    arr, _ = read_volume(tmp_path / "scan")
    assert arr.shape == (3, H, W) and arr.dtype == np.uint8
    for k, n in enumerate((1, 2, 3)):
        np.testing.assert_array_equal(arr[k], 255 - (index + n))
    img = read_image_2d(tmp_path / "scan" / "1.bmp")
    assert img.shape == (H, W) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, 255 - (index + 1))


def test_rgb_bmp_becomes_luminance(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[0, 0] = (10, 10, 10)
    for n in (1, 2):
        write_2d(tmp_path / "scan" / f"{n}.bmp", rgb, vector=True)
    img = read_image_2d(tmp_path / "scan" / "1.bmp")
    assert img.shape == (H, W) and img.dtype == np.uint8
    # ITK's Rec. 709 luminance: 0.2125 R + 0.7154 G + 0.0721 B
    assert abs(int(img[1, 1]) - (0.2125 * 200 + 0.7154 * 100 + 0.0721 * 50)) <= 1 and img[0, 0] == 10
    vol, _ = read_volume(tmp_path / "scan")
    assert vol.shape == (2, H, W) and vol.dtype == np.uint8


def test_image_2d_formats(tmp_path):
    img16 = (np.arange(H * W).reshape(H, W) * 100).astype(np.uint16)
    out = read_image_2d(write_2d(tmp_path / "a16.png", img16))
    assert out.dtype == np.uint16 and np.array_equal(out, img16)
    gray_alpha = np.stack([np.full((H, W), 77, np.uint8), np.full((H, W), 255, np.uint8)], -1)
    assert np.all(read_image_2d(write_2d(tmp_path / "ga.png", gray_alpha, vector=True)) == 77)  # Pillow fallback
    np.save(tmp_path / "a.npy", ramp(3, np.float32))
    assert read_image_2d(tmp_path / "a.npy").dtype == np.float32
    assert read_image_2d(write_2d(tmp_path / "a.jpg", ramp(100))).shape == (H, W)


# ------------------------------------------------------------------------------------------- volume files
@pytest.mark.parametrize("name,dtype", [("v.nii.gz", np.int16), ("v.nii", np.float32), ("v.nrrd", np.uint8),
                                        ("v.mha", np.uint16), ("v.mhd", np.float32)])
def test_volume_files_keep_dtype_and_spacing(tmp_path, name, dtype):
    vol = np.random.default_rng(0).integers(0, 200, (5, H, W)).astype(dtype)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.5, 0.25, 2.0))
    sitk.WriteImage(img, str(tmp_path / name))
    arr, geo = read_volume(tmp_path / name)
    assert arr.dtype == dtype and np.array_equal(arr, vol)
    assert geo.shape == (5, H, W) and np.allclose(geo.spacing, (0.5, 0.25, 2.0))


def test_nibabel_nifti(tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(1).integers(0, 255, (W, H, 6)).astype(np.uint8)  # nibabel order (x, y, z)
    nib.save(nib.Nifti1Image(vol, np.diag([0.5, 0.25, 2.0, 1.0])), tmp_path / "n.nii.gz")
    arr, geo = read_volume(tmp_path / "n.nii.gz")
    assert arr.shape == (6, H, W) and arr.dtype == np.uint8
    assert np.array_equal(arr, vol.transpose(2, 1, 0)) and np.allclose(geo.spacing, (0.5, 0.25, 2.0))


def test_npy_default_geometry(tmp_path):
    vol = np.random.default_rng(2).random((4, H, W)).astype(np.float32)
    np.save(tmp_path / "v.npy", vol)
    arr, geo = read_volume(tmp_path / "v.npy")
    assert arr.dtype == np.float32 and np.array_equal(arr, vol)
    assert geo.spacing == (1.0, 1.0, 1.0) and geo.origin == (0.0, 0.0, 0.0)
    assert read_volume(tmp_path / "v.npy", spacing=(1, 2, 3))[1].spacing == (1.0, 2.0, 3.0)


def test_multipage_tiff(tmp_path):
    vol = np.random.default_rng(3).integers(0, 255, (5, H, W)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "stack.tif"))
    arr, _ = read_volume(tmp_path / "stack.tif")
    assert arr.dtype == np.uint8 and np.array_equal(arr, vol)


def test_dicom_series(tmp_path):
    vol = (np.arange(6 * H * W).reshape(6, H, W) % 1000).astype(np.int16)
    arr, geo = read_volume(write_dicom_series(tmp_path / "dicom", vol))
    assert arr.dtype == np.int16 and np.array_equal(arr, vol)
    assert np.allclose(geo.spacing, (0.5, 0.5, 2.0))


# ------------------------------------------------------------------------------------------- errors
def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="nope.*no such file"):
        read_volume(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder .*empty"):
        read_volume(tmp_path / "empty")


def test_missing_slice_numbers(tmp_path):
    folder = write_slices(tmp_path / "scan", [1, 2, 3, 5, 6, 8])
    with pytest.raises(DataError, match=r"scan.*missing 4, 7"):
        read_volume(folder)


def test_duplicate_slice_numbers(tmp_path):
    folder = write_slices(tmp_path / "scan", [1, 2, 3])
    write_2d(folder / "003.bmp", ramp())
    with pytest.raises(DataError, match=r"duplicate slice numbers: 003\.bmp and 3\.bmp"):
        read_volume(folder)


def test_slices_of_different_sizes(tmp_path):
    folder = write_slices(tmp_path / "scan", [1, 2, 3])
    write_2d(folder / "2.bmp", np.zeros((H, W + 6), np.uint8))
    with pytest.raises(DataError, match=r"2\.bmp is 30×16 but 1\.bmp is 24×16"):
        read_volume(folder)


def test_corrupt_files_are_named(tmp_path):
    folder = write_slices(tmp_path / "scan", [1, 2, 3])
    (folder / "2.bmp").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*2\.bmp"):
        read_volume(folder)
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.nii\.gz"):
        read_volume(tmp_path / "bad.nii.gz")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.png"):
        read_image_2d(tmp_path / "bad.png")


def test_unsupported_and_wrong_dimension(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        read_volume(tmp_path / "notes.txt")
    write_2d(tmp_path / "one.tif", ramp())
    with pytest.raises(DataError, match=r"one\.tif is a 2D image"):
        read_volume(tmp_path / "one.tif")
    np.save(tmp_path / "v.npy", ramp()[None].repeat(3, 0))
    with pytest.raises(DataError, match=r"v\.npy is a 3D volume"):
        read_image_2d(tmp_path / "v.npy")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no 2D slices"):
        read_volume(tmp_path / "other")


# ------------------------------------------------------------------------------------------- load_subject
def _octa_subject(tmp_path: Path, sid: str = "10001", octa_value: int | None = None, oct_rows: int = H) -> Subject:
    for mod, base in (("OCTA", 0), ("OCT", 100)):
        folder = tmp_path / mod / sid
        for n in range(1, 5):
            rows = oct_rows if mod == "OCT" else H
            img = ramp(base + n)[:rows] if octa_value is None or mod == "OCT" else np.full((H, W), octa_value,
                                                                                         np.uint8)
            write_2d(folder / f"{n}.bmp", img)
    return Subject(sid, "DR", {"OCTA": str(tmp_path / "OCTA" / sid), "OCT": str(tmp_path / "OCT" / sid)},
                   spacing=(0.25, 0.125, 1.5))


def test_load_subject_modalities(tmp_path):
    subject = _octa_subject(tmp_path)
    arr, geo = load_subject(subject, "OCTA")
    assert arr.shape == (1, 4, H, W) and arr.dtype == np.uint8 and arr[0, 0, 0, 0] == 1
    assert geo.shape == (4, H, W) and geo.spacing == (0.25, 0.125, 1.5)
    both, _ = load_subject(subject, "OCT+OCTA")
    assert both.shape == (2, 4, H, W) and both[0, 0, 0, 0] == 101 and both[1, 0, 0, 0] == 1  # OCT first
    assert load_subject(subject, "OCT")[0][0, 0, 0, 0] == 101


def test_load_subject_image_key_and_2d(tmp_path):
    subject = Subject("a", "CNV", {"image": str(write_2d(tmp_path / "a.png", ramp(5)))})
    arr, geo = load_subject(subject, "OCT+OCTA")  # the "image" key is used whatever the modality
    assert arr.shape == (1, H, W) and arr.dtype == np.uint8 and geo.shape == (H, W)


def test_load_subject_errors_name_the_subject(tmp_path):
    subject = _octa_subject(tmp_path, "10003", octa_value=0)
    with pytest.raises(DataError, match=r"subject 10003: OCTA volume .*10003 is constant \(all 0\): the scan is "
                                        r"empty or failed to export"):
        load_subject(subject, "OCTA")
    mismatch = _octa_subject(tmp_path / "m", "10004", oct_rows=H - 2)
    with pytest.raises(DataError, match=r"subject 10004: OCT shape .* and OCTA shape .* differ"):
        load_subject(mismatch, "OCT+OCTA")
    with pytest.raises(DataError, match=r"subject 10004: no OCT scan"):
        load_subject(Subject("10004", None, {"OCTA": mismatch.paths["OCTA"]}), "OCT+OCTA")
    vol = np.ones((3, H, W), np.float32)
    vol[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", vol)
    with pytest.raises(DataError, match=r"subject n: volume .*nan\.npy contains 1 NaN"):
        load_subject(Subject("n", None, {"image": str(tmp_path / "nan.npy")}), "OCTA")
    np.save(tmp_path / "allnan.npy", np.full((3, H, W), np.nan, np.float32))
    with pytest.raises(DataError, match=r"subject m: .*allnan\.npy is all NaN"):
        load_subject(Subject("m", None, {"image": str(tmp_path / "allnan.npy")}), "OCTA")
    with pytest.raises(DataError, match=r"subject x: .*gone\.nii\.gz: no such file"):
        load_subject(Subject("x", None, {"image": str(tmp_path / "gone.nii.gz")}), "OCTA")


@pytest.mark.parametrize("dim", ["3d", "2d"])
def test_preset_errors_name_the_subject_once(tmp_path, dim):
    """A preset that loads a subject names it once ("subject 10003: ..."), never "subject 10003: subject 10003:";
    errors of an injected loader that does not name the subject still get the prefix."""
    from octa3d.config import Config
    from octa3d.data.presets import build_preset

    cfg = Config()
    cfg.model.dim = dim
    subject = _octa_subject(tmp_path, "10003", octa_value=0)
    with pytest.raises(DataError) as err:
        build_preset(cfg).preprocess(subject)
    assert str(err.value).startswith("subject 10003: OCTA volume") and str(err.value).count("subject 10003") == 1

    def loader(subject, modality):
        raise DataError("broken file")

    with pytest.raises(DataError, match="^subject 10003: broken file$"):
        build_preset(cfg, loader=loader).preprocess(subject)


# ------------------------------------------------------------------------------------------- BMP decoding
def _bmp(path: Path, index: np.ndarray, palette: list[tuple[int, int, int]], top_down: bool = False) -> None:
    """An uncompressed 8-bit BMP with a BITMAPINFOHEADER and ``len(palette)`` colours (RGB tuples)."""
    h, w = index.shape
    stride = (w + 3) // 4 * 4
    order = range(h) if top_down else range(h - 1, -1, -1)
    pixels = b"".join(bytes(index[y].astype(np.uint8)) + b"\x07" * (stride - w) for y in order)
    table = b"".join(struct.pack("<BBBB", b, g, r, 0) for r, g, b in palette)
    offset = 14 + 40 + len(table)
    head = struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, 8, 0, len(pixels), 2835, 2835,
                       0 if len(palette) == 256 else len(palette), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + info + table + pixels)


def test_load_subject_stacks_channels_with_numpy_promotion(tmp_path):
    a = np.random.default_rng(4).integers(1, 200, (3, 5, 6)).astype(np.uint8)
    b = (a.astype(np.uint16) * 300)
    np.save(tmp_path / "oct.npy", a)
    np.save(tmp_path / "octa.npy", b)
    subject = Subject(id="s1", label="NORMAL", paths={"OCT": str(tmp_path / "oct.npy"),
                                                      "OCTA": str(tmp_path / "octa.npy")})
    arr, geo = load_subject(subject, "OCT+OCTA")
    assert arr.dtype == np.uint16 and geo.shape == (3, 5, 6)
    np.testing.assert_array_equal(arr, np.stack([a, b]))
    one, _ = load_subject(subject, "OCTA")
    assert one.shape == (1, 3, 5, 6) and one.dtype == np.uint16


@pytest.mark.parametrize("kind", ["gray", "identity", "colour", "short", "top_down"])
def test_numpy_bmp_stack_equals_simpleitk(tmp_path, kind):
    rng = np.random.default_rng(len(kind))
    n_colors = 100 if kind == "short" else 256
    palette = {"gray": [(v, v, v) for v in rng.integers(0, 256, 256).tolist()],
               "identity": [(v, v, v) for v in range(256)]}.get(
        kind, [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n_colors)])
    folder = tmp_path / "scan"
    for n in range(1, 12):  # 10.bmp and 11.bmp after 9.bmp
        _bmp(folder / f"{n}.bmp", rng.integers(0, n_colors, (9, 13)), palette, top_down=kind == "top_down")
    arr, geo = read_volume(folder, spacing=(0.5, 0.25, 2.0))
    files = [str(folder / f"{n}.bmp") for n in range(1, 12)]
    ref = sitk.ReadImage(files, sitk.sitkUInt8)
    assert arr.dtype == np.uint8 and np.array_equal(arr, sitk.GetArrayFromImage(ref))
    assert geo.shape == (11, 9, 13) and geo.spacing == (0.5, 0.25, 2.0)
    assert geo.origin == ref.GetOrigin() and geo.direction == ref.GetDirection()


def test_other_bmps_still_read_by_simpleitk(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (2, 6, 7, 3)).astype(np.uint8)
    folder = tmp_path / "scan"
    folder.mkdir()
    files = [str(folder / f"{n}.bmp") for n in (1, 2)]
    for i, f in enumerate(files):  # 24-bit BMPs: not the NumPy fast path
        sitk.WriteImage(sitk.GetImageFromArray(rgb[i], isVector=True), f)
    arr, _ = read_volume(folder)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(files, sitk.sitkUInt8))
    assert arr.shape == (2, 6, 7) and np.array_equal(arr, ref)
