"""8-bit palette BMP, the format of the OCTA-500 B-scans and projection maps: a NumPy encoder and decoder.

Only one layout is handled, the one OCTA-500 ships: a ``BM`` file header, a 40-byte BITMAPINFOHEADER, one plane,
8 bits per pixel, no compression, a colour table of at most 256 4-byte (B, G, R, reserved) entries, rows padded
to 4 bytes. :func:`encode_bmp8` writes it (the synthetic generator); :func:`read_bmp8_stack` decodes a stack of
such files about 10x faster than SimpleITK, giving exactly what ITK gives, and returns None for anything else so
that the SimpleITK path (with its checks and error messages) reads it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_FILE_HEADER, _INFO_HEADER = 14, 40


def _stride(width: int) -> int:
    """Bytes per stored row: BMP rows are padded to a multiple of 4 bytes."""
    return (width + 3) // 4 * 4


def encode_bmp8(img: np.ndarray, ppm: tuple[int, int] = (0, 0)) -> bytes:
    """An 8-bit palette (indexed) BMP with a grayscale colour table, like the OCTA-500 files.

    Args:
        img: 2D uint8 image (rows x columns).
        ppm: pixels per metre (x, y) for the header (ITK ignores them; image viewers show the scale).

    Returns:
        The file's bytes (bottom-up rows, as most writers store them).
    """
    h, w = img.shape
    rows = np.zeros((h, _stride(w)), np.uint8)
    rows[:, :w] = img[::-1]  # positive height = bottom-up rows
    palette = np.zeros((256, 4), np.uint8)
    palette[:, :3] = np.arange(256, dtype=np.uint8)[:, None]  # B, G, R, reserved
    offset = _FILE_HEADER + _INFO_HEADER + palette.nbytes
    header = b"BM" + struct.pack("<IHHI", offset + rows.nbytes, 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", _INFO_HEADER, w, h, 1, 8, 0, rows.nbytes, ppm[0], ppm[1], 256, 256)
    return header + info + palette.tobytes() + rows.tobytes()


def bmp8_header(data: bytes) -> tuple[int, int, int, bool, bytes] | None:
    """``(width, height, pixel offset, top_down, BGRx palette)`` of an uncompressed 8-bit palette BMP, else None.

    Args:
        data: the whole file (the pixel area is checked to be present).
    """
    if len(data) < _FILE_HEADER + _INFO_HEADER or data[:2] != b"BM":
        return None
    offset, hsize, width, height, planes, bpp, compression = struct.unpack_from("<I I i i H H I", data, 10)
    n_colors = struct.unpack_from("<I", data, 46)[0] or 256
    if hsize != _INFO_HEADER or planes != 1 or bpp != 8 or compression != 0 or width <= 0 or height == 0 \
            or n_colors > 256:
        return None
    table = _FILE_HEADER + hsize
    if table + 4 * n_colors > offset or offset + _stride(width) * abs(height) > len(data):
        return None
    return width, abs(height), offset, height < 0, data[table:table + 4 * n_colors]


#: Bytes of a BMP file that :func:`bmp_dims` needs (file header + the DIB header up to its image-size field).
BMP_HEAD = 38


def bmp_dims(head: bytes, file_size: int | None = None) -> tuple[int, int, int] | str:
    """``(width, height, bits per pixel)`` from the first :data:`BMP_HEAD` bytes of any BMP, or why not.

    No pixel is read: this is the cheap check of a whole dataset's slice sizes at discovery, and of every BMP
    before it is decoded (ITK reads a cut BMP without complaint, returning whatever memory held).

    Args:
        head: the file's first bytes.
        file_size: the file's size; when given, a file too short for its pixels is reported (uncompressed files:
            the pixel size; RLE-compressed ones: the compressed size their header declares).

    Returns:
        The dimensions, or a reason string (``"not a BMP file"``, ``"truncated ..."``).
    """
    if len(head) < 26 or head[:2] != b"BM":
        return "not a BMP file"
    offset, hsize = struct.unpack_from("<II", head, 10)
    if file_size is not None and file_size < max(offset, _FILE_HEADER + hsize):
        return f"truncated ({file_size} bytes, its header and palette need {max(offset, _FILE_HEADER + hsize)})"
    image_size = 0
    if hsize == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height, _, bpp = struct.unpack_from("<HHHH", head, 18)
        compression = 0
    elif len(head) >= 34 and hsize >= 40:
        width, height, _, bpp, compression = struct.unpack_from("<iiHHI", head, 18)
        if len(head) >= 38:
            image_size = struct.unpack_from("<I", head, 34)[0]
    else:
        return "unsupported BMP header"
    if width <= 0 or height == 0 or bpp not in (1, 4, 8, 16, 24, 32):
        return f"invalid BMP header ({width}×{height}, {bpp} bits per pixel)"
    if file_size is not None:
        if compression in (0, 3):  # BI_RGB, BI_BITFIELDS: stored uncompressed
            need = offset + (width * bpp + 31) // 32 * 4 * abs(height)
        else:  # RLE/JPEG/PNG inside: only the header's compressed size says what must be there (0: unknown)
            need = offset + image_size if image_size else 0
        if file_size < need:
            return f"truncated ({file_size} bytes, {need} needed for {width}×{abs(height)} pixels)"
    return width, abs(height), bpp


def palette_lut(palette: bytes) -> np.ndarray | None:
    """Gray value of every palette index, as ITK computes it for a scalar read (None: identity table)."""
    bgr = np.frombuffer(palette, np.uint8).reshape(-1, 4)[:, :3].astype(np.float64)
    # itk::ConvertPixelBuffer::ConvertRGBToGray: (2125 R + 7154 G + 721 B) / 10000, truncated
    lut = ((2125.0 * bgr[:, 2] + 7154.0 * bgr[:, 1] + 721.0 * bgr[:, 0]) / 10000.0).astype(np.uint8)
    if len(lut) == 256 and np.array_equal(lut, np.arange(256, dtype=np.uint8)):
        return None
    return lut


def read_bmp8_stack(files: list[Path]) -> np.ndarray | None:
    """Decode a stack of uncompressed 8-bit palette BMPs into a ``(slices, rows, columns)`` uint8 array, or None.

    Gives exactly what ``sitk.ReadImage(files, sitk.sitkUInt8)`` gives (palette → ITK luminance, bottom-up rows
    flipped). Returns None as soon as a file is unreadable, has another layout or size, or holds an index outside
    its palette.
    """
    out: np.ndarray | None = None
    luts: dict[bytes, np.ndarray | None] = {}
    for i, f in enumerate(files):
        try:
            data = f.read_bytes()
        except OSError:
            return None
        head = bmp8_header(data)
        if head is None:
            return None
        width, height, offset, top_down, palette = head
        if out is None:
            out = np.empty((len(files), height, width), np.uint8)
        elif out.shape[1:] != (height, width):
            return None
        rows = np.frombuffer(data, np.uint8, count=_stride(width) * height,
                             offset=offset).reshape(height, _stride(width))[:, :width]
        rows = rows if top_down else rows[::-1]
        if palette not in luts:
            luts[palette] = palette_lut(palette)
        lut = luts[palette]
        if lut is None:
            out[i] = rows
        else:
            if len(lut) < 256 and int(rows.max()) >= len(lut):
                return None
            np.take(lut, rows, out=out[i], mode="wrap")  # indices checked above; "wrap" is the fast path
    return out
