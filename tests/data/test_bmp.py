"""8-bit palette BMP: the encoder's files read back exactly (NumPy decoder and SimpleITK), and what the decoder
leaves to SimpleITK."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from octa3d.data.bmp import bmp8_header, encode_bmp8, palette_lut, read_bmp8_stack


def write_stack(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{n}.bmp" for n in range(1, len(images) + 1)]
    for f, img in zip(files, images):
        f.write_bytes(encode_bmp8(img))
    return files


@pytest.mark.parametrize("width", [12, 13, 14, 15])  # every row padding (0-3 bytes)
def test_round_trip_equals_simpleitk(tmp_path: Path, width: int) -> None:
    images = np.random.default_rng(width).integers(0, 256, (3, 7, width), dtype=np.uint8)
    files = write_stack(tmp_path, images)
    decoded = read_bmp8_stack(files)
    assert decoded is not None and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, images)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage([str(f) for f in files], sitk.sitkUInt8)),
                                  images)


def test_header_of_an_encoded_file() -> None:
    img = np.arange(5 * 6, dtype=np.uint8).reshape(5, 6)
    data = encode_bmp8(img, ppm=(3000, 1500))
    width, height, offset, top_down, palette = bmp8_header(data)
    assert (width, height, top_down) == (6, 5, False)  # bottom-up rows, as most writers store them
    assert offset == 14 + 40 + 4 * 256 and len(data) == offset + 8 * 5  # rows padded to 8 bytes
    assert struct.unpack_from("<ii", data, 38) == (3000, 1500)  # pixels per metre
    assert palette_lut(palette) is None  # grayscale identity table: indices are the gray values


def test_palette_lut_is_itk_luminance() -> None:
    palette = struct.pack("<4B", 10, 20, 200, 0) + struct.pack("<4B", 255, 255, 255, 0)  # B, G, R, reserved
    lut = palette_lut(palette)
    assert lut.tolist() == [int((2125 * 200 + 7154 * 20 + 721 * 10) / 10000), 255]


def test_other_files_are_left_to_simpleitk(tmp_path: Path) -> None:
    img = np.zeros((4, 5), np.uint8)
    good = tmp_path / "good.bmp"
    good.write_bytes(encode_bmp8(img))
    assert bmp8_header(b"PNG not a bmp") is None
    assert bmp8_header(encode_bmp8(img)[:-3]) is None  # truncated pixel area
    rgb = tmp_path / "rgb.bmp"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 3), np.uint8), isVector=True), str(rgb))
    assert bmp8_header(rgb.read_bytes()) is None  # 24-bit
    assert read_bmp8_stack([good, rgb]) is None
    other_size = tmp_path / "big.bmp"
    other_size.write_bytes(encode_bmp8(np.zeros((4, 6), np.uint8)))
    assert read_bmp8_stack([good, other_size]) is None
    assert read_bmp8_stack([good, tmp_path / "missing.bmp"]) is None


def test_index_outside_a_short_palette(tmp_path: Path) -> None:
    data = bytearray(encode_bmp8(np.full((2, 4), 200, np.uint8)))
    struct.pack_into("<I", data, 46, 100)  # the header now declares 100 colours: index 200 is outside
    f = tmp_path / "short.bmp"
    f.write_bytes(bytes(data))
    assert bmp8_header(bytes(data)) is not None and read_bmp8_stack([f]) is None
